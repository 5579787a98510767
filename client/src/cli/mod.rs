//! The `frisket` subcommands.
mod generate;
mod json;

use crate::{Cli, Command};
use frisket::{Client, Error, HealthStatus};
use serde_json::json;

/// Exit codes, one per failure class (documented in client/README.md).
pub mod exit {
    pub const OK: i32 = 0;
    /// The server answered with a gRPC error status.
    pub const SERVER: i32 = 1;
    /// Bad flags, an unreadable or undecodable input file, an invalid URL.
    pub const USAGE: i32 = 2;
    /// Nothing answered at the server's address.
    pub const UNREACHABLE: i32 = 3;
    /// An output file or the dump folder could not be written.
    pub const IO: i32 = 4;
    /// The server's stream broke the protocol.
    pub const PROTOCOL: i32 = 5;
    /// The server answered "no": health not serving, cancel found no such job.
    pub const NEGATIVE: i32 = 6;
    /// Interrupted by Ctrl-C (SIGINT); the job was cancelled.
    pub const INTERRUPTED: i32 = 130;
}

/// A failed command: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    /// Upper-case code: a gRPC code name, or USAGE / INVALID_INPUT / IO / PROTOCOL.
    pub code: String,
    pub message: String,
    pub exit: i32,
    pub job_id: Option<String>,
}

impl Failure {
    pub fn usage(message: String) -> Self {
        Failure { code: "USAGE".into(), message, exit: exit::USAGE, job_id: None }
    }

    /// `error: CODE: message` on stderr; with `json` also the final error line on stdout.
    pub fn report(&self, json: bool) {
        let one_line = self.message.replace(['\n', '\r'], " ");
        eprintln!("error: {}: {}", self.code, one_line.trim());
        if json {
            let mut line = json::Line::new().with("event", json!("error"));
            if let Some(id) = &self.job_id {
                line.put("job_id", json!(id));
            }
            line.with("code", json!(self.code))
                .with("message", json!(self.message))
                .with("exit_code", json!(self.exit))
                .emit();
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let exit = match &e {
            Error::Status { .. } => exit::SERVER,
            Error::Connect { .. } => exit::UNREACHABLE,
            Error::InvalidInput(_) => exit::USAGE,
            Error::Io { .. } => exit::IO,
            Error::Protocol(_) => exit::PROTOCOL,
        };
        Failure { code: e.code_name().to_string(), message: e.message(), exit, job_id: None }
    }
}

pub async fn run(cli: Cli) -> Result<i32, Failure> {
    let Cli { server, json, command } = cli;
    match command {
        Command::Generate(args) => generate::run(&server, *args, json).await,
        Command::Models => models(&Client::connect(&server).await?, json).await,
        Command::Tokenize { prompt, model } => tokenize(&Client::connect(&server).await?, &model, &prompt, json).await,
        Command::Health { service } => health(&Client::connect(&server).await?, &service, json).await,
        Command::Info => info(&Client::connect(&server).await?, json).await,
        Command::Cancel { job_id } => cancel(&Client::connect(&server).await?, &job_id, json).await,
        Command::Watch { job_id, out } => generate::watch(&server, &job_id, &out, json).await,
        Command::Result { job_id, out } => result(&Client::connect(&server).await?, &job_id, &out, json).await,
        Command::Load { model } => load(&Client::connect(&server).await?, &model, json).await,
        Command::Unload { model } => unload(&Client::connect(&server).await?, &model, json).await,
    }
}

async fn models(client: &Client, as_json: bool) -> Result<i32, Failure> {
    let models = client.list_models().await?;
    if as_json {
        let list: Vec<_> = models
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "architecture": m.architecture,
                    "native_width": m.native_width,
                    "native_height": m.native_height,
                    "size_multiple": m.size_multiple,
                    "prediction_type": m.prediction_type,
                    "schedulers": m.schedulers,
                    "img2img": m.img2img,
                    "explain": m.explain,
                    "protected_regions": m.protected_regions,
                    "format": m.format,
                    "error": m.error,
                    "loras": m.loras,
                    "state": state_name(m),
                    "devices": m.devices,
                })
            })
            .collect();
        json::Line::new().with("models", json!(list)).emit();
        return Ok(exit::OK);
    }
    let mut rows = vec![["NAME", "STATE", "ARCH", "NATIVE", "MULTIPLE", "PREDICTION", "SCHEDULERS", "FEATURES"]
        .map(String::from)
        .to_vec()];
    for m in models.iter().filter(|m| !m.error.is_empty()) {
        eprintln!("{}: unusable: {}", m.name, m.error);
    }
    for m in models.iter().filter(|m| m.error.is_empty()) {
        let features: Vec<&str> = [(m.img2img, "img2img"), (m.explain, "explain"), (m.protected_regions, "protect")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        rows.push(vec![
            m.name.clone(),
            state_name(m),
            m.architecture.clone(),
            format!("{}x{}", m.native_width, m.native_height),
            m.size_multiple.to_string(),
            m.prediction_type.clone(),
            m.schedulers.join(","),
            features.join(","),
        ]);
    }
    print_table(&rows);
    Ok(exit::OK)
}

