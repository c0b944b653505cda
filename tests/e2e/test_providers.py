"""Provider credentials: Ringway holds the provider's keys (from the environment or a file) and
the consumer's own key never leaves. A recording mock provider (provider_mock.py) checks every
request it gets; key pools (weights, 429 cooldown, 401 removal until reload), the key metrics,
header rules on plain and AI routes, upstream model_map, and the official SDKs through an AI
route. No secret may appear in stderr, the access log, /stats, /metrics or `ringway check`.
"""

import json
import os
import signal
import subprocess
import time
import uuid

import pytest
import requests
from anthropic import Anthropic
from openai import OpenAI

from conftest import Ringway, _toml_value, make_config, ringway_bin
from helpers import free_port, wait_until
from provider_mock import MockProvider

KEY_A = "sk-prov-A-" + uuid.uuid4().hex
KEY_B = "sk-prov-B-" + uuid.uuid4().hex
KEY_ANT = "sk-ant-" + uuid.uuid4().hex
KEY_AZ = uuid.uuid4().hex
KEY_GOOG = "AIza" + uuid.uuid4().hex
SECRETS = [KEY_A, KEY_B, KEY_ANT, KEY_AZ, KEY_GOOG]
ENV = {"RW_TEST_KEY_A": KEY_A, "RW_TEST_KEY_B": KEY_B, "RW_TEST_KEY_ANT": KEY_ANT,
       "RW_TEST_KEY_AZ": KEY_AZ, "RW_TEST_KEY_GOOG": KEY_GOOG}
