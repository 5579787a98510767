//! The `frisket` CLI against a real `frisket-server serve` on a loopback port:
//! artifacts and manifest of `--dump-dir`, the `--json` lines, byte-identity with
//! `frisket-server render`, the small subcommands, exit codes, and Ctrl-C.
//!
//! Needs the fixture models (`make fixtures`); the binaries are (re)built on first use.
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Helpers: the `frisket` binary, a server per test (frisket_e2e::Server).

use frisket_e2e::{models_dir, server_binary};

/// The `frisket` binary of the profile these tests were built with, unless `$FRISKET_BIN`
/// names one.
fn client_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| frisket_e2e::workspace_binary("frisket", "FRISKET_BIN")).clone()
}

/// `frisket ARGS` with no server configured.
fn frisket_cmd() -> Command {
    let mut c = Command::new(client_binary());
    c.env_remove("FRISKET_SERVER").stdin(Stdio::null());
    c
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("frisket-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A healthy `frisket-server serve` with the fixture models on a free loopback port
/// (killed on drop; its log is printed when the test fails).
struct Server(frisket_e2e::Server);

impl Server {
    fn start() -> Server {
        Self::start_with(&[])
    }

    /// With extra `serve` arguments.
    fn start_with(extra: &[&str]) -> Server {
        // Build the client first so the build does not race the server's start-up.
        client_binary();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Server(rt.block_on(frisket_e2e::Server::start(extra)))
    }

    fn url(&self) -> String {
        self.0.url()
    }

    /// Runs `frisket ARGS --server URL`.
    fn frisket(&self, args: &[&str]) -> Output {
        let out = frisket_cmd().args(args).args(["--server", &self.url()]).output().expect("running frisket");
        if !out.status.success() {
            eprintln!("frisket {args:?} exited {:?}: {}", out.status.code(), stderr(&out));
        }
        out
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), stderr(o));
}

/// Parses `--json` stdout: every line one object with `"v": 1`.
fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            assert_eq!(v["v"], 1, "line without v=1: {l}");
            v
        })
        .collect()
}

/// The stderr of a failed command: exactly one line.
fn one_line_error(o: &Output) -> String {
    let e = stderr(o).trim().to_string();
    assert_eq!(e.lines().count(), 1, "error should be one line, got:\n{e}");
    e
}

/// A parsed `.npy` file: checks magic, version 1.0, `<f4`, C order, alignment and size.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}: magic", path.display());
    assert_eq!((bytes[6], bytes[7]), (1, 0), "{}: version", path.display());
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + hlen) % 16, 0, "{}: header not aligned", path.display());
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(header.ends_with('\n'), "{header:?}");
    let header = header.trim_end();
    assert!(header.starts_with('{') && header.ends_with('}'), "{header:?}");
    assert!(header.contains("'descr': '<f4'"), "{header:?}");
    assert!(header.contains("'fortran_order': False"), "{header:?}");
    let shape_text = header.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).expect("shape");
    let shape: Vec<usize> =
        shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let numel: usize = shape.iter().product();
    let data = &bytes[10 + hlen..];
    assert_eq!(data.len(), numel * 4, "{}: data size for shape {shape:?}", path.display());
    let values = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (shape, values)
}

