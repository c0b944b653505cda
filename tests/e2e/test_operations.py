"""Operations: balancing, health checks and retries, graceful drain, hot reload, the admin
listener (/healthz, /ready, /metrics, /stats, POST /reload), the access log and its reopen."""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend import ResetServer
from conftest import BackendProc, make_config, ringway_bin
from helpers import (RawConn, assert_json_error, free_port, port_open, request_bytes, simple_get,
                     wait_until)

HEALTH = {"path": "/healthz", "interval": "500ms", "timeout": "300ms",
          "healthy_after": 1, "unhealthy_after": 2}
HEALTH_INTERVAL = 0.5


# ---------------------------------------------------------------- admin helpers
def admin_get(admin_port, path, timeout=5.0):
    with RawConn(admin_port, timeout=timeout) as c:
        c.send(request_bytes("GET", path, host="127.0.0.1", headers=[("Connection", "close")]))
        return c.read_response()


def admin_reload(admin_port, timeout=10.0):
    with RawConn(admin_port, timeout=timeout) as c:
        c.send(request_bytes("POST", "/reload", host="127.0.0.1",
                             headers=[("Content-Length", "0"), ("Connection", "close")]))
        return c.read_response()


def scrape(admin_port):
    """All samples of /metrics as a list of (name, labels, value); the text must parse."""
    r = admin_get(admin_port, "/metrics")
    assert r.status == 200, r
    assert (r.get("content-type") or "").startswith("text/plain"), r
    text = r.body.decode()
    out = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), s.value))
    return out, text


def msum(samples, name, **labels):
    return sum(v for n, l, v in samples
               if n == name and all(l.get(k) == str(x) for k, x in labels.items()))


def metric_now(admin_port, name, **labels):
    return msum(scrape(admin_port)[0], name, **labels)


def write_conf(rw, text):
    """Replace rw's config file atomically (a reload never reads half a file)."""
    tmp = rw.conf.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, rw.conf)


# ---------------------------------------------------------------- traffic
class Traffic:
    """Client threads looping keep-alive GETs until stopped (bounded in time and count).

    Every response must be 200 (and, with expect_backend, come from that backend); anything
    else, including a connection error, is recorded in errors."""

    def __init__(self, port, path="/echo/traffic", threads=1, expect_backend=None,
                 headers=(), max_seconds=60, max_requests=500000):
        self.port = port
        self.path = path
        self.headers = list(headers)
        self.expect_backend = expect_backend
        self.max_seconds = max_seconds
        self.max_requests = max_requests
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.errors = []
        self.by_backend = Counter()
        self.last_seen = {}
        self.first_seen = {}
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _err(self, what):
        with self.lock:
            self.errors.append((round(time.monotonic(), 3), what))

    def _run(self, tid):
        conn = None
        deadline = time.monotonic() + self.max_seconds
        n = 0
        while not self.stop_ev.is_set() and time.monotonic() < deadline and n < self.max_requests:
            n += 1
            try:
                if conn is None:
                    conn = RawConn(self.port, timeout=10)
                conn.send(request_bytes("GET", "%s?t=%d&n=%d" % (self.path, tid, n), headers=self.headers))
                r = conn.read_response()
            except Exception as e:  # noqa: BLE001 - every failure is a client-visible error
                self._err("thread %d request %d: %s: %s" % (tid, n, type(e).__name__, e))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
                continue
            if r.status != 200:
                self._err("thread %d request %d: status %d body %r" % (tid, n, r.status, r.body[:200]))
            else:
                try:
                    b = json.loads(r.body)["backend"]
                except (ValueError, KeyError):
                    b = None
                if self.expect_backend is not None and b != self.expect_backend:
                    self._err("thread %d request %d: served by %r, expected %r" % (tid, n, b, self.expect_backend))
                with self.lock:
                    self.ok += 1
                    self.by_backend[b] += 1
                    self.last_seen[b] = time.monotonic()
                    self.first_seen.setdefault(b, self.last_seen[b])
            if "close" in r.tokens("connection"):
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(15)
        assert not any(t.is_alive() for t in self.threads), "traffic threads did not stop"

    def snapshot(self):
        with self.lock:
            return self.ok, Counter(self.by_backend), list(self.errors)


def backend_of(port, path="/echo", headers=()):
    r = simple_get(port, path, headers=headers)
    assert r.status == 200, r
    return r.json()["backend"]


def start_rw(factory, upstreams, routes, server=None, admin=True, log=None, name=None):
    admin_port = free_port() if admin else None
    rw = factory.start(upstreams=upstreams, routes=routes, server=server, admin=admin_port, log=log, name=name)
    rw.admin_port = admin_port
    if admin:
        wait_until(lambda: port_open(admin_port), 10, what="the admin listener")
    return rw


@pytest.fixture
def backends3():
    bs = [BackendProc("h%d" % i) for i in range(3)]
    yield bs
    for b in bs:
        b.stop()


