//! Checks for an upstream's `credentials`: the kind, the header name of `kind = "header"`, and
//! every key read from its variable or file. Errors name the key path, the line and the variable
//! or file, never a value.

use super::header_rules::FRAMING;
use super::raw::{RawCredentials, S};
use super::secret::{self, SecretSource};
use super::types::{CredentialKind, Credentials, ProviderKey};
use super::validate::{is_token, Ck};

/// Resolves `credentials` at `key` (`upstreams[i].credentials`), reading every key now: a
/// start, a reload or `ringway check` with a missing key fails here.
pub(crate) fn credentials(ck: &mut Ck, key: &str, c: &S<RawCredentials>) -> Option<Credentials> {
    let raw = c.get_ref();
    let kind = match (raw.kind.get_ref().as_str(), &raw.name) {
        ("bearer", None) => Some(CredentialKind::Bearer),
        ("anthropic", None) => Some(CredentialKind::Anthropic),
        ("azure", None) => Some(CredentialKind::Azure),
        ("header", Some(n)) => header_name(ck, &format!("{key}.name"), n),
        ("header", None) => {
            ck.err(
                format!("{key}.name"),
                raw.kind.span(),
                "kind = \"header\" needs name = \"HEADER-NAME\" (e.g. \"x-goog-api-key\")",
            );
            None
        }
        ("bearer" | "anthropic" | "azure", Some(n)) => {
            ck.err(
                format!("{key}.name"),
                n.span(),
                "name is only used with kind = \"header\"",
            );
            None
        }
        (other, _) => {
            ck.err(
                format!("{key}.kind"),
                raw.kind.span(),
                format!(
                    "expected \"bearer\", \"anthropic\", \"azure\" or \"header\", got {other:?}"
                ),
            );
            None
        }
    };
    if raw.keys.get_ref().is_empty() {
        ck.err(
            format!("{key}.keys"),
            raw.keys.span(),
            "needs at least one key: { env = \"VAR\" } or { file = \"/path\" }",
        );
    }
    let mut keys = Vec::new();
    for (j, k) in raw.keys.get_ref().iter().enumerate() {
        let kk = format!("{key}.keys[{j}]");
        let rk = k.get_ref();
        let source = match (&rk.env, &rk.file) {
            (Some(e), None) => {
                let name = e.get_ref();
                if name.is_empty() || name.contains('=') || name.contains('\0') {
                    ck.err(
                        format!("{kk}.env"),
                        e.span(),
                        format!("{name:?} is not an environment variable name"),
                    );
                    continue;
                }
                (
                    SecretSource::Env(name.clone()),
                    format!("{kk}.env"),
                    e.span(),
                )
            }
            (None, Some(f)) => (
                SecretSource::File(ck.path(f.get_ref())),
                format!("{kk}.file"),
                f.span(),
            ),
            _ => {
                ck.err(
                    kk,
                    k.span(),
                    "set exactly one of env = \"VAR\" or file = \"/path\"",
                );
                continue;
            }
        };
        let weight = match &rk.weight {
            Some(w) if *w.get_ref() == 0 => {
                ck.err(format!("{kk}.weight"), w.span(), "must be at least 1");
                1
            }
            Some(w) => *w.get_ref(),
            None => 1,
        };
        let (source, at, span) = source;
        match secret::read(&source, ck.var) {
            Ok(secret) => keys.push(ProviderKey {
                source,
                weight,
                secret,
            }),
            Err(m) => ck.err(at, span, m),
        }
    }
    let kind = kind?;
    (keys.len() == raw.keys.get_ref().len() && !keys.is_empty())
        .then_some(Credentials { kind, keys })
}

fn header_name(ck: &mut Ck, key: &str, n: &S<String>) -> Option<CredentialKind> {
    let name = n.get_ref().to_ascii_lowercase();
    if !is_token(&name) {
        ck.err(
            key,
            n.span(),
            format!("{name:?} is not a valid header name"),
        );
        return None;
    }
    if FRAMING.contains(&name.as_str()) {
        ck.err(
            key,
            n.span(),
            format!("{name:?} frames or routes the request; a key cannot be sent in it"),
        );
        return None;
    }
    Some(CredentialKind::Header(name))
}
