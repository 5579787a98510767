//! The A/B report: per-condition means with paired bootstrap intervals, paired differences
//! against `paper` with Wilcoxon p-values (Holm-corrected over every difference reported), every
//! item's numbers and the settings, as JSON and a self-contained HTML page with image strips of
//! the best and worst items. Both files are written under temporary names and renamed once
//! complete.
use super::conditions::Condition;
use super::run::{ItemResult, Metrics};
use super::stats;
use anyhow::{Context, Result};
use frisket_shapes::protect::ProtectCase;
use serde_json::{json, Value};
use std::path::Path;

/// The per-item metrics, in the report's column order; the last four only with their networks
/// (`run::Extras`).
pub const METRICS: [&str; 8] = [
    "adherence",
    "psnr_background",
    "ssim_background",
    "psnr_kept",
    "lpips_background",
    "clip_score",
    "clip_score_region",
    "pair64",
];

/// The headline metric: the image strips rank items by its paired difference `paper` − `sd-0.9`.
pub const HEADLINE: &str = "psnr_background";
/// Items in each of the best and worst strips.
pub const STRIP_ITEMS: usize = 8;

/// A metric by its name: the field of `Metrics` that serialises under that name.
fn metric(m: &Metrics, name: &str) -> Option<f64> {
    serde_json::to_value(m).ok()?.get(name)?.as_f64()
}

/// The metrics every item has, in METRICS order.
pub fn present(items: &[ItemResult]) -> Vec<&'static str> {
    METRICS.into_iter().filter(|m| items.iter().all(|i| metric(&i.metrics, m).is_some())).collect()
}

/// The values of one metric under one condition, in case order.
fn column(items: &[ItemResult], condition: &str, name: &str) -> Vec<f64> {
    items.iter().filter(|i| i.condition == condition).filter_map(|i| metric(&i.metrics, name)).collect()
}

/// The summary: means with intervals per condition, differences against `paper` (when run).
pub fn summarise(items: &[ItemResult], conditions: &[Condition], n: usize) -> Result<Value> {
    let indices = stats::resample_indices(n, stats::RESAMPLES, stats::SEED);
    let metrics = present(items);
    let mut means = serde_json::Map::new();
    for c in conditions {
        let mut row = serde_json::Map::new();
        for &m in &metrics {
            let (mean, (lo, hi)) = stats::mean_interval(&column(items, c.name(), m), &indices)?;
            row.insert(m.into(), json!({"mean": mean, "ci95": [lo, hi]}));
        }
        means.insert(c.name().into(), Value::Object(row));
    }
    let mut diffs = Vec::new();
    if conditions.contains(&Condition::Paper) {
        for c in conditions.iter().filter(|c| **c != Condition::Paper) {
            for &m in &metrics {
                let (a, b) = (column(items, c.name(), m), column(items, Condition::Paper.name(), m));
                let d: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
                let (mean, (lo, hi)) = stats::mean_interval(&d, &indices)?;
                diffs.push(json!({"condition": c.name(), "metric": m, "mean_minus_paper": mean, "ci95": [lo, hi], "wilcoxon_p": stats::wilcoxon(&d)}));
            }
        }
    }
    let p: Vec<f64> = diffs.iter().map(|d| d["wilcoxon_p"].as_f64().unwrap_or(1.0)).collect();
    for (d, adj) in diffs.iter_mut().zip(stats::holm(&p)) {
        d["wilcoxon_p_holm"] = json!(adj);
    }
    Ok(json!({"metrics": metrics, "means": means, "vs_paper": diffs}))
}

/// The best and worst items by HEADLINE's paired difference `paper` − `sd-0.9` (largest first;
/// ties by case order): STRIP_ITEMS each, or with fewer than twice that many cases the lower half
/// (rounded down) as the worst and the rest as the best. None unless both conditions ran.
/// Returns the JSON record and the HTML rows (reference | every condition's output, PNG data URIs).
pub fn strips(
    items: &[ItemResult],
    cases: &[(u64, ProtectCase)],
    conditions: &[Condition],
) -> Result<Option<(Value, String)>> {
    if !(conditions.contains(&Condition::Paper) && conditions.contains(&Condition::Sd09)) {
        return Ok(None);
    }
    let (paper, sd) =
        (column(items, Condition::Paper.name(), HEADLINE), column(items, Condition::Sd09.name(), HEADLINE));
    let mut order: Vec<(usize, f64)> = paper.iter().zip(&sd).map(|(p, s)| p - s).enumerate().collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let worst_n = STRIP_ITEMS.min(order.len() / 2);
    let best_n = STRIP_ITEMS.min(order.len() - worst_n);
    let best = &order[..best_n];
    let worst: Vec<(usize, f64)> = order[order.len() - worst_n..].iter().rev().copied().collect();
    let mut html = format!(
        "<h2>Best and worst items</h2><p>Ranked by the paired difference of {HEADLINE} (paper − sd-0.9) per case. Each row: the reference, then every condition's output; the caption gives the prompt and each condition's {HEADLINE} and adherence.</p>"
    );
    for (title, rows) in [("Best (paper ahead most)", best), ("Worst (paper behind most)", &worst[..])] {
        html += &format!("<h3>{title}</h3><table class='strip'><tr><th>reference</th>");
        for c in conditions {
            html += &format!("<th>{}</th>", c.name());
        }
        html += "</tr>";
        for &(case, diff) in rows {
            let (seed, c) = &cases[case];
            html += &format!("<tr><td>{}</td>", img_tag(&c.reference.image)?);
            let mut caption = format!("case {case} (seed {seed}), {}: paper − sd-0.9 = {diff:.2};", escape(&c.prompt));
            for cond in conditions {
                let item =
                    items.iter().find(|i| i.case == case && i.condition == cond.name()).context("a missing item")?;
                html += &format!("<td>{}</td>", img_tag(&item.image)?);
                caption += &format!(
                    " {} {:.2} dB, adherence {};",
                    cond.name(),
                    item.metrics.psnr_background,
                    item.metrics.adherence
                );
            }
            html += &format!("</tr><tr><td colspan='{}' class='caption'>{caption}</td></tr>", conditions.len() + 1);
        }
        html += "</table>";
    }
    let record = |rows: &[(usize, f64)]| {
        rows.iter().map(|(c, d)| json!({"case": c, "seed": cases[*c].0, "paper_minus_sd09": d})).collect::<Vec<_>>()
    };
    let value = json!({"metric": HEADLINE, "difference": "paper - sd-0.9, per case", "best": record(best), "worst": record(&worst[..])});
    Ok(Some((value, html)))
}

