"""`sse_keepalive`: during upstream silence on an event stream, Ringway writes `: keep-alive`
comments between whole events, so idle-timeout intermediaries do not cut a model that thinks."""

import json

import pytest
from openai import OpenAI

from conftest import Ringway
from helpers import RawConn, free_port
from test_ai import STATS, ai_config, expected_tokens, wait_tokens


@pytest.fixture(scope="module")
def gw(ringway_factory, ai_up):
    port, admin = free_port(), free_port()
    text = ai_config(port, admin,
                     [{"name": "openai", "endpoints": [ai_up.addr], "response_timeout": "10s"}],
                     [{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                       "filters": ["auth", "stats"], "sse_keepalive": "1s"}],
                     [{"name": "auth", "kind": "key-auth"}, STATS])
    rw = Ringway(text, ringway_factory.tmpdir / "keepalive", name="keepalive", port=port)
    rw.admin_port = admin
    ringway_factory.instances.append(rw)
    return rw.start()


BODY = {"model": "gpt-4o-think", "stream": True, "max_tokens": 8,
        "messages": [{"role": "user", "content": "think first"}]}


def test_silence_mid_stream_gets_a_comment_per_second(gw):
    """3.5 s of upstream silence after two events: the client receives exactly 3 comments,
    each between whole events, and every event the upstream sent."""
    body = json.dumps(BODY).encode()
    with RawConn(gw.port, timeout=20) as c:
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-alice\r\n"
               b"Content-Type: application/json\r\nx-test-pause-ms: 3500\r\n"
               b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        r = c.read_response()
    assert r.status == 200, r
    text = r.body.decode()
    assert text.count(": keep-alive\n\n") == 3, text
    # Only between events: every block is a whole event or a whole comment.
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: ") or block == ": keep-alive", repr(block)
    assert text.rstrip().endswith("data: [DONE]"), text[-200:]


def test_sdk_parses_the_stream_unchanged_and_usage_is_exact(gw, ai_up):
    via = OpenAI(base_url="http://127.0.0.1:%d/v1" % gw.port, api_key="sk-alice", max_retries=0,
                 timeout=30)
    direct = OpenAI(base_url="http://%s/v1" % ai_up.addr, api_key="x", max_retries=0, timeout=30)
    outs = []
    for client, tag in ((via, "ka-via"), (direct, "ka-direct")):
        chunks = client.chat.completions.create(
            model="gpt-4o-ka", messages=[{"role": "user", "content": "think"}], stream=True,
            max_tokens=9, stream_options={"include_usage": True},
            extra_headers={"x-test-pause-ms": "2500", "x-test-tag": tag})
        outs.append([c.model_dump() for c in chunks])
    assert outs[0] == outs[1]
    exp = expected_tokens(ai_up.entries(tag="ka-via"), "chat", "alice")
    assert exp
    bad, _ = wait_tokens(gw.admin_port, exp)
    assert not bad, bad


def test_no_comment_when_the_upstream_keeps_talking(gw):
    body = json.dumps(dict(BODY, model="gpt-4o-fast")).encode()
    with RawConn(gw.port, timeout=20) as c:
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer sk-alice\r\n"
               b"Content-Type: application/json\r\nx-test-frame-delay-ms: 300\r\n"
               b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        r = c.read_response()
    assert r.status == 200 and b"keep-alive" not in r.body, r.body[:500]
