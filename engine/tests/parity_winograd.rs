//! The Winograd path for 3×3 convolutions, forced for every such convolution in this test
//! process (`FRISKET_CPU_CONV=winograd`): each call equals libtorch's direct convolution up
//! to float32 rounding, and whole runs of the fixture models still match diffusers' images.
mod common;

use frisket_engine::nn::channels_last;
use frisket_engine::nn::KernelChoice;
use frisket_engine::winograd::{self, CpuConv};
use std::sync::Once;
use tch::{Device, Kind, Tensor};

/// Sets the override before this process's first convolution: every test calls it first,
/// and `Once` holds the others until it is done.
fn force_winograd() {
    static FORCE: Once = Once::new();
    FORCE.call_once(|| std::env::set_var(CpuConv::ENV, "winograd"));
    assert_eq!(CpuConv::current(), CpuConv::Winograd);
}

#[test]
fn each_convolution_equals_libtorchs_direct_one() {
    force_winograd();
    let _guard = tch::no_grad_guard();
    tch::manual_seed(7);
    let options = (Kind::Float, Device::Cpu);
    // (batch, in, height, width, out, bias, channels-last input): odd sizes (a half-used
    // last tile), a batch of 3, no bias, an NCHW input, and 1024 tiles over 256 channels,
    // which run in several bands.
    for (n, c, h, w, c_out, bias, last) in [
        (2, 32, 8, 8, 64, true, true),
        (3, 17, 7, 5, 9, true, true),
        (1, 8, 1, 1, 4, false, true),
        (2, 16, 9, 12, 16, true, false),
        (1, 256, 64, 64, 256, true, true),
    ] {
        let x = Tensor::randn([n, c, h, w], options);
        let x = if last { channels_last(&x) } else { x };
        let weight = channels_last(&(Tensor::randn([c_out, c, 3, 3], options) * 0.1));
        let bias = bias.then(|| Tensor::randn([c_out], options));
        assert!(winograd::applies(&x, &weight));
        let ours = winograd::conv3x3(&x, &weight, bias.as_ref());
        let theirs = x.conv2d(&weight, bias.as_ref(), [1, 1], [1, 1], [1, 1], 1);
        assert_eq!(ours.size(), theirs.size());
        assert!(frisket_engine::nn::is_channels_last(&ours), "the output is channels-last, as oneDNN's");
        let scale = theirs.abs().max().double_value(&[]);
        let worst = (&ours - &theirs).abs().max().double_value(&[]) / scale;
        println!("{:?} → {c_out}: max |Δ| / max |y| = {worst:.2e}", (n, c, h, w));
        assert!(worst < 1e-5, "{:?} → {c_out}: relative difference {worst:.2e}", (n, c, h, w));
    }
}

/// A convolution whose input records a gradient (exact Grad-SAM) stays on libtorch's path.
#[test]
fn inputs_with_gradients_take_the_direct_path() {
    force_winograd();
    let x = Tensor::randn([1, 8, 4, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let weight = Tensor::randn([8, 8, 3, 3], (Kind::Float, Device::Cpu));
    assert!(!winograd::applies(&x, &weight));
    assert!(winograd::applies(&x.detach(), &weight));
    assert!(!winograd::applies(&x.detach().to_kind(Kind::Double), &weight.to_kind(Kind::Double)));
}

#[test]
fn sd1_images_match_diffusers_with_winograd() {
    force_winograd();
    common::check_pipeline_images("sd1");
}

#[test]
fn sd2_images_match_diffusers_with_winograd() {
    force_winograd();
    common::check_pipeline_images("sd2");
}
