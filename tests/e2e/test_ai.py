"""AI traffic through Ringway: SSE usage accounting (OpenAI chat, Responses API, Anthropic),
include_usage injection and stripping, token limits (local and cluster), model routing and
model_map on 6 MB bodies, access-log and metric fields, estimation, time to first token.

The upstream is ai_upstream.py (raw sockets, deterministic replies, a /_log of what it received
and the usage it reported). Expected token sums are always computed from that log, never
hard-coded. Failure messages carry the ringway_ai_* lines of /metrics (or the names present,
when there are none) and the access-log lines, so a name mismatch is visible at once.
"""

import base64
import hashlib
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from anthropic import Anthropic
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from ai_upstream import AiUpstreamProc, words_text
from conftest import BUFFER_SIZE, WORKERS, Ringway, _toml_value, make_config
from helpers import RawConn, assert_json_error, free_port, request_bytes, wait_until

MiB = 1024 * 1024
PEAK_SLACK = 16 * MiB

CONSUMERS = [{"name": "alice", "keys": ["sk-alice"]},
             {"name": "bob", "keys": ["sk-bob"]},
             {"name": "carol", "keys": ["sk-carol"]}]
AUTH = {"name": "auth", "kind": "key-auth"}
STATS = {"name": "stats", "kind": "ai-stats"}
TPM_LIMIT = 1000
MAX_RESERVE = 400


def tpm_filter(limit=TPM_LIMIT, scope="local", max_reserve=MAX_RESERVE, per="tokens_per_minute", name="tpm"):
    f = {"name": name, "kind": "token-limit", "scope": scope, "key": "consumer",
         "rules": [{"match": "*", per: limit}]}
    if max_reserve is not None:
        f["max_reserve"] = max_reserve
    return f


def _tables(header, items):
    out = []
    for d in items:
        out += ["", "[[%s]]" % header]
        out += ["%s = %s" % (k, _toml_value(v)) for k, v in d.items()]
    return out


def ai_config(port, admin_port, upstreams, routes, filters, consumers=CONSUMERS, log=None, redis=None,
              server=None):
    text = make_config(port, upstreams, routes, server, admin=admin_port, log=log)
    extra = _tables("consumers", consumers) + _tables("filters", filters)
    if redis:
        extra += ["", "[redis]"] + ["%s = %s" % (k, _toml_value(v)) for k, v in redis.items()]
    return text + "\n".join(extra) + "\n"


def start_ai(factory, name, upstreams, routes, filters, **kw):
    """A ringway with consumers/filters (make_config knows neither); stopped by the factory."""
    port, admin_port = free_port(), free_port()
    text = ai_config(port, admin_port, upstreams, routes, filters, **kw)
    rw = Ringway(text, factory.tmpdir / name, name=name, port=port)
    rw.admin_port = admin_port
    factory.instances.append(rw)
    return rw.start()


def ups(name, u, **kw):
    d = {"name": name, "endpoints": [u.addr], "response_timeout": "10s"}
    d.update(kw)
    return d


# ---------------------------------------------------------------- metrics
def admin_get(admin_port, path):
    with RawConn(admin_port, timeout=5) as c:
        c.send(request_bytes("GET", path, host="127.0.0.1", headers=[("Connection", "close")]))
        return c.read_response()


def scrape(admin_port):
    r = admin_get(admin_port, "/metrics")
    assert r.status == 200, r
    text = r.body.decode()
    samples = []
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples.append((s.name, dict(s.labels), s.value))
    return samples, text


def msum(samples, name, **labels):
    return sum(v for n, l, v in samples
               if n == name and all(l.get(k) == str(x) for k, x in labels.items()))


def ai_text(text):
    """The ringway_ai_* lines of a /metrics text, or the metric names present when there are none."""
    lines = [ln for ln in text.splitlines() if "ringway_ai" in ln]
    if lines:
        return "ringway_ai_* lines of /metrics:\n  " + "\n  ".join(lines[:200])
    names = sorted({ln.split("{")[0].split(" ")[0] for ln in text.splitlines()
                    if ln and not ln.startswith("#")})
    return "NO ringway_ai_* line in /metrics; metric names present:\n  " + "\n  ".join(names)


TOK = "ringway_ai_tokens_total"
TTFT = "ringway_ai_time_to_first_token_seconds"


def expected_tokens(entries, route, consumer):
    """{(route, model, consumer, direction): sum} of what the upstream reported in entries."""
    exp = {}
    for e in entries:
        u = e.get("usage_reported")
        if not u:
            continue
        for d, k in (("input", "input"), ("output", "output")):
            key = (route, e["model"], consumer, d)
            exp[key] = exp.get(key, 0) + u[k]
    return exp


def wait_tokens(admin_port, expected, timeout=3.0):
    """Poll /metrics until every (route, model, consumer, direction) sum of TOK equals expected.

    Returns a list of mismatch messages (empty when all match) and the last metrics text."""
    deadline = time.monotonic() + timeout
    while True:
        samples, text = scrape(admin_port)
        bad = []
        for (route, model, consumer, direction), want in sorted(expected.items()):
            got = msum(samples, TOK, route=route, model=model, consumer=consumer, direction=direction)
            if got != want:
                bad.append("%s{route=%r,model=%r,consumer=%r,direction=%r} = %s, upstream reported %s"
                           % (TOK, route, model, consumer, direction, got, want))
        if not bad or time.monotonic() > deadline:
            return bad, text
        time.sleep(0.05)


class Checks:
    """Collects every failed check of a test, so one run reports all of them."""

    def __init__(self):
        self.errors = []

    def ok(self, cond, msg):
        if not cond:
            self.errors.append(msg)
        return bool(cond)

    def eq(self, got, want, what):
        return self.ok(got == want, "%s: got %r, want %r" % (what, _short(got), _short(want)))

    def done(self, *context):
        if self.errors:
            msg = "%d check(s) failed:\n- " % len(self.errors) + "\n- ".join(self.errors)
            for c in context:
                c = c() if callable(c) else c
                if c:
                    msg += "\n\n" + c
            raise AssertionError(msg)


def _short(v, n=600):
    s = repr(v)
    return v if len(s) <= n else s[:n] + "...(%d chars)" % len(s)


