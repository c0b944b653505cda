//! Per-worker counters; a worker owns its own, nothing is shared or locked.

use std::{cell::Cell, rc::Rc};

/// Counters one worker keeps.
#[derive(Default)]
pub struct WorkerStats {
    connections: Rc<Cell<u64>>,
}

impl WorkerStats {
    /// Counts an open client connection until the guard drops.
    pub fn connection(&self) -> ConnGuard {
        self.connections.set(self.connections.get() + 1);
        ConnGuard(self.connections.clone())
    }

    /// Client connections open now.
    pub fn connections(&self) -> u64 {
        self.connections.get()
    }
}

/// Decrements the open-connection count when dropped.
pub struct ConnGuard(Rc<Cell<u64>>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}
