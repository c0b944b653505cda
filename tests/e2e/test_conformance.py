"""RFC 9112 conformance findings from third-party suites, each with the bytes that found it:
an upstream's early answer to an upload (§9.5), OPTIONS * (§3.2.4), higher minor versions
(§2.3), unimplemented transfer codings (§6.1), reason phrases, and Connection lists."""

import select
import socket
import time

import pytest

from backend import ThreadedServer
from helpers import RawConn, assert_json_error, simple_get
from raw_upstream import RecordingUpstream

BODY_LEN = 262144
PIECE = 16 * 1024
ANSWER_413 = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n"


class EarlyUpstream(ThreadedServer):
    """An origin that reads only the request head, then acts by the path:

    - /close: answers 413 with `Connection: close` and closes with the body unread (the kernel
      then resets the connection);
    - /keep: answers 413 and keeps the connection, reading and discarding whatever follows;
    - /interim: sends `100 Continue` at once, then reads the whole body (Content-Length or
      chunked) and answers 200 with the byte count it received.
    """

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def _serve(self, s):
        s.settimeout(10)
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                d = s.recv(65536)
                if not d:
                    return
                buf += d
            head, _, rest = buf.partition(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            if target == b"/close":
                s.sendall(ANSWER_413 + b"Connection: close\r\n\r\nbig")
                s.close()
                return
            if target == b"/keep":
                s.sendall(ANSWER_413 + b"\r\nbig")
                while s.recv(65536):
                    pass
                return
            if target == b"/interim":
                s.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                got = self._read_body(s, head, rest)
                body = b"%d" % got
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                return
        except OSError:
            return
        finally:
            try:
                s.close()
            except OSError:
                pass

    @staticmethod
    def _read_body(s, head, rest):
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            buf = rest
            while not buf.endswith(b"0\r\n\r\n"):
                d = s.recv(65536)
                if not d:
                    break
                buf += d
            total, pos = 0, 0
            while True:
                eol = buf.index(b"\r\n", pos)
                size = int(buf[pos:eol], 16)
                if size == 0:
                    return total
                total += size
                pos = eol + 2 + size + 2
        n = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        got = len(rest)
        while got < n:
            d = s.recv(65536)
            if not d:
                break
            got += len(d)
        return got


@pytest.fixture(scope="module")
def early_up():
    u = EarlyUpstream().start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def early_gw(ringway_factory, early_up):
    return ringway_factory.start(
        upstreams=[{"name": "e", "endpoints": [early_up.addr], "retries": 0}],
        routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "e"}],
        server={"workers": 1, "body_timeout": "10s"},
        name="early")


def _upload_head(target, chunked):
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % BODY_LEN
    return b"POST " + target + b" HTTP/1.1\r\nHost: a\r\n" + framing + b"\r\n"


