"""TLS on both sides, with certificates made at test time (tls_pki.py, the `openssl` CLI):
HTTPS listeners in front of a plain origin (curl, requests, the openai and anthropic SDKs; SNI
with two names, a wildcard and none; TLS 1.2 and 1.3; min_version; ALPN; plaintext and garbage
sent to a TLS port), and HTTPS upstreams (nginx with `ssl`: Content-Length, chunked and event-
stream bodies, connection reuse, verification failures, mTLS)."""

import hashlib
import json
import os
import socket
import ssl
import subprocess
import time

import anthropic
import openai
import pytest
import requests
from anthropic import Anthropic
from openai import OpenAI

from ai_upstream import AiUpstreamProc
from conftest import Ringway, make_config
from helpers import RawConn, assert_json_error, free_port, request_bytes, wait_until
from nginx_tls import NginxTls
from tls_pki import Pki


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.api = p.leaf("api", ["DNS:api.test"])
    p.wild = p.leaf("wild", ["DNS:*.wild.test"])
    p.local = p.leaf("local", ["DNS:localhost", "IP:127.0.0.1"])
    p.expired = p.leaf("expired", ["DNS:localhost", "IP:127.0.0.1"],
                       start="20200101000000Z", end="20210101000000Z")
    p.wrong_name = p.leaf("wrongname", ["DNS:elsewhere.test"])
    p.client = p.leaf("client", cn="tenant-a", client=True)
    p.other = Pki(p.dir, name="other", cn="Nobody Trusts Me")
    p.untrusted = p.other.leaf("untrusted", ["DNS:localhost", "IP:127.0.0.1"])
    return p


def start_gw(factory, name, upstreams, routes, tls=None, server=None, extra=""):
    """A ringway whose one listener is HTTPS (`tls` is its [listeners.tls] table) or plain."""
    port, admin = free_port(), free_port()
    listener = {"name": "public", "address": "127.0.0.1:%d" % port}
    if tls is not None:
        listener["tls"] = tls
    text = make_config(port, upstreams, routes, server, listeners=[listener], admin=admin) + extra
    rw = Ringway(text, factory.tmpdir / name, name=name, port=port)
    rw.admin_port = admin
    factory.instances.append(rw)
    return rw.start()


def admin_json(rw, path):
    with RawConn(rw.admin_port, timeout=5) as c:
        c.send(request_bytes("GET", path, host="127.0.0.1", headers=[("Connection", "close")]))
        r = c.read_response()
    return r


def buffers_in_use(rw):
    return sum(w["buffers_in_use"] for w in json.loads(admin_json(rw, "/stats").body)["workers"])


def metric_lines(rw, name):
    text = admin_json(rw, "/metrics").body.decode()
    return [ln for ln in text.splitlines() if ln.startswith(name)]


@pytest.fixture(scope="module")
def https_gw(ringway_factory, pki, backend):
    """HTTPS listener: api.test first (the default), then *.wild.test; a plain origin."""
    return start_gw(
        ringway_factory, "https",
        upstreams=[{"name": "b", "endpoints": [backend.addr]}],
        routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
        tls={"certs": [{"cert": pki.api[0], "key": pki.api[1]},
                       {"cert": pki.wild[0], "key": pki.wild[1]}]})


def client_ctx(pki, alpn=("http/1.1",), max_version=None, min_version=None):
    ctx = ssl.create_default_context(cafile=pki.ca)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if max_version:
        ctx.maximum_version = max_version
    if min_version:
        ctx.minimum_version = min_version
    return ctx


