//! Reusable per-worker pipes for `splice`.
//!
//! A splice moves bytes socket → pipe → socket without copying them through
//! user space. Pipes are kept per worker and reused, so a transfer costs no
//! `pipe2` call; a transfer that fails may leave bytes in its pipe, so a pipe
//! is only returned once it is known to be empty.
//!
//! A pipe is grown to [`LARGE_PIPE`] (`F_SETPIPE_SZ`): each splice then moves
//! up to 1 MiB instead of the default 64 KiB, so a large body takes a
//! sixteenth of the splice round trips (each one a hop through io_uring's
//! worker threads). Measured with `scripts/bench.sh --only download1g`: 1 GiB
//! at 587–1,135 MiB/s and 0.84–1.23 s of CPU with 64 KiB pipes, 1,510–1,803
//! MiB/s and 0.33–0.41 s with 1 MiB ones. The kernel counts a pipe's
//! capacity against its user (`fs.pipe-user-pages-soft`, 64 MiB by default;
//! past it, an unprivileged user's new pipes get two pages), so the large
//! pipes of the whole process stay under [`LARGE_PIPES_BUDGET`] and the rest
//! keep the default size. Pages are only taken while bytes are in flight.

use std::{
    cell::RefCell,
    io,
    os::fd::AsRawFd,
    rc::Rc,
    sync::atomic::{AtomicUsize, Ordering},
};

use monoio::net::{unix::new_pipe, Pipe};

/// Most idle pipes a worker keeps; more concurrent splices make new ones.
const MAX_IDLE_PIPES: usize = 64;

/// The default pipe capacity (16 pages).
const DEFAULT_PIPE: u32 = 64 * 1024;

/// The capacity a pipe is grown to (Linux's default `fs.pipe-max-size`).
pub const LARGE_PIPE: u32 = 1024 * 1024;

/// Most bytes of pipe capacity grown by this process at once: half the default
/// per-user soft limit, so the user's other pipes keep their full size.
pub const LARGE_PIPES_BUDGET: usize = 32 * 1024 * 1024;

/// Capacity of the large pipes that exist now, across workers.
static LARGE_PIPES: AtomicUsize = AtomicUsize::new(0);

/// A pipe: `read` end and `write` end.
pub struct PipePair {
    /// The end a splice drains into a socket.
    pub read: Pipe,
    /// The end a splice fills from a socket.
    pub write: Pipe,
    /// Bytes the pipe holds at most: what one splice moves.
    cap: u32,
}

impl PipePair {
    /// Bytes one splice through this pipe moves at most.
    pub fn capacity(&self) -> u32 {
        self.cap
    }
}

impl Drop for PipePair {
    fn drop(&mut self) {
        if self.cap > DEFAULT_PIPE {
            LARGE_PIPES.fetch_sub(self.cap as usize, Ordering::Relaxed);
        }
    }
}

/// Grows a new pipe to [`LARGE_PIPE`] while the budget allows; returns its capacity.
fn grow(write: &Pipe) -> u32 {
    let want = LARGE_PIPE as usize;
    let reserved = LARGE_PIPES.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
        (used + want <= LARGE_PIPES_BUDGET).then_some(used + want)
    });
    if reserved.is_err() {
        return DEFAULT_PIPE;
    }
    // SAFETY: fcntl on a descriptor this pipe owns; F_SETPIPE_SZ takes an integer.
    let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
    match u32::try_from(got) {
        // The kernel rounds up to a power of two pages: at least what was asked.
        Ok(cap) if cap as usize >= want => cap.min(LARGE_PIPE),
        _ => {
            // Refused (a lower `fs.pipe-max-size`, the user's pipe pages spent): default size.
            LARGE_PIPES.fetch_sub(want, Ordering::Relaxed);
            DEFAULT_PIPE
        }
    }
}

/// A worker's idle pipes.
#[derive(Clone, Default)]
pub struct PipePool {
    idle: Rc<RefCell<Vec<PipePair>>>,
}

impl PipePool {
    /// An empty pool; pipes are made on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty pipe, reused or new.
    pub fn take(&self) -> io::Result<PipePair> {
        if let Some(p) = self.idle.borrow_mut().pop() {
            return Ok(p);
        }
        let (read, write) = new_pipe()?;
        let cap = grow(&write);
        Ok(PipePair { read, write, cap })
    }

    /// Returns a pipe the caller has fully drained.
    pub fn give_back(&self, pipe: PipePair) {
        let mut idle = self.idle.borrow_mut();
        if idle.len() < MAX_IDLE_PIPES {
            idle.push(pipe);
        }
    }

    /// Idle pipes held now.
    pub fn idle(&self) -> usize {
        self.idle.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pipes grow to 1 MiB until the budget is spent, then keep the default size; a large
    /// pipe's capacity returns to the budget when it is dropped.
    #[test]
    fn pipes_grow_within_the_budget() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let pool = PipePool::new();
            let n = LARGE_PIPES_BUDGET / LARGE_PIPE as usize;
            let mut pipes = Vec::new();
            for _ in 0..n + 2 {
                pipes.push(pool.take().expect("pipe"));
            }
            let large = pipes.iter().filter(|p| p.capacity() == LARGE_PIPE).count();
            // Only a kernel whose pipe-max-size is below 1 MiB may refuse them all.
            let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            let want = if max.is_some_and(|m| m < u64::from(LARGE_PIPE)) {
                0
            } else {
                n
            };
            assert_eq!(
                large,
                want,
                "large pipes of {} (pipe-max-size {max:?})",
                pipes.len()
            );
            // The kernel holds what the capacity says.
            for p in pipes.iter().filter(|p| p.capacity() == LARGE_PIPE) {
                // SAFETY: fcntl on a descriptor the pipe owns; F_GETPIPE_SZ takes no argument.
                let got = unsafe { libc::fcntl(p.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
                assert_eq!(got, LARGE_PIPE as libc::c_int);
            }
            assert!(pipes[n..].iter().all(|p| p.capacity() == DEFAULT_PIPE));
            assert!(LARGE_PIPES.load(Ordering::Relaxed) <= LARGE_PIPES_BUDGET);
            pipes.clear();
            assert_eq!(LARGE_PIPES.load(Ordering::Relaxed), 0);
            if large > 0 {
                assert_eq!(pool.take().expect("pipe").capacity(), LARGE_PIPE);
            }
        });
    }
}
