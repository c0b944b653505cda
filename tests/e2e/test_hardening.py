"""Hardening: slow clients (slowloris, slow readers, slow writers, 10000 idle keep-alive
connections) and upstream faults (reset mid-response, lying or garbage heads, pooled connections
closed under Ringway's feet, a stray response on an idle connection, an access log on a full disk).

Already covered elsewhere, not repeated here: a head that stops half-way (test_malformed.py
::test_incomplete_head_is_closed_after_header_timeout), refused / reset-before-answer / SMTP-banner
/ silent / unconnectable upstreams (test_upstream_failures.py), a dead endpoint behind a pooled
connection retried elsewhere (test_operations.py::test_dead_endpoint_behind_pooled_connection_is_
retried_elsewhere), Redis killed / paused / restarted (test_limits.py).
"""

import json
import os
import resource
import select
import selectors
import socket
import sys
import threading
import time

import pytest

from helpers import RawConn, assert_json_error, free_port, request_bytes, simple_get, wait_until
from fast_backend import FastBackend
from raw_upstream import RecordingUpstream, ScriptedUpstream, reset

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------ admin helpers
def admin_get(port, path):
    with RawConn(port, timeout=5) as c:
        c.send(request_bytes("GET", path, host="127.0.0.1", headers=[("Connection", "close")]))
        r = c.read_response()
    assert r.status == 200, r
    return r


def stats(port):
    """Totals over the workers of /stats: connections, buffers_in_use, buffers_capacity."""
    doc = admin_get(port, "/stats").json()
    out = {"connections": 0, "buffers_in_use": 0, "buffers_capacity": 0}
    for w in doc["workers"]:
        for k in out:
            out[k] += w[k]
    return out


def metric(port, name):
    """Sum of every sample of `name` in /metrics."""
    total = 0.0
    for line in admin_get(port, "/metrics").body.decode().splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start(ringway_fn, upstream_addr, server=None, upstream=None, log=None, admin=True, name=None):
    up = {"name": "u", "endpoints": [upstream_addr]}
    up.update(upstream or {})
    admin_port = free_port() if admin else None
    rw = ringway_fn.start(upstreams=[up], routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "u"}],
                          server=server, admin=admin_port, log=log, name=name)
    rw.admin_port = admin_port
    return rw


def closed_within(sock, seconds):
    """Reads until EOF/RST; returns (seconds taken, bytes read) or (None, bytes) if still open."""
    t0 = time.monotonic()
    got = bytearray()
    p = select.poll()
    p.register(sock, select.POLLIN)
    while time.monotonic() - t0 < seconds:
        if not p.poll(100):
            continue
        try:
            d = sock.recv(65536)
        except ConnectionResetError:
            return time.monotonic() - t0, bytes(got)
        if not d:
            return time.monotonic() - t0, bytes(got)
        got += d
    return None, bytes(got)


# ============================================================================== 2. slow clients
HEADER_TIMEOUT = 2.0


