//! The A/B report: per-condition means with paired bootstrap intervals, paired differences
//! against `paper` with Wilcoxon p-values (Holm-corrected over every difference reported), every
//! item's numbers and the settings, as JSON and a self-contained HTML page. Both files are
//! written under temporary names and renamed once complete.
use super::conditions::Condition;
use super::run::ItemResult;
use super::stats;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::Path;

/// The per-item metrics, in the report's column order.
pub const METRICS: [&str; 4] = ["adherence", "psnr_background", "ssim_background", "psnr_kept"];

fn metric(item: &ItemResult, name: &str) -> f64 {
    match name {
        "adherence" => item.adherence,
        "psnr_background" => item.psnr_background,
        "ssim_background" => item.ssim_background,
        _ => item.psnr_kept,
    }
}

/// The values of one metric under one condition, in case order.
fn column(items: &[ItemResult], condition: &str, name: &str) -> Vec<f64> {
    items.iter().filter(|i| i.condition == condition).map(|i| metric(i, name)).collect()
}

/// The summary: means with intervals per condition, differences against `paper` (when run).
pub fn summarise(items: &[ItemResult], conditions: &[Condition], n: usize) -> Result<Value> {
    let indices = stats::resample_indices(n, stats::RESAMPLES, stats::SEED);
    let mut means = serde_json::Map::new();
    for c in conditions {
        let mut row = serde_json::Map::new();
        for m in METRICS {
            let (mean, (lo, hi)) = stats::mean_interval(&column(items, c.name(), m), &indices)?;
            row.insert(m.into(), json!({"mean": mean, "ci95": [lo, hi]}));
        }
        means.insert(c.name().into(), Value::Object(row));
    }
    let mut diffs = Vec::new();
    if conditions.contains(&Condition::Paper) {
        for c in conditions.iter().filter(|c| **c != Condition::Paper) {
            for m in METRICS {
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
    Ok(json!({"means": means, "vs_paper": diffs}))
}

/// SHA-256 of every file under the model folder, by relative path (so a report names the exact
/// weights it measured).
pub fn model_hashes(model: &Path) -> Result<Value> {
    use sha2::{Digest, Sha256};
    let mut out = serde_json::Map::new();
    let mut stack = vec![model.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let name = path.strip_prefix(model).unwrap_or(&path).to_string_lossy().to_string();
                out.insert(name, json!(format!("{:x}", Sha256::digest(&bytes))));
            }
        }
    }
    Ok(Value::Object(out))
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

fn html(report: &Value) -> String {
    let summary = &report["summary"];
    let mut s = String::from("<!doctype html><html><head><meta charset='utf-8'><title>Frisket A/B report</title><style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:3px 6px}table{border-collapse:collapse}</style></head><body><h1>Frisket A/B report</h1>");
    s += &format!(
        "<p>{} held-out shapes protect cases; model {}; frisket {}.</p>",
        report["cases"],
        escape(&report["settings"]["model"].to_string()),
        escape(&report["frisket_version"].to_string())
    );
    s += "<h2>Means (paired bootstrap 95 % intervals)</h2><table><tr><th>condition</th>";
    for m in METRICS {
        s += &format!("<th>{m}</th>");
    }
    s += "</tr>";
    if let Some(means) = summary["means"].as_object() {
        for (c, row) in means {
            s += &format!("<tr><td>{}</td>", escape(c));
            for m in METRICS {
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
    s += "</table><h2>Adherence vs background preservation</h2>";
    s += &scatter(summary);
    s += "<p>Adherence: the shapes judge finds the requested object (colour, shape and position). Preservation: PSNR/SSIM against the reference outside both true objects. Wilcoxon signed-rank: normal approximation, zero differences dropped (scipy's zero_method='wilcox'), no continuity correction.</p></body></html>";
    s
}

/// Writes report.json and report.html into `out`.
pub fn write(out: &Path, report: &Value) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join("report.json"), serde_json::to_string_pretty(report)?.as_bytes())?;
    write_atomic(&out.join("report.html"), html(report).as_bytes())
}
