//! Configuration: one TOML file, read into [`Config`] with every error named by key and line.
//!
//! Reading happens in two passes: serde (through `serde_path_to_error`) turns the text into raw
//! structs and stops at the first shape error (unknown key, wrong type, bad unit), then
//! `validate` resolves defaults and cross-references and reports every semantic error at once.

mod credentials;
mod filters;
mod header_rules;
mod prices;
mod raw;
mod routes;
pub mod secret;
mod tls;
mod types;
mod units;
mod upstreams;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub use types::*;
pub use units::{parse_duration, parse_size};

/// The default configuration, built into the binary.
pub const EMBEDDED: &str = include_str!("../../conf/ringway.toml");

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File name (or other origin) the text came from.
    pub origin: String,
    /// Key path such as `upstreams[1].endpoints[0]`; empty when the error concerns the whole file.
    pub key: String,
    /// 1-based line of the key, when known.
    pub line: Option<usize>,
    /// What is wrong, and where it helps, how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        // A file-wide error (unreadable file, TOML syntax) has no key to print.
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and checks a configuration file; paths inside it are relative to its directory.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let base = path.parent().unwrap_or(Path::new("."));
    match std::fs::read_to_string(path) {
        Ok(src) => load_str_in(&src, &origin, base),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            origin,
            key: String::new(),
            line: None,
            message: format!("cannot read the file: {e}"),
        }])),
    }
}

/// Parses and checks configuration text; `origin` names it in error messages. Relative file
/// paths are resolved against the current directory.
pub fn load_str(src: &str, origin: &str) -> Result<Config, ConfigErrors> {
    load_str_in(src, origin, Path::new("."))
}

/// Parses and checks configuration text whose relative file paths start at `base`.
pub fn load_str_in(src: &str, origin: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let var = |name: &str| std::env::var_os(name);
    load_at(
        src,
        origin,
        &validate::Env {
            base,
            now,
            var: &var,
        },
    )
}

/// [`load_str_in`] with the clock given, so that expiry checks can be tested.
pub(crate) fn load_at(
    src: &str,
    origin: &str,
    env: &validate::Env<'_>,
) -> Result<Config, ConfigErrors> {
    let de = toml::Deserializer::new(src);
    let raw: raw::RawConfig = serde_path_to_error::deserialize(de)
        .map_err(|e| ConfigErrors(vec![parse_error(&e, src, origin)]))?;
    validate::build(&raw, src, origin, env).map_err(ConfigErrors)
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn parse_error(
    e: &serde_path_to_error::Error<toml::de::Error>,
    src: &str,
    origin: &str,
) -> ConfigError {
    let inner = e.inner();
    ConfigError {
        origin: origin.to_string(),
        key: key_path(e.path()),
        line: inner.span().map(|s| line_of(src, s.start)),
        message: message(inner.message()),
    }
}

/// serde speaks of fields; a TOML user writes keys. Multi-line toml messages are joined so that
/// `ConfigErrors` stays one error per line.
fn message(m: &str) -> String {
    let m = m
        .trim_end()
        .replacen("unknown field", "unknown key", 1)
        .replacen("missing field", "missing key", 1);
    m.lines().collect::<Vec<_>>().join("; ")
}

/// Formats a serde path the way a user would write it in TOML: `routes[0].models."gpt-4o*"`.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            // `toml::Spanned` is read as a private struct; its field names are no user's key.
            Segment::Map { key } if key.starts_with("$__serde_spanned") => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&toml_key(key));
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// A key as TOML would need it written: bare when it can be, quoted otherwise.
pub(crate) fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}
