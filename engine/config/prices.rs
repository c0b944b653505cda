//! Checks for `[[prices]]`: dollars per million tokens, exact to six decimals, never negative;
//! and a warning for a budget that cannot price a model its route may be sent.

use ringway_filters::price::{Price, PriceTable};

use super::filters::micro_usd;
use super::raw::{RawPrice, RawRoute, S};
use super::toml_key;
use super::types::{FilterConf, FilterKind};
use super::validate::Ck;

/// Resolves the price table, in the order written.
pub(crate) fn prices(ck: &mut Ck, raw: &[RawPrice]) -> PriceTable {
    let mut out = Vec::with_capacity(raw.len());
    for (i, p) in raw.iter().enumerate() {
        let k = |f: &str| format!("prices[{i}].{f}");
        if p.model.get_ref().is_empty() {
            ck.err(
                k("model"),
                p.model.span(),
                "a model glob must not be empty; use \"*\" for any model",
            );
        }
        let amount = |ck: &mut Ck, field: &str, v: Option<&S<f64>>| match v {
            None => 0,
            Some(v) => micro_usd(*v.get_ref()).unwrap_or_else(|m| {
                ck.err(
                    k(field),
                    v.span(),
                    format!("{m} (US dollars per million tokens)"),
                );
                0
            }),
        };
        let input = amount(ck, "input", Some(&p.input));
        let output = amount(ck, "output", Some(&p.output));
        // Unset cache prices are the input price: a provider that does not discount cached
        // tokens bills them as input.
        let cached_input = match &p.cached_input {
            None => input,
            v => amount(ck, "cached_input", v.as_ref()),
        };
        let cache_write = match &p.cache_write {
            None => input,
            v => amount(ck, "cache_write", v.as_ref()),
        };
        out.push((
            p.model.get_ref().clone(),
            Price {
                input,
                output,
                cached_input,
                cache_write,
            },
        ));
    }
    PriceTable::new(out)
}

/// Warns about a `cost-limit` on a route whose `models` name a glob no price matches (its
/// requests would be refused as unpriced, or counted at 0).
pub(crate) fn check_budgets(
    ck: &mut Ck,
    routes: &[RawRoute],
    filters: &[FilterConf],
    prices: &PriceTable,
) {
    for (i, r) in routes.iter().enumerate() {
        let budget = r.filters.iter().find(|f| {
            filters
                .iter()
                .any(|c| &c.name == f.get_ref() && matches!(c.kind, FilterKind::CostLimit(_)))
        });
        let Some(budget) = budget else { continue };
        for (glob, up) in &r.models.0 {
            if !prices.covers_glob(glob) {
                ck.warn(
                    format!("routes[{i}].models.{}", toml_key(glob)),
                    up.span(),
                    format!(
                        "cost-limit {:?} is on this route, but no [[prices]] entry matches \
                         models {glob:?}: its requests are unpriced",
                        budget.get_ref()
                    ),
                );
            }
        }
    }
}
