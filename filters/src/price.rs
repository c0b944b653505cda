//! Prices and the cost of a request, in integer money: never a float on the way, so sums are
//! exact across requests, cores and replicas.
//!
//! A price is written in US dollars per million tokens. Kept as pico-dollars per token
//! (`$/M × 10^6`), it is exact for any price with up to six decimals (`0.0375` → 37,500 p$). A
//! request's cost is the sum over its token classes of tokens × price, in pico-dollars, rounded
//! up once to a whole micro-dollar (`10^6` p$).

use crate::{model::glob_match, usage::Usage};

/// Pico-dollars in a micro-dollar.
const PICO_PER_MICRO: u128 = 1_000_000;

/// Most decimals a dollar amount may have (a micro-dollar; for prices per million tokens, a
/// pico-dollar per token).
const DECIMALS: usize = 6;

/// One model's prices, in pico-dollars per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Prompt tokens not read from or written to the provider's cache.
    pub input: u64,
    /// Generated tokens (reasoning tokens are output tokens).
    pub output: u64,
    /// Prompt tokens read from the cache (OpenAI `cached_tokens`, Anthropic
    /// `cache_read_input_tokens`).
    pub cached_input: u64,
    /// Prompt tokens written to the cache (Anthropic `cache_creation_input_tokens`).
    pub cache_write: u64,
}

impl Price {
    /// The cost of `usage` in micro-dollars, rounded up once. `usage.input` counts every prompt
    /// token (the cached and cache-written ones included, as [`Usage`] normalises both
    /// providers' shapes), so the plain input is what is left of it.
    pub fn cost_micro(&self, usage: &Usage) -> u64 {
        let cached = usage.cache_read.min(usage.input);
        let written = usage.cache_write.min(usage.input - cached);
        let plain = usage.input - cached - written;
        let pico = u128::from(plain) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input)
            + u128::from(written) * u128::from(self.cache_write)
            + u128::from(usage.output) * u128::from(self.output);
        u64::try_from(pico.div_ceil(PICO_PER_MICRO)).unwrap_or(u64::MAX)
    }

    /// The most a request can cost, in micro-dollars: every input token at the input price and
    /// `max_output` tokens generated.
    pub fn reserve_micro(&self, input: u64, max_output: u64) -> u64 {
        let pico = u128::from(input) * u128::from(self.input)
            + u128::from(max_output) * u128::from(self.output);
        u64::try_from(pico.div_ceil(PICO_PER_MICRO)).unwrap_or(u64::MAX)
    }
}

/// The configured prices: the first entry whose model glob matches wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    entries: Vec<(String, Price)>,
}

impl PriceTable {
    /// A table of `(model glob, price)` in the order written.
    pub fn new(entries: Vec<(String, Price)>) -> Self {
        Self { entries }
    }

    /// The price of `model`, if an entry matches it.
    pub fn find(&self, model: &str) -> Option<Price> {
        self.entries
            .iter()
            .find(|(glob, _)| glob_match(glob, model))
            .map(|(_, p)| *p)
    }

    /// Whether some entry could price some name `glob` matches: their fixed parts (up to the
    /// first `*`) agree, one a prefix of the other (for an exact name, the entry matches it). An
    /// over-approximation for globs with inner `*`s, which only ever silences a warning.
    pub fn covers_glob(&self, glob: &str) -> bool {
        let fixed = |g: &str| match g.find('*') {
            Some(i) => (g[..i].to_string(), true),
            None => (g.to_string(), false),
        };
        let (want, want_open) = fixed(glob);
        self.entries.iter().any(|(g, _)| {
            let (have, have_open) = fixed(g);
            match (want_open, have_open) {
                (false, _) => glob_match(g, glob),
                (true, false) => glob_match(glob, g),
                (true, true) => want.starts_with(&have) || have.starts_with(&want),
            }
        })
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Parses a dollar amount written in decimal (`"2.50"`, `"0.0375"`, `"5"`) into millionths:
/// micro-dollars for an amount in dollars, pico-dollars per token for a price per million
/// tokens. Errors for a negative amount, more than six decimals, or anything that is not a plain
/// decimal number.
pub fn parse_millionths(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("{t} is negative"));
    }
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(frac.is_empty() || digits(frac)) {
        return Err(format!("{t:?} is not a decimal number"));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > DECIMALS {
        return Err(format!(
            "{t} has more than {DECIMALS} decimals (the smallest unit is a millionth)"
        ));
    }
    let whole: u64 = whole.parse().map_err(|_| format!("{t} is too large"))?;
    let mut frac_val: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse()
            .map_err(|_| format!("{t:?} is not a decimal number"))?
    };
    for _ in frac.len()..DECIMALS {
        frac_val *= 10;
    }
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac_val))
        .ok_or_else(|| format!("{t} is too large"))
}

