"""Malformed, ambiguous and oversized requests: exact status, JSON error, connection handling."""

import socket
import time

import pytest

from helpers import RawConn, assert_json_error, simple_get

MAX_HEADER_BYTES = 8 * 1024
MAX_HEADERS = 50
MAX_BODY = 1024 * 1024


@pytest.fixture(scope="module")
def gw(ringway_factory, backend):
    """Ringway with small limits: 8 KiB head, 50 headers, 1 MiB body."""
    return ringway_factory.start(
        upstreams=[{"name": "b", "endpoints": [backend.addr]}],
        routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
        server={"max_header_bytes": "8KiB", "max_headers": MAX_HEADERS, "max_body_bytes": "1MiB",
                "header_timeout": "2s"},
        name="malformed")


H = b"Host: t\r\n"


def post(headers, body=b"", version=b"HTTP/1.1", target=b"/echo", host=True):
    return (b"POST " + target + b" " + version + b"\r\n" + (H if host else b"") + headers + b"\r\n" + body)


def get(headers=b"", version=b"HTTP/1.1", target=b"/echo", host=True):
    return b"GET " + target + b" " + version + b"\r\n" + (H if host else b"") + headers + b"\r\n"


# (id, raw request bytes, allowed statuses)
CASES = [
    ("cl-and-te", post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), {400}),
    ("te-and-cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"), {400}),
    ("duplicate-cl-same", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), {400}),
    ("duplicate-cl-different", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), {400}),
    ("cl-with-plus-sign", post(b"Content-Length: +5\r\n", b"hello"), {400}),
    ("cl-negative", post(b"Content-Length: -5\r\n", b"hello"), {400}),
    ("cl-list", post(b"Content-Length: 5, 5\r\n", b"hello"), {400}),
    ("cl-non-numeric", post(b"Content-Length: abc\r\n", b"hello"), {400}),
    ("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello"), {400}),
    ("cl-overflow-u64", post(b"Content-Length: 99999999999999999999999\r\n", b"hello"), {400, 413}),
    ("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), {400, 501}),
    ("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"), {400, 501}),
    ("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), {400, 501}),
    ("te-on-http10", post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n", version=b"HTTP/1.0"),
     {400}),
    ("space-before-colon", get(b"X-Test : v\r\n"), {400}),
    ("obs-fold", get(b"X-Test: a\r\n  folded\r\n"), {400}),
    ("bare-cr-in-value", get(b"X-Test: a\rb\r\n"), {400}),
    ("nul-in-value", get(b"X-Test: a\x00b\r\n"), {400}),
    ("invalid-header-name", get(b"X@Test: v\r\n"), {400}),
    ("chunk-size-not-hex", post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"), {400}),
    ("chunk-size-negative", post(b"Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"), {400}),
    # 17 hex digits: wraps to 5 if parsed modulo 2**64 (a smuggling vector). Rejecting it as malformed
    # (400) or as larger than max_body_bytes (413) are both safe; a 200 would mean it wrapped.
    ("chunk-size-overflow", post(b"Transfer-Encoding: chunked\r\n",
                                 b"10000000000000005\r\nhello\r\n0\r\n\r\n"), {400, 413}),
    ("chunk-missing-crlf", post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n"), {400}),
    ("missing-host-http11", get(host=False), {400}),
    ("duplicate-host", get(b"Host: other\r\n"), {400}),
    ("garbage-request-line", b"HELLO THERE\r\n\r\n", {400}),
    ("binary-garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n\r\n", {400}),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n", {400}),
    ("bad-version", b"GET / HTTX/1.1\r\nHost: t\r\n\r\n", {400, 505}),
    ("head-over-max-header-bytes", get(b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 1024) + b"\r\n"), {431}),
    ("too-many-headers", get(b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 10))), {431}),
    ("cl-over-max-body", post(b"Content-Length: %d\r\n" % (MAX_BODY + 1)), {413}),
]


