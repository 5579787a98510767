//! `frisket generate`: one job, streamed.
use super::{exit, json, Failure};
use crate::{ExplainArg, GenerateArgs, PresetArg, PreviewFormatArg, PreviewMethodArg, StartArg};
use frisket::dump::{Dumper, Written};
use frisket::proto::v1 as pb;
use frisket::request::{ImageFormat, PreviewMethod};
use frisket::{Client, Error, Event, GenerateRequestBuilder};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;
use tokio_stream::StreamExt;

pub async fn run(server: &str, args: GenerateArgs, as_json: bool) -> Result<i32, Failure> {
    // Listen for Ctrl-C from the start, so that it never kills us with a job running.
    let mut interrupt = Interrupt::new();
    let request = build_request(&args)?;
    let images = frisket::proto::defaults::num_images(&request);
    if images > 1 && args.dump_dir.is_some() {
        return Err(Failure::usage("--dump-dir takes one image (--num-images 1)".into()));
    }
    let client = tokio::select! {
        c = Client::connect(server) => c?,
        _ = interrupt.recv() => return Err(interrupted(None)),
    };
    let dumper = match &args.dump_dir {
        Some(dir) => Some(Dumper::create(dir)?),
        None => None,
    };
    let progress = Progress::new(!as_json && std::io::stderr().is_terminal());
    let job_id = args.job_id.clone();
    let stream = tokio::select! {
        s = async {
            if args.no_limit_check {
                client.generate_unchecked(request).await
            } else {
                client.generate(request).await
            }
        } => s?,
        _ = interrupt.recv() => return Err(interrupted(job_id)),
    };
    let following =
        Following { out: &args.out, images: Some(images), dumper, progress, as_json, cancel_on_interrupt: true };
    following.follow(&client, stream, job_id, &mut interrupt).await
}

/// `frisket watch`: re-attaches to a detached job and saves its image; Ctrl-C stops
/// watching and leaves the job running.
pub async fn watch(server: &str, job_id: &str, out: &Path, as_json: bool) -> Result<i32, Failure> {
    let mut interrupt = Interrupt::new();
    let client = tokio::select! {
        c = Client::connect(server) => c?,
        _ = interrupt.recv() => return Err(interrupted(None)),
    };
    let stream = client.watch_job(job_id).await?;
    let progress = Progress::new(!as_json && std::io::stderr().is_terminal());
    // The count comes with the first Started.
    let following = Following { out, images: None, dumper: None, progress, as_json, cancel_on_interrupt: false };
    following.follow(&client, stream, Some(job_id.to_string()), &mut interrupt).await
}

/// How a job's stream is read to its end: where the images go, what to dump and show,
/// and whether Ctrl-C cancels the job (generate) or only stops following it (watch).
struct Following<'a> {
    out: &'a Path,
    /// How many images the job makes; a watcher learns it from the first Started.
    images: Option<u32>,
    dumper: Option<Dumper>,
    progress: Progress,
    as_json: bool,
    cancel_on_interrupt: bool,
}

