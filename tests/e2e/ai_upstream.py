"""A deterministic LLM-style upstream for Ringway's AI end-to-end tests.

Raw sockets + threads (like backend.py), so every byte on the wire is ours. Run as a program
(`python ai_upstream.py --name a`), it binds 127.0.0.1 on a free port and prints `PORT <n>`
once it accepts connections; it exits when its stdin closes.

Endpoints:
  POST /v1/chat/completions   OpenAI chat; JSON, or SSE chunks with `delta.content`. With
                              `stream_options.include_usage: true` every content chunk carries
                              `"usage": null` and a last chunk with `"choices": []` carries the usage,
                              then `data: [DONE]`; without it no usage at all (like api.openai.com).
  POST /v1/responses          OpenAI Responses API; JSON, or SSE `event: response.output_text.delta`
                              ... `event: response.completed` with `response.usage.{input,output}_tokens`.
  POST /v1/messages           Anthropic; JSON with `usage.{input,output}_tokens`, or SSE
                              message_start (message.usage.input_tokens, cache_read_input_tokens,
                              output_tokens=1), content_block_delta text deltas, message_delta
                              (usage.output_tokens, cumulative), message_stop.
  GET  /_log[?tag=T]          {"name","port","entries":[...]}: one entry per AI request received
                              (only those with header x-test-tag: T when tag is given)
  POST /_log/reset            forget the log
  GET  /healthz               ok

Determinism: the reply is N words, N = header `x-test-words`, else `max_tokens` /
`max_output_tokens` / `max_completion_tokens`, else 8 (at most 4000). The reported usage is
  input  = len(text of the last user message) // 4 + 7     (characters, text parts only)
  output = N
ids are derived from the request body without `stream_options`, and `created` is fixed, so a
direct connection and one through Ringway give identical replies.

Modes (request header, or query parameter of the same name without `x-test-`):
  x-test-byte-at-a-time: 1   the response body is written one byte per send() (TCP_NODELAY),
                             each byte its own HTTP chunk (non-streaming replies become chunked too)
  x-test-no-usage: 1         never report usage (Ringway must estimate)
  x-test-crlf: 1             SSE lines end in CRLF instead of LF
  x-test-delay-ms: M         wait M ms before the response head
  x-test-words: N            the reply's length in words (= output tokens)
  x-test-tag: T              recorded, for GET /_log?tag=T
  x-test-encoding: C         compress the reply with C (gzip, deflate or br) whatever the request
                             accepts, as some servers do; SSE frames are flushed one by one
  x-test-honour-accept-encoding: 1
                             compress the reply the way real providers do: with the first of
                             gzip, br, deflate that the request's Accept-Encoding allows; no
                             Accept-Encoding at all allows any (RFC 9110), so gzip; identity: none
  x-test-usage-on-last-chunk: 1
                             chat streams with include_usage put the usage on the last content
                             chunk (with its finish_reason) instead of a usage-only chunk, and no
                             "usage": null elsewhere (Gemini's OpenAI-compatible API)
  x-test-delta-input-zero: 1 Anthropic streams report "input_tokens": 0 in message_delta (some
                             Anthropic-compatible servers do; message_start has the real count)
  x-test-frame-delay-ms: M   wait M ms before each SSE frame after the first
  x-test-pause-ms: M         stay silent M ms mid-stream, before SSE frame x-test-pause-after (2)
  x-test-status: S           answer status S (429, 5xx, ...) with an OpenAI-style JSON error and
                             no usage, as providers refuse a request

A /v1/responses or /v1/messages request whose body carries `stream_options`, or a chat request
with `stream_options` but no `stream: true`, is refused 400 the way the real APIs refuse it.

Each log entry: seq, upstream (name), port, method, path, target, headers, framing
("length"/"chunked"), body_len, body_sha256, body (text, when <= 64 KiB), json_ok, model, api,
stream, include_usage (requested by the body), words, text (the reply's text), usage (what the
upstream would count: {"input","output"}), usage_reported (what it actually sent, or null),
status, modes, content_encoding (the coding of the reply, or null).
"""

import argparse
import hashlib
import json
import gzip
import select
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from backend import REASONS, BadRequest, Body, ThreadedServer, read_head  # noqa: E402
from helpers import stop_process  # noqa: E402

