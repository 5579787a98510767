//! Write sample scenes for a person to look at.
//!
//! `cargo run -p frisket-shapes --example sample -- OUTDIR N [--size 64] [--seed S] [--degrade]`
//!
//! For each scene `i` (seed S + i): `NNNN.png` (the image), `NNNN.json` (metadata with
//! the caption), `NNNN_mask{k}.png` (object k's mask, 0/255). Also `captions.txt`
//! (one "file<TAB>caption" line per scene), `judge.txt` (what the judge sees) and
//! `sheet.png` (the first 16 images, 4× enlarged, in a grid). `--degrade` blurs and
//! adds noise before judging (and writes `NNNN_degraded.png`).

use std::fmt::Write as _;
use std::path::PathBuf;

use frisket_shapes::{compare_to_truth, generate, judge, perturb, GenConfig};
use image::RgbImage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: sample OUTDIR N [--size 64] [--seed S] [--degrade]");
        std::process::exit(2);
    }
    let out = PathBuf::from(&args[0]);
    let n: u64 = args[1].parse()?;
    let mut size = 64u32;
    let mut seed0 = 0u64;
    let mut degrade = false;
    let mut i = 2;
    while i < args.len() {
        match args[i].as_str() {
            "--size" => {
                size = args[i + 1].parse()?;
                i += 1;
            }
            "--seed" => {
                seed0 = args[i + 1].parse()?;
                i += 1;
            }
            "--degrade" => degrade = true,
            a => return Err(format!("unknown argument {a}").into()),
        }
        i += 1;
    }
    std::fs::create_dir_all(&out)?;
    let cfg = GenConfig::default().with_size(size);
    let (cols, scale) = (4u32, 4u32);
    let shown = n.min(16) as u32;
    let rows = shown.div_ceil(cols).max(1);
    let gap = 4;
    let mut sheet = RgbImage::from_pixel(
        cols * (size * scale + gap) + gap,
        rows * (size * scale + gap) + gap,
        image::Rgb([60, 60, 60]),
    );
    let mut captions = String::new();
    let mut judged = String::new();
    for k in 0..n {
        let seed = seed0 + k;
        let scene = generate(seed, &cfg)?;
        let stem = format!("{k:04}");
        scene.image.save(out.join(format!("{stem}.png")))?;
        std::fs::write(out.join(format!("{stem}.json")), scene.to_json())?;
        for (m, mask) in scene.masks.iter().enumerate() {
            mask.to_gray().save(out.join(format!("{stem}_mask{m}.png")))?;
        }
        writeln!(captions, "{stem}.png\t{}", scene.caption())?;
        let img = if degrade {
            let d = perturb::degrade(&scene.image, 0.8, 8, 10, seed);
            d.save(out.join(format!("{stem}_degraded.png")))?;
            d
        } else {
            scene.image.clone()
        };
        let j = judge(&img);
        let report = compare_to_truth(&j, &scene);
        let found: Vec<String> = j
            .objects
            .iter()
            .map(|o| format!("{} {} {} {} ({} px)", o.size, o.colour, o.shape, o.position, o.area))
            .collect();
        let bg: Vec<String> = j.background.colours.iter().map(|(c, s)| format!("{c} {:.0}%", s * 100.0)).collect();
        writeln!(
            judged,
            "{stem}.png\t{}\tjudge: {} | background {} {}",
            if report.all_right { "RIGHT" } else { "WRONG" },
            found.join("; "),
            j.background.kind,
            bg.join(", ")
        )?;
        if (k as u32) < shown {
            let (gx, gy) =
                ((k as u32 % cols) * (size * scale + gap) + gap, (k as u32 / cols) * (size * scale + gap) + gap);
            for y in 0..size * scale {
                for x in 0..size * scale {
                    sheet.put_pixel(gx + x, gy + y, *img.get_pixel(x / scale, y / scale));
                }
            }
        }
    }
    sheet.save(out.join("sheet.png"))?;
    std::fs::write(out.join("captions.txt"), &captions)?;
    std::fs::write(out.join("judge.txt"), &judged)?;
    print!("{captions}");
    println!("wrote {n} scenes to {}", out.display());
    Ok(())
}
