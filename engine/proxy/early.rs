//! Watching the upstream for an answer while the request body is still on
//! its way (RFC 9112 §9.5): an origin may refuse an upload (413, 401) after
//! reading only the head, and that answer must reach the client at once, not
//! after the client sent everything, and not as a 502 when the origin closes.
//!
//! The watch is a `dup` of the upstream socket: its readiness wait runs
//! beside the body transfer, which holds the original mutably. One readiness
//! operation covers the whole body; it is armed only for bodies that did not
//! arrive with the head.

use std::{
    future::Future,
    io,
    os::fd::{AsRawFd, FromRawFd},
};

use monoio::net::TcpStream;

use crate::transport::Stream;

/// A second handle on a socket (an upstream's, or a client's), used only to
/// wait for readability beside an operation that holds the socket itself.
pub(super) struct EarlyWatch {
    dup: TcpStream,
}

/// How a watched body transfer ended.
pub(super) enum Watched<T> {
    /// The transfer finished (or failed) on its own.
    Done(T),
    /// The upstream answered (or closed) first; the transfer was dropped.
    Answered,
}

impl EarlyWatch {
    /// A watch on `up`; `None` when the socket cannot be duplicated, or
    /// carries TLS, whose records a peek cannot read (the body is then sent
    /// unwatched, as before).
    pub(super) fn new(up: &Stream) -> Option<Self> {
        Self::on(up.tcp()?)
    }

    fn on(up: &TcpStream) -> Option<Self> {
        Self::on_fd(up.as_raw_fd())
    }

    /// A watch on the socket `fd`, which the caller's task owns and keeps open while the
    /// watch lives (the watch holds its own duplicate).
    pub(super) fn on_fd(fd: std::os::fd::RawFd) -> Option<Self> {
        // SAFETY: dup of a descriptor this task owns; the new descriptor is
        // owned by the std stream below and closed when the watch drops.
        let fd = unsafe { libc::dup(fd) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let std = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        TcpStream::from_std(std).ok().map(|dup| Self { dup })
    }

    /// Runs `transfer` until it ends or the upstream sends a final answer.
    /// An interim (1xx) answer does not stop the body: the transfer then runs
    /// on unwatched, and the response reader relays the 1xx as usual.
    ///
    /// `transfer` comes pinned by the caller: taken by value, it would be kept
    /// twice in this future's state (the argument, then its pinned move).
    pub(super) async fn run<F: Future>(
        &self,
        mut transfer: std::pin::Pin<&mut F>,
    ) -> Watched<F::Output> {
        let ready = std::pin::pin!(self.dup.readable(false));
        monoio::select! {
            r = &mut transfer => return Watched::Done(r),
            _ = ready => {},
        }
        if self.final_answer_waiting() {
            return Watched::Answered;
        }
        Watched::Done(transfer.await)
    }

    /// Runs `op` until it ends or the peer closes (a client that left while
    /// the upstream was still thinking). Bytes from the peer (a pipelined
    /// request, TLS records) are not a close: `op` then runs on unwatched.
    pub(super) async fn run_until_closed<T>(&self, op: impl Future<Output = T>) -> Watched<T> {
        let mut op = std::pin::pin!(op);
        let ready = std::pin::pin!(self.dup.readable(false));
        monoio::select! {
            r = &mut op => return Watched::Done(r),
            _ = ready => {},
        }
        if self.peek(&mut [0u8; PEEK]) == Some(0) {
            return Watched::Answered;
        }
        Watched::Done(op.await)
    }

    /// Up to [`PEEK`] waiting bytes, without taking them: `Some(0)` at a
    /// close or a reset, `None` when there is nothing after all (a spurious
    /// wake-up).
    fn peek(&self, buf: &mut [u8; PEEK]) -> Option<usize> {
        // SAFETY: a non-blocking peek into a buffer of the given length.
        let n = unsafe {
            libc::recv(
                self.dup.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) => Some(n),
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock => None,
            Err(_) => Some(0),
        }
    }

    /// Peeks at what the upstream sent: a close, a reset or anything but an
    /// interim status line ends the upload; nothing at all (a spurious
    /// wake-up) does not.
    fn final_answer_waiting(&self) -> bool {
        let mut buf = [0u8; PEEK];
        self.peek(&mut buf).is_some_and(|n| is_final(&buf[..n]))
    }
}

/// Bytes a peek looks at: enough for `HTTP/1.1 1`.
const PEEK: usize = 12;

/// True when `head` starts a final status line (or anything that is not a
/// status line); an empty peek is the upstream's close, which ends the upload
/// too. A status line cut before its code is not known to be final: the body
/// goes on, as it would without the watch.
fn is_final(head: &[u8]) -> bool {
    const START: &[u8] = b"HTTP/1.";
    match head.len() {
        0 => true,
        n if n < 10 => {
            let k = n.min(START.len());
            head[..k] != START[..k]
        }
        _ => !(head.starts_with(START) && head[9] == b'1'),
    }
}

#[cfg(test)]
mod tests {
    use super::is_final;

    #[test]
    fn only_an_interim_status_line_lets_the_body_go_on() {
        assert!(!is_final(b"HTTP/1.1 100 Continue"));
        assert!(!is_final(b"HTTP/1.1 103"));
        assert!(is_final(b"HTTP/1.1 413 Payload"));
        assert!(is_final(b"HTTP/1.0 200"));
        assert!(is_final(b""));
        assert!(is_final(b"garbage!!!!!"));
        assert!(!is_final(b"HTTP/"));
        assert!(!is_final(b"HTTP/1.1 "));
        assert!(is_final(b"HTX"));
    }
}