/// The decimal text of a TOML float as written: Rust prints the shortest text that reads back
/// as the same float, which for any amount written with up to six decimals is that amount.
pub fn float_text(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::UsageSource;

    fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Usage {
        Usage {
            input,
            output,
            cache_read,
            cache_write,
            source: UsageSource::Reported,
        }
    }

    fn price(input: &str, output: &str, cached: &str, write: &str) -> Price {
        let p = |s: &str| parse_millionths(s).unwrap_or(u64::MAX);
        Price {
            input: p(input),
            output: p(output),
            cached_input: p(cached),
            cache_write: p(write),
        }
    }

    #[test]
    fn amounts_are_exact_millionths() {
        for (text, want) in [
            ("2.50", 2_500_000),
            ("10", 10_000_000),
            ("0.0375", 37_500),
            ("0.000001", 1),
            ("1.250000", 1_250_000),
            ("0", 0),
        ] {
            assert_eq!(parse_millionths(text), Ok(want), "{text}");
        }
        for bad in ["-1", "0.0000001", "1e3", "", ".5", "abc", "1.2.3"] {
            assert!(parse_millionths(bad).is_err(), "{bad}");
        }
        for v in [2.5, 0.0375, 10.0, 1.25, 0.000001, 3.75, 0.15, 0.6] {
            let text = float_text(v);
            assert!(parse_millionths(&text).is_ok(), "{v} -> {text}");
        }
        assert_eq!(parse_millionths(&float_text(0.15)), Ok(150_000));
    }

    /// OpenAI: prompt_tokens includes cached_tokens; cost = (prompt − cached) × input + cached ×
    /// cached_input + completion × output.
    #[test]
    fn openai_cached_tokens_cost_their_own_price() {
        let p = price("2.50", "10.00", "1.25", "3.75");
        // 1000 prompt (400 cached), 200 completion:
        // 600 × 2.5 + 400 × 1.25 + 200 × 10 = 1500 + 500 + 2000 = 4000 µ$.
        assert_eq!(p.cost_micro(&usage(1000, 200, 400, 0)), 4000);
    }

    /// Anthropic: input_tokens excludes cache reads and writes; Usage normalises input to all
    /// of them, so cost = input × input + read × cached + write × cache_write + output × output.
    #[test]
    fn anthropic_cache_reads_and_writes_cost_their_own_prices() {
        let p = price("3.00", "15.00", "0.30", "3.75");
        // input_tokens 25, cache_creation 100, cache_read 2000, output 15:
        // 25 × 3 + 2000 × 0.3 + 100 × 3.75 + 15 × 15 = 75 + 600 + 375 + 225 = 1275 µ$.
        assert_eq!(p.cost_micro(&usage(25 + 100 + 2000, 15, 2000, 100)), 1275);
    }

    #[test]
    fn a_cost_is_rounded_up_once_to_a_micro_dollar() {
        let p = price("0.15", "0.60", "0.075", "0");
        // 7 × 0.15 + 3 × 0.6 = 1.05 + 1.8 = 2.85 µ$ → 3, not 2 + 2 = 4 (rounding each class).
        assert_eq!(p.cost_micro(&usage(7, 3, 0, 0)), 3);
        assert_eq!(p.cost_micro(&usage(0, 0, 0, 0)), 0);
        // Sums stay exact: 1000 requests of 2.85 µ$ are 2850 µ$ before rounding, each rounded
        // up once to 3.
        assert_eq!(p.reserve_micro(7, 3), 3);
    }

    #[test]
    fn first_matching_glob_wins() {
        let mini = price("0.15", "0.60", "0.075", "0");
        let big = price("2.50", "10.00", "1.25", "0");
        let t = PriceTable::new(vec![("gpt-4o-mini*".into(), mini), ("gpt-4o*".into(), big)]);
        assert_eq!(t.find("gpt-4o-mini-2024-07-18"), Some(mini));
        assert_eq!(t.find("gpt-4o-2024-08-06"), Some(big));
        assert_eq!(t.find("claude-3"), None);
        assert!(t.covers_glob("gpt-4o*") && t.covers_glob("gpt-4o-mini"));
        assert!(t.covers_glob("gpt-*") && t.covers_glob("*"));
        assert!(!t.covers_glob("claude-*") && !t.covers_glob("llama"));
    }
}
