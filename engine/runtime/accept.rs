//! Taking the connections already queued on a listener without another io_uring
//! operation: each accept operation takes one connection and the next is submitted only
//! at the next turn of the worker's loop, so a burst of new connections waited a turn
//! each (epoll's accept loop takes them all in one turn).

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

use monoio::net::{TcpListener, TcpStream};

/// A connection waiting in `listener`'s queue, accepted now; `None` when none is (or the
/// accept failed: the loop's next accept operation reports that). Never blocks: the queue
/// is checked first (the listener is a blocking socket on io_uring, so an accept on an
/// empty queue would wait), and on Linux a queued connection stays queued until accepted,
/// even when its peer resets it.
pub fn queued(listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    let fd = listener.as_raw_fd();
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, a zero timeout.
    if unsafe { libc::poll(&mut p, 1, 0) } != 1 || p.revents & libc::POLLIN == 0 {
        return None;
    }
    // SAFETY: the listener owns `fd` and outlives this borrow.
    let listening = unsafe { BorrowedFd::borrow_raw(fd) };
    // `accept4` with close-on-exec: a blocking socket, as the io_uring accept gives.
    let (socket, peer) = socket2::SockRef::from(&listening).accept().ok()?;
    let peer = peer.as_socket()?;
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket)).ok()?;
    Some((stream, peer))
}

#[cfg(test)]
mod tests {
    use super::queued;
    use monoio::{io::AsyncReadRentExt, net::TcpListener, IoUringDriver, RuntimeBuilder};
    use std::io::Write;

    /// Three queued connections are taken, each with its peer's address and its bytes, and
    /// a fourth call on the empty queue returns at once.
    #[test]
    fn queued_connections_are_taken_without_blocking() {
        let Ok(mut rt) = RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .build()
        else {
            eprintln!("no io_uring here: skipped");
            return;
        };
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            let addr = l.local_addr().expect("local addr");
            let mut clients = Vec::new();
            for i in 0..3u8 {
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.write_all(&[b'a' + i]).expect("send");
                clients.push(c);
            }
            let mut seen = Vec::new();
            for _ in 0..3 {
                let (mut s, peer) = queued(&l).expect("a queued connection");
                let (r, b) = s.read_exact(vec![0u8; 1]).await;
                r.expect("read");
                let local = clients
                    .iter()
                    .map(|c| c.local_addr().expect("client addr"))
                    .find(|a| *a == peer);
                assert!(local.is_some(), "{peer} is not one of the clients");
                seen.push(b[0]);
            }
            seen.sort_unstable();
            assert_eq!(seen, b"abc");
            assert!(queued(&l).is_none(), "an empty queue gives nothing");
        });
    }
}
