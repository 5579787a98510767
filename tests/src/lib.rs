//! Helpers for the end-to-end tests: a real `frisket-server serve` on a free loopback
//! port with the fixture models, raw gRPC clients for it, and request/stream helpers.
//!
//! ```no_run
//! # async fn demo() {
//! let server = frisket_e2e::Server::start(&[]).await; // healthy when this returns
//! let mut client = server.client().await;
//! # }
//! ```
use frisket_proto::v1 as pb;
use frisket_proto::v1::frisket_client::FrisketClient;
use frisket_proto::v1::generate_event::Event;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

mod scrape;
pub use scrape::{metrics_url, scrape, Sample, Scrape};

/// Largest message either way; the server's limit too.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `$FRISKET_FIXTURES`, else `target/fixtures` (written by `make fixtures`).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("FRISKET_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target/fixtures"),
    }
}

/// The fixture models folder (sd1/, sd2/); panics with a hint when it is missing.
pub fn models_dir() -> PathBuf {
    let dir = fixtures_dir().join("models");
    assert!(
        dir.join("sd1/unet/config.json").is_file(),
        "fixture models not found in {} (run `make fixtures`, or set FRISKET_FIXTURES)",
        dir.display()
    );
    dir
}

/// The `frisket-server` binary of the profile these tests were built with, unless
/// `$FRISKET_SERVER_BIN` names one.
pub fn server_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_binary("frisket-server", "FRISKET_SERVER_BIN")).clone()
}

/// A binary of the workspace, of the profile these tests were built with: `$ENV_VAR` if it
/// names one, else (re)built with `cargo build --workspace --bin NAME` so it is never stale
/// (the workspace's features, so it reuses what `cargo test --workspace` built). Callers
/// keep the path in a `OnceLock` to build once per test process.
pub fn workspace_binary(name: &str, env_var: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(env_var) {
        return PathBuf::from(bin);
    }
    // The test executable is target/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps").to_path_buf();
    let bin = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(workspace_root()).args(["build", "--workspace", "--bin", name]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    match build.status() {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("building {name} failed ({s}); build it with `cargo build --workspace --bin {name}`"),
        Err(e) if bin.is_file() => eprintln!("could not run cargo ({e}); using the existing {}", bin.display()),
        Err(e) => panic!("cannot run cargo to build {name} ({e}) and {} is missing", bin.display()),
    }
    assert!(bin.is_file(), "{} is missing after the build", bin.display());
    bin
}

/// Runs `frisket-server render ARGS`.
pub fn render(args: &[&str]) -> Output {
    Command::new(server_binary()).arg("render").args(args).output().expect("running frisket-server render")
}

/// A `frisket-server serve` child process; killed on drop (its log is printed when the
/// test failed).
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    exit: Option<ExitStatus>,
}

impl Server {
    /// Starts `serve --models <fixtures> --listen 127.0.0.1:0 --device cpu EXTRA…` (no
    /// `--device cpu` when EXTRA names a device) and
    /// returns once it listens and its health check answers SERVING.
    pub async fn start(extra: &[&str]) -> Server {
        Self::start_on(&models_dir(), extra).await
    }

    /// As `start`, serving the model folders under `models` (the repo's `models/` for the
    /// shipped, trained model).
    pub async fn start_on(models: &Path, extra: &[&str]) -> Server {
        let server = Self::start_listening(models, extra).await;
        server.wait_healthy().await;
        server
    }

