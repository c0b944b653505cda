"""Key auth and request limits, end to end: 401s and where the key may come from, exact
local and cluster limits (one Redis, Redis Cluster) across cores and replicas, Redis calls per
admitted request, Redis failure modes and recovery, a bounded key table under 200k distinct keys,
shadow mode.

Exactness tests count admissions inside one clock-aligned window: they use requests_per_hour
(or wait, when the current minute is almost over, for the next one to start).
"""

import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import HERE, Ringway, make_config
from fast_backend import FastBackend
from helpers import RawConn, assert_json_error, free_port, port_open, request_bytes, simple_get, wait_until
from redis_procs import (  # noqa: F401  (fixtures)
    redis_cluster,
    redis_cluster_partial,
    redis_server,
    redis_tls_cluster,
    redis_tls_server,
)

LIMIT_H = "x-ratelimit-limit-requests"
REMAIN_H = "x-ratelimit-remaining-requests"
RESET_H = "x-ratelimit-reset-requests"


# ================================================================ processes and config
@pytest.fixture(scope="module")
def fast_backend():
    b = FastBackend()
    yield b
    b.stop()


def _tv(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_tv(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join("%s = %s" % (k, _tv(x)) for k, x in v.items()) + " }"
    raise TypeError(v)


def limits_toml(redis=None, consumers=(), filters=()):
    """[redis], [[consumers]] and [[filters]] tables, appended after make_config's text."""
    out = []
    if redis:
        out += ["", "[redis]"] + ["%s = %s" % (k, _tv(v)) for k, v in redis.items()]
    for c in consumers:
        out += ["", "[[consumers]]"] + ["%s = %s" % (k, _tv(v)) for k, v in c.items()]
    for f in filters:
        out += ["", "[[filters]]"] + ["%s = %s" % (k, _tv(v)) for k, v in f.items()]
    return "\n".join(out) + "\n"


def start_gw(factory, upstream_addr, filters, route_filters, consumers=(), redis=None,
             log=None, name=None, server=None):
    """A ringway with an admin listener, one catch-all route through route_filters."""
    port, admin_port = free_port(), free_port()
    name = name or "rw%d" % len(factory.instances)
    text = make_config(port, [{"name": "b", "endpoints": [upstream_addr]}],
                       [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "b",
                         "filters": list(route_filters)}],
                       server, admin=admin_port, log=log)
    text += limits_toml(redis, consumers, filters)
    rw = Ringway(text, factory.tmpdir / name, name=name, port=port)
    rw.admin_port = admin_port
    factory.instances.append(rw)
    rw.start()
    wait_until(lambda: port_open(admin_port), 10, what="the admin listener")
    return rw


def redis_conf(url=None, nodes=None, timeout="200ms"):
    d = {"flush_interval": "5ms", "timeout": timeout}
    if url:
        d["url"] = url + "/0"
    else:
        d["cluster_nodes"] = list(nodes)
    return d


def rate_filter(name="rpm", scope="local", key="consumer", rules=None, **kw):
    d = {"name": name, "kind": "rate-limit", "scope": scope, "key": key,
         "rules": rules or [{"match": "*", "requests_per_hour": 20}]}
    d.update(kw)
    return d


AUTH = {"name": "auth", "kind": "key-auth"}


# ================================================================ metrics
def scrape(rw):
    r = simple_get(rw.admin_port, "/metrics", host="127.0.0.1")
    assert r.status == 200, r
    out = []
    for fam in text_string_to_metric_families(r.body.decode()):
        for s in fam.samples:
            out.append((s.name, dict(s.labels), s.value))
    return out


def msum(samples, name, **labels):
    return sum(v for n, l, v in samples
               if n == name and all(l.get(k) == str(x) for k, x in labels.items()))


def metric(rw, name, **labels):
    return msum(scrape(rw), name, **labels)


def decisions(rws, filt):
    out = {"allowed": 0, "rejected": 0, "shadow_rejected": 0}
    for rw in rws:
        s = scrape(rw)
        for d in out:
            out[d] += msum(s, "ringway_limiter_decisions_total", filter=filt, decision=d)
    return out


# ================================================================ clients
def ensure_window(period_s, need_s):
    """Make sure at least need_s seconds remain in the current clock-aligned window of
    period_s: if not, wait (a readiness wait on the clock) until the next one has begun."""
    left = period_s - (time.time() % period_s)
    if left < need_s:
        wait_until(lambda: period_s - (time.time() % period_s) > need_s, left + 2, interval=0.05,
                   what="the next %d s window" % period_s)
    return time.time()


CL_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


def read_n(sock, n, heads=False, buf=None):
    """Read n responses (Content-Length framed) from sock; [(status, head bytes or None)]."""
    buf = buf if buf is not None else bytearray()
    pos = 0
    out = []
    while True:
        while len(out) < n:
            he = buf.find(b"\r\n\r\n", pos)
            if he < 0:
                break
            m = CL_RE.search(buf, pos, he + 2)
            end = he + 4 + (int(m.group(1)) if m else 0)
            if end > len(buf):
                break
            out.append((int(buf[pos + 9:pos + 12]), bytes(buf[pos:he]) if heads else None))
            pos = end
        if len(out) >= n:
            return out
        if pos > (1 << 20):
            del buf[:pos]
            pos = 0
        d = sock.recv(1 << 20)
        if not d:
            raise EOFError("connection closed after %d of %d responses" % (len(out), n))
        buf += d


def head_map(head):
    m = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        m[k.strip().lower()] = v.strip()
    return m


def parallel(fn, args_list):
    """Run fn(*args) in one thread each, started together; returns results in order."""
    results = [None] * len(args_list)
    errors = []
    gate = threading.Barrier(len(args_list))

    def run(i, args):
        try:
            gate.wait(30)
            results[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i, a), daemon=True) for i, a in enumerate(args_list)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "client threads still running after 120 s"
    if errors:
        raise errors[0]
    return results