impl Following<'_> {
    async fn follow(
        self,
        client: &Client,
        mut stream: frisket::EventStream,
        mut job_id: Option<String>,
        interrupt: &mut Interrupt,
    ) -> Result<i32, Failure> {
        let Following { out: out_path, mut images, mut dumper, progress, as_json, cancel_on_interrupt } = self;
        let mut results = Vec::new();
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                _ = interrupt.recv() => {
                    progress.abandon("interrupted");
                    let id = job_id.clone().or_else(|| stream.job_id().map(String::from));
                    if !cancel_on_interrupt {
                        return Err(stopped_watching(id));
                    }
                    if let Some(id) = &id {
                        // Best effort: dropping the stream below cancels the job as well.
                        let _ = tokio::time::timeout(Duration::from_secs(2), client.cancel(id)).await;
                    }
                    drop(stream);
                    // Let the transport send the stream reset before the process exits.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    finish_dump(dumper.as_ref());
                    return Err(interrupted(id));
                }
            };
            let event = match item {
                Some(Ok(event)) => event,
                Some(Err(e)) => {
                    progress.abandon("failed");
                    finish_dump(dumper.as_ref());
                    let mut failure = Failure::from(e);
                    failure.job_id = job_id.or_else(|| stream.job_id().map(String::from));
                    return Err(failure);
                }
                None => break,
            };
            if job_id.is_none() && !event.job_id.is_empty() {
                job_id = Some(event.job_id.clone());
            }
            let written = match dumper.as_mut() {
                Some(d) => d.record(&event.event).map_err(|e| fail(e, &job_id))?,
                None => Written::default(),
            };
            if let (None, Event::Started(s)) = (images, &event.event) {
                images = Some(s.num_images);
            }
            let images = images.unwrap_or(1);
            let mut manifest = None;
            let out = image_path(out_path, event.image_index, images);
            if let Event::Result(r) = &event.event {
                write_file(&out, &r.image).map_err(|e| fail(e, &job_id))?;
                if let Some(d) = &dumper {
                    manifest = Some(d.finish().map_err(|e| fail(e, &job_id))?);
                }
            }
            if as_json {
                let mut line =
                    json::event_line(&event.event_job_id(&job_id), &event.event, &written, &out, manifest.as_deref());
                if images > 1 {
                    line.put("image_index", serde_json::json!(event.image_index));
                }
                line.emit();
            }
            if let Event::Result(r) = event.event {
                results.push((out, r));
                if results.len() == images as usize {
                    break;
                }
            } else if event.image_index == 0 {
                progress.update(&event.event);
            }
        }
        let Some((_, first)) = results.first() else {
            // The stream reports a missing result as an error; this is unreachable in practice.
            return Err(fail(Error::Protocol("the event stream ended without a result".into()), &job_id));
        };
        progress.finish(first);
        let dropped: u64 = results.iter().map(|(_, r)| r.dropped_events).sum();
        if !as_json && dropped > 0 {
            eprintln!(
                "note: {dropped} progress events (previews, latents, masks, heatmaps) were replaced by newer ones while \
                 this client was behind"
            );
        }
        if !as_json {
            for (out, _) in &results {
                println!("{}", out.display());
            }
        }
        Ok(exit::OK)
    }
}

/// Where image `index` of `images` goes: OUT itself for the first (and for one image),
/// OUT's stem with `-INDEX` for the others (out.png, out-1.png, out-2.png).
pub(super) fn image_path(out: &Path, index: u32, images: u32) -> std::path::PathBuf {
    if index == 0 || images <= 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match out.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    out.with_file_name(name)
}

trait EventJobId {
    fn event_job_id(&self, fallback: &Option<String>) -> String;
}

impl EventJobId for frisket::JobEvent {
    fn event_job_id(&self, fallback: &Option<String>) -> String {
        if self.job_id.is_empty() {
            fallback.clone().unwrap_or_default()
        } else {
            self.job_id.clone()
        }
    }
}

pub(crate) fn build_request(a: &GenerateArgs) -> Result<pb::GenerateRequest, Failure> {
    let mut b = GenerateRequestBuilder::new(&a.model, &a.prompt)
        .negative_prompt(&a.negative_prompt)
        .seed(a.seed)
        .steps(a.steps)
        .guidance(a.guidance)
        .scheduler(a.scheduler.clone().unwrap_or_default())
        .size(a.width.unwrap_or(0), a.height.unwrap_or(0))
        .strength(a.strength);
    if a.preset == Some(PresetArg::Paper) {
        b = b.preset("paper");
    }
    if let Some(path) = &a.reference {
        b = b.reference_file(path)?;
    }
    if let Some(path) = &a.protect {
        b = b.protect_file(path)?;
    }
    if let Some(every) = a.preview_every {
        let method = match a.preview_method {
            PreviewMethodArg::Approx => PreviewMethod::Approx,
            PreviewMethodArg::Vae => PreviewMethod::Vae,
        };
        let format = match a.preview_format {
            PreviewFormatArg::Png => ImageFormat::Png,
            PreviewFormatArg::Jpeg => ImageFormat::Jpeg,
        };
        b = b.previews(every, method, format, a.preview_max_size);
    }
    if let Some(every) = a.latents_every {
        b = b.latents(every);
    }
    if a.masks || a.heatmaps {
        b = b.explain_stream(a.masks, a.heatmaps);
    }
    if let Some(options) = explain_options(a)? {
        b = b.explain(options);
    }
    for lora in &a.loras {
        b = b.lora(&lora.name, lora.weight);
    }
    if let Some(c) = frisket::proto::size_conditioning(a.original_size, a.crop_top_left) {
        b = b.size_conditioning(c);
    }
    if a.detach {
        b = b.detach();
    }
    if let Some(n) = a.num_images {
        b = b.num_images(n);
    }
    if let Some(id) = &a.job_id {
        b = b.job_id(id);
    }
    Ok(b.build())
}

