//! bench: forward+backward step times of candidate sizes on this CPU (2 threads).
use anyhow::Result;
use frisket_trainer::engine::unet::{Capture, CrossContext};
use frisket_trainer::{configs, params::AdamW};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn time(label: &str, count: i64, mut f: impl FnMut()) {
    f();
    let t = Instant::now();
    let reps = 3;
    for _ in 0..reps {
        f();
    }
    println!("{label:60} {count:>9} params  {:7.3} s/step", t.elapsed().as_secs_f64() / reps as f64);
}

fn main() -> Result<()> {
    tch::set_num_threads(2);
    tch::manual_seed(0);
    let which: String = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let dev = Device::Cpu;
    if which == "all" || which == "vae" {
        for (blocks, bs) in [(vec![32i64, 64, 64], 16i64), (vec![32, 64, 64, 64], 16), (vec![16, 32, 64], 16)] {
            let (p, vae, _) = frisket_trainer::vae(&configs::vae(&blocks, 1, 16, 1.0), dev)?;
            let mut opt = AdamW::new(&p, 1e-4, 0.0);
            let x = Tensor::rand([bs, 3, 64, 64], (Kind::Float, dev)) * 2.0 - 1.0;
            time(&format!("vae {blocks:?} f{} batch {bs} fwd+bwd+adam", 1 << (blocks.len() - 1)), p.count(), || {
                let post = vae.encode(&x);
                let y = vae.decode(&post.sample_with(&post.mean.randn_like()));
                p.zero_grad();
                (y - &x).abs().mean(Kind::Float).backward();
                opt.step(&p);
            });
        }
    }
    if which == "all" || which == "unet" {
        let text = 64;
        // (blocks, layers, latent side, batch, timestep groups)
        for (blocks, layers, side, bs, groups) in [
            (vec![64i64, 128, 128], 1i64, 16i64, 32i64, 4i64),
            (vec![64, 128, 128], 2, 16, 32, 4),
            (vec![64, 128, 256], 1, 16, 32, 4),
            (vec![96, 192, 192], 1, 16, 32, 4),
            (vec![64, 128, 128], 1, 8, 32, 4),
            (vec![128, 256], 1, 8, 32, 4),
            (vec![64, 128, 128], 1, 16, 32, 1),
        ] {
            let (p, unet, _) = frisket_trainer::unet(&configs::unet(&blocks, layers, 8, text, 32, side), dev)?;
            let mut opt = AdamW::new(&p, 1e-4, 0.0);
            let x = Tensor::randn([bs, 4, side, side], (Kind::Float, dev));
            let ctx = Tensor::randn([bs, 24, text], (Kind::Float, dev));
            time(
                &format!("unet {blocks:?}x{layers} latent {side}² batch {bs} ({groups} t-groups)"),
                p.count(),
                || {
                    let per = bs / groups;
                    let outs: Vec<Tensor> = (0..groups)
                        .map(|g| {
                            unet.forward(
                                &x.narrow(0, g * per, per),
                                100.0 + 200.0 * g as f64,
                                &CrossContext::new(&ctx.narrow(0, g * per, per)),
                                Capture::NONE,
                            )
                            .sample
                        })
                        .collect();
                    let y = Tensor::cat(&outs, 0);
                    p.zero_grad();
                    (y - &x).square().mean(Kind::Float).backward();
                    opt.step(&p);
                },
            );
        }
    }
    if which == "all" || which == "clip" {
        for (hidden, layers) in [(64i64, 4i64), (128, 4)] {
            let (p, clip, _) = frisket_trainer::text_encoder(&configs::text_encoder(700, hidden, layers, 4, 48), dev)?;
            let ids = Tensor::randint(690, [32, 48], (Kind::Int64, dev));
            time(&format!("clip d{hidden} x{layers} batch 32 len 48 fwd+bwd"), p.count(), || {
                let h = clip.forward(&ids);
                p.zero_grad();
                h.square().mean(Kind::Float).backward();
            });
        }
    }
    if which == "all" || which == "step" {
        // Where one UNet training step's time goes (batch 32): data, VAE encode, UNet+TE.
        use frisket_trainer::data::{self, BatchSpec};
        let held_out = std::collections::HashSet::new();
        let t = Instant::now();
        let (x, _) = data::batch(&BatchSpec {
            run_seed: 0,
            step: 0,
            size: 32,
            single_object: false,
            held_out: &held_out,
            focus: &[],
        });
        println!("data: 32 scenes drawn in {:.3} s", t.elapsed().as_secs_f64());
        let (_, vae, _) = frisket_trainer::vae(&configs::vae(&[32, 64, 64], 1, 16, 1.0), dev)?;
        let t = Instant::now();
        for _ in 0..3 {
            tch::no_grad(|| vae.encode(&x).mean.sum(Kind::Float).double_value(&[]));
        }
        println!("vae encode (no grad) batch 32: {:.3} s", t.elapsed().as_secs_f64() / 3.0);
    }
    Ok(())
}