def first_diff(a, b):
    """Where two lists of chunks differ, in words."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return "first difference at #%d:\n    through ringway: %s\n    direct:          %s" % (
                i, json.dumps(x, ensure_ascii=False)[:700], json.dumps(y, ensure_ascii=False)[:700])
    if len(a) != len(b):
        longer, who = (a, "through ringway") if len(a) > len(b) else (b, "direct")
        return "%d chunks through ringway, %d direct; extra (%s): %s" % (
            len(a), len(b), who, json.dumps(longer[min(len(a), len(b)):], ensure_ascii=False)[:900])
    return "equal"


def new_tag(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:10])


# ---------------------------------------------------------------- access log
def read_log(path):
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for ln in text.splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            out.append({"_unparsed": ln})
    return out


def log_records(path, request_ids, timeout=3.0):
    """{request_id: record} for the given ids, waiting for them to appear (missing ones absent)."""
    want = set(request_ids)
    deadline = time.monotonic() + timeout
    while True:
        recs = {r.get("request_id"): r for r in read_log(path) if r.get("request_id") in want}
        if len(recs) == len(want) or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def log_tail(path, n=12):
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return "access log %s does not exist" % path
    return "last access-log lines (%s):\n  " % path + "\n  ".join(lines[-n:])


# ---------------------------------------------------------------- clients
def oai(port, key="sk-alice"):
    return OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key=key, max_retries=0, timeout=30)


def ant(port, key="sk-alice"):
    return Anthropic(base_url="http://127.0.0.1:%d" % port, api_key=key, max_retries=0, timeout=30)


def msgs(text):
    return [{"role": "system", "content": "be terse"}, {"role": "user", "content": text}]


def sse_events(raw):
    """[(event, data)] of an SSE byte stream (LF or CRLF lines)."""
    text = raw.decode("utf-8").replace("\r\n", "\n")
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        ev, data = None, []
        for ln in block.split("\n"):
            if ln.startswith("event:"):
                ev = ln[6:].strip()
            elif ln.startswith("data:"):
                data.append(ln[5:].lstrip(" "))
        out.append((ev, "\n".join(data)))
    return out


def fresh_window(min_left=25.0, window=60.0):
    """Clock-aligned windows: if fewer than min_left seconds remain in this one, wait for the next."""
    left = window - (time.time() % window)
    if left < min_left:
        time.sleep(left + 0.3)
    return int(time.time() // window)


# ================================================================ fixtures
@pytest.fixture(scope="module")
def gw(ringway_factory, ai_up, ai_up_b, tmp_path_factory):
    """One ringway for the SDK tests: /v1/messages -> "anthropic", other /v1/ -> "openai";
    auth, a token limit far above the traffic, ai-stats; an access log."""
    alog = tmp_path_factory.mktemp("ailog") / "access.log"
    rw = start_ai(ringway_factory, "gw",
                  upstreams=[ups("openai", ai_up), ups("anthropic", ai_up_b)],
                  routes=[{"name": "messages", "match": {"path_prefix": "/v1/messages"},
                           "upstream": "anthropic", "filters": ["auth", "tpm", "stats"]},
                          {"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "tpm", "stats"], "include_usage": True}],
                  filters=[AUTH, tpm_filter(10_000_000, max_reserve=None), STATS],
                  log={"access": str(alog)})
    rw.alog = alog
    return rw


MODES = {"normal": {}, "byte-at-a-time": {"x-test-byte-at-a-time": "1"}}


# ================================================================ a. SDKs: identical to direct, exact usage
@pytest.mark.parametrize("mode", list(MODES))
def test_openai_sdk_through_ringway_matches_direct_and_counts_exact_usage(gw, ai_up, mode):
    """openai SDK, chat stream (with and without include_usage), chat non-stream, Responses API
    stream and non-stream: what the SDK gets through ringway equals what it gets directly (the
    usage-only chunk Ringway asked for is not shown); the upstream got include_usage only on the
    streamed chat request that lacked it, every other body byte-identical; /metrics holds the exact
    sums the upstream reported."""
    ck = Checks()
    via, direct = oai(gw.port), OpenAI(base_url=ai_up.base + "/v1", api_key="x", max_retries=0, timeout=30)
    model = "gpt-4o-sdk-%s" % mode
    tag_v, tag_d = new_tag("oa-via"), new_tag("oa-direct")
    prompt = "Tell me a story about a gateway that counted tokens exactly, in %s mode." % mode

    def calls(client, tag):
        h = dict(MODES[mode], **{"x-test-tag": tag})
        out = {}
        s = client.chat.completions.create(model=model, messages=msgs(prompt), stream=True, max_tokens=12,
                                           extra_headers=h)
        out["chat stream"] = [c.model_dump() for c in s]
        s = client.chat.completions.create(model=model, messages=msgs(prompt + " twice"), stream=True,
                                           max_tokens=7, stream_options={"include_usage": True},
                                           extra_headers=h)
        out["chat stream include_usage"] = [c.model_dump() for c in s]
        out["chat"] = [client.chat.completions.create(model=model, messages=msgs(prompt + " once"),
                                                      max_tokens=5, extra_headers=h).model_dump()]
        s = client.responses.create(model=model, input=prompt + " (responses)", stream=True,
                                    max_output_tokens=6, extra_headers=h)
        out["responses stream"] = [e.model_dump() for e in s]
        out["responses"] = [client.responses.create(model=model, input=prompt + " (responses, plain)",
                                                    max_output_tokens=9, extra_headers=h).model_dump()]
        return out

    got, want = calls(via, tag_v), calls(direct, tag_d)
    for case in want:
        ck.ok(got[case] == want[case], "%s [%s]: what the SDK got through ringway differs from a direct "
              "connection: %s" % (case, mode, first_diff(got[case], want[case])))
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in got["chat stream"] if c["choices"])
    ck.eq(text, words_text(12), "chat stream [%s]: assembled text" % mode)
    usage_chunks = [c for c in got["chat stream"] if not c["choices"]]
    ck.ok(not usage_chunks, "chat stream without include_usage [%s]: the client saw the usage-only chunk "
          "Ringway asked for: %s" % (mode, usage_chunks))
    ck.ok(got["chat stream include_usage"] and got["chat stream include_usage"][-1]["usage"] is not None,
          "chat stream with include_usage [%s]: the client asked for usage and did not get it" % mode)

    ev = ai_up.wait_entries(tag_v, 5)
    de = ai_up.wait_entries(tag_d, 5)
    ck.eq(len(ev), 5, "upstream entries through ringway")
    for v, d in zip(ev, de):
        vb, db = json.loads(v["body"]), json.loads(d["body"])
        name = "%s %s stream=%s" % (v["path"], v["model"], v["stream"])
        if v["path"] == "/v1/chat/completions" and v["stream"] and "stream_options" not in db:
            ck.eq(vb.get("stream_options"), {"include_usage": True},
                  "%s: stream_options Ringway should add to a streamed chat request lacking it" % name)
            vb.pop("stream_options", None)
            ck.eq(vb, db, "%s: the rest of the body the upstream got" % name)
        else:
            ck.ok(v["body"] == d["body"], "%s: the upstream got a body different from the client's "
                  "(through ringway %r, direct %r)" % (name, v["body"][:300], d["body"][:300]))
        ck.eq(v["status"], 200, "%s: upstream status" % name)
    exp = expected_tokens(ev, "chat", "alice")
    bad, mtext = wait_tokens(gw.admin_port, exp)
    for b in bad:
        ck.ok(False, b)
    ck.done(lambda: ai_text(mtext))


@pytest.mark.parametrize("mode", list(MODES))
def test_anthropic_sdk_through_ringway_matches_direct_and_counts_exact_usage(gw, ai_up_b, mode):
    """anthropic SDK (x-api-key), messages stream and non-stream, and the SDK's stream helper:
    identical to a direct connection; the body reaches the upstream unchanged (no stream_options);
    input tokens come from message_start, output from message_delta (not message_start's
    placeholder 1, not their sum)."""
    ck = Checks()
    via, direct = ant(gw.port), Anthropic(base_url=ai_up_b.base, api_key="x", max_retries=0, timeout=30)
    model = "claude-sdk-%s" % mode
    tag_v, tag_d = new_tag("an-via"), new_tag("an-direct")
    prompt = "Summarise the data path of a gateway in a few words (%s)." % mode

    def calls(client, tag):
        h = dict(MODES[mode], **{"x-test-tag": tag})
        out = {}
        s = client.messages.create(model=model, max_tokens=11, messages=[{"role": "user", "content": prompt}],
                                   stream=True, extra_headers=h)
        out["stream"] = [e.model_dump() for e in s]
        out["plain"] = [client.messages.create(model=model, max_tokens=4, extra_headers=h,
                                               messages=[{"role": "user", "content": prompt + "!"}]).model_dump()]
        with client.messages.stream(model=model, max_tokens=6, extra_headers=h,
                                    messages=[{"role": "user", "content": prompt + "?"}]) as st:
            out["stream helper"] = [st.get_final_message().model_dump()]
        return out

    got, want = calls(via, tag_v), calls(direct, tag_d)
    for case in want:
        ck.ok(got[case] == want[case], "%s [%s]: through ringway differs from direct: %s"
              % (case, mode, first_diff(got[case], want[case])))
    text = "".join(e["delta"]["text"] for e in got["stream"] if e["type"] == "content_block_delta")
    ck.eq(text, words_text(11), "stream [%s]: assembled text" % mode)
    ev, de = ai_up_b.wait_entries(tag_v, 3), ai_up_b.wait_entries(tag_d, 3)
    ck.eq(len(ev), 3, "upstream entries through ringway")
    for v, d in zip(ev, de):
        ck.ok(v["body"] == d["body"], "%s stream=%s: the upstream got a different body through ringway "
              "(%r vs direct %r)" % (v["path"], v["stream"], v["body"][:300], d["body"][:300]))
        ck.eq(v["status"], 200, "upstream status of %s stream=%s" % (v["path"], v["stream"]))
    exp = expected_tokens(ev, "messages", "alice")
    bad, mtext = wait_tokens(gw.admin_port, exp)
    for b in bad:
        ck.ok(False, b)
    ck.done(lambda: ai_text(mtext))


RAW_MODES = {"normal": [], "byte-at-a-time": [("x-test-byte-at-a-time", "1")], "crlf": [("x-test-crlf", "1")],
             "crlf byte-at-a-time": [("x-test-crlf", "1"), ("x-test-byte-at-a-time", "1")]}


def _post_raw(port, path, doc, headers=()):
    body = json.dumps(doc).encode()
    with RawConn(port, timeout=30) as c:
        c.send(request_bytes("POST", path, host="127.0.0.1", body=body,
                             headers=[("Content-Type", "application/json"), ("Connection", "close")]
                             + list(headers)))
        return c.read_response()


def _chunk_view(events):
    """Parsed data of each SSE event, with "usage": null dropped (it is what include_usage adds)."""
    out = []
    for ev, data in events:
        if data == "[DONE]":
            out.append("[DONE]")
            continue
        d = json.loads(data)
        if isinstance(d, dict) and "usage" in d and d["usage"] is None:
            d = dict(d)
            del d["usage"]
        out.append(d)
    return out


@pytest.mark.parametrize("mode", list(RAW_MODES))
def test_raw_chat_stream_usage_chunk_removed_and_counted(gw, ai_up, mode):
    """Raw HTTP, a streamed chat request without stream_options, the upstream writing normally, one
    byte per write, with CRLF lines, or both: the client gets text/event-stream whose frames equal a
    direct connection's (ignoring `"usage": null`), ending in [DONE], without the usage-only chunk;
    /metrics counts exactly the usage the upstream put in that chunk."""
    ck = Checks()
    tag = new_tag("raw")
    model = "gpt-4o-raw-%s" % mode.replace(" ", "-")
    doc = {"model": model, "messages": msgs("raw %s stream please" % mode), "stream": True, "max_tokens": 17}
    hv = RAW_MODES[mode] + [("Authorization", "Bearer sk-alice"), ("x-test-tag", tag)]
    r = _post_raw(gw.port, "/v1/chat/completions", doc, hv)
    d = _post_raw(ai_up.port, "/v1/chat/completions", doc, RAW_MODES[mode])
    ck.eq(r.status, 200, "status through ringway (body %r)" % r.body[:300])
    ck.ok((r.get("content-type") or "").startswith("text/event-stream"),
          "content-type through ringway: %r" % r.get("content-type"))
    try:
        got = _chunk_view(sse_events(r.body))
    except ValueError as e:
        got = []
        ck.ok(False, "the stream through ringway does not parse as SSE of JSON (%s): %r" % (e, r.body[:500]))
    want = _chunk_view(sse_events(d.body))
    ck.ok(got == want, "SSE frames through ringway differ from direct: %s" % first_diff(got, want))
    try:
        raw = [json.loads(x) for _, x in sse_events(r.body) if x != "[DONE]"]
    except ValueError:
        raw = []
    ck.ok(not any(isinstance(c, dict) and "usage" in c for c in raw),
          "a frame through ringway still carries the usage field the client never asked for")
    ck.ok(got and got[-1] == "[DONE]", "the stream through ringway does not end in data: [DONE]")
    ck.ok(not any(isinstance(c, dict) and c.get("choices") == [] for c in got),
          "the client saw the usage-only chunk it never asked for")
    ent = ai_up.entries(tag)
    ck.eq(len(ent), 1, "upstream entries")
    if ent:
        ck.eq(ent[0]["include_usage"], True, "stream_options.include_usage in the body the upstream got")
        ck.ok(ent[0]["usage_reported"] is not None, "the upstream reported no usage (it was not asked for it)")
    bad, mtext = wait_tokens(gw.admin_port, expected_tokens(ent, "chat", "alice"))
    for b in bad:
        ck.ok(False, b)
    ck.done(lambda: ai_text(mtext))


def test_http10_client_gets_a_dechunked_reply_from_a_chunked_upstream(gw, ai_up):
    """An HTTP/1.0 client cannot read chunked framing: a non-streamed reply the upstream sends
    chunked reaches it as the bare JSON body, closed at the end, with its usage counted."""
    tag = new_tag("h10")
    doc = {"model": "gpt-4o-h10", "messages": msgs("an old client"), "max_tokens": 9}
    body = json.dumps(doc).encode()
    with RawConn(gw.port, timeout=30) as c:
        c.send(request_bytes("POST", "/v1/chat/completions", host="127.0.0.1", body=body,
                             version="HTTP/1.0",
                             headers=[("Content-Type", "application/json"),
                                      ("Authorization", "Bearer sk-alice"), ("x-test-tag", tag),
                                      ("x-test-byte-at-a-time", "1")]))
        r = c.read_response("POST")
    assert r.status == 200, r
    assert r.get("transfer-encoding") is None, r
    reply = json.loads(r.body)
    assert reply["object"] == "chat.completion", r.body[:300]
    ent = ai_up.entries(tag)
    assert len(ent) == 1 and ent[0]["usage_reported"], ent
    bad, mtext = wait_tokens(gw.admin_port, expected_tokens(ent, "chat", "alice"))
    assert not bad, (bad, ai_text(mtext))


def test_include_usage_false_leaves_stream_request_untouched(ringway_fn, ai_up):
    """A route with include_usage = false forwards the client's body as it is (no stream_options),
    and the stream the client gets is byte-identical to a direct connection's."""
    rw = start_ai(ringway_fn, "noinject", upstreams=[ups("openai", ai_up)],
                  routes=[{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "stats"], "include_usage": False}],
                  filters=[AUTH, STATS])
    tag = new_tag("noinj")
    doc = {"model": "gpt-4o-noinject", "messages": msgs("leave me alone"), "stream": True, "max_tokens": 9}
    r = _post_raw(rw.port, "/v1/chat/completions", doc, [("Authorization", "Bearer sk-alice"), ("x-test-tag", tag)])
    d = _post_raw(ai_up.port, "/v1/chat/completions", doc)
    assert r.status == 200, r
    ent = ai_up.entries(tag)
    assert len(ent) == 1 and ent[0]["body"] == json.dumps(doc), \
        "include_usage = false: the upstream got %r, the client sent %r" % (ent and ent[0]["body"], json.dumps(doc))
    assert r.body == d.body, "stream differs from direct:\n%r\n%r" % (r.body[:600], d.body[:600])