async fn tokenize(client: &Client, model: &str, prompt: &str, as_json: bool) -> Result<i32, Failure> {
    let resp = client.tokenize(model, prompt).await?;
    if as_json {
        let tokens: Vec<_> = resp
            .tokens
            .iter()
            .map(|t| json!({"index": t.index, "id": t.id, "text": t.text, "word": t.word, "word_index": t.word_index}))
            .collect();
        json::Line::new().with("tokens", json!(tokens)).with("truncated", json!(resp.truncated)).emit();
        return Ok(exit::OK);
    }
    let mut rows = vec![["INDEX", "ID", "TOKEN", "WORD"].map(String::from).to_vec()];
    for t in &resp.tokens {
        let word = match t.word_index {
            Some(i) => format!("{} (#{i})", t.word),
            None => t.word.clone(),
        };
        rows.push(vec![t.index.to_string(), t.id.to_string(), t.text.clone(), word]);
    }
    print_table(&rows);
    if resp.truncated {
        eprintln!("note: the prompt was truncated to {} tokens", resp.tokens.len());
    }
    Ok(exit::OK)
}

async fn health(client: &Client, service: &str, as_json: bool) -> Result<i32, Failure> {
    let status = client.health(service).await?;
    if as_json {
        json::Line::new().with("service", json!(service)).with("status", json!(status.name())).emit();
    } else {
        println!("{}", status.name());
    }
    Ok(if status == HealthStatus::Serving { exit::OK } else { exit::NEGATIVE })
}

async fn info(client: &Client, as_json: bool) -> Result<i32, Failure> {
    let i = client.server_info().await?;
    if as_json {
        json::Line::new()
            .with("version", json!(i.version))
            .with("device", json!(i.device))
            .with("devices", json!(i.devices))
            .with("queue_capacity", json!(i.queue_capacity))
            .with("queued_jobs", json!(i.queued_jobs))
            .with("running_jobs", json!(i.running_jobs))
            .with("max_steps", json!(i.max_steps))
            .with("max_pixels", json!(i.max_pixels))
            .with("max_side", json!(i.max_side))
            .with("max_message_bytes", json!(i.max_message_bytes))
            .with("max_work", json!(i.max_work))
            .with("max_loras", json!(i.max_loras))
            .with("max_images", json!(i.max_images))
            .with("max_prompt_bytes", json!(i.max_prompt_bytes))
            .with("max_jobs_per_connection", json!(i.max_jobs_per_connection))
            .with("stalled_client_seconds", json!(i.stalled_client_seconds))
            .emit();
        return Ok(exit::OK);
    }
    let rows = vec![
        vec!["version".to_string(), i.version.clone()],
        vec!["device".to_string(), i.device.clone()],
        vec!["devices".to_string(), i.devices.join(", ")],
        vec![
            "queue".to_string(),
            format!("{} queued, {} running, capacity {}", i.queued_jobs, i.running_jobs, i.queue_capacity),
        ],
        vec!["max steps".to_string(), i.max_steps.to_string()],
        vec!["max pixels".to_string(), i.max_pixels.to_string()],
        vec!["max side".to_string(), i.max_side.to_string()],
        vec!["max message bytes".to_string(), i.max_message_bytes.to_string()],
        vec!["max work units".to_string(), i.max_work.to_string()],
        vec!["max LoRAs".to_string(), i.max_loras.to_string()],
        vec!["max images".to_string(), i.max_images.to_string()],
        vec!["max prompt bytes".to_string(), i.max_prompt_bytes.to_string()],
        vec!["max jobs per connection".to_string(), i.max_jobs_per_connection.to_string()],
        vec!["stalled client seconds".to_string(), i.stalled_client_seconds.to_string()],
    ];
    print_table(&rows);
    Ok(exit::OK)
}