    /// As `start_on`, returning once the server listens, whatever its health says (it is
    /// NOT_SERVING while `--preload` models load).
    pub async fn start_listening(models: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(server_binary())
            .arg("serve")
            .arg("--models")
            .arg(models)
            .args(["--listen", "127.0.0.1:0"])
            .args(if extra.contains(&"--device") { &[][..] } else { &["--device", "cpu"][..] })
            .args(extra)
            .env("RUST_LOG", std::env::var("FRISKET_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting frisket-server serve");
        let log = Arc::new(Mutex::new(String::new()));
        let echo = std::env::var_os("FRISKET_TEST_ECHO").is_some();
        {
            let log = log.clone();
            let stderr = child.stderr.take().unwrap();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[server] {line}");
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let stdout = child.stdout.take().unwrap();
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(addr) = line.strip_prefix("frisket-server listening on ") {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(addr.trim().to_string());
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str("[stdout] ");
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let addr = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(addr)) => addr.parse().expect("listening address"),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!("frisket-server did not print its listening line; log:\n{}", log.lock().unwrap());
            }
        };
        Server { child, addr, log, exit: None }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A new HTTP/2 connection.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url()).unwrap().connect().await.expect("connecting to frisket-server")
    }

    /// A Frisket client on a new connection, with 64 MiB message limits.
    pub async fn client(&self) -> FrisketClient<Channel> {
        FrisketClient::new(self.channel().await)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(usize::MAX)
    }

    pub async fn health(&self, service: &str) -> Result<i32, tonic::Status> {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        let req = tonic_health::pb::HealthCheckRequest { service: service.into() };
        Ok(health.check(req).await?.into_inner().status)
    }

    /// The process's resident memory in bytes (VmRSS of /proc/PID/status).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("reading /proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("a VmRSS line");
        kib * 1024
    }

    /// Waits (up to 60 s) until the overall health is SERVING.
    pub async fn wait_healthy(&self) {
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        let start = Instant::now();
        loop {
            if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(5), self.health("")).await {
                if status == serving {
                    return;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(60), "server not healthy after 60 s; log:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Everything the server wrote to stderr (and stdout) so far.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to 120 s) until the log has a line with all of `words` (the server logs a
    /// job's end after its last message goes out), then returns the log.
    pub async fn wait_for_log(&self, words: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let logs = self.logs();
            if logs.lines().any(|l| words.iter().all(|w| l.contains(w))) {
                return logs;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no log line with {words:?}:\n{logs}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a signal, e.g. "TERM" or "INT".
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status().expect("running kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exit {
                return Some(status);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exit.is_none() && !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- frisket-server log ({}) ----\n{}", self.addr, self.logs());
        }
    }
}

/// A txt2img request on a fixture model.
/// Copies a folder tree (a fixture model to change in a test).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn txt2img(model: &str, prompt: &str, seed: u64, steps: u32, width: u32, height: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: model.into(),
        prompt: prompt.into(),
        seed: Some(seed),
        steps: Some(steps),
        width,
        height,
        ..Default::default()
    }
}

/// What a Generate stream delivered: its events, and the status it ended with (None: OK).
#[derive(Debug, Default)]
pub struct Collected {
    pub events: Vec<Event>,
    pub error: Option<tonic::Status>,
}

impl Collected {
    pub fn steps(&self) -> Vec<&pb::Step> {
        self.events.iter().filter_map(|e| if let Event::Step(s) = e { Some(s) } else { None }).collect()
    }
    pub fn previews(&self) -> Vec<&pb::Preview> {
        self.events.iter().filter_map(|e| if let Event::Preview(p) = e { Some(p) } else { None }).collect()
    }
    pub fn latents(&self) -> Vec<&pb::Latent> {
        self.events.iter().filter_map(|e| if let Event::Latent(l) = e { Some(l) } else { None }).collect()
    }
    pub fn started(&self) -> Option<&pb::Started> {
        self.events.iter().find_map(|e| if let Event::Started(s) = e { Some(s) } else { None })
    }
    pub fn masks(&self) -> Vec<&pb::Mask> {
        self.events.iter().filter_map(|e| if let Event::Mask(m) = e { Some(m) } else { None }).collect()
    }
    pub fn heatmaps(&self) -> Vec<&pb::Heatmap> {
        self.events.iter().filter_map(|e| if let Event::Heatmap(h) = e { Some(h) } else { None }).collect()
    }
    pub fn result(&self) -> Option<&pb::Result> {
        self.events.iter().find_map(|e| if let Event::Result(r) = e { Some(r) } else { None })
    }
    /// The code the job ended with (Ok for a normal end).
    pub fn code(&self) -> tonic::Code {
        self.error.as_ref().map_or(tonic::Code::Ok, |s| s.code())
    }
}

/// Runs Generate to its end. A refusal before the stream starts is returned as `error`.
pub async fn generate(
    client: &mut FrisketClient<Channel>,
    req: impl tonic::IntoRequest<pb::GenerateRequest>,
) -> Collected {
    match client.generate(req).await {
        Ok(resp) => collect(resp.into_inner()).await,
        Err(status) => Collected { events: Vec::new(), error: Some(status) },
    }
}

/// Reads a stream to its end.
pub async fn collect(mut stream: tonic::Streaming<pb::GenerateEvent>) -> Collected {
    let mut out = Collected::default();
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => out.events.push(ev.event.expect("event without a body")),
            Err(status) => {
                out.error = Some(status);
                break;
            }
        }
    }
    out
}

/// Reads events until `pred` matches one (returned), panicking on error or end of stream.
pub async fn next_matching(
    stream: &mut tonic::Streaming<pb::GenerateEvent>,
    mut pred: impl FnMut(&Event) -> bool,
) -> Event {
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(ev))) => {
                let ev = ev.event.expect("event without a body");
                if pred(&ev) {
                    return ev;
                }
            }
            Ok(Some(Err(status))) => panic!("stream ended with {status:?} before the awaited event"),
            Ok(None) => panic!("stream ended before the awaited event"),
            Err(_) => panic!("no awaited event within 60 s"),
        }
    }
}

