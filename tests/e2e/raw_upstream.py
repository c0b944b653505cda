"""A recording, strictly parsing HTTP/1.1 upstream for the smuggling and hardening tests.

`RecordingUpstream` keeps every byte it receives on every connection, parses it with a strict
RFC 9112 parser (no obs-fold, no bare CR or LF, no NUL, exactly one Host, at most one framing
header, Content-Length `1*DIGIT` without leading zeros, Transfer-Encoding exactly `chunked`,
strict chunk lines), and answers each request it parses with a small JSON document naming the
request (`rid` = connection and sequence number). A request it cannot parse strictly is recorded
as an error, answered 400 and its connection closed: a gateway in front of it must never cause
one.

It runs one thread with a selector, so `sync()` can promise that every byte already sitting in
its sockets has been read and parsed: once a client has seen the gateway's last response, what
the gateway wrote upstream before that is in the kernel, and `sync()` makes it visible.
"""

import json
import re
import selectors
import socket
import struct
import threading

TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.([01])")
CHUNK_LINE = re.compile(rb"([0-9a-fA-F]{1,16})((?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
                        rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|\"(?:[\t \x21\x23-\x5b\x5d-\x7e"
                        rb"\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*\"))?)*)\r\n")
MAX_HEAD = 64 * 1024


class StrictError(Exception):
    """The bytes are not one strictly valid HTTP/1.1 request."""


def _check_field_value(v):
    for b in v:
        if not (b in (0x09, 0x20) or 0x21 <= b <= 0x7e or b >= 0x80):
            raise StrictError("byte 0x%02x in a field value" % b)


def _parse_fields(lines):
    fields = []
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise StrictError("field line without colon: %r" % line[:80])
        if not name or any(b not in TCHAR for b in name):
            raise StrictError("bad field name %r (whitespace before colon, obs-fold, ...)" % name[:80])
        value = value.strip(b" \t")
        _check_field_value(value)
        fields.append((name.decode("latin-1"), value.decode("latin-1")))
    return fields