def _trickle(sock, data, interval):
    """Sends data one byte per interval; returns (time of the first byte, time of the close,
    bytes sent, bytes received) once the peer closes, or with a None close time."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    first = None
    got = bytearray()
    for i in range(len(data)):
        try:
            sock.send(data[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            return first, time.monotonic(), i, bytes(got)
        first = first or time.monotonic()
        deadline = time.monotonic() + interval
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if p.poll(int(left * 1000) + 1):
                try:
                    d = sock.recv(65536)
                except ConnectionResetError:
                    d = b""
                if not d:
                    return first, time.monotonic(), i + 1, bytes(got)
                got += d
    return first, None, len(data), bytes(got)


def test_slowloris_one_byte_per_second_is_cut_at_header_timeout(ringway_fn, backend):
    """Three clients at once against header_timeout = 2s: a new connection sending its head one
    byte per second, a keep-alive connection doing the same for its second request, and a
    connection that sends nothing. The timer covers the whole head (a byte every second never
    resets it): each is closed 2 s after its first byte (or its connect), without a response to
    the trickled head, while a normal client is served throughout."""
    rw = start(ringway_fn, backend.addr, server={"header_timeout": "2s", "keepalive_timeout": "20s"},
               admin=False)
    head = b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 30
    results = {}

    def fresh():
        with socket.create_connection(("127.0.0.1", rw.port)) as s:
            results["fresh"] = _trickle(s, head, 1.0)

    def second_request():
        with RawConn(rw.port) as c:
            c.send(request_bytes("GET", "/echo?first"))
            r = c.read_response()
            assert r.status == 200
            results["keepalive-first"] = r.status
            time.sleep(0.3)
            results["keepalive"] = _trickle(c.sock, head, 1.0)

    def silent():
        with socket.create_connection(("127.0.0.1", rw.port)) as s:
            t0 = time.monotonic()
            took, got = closed_within(s, 8)
            results["silent"] = (t0, None if took is None else t0 + took, 0, got)

    threads = [threading.Thread(target=f) for f in (fresh, second_request, silent)]
    for t in threads:
        t.start()
    served = 0
    while any(t.is_alive() for t in threads):
        r = simple_get(rw.port, "/echo?during-%d" % served, timeout=3)
        assert r.status == 200, r
        served += 1
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert served >= 5
    assert results.get("keepalive-first") == 200, results
    for name in ("fresh", "keepalive", "silent"):
        first, closed, sent, got = results[name]
        assert closed is not None, "%s: still open after %d bytes (%.0f s)" % (name, sent, sent * 1.0)
        took = closed - first
        assert HEADER_TIMEOUT - 0.2 <= took <= HEADER_TIMEOUT + 1.5, (
            "%s: closed %.2fs after its first byte, header_timeout is %.0fs" % (name, took, HEADER_TIMEOUT))
        # No answer to a head that never finished (a 408 would be fine, a 200 would not).
        assert not got or got.startswith(b"HTTP/1.1 408"), "%s: got %r" % (name, got[:200])


SLOW_BODY = (64 << 20) + 1  # above backend.py's checksum threshold: no hashing cost


def test_slow_readers_hold_at_most_a_buffer_each_and_are_cut_at_body_timeout(ringway_fn, backend):
    """8 clients ask for 64 MiB (4 chunked, through a pool buffer; 4 Content-Length, spliced)
    and never read, with a pool of 16 buffers on one worker. While they are stuck they hold at
    most one buffer each, other clients (small and 1 MiB responses) are served, and after
    body_timeout (2 s; response_timeout is 10 s) without progress they are closed, buffers back."""
    rw = start(ringway_fn, backend.addr, upstream={"response_timeout": "10s"},
               server={"workers": 1, "buffers_per_worker": 16, "body_timeout": "2s"})
    slow = []
    try:
        for i in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", rw.port))
            path = "/chunked/%d" % SLOW_BODY if i % 2 == 0 else "/bytes/%d" % SLOW_BODY
            s.sendall(request_bytes("GET", path))
            slow.append(s)
        last = {}

        def stuck():
            # Stuck: all 8 mid-body (the chunked ones hold their buffer) and nothing moving.
            st = stats(rw.admin_port)
            prev, last["st"] = last.get("st"), st
            return st["connections"] == 8 and st["buffers_in_use"] >= 4 and st == prev

        wait_until(stuck, 10, interval=0.3, what="8 stuck slow readers")
        stuck_at = time.monotonic()
        samples = [last["st"]["buffers_in_use"]]
        # Others are served while the slow readers sit on their responses.
        # Each slow reader holds at most one buffer: 8 at most once the others are done (the
        # figure is refreshed every 100 ms, so wait for it to catch up after each one).
        assert samples[0] <= 8, "buffers in use by 8 stuck slow readers: %d" % samples[0]
        for i in range(10):
            r = simple_get(rw.port, "/echo?other-%d" % i, timeout=3)
            assert r.status == 200, r
            samples.append(wait_until(lambda: (lambda n: n if n <= 8 else None)(
                stats(rw.admin_port)["buffers_in_use"]), 2, what="buffers in use back to <= 8"))
        r = simple_get(rw.port, "/bytes/1048576", timeout=5)
        assert r.status == 200 and r.body_len == 1048576, r
        wait_until(lambda: stats(rw.admin_port)["buffers_in_use"] <= 8, 2, what="buffers in use back to <= 8")

        st = wait_until(lambda: (lambda x: x if x["connections"] == 0 and x["buffers_in_use"] == 0 else None)(
            stats(rw.admin_port)), 12, interval=0.1, what="the slow readers to be cut")
        cut = time.monotonic() - stuck_at
        assert cut <= 2.0 + 2.5, (
            "slow readers cut %.1fs after they stalled: body_timeout is 2s (response_timeout 10s)" % cut)
        for s in slow:
            s.settimeout(5)
            took, got = closed_within(s, 10)
            assert took is not None, "a slow reader's connection is still open"
            assert len(got) < SLOW_BODY, "a slow reader got the whole body"
    finally:
        for s in slow:
            s.close()
    r = simple_get(rw.port, "/echo?after")
    assert r.status == 200


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_slow_writer_is_cut_at_body_timeout_and_upstream_gets_no_request(ringway_fn, framing):
    """A request body sent one byte per second, with body_timeout = 700ms: the connection is
    closed about 0.7 s after the first stall (no response but, at most, an error), and the
    upstream never gets a whole request: the partial one is on a connection Ringway closed."""
    up = RecordingUpstream().start()
    try:
        rw = start(ringway_fn, up.addr, server={"body_timeout": "700ms"}, upstream={"retries": 0},
                   admin=False)
        if framing == "content-length":
            head = request_bytes("POST", "/slow-writer", headers=[("Content-Length", "100")])
            body = b"x" * 100
        else:
            head = request_bytes("POST", "/slow-writer", headers=[("Transfer-Encoding", "chunked")])
            body = b"64\r\n" + b"x" * 100 + b"\r\n0\r\n\r\n"
        with socket.create_connection(("127.0.0.1", rw.port)) as s:
            s.sendall(head + body[:5])
            first, closed, sent, got = _trickle(s, body[5:], 1.0)
        assert closed is not None, "slow writer not cut after %d body bytes" % sent
        took = closed - first
        assert 0.5 <= took <= 2.5, "cut %.2fs after the trickle started (body_timeout 700ms)" % took
        if got:
            r_status = int(got.split(b" ", 2)[1])
            assert r_status in (400, 408), got[:200]
        up.sync()
        assert up.requests_since((0, 0)) == [], "the upstream got a whole request from a cut body"
        wait_until(lambda: not up.open_with_partial_request(), 3,
                   what="the partial upstream request's connection to be closed")
        assert not up.errors(), up.errors()
        r = simple_get(rw.port, "/after")
        assert r.status == 200 and r.json()["target"] == "/after", r
    finally:
        up.stop()


IDLE_CONNS = 10000
GET = b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n"


def _open_idle(port, n, batch=200):
    """n keep-alive connections, each after one answered request (2-byte body "ok")."""
    socks = []
    sel = selectors.DefaultSelector()  # epoll: descriptors above 1024 are fine
    try:
        for start_at in range(0, n, batch):
            pending = {}
            for _ in range(min(batch, n - start_at)):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                socks.append(s)
                s.sendall(GET)
                s.setblocking(False)
                pending[s] = bytearray()
                sel.register(s, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            while pending:
                assert time.monotonic() < deadline, "%d of the idle connections got no answer" % len(pending)
                for key, _ in sel.select(1):
                    s = key.fileobj
                    d = s.recv(4096)
                    buf = pending[s]
                    assert d, "an idle-to-be connection closed after %r" % bytes(buf[:300])
                    buf += d
                    if b"\r\n\r\n" in buf:
                        assert buf.startswith(b"HTTP/1.1 200"), bytes(buf[:300])
                        if buf.endswith(b"ok"):
                            sel.unregister(s)
                            del pending[s]
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _nofile_of(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-files line in /proc/%d/limits" % pid)


def test_10000_idle_keepalive_connections_do_not_stop_new_clients(ringway_fn):
    """Ringway started with a soft open-files limit of 1024 (what a login shell often gives)
    raises it to the hard limit; 10000 keep-alive connections, idle after one request each, hold
    no pool buffer, and new clients are served at once (and some idle ones still work)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_CONNS + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip("hard RLIMIT_NOFILE %d < %d" % (hard, need))
    fast = FastBackend()
    socks = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        try:
            # The opening burst's pool buffers go back after one quiet second, so what stays
            # is what the idle connections themselves cost.
            rw = start(ringway_fn, "127.0.0.1:%d" % fast.port,
                       server={"keepalive_timeout": "60s", "memory_release_after": "1s"})
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else need, hard))
        assert _nofile_of(rw.pid) >= need, (
            "Ringway kept an open-files limit of %d: it cannot hold %d connections"
            % (_nofile_of(rw.pid), IDLE_CONNS))
        simple_get(rw.port, "/warm")
        rss0 = rw.rss()
        t0 = time.monotonic()
        socks = _open_idle(rw.port, IDLE_CONNS)
        opened = time.monotonic() - t0
        # Idle keep-alive connections hold no pool buffer (the figure lags by up to 100 ms).
        last = {}

        def all_idle():
            last["st"] = stats(rw.admin_port)
            return last["st"]["connections"] >= IDLE_CONNS and last["st"]["buffers_in_use"] == 0

        try:
            wait_until(all_idle, 10, interval=0.1, what="idle connections holding no buffer")
        except AssertionError:
            raise AssertionError("%d idle connections: not all counted, or holding pool buffers; "
                                 "last /stats: %r" % (IDLE_CONNS, last.get("st")))
        # A parked connection is a small task, a shared descriptor and one pending operation
        # (about 500 bytes): 10,000 of them stay under 10 MiB of growth once the opening
        # burst's buffers are given back (memory_release_after above).
        grown = {}

        def settled():
            grown["rss"] = rw.rss() - rss0
            return grown["rss"] < 10 * 1024 * 1024

        try:
            wait_until(settled, 6, interval=0.2, what="RSS growth under 10 MiB")
        except AssertionError:
            raise AssertionError("RSS grew %.1f MiB for %d idle connections (limit 10 MiB)"
                                 % (grown["rss"] / 1048576, IDLE_CONNS))
        grown = grown["rss"]
        for i in range(20):
            t = time.monotonic()
            r = simple_get(rw.port, "/new-%d" % i, timeout=5)
            assert r.status == 200 and r.body == b"ok", r
            assert time.monotonic() - t < 1.0, "a new client waited %.2fs" % (time.monotonic() - t)
        for s in socks[::1000]:
            s.setblocking(True)
            s.settimeout(5)
            s.sendall(GET)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        print("opened %d idle connections in %.1fs; Ringway RSS grew %.1f MiB" % (IDLE_CONNS, opened, grown / 1048576))
    finally:
        for s in socks:
            s.close()
        fast.stop()


