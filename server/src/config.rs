//! `--config FILE.toml` and the limit flags that override it, shared by `serve` and
//! `render`.
//!
//! The file has one section per concern; each maps to one struct that the flags, the file
//! and (for limits) GetServerInfo share, so a setting has one name and one default:
//!
//! ```toml
//! [limits]
//! max_steps = 100
//! max_side = 1024
//! ```
//!
//! Unknown sections and keys are refused. A flag given on the command line overrides the
//! file; what neither sets keeps its default.
use crate::service::Limits;
use anyhow::{Context, Result};
use clap::Args;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The config file's contents.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub limits: Limits,
}

impl ConfigFile {
    /// The file's text parsed; an error is one line: the line number and what is wrong.
    pub fn parse(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let message = e.message().trim();
            match e.span() {
                Some(span) => {
                    let number = text[..span.start].matches('\n').count() + 1;
                    let line = text.lines().nth(number - 1).unwrap_or("").trim();
                    anyhow::anyhow!("line {number} ({line:?}): {message}")
                }
                None => anyhow::anyhow!("{message}"),
            }
        })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config file {}", path.display()))
    }
}

/// `--config` and the `--max-*` flags. Flag names are the `[limits]` keys with dashes.
#[derive(Args, Debug, Default)]
pub struct SettingsArgs {
    /// A TOML config file: a `[limits]` section with the keys of the --max-* flags
    /// (max_steps = 100, ...); flags given here override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,
    /// Most steps per job [default: the config file's, else 500].
    #[arg(long)]
    pub max_steps: Option<u32>,
    /// Most output pixels (width × height) per job [default: the config file's, else 2048²].
    #[arg(long)]
    pub max_pixels: Option<u32>,
    /// Longest side of the output and of input images, in pixels [default: the config
    /// file's, else 4096].
    #[arg(long)]
    pub max_side: Option<u32>,
    /// Largest request or response message, in bytes [default: the config file's, else 64 MiB].
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// Most work per job, in work units: latent positions × UNet rows × steps, plus
    /// Grad-SAM attribution (see GetServerInfo.max_work in the proto) [default: the config
    /// file's, else 20,000,000].
    #[arg(long)]
    pub max_work: Option<u64>,
    /// Most LoRAs per job [default: the config file's, else 8].
    #[arg(long)]
    pub max_loras: Option<u32>,
    /// Bytes of prompt and of negative prompt [default: the config file's, else 16384].
    #[arg(long)]
    pub max_prompt_bytes: Option<u32>,
    /// Most images per request (num_images) [default: the config file's, else 8].
    #[arg(long)]
    pub max_images: Option<u32>,
}

impl SettingsArgs {
    /// The config file (or its defaults) with the flags given applied over it.
    pub fn load(&self) -> Result<ConfigFile> {
        let mut config = match &self.config {
            Some(path) => ConfigFile::read(path)?,
            None => ConfigFile::default(),
        };
        self.apply(&mut config.limits);
        Ok(config)
    }

    fn apply(&self, l: &mut Limits) {
        let Self {
            config: _,
            max_steps,
            max_pixels,
            max_side,
            max_message_bytes,
            max_work,
            max_loras,
            max_prompt_bytes,
            max_images,
        } = self;
        let set = |slot: &mut u32, flag: &Option<u32>| *slot = flag.unwrap_or(*slot);
        set(&mut l.max_steps, max_steps);
        set(&mut l.max_pixels, max_pixels);
        set(&mut l.max_side, max_side);
        set(&mut l.max_loras, max_loras);
        set(&mut l.max_prompt_bytes, max_prompt_bytes);
        set(&mut l.max_images, max_images);
        l.max_message_bytes = max_message_bytes.unwrap_or(l.max_message_bytes);
        l.max_work = max_work.unwrap_or(l.max_work);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        settings: SettingsArgs,
    }

    fn settings(args: &[&str]) -> SettingsArgs {
        Cmd::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().settings
    }

    #[test]
    fn a_limits_section_sets_those_limits_and_keeps_the_other_defaults() {
        let c = ConfigFile::parse("[limits]\nmax_steps = 40\nmax_side = 1024\nmax_work = 123456\n").unwrap();
        let want = Limits { max_steps: 40, max_side: 1024, max_work: 123_456, ..Limits::default() };
        assert_eq!(c.limits, want);
        assert_eq!(ConfigFile::parse("").unwrap().limits, Limits::default());
    }

    #[test]
    fn unknown_keys_and_sections_are_refused_by_name() {
        let e = format!("{:#}", ConfigFile::parse("[limits]\nmax_stpes = 40\n").unwrap_err());
        assert!(
            e.starts_with("line 2 (\"max_stpes = 40\"): ") && e.contains("max_stpes") && e.contains("max_steps"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let e = format!("{:#}", ConfigFile::parse("[limitz]\nmax_steps = 40\n").unwrap_err());
        assert!(e.contains("limitz"), "{e}");
        let e = format!("{:#}", ConfigFile::parse("[limits]\nmax_steps = \"many\"\n").unwrap_err());
        assert!(e.contains("max_steps"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("frisket-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("frisket.toml");
        std::fs::write(&path, "[limits]\nmax_steps = 40\nmax_side = 1024\n").unwrap();
        let p = path.to_str().unwrap();
        let limits = settings(&["--config", p, "--max-side", "512", "--max-work", "99"]).load().unwrap().limits;
        assert_eq!((limits.max_steps, limits.max_side, limits.max_work), (40, 512, 99));
        assert_eq!(limits.max_pixels, Limits::default().max_pixels);
        assert_eq!(settings(&["--max-steps", "7"]).load().unwrap().limits.max_steps, 7);
        let missing = settings(&["--config", dir.join("absent.toml").to_str().unwrap()]).load().unwrap_err();
        assert!(format!("{missing:#}").contains("absent.toml"), "{missing:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
