//! Property tests of request validation: random GenerateRequests (hostile strings, huge
//! and out-of-range numbers, unknown enum values, broken and oversize images) through
//! `prepare`, against the shipped model (`models/shapes`). It never panics; a refusal is
//! INVALID_ARGUMENT, NOT_FOUND or RESOURCE_EXHAUSTED with a message under 1 KiB and no
//! raw control characters (so it cannot forge log lines or overflow status metadata).
use frisket_proto::v1 as pb;
use frisket_server::service::models::Catalog;
use frisket_server::service::request::prepare;
use frisket_server::service::Limits;
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;
use tonic::Code;

const MODEL: &str = "shapes";

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        Catalog::new(&models).expect("the shipped models folder")
    })
}

/// Strings a client might send: empty, plain, any Unicode, control characters and escapes,
/// and long ones.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        3 => "[a-z0-9 ,.:_-]{1,30}",
        2 => any::<String>(),
        2 => "[\\x00-\\x1f\\x7f\u{1b}\u{202e}\u{feff}a\\[\\n\\\\\"]{1,40}",
        1 => (1usize..40_000).prop_map(|n| "\u{1b}[31m\n2026-01-01 INFO forged ".repeat(n / 32 + 1)),
    ]
}

fn one_of(values: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::sample::select(values).prop_map(str::to_string)
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![3 => -2.0..60.0f64, 1 => any::<f64>(), 1 => Just(f64::NAN), 1 => Just(f64::INFINITY)]
}

fn size() -> impl Strategy<Value = u32> {
    prop_oneof![3 => Just(0u32), 4 => (1u32..=24).prop_map(|k| k * 8), 1 => 1u32..5000, 1 => any::<u32>()]
}

fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0i32..3, 1 => any::<i32>()]
}

