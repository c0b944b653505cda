"""Spend budgets (cost-limit): [[prices]] in dollars per million tokens, money counted in integer
micro-dollars, a budget reserved before forwarding at the request's maximum cost and settled at
the real usage (cached and cache-write tokens at their own prices), so concurrency overshoots a
budget by at most one reservation; 429 insufficient_quota/budget_exceeded once it is spent;
x-ratelimit-*-usd headers; GET /usage; unpriced models refused or counted at 0. Local scope,
3 processes sharing one Redis, and a 3-master Redis Cluster. A recording mock provider
(provider_mock.py) reports known usage; the official SDKs are the clients.
"""

import json
import subprocess
import threading
import time
import urllib.request

import pytest
from anthropic import Anthropic
from openai import OpenAI, RateLimitError

from conftest import Ringway, _toml_value, make_config, ringway_bin
from helpers import free_port
from provider_mock import MockProvider
from redis_procs import redis_cluster, redis_server  # noqa: F401  (fixtures)

KEYS = {"alice": "sk-alice-budget", "bob": "sk-bob-budget", "carol": "sk-carol-budget"}
CONSUMERS = [{"name": n, "keys": [k]} for n, k in KEYS.items()]
PRICES = [
    {"model": "gpt-4o*", "input": 2.50, "output": 10.00, "cached_input": 1.25},
    {"model": "claude-*", "input": 3.00, "output": 15.00, "cached_input": 0.30, "cache_write": 3.75},
]
# What the mock reports for one chat request, and its price at gpt-4o*:
# (120 - 40) x 2.5 + 40 x 1.25 + 50 x 10 = 200 + 50 + 500 = 750 micro-dollars.
PROMPT, CACHED, COMPLETION = 120, 40, 50
CHAT_COST = 750
# A prompt of about PROMPT tokens by Ringway's estimate (4 characters a token), so the
# reservation (estimate x input price + max_tokens x output price) covers the real cost.
MESSAGES = [{"role": "user", "content": "budget " * 64}]
MAX_TOKENS = 60


def budget(name="budget", scope="local", rules=None, **kw):
    d = {"name": name, "kind": "cost-limit", "scope": scope, "key": "consumer",
         "rules": rules or [{"match": "*", "usd_per_minute": 0.01}]}
    d.update(kw)
    return d


def tables(header, items):
    out = []
    for d in items:
        out += ["", "[[%s]]" % header] + ["%s = %s" % (k, _toml_value(v)) for k, v in d.items()]
    return out


def start(factory, mock, filters, routes=None, redis=None, name="rw", prices=PRICES):
    port, admin = free_port(), free_port()
    ups = [{"name": "openai", "endpoints": [mock.addr], "response_timeout": "5s"}]
    routes = routes or [{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                         "filters": ["auth"] + [f["name"] for f in filters] + ["stats"]}]
    text = make_config(port, ups, routes, admin=admin)
    extra = []
    if redis:
        extra += ["", "[redis]"] + ["%s = %s" % (k, _toml_value(v)) for k, v in redis.items()]
    extra += tables("consumers", CONSUMERS)
    extra += tables("filters", [{"name": "auth", "kind": "key-auth"}, {"name": "stats", "kind": "ai-stats"}]
                    + list(filters))
    extra += tables("prices", prices)
    rw = Ringway(text + "\n".join(extra) + "\n", factory.tmpdir / name, name=name, port=port)
    rw.admin_port = admin
    factory.instances.append(rw)
    return rw.start()


def sdk(rw, who):
    return OpenAI(base_url="http://127.0.0.1:%d/v1" % rw.port, api_key=KEYS[who], max_retries=0, timeout=10)


def usage(rw, **q):
    qs = "&".join("%s=%s" % kv for kv in q.items())
    with urllib.request.urlopen("http://127.0.0.1:%d/usage?%s" % (rw.admin_port, qs), timeout=5) as r:
        return json.loads(r.read())


def key_row(doc, filt, key, window="minute"):
    for f in doc["filters"]:
        if f["filter"] == filt:
            for k in f["keys"]:
                if k["key"] == key and k["window"] == window:
                    return k
    return None


