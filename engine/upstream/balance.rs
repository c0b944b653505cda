//! Choosing an endpoint: smooth weighted round robin, least requests, and
//! consistent hashing. Pure logic over endpoint indices; the pool supplies
//! which endpoints are usable (resolved, not ejected, not already tried).

/// A consistent-hash ring over endpoint indices: each endpoint owns
/// `VNODES × weight` points, so removing one endpoint moves only the keys
/// that landed on its points.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    points: Vec<(u64, usize)>,
}

/// Points per unit of weight: enough for an even spread of keys.
const VNODES: u32 = 160;

impl Ring {
    /// Builds the ring for endpoints `(index, weight)`.
    pub fn new(endpoints: impl IntoIterator<Item = (usize, u32, String)>) -> Self {
        let mut points = Vec::new();
        for (idx, weight, name) in endpoints {
            for v in 0..VNODES * weight.max(1) {
                points.push((hash_bytes(format!("{name}#{v}").as_bytes()), idx));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// The first usable endpoint clockwise from `key`.
    pub fn pick(&self, key: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|&(h, _)| h < key);
        let n = self.points.len();
        (0..n)
            .map(|i| self.points[(start + i) % n].1)
            .find(|&idx| usable(idx))
    }
}

/// FNV-1a followed by a 64-bit finaliser: stable across runs and processes,
/// so every worker and every replica maps a key to the same endpoint.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finaliser spreads FNV's weak low bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Smooth weighted round robin (nginx's): over a cycle each endpoint is
/// picked `weight` times, interleaved rather than in bursts.
#[derive(Debug, Default)]
pub struct SmoothRr {
    current: Vec<i64>,
}

impl SmoothRr {
    /// Picks among `(index, weight)` for usable endpoints.
    pub fn pick(
        &mut self,
        candidates: impl Iterator<Item = (usize, u32)> + Clone,
    ) -> Option<usize> {
        let total: i64 = candidates.clone().map(|(_, w)| i64::from(w.max(1))).sum();
        let mut best: Option<usize> = None;
        for (idx, w) in candidates {
            if self.current.len() <= idx {
                self.current.resize(idx + 1, 0);
            }
            self.current[idx] += i64::from(w.max(1));
            if best.is_none_or(|b| self.current[idx] > self.current[b]) {
                best = Some(idx);
            }
        }
        if let Some(b) = best {
            self.current[b] -= total;
        }
        best
    }
}

/// Least requests: the usable endpoint with the fewest requests in flight
/// relative to its weight; ties go round robin by `tiebreak`.
pub fn least_requests(
    candidates: impl Iterator<Item = (usize, u32)> + Clone,
    inflight: &[u32],
    tiebreak: usize,
) -> Option<usize> {
    // inflight/weight compared without division, on a common scale.
    let load = |idx: usize, w: u32| {
        u64::from(inflight.get(idx).copied().unwrap_or(0)) * 1_000_000 / u64::from(w.max(1))
    };
    let min = candidates.clone().map(|(i, w)| load(i, w)).min()?;
    let ties = candidates
        .clone()
        .filter(|&(i, w)| load(i, w) == min)
        .count();
    candidates
        .filter(|&(i, w)| load(i, w) == min)
        .nth(tiebreak % ties)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize, skip: Option<usize>) -> Ring {
        Ring::new(
            (0..n)
                .filter(|&i| Some(i) != skip)
                .map(|i| (i, 1, format!("10.0.0.{i}:80"))),
        )
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_keys() {
        let full = ring(4, None);
        let less = ring(4, Some(2));
        let mut moved_other = 0;
        let mut owned_by_removed = 0;
        for k in 0..1000u32 {
            let key = hash_bytes(format!("user-{k}").as_bytes());
            let a = full.pick(key, |_| true).unwrap();
            let b = less.pick(key, |_| true).unwrap();
            if a == 2 {
                owned_by_removed += 1;
                assert_ne!(b, 2);
            } else if a != b {
                moved_other += 1;
            }
        }
        assert_eq!(moved_other, 0);
        // An even-ish share: 250 expected.
        assert!((150..350).contains(&owned_by_removed), "{owned_by_removed}");
    }

    #[test]
    fn ejected_endpoint_is_skipped_like_a_removed_one() {
        let r = ring(4, None);
        let less = ring(4, Some(1));
        for k in 0..500u32 {
            let key = hash_bytes(&k.to_le_bytes());
            assert_eq!(r.pick(key, |i| i != 1), less.pick(key, |_| true));
        }
    }

    #[test]
    fn smooth_rr_follows_weights_interleaved() {
        let mut rr = SmoothRr::default();
        let eps = [(0usize, 5u32), (1, 1), (2, 1)];
        let seq: Vec<usize> = (0..7)
            .map(|_| rr.pick(eps.iter().copied()).unwrap())
            .collect();
        assert_eq!(seq.iter().filter(|&&i| i == 0).count(), 5);
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn least_requests_prefers_the_idle_endpoint() {
        let inflight = [3, 0, 2];
        let eps = [(0usize, 1u32), (1, 1), (2, 1)];
        assert_eq!(least_requests(eps.iter().copied(), &inflight, 0), Some(1));
        // Weight 4 with 3 in flight beats weight 1 with 2.
        let eps = [(0usize, 4u32), (2, 1)];
        assert_eq!(least_requests(eps.iter().copied(), &inflight, 0), Some(0));
    }
}
