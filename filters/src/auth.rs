//! API-key authentication: where a key is read from, and which consumer it names.
//!
//! A presented key is read from, in this order, the first that yields a non-empty key:
//! `Authorization: Bearer <key>` ([`bearer_token`]), `x-api-key: <key>` ([`api_key_header`]),
//! then a query parameter ([`query_param`]). [`presented_key`] applies that order.
//!
//! [`KeyAuth::lookup`] finds the consumer without a timing signal an attacker could use to guess
//! a key byte by byte: the candidate is found by a hash keyed with a per-process random SipHash key
//! (so how long the lookup takes says nothing about how close a guess is to a real key), and the
//! candidate is then confirmed with a constant-time comparison ([`constant_time_eq`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// The consumer keys of one configuration, built once (at start and on reload) and shared
/// read-only by every worker.
#[derive(Debug)]
pub struct KeyAuth {
    /// Consumer names, indexed by the consumer index that [`KeyAuth::lookup`] returns.
    names: Vec<std::sync::Arc<str>>,
    /// Every key with the index of its consumer; `by_hash` points into this.
    keys: Vec<(Box<[u8]>, usize)>,
    /// Keyed hash of a key → indexes into `keys`. A `Vec` per hash because two keys may share a
    /// 64-bit hash; every candidate is compared in constant time.
    by_hash: HashMap<u64, Vec<usize>>,
    /// The per-process random SipHash key for `by_hash`, drawn once per `KeyAuth`.
    hasher: RandomState,
}

impl KeyAuth {
    /// Builds the table from `(consumer name, keys)` pairs, in configuration order.
    ///
    /// Empty keys are skipped (an empty presented key must never authenticate). A key listed
    /// twice keeps its first consumer; the configuration check should reject duplicates before
    /// this, so this is only the tie-break.
    pub fn new(consumers: impl IntoIterator<Item = (String, Vec<String>)>) -> Self {
        let mut auth = KeyAuth {
            names: Vec::new(),
            keys: Vec::new(),
            by_hash: HashMap::new(),
            hasher: RandomState::new(),
        };
        for (name, keys) in consumers {
            let idx = auth.names.len();
            auth.names.push(name.into());
            for key in keys {
                let key = key.into_bytes().into_boxed_slice();
                if key.is_empty() || auth.lookup(&key).is_some() {
                    continue;
                }
                let h = auth.hasher.hash_one(&*key);
                auth.by_hash.entry(h).or_default().push(auth.keys.len());
                auth.keys.push((key, idx));
            }
        }
        auth
    }

    /// The consumer index for a presented key, or `None` when no consumer has it.
    ///
    /// The hash lookup is keyed with a secret per-process SipHash key, so its timing depends only
    /// on whether some configured key has the same secret 64-bit hash; each candidate found is
    /// then compared with [`constant_time_eq`], whose time depends only on the lengths.
    pub fn lookup(&self, key: &[u8]) -> Option<usize> {
        if key.is_empty() {
            return None;
        }
        let candidates = self.by_hash.get(&self.hasher.hash_one(key))?;
        let mut found = None;
        // Compare every candidate (almost always one) without stopping early.
        for &i in candidates {
            if let Some((k, consumer)) = self.keys.get(i) {
                if constant_time_eq(k, key) && found.is_none() {
                    found = Some(*consumer);
                }
            }
        }
        found
    }

    /// The name of consumer `idx` as configured; `""` for an index that did not come from this
    /// table's [`KeyAuth::lookup`] (a stale index kept across a reload, say).
    pub fn consumer_name(&self, idx: usize) -> &str {
        self.names.get(idx).map_or("", |n| n)
    }

    /// The name of consumer `idx`, shared: held without a copy (every AI request's context
    /// keeps its consumer's name for its metrics). `None` for an index not from this table,
    /// where [`consumer_name`](Self::consumer_name) gives `""`.
    pub fn consumer_shared(&self, idx: usize) -> Option<&std::sync::Arc<str>> {
        self.names.get(idx)
    }

    /// How many consumers the table was built from.
    pub fn consumers(&self) -> usize {
        self.names.len()
    }
}

/// Byte equality whose running time depends only on the two lengths, never on where the first
/// difference is. Lengths are not secret (a key's length is public in practice), so different
/// lengths return `false` at once.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    // black_box keeps the optimizer from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