/// The request's ExplainOptions from the flags (None when nothing in it is set), with
/// `frisket-server render`'s rules: Grad-SAM is on (fast) when a Grad-SAM option is given,
/// and Grad-SAM options with `--explain off` are a usage error. What is left unset keeps
/// the server's default or the preset's.
fn explain_options(a: &GenerateArgs) -> Result<Option<pb::ExplainOptions>, Failure> {
    let mut asked: Vec<&str> = Vec::new();
    for (flag, set) in [
        ("--subject", !a.subjects.is_empty()),
        ("--subject-index", !a.subject_indices.is_empty()),
        ("--explain-layers", a.explain_layers.is_some()),
        ("--manipulate-at", a.manipulate_at.is_some()),
        ("--mask-threshold", a.mask_threshold.is_some()),
        ("--mask-blur", a.mask_blur.is_some()),
        ("--mask-sigma", a.mask_sigma.is_some()),
        ("--mask-dilate", a.mask_dilate.is_some()),
        ("--mask-dilate-passes", a.mask_dilate_passes.is_some()),
        ("--exact-batch", a.exact_batch.is_some()),
    ] {
        if set {
            asked.push(flag);
        }
    }
    let mode = match a.explain {
        Some(ExplainArg::Off) if !asked.is_empty() => {
            return Err(Failure::usage(format!(
                "Grad-SAM options were given with --explain off: {} (see --help)",
                asked.join(", ")
            )));
        }
        Some(ExplainArg::Off) => Some(pb::ExplainMode::Off),
        Some(ExplainArg::Fast) => Some(pb::ExplainMode::Fast),
        Some(ExplainArg::Exact) => Some(pb::ExplainMode::Exact),
        None if !asked.is_empty() => Some(pb::ExplainMode::Fast),
        None => None,
    };
    let start = a.start.map(|s| match s {
        StartArg::Noise => pb::StartMode::Noise,
        StartArg::Reference => pb::StartMode::Reference,
    });
    if let Some(ts) = &a.manipulate_at {
        if ts.is_empty() || ts.iter().any(|t| !t.is_finite()) {
            return Err(Failure::usage("--manipulate-at takes timesteps like 780,520,320 (see --help)".into()));
        }
    }
    let options = pb::ExplainOptions {
        mode: mode.map(|m| m as i32),
        subject_words: a.subjects.clone(),
        subject_indices: a.subject_indices.clone(),
        layers: a.explain_layers.clone().unwrap_or_default(),
        manipulate_at: a.manipulate_at.clone().unwrap_or_default(),
        mask_threshold: a.mask_threshold,
        blur_kernel: a.mask_blur,
        blur_sigma: a.mask_sigma,
        dilation: a.mask_dilate,
        dilation_passes: a.mask_dilate_passes,
        exact_batch: a.exact_batch,
        start: start.map(|s| s as i32),
        protect_feather: a.feather.unwrap_or(0),
    };
    Ok((options != pb::ExplainOptions::default()).then_some(options))
}

pub(super) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    std::fs::write(path, bytes).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

fn fail(e: Error, job_id: &Option<String>) -> Failure {
    let mut f = Failure::from(e);
    f.job_id = job_id.clone();
    f
}

