//! Start-up checks for listen addresses.
//!
//! Workers bind with SO_REUSEPORT, which would let a second Ringway (or any
//! process of the same user) silently share a port. Before the workers bind,
//! each address is bound once without SO_REUSEPORT: that fails when anything
//! already listens there, and the start fails with a clear error.

use std::net::{SocketAddr, TcpListener};

/// Fails with a message naming the listener when its address is taken.
pub fn check_free(name: &str, addr: SocketAddr) -> Result<(), String> {
    // std sets SO_REUSEADDR (so TIME_WAIT leftovers do not count) but not
    // SO_REUSEPORT, so an active listener makes this fail.
    match TcpListener::bind(addr) {
        Ok(probe) => {
            drop(probe);
            Ok(())
        }
        Err(e) => Err(format!(
            "listener {name}: cannot bind {addr}: {e} (is another process listening there?)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_is_reported() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap();
        let err = check_free("public", addr).unwrap_err();
        assert!(err.contains("public"), "{err}");
        drop(held);
        assert!(check_free("public", addr).is_ok());
    }
}
