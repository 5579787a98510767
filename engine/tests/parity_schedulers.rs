//! Scheduler parity with diffusers (tests/fixtures/ref_schedulers.py): schedules exactly,
//! steps, input scaling and add_noise within rel L2 1e-5 (they come out bit-identical).
mod common;

use common::{fixtures, read_ref, rel_l2};
use frisket_engine::schedulers::{build, numpy, Scheduler, SchedulerConfig, SchedulerKind, NAMES};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use tch::{Kind, Tensor};

const TOL: f64 = 1e-5;

fn index() -> Value {
    let path = fixtures().join("ref/schedulers/index.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (run `make fixtures`)", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn config(index: &Value, name: &str) -> SchedulerConfig {
    SchedulerConfig::from_json(&index["configs"][name].to_string()).unwrap()
}

/// A fixture variant: a scheduler name.
fn variant(name: &str) -> (SchedulerKind, bool) {
    SchedulerKind::parse_with_karras(name).unwrap()
}

fn at<'a>(r: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    r.get(key).unwrap_or_else(|| panic!("reference tensor {key} missing (rerun ref_schedulers.py)"))
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double)).unwrap()
}

/// Exact equality; float32 reference values are compared as float32.
fn assert_exact(what: &str, ours: &[f64], theirs: &Tensor) {
    let expected = values(theirs);
    let f32_ref = theirs.kind() == Kind::Float;
    let same = |a: f64, b: f64| if f32_ref { a as f32 == b as f32 } else { a == b };
    let bad = ours.len() != expected.len() || ours.iter().zip(&expected).any(|(&a, &b)| !same(a, b));
    assert!(!bad, "{what}: ours {ours:?}\n  diffusers {expected:?}");
}

#[derive(Default)]
struct Worst {
    err: f64,
    at: String,
    compared: usize,
    identical: usize,
    /// Per scheduler name: the largest absolute difference and the tensors compared.
    by_variant: BTreeMap<String, (f64, usize)>,
}

impl Worst {
    fn check(&mut self, what: String, ours: &Tensor, theirs: &Tensor) {
        assert_eq!(ours.kind(), theirs.kind(), "{what}: dtype");
        // Where diffusers' own arithmetic gives NaN (a zero-length step: karras sigmas equal
        // to sigma_min), ours must too; the rest is compared.
        let nan = theirs.isnan();
        assert!(ours.isnan().equal(&nan), "{what}: NaN in different places");
        let (ours, theirs) = (&ours.masked_fill(&nan, 0.0), &theirs.masked_fill(&nan, 0.0));
        let err = rel_l2(ours, theirs);
        assert!(err <= TOL, "{what}: rel L2 error {err:.3e} exceeds {TOL:.0e}");
        self.compared += 1;
        let variant = what.split('/').nth(1).unwrap_or_default().to_string();
        let abs = (ours.to_kind(Kind::Double) - theirs.to_kind(Kind::Double)).abs().max().double_value(&[]);
        let entry = self.by_variant.entry(variant).or_default();
        (entry.0, entry.1) = (entry.0.max(abs), entry.1 + 1);
        if ours.equal(theirs) {
            self.identical += 1;
        }
        if err >= self.err {
            (self.err, self.at) = (err, what);
        }
    }
}

/// Replays a diffusers run from step `begin`, feeding each step diffusers' own input sample.
fn replay(s: &mut dyn Scheduler, r: &HashMap<String, Tensor>, p: &str, begin: usize, name: &str, worst: &mut Worst) {
    let mut sample = at(r, &format!("{p}step{begin}.sample")).shallow_clone();
    for i in begin..s.timesteps().len() {
        let key = |n: &str| format!("{p}step{i}.{n}");
        let scaled = s.scale_model_input(&sample, i);
        match r.get(&key("scaled")) {
            Some(expected) => worst.check(format!("{name} {} scaled", key("")), &scaled, expected),
            None => assert!(scaled.equal(&sample), "{name}: scale_model_input should be the identity"),
        }
        let noise = r.get(&key("noise"));
        assert_eq!(noise.is_some(), s.needs_step_noise(i), "{name} step {i}: step noise");
        let out = s.step(at(r, &key("model_output")), i, &sample, noise);
        worst.check(format!("{name} {}prev_sample", key("")), &out.prev_sample, at(r, &key("prev_sample")));
        worst.check(
            format!("{name} {}pred_original_sample", key("")),
            &out.pred_original_sample,
            at(r, &key("pred_original_sample")),
        );
        sample = at(r, &key("prev_sample")).shallow_clone();
    }
}

