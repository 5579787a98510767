//! clip_presence_probe: where the shapes CLIP's "object present" answers go wrong. Prints one
//! JSON line per question of eval_clip's test set (scene seed, phrase, truth, what the absent
//! phrase changed, score) with the scene's objects and the asked object's visible pixels.
//!
//!   cargo run -p frisket-trainer --example clip_presence_probe -- MODEL_DIR [N]
use frisket_eval::clip::Clip;
use frisket_shapes::generate_default;
use frisket_trainer::shapes_clip::{object_phrase, presence_items, PRESENCE_TEST_SEED};
use serde_json::json;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or_else(|| anyhow::anyhow!("usage: clip_presence_probe MODEL_DIR [N]"))?;
    let n: usize = args.get(2).map_or(Ok(500), |a| a.parse())?;
    tch::set_num_threads(2);
    let clip = Clip::load(std::path::Path::new(dir))?;
    for q in presence_items(&clip, PRESENCE_TEST_SEED, n) {
        let scene = generate_default(q.seed);
        let objects: Vec<String> = scene.meta.objects.iter().map(|o| object_phrase(o.colour, o.shape)).collect();
        let pixels =
            scene.meta.objects.iter().find(|o| object_phrase(o.colour, o.shape) == q.phrase).map(|o| o.pixel_count);
        println!("{}", json!({"question": q, "objects": objects, "pixels": pixels}));
    }
    Ok(())
}