# ================================================================ 1. health, ejection, retries
def test_killed_endpoint_ejected_without_client_errors_and_readmitted(ringway_fn, backends3):
    """A steady GET stream over three endpoints: killing one shows no client error (retries),
    ringway stops trying it within two health intervals, and it gets traffic again once it is
    back on the same port."""
    a, b, c = backends3
    rw = start_rw(ringway_fn, upstreams=[{"name": "pool", "endpoints": [x.addr for x in backends3],
                                          "health": HEALTH}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "pool"}])
    tr = Traffic(rw.port, threads=2, max_seconds=40).start()
    restarted = None
    try:
        wait_until(lambda: len(tr.snapshot()[1]) == 3, 5, what="traffic on all three endpoints")
        dead_port = c.port
        c.kill()
        t_kill = time.monotonic()
        # Within two health intervals (plus scheduling slack) ringway must stop connecting there.
        settle = t_kill + 2 * HEALTH_INTERVAL + 0.3
        time.sleep(max(0.0, settle - time.monotonic()))
        s0 = scrape(rw.admin_port)[0]
        ok0 = tr.snapshot()[0]
        errs0 = msum(s0, "ringway_upstream_connect_errors_total")
        retries0 = msum(s0, "ringway_upstream_retries_total")
        wait_until(lambda: tr.snapshot()[0] >= ok0 + 50, 5, what="50 more requests after the kill")
        time.sleep(0.5)
        s1 = scrape(rw.admin_port)[0]
        ok1 = tr.snapshot()[0]
        errs1 = msum(s1, "ringway_upstream_connect_errors_total")
        retries1 = msum(s1, "ringway_upstream_retries_total")
        assert errs1 == errs0 and retries1 == retries0, (
            "endpoint %d not ejected %.1fs after it died: over %d requests, connect errors went "
            "%s -> %s, retries %s -> %s" % (dead_port, settle - t_kill, ok1 - ok0, errs0, errs1, retries0, retries1))

        restarted = BackendProc("h2-again", port=dead_port)
        t_up = time.monotonic()
        wait_until(lambda: tr.snapshot()[1].get("h2-again", 0) > 0, 3 * HEALTH_INTERVAL + 2,
                   what="traffic to the endpoint restarted on port %d" % dead_port)
        back_after = time.monotonic() - t_up
        n_before = tr.snapshot()[1]["h2-again"]
        wait_until(lambda: tr.snapshot()[1]["h2-again"] >= n_before + 10, 5,
                   what="steady traffic to the restarted endpoint")
    finally:
        tr.stop()
        if restarted is not None:
            restarted.stop()
    ok, per, errors = tr.snapshot()
    assert not errors, "%d of %d requests failed as seen by the client, first: %s" % (
        len(errors), ok + len(errors), errors[:5])
    assert per["h0"] > 0 and per["h1"] > 0, per
    assert back_after < 3 * HEALTH_INTERVAL + 2, back_after


def test_all_endpoints_down_is_503_json(ringway_fn):
    """With every endpoint ejected, requests get 503 with a service_unavailable JSON error."""
    dead = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        dead.append(s)
    try:
        rw = start_rw(ringway_fn, upstreams=[{"name": "gone", "retries": 1, "health": HEALTH,
                                              "endpoints": ["127.0.0.1:%d" % s.getsockname()[1] for s in dead]}],
                      routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "gone"}], admin=False)
        seen = []

        def got_503():
            r = simple_get(rw.port, "/echo")
            seen.append(r.status)
            return r if r.status == 503 else None

        r = wait_until(got_503, 2 * HEALTH_INTERVAL + 3, interval=0.1, what="503 with every endpoint down")
        err = assert_json_error(r, 503)
        assert err["type"] == "service_unavailable", r
        assert all(s in (502, 503) for s in seen), seen
    finally:
        for s in dead:
            s.close()


def test_get_retried_on_another_endpoint_after_reset(ringway_fn, backend):
    """An upstream that resets before answering: idempotent GETs are retried on the other endpoint."""
    rst = ResetServer().start()
    try:
        rw = start_rw(ringway_fn, upstreams=[{"name": "mix", "retries": 1,
                                              "endpoints": [backend.addr, "127.0.0.1:%d" % rst.port]}],
                      routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "mix"}])
        statuses = Counter()
        for i in range(20):
            r = simple_get(rw.port, "/echo/retry-%d" % i)
            statuses[r.status] += 1
            if r.status == 200:
                assert r.json()["backend"] == backend.name
        assert statuses == Counter({200: 20}), statuses
        assert rst.accepts >= 1, "the reset endpoint was never tried"
        assert metric_now(rw.admin_port, "ringway_upstream_retries_total") >= 1
    finally:
        rst.stop()