# ================================================================ b. token limit: 1000/min, stream=True
def _tpm_ringway(factory, name, ai_up, scope="local", redis=None):
    return start_ai(factory, name, upstreams=[ups("openai", ai_up)],
                    routes=[{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                             "filters": ["auth", "tpm", "stats"]}],
                    filters=[AUTH, tpm_filter(TPM_LIMIT, scope=scope), STATS], redis=redis)


def _stream_chat(port, key, tag, words=150, max_tokens=None, extra=None, timeout=30):
    """One streamed chat request with requests; returns (status, headers, body bytes)."""
    doc = {"model": "gpt-4o", "messages": msgs("count slowly to one hundred and fifty"), "stream": True}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    h = {"Authorization": "Bearer %s" % key, "x-test-tag": tag, "Content-Type": "application/json"}
    if words is not None:
        h["x-test-words"] = str(words)
    h.update(extra or {})
    with requests.post("http://127.0.0.1:%d/v1/chat/completions" % port, data=json.dumps(doc), headers=h,
                       stream=True, timeout=timeout) as r:
        body = b"".join(r.iter_content(65536))
        return r.status_code, {k.lower(): v for k, v in r.headers.items()}, body


RL_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")


def _check_429(ck, status, headers, body, what):
    ck.eq(status, 429, "%s: status" % what)
    try:
        doc = json.loads(body)
    except ValueError:
        ck.ok(False, "%s: 429 body is not JSON: %r" % (what, body[:300]))
        doc = {}
    err = doc.get("error") if isinstance(doc, dict) else None
    ck.ok(isinstance(err, dict) and err.get("type") == "rate_limit_exceeded",
          "%s: error.type is not rate_limit_exceeded: %r" % (what, doc))
    ck.ok("json" in headers.get("content-type", ""), "%s: 429 content-type %r" % (what, headers.get("content-type")))
    for h in RL_HEADERS + ("retry-after",):
        ck.ok(h in headers, "%s: header %s missing from the 429 (headers: %r)" % (what, h, headers))
    ck.eq(headers.get("x-ratelimit-limit-tokens"), str(TPM_LIMIT), "%s: x-ratelimit-limit-tokens" % what)
    rem = headers.get("x-ratelimit-remaining-tokens")
    ck.ok(rem is not None and rem.isdigit() and int(rem) <= TPM_LIMIT,
          "%s: x-ratelimit-remaining-tokens %r" % (what, rem))
    ra = headers.get("retry-after")
    ck.ok(ra is not None and ra.isdigit() and 1 <= int(ra) <= 61,
          "%s: retry-after %r is not whole seconds within the 60 s window" % (what, ra))


