"""Fallbacks: an AI route whose upstream refuses connections, answers 429 (with retry-after) or
503, or stalls past response_timeout is served by the route's fallback, through the official
SDKs (their own retries off), streamed and not; tokens are counted once, from the upstream that
answered, under the model name it was sent; a stream cut after its first byte is not retried;
a key answered 429 is replaced at once by another key; a plain route falls back only for
requests without a body. Two recording mock providers (provider_mock.py) with different usage
tell which one served.
"""

import json
import time

import pytest
import requests
from anthropic import Anthropic
from openai import OpenAI

from helpers import free_port
from provider_mock import MockProvider
from test_providers import (AUTH, CONSUMER_KEY, KEY_A, KEY_B, STATS, assert_no_secret, creds,
                            everything_visible, metric, start, url)

PRIMARY_USAGE = (11, 3)
BACKUP_USAGE = (17, 5)
TPM = {"name": "tpm", "kind": "token-limit", "scope": "local", "key": "consumer",
       "rules": [{"match": "*", "tokens_per_hour": 1_000_000}]}
H = {"authorization": "Bearer " + CONSUMER_KEY}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
BACKUP_MODEL = "gpt-4o-mini-at-backup"


@pytest.fixture
def pair():
    a, b = MockProvider(usage=PRIMARY_USAGE), MockProvider(usage=BACKUP_USAGE)
    yield a, b
    a.stop()
    b.stop()


def gateway(ringway_fn, primary_endpoints, backup, route=None, primary=None, filters=(AUTH, TPM, STATS),
            name="rw"):
    ups = [dict({"name": "primary", "endpoints": primary_endpoints, "response_timeout": "1s",
                 "connect_timeout": "1s", "credentials": creds("bearer", "RW_TEST_KEY_A")}, **(primary or {})),
           {"name": "backup", "endpoints": [backup.addr], "response_timeout": "5s",
            "credentials": creds("bearer", "RW_TEST_KEY_B"), "model_map": {"gpt-4o-mini": BACKUP_MODEL}}]
    r = dict({"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "primary",
              "fallbacks": ["backup"], "filters": [f["name"] for f in filters]}, **(route or {}))
    return start(ringway_fn, ups, [r], filters=filters, name=name)


def sdk(rw):
    return OpenAI(base_url=url(rw, "/v1"), api_key=CONSUMER_KEY, max_retries=0, timeout=10)


def tokens(rw, model, direction):
    return metric(rw, "ringway_ai_tokens_total", route="chat", model=model, direction=direction)


def log_lines(rw, n):
    deadline = time.monotonic() + 3
    while True:
        text = rw.access_log.read_text() if rw.access_log.exists() else ""
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def served_by_backup_once(rw, backup, n_requests):
    """Every request reached the backup once with its own key and model name, and the tokens
    counted are the backup's usage, once per request, under the backup's model name."""
    reqs = backup.requests()
    assert len(reqs) == n_requests, [r.target for r in reqs]
    for r in reqs:
        assert r.key() == KEY_B, r.headers
        assert json.loads(r.body)["model"] == BACKUP_MODEL
        assert CONSUMER_KEY not in r.raw()
    deadline = time.monotonic() + 3
    want = (BACKUP_USAGE[0] * n_requests, BACKUP_USAGE[1] * n_requests)
    while (tokens(rw, BACKUP_MODEL, "input"), tokens(rw, BACKUP_MODEL, "output")) != want \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tokens(rw, BACKUP_MODEL, "input"), tokens(rw, BACKUP_MODEL, "output")) == want
    assert tokens(rw, "gpt-4o-mini", "input") == 0, "usage was charged under the client's name"


def chat_both_ways(rw):
    """One non-streamed and one streamed chat through the SDK; both must succeed."""
    o = sdk(rw)
    r = o.chat.completions.create(**CHAT)
    assert r.choices[0].message.content == "hello there"
    assert r.usage.completion_tokens == BACKUP_USAGE[1]
    text = "".join(c.choices[0].delta.content or "" for c in
                   o.chat.completions.create(stream=True, **CHAT) if c.choices)
    assert text == "hello there"


def test_connection_refused_falls_back(ringway_fn, pair):
    _, backup = pair
    dead = "127.0.0.1:%d" % free_port()
    rw = gateway(ringway_fn, [dead], backup)
    chat_both_ways(rw)
    served_by_backup_once(rw, backup, 2)
    lines = log_lines(rw, 2)
    assert [(x["upstream_name"], x["attempts"], x["status"]) for x in lines] == [("backup", 2, 200)] * 2
    assert metric(rw, "ringway_upstream_attempts_total", route="chat", upstream="primary",
                  outcome="connect") == 2
    assert metric(rw, "ringway_upstream_attempts_total", route="chat", upstream="backup", outcome="ok") == 2
    assert_no_secret(*everything_visible(rw))