# ============================================================================== 3. upstream faults
PART = 300_000
FULL = 1_000_000


def _cutting_handler(sock, req, state):
    """/cut/<framing>/<how>: a 1 MB response cut after 300 kB (RST or FIN); else a small answer."""
    parts = req["target"].split("/")
    if parts[1] == "cut":
        framing, how = parts[2], parts[3]
        if framing == "content-length":
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FULL + b"a" * PART)
        else:
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(PART // 10000):
                sock.sendall(b"2710\r\n" + b"a" * 10000 + b"\r\n")
            sock.sendall(b"2710\r\n" + b"a" * 5000)  # and a chunk cut in its middle
        time.sleep(0.05)
        if how == "rst":
            reset(sock)
        else:
            sock.shutdown(socket.SHUT_WR)
            sock.close()
        return False
    body = json.dumps({"target": req["target"]}).encode()
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))
    return True


def _check_truncated_chunked(data):
    """data is a prefix of a chunked body of 'a' bytes without its last chunk."""
    pos = 0
    total = 0
    while pos < len(data):
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(data[pos:eol].split(b";")[0], 16)
        assert size != 0, "a truncated chunked response was given a last chunk (looks complete)"
        chunk = data[eol + 2:eol + 2 + size]
        assert chunk == b"a" * len(chunk), "foreign bytes inside a chunk"
        total += len(chunk)
        if len(chunk) < size:
            break
        tail = data[eol + 2 + size:eol + 4 + size]
        assert b"\r\n".startswith(tail), "chunk not followed by CRLF: %r" % tail
        pos = eol + 4 + size
    return total