def tls_get(port, ctx, server_hostname, path="/echo", host="api.test"):
    """One GET over TLS; returns (response, the peer certificate DER, the TLS version)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    s = ctx.wrap_socket(raw, server_hostname=server_hostname)
    try:
        der = s.getpeercert(binary_form=True)
        version = s.version()
        s.sendall(request_bytes("GET", path, host=host, headers=[("Connection", "close")]))
        data = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            data += d
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body, der, version


def der_of(pem_path):
    with open(pem_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


# ------------------------------------------------------------------------------ listeners
def test_curl_over_https_reaches_a_plain_origin(https_gw, pki):
    """curl with the test CA: the backend sees x-forwarded-proto https."""
    out = subprocess.run(
        ["curl", "-sS", "--cacert", pki.ca, "--resolve", "api.test:%d:127.0.0.1" % https_gw.port,
         "https://api.test:%d/echo?x=1" % https_gw.port],
        capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    headers = {k.lower(): v for k, v in doc["headers"]}
    assert headers["x-forwarded-proto"] == "https", doc
    assert doc["target"] == "/echo?x=1"


def test_requests_over_https_get_and_upload(https_gw, pki):
    s = requests.Session()
    # REQUESTS_CA_BUNDLE in the environment would override the session's CA.
    s.trust_env = False
    s.verify = pki.ca
    base = "https://api.test:%d" % https_gw.port
    # requests has no --resolve: api.test is resolved to 127.0.0.1 below, and verified by name.
    body = os.urandom(300 * 1024)
    with pytest.MonkeyPatch.context() as mp:
        real = socket.getaddrinfo
        mp.setattr(socket, "getaddrinfo",
                   lambda host, *a, **k: real("127.0.0.1" if host == "api.test" else host, *a, **k))
        for _ in range(3):
            r = s.get(base + "/echo")
            assert r.status_code == 200, r.text
        r = s.post(base + "/upload", data=body)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["len"], doc["sha256"]) == (len(body), hashlib.sha256(body).hexdigest()), doc
        r = s.get(base + "/chunked/200000")
        assert r.status_code == 200 and len(r.content) == 200000


@pytest.mark.parametrize("sni,expect", [
    ("api.test", "api"), ("x.wild.test", "wild"), ("deep.x.wild.test", "api"),
    ("unknown.test", "api"), (None, "api")],
    ids=["exact", "wildcard", "wildcard-one-label-only", "no-match-default", "no-sni-default"])
def test_sni_picks_the_certificate(https_gw, pki, sni, expect):
    ctx = client_ctx(pki)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    status, _, _, der, _ = tls_get(https_gw.port, ctx, sni)
    assert status == 200
    want = {"api": pki.api[0], "wild": pki.wild[0]}[expect]
    assert der == der_of(want), "SNI %r got another certificate than %s" % (sni, expect)


@pytest.mark.parametrize("version,name", [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
                                          (ssl.TLSVersion.TLSv1_3, "TLSv1.3")])
def test_tls_12_and_13_both_work(https_gw, pki, version, name):
    ctx = client_ctx(pki, max_version=version, min_version=version)
    status, _, _, _, got = tls_get(https_gw.port, ctx, "api.test")
    assert status == 200 and got == name


def test_min_version_13_refuses_a_12_only_client(ringway_factory, pki, backend):
    gw = start_gw(ringway_factory, "tls13only",
                  upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  tls={"certs": [{"cert": pki.api[0], "key": pki.api[1]}], "min_version": "1.3"})
    ctx = client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        tls_get(gw.port, ctx, "api.test")
    ok = client_ctx(pki)
    assert tls_get(gw.port, ok, "api.test")[4] == "TLSv1.3"


def test_client_offering_only_h2_gets_an_alert_not_a_hang(https_gw, pki):
    ctx = client_ctx(pki, alpn=("h2",))
    t0 = time.monotonic()
    with pytest.raises(ssl.SSLError) as e:
        tls_get(https_gw.port, ctx, "api.test")
    assert time.monotonic() - t0 < 4, "the handshake hung instead of failing"
    assert "NO_APPLICATION_PROTOCOL" in str(e.value).upper() or "ALERT" in str(e.value).upper(), e.value


def test_plain_http_to_a_tls_port_gets_a_plaintext_400(https_gw):
    with RawConn(https_gw.port, timeout=5) as c:
        c.send(b"GET /echo HTTP/1.1\r\nHost: api.test\r\n\r\n")
        r = c.read_response()
        assert_json_error(r, 400)
        assert c.is_closed(3)


def test_garbage_and_truncated_handshakes_leak_nothing(https_gw, pki):
    """Random bytes instead of a ClientHello, a ClientHello cut short, a client that vanishes
    mid-handshake: each connection closes, and no pool buffer stays in use."""
    for payload in (os.urandom(512), b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(40)):
        with socket.create_connection(("127.0.0.1", https_gw.port), timeout=5) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except OSError:
                # Reset, or already closed by Ringway before our shutdown: both are a close.
                pass
    # A real ClientHello, then the client disappears.
    ctx = client_ctx(pki)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="api.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    with socket.create_connection(("127.0.0.1", https_gw.port), timeout=5) as s:
        s.sendall(out.read())
    wait_until(lambda: buffers_in_use(https_gw) == 0, 5, what="buffers back in the pool")
    ok = client_ctx(pki)
    assert tls_get(https_gw.port, ok, "api.test")[0] == 200


def test_handshake_trickled_is_cut_at_header_timeout(ringway_factory, pki, backend):
    gw = start_gw(ringway_factory, "trickle",
                  upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  tls={"certs": [{"cert": pki.api[0], "key": pki.api[1]}]},
                  server={"header_timeout": "1s"})
    ctx = client_ctx(pki)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="api.test")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        t0 = time.monotonic()
        closed = False
        for b in hello:
            try:
                s.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            r, _, _ = __import__("select").select([s], [], [], 0.25)
            if r:
                try:
                    if not s.recv(1):
                        closed = True
                        break
                except ConnectionResetError:
                    closed = True
                    break
        assert closed, "a ClientHello trickled byte by byte was never cut"
        assert time.monotonic() - t0 < 5


def test_openai_and_anthropic_sdks_over_https(ringway_factory, pki):
    """The official SDKs, pointed at the test CA, streamed and not, through an HTTPS listener
    to a plain OpenAI/Anthropic-style origin."""
    up = AiUpstreamProc("openai")
    try:
        gw = start_gw(ringway_factory, "sdk",
                      upstreams=[{"name": "ai", "endpoints": [up.addr], "response_timeout": "10s"}],
                      routes=[{"name": "v1", "match": {"path_prefix": "/v1/"}, "upstream": "ai"}],
                      tls={"certs": [{"cert": pki.local[0], "key": pki.local[1]}]})
        base = "https://localhost:%d" % gw.port
        oai = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30,
                     http_client=openai.DefaultHttpxClient(verify=pki.ca))
        r = oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        text = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices)
        assert text == r.choices[0].message.content
        ant = Anthropic(base_url=base, api_key="x", max_retries=0, timeout=30,
                        http_client=anthropic.DefaultHttpxClient(verify=pki.ca))
        m = ant.messages.create(model="claude-x", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
        assert m.content[0].text
        with ant.messages.stream(model="claude-x", max_tokens=64,
                                 messages=[{"role": "user", "content": "hi"}]) as st:
            assert "".join(st.text_stream) == m.content[0].text
    finally:
        up.stop()


# ------------------------------------------------------------------------------ upstreams
@pytest.fixture(scope="module")
def origin(pki, backend, tmp_path_factory):
    """nginx serving HTTPS with the `local` certificate (localhost, 127.0.0.1)."""
    n = NginxTls(tmp_path_factory.mktemp("nginx-ok"), pki.local[0], pki.local[1], backend.addr,
                 big_bytes=1 << 30).start()
    yield n
    n.stop()


def https_upstream(name, addr, pki, **tls):
    conf = {"ca": pki.ca}
    conf.update(tls)
    return {"name": name, "endpoints": [addr], "tls": conf, "response_timeout": "10s",
            "retries": 0}


@pytest.fixture(scope="module")
def to_origin(ringway_factory, pki, origin):
    """A plain listener in front of the HTTPS origin, by name (SNI localhost)."""
    addr = "localhost:%d" % origin.port
    return start_gw(ringway_factory, "to-origin",
                    upstreams=[https_upstream("o", addr, pki)],
                    routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "o"}],
                    server={"workers": 2})


def get(port, path, host="gw.test"):
    with RawConn(port, timeout=30) as c:
        c.send(request_bytes("GET", path, host=host, headers=[("Connection", "close")]))
        return c.read_response()


def test_https_upstream_content_length_chunked_and_event_stream(to_origin, origin):
    r = get(to_origin.port, "/bytes/300000")
    assert r.status == 200 and r.body_len == 300000, r
    r = get(to_origin.port, "/chunked/250000")
    assert r.status == 200 and r.body_len == 250000, r
    r = get(to_origin.port, "/sse?n=20&ms=2")
    assert r.status == 200, r
    assert r.body.count(b"data: ") == 20, r.body[:300]
    r = get(to_origin.port, "/echo")
    doc = r.json()
    headers = {k.lower(): v for k, v in doc["headers"]}
    # host_header defaults to "endpoint" with TLS on: the origin sees its own name and port.
    assert headers["host"] == "localhost:%d" % origin.port, headers


def test_https_upstream_by_ip_sends_no_sni_and_verifies_the_ip(ringway_factory, pki, origin):
    gw = start_gw(ringway_factory, "by-ip",
                  upstreams=[https_upstream("o", origin.addr, pki)],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "o"}])
    r = get(gw.port, "/bytes/1000")
    assert r.status == 200 and r.body_len == 1000, r


def test_one_upstream_tls_connection_per_worker_for_1000_requests(ringway_factory, pki, origin):
    """1000 requests over one client connection reuse pooled TLS connections: the origin's log
    names at most one TLS connection per worker for them."""
    gw = start_gw(ringway_factory, "reuse",
                  upstreams=[https_upstream("o", "localhost:%d" % origin.port, pki)],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "o"}],
                  server={"workers": 2})
    before = len(origin.log_lines())
    with RawConn(gw.port, timeout=30) as c:
        for i in range(1000):
            c.send(request_bytes("GET", "/bytes/64?i=%d" % i, host="gw.test"))
            r = c.read_response()
            assert r.status == 200 and r.body_len == 64, r
    wait_until(lambda: len(origin.log_lines()) >= before + 1000, 10, what="origin logged 1000 requests")
    conns = {line[0] for line in origin.log_lines()[before:]}
    assert len(conns) <= 2, "%d TLS connections for 1000 requests" % len(conns)


@pytest.mark.parametrize("which", ["wrong_name", "expired", "untrusted"])
def test_upstream_certificate_failures_are_502_upstream_tls_error(ringway_factory, pki, backend,
                                                                   tmp_path_factory, which):
    cert, key = getattr(pki, which)
    n = NginxTls(tmp_path_factory.mktemp("nginx-" + which), cert, key, backend.addr).start()
    try:
        gw = start_gw(ringway_factory, "bad-" + which,
                      upstreams=[https_upstream("o", "localhost:%d" % n.port, pki)],
                      routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "o"}])
        r = get(gw.port, "/bytes/10")
        err = assert_json_error(r, 502)
        assert err["code"] == "upstream_tls_error", err
        wait_until(lambda: "upstream_tls_error" in gw.log_tail() or "certificate" in gw.log_tail().lower(),
                   5, what="a log line naming the TLS failure")
    finally:
        n.stop()


def test_mtls_to_an_upstream_that_requires_a_client_certificate(ringway_factory, pki, backend,
                                                                 tmp_path_factory):
    n = NginxTls(tmp_path_factory.mktemp("nginx-mtls"), pki.local[0], pki.local[1], backend.addr,
                 client_ca=pki.ca).start()
    try:
        with_cert = start_gw(ringway_factory, "mtls",
                             upstreams=[https_upstream("o", "localhost:%d" % n.port, pki,
                                                       client_cert=pki.client[0], client_key=pki.client[1])],
                             routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "o"}])
        assert get(with_cert.port, "/bytes/10").status == 200
        without = start_gw(ringway_factory, "no-mtls",
                           upstreams=[https_upstream("o", "localhost:%d" % n.port, pki)],
                           routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "o"}])
        # nginx answers 400 "No required SSL certificate was sent" itself.
        assert get(without.port, "/bytes/10").status == 400
    finally:
        n.stop()


def test_one_gib_download_over_https_upstream_keeps_memory_bounded(to_origin):
    rss0 = to_origin.rss()
    r = None
    with RawConn(to_origin.port, timeout=120) as c:
        c.send(request_bytes("GET", "/big", host="gw.test", headers=[("Connection", "close")]))
        r = c.read_response(keep_body=False)
    assert r.status == 200 and r.body_len == 1 << 30, r
    grown = to_origin.hwm() - rss0
    assert grown < 64 << 20, "peak RSS grew by %d KiB for a 1 GiB body" % (grown >> 10)


# ------------------------------------------------------------------------------ operations
def admin_reload(rw):
    with RawConn(rw.admin_port, timeout=10) as c:
        c.send(request_bytes("POST", "/reload", host="127.0.0.1",
                             headers=[("Content-Length", "0"), ("Connection", "close")]))
        return c.read_response()


def test_certificate_reload_under_load_and_a_bad_file_refused(ringway_fn, pki, backend):
    """Four clients loop over fresh TLS connections while the certificate file is replaced and
    reloaded: no request fails, new handshakes get the new certificate. A broken file then
    refuses the reload, naming key, line and file, and the old certificate keeps serving."""
    import shutil
    import threading
    live_pem, live_key = pki.path("live.pem"), pki.path("live.key")
    shutil.copy(pki.api[0], live_pem)
    shutil.copy(pki.api[1], live_key)
    second = pki.leaf("api2", ["DNS:api.test"])
    gw = start_gw(ringway_fn, "reload",
                  upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  tls={"certs": [{"cert": live_pem, "key": live_key}]})
    stop = threading.Event()
    counts = {"ok": 0, "failed": []}
    lock = threading.Lock()

    def loop():
        ctx = client_ctx(pki)
        while not stop.is_set():
            try:
                status = tls_get(gw.port, ctx, "api.test")[0]
                with lock:
                    if status == 200:
                        counts["ok"] += 1
                    else:
                        counts["failed"].append(status)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with lock:
                    counts["failed"].append(repr(e))

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: counts["ok"] >= 20, 10, what="traffic before the reload")
        for src in (second, pki.api, second):
            shutil.copy(src[0], live_pem + ".tmp")
            shutil.copy(src[1], live_key + ".tmp")
            os.replace(live_key + ".tmp", live_key)
            os.replace(live_pem + ".tmp", live_pem)
            r = admin_reload(gw)
            assert r.status == 200, r.body
            ok_now = counts["ok"]
            wait_until(lambda: counts["ok"] >= ok_now + 10, 10, what="traffic after a reload")
        ctx = client_ctx(pki)
        # Each worker picks the new configuration up on its next tick (within 100 ms).
        wait_until(lambda: all(tls_get(gw.port, ctx, "api.test")[3] == der_of(second[0])
                               for _ in range(8)), 5, what="every worker serving the new certificate")
        # A file that is not a certificate: refused, and the running one keeps serving.
        with open(live_pem, "w") as f:
            f.write("not a certificate\n")
        r = admin_reload(gw)
        assert r.status == 400, r.body
        text = r.body.decode()
        assert "listeners[0].tls.certs[0].cert" in text and "live.pem" in text, text
        assert tls_get(gw.port, ctx, "api.test")[3] == der_of(second[0])
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert counts["failed"] == [], counts["failed"][:5]
    assert counts["ok"] > 50


def test_idle_tls_keepalive_holds_no_buffer_and_logs_tls_fields(ringway_fn, pki, backend):
    alog = pki.path("tls-access.log")
    port, admin = free_port(), free_port()
    listener = {"name": "public", "address": "127.0.0.1:%d" % port,
                "tls": {"certs": [{"cert": pki.api[0], "key": pki.api[1]}]}}
    text = make_config(port, [{"name": "b", "endpoints": [backend.addr]}],
                       [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                       {"workers": 1}, listeners=[listener], admin=admin, log={"access": alog})
    gw = Ringway(text, ringway_fn.tmpdir / "idle", name="idle", port=port)
    gw.admin_port = admin
    ringway_fn.instances.append(gw)
    gw.start()
    ctx = client_ctx(pki)
    socks = []
    for _ in range(20):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                            server_hostname="api.test")
        s.sendall(request_bytes("GET", "/echo", host="api.test"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(65536)
        socks.append(s)
    # Twenty idle TLS keep-alive connections, every response read: no pool buffer held.
    wait_until(lambda: buffers_in_use(gw) == 0, 5, what="no buffer held by idle TLS connections")
    for s in socks:
        s.close()
    wait_until(lambda: os.path.exists(alog) and open(alog).read().count("\n") >= 20, 5,
               what="access-log lines")
    line = json.loads(open(alog).read().splitlines()[0])
    assert line["tls_version"] == "TLSv1.3" and line["sni"] == "api.test", line
    ok = [ln for ln in metric_lines(gw, "ringway_tls_handshakes_total") if 'result="ok"' in ln]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 20, ok


def test_session_resumption_works_across_workers(ringway_fn, pki, backend):
    """Stateless tickets shared by every worker: a client resumes wherever SO_REUSEPORT puts it."""
    gw = start_gw(ringway_fn, "resume",
                  upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  tls={"certs": [{"cert": pki.api[0], "key": pki.api[1]}]},
                  server={"workers": 2})
    ctx = client_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2)
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=5),
                        server_hostname="api.test")
    session = s.session
    s.close()
    resumed = 0
    for _ in range(12):
        s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=5),
                            server_hostname="api.test", session=session)
        resumed += s.session_reused
        s.close()
    assert resumed == 12, "%d of 12 handshakes resumed" % resumed


# ------------------------------------------------------------------------------ AI over TLS
def test_event_stream_token_accounting_through_an_https_upstream(ringway_fn, pki, tmp_path_factory):
    """An AI route whose upstream is HTTPS (nginx with `ssl` in front of the OpenAI-style origin):
    the SDK's streamed answer equals the direct one, and the token metrics hold exactly the
    usage the origin reported."""
    from test_ai import STATS, ai_config, expected_tokens, wait_tokens
    up = AiUpstreamProc("openai")
    n = NginxTls(tmp_path_factory.mktemp("nginx-ai"), pki.local[0], pki.local[1], up.addr).start()
    try:
        port, admin = free_port(), free_port()
        text = ai_config(port, admin,
                         [{"name": "openai", "endpoints": ["localhost:%d" % n.port],
                           "tls": {"ca": pki.ca}, "response_timeout": "10s"}],
                         [{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "stats"], "include_usage": True}],
                         [{"name": "auth", "kind": "key-auth"}, STATS])
        gw = Ringway(text, ringway_fn.tmpdir / "ai-tls", name="ai-tls", port=port)
        ringway_fn.instances.append(gw)
        gw.start()
        via = OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="sk-alice", max_retries=0,
                     timeout=30)
        direct = OpenAI(base_url="https://localhost:%d/v1" % n.port, api_key="x", max_retries=0,
                        timeout=30, http_client=openai.DefaultHttpxClient(verify=pki.ca))
        outs = []
        for client in (via, direct):
            chunks = client.chat.completions.create(
                model="gpt-4o-tls", messages=[{"role": "user", "content": "count my tokens over TLS"}],
                stream=True, max_tokens=20)
            outs.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        assert outs[0] == outs[1] and outs[0], outs
        entries = [e for e in up.entries() if e.get("model") == "gpt-4o-tls"]
        assert len(entries) == 2, entries
        exp = expected_tokens(entries[:1], "chat", "alice")
        assert exp, entries
        bad, mtext = wait_tokens(admin, exp)
        assert not bad, bad
    finally:
        n.stop()
        up.stop()


def test_client_certificate_subject_is_a_limit_key(ringway_fn, pki, backend):
    """client_auth = required: a client without a certificate is refused in the handshake; with
    `key = "client_cert"`, each certificate subject has its own request budget."""
    other = pki.leaf("client-b", cn="tenant-b", client=True)
    port, admin = free_port(), free_port()
    listener = {"name": "public", "address": "127.0.0.1:%d" % port,
                "tls": {"certs": [{"cert": pki.api[0], "key": pki.api[1]}],
                        "client_auth": {"ca": pki.ca, "mode": "required"}}}
    text = make_config(port, [{"name": "b", "endpoints": [backend.addr]}],
                       [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b",
                         "filters": ["per-cert"]}],
                       None, listeners=[listener], admin=admin)
    text += ('\n[[filters]]\nname = "per-cert"\nkind = "rate-limit"\nscope = "local"\n'
             'key = "client_cert"\nrules = [ { match = "*", requests_per_hour = 3 } ]\n')
    # An hour, not a minute: windows align to the clock, and eight requests that straddle a
    # minute's end would find the budget renewed (one epoll run got a fourth 200 that way).
    gw = Ringway(text, ringway_fn.tmpdir / "mtls-in", name="mtls-in", port=port)
    gw.admin_port = admin
    ringway_fn.instances.append(gw)
    gw.start()

    def with_cert(cert):
        ctx = client_ctx(pki)
        if cert:
            ctx.load_cert_chain(cert[0], cert[1])
        return ctx

    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        # TLS 1.3 reports the refusal at the first read after the handshake.
        tls_get(port, with_cert(None), "api.test")
    a = [tls_get(port, with_cert(pki.client), "api.test")[0] for _ in range(4)]
    b = [tls_get(port, with_cert(other), "api.test")[0] for _ in range(4)]
    assert a == [200, 200, 200, 429] and b == [200, 200, 200, 429], (a, b)


def test_10000_idle_tls_connections_do_not_stop_new_clients(ringway_fn, pki, backend):
    """10,000 TLS connections, handshaken and idle: they hold no pool buffer, their memory is
    bounded, and a new client is still served at once."""
    import resource
    n_idle = 10000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n_idle + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip("hard RLIMIT_NOFILE %d < %d" % (hard, need))
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else need, hard))
    gw = start_gw(ringway_fn, "idle10k",
                  upstreams=[{"name": "b", "endpoints": [backend.addr]}],
                  routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "b"}],
                  tls={"certs": [{"cert": pki.api[0], "key": pki.api[1]}]},
                  server={"keepalive_timeout": "120s", "header_timeout": "60s"})
    ctx = client_ctx(pki)
    assert tls_get(gw.port, ctx, "api.test")[0] == 200
    rss0 = gw.rss()
    socks = []
    try:
        for _ in range(n_idle):
            socks.append(ctx.wrap_socket(socket.create_connection(("127.0.0.1", gw.port), timeout=10),
                                         server_hostname="api.test"))
        wait_until(lambda: buffers_in_use(gw) == 0, 10, what="idle TLS connections holding no buffer")
        grown = gw.rss() - rss0
        assert grown < n_idle * 32 * 1024, "RSS grew %d KiB for %d idle TLS connections" % (grown >> 10, n_idle)
        for i in range(5):
            t = time.monotonic()
            assert tls_get(gw.port, ctx, "api.test", path="/echo?new=%d" % i)[0] == 200
            assert time.monotonic() - t < 2.0
        # Some of the idle ones still work.
        for s in socks[::2500]:
            s.sendall(request_bytes("GET", "/echo", host="api.test", headers=[("Connection", "close")]))
            assert s.recv(12).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()