def test_a_429_with_retry_after_falls_back_and_the_key_cools(ringway_fn, pair):
    primary, backup = pair
    primary.refuse[KEY_A] = (429, [("retry-after", "30")])
    rw = gateway(ringway_fn, [primary.addr], backup)
    chat_both_ways(rw)
    # The first 429 cooled primary's only key: the second request skipped it.
    assert len(primary.requests()) == 1
    served_by_backup_once(rw, backup, 2)
    assert metric(rw, "ringway_upstream_key_cooling", upstream="primary", key="0") == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_503_falls_back_streamed_and_not(ringway_fn, pair, stream):
    primary, backup = pair
    primary.mode, primary.status_answer = "status", (503, [])
    rw = gateway(ringway_fn, [primary.addr], backup)
    o = sdk(rw)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       o.chat.completions.create(stream=True, **CHAT) if c.choices)
        assert text == "hello there"
    else:
        assert o.chat.completions.create(**CHAT).usage.prompt_tokens == BACKUP_USAGE[0]
    assert len(primary.requests()) == 1
    served_by_backup_once(rw, backup, 1)
    assert metric(rw, "ringway_upstream_attempts_total", upstream="primary", outcome="status_5xx") == 1


def test_the_token_reservation_is_made_once_per_request(ringway_fn, pair):
    """Two identical requests, each refused by the primary and served by the backup: between
    their x-ratelimit-remaining-tokens lies exactly the first one's usage at the backup, so
    its reservation was made once, not once per attempt, and settled to that usage."""
    primary, backup = pair
    primary.mode, primary.status_answer = "status", (503, [])
    rw = gateway(ringway_fn, [primary.addr], backup)
    rem = []
    for _ in range(2):
        r = requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=H, timeout=5)
        assert r.status_code == 200, r.text
        rem.append(int(r.headers["x-ratelimit-remaining-tokens"]))
    assert len(primary.requests()) == 2 and len(backup.requests()) == 2
    assert rem[0] - rem[1] == sum(BACKUP_USAGE), rem


def test_a_stall_past_response_timeout_falls_back(ringway_fn, pair):
    primary, backup = pair
    primary.mode = "stall"
    rw = gateway(ringway_fn, [primary.addr], backup)
    t0 = time.monotonic()
    chat_both_ways(rw)
    took = time.monotonic() - t0
    assert took < 6, "two requests took %.1f s; each should wait about 1 s (response_timeout)" % took
    served_by_backup_once(rw, backup, 2)
    assert metric(rw, "ringway_upstream_attempts_total", upstream="primary", outcome="timeout") == 2


def test_anthropic_sdk_through_a_fallback(ringway_fn, pair):
    primary, backup = pair
    primary.mode, primary.status_answer = "status", (529, [])
    rw = gateway(ringway_fn, [primary.addr], backup, primary={"credentials": creds("anthropic", "RW_TEST_KEY_A")})
    an = Anthropic(base_url=url(rw, ""), api_key=CONSUMER_KEY, max_retries=0, timeout=10)
    m = an.messages.create(model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert m.usage.input_tokens == BACKUP_USAGE[0]
    p = primary.requests()[0]
    assert p.one("x-api-key") == KEY_A and p.all("authorization") == []
    version = p.one("anthropic-version")  # the SDK's own, kept
    # The backup is a bearer upstream: its key in Authorization, no x-api-key, and the
    # client's anthropic-version only.
    b = backup.requests()[0]
    assert b.one("authorization") == "Bearer " + KEY_B
    assert b.all("x-api-key") == [] and b.all("anthropic-version") == [version]


def test_a_stream_cut_after_its_first_byte_is_not_retried(ringway_fn, pair):
    primary, backup = pair
    primary.mode = "cut"
    rw = gateway(ringway_fn, [primary.addr], backup)
    r = requests.post(url(rw, "/v1/chat/completions"), json=dict(CHAT, stream=True), headers=H,
                      timeout=10, stream=True)
    assert r.status_code == 200
    got = b""
    with pytest.raises(requests.exceptions.RequestException):
        for chunk in r.iter_content(None):
            got += chunk
    assert b"hello" in got and b"[DONE]" not in got, got
    assert backup.requests() == [], "a stream the client had started was sent again"
    assert len(primary.requests()) == 1


def test_every_attempt_refused_passes_the_last_answer_through(ringway_fn, pair):
    primary, backup = pair
    primary.refuse[KEY_A] = (429, [("retry-after", "1")])
    backup.refuse[KEY_B] = (429, [("retry-after", "1"), ("x-from", "backup")])
    rw = gateway(ringway_fn, [primary.addr], backup)
    r = requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=H, timeout=10)
    assert r.status_code == 429
    assert r.headers.get("x-from") == "backup", r.headers
    assert r.json()["error"]["message"] == "refused", "the provider's own body passes through"
    assert [x["attempts"] for x in log_lines(rw, 1)] == [2]


