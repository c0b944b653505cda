#!/usr/bin/env python3
"""User-space bytes per idle keep-alive connection of one Ringway worker, without a burst.

  python3 benches/idle_probe.py RINGWAY_BIN N req|noreq

Starts its own origin (answers `ok`) and Ringway (benches/proxies/ringway.toml, one worker,
memory_release_after 1s) on free loopback ports, opens N connections one after another (`req`:
one GET each first; `noreq`: none), waits for two release periods, and prints
(RSS after - RSS before) / N. Opening one at a time keeps pool buffers out of the figure
(`scripts/bench.sh --only idle` opens them in bursts, and measures at once).
"""
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def origin():
    """A one-thread origin answering every request `ok`, keep-alive; returns its port."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ)

    def loop():
        while True:
            for key, _ in sel.select():
                if key.fileobj is ls:
                    c, _ = ls.accept()
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                    continue
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    continue
                for _ in range(data.count(b"\r\n\r\n")):
                    key.fileobj.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    threading.Thread(target=loop, daemon=True).start()
    return ls.getsockname()[1]


def get(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    got = b""
    while not got.endswith(b"ok"):
        more = s.recv(4096)
        if not more:
            raise SystemExit("ringway closed a connection: %r" % got)
        got += more


def main():
    binary, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    with open(os.path.join(HERE, "proxies", "ringway.toml")) as f:
        conf = (f.read().replace("@WORKERS@", "1").replace("@PORT@", str(port))
                .replace("@BACKEND_PORT@", str(origin()))
                .replace('keepalive_timeout = "60s"\n',
                         'keepalive_timeout = "60s"\nheader_timeout = "60s"\nmemory_release_after = "1s"\n', 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ringway.toml")
        with open(path, "w") as f:
            f.write(conf)
        p = subprocess.Popen([binary, "--conf", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            run(p, port, n, mode)
        finally:
            p.terminate()
            p.wait()


def run(p, port, n, mode):
    def rss():
        with open("/proc/%d/status" % p.pid) as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
        raise SystemExit("no VmRSS")

    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise SystemExit("ringway did not listen")
            time.sleep(0.02)
    get(s)
    s.close()
    time.sleep(2.5)  # two release periods: what start-up and the warm-up left is gone
    before = rss()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if mode == "req":
            get(s)
        socks.append(s)
    time.sleep(2.5)
    after = rss()
    print("%s: %d idle connections: %.0f B each (RSS %.1f -> %.1f MB)"
          % (mode, n, (after - before) / n, before / 1e6, after / 1e6))
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
