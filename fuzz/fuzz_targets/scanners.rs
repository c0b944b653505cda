//! The request-body scanners (model, estimate, JSON usage): never panic on
//! any body, whole or split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway_filters::{
    model::ModelScanner,
    usage::{JsonUsageScanner, RequestEstimator},
};

fuzz_target!(|data: &[u8]| {
    let mid = if data.is_empty() {
        0
    } else {
        data[0] as usize % data.len()
    };
    let mut m = ModelScanner::new();
    let _ = m.feed(&data[..mid]);
    let _ = m.feed(&data[mid..]);
    let _ = m.finish();
    let mut e = RequestEstimator::new();
    e.feed(&data[..mid]);
    e.feed(&data[mid..]);
    e.finish();
    let _ = e.include_usage_injection();
    let mut j = JsonUsageScanner::new();
    j.feed(&data[..mid]);
    j.feed(&data[mid..]);
    j.finish();
    let _ = j.usage();
});