/// An `<img>` with the image as a PNG data URI.
fn img_tag(img: &image::RgbImage) -> Result<String> {
    use base64::Engine;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(format!(
        "<img src='data:image/png;base64,{}' width='{}' alt=''>",
        base64::engine::general_purpose::STANDARD.encode(png.into_inner()),
        img.width().max(128)
    ))
}

/// SHA-256 of every file under the model folder, by relative path (so a report names the exact
/// weights it measured).
pub fn model_hashes(model: &Path) -> Result<Value> {
    let mut out = serde_json::Map::new();
    let mut stack = vec![model.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path.strip_prefix(model).unwrap_or(&path).to_string_lossy().to_string();
                out.insert(name, file_hash(&path)?);
            }
        }
    }
    Ok(Value::Object(out))
}

/// SHA-256 of one file, hex.
pub fn file_hash(path: &Path) -> Result<Value> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(json!(format!("{:x}", Sha256::digest(&bytes))))
}

/// Writes `contents` to `path` through a temporary name.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The adherence-vs-background-PSNR scatter of the condition means, as inline SVG.
fn scatter(summary: &Value) -> String {
    let (w, h, pad) = (480.0, 320.0, 40.0);
    let pts: Vec<(String, f64, f64)> = summary["means"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v["adherence"]["mean"].as_f64().unwrap_or(0.0),
                        v["psnr_background"]["mean"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let (ymin, ymax) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.2), b.max(p.2)));
    let span = (ymax - ymin).max(1.0);
    let mut svg = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}'><rect width='{w}' height='{h}' fill='white' stroke='#999'/>");
    svg += &format!("<text x='{}' y='{}' font-size='12'>adherence (0 to 1)</text>", w / 2.0 - 50.0, h - 8.0);
    svg += "<text x='4' y='14' font-size='12'>background PSNR (dB)</text>";
    for (name, x, y) in pts {
        let cx = pad + x * (w - 2.0 * pad);
        let cy = h - pad - (y - ymin + span * 0.1) / (span * 1.2) * (h - 2.0 * pad);
        svg += &format!("<circle cx='{cx:.1}' cy='{cy:.1}' r='4' fill='#36c'/><text x='{:.1}' y='{:.1}' font-size='11'>{} ({x:.2}, {y:.1})</text>", cx + 6.0, cy - 4.0, escape(&name));
    }
    svg + "</svg>"
}

/// The domain FID section (empty without a CLIP).
fn domain_fid_table(d: &Value) -> String {
    let Some(values) = d["values"].as_object() else { return String::new() };
    let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut s = format!(
        "<h2>Domain FID against the references (lower is closer)</h2><p>Fréchet distance between the {} of each condition's {} outputs and of the references. No interval: resampling repeats images, which biases FID upwards.</p><table><tr><th>condition</th><th>domain FID</th><th>− paper</th></tr>",
        escape(d["features"].as_str().unwrap_or("")),
        d["cases"]
    );
    for (c, v) in values {
        let diff = d["vs_paper"].as_array().into_iter().flatten().find(|x| x["condition"] == c.as_str());
        let diff = diff.map_or(String::new(), |x| format!("{:.3}", num(&x["minus_paper"])));
        s += &format!("<tr><td>{}</td><td>{:.3}</td><td>{diff}</td></tr>", escape(c), num(v));
    }
    s + "</table>"
}