fn shape_of(v: &Value) -> Vec<usize> {
    v.as_array().expect("shape array").iter().map(|d| d.as_u64().unwrap() as usize).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------
// Tests.

/// Previews every 3 steps (and the last), latents every 2: the manifest lists exactly
/// those, in stream order, with shapes; the `.npy` files parse; latents are
/// [1, 4, h/f, w/f] (sd1: f = 4, sd2: f = 2).
#[test]
fn dump_dir_writes_artifacts_and_manifest() {
    let server = Server::start();
    for (model, w, h, f) in [("sd1", 64usize, 48usize, 4usize), ("sd2", 32, 32, 2)] {
        let dir = scratch(&format!("dump-{model}"));
        let dump = dir.join("dump");
        let out_png = dir.join("out.png");
        let steps = 7u32;
        let o = server.frisket(&[
            "generate",
            "--model",
            model,
            "--prompt",
            "a small yellow star",
            "--seed",
            "7",
            "--steps",
            &steps.to_string(),
            "--scheduler",
            "euler",
            "--width",
            &w.to_string(),
            "--height",
            &h.to_string(),
            "--preview-every",
            "3",
            "--latents-every",
            "2",
            "--dump-dir",
            s(&dump),
            "--out",
            s(&out_png),
        ]);
        assert_ok(&o);
        // Not a terminal, not --json: quiet, just the output path.
        assert_eq!(stdout(&o).trim(), out_png.display().to_string());

        let manifest: Value = serde_json::from_slice(&std::fs::read(dump.join("manifest.json")).unwrap()).unwrap();
        let entries = manifest.as_array().expect("manifest is an array");
        let of_kind = |k: &str| entries.iter().filter(|e| e["kind"] == k).collect::<Vec<_>>();
        let steps_of = |k: &str| of_kind(k).iter().map(|e| e["step"].as_u64().unwrap()).collect::<Vec<_>>();
        assert_eq!(steps_of("preview"), vec![2, 5, 6], "{model}: previews after steps 3, 6 and the last");
        assert_eq!(steps_of("latent"), vec![0, 2, 4, 6], "{model}: latents entering steps 0, 2, 4, 6");
        assert!(entries.iter().all(|e| ["preview", "latent", "result"].contains(&e["kind"].as_str().unwrap())));
        assert_eq!(entries.last().unwrap()["kind"], "result");
        assert_eq!(of_kind("result").len(), 1);

        for e in entries {
            let rel = e["path"].as_str().unwrap();
            assert!(!Path::new(rel).is_absolute(), "{rel}: paths are relative to the dump dir");
            let path = dump.join(rel);
            assert!(path.exists(), "{}", path.display());
            let shape = shape_of(&e["shape"]);
            match e["kind"].as_str().unwrap() {
                "preview" => {
                    let step = e["step"].as_u64().unwrap();
                    assert_eq!(rel, format!("preview_{step}.png"));
                    assert!(e["timestep"].is_number());
                    let img = image::open(&path).unwrap();
                    assert_eq!(shape, vec![img.height() as usize, img.width() as usize, 3]);
                }
                "latent" => {
                    let step = e["step"].as_u64().unwrap();
                    assert_eq!(rel, format!("latent_{step}.npy"));
                    assert!(e["timestep"].is_number());
                    let (npy_shape, values) = read_npy(&path);
                    assert_eq!(npy_shape, vec![1, 4, h / f, w / f], "{model}: latent shape");
                    assert_eq!(shape, npy_shape);
                    assert!(values.iter().all(|v| v.is_finite()));
                    assert!(values.iter().any(|&v| v != 0.0));
                }
                "result" => {
                    assert_eq!(rel, "result.png");
                    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(&out_png).unwrap());
                    assert_eq!(shape, vec![h, w, 3]);
                }
                k => panic!("unexpected kind {k}"),
            }
        }
        // The latent entering step 0 is the initial noise (σ-scaled for euler), entering
        // later steps it changes.
        let (_, l0) = read_npy(&dump.join("latent_0.npy"));
        let (_, l2) = read_npy(&dump.join("latent_2.npy"));
        assert_ne!(l0, l2);
        let out = image::open(&out_png).unwrap();
        assert_eq!((out.width() as usize, out.height() as usize), (w, h));
    }
}

