"""Raw-socket HTTP/1.1 client helpers and polling utilities for the e2e tests."""

import hashlib
import json
import socket
import subprocess
import time


def wait_until(cond, timeout, interval=0.02, what="condition"):
    """Poll cond() until truthy or the deadline passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


_HANDED_OUT = set()


def free_port():
    """A loopback port nothing is bound to now and not handed out before in this test run.
    The kernel may give a port just closed again, so two listeners set up by one test (a
    public and an admin port) could otherwise get the same one."""
    for _ in range(100):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p not in _HANDED_OUT:
            _HANDED_OUT.add(p)
            return p
    raise AssertionError("no loopback port left that this test run has not handed out")


class Response:
    def __init__(self, version, status, reason, headers):
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (name, value)
        self.trailers = []
        self.body = b""
        self.body_len = 0
        self.sha256 = None
        self.framing = None  # "length" | "chunked" | "close" | "none"
        self.chunk_exts = []

    def get(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def get_all(self, name):
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def tokens(self, name):
        out = []
        for v in self.get_all(name):
            out += [t.strip().lower() for t in v.split(",") if t.strip()]
        return out

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<Response %s %d %r headers=%r body=%r>" % (
            self.version, self.status, self.reason, self.headers, self.body[:300])


class RawConn:
    """One client TCP connection that speaks HTTP/1.1 byte-exactly."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rf = self.sock.makefile("rb", buffering=256 * 1024)

    def send(self, data):
        self.sock.sendall(data)

    def settimeout(self, t):
        self.sock.settimeout(t)

    def close(self):
        try:
            self.rf.close()
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def _line(self):
        line = self.rf.readline(1 << 20)
        if not line:
            raise EOFError("connection closed by peer")
        return line

    def read_head(self):
        line = self._line()
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            raise AssertionError("not an HTTP status line: %r" % line)
        version, status = parts[0], int(parts[1])
        reason = parts[2] if len(parts) > 2 else ""
        headers = []
        while True:
            h = self._line()
            if h in (b"\r\n", b"\n"):
                break
            assert h.endswith(b"\r\n"), "response header line not CRLF-terminated: %r" % h
            k, v = h.decode("latin-1").rstrip("\r\n").split(":", 1)
            headers.append((k, v.strip()))
        return Response(version, status, reason, headers)

    def read_response(self, method="GET", keep_body=True, allow_1xx=False):
        """Read one response (skipping 1xx interim ones unless allow_1xx)."""
        while True:
            r = self.read_head()
            if 100 <= r.status < 200 and r.status != 101 and not allow_1xx:
                continue
            break
        self._read_body(r, method, keep_body)
        return r

    def _read_body(self, r, method, keep_body):
        h = hashlib.sha256()
        parts = []
        n = 0

        def take(data):
            nonlocal n
            h.update(data)
            n += len(data)
            if keep_body:
                parts.append(data)

        te = r.tokens("transfer-encoding")
        cl = r.get("content-length")
        if method == "HEAD" or r.status in (204, 304) or 100 <= r.status < 200:
            r.framing = "none"
        elif te:
            assert te[-1] == "chunked", "response TE without chunked last: %r" % te
            r.framing = "chunked"
            while True:
                line = self._line().decode("latin-1").rstrip("\r\n")
                size_s, _, ext = line.partition(";")
                if ext:
                    r.chunk_exts.append(ext)
                size = int(size_s.strip(), 16)
                if size == 0:
                    break
                left = size
                while left:
                    d = self.rf.read1(min(left, 1 << 20))
                    if not d:
                        raise EOFError("chunk truncated")
                    take(d)
                    left -= len(d)
                assert self._line() == b"\r\n", "missing CRLF after chunk data"
            while True:
                t = self._line()
                if t == b"\r\n":
                    break
                k, v = t.decode("latin-1").rstrip("\r\n").split(":", 1)
                r.trailers.append((k, v.strip()))
        elif cl is not None:
            r.framing = "length"
            left = int(cl)
            while left:
                d = self.rf.read1(min(left, 1 << 20))
                if not d:
                    raise EOFError("body truncated: %d bytes missing" % left)
                take(d)
                left -= len(d)
        else:
            r.framing = "close"
            while True:
                try:
                    d = self.rf.read1(1 << 20)
                except ConnectionResetError:
                    break
                if not d:
                    break
                take(d)
        r.body = b"".join(parts)
        r.body_len = n
        r.sha256 = h.hexdigest()

    def is_closed(self, timeout=3.0):
        """True if the peer closes (EOF or RST) within timeout with no further bytes."""
        self.sock.settimeout(timeout)
        try:
            extra = self.rf.read1(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except (socket.timeout, TimeoutError):
            return False
        if extra:
            raise AssertionError("unexpected bytes after response: %r" % extra[:200])
        return True


def request_bytes(method, target, host="test.local", headers=(), body=b"", version="HTTP/1.1",
                  content_length=True):
    lines = ["%s %s %s" % (method, target, version)]
    if host is not None:
        lines.append("Host: %s" % host)
    lines += ["%s: %s" % kv for kv in headers]
    if body and content_length:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def simple_get(port, target="/echo", host="test.local", headers=(), timeout=10.0):
    with RawConn(port, timeout=timeout) as c:
        c.send(request_bytes("GET", target, host=host, headers=list(headers) + [("Connection", "close")]))
        return c.read_response()


def header_map(pairs):
    """Lower-cased name -> list of values, from a list of [name, value]."""
    m = {}
    for k, v in pairs:
        m.setdefault(k.lower(), []).append(v)
    return m


def assert_json_error(r, status):
    assert r.status == status, "expected %d, got %r" % (status, r)
    ctype = (r.get("content-type") or "").lower()
    assert "json" in ctype, "error response content-type is not JSON: %r" % r
    doc = json.loads(r.body)
    err = doc.get("error")
    assert isinstance(err, dict), "no error object in %r" % doc
    for key in ("message", "type", "code"):
        assert key in err, "error.%s missing in %r" % (key, doc)
    assert isinstance(err["type"], str) and err["type"], "error.type empty in %r" % doc
    assert isinstance(err["message"], str) and err["message"], "error.message empty in %r" % doc
    return err


def stop_process(proc, timeout=3.0):
    """Stops a child that exits when its stdin closes (the test servers do); SIGKILL if it has
    not within `timeout` seconds."""
    if proc.poll() is not None:
        return
    try:
        proc.stdin.close()
    except (OSError, AttributeError):
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