def spread(ports, reqs, threads):
    """Send reqs [(target, headers)] from `threads` threads, each with a keep-alive connection
    to every port, request i of a thread to ports[i % len]; [(status, Response, latency)]."""
    chunks = [reqs[i::threads] for i in range(threads)]

    def worker(tid, chunk):
        conns = [RawConn(p, timeout=10) for p in ports]
        out = []
        try:
            for i, (target, headers) in enumerate(chunk):
                c = conns[(i + tid) % len(conns)]
                t0 = time.monotonic()
                c.send(request_bytes("GET", target, headers=headers))
                r = c.read_response()
                r.at = time.time()
                out.append((r.status, r, time.monotonic() - t0))
        finally:
            for c in conns:
                c.close()
        return out

    res = parallel(worker, [(i, c) for i, c in enumerate(chunks)])
    return [x for part in res for x in part]


GO_DUR = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s|(\d+)ms)$")


def go_duration(text):
    """Seconds in an OpenAI/Go duration such as "1h2m3.004s", "59.5s", "250ms"."""
    m = GO_DUR.match(text or "")
    assert m, "not a Go-style duration: %r" % text
    h, mi, sec, ms = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(sec or 0) + int(ms or 0) / 1000


def check_reset(r, period):
    """x-ratelimit-reset-requests (and retry-after on a 429) point at the end of the
    clock-aligned window the response was decided in (r.at: when it was read)."""
    if period is None or not hasattr(r, "at"):
        return
    left = period - (r.at % period)
    reset = go_duration(r.get(RESET_H))
    assert 0 < reset <= period and abs(reset - left) < 2.0, (
        "%s = %r, but the %d s window ends in %.2f s (%r)" % (RESET_H, r.get(RESET_H), period, left, r))
    if r.status == 429:
        ra = int(r.get("retry-after"))
        assert abs(ra - left) < 2.5, "retry-after %d, window ends in %.2f s" % (ra, left)


def check_limited(r, limit, period=None):
    """A 429 from a rate limit: JSON error, retry-after, the three x-ratelimit headers."""
    err = assert_json_error(r, 429)
    assert err["type"] == "rate_limit_exceeded", r
    ra = r.get("retry-after")
    assert ra is not None and ra.isdigit() and int(ra) >= 1, "bad retry-after on %r" % r
    assert r.get(LIMIT_H) == str(limit), "%s != %d on %r" % (LIMIT_H, limit, r)
    assert r.get(REMAIN_H) == "0", "%s != 0 on %r" % (REMAIN_H, r)
    assert r.get(RESET_H), "%s missing on %r" % (RESET_H, r)
    check_reset(r, period)


def check_allowed(r, limit, period=None):
    assert r.status == 200, r
    assert r.get(LIMIT_H) == str(limit), "%s != %d on allowed %r" % (LIMIT_H, limit, r)
    rem = r.get(REMAIN_H)
    assert rem is not None and rem.isdigit() and int(rem) < limit, "bad %s on allowed %r" % (REMAIN_H, r)
    assert r.get(RESET_H), "%s missing on allowed %r" % (RESET_H, r)
    check_reset(r, period)


def bearer(key):
    return [("Authorization", "Bearer %s" % key)]


# ================================================================ 1. key auth
def auth_gateway(factory, backend, tmp_path, name):
    alog = tmp_path / ("%s.access.log" % name)
    rw = start_gw(factory, backend.addr,
                  filters=[dict(AUTH, query_param="api_key")], route_filters=["auth"],
                  consumers=[{"name": "alice", "keys": ["sk-alice-1", "sk-alice-2"]},
                             {"name": "bob", "keys": ["sk-bob-1"]}],
                  log={"access": str(alog)}, name=name)
    return rw, alog


def access_records(alog, want, timeout=10):
    """Wait until the access log has a line for every request id in want; {id: record}."""
    def records():
        if not alog.exists():
            return None
        recs = {}
        for line in alog.read_text().splitlines():
            d = json.loads(line)
            recs[d.get("request_id")] = d
        return recs if all(k in recs for k in want) else None

    try:
        return wait_until(records, timeout, what="access-log lines")
    except AssertionError:
        text = alog.read_text() if alog.exists() else "<no file>"
        got = {json.loads(l).get("request_id") for l in text.splitlines()}
        raise AssertionError("access log has no line for request ids %s after %d s; it holds:\n%s"
                             % (sorted(set(want) - got), timeout, text[-3000:])) from None


DENIED = [  # (request id, target, headers)
    ("d-none", "/echo", []),
    ("d-bearer", "/echo", bearer("sk-nobody")),
    ("d-xapi", "/echo", [("x-api-key", "sk-nobody")]),
    ("d-query", "/echo?api_key=sk-nobody", []),
    ("d-empty", "/echo", [("Authorization", "Bearer ")]),
]


def test_key_auth_sources_401_and_consumer_in_access_log(ringway_fn, backend, tmp_path):
    """Missing/unknown keys: 401 authentication_error; Bearer, x-api-key and the query
    parameter all identify the consumer, which the access log names."""
    rw, alog = auth_gateway(ringway_fn, backend, tmp_path, "auth")

    def get(target, headers, rid):
        return simple_get(rw.port, target, headers=list(headers) + [("x-request-id", rid)])

    for rid, target, headers in DENIED:
        r = get(target, headers, rid)
        err = assert_json_error(r, 401)
        assert err["type"] == "authentication_error", (rid, r)

    ok = [("a-bearer", "/echo", bearer("sk-alice-1"), "alice"),
          ("a-xapi", "/echo", [("x-api-key", "sk-alice-2")], "alice"),
          ("b-query", "/echo?api_key=sk-bob-1", [], "bob"),
          ("b-bearer", "/echo", bearer("sk-bob-1"), "bob")]
    for rid, target, headers, _ in ok:
        r = get(target, headers, rid)
        assert r.status == 200, (rid, r)
        assert r.json()["path"] == "/echo", r

    recs = access_records(alog, [rid for rid, _, _, _ in ok])
    for rid, _, _, consumer in ok:
        assert recs[rid].get("consumer") == consumer, "request %s: consumer %r, want %r (%r)" % (
            rid, recs[rid].get("consumer"), consumer, recs[rid])
        assert recs[rid]["status"] == 200, recs[rid]


