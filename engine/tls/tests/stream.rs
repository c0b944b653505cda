//! Moving bytes: echo in both roles and both versions, resumption, cancellation, idle buffers.

use super::*;

fn server_echo(version: &'static rustls::SupportedProtocolVersion, expect: &str) {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    let config = certs.client_config(&[version], &[b"http/1.1"], None);
    run(async {
        let pool = pool();
        let (listener, addr) = bind();
        let peer = echo_client(addr, config, "api.test", SIZES);
        let mut s = tls
            .accept(accept_one(&listener).await, &pool)
            .expect("accept");
        s.handshake().await.expect("handshake");
        assert_eq!(s.protocol_version(), Some(expect));
        assert_eq!(s.sni(), Some("api.test"));
        assert_eq!(s.alpn(), Some(&b"http/1.1"[..]));
        assert!(!s.resumed());
        let total = echo(&mut s, &pool).await.expect("echo");
        assert_eq!(total, SIZES.iter().sum::<usize>() as u64);
        assert_eq!(s.buffers_held(), 0);
        assert_eq!(pool.in_use(), 0, "no pool buffer held after the exchange");
        s.shutdown().await.expect("shutdown");
        assert_eq!(pool.in_use(), 0);
        drop(s);
        assert_eq!(
            join(peer)
                .expect("peer")
                .as_deref()
                .map(|s| s.contains("CN=api")),
            Some(true)
        );
    });
}

#[test]
fn server_role_echoes_every_size_over_tls13() {
    server_echo(&rustls::version::TLS13, "TLSv1.3");
}

#[test]
fn server_role_echoes_every_size_over_tls12() {
    server_echo(&rustls::version::TLS12, "TLSv1.2");
}

/// A std-thread rustls server that echoes until close_notify, `conns` connections in a row.
fn echo_server(
    std_listener: std::net::TcpListener,
    config: Arc<ServerConfig>,
    conns: usize,
) -> Peer {
    std::thread::spawn(move || {
        for _ in 0..conns {
            let (tcp, _) = std_listener.accept().map_err(|e| e.to_string())?;
            let conn = ServerConnection::new(config.clone()).map_err(|e| e.to_string())?;
            let mut s = StreamOwned::new(conn, tcp);
            let mut buf = vec![0; 64 * 1024];
            loop {
                let n = s.read(&mut buf).map_err(|e| format!("server read: {e}"))?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            }
        }
        Ok(None)
    })
}

async fn client_echo_sizes(s: &mut TlsStream, pool: &BufPool) {
    for &n in SIZES {
        let mut out = pool.acquire().await;
        let mut sent = 0;
        while sent < n {
            out.clear();
            let k = (n - sent).min(out.capacity());
            let block: Vec<u8> = (sent..sent + k).map(|i| (i % 251) as u8).collect();
            out.put(&block).expect("fits");
            s.write_all(&out, 0..k).await.expect("write");
            let mut got = 0;
            while got < k {
                let mut back = pool.acquire().await;
                let r = s.read(&mut back, k - got).await.expect("read");
                assert!(r > 0, "upstream closed early");
                assert_eq!(&back[..], &block[got..got + r]);
                got += r;
            }
            sent += k;
        }
    }
}

fn client_echo(version: &'static rustls::SupportedProtocolVersion, expect: &str) {
    let certs = Certs::new();
    let upstream = certs.upstream().for_worker();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = std_listener.local_addr().expect("addr");
    let server = echo_server(std_listener, certs.server_config(&[version]), 2);
    run(async {
        let pool = pool();
        for round in 0..2 {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let mut s = upstream
                .connect(tcp, "api.test:443", &pool)
                .expect("connect tls");
            s.handshake().await.expect("handshake");
            assert_eq!(s.protocol_version(), Some(expect));
            client_echo_sizes(&mut s, &pool).await;
            // The second connection resumes the first's session from this worker's cache.
            assert_eq!(s.resumed(), round == 1, "round {round}");
            s.shutdown().await.expect("shutdown");
            assert_eq!(s.buffers_held(), 0);
            assert_eq!(pool.in_use(), 0);
        }
    });
    join(server).expect("server");
}

#[test]
fn client_role_echoes_and_resumes_over_tls13() {
    client_echo(&rustls::version::TLS13, "TLSv1.3");
}

#[test]
fn client_role_echoes_and_resumes_over_tls12() {
    client_echo(&rustls::version::TLS12, "TLSv1.2");
}

#[test]
fn a_cancelled_read_poisons_the_stream_without_panic() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    let config = certs.client_config(&[&rustls::version::TLS13], &[], None);
    run(async {
        let pool = pool();
        let (listener, addr) = bind();
        // A client that handshakes and then says nothing for a while.
        let peer = std::thread::spawn(move || {
            let tcp = std::net::TcpStream::connect(addr).expect("connect");
            let conn =
                ClientConnection::new(config, ServerName::try_from("api.test").expect("name"))
                    .expect("client");
            let mut s = StreamOwned::new(conn, tcp);
            s.flush().expect("hello");
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock).expect("handshake");
            }
            std::thread::sleep(Duration::from_millis(800));
        });
        let mut s = tls
            .accept(accept_one(&listener).await, &pool)
            .expect("accept");
        s.handshake().await.expect("handshake");
        let mut buf = pool.acquire().await;
        let res = deadline::timeout(Duration::from_millis(200), s.read(&mut buf, 100)).await;
        assert!(res.is_err(), "the read must time out");
        assert!(s.is_poisoned());
        assert!(matches!(
            s.read(&mut buf, 100).await,
            Err(TlsError::Poisoned)
        ));
        assert!(matches!(s.write_slice(b"x").await, Err(TlsError::Poisoned)));
        assert!(matches!(s.readable().await, Err(TlsError::Poisoned)));
        drop(buf);
        drop(s);
        assert_eq!(pool.in_use(), 0, "the cancelled read's buffer went back");
        let _ = peer.join();
    });
}

#[test]
fn reads_into_a_small_room_keep_the_rest_pending() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    let config = certs.client_config(&[&rustls::version::TLS13], &[], None);
    run(async {
        let pool = pool();
        let (listener, addr) = bind();
        let peer = std::thread::spawn(move || {
            let tcp = std::net::TcpStream::connect(addr).expect("connect");
            let conn =
                ClientConnection::new(config, ServerName::try_from("api.test").expect("name"))
                    .expect("client");
            let mut s = StreamOwned::new(conn, tcp);
            s.write_all(&[b'z'; 10_000]).expect("write");
            s.conn.send_close_notify();
            s.flush().expect("flush");
            drain(&mut s.sock);
        });
        let mut s = tls
            .accept(accept_one(&listener).await, &pool)
            .expect("accept");
        s.handshake().await.expect("handshake");
        let mut total = 0;
        loop {
            let mut buf = pool.acquire().await;
            let n = s.read(&mut buf, 7).await.expect("read");
            if n == 0 {
                break;
            }
            assert!(n <= 7);
            assert!(buf.iter().all(|b| *b == b'z'));
            total += n;
            // Plaintext not yet consumed stays in one pool buffer while the request is read.
            assert!(s.buffers_held() <= 2);
        }
        assert_eq!(total, 10_000);
        assert_eq!(s.buffers_held(), 0);
        drop(s);
        assert_eq!(pool.in_use(), 0);
        let _ = peer.join();
    });
}