/// The token of an `Authorization` header value of the form `Bearer <token>`.
///
/// The scheme is matched case-insensitively (RFC 9110 §11.1) and may be followed by one or more
/// spaces or tabs; surrounding whitespace is trimmed. Any other scheme, or an empty token, is
/// `None`.
pub fn bearer_token(authorization_value: &[u8]) -> Option<&[u8]> {
    let v = trim(authorization_value);
    let (scheme, rest) = v.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    // At least one separator: "Bearerabc" is not the Bearer scheme.
    if !matches!(rest.first(), Some(b' ' | b'\t')) {
        return None;
    }
    let token = trim(rest);
    (!token.is_empty()).then_some(token)
}

/// The key in an `x-api-key` header value, whitespace-trimmed; `None` when empty.
pub fn api_key_header(value: &[u8]) -> Option<&[u8]> {
    let v = trim(value);
    (!v.is_empty()).then_some(v)
}

/// The value of the first query parameter called `name`.
///
/// `query` is the part after `?` (a leading `?` is skipped, a `#fragment` is ignored). Parameter
/// names and values are percent-decoded (`%XX` → the byte); the value is borrowed when it holds no
/// `%`, and decoded into an owned copy otherwise. `+` is kept as `+`, not turned into a space: that
/// rule belongs to HTML form bodies, and API keys (base64 ones especially) contain `+`. A `%` not
/// followed by two hex digits is kept as is. `name` without `=` gives `Some` empty value.
pub fn query_param<'a>(query: &'a [u8], name: &str) -> Option<Cow<'a, [u8]>> {
    let query = query.strip_prefix(b"?").unwrap_or(query);
    let query = match query.iter().position(|&b| b == b'#') {
        Some(end) => &query[..end],
        None => query,
    };
    for pair in query.split(|&b| b == b'&') {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        if *percent_decode(k) == *name.as_bytes() {
            return Some(percent_decode(v));
        }
    }
    None
}

/// The presented key, taken from the first source that yields a non-empty key, in the order
/// `Authorization: Bearer`, `x-api-key`, query parameter `query_name` in `query`.
///
/// An `Authorization` header with another scheme (`Basic …`) does not stop the search: the key
/// may still be in `x-api-key`.
pub fn presented_key<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
    query: Option<&'a [u8]>,
    query_name: &str,
) -> Option<Cow<'a, [u8]>> {
    presented_key_from(authorization, x_api_key, query, query_name).map(|(k, _)| k)
}

/// Where a presented key was found, so that the gateway can remove it before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFrom {
    /// `Authorization: Bearer`.
    Authorization,
    /// `x-api-key`.
    XApiKey,
    /// The query parameter.
    Query,
}

/// [`presented_key`], with where the key was found.
pub fn presented_key_from<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
    query: Option<&'a [u8]>,
    query_name: &str,
) -> Option<(Cow<'a, [u8]>, KeyFrom)> {
    if let Some(k) = authorization.and_then(bearer_token) {
        return Some((Cow::Borrowed(k), KeyFrom::Authorization));
    }
    if let Some(k) = x_api_key.and_then(api_key_header) {
        return Some((Cow::Borrowed(k), KeyFrom::XApiKey));
    }
    query
        .and_then(|q| query_param(q, query_name))
        .filter(|k| !k.is_empty())
        .map(|k| (k, KeyFrom::Query))
}

/// Whether a raw (possibly percent-encoded) query parameter name is `name`, by the same rule
/// [`query_param`] finds it with.
pub fn query_name_is(raw: &[u8], name: &str) -> bool {
    *percent_decode(raw) == *name.as_bytes()
}

/// Writes `query` (without its `?`) less every parameter called `name`, joined by `&`;
/// returns whether anything was written.
pub fn write_query_without(query: &[u8], name: &str, out: &mut Vec<u8>) -> bool {
    let mut wrote = false;
    for pair in query.split(|&b| b == b'&') {
        let k = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => &pair[..eq],
            None => pair,
        };
        if pair.is_empty() || query_name_is(k, name) {
            continue;
        }
        if wrote {
            out.push(b'&');
        }
        out.extend_from_slice(pair);
        wrote = true;
    }
    wrote
}