def test_max_attempts_bounds_the_requests_sent(ringway_fn, pair):
    primary, backup = pair
    primary.mode, primary.status_answer = "status", (503, [])
    backup.mode, backup.status_answer = "status", (502, [])
    third = MockProvider(usage=(1, 1))
    try:
        ups = [{"name": "primary", "endpoints": [primary.addr], "response_timeout": "2s",
                "credentials": creds("bearer", "RW_TEST_KEY_A")},
               {"name": "backup", "endpoints": [backup.addr], "response_timeout": "2s",
                "credentials": creds("bearer", "RW_TEST_KEY_B")},
               {"name": "third", "endpoints": [third.addr], "response_timeout": "2s"}]
        rw = start(ringway_fn, ups, [{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "primary",
                                      "fallbacks": ["backup", "third"], "max_attempts": 2,
                                      "filters": ["auth", "stats"]}])
        r = requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=H, timeout=10)
        assert r.status_code == 502, "the second (last allowed) attempt's answer"
        assert (len(primary.requests()), len(backup.requests()), len(third.requests())) == (1, 1, 0)
    finally:
        third.stop()


def test_a_cooling_key_gets_none_of_100_requests(ringway_fn, pair):
    primary, backup = pair
    primary.refuse[KEY_B] = (429, [("retry-after", "30")])
    rw = gateway(ringway_fn, [primary.addr], backup,
                 primary={"credentials": creds("bearer", "RW_TEST_KEY_A", "RW_TEST_KEY_B")})
    # Until key B (position 1) has met its 429 once, requests may use it; that one is
    # retried at once with key A on the same upstream.
    for _ in range(60):
        assert requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=H, timeout=5).status_code == 200
        if any(r.key() == KEY_B for r in primary.requests()):
            break
    keys = [r.key() for r in primary.requests()]
    assert keys[-2:] == [KEY_B, KEY_A], keys
    assert metric(rw, "ringway_upstream_key_cooling", upstream="primary", key="1") == 1
    primary.reset()
    for _ in range(100):
        assert requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=H, timeout=5).status_code == 200
    keys = [r.key() for r in primary.requests()]
    assert len(keys) == 100 and set(keys) == {KEY_A}, "the cooling key was used"
    assert backup.requests() == [], "a usable key was left on the upstream: no fallback needed"


def test_a_plain_route_falls_back_only_without_a_body(ringway_fn, pair):
    primary, backup = pair
    primary.mode, primary.status_answer = "status", (503, [("x-from", "primary")])
    ups = [{"name": "primary", "endpoints": [primary.addr], "response_timeout": "2s"},
           {"name": "backup", "endpoints": [backup.addr], "response_timeout": "2s"}]
    rw = start(ringway_fn, ups, [{"name": "plain", "match": {"path_prefix": "/"}, "upstream": "primary",
                                  "fallbacks": ["backup"]}], filters=())
    r = requests.get(url(rw, "/v1/models"), timeout=5)
    assert r.status_code == 200, r.text
    assert len(backup.requests()) == 1 and backup.requests()[0].method == "GET"
    # A body is not held on a plain route: the upstream's answer stands.
    r = requests.post(url(rw, "/v1/chat/completions"), json=CHAT, timeout=5)
    assert r.status_code == 503 and r.headers.get("x-from") == "primary"
    assert len(backup.requests()) == 1
    lines = log_lines(rw, 2)
    assert sorted((x["upstream_name"], x["attempts"]) for x in lines) == [("backup", 2), ("primary", 1)]


def test_a_plain_route_whose_every_upstream_refuses_answers_a_json_error(ringway_fn):
    """The failure path of a plain route with fallbacks: every attempt refused, the client gets
    a JSON error (502, or 503 `no_healthy_upstream` once both endpoints are ejected), the
    access log has the same status, and the connection serves the next request."""
    dead = [{"name": n, "endpoints": ["127.0.0.1:%d" % free_port()], "response_timeout": "2s"}
            for n in ("primary", "backup")]
    rw = start(ringway_fn, dead, [{"name": "plain", "match": {"path_prefix": "/"},
                                   "upstream": "primary", "fallbacks": ["backup"]}], filters=())
    with requests.Session() as s:
        got = []
        for _ in range(2):
            r = s.get(url(rw, "/v1/models"), timeout=5)
            assert r.headers["content-type"].startswith("application/json"), r.headers
            assert r.json()["error"]["type"] in ("bad_gateway", "service_unavailable"), r.text
            got.append(r.status_code)
    assert all(c in (502, 503) for c in got), got
    lines = log_lines(rw, 2)
    assert [x["status"] for x in lines] == got, lines
