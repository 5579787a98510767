//! The shapes contrastive image–text model (`models/shapes-clip`): its configuration, training
//! data and evaluation. The model is frisket-eval's `Clip` (the evaluator's CLIPModel forward)
//! built over trainable leaves, so what trains is what `frisket-eval clip-score` runs.
use crate::data::TRAIN_SEED_BASE;
use anyhow::{Context, Result};
use frisket_eval::clip::{pair_scores, Clip, Preprocessing};
use frisket_shapes::rng::Rng;
use frisket_shapes::{generate_default, judge, CaptionStyle, Colour, ObjectInfo, ObjectQuery, Scene, Shape};
use serde::Serialize;
use serde_json::json;
use std::path::Path;
use tch::{Kind, Tensor};

/// The shapes scenes' side, the vision tower's input size.
pub const IMAGE_SIZE: i64 = 64;

/// config.json of the CLIPModel (transformers' key layout): a 2-layer, 64-wide text tower over
/// the shapes tokenizer (vocab 648, 48 positions, as models/shapes) and a 4-layer, 128-wide ViT
/// with 8-px patches (64 patches of a 64-px scene: an object of 10–20 px spans a few, enough
/// to tell its shape), both projected to 64 dimensions.
pub fn config() -> serde_json::Value {
    json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 64,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "torch_dtype": "float16",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": 648,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 48,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": 646,
            "eos_token_id": 647,
            "pad_token_id": 647,
            "projection_dim": 64
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": 64
        }
    })
}

/// preprocessor_config.json: CLIPImageProcessor with size and crop equal to the scenes' 64 px
/// (resize and centre crop leave a 64-px scene as it is; other sizes are brought to it as CLIP
/// does) and OpenAI CLIP's mean and std.
pub fn preprocessor_config() -> serde_json::Value {
    let p = Preprocessing::default();
    json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": true,
        "rescale_factor": p.rescale_factor,
        "do_normalize": true,
        "image_mean": p.image_mean,
        "image_std": p.image_std,
        "do_convert_rgb": true
    })
}

/// The plain object phrase of the "object present" question: "a red circle".
pub fn object_phrase(colour: Colour, shape: Shape) -> String {
    ObjectQuery::new(shape, colour).phrase(&CaptionStyle::default())
}

/// A training scene's text: the generator's caption (6 in 10), the plain phrase of one of its
/// objects (3 in 10; the "object present" prompts) or that object's phrase with its size and
/// position words (1 in 10), chosen by the scene's seed and `draw` (a scene drawn again
/// gets a new choice).
pub fn training_text(scene: &Scene, draw: u64) -> String {
    let mut rng = Rng::new(scene.meta.seed ^ draw.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xc11b);
    let objects = &scene.meta.objects;
    let o = &objects[rng.below(objects.len() as u64) as usize];
    match rng.below(10) {
        0..=5 => scene.meta.caption.clone(),
        6..=8 => object_phrase(o.colour, o.shape),
        _ => ObjectQuery::from_info(o).phrase(&CaptionStyle::default()),
    }
}

/// An object the scene lacks, one attribute away from its object `o`: `o` with its colour
/// changed to one no object in the scene has, or its shape changed to one no object has (the
/// absent half of the "object present" questions).
pub fn absent_variant(scene: &Scene, o: &ObjectInfo, rng: &mut Rng) -> (Colour, Shape) {
    let objects = &scene.meta.objects;
    let colours: Vec<Colour> = Colour::ALL.iter().copied().filter(|c| objects.iter().all(|x| x.colour != *c)).collect();
    let shapes: Vec<Shape> = Shape::ALL.iter().copied().filter(|sh| objects.iter().all(|x| x.shape != *sh)).collect();
    if shapes.is_empty() || (!colours.is_empty() && rng.chance(1, 2)) {
        (rng.pick(&colours), o.shape)
    } else {
        (o.colour, rng.pick(&shapes))
    }
}

