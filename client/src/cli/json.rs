//! The `--json` output: one JSON object per line on stdout, format version 1
//! (documented in client/README.md).
use frisket::dump::Written;
use frisket::Event;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// The `"v"` of every line. Bump on incompatible changes (removed or retyped keys);
/// new keys and new events do not bump it.
pub const VERSION: u32 = 1;

/// One output line: a JSON object whose keys keep their insertion order (`v` and
/// `event` first), which serde_json's own map would sort.
#[derive(Debug, Default, Clone)]
pub struct Line(Vec<(String, Value)>);

impl Line {
    /// A line starting with `"v": VERSION`.
    pub fn new() -> Self {
        Line(vec![("v".to_string(), json!(VERSION))])
    }

    /// Sets a key (replacing an earlier value of it).
    pub fn put(&mut self, key: &str, value: Value) -> &mut Self {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
        self
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.put(key, value);
        self
    }

    pub fn to_json_string(&self) -> String {
        let fields: Vec<String> = self.0.iter().map(|(k, v)| format!("{}:{}", Value::String(k.clone()), v)).collect();
        format!("{{{}}}", fields.join(","))
    }

    /// Writes the line to stdout and flushes, so a reading plugin sees it at once.
    pub fn emit(&self) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", self.to_json_string());
        let _ = out.flush();
    }
}

/// A path as a JSON string.
pub fn path(p: &Path) -> Value {
    Value::String(p.display().to_string())
}

/// A float that may be infinite: a number when finite, "inf" / "-inf" otherwise
/// (JSON has no infinity), null for NaN.
fn float(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else if x.is_nan() {
        Value::Null
    } else if x > 0.0 {
        json!("inf")
    } else {
        json!("-inf")
    }
}

/// The line for one event. `written`: the files the dump wrote for it; for the result,
/// `out` is the --out path and `manifest` the manifest's path.
pub fn event_line(job_id: &str, event: &Event, written: &Written, out: &Path, manifest: Option<&Path>) -> Line {
    let mut m = Line::new().with("event", json!(event.name())).with("job_id", json!(job_id));
    let mut put = |k: &str, v: Value| {
        m.put(k, v);
    };
    match event {
        Event::Queued(q) => {
            put("position", json!(q.position));
            if let Some(seconds) = q.estimated_start_seconds {
                put("estimated_start_seconds", json!(seconds));
            }
        }
        Event::Loading(l) => put("model", json!(l.model)),
        Event::Started(s) => {
            put("total_steps", json!(s.total_steps));
            put("timesteps", json!(s.timesteps));
            put("seed", json!(s.seed));
            put("width", json!(s.width));
            put("height", json!(s.height));
            if !s.subjects.is_empty() {
                let subjects: Vec<Value> =
                    s.subjects.iter().map(|t| json!({"index": t.index, "text": t.text, "word": t.word})).collect();
                put("subjects", json!(subjects));
                put("subjects_auto", json!(s.subjects_auto));
                put("manipulation_steps", json!(s.manipulation_steps));
            }
        }
        Event::Step(s) => {
            put("index", json!(s.index));
            put("total", json!(s.total));
            put("timestep", json!(s.timestep));
            put("elapsed_seconds", json!(s.elapsed_seconds));
        }
        Event::Preview(p) => {
            put("step", json!(p.step));
            put("timestep", json!(p.timestep));
            put("mime_type", json!(p.mime_type));
            put("width", json!(p.width));
            put("height", json!(p.height));
        }
        Event::Latent(l) => {
            put("step", json!(l.step));
            put("timestep", json!(l.timestep));
            put("shape", json!(l.latent.shape));
            put("dtype", json!(l.latent.dtype.name()));
        }
        Event::Mask(k) => {
            put("step", json!(k.step));
            put("timestep", json!(k.timestep));
            put("kind", json!(k.kind.name()));
            put("shape", json!(k.mask.shape));
            put("reference_fraction", json!(k.reference_fraction));
        }
        Event::Heatmap(h) => {
            put("step", json!(h.step));
            put("timestep", json!(h.timestep));
            put("token_index", json!(h.token_index));
            put("token", json!(h.token));
            put("shape", json!(h.map.shape));
            if let Some(p) = &written.subject_mask {
                put("subject_mask", path(p));
            }
        }
        Event::Result(r) => {
            let s = &r.settings;
            put("seed", json!(r.seed));
            put("mime_type", json!(r.mime_type));
            put("width", json!(s.width));
            put("height", json!(s.height));
            put("path", path(out));
            put(
                "settings",
                json!({
                    "model": s.model, "prompt": s.prompt, "negative_prompt": s.negative_prompt,
                    "seed": s.seed, "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler,
                    "width": s.width, "height": s.height, "img2img": s.img2img, "strength": s.strength,
                }),
            );
            let t = &r.timings;
            put(
                "timings",
                json!({
                    "queued_seconds": t.queued_seconds, "total_seconds": t.total_seconds,
                    "seconds_per_step": t.seconds_per_step, "decode_seconds": t.decode_seconds,
                    "model_load_seconds": t.model_load_seconds, "lora_seconds": t.lora_seconds,
                }),
            );
            put("dropped_events", json!(r.dropped_events));
            if !r.reference_fraction_per_step.is_empty() {
                put("reference_fraction_per_step", json!(r.reference_fraction_per_step));
            }
            if let Some(x) = r.psnr_protected {
                put("psnr_protected", float(x));
            }
            if let Some(x) = r.psnr_outside {
                put("psnr_outside", float(x));
            }
            if let Some(p) = &written.path {
                put("dump_path", path(p));
            }
            if let Some(p) = &written.change_map {
                put("change_map", path(p));
            }
            if let Some(p) = &written.change_map_npy {
                put("change_map_npy", path(p));
            }
            if let Some(p) = manifest {
                put("manifest", path(p));
            }
            return m;
        }
    }
    if let Some(p) = &written.path {
        put("path", path(p));
    }
    if let Some(p) = &written.npy {
        put("npy", path(p));
    }
    m
}
