#!/usr/bin/env python3
"""OpenAI-style streaming chat-completion origin for scripts/bench.sh (standard library only).

  sse_backend.py PORT [FRAMES] [FRAME_BYTES] [PACE_MS]

A request whose body does not contain `"stream":true` gets a non-streamed chat completion (JSON,
about 1 KiB of content, with usage). Every other request (any method and path; the request body,
Content-Length or chunked, is read and dropped) gets `200`, `content-type: text/event-stream`, `transfer-encoding: chunked`, and FRAMES
(default 200) `data: {chat.completion.chunk}` frames of about FRAME_BYTES (default 150) bytes each
with `"usage":null`, then one usage-only frame `{"choices":[],"usage":{...}}`, then
`data: [DONE]` — FRAMES + 2 SSE frames, each in its own HTTP chunk. Keep-alive.

Without PACE_MS the whole response is built once at start and written with one write per
request, so the proxy sees the frames back to back (many frames per read: the cheapest case for a
plain proxy and the worst ratio for one that reads every frame). With PACE_MS > 0 each HTTP chunk
(one frame) is its own write, PACE_MS apart, as a model streaming tokens delivers them: the proxy
reads about one frame per read. asyncio Protocol, one process: about 1 core at a few thousand
responses (or a few tens of thousands of paced frames) per second.
"""
import asyncio
import json
import sys


def build(frames, frame_bytes):
    """(head, [chunk, ...], terminator): the response in its HTTP chunks."""
    chunks = []
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "m", "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}],
            "usage": None}
    overhead = len("data: " + json.dumps(base, separators=(",", ":")) + "\n\n")
    word = "x" * max(1, frame_bytes - overhead)
    for i in range(frames):
        base["choices"][0]["delta"]["content"] = word
        if i == frames - 1:
            base["choices"][0]["finish_reason"] = "stop"
        chunks.append("data: " + json.dumps(base, separators=(",", ":")) + "\n\n")
    usage = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
             "model": "m", "choices": [],
             "usage": {"prompt_tokens": 9, "completion_tokens": frames, "total_tokens": frames + 9}}
    chunks.append("data: " + json.dumps(usage, separators=(",", ":")) + "\n\n")
    chunks.append("data: [DONE]\n\n")
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    return head, [b"%x\r\n%s\r\n" % (len(c), c.encode()) for c in chunks], b"0\r\n\r\n"


def build_json():
    """A non-streamed chat completion with usage, whole, with its Content-Length."""
    doc = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "m",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 512},
                        "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 9, "completion_tokens": 512, "total_tokens": 521}}
    body = json.dumps(doc, separators=(",", ":")).encode()
    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % len(body)) + body


class Conn(asyncio.Protocol):
    RESP = b""
    JSON = build_json()
    PARTS = None
    PACE = 0.0

    def connection_made(self, t):
        self.t = t
        self.buf = bytearray()
        self.queue = []
        self.busy = False

    def connection_lost(self, exc):
        self.t = None

    def data_received(self, data):
        self.buf += data
        while True:
            n = self.one_request()
            if n is None:
                return
            streamed = b'"stream":true' in self.buf[:n]
            del self.buf[:n]
            if not streamed:
                self.t.write(self.JSON)
            elif self.PACE <= 0:
                self.t.write(self.RESP)
            else:
                # Pipelined requests are answered in order, one paced stream at a time.
                self.queue.append(1)
                if not self.busy:
                    self.busy = True
                    asyncio.get_running_loop().create_task(self.paced())

    async def paced(self):
        head, chunks, end = self.PARTS
        while self.queue and self.t is not None:
            self.queue.pop()
            self.t.write(head)
            for c in chunks:
                await asyncio.sleep(self.PACE)
                if self.t is None:
                    return
                self.t.write(c)
            self.t.write(end)
        self.busy = False

    def one_request(self):
        """Bytes of one whole request at the start of buf, or None if incomplete."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).lower()
        pos = end + 4
        i = head.find(b"\r\ncontent-length:")
        if i >= 0:
            j = head.find(b"\r\n", i + 2)
            cl = int(head[i + 17: j if j >= 0 else len(head)].strip())
            return pos + cl if len(self.buf) >= pos + cl else None
        if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
            while True:
                k = self.buf.find(b"\r\n", pos)
                if k < 0:
                    return None
                size = int(bytes(self.buf[pos:k]).split(b";")[0], 16)
                pos = k + 2
                if size == 0:
                    # trailers end with an empty line
                    while True:
                        k = self.buf.find(b"\r\n", pos)
                        if k < 0:
                            return None
                        if k == pos:
                            return k + 2
                        pos = k + 2
                pos += size + 2
                if len(self.buf) < pos:
                    return None
        return pos


def main():
    port = int(sys.argv[1])
    frames = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    fb = int(sys.argv[3]) if len(sys.argv) > 3 else 150
    pace_ms = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    head, chunks, end = build(frames, fb)
    Conn.RESP = head + b"".join(chunks) + end
    Conn.PARTS = (head, chunks, end)
    Conn.PACE = pace_ms / 1000.0
    loop = asyncio.new_event_loop()
    srv = loop.run_until_complete(loop.create_server(Conn, "127.0.0.1", port, backlog=4096, reuse_address=True))
    print("sse backend on %d: %d frames + usage + [DONE], %d bytes per response, pace %g ms"
          % (port, frames, len(Conn.RESP), pace_ms), flush=True)
    try:
        loop.run_until_complete(srv.serve_forever())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
