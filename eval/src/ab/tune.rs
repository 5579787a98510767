//! SD Tuned's strength, chosen on the tuning split (seeds from `cases::TUNING_BASE`, disjoint
//! from the held-out cases, which never influence the choice): every strength of a grid runs as
//! plain SDEdit img2img (`conditions::tuned`), `paper` runs too, and the strength whose judge adherence is closest to
//! `paper`'s is chosen (RULE).
use super::cases::{self, TUNING_BASE};
use super::conditions::{self, Condition};
use super::run::{self, Arm, Extras, ItemResult};
use anyhow::{bail, ensure, Result};
use frisket_shapes::protect::ProtectCase;
use serde_json::{json, Value};

/// The strengths tried (the `--tune-grid` default).
pub const GRID: &str = "0.3,0.4,0.5,0.6,0.7,0.8,0.9";
/// Tuning cases (the `--tune-cases` default).
pub const CASES: usize = 20;
/// The definition, as the report states it.
pub const RULE: &str = "SD Tuned is plain img2img (no protection, no Grad-SAM, started from the reference noised to \
the strength's timestep: SDEdit, not the paper preset's pure-noise start) at the strength from the grid whose \
judge adherence on the tuning split is closest to the paper preset's adherence on the same split; ties go to the \
higher mean background PSNR, then to the higher strength. The tuning split's seeds are disjoint from the held-out \
cases, which never influence the choice.";

/// A comma-separated grid of strengths, each in (0, 1], no repeats.
pub fn parse_grid(text: &str) -> Result<Vec<f64>> {
    let mut grid = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let Ok(s) = part.parse::<f64>() else { bail!("tuning grid: {part:?} is not a number") };
        ensure!(s > 0.0 && s <= 1.0, "tuning grid: strength {s} is outside (0, 1]");
        ensure!(!grid.contains(&s), "tuning grid: strength {s} appears twice");
        grid.push(s);
    }
    Ok(grid)
}

/// One grid strength's result on the tuning split.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TuningResult {
    pub strength: f64,
    /// Cases where the judge found the requested object.
    pub adherent: usize,
    pub adherence: f64,
    pub psnr_background: f64,
}

/// The chosen strength by RULE: `paper_adherent` cases adherent under `paper`; counts over the
/// same cases, so distances compare exactly.
pub fn choose(paper_adherent: usize, arms: &[TuningResult]) -> Result<f64> {
    let best = arms.iter().min_by(|a, b| {
        a.adherent
            .abs_diff(paper_adherent)
            .cmp(&b.adherent.abs_diff(paper_adherent))
            .then(b.psnr_background.total_cmp(&a.psnr_background))
            .then(b.strength.total_cmp(&a.strength))
    });
    match best {
        Some(a) => Ok(a.strength),
        None => bail!("the tuning grid is empty"),
    }
}

fn mean(items: &[&ItemResult], f: impl Fn(&ItemResult) -> f64) -> f64 {
    items.iter().map(|i| f(i)).sum::<f64>() / items.len() as f64
}

/// Runs the tuning split and returns the chosen strength and the record for the report.
pub fn tune(
    addr: &str,
    model: &str,
    n: usize,
    grid: &[f64],
    steps: Option<u32>,
    progress: &mut dyn FnMut(&ItemResult),
) -> Result<(f64, Value)> {
    ensure!(!grid.is_empty(), "the tuning grid is empty");
    let cases = cases::cases(TUNING_BASE, n)?;
    let name = |s: f64| format!("plain@{s}");
    let mut arms: Vec<Arm> = grid
        .iter()
        .map(|&s| -> Arm {
            (name(s), Box::new(move |seed: u64, case: &ProtectCase| conditions::tuned(model, seed, steps, case, s)))
        })
        .collect();
    let paper = Condition::Paper;
    arms.push((
        paper.name().into(),
        Box::new(move |seed: u64, case: &ProtectCase| paper.request(model, seed, steps, case, None)),
    ));
    let items = run::run_all(addr, &cases, &arms, &Extras::default(), progress)?;
    let of = |arm: &str| items.iter().filter(|i| i.condition == arm).collect::<Vec<_>>();
    let adherent = |items: &[&ItemResult]| items.iter().filter(|i| i.metrics.adherence > 0.5).count();
    let paper_items = of(paper.name());
    let paper_adherent = adherent(&paper_items[..]);
    let results: Vec<TuningResult> = grid
        .iter()
        .map(|&s| {
            let items = of(&name(s));
            TuningResult {
                strength: s,
                adherent: adherent(&items[..]),
                adherence: mean(&items, |i| i.metrics.adherence),
                psnr_background: mean(&items, |i| i.metrics.psnr_background),
            }
        })
        .collect();
    let chosen = choose(paper_adherent, &results)?;
    Ok((
        chosen,
        json!({
            "definition": RULE,
            "cases": n,
            "seeds": [TUNING_BASE, TUNING_BASE + n as u64],
            "grid": grid,
            "paper_adherence": mean(&paper_items, |i| i.metrics.adherence),
            "paper_psnr_background": mean(&paper_items, |i| i.metrics.psnr_background),
            "per_strength": results,
            "chosen_strength": chosen,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(strength: f64, adherent: usize, psnr: f64) -> TuningResult {
        TuningResult { strength, adherent, adherence: adherent as f64 / 20.0, psnr_background: psnr }
    }

    #[test]
    fn closest_adherence_then_higher_psnr_then_higher_strength() {
        let arms = [arm(0.3, 2, 30.0), arm(0.5, 8, 25.0), arm(0.7, 12, 20.0), arm(0.9, 15, 15.0)];
        assert_eq!(choose(11, &arms).unwrap(), 0.7);
        // 8 and 12 are both 2 from 10: the higher PSNR (0.5's) wins.
        assert_eq!(choose(10, &arms).unwrap(), 0.5);
        let tied = [arm(0.4, 5, 20.0), arm(0.6, 5, 20.0)];
        assert_eq!(choose(5, &tied).unwrap(), 0.6);
        assert!(parse_grid("0.3, 0.5").is_ok());
        for (bad, want) in [("0.3,x", "not a number"), ("0,0.5", "outside (0, 1]"), ("0.5,0.5", "twice")] {
            let err = parse_grid(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }
}
