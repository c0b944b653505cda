"""A client that leaves: before the response head (the model is still thinking) or mid-stream.
The upstream connection is closed at once, what was delivered is charged, and the rest of the
token reservation is released."""

import json
import socket
import time

import pytest

from conftest import Ringway
from helpers import RawConn, free_port
from test_ai import STATS, ai_config, tpm_filter

BUDGET = 1000


@pytest.fixture
def gw(ringway_fn, ai_up):
    """A token budget of 1000 per minute for alice; each request reserves 700 (its max_tokens
    plus input), so two reservations never fit at once."""
    port, admin = free_port(), free_port()
    text = ai_config(port, admin,
                     [{"name": "openai", "endpoints": [ai_up.addr], "response_timeout": "10s"}],
                     [{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                       "filters": ["auth", "tpm", "stats"]}],
                     [{"name": "auth", "kind": "key-auth"}, tpm_filter(BUDGET, max_reserve=None), STATS])
    rw = Ringway(text, ringway_fn.tmpdir / "abort", name="abort", port=port)
    rw.admin_port = admin
    ringway_fn.instances.append(rw)
    return rw.start()


def request(tag, extra=b"", words=None, stream=True):
    doc = {"model": "gpt-4o-abort", "stream": stream, "max_tokens": 680,
           "messages": [{"role": "user", "content": "x"}]}
    body = json.dumps(doc).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-alice\r\n"
            b"Content-Type: application/json\r\nx-test-tag: " + tag.encode() + b"\r\n" + extra +
            (b"x-test-words: %d\r\n" % words if words else b"") +
            b"Content-Length: %d\r\n\r\n" % len(body) + body)


def entry(ai_up, tag, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = ai_up.entries(tag=tag)
        if got:
            return got[-1]
        time.sleep(0.02)
    raise AssertionError("the upstream recorded nothing for %s" % tag)


def leave_while_the_model_thinks(gw, ai_up, tag, after):
    """Sends a request the model 'thinks' about for 3 s, leaves `after` seconds later, and
    checks that the upstream saw its connection closed within 200 ms of that."""
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(request(tag, b"x-test-delay-ms: 3000\r\n"))
    time.sleep(after)
    left_at = time.time()
    s.close()
    closed_within_200_ms(ai_up, tag, left_at)


def closed_within_200_ms(ai_up, tag, left_at):
    """The upstream saw the connection of request `tag` closed within 200 ms of `left_at`."""
    e = entry(ai_up, tag)
    assert e.get("closed_at"), e
    assert e["closed_at"] - left_at < 0.2, "upstream closed %.3fs after the client left" % (
        e["closed_at"] - left_at)


def test_client_leaving_before_the_response_head_closes_the_upstream_at_once(gw, ai_up):
    """The model 'thinks' for 3 s; the client leaves after 0.3 s: the upstream sees its
    connection closed within 200 ms of that, and the reservation is back (a request that needs
    most of the budget is allowed right after, twice in a row)."""
    for i in range(2):
        leave_while_the_model_thinks(gw, ai_up, "abort-head-%d-%f" % (i, time.time()), 0.3)
    with RawConn(gw.port, timeout=10) as c:
        c.send(request("abort-after-%f" % time.time(), stream=False, words=3))
        r = c.read_response()
        assert r.status == 200, "the aborted requests' reservations were not released: %r" % r


def test_client_leaving_just_after_its_request_closes_the_upstream_within_200_ms(gw, ai_up):
    """A client that leaves 20 ms after sending, before Ringway watches for that (it starts to
    once an answer keeps the client waiting 50 ms, at the deadline wheel's next tick): the
    upstream still sees its connection closed within 200 ms of the client leaving."""
    leave_while_the_model_thinks(gw, ai_up, "abort-early-%f" % time.time(), 0.02)


def test_client_leaving_mid_stream_is_charged_what_it_got(gw, ai_up):
    """A stream of 300 words, one event per 20 ms; the client reads a few events and leaves: the
    upstream's connection is cut within 200 ms, and the budget is released but for what was
    delivered (a near-budget request then fits)."""
    tag = "abort-mid-%f" % time.time()
    s = socket.create_connection(("127.0.0.1", gw.port))
    s.sendall(request(tag, b"x-test-frame-delay-ms: 20\r\n", words=300))
    got = b""
    while got.count(b"data: ") < 5:
        d = s.recv(65536)
        assert d, "the stream ended early: %r" % got[-300:]
        got += d
    left_at = time.time()
    s.close()
    closed_within_200_ms(ai_up, tag, left_at)
    time.sleep(0.1)
    with RawConn(gw.port, timeout=10) as c:
        c.send(request("abort-mid-after-%f" % time.time(), stream=False, words=3))
        r = c.read_response()
        assert r.status == 200, "the reservation was not released after the client left: %r" % r
        remaining = int(r.get("x-ratelimit-remaining-tokens"))
        # Charged: the input and the few words delivered, not the 300 the stream would have had.
        assert BUDGET - 700 - 100 < remaining < BUDGET, remaining


def test_an_ai_endpoint_answering_429_in_a_row_rests(ringway_fn, ai_up):
    """Two endpoints, one answering every request 429: each of its refusals is retried on the
    other endpoint (the client gets 200 every time), and after three in a row it is ejected for
    the passive cooldown, so the requests that follow go to the other one at once."""
    from raw_upstream import ScriptedUpstream
    seen = []

    def limited(sock, req, state):
        seen.append(1)
        body = b'{"error":{"message":"slow down","type":"rate_limit_exceeded"}}'
        sock.sendall(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        return True

    bad = ScriptedUpstream(limited).start()
    try:
        port, admin = free_port(), free_port()
        text = ai_config(port, admin,
                         [{"name": "openai", "endpoints": [bad.addr, ai_up.addr], "retries": 0,
                           "response_timeout": "10s"}],
                         [{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "stats"]}],
                         [{"name": "auth", "kind": "key-auth"}, STATS],
                         server={"workers": 1})
        rw = Ringway(text, ringway_fn.tmpdir / "rest429", name="rest429", port=port)
        ringway_fn.instances.append(rw)
        rw.start()
        statuses = []
        with RawConn(port, timeout=10) as c:
            for i in range(16):
                c.send(request("rest-%d-%f" % (i, time.time()), stream=False, words=2))
                statuses.append(c.read_response().status)
        assert statuses == [200] * 16, statuses
        assert len(seen) == 3, "the 429 endpoint got %d requests, not 3 then ejected" % len(seen)
    finally:
        bad.stop()
