#!/usr/bin/env python3
"""User-space bytes per idle keep-alive connection of one Ringway worker, without a burst.

  python3 benches/idle_probe.py RINGWAY_BIN N req|noreq

Starts its own origin (127.0.0.1:18792, answers `ok`) and Ringway (127.0.0.1:18791, one worker,
memory_release_after 1s), opens N connections one after another (`req`: one GET each first;
`noreq`: none), waits 3 s, and prints (RSS after - RSS before) / N. Opening one at a time keeps
pool buffers out of the figure (bench.sh idle opens them in bursts)."""
import os
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time

h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
BIN = sys.argv[1]; N = int(sys.argv[2]); MODE = sys.argv[3]
# tiny upstream: answers every request 200 "ok", keep-alive
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind(("127.0.0.1", 18792)); ls.listen(4096); ls.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(ls, selectors.EVENT_READ)
def loop():
    while True:
        for k, _ in sel.select():
            if k.fileobj is ls:
                c, _ = ls.accept(); c.setblocking(False); sel.register(c, selectors.EVENT_READ)
            else:
                try:
                    d = k.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                if not d:
                    sel.unregister(k.fileobj); k.fileobj.close(); continue
                for _ in range(d.count(b"\r\n\r\n")):
                    k.fileobj.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
threading.Thread(target=loop, daemon=True).start()
conf = """[server]
workers = 1
pin_cores = false
keepalive_timeout = "60s"
header_timeout = "60s"
memory_release_after = "1s"
[[listeners]]
name = "p"
address = "127.0.0.1:18791"
[[upstreams]]
name = "b"
endpoints = ["127.0.0.1:18792"]
[[routes]]
name = "r"
match = { path_prefix = "/" }
upstream = "b"
"""
open("/tmp/idle_probe.toml", "w").write(conf)
p = subprocess.Popen([BIN, "--conf", "/tmp/idle_probe.toml"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
def rss():
    for l in open("/proc/%d/status" % p.pid):
        if l.startswith("VmRSS"):
            return int(l.split()[1]) * 1024
def get(s):
    s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    b = b""
    while not b.endswith(b"ok"):
        b += s.recv(4096)
for _ in range(3):
    s = socket.create_connection(("127.0.0.1", 18791)); get(s); s.close()
time.sleep(2.5)
r0 = rss()
socks = []
for i in range(N):
    s = socket.create_connection(("127.0.0.1", 18791))
    if MODE == "req":
        get(s)
    socks.append(s)
time.sleep(3)
r1 = rss()
print("%s: %d idle connections: %.0f B each (RSS %.1f -> %.1f MB)" % (MODE, N, (r1 - r0) / N, r0 / 1e6, r1 / 1e6))
p.terminate(); p.wait()