def _admitted_usage(entries):
    """Tokens of the requests that reached the upstream, as the upstream counts them (its usage,
    whether or not it was asked to report it)."""
    return sum(e["usage"]["input"] + e["usage"]["output"] for e in entries if e.get("usage"))


def test_token_limit_stream_1000_per_minute_then_429(ringway_fn, ai_up):
    """The seed's case: 1000 tokens per minute per consumer, stream=True, no max_tokens, the client
    not asking for usage. Requests of ~160 tokens go through until the window is spent, then 429
    in OpenAI's shape with the -tokens headers and retry-after. What was admitted (by the
    upstream's own usage) stays within 1000 + max_reserve and reaches at least 1000 - max_reserve;
    a 429 never reaches the upstream; another consumer is not affected."""
    rw = _tpm_ringway(ringway_fn, "tpm", ai_up)
    ck = Checks()
    tag = new_tag("tpm")
    win = fresh_window()
    allowed_headers, last = [], None
    for i in range(30):
        status, headers, body = _stream_chat(rw.port, "sk-alice", tag)
        if status == 200:
            allowed_headers.append(headers)
            ck.ok(b"data: [DONE]" in body, "allowed stream %d incomplete: %r" % (i, body[-200:]))
            continue
        last = (status, headers, body)
        break
    admitted = ai_up.entries(tag)
    used = _admitted_usage(admitted)
    if last is None:
        pytest.fail("no 429 after 30 streamed requests: the upstream reported %d tokens for them against a "
                    "limit of %d (stream usage never counted?)\n%s"
                    % (used, TPM_LIMIT, ai_text(scrape(rw.admin_port)[1])))
    _check_429(ck, *last, what="first limited request")
    unreported = [e["seq"] for e in admitted if e.get("usage_reported") is None]
    ck.ok(not unreported, "%d of %d admitted streams got no usage from the upstream: Ringway did not add "
          "stream_options.include_usage" % (len(unreported), len(admitted)))
    ck.eq(len(admitted), len(allowed_headers), "requests that reached the upstream vs 200s "
          "(a limited request must not reach it)")
    ck.ok(used <= TPM_LIMIT + MAX_RESERVE, "admitted %d tokens (%d requests) > limit %d + max_reserve %d"
          % (used, len(admitted), TPM_LIMIT, MAX_RESERVE))
    ck.ok(used >= TPM_LIMIT - MAX_RESERVE, "only %d tokens admitted (%d requests) before the first 429; "
          "limit %d, max_reserve %d" % (used, len(admitted), TPM_LIMIT, MAX_RESERVE))
    status, headers, body = _stream_chat(rw.port, "sk-alice", tag)
    _check_429(ck, status, headers, body, "a second limited request")
    status, headers, body = _stream_chat(rw.port, "sk-bob", new_tag("tpm-bob"), words=10)
    ck.eq(status, 200, "another consumer (bob) while alice is limited")
    if allowed_headers:
        h0 = allowed_headers[0]
        for h in RL_HEADERS:
            ck.ok(h in h0, "allowed response lacks %s (headers: %r)" % (h, h0))
        rems = [int(h["x-ratelimit-remaining-tokens"]) for h in allowed_headers
                if h.get("x-ratelimit-remaining-tokens", "").isdigit()]
        ck.ok(all(a >= b for a, b in zip(rems, rems[1:])),
              "x-ratelimit-remaining-tokens on allowed responses is not non-increasing: %r" % rems)
    print("tpm sequential: %d admitted, %d tokens (limit %d, max_reserve %d); 429 headers %r"
          % (len(admitted), used, TPM_LIMIT, MAX_RESERVE, {k: v for k, v in last[1].items()
                                                          if k.startswith(("x-ratelimit", "retry"))}))
    ck.eq(int(time.time() // 60), win, "the test ran within one clock-aligned minute")
    ck.done(lambda: "upstream usage of admitted requests: %r" % [e["usage_reported"] for e in admitted],
            lambda: ai_text(scrape(rw.admin_port)[1]))


def test_token_limit_concurrent_streams_overshoot_bounded(ringway_fn, ai_up):
    """16 streamed requests at once (max_tokens=120 each, the upstream holding its answer 300 ms so
    all are in flight together) against 1000 tokens/min: reserve-before-forward keeps what the
    upstream reports for the admitted ones within 1000 + max_reserve; the rest get 429."""
    rw = _tpm_ringway(ringway_fn, "tpmconc", ai_up)
    tag = new_tag("conc")
    fresh_window()
    n = 16
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        return _stream_chat(rw.port, "sk-carol", tag, words=None, max_tokens=120,
                            extra={"x-test-delay-ms": "300"})[0]

    with ThreadPoolExecutor(n) as ex:
        statuses = list(ex.map(one, range(n)))
    admitted = ai_up.entries(tag)
    used = _admitted_usage(admitted)
    print("tpm concurrent: %d of %d admitted, %d tokens (limit %d)" % (len(admitted), n, used, TPM_LIMIT))
    ck = Checks()
    ck.ok(set(statuses) <= {200, 429}, "statuses: %r" % statuses)
    ck.ok(statuses.count(429) >= 1, "no request was limited: %d admitted, %d tokens against %d"
          % (statuses.count(200), used, TPM_LIMIT))
    ck.ok(statuses.count(200) >= 1, "nothing admitted: %r" % statuses)
    ck.ok(used <= TPM_LIMIT + MAX_RESERVE, "concurrent overshoot: %d requests admitted, %d tokens > %d + %d"
          % (len(admitted), used, TPM_LIMIT, MAX_RESERVE))
    ck.eq(len(admitted), statuses.count(200), "requests that reached the upstream vs 200s")
    ck.done(lambda: ai_text(scrape(rw.admin_port)[1]))


def test_token_limit_cluster_scope_two_replicas(ringway_fn, ai_up, tmp_path):
    """scope = "cluster": two ringways sharing one Redis, 1000 tokens/min for alice, requests
    alternating between them: admitted usage stays within 1000 + max_reserve in total (not per
    replica), both replicas end up answering 429, and the counter lives in Redis under
    ringway:{...}."""
    from redis_procs import RedisServer
    red = RedisServer(tmp_path / "redis").start()
    try:
        redis = {"url": red.url, "flush_interval": "5ms", "timeout": "200ms"}
        r1 = _tpm_ringway(ringway_fn, "tpmc1", ai_up, scope="cluster", redis=redis)
        r2 = _tpm_ringway(ringway_fn, "tpmc2", ai_up, scope="cluster", redis=redis)
        ck = Checks()
        tag = new_tag("cl")
        win = fresh_window()
        limited = {}
        statuses = []
        for i in range(40):
            rw = (r1, r2)[i % 2]
            status, headers, body = _stream_chat(rw.port, "sk-alice", tag)
            statuses.append((rw.conf.stem, status))
            if status == 429:
                limited.setdefault(rw.conf.stem, (status, headers, body))
                if len(limited) == 2:
                    break
            else:
                ck.eq(status, 200, "replica %s request %d" % (rw.conf.stem, i))
        admitted = ai_up.entries(tag)
        used = _admitted_usage(admitted)
        ck.ok(len(limited) == 2, "not both replicas limited alice within 40 requests (%d tokens admitted): %r"
              % (used, statuses))
        for name, resp in limited.items():
            _check_429(ck, *resp, what="replica %s" % name)
        ck.ok(used <= TPM_LIMIT + MAX_RESERVE, "two replicas admitted %d tokens (%d requests) > %d + %d"
              % (used, len(admitted), TPM_LIMIT, MAX_RESERVE))
        # Same floor as the local test: sequential traffic, so at most one reservation is open at
        # a time; a cluster limit that is "exact" must not strand quota in unreturned reservations.
        ck.ok(used >= TPM_LIMIT - MAX_RESERVE, "both replicas limited alice after only %d tokens (%d requests); "
              "limit %d, max_reserve %d (unused reservations not returned to Redis?)"
              % (used, len(admitted), TPM_LIMIT, MAX_RESERVE))
        ck.ok(any(s == 200 for n, s in statuses if n == "tpmc2") and any(s == 200 for n, s in statuses if n == "tpmc1"),
              "a replica admitted nothing: %r" % statuses)
        print("tpm cluster: %d admitted, %d tokens; statuses %r; 429 headers %r"
              % (len(admitted), used, statuses, {n: {k: v for k, v in r[1].items() if k.startswith(("x-rate", "retry"))}
                                                 for n, r in limited.items()}))
        keys = red.keys("ringway:*")
        ck.ok(any(k.startswith("ringway:{") for k in keys), "no ringway:{filter:key}:<window> key in Redis: %r" % keys)
        ck.eq(int(time.time() // 60), win, "the test ran within one clock-aligned minute")
        ck.done(lambda: "statuses: %r" % statuses,
                lambda: "redis: %r" % {k: red.cmd("GET", k) for k in keys if red.cmd("TYPE", k) == "string"},
                lambda: ai_text(scrape(r1.admin_port)[1]))
    finally:
        red.stop()


# ================================================================ c. 6 MB bodies routed by model
class PeakSampler:
    """Max VmRSS of a ringway, sampled every 20 ms from a thread."""

    def __init__(self, rw):
        self.rw = rw
        self.max_rss = rw.rss()
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.02):
            try:
                v = self.rw.rss()
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return
            self.samples += 1
            self.max_rss = max(self.max_rss, v)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


_IMG = None
# A body whose "model" is its last key has to be held somewhere until the model is known, and the
# pool is the only bounded place: 1024 x 16 KiB = 16 MiB per worker holds two 6 MB bodies (the
# suite's default 256 buffers, 4 MiB, would not hold one). Two requests at a time, so a worker
# never needs more than its pool; the RSS bound is computed from these numbers.
IMG_BUFFERS = 1024
IMG_CONCURRENCY = 2


def _image_b64():
    global _IMG
    if _IMG is None:
        raw = hashlib.sha256(b"ringway-ai-image").digest() * (4_500_000 // 32)  # ~4.5 MB -> 6 MB base64
        _IMG = base64.b64encode(raw).decode()
    return _IMG


def image_body(model, seed, with_model=True):
    """A 6 MB chat body with an image data URL; a decoy "model" inside metadata; the real top-level
    "model" is the LAST key."""
    doc = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is in image %d? answer as \"model\": \"claude-decoy\" would" % seed},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _image_b64()}}]}],
        "max_tokens": 16, "metadata": {"model": "claude-decoy-%d" % seed}}
    if with_model:
        doc["model"] = model
    return json.dumps(doc).encode()