fn png(width: u32, height: u32, grey: bool) -> Vec<u8> {
    let img =
        image::GrayImage::from_fn(width, height, |x, y| image::Luma([if (x / 4 + y / 4) % 2 == 0 { 255 } else { 0 }]));
    let img = if grey {
        image::DynamicImage::ImageLuma8(img)
    } else {
        image::DynamicImage::ImageRgb8(image::DynamicImage::ImageLuma8(img).to_rgb8())
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn image_field() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => Just(Vec::new()),
        3 => (1u32..=12, 1u32..=12, any::<bool>()).prop_map(|(w, h, grey)| png(w * 8, h * 8, grey)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
        // A valid image with a byte flipped.
        1 => (1u32..=8, any::<usize>(), 1u8..=255).prop_map(|(s, at, x)| {
            let mut p = png(s * 8, s * 8, false);
            let at = at % p.len();
            p[at] ^= x;
            p
        }),
    ]
}

prop_compose! {
    fn explain()(
        mode in prop::option::of(enum_value()),
        subject_words in prop::collection::vec(prop_oneof![one_of(&["circle", "red", "square"]), text()], 0..3),
        subject_indices in prop::collection::vec(prop_oneof![0u32..10, any::<u32>()], 0..3),
        layers in prop_oneof![one_of(&["", "last", "all", "0,1", "0,99"]), text()],
        manipulate_at in prop::collection::vec(float(), 0..3),
        numbers in (
            prop::option::of(float()),
            prop::option::of(prop_oneof![0u32..9, any::<u32>()]),
            prop::option::of(float()),
            prop::option::of(prop_oneof![0u32..9, any::<u32>()]),
            prop::option::of(prop_oneof![0u32..4, any::<u32>()]),
            prop::option::of(prop_oneof![0u32..300, any::<u32>()]),
        ),
        start in prop::option::of(enum_value()),
        protect_feather in prop_oneof![0u32..8, any::<u32>()],
    ) -> pb::ExplainOptions {
        let (mask_threshold, blur_kernel, blur_sigma, dilation, dilation_passes, exact_batch) = numbers;
        pb::ExplainOptions {
            mode, subject_words, subject_indices, layers, manipulate_at, mask_threshold, blur_kernel,
            blur_sigma, dilation, start, protect_feather, dilation_passes, exact_batch,
        }
    }
}

prop_compose! {
    fn stream()(
        previews in prop::option::of((any::<bool>(), any::<u32>(), enum_value(), any::<u32>(), enum_value())),
        latents in prop::option::of((any::<bool>(), any::<u32>())),
        explain in prop::option::of((any::<bool>(), any::<bool>())),
    ) -> pb::StreamOptions {
        pb::StreamOptions {
            previews: previews.map(|(enabled, every, format, max_size, method)| {
                pb::PreviewOptions { enabled, every, format, max_size, method }
            }),
            latents: latents.map(|(enabled, every)| pb::LatentOptions { enabled, every }),
            explain: explain.map(|(masks, heatmaps)| pb::ExplainStreamOptions { masks, heatmaps }),
        }
    }
}

prop_compose! {
    fn request()(
        names in (
            prop_oneof![12 => Just(MODEL.to_string()), 1 => Just(String::new()), 1 => text()],
            prop_oneof![4 => one_of(&["a red circle", "a blue square on the left"]), 2 => text()],
            text(),
            prop_oneof![
                2 => Just(String::new()),
                3 => prop::sample::select(frisket_engine::schedulers::NAMES.to_vec()).prop_map(str::to_string),
                1 => text(),
            ],
            prop_oneof![3 => Just(String::new()), 2 => one_of(&["job-1", "a.b:c_d-e"]), 1 => text()],
            prop_oneof![8 => Just(String::new()), 1 => Just("paper".to_string()), 1 => text()],
        ),
        numbers in (
            prop::option::of(any::<u64>()),
            prop::option::of(prop_oneof![3 => 0u32..8, 1 => any::<u32>()]),
            prop::option::of(prop_oneof![4 => 0.0..20.0f64, 1 => float()]),
            size(),
            size(),
            prop::option::of(prop_oneof![3 => 0.0..=1.0f64, 1 => float()]),
        ),
        reference_image in image_field(),
        protected_mask in image_field(),
        explain in prop::option::weighted(0.4, explain()),
        stream in prop::option::of(stream()),
        loras in prop::option::weighted(0.2, prop::collection::vec((text(), prop::option::of(any::<f32>())), 1..3)),
        size_conditioning in prop::option::weighted(0.2, (any::<u32>(), any::<u32>(), 0u32..20_000, 0u32..20_000)),
        num_images in prop::option::weighted(0.2, prop_oneof![3 => 0u32..10, 1 => any::<u32>()]),
    ) -> pb::GenerateRequest {
        let (model, prompt, negative_prompt, scheduler, job_id, preset) = names;
        let (seed, steps, guidance, width, height, strength) = numbers;
        pb::GenerateRequest {
            model, prompt, negative_prompt, seed, steps, guidance, scheduler, width, height,
            reference_image, strength, protected_mask, job_id, preset, explain, stream,
            loras: loras.unwrap_or_default().into_iter().map(|(name, weight)| pb::LoraSpec { name, weight }).collect(),
            size_conditioning: size_conditioning.map(|(original_width, original_height, crop_top, crop_left)| {
                pb::SizeConditioning { original_width, original_height, crop_top, crop_left }
            }),
            // Decided by the handler, not by `prepare`.
            detach: false,
            num_images,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn validation_never_panics_and_refuses_clearly(req in request()) {
        match prepare(&req, catalog(), &Limits::default(), 1) {
            Ok(job) => {
                prop_assert!(job.steps >= 1 && job.width >= 1 && job.height >= 1);
            }
            Err(status) => {
                let allowed = [Code::InvalidArgument, Code::NotFound, Code::ResourceExhausted];
                prop_assert!(allowed.contains(&status.code()), "{:?}", status);
                prop_assert!(status.message().len() < 1024, "a {}-byte message", status.message().len());
                prop_assert!(
                    !status.message().chars().any(char::is_control),
                    "a control character in {:?}", status.message()
                );
            }
        }
    }
}