CONSUMER_KEY = "sk-alice-consumer-key"
CONSUMERS = [{"name": "alice", "keys": [CONSUMER_KEY]}]
AUTH = {"name": "auth", "kind": "key-auth", "query_param": "api_key"}
STATS = {"name": "stats", "kind": "ai-stats"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def creds(kind, *envs, name=None, weights=None):
    keys = []
    for i, e in enumerate(envs):
        k = {"env": e}
        if weights:
            k["weight"] = weights[i]
        keys.append(k)
    c = {"kind": kind, "keys": keys}
    if name:
        c["name"] = name
    return c


def start(factory, upstreams, routes, filters=(AUTH, STATS), name="rw", env=ENV, log=True):
    port, admin = free_port(), free_port()
    alog = factory.tmpdir / name / "access.log"
    text = make_config(port, upstreams, routes, admin=admin,
                       log={"access": str(alog)} if log else None)
    extra = []
    for header, items in (("consumers", CONSUMERS), ("filters", filters)):
        for d in items:
            extra += ["", "[[%s]]" % header] + ["%s = %s" % (k, _toml_value(v)) for k, v in d.items()]
    rw = Ringway(text + "\n".join(extra) + "\n", factory.tmpdir / name, name=name, port=port, env=env)
    rw.admin_port = admin
    rw.access_log = alog
    factory.instances.append(rw)
    return rw.start()


def url(rw, path):
    return "http://127.0.0.1:%d%s" % (rw.port, path)


def admin(rw, path):
    return requests.get("http://127.0.0.1:%d%s" % (rw.admin_port, path), timeout=5).text


def metric(rw, name, **labels):
    total = 0.0
    for line in admin(rw, "/metrics").splitlines():
        if not line.startswith(name + "{"):
            continue
        lab, _, val = line[len(name) + 1:].rpartition("} ")
        pairs = dict(p.split("=", 1) for p in lab.split(","))
        if all(pairs.get(k) == '"%s"' % v for k, v in labels.items()):
            total += float(val)
    return total


def assert_no_secret(*texts):
    for t in texts:
        for s in SECRETS:
            assert s not in t, "a provider key leaked into: %s" % t[:2000]


def everything_visible(rw):
    """stderr, the access log, /stats and /metrics of a running ringway."""
    alog = rw.access_log.read_text() if rw.access_log.exists() else ""
    return [rw.log_path.read_text(errors="replace"), alog, admin(rw, "/stats"), admin(rw, "/metrics")]


@pytest.fixture(scope="module")
def mock():
    m = MockProvider()
    yield m
    m.stop()


@pytest.fixture(autouse=True)
def _fresh(mock):
    mock.reset()
    yield


def up(name, mock, **kw):
    d = {"name": name, "endpoints": [mock.addr], "response_timeout": "5s"}
    d.update(kw)
    return d


# ---------------------------------------------------------------- 1. consumer key never leaves
def test_provider_key_replaces_every_client_credential(ringway_fn, mock):
    rw = start(ringway_fn, [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A"))],
               [{"name": "plain", "match": {"path_prefix": "/plain/"}, "upstream": "openai",
                 "filters": ["auth"], "strip_prefix": True},
                {"name": "ai", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                 "filters": ["auth", "stats"]}])
    sends = [
        ("/v1/chat/completions", {"authorization": "Bearer " + CONSUMER_KEY}),
        ("/v1/chat/completions", {"x-api-key": CONSUMER_KEY, "api-key": "client-azure-key"}),
        ("/v1/chat/completions?api_key=%s&keep=1" % CONSUMER_KEY, {}),
        ("/plain/v1/chat/completions", {"authorization": "Bearer " + CONSUMER_KEY}),
        ("/plain/x?keep=1&api_key=%s" % CONSUMER_KEY, {"api-key": "other"}),
        ("/plain/x?api_key=%s" % CONSUMER_KEY, {}),
    ]
    for path, headers in sends:
        r = requests.post(url(rw, path), json=CHAT, headers=headers, timeout=5)
        assert r.status_code == 200, (path, r.text)
    got = mock.requests()
    assert len(got) == len(sends)
    for rec, (path, _) in zip(got, sends):
        assert rec.one("authorization") == "Bearer " + KEY_A
        assert not rec.all("x-api-key") and not rec.all("api-key"), rec.headers
        assert CONSUMER_KEY not in rec.raw(), rec.raw()
        assert "api_key" not in rec.target, rec.target
        if "keep=1" in path:
            assert rec.target.endswith("?keep=1"), rec.target
    assert got[-1].target == "/x", "an emptied query loses its '?'"
    # Without a key Ringway still answers 401 itself: nothing reaches the provider.
    r = requests.post(url(rw, "/v1/chat/completions"), json=CHAT, timeout=5)
    assert r.status_code == 401 and len(mock.requests()) == len(sends)
    assert_no_secret(*everything_visible(rw))


def test_key_auth_without_credentials_removes_only_the_consumer_key(ringway_fn, mock):
    rw = start(ringway_fn, [up("plain", mock)],
               [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "plain", "filters": ["auth"]}],
               filters=[AUTH])
    r = requests.post(url(rw, "/a"), json=CHAT, headers={"x-api-key": CONSUMER_KEY,
                                                         "authorization": "Basic dXNlcjpwYXNz"}, timeout=5)
    assert r.status_code == 200
    r = requests.post(url(rw, "/b?api_key=" + CONSUMER_KEY), json=CHAT,
                      headers={"api-key": "forwarded-as-is"}, timeout=5)
    assert r.status_code == 200, r.text
    a, b = mock.requests()
    assert a.one("authorization") == "Basic dXNlcjpwYXNz" and not a.all("x-api-key")
    assert CONSUMER_KEY not in a.raw() and CONSUMER_KEY not in b.raw()
    assert b.target == "/b" and b.one("api-key") == "forwarded-as-is"


def test_anthropic_azure_and_header_kinds(ringway_fn, mock):
    rw = start(ringway_fn,
               [up("anthropic", mock, credentials=creds("anthropic", "RW_TEST_KEY_ANT")),
                up("azure", mock, credentials=creds("azure", "RW_TEST_KEY_AZ")),
                up("gemini", mock, credentials=creds("header", "RW_TEST_KEY_GOOG", name="x-goog-api-key"))],
               [{"name": "ant", "match": {"path_prefix": "/v1/messages"}, "upstream": "anthropic",
                 "filters": ["auth", "stats"]},
                {"name": "az", "match": {"path_prefix": "/openai/"}, "upstream": "azure",
                 "filters": ["auth", "stats"]},
                {"name": "goog", "match": {"path_prefix": "/v1beta/"}, "upstream": "gemini", "filters": ["auth"]}])
    msg = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    h = {"x-api-key": CONSUMER_KEY}
    assert requests.post(url(rw, "/v1/messages"), json=msg, headers=h, timeout=5).status_code == 200
    assert requests.post(url(rw, "/v1/messages"), json=msg, timeout=5,
                         headers={"authorization": "Bearer " + CONSUMER_KEY,
                                  "anthropic-version": "2024-10-22"}).status_code == 200
    assert requests.post(url(rw, "/openai/deployments/d/chat/completions?api-version=2024-06-01"),
                         json=CHAT, headers=dict(h, **{"api-key": "client"}), timeout=5).status_code == 200
    assert requests.post(url(rw, "/v1beta/models/g:generateContent"), json={},
                         headers=dict(h, **{"x-goog-api-key": "client"}), timeout=5).status_code == 200
    ant1, ant2, az, goog = mock.requests()
    assert ant1.one("x-api-key") == KEY_ANT and ant1.one("anthropic-version") == "2023-06-01"
    assert not ant1.all("authorization")
    assert ant2.one("x-api-key") == KEY_ANT and ant2.one("anthropic-version") == "2024-10-22", \
        "the client's anthropic-version is kept, not doubled"
    assert az.one("api-key") == KEY_AZ and not az.all("authorization") and not az.all("x-api-key")
    assert az.target.endswith("?api-version=2024-06-01")
    assert goog.one("x-goog-api-key") == KEY_GOOG and not goog.all("x-api-key")
    for rec in (ant1, ant2, az, goog):
        assert CONSUMER_KEY not in rec.raw()
    assert_no_secret(*everything_visible(rw))


# ---------------------------------------------------------------- 2. secrets never shown
def test_check_and_start_refuse_a_missing_key_naming_only_the_source(ringway_fn, mock, tmp_path):
    port = free_port()
    text = make_config(port, [up("openai", mock, credentials={
        "kind": "bearer", "keys": [{"env": "RW_TEST_KEY_A"}, {"env": "RW_TEST_UNSET_VAR"},
                                   {"file": str(tmp_path / "missing-key-file")}]})],
        [{"name": "r", "upstream": "openai"}])
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    env = dict(os.environ, **ENV)
    env.pop("RW_TEST_UNSET_VAR", None)
    out = subprocess.run([ringway_bin(), "check", "--conf", str(conf)], capture_output=True, text=True,
                         env=env, timeout=20)
    both = out.stdout + out.stderr
    assert out.returncode != 0, both
    assert "upstreams[0].credentials.keys[1].env" in both and "RW_TEST_UNSET_VAR" in both, both
    assert "upstreams[0].credentials.keys[2].file" in both and "missing-key-file" in both, both
    line = [i + 1 for i, l in enumerate(text.splitlines()) if "credentials" in l][0]
    assert "c.toml:%d:" % line in both, both
    assert_no_secret(both)
    start_out = subprocess.run([ringway_bin(), "--conf", str(conf)], capture_output=True, text=True,
                               env=env, timeout=20)
    assert start_out.returncode != 0 and "RW_TEST_UNSET_VAR" in start_out.stderr + start_out.stdout
    assert_no_secret(start_out.stdout + start_out.stderr)
    # A good file passes check, which prints no key.
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY_B + "\n")
    conf.write_text(make_config(port, [up("openai", mock, credentials={
        "kind": "bearer", "keys": [{"env": "RW_TEST_KEY_A"}, {"file": str(keyfile), "weight": 2}]})],
        [{"name": "r", "upstream": "openai"}]))
    out = subprocess.run([ringway_bin(), "check", "--conf", str(conf)], capture_output=True, text=True,
                         env=env, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    assert_no_secret(out.stdout + out.stderr)


def test_reload_with_an_unreadable_key_file_is_refused_and_the_old_key_kept(ringway_fn, mock, tmp_path):
    keyfile = tmp_path / "openai_key"
    keyfile.write_text(KEY_B + "  \n")
    rw = start(ringway_fn, [up("openai", mock, credentials={"kind": "bearer", "keys": [{"file": str(keyfile)}]})],
               [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "openai"}], filters=[])
    assert requests.get(url(rw, "/a"), timeout=5).status_code == 200
    keyfile.unlink()
    rw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "openai_key" in rw.log_path.read_text(errors="replace"), 5, what="reload refusal logged")
    assert requests.get(url(rw, "/b"), timeout=5).status_code == 200
    assert [r.one("authorization") for r in mock.requests()] == ["Bearer " + KEY_B] * 2
    assert_no_secret(*everything_visible(rw))