#[test]
fn schedulers_match_diffusers() {
    let index = index();
    let mut worst = Worst::default();
    let mut files: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for case in index["cases"].as_array().unwrap() {
        let (cname, vname) = (case["config"].as_str().unwrap(), case["variant"].as_str().unwrap());
        let steps = case["steps"].as_u64().unwrap() as usize;
        let name = format!("{cname}/{vname}/{steps}");
        let cfg = config(&index, cname);
        let (kind, karras) = variant(vname);
        let make = || build(kind, &cfg, karras, steps);
        let mut s = match (make(), case.get("error"), case.get("run_error")) {
            (Err(_), Some(_), _) => continue,
            (Ok(_), Some(e), _) => panic!("{name}: diffusers refuses this ({e}) but we built it"),
            // We refuse up front what diffusers only fails on while stepping.
            (Err(e), None, Some(_)) => {
                println!("{name}: refused ({e:#}), diffusers fails while stepping");
                continue;
            }
            (Err(e), None, None) => panic!("{name}: {e:#}"),
            (Ok(s), None, _) => s,
        };
        let r = files
            .entry(format!("{cname}.{vname}"))
            .or_insert_with(|| read_ref(&format!("schedulers/{cname}.{vname}.safetensors")));
        let p = format!("n{steps}.");
        assert_exact(&format!("{name} timesteps"), s.timesteps(), at(r, &format!("{p}timesteps")));
        match r.get(&format!("{p}sigmas")) {
            Some(sigmas) => assert_exact(&format!("{name} sigmas"), &s.sigmas(), sigmas),
            None => assert!(s.sigmas().is_empty(), "{name}: no sigmas expected"),
        }
        let init = at(r, &format!("{p}init_noise_sigma")).double_value(&[]);
        assert_eq!(s.init_noise_sigma(), init, "{name} init_noise_sigma");
        assert_eq!(s.order(), 1);
        if case.get("run_error").is_some() {
            println!("{name}: schedule only (diffusers fails while stepping: {})", case["run_error"]);
            continue;
        }
        let draws = (0..s.timesteps().len()).any(|i| s.needs_step_noise(i));
        assert_eq!(case["consumes_noise"].as_bool().unwrap(), draws, "{name}: generator use");

        replay(s.as_mut(), r, &p, 0, &name, &mut worst);
        let begin = case["img2img_begin"].as_u64().unwrap() as usize;
        let mut s = make().unwrap();
        s.set_begin_index(begin);
        replay(s.as_mut(), r, &format!("{p}i2i."), begin, &name, &mut worst);
        let mut s = make().unwrap();
        s.set_begin_index(begin);
        let k = |n: &str| format!("{p}add_noise.{n}");
        let noised = s.add_noise(at(r, &k("original")), at(r, &k("noise")), begin);
        worst.check(format!("{name} add_noise@{begin}"), &noised, at(r, &k("out")));
    }
    println!(
        "{} tensors compared, {} bit-identical; max rel L2 error {:.3e} at {}",
        worst.compared, worst.identical, worst.err, worst.at
    );
    for (variant, (abs, n)) in &worst.by_variant {
        println!("  {variant}: {n} tensors, max |Δ| {abs:.3e}");
    }
    assert!(NAMES.iter().all(|n| worst.by_variant.contains_key(*n)), "every scheduler name has a stepped case");
    assert!(worst.compared > 1000);
}