/// An RGB PNG of the given size with a simple pattern.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8]));
    encode_png(&image::DynamicImage::ImageRgb8(img))
}

/// An 8-bit grey PNG of the given size.
pub fn grey_png(width: u32, height: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(width, height, |x, _| image::Luma([if x < width / 2 { 255 } else { 0 }]));
    encode_png(&image::DynamicImage::ImageLuma8(img))
}

/// An 8-bit grey mask PNG: 255 where `protected(x, y)`, else 0.
pub fn mask_png(width: u32, height: u32, protected: impl Fn(u32, u32) -> bool) -> Vec<u8> {
    let img = image::GrayImage::from_fn(width, height, |x, y| image::Luma([if protected(x, y) { 255 } else { 0 }]));
    encode_png(&image::DynamicImage::ImageLuma8(img))
}

/// The fixture's img2img reference for a model (`ref/pipeline/reference_<model>.png`:
/// sd1 64×48, sd2 32×24).
pub fn reference_path(model: &str) -> PathBuf {
    let path = fixtures_dir().join(format!("ref/pipeline/reference_{model}.png"));
    assert!(path.is_file(), "{} is missing (run `make fixtures`)", path.display());
    path
}

/// A raw float32 tensor's values (checks dtype and size against the shape).
pub fn tensor_values(t: &pb::Tensor) -> Vec<f32> {
    assert_eq!(t.dtype, "float32");
    let n: i64 = t.shape.iter().product();
    assert_eq!(t.data.len() as i64, 4 * n, "{:?} carries {} bytes", t.shape, t.data.len());
    t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn encode_png(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The server's stderr lines that mention `job_id`.
pub fn job_log_lines(logs: &str, job_id: &str) -> Vec<String> {
    let needle = format!("job_id={job_id}");
    logs.lines().filter(|l| l.contains(&needle)).map(str::to_string).collect()
}

/// One float32 tensor of a safetensors file, as values.
pub fn read_f32(path: &std::path::Path, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e} (run `make fixtures`)", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let entry = &header[key];
    assert_eq!(entry["dtype"], "F32");
    let (start, end) = (entry["data_offsets"][0].as_u64().unwrap(), entry["data_offsets"][1].as_u64().unwrap());
    bytes[8 + len + start as usize..8 + len + end as usize]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A gRPC length-prefixed message: flag 0 (not compressed), the length (big-endian), the bytes.
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// What a raw HTTP/2 call got back: the HTTP status, the gRPC status (from the headers of a
/// trailers-only response, else from the trailers; None when neither has one) and the
/// bytes of the response body.
#[derive(Debug)]
pub struct RawReply {
    pub http_status: u16,
    pub status: Option<tonic::Status>,
    pub body: Vec<u8>,
}

impl RawReply {
    pub fn code(&self) -> Option<tonic::Code> {
        self.status.as_ref().map(|s| s.code())
    }
}

/// One HTTP/2 request on a new connection, bytes as given: POST `path` with `content_type`
/// (none when empty), `te: trailers` and `headers`, then `body` as DATA, ending the stream
/// when `end`. Waits up to 60 s for the reply.
pub async fn raw_h2_call(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
    end: bool,
) -> Result<RawReply, h2::Error> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connecting to frisket-server");
    let (client, connection) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await?;
    let mut request =
        http::Request::builder().method("POST").uri(format!("http://{addr}{path}")).header("te", "trailers");
    if !content_type.is_empty() {
        request = request.header("content-type", content_type);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut send) = client.send_request(request.body(()).unwrap(), body.is_empty() && end)?;
    if !body.is_empty() {
        // The server may answer (and reset the stream) before it has read everything.
        let _ = send.send_data(bytes::Bytes::from(body), end);
    }
    let reply = tokio::time::timeout(Duration::from_secs(60), async {
        let response = response.await?;
        let http_status = response.status().as_u16();
        let (parts, mut recv) = response.into_parts();
        let mut body = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            body.extend_from_slice(&chunk);
        }
        let status = match tonic::Status::from_header_map(&parts.headers) {
            Some(status) => Some(status),
            None => recv.trailers().await?.and_then(|t| tonic::Status::from_header_map(&t)),
        };
        Ok::<_, h2::Error>(RawReply { http_status, status, body })
    })
    .await
    .expect("no reply within 60 s");
    drop(send);
    driver.abort();
    reply
}