VOCAB = ["alpha", "bravo", "naïve", "日本語", "charlie", "delta", "écho", "foxtrot", "golf", "hôtel"]
CREATED = 1700000000
BODY_KEEP = 64 * 1024
DEFAULT_WORDS = 8
MAX_WORDS = 4000


def words_text(n):
    return " ".join(VOCAB[i % len(VOCAB)] for i in range(n))


def word_pieces(n):
    """The reply's content deltas: 'alpha', ' bravo', ' naïve', ..."""
    return [(VOCAB[i % len(VOCAB)] if i == 0 else " " + VOCAB[i % len(VOCAB)]) for i in range(n)]


def _text_of(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    return ""


def last_user_text(doc, api):
    """Text of the last user message (text parts only; images are not counted)."""
    if api == "responses":
        inp = doc.get("input")
        if isinstance(inp, str):
            return inp
        msgs = inp if isinstance(inp, list) else []
    else:
        msgs = doc.get("messages") if isinstance(doc.get("messages"), list) else []
    for m in reversed(msgs):
        if isinstance(m, dict) and m.get("role", "user") == "user":
            return _text_of(m.get("content"))
    return ""


def input_tokens_for(doc, api):
    return len(last_user_text(doc, api)) // 4 + 7


def _flag(req, name):
    v = req.get("x-test-" + name)
    if v is None:
        q = req.query
        v = q.get(name, q.get(name.replace("-", "_")))
    return v is not None and v.strip().lower() not in ("", "0", "false", "no")


def _num(req, name):
    v = req.get("x-test-" + name)
    if v is None:
        q = req.query
        v = q.get(name, q.get(name.replace("-", "_")))
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        return None


def _j(obj):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


CODINGS = ("gzip", "deflate", "br")


def _bits(fields):
    """(value, width) bit fields packed LSB first (RFC 7932 §2), zero-padded to whole bytes."""
    acc, n = 0, 0
    for v, w in fields:
        acc |= v << n
        n += w
    return acc.to_bytes((n + 7) // 8, "little")


class BrStored:
    """A valid br stream made of uncompressed meta-blocks (RFC 7932 §9.2): the standard library
    has no brotli encoder, and a stored stream still makes the decoder at the other end run."""

    MAX_BLOCK = 1 << 16

    def __init__(self):
        self.started = False

    def compress(self, data):
        out = b""
        for i in range(0, len(data), self.MAX_BLOCK):
            piece = data[i:i + self.MAX_BLOCK]
            # WBITS = 16 (one 0 bit) before the first block; ISLAST = 0, MNIBBLES = 4 (0),
            # MLEN - 1 in 16 bits, ISUNCOMPRESSED = 1, then the bytes from the next byte boundary.
            fields = [] if self.started else [(0, 1)]
            self.started = True
            out += _bits(fields + [(0, 1), (0, 2), (len(piece) - 1, 16), (1, 1)]) + piece
        return out

    def flush(self):
        # ISLAST = 1, ISLASTEMPTY = 1 (after a WBITS bit when nothing was written yet).
        return _bits(([] if self.started else [(0, 1)]) + [(1, 1), (1, 1)])


class Coder:
    """Compresses a reply as a stream: every piece is flushed so SSE frames arrive one by one."""

    def __init__(self, coding):
        self.coding = coding
        if coding == "br":
            self.c = BrStored()
        else:
            # wbits 31: a gzip member; 15: a zlib stream (what "deflate" means in HTTP).
            self.c = zlib.compressobj(wbits=31 if coding == "gzip" else 15)

    def piece(self, data):
        if self.coding == "br":
            return self.c.compress(data)
        return self.c.compress(data) + self.c.flush(zlib.Z_SYNC_FLUSH)

    def end(self):
        return self.c.flush()

    def whole(self, data):
        return self.piece(data) + self.end()


def pick_coding(req):
    """The reply's coding for this request: forced by x-test-encoding, or chosen from
    Accept-Encoding under x-test-honour-accept-encoding; None for identity."""
    forced = (req.get("x-test-encoding") or "").strip().lower()
    if forced in CODINGS:
        return forced
    if not _flag(req, "honour-accept-encoding"):
        return None
    fields = req.get_all("accept-encoding")
    if not fields:
        return "gzip"  # RFC 9110 §12.5.3: no Accept-Encoding field, any coding is acceptable
    allowed = set()
    for v in fields:
        for item in v.split(","):
            name, _, params = item.strip().lower().partition(";")
            q = params.replace(" ", "")
            if name and q not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
                allowed.add(name.strip())
    for c in ("gzip", "br", "deflate"):
        if c in allowed or "*" in allowed:
            return c
    return None


class AiUpstream(ThreadedServer):
    """A threaded LLM-style upstream bound to 127.0.0.1:port (0 = free port)."""

    def __init__(self, name="ai", port=0, host="127.0.0.1"):
        super().__init__(port, host)
        self.name = name
        self.log = []
        self.seq = 0
        # The coding of the reply being written; each connection is served by its own thread,
        # so this is per request without threading it through every reply builder.
        self.reply = threading.local()

    # ---- connection loop -------------------------------------------------
    def _serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rf = conn.makefile("rb", buffering=256 * 1024)
        try:
            while True:
                try:
                    req = read_head(rf)
                except (BadRequest, EOFError):
                    self._send(conn, 400, b"bad request\n", "text/plain", close=True)
                    return
                if req is None:
                    return
                keep = self._handle(conn, rf, req)
                if not keep:
                    return
        except (ConnectionError, BrokenPipeError, EOFError, OSError, BadRequest, ValueError):
            return
        finally:
            try:
                rf.close()
            except OSError:
                pass
            try:
                conn.close()
            except OSError:
                pass

    def _coding(self):
        return getattr(self.reply, "coding", None)

    def _send(self, conn, status, body, ctype, close=False, extra=(), byte_at_a_time=False):
        head = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Status")),
                "Content-Type: %s" % ctype,
                "X-Upstream: %s" % self.name]
        head += list(extra)
        coding = self._coding()
        if coding:
            body = Coder(coding).whole(body)
            head.append("Content-Encoding: %s" % coding)
        if byte_at_a_time:
            head.append("Transfer-Encoding: chunked")
        else:
            head.append("Content-Length: %d" % len(body))
        if close:
            head.append("Connection: close")
        raw_head = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if not byte_at_a_time:
            conn.sendall(raw_head + body)
            return
        conn.sendall(raw_head)
        for i in range(len(body)):
            conn.sendall(b"1\r\n" + body[i:i + 1] + b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    def _json(self, conn, obj, status=200, close=False, byte_at_a_time=False):
        self._send(conn, status, _j(obj).encode(), "application/json", close=close,
                   byte_at_a_time=byte_at_a_time)

    def _record(self, entry):
        with self.lock:
            self.seq += 1
            entry["seq"] = self.seq
            self.log.append(entry)

    # ---- request dispatch --------------------------------------------------
    def _handle(self, conn, rf, req):
        keep = req.keep_alive()
        if [v for v in req.tokens("expect") if v == "100-continue"]:
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = Body(req, rf)
        framing = "chunked" if body.chunked else "length"
        h = hashlib.sha256()
        parts = []
        for c in body.chunks():
            h.update(c)
            parts.append(c)
        raw = b"".join(parts)
        path = req.path
        close = not keep
        self.reply.coding = None
        self.reply.frame_delay = 0
        self.reply.pause = (0, 0)

        if path == "/healthz":
            self._send(conn, 200, b"ok\n", "text/plain", close=close)
            return keep
        if path == "/_log" and req.method == "GET":
            tag = req.query.get("tag")
            with self.lock:
                entries = [e for e in self.log if tag is None or e.get("tag") == tag]
                doc = {"name": self.name, "port": self.port, "entries": entries}
            self._json(conn, doc, close=close)
            return keep
        if path == "/_log/reset" and req.method == "POST":
            with self.lock:
                self.log = []
            self._json(conn, {"ok": True}, close=close)
            return keep

        api = {"/v1/chat/completions": "chat", "/v1/responses": "responses",
               "/v1/messages": "messages"}.get(path)
        entry = {
            "upstream": self.name, "port": self.port, "method": req.method, "path": path,
            "target": req.target, "headers": req.headers, "framing": framing,
            "body_len": len(raw), "body_sha256": h.hexdigest(),
            "body": raw.decode("utf-8", "replace") if len(raw) <= BODY_KEEP else None,
            "tag": req.get("x-test-tag"), "request_id": req.get("x-request-id"),
            "api": api, "json_ok": False, "model": None, "stream": False, "include_usage": False,
            "words": 0, "text": None, "usage": None, "usage_reported": None, "status": None,
            "modes": {m: _flag(req, m) for m in ("byte-at-a-time", "no-usage", "crlf", "usage-on-last-chunk",
                                                 "delta-input-zero")},
            "content_encoding": None,
        }
        if api is None or req.method != "POST":
            entry["status"] = 404
            self._record(entry)
            self._json(conn, {"error": {"message": "no such endpoint %s %s" % (req.method, path),
                                        "type": "invalid_request_error", "code": "not_found"}},
                       status=404, close=close)
            return keep
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as e:
            entry["status"] = 400
            self._record(entry)
            self._json(conn, {"error": {"message": "upstream: invalid JSON body: %s" % e,
                                        "type": "invalid_request_error", "code": "invalid_json"}},
                       status=400, close=close)
            return keep
        entry["json_ok"] = True
        entry["model"] = doc.get("model")
        coding = pick_coding(req)
        self.reply.coding = coding
        self.reply.frame_delay = _num(req, "frame-delay-ms") or 0
        self.reply.pause = (_num(req, "pause-ms") or 0, _num(req, "pause-after") or 2)
        entry["content_encoding"] = coding
        stream = doc.get("stream") is True
        entry["stream"] = stream
        so = doc.get("stream_options")
        entry["include_usage"] = isinstance(so, dict) and so.get("include_usage") is True

        # what the real APIs refuse
        refuse = None
        if so is not None and api in ("responses", "messages"):
            refuse = "Unknown parameter: 'stream_options'."
        elif so is not None and not stream:
            refuse = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        if refuse:
            entry["status"] = 400
            self._record(entry)
            err = ({"type": "error", "error": {"type": "invalid_request_error", "message": refuse}}
                   if api == "messages" else
                   {"error": {"message": refuse, "type": "invalid_request_error",
                              "param": "stream_options", "code": "unknown_parameter"}})
            self._json(conn, err, status=400, close=close)
            return keep

        refused = _num(req, "status")
        if refused is not None and refused >= 400:
            # A provider refusing the request (rate limit, overload): no usage, nothing billed.
            entry["status"] = refused
            self._record(entry)
            self._json(conn, {"error": {"message": "upstream refused with %d" % refused,
                                        "type": "rate_limit_exceeded" if refused == 429 else "server_error",
                                        "code": None}},
                       status=refused, close=close)
            return keep

        n = _num(req, "words")
        if n is None:
            for k in ("max_tokens", "max_output_tokens", "max_completion_tokens"):
                if isinstance(doc.get(k), int):
                    n = doc[k]
                    break
        if n is None:
            n = DEFAULT_WORDS
        n = max(0, min(n, MAX_WORDS))
        usage = {"input": input_tokens_for(doc, api), "output": n}
        no_usage = _flag(req, "no-usage")
        byte_mode = _flag(req, "byte-at-a-time")
        nl = "\r\n" if _flag(req, "crlf") else "\n"
        entry.update(words=n, text=words_text(n), usage=usage, status=200)

        canon = dict(doc)
        canon.pop("stream_options", None)
        rid = hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:24]
        model = doc.get("model")

        delay = _num(req, "delay-ms")
        if delay:
            # Wait, watching the connection: a gateway that closes it while the model
            # "thinks" is recorded (closed_after_ms: how long after the request it closed).
            t0 = time.monotonic()
            end = t0 + delay / 1000.0
            while time.monotonic() < end:
                r, _, _ = select.select([conn], [], [], max(0.0, end - time.monotonic()))
                if r:
                    try:
                        gone = conn.recv(1, socket.MSG_PEEK) == b""
                    except OSError:
                        gone = True
                    if gone:
                        entry["closed_at"] = time.time()
                        entry["usage_reported"] = None
                        self._record(entry)
                        return False
                    break

        if api == "chat":
            reported = self._chat(conn, doc, rid, model, n, usage, stream, entry["include_usage"],
                                  no_usage, byte_mode, nl, close, _flag(req, "usage-on-last-chunk"))
        elif api == "responses":
            reported = self._responses(conn, rid, model, n, usage, stream, no_usage, byte_mode, nl, close)
        else:
            reported = self._messages(conn, rid, model, n, usage, stream, no_usage, byte_mode, nl, close,
                                      _flag(req, "delta-input-zero"))
        entry["usage_reported"] = reported
        entry["closed_at"] = self.reply.__dict__.pop("cut_at", None)
        self._record(entry)
        return keep

    # ---- streaming -----------------------------------------------------------
    def _stream(self, conn, frames, byte_mode, close):
        """Send SSE frames (already-encoded str each) as a chunked text/event-stream."""
        head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream; charset=utf-8",
                "Cache-Control: no-cache", "Transfer-Encoding: chunked", "X-Upstream: %s" % self.name]
        coding = self._coding()
        coder = Coder(coding) if coding else None
        if coding:
            head.append("Content-Encoding: %s" % coding)
        if close:
            head.append("Connection: close")
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))

        def send(data):
            if not data:
                return
            if byte_mode:
                for i in range(len(data)):
                    conn.sendall(b"1\r\n" + data[i:i + 1] + b"\r\n")
            else:
                conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))

        gap = getattr(self.reply, "frame_delay", 0) / 1000.0
        pause_ms, pause_at = getattr(self.reply, "pause", (0, 0))
        try:
            for i, f in enumerate(frames):
                if gap and i:
                    time.sleep(gap)
                if pause_ms and i == pause_at:
                    time.sleep(pause_ms / 1000.0)
                data = f.encode("utf-8")
                send(coder.piece(data) if coder else data)
            if coder:
                send(coder.end())
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            # The reader left mid-stream (a test of exactly that): the reply still counts as
            # sent, so its entry, with the usage it carries, is recorded, with when it was cut.
            self.reply.cut_at = time.time()

    @staticmethod
    def _data(obj, nl, event=None):
        s = ""
        if event:
            s += "event: %s%s" % (event, nl)
        s += "data: %s%s%s" % (obj if isinstance(obj, str) else _j(obj), nl, nl)
        return s

    def _chat(self, conn, doc, rid, model, n, usage, stream, include_usage, no_usage, byte_mode, nl, close,
              usage_on_last=False):
        cid = "chatcmpl-" + rid
        u = {"prompt_tokens": usage["input"], "completion_tokens": usage["output"],
             "total_tokens": usage["input"] + usage["output"]}
        if not stream:
            obj = {"id": cid, "object": "chat.completion", "created": CREATED, "model": model,
                   "system_fingerprint": "fp_ringway_test",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": words_text(n),
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]}
            if not no_usage:
                obj["usage"] = u
            self._json(conn, obj, close=close, byte_at_a_time=byte_mode)
            return None if no_usage else dict(usage)
        with_usage = include_usage and not no_usage
        base = {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                "system_fingerprint": "fp_ringway_test"}

        def chunk(delta, finish=None, last=False):
            c = dict(base)
            c["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if with_usage and usage_on_last:
                if last:
                    c["usage"] = u
            elif with_usage:
                c["usage"] = None
            return self._data(c, nl)

        frames = [chunk({"role": "assistant", "content": "", "refusal": None})]
        frames += [chunk({"content": p}) for p in word_pieces(n)]
        frames.append(chunk({}, "stop", last=True))
        if with_usage and not usage_on_last:
            c = dict(base)
            c["choices"] = []
            c["usage"] = u
            frames.append(self._data(c, nl))
        frames.append(self._data("[DONE]", nl))
        self._stream(conn, frames, byte_mode, close)
        return dict(usage) if with_usage else None

    def _responses(self, conn, rid, model, n, usage, stream, no_usage, byte_mode, nl, close):
        resp_id = "resp_" + rid
        item_id = "msg_" + rid
        u = None if no_usage else {
            "input_tokens": usage["input"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["output"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["input"] + usage["output"]}
        text = words_text(n)
        output = [{"type": "message", "id": item_id, "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}]

        def response(status, out, usage_obj):
            return {"id": resp_id, "object": "response", "created_at": CREATED, "status": status,
                    "model": model, "output": out, "usage": usage_obj}

        if not stream:
            self._json(conn, response("completed", output, u), close=close, byte_at_a_time=byte_mode)
            return None if no_usage else dict(usage)
        seq = [0]

        def ev(name, obj):
            obj = dict(obj)
            obj["type"] = name
            obj["sequence_number"] = seq[0]
            seq[0] += 1
            return self._data(obj, nl, event=name)

        frames = [ev("response.created", {"response": response("in_progress", [], None)})]
        frames += [ev("response.output_text.delta", {"item_id": item_id, "output_index": 0,
                                                     "content_index": 0, "delta": p})
                   for p in word_pieces(n)]
        frames.append(ev("response.output_text.done", {"item_id": item_id, "output_index": 0,
                                                       "content_index": 0, "text": text}))
        frames.append(ev("response.completed", {"response": response("completed", output, u)}))
        self._stream(conn, frames, byte_mode, close)
        return None if no_usage else dict(usage)

    def _messages(self, conn, rid, model, n, usage, stream, no_usage, byte_mode, nl, close,
                  delta_input_zero=False):
        mid = "msg_" + rid
        text = words_text(n)
        if not stream:
            obj = {"id": mid, "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                   "stop_sequence": None}
            if not no_usage:
                obj["usage"] = {"input_tokens": usage["input"], "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0, "output_tokens": usage["output"]}
            self._json(conn, obj, close=close, byte_at_a_time=byte_mode)
            return None if no_usage else dict(usage)
        msg = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None}
        if not no_usage:
            # output_tokens in message_start is a small placeholder, as Anthropic sends it;
            # message_delta's usage.output_tokens is the cumulative (final) count.
            msg["usage"] = {"input_tokens": usage["input"], "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0, "output_tokens": 1}
        frames = [self._data({"type": "message_start", "message": msg}, nl, "message_start"),
                  self._data({"type": "content_block_start", "index": 0,
                              "content_block": {"type": "text", "text": ""}}, nl, "content_block_start"),
                  self._data({"type": "ping"}, nl, "ping")]
        frames += [self._data({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": p}}, nl, "content_block_delta")
                   for p in word_pieces(n)]
        frames.append(self._data({"type": "content_block_stop", "index": 0}, nl, "content_block_stop"))
        md = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        if not no_usage:
            md["usage"] = {"output_tokens": usage["output"]}
            if delta_input_zero:
                md["usage"] = {"input_tokens": 0, "cache_creation_input_tokens": 0,
                               "cache_read_input_tokens": 0, "output_tokens": usage["output"]}
        frames.append(self._data(md, nl, "message_delta"))
        frames.append(self._data({"type": "message_stop"}, nl, "message_stop"))
        self._stream(conn, frames, byte_mode, close)
        return None if no_usage else dict(usage)


# ---------------------------------------------------------------- a process for the tests
class AiUpstreamProc:
    """ai_upstream.py in its own process (own GIL), on a free port; the log is read over HTTP."""

    def __init__(self, name):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(HERE / "ai_upstream.py"), "--name", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError("ai upstream %s did not start: %r" % (name, line))
        self.port = int(line.split()[1])
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("ai upstream %s not accepting on %d" % (name, self.port))
                time.sleep(0.02)

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    @property
    def base(self):
        return "http://127.0.0.1:%d" % self.port

    def _get(self, target):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: upstream\r\nConnection: close\r\n\r\n" % target).encode())
            data = b""
            while True:
                d = s.recv(1 << 20)
                if not d:
                    break
                data += d
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return json.loads(body)

    def entries(self, tag=None):
        """The log entries (optionally those with x-test-tag: tag)."""
        return self._get("/_log" + ("?tag=%s" % tag if tag else ""))["entries"]

    def wait_entries(self, tag, n, timeout=5.0):
        """The entries with x-test-tag: tag, once there are n of them (or the timeout passed).
        The mock records a request after answering it, so a client can read the answer first."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.entries(tag)
            if len(got) >= n or time.monotonic() >= deadline:
                return got
            time.sleep(0.01)

    def reset(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"POST /_log/reset HTTP/1.1\r\nHost: upstream\r\nContent-Length: 0\r\n"
                      b"Connection: close\r\n\r\n")
            while s.recv(65536):
                pass

    def stop(self):
        stop_process(self.proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="ai")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    u = AiUpstream(args.name, args.port).start()
    sys.stdout.write("PORT %d\n" % u.port)
    sys.stdout.flush()
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    u.stop()


if __name__ == "__main__":
    main()