def metric(rw, name, **labels):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % rw.admin_port, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all('%s="%s"' % kv in line for kv in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_minute_room(seconds=25):
    """Waits until at least `seconds` remain in the current UTC minute (the budget's window)."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.2)


def stream_once(rw, who):
    """One streamed chat through the SDK: ('ok', text) or ('429', error body)."""
    try:
        text = "".join(c.choices[0].delta.content or "" for c in sdk(rw, who).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True) if c.choices)
        return ("ok", text)
    except RateLimitError as e:
        return ("429", (e.body, e.response.headers))


def burst(rws, who, n):
    """n streamed requests at once, spread over the given gateways."""
    out = [None] * n
    go = threading.Barrier(n)

    def one(i):
        go.wait()
        out[i] = stream_once(rws[i % len(rws)], who)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def reservation(rw, who):
    """The reservation of one chat request, read from a fresh key's remaining-usd header."""
    raw = sdk(rw, who).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert raw.headers["x-ratelimit-limit-usd"] == "0.010000", raw.headers
    left = float(raw.headers["x-ratelimit-remaining-usd"])
    return round((0.01 - left) * 1e6)


@pytest.fixture
def mock():
    m = MockProvider(usage=(PROMPT, COMPLETION))
    m.cached = CACHED
    yield m
    m.stop()


def replica_rows(rws, filt, key, spend):
    """/usage of `key` on every replica, once they agree on `spend` (the Redis thread writes
    usage in batches, a flush interval after the request settles), or as last seen."""
    deadline = time.monotonic() + 3
    while True:
        rows = [key_row(usage(rw, filter=filt, key=key), filt, key) for rw in rws]
        if all(r is not None and r["spend_micro_usd"] == spend for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def check_burst_and_spend(rws, mock, admitted_before=0):
    """The acceptance check of one budget over `rws`: 50 concurrent streams by alice, then
    requests until one is refused. Returns alice's spend."""
    results = burst(rws, "alice", 50)
    assert all(r is not None for r in results), "a request did not finish"
    served = sum(1 for r in results if r[0] == "ok")
    refused = [r[1] for r in results if r[0] == "429"]
    assert served >= 1 and served + len(refused) == 50, results
    assert all(r[1] == "hello there" for r in results if r[0] == "ok")
    # Until one is refused: what room the burst's settled requests left is used up.
    for _ in range(20):
        kind, detail = stream_once(rws[0], "alice")
        if kind == "429":
            refused.append(detail)
            break
        served += 1
    else:
        pytest.fail("no request was refused after the burst")
    body, headers = refused[-1]
    err = body.get("error", body) if isinstance(body, dict) else {}
    assert err.get("type") == "insufficient_quota" and err.get("code") == "budget_exceeded", body
    assert 1 <= int(headers["retry-after"]) <= 60, headers
    assert "x-ratelimit-remaining-usd" in headers
    return served


def test_a_budget_holds_under_50_concurrent_streams_and_spend_is_exact(ringway_fn, mock):
    wait_minute_room()
    rw = start(ringway_fn, mock, [budget()])
    r = reservation(rw, "bob")
    assert r >= CHAT_COST, "the reservation %d must cover the real cost %d" % (r, CHAT_COST)
    mock.reset()
    served = check_burst_and_spend([rw], mock)
    assert len(mock.requests()) == served, "requests the provider served"
    spend = served * CHAT_COST
    assert spend <= 10_000 + r, "admitted spend %d over the budget by more than one reservation %d" % (spend, r)
    row = key_row(usage(rw, filter="budget", key="alice"), "budget", "alice")
    assert row is not None
    assert (row["requests"], row["input_tokens"], row["output_tokens"], row["cached_tokens"]) == \
        (served, served * PROMPT, served * COMPLETION, served * CACHED), row
    assert row["spend_micro_usd"] == spend, row
    assert row["limit_micro_usd"] == 10_000 and row["remaining_micro_usd"] == max(0, 10_000 - spend)
    assert row["estimated"] is False
    assert row["window_start"].endswith(":00Z")
    # The metrics agree, to the micro-dollar.
    assert round(metric(rw, "ringway_ai_cost_usd_total", consumer="alice") * 1e6) == spend
    assert round(metric(rw, "ringway_budget_spend_usd", filter="budget", key="alice", window="minute") * 1e6) == spend
    # /usage without a key lists bob too.
    everyone = usage(rw)
    assert key_row(everyone, "budget", "bob")["requests"] == 1


def test_anthropic_cache_reads_and_writes_are_priced_exactly(ringway_fn, mock):
    # input_tokens 25, cache read 2000, cache write 100, output 15 at claude-* prices:
    # 25 x 3 + 2000 x 0.30 + 100 x 3.75 + 15 x 15 = 75 + 600 + 375 + 225 = 1275 micro-dollars.
    mock.usage, mock.cached, mock.cache_write = (25 + 2000 + 100, 15), 2000, 100
    rw = start(ringway_fn, mock, [budget(rules=[{"match": "*", "usd_per_day": 5.0, "usd_per_month": 100}])])
    an = Anthropic(base_url="http://127.0.0.1:%d" % rw.port, api_key=KEYS["carol"], max_retries=0, timeout=10)
    for _ in range(3):
        m = an.messages.create(model="claude-3-5-sonnet", max_tokens=20,
                               messages=[{"role": "user", "content": "hi"}])
        assert m.usage.cache_read_input_tokens == 2000
    doc = usage(rw, filter="budget", key="carol")
    for window in ("day", "month"):
        row = key_row(doc, "budget", "carol", window)
        assert row["spend_micro_usd"] == 3 * 1275, row
        assert row["cached_tokens"] == 3 * 2000
    month = key_row(doc, "budget", "carol", "month")
    assert month["window_start"][8:] == "01T00:00:00Z", month
    assert month["limit_micro_usd"] == 100_000_000


def test_unpriced_models_are_refused_or_counted_at_zero(ringway_fn, mock):
    strict = budget("strict")
    lenient = budget("lenient", unpriced="allow")
    routes = [{"name": "strict", "match": {"path_prefix": "/v1/", "headers": {"x-lane": "strict"}},
               "upstream": "openai", "filters": ["auth", "strict", "stats"]},
              {"name": "lenient", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
               "filters": ["auth", "lenient", "stats"]}]
    rw = start(ringway_fn, mock, [strict, lenient], routes=routes)
    o = sdk(rw, "alice")
    with pytest.raises(Exception) as ex:
        o.chat.completions.create(model="llama-local", messages=MESSAGES, max_tokens=5,
                                  extra_headers={"x-lane": "strict"})
    assert getattr(ex.value, "status_code", None) == 400, ex.value
    assert ex.value.body["code"] == "model_not_priced", ex.value.body
    assert mock.requests() == [], "an unpriced request reached the provider"
    r = o.chat.completions.create(model="llama-local", messages=MESSAGES, max_tokens=5)
    assert r.choices[0].message.content == "hello there"
    # Counted at 0: no reservation, so the budget's ledger has no request either.
    assert key_row(usage(rw, filter="lenient", key="alice"), "lenient", "alice") is None
    assert len(mock.requests()) == 1
    assert metric(rw, "ringway_ai_cost_usd_total", route="lenient") == 0
    assert "no [[prices]] entry for model \"llama-local\"" in rw.log_path.read_text()


def test_a_budget_holds_across_3_replicas_sharing_one_redis(ringway_fn, mock, redis_server):
    wait_minute_room(30)
    redis = {"url": redis_server.url + "/0", "flush_interval": "5ms", "timeout": "500ms"}
    rws = [start(ringway_fn, mock, [budget(scope="cluster")], redis=redis, name="rw%d" % i) for i in range(3)]
    r = reservation(rws[0], "bob")
    mock.reset()
    served = check_burst_and_spend(rws, mock)
    spend = served * CHAT_COST
    assert len(mock.requests()) == served
    assert spend <= 10_000 + r, (spend, r)
    rows = replica_rows(rws, "budget", "alice", spend)
    assert rows[0] == rows[1] == rows[2], rows
    assert rows[0]["spend_micro_usd"] == spend and rows[0]["requests"] == served, rows[0]
    # The metrics of the three replicas add up to the same spend.
    assert round(sum(metric(rw, "ringway_ai_cost_usd_total", consumer="alice") for rw in rws) * 1e6) == spend


def test_a_budget_holds_through_a_redis_cluster(ringway_fn, mock, redis_cluster):
    wait_minute_room(30)
    redis = {"cluster_nodes": list(redis_cluster.urls), "flush_interval": "5ms", "timeout": "500ms"}
    rws = [start(ringway_fn, mock, [budget("cbudget", scope="cluster")], redis=redis, name="rwc%d" % i)
           for i in range(3)]
    r = reservation(rws[0], "bob")
    mock.reset()
    served = check_burst_and_spend(rws, mock)
    spend = served * CHAT_COST
    assert spend <= 10_000 + r, (spend, r)
    rows = replica_rows(rws, "cbudget", "alice", spend)
    assert rows[0] == rows[1] == rows[2] and rows[0]["spend_micro_usd"] == spend, rows
    listed = usage(rws[1])
    assert key_row(listed, "cbudget", "bob")["requests"] == 1


def test_check_validates_prices_and_warns_about_unpriced_models(tmp_path):
    base = make_config(8080, [{"name": "openai", "endpoints": ["127.0.0.1:9"]}],
                       [{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                         "models": {"claude-*": "openai", "gpt-4o*": "openai"}, "filters": ["budget"]}])
    ok = base + "\n".join(tables("filters", [budget()]) + tables("prices", PRICES[:1])) + "\n"
    p = tmp_path / "ok.toml"
    p.write_text(ok)
    r = subprocess.run([ringway_bin(), "check", "--conf", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "routes[0].models.\"claude-*\"" in r.stdout + r.stderr and "unpriced" in r.stdout + r.stderr
    # A negative price: refused, naming the key (the file parses, so the check itself runs).
    neg = base + "\n".join(tables("filters", [budget()]) + tables("prices", [
        {"model": "gpt-4o*", "input": -1.0, "output": 10.0}])) + "\n"
    p.write_text(neg)
    r = subprocess.run([ringway_bin(), "check", "--conf", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "prices[0].input" in r.stderr and "negative" in r.stderr, r.stderr
    # More than six decimals cannot be counted exactly: refused.
    fine = base + "\n".join(tables("filters", [budget()]) + tables("prices", [
        {"model": "gpt-4o*", "input": 0.0000001, "output": 10.0}])) + "\n"
    p.write_text(fine)
    r = subprocess.run([ringway_bin(), "check", "--conf", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "prices[0].input" in r.stderr and "decimals" in r.stderr, r.stderr
    # An unknown key is refused by name.
    unknown = base + "\n".join(tables("filters", [budget()]) + tables("prices", [
        {"model": "x", "input": 1, "output": 1, "color": 1}])) + "\n"
    p.write_text(unknown)
    r = subprocess.run([ringway_bin(), "check", "--conf", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "color" in r.stderr, r.stderr


def test_overhead_is_measured_on_every_route_and_server_timing_only_where_enabled(ringway_fn, mock):
    routes = [{"name": "plain", "match": {"path_prefix": "/v1/models"}, "upstream": "openai"},
              {"name": "ai", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
               "filters": ["auth", "budget", "stats"], "server_timing": True},
              {"name": "plain-timed", "match": {"path_prefix": "/timed/"}, "upstream": "openai",
               "server_timing": True, "strip_prefix": True}]
    rw = start(ringway_fn, mock, [budget(rules=[{"match": "*", "usd_per_day": 5.0}])], routes=routes)
    base = "http://127.0.0.1:%d" % rw.port
    with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
        assert r.headers.get("server-timing") is None
    raw = sdk(rw, "alice").chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS)
    st = raw.headers.get("server-timing")
    assert st and st.startswith("ringway;dur="), raw.headers
    assert 0 <= float(st.split("=", 1)[1]) < 1000
    with urllib.request.urlopen(base + "/timed/v1/models", timeout=5) as r:
        assert (r.headers.get("server-timing") or "").startswith("ringway;dur=")
    # A request is counted once its exchange ends, a moment after the client has the answer.
    deadline = time.monotonic() + 3
    counts = {}
    while time.monotonic() < deadline:
        counts = {r: metric(rw, "ringway_overhead_seconds_count", route=r) for r in ("plain", "ai", "plain-timed")}
        if all(v == 1 for v in counts.values()):
            break
        time.sleep(0.05)
    assert counts == {"plain": 1, "ai": 1, "plain-timed": 1}, counts
    for route in counts:
        assert metric(rw, "ringway_overhead_seconds_sum", route=route) > 0, route