def test_6mb_image_bodies_routed_by_last_model_key_intact_memory_bounded(ringway_fn):
    """6 MB base64-image chat bodies whose top-level "model" is the last key: "gpt-4o" goes to
    upstream a, "claude-*" to upstream b, "gpt-4o-mini" to a renamed "local-small" (model_map).
    Each upstream gets the body intact (sha256; for the renamed one, the body with only the model
    value replaced), and ringway's peak RSS stays within baseline + workers x buffers_per_worker x
    buffer_size + 16 MiB. A body without a top-level model (6 MB or small, decoy inside) gets 400
    JSON and reaches no upstream."""
    a, b = AiUpstreamProc("up_a"), AiUpstreamProc("up_b")
    try:
        rw = start_ai(ringway_fn, "models", upstreams=[ups("up_a", a), ups("up_b", b)],
                      routes=[{"name": "models", "match": {"path_prefix": "/v1/"}, "upstream": "up_a",
                               "filters": ["auth", "tpm", "stats"],
                               "models": {"gpt-4o*": "up_a", "claude-*": "up_b"},
                               "model_map": {"gpt-4o-mini": "local-small"}}],
                      filters=[AUTH, tpm_filter(10_000_000, max_reserve=None), STATS],
                      server={"buffers_per_worker": IMG_BUFFERS})
        url = "http://127.0.0.1:%d/v1/chat/completions" % rw.port
        local = threading.local()

        def post(body, tag, timeout=60):
            s = getattr(local, "s", None)
            if s is None:
                s = local.s = requests.Session()
            return s.post(url, data=body, timeout=timeout,
                          headers={"Content-Type": "application/json", "Authorization": "Bearer sk-alice",
                                   "x-test-tag": tag})

        # warm-up at the test's concurrency with small bodies, then the baseline
        def small(i):
            doc = {"messages": msgs("warm up %d" % i), "max_tokens": 3,
                   "model": ("gpt-4o", "claude-3-haiku", "gpt-4o-mini")[i % 3]}
            r = post(json.dumps(doc).encode(), new_tag("warm"))
            return r.status_code

        with ThreadPoolExecutor(IMG_CONCURRENCY) as ex:
            warm = list(ex.map(small, range(30)))
        baseline = rw.rss()

        plan = []  # (model, upstream expected, body sent, body expected upstream, tag)
        for i in range(12):
            model = ("gpt-4o", "claude-3-5-sonnet", "gpt-4o-mini")[i % 3]
            body = image_body(model, i)
            exp = body
            if model == "gpt-4o-mini":
                tail = b'"model": "gpt-4o-mini"}'
                assert body.endswith(tail)
                exp = body[:-len(tail)] + b'"model": "local-small"}'
            plan.append((model, "up_b" if model.startswith("claude") else "up_a", body, exp, new_tag("img%d" % i)))
        assert all(len(p[2]) > 6_000_000 for p in plan)

        def send(p):
            r = post(p[2], p[4])
            return r.status_code, r.text[:300]

        with PeakSampler(rw) as sampler:
            with ThreadPoolExecutor(IMG_CONCURRENCY) as ex:
                results = list(ex.map(send, plan))
            missing_big = post(image_body(None, 99, with_model=False), "nomodel-big")
        peak = max(sampler.max_rss, rw.hwm())
        ck = Checks()
        ck.ok(all(s == 200 for s in warm), "warm-up statuses: %r" % warm)
        for (model, want_up, body, exp, tag), (status, text) in zip(plan, results):
            ck.eq(status, 200, "6 MB %s: status (body %r)" % (model, text))
            ea, eb = a.entries(tag), b.entries(tag)
            got = [("up_a", e) for e in ea] + [("up_b", e) for e in eb]
            if not ck.eq([g[0] for g in got], [want_up], "6 MB %s: upstream(s) that got it" % model):
                continue
            e = got[0][1]
            ck.eq(e["body_len"], len(exp), "6 MB %s: body length at the upstream" % model)
            ok = ck.ok(e["body_sha256"] == hashlib.sha256(exp).hexdigest(),
                       "6 MB %s: body at the upstream is not the client's%s (sha256 %s; the client's %s)"
                       % (model, " with only the model renamed" if exp is not body else "", e["body_sha256"],
                          hashlib.sha256(body).hexdigest()))
            if not ok and model == "gpt-4o-mini":
                ck.ok(e["body_sha256"] != hashlib.sha256(body).hexdigest(),
                      "6 MB gpt-4o-mini: the body reached the upstream unchanged (model_map not applied)")
            ck.eq(e["model"], "local-small" if model == "gpt-4o-mini" else model,
                  "6 MB %s: top-level model the upstream saw" % model)
        ck.eq(missing_big.status_code, 400, "6 MB body without a top-level model (decoy in metadata): status "
              "(body %r)" % missing_big.text[:300])
        try:
            missing_big.json()
        except ValueError as ex:
            ck.ok(False, "6 MB body without a top-level model: the error body is not JSON (%s): %r"
                  % (ex, missing_big.text[:300]))
        ck.eq(len(a.entries("nomodel-big")) + len(b.entries("nomodel-big")), 0,
              "upstream requests for the 6 MB model-less body")
        small_missing = _post_raw(rw.port, "/v1/chat/completions",
                                  {"messages": msgs("no model"), "metadata": {"model": "gpt-4o"}},
                                  [("Authorization", "Bearer sk-alice"), ("x-test-tag", "nomodel-small")])
        try:
            assert_json_error(small_missing, 400)
        except (AssertionError, ValueError) as ex:
            ck.ok(False, "small body without a top-level model: %s: %s; response %r"
                  % (type(ex).__name__, ex, small_missing))
        ck.eq(len(a.entries("nomodel-small")) + len(b.entries("nomodel-small")), 0,
              "upstream requests for the small model-less body")
        pool = WORKERS * IMG_BUFFERS * BUFFER_SIZE
        bound = baseline + pool + PEAK_SLACK
        ck.ok(sampler.samples > 0, "the RSS sampler took no samples")
        ck.ok(peak <= bound, "peak RSS %.1f MiB > baseline %.1f MiB + pool %.1f MiB + 16 MiB"
              % (peak / MiB, baseline / MiB, pool / MiB))
        print("model routing, 6 MB bodies: baseline %.1f MiB, peak %.1f MiB, bound %.1f MiB"
              % (baseline / MiB, peak / MiB, bound / MiB))
        ck.done()
    finally:
        a.stop()
        b.stop()