def test_dead_endpoint_behind_pooled_connection_is_retried_elsewhere(ringway_fn):
    """hash pins a key to endpoint C; ringway holds idle pooled connections to C; C dies. The
    next GET for that key meets the dead pooled connection, then a refused connect to C: it must
    still be retried on the other endpoint (retries = 1 is untouched), not answered 502."""
    a, c = BackendProc("alive"), BackendProc("doomed")
    try:
        rw = start_rw(ringway_fn, upstreams=[{"name": "h", "balance": "hash", "hash_key": "header:x-user",
                                              "endpoints": [a.addr, c.addr]}],
                      routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "h"}], admin=False)
        key = next((k for k in ("u%d" % i for i in range(200))
                    if backend_of(rw.port, "/echo", headers=[("X-User", k)]) == "doomed"), None)
        assert key, "no key hashed to the second endpoint"
        # New client connections spread over the workers; each leaves an idle pooled conn to C.
        for _ in range(8):
            assert backend_of(rw.port, "/echo", headers=[("X-User", key)]) == "doomed"
        c.kill()
        wait_until(lambda: _connect_refused(c.port), 2, what="the killed backend's port to refuse")
        got = []
        for _ in range(8):
            r = simple_get(rw.port, "/echo", headers=[("X-User", key)])
            got.append((r.status, r.json().get("backend") if r.status == 200 else r.body[:120]))
        assert all(s == 200 for s, _ in got), (
            "GETs for a key on a dead endpoint were not retried elsewhere: %s" % got)
        assert all(b == "alive" for _, b in got), got
    finally:
        a.stop()
        c.stop()