def parse_head(buf):
    """(method, target, minor, fields, head_len) or None when the head is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise StrictError("head longer than %d bytes" % MAX_HEAD)
        # A bare LF or a NUL is wrong whatever follows.
        if b"\x00" in buf:
            raise StrictError("NUL in head")
        return None
    head = bytes(buf[:end])
    lines = head.split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise StrictError("bare CR or LF in head line %r" % line[:80])
        if b"\x00" in line:
            raise StrictError("NUL in head line %r" % line[:80])
    m = REQUEST_LINE.fullmatch(lines[0])
    if not m:
        raise StrictError("bad request line %r" % lines[0][:120])
    method, target, minor = m.group(1).decode(), m.group(2).decode("latin-1"), int(m.group(3))
    fields = _parse_fields(lines[1:])
    return method, target, minor, fields, end + 4


def parse_chunked(buf, pos):
    """Strictly decodes a chunked body starting at pos: (payload, trailers, end) or None."""
    payload = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > 4096 or b"\n" in buf[pos:] or b"\x00" in buf[pos:]:
                raise StrictError("bad chunk-size line %r" % bytes(buf[pos:pos + 80]))
            return None
        m = CHUNK_LINE.fullmatch(buf, pos, eol + 2)
        if not m:
            raise StrictError("bad chunk-size line %r" % bytes(buf[pos:eol + 2][:80]))
        size = int(m.group(1), 16)
        pos = eol + 2
        if size == 0:
            break
        if len(buf) < pos + size + 2:
            return None
        payload += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise StrictError("chunk data not followed by CRLF")
        pos += size + 2
    trailers = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if b"\n" in buf[pos:] or b"\x00" in buf[pos:]:
                raise StrictError("bad trailer line")
            return None
        line = bytes(buf[pos:eol])
        pos = eol + 2
        if not line:
            return bytes(payload), trailers, pos
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            raise StrictError("bad trailer line %r" % line[:80])
        trailers += _parse_fields([line])


def parse_request(buf):
    """One strictly valid request from the start of buf: (request dict, length) or None."""
    head = parse_head(buf)
    if head is None:
        return None
    method, target, minor, fields, head_len = head
    lower = [(k.lower(), v) for k, v in fields]
    cls = [v for k, v in lower if k == "content-length"]
    tes = [v for k, v in lower if k == "transfer-encoding"]
    hosts = [v for k, v in lower if k == "host"]
    if minor != 1:
        raise StrictError("a gateway must speak HTTP/1.1 upstream, got HTTP/1.%d" % minor)
    if len(hosts) != 1:
        raise StrictError("%d Host fields" % len(hosts))
    if cls and tes:
        raise StrictError("both Content-Length and Transfer-Encoding")
    if len(cls) > 1:
        raise StrictError("%d Content-Length fields" % len(cls))
    if len(tes) > 1:
        raise StrictError("%d Transfer-Encoding fields" % len(tes))
    req = {"method": method, "target": target, "headers": fields, "host": hosts[0], "trailers": []}
    if tes:
        if tes[0].lower() != "chunked":
            raise StrictError("Transfer-Encoding %r" % tes[0])
        got = parse_chunked(buf, head_len)
        if got is None:
            return None
        req["body"], req["trailers"], end = got
        req["framing"] = "chunked"
    elif cls:
        if not re.fullmatch(r"0|[1-9][0-9]{0,17}", cls[0]):
            raise StrictError("Content-Length %r" % cls[0])
        n = int(cls[0])
        if len(buf) < head_len + n:
            return None
        req["body"] = bytes(buf[head_len:head_len + n])
        req["framing"] = "length"
        end = head_len + n
    else:
        req["body"] = b""
        req["framing"] = "none"
        end = head_len
    req["raw"] = bytes(buf[:end])
    return req, end


class _Conn:
    def __init__(self, cid, sock):
        self.id = cid
        self.sock = sock
        self.raw = bytearray()      # every byte received, in order
        self.pending = bytearray()  # received, not yet parsed into a request
        self.requests = []
        self.error = None
        self.closed = False         # we saw EOF/reset or closed it ourselves
        self.eof_mid_request = False


class RecordingUpstream:
    """One selector thread, strict parsing, every byte recorded; see the module docstring."""

    def __init__(self):
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(512)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.conns = []
        self.requests = []  # every parsed request, in arrival order (dicts with conn, seq, rid)
        self._wake_r, self._wake_w = socket.socketpair()
        self._syncs = []
        self._stop = False
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, "listen")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self._stop = True
        self._wake_w.send(b"x")
        self.thread.join(5)
        for c in self.conns:
            try:
                c.sock.close()
            except OSError:
                pass
        self.lsock.close()

    # ---- test-facing -------------------------------------------------
    def sync(self, timeout=5.0):
        """Returns once every byte already in the upstream's sockets has been read and parsed."""
        ev = threading.Event()
        with self.lock:
            self._syncs.append(ev)
        self._wake_w.send(b"s")
        if not ev.wait(timeout):
            raise AssertionError("recording upstream did not sync within %.1fs" % timeout)

    def mark(self):
        with self.lock:
            return len(self.requests), len(self.conns)

    def requests_since(self, mark):
        with self.lock:
            return list(self.requests[mark[0]:])

    def errors(self):
        with self.lock:
            return [(c.id, c.error, bytes(c.raw[-300:])) for c in self.conns if c.error]

    def open_with_partial_request(self):
        """Open connections holding bytes that are not (yet) a whole request."""
        with self.lock:
            return [(c.id, bytes(c.pending[:300])) for c in self.conns if not c.closed and c.pending]

    def bytes_received(self):
        """Every byte received so far, over all connections."""
        with self.lock:
            return sum(len(c.raw) for c in self.conns)

    def conns_since(self, mark):
        with self.lock:
            return list(self.conns[mark[1]:])

    # ---- loop ----------------------------------------------------------
    def _loop(self):
        while not self._stop:
            for key, _ in self.sel.select(1.0):
                self._dispatch(key)
            self._drain_syncs()

    def _dispatch(self, key):
        if key.data == "listen":
            self._accept()
        elif key.data == "wake":
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        else:
            self._read(key.data)

    def _drain_syncs(self):
        with self.lock:
            if not self._syncs:
                return
        # Read until no socket has anything left (accepts included), then release the waiters.
        for _ in range(1000):
            ready = [k for k, _ in self.sel.select(0) if k.data != "wake"]
            if not ready:
                break
            for key in ready:
                self._dispatch(key)
        with self.lock:
            syncs, self._syncs = self._syncs, []
        for ev in syncs:
            ev.set()

    def _accept(self):
        while True:
            try:
                s, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            with self.lock:
                c = _Conn(len(self.conns), s)
                self.conns.append(c)
            self.sel.register(s, selectors.EVENT_READ, c)

    def _close(self, c):
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        try:
            c.sock.close()
        except OSError:
            pass
        with self.lock:
            c.closed = True

    def _read(self, c):
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            with self.lock:
                c.eof_mid_request = bool(c.pending)
            self._close(c)
            return
        with self.lock:
            c.raw += data
            c.pending += data
        self._parse(c)

    def _parse(self, c):
        while c.pending and not c.closed:
            try:
                got = parse_request(c.pending)
            except StrictError as e:
                with self.lock:
                    c.error = str(e)
                self._send(c, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self._close(c)
                return
            if got is None:
                return
            req, n = got
            with self.lock:
                del c.pending[:n]
                req["conn"] = c.id
                req["seq"] = len(c.requests)
                req["rid"] = "c%d-r%d" % (c.id, req["seq"])
                c.requests.append(req)
                self.requests.append(req)
            self._answer(c, req)
            if any(k.lower() == "connection" and "close" in v.lower() for k, v in req["headers"]):
                self._close(c)
                return

    def _answer(self, c, req):
        body = json.dumps({"rid": req["rid"], "method": req["method"], "target": req["target"],
                           "host": req["host"], "body_len": len(req["body"]),
                           "framing": req["framing"]}).encode()
        close = any(k.lower() == "connection" and "close" in v.lower() for k, v in req["headers"])
        self._send(c, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                      b"X-Rid: %s\r\n%s\r\n%s" % (len(body), req["rid"].encode(),
                                                  b"Connection: close\r\n" if close else b"", body))

    def _send(self, c, data):
        c.sock.setblocking(True)
        c.sock.settimeout(5)
        try:
            c.sock.sendall(data)
        except OSError:
            pass
        finally:
            c.sock.setblocking(False)


class ScriptedUpstream:
    """A threaded upstream whose answers are scripted per request.

    Each connection gets a thread that reads request heads (and Content-Length bodies) and calls
    `handler(sock, req, state)`; `req` has method, target, headers, body, conn (connection
    number) and seq (request number on it), `state` is a dict per connection. The handler writes
    whatever it likes (or nothing) and returns True to read the next request on the connection,
    False to close it (it may also have closed or reset the socket itself). `idle_close`: seconds
    an idle connection is kept before the upstream closes it (a keep-alive timeout), None for never.
    """

    def __init__(self, handler, idle_close=None):
        self.handler = handler
        self.idle_close = idle_close
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(512)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.requests = []
        self.accepts = 0
        self.idle_closes = 0
        self.socks = []
        self.stopped = False

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def start(self):
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self):
        self.stopped = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        for s in list(self.socks):
            try:
                s.close()
            except OSError:
                pass

    def targets(self):
        with self.lock:
            return [r["target"] for r in self.requests]

    def _accept_loop(self):
        while not self.stopped:
            try:
                s, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                cid = self.accepts
                self.accepts += 1
                self.socks.append(s)
            threading.Thread(target=self._serve, args=(s, cid), daemon=True).start()

    def _serve(self, s, cid):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        state = {}
        seq = 0
        try:
            while True:
                s.settimeout(self.idle_close)
                while b"\r\n\r\n" not in buf:
                    try:
                        d = s.recv(65536)
                    except socket.timeout:
                        if buf:
                            raise
                        with self.lock:
                            self.idle_closes += 1
                        return
                    if not d:
                        return
                    buf += d
                s.settimeout(10)
                end = buf.index(b"\r\n\r\n") + 4
                head = bytes(buf[:end]).decode("latin-1")
                del buf[:end]
                lines = head.split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in h.split(":", 1)) for h in lines[1:] if h]
                n = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                while len(buf) < n:
                    d = s.recv(65536)
                    if not d:
                        return
                    buf += d
                body = bytes(buf[:n])
                del buf[:n]
                req = {"method": method, "target": target, "headers": headers, "body": body,
                       "conn": cid, "seq": seq}
                seq += 1
                with self.lock:
                    self.requests.append(req)
                if not self.handler(s, req, state):
                    return
        except OSError:
            return
        finally:
            try:
                s.close()
            except OSError:
                pass


def reset(sock):
    """Closes with SO_LINGER 0: the peer gets a TCP RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
