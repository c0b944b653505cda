"""Ringway as an HTTP/1.1 reverse proxy: methods, framing, headers, routing, upgrades, keep-alive."""

import base64
import hashlib
import http.client
import json
import os
import socket
import subprocess
import time

import pytest
import requests

from backend import pattern_sha256, ws_accept, ws_frame, ws_read_frame
from helpers import (RawConn, assert_json_error, header_map, request_bytes, simple_get)
from conftest import WORKERS


@pytest.fixture(scope="module")
def gw(ringway_factory, backend):
    """One ringway, every path routed to backend b1."""
    return ringway_factory.start(
        upstreams=[{"name": "b", "endpoints": [backend.addr]}],
        routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
        name="basics")


@pytest.fixture(scope="module")
def router(ringway_factory, backend, backend2):
    """A ringway with a routing table over two backends, and no catch-all route."""
    b1, b2 = "b1", "b2"
    return ringway_factory.start(
        upstreams=[{"name": b1, "endpoints": [backend.addr]},
                   {"name": b2, "endpoints": [backend2.addr]}],
        routes=[
            {"name": "exact", "match": {"path": "/exact"}, "upstream": b2},
            {"name": "m-post", "match": {"path_prefix": "/m/", "methods": ["POST"]}, "upstream": b2},
            {"name": "m-any", "match": {"path_prefix": "/m/"}, "upstream": b1},
            {"name": "h-api", "match": {"path_prefix": "/h/", "host": "api.example.com"}, "upstream": b2},
            {"name": "h-any", "match": {"path_prefix": "/h/"}, "upstream": b1},
            {"name": "x-blue", "match": {"path_prefix": "/x/", "headers": {"x-env": "blue"}}, "upstream": b2},
            {"name": "x-any", "match": {"path_prefix": "/x/"}, "upstream": b1},
            {"name": "first", "match": {"path_prefix": "/first/"}, "upstream": b2},
            {"name": "first-deeper", "match": {"path_prefix": "/first/deeper/"}, "upstream": b1},
            {"name": "strip", "match": {"path_prefix": "/api/v1"}, "upstream": b2, "strip_prefix": True},
            {"name": "nostrip", "match": {"path_prefix": "/keep/"}, "upstream": b1, "strip_prefix": False},
        ],
        name="routing")


def url(gw, path):
    return "http://127.0.0.1:%d%s" % (gw.port, path)


def curl(*args, timeout=60):
    return subprocess.run(["curl", "-sS", "--http1.1", "--max-time", str(timeout)] + list(args),
                          capture_output=True, timeout=timeout + 5)


# ------------------------------------------------------------------ methods
def test_curl_get_reaches_backend_and_returns_its_echo(gw):
    """curl GET /echo through ringway returns the backend's JSON echo with status 200."""
    p = curl("-w", "\n%{http_code}", url(gw, "/echo?x=1"))
    assert p.returncode == 0, p.stderr
    body, code = p.stdout.rsplit(b"\n", 1)
    assert code == b"200"
    doc = json.loads(body)
    assert doc["method"] == "GET" and doc["target"] == "/echo?x=1" and doc["backend"] == "b1"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_curl_methods_with_body_are_forwarded(gw, method):
    """curl -X METHOD with a body: backend sees the method and the exact body."""
    body = os.urandom(50_000)
    p = subprocess.run(
        ["curl", "-sS", "--http1.1", "--max-time", "30", "-X", method, "--data-binary", "@-",
         "-H", "Content-Type: application/octet-stream", url(gw, "/echo")],
        input=body, capture_output=True, timeout=40)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["method"] == method
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
def test_requests_methods_roundtrip(gw, method):
    """requests: GET/POST/PUT/DELETE with a JSON body arrive intact at the backend."""
    payload = {"method": method, "data": "x" * 1000}
    r = requests.request(method, url(gw, "/echo"), json=payload, timeout=10)
    assert r.status_code == 200
    doc = r.json()
    raw = json.dumps(payload).encode()
    assert doc["method"] == method
    assert doc["body_sha256"] == hashlib.sha256(raw).hexdigest()
    assert r.headers.get("x-backend") == "b1"