def test_passive_ejection_without_health_checks_retries_after_10s(ringway_fn, backend):
    """No health checks: connect failures eject an endpoint (default unhealthy_after = 3); it gets
    no traffic during the 10 s cooldown even once it is back, and is tried again after it."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))  # refused until a backend takes the port
    port = hole.getsockname()[1]
    back = None
    rw = start_rw(ringway_fn, upstreams=[{"name": "p", "endpoints": [backend.addr, "127.0.0.1:%d" % port]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "p"}])
    tr = Traffic(rw.port, threads=1, max_seconds=30).start()
    try:
        wait_until(lambda: metric_now(rw.admin_port, "ringway_upstream_connect_errors_total") >= 3, 5,
                   interval=0.01, what="3 connect errors")
        t_eject = time.monotonic()
        errs = metric_now(rw.admin_port, "ringway_upstream_connect_errors_total")
        hole.close()
        back = BackendProc("back", port=port)
        ok0 = tr.snapshot()[0]
        wait_until(lambda: tr.snapshot()[0] >= ok0 + 50, 5, what="traffic after the ejection")
        assert metric_now(rw.admin_port, "ringway_upstream_connect_errors_total") <= errs + 1, \
            "connects to an ejected endpoint continued"
        wait_until(lambda: "back" in tr.first_seen, 14, interval=0.05,
                   what="the ejected endpoint to be tried again after its cooldown")
        rested = tr.first_seen["back"] - t_eject
    finally:
        tr.stop()
        hole.close()
        if back is not None:
            back.stop()
    ok, per, errors = tr.snapshot()
    assert not errors, errors[:5]
    assert 9.0 <= rested <= 12.0, "endpoint back in traffic %.1fs after its ejection (cooldown 10 s)" % rested


# ================================================================ 2. hot reload
def _reload_conf(rw, new_to_two, listeners=None, invalid=False, log=None):
    ups = [{"name": "one", "endpoints": [rw.b1.addr]},
           {"name": "two", "endpoints": [rw.b2.addr]}]
    if invalid:
        ups[1]["connect_timeout"] = "soon"
    routes = [{"name": "new", "match": {"path_prefix": "/new/"}, "upstream": "two" if new_to_two else "one"},
              {"name": "all", "match": {"path_prefix": "/"}, "upstream": "one"}]
    return make_config(rw.port, ups, routes, listeners=listeners, admin=rw.admin_port, log=log)


def test_twenty_reloads_under_traffic(ringway_fn, backend, backend2):
    """20 reloads (POST /reload and SIGHUP in turn) under 4 looping clients: no failed request,
    each route change applies to new requests at once, an invalid file is refused with file:line
    and key (400) and the running config kept; the reload counters match."""
    rw = start_rw(ringway_fn, upstreams=[{"name": "one", "endpoints": [backend.addr]},
                                         {"name": "two", "endpoints": [backend2.addr]}],
                  routes=[{"name": "new", "match": {"path_prefix": "/new/"}, "upstream": "one"},
                          {"name": "all", "match": {"path_prefix": "/"}, "upstream": "one"}])
    rw.b1, rw.b2 = backend, backend2
    reloads0 = metric_now(rw.admin_port, "ringway_reloads_total")
    errors0 = metric_now(rw.admin_port, "ringway_reload_errors_total")
    assert backend_of(rw.port, "/new/x") == backend.name
    tr = Traffic(rw.port, threads=4, expect_backend=backend.name, max_seconds=60).start()
    lags = []
    try:
        wait_until(lambda: tr.snapshot()[0] >= 20, 5, what="traffic to start")
        for i in range(20):
            to_two = i % 2 == 0
            write_conf(rw, _reload_conf(rw, to_two))
            if i % 2 == 0:
                r = admin_reload(rw.admin_port)
                assert r.status == 200, r
                doc = r.json()
                assert doc["status"] == "ok" and isinstance(doc.get("message"), str), doc
            else:
                os.kill(rw.pid, signal.SIGHUP)
                wait_until(lambda: metric_now(rw.admin_port, "ringway_reloads_total") >= reloads0 + i + 1, 5,
                           interval=0.01, what="SIGHUP reload #%d to be counted" % (i + 1))
            t0 = time.monotonic()
            want = backend2.name if to_two else backend.name
            wait_until(lambda: backend_of(rw.port, "/new/x") == want, 2, interval=0.01,
                       what="reload #%d: /new/ served by %s" % (i + 1, want))
            lags.append(time.monotonic() - t0)
            ok_now = tr.snapshot()[0]
            wait_until(lambda: tr.snapshot()[0] >= ok_now + 8, 5, what="traffic between reloads")

        # An invalid file: POST /reload says 400 with file:line: key, and nothing changes.
        last_valid = _reload_conf(rw, False)  # i == 19 wrote new_to_two=False
        bad = _reload_conf(rw, True, invalid=True)
        lineno = next(n + 1 for n, l in enumerate(bad.splitlines()) if "soon" in l)
        write_conf(rw, bad)
        r = admin_reload(rw.admin_port)
        assert r.status == 400, r
        doc = r.json()
        assert doc["status"] == "error", doc
        assert re.search(r"%s:%d: [^\n]*connect_timeout" % (re.escape(str(rw.conf)), lineno), doc["message"]), doc
        # The same file by SIGHUP: refused as well, counted.
        os.kill(rw.pid, signal.SIGHUP)
        wait_until(lambda: metric_now(rw.admin_port, "ringway_reload_errors_total") >= errors0 + 2, 5,
                   interval=0.01, what="the refused SIGHUP reload to be counted")
        ok_now = tr.snapshot()[0]
        wait_until(lambda: tr.snapshot()[0] >= ok_now + 50, 5, what="traffic after the refused reloads")
        assert backend_of(rw.port, "/new/x") == backend.name, "the refused file changed routing"
        write_conf(rw, last_valid)
    finally:
        tr.stop()
    ok, per, errors = tr.snapshot()
    assert not errors, "%d of %d requests failed during reloads, first: %s" % (len(errors), ok + len(errors), errors[:5])
    assert ok > 200, ok
    samples = scrape(rw.admin_port)[0]
    assert msum(samples, "ringway_reloads_total") - reloads0 == 20, samples
    assert msum(samples, "ringway_reload_errors_total") - errors0 == 2, samples
    print("reload-to-new-request lags: %s" % ["%.3f" % x for x in lags])
    # "within ~100 ms": measured from the reload being confirmed to a request seeing it.
    assert max(lags) < 0.5, "slowest reload took %.3fs to reach new requests (all: %s)" % (
        max(lags), ["%.3f" % x for x in lags])


def test_reload_binds_added_listener_and_closes_removed_one(ringway_fn, backend, backend2):
    """A listener added to the file is bound by the reload; removing it closes it again."""
    rw = start_rw(ringway_fn, upstreams=[{"name": "one", "endpoints": [backend.addr]},
                                         {"name": "two", "endpoints": [backend2.addr]}],
                  routes=[{"name": "new", "match": {"path_prefix": "/new/"}, "upstream": "one"},
                          {"name": "all", "match": {"path_prefix": "/"}, "upstream": "one"}])
    rw.b1, rw.b2 = backend, backend2
    extra = free_port()
    both = [{"name": "public", "address": "127.0.0.1:%d" % rw.port},
            {"name": "extra", "address": "127.0.0.1:%d" % extra}]
    write_conf(rw, _reload_conf(rw, False, listeners=both))
    r = admin_reload(rw.admin_port)
    assert r.status == 200, r
    wait_until(lambda: port_open(extra), 2, what="the added listener on %d" % extra)
    assert backend_of(extra, "/echo") == backend.name
    write_conf(rw, _reload_conf(rw, False, listeners=both[:1]))
    r = admin_reload(rw.admin_port)
    assert r.status == 200, r
    wait_until(lambda: not port_open(extra), 2, what="the removed listener on %d to close" % extra)
    assert backend_of(rw.port, "/echo") == backend.name


# ================================================================ 3. graceful drain
class SseClient(threading.Thread):
    def __init__(self, port, n, ms):
        super().__init__(daemon=True)
        self.port, self.n, self.ms = port, n, ms
        self.events = 0
        self.first = threading.Event()
        self.done_at = None
        self.error = None
        self.status = None

    def run(self):
        try:
            with RawConn(self.port, timeout=15) as c:
                c.send(request_bytes("GET", "/sse?n=%d&ms=%d" % (self.n, self.ms)))
                r = c.read_head()
                self.status = r.status
                assert r.status == 200, r
                assert "chunked" in r.tokens("transfer-encoding"), r
                buf = b""
                while True:
                    size = int(c._line().split(b";")[0].strip(), 16)
                    if size == 0:
                        while c._line() != b"\r\n":
                            pass
                        break
                    data = c.rf.read(size)
                    assert len(data) == size, "chunk truncated"
                    assert c._line() == b"\r\n"
                    buf += data
                    while b"\n\n" in buf:
                        ev, buf = buf.split(b"\n\n", 1)
                        doc = json.loads(ev.split(b"data: ", 1)[1])
                        assert doc["i"] == self.events, (doc, self.events)
                        self.events += 1
                        self.first.set()
                self.done_at = time.monotonic()
        except Exception as e:  # noqa: BLE001
            self.error = "%s: %s" % (type(e).__name__, e)
        finally:
            self.first.set()


def _connect_refused(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def test_sigterm_drains_50_sse_streams_then_exits_0(ringway_fn, backend):
    """SIGTERM with 50 SSE streams in flight: new connections are refused, an idle keep-alive
    connection is closed, /ready says 503, every stream completes with all its events, and the
    process exits 0 soon after the last one, within drain_timeout."""
    drain_timeout = 8.0
    n_events, gap_ms = 25, 100
    rw = start_rw(ringway_fn, upstreams=[{"name": "sse", "endpoints": [backend.addr],
                                          "response_timeout": "10s", "max_connections": 128}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "sse"}],
                  server={"drain_timeout": "8s"})
    assert admin_get(rw.admin_port, "/ready").status == 200
    idle = RawConn(rw.port, timeout=5)
    idle.send(request_bytes("GET", "/echo/idle"))
    assert idle.read_response().status == 200
    clients = [SseClient(rw.port, n_events, gap_ms) for _ in range(50)]
    for cl in clients:
        cl.start()
    try:
        for cl in clients:
            assert cl.first.wait(10), "stream did not start"
        started = [cl for cl in clients if cl.events > 0]
        assert len(started) == 50, [cl.error for cl in clients if cl.error][:3]
        in_flight = sum(1 for cl in clients if cl.done_at is None)
        t_term = time.monotonic()
        os.kill(rw.pid, signal.SIGTERM)
        wait_until(lambda: _connect_refused(rw.port), 1.0, interval=0.02,
                   what="new connections to be refused after SIGTERM")
        assert idle.is_closed(timeout=2.0), "idle keep-alive connection not closed by the drain"
        r = admin_get(rw.admin_port, "/ready")
        assert r.status == 503, r
        stats = json.loads(admin_get(rw.admin_port, "/stats").body)
        assert stats["draining"] is True, stats
        assert in_flight == 50, "streams finished before the drain could be tested (%d left)" % in_flight
        for cl in clients:
            cl.join(drain_timeout + 5)
        rc = rw.proc.wait(drain_timeout + 3)
        t_exit = time.monotonic()
    finally:
        idle.close()
        rw.stop()
    problems = [(i, cl.status, cl.events, cl.error) for i, cl in enumerate(clients)
                if cl.error or cl.events != n_events]
    assert not problems, "%d of 50 streams incomplete (index, status, events, error): %s" % (
        len(problems), problems[:5])
    assert rc == 0, "exit status %s after SIGTERM" % rc
    assert t_exit - t_term < drain_timeout, "exit took %.1fs, drain_timeout is %.0fs" % (t_exit - t_term, drain_timeout)
    last = max(cl.done_at for cl in clients)
    assert t_exit - last < 2.0, "exited %.1fs after the last stream ended (drain waited needlessly)" % (t_exit - last)
    assert _connect_refused(rw.port)


def test_drain_timeout_cuts_long_stream_and_exits_0(ringway_fn, backend):
    """A stream longer than drain_timeout is cut when it expires; the exit is still 0."""
    rw = start_rw(ringway_fn, upstreams=[{"name": "sse", "endpoints": [backend.addr], "response_timeout": "20s"}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "sse"}],
                  server={"drain_timeout": "1s"}, admin=False)
    cl = SseClient(rw.port, 100, 100)  # 10 s
    cl.start()
    try:
        assert cl.first.wait(5) and cl.events > 0, cl.error
        t_term = time.monotonic()
        os.kill(rw.pid, signal.SIGTERM)
        rc = rw.proc.wait(6)
        took = time.monotonic() - t_term
        cl.join(5)
    finally:
        rw.stop()
    assert rc == 0, rc
    assert 0.8 <= took < 2.5, "exit %.2fs after SIGTERM with drain_timeout = 1s" % took
    assert cl.events < 100 and cl.error, "the long stream was not cut: %d events, %s" % (cl.events, cl.error)


# ================================================================ 4. metrics, stats, access log
def test_metrics_stats_and_access_log_account_for_every_request(ringway_fn, backend, tmp_path):
    """/metrics parses; requests_total by route and status and the histogram count equal what
    was sent; /stats has its shape; the access log has exactly one JSON line per request,
    carrying the client's x-request-id."""
    alog = tmp_path / "access.log"
    rw = start_rw(ringway_fn, upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "st", "match": {"path_prefix": "/status/"}, "upstream": "b"},
                          {"name": "ra", "match": {"path_prefix": "/a/"}, "upstream": "b"},
                          {"name": "rb", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  log={"access": str(alog)})
    assert admin_get(rw.admin_port, "/healthz").status == 200
    assert admin_get(rw.admin_port, "/healthz").body.strip() == b"ok"
    assert admin_get(rw.admin_port, "/ready").status == 200
    s_before = scrape(rw.admin_port)[0]
    assert msum(s_before, "ringway_requests_total") == 0

    sent = []  # (route, path, status, request id or None)
    plan = [("ra", "/a/%d", 200, 37), ("rb", "/b/%d", 200, 23), ("st", "/status/404?%d", 404, 6),
            ("st", "/status/201?%d", 201, 4)]
    with RawConn(rw.port) as c:
        k = 0
        for route, pat, status, count in plan:
            for i in range(count):
                k += 1
                rid = "ops-test-%04d" % k if k % 2 == 0 else None
                hdrs = [("X-Request-Id", rid)] if rid else []
                body = b"x" * (k % 5)
                c.send(request_bytes("POST" if body else "GET", pat % i, headers=hdrs, body=body))
                r = c.read_response()
                assert r.status == status, r
                if rid and r.get("x-request-id") is not None:
                    assert r.get("x-request-id") == rid, r
                sent.append((route, status, rid))
    total = len(sent)

    def lines():
        try:
            return alog.read_text().splitlines()
        except FileNotFoundError:
            return []

    t0 = time.monotonic()
    wait_until(lambda: len(lines()) >= total, 2, interval=0.01, what="%d access-log lines" % total)
    log_lag = time.monotonic() - t0
    time.sleep(0.3)  # nothing more may arrive (exactly one line per request)
    got = lines()
    assert len(got) == total, "%d access-log lines for %d requests" % (len(got), total)
    recs = []
    for ln in got:
        try:
            recs.append(json.loads(ln))
        except ValueError:
            pytest.fail("access-log line is not JSON: %r" % ln)
    keys = {"time", "request_id", "client", "route", "upstream", "status", "bytes_in", "bytes_out",
            "duration_ms", "upstream_ms", "consumer", "model", "tokens"}
    for rec in recs:
        assert keys <= set(rec), "missing %s in %r" % (keys - set(rec), rec)
        assert rec["upstream"] in ("b", backend.addr), rec  # the upstream's name or the endpoint used
        assert rec["client"].startswith("127.0.0.1"), rec
    assert Counter((r["route"], r["status"]) for r in recs) == Counter((s[0], s[1]) for s in sent)
    logged_ids = Counter(r["request_id"] for r in recs)
    assert all(isinstance(i, str) and i for i in logged_ids), logged_ids
    assert max(logged_ids.values()) == 1, "request ids logged twice: %s" % logged_ids.most_common(3)
    for route, status, rid in sent:
        if rid:
            assert logged_ids[rid] == 1, "client request id %r logged %d times" % (rid, logged_ids[rid])
    assert sum(1 for r in recs if r["bytes_in"] > 0) >= 1 and all(r["bytes_out"] > 0 for r in recs), recs[:3]

    samples, text = scrape(rw.admin_port)
    by_route = Counter(s[0] for s in sent)
    for route, n in by_route.items():
        assert msum(samples, "ringway_requests_total", route=route) == n, (route, n, text)
        assert msum(samples, "ringway_request_duration_seconds_count", route=route) == n, (route, text)
        inf = msum(samples, "ringway_request_duration_seconds_bucket", route=route, le="+Inf")
        assert inf == n, (route, inf, n)
        assert msum(samples, "ringway_response_bytes_total", route=route) > 0
    assert msum(samples, "ringway_requests_total") == total
    assert msum(samples, "ringway_requests_total", route="st", status="404") == 6
    assert msum(samples, "ringway_requests_total", route="st", status="201") == 4
    assert msum(samples, "ringway_request_bytes_total") >= sum(range(1, 5)), text
    names = {s[0] for s in samples}
    for want in ["ringway_upstream_connections", "ringway_upstream_connects_total",
                 "ringway_upstream_connect_errors_total", "ringway_upstream_retries_total",
                 "ringway_connections", "ringway_connections_accepted_total", "ringway_buffer_pool_in_use",
                 "ringway_buffer_pool_capacity", "ringway_buffer_pool_peak", "ringway_driver_info",
                 "ringway_access_log_dropped_total", "ringway_reloads_total", "ringway_reload_errors_total",
                 "process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "process_start_time_seconds", "ringway_request_bytes_total"]:
        assert want in names, "metric %s missing from /metrics" % want
    assert msum(samples, "ringway_access_log_dropped_total") == 0
    assert msum(samples, "ringway_connections_accepted_total") >= 1
    assert msum(samples, "process_resident_memory_bytes") > 1 << 20
    drivers = [l for n, l, v in samples if n == "ringway_driver_info"]
    assert len(drivers) == 2 and all(l["driver"].split()[0] in ("io_uring", "epoll") for l in drivers), drivers

    st = json.loads(admin_get(rw.admin_port, "/stats").body)
    assert st["draining"] is False
    assert len(st["workers"]) == 2, st
    for w in st["workers"]:
        assert {"id", "driver", "connections", "accepted", "buffers_in_use", "buffers_capacity",
                "buffers_peak"} <= set(w), w
    assert sum(w["accepted"] for w in st["workers"]) >= 1, st
    assert all(u["name"] == "b" and {"worker", "open", "idle", "connects"} <= set(u) for u in st["upstreams"]), st
    assert sum(u["connects"] for u in st["upstreams"]) >= 1, st
    assert log_lag < 1.0, "access-log lines took %.2fs to appear" % log_lag


def test_sigusr1_reopens_access_log(ringway_fn, backend, tmp_path):
    """logrotate: rename the file, SIGUSR1; later lines go to a new file at the original path."""
    alog = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    rw = start_rw(ringway_fn, upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  log={"access": str(alog)}, admin=False)

    def count(p):
        try:
            return len(p.read_text().splitlines())
        except FileNotFoundError:
            return 0

    for i in range(5):
        assert simple_get(rw.port, "/echo/before-%d" % i, headers=[("X-Request-Id", "before-%d" % i)]).status == 200
    wait_until(lambda: count(alog) == 5, 2, what="5 lines in the access log")
    os.rename(alog, rotated)
    os.kill(rw.pid, signal.SIGUSR1)
    wait_until(lambda: alog.exists(), 2, what="the access log reopened at %s" % alog)
    for i in range(7):
        assert simple_get(rw.port, "/echo/after-%d" % i, headers=[("X-Request-Id", "after-%d" % i)]).status == 200
    wait_until(lambda: count(alog) == 7, 2, what="7 lines in the new access log")
    time.sleep(0.2)
    old = [json.loads(l)["request_id"] for l in rotated.read_text().splitlines()]
    new = [json.loads(l)["request_id"] for l in alog.read_text().splitlines()]
    assert sorted(old) == ["before-%d" % i for i in range(5)], old
    assert sorted(new) == ["after-%d" % i for i in range(7)], new


def test_access_log_off_and_stdout(ringway_fn, backend):
    """access = "stdout" prints JSON lines on stdout; "off" prints none."""
    rw = start_rw(ringway_fn, upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  log={"access": "stdout"}, admin=False, name="stdoutlog")
    rw_off = start_rw(ringway_fn, upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                      routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                      log={"access": "off"}, admin=False, name="offlog")
    for i in range(3):
        assert simple_get(rw.port, "/echo", headers=[("X-Request-Id", "stdout-%d" % i)]).status == 200
        assert simple_get(rw_off.port, "/echo", headers=[("X-Request-Id", "off-%d" % i)]).status == 200

    def json_lines(r):
        out = []
        for ln in r.log_path.read_text(errors="replace").splitlines():
            if ln.startswith("{") and '"request_id"' in ln:
                out.append(json.loads(ln))
        return out

    wait_until(lambda: len(json_lines(rw)) >= 3, 2, what="3 access-log lines on stdout")
    time.sleep(0.3)
    assert sorted(r["request_id"] for r in json_lines(rw)) == ["stdout-%d" % i for i in range(3)]
    assert json_lines(rw_off) == []


# ================================================================ 5. balancing
def _keys_to_backends(port, keys, threads=4, offset=0):
    """Send one GET per key (x-user header) over `threads` keep-alive connections."""
    out = {}
    errs = []
    lock = threading.Lock()

    def run(t):
        try:
            with RawConn(port) as c:
                for i, k in enumerate(keys):
                    if (i + offset) % threads != t:
                        continue
                    c.send(request_bytes("GET", "/echo/hash", headers=[("X-User", k)]))
                    r = c.read_response()
                    assert r.status == 200, r
                    with lock:
                        out[k] = r.json()["backend"]
        except Exception as e:  # noqa: BLE001
            errs.append(repr(e))

    ts = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errs, errs
    assert len(out) == len(keys)
    return out


@pytest.fixture
def backends4():
    bs = [BackendProc("k%d" % i) for i in range(4)]
    yield bs
    for b in bs:
        b.stop()


def test_consistent_hash_moves_only_removed_endpoints_keys(ringway_fn, backends4):
    """hash on header:x-user over 4 endpoints, 1000 keys; removing one endpoint (edit + reload)
    moves only the keys that were on it; a key maps to one backend from every worker."""
    def conf(eps):
        return make_config(rw.port, [{"name": "h", "endpoints": [b.addr for b in eps], "balance": "hash",
                                      "hash_key": "header:x-user"}],
                           [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "h"}], admin=rw.admin_port)

    rw = start_rw(ringway_fn, upstreams=[{"name": "h", "endpoints": [b.addr for b in backends4], "balance": "hash",
                                          "hash_key": "header:x-user"}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "h"}])
    keys = ["user-%d" % i for i in range(1000)]
    first = _keys_to_backends(rw.port, keys)
    again = _keys_to_backends(rw.port, keys[:200], threads=3, offset=1)
    assert {k: first[k] for k in again} == again, "same key, different backend on a second pass"
    share = Counter(first.values())
    assert len(share) == 4 and min(share.values()) >= 100, "uneven spread over 4 endpoints: %s" % share
    removed = backends4[2]
    write_conf(rw, conf([b for b in backends4 if b is not removed]))
    r = admin_reload(rw.admin_port)
    assert r.status == 200, r
    t0 = time.monotonic()
    on_removed = [k for k in keys if first[k] == removed.name][:20]
    wait_until(lambda: all(v != removed.name for v in _keys_to_backends(rw.port, on_removed, threads=2).values()),
               1.0, interval=0.01, what="the removed endpoint to get no more keys after the reload")
    lag = time.monotonic() - t0
    second = _keys_to_backends(rw.port, keys, threads=4, offset=1)
    moved_others = [k for k in keys if first[k] != removed.name and second[k] != first[k]]
    assert not moved_others, "%d keys not on the removed endpoint moved, e.g. %s" % (
        len(moved_others), [(k, first[k], second[k]) for k in moved_others[:5]])
    still = [k for k in keys if second[k] == removed.name]
    assert not still, "%d keys still on the removed endpoint %.2fs after the reload" % (len(still), lag)


