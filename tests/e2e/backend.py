"""A small, exact HTTP/1.1 origin server for Ringway's end-to-end tests.

Raw sockets + threads (no http.server), so every byte on the wire is ours.
Run as a program (`python backend.py --name b1`), it binds 127.0.0.1 on a free
port and prints `PORT <n>` on stdout once it accepts connections.

Endpoints:
  GET  /_accepts            {"accepts": n}  connections accepted so far
  POST /_accepts/reset      resets the counter
  ANY  /echo[...]           method, path, version, headers, body length + sha256
  ANY  /upload              {"len": n, "sha256": hex}   (body consumed streaming)
  GET  /bytes/N             N pattern bytes, Content-Length
  GET  /chunked/N           N pattern bytes, chunked, with a chunk extension and a trailer
  GET  /close/N             N pattern bytes, close-delimited (no CL, no TE)
  ANY  /status/CODE         that status; 204/304 without body
  GET|HEAD /head-check      fixed body; HEAD answers the same headers, no body
  ANY  /slow?s=SECONDS      sleeps (default 5 s), then answers
  GET  /sse?n=N&ms=M        text/event-stream, chunked: N events `data: {"i":k,...}` M ms apart
  GET  /hop-response        a response carrying hop-by-hop headers
  GET  /ws                  RFC 6455 WebSocket echo (text/binary/ping/close)

Helper servers (in-process threads): ResetServer (accept, RST), SilentServer
(accept, read, never answer), GarbageServer (answers a non-HTTP head),
BlackholeServer (accept queue full: connects hang until the client times out).
"""

import argparse
import base64
import functools
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

BLOCK_SIZE = 1 << 20