fn stopped_watching(job_id: Option<String>) -> Failure {
    let message = match &job_id {
        Some(id) => format!("interrupted; stopped watching, job {id} runs on"),
        None => "interrupted".to_string(),
    };
    Failure { code: "CANCELLED".into(), message, exit: exit::INTERRUPTED, job_id }
}

fn interrupted(job_id: Option<String>) -> Failure {
    let message = match &job_id {
        Some(id) => format!("interrupted; job {id} cancelled"),
        None => "interrupted".to_string(),
    };
    Failure { code: "CANCELLED".into(), message, exit: exit::INTERRUPTED, job_id }
}

/// Writes the manifest of what was dumped so far (after a failure: best effort).
fn finish_dump(dumper: Option<&Dumper>) {
    if let Some(d) = dumper {
        if let Err(e) = d.finish() {
            eprintln!("warning: {e}");
        }
    }
}

/// SIGINT / Ctrl-C, registered when created (not on first poll).
struct Interrupt {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Interrupt {
    fn new() -> Self {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
            Interrupt { signal }
        }
        #[cfg(not(unix))]
        {
            Interrupt {}
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            match &mut self.signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await
            }
        }
    }
}

/// The progress bar on a terminal; nothing otherwise.
struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        if !enabled {
            return Progress { bar: None };
        }
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
        bar.set_message("connecting");
        bar.enable_steady_tick(Duration::from_millis(120));
        Progress { bar: Some(bar) }
    }

    fn update(&self, event: &Event) {
        let Some(bar) = &self.bar else { return };
        match event {
            Event::Queued(q) => bar.set_message(match q.estimated_start_seconds {
                Some(s) => format!("queued (position {}, starts in about {s:.0} s)", q.position),
                None => format!("queued (position {})", q.position),
            }),
            Event::Loading(l) => bar.set_message(format!("loading model {}", l.model)),
            Event::Started(s) => {
                bar.set_style(
                    ProgressStyle::with_template("{spinner} step {pos:>3}/{len} [{bar:30}] {msg} ({elapsed})")
                        .expect("valid template")
                        .progress_chars("=> "),
                );
                bar.set_length(s.total_steps as u64);
                bar.set_position(0);
                bar.set_message(format!("seed {}", s.seed));
                if !s.subjects.is_empty() {
                    let names: Vec<String> = s
                        .subjects
                        .iter()
                        .map(|t| format!("{} (token {})", if t.word.is_empty() { &t.text } else { &t.word }, t.index))
                        .collect();
                    let steps: Vec<String> = s
                        .manipulation_steps
                        .iter()
                        .map(|&i| {
                            format!(
                                "{} (t={})",
                                i + 1,
                                s.timesteps.get(i as usize).map_or("?".into(), |t| fmt_timestep(*t))
                            )
                        })
                        .collect();
                    bar.println(format!(
                        "grad-sam: subjects {}{}; manipulating at steps {}",
                        names.join(", "),
                        if s.subjects_auto { " [picked from the prompt]" } else { "" },
                        steps.join(", ")
                    ));
                }
            }
            Event::Step(s) => {
                bar.set_length(s.total as u64);
                bar.set_position(s.index as u64 + 1);
                let rate = if s.elapsed_seconds > 0.0 { (s.index as f64 + 1.0) / s.elapsed_seconds } else { 0.0 };
                bar.set_message(format!("t={} {:.2} it/s", fmt_timestep(s.timestep), rate));
            }
            _ => {}
        }
    }

    fn finish(&self, r: &frisket::GenerateResult) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            let t = &r.timings;
            eprintln!(
                "done: {} steps, seed {}, {}x{}, {:.2}s ({:.2} s/step)",
                r.settings.steps, r.seed, r.settings.width, r.settings.height, t.total_seconds, t.seconds_per_step
            );
            if !r.reference_fraction_per_step.is_empty() {
                let shares: Vec<String> =
                    r.reference_fraction_per_step.iter().map(|f| format!("{:.0}%", f * 100.0)).collect();
                eprintln!("from the reference at the manipulated steps: {}", shares.join(", "));
            }
            match r.psnr_protected {
                Some(p) if p.is_infinite() => eprintln!("protected region bit-exact (PSNR ∞)"),
                Some(p) => eprintln!("protected region PSNR {p:.2} dB"),
                None => {}
            }
            if let Some(p) = r.psnr_outside {
                eprintln!("PSNR outside the protected region {p:.2} dB");
            }
        }
    }

    fn abandon(&self, why: &str) {
        if let Some(bar) = &self.bar {
            bar.abandon_with_message(why.to_string());
        }
    }
}