/// The "object present" training questions of a batch: per scene, one of its objects and that
/// object's absent variant (`absent_variant`), chosen by the scene's seed and `draw`.
pub fn presence_questions(scenes: &[Scene], draw: u64) -> Vec<(Colour, Shape)> {
    scenes
        .iter()
        .flat_map(|s| {
            let mut rng = Rng::new(s.meta.seed ^ draw.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x9a5e);
            let o = &s.meta.objects[rng.below(s.meta.objects.len() as u64) as usize];
            [(o.colour, o.shape), absent_variant(s, o, &mut rng)]
        })
        .collect()
}

/// Sigmoid loss of "object present" over each scene's own two questions
/// (`presence_questions`: `phrases` row 2i is scene i's object, row 2i + 1 its absent
/// variant): logit = exp(`scale`) · cos(image, phrase) + `bias`, label = the generator drew
/// the object. Half the pairs are positive, and the negatives differ from a present object in
/// one attribute: the questions the model is judged on. It trains the cosine itself to separate
/// present from absent objects at one threshold, which the contrastive loss (a softmax over
/// each row, where a caption's colours and positions already tell scenes apart) leaves free.
pub fn presence_loss(images: &Tensor, phrases: &Tensor, scale: &Tensor, bias: &Tensor) -> Tensor {
    let n = images.size()[0];
    let phrases = normalized(phrases).view([n, 2, -1]);
    let cos = (normalized(images).unsqueeze(1) * phrases).sum_dim_intlist(-1, false, Kind::Float);
    let logits = cos * scale.exp() + bias;
    let labels = Tensor::from_slice(&[1f32, 0.0]).to_device(images.device()).expand([n, 2], false);
    logits.binary_cross_entropy_with_logits::<Tensor>(&labels, None, None, tch::Reduction::Mean)
}

/// The training scenes: `n` scenes from seed `TRAIN_SEED_BASE` + `run_seed` · 2⁴⁰ up (the
/// evaluation's seeds are below 10⁶). Drawing a scene costs more than a training step's share
/// of it, so training samples its batches from this pool.
pub fn training_scenes(run_seed: u64, n: usize) -> Vec<Scene> {
    let base = TRAIN_SEED_BASE + run_seed.wrapping_mul(1 << 40);
    (0..n as u64).map(|i| generate_default(base + i)).collect()
}

/// Preprocessed pixel values [n, 3, 64, 64] of scenes, by the model's own preprocessing.
pub fn pixels(preprocessing: &Preprocessing, scenes: &[Scene]) -> Tensor {
    let px: Vec<Tensor> = scenes
        .iter()
        .map(|s| {
            let (w, h) = s.image.dimensions();
            preprocessing.apply(s.image.as_raw(), w as usize, h as usize)
        })
        .collect();
    Tensor::stack(&px, 0)
}

fn normalized(x: &Tensor) -> Tensor {
    x / x.norm_scalaropt_dim(2, [-1], true)
}

/// Symmetric InfoNCE over a batch: logits exp(`logit_scale`) · cos(image i, text j); the target
/// of row i is every j whose text equals text i (short phrases repeat within a batch, and a
/// repeat is no negative), spread evenly.
pub fn info_nce(images: &Tensor, texts: &Tensor, logit_scale: &Tensor, captions: &[String]) -> Tensor {
    let logits = normalized(images).matmul(&normalized(texts).tr()) * logit_scale.exp();
    let n = captions.len();
    let same: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| (captions[i] == captions[j]) as u8 as f32)
        .collect();
    let same = Tensor::from_slice(&same).view([n as i64, n as i64]).to_device(images.device());
    let target = &same / same.sum_dim_intlist(1, true, Kind::Float);
    let ce = |l: &Tensor| {
        -(&target * l.log_softmax(1, Kind::Float)).sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float)
    };
    (ce(&logits) + ce(&logits.tr())) * 0.5
}

