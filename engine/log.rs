//! Process log lines on stderr: start-up, configuration and rare errors only.
//! Nothing per request is logged here (the access log belongs to the control core).

use std::{
    io::Write,
    sync::atomic::{AtomicU8, Ordering},
};

static LEVEL: AtomicU8 = AtomicU8::new(2);

/// Sets the most verbose level written: "error", "warn", "info" or "debug".
pub fn set_level(level: &str) {
    let l = match level {
        "error" => 0,
        "warn" => 1,
        "debug" => 3,
        _ => 2,
    };
    LEVEL.store(l, Ordering::Relaxed);
}

fn emit(level: u8, tag: &str, msg: &str) {
    if level <= LEVEL.load(Ordering::Relaxed) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "ringway {tag}: {msg}");
    }
}

/// Logs an error.
pub fn error(msg: &str) {
    emit(0, "error", msg)
}

/// Logs a warning.
pub fn warn(msg: &str) {
    emit(1, "warn", msg)
}

/// Logs a notice.
pub fn info(msg: &str) {
    emit(2, "info", msg)
}

/// Logs detail for debugging.
pub fn debug(msg: &str) {
    emit(3, "debug", msg)
}
