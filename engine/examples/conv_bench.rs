//! `make bench`'s convolution table: oneDNN's direct 3×3 convolution against the Winograd
//! path on the shapes of the bench model and of full-size SD 1.5, SDXL and their VAE
//! decoder, medians of timed calls, with the choice this process makes for each.
use frisket_engine::nn::channels_last;
use frisket_engine::winograd::{self, CpuConv, Shape};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// (what, batch, in channels, latent side, out channels).
const SHAPES: &[(&str, i64, i64, i64, i64)] = &[
    ("bench UNet 128", 2, 128, 32, 128),
    ("bench UNet 256", 2, 256, 16, 256),
    ("bench UNet 256, up", 2, 512, 16, 256),
    ("bench UNet 256 at 32", 2, 256, 32, 256),
    ("bench UNet 256, 8x8", 2, 256, 8, 256),
    ("SD 1.5 UNet 320 (512 px)", 2, 320, 64, 320),
    ("SD 1.5 UNet 640", 2, 640, 32, 640),
    ("SD 1.5 UNet 1280", 2, 1280, 16, 1280),
    ("SD 1.5 UNet 1280, 8x8", 2, 1280, 8, 1280),
    ("SD 1.5 UNet 2560 to 1280, up", 2, 2560, 16, 1280),
    ("SDXL UNet 1280 (1024 px)", 2, 1280, 32, 1280),
    ("VAE decoder 512 at 128 (512 px)", 1, 512, 128, 512),
    ("VAE decoder 256 at 256", 1, 256, 256, 256),
];

/// Median milliseconds of `a` and of `b` over `runs` calls each, after one warm-up call
/// of each; the calls alternate so that drift in the machine's load hits both alike.
fn median_ms_pair(a: impl Fn() -> Tensor, b: impl Fn() -> Tensor, runs: usize) -> (f64, f64) {
    let time = |f: &dyn Fn() -> Tensor| {
        let start = Instant::now();
        let _ = f();
        start.elapsed().as_secs_f64() * 1e3
    };
    let _ = (a(), b());
    let (mut times_a, mut times_b): (Vec<f64>, Vec<f64>) = (0..runs).map(|_| (time(&a), time(&b))).unzip();
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[runs / 2]
    };
    (median(&mut times_a), median(&mut times_b))
}

fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let _guard = tch::no_grad_guard();
    tch::manual_seed(0);
    let choice = CpuConv::current();
    println!(
        "3x3 convolutions, float32, {} threads, {runs} timed calls each, alternated; this machine's choice: {choice:?}",
        tch::get_num_threads()
    );
    println!(
        "{:<34} {:>22} {:>10} {:>10} {:>7}  chosen",
        "shape", "N x C x side -> C_out", "direct ms", "wino ms", "ratio"
    );
    let options = (Kind::Float, Device::Cpu);
    for &(what, n, c, side, c_out) in SHAPES {
        let x = channels_last(&Tensor::randn([n, c, side, side], options));
        let w = channels_last(&(Tensor::randn([c_out, c, 3, 3], options) * 0.05));
        let b = Tensor::randn([c_out], options);
        let (direct, wino) = median_ms_pair(
            || x.conv2d(&w, Some(&b), [1, 1], [1, 1], [1, 1], 1),
            || winograd::conv3x3(&x, &w, Some(&b)),
            runs,
        );
        let image = Shape { n: n as usize, h: side as usize, w: side as usize, c: c as usize };
        let chosen = if choice.winograd_for(image, c_out as usize) { "winograd" } else { "direct" };
        let shape = format!("{n} x {c} x {side}^2 -> {c_out}");
        println!("{what:<34} {shape:>22} {direct:>10.2} {wino:>10.2} {:>7.2}  {chosen}", wino / direct);
    }
}