fn trim(v: &[u8]) -> &[u8] {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !is_ws(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !is_ws(b)).map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

fn percent_decode(v: &[u8]) -> Cow<'_, [u8]> {
    if !v.contains(&b'%') {
        return Cow::Borrowed(v);
    }
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = |j: usize| v.get(j).and_then(|&b| (b as char).to_digit(16));
        match (v[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits are at most 0xFF, so the cast cannot truncate.
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> KeyAuth {
        KeyAuth::new([
            (
                "alice".to_string(),
                vec!["sk-alice-1".to_string(), "sk-alice-2".to_string()],
            ),
            ("bob".to_string(), vec!["sk-bob".to_string(), String::new()]),
            ("mallory".to_string(), vec!["sk-bob".to_string()]),
        ])
    }

    #[test]
    fn lookup_finds_each_consumer_by_any_of_its_keys() {
        let a = auth();
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"sk-alice-1", Some("alice")),
            (b"sk-alice-2", Some("alice")),
            (b"sk-bob", Some("bob")), // listed twice: the first consumer keeps it
            (b"sk-alice-3", None),
            (b"sk-alice-", None),
            (b"SK-BOB", None),
            (b"", None), // bob's empty key was skipped
        ];
        for (key, want) in cases {
            let got = a.lookup(key).map(|i| a.consumer_name(i));
            assert_eq!(got, *want, "{}", String::from_utf8_lossy(key));
        }
        assert_eq!(a.consumers(), 3);
        assert_eq!(a.consumer_name(99), "");
    }

    #[test]
    fn constant_time_eq_agrees_with_plain_equality() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b""),
            (b"a", b"a"),
            (b"a", b"b"),
            (b"abc", b"abd"),
            (b"abc", b"xbc"),
            (b"abc", b"ab"),
            (b"\x00\xff", b"\x00\xff"),
            (b"\x00\xff", b"\x00\xfe"),
        ];
        for (a, b) in cases {
            assert_eq!(constant_time_eq(a, b), a == b, "{a:?} {b:?}");
        }
    }

    #[test]
    fn bearer_token_accepts_any_scheme_case_and_spacing() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"Bearer sk-1", Some(b"sk-1")),
            (b"bearer sk-1", Some(b"sk-1")),
            (b"BEARER   sk-1", Some(b"sk-1")),
            (b"Bearer\tsk-1 ", Some(b"sk-1")),
            (b"  Bearer sk-1", Some(b"sk-1")),
            (b"Bearersk-1", None),
            (b"Bearer", None),
            (b"Bearer    ", None),
            (b"Basic YWxhZGRpbjpvcGVuc2VzYW1l", None),
            (b"", None),
        ];
        for (v, want) in cases {
            assert_eq!(bearer_token(v), *want, "{}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn query_param_returns_the_first_match_decoded() {
        type Case<'a> = (&'a [u8], &'a str, Option<&'a [u8]>);
        let cases: &[Case] = &[
            (b"key=sk-1", "key", Some(b"sk-1")),
            (b"?a=1&key=sk-1&key=sk-2", "key", Some(b"sk-1")),
            (b"a=1&key=sk%2D1", "key", Some(b"sk-1")),
            (b"key=a+b", "key", Some(b"a+b")),
            (b"key=a%2Bb", "key", Some(b"a+b")),
            (b"key=100%", "key", Some(b"100%")),
            (b"key=%zz", "key", Some(b"%zz")),
            (b"k%65y=v", "key", Some(b"v")),
            (b"key", "key", Some(b"")),
            (b"key=v#frag", "key", Some(b"v")),
            (b"a=1#key=v", "key", None),
            (b"keys=v&akey=v", "key", None),
            (b"", "key", None),
        ];
        for (q, name, want) in cases {
            let got = query_param(q, name);
            assert_eq!(got.as_deref(), *want, "{}", String::from_utf8_lossy(q));
        }
        assert!(matches!(
            query_param(b"key=plain", "key"),
            Some(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn presented_key_takes_the_first_source_that_has_a_key() {
        type Bytes<'a> = Option<&'a [u8]>;
        type Case<'a> = (Bytes<'a>, Bytes<'a>, Bytes<'a>, Bytes<'a>);
        let cases: &[Case] = &[
            (Some(b"Bearer a"), Some(b"b"), Some(b"key=c"), Some(b"a")),
            (None, Some(b"b"), Some(b"key=c"), Some(b"b")),
            (Some(b"Basic xyz"), Some(b" b "), None, Some(b"b")),
            (None, Some(b"  "), Some(b"key=c"), Some(b"c")),
            (None, None, Some(b"key="), None),
            (None, None, None, None),
        ];
        for (authz, xkey, q, want) in cases {
            let got = presented_key(*authz, *xkey, *q, "key");
            assert_eq!(got.as_deref(), *want);
        }
    }

    #[test]
    fn a_query_key_is_removed_and_the_rest_kept() {
        let mut out = Vec::new();
        assert!(write_query_without(
            b"a=1&api_key=sk&b=2&api%5Fkey=x",
            "api_key",
            &mut out
        ));
        assert_eq!(out, b"a=1&b=2");
        out.clear();
        assert!(!write_query_without(b"api_key=sk", "api_key", &mut out));
        assert!(out.is_empty());
        assert_eq!(
            presented_key_from(None, Some(b"k1"), None, "").map(|(_, f)| f),
            Some(KeyFrom::XApiKey)
        );
    }
}
