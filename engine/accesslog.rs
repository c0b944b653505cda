//! The access log: one JSON line per request.
//!
//! Workers never write files. Each worker formats its lines into its own
//! bounded buffer and hands the buffer over once per tick (or when it fills)
//! through a bounded channel to the log thread, which alone writes — to
//! stdout or a file it reopens on SIGUSR1 for logrotate. When the channel is
//! full or a write fails, lines are dropped and counted
//! (`ringway_access_log_dropped_total`); traffic is never held up.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Mutex, OnceLock,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{config::AccessLog, log, metrics::registry};

/// A worker flushes its lines once they reach this size, even mid-tick.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Batches in flight to the writer before lines are dropped.
const CHANNEL_BATCHES: usize = 256;

struct Sink {
    tx: SyncSender<Vec<u8>>,
}

static SINK: OnceLock<Mutex<Option<Sink>>> = OnceLock::new();
static REOPEN: AtomicBool = AtomicBool::new(false);
/// Where lines go now; the writer reads it when it (re)opens.
static TARGET: Mutex<Option<AccessLog>> = Mutex::new(None);

/// Asks the writer to reopen its file (SIGUSR1).
pub fn request_reopen() {
    REOPEN.store(true, Ordering::Relaxed);
}

/// Points the access log at `target`, starting the writer on first use.
pub fn configure(target: &AccessLog) -> Result<(), String> {
    if let Ok(mut t) = TARGET.lock() {
        let changed = t.as_ref() != Some(target);
        *t = Some(target.clone());
        if changed {
            request_reopen();
        }
    }
    if *target == AccessLog::Off {
        return Ok(());
    }
    let slot = SINK.get_or_init(|| Mutex::new(None));
    let mut sink = slot
        .lock()
        .map_err(|_| "access log lock poisoned".to_string())?;
    if sink.is_none() {
        let (tx, rx) = mpsc::sync_channel(CHANNEL_BATCHES);
        thread::Builder::new()
            .name("ringway-log".into())
            .spawn(move || writer(rx))
            .map_err(|e| format!("cannot start the access-log thread: {e}"))?;
        *sink = Some(Sink { tx });
    }
    Ok(())
}

/// Hands a worker's batch of lines to the writer; never blocks.
pub fn submit(batch: Vec<u8>) -> Option<Vec<u8>> {
    let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
    let slot = SINK.get()?;
    let tx = match slot.lock() {
        Ok(s) => s.as_ref().map(|s| s.tx.clone()),
        Err(_) => None,
    };
    let Some(tx) = tx else {
        registry().access_log_dropped.add(lines);
        return None;
    };
    match tx.try_send(batch) {
        Ok(()) => None,
        Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
            registry().access_log_dropped.add(lines);
            Some(b)
        }
    }
}

enum Out {
    Stdout,
    File(File),
    Closed,
}

fn open() -> Out {
    let target = TARGET.lock().ok().and_then(|t| t.clone());
    match target {
        Some(AccessLog::Stdout) => Out::Stdout,
        Some(AccessLog::Path(p)) => open_file(&p),
        _ => Out::Closed,
    }
}

fn open_file(p: &PathBuf) -> Out {
    match OpenOptions::new().create(true).append(true).open(p) {
        Ok(f) => Out::File(f),
        Err(e) => {
            log::error(&format!("access log: cannot open {}: {e}", p.display()));
            Out::Closed
        }
    }
}

fn writer(rx: Receiver<Vec<u8>>) {
    let mut out = open();
    loop {
        let batch = match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(b) => Some(b),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if REOPEN.swap(false, Ordering::Relaxed) {
            out = open();
        }
        let Some(batch) = batch else { continue };
        let ok = match &mut out {
            Out::Stdout => std::io::stdout().lock().write_all(&batch).is_ok(),
            Out::File(f) => f.write_all(&batch).is_ok(),
            Out::Closed => false,
        };
        if !ok {
            let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
            registry().access_log_dropped.add(lines);
            // A file that failed (full disk, removed) is tried again later.
            if matches!(out, Out::File(_)) {
                out = Out::Closed;
                request_reopen();
            } else if matches!(out, Out::Closed) {
                request_reopen();
            }
        }
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[(b >> 4) as usize]);
                out.push(HEX[(b & 0xf) as usize]);
            }
            // Non-UTF-8 bytes would make the line invalid JSON.
            0x80..=0xff => out.extend_from_slice(b"\\ufffd"),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Appends the current UTC time as RFC 3339 with milliseconds.
pub fn push_time(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    );
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_is_rfc3339_utc() {
        let mut out = Vec::new();
        push_time(
            &mut out,
            UNIX_EPOCH + Duration::from_millis(1_795_370_000_123),
        );
        assert_eq!(String::from_utf8(out).unwrap(), "2026-11-22T17:53:20.123Z");
        let mut out = Vec::new();
        push_time(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400)); // leap day 2000
        assert_eq!(String::from_utf8(out).unwrap(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn strings_are_escaped_to_valid_json() {
        let mut out = Vec::new();
        push_json_str(&mut out, b"a\"b\\c\n\x01\xff");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""a\"b\\c\n\u0001\ufffd""#
        );
    }
}
