"""AI accounting that must not leak (issue 11, item 7): compressed replies, a client's
stream_options, Anthropic-compatible message_delta with input_tokens 0, usage left on a content
chunk, upstream error answers, and a client that leaves after the last content chunk.

Same style as test_ai.py (whose helpers this module uses): the real ringway binary in front of
ai_upstream.py; expected token sums come from the upstream's log of what it reported, never from
constants; every failed check of a test is reported at once with the ringway_ai_* metrics and the
access-log lines.
"""

import gzip
import json
import time
import uuid
import zlib

import pytest
from anthropic import Anthropic
from openai import OpenAI

from ai_upstream import word_pieces
from helpers import RawConn, request_bytes
from test_ai import (AUTH, STATS, TOK, Checks, _post_raw, ai_text, ant, expected_tokens, first_diff,
                     log_records, log_tail, msgs, msum, new_tag, oai, scrape, sse_events, start_ai,
                     tpm_filter, ups, wait_tokens)

REQS = "ringway_ai_requests_total"


@pytest.fixture(scope="module")
def gw(ringway_factory, ai_up, ai_up_b, tmp_path_factory):
    """/v1/messages -> anthropic, other /v1/ -> openai (include_usage on); auth, a token limit far
    above the traffic, ai-stats, an access log."""
    alog = tmp_path_factory.mktemp("acclog") / "access.log"
    rw = start_ai(ringway_factory, "acc",
                  upstreams=[ups("openai", ai_up), ups("anthropic", ai_up_b)],
                  routes=[{"name": "messages", "match": {"path_prefix": "/v1/messages"},
                           "upstream": "anthropic", "filters": ["auth", "tpm", "stats"]},
                          {"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "tpm", "stats"], "include_usage": True}],
                  filters=[AUTH, tpm_filter(10_000_000, max_reserve=None), STATS],
                  log={"access": str(alog)})
    rw.alog = alog
    return rw


def rid(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


def entries(up, tag, n=1, timeout=3.0):
    """The upstream's log entries for tag, waiting up to timeout for n of them (an entry is
    written once the upstream has sent its whole reply)."""
    deadline = time.monotonic() + timeout
    while True:
        ent = up.entries(tag)
        if len(ent) >= n or time.monotonic() > deadline:
            return ent
        time.sleep(0.05)


def check_exact(ck, gw, sent):
    """sent: [(request id, route, upstream, tag)]. Every request's access-log tokens equal what the
    upstream reported (estimated: false), and /metrics holds the sums. Returns context callables."""
    recs = log_records(gw.alog, [s[0] for s in sent])
    exp = {}
    for r_id, route, up, tag in sent:
        ent = entries(up, tag)
        if not ck.eq(len(ent), 1, "upstream entries for %s" % r_id):
            continue
        e = ent[0]
        if not ck.ok(e["usage_reported"], "%s: the upstream reported no usage (entry %r)"
                     % (r_id, {k: e[k] for k in ("path", "stream", "include_usage", "status")})):
            continue
        for k, v in expected_tokens(ent, route, "alice").items():
            exp[k] = exp.get(k, 0) + v
        rec = recs.get(r_id)
        if not ck.ok(rec is not None, "no access-log line for %s" % r_id):
            continue
        t = rec.get("tokens") or {}
        what = "%s (%s stream=%s)" % (r_id, e["path"], e["stream"])
        ck.eq((t.get("input"), t.get("output"), t.get("estimated")),
              (e["usage_reported"]["input"], e["usage_reported"]["output"], False),
              what + ": access-log tokens (input, output, estimated)")
    bad, mtext = wait_tokens(gw.admin_port, exp)
    for b in bad:
        ck.ok(False, b)
    return [lambda: ai_text(mtext), lambda: log_tail(gw.alog)]


def header_values(entry, name):
    return [v for k, v in entry["headers"] if k.lower() == name]


# ================================================================ compressed replies
def test_accounted_route_asks_the_upstream_for_identity_whatever_the_client_accepts(gw, ai_up, ai_up_b):
    """Both SDKs send `Accept-Encoding: gzip, deflate`; an upstream that compresses when allowed
    (as providers do) does so on a direct call. Through ringway the upstream sees only
    `accept-encoding: identity` (also when the client sent no Accept-Encoding, which allows any
    coding), replies uncompressed, the SDK results equal the direct ones, and usage is exact."""
    ck = Checks()
    h = {"x-test-honour-accept-encoding": "1"}
    tag_d = new_tag("ae-direct")
    direct = OpenAI(base_url=ai_up.base + "/v1", api_key="x", max_retries=0, timeout=30)
    d_chat = direct.chat.completions.create(model="gpt-ae", messages=msgs("identity please"), max_tokens=9,
                                            extra_headers=dict(h, **{"x-test-tag": tag_d})).model_dump()
    de = ai_up.wait_entries(tag_d, 1)
    ck.ok(de and de[0]["content_encoding"] == "gzip",
          "control: the SDK's direct call was not answered gzip (entry %r), so this test proves nothing"
          % (de and {"accept-encoding": header_values(de[0], "accept-encoding"),
                     "content_encoding": de[0]["content_encoding"]}))
    sent = []

    def hdr(route, up):
        r_id, tag = rid("ae"), new_tag("ae")
        sent.append((r_id, route, up, tag))
        return dict(h, **{"x-request-id": r_id, "x-test-tag": tag})

    o, an = oai(gw.port), ant(gw.port)
    v_chat = o.chat.completions.create(model="gpt-ae", messages=msgs("identity please"), max_tokens=9,
                                       extra_headers=hdr("chat", ai_up)).model_dump()
    ck.ok(v_chat == d_chat, "chat through ringway differs from direct: %s" % first_diff([v_chat], [d_chat]))
    list(o.chat.completions.create(model="gpt-ae", messages=msgs("stream"), max_tokens=11, stream=True,
                                   extra_headers=hdr("chat", ai_up)))
    o.responses.create(model="gpt-ae", input="responses", max_output_tokens=7, extra_headers=hdr("chat", ai_up))
    an.messages.create(model="claude-ae", max_tokens=6, messages=[{"role": "user", "content": "hi"}],
                       extra_headers=hdr("messages", ai_up_b))
    list(an.messages.create(model="claude-ae", max_tokens=8, stream=True,
                            messages=[{"role": "user", "content": "stream"}], extra_headers=hdr("messages", ai_up_b)))
    # A raw client with no Accept-Encoding at all: "any coding" to the upstream unless told.
    hv = [("Authorization", "Bearer sk-alice")] + list(hdr("chat", ai_up).items())
    r = _post_raw(gw.port, "/v1/chat/completions", {"model": "gpt-ae", "messages": msgs("raw"), "max_tokens": 5}, hv)
    ck.eq(r.status, 200, "raw request without Accept-Encoding: status")
    ck.eq(r.get("content-encoding"), None, "raw request without Accept-Encoding: reply coding")
    for r_id, _, up, tag in sent:
        for e in up.wait_entries(tag, 1):
            ck.eq(header_values(e, "accept-encoding"), ["identity"],
                  "%s %s: Accept-Encoding fields the upstream got" % (r_id, e["path"]))
            ck.eq(e["content_encoding"], None, "%s %s: the upstream's reply coding" % (r_id, e["path"]))
    ctx = check_exact(ck, gw, sent)
    ck.done(*ctx)


def _decode(coding, data):
    if coding == "gzip":
        return gzip.decompress(data)
    if coding == "deflate":
        return zlib.decompress(data)
    return None  # no br decoder in the standard library


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
def test_upstream_compressing_anyway_is_forwarded_unchanged_and_counted_exactly(gw, ai_up, ai_up_b, coding):
    """The upstream compresses whatever it is asked (x-test-encoding): JSON replies and event
    streams (chat with the include_usage Ringway adds, Anthropic), one of them one byte per
    write. The client gets the upstream's bytes unchanged (equal to a direct call's) with their
    Content-Encoding, and the usage in them is counted exactly: access log and /metrics."""
    ck = Checks()
    sent = []
    cases = [
        ("chat", ai_up, "/v1/chat/completions", {"model": "gpt-enc-" + coding, "messages": msgs("json"), "max_tokens": 40}, {}),
        ("chat", ai_up, "/v1/chat/completions", {"model": "gpt-enc-" + coding, "messages": msgs("sse"), "max_tokens": 30,
                                                 "stream": True}, {}),
        ("chat", ai_up, "/v1/chat/completions", {"model": "gpt-enc-" + coding, "messages": msgs("sse bytes"),
                                                 "max_tokens": 12, "stream": True}, {"x-test-byte-at-a-time": "1"}),
        ("messages", ai_up_b, "/v1/messages", {"model": "claude-enc-" + coding, "max_tokens": 25,
                                             "messages": [{"role": "user", "content": "json"}]}, {}),
        ("messages", ai_up_b, "/v1/messages", {"model": "claude-enc-" + coding, "max_tokens": 35, "stream": True,
                                             "messages": [{"role": "user", "content": "sse"}]}, {}),
    ]
    for route, up, path, doc, extra in cases:
        r_id, tag = rid("enc"), new_tag("enc")
        sent.append((r_id, route, up, tag))
        base = [("x-test-encoding", coding), ("Accept-Encoding", coding)] + list(extra.items())
        r = _post_raw(gw.port, path, doc, base + [("Authorization", "Bearer sk-alice"), ("x-request-id", r_id),
                                                  ("x-test-tag", tag)])
        # Direct, with the body the upstream got through ringway (include_usage added to a chat
        # stream), so the two replies are the same bytes.
        ddoc = dict(doc)
        if route == "chat" and doc.get("stream"):
            ddoc["stream_options"] = {"include_usage": True}
        d = _post_raw(up.port, path, ddoc, base)
        what = "%s stream=%s %s" % (path, bool(doc.get("stream")), extra or "")
        ck.eq(r.status, 200, what + ": status (body %r)" % r.body[:200])
        ck.eq(r.get("content-encoding"), coding, what + ": Content-Encoding the client got")
        ck.ok(r.body == d.body, what + ": the client did not get the upstream's bytes unchanged (%d bytes, "
              "direct %d)" % (len(r.body), len(d.body)))
        plain = _decode(coding, r.body) if r.body == d.body else None
        if plain is not None:
            if doc.get("stream"):
                events = sse_events(plain)
                ck.ok(len(events) > 3, what + ": the decoded stream has %d events" % len(events))
            else:
                ck.ok(json.loads(plain).get("usage"), what + ": the decoded reply has no usage")
    ctx = check_exact(ck, gw, sent)
    ck.done(*ctx)


def test_sdk_through_a_gzipping_upstream_matches_direct(gw, ai_up):
    """The openai SDK (which decodes gzip itself) against an upstream that gzips regardless: the
    results through ringway equal the direct ones, and the usage is counted exactly."""
    ck = Checks()
    tag_d = new_tag("gz-d")
    direct = OpenAI(base_url=ai_up.base + "/v1", api_key="x", max_retries=0, timeout=30)
    sent = []

    def calls(client, hdr):
        out = [client.chat.completions.create(model="gpt-gz-sdk", messages=msgs("gz"), max_tokens=33,
                                              extra_headers=hdr()).model_dump()]
        out.append([c.model_dump() for c in client.chat.completions.create(
            model="gpt-gz-sdk", messages=msgs("gz stream"), max_tokens=21, stream=True,
            stream_options={"include_usage": True}, extra_headers=hdr())])
        return out

    def via_hdr():
        r_id, tag = rid("gz"), new_tag("gz")
        sent.append((r_id, "chat", ai_up, tag))
        return {"x-test-encoding": "gzip", "x-request-id": r_id, "x-test-tag": tag}

    got = calls(oai(gw.port), via_hdr)
    want = calls(direct, lambda: {"x-test-encoding": "gzip", "x-test-tag": tag_d})
    ck.ok(got == want, "SDK results through ringway differ from direct: %s" % first_diff(got, want))
    ctx = check_exact(ck, gw, sent)
    ck.done(*ctx)


# ================================================================ stream_options
STREAM_OPTIONS = {
    "include_usage false": {"include_usage": False},
    "null": None,
    "other member": {"include_obfuscation": False},
    "empty": {},
}


@pytest.mark.parametrize("case", list(STREAM_OPTIONS))
def test_client_stream_options_cannot_switch_accounting_off(gw, ai_up, case):
    """A streamed chat request whose stream_options is {"include_usage": false}, null, another
    member only, or {}: the upstream always gets include_usage true (other members kept), the
    client gets exactly what a direct call with its own body gives (no usage chunk, no usage
    field), and the tokens are counted exactly."""
    ck = Checks()
    so = STREAM_OPTIONS[case]
    doc = {"model": "gpt-so-" + case.replace(" ", "-"), "messages": msgs("stream options: %s" % case), "max_tokens": 14, "stream": True,
           "stream_options": so}
    r_id, tag = rid("so"), new_tag("so")
    r = _post_raw(gw.port, "/v1/chat/completions", doc,
                  [("Authorization", "Bearer sk-alice"), ("x-request-id", r_id), ("x-test-tag", tag)])
    d = _post_raw(ai_up.port, "/v1/chat/completions", doc)
    ck.eq(r.status, 200, "status through ringway (body %r)" % r.body[:300])
    got = [json.loads(x) if x != "[DONE]" else x for _, x in sse_events(r.body)]
    want = [json.loads(x) if x != "[DONE]" else x for _, x in sse_events(d.body)]
    ck.ok(got == want, "frames through ringway differ from a direct call with the client's body: %s"
          % first_diff(got, want))
    ck.ok(not any(isinstance(c, dict) and "usage" in c for c in got),
          "a frame through ringway carries usage the client did not ask for")
    ent = ai_up.entries(tag)
    if ck.eq(len(ent), 1, "upstream entries"):
        e = ent[0]
        ck.eq(e["include_usage"], True, "include_usage in the body the upstream got")
        body = json.loads(e["body"])
        want_so = dict(so or {})
        want_so["include_usage"] = True
        ck.eq(body.get("stream_options"), want_so, "stream_options the upstream got")
        body.pop("stream_options", None)
        client = dict(doc)
        client.pop("stream_options")
        ck.eq(body, client, "the rest of the body the upstream got")
    ctx = check_exact(ck, gw, [(r_id, "chat", ai_up, tag)])
    ck.done(*ctx)


def test_sdk_stream_options_include_usage_false_matches_direct(gw, ai_up):
    """openai SDK, stream_options={"include_usage": False}: the SDK's chunks through ringway equal
    the direct ones (no usage chunk), and ringway counts the exact usage."""
    ck = Checks()
    direct = OpenAI(base_url=ai_up.base + "/v1", api_key="x", max_retries=0, timeout=30)
    r_id, tag = rid("so-sdk"), new_tag("so-sdk")

    def call(client, h):
        return [c.model_dump() for c in client.chat.completions.create(
            model="gpt-so-sdk", messages=msgs("sdk"), max_tokens=16, stream=True,
            stream_options={"include_usage": False}, extra_headers=h)]

    got = call(oai(gw.port), {"x-request-id": r_id, "x-test-tag": tag})
    want = call(direct, {})
    ck.ok(got == want, "SDK chunks through ringway differ from direct: %s" % first_diff(got, want))
    ctx = check_exact(ck, gw, [(r_id, "chat", ai_up, tag)])
    ck.done(*ctx)


# ================================================================ Anthropic message_delta input 0
def test_anthropic_delta_with_zero_input_keeps_the_message_start_input(gw, ai_up_b):
    """An Anthropic-compatible upstream whose message_delta says input_tokens: 0: the input
    counted is message_start's (what the upstream reported), not 0; the SDK sees what it sees
    directly."""
    ck = Checks()
    direct = Anthropic(base_url=ai_up_b.base, api_key="x", max_retries=0, timeout=30)
    r_id, tag = rid("d0"), new_tag("d0")

    def call(client, h):
        h = dict(h, **{"x-test-delta-input-zero": "1"})
        return [e.model_dump() for e in client.messages.create(
            model="claude-d0", max_tokens=13, stream=True, extra_headers=h,
            messages=[{"role": "user", "content": "a prompt long enough to have some input tokens"}])]

    got = call(ant(gw.port), {"x-request-id": r_id, "x-test-tag": tag})
    want = call(direct, {})
    ck.ok(got == want, "SDK events through ringway differ from direct: %s" % first_diff(got, want))
    deltas = [e for e in got if e["type"] == "message_delta"]
    ck.ok(deltas and deltas[-1]["usage"].get("input_tokens") == 0,
          "control: the upstream's message_delta does not report input_tokens 0: %r" % deltas)
    ctx = check_exact(ck, gw, [(r_id, "messages", ai_up_b, tag)])
    ck.done(*ctx)


# ================================================================ usage on a content chunk
@pytest.mark.parametrize("mode", ["normal", "byte-at-a-time"])
def test_usage_on_the_last_content_chunk_is_removed_when_ringway_asked(gw, ai_up, mode):
    """A Gemini-compatible upstream puts the usage on its last content chunk (with the
    finish_reason) rather than in a usage-only chunk. A client that did not ask for usage gets
    that chunk without its usage member (its choices kept): the SDK's chunks equal a direct
    call's. A client that asked gets the usage. Both are counted exactly."""
    ck = Checks()
    direct = OpenAI(base_url=ai_up.base + "/v1", api_key="x", max_retries=0, timeout=30)
    h = {"x-test-usage-on-last-chunk": "1"}
    if mode == "byte-at-a-time":
        h["x-test-byte-at-a-time"] = "1"
    sent = []

    def call(client, hdr, **kw):
        return [c.model_dump() for c in client.chat.completions.create(
            model="gpt-last-" + mode, messages=msgs("gemini style"), max_tokens=9, stream=True,
            extra_headers=dict(h, **hdr), **kw)]

    def via():
        r_id, tag = rid("last"), new_tag("last")
        sent.append((r_id, "chat", ai_up, tag))
        return {"x-request-id": r_id, "x-test-tag": tag}

    got, want = call(oai(gw.port), via()), call(direct, {})
    ck.ok(got == want, "SDK chunks through ringway differ from direct: %s" % first_diff(got, want))
    ck.ok(got and got[-1]["choices"] and got[-1]["choices"][0]["finish_reason"] == "stop",
          "the last chunk (with the finish_reason) did not reach the client: %r" % (got[-1:],))
    asked = call(oai(gw.port), via(), stream_options={"include_usage": True})
    asked_d = call(direct, {}, stream_options={"include_usage": True})
    ck.ok(asked == asked_d, "with include_usage asked: SDK chunks through ringway differ from direct: %s"
          % first_diff(asked, asked_d))
    ck.ok(asked and asked[-1].get("usage"), "the client asked for usage and its last chunk has none")
    ctx = check_exact(ck, gw, sent)
    ck.done(*ctx)


# ================================================================ upstream error answers
def test_upstream_error_answers_are_counted_with_their_status_and_zero_tokens(ringway_fn, ai_up, tmp_path):
    """The upstream refuses (429, 503; JSON error, no usage): the client gets the refusal, the
    request counts in ringway_ai_requests_total with its status, with zero tokens (no estimate),
    and its token reservation is released (the next identical request sees the same
    x-ratelimit-remaining-tokens)."""
    alog = tmp_path / "access.log"
    rw = start_ai(ringway_fn, "refused", upstreams=[ups("openai", ai_up)],
                  routes=[{"name": "chat", "match": {"path_prefix": "/v1/"}, "upstream": "openai",
                           "filters": ["auth", "tpm", "stats"], "include_usage": True}],
                  filters=[AUTH, tpm_filter(1_000_000, per="tokens_per_hour", max_reserve=None), STATS],
                  log={"access": str(alog)})
    ck = Checks()
    hour_left = 3600 - time.time() % 3600
    sent = []
    for status, stream in ((429, False), (429, False), (503, True), (500, False)):
        r_id = rid("err%d" % status)
        doc = {"model": "gpt-refused", "messages": msgs("refuse me"), "max_tokens": 700, "stream": stream}
        r = _post_raw(rw.port, "/v1/chat/completions", doc,
                      [("Authorization", "Bearer sk-alice"), ("x-request-id", r_id), ("x-test-status", str(status))])
        ck.eq(r.status, status, "%s: status the client got (body %r)" % (r_id, r.body[:200]))
        sent.append((r_id, status, r.get("x-ratelimit-remaining-tokens")))
    rem = [s[2] for s in sent]
    if hour_left > 20:
        ck.ok(all(x is not None and x == rem[0] for x in rem),
              "x-ratelimit-remaining-tokens changed across refused requests (reservations kept): %r" % rem)
    recs = log_records(alog, [s[0] for s in sent])
    for r_id, status, _ in sent:
        rec = recs.get(r_id)
        if ck.ok(rec is not None, "no access-log line for %s" % r_id):
            ck.eq(rec.get("status"), status, r_id + ": access-log status")
            t = rec.get("tokens") or {}
            ck.eq((t.get("input"), t.get("output"), t.get("estimated")), (0, 0, False),
                  r_id + ": access-log tokens (input, output, estimated)")
    deadline = time.monotonic() + 3
    while True:
        samples, mtext = scrape(rw.admin_port)
        counts = {st: msum(samples, REQS, model="gpt-refused", status=st) for st in (429, 503, 500)}
        if counts == {429: 2, 503: 1, 500: 1} or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    ck.eq(counts, {429: 2, 503: 1, 500: 1}, "%s{model=\"gpt-refused\"} by status" % REQS)
    ck.eq(msum(samples, TOK, model="gpt-refused"), 0, "%s{model=\"gpt-refused\"} (refused requests)" % TOK)
    # A success on the same route is counted under its own status.
    ok = oai(rw.port).chat.completions.create(model="gpt-refused", messages=msgs("fine"), max_tokens=3)
    ck.eq(ok.usage.completion_tokens, 3, "a successful request after the refusals")
    deadline = time.monotonic() + 3
    while msum(scrape(rw.admin_port)[0], REQS, model="gpt-refused", status=200) != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    samples, mtext = scrape(rw.admin_port)
    ck.eq(msum(samples, REQS, model="gpt-refused", status=200), 1, "%s{status=\"200\"}" % REQS)
    ck.done(lambda: ai_text(mtext), lambda: log_tail(alog))


# ================================================================ client leaves after the content
@pytest.mark.parametrize("api", ["chat", "messages"])
def test_client_leaving_after_the_last_content_chunk_is_charged_the_exact_usage(gw, ai_up, ai_up_b, api):
    """A client reads a stream until the last piece of generated text and closes at once; the
    upstream sends its next frames 150 ms apart, so the client is gone before the usage frame
    exists. It is charged the exact usage the upstream reported (not an estimate)."""
    ck = Checks()
    n = 10
    r_id, tag = rid("leave"), new_tag("leave")
    if api == "chat":
        up, path, route = ai_up, "/v1/chat/completions", "chat"
        doc = {"model": "gpt-leave", "messages": msgs("leave early"), "max_tokens": n, "stream": True}
    else:
        up, path, route = ai_up_b, "/v1/messages", "messages"
        doc = {"model": "claude-leave", "max_tokens": n, "stream": True,
               "messages": [{"role": "user", "content": "leave early"}]}
    last = json.dumps(word_pieces(n)[-1], ensure_ascii=False)[1:-1].encode()
    body = json.dumps(doc).encode()
    seen = b""
    with RawConn(gw.port, timeout=30) as c:
        c.send(request_bytes("POST", path, host="127.0.0.1", body=body,
                             headers=[("Content-Type", "application/json"), ("Authorization", "Bearer sk-alice"),
                                      ("x-request-id", r_id), ("x-test-tag", tag),
                                      ("x-test-frame-delay-ms", "150")]))
        r = c.read_head()
        ck.eq(r.status, 200, "status")
        # Raw reads (chunk framing included): stop as soon as the last text piece is in.
        while last not in seen:
            piece = c.rf.read1(65536)
            if not piece:
                break
            seen += piece
    ck.ok(last in seen, "the last text piece %r never arrived" % last)
    end_of_content = b'"finish_reason":"stop"' if api == "chat" else b"content_block_stop"
    ck.ok(end_of_content not in seen,
          "the client saw %r before leaving, so it did not leave right after the content" % end_of_content)
    ctx = check_exact(ck, gw, [(r_id, route, up, tag)])
    ck.done(*ctx)
