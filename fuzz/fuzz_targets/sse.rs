//! The SSE parser and usage tracker: never panic, hold at most one frame,
//! and see the same events whatever the read boundaries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway_filters::{sse::SseParser, usage::UsageTracker};

fn events(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut p = SseParser::new(4096);
    let mut t = UsageTracker::new();
    let mut out = Vec::new();
    for part in parts {
        p.feed(part, &mut |ev| {
            let _ = t.on_event(&ev);
            out.push(ev.data.to_vec());
        });
        assert!(p.held_bytes() <= 4096 + 8);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = events(&[data]);
    if data.len() > 1 {
        let mid = data[0] as usize % data.len();
        assert_eq!(whole, events(&[&data[..mid], &data[mid..]]));
    }
});
