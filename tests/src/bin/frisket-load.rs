//! `make load`: concurrent clients over loopback against a real `frisket-server`, through
//! the generated gRPC client. For each server setting (`--setting NAME=FLAGS`, repeatable)
//! and each concurrency `c`, it starts a server on the models folder, loads the model with
//! one job, then runs `c` clients that each send `--jobs` jobs one after another (the same
//! request, a seed per job, a preview every step). The clients start together, or with
//! `--stagger` spread over one lone job's time (timed by a second job before the run):
//! started together, equal jobs that are stepped together also end together, so every
//! round of jobs arrives as a burst of `c`. With `--rounds N` it runs all of that N times,
//! the settings alternating, and its ratios pool the rounds. It reports jobs/s, time to first
//! preview and job time (p50/p95/p99, from the request being sent), errors by gRPC code,
//! the server's step batch sizes and the steps it stopped for a new job (its debug lines),
//! as a table and as JSON (`--out`, with every job's times in the order sent).
//!
//! The server binary is `$FRISKET_SERVER_BIN`, else target/debug/frisket-server.
use frisket_e2e::{txt2img, Server};
use frisket_proto::v1 as pb;
use frisket_proto::v1::generate_event::Event;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

struct Args {
    models: PathBuf,
    model: String,
    prompt: String,
    steps: u32,
    size: u32,
    jobs: usize,
    concurrency: Vec<usize>,
    settings: Vec<(String, Vec<String>)>,
    /// Whether client i sends its first job i/c of a lone job's time after the first
    /// client (a load tool's ramp-up), instead of all at once.
    stagger: bool,
    /// Times every setting and concurrency runs, the settings alternating, so that
    /// background load on the machine hits them alike; the ratios pool the rounds.
    rounds: usize,
    out: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: frisket-load --models DIR [--model shapes] [--prompt P] [--steps 20] [--size 64] [--jobs 4]\n\
         \x20      [--concurrency 1,2,4,8] [--setting NAME=\"SERVE FLAGS\"]… [--stagger] [--rounds 1] [--out FILE.json]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        models: PathBuf::new(),
        model: "shapes".into(),
        prompt: "a red circle on the left".into(),
        steps: 20,
        size: 64,
        jobs: 4,
        concurrency: vec![1, 2, 4, 8],
        settings: Vec::new(),
        stagger: false,
        rounds: 1,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--models" => args.models = value().into(),
            "--model" => args.model = value(),
            "--prompt" => args.prompt = value(),
            "--steps" => args.steps = value().parse().unwrap_or_else(|_| usage()),
            "--size" => args.size = value().parse().unwrap_or_else(|_| usage()),
            "--jobs" => args.jobs = value().parse().unwrap_or_else(|_| usage()),
            "--concurrency" => {
                args.concurrency = value().split(',').map(|c| c.trim().parse().unwrap_or_else(|_| usage())).collect()
            }
            "--setting" => {
                let v = value();
                let (name, flags) = v.split_once('=').unwrap_or_else(|| usage());
                args.settings.push((name.into(), flags.split_whitespace().map(String::from).collect()));
            }
            "--stagger" => args.stagger = true,
            "--rounds" => args.rounds = value().parse().unwrap_or_else(|_| usage()),
            "--out" => args.out = Some(value().into()),
            _ => usage(),
        }
    }
    if args.models.as_os_str().is_empty() || args.jobs == 0 || args.rounds == 0 || args.concurrency.contains(&0) {
        usage();
    }
    if args.settings.is_empty() {
        args.settings.push(("default".into(), Vec::new()));
    }
    args
}

/// One job as a client saw it.
struct Seen {
    client: usize,
    /// When it was sent, from the start of the run.
    sent: Duration,
    first_preview: Option<Duration>,
    total: Duration,
    code: tonic::Code,
}

async fn one_job(server: &Server, args: &Args, seed: u64, client_index: usize, run_start: Instant) -> Seen {
    let mut client = server.client().await;
    let mut request = txt2img(&args.model, &args.prompt, seed, args.steps, args.size, args.size);
    request.stream = Some(pb::StreamOptions {
        previews: Some(pb::PreviewOptions { enabled: true, every: 1, ..Default::default() }),
        ..Default::default()
    });
    let sent = Instant::now();
    let mut first_preview = None;
    let code = match client.generate(request).await {
        Err(status) => status.code(),
        Ok(response) => {
            let mut stream = response.into_inner();
            let mut code = tonic::Code::Unknown;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => match event.event {
                        Some(Event::Preview(_)) if first_preview.is_none() => first_preview = Some(sent.elapsed()),
                        Some(Event::Result(_)) => code = tonic::Code::Ok,
                        _ => {}
                    },
                    Err(status) => {
                        code = status.code();
                        break;
                    }
                }
            }
            code
        }
    };
    Seen { client: client_index, sent: sent - run_start, first_preview, total: sent.elapsed(), code }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn summary(values: &mut [f64]) -> Value {
    values.sort_by(f64::total_cmp);
    let r = |v: Option<f64>| v.map(|v| (v * 1000.0).round() / 1000.0);
    json!({"p50": r(percentile(values, 50.0)), "p95": r(percentile(values, 95.0)), "p99": r(percentile(values, 99.0))})
}