# ================================================================ d. access log + metrics fields
def test_access_log_and_metrics_carry_model_consumer_tokens(gw, ai_up, ai_up_b):
    """Requests of two consumers over chat (stream, stream+include_usage, plain), Responses stream
    and Anthropic (stream, plain): each access-log line has "model", "consumer" and
    "tokens": {"input", "output", "estimated": false} equal to what the upstream reported, and
    ringway_ai_tokens_total{route,model,consumer,direction} holds the same sums."""
    ck = Checks()
    sent = []  # (request id, route, consumer, upstream, tag)

    def rid_h(consumer, route):
        rid, tag = "ai-log-%s" % uuid.uuid4().hex[:12], new_tag("log")
        sent.append((rid, route, consumer, ai_up_b if route == "messages" else ai_up, tag))
        return {"x-request-id": rid, "x-test-tag": tag}

    for consumer, key in (("alice", "sk-alice"), ("bob", "sk-bob")):
        o, an = oai(gw.port, key), ant(gw.port, key)
        list(o.chat.completions.create(model="gpt-4o-log", messages=msgs("log me %s" % consumer), stream=True,
                                       max_tokens=13, extra_headers=rid_h(consumer, "chat")))
        list(o.chat.completions.create(model="gpt-4o-log", messages=msgs("log me too"), stream=True, max_tokens=3,
                                       stream_options={"include_usage": True}, extra_headers=rid_h(consumer, "chat")))
        o.chat.completions.create(model="gpt-4o-log", messages=msgs("plain"), max_tokens=21,
                                  extra_headers=rid_h(consumer, "chat"))
        list(o.responses.create(model="gpt-4o-log-resp", input="responses for %s" % consumer, stream=True,
                                max_output_tokens=8, extra_headers=rid_h(consumer, "chat")))
        list(an.messages.create(model="claude-log", max_tokens=10, stream=True, extra_headers=rid_h(consumer, "messages"),
                                messages=[{"role": "user", "content": "anthropic log %s" % consumer}]))
        an.messages.create(model="claude-log", max_tokens=2, extra_headers=rid_h(consumer, "messages"),
                           messages=[{"role": "user", "content": "anthropic plain"}])
    recs = log_records(gw.alog, [s[0] for s in sent])
    exp = {}
    for rid, route, consumer, up, tag in sent:
        ent = up.entries(tag)
        if not ck.eq(len(ent), 1, "upstream entries for %s" % rid):
            continue
        e = ent[0]
        ck.eq(e["request_id"], rid, "x-request-id the upstream got")
        for k, v in expected_tokens(ent, route, consumer).items():
            exp[k] = exp.get(k, 0) + v
        rec = recs.get(rid)
        if not ck.ok(rec is not None, "no access-log line with request_id %r" % rid):
            continue
        what = "access log %s (%s %s stream=%s)" % (rid, e["path"], e["model"], e["stream"])
        ck.eq(rec.get("model"), e["model"], what + ": model")
        ck.eq(rec.get("consumer"), consumer, what + ": consumer")
        ck.eq(rec.get("route"), route, what + ": route")
        t = rec.get("tokens")
        if not ck.ok(isinstance(t, dict), what + ": tokens is not an object: %r (line %r)" % (t, rec)):
            continue
        ck.eq(t.get("input"), e["usage_reported"]["input"], what + ": tokens.input")
        ck.eq(t.get("output"), e["usage_reported"]["output"], what + ": tokens.output")
        ck.eq(t.get("estimated"), False, what + ": tokens.estimated")
    bad, mtext = wait_tokens(gw.admin_port, exp)
    for b_ in bad:
        ck.ok(False, b_)
    ck.done(lambda: "access-log lines of these requests:\n  " + "\n  ".join(json.dumps(r) for r in recs.values()),
            lambda: log_tail(gw.alog), lambda: ai_text(mtext))