fn fmt_timestep(t: f64) -> String {
    if t.fract() == 0.0 {
        format!("{t:.0}")
    } else {
        format!("{t:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::build_request;
    use crate::{Cli, Command};
    use clap::Parser;
    use frisket::proto::v1 as pb;

    fn request(extra: &[&str]) -> Result<pb::GenerateRequest, super::Failure> {
        let dir = std::env::temp_dir().join(format!("frisket-cli-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Tests run in parallel threads of one process: one reference file per call.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let reference = dir.join(format!("ref-{call}.png"));
        image::RgbImage::new(8, 8).save(&reference).unwrap();
        let mut args = vec!["frisket", "generate", "--model", "sd1", "--prompt", "a star", "--out", "o.png"];
        args.extend(["--reference", reference.to_str().unwrap()]);
        args.extend(extra);
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
        match cli.command {
            Command::Generate(a) => build_request(&a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn loras_map_onto_the_request() {
        let r = request(&["--lora", "detail:0.6", "--lora", "style"]).unwrap();
        let loras: Vec<(&str, Option<f32>)> = r.loras.iter().map(|l| (l.name.as_str(), l.weight)).collect();
        assert_eq!(loras, [("detail", Some(0.6)), ("style", None)]);
    }

    #[test]
    fn paper_preset_and_overrides() {
        // The server fills in the preset's values; the request names it and carries only
        // what the flags set.
        let r = request(&["--preset", "paper"]).unwrap();
        assert_eq!(r.preset, "paper");
        assert_eq!((r.steps, r.guidance, r.strength), (None, None, None));
        assert!(r.explain.is_none(), "{:?}", r.explain);

        let r = request(&["--preset", "paper", "--steps", "20", "--start", "reference", "--explain", "off"]).unwrap();
        assert_eq!((r.preset.as_str(), r.steps, r.guidance), ("paper", Some(20), None));
        let e = r.explain.unwrap();
        assert_eq!((e.mode, e.start), (Some(pb::ExplainMode::Off as i32), Some(pb::StartMode::Reference as i32)));
    }

    #[test]
    fn grad_sam_flags() {
        assert!(request(&[]).unwrap().explain.is_none());
        let r =
            request(&["--layers", "all", "--subject", "star", "--subject-index", "2", "--manipulate-at", "700,300"])
                .unwrap();
        let e = r.explain.unwrap();
        assert_eq!(e.mode, Some(pb::ExplainMode::Fast as i32), "Grad-SAM options turn it on");
        assert_eq!((e.layers.as_str(), e.subject_words, e.subject_indices), ("all", vec!["star".to_string()], vec![2]));
        assert_eq!(e.manipulate_at, vec![700.0, 300.0]);
        assert_eq!(e.start, None);
        let e = request(&["--explain", "exact", "--mask-threshold", "-0.25", "--mask-dilate", "1"])
            .unwrap()
            .explain
            .unwrap();
        assert_eq!((e.mode, e.mask_threshold, e.dilation), (Some(pb::ExplainMode::Exact as i32), Some(-0.25), Some(1)));
        let err = request(&["--explain", "off", "--subject", "star"]).unwrap_err();
        assert_eq!(err.exit, super::exit::USAGE);
        assert!(err.message.contains("--subject"), "{}", err.message);
        let r = request(&["--masks"]).unwrap();
        assert_eq!(r.stream.unwrap().explain, Some(pb::ExplainStreamOptions { masks: true, heatmaps: false }));
    }
}