@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upstream_cut_mid_response_truncates_and_closes_never_splices(ringway_fn, framing, how):
    """The upstream dies 300 kB into a 1 MB response, with a second request pipelined behind the
    first on the client connection: the client gets a visibly truncated response (short of its
    Content-Length, or without a last chunk), then the close; never the second response, and the
    second request never goes upstream. The next client is served normally."""
    up = ScriptedUpstream(_cutting_handler).start()
    try:
        rw = start(ringway_fn, up.addr, upstream={"retries": 0}, admin=False)
        with RawConn(rw.port, timeout=10) as c:
            c.send(request_bytes("GET", "/cut/%s/%s" % (framing, how)) + request_bytes("GET", "/second"))
            r = c.read_head()
            assert r.status == 200, r
            rest = bytearray()
            while True:
                try:
                    d = c.rf.read1(65536)
                except ConnectionResetError:
                    break
                if not d:
                    break
                rest += d
        rest = bytes(rest)
        assert b"HTTP/1.1" not in rest and b"/second" not in rest, "another response spliced in"
        if framing == "content-length":
            assert int(r.get("content-length")) == FULL
            assert len(rest) < FULL, "the whole body arrived although the upstream died"
            assert rest == b"a" * len(rest), "foreign bytes in the body"
        else:
            assert "chunked" in r.tokens("transfer-encoding"), r
            assert _check_truncated_chunked(rest) < FULL
        assert "/second" not in up.targets(), "the pipelined request went upstream: %r" % up.targets()
        r = simple_get(rw.port, "/next")
        assert r.status == 200 and r.json()["target"] == "/next", r
    finally:
        up.stop()