# ---------------------------------------------------------------- 3. key pools
def _use(mock):
    return [KEY_A if r.key() == KEY_A else KEY_B if r.key() == KEY_B else r.key() for r in mock.requests()]


def test_a_key_answered_429_cools_and_is_not_chosen(ringway_fn, mock):
    rw = start(ringway_fn, [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A", "RW_TEST_KEY_B"))],
               [{"name": "ai", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                 "filters": ["auth", "stats"]}])
    h = {"authorization": "Bearer " + CONSUMER_KEY}
    mock.refuse[KEY_B] = (429, [("retry-after", "6")])
    # The request that meets key B's 429 is sent again at once with key A: the client never
    # sees the refusal.
    for _ in range(40):
        r = requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=h, timeout=5)
        assert r.status_code == 200, r.text
        if KEY_B in _use(mock):
            break
    assert _use(mock)[-2:] == [KEY_B, KEY_A], "key B was never chosen in 40 requests, or not " \
        "retried with key A: %r" % _use(mock)
    assert metric(rw, "ringway_upstream_key_cooling", upstream="openai", key="1") == 1
    assert metric(rw, "ringway_upstream_attempts_total", upstream="openai", outcome="status_429") == 1
    cooled_at = time.monotonic()
    mock.log.clear()
    for _ in range(100):
        assert requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=h,
                             timeout=5).status_code == 200
    assert time.monotonic() - cooled_at < 6, "too slow to prove anything about a 6 s cooldown"
    assert set(_use(mock)) == {KEY_A}, "the cooling key was used"
    # After the cooldown the key is chosen again.
    del mock.refuse[KEY_B]
    time.sleep(max(0.0, 6.2 - (time.monotonic() - cooled_at)))
    assert metric(rw, "ringway_upstream_key_cooling", upstream="openai", key="1") == 0
    mock.log.clear()
    for _ in range(40):
        requests.post(url(rw, "/v1/chat/completions"), json=CHAT, headers=h, timeout=5)
    assert KEY_B in _use(mock)
    assert metric(rw, "ringway_upstream_key_responses_total", upstream="openai", key="1", **{"class": "4xx"}) == 1
    assert metric(rw, "ringway_upstream_key_requests_total", upstream="openai") == \
        metric(rw, "ringway_upstream_key_responses_total", upstream="openai")
    assert_no_secret(*everything_visible(rw))