/// The bars the shipped model must meet (issue 24): caption retrieval top-1 and agreement
/// with the judge on "object present".
pub const RETRIEVAL_BAR: f64 = 0.90;
pub const PRESENCE_BAR: f64 = 0.85;

/// Held-out retrieval scenes: seeds RETRIEVAL_SEED.. in groups of RETRIEVAL_GROUP.
pub const RETRIEVAL_SEED: u64 = 300_000;
/// Candidate set of caption retrieval: each image against the captions of this many held-out scenes.
pub const RETRIEVAL_GROUP: usize = 100;
/// Held-out "object present" scenes: the threshold is chosen on seeds PRESENCE_TUNE_SEED..,
/// the agreement measured on PRESENCE_TEST_SEED...
pub const PRESENCE_TUNE_SEED: u64 = 310_000;
pub const PRESENCE_TEST_SEED: u64 = 320_000;

/// Caption retrieval on `groups` × 100 held-out scenes.
#[derive(Clone, Debug, Serialize)]
pub struct Retrieval {
    pub scenes: usize,
    pub candidates: usize,
    /// Fraction of images whose own caption scores highest of the group's captions.
    pub image_to_text_top1: f64,
    /// Fraction of captions whose own image scores highest of the group's images.
    pub text_to_image_top1: f64,
}

pub fn retrieval(clip: &Clip, groups: usize) -> Retrieval {
    let (mut i2t, mut t2i) = (0usize, 0usize);
    for g in 0..groups {
        let seed = RETRIEVAL_SEED + (g * RETRIEVAL_GROUP) as u64;
        let scenes: Vec<Scene> = (seed..seed + RETRIEVAL_GROUP as u64).map(generate_default).collect();
        let captions: Vec<&str> = scenes.iter().map(|s| s.meta.caption.as_str()).collect();
        let img = normalized(&clip.image_embeddings(&pixels(&clip.preprocessing, &scenes)));
        let txt = normalized(&clip.text_embeddings(&captions));
        let sim = img.matmul(&txt.tr());
        let diag = Tensor::arange(RETRIEVAL_GROUP as i64, (Kind::Int64, sim.device()));
        i2t += sim.argmax(1, false).eq_tensor(&diag).sum(Kind::Int64).int64_value(&[]) as usize;
        t2i += sim.argmax(0, false).eq_tensor(&diag).sum(Kind::Int64).int64_value(&[]) as usize;
    }
    let n = groups * RETRIEVAL_GROUP;
    Retrieval {
        scenes: n,
        candidates: RETRIEVAL_GROUP,
        image_to_text_top1: i2t as f64 / n as f64,
        text_to_image_top1: t2i as f64 / n as f64,
    }
}

/// One "object present" question: a scene and a plain object phrase.
#[derive(Clone, Debug, Serialize)]
pub struct PresenceItem {
    pub seed: u64,
    pub phrase: String,
    /// The generator drew such an object.
    pub truth: bool,
    /// The shapes judge finds such an object in the image.
    pub judge: bool,
    /// For an absent phrase, what changed from the scene's object: "colour" or "shape".
    pub changed: Option<&'static str>,
    /// 100 · cos(image, phrase).
    pub score: f64,
}

