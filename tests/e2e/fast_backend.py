"""A minimal, fast origin for load-style e2e tests: every request head gets a canned 200.

One thread, one selector, non-blocking sockets; requests are counted by their blank line
(`\\r\\n\\r\\n`), so it only serves requests without a body (GET). Run as a program, it binds
127.0.0.1 on a free port, prints `PORT <n>` and serves until its stdin closes.
"""

import os
import selectors
import socket
import subprocess
import sys
import threading

RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n"
            b"x-backend: fast\r\n\r\nok")


def serve(lsock, stop):
    sel = selectors.DefaultSelector()
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    state = {}  # sock -> [tail bytes, pending output bytearray]
    while not stop.is_set():
        for key, ev in sel.select(0.2):
            s = key.fileobj
            if s is lsock:
                try:
                    c, _ = lsock.accept()
                except OSError:
                    continue
                c.setblocking(False)
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                state[c] = [b"", bytearray()]
                sel.register(c, selectors.EVENT_READ, None)
                continue
            st = state[s]
            if ev & selectors.EVENT_READ:
                try:
                    d = s.recv(1 << 18)
                except (BlockingIOError, InterruptedError):
                    d = None
                except OSError:
                    d = b""
                if d == b"":
                    sel.unregister(s)
                    del state[s]
                    s.close()
                    continue
                if d:
                    buf = st[0] + d
                    n = buf.count(b"\r\n\r\n")
                    st[0] = buf[-3:]
                    if n:
                        st[1] += RESPONSE * n
            if st[1]:
                try:
                    sent = s.send(st[1])
                    del st[1][:sent]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    sel.unregister(s)
                    del state[s]
                    s.close()
                    continue
                sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if st[1] else 0), None)
    for s in list(state):
        s.close()


class FastBackend:
    """This program in its own process (own GIL), on a free port: a canned 200 for every GET."""

    def __init__(self):
        from helpers import port_open, wait_until
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("PORT "), "fast backend did not start: %r" % line
        self.port = int(line.split()[1])
        wait_until(lambda: port_open(self.port), 10, what="the fast backend")

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def stop(self):
        from helpers import stop_process
        stop_process(self.proc)


def main():
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(lsock, stop), daemon=True)
    t.start()
    sys.stdout.write("PORT %d\n" % lsock.getsockname()[1])
    sys.stdout.flush()
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    stop.set()
    t.join(2)


if __name__ == "__main__":
    main()
