"""`ringway demo`: the gateway in front of its built-in OpenAI-compatible upstream."""

import json
import signal
import socket
import subprocess
import time

import pytest

from conftest import ringway_bin
from helpers import RawConn, free_port, port_open, request_bytes, wait_until



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


def _post(port, path, doc):
    body = json.dumps(doc).encode()
    with RawConn(port, timeout=15) as c:
        c.send(request_bytes("POST", path, host="127.0.0.1", body=body,
                             headers=[("Content-Type", "application/json"), ("Connection", "close")]))
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