/// Timesteps and sigmas for many step counts (numpy's arange/linspace/interp edge cases).
#[test]
fn schedules_match_for_many_step_counts() {
    let index = index();
    let r = read_ref("schedulers/sweep.safetensors");
    let mut checked = 0;
    for case in index["sweep"].as_array().unwrap() {
        let (cname, vname) = (case["config"].as_str().unwrap(), case["variant"].as_str().unwrap());
        let steps = case["steps"].as_u64().unwrap() as usize;
        let name = format!("{cname}/{vname}/{steps}");
        let (kind, karras) = variant(vname);
        let p = format!("{cname}.{vname}.n{steps}.");
        let expected_t = at(&r, &format!("{p}timesteps"));
        let s = match build(kind, &config(&index, cname), karras, steps) {
            Ok(s) => s,
            // DDIM and DDPM refuse timesteps past the train range (diffusers fails when stepping).
            Err(e)
                if matches!(kind, SchedulerKind::Ddim | SchedulerKind::Ddpm)
                    && values(expected_t).iter().any(|&t| t >= 1000.0) =>
            {
                println!("{name}: refused ({e:#})");
                continue;
            }
            Err(e) => panic!("{name}: {e:#}"),
        };
        assert_exact(&format!("{name} timesteps"), s.timesteps(), expected_t);
        if let Some(sigmas) = r.get(&format!("{p}sigmas")) {
            assert_exact(&format!("{name} sigmas"), &s.sigmas(), sigmas);
        }
        checked += 1;
    }
    println!("{checked} schedules identical");
}

/// numpy's float32 log, which the karras timesteps depend on.
#[test]
fn numpy_float32_log_is_reproduced() {
    let r = read_ref("schedulers/sweep.safetensors");
    let x = Vec::<f32>::try_from(&r["logf.x"]).unwrap();
    let y = Vec::<f32>::try_from(&r["logf.y"]).unwrap();
    let bad: Vec<_> = x.iter().zip(&y).filter(|(&x, &y)| numpy::logf(x).to_bits() != y.to_bits()).take(5).collect();
    assert!(bad.is_empty(), "np.log(x) differs for (x, np.log(x)): {bad:?}");
}

#[test]
fn config_errors_are_clear() {
    let err = |json: &str, kind: SchedulerKind, karras: bool| {
        build(kind, &SchedulerConfig::from_json(json).unwrap(), karras, 10)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default()
    };
    assert!(err(r#"{"thresholding": true}"#, SchedulerKind::Ddim, false).contains("thresholding"));
    // The same key from another class's file is ignored by classes without that option.
    assert_eq!(err(r#"{"thresholding": true}"#, SchedulerKind::Euler, false), "");
    assert!(err(r#"{"algorithm_type": "sde-dpmsolver"}"#, SchedulerKind::DpmSolverMultistep, false)
        .contains("algorithm_type"));
    // The dpm++-sde names select the SDE algorithm whatever the file says.
    assert_eq!(err(r#"{"algorithm_type": "dpmsolver++"}"#, SchedulerKind::DpmSolverSde, false), "");
    assert!(err(r#"{"variance_type": "learned_range"}"#, SchedulerKind::Ddpm, false).contains("variance_type"));
    assert!(err(r#"{"predict_x0": false}"#, SchedulerKind::UniPc, false).contains("predict_x0"));
    assert!(err(r#"{"disable_corrector": "all"}"#, SchedulerKind::UniPc, false).contains("disable_corrector"));
    assert!(err(r#"{}"#, SchedulerKind::Ddpm, true).contains("karras"));
    assert!(err(r#"{"use_exponential_sigmas": true}"#, SchedulerKind::Euler, false).contains("use_exponential_sigmas"));
    assert!(err(r#"{"beta_schedule": "sigmoid"}"#, SchedulerKind::EulerAncestral, false).contains("sigmoid"));
    assert!(err(r#"{"timestep_spacing": "middle"}"#, SchedulerKind::Ddim, false).contains("timestep_spacing"));
    assert!(err(r#"{}"#, SchedulerKind::Ddim, true).contains("karras"));
    assert!(err(r#"{"solver_order": 4}"#, SchedulerKind::DpmSolverMultistep, false).contains("solver_order"));
    // DPMSolverMultistepScheduler saves lambda_min_clipped as -Infinity: the default.
    assert_eq!(
        err(r#"{"lambda_min_clipped": -Infinity, "thresholding": false}"#, SchedulerKind::DpmSolverMultistep, false),
        ""
    );
    let e = "heun".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(e.contains(&NAMES.join(", ")), "{e}");
}