fn html(report: &Value, strips: &str) -> String {
    let summary = &report["summary"];
    let mut s = String::from("<!doctype html><html><head><meta charset='utf-8'><title>Frisket A/B report</title><style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:3px 6px}table{border-collapse:collapse}.strip img{image-rendering:pixelated}.caption{font-size:12px}</style></head><body><h1>Frisket A/B report</h1>");
    s += &format!(
        "<p>{} held-out shapes protect cases; model {}; frisket {}.</p>",
        report["cases"],
        escape(&report["settings"]["model"].to_string()),
        escape(&report["frisket_version"].to_string())
    );
    let metrics: Vec<&str> = summary["metrics"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    s += "<h2>Means (paired bootstrap 95 % intervals)</h2><table><tr><th>condition</th>";
    for m in &metrics {
        s += &format!("<th>{m}</th>");
    }
    s += "</tr>";
    if let Some(means) = summary["means"].as_object() {
        for (c, row) in means {
            s += &format!("<tr><td>{}</td>", escape(c));
            for &m in &metrics {
                let v = &row[m];
                s += &format!(
                    "<td>{:.3} [{:.3}, {:.3}]</td>",
                    v["mean"].as_f64().unwrap_or(f64::NAN),
                    v["ci95"][0].as_f64().unwrap_or(f64::NAN),
                    v["ci95"][1].as_f64().unwrap_or(f64::NAN)
                );
            }
            s += "</tr>";
        }
    }
    s += "</table><h2>Differences against paper</h2><table><tr><th>condition</th><th>metric</th><th>mean − paper [95 %]</th><th>Wilcoxon p</th><th>Holm p</th></tr>";
    for d in summary["vs_paper"].as_array().into_iter().flatten() {
        s += &format!(
            "<tr><td>{}</td><td>{}</td><td>{:.3} [{:.3}, {:.3}]</td><td>{:.4}</td><td>{:.4}</td></tr>",
            escape(d["condition"].as_str().unwrap_or("")),
            escape(d["metric"].as_str().unwrap_or("")),
            d["mean_minus_paper"].as_f64().unwrap_or(f64::NAN),
            d["ci95"][0].as_f64().unwrap_or(f64::NAN),
            d["ci95"][1].as_f64().unwrap_or(f64::NAN),
            d["wilcoxon_p"].as_f64().unwrap_or(f64::NAN),
            d["wilcoxon_p_holm"].as_f64().unwrap_or(f64::NAN)
        );
    }
    s += "</table>";
    s += &domain_fid_table(&report["domain_fid"]);
    s += "<h2>Adherence vs background preservation</h2>";
    s += &scatter(summary);
    s += &tuning(&report["tuning"]);
    s += strips;
    s += "<p>Adherence: the shapes judge finds the requested object (colour, shape and position). Preservation: PSNR/SSIM against the reference outside both true objects. Wilcoxon signed-rank: normal approximation, zero differences dropped (scipy's zero_method='wilcox'), no continuity correction. LPIPS (lower is closer): over the same background pixels. CLIP score: 100·max(cos, 0) of the output against the prompt, whole and cropped to the bounding box of the requested object's true region. pair64: the paper's per-pair 64-feature number, not FID (the squared distance of the output's and the reference's 64-d Inception features, as the paper's code gets it from torchmetrics' FID with each image fed twice).</p></body></html>";
    s
}

/// SD Tuned's tuning record (tune.rs) as a section; empty when it did not run.
fn tuning(t: &Value) -> String {
    if t.is_null() {
        return String::new();
    }
    let mut s = format!(
        "<h2>SD Tuned</h2><p>{}</p><p>{} tuning cases (seeds {}..{}); paper's adherence there {:.3}; chosen strength <b>{}</b>.</p><table><tr><th>strength</th><th>adherence</th><th>background PSNR</th></tr>",
        escape(t["definition"].as_str().unwrap_or("")),
        t["cases"],
        t["seeds"][0],
        t["seeds"][1],
        t["paper_adherence"].as_f64().unwrap_or(f64::NAN),
        t["chosen_strength"]
    );
    for r in t["per_strength"].as_array().into_iter().flatten() {
        s += &format!(
            "<tr><td>{}</td><td>{:.3}</td><td>{:.2}</td></tr>",
            r["strength"],
            r["adherence"].as_f64().unwrap_or(f64::NAN),
            r["psnr_background"].as_f64().unwrap_or(f64::NAN)
        );
    }
    s + "</table>"
}

/// Writes report.json and report.html into `out`; `strips` is the HTML of the image strips.
pub fn write(out: &Path, report: &Value, strips: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join("report.json"), serde_json::to_string_pretty(report)?.as_bytes())?;
    write_atomic(&out.join("report.html"), html(report, strips).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_reads_its_field() {
        let m = Metrics {
            adherence: 1.0,
            psnr_background: 2.0,
            ssim_background: 3.0,
            psnr_kept: 4.0,
            lpips_background: Some(5.0),
            clip_score: Some(6.0),
            clip_score_region: Some(7.0),
            pair64: Some(8.0),
        };
        let values: Vec<Option<f64>> = METRICS.iter().map(|n| metric(&m, n)).collect();
        assert_eq!(values, (1..=8).map(|v| Some(v as f64)).collect::<Vec<_>>());
        assert_eq!(metric(&Metrics { pair64: None, ..m }, "pair64"), None);
    }
}
