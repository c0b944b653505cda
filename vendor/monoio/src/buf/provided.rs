//! Provided-buffer rings: the kernel picks a receive's buffer when data
//! arrives, so a waiting receive holds no buffer (io_uring, Linux 5.19+).
//! Added to the published monoio 0.2.4: see the README beside this crate.
//!
//! The ring's memory and its buffers belong to the caller, who registers the
//! ring here, receives with [`TcpStream::recv_select`], and refills the ring
//! with the buffers it gets back.
//!
//! [`TcpStream::recv_select`]: crate::net::TcpStream::recv_select

use std::io;

pub use crate::driver::op::recv_select::{OrphanBuffer, RecvSelectFuture};
use crate::driver::{Inner, CURRENT};

/// Whether the current thread runs an io_uring driver (provided buffers need
/// one; registration can still fail on a kernel older than 5.19).
pub fn supported() -> bool {
    CURRENT.is_set() && CURRENT.with(|inner| matches!(inner, Inner::Uring(_)))
}

/// Registers a ring of `entries` buffer slots at `ring_addr` as buffer group
/// `group` of the current thread's io_uring.
///
/// # Safety
/// `ring_addr` must be page-aligned and point at `entries` (a power of two)
/// `io_uring_buf` slots that stay valid, and every buffer the ring hands the
/// kernel must stay valid, until [`unregister_buf_ring`] or the runtime's end.
pub unsafe fn register_buf_ring(ring_addr: u64, entries: u16, group: u16) -> io::Result<()> {
    if !CURRENT.is_set() {
        return Err(io::ErrorKind::Unsupported.into());
    }
    CURRENT.with(|inner| match inner {
        Inner::Uring(this) => {
            crate::driver::UringInner::register_buf_ring(this, ring_addr, entries, group)
        }
        #[allow(unreachable_patterns)]
        _ => Err(io::ErrorKind::Unsupported.into()),
    })
}

/// Unregisters buffer group `group` of the current thread's io_uring.
pub fn unregister_buf_ring(group: u16) -> io::Result<()> {
    if !CURRENT.is_set() {
        return Err(io::ErrorKind::Unsupported.into());
    }
    CURRENT.with(|inner| match inner {
        Inner::Uring(this) => crate::driver::UringInner::unregister_buf_ring(this, group),
        #[allow(unreachable_patterns)]
        _ => Err(io::ErrorKind::Unsupported.into()),
    })
}