def test_http_client_methods_including_head(gw):
    """http.client on one keep-alive connection: GET, POST, PUT, DELETE, HEAD all answered correctly."""
    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        for m in ("GET", "POST", "PUT", "DELETE"):
            body = ("body-%s" % m).encode() if m != "GET" else None
            c.request(m, "/echo", body=body)
            r = c.getresponse()
            data = r.read()
            assert r.status == 200
            doc = json.loads(data)
            assert doc["method"] == m
            if body:
                assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
        c.request("HEAD", "/head-check")
        r = c.getresponse()
        assert r.status == 200
        assert r.read() == b""
        assert r.getheader("x-seen-method") == "HEAD"
        assert int(r.getheader("content-length")) == len(b"this body is only sent for GET\n")
    finally:
        c.close()


# ------------------------------------------------------------------ bodiless responses
def test_head_response_has_no_body_and_connection_stays_usable(gw):
    """HEAD keeps the GET Content-Length but sends no body; the next response on the connection is intact."""
    with RawConn(gw.port) as c:
        c.send(request_bytes("HEAD", "/head-check") + request_bytes("GET", "/echo?after-head"))
        r = c.read_response(method="HEAD")
        assert r.status == 200
        assert r.get("content-length") == str(len(b"this body is only sent for GET\n"))
        assert r.body == b""
        r2 = c.read_response()
        assert r2.status == 200, "bytes after the HEAD response corrupted the next one: %r" % r2
        assert r2.json()["target"] == "/echo?after-head"


def test_head_on_large_resource_sends_no_body(gw):
    """HEAD /bytes/5000000 returns Content-Length 5000000 and no body bytes at all."""
    with RawConn(gw.port) as c:
        c.send(request_bytes("HEAD", "/bytes/5000000") + request_bytes("GET", "/echo?x"))
        r = c.read_response(method="HEAD")
        assert r.status == 200 and r.get("content-length") == "5000000"
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?x"


@pytest.mark.parametrize("code", [204, 304])
def test_204_and_304_have_no_body(gw, code):
    """204 and 304 responses carry no body and no chunked framing; the connection stays usable."""
    with RawConn(gw.port) as c:
        c.send(request_bytes("GET", "/status/%d" % code) + request_bytes("GET", "/echo?next"))
        r = c.read_response()
        assert r.status == code
        assert "chunked" not in r.tokens("transfer-encoding")
        assert r.get("content-length") in (None, "0")
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?next"


def test_other_status_codes_pass_through_with_body(gw):
    """A 418 from the backend reaches the client with its status and body."""
    r = requests.get(url(gw, "/status/418"), timeout=10)
    assert r.status_code == 418
    assert r.text == "status 418\n"


# ------------------------------------------------------------------ chunked
def test_chunked_upload_from_generator(gw):
    """requests with a generator body (chunked): backend receives every byte (length + sha256)."""
    h = hashlib.sha256()
    sizes = [1, 100, 16383, 16384, 16385, 65536, 1_000_000, 7]
    chunks = [os.urandom(n) for n in sizes]
    for ch in chunks:
        h.update(ch)

    def gen():
        yield from chunks

    r = requests.post(url(gw, "/upload"), data=gen(), timeout=30)
    assert r.status_code == 200
    assert r.json() == {"len": sum(sizes), "sha256": h.hexdigest(), "backend": "b1"}


