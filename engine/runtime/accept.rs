//! Taking the connections already queued on a listener without another io_uring
//! operation: each accept operation takes one connection and the next is submitted only
//! at the next turn of the worker's loop, so a burst of new connections waited a turn
//! each (epoll's accept loop takes them all in one turn).

use std::{
    mem::{size_of, MaybeUninit},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd},
};

use monoio::net::{TcpListener, TcpStream};

/// A connection waiting in `listener`'s queue, accepted now; `None` when none is (or the
/// accept failed: the loop's next accept operation reports that). Never blocks: the queue
/// is checked first (the listener is a blocking socket on io_uring, so an `accept4` on an
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
    let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` has room for any address and `len` says how much; the flags match
    // what the io_uring accept gives (a blocking socket) plus close-on-exec.
    let s = unsafe {
        libc::accept4(
            fd,
            storage.as_mut_ptr().cast(),
            &mut len,
            libc::SOCK_CLOEXEC,
        )
    };
    if s < 0 {
        return None;
    }
    // SAFETY: `accept4` returned a new descriptor that nothing else owns.
    let std = unsafe { std::net::TcpStream::from_raw_fd(s) };
    // SAFETY: the kernel filled `storage` (zeroed before, so the family is read as set).
    let peer = peer_of(unsafe { storage.assume_init_ref() })?;
    let stream = TcpStream::from_std(std).ok()?;
    Some((stream, peer))
}

/// The address an `accept4` wrote.
fn peer_of(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
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