async fn run_setting(args: &'static Args, flags: &[String], c: usize) -> Value {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = std::sync::Arc::new(Server::start_on(&args.models, &flags).await);
    // Warm-up jobs: the first loads the model, so no measured job pays for it; with
    // --stagger the second times a lone job.
    let mut warm_ups = vec![one_job(&server, args, 0, 0, Instant::now()).await];
    if args.stagger {
        warm_ups.push(one_job(&server, args, 0, 0, Instant::now()).await);
    }
    let lone = warm_ups.get(1).map_or(Duration::ZERO, |lone| lone.total);
    // The batch sizes count the measured jobs' steps only: the log from the warm-up jobs'
    // last lines on (the server's output reaches its log a little after their results).
    let log_start = log_after(&server, "job finished", warm_ups.len()).await;
    let start = Instant::now();
    let clients: Vec<_> = (0..c)
        .map(|client| {
            let server = server.clone();
            let delay = lone.mul_f64(client as f64 / c as f64);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut seen = Vec::new();
                for j in 0..args.jobs {
                    seen.push(one_job(&server, args, 1 + (client * args.jobs + j) as u64, client, start).await);
                }
                seen
            })
        })
        .collect();
    let mut seen = Vec::new();
    for client in clients {
        seen.extend(client.await.expect("a load client panicked"));
    }
    let wall = start.elapsed().as_secs_f64();
    let log = server.logs();
    let batches = batch_sizes(&log[log_start..]);
    let yields = log[log_start..].matches("step batch yielded").count();
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for s in &seen {
        *codes.entry(format!("{:?}", s.code)).or_default() += 1;
    }
    let ok: Vec<&Seen> = seen.iter().filter(|s| s.code == tonic::Code::Ok).collect();
    let mut first: Vec<f64> = ok.iter().filter_map(|s| s.first_preview).map(|d| d.as_secs_f64()).collect();
    let mut total: Vec<f64> = ok.iter().map(|s| s.total.as_secs_f64()).collect();
    let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    let mut samples: Vec<&Seen> = seen.iter().collect();
    samples.sort_by_key(|s| s.sent);
    let samples: Vec<Value> = samples
        .iter()
        .map(|s| {
            json!({"client": s.client, "sent_ms": ms(s.sent), "first_preview_ms": s.first_preview.map(ms),
                   "job_ms": ms(s.total), "code": format!("{:?}", s.code)})
        })
        .collect();
    json!({
        "concurrency": c,
        "jobs": seen.len(),
        "jobs_per_second": ((ok.len() as f64 / wall) * 1000.0).round() / 1000.0,
        "wall_seconds": wall,
        "first_preview_seconds": summary(&mut first),
        "job_seconds": summary(&mut total),
        "codes": codes,
        "batch_sizes": batches,
        "step_yields": yields,
        "samples": samples,
    })
}

