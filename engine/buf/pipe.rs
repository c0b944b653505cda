//! Reusable per-worker pipes for `splice`.
//!
//! A splice moves bytes socket → pipe → socket without copying them through
//! user space. Pipes are kept per worker and reused, so a transfer costs no
//! `pipe2` call; a transfer that fails may leave bytes in its pipe, so a pipe
//! is only returned once it is known to be empty.

use std::{cell::RefCell, io, rc::Rc};

use monoio::net::{unix::new_pipe, Pipe};

/// Most idle pipes a worker keeps; more concurrent splices make new ones.
const MAX_IDLE_PIPES: usize = 64;

/// Bytes moved per splice call: the default pipe capacity (16 pages).
pub const SPLICE_CHUNK: u32 = 64 * 1024;

/// A pipe: `read` end and `write` end.
pub struct PipePair {
    /// The end a splice drains into a socket.
    pub read: Pipe,
    /// The end a splice fills from a socket.
    pub write: Pipe,
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
        Ok(PipePair { read, write })
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
