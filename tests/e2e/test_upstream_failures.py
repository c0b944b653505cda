"""Upstream failures become JSON 502/504 errors, and a healthy route keeps serving."""

import socket
import threading
import time

import pytest

from backend import BlackholeServer, GarbageServer, ResetServer, SilentServer
from helpers import RawConn, assert_json_error, request_bytes, simple_get

RESPONSE_TIMEOUT = 1.0   # silent upstream
GOOD_RESPONSE_TIMEOUT = 2.0
CONNECT_TIMEOUT = 0.5    # blackhole upstream


class _Refuser:
    """A bound but never-listening port: connects are refused, and nobody else can take it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def stop(self):
        self.sock.close()


@pytest.fixture(scope="module")
def failing():
    servers = {
        "refuse": _Refuser(),
        "reset": ResetServer().start(),
        "silent": SilentServer().start(),
        "garbage": GarbageServer().start(),
        "blackhole": BlackholeServer().start(),
    }
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def gw(ringway_factory, backend, failing):
    ups = [{"name": "good", "endpoints": [backend.addr], "response_timeout": "2s", "retries": 0}]
    routes = []
    for name, srv in failing.items():
        u = {"name": name, "endpoints": ["127.0.0.1:%d" % srv.port], "retries": 0,
             "connect_timeout": "1s", "response_timeout": "1s"}
        if name == "blackhole":
            u["connect_timeout"] = "500ms"
        ups.append(u)
        routes.append({"name": name, "match": {"path_prefix": "/%s/" % name}, "upstream": name})
    routes.append({"name": "good", "match": {"path_prefix": "/"}, "upstream": "good"})
    return ringway_factory.start(upstreams=ups, routes=routes, name="failures")


def _timed_get(port, path, timeout=15):
    t0 = time.monotonic()
    r = simple_get(port, path, timeout=timeout)
    return r, time.monotonic() - t0


def _healthy(gw, tag):
    r = simple_get(gw.port, "/echo?healthy=%s" % tag, timeout=5)
    assert r.status == 200 and r.json()["target"] == "/echo?healthy=%s" % tag, r
    return r


# (upstream, expected status, min seconds, max seconds)
FAILURES = [
    ("refuse", 502, 0.0, 2.0),
    ("reset", 502, 0.0, 2.0),
    ("garbage", 502, 0.0, 2.0),
    ("silent", 504, RESPONSE_TIMEOUT * 0.9, RESPONSE_TIMEOUT + 3.0),
    ("blackhole", 504, CONNECT_TIMEOUT * 0.9, CONNECT_TIMEOUT + 3.0),
]


@pytest.mark.parametrize("name,status,tmin,tmax", [pytest.param(*f, id=f[0]) for f in FAILURES])
def test_upstream_failure_is_json_error_and_healthy_route_keeps_serving(gw, failing, name, status, tmin, tmax):
    """refused/reset/garbage upstreams give 502, silent/unconnectable ones 504 on time; /echo keeps working meanwhile."""
    if name == "blackhole":
        assert failing["blackhole"].is_full(), "blackhole listener no longer drops connects"
    result = {}

    def fail_req():
        try:
            result["r"], result["t"] = _timed_get(gw.port, "/%s/x" % name)
        except Exception as e:  # surfaced below
            result["e"] = e

    th = threading.Thread(target=fail_req)
    th.start()
    served_during = 0
    while th.is_alive() or served_during < 3:
        _healthy(gw, "%s-during-%d" % (name, served_during))
        served_during += 1
    th.join()
    assert "e" not in result, "request to the failing upstream raised %r" % result.get("e")
    r, t = result["r"], result["t"]
    assert_json_error(r, status)
    assert tmin <= t <= tmax, "%s answered %d after %.2fs, expected within [%.1f, %.1f]" % (
        name, status, t, tmin, tmax)
    for i in range(3):
        _healthy(gw, "%s-after-%d" % (name, i))


@pytest.mark.parametrize("name", ["refuse", "reset", "garbage"])
def test_repeated_upstream_failures_do_not_poison_the_pool(gw, name):
    """Failures give 502 until passive health ejects the endpoint (3 in a row; earlier tests
    on this gateway may have counted some already), then 503 (every endpoint down); the
    healthy route is fine throughout and afterwards."""
    statuses = []
    for i in range(10):
        r, _ = _timed_get(gw.port, "/%s/%d" % (name, i))
        assert r.status in (502, 503), r
        assert_json_error(r, r.status)
        statuses.append(r.status)
    # Once ejected, it stays ejected (10 s cooldown without active checks).
    first_503 = statuses.index(503) if 503 in statuses else len(statuses)
    assert first_503 <= 3, statuses
    assert statuses[first_503:] == [503] * (len(statuses) - first_503), statuses
    for i in range(5):
        _healthy(gw, "%s-post-%d" % (name, i))


def test_client_connection_usable_after_502_unless_closed(gw):
    """After a 502 without Connection: close, the same client connection serves the next request."""
    with RawConn(gw.port, timeout=10) as c:
        c.send(request_bytes("GET", "/refuse/x"))
        r = c.read_response()
        # 503 once passive health has ejected the refusing endpoint.
        assert r.status in (502, 503), r
        assert_json_error(r, r.status)
        if "close" in r.tokens("connection"):
            assert c.is_closed(3)
            return
        c.send(request_bytes("GET", "/echo?after-502"))
        r2 = c.read_response()
        assert r2.status == 200 and r2.json()["target"] == "/echo?after-502"


def test_slow_backend_response_timeout_is_504_and_late_response_never_leaks(gw):
    """/slow beyond response_timeout gives 504; its late response never reaches a later request."""
    r, t = _timed_get(gw.port, "/slow?s=2.6")
    assert_json_error(r, 504)
    assert GOOD_RESPONSE_TIMEOUT * 0.9 <= t <= GOOD_RESPONSE_TIMEOUT + 3.0, "504 after %.2fs" % t
    # For the next second (when the late response is written), every response must match its request.
    deadline = time.monotonic() + 1.5
    i = 0
    with RawConn(gw.port, timeout=5) as c:
        while time.monotonic() < deadline:
            c.send(request_bytes("GET", "/echo?seq=%d" % i))
            rr = c.read_response()
            assert rr.status == 200, rr
            assert rr.json()["target"] == "/echo?seq=%d" % i, "response mismatch (stale upstream bytes?): %r" % rr
            i += 1
    assert i > 10


def test_backend_closing_connection_is_not_reused_after_close_response(gw, backend):
    """After an upstream response with Connection: close, the next request still succeeds (new upstream conn)."""
    for i in range(5):
        with RawConn(gw.port, timeout=10) as c:
            c.send(request_bytes("GET", "/close/100"))
            assert c.read_response().body_len == 100
        _healthy(gw, "after-close-%d" % i)
