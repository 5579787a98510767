//! train_vae STEPS BATCH BLOCKS(e.g. 32,64,64) [LR] [OUT_DIR]: VAE training loop (smoke test
//! and the first stage of the real run). Loss: L1 + 0.5·MSE reconstruction of a posterior
//! sample, plus KL·1e-6 (SD's weight), on scenes drawn on the fly.
use anyhow::Result;
use frisket_trainer::{configs, data, params::AdamW};
use std::io::Write;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let steps: u64 = a.get(1).map_or(300, |s| s.parse().unwrap());
    let bs: usize = a.get(2).map_or(16, |s| s.parse().unwrap());
    let blocks: Vec<i64> = a.get(3).map_or("32,64,64".into(), |s| s.clone()).split(',').map(|s| s.parse().unwrap()).collect();
    let lr: f64 = a.get(4).map_or(1e-3, |s| s.parse().unwrap());
    let out = std::path::PathBuf::from(a.get(5).map_or("target/vae_smoke", |s| s.as_str()));
    std::fs::create_dir_all(&out)?;
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let cfg_json = configs::vae(&blocks, 1, 16, 1.0);
    let (params, vae, _cfg) = frisket_trainer::vae(&cfg_json, Device::Cpu)?;
    println!("vae {blocks:?}: {} tensors, {} parameters", params.tensors.len(), params.count());
    let mut opt = AdamW::new(&params, lr, 0.0);
    let mut log = std::fs::File::create(out.join("loss.csv"))?;
    writeln!(log, "step,loss,l1,mse,kl,psnr,secs")?;
    let t0 = Instant::now();
    let (mut acc, mut n) = (0.0, 0);
    for step in 0..steps {
        let (x, _) = data::batch(0, step, bs);
        let post = vae.encode(&x);
        let z = post.sample_with(&post.mean.randn_like());
        let y = vae.decode(&z);
        let l1 = (&y - &x).abs().mean(Kind::Float);
        let mse = (&y - &x).square().mean(Kind::Float);
        let kl = ((post.mean.square() + post.logvar.exp() - 1.0 - &post.logvar) * 0.5).sum(Kind::Float) / bs as f64;
        let loss = &l1 + &mse * 0.5 + &kl * 1e-6;
        params.zero_grad();
        loss.backward();
        let gnorm = opt.step(&params);
        let (lv, l1v, msev, klv) = (loss.double_value(&[]), l1.double_value(&[]), mse.double_value(&[]), kl.double_value(&[]));
        let psnr = 10.0 * (4.0 / msev).log10();
        acc += lv;
        n += 1;
        writeln!(log, "{step},{lv:.5},{l1v:.5},{msev:.5},{klv:.1},{psnr:.2},{:.1}", t0.elapsed().as_secs_f64())?;
        if step % 25 == 0 || step + 1 == steps {
            let el = t0.elapsed().as_secs_f64();
            println!(
                "step {step:5} loss(avg) {:.4} l1 {l1v:.4} psnr {psnr:5.2} dB kl {klv:8.1} |g| {gnorm:6.3}  {:.3} s/step  eta {:.0} s",
                acc / n as f64, el / (step + 1) as f64, el / (step + 1) as f64 * (steps - step - 1) as f64
            );
            acc = 0.0;
            n = 0;
        }
    }
    // Latent statistics → scaling_factor (1/std of the posterior mean), as SD did.
    let _g = tch::no_grad_guard();
    let (x, _) = data::batch(99, 0, 64);
    let z = vae.encode(&x).mean;
    let std = z.std(true).double_value(&[]);
    println!("latent std {std:.4} → scaling_factor {:.4}; {:.1} s total", 1.0 / std, t0.elapsed().as_secs_f64());
    params.save(&out.join("vae_fp32.safetensors"), Kind::Float)?;
    let recon = vae.decode(&z);
    let grid = Tensor::cat(&[x.narrow(0, 0, 8), recon.narrow(0, 0, 8)], 0);
    let img = ((grid.clamp(-1.0, 1.0) + 1.0) * 127.5).to_kind(Kind::Uint8); // [16,3,64,64]
    let img = img.view([2, 8, 3, 64, 64]).permute([0, 3, 1, 4, 2]).reshape([128, 512, 3]).contiguous();
    let bytes: Vec<u8> = Vec::<u8>::try_from(img.flatten(0, -1))?;
    image::RgbImage::from_raw(512, 128, bytes).unwrap().save(out.join("recon.png"))?;
    println!("wrote {}/{{loss.csv,recon.png,vae_fp32.safetensors}}", out.display());
    Ok(())
}
