"""Request smuggling against a recording, strictly parsing upstream.

Each case sends one ambiguous request followed, on the same client connection, by the request
a desynchronised parser would see as a second one (`GET /smuggled`), then `GET /end` with
`Connection: close`. The upstream (`raw_upstream.RecordingUpstream`) keeps every byte it gets,
parses strictly, and answers each request with its id (`rid`).

Whatever Ringway decides, one of these must hold:

- rejected: one 4xx JSON error, then the connection closes; the upstream got no whole request
  from the exchange (a partial one only on a connection Ringway then closed);
- forwarded: the upstream's requests are exactly one of the case's allowed interpretations
  (method, target, body, Host), each strictly valid (one framing header at most, one Host), and
  the client got exactly those responses, in order, identified by `rid` — possibly followed by
  one 4xx JSON error for bytes Ringway would not parse, then the close. The smuggled path never
  reaches the upstream without the client seeing its answer in its place.

Afterwards a probe on a new connection must get its own answer (a desynchronised pooled upstream
connection would hand it someone else's), and no open upstream connection may hold leftover bytes.
test_malformed.py checks the statuses of most of these heads against the ordinary backend; this
file checks what reaches the upstream.
"""

import socket

import pytest

from helpers import RawConn, assert_json_error, simple_get, wait_until
from raw_upstream import RecordingUpstream

H = b"Host: t\r\n"
S = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
END = b"GET /end HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
MAX_BODY = 1024 * 1024


def R(method, target, body=b"", host="t"):
    """One request as the upstream must see it."""
    return (method, target, bytes(body), host)


SM = R("GET", "/smuggled")
EN = R("GET", "/end")


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked(*parts):
    return b"".join(chunk(p) for p in parts) + b"0\r\n\r\n"


def post(fields, body, target=b"/a", version=b"HTTP/1.1", host=H):
    return b"POST " + target + b" " + version + b"\r\n" + host + fields + b"\r\n" + body


def cl(n):
    return b"Content-Length: %d\r\n" % n


TE = b"Transfer-Encoding: chunked\r\n"
HELLO = chunked(b"hello")

# (id, bytes sent on one client connection, allowed interpretations; [] = must be rejected)
CASES = []


def case(cid, raw, *interps):
    CASES.append(pytest.param(raw, list(interps), id=cid))


# ---- controls: clean requests followed by pipelined ones go through as they are
case("control-content-length", post(cl(5), b"hello") + S + END, [R("POST", "/a", b"hello"), SM, EN])
case("control-chunked", post(TE, HELLO) + S + END, [R("POST", "/a", b"hello"), SM, EN])
case("control-get-body-holding-a-request", b"GET /a HTTP/1.1\r\n" + H + cl(len(S)) + b"\r\n" + S + END,
     [R("GET", "/a", S), EN])

# ---- CL.TE and TE.CL
_B = b"0\r\n\r\n" + S
case("cl-te", post(cl(len(_B)) + TE, _B) + END,
     [R("POST", "/a", _B), EN], [R("POST", "/a"), SM, EN])
case("te-cl", post(TE + cl(len(_B)), _B) + END,
     [R("POST", "/a", _B), EN], [R("POST", "/a"), SM, EN])
_SIZE_LINE = b"%x\r\n" % len(S)
# By Content-Length the body is the chunk-size line and the chunk's payload is the next request.
case("te-cl-payload-is-a-request", post(TE + cl(len(_SIZE_LINE)), chunked(S)) + END,
     [R("POST", "/a", S), EN], [R("POST", "/a", _SIZE_LINE), SM])