def _piece(chunked, last=False):
    data = b"x" * PIECE
    if not chunked:
        return data
    return b"%x\r\n" % PIECE + data + b"\r\n" + (b"0\r\n\r\n" if last else b"")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_early_answer_then_close_is_relayed_not_502(early_gw, chunked):
    """The third-party repro: the origin answers 413 after the head and closes (a reset, since
    the body is unread); the client keeps sending 16 x 16 KiB, 30 ms apart. The client gets the
    origin's 413 with its body, then a close, never Ringway's own 502."""
    with RawConn(early_gw.port, timeout=10) as c:
        c.send(_upload_head(b"/close", chunked))
        for i in range(16):
            try:
                c.send(_piece(chunked, last=(i == 15)))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.03)
        r = c.read_response()
        assert r.status == 413, r
        assert r.body == b"big", r
        assert "close" in r.tokens("connection"), r
        assert c.is_closed(5)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_early_answer_reaches_client_before_its_body_is_sent(early_gw, early_up, chunked):
    """An origin that answers early and keeps the connection: the answer is relayed while the
    client is still sending. The client sends one piece, then waits for the answer before
    sending anything more; a gateway that answers only after the whole body never answers."""
    with RawConn(early_gw.port, timeout=10) as c:
        c.send(_upload_head(b"/keep", chunked) + _piece(chunked))
        readable, _, _ = select.select([c.sock], [], [], 5)
        assert readable, "no answer while the body was still being sent"
        r = c.read_response()
        assert r.status == 413 and r.body == b"big", r
        # The rest of the body was never read by anyone: the connection cannot go on.
        assert "close" in r.tokens("connection"), r
        try:
            for i in range(4):
                c.send(_piece(chunked))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert c.is_closed(5)
    # The next client is served normally on the same gateway (by a path whose origin closes:
    # this /keep origin never reads another request, and a pooled connection must not meet it).
    r = simple_get(early_gw.port, "/close")
    assert r.status == 413 and r.body == b"big", r


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_interim_answer_during_upload_does_not_stop_the_body(early_gw, chunked):
    """A 100 Continue the origin sends on its own while the body arrives is not a final
    answer: the whole body still reaches it, and the client gets the final 200."""
    with RawConn(early_gw.port, timeout=10) as c:
        c.send(_upload_head(b"/interim", chunked))
        pieces = BODY_LEN // PIECE
        for i in range(pieces):
            c.send(_piece(chunked, last=(i == pieces - 1)))
            time.sleep(0.005)
        r = c.read_response()
        assert r.status == 200, r
        assert r.body == b"%d" % BODY_LEN, r


# ------------------------------------------------------------------------------ request lines
@pytest.fixture(scope="module")
def recorder():
    u = RecordingUpstream().start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def rec_gw(ringway_factory, recorder):
    return ringway_factory.start(
        upstreams=[{"name": "rec", "endpoints": [recorder.addr], "retries": 0}],
        routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "rec"}],
        server={"workers": 1},
        name="conformance")


def _exchange(port, raw):
    with RawConn(port, timeout=5) as c:
        c.send(raw)
        return c.read_response()


def _last_request(recorder, mark):
    recorder.sync()
    got = recorder.requests_since(mark)
    assert not recorder.errors(), recorder.errors()
    assert len(got) == 1, got
    return got[0]