def test_chunked_upload_with_extensions_and_trailers(gw):
    """Raw chunked upload with chunk extensions and a trailer: body intact, trailer forwarded."""
    body_parts = [b"hello ", b"chunked ", b"world"]
    wire = b"".join(b"%x;name=val\r\n%s\r\n" % (len(p), p) for p in body_parts)
    wire += b"0\r\nX-Upload-Trailer: t1\r\n\r\n"
    head = (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Trailer: X-Upload-Trailer\r\n\r\n")
    with RawConn(gw.port) as c:
        c.send(head + wire)
        r = c.read_response()
    assert r.status == 200
    doc = r.json()
    full = b"".join(body_parts)
    assert doc["body_len"] == len(full)
    assert doc["body_sha256"] == hashlib.sha256(full).hexdigest()
    assert ["X-Upload-Trailer", "t1"] in [[k, v] for k, v in doc["trailers"]] or \
        ("x-upload-trailer", "t1") in [(k.lower(), v) for k, v in doc["trailers"]], \
        "trailer not forwarded upstream: %r" % doc


@pytest.mark.parametrize("n", [0, 1, 999, 1000, 1001, 3 * 1024 * 1024 + 17])
def test_chunked_download_checksum(gw, n):
    """GET /chunked/N (chunked with extension + trailer): client gets exactly N pattern bytes."""
    r = requests.get(url(gw, "/chunked/%d" % n), timeout=30)
    assert r.status_code == 200
    assert len(r.content) == n
    assert hashlib.sha256(r.content).hexdigest() == pattern_sha256(n)


def test_chunked_download_trailer_reaches_http11_client(gw):
    """A chunked upstream response to an HTTP/1.1 client keeps its trailer."""
    n = 200_000
    with RawConn(gw.port) as c:
        c.send(request_bytes("GET", "/chunked/%d" % n))
        r = c.read_response()
    assert r.status == 200 and r.body_len == n and r.sha256 == pattern_sha256(n)
    if r.framing == "chunked":
        tr = {k.lower(): v for k, v in r.trailers}
        assert tr.get("x-trailer-sha256") == pattern_sha256(n), "trailer dropped: %r" % r.trailers


def test_content_length_download_checksum(gw):
    """GET /bytes/N with Content-Length: exact length and checksum through the proxy."""
    n = 10 * 1024 * 1024 + 3
    with RawConn(gw.port) as c:
        c.send(request_bytes("GET", "/bytes/%d" % n))
        r = c.read_response(keep_body=False)
    assert r.status == 200 and r.get("content-length") == str(n)
    assert r.body_len == n and r.sha256 == pattern_sha256(n)


# ------------------------------------------------------------------ 100-continue
def test_expect_100_continue_with_curl_does_not_wait_for_fallback(gw, tmp_path):
    """curl POST of 2 MB with Expect: 100-continue completes well under curl's 1 s fallback."""
    data = os.urandom(2 * 1024 * 1024)
    f = tmp_path / "body.bin"
    f.write_bytes(data)
    p = curl("-X", "POST", "--data-binary", "@%s" % f, "-H", "Expect: 100-continue",
             "--expect100-timeout", "1", "-w", "\n%{time_total}", url(gw, "/upload"))
    assert p.returncode == 0, p.stderr
    body, t = p.stdout.rsplit(b"\n", 1)
    assert json.loads(body)["sha256"] == hashlib.sha256(data).hexdigest()
    assert float(t) < 0.9, "curl took %ss: it waited for its 100-continue fallback" % t.decode()


def test_expect_100_continue_raw_gets_interim_response_before_body(gw):
    """Ringway answers 100 Continue before the body is sent, and does not forward Expect upstream."""
    data = os.urandom(2 * 1024 * 1024)
    with RawConn(gw.port, timeout=3) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(data))
        r = c.read_head()  # must come without the body having been sent
        assert r.status == 100, "expected 100 Continue first, got %r" % r
        c.settimeout(10)
        c.send(data)
        final = c.read_response()
    assert final.status == 200
    doc = final.json()
    assert doc["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert "expect" not in header_map(doc["headers"]), "Expect was forwarded upstream"


# ------------------------------------------------------------------ pipelining
def test_pipelined_requests_answered_in_order(gw):
    """Three requests in one write get three responses in request order."""
    body = b"pipelined-body"
    wire = (request_bytes("GET", "/echo?i=1")
            + request_bytes("POST", "/upload", body=body)
            + request_bytes("GET", "/bytes/70000"))
    with RawConn(gw.port) as c:
        c.send(wire)
        r1 = c.read_response()
        r2 = c.read_response()
        r3 = c.read_response()
    assert r1.status == 200 and r1.json()["target"] == "/echo?i=1"
    assert r2.status == 200 and r2.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert r3.status == 200 and r3.body_len == 70000 and r3.sha256 == pattern_sha256(70000)


def test_pipelined_requests_behind_bodies_larger_than_a_buffer(gw):
    """Bodies larger than one pool buffer, each followed by another request in the same write:
    a body whose rest is already in the socket leaves with its head in one write, and the
    requests behind it are not taken with it."""
    bodies = [os.urandom(50_000), os.urandom(40_000), os.urandom(16_500)]
    wire = b""
    for i, body in enumerate(bodies):
        wire += request_bytes("POST", "/upload?i=%d" % i, body=body)
        wire += request_bytes("GET", "/echo?after=%d" % i)
    with RawConn(gw.port) as c:
        c.send(wire)
        for i, body in enumerate(bodies):
            up = c.read_response()
            assert up.status == 200
            doc = up.json()
            assert (doc["len"], doc["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
            after = c.read_response()
            assert after.status == 200 and after.json()["target"] == "/echo?after=%d" % i


def test_body_whose_rest_arrives_later_is_forwarded_whole(gw):
    """A body larger than a buffer sent in two writes, the second after the head was seen:
    what the socket did not hold yet follows, and the upstream gets every byte."""
    body = os.urandom(60_000)
    wire = request_bytes("POST", "/upload", body=body)
    split = len(wire) - 45_000
    with RawConn(gw.port) as c:
        c.send(wire[:split])
        time.sleep(0.05)  # the second part must not arrive with the first
        c.send(wire[split:])
        r = c.read_response()
    assert r.status == 200
    doc = r.json()
    assert (doc["len"], doc["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def test_pipelined_many_small_requests(gw):
    """Fifty pipelined GETs in one write come back complete and in order."""
    wire = b"".join(request_bytes("GET", "/echo?n=%d" % i) for i in range(50))
    with RawConn(gw.port) as c:
        c.send(wire)
        for i in range(50):
            r = c.read_response()
            assert r.status == 200 and r.json()["target"] == "/echo?n=%d" % i


# ------------------------------------------------------------------ HTTP/1.0
def test_http10_client_gets_response_and_connection_closes(gw):
    """An HTTP/1.0 request without keep-alive (and without Host) is answered, then closed."""
    with RawConn(gw.port) as c:
        c.send(b"GET /echo?v=10 HTTP/1.0\r\n\r\n")
        r = c.read_response()
        assert r.status == 200
        assert r.json()["target"] == "/echo?v=10"
        assert c.is_closed(3), "HTTP/1.0 connection without keep-alive was not closed"


def test_http10_keepalive_when_asked(gw):
    """HTTP/1.0 with Connection: keep-alive keeps the connection for a second request."""
    with RawConn(gw.port) as c:
        for i in range(2):
            c.send(b"GET /bytes/1000 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            r = c.read_response()
            assert r.status == 200 and r.body_len == 1000 and r.framing == "length"
            assert "close" not in r.tokens("connection")


def test_http10_client_gets_dechunked_body(gw):
    """A chunked upstream response is delivered to an HTTP/1.0 client without chunked framing."""
    n = 300_001
    with RawConn(gw.port) as c:
        c.send(b"GET /chunked/%d HTTP/1.0\r\n\r\n" % n)
        r = c.read_response(keep_body=True)
    assert r.status == 200
    assert not r.get_all("transfer-encoding"), "Transfer-Encoding sent to an HTTP/1.0 client: %r" % r.headers
    assert r.framing in ("length", "close")
    assert r.body_len == n and r.sha256 == pattern_sha256(n)
    assert b"\r\n0\r\n" not in r.body[-64:]


# ------------------------------------------------------------------ close-delimited
@pytest.mark.parametrize("n", [0, 12345, 4 * 1024 * 1024 + 5])
def test_close_delimited_upstream_response(gw, n):
    """An upstream body delimited by connection close arrives complete (length + sha256)."""
    with RawConn(gw.port) as c:
        c.send(request_bytes("GET", "/close/%d" % n))
        r = c.read_response(keep_body=False)
    assert r.status == 200
    assert r.body_len == n and r.sha256 == pattern_sha256(n)


def test_close_delimited_response_does_not_break_next_request(gw):
    """After a close-delimited upstream response, a new request on a new connection is normal."""
    with RawConn(gw.port) as c:
        c.send(request_bytes("GET", "/close/1000"))
        assert c.read_response().body_len == 1000
    r = simple_get(gw.port, "/echo?after-close")
    assert r.status == 200 and r.json()["target"] == "/echo?after-close"


# ------------------------------------------------------------------ proxy headers
def test_forwarded_headers_and_host_seen_by_backend(gw):
    """Backend sees x-forwarded-for=127.0.0.1, x-forwarded-proto=http, a generated x-request-id, Host kept."""
    r = simple_get(gw.port, "/echo", host="app.example.test:8443")
    h = header_map(r.json()["headers"])
    assert h.get("x-forwarded-for") == ["127.0.0.1"]
    assert h.get("x-forwarded-proto") == ["http"]
    assert len(h.get("host", [])) == 1 and h["host"][0] == "app.example.test:8443"
    rid = h.get("x-request-id")
    assert rid and len(rid) == 1 and len(rid[0]) >= 8, "x-request-id not generated: %r" % rid


def test_request_ids_are_unique(gw):
    """Generated x-request-id values differ between requests."""
    ids = set()
    for _ in range(20):
        h = header_map(simple_get(gw.port, "/echo").json()["headers"])
        ids.add(h["x-request-id"][0])
    assert len(ids) == 20


def test_x_forwarded_for_is_appended(gw):
    """An incoming x-forwarded-for gets the client address appended."""
    r = simple_get(gw.port, "/echo", headers=[("X-Forwarded-For", "10.1.2.3, 10.4.5.6")])
    h = header_map(r.json()["headers"])
    assert len(h["x-forwarded-for"]) == 1
    parts = [p.strip() for p in h["x-forwarded-for"][0].split(",")]
    assert parts == ["10.1.2.3", "10.4.5.6", "127.0.0.1"]


def test_x_request_id_is_kept(gw):
    """An incoming x-request-id is passed upstream unchanged."""
    r = simple_get(gw.port, "/echo", headers=[("X-Request-Id", "req-abc-123")])
    h = header_map(r.json()["headers"])
    assert h["x-request-id"] == ["req-abc-123"]


def test_end_to_end_headers_pass_unchanged(gw):
    """Ordinary request headers (including repeated ones) reach the backend unchanged."""
    r = simple_get(gw.port, "/echo", headers=[("X-Custom", "one"), ("X-Custom", "two"),
                                              ("Authorization", "Bearer sk-test"), ("Cookie", "a=b")])
    h = header_map(r.json()["headers"])
    assert h["x-custom"] == ["one", "two"]
    assert h["authorization"] == ["Bearer sk-test"]
    assert h["cookie"] == ["a=b"]


def test_hop_by_hop_request_headers_not_forwarded(gw):
    """Connection-listed headers, Keep-Alive, TE, Proxy-Connection, and Upgrade without Connection: upgrade are dropped."""
    with RawConn(gw.port) as c:
        c.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Foo\r\nX-Foo: secret\r\n"
               b"Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n"
               b"X-Bar: visible\r\n\r\n")
        r = c.read_response()
    assert r.status == 200
    h = header_map(r.json()["headers"])
    for name in ("x-foo", "keep-alive", "te", "upgrade", "proxy-connection"):
        assert name not in h, "hop-by-hop header %s forwarded: %r" % (name, h)
    for v in h.get("connection", []):
        assert "x-foo" not in v.lower(), "client Connection header forwarded: %r" % v
    assert h["x-bar"] == ["visible"]


def test_hop_by_hop_response_headers_not_forwarded(gw):
    """Hop-by-hop headers in the upstream response (Connection-listed, Keep-Alive, Proxy-Connection) are dropped."""
    with RawConn(gw.port) as c:
        c.send(request_bytes("GET", "/hop-response"))
        r = c.read_response()
    assert r.status == 200 and r.body == b"hop\n"
    names = {k.lower() for k, _ in r.headers}
    assert "x-secret-hop" not in names
    assert "keep-alive" not in names
    assert "proxy-connection" not in names
    assert r.get("x-end-to-end") == "yes"


# ------------------------------------------------------------------ WebSocket
def test_websocket_echo_through_tunnel(gw):
    """A WebSocket handshake is tunnelled (101 with the right accept key) and frames echo both ways."""
    key = base64.b64encode(os.urandom(16)).decode()
    with RawConn(gw.port) as c:
        c.send(("GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
        r = c.read_head()
        assert r.status == 101, r
        assert r.get("sec-websocket-accept") == ws_accept(key)
        assert "websocket" in r.tokens("upgrade")
        assert "upgrade" in r.tokens("connection")
        for msg in (b"hello", "h\u00e9llo w\u00f6rld".encode(), b"x" * 300, os.urandom(70000)):
            op = 0x1 if msg != b"" and all(32 <= b < 127 for b in msg) else 0x2
            c.send(ws_frame(op, msg, mask=True))
            rop, payload = ws_read_frame(c.rf)
            assert rop == op and payload == msg
        c.send(ws_frame(0x9, b"ping!", mask=True))
        assert ws_read_frame(c.rf) == (0xA, b"ping!")
        c.send(ws_frame(0x8, b"\x03\xe8", mask=True))
        assert ws_read_frame(c.rf) == (0x8, b"\x03\xe8")
        assert c.is_closed(3)


# ------------------------------------------------------------------ keep-alive
def test_keepalive_both_sides_1000_requests(gw, backend):
    """1000 sequential requests on one client connection reuse upstream connections (accepts <= workers)."""
    requests.post("http://%s/_accepts/reset" % backend.addr, timeout=5).raise_for_status()
    with RawConn(gw.port) as c:
        for i in range(1000):
            c.send(request_bytes("GET", "/echo?k=%d" % i))
            r = c.read_response()
            assert r.status == 200, "request %d: %r" % (i, r)
            assert "close" not in r.tokens("connection"), "ringway closed the client connection at %d" % i
    # the count includes the connection that asks for it
    accepts = requests.get("http://%s/_accepts" % backend.addr, timeout=5).json()["accepts"] - 1
    assert accepts <= WORKERS, "backend accepted %d connections for 1000 keep-alive requests" % accepts


# ------------------------------------------------------------------ routing
def _route(router, method, path, host="test.local", headers=()):
    with RawConn(router.port) as c:
        c.send(request_bytes(method, path, host=host, headers=headers))
        return c.read_response()


def test_route_exact_path(router):
    """match.path matches the exact path (query ignored) and nothing longer."""
    r = _route(router, "GET", "/exact?q=1")
    assert r.status == 200 and r.json()["backend"] == "b2" and r.json()["target"] == "/exact?q=1"
    assert_json_error(_route(router, "GET", "/exact/more"), 404)
    assert_json_error(_route(router, "GET", "/exactly"), 404)


def test_route_by_method(router):
    """methods = ["POST"] routes POST to b2; GET falls through to the next route (b1)."""
    assert _route(router, "POST", "/m/x").json()["backend"] == "b2"
    assert _route(router, "GET", "/m/x").json()["backend"] == "b1"


def test_route_by_host(router):
    """match.host selects by Host header (port ignored or not present)."""
    assert _route(router, "GET", "/h/x", host="api.example.com").json()["backend"] == "b2"
    assert _route(router, "GET", "/h/x", host="other.example.com").json()["backend"] == "b1"


def test_route_by_host_ignores_port(router):
    """Host: api.example.com:PORT still matches host = "api.example.com"."""
    assert _route(router, "GET", "/h/x", host="api.example.com:%d" % router.port).json()["backend"] == "b2"


def test_route_by_header(router):
    """match.headers selects by a request header value."""
    assert _route(router, "GET", "/x/1", headers=[("X-Env", "blue")]).json()["backend"] == "b2"
    assert _route(router, "GET", "/x/1", headers=[("X-Env", "green")]).json()["backend"] == "b1"
    assert _route(router, "GET", "/x/1").json()["backend"] == "b1"


def test_first_matching_route_wins(router):
    """/first/deeper/ matches the earlier /first/ route, not the later, longer prefix."""
    assert _route(router, "GET", "/first/deeper/x").json()["backend"] == "b2"


def test_strip_prefix(router):
    """strip_prefix = true removes the matched prefix before forwarding; query kept."""
    doc = _route(router, "GET", "/api/v1/echo?a=b").json()
    assert doc["backend"] == "b2"
    assert doc["target"] == "/echo?a=b"


def test_no_strip_prefix_keeps_path(router):
    """strip_prefix = false forwards the full path."""
    doc = _route(router, "GET", "/keep/echo?z=1").json()
    assert doc["backend"] == "b1" and doc["target"] == "/keep/echo?z=1"


def test_no_route_is_404_json(router):
    """A request that matches no route gets 404 with a JSON error body, and the connection stays usable."""
    with RawConn(router.port) as c:
        c.send(request_bytes("GET", "/nowhere") + request_bytes("GET", "/exact"))
        err = assert_json_error(c.read_response(), 404)
        assert err["type"]
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["backend"] == "b2"