# ---- TE.TE: a Transfer-Encoding one parser may not recognise, next to a Content-Length that
# covers the smuggled request; and the same disguise alone, with a chunked body.
DISGUISES = [
    ("space-before-colon", b"Transfer-Encoding : chunked\r\n"),
    ("tab-before-colon", b"Transfer-Encoding\t: chunked\r\n"),
    ("xchunked", b"Transfer-Encoding: xchunked\r\n"),
    ("chunked-identity", b"Transfer-Encoding: chunked, identity\r\n"),
    ("identity-chunked", b"Transfer-Encoding: identity, chunked\r\n"),
    ("gzip-chunked", b"Transfer-Encoding: gzip, chunked\r\n"),
    ("trailing-comma", b"Transfer-Encoding: chunked,\r\n"),
    ("tab-value", b"Transfer-Encoding:\tchunked\t\r\n"),
    ("uppercase", b"Transfer-Encoding: CHUNKED\r\n"),
    ("duplicate", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
    ("duplicate-other", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"),
    ("obs-fold", b"Transfer-Encoding:\r\n chunked\r\n"),
    ("obs-fold-hides-te", b"X-Pad: a\r\n\tTransfer-Encoding: chunked\r\n"),
    ("vertical-tab", b"Transfer-Encoding:\x0bchunked\r\n"),
    ("quoted", b'Transfer-Encoding: "chunked"\r\n'),
    ("nul-suffix", b"Transfer-Encoding: chunked\x00\r\n"),
    ("underscore-name", b"Transfer_Encoding: chunked\r\n"),
]
for _name, _te in DISGUISES:
    if _name == "underscore-name":
        # Not Transfer-Encoding to Ringway, but CGI-style upstreams map "_" to "-": refused.
        case("te-te-%s-with-cl" % _name, post(cl(len(_B)) + _te, _B) + END)
        case("te-te-%s-alone" % _name, post(_te, HELLO) + S + END)
        case("cl-underscore-name", post(b"Content_Length: %d\r\n" % len(S), S) + END)
    else:
        case("te-te-%s-with-cl" % _name, post(cl(len(_B)) + _te, _B) + END,
             [R("POST", "/a", _B), EN], [R("POST", "/a"), SM, EN])
        case("te-te-%s-alone" % _name, post(_te, HELLO) + S + END, [R("POST", "/a", b"hello"), SM, EN])

# ---- Content-Length forms (the body is the smuggled request)
_n = len(S)
for _cid, _fields, _interps in [
    ("cl-plus-sign", b"Content-Length: +%d\r\n" % _n, [[R("POST", "/a", S), EN]]),
    ("cl-minus-sign", b"Content-Length: -%d\r\n" % _n, []),
    ("cl-leading-zeros", b"Content-Length: 0%d\r\n" % _n, [[R("POST", "/a", S), EN]]),
    ("cl-many-leading-zeros", b"Content-Length: 0000000000000000000000%d\r\n" % _n, [[R("POST", "/a", S), EN]]),
    ("cl-list-same", b"Content-Length: %d, %d\r\n" % (_n, _n), [[R("POST", "/a", S), EN]]),
    ("cl-list-differ", b"Content-Length: %d, 0\r\n" % _n,
     [[R("POST", "/a", S), EN], [R("POST", "/a"), SM, EN]]),
    ("cl-duplicate-same", cl(_n) + cl(_n), [[R("POST", "/a", S), EN]]),
    ("cl-duplicate-differ", cl(_n) + cl(0), [[R("POST", "/a", S), EN], [R("POST", "/a"), SM, EN]]),
    ("cl-duplicate-differ-zero-first", cl(0) + cl(_n), [[R("POST", "/a", S), EN], [R("POST", "/a"), SM, EN]]),
    ("cl-u64-wrap", b"Content-Length: %d\r\n" % (2 ** 64 + _n), []),
    ("cl-decimal-point", b"Content-Length: %d.0\r\n" % _n, []),
    ("cl-hex", b"Content-Length: 0x%x\r\n" % _n, []),
    ("cl-empty", b"Content-Length: \r\n", []),
    ("cl-space-inside", b"Content-Length: %d %d\r\n" % (_n // 10, _n % 10), []),
]:
    case(_cid, post(_fields, S) + END, *_interps)

# ---- Transfer-Encoding in HTTP/1.0 (RFC 9112 §6.1: faulty framing)
case("te-http10", post(TE, HELLO, version=b"HTTP/1.0") + S + END, [R("POST", "/a", b"hello")])
case("te-http10-keep-alive", post(b"Connection: keep-alive\r\n" + TE, HELLO, version=b"HTTP/1.0") + S + END,
     [R("POST", "/a", b"hello"), SM, EN])
case("te-cl-http10", post(b"Connection: keep-alive\r\n" + cl(len(_B)) + TE, _B, version=b"HTTP/1.0") + END,
     [R("POST", "/a", _B), EN], [R("POST", "/a"), SM, EN])

# ---- chunk sizes and chunk lines (the head has gone upstream before these are seen)
for _cid, _body, _interps in [
    ("chunk-size-17-digits-wraps-to-5", b"10000000000000005\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-over-max-body", b"fffffffffffffffa\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-non-hex", b"5g\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-plus-sign", b"+5\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-negative", b"-5\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-trailing-space", b"5 \r\nhello\r\n0\r\n\r\n", []),
    ("chunk-size-empty", b"\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-lines-lf-only", b"5\nhello\n0\n\n", []),
    ("chunk-size-bare-cr", b"5\rhello\r\n0\r\n\r\n", []),
    ("chunk-data-longer-than-size", b"3\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-data-shorter-than-size", b"9\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-ext-bare-cr", b"5;a\rb\r\nhello\r\n0\r\n\r\n", []),
    ("chunk-ext-quoted-crlf", b'5;a="x\r\n0\r\n\r\n"\r\nhello\r\n0\r\n\r\n', []),
    ("last-chunk-without-final-crlf", b"5\r\nhello\r\n0\r\n", []),
    ("trailer-obs-fold", b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n", []),
    ("chunk-size-leading-zeros", b"0005\r\nhello\r\n0\r\n\r\n", [[R("POST", "/a", b"hello"), SM, EN]]),
    ("chunk-size-upper-hex", b"A\r\n0123456789\r\n0\r\n\r\n", [[R("POST", "/a", b"0123456789"), SM, EN]]),
    ("chunk-extensions", b'5;a=b ; c="d \\"e\\"";f\r\nhello\r\n0;g=h\r\n\r\n',
     [[R("POST", "/a", b"hello"), SM, EN]]),
    ("trailer-content-length", b"5\r\nhello\r\n0\r\nContent-Length: 40\r\nX-T: 1\r\n\r\n",
     [[R("POST", "/a", b"hello"), SM, EN]]),
]:
    case(_cid, post(TE, _body) + S + END, *_interps)

# ---- NUL and bare CR / LF in the head
case("nul-in-field-value", post(b"X-A: a\x00b\r\n" + cl(_n), S) + END, [R("POST", "/a", S), EN])
case("nul-in-target", b"POST /a\x00b HTTP/1.1\r\n" + H + cl(_n) + b"\r\n" + S + END)
case("nul-in-field-name", post(b"X-\x00A: b\r\n" + cl(_n), S) + END)
case("bare-cr-in-field-value", post(b"X-A: a\rb\r\n" + cl(_n), S) + END, [R("POST", "/a", S), EN])
case("bare-cr-hides-te", post(cl(len(_B)) + b"X-A: x\rTransfer-Encoding: chunked\r\n", _B) + END,
     [R("POST", "/a", _B), EN], [R("POST", "/a"), SM, EN])
case("bare-lf-hides-te", post(cl(len(_B)) + b"X-A: x\nTransfer-Encoding: chunked\r\n", _B) + END,
     [R("POST", "/a", _B), EN], [R("POST", "/a"), SM, EN])
case("bare-lf-hides-cl", post(TE + b"X-A: x\nContent-Length: %d\r\n" % len(_B), _B) + END,
     [R("POST", "/a", _B), EN], [R("POST", "/a"), SM, EN])
case("lf-only-head", b"POST /a HTTP/1.1\nHost: t\nContent-Length: %d\n\n" % _n + S + END,
     [R("POST", "/a", S), EN])

# ---- absolute-form targets: the authority is the Host (RFC 9112 §3.2.2), and only one goes up
case("absolute-form-same-host", b"POST http://t/a HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END,
     [R("POST", "/a", b"hello"), SM, EN])
case("absolute-form-other-host",
     b"POST http://other.example/a HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END,
     [R("POST", "/a", b"hello", host="other.example"), SM, EN])
case("absolute-form-with-port", b"POST http://t:8080/a?q=1 HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END,
     [R("POST", "/a?q=1", b"hello", host="t:8080"), SM, EN])
case("absolute-form-empty-path", b"POST http://t HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END,
     [R("POST", "/", b"hello"), SM, EN])
case("absolute-form-uppercase-scheme", b"POST HTTP://t/a HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END,
     [R("POST", "/a", b"hello"), SM, EN])
case("absolute-form-https", b"POST https://t/a HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END,
     [R("POST", "/a", b"hello"), SM, EN])
case("absolute-form-userinfo", b"POST http://evil@t/a HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END,
     [R("POST", "/a", b"hello"), SM, EN])
case("absolute-form-without-host-field", b"POST http://t/a HTTP/1.1\r\n" + cl(5) + b"\r\nhello" + S + END)
case("absolute-form-second-target", b"POST http://t/a http://evil/b HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello"
     + S + END)

# ---- Host
case("duplicate-host-same", post(H + cl(5), b"hello") + S + END, [R("POST", "/a", b"hello"), SM, EN])
case("duplicate-host-different", post(b"Host: evil\r\n" + cl(5), b"hello") + S + END)
case("host-list", post(cl(5), b"hello", host=b"Host: t, evil\r\n") + S + END)
case("host-with-path", post(cl(5), b"hello", host=b"Host: t/evil\r\n") + S + END)
case("host-with-userinfo", post(cl(5), b"hello", host=b"Host: evil@t\r\n") + S + END)
case("host-space-before-colon", post(b"Host : evil\r\n" + cl(5), b"hello") + S + END)

# ---- request line
case("request-line-double-space", b"POST  /a HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END)
case("request-line-tab", b"POST\t/a HTTP/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END)
case("request-line-http09", b"GET /a\r\n" + S + END)
case("request-line-lowercase-version", b"POST /a http/1.1\r\n" + H + cl(5) + b"\r\nhello" + S + END)
case("request-line-trailing-space", b"POST /a HTTP/1.1 \r\n" + H + cl(5) + b"\r\nhello" + S + END)


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def upstream():
    u = RecordingUpstream().start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def gw(ringway_factory, upstream):
    """One worker, so the probe after each case reuses the pooled upstream connection the case
    left behind (most recently used first): a desynchronised one cannot hide."""
    return ringway_factory.start(
        upstreams=[{"name": "rec", "endpoints": [upstream.addr], "retries": 0, "max_idle": 4}],
        routes=[{"name": "all", "match": {"path_prefix": "/"}, "upstream": "rec"}],
        server={"workers": 1, "max_body_bytes": "1MiB", "header_timeout": "2s"},
        name="smuggling")


# ------------------------------------------------------------------------------ helpers
def _client_exchange(port, raw):
    """Sends raw, reads every response until the connection closes."""
    out = []
    with RawConn(port, timeout=5) as c:
        try:
            c.send(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                more = c.rf.peek(1)
            except ConnectionResetError:
                break
            except socket.timeout:
                pytest.fail("connection neither answered nor closed within 5 s; responses so far: %r" % out,
                            pytrace=False)
            if not more:
                break
            try:
                out.append(c.read_response())
            except (EOFError, ConnectionResetError) as e:
                pytest.fail("response truncated (%r); responses so far: %r" % (e, out), pytrace=False)
    return out


def _seen(req):
    return (req["method"], req["target"], req["body"], req["host"])


def _describe(reqs):
    return [(r["rid"], r["method"], r["target"], r["body"][:80], r["host"], r["framing"]) for r in reqs]


@pytest.mark.parametrize("raw,interps", CASES)
def test_ambiguous_request_is_rejected_or_forwarded_unambiguously(gw, upstream, raw, interps):
    mark = upstream.mark()
    responses = _client_exchange(gw.port, raw)
    upstream.sync()
    got = upstream.requests_since(mark)
    assert not upstream.errors(), (
        "the upstream received bytes a strict parser rejects: %r" % upstream.errors())
    assert responses, "no response at all; upstream got %r" % _describe(got)

    answered = [r for r in responses if r.get("x-rid")]
    tail = responses[len(answered):]
    assert responses[:len(answered)] == answered, (
        "a Ringway error came before upstream answers: %r" % responses)
    assert len(tail) <= 1, "more than one response not from the upstream: %r" % tail
    for r in tail:
        # 501: a well-framed coding list Ringway does not implement (gzip, chunked).
        assert 400 <= r.status < 500 or r.status == 501, "expected a 4xx (or 501) for the rejected bytes, got %r" % r
        assert_json_error(r, r.status)

    # Every request the upstream parsed was answered to this client, in order.
    assert [r.get("x-rid") for r in answered] == [q["rid"] for q in got], (
        "upstream requests and client responses differ (smuggled or lost request):\n"
        "upstream: %r\nclient:   %r" % (_describe(got), [r.get("x-rid") for r in answered]))
    if got:
        seen = [_seen(q) for q in got]
        assert seen in interps, (
            "the upstream saw %r; allowed: rejection or one of %r" % (seen, interps))
        for q in got:
            assert not q["body"] or q["framing"] in ("length", "chunked"), q
    else:
        assert tail and not answered, "nothing reached the upstream, yet no error response: %r" % responses

    # A rejected request's partial bytes may stay only on a connection Ringway closed.
    wait_until(lambda: not upstream.open_with_partial_request(), 3,
               what="no open upstream connection holding a partial request (%r)"
                    % upstream.open_with_partial_request())

    # A probe on a new connection gets its own answer: no pooled connection is out of step.
    probe = "/probe?after=%d" % mark[0]
    r = simple_get(gw.port, probe)
    assert r.status == 200 and r.json()["target"] == probe, "the probe got someone else's answer: %r" % r
    upstream.sync()
    assert not upstream.errors(), upstream.errors()
    assert not upstream.open_with_partial_request(), upstream.open_with_partial_request()


@pytest.mark.parametrize("body,status", [
    (b"fffffffffffffffff1\r\nhello\r\n0\r\n\r\n", 400),   # 17 digits: no size, not a big body
    (b"100001\r\nhello\r\n0\r\n\r\n", 413),               # a size over max_body (1 MiB)
    (b"5g\r\nhello\r\n0\r\n\r\n", 400),
    (b"10000000000000005\r\nhello\r\n0\r\n\r\n", 400),
    (b"5\r\nhello\r\n5g\r\nworld\r\n0\r\n\r\n", 400),  # a bad line after a good chunk
    (b"5\r\nhelloXX0\r\n\r\n", 400),                      # no CRLF after the data
])
def test_bad_chunk_lines_with_the_head_reach_nothing_upstream(gw, upstream, body, status):
    """Strict framing: chunk lines that arrive with the head are decoded before the head is
    forwarded, so an invalid one is answered with nothing sent upstream — not a byte, not a
    connection (before, the head went up and the connection was cut mid-request)."""
    upstream.sync()
    before, mark = upstream.bytes_received(), upstream.mark()
    responses = _client_exchange(gw.port, post(TE, body) + S + END)
    assert len(responses) == 1, responses
    assert responses[0].status == status, responses[0]
    assert_json_error(responses[0], status)
    upstream.sync()
    assert upstream.bytes_received() == before, "bytes reached the upstream"
    assert not upstream.conns_since(mark), "a connection was opened upstream"