/// Two questions per scene (seeds `seed`..`seed + n`): a present phrase (one of its objects)
/// and an absent one (that object with its colour or its shape changed to one no object in
/// the scene has), scored by the model and answered by the judge.
pub fn presence_items(clip: &Clip, seed: u64, n: usize) -> Vec<PresenceItem> {
    let scenes: Vec<Scene> = (seed..seed + n as u64).map(generate_default).collect();
    let mut questions = Vec::new();
    for s in &scenes {
        let mut rng = Rng::new(s.meta.seed ^ 0x9e5e);
        let objects = &s.meta.objects;
        let o = &objects[rng.below(objects.len() as u64) as usize];
        let absent = absent_variant(s, o, &mut rng);
        let found = judge(&s.image);
        let changed = if absent.1 == o.shape { "colour" } else { "shape" };
        for ((colour, shape), truth) in [((o.colour, o.shape), true), (absent, false)] {
            let judged = found.find(colour, shape).is_some();
            let changed = (!truth).then_some(changed);
            questions.push((s.meta.seed, object_phrase(colour, shape), truth, judged, changed));
        }
    }
    let img = clip.image_embeddings(&pixels(&clip.preprocessing, &scenes));
    let img = img.repeat_interleave_self_int(2, Some(0), None);
    let phrases: Vec<&str> = questions.iter().map(|q| q.1.as_str()).collect();
    let scores = pair_scores(&img, &clip.text_embeddings(&phrases));
    questions
        .into_iter()
        .zip(scores)
        .map(|((seed, phrase, truth, judge, changed), score)| PresenceItem {
            seed,
            phrase,
            truth,
            judge,
            changed,
            score,
        })
        .collect()
}

/// Fraction of items where "score > threshold" equals the judge's answer.
pub fn agreement(items: &[PresenceItem], threshold: f64) -> f64 {
    items.iter().filter(|q| (q.score > threshold) == q.judge).count() as f64 / items.len() as f64
}

/// The threshold with the highest agreement on `items`: the midpoint between the two
/// neighbouring scores where the best cut falls.
pub fn best_threshold(items: &[PresenceItem]) -> f64 {
    let mut scores: Vec<f64> = items.iter().map(|q| q.score).collect();
    scores.sort_by(f64::total_cmp);
    let mut cuts = vec![scores[0] - 1.0];
    cuts.extend(scores.windows(2).map(|w| (w[0] + w[1]) / 2.0));
    cuts.into_iter().max_by(|a, b| agreement(items, *a).total_cmp(&agreement(items, *b))).expect("items")
}

/// The "object present" evaluation: threshold on the tuning scenes, agreement on the test ones.
#[derive(Clone, Debug, Serialize)]
pub struct Presence {
    pub tune_scenes: usize,
    pub test_scenes: usize,
    pub threshold: f64,
    pub tune_agreement: f64,
    /// Agreement with the judge on the test questions (half present, half absent by the generator).
    pub agreement_with_judge: f64,
    /// Agreement with the generator's truth on the same questions.
    pub agreement_with_truth: f64,
    /// How often the judge itself agrees with the generator's truth there.
    pub judge_vs_truth: f64,
    /// By kind of question: present phrases said present; absent ones with a changed colour,
    /// and with a changed shape, said absent.
    pub present_accepted: f64,
    pub colour_changed_rejected: f64,
    pub shape_changed_rejected: f64,
}

pub fn presence(clip: &Clip, tune: usize, test: usize) -> Presence {
    let tune_items = presence_items(clip, PRESENCE_TUNE_SEED, tune);
    let threshold = best_threshold(&tune_items);
    let items = presence_items(clip, PRESENCE_TEST_SEED, test);
    let frac = |f: &dyn Fn(&PresenceItem) -> bool| items.iter().filter(|q| f(q)).count() as f64 / items.len() as f64;
    let said = |changed: Option<&str>| {
        let kind: Vec<&PresenceItem> = items.iter().filter(|q| q.changed == changed).collect();
        kind.iter().filter(|q| (q.score > threshold) == q.truth).count() as f64 / kind.len().max(1) as f64
    };
    Presence {
        tune_scenes: tune,
        test_scenes: test,
        threshold,
        tune_agreement: agreement(&tune_items, threshold),
        agreement_with_judge: agreement(&items, threshold),
        agreement_with_truth: frac(&|q: &PresenceItem| (q.score > threshold) == q.truth),
        judge_vs_truth: frac(&|q: &PresenceItem| q.judge == q.truth),
        present_accepted: said(None),
        colour_changed_rejected: said(Some("colour")),
        shape_changed_rejected: said(Some("shape")),
    }
}

/// Reads a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
