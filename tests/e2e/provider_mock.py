"""A recording mock provider for the credential tests: an in-process HTTP/1.1 server (threads)
that keeps every request's target and headers, finds the provider key it was sent (whichever
header carries it), and answers by that key: 200 with an OpenAI chat completion (or an SSE
stream, or an Anthropic message on /v1/messages), or a refusal scripted per key.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


class Recorded:
    def __init__(self, method, target, headers, body):
        self.method = method
        self.target = target
        self.headers = headers  # [(lowercased name, value)] in wire order
        self.body = body

    def all(self, name):
        return [v for n, v in self.headers if n == name]

    def one(self, name):
        vals = self.all(name)
        assert len(vals) == 1, "%s: %r in %r" % (name, vals, self.headers)
        return vals[0]

    def key(self):
        """The provider key this request carried (Bearer stripped), or None."""
        for n, v in self.headers:
            if n in KEY_HEADERS:
                return v[7:] if v.lower().startswith("bearer ") else v
        return None

    def raw(self):
        """Everything received, as one text, for 'never contains' checks."""
        return self.method + " " + self.target + "\n" + "\n".join(
            "%s: %s" % hv for hv in self.headers) + "\n" + self.body.decode("utf-8", "replace")


class _Server(ThreadingHTTPServer):
    # socketserver's default backlog is 5: a burst of 50 streams from three gateways at once
    # overflowed it, dropped SYNs were retried a second later, and the gateways, counting the
    # slow connects as failures, ejected the provider ("every upstream endpoint is down").
    request_queue_size = 1024


class MockProvider:
    def __init__(self, usage=(5, 2)):
        self.lock = threading.Lock()
        self.log = []
        # (prompt, completion) tokens every success reports; prompt includes the cached tokens
        # (OpenAI's prompt_tokens_details.cached_tokens); on /v1/messages the cache reads and
        # writes are reported apart from input_tokens, as Anthropic does
        self.usage = usage
        self.cached = 0
        self.cache_write = 0
        # "stall": read the request, answer nothing until stopped; "cut": a stream's head and
        # first event, then the connection closes; "status": every request answered
        # self.status_answer = (status, [(header, value)])
        self.mode = None
        self.status_answer = (503, [])
        self.stopping = threading.Event()
        # key → (status, [(header, value)]); keys absent answer 200.
        self.refuse = {}
        # headers added to every 200 answer
        self.extra = [("openai-organization", "org-mock"), ("x-served-by", "mock")]
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                outer._handle(self)

            def do_GET(self):
                outer._handle(self)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def stop(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.log = []
            self.refuse = {}
            self.mode = None

    def requests(self):
        with self.lock:
            return list(self.log)

    def _handle(self, h):
        n = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(n) if n else b""
        headers = [(k.lower(), v) for k, v in h.headers.items()]
        rec = Recorded(h.command, h.path, headers, body)
        with self.lock:
            self.log.append(rec)
            refusal = self.refuse.get(rec.key())
            mode = self.mode
            if mode == "status":
                refusal = self.status_answer
        if mode == "stall":
            self.stopping.wait(30)
            h.close_connection = True
            return
        if refusal:
            status, extra = refusal
            out = json.dumps({"error": {"message": "refused", "type": "mock", "code": str(status)}}).encode()
            self._send(h, status, "application/json", out, extra)
            return
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = {}
        model = doc.get("model", "none")
        p_tok, c_tok = self.usage
        if h.path.startswith("/v1/messages"):
            out = json.dumps({
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "hello there"}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": p_tok - self.cached - self.cache_write, "output_tokens": c_tok,
                          "cache_read_input_tokens": self.cached,
                          "cache_creation_input_tokens": self.cache_write}}).encode()
            self._send(h, 200, "application/json", out, self.extra)
            return
        if doc.get("stream"):
            frames = []
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
            for i, word in enumerate(["hello", " there"]):
                d = dict(base, choices=[{"index": 0, "delta": {"content": word},
                                         "finish_reason": None if i == 0 else "stop"}])
                frames.append("data: %s\n\n" % json.dumps(d))
            if (doc.get("stream_options") or {}).get("include_usage"):
                d = dict(base, choices=[], usage={"prompt_tokens": p_tok, "completion_tokens": c_tok,
                                                  "total_tokens": p_tok + c_tok,
                                                  "prompt_tokens_details": {"cached_tokens": self.cached}})
                frames.append("data: %s\n\n" % json.dumps(d))
            frames.append("data: [DONE]\n\n")
            body = "".join(frames).encode()
            if mode == "cut":
                # The whole length announced, the first event sent, then the connection ends.
                h.send_response(200)
                h.send_header("content-type", "text/event-stream")
                h.send_header("content-length", str(len(body)))
                h.end_headers()
                h.wfile.write(frames[0].encode())
                h.wfile.flush()
                h.close_connection = True
                return
            self._send(h, 200, "text/event-stream", body, self.extra)
            return
        out = json.dumps({
            "id": "c1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok,
                      "total_tokens": p_tok + c_tok,
                      "prompt_tokens_details": {"cached_tokens": self.cached}}}).encode()
        self._send(h, 200, "application/json", out, self.extra)

    @staticmethod
    def _send(h, status, ctype, body, extra):
        h.send_response(status)
        h.send_header("content-type", ctype)
        h.send_header("content-length", str(len(body)))
        for k, v in extra:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)