@pytest.mark.parametrize("raw,want", [
    (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", "*"),
    (b"OPTIONS http://a HTTP/1.1\r\nHost: a\r\n\r\n", "*"),
    (b"OPTIONS http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "/"),
    (b"OPTIONS /* HTTP/1.1\r\nHost: a\r\n\r\n", "/*"),
], ids=["asterisk", "absolute-empty-path", "absolute-root", "path-star"])
def test_options_asterisk_form_is_forwarded_as_such(rec_gw, recorder, raw, want):
    """`OPTIONS *` reaches the upstream as `*` (not the resource `/*`), and an absolute form
    with an empty path becomes `*` at the last proxy (RFC 9112 §3.2.4)."""
    mark = recorder.mark()
    r = _exchange(rec_gw.port, raw)
    assert r.status == 200, r
    req = _last_request(recorder, mark)
    assert req["method"] == "OPTIONS" and req["target"] == want, req


@pytest.mark.parametrize("minor", [b"2", b"3", b"9"])
def test_higher_minor_version_is_served_as_http11(rec_gw, recorder, minor):
    """`GET /test HTTP/1.2` is processed as HTTP/1.1 (RFC 9112 §2.3): forwarded as 1.1 (the
    recorder refuses any other version), answered as 1.1, and the connection stays open."""
    with RawConn(rec_gw.port, timeout=5) as c:
        mark = recorder.mark()
        c.send(b"GET /test HTTP/1." + minor + b"\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert r.status == 200 and r.version == "HTTP/1.1", r
        req = _last_request(recorder, mark)
        assert req["target"] == "/test", req
        mark = recorder.mark()
        c.send(b"GET /again HTTP/1." + minor + b"\r\nHost: a\r\n\r\n")
        assert c.read_response().status == 200
        assert _last_request(recorder, mark)["target"] == "/again"


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3.0", b"HTTP/0.9"])
def test_other_major_version_is_505(rec_gw, recorder, version):
    mark = recorder.mark()
    with RawConn(rec_gw.port, timeout=5) as c:
        c.send(b"GET /test " + version + b"\r\nHost: a\r\n\r\n")
        r = c.read_response()
        assert_json_error(r, 505)
        assert r.reason == "HTTP Version Not Supported", r
        assert c.is_closed(3)
    recorder.sync()
    assert recorder.requests_since(mark) == []


@pytest.mark.parametrize("te", [b"gzip, chunked", b"deflate, chunked", b"gzip\r\nTransfer-Encoding: chunked"])
def test_unimplemented_transfer_coding_is_501(rec_gw, recorder, te):
    """A well-formed coding list ending in chunked, with a coding Ringway does not implement,
    is 501 Not Implemented (RFC 9112 §6.1), and the request goes nowhere."""
    mark = recorder.mark()
    with RawConn(rec_gw.port, timeout=5) as c:
        c.send(b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + te + b"\r\n\r\n0\r\n\r\n")
        r = c.read_response()
        assert_json_error(r, 501)
        assert r.reason == "Not Implemented", r
        assert c.is_closed(3)
    recorder.sync()
    assert recorder.requests_since(mark) == []


@pytest.mark.parametrize("raw,status,phrase", [
    (b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400, "Bad Request"),
    (b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431,
     "Request Header Fields Too Large"),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501, "Not Implemented"),
    (b"GET /x HTTP/5.0\r\nHost: a\r\n\r\n", 505, "HTTP Version Not Supported"),
], ids=["400", "431", "501", "505"])
def test_statuses_carry_their_standard_reason_phrase(rec_gw, raw, status, phrase):
    r = _exchange(rec_gw.port, raw)
    assert_json_error(r, status)
    assert r.reason == phrase, r


def test_gateway_errors_carry_their_standard_reason_phrase(ringway_factory):
    """502 and 404 from Ringway itself, with a dead upstream."""
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    gw = ringway_factory.start(
        upstreams=[{"name": "dead", "endpoints": ["127.0.0.1:%d" % port], "retries": 0}],
        routes=[{"name": "v1", "match": {"path_prefix": "/v1/"}, "upstream": "dead"}],
        server={"workers": 1}, name="reasons")
    r = simple_get(gw.port, "/v1/x")
    assert r.status == 502 and r.reason == "Bad Gateway", r
    r = simple_get(gw.port, "/other")
    assert r.status == 404 and r.reason == "Not Found", r


def test_connection_list_of_nine_tokens_is_served(rec_gw, recorder):
    """Nine Connection options (the old limit was 8): served, and every field they name is
    dropped before forwarding."""
    names = ["x-o%d" % i for i in range(9)]
    fields = b"".join(b"%s: v\r\n" % n.encode() for n in names)
    mark = recorder.mark()
    r = _exchange(rec_gw.port, b"GET /conn HTTP/1.1\r\nHost: a\r\nConnection: " +
                  ", ".join(names).encode() + b"\r\n" + fields + b"\r\n")
    assert r.status == 200, r
    req = _last_request(recorder, mark)
    sent = {k.lower() for k, _ in req["headers"]}
    assert not sent & set(names), req["headers"]


def test_connection_list_limit_is_32_tokens(rec_gw):
    ok = ", ".join("t%d" % i for i in range(32)).encode()
    r = _exchange(rec_gw.port, b"GET /conn HTTP/1.1\r\nHost: a\r\nConnection: " + ok + b"\r\n\r\n")
    assert r.status == 200, r
    over = ", ".join("t%d" % i for i in range(33)).encode()
    r = _exchange(rec_gw.port, b"GET /conn HTTP/1.1\r\nHost: a\r\nConnection: " + over + b"\r\n\r\n")
    assert_json_error(r, 400)
    r = _exchange(rec_gw.port, b"GET /conn HTTP/1.1\r\nHost: a\r\nConnection: keep alive\r\n\r\n")
    assert_json_error(r, 400)