def test_reset_headers_cool_a_key_on_a_plain_route(ringway_fn, mock):
    rw = start(ringway_fn, [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A", "RW_TEST_KEY_B",
                                                                 weights=[1, 5]))],
               [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "openai"}], filters=[])
    mock.refuse[KEY_B] = (429, [("x-ratelimit-reset-requests", "20ms"), ("x-ratelimit-reset-tokens", "1m0s")])
    for _ in range(30):
        if requests.get(url(rw, "/x"), timeout=5).status_code == 429:
            break
    mock.log.clear()
    for _ in range(60):
        assert requests.get(url(rw, "/x"), timeout=5).status_code == 200
    assert set(_use(mock)) == {KEY_A}, "the longer reset (1m0s) holds the key"


def test_all_keys_cooling_uses_the_one_that_recovers_first(ringway_fn, mock):
    rw = start(ringway_fn, [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A", "RW_TEST_KEY_B"))],
               [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "openai"}], filters=[])
    mock.refuse[KEY_A] = (429, [("retry-after", "30")])
    mock.refuse[KEY_B] = (429, [("retry-after", "60")])
    for _ in range(40):
        requests.get(url(rw, "/x"), timeout=5)
        if {KEY_A, KEY_B} <= set(_use(mock)):
            break
    mock.log.clear()
    for _ in range(10):
        assert requests.get(url(rw, "/x"), timeout=5).status_code == 429
    assert set(_use(mock)) == {KEY_A}


def test_a_key_answered_401_is_removed_until_reload(ringway_fn, mock):
    rw = start(ringway_fn, [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A", "RW_TEST_KEY_B"))],
               [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "openai"}], filters=[])
    mock.refuse[KEY_B] = (401, [])
    for _ in range(40):
        if requests.get(url(rw, "/x"), timeout=5).status_code == 401:
            break
    assert KEY_B in _use(mock)
    wait_until(lambda: "key 1 was answered 401" in rw.log_path.read_text(errors="replace"), 3,
               what="the removal logged by position")
    mock.log.clear()
    for _ in range(50):
        assert requests.get(url(rw, "/x"), timeout=5).status_code == 200
    assert set(_use(mock)) == {KEY_A}
    assert metric(rw, "ringway_upstream_key_disabled", upstream="openai", key="1") == 1
    # Key A refused too: every key is out, Ringway answers 503 itself.
    mock.refuse[KEY_A] = (403, [])
    requests.get(url(rw, "/x"), timeout=5)
    r = requests.get(url(rw, "/x"), timeout=5)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_upstream_key", r.text
    # A reload puts both keys back.
    mock.refuse.clear()
    rw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: metric(rw, "ringway_upstream_key_disabled", upstream="openai") == 0, 5,
               what="keys back after reload")
    mock.log.clear()
    for _ in range(40):
        assert requests.get(url(rw, "/x"), timeout=5).status_code == 200
    assert set(_use(mock)) == {KEY_A, KEY_B}
    assert_no_secret(*everything_visible(rw))


