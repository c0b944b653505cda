//! Receive into a buffer that the kernel picks from a provided-buffer ring
//! (io_uring `IORING_OP_RECV` with `IOSQE_BUFFER_SELECT`, Linux 5.19+ for
//! ring-mapped groups). Added to the published monoio 0.2.4: see the README
//! beside this crate.
//!
//! No buffer is tied to the operation while it waits: a connection waiting for
//! bytes holds no memory of its own, and a buffer is taken only when data
//! arrives. A receive dropped before its completion was seen may still have
//! taken one; [`OrphanBuffer`] hands its id back to whoever owns the ring.

use std::{
    any::Any,
    future::Future,
    io,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
};

#[cfg(all(target_os = "linux", feature = "iouring"))]
use io_uring::{opcode, squeue, types};

use super::{super::shared_fd::SharedFd, Op, OpAble};
#[cfg(any(feature = "legacy", feature = "poll-io"))]
use crate::driver::ready::Direction;

/// Called with the id of a buffer the kernel filled for a receive whose
/// future was dropped before it saw the completion.
pub type OrphanBuffer = Rc<dyn Fn(u16)>;

pub(crate) struct RecvSelect {
    /// Holds a strong ref to the FD, preventing the file from being closed
    /// while the operation is in-flight.
    #[allow(unused)]
    fd: SharedFd,
    group: u16,
    orphan: OrphanBuffer,
}

/// The buffer id a completion carries, if the kernel took one.
#[cfg(all(target_os = "linux", feature = "iouring"))]
pub(crate) fn selected_buffer(flags: u32) -> Option<u16> {
    io_uring::cqueue::buffer_select(flags)
}

#[cfg(not(all(target_os = "linux", feature = "iouring")))]
pub(crate) fn selected_buffer(_flags: u32) -> Option<u16> {
    None
}

/// Hands back the buffer a completion took, when the operation it belongs to
/// is a [`RecvSelect`] that nobody awaits anymore (the driver calls this for
/// every completion whose future is gone).
pub(crate) fn orphaned(data: &dyn Any, flags: u32) {
    if let (Some(op), Some(bid)) = (data.downcast_ref::<RecvSelect>(), selected_buffer(flags)) {
        (op.orphan)(bid);
    }
}

impl Op<RecvSelect> {
    pub(crate) fn recv_select(fd: &SharedFd, group: u16, orphan: OrphanBuffer) -> io::Result<Self> {
        Op::submit_with(RecvSelect {
            fd: fd.clone(),
            group,
            orphan,
        })
    }
}

/// A receive into a provided buffer, in the kernel from its creation on. It
/// resolves to the byte count (0 at end of stream) and the id of the buffer
/// that holds the bytes; a buffer id can come with any result, and the caller
/// owns that buffer from then on. A named type, so that it can wait inside a
/// struct (an idle pooled connection) and be polled later.
pub struct RecvSelectFuture {
    state: Result<Op<RecvSelect>, Option<io::Error>>,
}

impl RecvSelectFuture {
    pub(crate) fn submit(fd: &SharedFd, group: u16, orphan: OrphanBuffer) -> Self {
        Self {
            state: Op::recv_select(fd, group, orphan).map_err(Some),
        }
    }
}

impl Future for RecvSelectFuture {
    type Output = (io::Result<usize>, Option<u16>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            Ok(op) => {
                let complete = std::task::ready!(Pin::new(op).poll(cx));
                self.state = Err(None);
                Poll::Ready((
                    complete.meta.result.map(|n| n as usize),
                    selected_buffer(complete.meta.flags),
                ))
            }
            Err(e) => Poll::Ready((
                Err(e
                    .take()
                    .unwrap_or_else(|| io::Error::other("receive polled after it completed"))),
                None,
            )),
        }
    }
}

impl OpAble for RecvSelect {
    #[cfg(all(target_os = "linux", feature = "iouring"))]
    fn uring_op(&mut self) -> io_uring::squeue::Entry {
        // A length of 0 takes the whole of the buffer the kernel picks.
        opcode::Recv::new(types::Fd(self.fd.raw_fd()), std::ptr::null_mut(), 0)
            .buf_group(self.group)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
    }

    // The epoll driver has no provided buffers: callers check
    // `buf::provided::supported()` first, and get `Unsupported` otherwise.
    #[cfg(any(feature = "legacy", feature = "poll-io"))]
    #[inline]
    fn legacy_interest(&self) -> Option<(Direction, usize)> {
        None
    }

    #[cfg(any(feature = "legacy", feature = "poll-io"))]
    #[inline]
    fn legacy_call(&mut self) -> io::Result<u32> {
        Err(io::ErrorKind::Unsupported.into())
    }
}