def _check_new_connection_ok(gw):
    r = simple_get(gw.port, "/echo?fresh")
    assert r.status == 200 and r.json()["target"] == "/echo?fresh", "a new connection after the error failed: %r" % r


@pytest.mark.parametrize("raw,statuses", [pytest.param(c[1], c[2], id=c[0]) for c in CASES])
def test_malformed_request_gets_json_error(gw, raw, statuses):
    """Each malformed request gets its status with a JSON error; 400s close the connection; a new one works."""
    with RawConn(gw.port, timeout=5) as c:
        try:
            c.send(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            r = c.read_response()
        except (EOFError, ConnectionResetError) as e:
            pytest.fail("ringway closed the connection without an error response (%r)" % e, pytrace=False)
        except socket.timeout:
            pytest.fail("no response within 5 s (ringway waited for more input?)", pytrace=False)
        assert r.status in statuses, "expected %s, got %r" % (sorted(statuses), r)
        assert_json_error(r, r.status)
        if r.status == 400:
            assert c.is_closed(3), "connection stayed open after a 400"
    _check_new_connection_ok(gw)


def test_lf_only_line_endings_are_rejected_or_normalised(gw):
    """A request with bare-LF line endings is either rejected with 400 JSON or forwarded as a clean request."""
    with RawConn(gw.port, timeout=5) as c:
        c.send(b"GET /echo?lf HTTP/1.1\nHost: t\nX-Lf: 1\n\n")
        r = c.read_response()
        assert r.status in (200, 400), r
        if r.status == 400:
            assert_json_error(r, 400)
            assert c.is_closed(3)
        else:
            doc = r.json()
            assert doc["target"] == "/echo?lf"
            assert ["X-Lf", "1"] in doc["headers"]
    _check_new_connection_ok(gw)


def test_chunked_body_crossing_max_body_is_413_or_closed(gw):
    """A chunked body that grows past max_body_bytes is stopped: 413 JSON, or the connection is closed."""
    with RawConn(gw.port, timeout=5) as c:
        c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < 3 * MAX_BODY:
                c.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            c.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        try:
            r = c.read_response()
        except (EOFError, ConnectionResetError):
            r = None  # closed without a response: allowed
        if r is not None:
            assert_json_error(r, 413)
    _check_new_connection_ok(gw)


def test_content_length_within_max_body_is_accepted(gw):
    """A body exactly at max_body_bytes is forwarded normally."""
    body = b"y" * MAX_BODY
    with RawConn(gw.port, timeout=10) as c:
        c.send(post(b"Content-Length: %d\r\n" % len(body), body, target=b"/upload"))
        r = c.read_response()
    assert r.status == 200 and r.json()["len"] == MAX_BODY


def test_expect_100_with_oversized_body_gets_413_not_100(gw):
    """Expect: 100-continue with Content-Length over the limit is answered 413 directly, no 100 Continue."""
    with RawConn(gw.port, timeout=5) as c:
        c.send(post(b"Content-Length: %d\r\nExpect: 100-continue\r\n" % (MAX_BODY * 4), target=b"/upload"))
        r = c.read_response(allow_1xx=True)
        assert r.status == 413, "expected 413 as the first response, got %r" % r
        assert_json_error(r, 413)
    _check_new_connection_ok(gw)


def test_incomplete_head_is_closed_after_header_timeout(gw):
    """A client that never finishes its head is disconnected after header_timeout (2 s)."""
    with RawConn(gw.port, timeout=10) as c:
        t0 = time.monotonic()
        c.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        c.settimeout(6)
        data = b""
        try:
            while True:
                d = c.sock.recv(65536)
                if not d:
                    break
                data += d
        except ConnectionResetError:
            pass
        except socket.timeout:
            pytest.fail("connection still open 6 s after a partial head (header_timeout = 2s)")
        elapsed = time.monotonic() - t0
    assert elapsed >= 1.5, "closed after %.2fs, before header_timeout" % elapsed
    if data:
        assert data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 400"), data[:200]
    _check_new_connection_ok(gw)