BAD_HEADS = [
    ("status-not-numeric", b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok"),
    ("status-two-digits", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("status-below-100", b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok"),
    ("no-version", b"200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("http2-version", b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("binary", b"\x00\x01\x02\x03\xff\xfe\r\n\r\n"),
    ("cl-and-te", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    ("duplicate-cl-differ", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nokokok!"),
    ("cl-plus-sign", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok"),
    ("cl-list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"),
    ("te-gzip-only", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok"),
    ("nul-in-field", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok"),
    ("bare-cr-in-field", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok"),
    ("head-over-max-header-bytes", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 40000 + b"\r\nContent-Length: 2\r\n\r\nok"),
    ("too-many-fields", b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(300))
     + b"Content-Length: 2\r\n\r\nok"),
    ("head-cut-then-close", b"HTTP/1.1 200 OK\r\nContent-Le"),
    ("status-line-then-close", b"HTTP/1.1 200 OK\r\n"),
    ("switching-protocols-unasked", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"),
]


def _bad_head_handler(sock, req, state):
    name = req["target"].split("/")[2] if req["target"].startswith("/bad/") else None
    if name is None:
        body = json.dumps({"target": req["target"]}).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return True
    sock.sendall(dict(BAD_HEADS)[name])
    sock.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def bad_head_gw(ringway_factory):
    up = ScriptedUpstream(_bad_head_handler).start()
    gw = ringway_factory.start(upstreams=[{"name": "u", "endpoints": [up.addr], "retries": 0}],
                               routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "u"}],
                               name="badheads")
    yield gw
    up.stop()


@pytest.mark.parametrize("name", [b[0] for b in BAD_HEADS])
def test_garbage_or_ambiguous_response_head_is_502_json(bad_head_gw, name):
    """A response head that is not HTTP, or whose framing is ambiguous (CL and TE, two different
    Content-Lengths, a signed or listed CL, TE without chunked), obs-folded, with NUL or bare CR,
    too large, cut off, or a 101 nobody asked for: the client gets a 502 JSON error and none of
    the upstream's bytes; the same client connection, if kept, and a new one work."""
    with RawConn(bad_head_gw.port, timeout=10) as c:
        c.send(request_bytes("GET", "/bad/%s" % name))
        r = c.read_response()
        assert_json_error(r, 502)
        assert b"okok" not in r.body and r.body != b"ok"
        if "close" not in r.tokens("connection"):
            c.send(request_bytes("GET", "/after-bad"))
            r2 = c.read_response()
            assert r2.status == 200 and r2.json()["target"] == "/after-bad", r2
        else:
            assert c.is_closed(3)
    # A success resets passive health's failure count, so the next case is not ejected (503).
    r = simple_get(bad_head_gw.port, "/good")
    assert r.status == 200 and r.json()["target"] == "/good", r


def _close_on_reuse_handler(how):
    def handler(sock, req, state):
        if req["seq"] >= 1:
            # The upstream closes the pooled connection just as Ringway sends on it.
            if how == "rst":
                reset(sock)
            else:
                sock.shutdown(socket.SHUT_WR)
            return False
        body = json.dumps({"target": req["target"], "conn": req["conn"]}).encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        return True
    return handler


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_pooled_connection_closed_as_it_is_reused(ringway_fn, how):
    """The upstream closes each connection when a second request arrives on it (the keep-alive
    race). With retries = 0: a GET is sent again once on a new connection and succeeds (the
    upstream sees it twice, the client once); a POST with a body is never sent twice: 502 JSON."""
    up = ScriptedUpstream(_close_on_reuse_handler(how)).start()
    try:
        rw = start(ringway_fn, up.addr, upstream={"retries": 0}, server={"workers": 1})
        r = simple_get(rw.port, "/warm")
        assert r.status == 200, r
        retries0 = metric(rw.admin_port, "ringway_upstream_retries_total")
        r = simple_get(rw.port, "/get-on-reused")
        assert r.status == 200 and r.json()["target"] == "/get-on-reused", r
        assert up.targets().count("/get-on-reused") == 2, up.targets()
        assert metric(rw.admin_port, "ringway_upstream_retries_total") == retries0 + 1
        with RawConn(rw.port, timeout=10) as c:
            c.send(request_bytes("POST", "/post-on-reused", body=b"abc", headers=[("Connection", "close")]))
            r = c.read_response()
        assert_json_error(r, 502)
        assert up.targets().count("/post-on-reused") == 1, "a POST was sent twice: %r" % up.targets()
    finally:
        up.stop()


def _plain_handler(sock, req, state):
    body = json.dumps({"target": req["target"], "conn": req["conn"], "body": req["body"].decode()}).encode()
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return True


def test_idle_connection_closed_by_upstream_keepalive_timeout_is_not_used(ringway_fn):
    """The upstream closes idle connections after 200 ms (its keep-alive timeout is shorter than
    Ringway's idle_timeout, as with many application servers). A POST with a body after that
    must not be sent on the closed connection (it cannot be replayed and would be a 502): it
    gets a new connection and its answer."""
    up = ScriptedUpstream(_plain_handler, idle_close=0.2).start()
    try:
        rw = start(ringway_fn, up.addr, upstream={"retries": 0}, server={"workers": 1})
        for i in range(3):
            r = simple_get(rw.port, "/warm-%d" % i)
            assert r.status == 200, r
            wait_until(lambda: up.idle_closes >= i + 1, 3, what="the upstream to close its idle connection")
            time.sleep(0.05)  # the FIN is on its way to Ringway's pooled socket
            with RawConn(rw.port, timeout=10) as c:
                c.send(request_bytes("POST", "/post-%d" % i, body=b"payload", headers=[("Connection", "close")]))
                r = c.read_response()
            assert r.status == 200, "a POST was sent on a connection the upstream had closed: %r" % r
            assert r.json()["target"] == "/post-%d" % i and r.json()["body"] == "payload", r
    finally:
        up.stop()


GATHER_BODY = bytes(range(256)) * 160  # 40,960 bytes: more than one 16 KiB buffer


def _split_answer_handler(sock, req, state):
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(GATHER_BODY)
    if req["target"] == "/split":
        # The rest of the body is not there when the head and its first part are read.
        sock.sendall(head + GATHER_BODY[:20_000])
        time.sleep(0.05)
        sock.sendall(GATHER_BODY[20_000:])
    else:
        sock.sendall(head + GATHER_BODY)
    return True


def test_answers_larger_than_a_buffer_arrive_whole_on_one_connection(ringway_fn):
    """Answers of 40,960 bytes, written at once or with a pause after 20,000 body bytes, reach
    the client byte for byte, and the upstream connection stays usable: a body whose rest is
    already there leaves with its head in one write, the rest of one that is not follows."""
    up = ScriptedUpstream(_split_answer_handler).start()
    try:
        rw = start(ringway_fn, up.addr, server={"workers": 1})
        with RawConn(rw.port, timeout=10) as c:
            for target in ("/whole", "/split", "/whole", "/split"):
                c.send(request_bytes("GET", target))
                r = c.read_response()
                assert r.status == 200 and r.body == GATHER_BODY, (target, r.status, len(r.body))
        assert up.accepts == 1, "the upstream connection was not kept: %d accepts" % up.accepts
    finally:
        up.stop()


def _stray_response_handler(sock, req, state):
    body = json.dumps({"target": req["target"]}).encode()
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    if req["conn"] == 0 and req["seq"] == 0:
        # A buggy upstream: an unsolicited second response on the now idle connection.
        time.sleep(0.1)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Stray: 1\r\n\r\nEVIL")
        state["stray_sent"] = True
        STRAY_SENT.set()
    return True


STRAY_SENT = threading.Event()


def test_stray_bytes_on_an_idle_upstream_connection_never_answer_the_next_request(ringway_fn):
    """After a clean response the upstream sends an unsolicited response on the idle pooled
    connection. The next request (another client) must get its own answer, never the stray one:
    a pooled connection with unread bytes (or closed) is discarded, not reused."""
    STRAY_SENT.clear()
    up = ScriptedUpstream(_stray_response_handler).start()
    try:
        rw = start(ringway_fn, up.addr, upstream={"retries": 0}, server={"workers": 1}, admin=False)
        r = simple_get(rw.port, "/first")
        assert r.status == 200 and r.json()["target"] == "/first", r
        assert STRAY_SENT.wait(3)
        time.sleep(0.05)  # the stray bytes are in Ringway's pooled socket
        for i in range(3):
            r = simple_get(rw.port, "/next-%d" % i)
            assert r.get("x-stray") is None and r.body != b"EVIL", (
                "a stray upstream response answered another client's request: %r" % r)
            assert r.status == 200 and r.json()["target"] == "/next-%d" % i, r
    finally:
        up.stop()


def test_access_log_on_a_full_disk_drops_and_counts_lines_traffic_continues(ringway_fn, backend):
    """The access log points at /dev/full (every write fails with ENOSPC): every request still
    gets its 200, and the lost lines are counted in ringway_access_log_dropped_total."""
    rw = start(ringway_fn, backend.addr, log={"access": "/dev/full"})
    n = 60
    for i in range(n):
        r = simple_get(rw.port, "/echo?full-%d" % i)
        assert r.status == 200, r
    wait_until(lambda: metric(rw.admin_port, "ringway_access_log_dropped_total") >= n, 5,
               interval=0.1, what="%d dropped access-log lines to be counted" % n)
    for i in range(20):
        r = simple_get(rw.port, "/echo?still-%d" % i)
        assert r.status == 200, r
    assert rw.alive()