def test_key_auth_rejections_are_logged_and_counted(ringway_fn, backend, tmp_path):
    """A 401 is an answered request like any other: one access-log line (consumer null,
    status 401, its route) and ringway_requests_total{route,status="401"}."""
    rw, alog = auth_gateway(ringway_fn, backend, tmp_path, "auth401")
    for rid, target, headers in DENIED:
        r = simple_get(rw.port, target, headers=list(headers) + [("x-request-id", rid)])
        assert r.status == 401, r
    assert simple_get(rw.port, "/echo", headers=bearer("sk-alice-1") + [("x-request-id", "ok")]).status == 200
    recs = access_records(alog, ["ok"] + [rid for rid, _, _ in DENIED], timeout=5)
    for rid, _, _ in DENIED:
        assert recs[rid]["status"] == 401 and recs[rid]["consumer"] is None, recs[rid]
        assert recs[rid]["route"] == "r", recs[rid]
    assert metric(rw, "ringway_requests_total", route="r", status="401") == len(DENIED)


# ================================================================ 2. cluster: exact across replicas
def three_gateways(factory, upstream, redis, filt, consumers, tag):
    return [start_gw(factory, upstream, filters=[AUTH, filt], route_filters=["auth", filt["name"]],
                     consumers=consumers, redis=redis, name="%s%d" % (tag, i)) for i in range(3)]


def run_single_key_exact(gws, key, limit, n=300, threads=30, period=3600):
    ports = [g.port for g in gws]
    res = spread(ports, [("/echo", bearer(key))] * n, threads)
    statuses = [s for s, _, _ in res]
    admitted = statuses.count(200)
    others = sorted(set(statuses) - {200, 429})
    assert not others, "unexpected statuses %r" % others
    assert admitted == limit, "admitted %d of %d requests, limit %d (429s: %d)" % (
        admitted, n, limit, statuses.count(429))
    for s, r, _ in res:
        if s == 429:
            check_limited(r, limit, period)
        else:
            check_allowed(r, limit, period)
    return res


def run_many_keys_exact(gws, keys, per_key_limit, per_key_sent):
    ports = [g.port for g in gws]
    reqs = []
    for rnd in range(per_key_sent):
        reqs += [("/echo?k=%s" % k, bearer(k)) for k in keys]
    res = spread(ports, reqs, 24)
    # an admitted request's echo names its key (the target); 429s are checked for their headers
    admitted = {}
    for s, r, _ in res:
        assert s in (200, 429), r
        if s == 200:
            key = r.json()["target"].split("k=", 1)[1]
            admitted[key] = admitted.get(key, 0) + 1
        else:
            check_limited(r, per_key_limit, 3600)
    per = {k: admitted.get(k, 0) for k in keys}
    wrong = {k: v for k, v in per.items() if v != per_key_limit}
    assert not wrong, "keys not admitted exactly %d times (of %d sent): %r" % (
        per_key_limit, per_key_sent, dict(list(wrong.items())[:20]))
    assert sum(1 for s, _, _ in res if s == 429) == len(keys) * (per_key_sent - per_key_limit)


