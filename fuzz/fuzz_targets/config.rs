//! The config loader: any text gives a config or errors, never a panic, and
//! every error names a line within the text when it names one.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errs) = ringway::config::load_str(text, "fuzz") {
        let lines = text.lines().count().max(1);
        for e in &errs.0 {
            if let Some(l) = e.line {
                assert!(l >= 1 && l <= lines + 1, "line {l} of {lines}");
            }
        }
    }
});