# ================================================================ e. no usage: estimated and marked
def test_upstream_without_usage_tokens_estimated_and_marked(ringway_fn, ai_up, ai_up_b, tmp_path):
    """The upstream never reports usage (x-test-no-usage): ringway estimates input and output
    tokens (> 0, output within a factor 4 of the reply's words), marks them estimated in the access
    log (tokens.estimated = true) and/or /metrics (estimated="true"), and charges them to the token
    limit (x-ratelimit-remaining-tokens goes down). A request with usage stays estimated=false."""
    alog = tmp_path / "access.log"
    rw = start_ai(ringway_fn, "estimate", upstreams=[ups("openai", ai_up), ups("anthropic", ai_up_b)],
                  routes=[{"name": "messages", "match": {"path_prefix": "/v1/messages"}, "upstream": "anthropic",
                           "filters": ["auth", "tpm", "stats"]},
                          {"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "tpm", "stats"]}],
                  filters=[AUTH, tpm_filter(1_000_000, per="tokens_per_hour", max_reserve=None), STATS],
                  log={"access": str(alog)})
    ck = Checks()
    hour_left = 3600 - time.time() % 3600
    words = 40
    nu = {"x-test-no-usage": "1"}
    o, an = oai(rw.port), ant(rw.port)
    ctrl = o.chat.completions.with_raw_response.create(model="gpt-4o-est-control", messages=msgs("control"),
                                                       max_tokens=5, extra_headers={"x-request-id": "est-control"})
    rem1 = ctrl.headers.get("x-ratelimit-remaining-tokens")
    ids = {"est-chat-stream": "gpt-4o-est", "est-chat": "gpt-4o-est", "est-resp-stream": "gpt-4o-est-resp",
           "est-claude-stream": "claude-est"}
    list(o.chat.completions.create(model="gpt-4o-est", messages=msgs("estimate me please"), stream=True,
                                   max_tokens=words, extra_headers=dict(nu, **{"x-request-id": "est-chat-stream"})))
    o.chat.completions.create(model="gpt-4o-est", messages=msgs("estimate me too"), max_tokens=words,
                              extra_headers=dict(nu, **{"x-request-id": "est-chat"}))
    list(o.responses.create(model="gpt-4o-est-resp", input="estimate the responses api", stream=True,
                            max_output_tokens=words, extra_headers=dict(nu, **{"x-request-id": "est-resp-stream"})))
    list(an.messages.create(model="claude-est", max_tokens=words, stream=True,
                            extra_headers=dict(nu, **{"x-request-id": "est-claude-stream"}),
                            messages=[{"role": "user", "content": "estimate anthropic"}]))
    after = o.chat.completions.with_raw_response.create(model="gpt-4o-est-control", messages=msgs("control"),
                                                        max_tokens=5, extra_headers={"x-request-id": "est-control-2"})
    rem2 = after.headers.get("x-ratelimit-remaining-tokens")
    recs = log_records(alog, list(ids) + ["est-control"])
    samples, mtext = scrape(rw.admin_port)
    has_est_label = any("estimated" in l for n, l, v in samples if n == TOK)
    for rid, model in ids.items():
        rec = recs.get(rid)
        t = rec.get("tokens") if rec else None
        log_marked = isinstance(t, dict) and t.get("estimated") is True
        metric_marked = msum(samples, TOK, model=model, estimated="true") > 0
        ck.ok(log_marked or metric_marked, "%s (%s): estimated tokens are marked neither in the access log "
              "(tokens=%r) nor in /metrics (estimated=\"true\")" % (rid, model, t))
        if has_est_label:
            ck.ok(metric_marked, "%s: /metrics has an estimated label but no estimated=\"true\" sample for %s"
                  % (rid, model))
        if isinstance(t, dict):
            ck.ok(isinstance(t.get("input"), int) and t["input"] > 0, "%s: estimated tokens.input %r" % (rid, t))
            out = t.get("output")
            ck.ok(isinstance(out, int) and words / 4 <= out <= words * 4,
                  "%s: estimated tokens.output %r for a %d-word reply" % (rid, out, words))
        else:
            ck.ok(False, "%s: no tokens object in the access log (line %r)" % (rid, rec))
        for d in ("input", "output"):
            ck.ok(msum(samples, TOK, model=model, direction=d) > 0,
                  "%s: no %s tokens in /metrics for model %s" % (rid, d, model))
    ctl = recs.get("est-control")
    ck.ok(ctl is not None and isinstance(ctl.get("tokens"), dict) and ctl["tokens"].get("estimated") is False,
          "control request with usage: tokens %r" % (ctl and ctl.get("tokens")))
    if hour_left > 20:
        ck.ok(rem1 is not None and rem2 is not None and rem1.isdigit() and rem2.isdigit()
              and int(rem2) < int(rem1) - words,
              "estimated tokens not charged to the limit: x-ratelimit-remaining-tokens %r before, %r after"
              % (rem1, rem2))
    ck.done(lambda: "access-log lines:\n  " + "\n  ".join(json.dumps(r) for r in recs.values()),
            lambda: log_tail(alog), lambda: ai_text(mtext))


# ================================================================ f. time to first token
def test_time_to_first_token_histogram_counts_streamed_requests(ringway_fn, ai_up, ai_up_b):
    """ringway_ai_time_to_first_token_seconds has one observation per streamed request (chat,
    Responses, Anthropic) and none for non-streamed ones; a stream whose upstream waits 300 ms
    before answering shows in the sum."""
    rw = start_ai(ringway_fn, "ttft", upstreams=[ups("openai", ai_up), ups("anthropic", ai_up_b)],
                  routes=[{"name": "messages", "match": {"path_prefix": "/v1/messages"}, "upstream": "anthropic",
                           "filters": ["auth", "stats"]},
                          {"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "stats"]}],
                  filters=[AUTH, STATS])
    o, an = oai(rw.port), ant(rw.port)
    o.chat.completions.create(model="gpt-4o-ttft", messages=msgs("plain 1"), max_tokens=3)
    o.responses.create(model="gpt-4o-ttft", input="plain 2", max_output_tokens=3)
    an.messages.create(model="claude-ttft", max_tokens=3, messages=[{"role": "user", "content": "plain 3"}])
    list(o.chat.completions.create(model="gpt-4o-ttft", messages=msgs("s1"), stream=True, max_tokens=4,
                                   extra_headers={"x-test-delay-ms": "300"}))
    list(o.chat.completions.create(model="gpt-4o-ttft", messages=msgs("s2"), stream=True, max_tokens=4,
                                   stream_options={"include_usage": True}))
    list(o.responses.create(model="gpt-4o-ttft", input="s3", stream=True, max_output_tokens=4))
    list(an.messages.create(model="claude-ttft", max_tokens=4, stream=True,
                            messages=[{"role": "user", "content": "s4"}]))
    streams, total = 4, 7

    def settled():
        s, t = scrape(rw.admin_port)
        return (s, t) if msum(s, "ringway_requests_total") >= total else None

    try:
        samples, text = wait_until(settled, 3, interval=0.05, what="ringway_requests_total to reach %d" % total)
    except AssertionError:
        samples, text = scrape(rw.admin_port)
    deadline = time.monotonic() + 2
    while msum(samples, TTFT + "_count") < streams and time.monotonic() < deadline:
        time.sleep(0.05)
        samples, text = scrape(rw.admin_port)
    ck = Checks()
    ck.eq(msum(samples, "ringway_requests_total"), total, "ringway_requests_total")
    ck.eq(msum(samples, TTFT + "_count"), streams, "%s_count (streamed requests: %d, non-streamed: %d)"
          % (TTFT, streams, total - streams))
    ck.eq(msum(samples, TTFT + "_bucket", le="+Inf"), streams, "%s_bucket{le=\"+Inf\"}" % TTFT)
    ck.ok(msum(samples, TTFT + "_sum") >= 0.3, "%s_sum %.3f s < the 300 ms the upstream waited once"
          % (TTFT, msum(samples, TTFT + "_sum")))
    ck.done(lambda: ai_text(text))
