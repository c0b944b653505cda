//! Provider keys in memory: a type that never prints its value, and the reading of a key from
//! an environment variable or a file, with errors that name the source and never the value.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// A secret value (a provider API key). Its `Debug` prints nothing of the value, not even its
/// length, so a `{:?}` of a whole `Config` is safe to log; the bytes are zeroed on drop.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Wraps a value; callers have already checked that it is a valid header value.
    pub fn new(v: Vec<u8>) -> Self {
        Secret(v.into_boxed_slice())
    }

    /// The value, for writing the one header that carries it upstream.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl PartialEq for Secret {
    // Constant time: a reload compares configurations, and how long that takes should not
    // depend on where two keys first differ.
    fn eq(&self, other: &Self) -> bool {
        ringway_filters::auth::constant_time_eq(&self.0, &other.0)
    }
}

impl Eq for Secret {}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // Volatile so the compiler cannot drop the writes as dead stores.
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own allocation.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Where a secret comes from, as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `{ env = "NAME" }`: an environment variable.
    Env(String),
    /// `{ file = "/path" }`: a file (resolved against the config file's directory).
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(n) => write!(f, "environment variable {n}"),
            SecretSource::File(p) => write!(f, "file {}", p.display()),
        }
    }
}

/// Reads a secret: trailing whitespace trimmed, then checked to be usable as a header value.
/// The error names the source and what is wrong, never any byte of the value.
pub(crate) fn read(
    source: &SecretSource,
    var: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Secret, String> {
    let mut bytes = match source {
        SecretSource::Env(name) => match var(name) {
            Some(v) => v.into_encoded_bytes(),
            None => return Err(format!("environment variable {name} is not set")),
        },
        SecretSource::File(path) => read_file(path)?,
    };
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    bytes.truncate(end);
    // Zeroed on every early return below too, since `Secret` owns it from here.
    let secret = Secret::new(bytes);
    let v = secret.expose();
    if v.is_empty() {
        return Err(format!("{source} is empty"));
    }
    if v[0] == b' ' || v[0] == b'\t' {
        return Err(format!("{source} starts with whitespace"));
    }
    if v.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
        return Err(format!(
            "{source} holds a control character (a line break inside the key?); a key must fit in one header line"
        ));
    }
    Ok(secret)
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    // The io error says why (permission, missing) and never echoes content.
    std::fs::read(path).map_err(|e| format!("cannot read file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_nothing_of_the_value() {
        let s = Secret::new(b"sk-very-secret".to_vec());
        let d = format!("{s:?} {:?}", vec![s.clone()]);
        assert!(!d.contains("sk-"), "{d}");
        assert!(!d.contains("14"), "not even the length: {d}");
    }

    #[test]
    fn trailing_whitespace_is_trimmed_and_errors_never_hold_the_value() {
        let var = |n: &str| match n {
            "K" => Some(OsString::from("sk-abc \n")),
            "EMPTY" => Some(OsString::from("  \n")),
            "NL" => Some(OsString::from("sk-one\nsk-two")),
            _ => None,
        };
        let k = read(&SecretSource::Env("K".into()), &var).map_err(|e| e.to_string());
        assert_eq!(k.map(|s| s.expose().to_vec()), Ok(b"sk-abc".to_vec()));
        let e = read(&SecretSource::Env("UNSET".into()), &var).err();
        assert_eq!(e.as_deref(), Some("environment variable UNSET is not set"));
        let e = read(&SecretSource::Env("EMPTY".into()), &var).err();
        assert_eq!(e.as_deref(), Some("environment variable EMPTY is empty"));
        let e = read(&SecretSource::Env("NL".into()), &var)
            .err()
            .unwrap_or_default();
        assert!(e.contains("NL") && !e.contains("sk-"), "{e}");
        let e = read(&SecretSource::File("/nonexistent/key".into()), &var)
            .err()
            .unwrap_or_default();
        assert!(e.contains("/nonexistent/key"), "{e}");
    }
}