def test_hash_by_cookie_and_ip(ringway_fn, backends4):
    """hash_key = "cookie:sid" pins a session to one backend and spreads sessions; "ip" pins a client."""
    eps = [b.addr for b in backends4]
    rw = start_rw(ringway_fn, upstreams=[{"name": "c", "endpoints": eps, "balance": "hash", "hash_key": "cookie:sid"},
                                         {"name": "i", "endpoints": eps, "balance": "hash", "hash_key": "ip"}],
                  routes=[{"name": "ip", "match": {"path_prefix": "/ip/"}, "upstream": "i"},
                          {"name": "cookie", "match": {"path_prefix": "/"}, "upstream": "c"}], admin=False)
    per_session = {}
    for s in range(40):
        seen = {backend_of(rw.port, "/echo/c", headers=[("Cookie", "theme=dark; sid=s%d; x=1" % s)]) for _ in range(3)}
        assert len(seen) == 1, "session s%d went to %s" % (s, seen)
        per_session[s] = seen.pop()
    assert len(set(per_session.values())) >= 3, per_session
    ip_seen = {backend_of(rw.port, "/ip/x") for _ in range(30)}
    assert len(ip_seen) == 1, ip_seen


def test_weighted_round_robin_3_to_1(ringway_fn, backend, backend2):
    """weight 3 vs 1: about 75 % / 25 % of 400 requests (±8 points)."""
    rw = start_rw(ringway_fn, upstreams=[{"name": "w", "balance": "round_robin",
                                          "endpoints": [{"address": backend.addr, "weight": 3}, backend2.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "w"}], admin=False)
    got = Counter()
    conns = [RawConn(rw.port) for _ in range(4)]
    try:
        for i in range(400):
            c = conns[i % 4]
            c.send(request_bytes("GET", "/echo/w"))
            r = c.read_response()
            assert r.status == 200, r
            got[r.json()["backend"]] += 1
    finally:
        for c in conns:
            c.close()
    share = got[backend.name] / 400
    assert 0.67 <= share <= 0.83, "weight 3:1 gave %s" % got


def test_least_requests_sends_less_to_slow_endpoint(ringway_fn):
    """least_requests: an endpoint that answers in 150 ms gets far fewer of 8 clients' requests."""
    fast, slow = BackendProc("fast"), BackendProc("slow", delay_ms=150)
    try:
        rw = start_rw(ringway_fn, upstreams=[{"name": "lr", "balance": "least_requests",
                                              "endpoints": [fast.addr, slow.addr]}],
                      routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "lr"}], admin=False)
        tr = Traffic(rw.port, threads=8, max_seconds=10).start()
        try:
            wait_until(lambda: tr.snapshot()[0] >= 600, 8, interval=0.05, what="600 requests")
        finally:
            tr.stop()
        ok, per, errors = tr.snapshot()
        assert not errors, errors[:5]
        assert per["slow"] * 4 < per["fast"], "least_requests: %s" % per
    finally:
        fast.stop()
        slow.stop()


# ================================================================ 6. start-up errors
def test_second_instance_on_same_port_fails_naming_listener(ringway_fn, backend, tmp_path):
    """A second ringway on a listener port already in use exits non-zero naming the listener."""
    rw = start_rw(ringway_fn, upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}], admin=False)
    conf = tmp_path / "second.toml"
    conf.write_text(make_config(rw.port, [{"name": "b", "endpoints": [backend.addr]}],
                                [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                                listeners=[{"name": "frontdoor", "address": "127.0.0.1:%d" % rw.port}]))
    p = subprocess.run([ringway_bin(), "--conf", str(conf)], capture_output=True, text=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "frontdoor" in out and str(rw.port) in out, out
    assert backend_of(rw.port) == backend.name, "the first instance was disturbed"