async fn cancel(client: &Client, job_id: &str, as_json: bool) -> Result<i32, Failure> {
    let found = client.cancel(job_id).await?;
    if as_json {
        json::Line::new().with("job_id", json!(job_id)).with("found", json!(found)).emit();
    } else if found {
        println!("cancelled {job_id}");
    } else {
        println!("no queued or running job {job_id}");
    }
    Ok(if found { exit::OK } else { exit::NEGATIVE })
}

/// Saves every image of a detached job: image 0, 1, … until the server answers
/// OUT_OF_RANGE (past the job's num_images).
async fn result(client: &Client, job_id: &str, out: &std::path::Path, as_json: bool) -> Result<i32, Failure> {
    for index in 0.. {
        let result = match client.get_result(job_id, index).await {
            Ok(result) => result,
            Err(e) if index > 0 && e.code() == Some(tonic::Code::OutOfRange) => break,
            Err(e) => return Err(e.into()),
        };
        let path = generate::image_path(out, index, u32::MAX);
        generate::write_file(&path, &result.image)?;
        if as_json {
            json::Line::new()
                .with("job_id", json!(job_id))
                .with("image_index", json!(index))
                .with("out", json::path(&path))
                .with("seed", json!(result.seed))
                .emit();
        } else {
            println!("saved {} (seed {})", path.display(), result.seed);
        }
    }
    Ok(exit::OK)
}

async fn load(client: &Client, model: &str, as_json: bool) -> Result<i32, Failure> {
    let loaded = client.load_model(model).await?;
    if as_json {
        json::Line::new()
            .with("model", json!(model))
            .with("devices", json!(loaded.devices))
            .with("load_seconds", json!(loaded.load_seconds))
            .emit();
    } else if loaded.load_seconds > 0.0 {
        println!("loaded {model} on {} in {:.2} s", loaded.devices.join(","), loaded.load_seconds);
    } else {
        println!("{model} was already loaded on {}", loaded.devices.join(","));
    }
    Ok(exit::OK)
}

async fn unload(client: &Client, model: &str, as_json: bool) -> Result<i32, Failure> {
    let was_loaded = client.unload_model(model).await?;
    if as_json {
        json::Line::new().with("model", json!(model)).with("was_loaded", json!(was_loaded)).emit();
    } else if was_loaded {
        println!("unloaded {model}");
    } else {
        println!("{model} was not loaded");
    }
    Ok(exit::OK)
}

/// A model's state as the CLI shows it: on-disk, loading, loaded (devices), failed.
fn state_name(m: &frisket::proto::v1::ModelInfo) -> String {
    use frisket::proto::v1::ModelState;
    match ModelState::try_from(m.state) {
        Ok(ModelState::OnDisk) => "on-disk".into(),
        Ok(ModelState::Loading) => "loading".into(),
        Ok(ModelState::Loaded) => format!("loaded ({})", m.devices.join(",")),
        Ok(ModelState::Failed) => "failed".into(),
        Err(_) => "unknown".into(),
    }
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}