def _make_block():
    parts = []
    for k in range(BLOCK_SIZE // 32):
        parts.append(hashlib.sha256(b"ringway-pattern-%d" % k).digest())
    return b"".join(parts)


BLOCK = _make_block()
BLOCK_MV = memoryview(BLOCK)


def pattern_chunks(n, size=BLOCK_SIZE):
    """Yield memoryviews that together are the first n bytes of the pattern."""
    left = n
    pos = 0
    while left > 0:
        take = min(left, size, BLOCK_SIZE - pos)
        yield BLOCK_MV[pos:pos + take]
        left -= take
        pos = (pos + take) % BLOCK_SIZE


@functools.lru_cache(maxsize=64)
def pattern_sha256(n):
    """sha256 hex of the first n pattern bytes (cached)."""
    h = hashlib.sha256()
    for c in pattern_chunks(n):
        h.update(c)
    return h.hexdigest()


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept(key):
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


class BadRequest(Exception):
    pass


class Request:
    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers  # list of (name, value), original case
        self.trailers = []

    def get(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def get_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    def tokens(self, name):
        out = []
        for v in self.get_all(name):
            out += [t.strip().lower() for t in v.split(",") if t.strip()]
        return out

    @property
    def path(self):
        return self.target.split("?", 1)[0]

    @property
    def query(self):
        q = {}
        if "?" in self.target:
            for kv in self.target.split("?", 1)[1].split("&"):
                if "=" in kv:
                    k, v = kv.split("=", 1)
                    q[k] = v
        return q

    def keep_alive(self):
        conn = self.tokens("connection")
        if self.version == "HTTP/1.1":
            return "close" not in conn
        return "keep-alive" in conn


def read_line(rf, limit=65536):
    line = rf.readline(limit)
    if not line:
        raise EOFError
    if not line.endswith(b"\n"):
        raise BadRequest("line too long")
    return line


def read_head(rf):
    line = rf.readline(65536)
    if not line:
        return None
    while line in (b"\r\n", b"\n"):  # tolerate leading empty lines
        line = rf.readline(65536)
        if not line:
            return None
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3:
        raise BadRequest("bad request line %r" % line)
    method, target, version = parts
    headers = []
    while True:
        h = read_line(rf)
        if h in (b"\r\n", b"\n"):
            break
        s = h.decode("latin-1").rstrip("\r\n")
        if ":" not in s:
            raise BadRequest("bad header %r" % s)
        k, v = s.split(":", 1)
        headers.append((k, v.strip(" \t")))
        if len(headers) > 1000:
            raise BadRequest("too many headers")
    return Request(method, target, version, headers)


class Body:
    """Streams a request body by its framing; never holds more than one read."""

    def __init__(self, req, rf):
        self.req = req
        self.rf = rf
        te = req.tokens("transfer-encoding")
        cl = req.get("content-length")
        if te:
            if te[-1] != "chunked":
                raise BadRequest("unsupported transfer-encoding")
            self.chunked = True
            self.left = 0
        else:
            self.chunked = False
            try:
                self.left = int(cl) if cl is not None else 0
            except ValueError:
                raise BadRequest("bad content-length %r" % cl)
            if self.left < 0:
                raise BadRequest("negative content-length")
        self.done = False

    def chunks(self, size=256 * 1024):
        if self.done:
            return
        rf = self.rf
        if not self.chunked:
            while self.left > 0:
                data = rf.read1(min(size, self.left)) if hasattr(rf, "read1") else rf.read(min(size, self.left))
                if not data:
                    raise EOFError("body truncated")
                self.left -= len(data)
                yield data
            self.done = True
            return
        while True:
            line = read_line(rf).decode("latin-1").strip()
            szs = line.split(";", 1)[0].strip()
            try:
                n = int(szs, 16)
            except ValueError:
                raise BadRequest("bad chunk size %r" % line)
            if n == 0:
                break
            while n > 0:
                data = rf.read1(min(size, n)) if hasattr(rf, "read1") else rf.read(min(size, n))
                if not data:
                    raise EOFError("chunk truncated")
                n -= len(data)
                yield data
            if read_line(rf) not in (b"\r\n", b"\n"):
                raise BadRequest("missing CRLF after chunk")
        while True:
            t = read_line(rf)
            if t in (b"\r\n", b"\n"):
                break
            s = t.decode("latin-1").rstrip("\r\n")
            if ":" in s:
                k, v = s.split(":", 1)
                self.req.trailers.append((k, v.strip()))
        self.done = True

    def digest(self):
        h = hashlib.sha256()
        n = 0
        for c in self.chunks():
            h.update(c)
            n += len(c)
        return n, h.hexdigest()

    def drain(self):
        for _ in self.chunks():
            pass


REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 204: "No Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 418: "I'm a teapot",
    429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


class ThreadedServer:
    """A listening socket on host:port (0 = a free port) whose accept loop serves each connection
    on its own thread with `self._serve(conn)`; `accepts` counts connections."""

    def __init__(self, port=0, host="127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepts = 0
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept_loop(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self.stopped:
                    return
                continue
            with self.lock:
                self.accepts += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()


class Backend(ThreadedServer):
    """A threaded HTTP/1.1 origin server bound to 127.0.0.1:port (0 = free port)."""

    def __init__(self, name="backend", port=0, host="127.0.0.1", delay_ms=0):
        super().__init__(port, host)
        self.name = name
        self.delay = delay_ms / 1000.0  # added before every /echo answer

    # ---- connection loop -------------------------------------------------
    def _serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rf = conn.makefile("rb", buffering=256 * 1024)
        try:
            while True:
                try:
                    req = read_head(rf)
                except (BadRequest, EOFError):
                    self._send_simple(conn, 400, b"bad request\n", close=True)
                    return
                if req is None:
                    return
                try:
                    keep = self._handle(conn, rf, req)
                except BadRequest as e:
                    self._send_simple(conn, 400, ("backend: %s\n" % e).encode(), close=True)
                    return
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

    def _send_simple(self, conn, status, body, ctype="text/plain", close=False, extra=()):
        head = ["HTTP/1.1 %d %s" % (status, REASONS.get(status, "Status")),
                "Content-Type: %s" % ctype,
                "Content-Length: %d" % len(body),
                "X-Backend: %s" % self.name]
        head += list(extra)
        if close:
            head.append("Connection: close")
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        conn.sendall(data)

    def _json(self, conn, obj, status=200, close=False, extra=()):
        self._send_simple(conn, status, json.dumps(obj).encode(), "application/json", close, extra)

    def _handle(self, conn, rf, req):
        path = req.path
        keep = req.keep_alive()
        if [v for v in req.tokens("expect") if v == "100-continue"]:
            # A correct origin answers 100 before reading the body.
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = Body(req, rf)

        if path == "/_accepts" and req.method == "GET":
            body.drain()
            with self.lock:
                n = self.accepts
            self._json(conn, {"accepts": n, "backend": self.name}, close=not keep)
        elif path == "/_accepts/reset":
            body.drain()
            with self.lock:
                self.accepts = 0
            self._json(conn, {"accepts": 0, "backend": self.name}, close=not keep)
        elif path.startswith("/echo") or path == "/" or path.startswith("/exact") \
                or not path.split("/")[1] in HANDLED_ROOTS:
            n, digest = body.digest()
            if self.delay:
                time.sleep(self.delay)
            self._json(conn, {
                "backend": self.name,
                "method": req.method,
                "target": req.target,
                "path": req.path,
                "version": req.version,
                "headers": [[k, v] for k, v in req.headers],
                "trailers": [[k, v] for k, v in req.trailers],
                "body_len": n,
                "body_sha256": digest,
            }, close=not keep)
        elif path == "/upload":
            n, digest = body.digest()
            self._json(conn, {"len": n, "sha256": digest, "backend": self.name}, close=not keep)
        elif path.startswith("/bytes/"):
            body.drain()
            n = int(path.split("/")[2])
            head = ("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    "Content-Length: %d\r\nX-Backend: %s\r\nX-Sha256: %s\r\n%s\r\n"
                    % (n, self.name, pattern_sha256(n) if n <= (64 << 20) else "-",
                       "" if keep else "Connection: close\r\n")).encode()
            conn.sendall(head)
            if req.method != "HEAD":
                for c in pattern_chunks(n):
                    conn.sendall(c)
        elif path.startswith("/chunked/"):
            body.drain()
            n = int(path.split("/")[2])
            head = ("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    "Transfer-Encoding: chunked\r\nTrailer: X-Trailer-Sha256\r\n"
                    "X-Backend: %s\r\n%s\r\n" % (self.name, "" if keep else "Connection: close\r\n")).encode()
            conn.sendall(head)
            if req.method == "HEAD":
                return keep
            # first a small odd chunk with an extension, then 256 KiB chunks
            first = True
            for c in _odd_split(n):
                if first:
                    conn.sendall(b"%x;ext=ringway;q=\"x y\"\r\n" % len(c))
                    first = False
                else:
                    conn.sendall(b"%x\r\n" % len(c))
                conn.sendall(c)
                conn.sendall(b"\r\n")
            conn.sendall(b"0;last=1\r\nX-Trailer-Sha256: %s\r\n\r\n" % pattern_sha256(n).encode())
        elif path.startswith("/close/"):
            body.drain()
            n = int(path.split("/")[2])
            conn.sendall(("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                          "X-Backend: %s\r\nConnection: close\r\n\r\n" % self.name).encode())
            for c in pattern_chunks(n):
                conn.sendall(c)
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return False
        elif path.startswith("/status/"):
            body.drain()
            code = int(path.split("/")[2])
            extra = "" if keep else "Connection: close\r\n"
            if code in (204, 304) or 100 <= code < 200:
                conn.sendall(("HTTP/1.1 %d %s\r\nX-Backend: %s\r\nETag: \"abc\"\r\n%s\r\n"
                              % (code, REASONS.get(code, "Status"), self.name, extra)).encode())
            else:
                b = ("status %d\n" % code).encode()
                conn.sendall(("HTTP/1.1 %d %s\r\nX-Backend: %s\r\nContent-Type: text/plain\r\n"
                              "Content-Length: %d\r\n%s\r\n" % (code, REASONS.get(code, "Status"),
                                                                self.name, len(b), extra)).encode()
                             + (b if req.method != "HEAD" else b""))
        elif path == "/head-check":
            body.drain()
            b = b"this body is only sent for GET\n"
            conn.sendall(("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                          "X-Backend: %s\r\nX-Seen-Method: %s\r\n%s\r\n"
                          % (len(b), self.name, req.method, "" if keep else "Connection: close\r\n")).encode()
                         + (b if req.method != "HEAD" else b""))
        elif path == "/slow":
            body.drain()
            delay = float(req.query.get("s", "5"))
            time.sleep(delay)
            self._json(conn, {"slept": delay, "backend": self.name}, close=not keep)
        elif path == "/sse":
            body.drain()
            n = int(req.query.get("n", "10"))
            gap = float(req.query.get("ms", "100")) / 1000.0
            conn.sendall(("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                          "Transfer-Encoding: chunked\r\nX-Backend: %s\r\n%s\r\n"
                          % (self.name, "" if keep else "Connection: close\r\n")).encode())
            for i in range(n):
                if i:
                    time.sleep(gap)
                ev = ("data: {\"i\": %d, \"n\": %d, \"backend\": \"%s\"}\n\n" % (i, n, self.name)).encode()
                conn.sendall(b"%x\r\n%s\r\n" % (len(ev), ev))
            conn.sendall(b"0\r\n\r\n")
        elif path == "/hop-response":
            body.drain()
            b = b"hop\n"
            conn.sendall(("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                          "Connection: X-Secret-Hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=3\r\n"
                          "Proxy-Connection: keep-alive\r\nX-End-To-End: yes\r\nX-Backend: %s\r\n\r\n"
                          % (len(b), self.name)).encode() + b)
        elif path == "/ws":
            return self._websocket(conn, rf, req, body)
        else:
            body.drain()
            self._send_simple(conn, 404, b"backend: no such path\n", close=not keep)
        return keep

    # ---- WebSocket -------------------------------------------------------
    def _websocket(self, conn, rf, req, body):
        body.drain()
        key = req.get("sec-websocket-key")
        if "websocket" not in req.tokens("upgrade") or "upgrade" not in req.tokens("connection") or not key:
            self._send_simple(conn, 400, b"not a websocket handshake\n", close=True)
            return False
        conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\nX-Backend: %s\r\n\r\n" % (ws_accept(key), self.name)).encode())
        while True:
            op, payload = ws_read_frame(rf, expect_masked=True)
            if op is None:
                return False
            if op == 0x8:  # close: echo it and end
                conn.sendall(ws_frame(0x8, payload[:2] if payload else b""))
                return False
            if op == 0x9:  # ping
                conn.sendall(ws_frame(0xA, payload))
            elif op in (0x1, 0x2):
                conn.sendall(ws_frame(op, payload))


HANDLED_ROOTS = {"_accepts", "upload", "bytes", "chunked", "close", "status", "head-check", "slow",
                 "hop-response", "ws", "sse"}


def _odd_split(n):
    """First chunk of 1000 bytes (or less), then 256 KiB chunks, as memoryviews."""
    if n <= 0:
        return
    first = min(n, 1000)
    yield BLOCK_MV[:first]
    rest = n - first
    pos = first
    while rest > 0:
        take = min(rest, 256 * 1024, BLOCK_SIZE - pos)
        yield BLOCK_MV[pos:pos + take]
        rest -= take
        pos = (pos + take) % BLOCK_SIZE


# ---- WebSocket framing (RFC 6455), shared with the tests --------------------
def ws_frame(opcode, payload, mask=False):
    b0 = 0x80 | opcode
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, mbit | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if mask:
        key = os.urandom(4)
        masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return head + key + masked
    return head + payload


def _read_exact(rf, n):
    data = rf.read(n)
    if data is None or len(data) < n:
        raise EOFError
    return data


def ws_read_frame(rf, expect_masked=False):
    """Read one frame; returns (opcode, payload) or (None, None) at EOF."""
    try:
        b0, b1 = _read_exact(rf, 2)
    except (EOFError, ValueError):
        return None, None
    op = b0 & 0x0F
    masked = bool(b1 & 0x80)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", _read_exact(rf, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", _read_exact(rf, 8))[0]
    key = _read_exact(rf, 4) if masked else None
    payload = _read_exact(rf, n) if n else b""
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    if expect_masked and not masked:
        raise EOFError("client frame not masked")
    return op, payload


# ---- helper servers ---------------------------------------------------------
class _Helper:
    def __init__(self, backlog=128):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.accepts = 0
        self.conns = []

    def start(self):
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepts += 1
            threading.Thread(target=self.handle, args=(c,), daemon=True).start()

    def stop(self):
        self.stopped = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


class ResetServer(_Helper):
    """Accepts, then closes with SO_LINGER 0: the peer sees a TCP RST."""

    def handle(self, c):
        try:
            c.recv(65536)  # wait for the request so the RST hits a live exchange
        except OSError:
            pass
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()


class SilentServer(_Helper):
    """Accepts and reads, never answers (until stopped)."""

    def handle(self, c):
        self.conns.append(c)
        try:
            while not self.stopped:
                if not c.recv(65536):
                    return
        except OSError:
            return


class GarbageServer(_Helper):
    """Reads the request, answers a head that is not HTTP, closes."""

    def handle(self, c):
        try:
            c.recv(65536)
            c.sendall(b"SMTP ready, not HTTP at all\r\nwhat: ever\r\n\r\n")
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
        except OSError:
            pass
        finally:
            c.close()


class BlackholeServer:
    """A listener whose accept queue is full, so new connects hang (SYN dropped).

    Linux drops SYNs to a listener with a full accept queue (tcp_abort_on_overflow=0),
    so a connect() to it neither succeeds nor is refused: a deterministic connect
    timeout on loopback.
    """

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []

    def start(self):
        for _ in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(0.25)
            try:
                s.connect(("127.0.0.1", self.port))
                self.fillers.append(s)
            except (socket.timeout, OSError):
                s.close()
                return self  # queue full: connects now hang
        raise RuntimeError("could not fill the accept queue of the blackhole listener")

    def is_full(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.25)
        try:
            s.connect(("127.0.0.1", self.port))
            self.fillers.append(s)
            return False
        except (socket.timeout, OSError):
            return True
        finally:
            if s not in self.fillers:
                s.close()

    def stop(self):
        for s in self.fillers:
            s.close()
        self.sock.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="backend")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=int, default=0, help="added before every /echo answer")
    args = ap.parse_args()
    b = Backend(args.name, args.port, delay_ms=args.delay_ms).start()
    sys.stdout.write("PORT %d\n" % b.port)
    sys.stdout.flush()
    try:
        # exit when the parent closes our stdin (or on a signal)
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    b.stop()


if __name__ == "__main__":
    main()