/// The length of the server's log once `line` appears in it `n` times (at most 10 s on).
async fn log_after(server: &Server, line: &str, n: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.logs();
        if log.matches(line).count() >= n || Instant::now() > deadline {
            return log.len();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The server's step batch sizes, from its log lines `step batch size=N` (debug level):
/// a histogram {size: count}; empty when the server logs none.
fn batch_sizes(log: &str) -> BTreeMap<String, usize> {
    let mut hist = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("step batch size=")) {
        if let Some(size) = line.split("size=").nth(1).and_then(|s| s.split_whitespace().next()) {
            *hist.entry(size.to_string()).or_default() += 1;
        }
    }
    hist
}

fn print_table(results: &[(String, Value)]) {
    println!(
        "{:<16} {:>3} {:>5} {:>7}  {:>23}  {:>23}  {:<14} {:>6}  batches",
        "setting", "c", "jobs", "jobs/s", "first preview p50/95/99", "job s p50/95/99", "codes", "yields"
    );
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    let several = results.iter().any(|(_, r)| r["round"].as_u64() > Some(1));
    for (name, r) in results {
        let name = if several { format!("{name} #{}", r["round"]) } else { name.clone() };
        let triple = |k: &str| format!("{}/{}/{}", f(&r[k]["p50"]), f(&r[k]["p95"]), f(&r[k]["p99"]));
        println!(
            "{:<16} {:>3} {:>5} {:>7.3}  {:>23}  {:>23}  {:<14} {:>6}  {}",
            name,
            r["concurrency"].as_u64().unwrap_or(0),
            r["jobs"].as_u64().unwrap_or(0),
            r["jobs_per_second"].as_f64().unwrap_or(0.0),
            triple("first_preview_seconds"),
            triple("job_seconds"),
            r["codes"].to_string(),
            r["step_yields"].as_u64().unwrap_or(0),
            r["batch_sizes"]
        );
    }
}

#[tokio::main]
async fn main() {
    let args: &'static Args = Box::leak(Box::new(parse_args()));
    if std::env::var_os("FRISKET_SERVER_BIN").is_none() {
        let bin = frisket_e2e::workspace_root().join("target/debug/frisket-server");
        std::env::set_var("FRISKET_SERVER_BIN", bin);
    }
    println!(
        "{} steps at {}², a preview every step, {} jobs per client, model {}",
        args.steps, args.size, args.jobs, args.model
    );
    let mut results = Vec::new();
    for round in 1..=args.rounds {
        for (name, flags) in &args.settings {
            for &c in &args.concurrency {
                let mut r = run_setting(args, flags, c).await;
                r["round"] = json!(round);
                let mut shown = r.clone();
                shown.as_object_mut().map(|o| o.remove("samples"));
                println!("{name} c={c}: {shown}");
                results.push((name.clone(), r));
            }
        }
    }
    print_table(&results);
    print_ratios(&results);
    if let Some(out) = &args.out {
        let all: Vec<Value> = results
            .iter()
            .map(|(name, r)| json!({"setting": name, "flags": settings_flags(args, name), "result": r}))
            .collect();
        std::fs::write(out, serde_json::to_string_pretty(&json!({"runs": all})).unwrap()).expect("writing --out");
        println!("wrote {}", out.display());
    }
}

/// The goals as ratios measured in this run, over all rounds: each setting's jobs/s
/// (jobs that ended OK over the rounds' wall time) against the first setting's at the same
/// concurrency, and its p99 time to first preview (over every round's jobs) against its own
/// at c = 1.
fn print_ratios(results: &[(String, Value)]) {
    let Some((base, _)) = results.first() else { return };
    let mut keys: Vec<(&str, u64)> = Vec::new();
    for (name, r) in results {
        let key = (name.as_str(), r["concurrency"].as_u64().unwrap_or(0));
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    // (jobs/s, p99 first preview in seconds) of a setting at a concurrency, rounds pooled.
    let pooled = |name: &str, c: u64| -> Option<(f64, Option<f64>)> {
        let runs: Vec<&Value> =
            results.iter().filter(|(n, r)| n == name && r["concurrency"].as_u64() == Some(c)).map(|(_, r)| r).collect();
        let ok: f64 = runs.iter().filter_map(|r| r["codes"]["Ok"].as_f64()).sum();
        let wall: f64 = runs.iter().filter_map(|r| r["wall_seconds"].as_f64()).sum();
        let mut first: Vec<f64> = runs
            .iter()
            .flat_map(|r| r["samples"].as_array().into_iter().flatten())
            .filter(|s| s["code"] == "Ok")
            .filter_map(|s| s["first_preview_ms"].as_f64())
            .map(|ms| ms / 1000.0)
            .collect();
        first.sort_by(f64::total_cmp);
        (wall > 0.0).then(|| (ok / wall, percentile(&first, 99.0)))
    };
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let show = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}×"));
    let rounds = results.iter().filter_map(|(_, r)| r["round"].as_u64()).max().unwrap_or(1);
    println!(
        "ratios (this run, {rounds} round(s) pooled): jobs/s against {base} at the same c; \
         p99 first preview against the setting's c = 1"
    );
    for (name, c) in keys {
        let Some((jobs_per_second, p99)) = pooled(name, c) else { continue };
        let throughput = pooled(base, c).and_then(|(b, _)| ratio(Some(jobs_per_second), Some(b)));
        let first_preview = pooled(name, 1).and_then(|(_, one)| ratio(p99, one));
        println!("{name:<16} c={c:<3} jobs/s {:>6}   p99 first preview {:>6}", show(throughput), show(first_preview));
    }
}

fn settings_flags(args: &Args, name: &str) -> Vec<String> {
    args.settings.iter().find(|(n, _)| n == name).map(|(_, f)| f.clone()).unwrap_or_default()
}