def test_weights_share_requests(ringway_fn, mock):
    rw = start(ringway_fn, [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A", "RW_TEST_KEY_B",
                                                                 weights=[1, 3]))],
               [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "openai"}], filters=[])
    for _ in range(400):
        requests.get(url(rw, "/x"), timeout=5)
    use = _use(mock)
    assert 50 <= use.count(KEY_A) <= 150, use.count(KEY_A)
    assert metric(rw, "ringway_upstream_key_requests_total", upstream="openai", key="1") == use.count(KEY_B)


# ---------------------------------------------------------------- 4. header rules, model_map
def test_header_rules_on_a_plain_and_an_ai_route(ringway_fn, mock):
    rules = {"request_headers": {"set": {"X-Tenant": "acme"}, "remove": ["x-debug"]},
             "response_headers": {"set": {"x-served-by": "ringway"}, "remove": ["OpenAI-Organization"]}}
    rw = start(ringway_fn, [up("openai", mock)],
               [dict({"name": "plain", "match": {"path_prefix": "/plain/"}, "upstream": "openai"}, **rules),
                dict({"name": "ai", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                      "filters": ["stats"]}, **rules)], filters=[STATS])
    for path in ("/plain/x", "/v1/chat/completions"):
        conn_headers = [("X-Tenant", "evil"), ("x-tenant", "evil2"), ("X-Debug", "1"), ("x-keep", "1")]
        s = requests.Session()
        req = requests.Request("POST", url(rw, path), json=CHAT)
        p = s.prepare_request(req)
        for k, v in conn_headers:
            p.headers[k] = v  # requests folds duplicates; the second name differs only in case
        r = s.send(p, timeout=5)
        assert r.status_code == 200
        assert r.headers.get("x-served-by") == "ringway", r.headers
        assert "openai-organization" not in r.headers
        rec = mock.requests()[-1]
        assert rec.one("x-tenant") == "acme" and not rec.all("x-debug") and rec.one("x-keep") == "1"


def test_upstream_model_map_after_the_routes(ringway_fn, mock):
    rw = start(ringway_fn, [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A"),
                               model_map={"gpt-4o": "gpt-4o-2024-08-06"}),
                            up("other", mock, credentials=creds("azure", "RW_TEST_KEY_AZ"),
                               model_map={"claude-*": "claude-3-5-sonnet-20241022"})],
               [{"name": "ai", "match": {"path_prefix": "/v1/"}, "upstream": "openai", "filters": ["auth"],
                 "model_map": {"gpt-4o-mini": "gpt-4o"}, "models": {"claude-*": "other", "*": "openai"}}],
               filters=[AUTH])
    h = {"authorization": "Bearer " + CONSUMER_KEY}
    for model in ("gpt-4o-mini", "gpt-4o", "gpt-3.5", "claude-x"):
        r = requests.post(url(rw, "/v1/chat/completions"), json=dict(CHAT, model=model), headers=h, timeout=5)
        assert r.status_code == 200, r.text
    got = mock.requests()
    assert [json.loads(r.body)["model"] for r in got] == \
        ["gpt-4o-2024-08-06", "gpt-4o-2024-08-06", "gpt-3.5", "claude-3-5-sonnet-20241022"]
    # The request routed by model to "other" carries other's key, not the route upstream's.
    assert got[3].one("api-key") == KEY_AZ and not got[3].all("authorization")
    assert got[0].one("authorization") == "Bearer " + KEY_A and not got[0].all("api-key")


# ---------------------------------------------------------------- 5. official SDKs
def test_openai_and_anthropic_sdks_through_credentials(ringway_fn, mock):
    rw = start(ringway_fn,
               [up("openai", mock, credentials=creds("bearer", "RW_TEST_KEY_A")),
                up("anthropic", mock, credentials=creds("anthropic", "RW_TEST_KEY_ANT"))],
               [{"name": "ant", "match": {"path_prefix": "/v1/messages"}, "upstream": "anthropic",
                 "filters": ["auth", "stats"]},
                {"name": "ai", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                 "filters": ["auth", "stats"]}])
    client = OpenAI(base_url=url(rw, "/v1"), api_key=CONSUMER_KEY, max_retries=0)
    r = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "hello there"
    stream = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello there"
    ant = Anthropic(base_url=url(rw, ""), api_key=CONSUMER_KEY, max_retries=0)
    m = ant.messages.create(model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text == "hello there"
    o1, o2, a = mock.requests()
    for rec in (o1, o2):
        assert rec.one("authorization") == "Bearer " + KEY_A and not rec.all("x-api-key")
    assert a.one("x-api-key") == KEY_ANT and len(a.all("anthropic-version")) == 1
    assert not a.all("authorization")
    for rec in (o1, o2, a):
        assert CONSUMER_KEY not in rec.raw()
    assert_no_secret(*everything_visible(rw))
