"""`ringway demo`: the gateway in front of its built-in OpenAI-compatible upstreams, and those
upstreams directly: `demo` fails when a request asks (`x-demo-fail`), `demo-backup` never does."""

import json
import signal
import socket
import subprocess
import time

import pytest

from conftest import ringway_bin
from helpers import RawConn, assert_json_error, free_port, port_open, request_bytes, wait_until



def _upstream_port(log, name):
    """The port of built-in upstream `name` the demo printed (`  demo  on 127.0.0.1:PORT ...`)."""
    import re
    m = re.search(r"^  %s +on 127\.0\.0\.1:(\d+) " % re.escape(name), log.read_text(), re.M)
    assert m, "no address for %s in:\n%s" % (name, log.read_text())
    return int(m.group(1))


def _admin_port(log):
    """The admin port the demo printed (`curl -s http://127.0.0.1:PORT/metrics ...`)."""
    import re
    m = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", log.read_text())
    return int(m.group(1)) if m else None


@pytest.fixture
def demo(tmp_path):
    port = free_port()
    log = tmp_path / "demo.log"
    lf = open(log, "wb")
    proc = subprocess.Popen([ringway_bin(), "demo", "--listen", "127.0.0.1:%d" % port],
                            stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not (port_open(port) and _admin_port(log) and port_open(_admin_port(log))):
            assert proc.poll() is None, "demo exited with %s:\n%s" % (proc.returncode, log.read_text())
            assert time.monotonic() < deadline, "demo not listening:\n%s" % log.read_text()
            time.sleep(0.02)
        yield proc, port, log, _admin_port(log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        lf.close()


def _post(port, path, doc, headers=()):
    body = json.dumps(doc).encode()
    with RawConn(port, timeout=15) as c:
        c.send(request_bytes("POST", path, host="127.0.0.1", body=body,
                             headers=[("Content-Type", "application/json"), ("Connection", "close")]
                             + list(headers)))
        return c.read_response()


def test_demo_serves_chat_completions_stream_and_not(demo):
    """Non-stream and stream chat completions work through the demo gateway; metrics count them;
    SIGTERM exits 0."""
    proc, port, log, admin = demo
    r = _post(port, "/v1/chat/completions",
              {"model": "demo-1", "messages": [{"role": "user", "content": "Hello, Ringway"}]})
    assert r.status == 200, r
    doc = r.json()
    assert doc["object"] == "chat.completion", doc
    assert doc["choices"][0]["message"]["content"], doc
    assert doc["usage"]["total_tokens"] > 0, doc

    r = _post(port, "/v1/chat/completions",
              {"model": "demo-1", "stream": True, "messages": [{"role": "user", "content": "Stream to me"}]})
    assert r.status == 200, r
    assert "text/event-stream" in (r.get("content-type") or ""), r
    frames = [f for f in r.body.decode().split("\n\n") if f.strip()]
    assert frames and frames[-1].strip() == "data: [DONE]", frames[-3:]
    chunks = [json.loads(f.split("data: ", 1)[1]) for f in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks), chunks[:2]
    text = "".join(ch.get("delta", {}).get("content") or "" for c in chunks for ch in c["choices"])
    assert text, chunks

    def ok_requests():
        with RawConn(admin) as c:
            c.send(request_bytes("GET", "/metrics", host="127.0.0.1", headers=[("Connection", "close")]))
            m = c.read_response()
        assert m.status == 200
        lines = [l for l in m.body.decode().splitlines()
                 if l.startswith("ringway_requests_total{") and 'status="200"' in l]
        return sum(float(l.rsplit(" ", 1)[1]) for l in lines)

    # A request is counted once its last byte is written, so the client can see the end of the
    # stream a moment before the counter moves.
    wait_until(lambda: ok_requests() >= 2, 5, what="both requests counted in /metrics")

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0, log.read_text()
    wait_until(lambda: not port_open(port), 2, what="the demo listener to close")


CHAT = {"model": "demo-1", "messages": [{"role": "user", "content": "Hello, Ringway"}]}
MESSAGES = {"model": "claude-demo", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
STATUSES = (429, 500, 502, 503, 504, 529)


def _raw_request(path, doc, fail):
    return request_bytes("POST", path, host="127.0.0.1", body=json.dumps(doc).encode(),
                         headers=[("Content-Type", "application/json"), ("x-demo-fail", fail)])


def test_demo_prints_both_upstreams_and_x_demo_fail(demo):
    """The printed text gives both upstreams' addresses and a curl line with x-demo-fail."""
    proc, port, log, admin = demo
    text = log.read_text()
    assert _upstream_port(log, "demo") != _upstream_port(log, "demo-backup"), text
    assert "-H 'x-demo-fail: 503'" in text, text


def test_flaky_upstream_answers_each_error_status(demo):
    """x-demo-fail: 429/500/502/503/504/529 on the flaky upstream: that status with a JSON error
    body (OpenAI's shape on chat, Anthropic's on /v1/messages), retry-after: 1 on 429 only."""
    proc, port, log, admin = demo
    flaky = _upstream_port(log, "demo")
    for status in STATUSES:
        r = _post(flaky, "/v1/chat/completions", CHAT, [("x-demo-fail", str(status))])
        err = assert_json_error(r, status)
        assert ("x-demo-fail: %d" % status) in err["message"], r
        assert r.get("retry-after") == ("1" if status == 429 else None), r

        r = _post(flaky, "/v1/messages", MESSAGES, [("x-demo-fail", str(status))])
        assert r.status == status, r
        doc = r.json()
        assert doc["type"] == "error" and doc["error"]["type"] and doc["error"]["message"], doc
        assert r.get("retry-after") == ("1" if status == 429 else None), r
    assert _post(flaky, "/v1/messages", MESSAGES, [("x-demo-fail", "429")]).json()["error"]["type"] \
        == "rate_limit_error"
    assert _post(flaky, "/v1/messages", MESSAGES, [("x-demo-fail", "529")]).json()["error"]["type"] \
        == "overloaded_error"
    # Without the header the flaky upstream answers like the other one.
    r = _post(flaky, "/v1/chat/completions", CHAT)
    assert r.status == 200 and r.json()["object"] == "chat.completion", r


def test_flaky_upstream_keeps_the_connection_after_an_error_status(demo):
    """An error status is a whole answer: the next request on the connection is served."""
    proc, port, log, admin = demo
    with RawConn(_upstream_port(log, "demo"), timeout=15) as c:
        c.send(_raw_request("/v1/chat/completions", CHAT, "503"))
        assert c.read_response().status == 503
        c.send(request_bytes("GET", "/healthz", host="127.0.0.1"))
        r = c.read_response()
        assert (r.status, r.body) == (200, b"ok"), r


def test_flaky_upstream_refuses_an_unknown_value(demo):
    """An unknown x-demo-fail value is a 400 JSON error that names the header."""
    proc, port, log, admin = demo
    flaky = _upstream_port(log, "demo")
    r = _post(flaky, "/v1/chat/completions", CHAT, [("x-demo-fail", "sometimes")])
    err = assert_json_error(r, 400)
    assert "x-demo-fail" in err["message"] and err["param"] == "x-demo-fail", err
    r = _post(flaky, "/v1/messages", MESSAGES, [("x-demo-fail", "418")])
    assert r.status == 400 and "x-demo-fail" in r.json()["error"]["message"], r


def test_flaky_upstream_stalls_until_the_client_leaves(demo):
    """x-demo-fail: stall: the request is taken and nothing comes back; when the client shuts
    its side, the upstream closes without having sent a byte."""
    proc, port, log, admin = demo
    with socket.create_connection(("127.0.0.1", _upstream_port(log, "demo")), timeout=5) as s:
        s.sendall(_raw_request("/v1/chat/completions", CHAT, "stall"))
        s.settimeout(1.0)
        with pytest.raises((socket.timeout, TimeoutError)):
            s.recv(1)
        s.settimeout(5)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""


def test_flaky_upstream_resets_without_answering(demo):
    """x-demo-fail: reset: the connection is reset, with no response at all."""
    proc, port, log, admin = demo
    with socket.create_connection(("127.0.0.1", _upstream_port(log, "demo")), timeout=5) as s:
        s.sendall(_raw_request("/v1/chat/completions", CHAT, "reset"))
        with pytest.raises(ConnectionResetError):
            s.recv(1)


def test_backup_upstream_ignores_x_demo_fail(demo):
    """The healthy backup answers 200 whatever x-demo-fail says: a fallback forwards the header."""
    proc, port, log, admin = demo
    backup = _upstream_port(log, "demo-backup")
    for value in [str(s) for s in STATUSES] + ["stall", "reset", "sometimes"]:
        r = _post(backup, "/v1/chat/completions", CHAT, [("x-demo-fail", value)])
        assert r.status == 200 and r.json()["object"] == "chat.completion", (value, r)
        assert r.get("retry-after") is None, r
        r = _post(backup, "/v1/messages", MESSAGES, [("x-demo-fail", value)])
        assert r.status == 200 and r.json()["type"] == "message", (value, r)


def _metric(admin, name, **labels):
    with RawConn(admin) as c:
        c.send(request_bytes("GET", "/metrics", host="127.0.0.1", headers=[("Connection", "close")]))
        m = c.read_response()
    total = 0.0
    for line in m.body.decode().splitlines():
        if line.startswith(name + "{") and all('%s="%s"' % kv in line for kv in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("fail", ["429", "503", "reset", "stall"])
def test_the_demo_gateway_falls_back_to_demo_backup(demo, fail):
    """Through the gateway, a request that makes `demo` fail is answered by `demo-backup`,
    chat and messages, streamed and not; /metrics counts the failed attempt and the served one."""
    proc, port, log, admin = demo
    t0 = time.monotonic()
    r = _post(port, "/v1/chat/completions", CHAT, headers=[("x-demo-fail", fail)])
    assert r.status == 200, r
    assert r.json()["choices"][0]["message"]["content"].startswith("Ringway demo reply to:"), r
    r = _post(port, "/v1/chat/completions", dict(CHAT, stream=True), headers=[("x-demo-fail", fail)])
    assert r.status == 200 and r.body.decode().rstrip().endswith("data: [DONE]"), r
    r = _post(port, "/v1/messages", MESSAGES, headers=[("x-demo-fail", fail)])
    assert r.status == 200 and r.json()["type"] == "message", r
    # A stall costs the demo's response_timeout (3 s) per request, nothing more.
    assert time.monotonic() - t0 < 15
    outcome = {"429": "status_429", "503": "status_5xx", "reset": "reset", "stall": "timeout"}[fail]
    failed = _metric(admin, "ringway_upstream_attempts_total", upstream="demo", outcome=outcome)
    # After three failures in a row demo rests (passive health): the rest skip it.
    skipped = _metric(admin, "ringway_upstream_attempts_total", upstream="demo", outcome="connect")
    assert failed >= 1 and failed + skipped == 3, (failed, skipped)
    assert _metric(admin, "ringway_upstream_attempts_total", upstream="demo-backup", outcome="ok") == 3
