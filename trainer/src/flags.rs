//! `--flag value` command lines for the trainer's binaries (each says its flags in its doc comment).
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::str::FromStr;

#[derive(Debug)]
pub struct Flags(HashMap<String, String>);

impl Flags {
    /// Parses the process arguments; any flag not in `known` is an error that points at `usage`.
    pub fn from_env(known: &[&str], usage: &str) -> Result<Self> {
        Self::parse(std::env::args().skip(1), known, usage)
    }

    pub fn parse(args: impl IntoIterator<Item = String>, known: &[&str], usage: &str) -> Result<Self> {
        let mut map = HashMap::new();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let name = flag.strip_prefix("--").filter(|n| known.contains(n));
            let Some(name) = name else { bail!("unknown flag {flag} (see {usage})") };
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            map.insert(name.to_string(), value);
        }
        Ok(Self(map))
    }

    /// The flag's value, or `default` when it was not given.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        match self.0.get(name) {
            Some(v) => v.parse().with_context(|| format!("--{name} {v}")),
            None => Ok(default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn values_defaults_and_errors() {
        let f = Flags::parse(args(&["--n", "12", "--model", "m"]), &["n", "model", "steps"], "x").unwrap();
        assert_eq!(f.get("n", 200u64).unwrap(), 12);
        assert_eq!(f.get("steps", 20usize).unwrap(), 20);
        assert_eq!(f.get("model", String::new()).unwrap(), "m");
        assert!(f.get("model", 0u64).is_err());
        assert!(Flags::parse(args(&["--bogus", "1"]), &["n"], "x")
            .unwrap_err()
            .to_string()
            .contains("unknown flag --bogus"));
        assert!(Flags::parse(args(&["--n"]), &["n"], "x").unwrap_err().to_string().contains("needs a value"));
    }
}