/// `--json`: one object per line, in stream order, ending with the result; artifact
/// paths when dumping; the result's path is --out.
#[test]
fn json_lines_are_ordered_and_end_with_the_result() {
    let server = Server::start();
    let dir = scratch("json");
    let dump = dir.join("dump");
    let out_png = dir.join("out.png");
    let o = server.frisket(&[
        "generate",
        "--json",
        "--model",
        "sd1",
        "--prompt",
        "a red circle",
        "--seed",
        "3",
        "--steps",
        "5",
        "--scheduler",
        "dpm++",
        "--width",
        "64",
        "--height",
        "48",
        "--preview-every",
        "2",
        "--preview-format",
        "jpeg",
        "--latents-every",
        "1",
        "--dump-dir",
        s(&dump),
        "--out",
        s(&out_png),
        "--job-id",
        "cli-json-test",
    ]);
    assert_ok(&o);
    let lines = json_lines(&o);
    let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(*events.last().unwrap(), "result", "{events:?}");
    assert_eq!(events.iter().filter(|e| **e == "result").count(), 1);
    assert!(!events.contains(&"error"));
    for l in &lines {
        assert_eq!(l["job_id"], "cli-json-test", "{l}");
    }
    let started = events.iter().position(|e| *e == "started").expect("a started event");
    if let Some(q) = events.iter().position(|e| *e == "queued") {
        assert!(q < started);
    }
    assert_eq!(lines[started]["total_steps"], 5);
    assert_eq!(lines[started]["seed"], 3);
    assert_eq!(lines[started]["timesteps"].as_array().unwrap().len(), 5);
    assert_eq!((lines[started]["width"].as_u64(), lines[started]["height"].as_u64()), (Some(64), Some(48)));
    let step_lines: Vec<&Value> = lines.iter().filter(|l| l["event"] == "step").collect();
    let indices: Vec<u64> = step_lines.iter().map(|l| l["index"].as_u64().unwrap()).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 4]);
    assert!(step_lines
        .iter()
        .all(|l| l["total"] == 5 && l["timestep"].is_number() && l["elapsed_seconds"].is_number()));
    assert!(lines.iter().skip(started + 1).all(|l| l["event"] != "started"));
    // Every step-related event comes after `started`.
    for (i, l) in lines.iter().enumerate() {
        if ["step", "preview", "latent"].contains(&l["event"].as_str().unwrap()) {
            assert!(i > started, "{l} before started");
        }
    }
    // Previews (JPEG) after steps 2, 4 and the last; latents entering every step.
    let previews: Vec<&Value> = lines.iter().filter(|l| l["event"] == "preview").collect();
    assert_eq!(previews.iter().map(|p| p["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 3, 4]);
    for p in &previews {
        assert_eq!(p["mime_type"], "image/jpeg");
        let path = PathBuf::from(p["path"].as_str().expect("preview path"));
        assert_eq!(path, dump.join(format!("preview_{}.jpg", p["step"])));
        let img = image::open(&path).unwrap();
        assert_eq!((Some(img.width() as u64), Some(img.height() as u64)), (p["width"].as_u64(), p["height"].as_u64()));
    }
    let latents: Vec<&Value> = lines.iter().filter(|l| l["event"] == "latent").collect();
    assert_eq!(latents.iter().map(|p| p["step"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    for l in &latents {
        assert_eq!(shape_of(&l["shape"]), vec![1, 4, 12, 16]);
        let (shape, _) = read_npy(Path::new(l["path"].as_str().unwrap()));
        assert_eq!(shape, vec![1, 4, 12, 16]);
    }
    // A latent entering step k precedes the step-k event; a preview after step k follows it.
    let pos = |event: &str, key: &str, k: u64| {
        lines.iter().position(|l| l["event"] == event && l[key].as_u64() == Some(k)).unwrap()
    };
    for k in 0..5 {
        assert!(pos("latent", "step", k) < pos("step", "index", k), "latent {k} after step {k}");
    }
    for p in &previews {
        let k = p["step"].as_u64().unwrap();
        assert!(pos("step", "index", k) < pos("preview", "step", k), "preview {k} before step {k}");
    }
    let result = lines.last().unwrap();
    assert_eq!(result["path"], out_png.display().to_string());
    assert_eq!(result["seed"], 3);
    assert_eq!(result["settings"]["scheduler"], "dpm++");
    assert_eq!(result["settings"]["steps"], 5);
    assert_eq!(result["mime_type"], "image/png");
    assert_eq!(result["dump_path"], dump.join("result.png").display().to_string());
    assert_eq!(result["manifest"], dump.join("manifest.json").display().to_string());
    assert!(result["timings"]["total_seconds"].is_number());
    assert_eq!(result["dropped_events"], 0, "a client that keeps up misses nothing");
    assert!(out_png.exists());
    // The manifest mirrors the artifact events.
    let manifest: Value = serde_json::from_slice(&std::fs::read(dump.join("manifest.json")).unwrap()).unwrap();
    let kinds: Vec<&str> = manifest.as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let artifact_events: Vec<&str> =
        events.iter().copied().filter(|e| ["preview", "latent", "result"].contains(e)).collect();
    assert_eq!(kinds, artifact_events);
}

/// The client's result is the PNG `frisket-server render` writes, byte for byte
/// (txt2img, and img2img from that image).
#[test]
fn result_is_byte_identical_to_render() {
    let server = Server::start();
    let dir = scratch("render");
    let model_dir = models_dir().join("sd1");
    let common = [
        "--prompt",
        "A small yellow STAR, top-left!",
        "--negative-prompt",
        "blurry",
        "--seed",
        "1000",
        "--steps",
        "8",
        "--guidance",
        "7.5",
        "--width",
        "64",
        "--height",
        "48",
    ];
    for scheduler in ["ddim", "dpm++-karras"] {
        let ours = dir.join(format!("client-{scheduler}.png"));
        let theirs = dir.join(format!("render-{scheduler}.png"));
        let o = server.frisket(
            &[&["generate", "--model", "sd1", "--scheduler", scheduler, "--out", s(&ours)][..], &common].concat(),
        );
        assert_ok(&o);
        let r = Command::new(server_binary())
            .args(["render", "--model", s(&model_dir), "--scheduler", scheduler, "--out", s(&theirs), "--quiet"])
            .args(common)
            .output()
            .unwrap();
        assert_ok(&r);
        assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(), "{scheduler}: PNGs differ");
    }
    // img2img from the ddim image.
    let reference = dir.join("client-ddim.png");
    let ours = dir.join("client-img2img.png");
    let theirs = dir.join("render-img2img.png");
    let img2img =
        ["--prompt", "a blue square", "--seed", "5", "--steps", "6", "--scheduler", "euler-a", "--strength", "0.6"];
    let o = server.frisket(
        &[&["generate", "--model", "sd1", "--reference", s(&reference), "--out", s(&ours)][..], &img2img].concat(),
    );
    assert_ok(&o);
    let r = Command::new(server_binary())
        .args(["render", "--model", s(&model_dir), "--reference", s(&reference), "--out", s(&theirs), "--quiet"])
        .args(img2img)
        .output()
        .unwrap();
    assert_ok(&r);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(), "img2img: PNGs differ");
}

#[test]
fn models_tokenize_health_info_and_cancel() {
    let server = Server::start();
    // models
    let o = server.frisket(&["models", "--json"]);
    assert_ok(&o);
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 1);
    let models = lines[0]["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"sd1") && names.contains(&"sd2"), "{names:?}");
    let sd1 = models.iter().find(|m| m["name"] == "sd1").unwrap();
    assert_eq!(sd1["architecture"], "sd1");
    assert!(sd1["schedulers"].as_array().unwrap().iter().any(|s| s == "dpm++-karras"));
    let o = server.frisket(&["models"]);
    assert_ok(&o);
    let text = stdout(&o);
    assert!(text.starts_with("NAME") && text.contains("sd1") && text.contains("sd2"), "{text}");

    // load / unload, and the state `models` shows
    assert_eq!(sd1["state"], "on-disk");
    let o = server.frisket(&["load", "sd1", "--json"]);
    assert_ok(&o);
    assert_eq!(json_lines(&o)[0]["devices"], serde_json::json!(["cpu"]));
    let o = server.frisket(&["models"]);
    let line = stdout(&o).lines().find(|l| l.starts_with("sd1 ")).map(str::to_string).unwrap_or_default();
    assert!(line.contains("loaded (cpu)"), "{line:?}");
    let o = server.frisket(&["unload", "sd1", "--json"]);
    assert_ok(&o);
    assert_eq!(json_lines(&o)[0]["was_loaded"], true);
    let o = server.frisket(&["models", "--json"]);
    let models = json_lines(&o)[0]["models"].as_array().unwrap().clone();
    assert_eq!(models.iter().find(|m| m["name"] == "sd1").unwrap()["state"], "on-disk");

    // tokenize
    let o = server.frisket(&["tokenize", "a yellow star", "--model", "sd1", "--json"]);
    assert_ok(&o);
    let t = &json_lines(&o)[0];
    let tokens = t["tokens"].as_array().unwrap();
    assert_eq!(tokens[0]["index"], 0);
    let words: Vec<&str> = tokens.iter().map(|t| t["word"].as_str().unwrap()).filter(|w| !w.is_empty()).collect();
    assert_eq!(words, vec!["a", "yellow", "star"]);
    assert_eq!(t["truncated"], false);
    let o = server.frisket(&["tokenize", "a yellow star", "--model", "sd1"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("yellow"), "{}", stdout(&o));

    // health
    let o = server.frisket(&["health"]);
    assert_ok(&o);
    assert_eq!(stdout(&o).trim(), "SERVING");
    let o = server.frisket(&["health", "--json"]);
    assert_ok(&o);
    assert_eq!(json_lines(&o)[0]["status"], "SERVING");

    // info
    let o = server.frisket(&["info", "--json"]);
    assert_ok(&o);
    let info = &json_lines(&o)[0];
    assert!(!info["version"].as_str().unwrap().is_empty());
    assert!(info["max_steps"].as_u64().unwrap() > 0);
    let o = server.frisket(&["info"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("version"));

    // cancel of a job that does not exist: a negative answer, exit 6.
    let o = server.frisket(&["cancel", "no-such-job"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let o = server.frisket(&["cancel", "no-such-job", "--json"]);
    assert_eq!(json_lines(&o)[0]["found"], false);
}

/// Exit codes: 1 for a gRPC error (one `error: CODE: message` line), 2 for usage, 3 when
/// no server answers; `--json` ends with an error line.
#[test]
fn errors_have_distinct_exit_codes() {
    let server = Server::start();
    let dir = scratch("errors");
    let out_png = dir.join("o.png");
    let o = server.frisket(&[
        "generate",
        "--model",
        "sd1",
        "--prompt",
        "x",
        "--scheduler",
        "plms",
        "--steps",
        "2",
        "--out",
        s(&out_png),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = one_line_error(&o);
    assert!(e.starts_with("error: INVALID_ARGUMENT: "), "{e}");
    assert!(e.contains("plms"), "{e}");
    assert!(!out_png.exists());

    let o = server.frisket(&[
        "generate",
        "--json",
        "--model",
        "sd1",
        "--prompt",
        "x",
        "--scheduler",
        "plms",
        "--out",
        s(&out_png),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let lines = json_lines(&o);
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["code"], "INVALID_ARGUMENT");
    assert!(last["message"].as_str().unwrap().contains("plms"));

    let o = server.frisket(&["generate", "--model", "no-such-model", "--prompt", "x", "--out", s(&out_png)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("no-such-model"));

    let o = server.frisket(&[
        "generate",
        "--model",
        "sd1",
        "--prompt",
        "x",
        "--width",
        "66",
        "--height",
        "48",
        "--out",
        s(&out_png),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).starts_with("error: INVALID_ARGUMENT: "));

    // Usage errors: exit 2, one line.
    let o = server.frisket(&["generate", "--model", "sd1", "--out", s(&out_png)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("--prompt"));
    let o = server.frisket(&["generate", "--model", "sd1", "--prompt", "x", "--steps", "many", "--out", s(&out_png)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("many"));
    let missing = dir.join("missing.png");
    let o = server.frisket(&[
        "generate",
        "--model",
        "sd1",
        "--prompt",
        "x",
        "--reference",
        s(&missing),
        "--out",
        s(&out_png),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("missing.png"));

    // No server: exit 3, UNAVAILABLE.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    for args in [vec!["health"], vec!["generate", "--model", "sd1", "--prompt", "x", "--out", s(&out_png)]] {
        let o = frisket_cmd().args(&args).env("FRISKET_SERVER", &url).output().unwrap();
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", stderr(&o));
        let e = one_line_error(&o);
        assert!(e.starts_with("error: UNAVAILABLE: ") && e.contains(&url), "{e}");
    }
}

/// Ctrl-C (SIGINT) during generate cancels the job on the server and exits 130.
#[cfg(unix)]
#[test]
fn ctrl_c_cancels_the_job() {
    let server = Server::start();
    let dir = scratch("ctrl-c");
    let out_png = dir.join("o.png");
    let o = server.frisket(&["info", "--json"]);
    let max_steps = json_lines(&o)[0]["max_steps"].as_u64().unwrap().min(500);
    let mut child = frisket_cmd()
        .args(["generate", "--json", "--model", "sd1", "--prompt", "x", "--width", "64", "--height", "48"])
        .args(["--steps", &max_steps.to_string(), "--job-id", "ctrl-c-job", "--out", s(&out_png)])
        .args(["--server", &server.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended early: {seen:?}");
        let v: Value = serde_json::from_str(&line).unwrap();
        let event = v["event"].as_str().unwrap().to_string();
        seen.push(event.clone());
        if event == "step" {
            break;
        }
        assert_ne!(event, "result", "the job finished before it could be interrupted");
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "rest of stdout:\n{rest}");
    let last: Value = serde_json::from_str(rest.lines().last().expect("an error line")).unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["code"], "CANCELLED");
    assert_eq!(last["job_id"], "ctrl-c-job");
    assert!(!out_png.exists());
    // The server stops the job: nothing runs any more, well before it could have finished.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = server.frisket(&["info", "--json"]);
        let info = &json_lines(&o)[0];
        if info["running_jobs"] == 0 && info["queued_jobs"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the job still runs after Ctrl-C: {info}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = server.frisket(&["cancel", "ctrl-c-job"]);
    assert_eq!(o.status.code(), Some(6), "the job should be gone");
}

/// The Grad-SAM flags (what the editor plugins drive): `--json --dump-dir --protect
/// --explain fast`. Every map and mask is written as .npy and .png and listed in the
/// manifest with step, timestep and token index; the JSON lines carry their paths, the
/// picked subjects and the summary; the image is byte for byte `frisket-server render`'s.
#[test]
fn explain_dump_json_and_render_identity() {
    let server = Server::start();
    let dir = scratch("explain");
    let dump = dir.join("dump");
    let out_png = dir.join("out.png");
    let mask_path = dir.join("protect.png");
    let mut mask = image::GrayImage::new(64, 48);
    for y in 10..30 {
        for x in 20..40 {
            mask.put_pixel(x, y, image::Luma([200]));
        }
    }
    mask.save(&mask_path).unwrap();
    let reference = frisket_e2e::reference_path("sd1");
    let common = [
        "--prompt",
        "a small yellow star at the top left",
        "--seed",
        "9",
        "--steps",
        "10",
        "--strength",
        "0.9",
        "--reference",
        s(&reference),
        "--protect",
        s(&mask_path),
        "--feather",
        "1",
        "--explain",
        "fast",
        "--subject",
        "star",
        "--subject-index",
        "3",
        "--manipulate-at",
        "780,520,320",
        "--explain-layers",
        "last",
        "--mask-threshold",
        "0.5",
    ];
    let o = server.frisket(
        &[&["generate", "--json", "--model", "sd1", "--dump-dir", s(&dump), "--out", s(&out_png)][..], &common]
            .concat(),
    );
    assert_ok(&o);
    let lines = json_lines(&o);
    let started = lines.iter().find(|l| l["event"] == "started").unwrap();
    let subjects: Vec<(u64, &str)> = started["subjects"]
        .as_array()
        .expect("subjects in started")
        .iter()
        .map(|t| (t["index"].as_u64().unwrap(), t["word"].as_str().unwrap()))
        .collect();
    assert_eq!(subjects, [(4, "star"), (3, "yellow")]);
    assert_eq!(started["subjects_auto"], false);
    let steps: Vec<u64> =
        started["manipulation_steps"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(steps.len(), 3);

    // Per manipulated step: heatmaps (star, then yellow) then the mask; the protected mask first.
    let artifacts: Vec<String> = lines
        .iter()
        .filter(|l| l["event"] == "mask" || l["event"] == "heatmap")
        .map(|l| match l["event"].as_str().unwrap() {
            "mask" => format!("{} {}", l["kind"].as_str().unwrap(), l["step"]),
            _ => format!("heatmap {} {}", l["step"], l["token_index"]),
        })
        .collect();
    let mut expected = vec!["protected 0".to_string()];
    for k in &steps {
        expected.extend([format!("heatmap {k} 4"), format!("heatmap {k} 3"), format!("manipulation {k}")]);
    }
    assert_eq!(artifacts, expected);
    for l in lines.iter().filter(|l| l["event"] == "mask" || l["event"] == "heatmap") {
        let png = PathBuf::from(l["path"].as_str().expect("png path"));
        let npy = PathBuf::from(l["npy"].as_str().expect("npy path"));
        assert!(png.starts_with(&dump) && npy.starts_with(&dump), "{l}");
        let img = image::open(&png).unwrap();
        assert_eq!((img.width(), img.height()), (64, 48), "{l}");
        let (shape, values) = read_npy(&npy);
        assert_eq!(shape, shape_of(&l["shape"]));
        assert!(values.iter().all(|v| v.is_finite()));
        match l["kind"].as_str() {
            Some("protected") => assert_eq!(shape, vec![1, 12, 16]),
            Some(_) => {
                assert_eq!(shape, vec![4, 12, 16]);
                assert!(values.iter().all(|&v| v == 0.0 || v == 1.0));
                assert!(l["reference_fraction"].is_number());
            }
            None => {
                assert_eq!(shape, vec![4, 12, 16]);
                let mask = image::open(l["subject_mask"].as_str().expect("subject mask path")).unwrap().to_luma8();
                assert_eq!(mask.dimensions(), (64, 48), "{l}");
                assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255), "{l}");
            }
        }
    }
    let result = lines.last().unwrap();
    assert_eq!(result["event"], "result");
    assert_eq!(result["psnr_protected"], "inf");
    assert!(result["psnr_outside"].is_number());
    assert_eq!(result["reference_fraction_per_step"].as_array().unwrap().len(), 3);
    assert_eq!(result["change_map"], dump.join("change_map.png").display().to_string());
    let (cm_shape, cm) = read_npy(Path::new(result["change_map_npy"].as_str().unwrap()));
    assert_eq!(cm_shape, vec![48, 64]);
    assert!(cm.iter().all(|v| (0.0..=1.0).contains(v)));

    // The manifest lists the same artifacts with step, timestep and token index.
    let manifest: Value = serde_json::from_slice(&std::fs::read(dump.join("manifest.json")).unwrap()).unwrap();
    let entries = manifest.as_array().unwrap();
    let listed: Vec<String> = entries
        .iter()
        .filter(|e| ["mask", "protected_mask", "heatmap"].contains(&e["kind"].as_str().unwrap()))
        .map(|e| match e["kind"].as_str().unwrap() {
            "protected_mask" => format!("protected {}", e["step"]),
            "mask" => format!("manipulation {}", e["step"]),
            _ => format!("heatmap {} {}", e["step"], e["token_index"]),
        })
        .collect();
    assert_eq!(listed, expected);
    let timesteps = started["timesteps"].as_array().unwrap();
    for e in entries.iter().filter(|e| e["kind"] != "result" && e["kind"] != "change_map") {
        let step = e["step"].as_u64().unwrap() as usize;
        assert_eq!(e["timestep"], timesteps[step], "{e}");
        assert!(dump.join(e["path"].as_str().unwrap()).is_file(), "{e}");
        if e["kind"] == "subject_mask" {
            assert!(e.get("npy").is_none(), "{e}");
        } else {
            assert!(dump.join(e["npy"].as_str().unwrap()).is_file(), "{e}");
        }
        if e["kind"] == "heatmap" {
            assert!(e["token"].as_str().unwrap().ends_with("</w>"), "{e}");
        }
    }
    // Each heatmap is followed by its subject mask (same step and token).
    for pair in entries.windows(2).filter(|p| p[0]["kind"] == "heatmap") {
        assert_eq!(pair[1]["kind"], "subject_mask", "{}", pair[0]);
        assert_eq!((&pair[1]["step"], &pair[1]["token_index"]), (&pair[0]["step"], &pair[0]["token_index"]));
    }
    let change = entries.iter().find(|e| e["kind"] == "change_map").expect("the change map is listed");
    assert_eq!(change["npy"], "change_map.npy");

    // Byte for byte what `frisket-server render` writes for the same flags.
    let theirs = dir.join("render.png");
    let r = Command::new(server_binary())
        .args(["render", "--model", s(&models_dir().join("sd1")), "--out", s(&theirs), "--quiet"])
        .args(common)
        .output()
        .unwrap();
    assert_ok(&r);
    assert!(std::fs::read(&out_png).unwrap() == std::fs::read(&theirs).unwrap(), "PNGs differ");

    // Grad-SAM options with --explain off: a usage error, as render's.
    let o = server.frisket(&[
        "generate",
        "--model",
        "sd1",
        "--prompt",
        "x",
        "--reference",
        s(&reference),
        "--explain",
        "off",
        "--subject",
        "x",
        "--out",
        s(&out_png),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(one_line_error(&o).contains("--explain off"));
    // A bad token index: INVALID_ARGUMENT from the server, exit 1.
    let o = server.frisket(&[
        "generate",
        "--model",
        "sd1",
        "--prompt",
        "a star",
        "--reference",
        s(&reference),
        "--subject-index",
        "90",
        "--out",
        s(&dir.join("x.png")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).starts_with("error: INVALID_ARGUMENT: subject token index 90"));
}

/// `--preset paper` is render's preset (DDPM, 50 steps, CFG 8, strength 0.9, 780/520/320,
/// last layer, k = 0.5, noise start, fast Grad-SAM): the same PNG, 45 steps, 3 manipulations.
#[test]
fn paper_preset_matches_render() {
    let server = Server::start();
    let dir = scratch("paper");
    let ours = dir.join("client.png");
    let theirs = dir.join("render.png");
    let reference = frisket_e2e::reference_path("sd1");
    let common = [
        "--prompt",
        "a small yellow star at the top left",
        "--seed",
        "4",
        "--reference",
        s(&reference),
        "--preset",
        "paper",
    ];
    let o = server.frisket(&[&["generate", "--json", "--model", "sd1", "--out", s(&ours)][..], &common].concat());
    assert_ok(&o);
    let lines = json_lines(&o);
    let started = lines.iter().find(|l| l["event"] == "started").unwrap();
    assert_eq!(started["total_steps"], 45);
    assert_eq!(started["manipulation_steps"].as_array().unwrap().len(), 3);
    assert_eq!(started["subjects_auto"], true);
    let result = lines.last().unwrap();
    assert_eq!((result["settings"]["steps"].as_u64(), result["settings"]["guidance"].as_f64()), (Some(50), Some(8.0)));
    assert_eq!(result["settings"]["strength"], 0.9);
    assert_eq!(result["settings"]["scheduler"], "ddpm");
    assert_eq!(lines.iter().filter(|l| l["event"] == "mask").count(), 3);
    let r = Command::new(server_binary())
        .args(["render", "--model", s(&models_dir().join("sd1")), "--out", s(&theirs), "--quiet"])
        .args(common)
        .output()
        .unwrap();
    assert_ok(&r);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(), "PNGs differ");
}

/// `serve --config` reports the file's limits (a flag overrides one), and `frisket generate`
/// refuses a request over a limit before sending it, with the message the server gives: the
/// server never sees the job (its log has no trace of the job id) unless `--no-limit-check`
/// sends it anyway, and then the server refuses it with the same message.
#[test]
fn limits_from_a_config_file_are_checked_before_sending() {
    let dir = scratch("limits");
    let config = dir.join("frisket.toml");
    std::fs::write(&config, "[limits]\nmax_side = 128\nmax_steps = 30\nmax_work = 50000\n").unwrap();
    let server = Server::start_with(&["--config", s(&config), "--max-steps", "40"]);
    let o = server.frisket(&["info", "--json"]);
    assert_ok(&o);
    let info = &json_lines(&o)[0];
    assert_eq!(
        (info["max_side"].as_u64(), info["max_steps"].as_u64(), info["max_work"].as_u64()),
        (Some(128), Some(40), Some(50_000)),
        "{info}"
    );
    assert_eq!(info["max_pixels"].as_u64(), Some(2048 * 2048), "unset keys keep their defaults");

    let out_png = dir.join("o.png");
    let generate = |job_id: &str, extra: &[&str]| {
        let args = [
            &["generate", "--json", "--model", "sd1", "--prompt", "a yellow star", "--job-id", job_id][..],
            &["--out", s(&out_png)],
            extra,
        ]
        .concat();
        server.frisket(&args)
    };
    let error_line = |o: &Output| -> Value {
        let lines = json_lines(o);
        let last = lines.last().cloned().unwrap_or_default();
        assert_eq!(last["event"], "error", "{lines:?}");
        last
    };

    // Over max_side: refused locally, in the JSON error shape the plugins parse.
    let o = generate("over-side-local", &["--steps", "2", "--width", "192", "--height", "64"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let local = error_line(&o);
    assert_eq!((local["code"].as_str(), local["exit_code"].as_u64()), (Some("INVALID_ARGUMENT"), Some(1)));
    let message = local["message"].as_str().unwrap().to_string();
    assert!(message.contains("192×64") && message.contains("max_side"), "{message}");
    // Over max_steps (the flag's 40, not the file's 30).
    let o = generate("over-steps-local", &["--steps", "41", "--width", "64", "--height", "64"]);
    let steps = error_line(&o)["message"].as_str().unwrap().to_string();
    assert!(steps.contains("steps 41") && steps.contains("max_steps"), "{steps}");
    // Over the work budget: sd1's latent factor (4, from ListModels) makes 128² 1,024
    // positions, × 2 rows (guidance) × 40 steps.
    let o = generate("over-work-local", &["--width", "128", "--height", "128", "--steps", "40"]);
    let work = error_line(&o)["message"].as_str().unwrap().to_string();
    assert!(work.contains("81920 work units") && work.contains("limit of 50000 (max_work)"), "{work}");
    assert!(!out_png.exists());

    // Sent anyway: the server gives the same refusal.
    let o = generate("over-side-sent", &["--steps", "2", "--width", "192", "--height", "64", "--no-limit-check"]);
    assert_eq!(error_line(&o)["message"].as_str(), Some(message.as_str()));
    // Within the limits the job runs.
    let o = generate("within-limits", &["--steps", "2", "--width", "64", "--height", "64"]);
    assert_ok(&o);
    assert!(out_png.exists());

    let log = server.0.logs();
    for local in ["over-side-local", "over-steps-local", "over-work-local"] {
        assert!(!log.contains(local), "the server saw {local}:\n{log}");
    }
    assert!(log.lines().any(|l| l.contains("over-side-sent") && l.contains("request refused")), "{log}");
    assert!(log.lines().any(|l| l.contains("within-limits") && l.contains("job queued")), "{log}");
}

/// `generate --detach` killed mid-job (SIGKILL: no cancel is sent), `watch` re-attaches
/// and saves the image, `result` fetches the same bytes, an unknown id is NOT_FOUND (exit
/// 1); `--num-images 2` writes o.png and o-1.png with seeds S and S + 1, and detached,
/// `result` and `watch` save both images.
#[test]
fn detach_watch_result_and_num_images() {
    let server = Server::start();
    let dir = scratch("detach");
    let (gone_png, watched_png, kept_png) = (dir.join("gone.png"), dir.join("w.png"), dir.join("r.png"));
    let mut child = frisket_cmd()
        .args(["generate", "--json", "--model", "sd1", "--prompt", "x", "--width", "64", "--height", "48"])
        .args(["--steps", "60", "--seed", "3", "--job-id", "cli-detached", "--detach", "--out", s(&gone_png)])
        .args(["--server", &server.url()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "stream ended early");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_ne!(v["event"], "result", "the job finished before the client was killed");
        if v["event"] == "step" {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let o = server.frisket(&["watch", "cli-detached", "--out", s(&watched_png), "--json"]);
    assert_ok(&o);
    let last = json_lines(&o).pop().unwrap();
    assert_eq!(last["event"], "result");
    assert_eq!(last["seed"], 3);
    let o = server.frisket(&["result", "cli-detached", "--out", s(&kept_png)]);
    assert_ok(&o);
    assert!(!gone_png.exists());
    assert_eq!(std::fs::read(&watched_png).unwrap(), std::fs::read(&kept_png).unwrap());
    let o = server.frisket(&["result", "no-such-job", "--out", s(&kept_png)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(one_line_error(&o).contains("NOT_FOUND"), "{}", stderr(&o));

    let many = dir.join("o.png");
    // Two images of one request, seed 9 and 10, as they come and detached.
    let two_images = ["generate", "--model", "sd1", "--prompt", "x", "--width", "64", "--height", "48", "--steps", "3"];
    let two_images = [&two_images[..], &["--seed", "9", "--num-images", "2"]].concat();
    let o = server.frisket(&two_images);
    assert_eq!(o.status.code(), Some(2), "--out is required");
    let o = server.frisket(&[&two_images[..], &["--json", "--out", s(&many)]].concat());
    assert_ok(&o);
    let results: Vec<Value> = json_lines(&o).into_iter().filter(|l| l["event"] == "result").collect();
    let mut seeds: Vec<(u64, u64)> =
        results.iter().map(|r| (r["image_index"].as_u64().unwrap(), r["seed"].as_u64().unwrap())).collect();
    seeds.sort();
    assert_eq!(seeds, [(0, 9), (1, 10)]);
    assert!(many.is_file() && dir.join("o-1.png").is_file());
    assert_ne!(std::fs::read(&many).unwrap(), std::fs::read(dir.join("o-1.png")).unwrap());

    let (d, r, w) = (dir.join("d.png"), dir.join("r.png"), dir.join("w.png"));
    let detached = ["--detach", "--job-id", "cli-detached-2", "--out", s(&d)];
    assert_ok(&server.frisket(&[&two_images[..], &detached].concat()));
    let o = server.frisket(&["result", "cli-detached-2", "--out", s(&r), "--json"]);
    assert_ok(&o);
    let saved: Vec<(u64, u64)> =
        json_lines(&o).iter().map(|l| (l["image_index"].as_u64().unwrap(), l["seed"].as_u64().unwrap())).collect();
    assert_eq!(saved, [(0, 9), (1, 10)]);
    assert_ok(&server.frisket(&["watch", "cli-detached-2", "--out", s(&w)]));
    for (a, b) in [("d.png", "r.png"), ("d-1.png", "r-1.png"), ("d.png", "w.png"), ("d-1.png", "w-1.png")] {
        assert_eq!(std::fs::read(dir.join(a)).unwrap(), std::fs::read(dir.join(b)).unwrap(), "{a} vs {b}");
    }
}
