//! Who may connect: SNI certificate choice, ALPN, versions, client certificates, garbage.

use super::*;
use crate::tls::sni::SniResolver;

/// A std-thread rustls client that only handshakes; returns rustls's error text on failure.
fn handshake_client(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: &'static str,
) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let sn = ServerName::try_from(name).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(config, sn).map_err(|e| e.to_string())?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
        }
        s.write_all(b"ping").map_err(|e| e.to_string())?;
        s.conn.send_close_notify();
        s.flush().map_err(|e| e.to_string())?;
        drain(&mut s.sock);
        Ok(())
    })
}

/// The server's view after a handshake: the SNI it saw and the client certificate subject.
type Seen = Result<(Option<String>, Option<String>), TlsError>;

/// Runs one server handshake against `config`; returns the server's result and the client's.
fn try_handshake(
    tls: &ServerTls,
    config: Arc<ClientConfig>,
    name: &'static str,
) -> (Seen, Result<(), String>) {
    run(async {
        let pool = pool();
        let (listener, addr) = bind();
        let peer = handshake_client(addr, config, name);
        let mut s = tls
            .accept(accept_one(&listener).await, &pool)
            .expect("accept");
        let res = deadline::timeout(Duration::from_secs(10), s.handshake())
            .await
            .expect("handshake in time")
            .map(|_| {
                (
                    s.sni().map(str::to_string),
                    s.client_subject().map(str::to_string),
                )
            });
        if res.is_ok() {
            // Read the client's "ping" and close_notify before closing.
            let mut buf = pool.acquire().await;
            while let Ok(n) = s.read(&mut buf, usize::MAX).await {
                if n == 0 {
                    break;
                }
                buf.clear();
            }
        }
        drop(s);
        assert_eq!(pool.in_use(), 0);
        (res, peer.join().unwrap_or_else(|_| Err("panicked".into())))
    })
}

#[test]
fn sni_picks_exact_then_wildcard_then_the_first() {
    let certs = Certs::new();
    let api = certs.pair("api").loaded;
    let wild = certs.pair("wild").loaded;
    let r = SniResolver::new(vec![
        (api.key.clone(), api.names.clone()),
        (wild.key.clone(), wild.names.clone()),
    ])
    .expect("resolver");
    let subject = |sni: Option<&str>| {
        let ck = r.pick(sni);
        certs::subject_of(ck.cert[0].as_ref()).unwrap_or_default()
    };
    assert!(subject(Some("api.test")).contains("CN=api"));
    assert!(subject(Some("API.Test.")).contains("CN=api"));
    assert!(subject(Some("x.wild.test")).contains("CN=wild"));
    // One label only: neither the parent nor a deeper name matches the wildcard.
    assert!(subject(Some("wild.test")).contains("CN=api"));
    assert!(subject(Some("a.b.wild.test")).contains("CN=api"));
    assert!(subject(Some("other.test")).contains("CN=api"));
    assert!(subject(None).contains("CN=api"));
}

#[test]
fn a_wildcard_name_gets_the_wildcard_certificate_in_a_real_handshake() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    let config = certs.client_config(&[&rustls::version::TLS13], &[b"http/1.1"], None);
    let (server, client) = try_handshake(&tls, config, "x.wild.test");
    client.expect("client verified the wildcard certificate");
    assert_eq!(server.expect("server").0.as_deref(), Some("x.wild.test"));
}

#[test]
fn a_client_without_sni_gets_the_default_certificate() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    // An IP address as server name: rustls sends no SNI. The default (api.test) certificate
    // does not name 127.0.0.1, so verification fails on the client, after the server chose it.
    let config = certs.client_config(&[&rustls::version::TLS13], &[], None);
    let (server, client) = try_handshake(&tls, config, "127.0.0.1");
    let err = client.expect_err("the api.test certificate does not name 127.0.0.1");
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for name"),
        "{err}"
    );
    assert!(server.is_err());
}

#[test]
fn a_client_offering_only_h2_is_refused_with_no_application_protocol() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    let config = certs.client_config(&[&rustls::version::TLS13], &[b"h2"], None);
    let (server, client) = try_handshake(&tls, config, "api.test");
    assert!(matches!(server, Err(TlsError::Protocol(_))), "{server:?}");
    let err = client.expect_err("refused");
    assert!(err.contains("NoApplicationProtocol"), "{err}");
}

#[test]
fn min_version_13_refuses_a_tls12_client() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_3, None);
    let config = certs.client_config(&[&rustls::version::TLS12], &[], None);
    let (server, client) = try_handshake(&tls, config, "api.test");
    assert!(matches!(server, Err(TlsError::Protocol(_))), "{server:?}");
    let err = client.expect_err("refused");
    assert!(err.contains("ProtocolVersion"), "{err}");
    // And a TLS 1.3 client is fine.
    let config = certs.client_config(&[&rustls::version::TLS13], &[], None);
    let (server, client) = try_handshake(&tls, config, "api.test");
    assert!(server.is_ok() && client.is_ok(), "{server:?} {client:?}");
}