def test_cluster_limit_exact_across_three_replicas_single_key_per_minute(ringway_fn, backend,
                                                                         redis_server):
    """3 ringways x 2 workers share one Redis; 300 requests of one consumer, 20/minute: 20 pass."""
    redis = redis_conf(url=redis_server.url)
    filt = rate_filter(scope="cluster", rules=[{"match": "*", "requests_per_minute": 20}])
    gws = three_gateways(ringway_fn, backend.addr, redis, filt,
                         [{"name": "alice", "keys": ["sk-alice-1"]}], "single")
    t0 = ensure_window(60, 20)
    res = run_single_key_exact(gws, "sk-alice-1", 20, period=60)
    assert time.time() - t0 < 20, "the burst took too long to stay inside one window"
    d = decisions(gws, "rpm")
    assert (d["allowed"], d["rejected"]) == (20, 280), d
    window = int(t0 // 60) * 60000
    key = "ringway:{rpm:alice}:%d" % window
    assert redis_server.keys() == [key], redis_server.keys()
    assert int(redis_server.cmd("GET", key)) == 20
    ttl = redis_server.cmd("PTTL", key)
    assert 0 < ttl, "window key %s has no expiry (PTTL %r)" % (key, ttl)
    granted = sum(metric(g, "ringway_redis_granted_total") for g in gws)
    returned = sum(metric(g, "ringway_redis_returned_total") for g in gws)
    assert granted - returned == 20, (granted, returned)
    assert max(lat for _, _, lat in res) < 2.0


def test_cluster_limit_exact_across_three_replicas_100_keys(ringway_fn, backend, redis_server):
    """100 consumers at 5/hour each, 10 requests each spread over 3 replicas: exactly 5 each."""
    keys = ["sk-%03d-%s" % (i, uuid.uuid4().hex[:6]) for i in range(100)]
    consumers = [{"name": "c%03d" % i, "keys": [k]} for i, k in enumerate(keys)]
    filt = rate_filter(scope="cluster", rules=[{"match": "*", "requests_per_hour": 5}])
    gws = three_gateways(ringway_fn, backend.addr, redis_conf(url=redis_server.url), filt,
                         consumers, "many")
    ensure_window(3600, 30)
    run_many_keys_exact(gws, keys, 5, 10)
    d = decisions(gws, "rpm")
    assert (d["allowed"], d["rejected"]) == (500, 500), d
    assert len(redis_server.keys()) == 100


def test_cluster_limit_exact_through_redis_cluster(ringway_fn, backend, redis_cluster):
    """The same through a Redis Cluster of 3 masters: one key 20/hour, then 100 keys 5/hour."""
    tag = uuid.uuid4().hex[:8]
    keys = ["sk-%03d-%s" % (i, tag) for i in range(100)]
    consumers = [{"name": "alice-%s" % tag, "keys": ["sk-alice-%s" % tag]}]
    consumers += [{"name": "c%03d-%s" % (i, tag), "keys": [k]} for i, k in enumerate(keys)]
    filt = rate_filter(name="rc" + tag, scope="cluster", rules=[{"match": "*", "requests_per_hour": 20}])
    filt5 = rate_filter(name="rc5" + tag, scope="cluster", rules=[{"match": "*", "requests_per_hour": 5}])
    redis = redis_conf(nodes=redis_cluster.urls)
    gws = three_gateways(ringway_fn, backend.addr, redis, filt, consumers, "rc")
    ensure_window(3600, 30)
    run_single_key_exact(gws, "sk-alice-%s" % tag, 20)
    d = decisions(gws, filt["name"])
    assert (d["allowed"], d["rejected"]) == (20, 280), d
    in_redis = redis_cluster.keys("ringway:{%s:*" % filt["name"])
    assert len(in_redis) == 1 and int(redis_cluster.node_of_key(in_redis[0]).cmd("GET", in_redis[0])) == 20

    gws5 = three_gateways(ringway_fn, backend.addr, redis, filt5, consumers, "rc5")
    run_many_keys_exact(gws5, keys, 5, 10)
    stored = redis_cluster.keys("ringway:{%s:*" % filt5["name"])
    assert len(stored) == 100
    # the 100 keys really are spread over the 3 masters
    holders = {redis_cluster.node_of_key(k).port for k in stored}
    assert len(holders) == 3, holders


def test_cluster_limit_exact_across_three_replicas_over_rediss(ringway_fn, backend, redis_tls_server):
    """The single-key test with Redis reached over rediss://, verified against a private CA."""
    redis = redis_conf(url=redis_tls_server.tls_url)
    redis["tls"] = {"ca": str(redis_tls_server.tls.ca)}
    filt = rate_filter(scope="cluster", rules=[{"match": "*", "requests_per_minute": 20}])
    gws = three_gateways(ringway_fn, backend.addr, redis, filt,
                         [{"name": "alice", "keys": ["sk-alice-1"]}], "tls")
    t0 = ensure_window(60, 20)
    run_single_key_exact(gws, "sk-alice-1", 20, period=60)
    d = decisions(gws, "rpm")
    assert (d["allowed"], d["rejected"]) == (20, 280), d
    key = "ringway:{rpm:alice}:%d" % (int(t0 // 60) * 60000)
    assert redis_tls_server.keys() == [key]
    assert int(redis_tls_server.cmd("GET", key)) == 20


def test_cluster_limit_exact_through_redis_cluster_over_rediss(ringway_fn, backend, redis_tls_cluster):
    """The same through a 3-master Redis Cluster whose nodes speak TLS."""
    tag = uuid.uuid4().hex[:8]
    consumers = [{"name": "alice-%s" % tag, "keys": ["sk-alice-%s" % tag]}]
    filt = rate_filter(name="rt" + tag, scope="cluster", rules=[{"match": "*", "requests_per_hour": 20}])
    redis = redis_conf(nodes=redis_tls_cluster.tls_urls)
    redis["tls"] = {"ca": str(redis_tls_cluster.tls.ca)}
    gws = three_gateways(ringway_fn, backend.addr, redis, filt, consumers, "rt")
    ensure_window(3600, 30)
    run_single_key_exact(gws, "sk-alice-%s" % tag, 20)
    d = decisions(gws, filt["name"])
    assert (d["allowed"], d["rejected"]) == (20, 280), d
    in_redis = redis_tls_cluster.keys("ringway:{%s:*" % filt["name"])
    assert len(in_redis) == 1
    assert int(redis_tls_cluster.node_of_key(in_redis[0]).cmd("GET", in_redis[0])) == 20


def test_rediss_with_the_wrong_ca_never_admits_past_redis(ringway_fn, backend, redis_tls_server, tmp_path):
    """A Redis whose certificate the configured CA did not issue is unreachable: the cluster
    limit falls back to its failure mode (closed here), and nothing is written to Redis."""
    from redis_procs import TlsFiles
    other = TlsFiles(tmp_path / "other")
    redis = redis_conf(url=redis_tls_server.tls_url)
    redis["tls"] = {"ca": str(other.ca)}
    filt = rate_filter(scope="cluster", failure_mode="closed",
                       rules=[{"match": "*", "requests_per_minute": 20}])
    gws = three_gateways(ringway_fn, backend.addr, redis, filt,
                         [{"name": "alice", "keys": ["sk-alice-1"]}], "badca")
    res = spread([g.port for g in gws], [("/echo", bearer("sk-alice-1"))] * 6, 3)
    assert all(s != 200 for s, _, _ in res), [s for s, _, _ in res]
    assert redis_tls_server.keys() == []


# ================================================================ 3. local: exact across workers
def test_local_limit_exact_under_1000_concurrent_requests(ringway_fn, backend):
    """One process, 2 workers, 50 connections x 20 pipelined requests at once, 100/minute."""
    filt = rate_filter(scope="local", rules=[{"match": "*", "requests_per_minute": 100}])
    rw = start_gw(ringway_fn, backend.addr, filters=[AUTH, filt], route_filters=["auth", "rpm"],
                  consumers=[{"name": "alice", "keys": ["sk-alice-1"]}], name="local1000")
    req = request_bytes("GET", "/echo", headers=bearer("sk-alice-1"))

    def burst():
        with socket.create_connection(("127.0.0.1", rw.port), timeout=20) as s:
            s.sendall(req * 20)
            return read_n(s, 20, heads=True)

    t0 = ensure_window(60, 20)
    res = [x for part in parallel(burst, [()] * 50) for x in part]
    assert time.time() - t0 < 20
    statuses = [s for s, _ in res]
    assert len(statuses) == 1000
    assert statuses.count(200) == 100, "admitted %d of 1000, limit 100 (others: %r)" % (
        statuses.count(200), sorted(set(statuses)))
    assert statuses.count(429) == 900, sorted(set(statuses))
    remaining = [int(head_map(h)[REMAIN_H]) for s, h in res if s == 200]
    assert all(0 <= x < 100 for x in remaining), remaining
    for s, h in res:
        if s == 429:
            assert head_map(h)[REMAIN_H] == "0" and head_map(h).get("retry-after"), h
    d = decisions([rw], "rpm")
    assert (d["allowed"], d["rejected"]) == (100, 900), d


# ================================================================ 4. Redis calls per admission
def test_cluster_limit_redis_commands_per_admitted_request(ringway_fn, fast_backend, redis_server):
    """One hot key, limit far away (100000/hour): leases are batched, so Redis sees
    at most 0.05 commands per admitted request."""
    filt = rate_filter(scope="cluster", rules=[{"match": "*", "requests_per_hour": 100000}])
    rw = start_gw(ringway_fn, fast_backend.addr, filters=[AUTH, filt],
                  route_filters=["auth", "rpm"],
                  consumers=[{"name": "hot", "keys": ["sk-hot"]}],
                  redis=redis_conf(url=redis_server.url), name="eff")
    req = request_bytes("GET", "/x", headers=bearer("sk-hot"))
    # warm: one request makes the first lease
    assert simple_get(rw.port, "/x", headers=bearer("sk-hot")).status == 200
    ensure_window(3600, 30)
    calls0 = metric(rw, "ringway_redis_calls_total")
    before = redis_server.commandstats()

    def load(n_batches, batch):
        with socket.create_connection(("127.0.0.1", rw.port), timeout=20) as s:
            statuses = []
            for _ in range(n_batches):
                s.sendall(req * batch)
                statuses += [st for st, _ in read_n(s, batch)]
            return statuses

    t0 = time.monotonic()
    statuses = [x for part in parallel(load, [(10, 50)] * 8) for x in part]
    elapsed = time.monotonic() - t0
    after = redis_server.commandstats()
    calls = metric(rw, "ringway_redis_calls_total") - calls0
    admitted = statuses.count(200)
    assert admitted == len(statuses) == 4000, sorted(set(statuses))
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v and k != "info"}
    total = sum(delta.values())
    per = total / admitted
    msg = ("%d Redis commands for %d admitted requests (%.4f per request, want <= 0.05) in %.2f s "
           "(%.0f req/s); by command (INFO commandstats, Lua-internal calls included): %r; "
           "ringway_redis_calls_total grew by %d" % (total, admitted, per, elapsed,
                                                    admitted / elapsed, delta, calls))
    print(msg)
    assert per <= 0.05, msg


# ================================================================ 5. Redis down and back
def redis_down_gateway(factory, backend, redis_server, mode, replicas=None, limit=10):
    filt = rate_filter(scope="cluster", key="header:x-k", failure_mode=mode,
                       rules=[{"match": "*", "requests_per_hour": limit}])
    if replicas:
        filt["replicas"] = replicas
    return start_gw(factory, backend.addr, filters=[filt], route_filters=["rpm"],
                    redis=redis_conf(url=redis_server.url), name="down-%s" % mode)


def timed_gets(port, key, n, threads=1):
    res = spread([port], [("/echo", [("x-k", key)])] * n, threads)
    return [s for s, _, _ in res], [lat for _, _, lat in res], [r for _, r, _ in res]


def wait_counted_again(rw, redis, probe_prefix, timeout=15.0):
    """After a restart: poll with fresh probe keys until one is admitted and its key is in Redis."""
    n = [0]

    def counted():
        n[0] += 1
        k = "%s-%d" % (probe_prefix, n[0])
        r = simple_get(rw.port, "/echo", headers=[("x-k", k)], timeout=5)
        return r.status == 200 and any(("%s}" % k) in x for x in redis.keys())

    wait_until(counted, timeout, interval=0.05, what="requests counted in Redis again")


@pytest.mark.parametrize("mode", ["open", "closed", "local"])
def test_redis_killed_failure_mode_then_recovery(ringway_fn, backend, redis_server, mode):
    """Redis SIGKILLed mid-run: open admits, closed rejects, local enforces limit/replicas (10/2);
    each request answers within about redis.timeout; Redis restarted on the same port: exact
    counting in Redis resumes."""
    limit = 10
    rw = redis_down_gateway(ringway_fn, backend, redis_server, mode, replicas=2, limit=limit)
    ensure_window(3600, 60)
    st, _, _ = timed_gets(rw.port, "before", 12)
    assert st.count(200) == limit and st.count(429) == 2, st
    assert "ringway:{rpm:before}" in " ".join(redis_server.keys())

    redis_server.kill()
    st, lat, rs = timed_gets(rw.port, "during", 12, threads=3)
    assert max(lat) < 1.0, "request latency while Redis is down: max %.3f s (redis.timeout 200ms)" % max(lat)
    want = {"open": 12, "closed": 0, "local": limit // 2}[mode]
    assert st.count(200) == want, "failure_mode=%s, Redis down: %d of 12 admitted, want %d (%r)" % (
        mode, st.count(200), want, st)
    for s, r in zip(st, rs):
        if s != 200:
            assert s == 429, r
            assert_json_error(r, 429)["type"] == "rate_limit_exceeded"
    assert metric(rw, "ringway_limiter_failure_mode_total", filter="rpm") > 0
    assert metric(rw, "ringway_redis_errors_total") > 0

    # Redis back on the same port (empty: no persistence)
    redis_server.start()
    wait_counted_again(rw, redis_server, "probe")
    st, lat, _ = timed_gets(rw.port, "after", 15, threads=3)
    assert st.count(200) == limit, "after the restart: %d of 15 admitted, want %d" % (st.count(200), limit)
    assert max(lat) < 1.0
    assert int(redis_server.cmd("GET", next(k for k in redis_server.keys() if "{rpm:after}" in k))) == limit


def test_redis_paused_requests_bounded_by_timeout(ringway_fn, backend, redis_server):
    """Redis SIGSTOPped for ~1.5 s under steady traffic (port open, nothing answers): no request
    waits much longer than redis.timeout (200ms), none hangs, failure_mode=local keeps each new
    key within limit/replicas; after SIGCONT, exact counting in Redis resumes."""
    rw = redis_down_gateway(ringway_fn, backend, redis_server, "local", replicas=2, limit=10)
    ensure_window(3600, 60)
    st, _, _ = timed_gets(rw.port, "warm", 3)
    assert st == [200, 200, 200]
    stop_at = [0.0]

    def client(tid):
        out = []
        with RawConn(rw.port, timeout=10) as c:
            i = 0
            while time.monotonic() < stop_at[0]:
                key = "p%d-%d" % (tid, i // 8)  # 8 requests per key, new keys all the time
                i += 1
                t0 = time.monotonic()
                c.send(request_bytes("GET", "/echo", headers=[("x-k", key)]))
                r = c.read_response()
                out.append((key, r.status, time.monotonic() - t0))
        return out

    redis_server.pause()
    try:
        stop_at[0] = time.monotonic() + 1.5
        res = [x for part in parallel(client, [(t,) for t in range(4)]) for x in part]
    finally:
        redis_server.resume()
    lat = sorted(l for _, _, l in res)
    print("redis paused: %d requests, %d admitted, latency p50 %.3f max %.3f s" % (
        len(res), sum(s == 200 for _, s, _ in res), lat[len(lat) // 2], lat[-1]))
    assert {s for _, s, _ in res} <= {200, 429}, {s for _, s, _ in res}
    assert lat[-1] < 1.0, "latency with Redis paused: max %.3f s over %d requests (slowest %r)" % (
        lat[-1], len(lat), [round(x, 3) for x in lat[-10:]])
    per_key = {}
    for k, s, _ in res:
        per_key[k] = per_key.get(k, 0) + (s == 200)
    over = {k: v for k, v in per_key.items() if v > 10 // 2}
    assert not over, "keys admitted more than limit/replicas = 5 while Redis was paused: %r" % over
    assert metric(rw, "ringway_limiter_failure_mode_total", filter="rpm") > 0
    wait_counted_again(rw, redis_server, "probe2")
    st, _, _ = timed_gets(rw.port, "after2", 14, threads=2)
    assert st.count(200) == 10, st


def test_redis_cluster_one_master_down(ringway_fn, backend, redis_cluster_partial):
    """Redis Cluster, one of 3 masters SIGKILLed (the others keep serving their slots):
    failure_mode=closed refuses, quickly, only keys whose slot is on the dead master; keys on
    live masters stay exactly limited through Redis."""
    rc = redis_cluster_partial
    filt = rate_filter(name="pc", scope="cluster", key="header:x-k", failure_mode="closed",
                       rules=[{"match": "*", "requests_per_hour": 5}])
    rw = start_gw(ringway_fn, backend.addr, filters=[filt], route_filters=["pc"],
                  redis=redis_conf(nodes=rc.urls), name="partial")
    ensure_window(3600, 60)
    window = int(time.time() // 3600) * 3600000
    st, _, _ = timed_gets(rw.port, "warm", 3)
    assert st == [200, 200, 200], st
    victim = rc.nodes[0]
    # fresh keys: 3 whose slot lives on the victim, 3 on the other masters
    dead_keys, live_keys = [], []
    i = 0
    while len(dead_keys) < 3 or len(live_keys) < 3:
        k = "pk%d" % i
        i += 1
        node = rc.node_of_key("ringway:{pc:%s}:%d" % (k, window))
        (dead_keys if node is victim else live_keys).append(k)
    dead_keys, live_keys = dead_keys[:3], live_keys[:3]
    victim.kill()
    # steady traffic, dead-master and live-master keys interleaved, 8 requests per key
    res = {k: [0, 0.0] for k in dead_keys + live_keys}
    with RawConn(rw.port, timeout=10) as c:
        for _ in range(8):
            for k in [x for pair in zip(dead_keys, live_keys) for x in pair]:
                t0 = time.monotonic()
                c.send(request_bytes("GET", "/echo", headers=[("x-k", k)]))
                r = c.read_response()
                assert r.status in (200, 429), r
                res[k][0] += r.status == 200
                res[k][1] = round(max(res[k][1], time.monotonic() - t0), 3)
    slow = {k: v for k, v in res.items() if v[1] >= 1.0}
    assert not slow, "requests took >= 1 s with one master down: %r" % res
    want = {**{k: 0 for k in dead_keys}, **{k: 5 for k in live_keys}}
    got = {k: v[0] for k, v in res.items()}
    assert got == want, ("admitted per key with one master down (closed): %r, want %r "
                         "(dead-master keys %r, live-master keys %r)" % (got, want, dead_keys, live_keys))
    for k in live_keys:
        key = "ringway:{pc:%s}:%d" % (k, window)
        assert int(rc.node_of_key(key).cmd("GET", key)) == 5


# ================================================================ 6. bounded key table
def test_200k_distinct_keys_memory_bounded_and_evictions(ringway_fn, fast_backend):
    max_keys = 1000
    filt = rate_filter(name="many", scope="local", key="header:x-k", max_keys=max_keys,
                       rules=[{"match": "*", "requests_per_hour": 5}])
    rw = start_gw(ringway_fn, fast_backend.addr, filters=[filt], route_filters=["many"],
                  name="keys200k")
    total, conns, batch = 200_000, 8, 250
    per_conn = total // conns
    tmpl = b"GET /k HTTP/1.1\r\nHost: t\r\nx-k: %s\r\n\r\n"

    def load(cid, start_key, count):
        statuses = {}
        with socket.create_connection(("127.0.0.1", rw.port), timeout=30) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for b0 in range(0, count, batch):
                n = min(batch, count - b0)
                s.sendall(b"".join(tmpl % (b"k%d-%07d" % (cid, start_key + b0 + i)) for i in range(n)))
                for st, _ in read_n(s, n):
                    statuses[st] = statuses.get(st, 0) + 1
        return statuses

    # warm-up: fill the table once, then take the baseline
    warm = load(99, 0, 5000)
    assert warm == {200: 5000}, warm
    base = rw.rss()
    t0 = time.monotonic()
    parts = parallel(load, [(c, 0, per_conn) for c in range(conns)])
    elapsed = time.monotonic() - t0
    statuses = {}
    for p in parts:
        for k, v in p.items():
            statuses[k] = statuses.get(k, 0) + v
    grown = rw.rss() - base
    evictions = metric(rw, "ringway_limiter_evictions_total", filter="many")
    print("200k keys in %.1fs (%.0f req/s), rss %+.1f MiB, evictions %d"
          % (elapsed, total / elapsed, grown / 2**20, evictions))
    assert statuses == {200: total}, statuses
    assert grown < 30 * 2**20, "RSS grew by %.1f MiB over 200k distinct keys (max_keys %d)" % (
        grown / 2**20, max_keys)
    assert evictions > 0, "no evictions with 205k keys and max_keys = %d" % max_keys
    assert evictions >= total - max_keys, "evictions %d < %d" % (evictions, total - max_keys)
    assert metric(rw, "process_resident_memory_bytes") > 0
    assert elapsed < 60


def test_cluster_scope_20k_keys_lease_table_bounded(ringway_fn, fast_backend, redis_server):
    """The cluster filter's lease table is bounded too: 20000 distinct keys with max_keys 500
    through Redis; every key admitted once (limit 1/hour), RSS bounded, keys evicted."""
    filt = rate_filter(name="ck", scope="cluster", key="header:x-k", max_keys=500,
                       rules=[{"match": "*", "requests_per_hour": 1}])
    rw = start_gw(ringway_fn, fast_backend.addr, filters=[filt], route_filters=["ck"],
                  redis=redis_conf(url=redis_server.url), name="ck20k")
    total, conns = 20_000, 40
    tmpl = b"GET /k HTTP/1.1\r\nHost: t\r\nx-k: %s\r\n\r\n"
    ensure_window(3600, 60)

    def load(cid, count, prefix=b"c"):
        statuses = {}
        with socket.create_connection(("127.0.0.1", rw.port), timeout=30) as s:
            for b0 in range(0, count, 50):
                n = min(50, count - b0)
                s.sendall(b"".join(tmpl % (b"%s%d-%06d" % (prefix, cid, b0 + i)) for i in range(n)))
                for st, _ in read_n(s, n):
                    statuses[st] = statuses.get(st, 0) + 1
        return statuses

    warm = parallel(load, [(c, 100, b"w") for c in range(10)])
    assert warm == [{200: 100}] * 10, warm
    base = rw.rss()
    t0 = time.monotonic()
    parts = parallel(load, [(c, total // conns) for c in range(conns)])
    elapsed = time.monotonic() - t0
    statuses = {}
    for p in parts:
        for k, v in p.items():
            statuses[k] = statuses.get(k, 0) + v
    grown = rw.rss() - base
    evictions = metric(rw, "ringway_limiter_evictions_total", filter="ck")
    print("cluster scope: 20k keys in %.1fs, rss %+.1f MiB, evictions %d" % (elapsed, grown / 2**20, evictions))
    assert statuses == {200: total}, statuses
    assert grown < 30 * 2**20, "RSS grew by %.1f MiB" % (grown / 2**20)
    assert evictions >= total, "evictions %d, want >= %d (max_keys 500)" % (evictions, total)
    assert redis_server.cmd("DBSIZE") == total + 1000
    # an evicted key stays limited: Redis still holds its window
    r = simple_get(rw.port, "/k", headers=[("x-k", "c0-000000")])
    check_limited(r, 1)


# ================================================================ rules and windows
def test_rule_matching_first_match_wins(ringway_fn, backend):
    """Exact, "prefix*", "regex:…" and "*" rules on a header key, and a CIDR rule on the client
    ip: the first matching rule sets the limit (and the x-ratelimit-limit-requests header)."""
    filt = rate_filter(name="tier", key="header:x-tier", rules=[
        {"match": "gold", "requests_per_hour": 4},
        {"match": "silver*", "requests_per_hour": 2},
        {"match": "regex:^b[0-9]+$", "requests_per_hour": 1},
        {"match": "*", "requests_per_hour": 3},
    ])
    ipf = rate_filter(name="byip", key="ip", rules=[
        {"match": "10.0.0.0/8", "requests_per_hour": 100},
        {"match": "127.0.0.0/8", "requests_per_hour": 2},
    ])
    rw = start_gw(ringway_fn, backend.addr, filters=[filt], route_filters=["tier"], name="rules")
    rw_ip = start_gw(ringway_fn, backend.addr, filters=[ipf], route_filters=["byip"], name="rulesip")
    ensure_window(3600, 30)
    want = {"gold": 4, "silver-1": 2, "b12": 1, "b12x": 3, "gold-x": 3, "bronze": 3}
    got, limits = {}, {}
    for value in want:
        res = spread([rw.port], [("/echo", [("x-tier", value)])] * 6, 1)
        got[value] = [s for s, _, _ in res].count(200)
        limits[value] = {r.get(LIMIT_H) for _, r, _ in res}
    assert got == want, "admitted per value %r, want %r" % (got, want)
    assert limits == {v: {str(n)} for v, n in want.items()}, limits
    res = spread([rw_ip.port], [("/echo", [])] * 5, 1)
    assert [s for s, _, _ in res] == [200, 200, 429, 429, 429], [s for s, _, _ in res]
    check_limited(res[-1][1], 2, 3600)


def test_rejected_post_keeps_the_connection_when_its_body_arrived_whole(ringway_fn, backend):
    """A 429 for a POST whose small body came with the head keeps the connection (the body is
    stepped over, the next request on the connection is answered); one whose body is still on
    the wire closes it, so those bytes are never read as a request."""
    filt = rate_filter(name="one", key="ip", rules=[{"match": "*", "requests_per_hour": 1}])
    rw = start_gw(ringway_fn, backend.addr, filters=[filt], route_filters=["one"], name="rejpost")
    ensure_window(3600, 10)
    body = b'{"prompt":"hello"}'
    with RawConn(rw.port) as c:
        for want in (200, 429, 429):
            c.send(request_bytes("POST", "/echo", body=body, headers=[("Content-Type", "application/json")]))
            r = c.read_response("POST")
            assert r.status == want, r
            assert r.get("connection", "").lower() != "close", r
        c.send(request_bytes("GET", "/echo"))
        assert c.read_response().status == 429
    with RawConn(rw.port) as c:
        # The head announces 1000 bytes; none are sent before the answer.
        c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        r = c.read_response("POST")
        assert r.status == 429, r
        assert r.get("connection", "").lower() == "close", r
        c.send(b"x" * 1000)
        with pytest.raises((EOFError, ConnectionError)):
            c.read_response()


@pytest.mark.parametrize("scope", ["local", "cluster"])
def test_several_windows_in_one_rule(ringway_fn, backend, redis_server, scope):
    """One rule, 2/second and 5/hour: each second admits 2 until the hour's 5 are spent; a
    request the per-second window refuses does not use up the hour."""
    filt = rate_filter(name="multi", scope=scope, key="header:x-k",
                       rules=[{"match": "*", "requests_per_second": 2, "requests_per_hour": 5}])
    rw = start_gw(ringway_fn, backend.addr, filters=[filt], route_filters=["multi"],
                  redis=redis_conf(url=redis_server.url) if scope == "cluster" else None,
                  name="multi-%s" % scope)
    ensure_window(3600, 30)
    key = "m-" + uuid.uuid4().hex[:8]
    per_second, detail = [], []
    with RawConn(rw.port, timeout=5) as c:
        for _ in range(4):
            # start in a fresh second, with most of it left
            sec = int(time.time())
            wait_until(lambda: int(time.time()) > sec and time.time() % 1 < 0.3, 2.5, interval=0.005,
                       what="the next second")
            w = int(time.time())
            statuses = []
            for _ in range(5):
                t = time.time()
                c.send(request_bytes("GET", "/echo", headers=[("x-k", key)]))
                r = c.read_response()
                statuses.append(r.status)
                detail.append("%d+%.3f %d limit=%s remaining=%s reset=%s" % (
                    w % 100, t - w, r.status, r.get(LIMIT_H), r.get(REMAIN_H), r.get(RESET_H)))
            assert int(time.time()) == w, "a burst of 5 requests crossed a second boundary"
            per_second.append(statuses)
    assert per_second == [[200, 200, 429, 429, 429], [200, 200, 429, 429, 429],
                          [200, 429, 429, 429, 429], [429] * 5], "%r\n%s" % (per_second, "\n".join(detail))


def test_cluster_limit_admits_in_the_last_quarter_second_of_a_window(ringway_fn, backend, redis_server):
    """Cluster scope, 2/second, one replica: a key with quota left in its window is admitted
    however late in the window it asks (here 0.8 s into each second, 200 ms before the end)."""
    filt = rate_filter(name="late", scope="cluster", key="header:x-k",
                       rules=[{"match": "*", "requests_per_second": 2}])
    rw = start_gw(ringway_fn, backend.addr, filters=[filt], route_filters=["late"],
                  redis=redis_conf(url=redis_server.url), name="late")
    seconds = []
    with RawConn(rw.port, timeout=5) as c:
        for n in range(3):
            sec = int(time.time())
            wait_until(lambda: int(time.time()) > sec and 0.78 < time.time() % 1 < 0.85, 2.5,
                       interval=0.002, what="0.8 s into the next second")
            w = int(time.time())
            got = []
            for _ in range(3):
                t = time.time()
                c.send(request_bytes("GET", "/echo", headers=[("x-k", "late-%d" % n)]))
                got.append(("+%.3f" % (t - w), c.read_response().status))
            if int(time.time()) == w:  # the 3 requests stayed inside the second
                seconds.append(got)
    assert seconds, "no burst stayed inside its second"
    bad = [g for g in seconds if [s for _, s in g] != [200, 200, 429]]
    assert not bad, ("2/second with quota left: want [200, 200, 429] per burst started 0.8 s "
                     "into a second; got (offset, status): %r" % seconds)


# ================================================================ 7. shadow mode
def test_shadow_mode_never_rejects_but_counts(ringway_fn, backend):
    filt = rate_filter(scope="local", shadow=True, rules=[{"match": "*", "requests_per_hour": 3}])
    rw = start_gw(ringway_fn, backend.addr, filters=[AUTH, filt], route_filters=["auth", "rpm"],
                  consumers=[{"name": "alice", "keys": ["sk-alice-1"]}], name="shadow")
    ensure_window(3600, 30)
    res = spread([rw.port], [("/echo", bearer("sk-alice-1"))] * 10, 1)
    assert [s for s, _, _ in res] == [200] * 10
    rem = [r.get(REMAIN_H) for _, r, _ in res]
    assert rem == ["2", "1", "0"] + ["0"] * 7, rem
    assert all(r.get(LIMIT_H) == "3" and r.get(RESET_H) for _, r, _ in res), [r.headers for _, r, _ in res]
    d = decisions([rw], "rpm")
    assert (d["allowed"], d["rejected"], d["shadow_rejected"]) == (3, 0, 7), d
