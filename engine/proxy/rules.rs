//! A route's `request_headers` / `response_headers`, compiled for the head rewrite: the names
//! to drop, and the lines to add, already rendered, so applying them allocates nothing.

use crate::config::HeaderRules;

/// Header rules ready to apply to one head.
#[derive(Debug, Default)]
pub struct HeadRewrite {
    /// Lowercased names dropped from the head: every `set` name (replaced) and `remove` name.
    drop: Box<[String]>,
    /// `name: value\r\n` for every `set` rule, in file order.
    lines: Box<[u8]>,
    /// How many of `drop` (the first ones) are `set` names.
    sets: usize,
}

impl HeadRewrite {
    /// Compiles checked rules.
    pub fn new(r: &HeaderRules) -> Self {
        let mut lines = Vec::new();
        for (n, v) in &r.set {
            lines.extend_from_slice(n.as_bytes());
            lines.extend_from_slice(b": ");
            lines.extend_from_slice(v.as_bytes());
            lines.extend_from_slice(b"\r\n");
        }
        HeadRewrite {
            drop: r
                .set
                .iter()
                .map(|(n, _)| n.clone())
                .chain(r.remove.iter().cloned())
                .collect(),
            lines: lines.into_boxed_slice(),
            sets: r.set.len(),
        }
    }

    /// Whether a `set` rule writes a header of this name.
    pub fn sets(&self, name: &str) -> bool {
        self.drop[..self.sets]
            .iter()
            .any(|d| d.eq_ignore_ascii_case(name))
    }

    /// Whether a header of this name is left out of the rewritten head.
    #[inline]
    pub fn drops(&self, name: &str) -> bool {
        self.drop.iter().any(|d| d.eq_ignore_ascii_case(name))
    }

    /// The lines `set` adds.
    #[inline]
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_and_remove_drops_case_insensitively() {
        let r = HeadRewrite::new(&HeaderRules {
            set: vec![("x-tenant".into(), "acme".into())],
            remove: vec!["x-debug".into()],
        });
        assert!(r.drops("X-Tenant") && r.drops("x-DEBUG") && !r.drops("x-other"));
        assert_eq!(r.lines(), b"x-tenant: acme\r\n");
        assert!(r.sets("X-TENANT") && !r.sets("x-debug"));
        let none = HeadRewrite::new(&HeaderRules::default());
        assert!(!none.drops("x-debug") && none.lines().is_empty());
    }
}