#[test]
fn client_certificates_required_and_optional() {
    let certs = Certs::new();
    let required = certs.listener(TlsVersion::V1_2, Some(ClientAuthMode::Required));
    let anonymous = certs.client_config(&[&rustls::version::TLS13], &[], None);
    let with_cert = certs.client_config(&[&rustls::version::TLS13], &[], Some("alice"));

    let (server, _) = try_handshake(&required, anonymous.clone(), "api.test");
    assert!(matches!(server, Err(TlsError::Protocol(_))), "{server:?}");
    let (server, client) = try_handshake(&required, with_cert.clone(), "api.test");
    client.expect("client");
    let subject = server.expect("server").1.expect("subject");
    assert!(
        subject.contains("CN=alice") && subject.contains("O=Ringway Tests"),
        "{subject}"
    );

    let optional = certs.listener(TlsVersion::V1_2, Some(ClientAuthMode::Optional));
    let (server, client) = try_handshake(&optional, anonymous, "api.test");
    client.expect("client");
    assert_eq!(server.expect("server").1, None);
    let (server, _) = try_handshake(&optional, with_cert, "api.test");
    assert!(server.expect("server").1.is_some());
}

#[test]
fn garbage_instead_of_a_client_hello_fails_cleanly() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    run(async {
        let pool = pool();
        let (listener, addr) = bind();
        let peer = std::thread::spawn(move || {
            let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink);
        });
        let mut s = tls
            .accept(accept_one(&listener).await, &pool)
            .expect("accept");
        let res = s.handshake().await;
        assert!(matches!(res, Err(TlsError::Protocol(_))), "{res:?}");
        assert!(s.is_poisoned());
        drop(s);
        assert_eq!(pool.in_use(), 0);
        let _ = peer.join();
    });
    // A peer that closes mid-handshake is an EOF, not a panic.
    run(async {
        let pool = pool();
        let (listener, addr) = bind();
        let peer = std::thread::spawn(move || {
            let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
            let _ = tcp.write_all(&[22, 3, 1, 0, 200, 1]);
        });
        let mut s = tls
            .accept(accept_one(&listener).await, &pool)
            .expect("accept");
        let res = s.handshake().await;
        assert!(matches!(res, Err(TlsError::HandshakeEof)), "{res:?}");
        let _ = peer.join();
    });
}

#[test]
fn an_oversized_handshake_before_authentication_holds_two_slots_at_most() {
    let certs = Certs::new();
    let tls = certs.listener(TlsVersion::V1_2, None);
    run(async {
        let pool = pool();
        let (listener, addr) = bind();
        let peer = std::thread::spawn(move || {
            let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
            // A ClientHello announced as 60,000 bytes, sent as full 16 KiB records.
            let mut first = vec![1u8, 0x00, 0xea, 0x60];
            first.resize(16 * 1024, 0);
            for i in 0..3 {
                let body: &[u8] = if i == 0 { &first } else { &[0u8; 16 * 1024] };
                let mut rec = vec![22u8, 3, 1, 0x40, 0x00];
                rec.extend_from_slice(body);
                if tcp.write_all(&rec).is_err() {
                    break;
                }
            }
            let mut sink = Vec::new();
            let _ = tcp.read_to_end(&mut sink);
        });
        let mut s = tls
            .accept(accept_one(&listener).await, &pool)
            .expect("accept");
        let res = s.handshake().await;
        assert!(matches!(res, Err(TlsError::TooLarge(_))), "{res:?}");
        // Two slots, and for a moment the one being copied out of (128 KiB before: 8 + 4).
        assert!(
            pool.peak() <= 3,
            "held {} slots before authentication",
            pool.peak()
        );
        drop(s);
        assert_eq!(pool.in_use(), 0);
        let _ = peer.join();
    });
}

#[test]
fn an_upstream_with_a_wrong_name_is_refused() {
    let certs = Certs::new();
    let upstream = certs.upstream();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = std_listener.local_addr().expect("addr");
    let config = certs.server_config(&[&rustls::version::TLS13]);
    let server = std::thread::spawn(move || {
        if let Ok((tcp, _)) = std_listener.accept() {
            let mut s = StreamOwned::new(ServerConnection::new(config).expect("conn"), tcp);
            let mut b = [0u8; 16];
            let _ = s.read(&mut b);
        }
    });
    run(async {
        let pool = pool();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut s = upstream.connect(tcp, "other.test:443", &pool).expect("tls");
        let res = s.handshake().await;
        assert!(
            matches!(
                res,
                Err(TlsError::Protocol(rustls::Error::InvalidCertificate(_)))
            ),
            "{res:?}"
        );
    });
    let _ = server.join();
    assert_eq!(
        upstream.server_name("10.0.0.1:443").expect("ip"),
        ServerName::try_from("10.0.0.1").expect("ip name")
    );
    assert_eq!(crate::tls::client::endpoint_host("[::1]:443"), "::1");
    assert_eq!(
        crate::tls::client::endpoint_host("api.openai.com:443"),
        "api.openai.com"
    );
}
