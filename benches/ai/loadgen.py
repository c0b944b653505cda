#!/usr/bin/env python3
"""Load generator for benches/ai/run.sh (asyncio Protocol; uvloop when installed). Prints one JSON
object on stdout.

  loadgen.py rate    --port P --rate R --duration S [--warmup W] [--timeout T] [--pids PID,...]

Common: --host (127.0.0.1), --path (/v1/chat/completions), --key (sent as
`Authorization: Bearer KEY`, default sk-bench), --model (gpt-mock).

rate: OPEN LOOP at a constant rate: request i is due at start + i / R, whatever the answers do
(wrk2's model, not wrk's closed loop). A due request takes an idle keep-alive connection or opens
a new one (at most --max-conns, then it queues in the generator, which shows as lag). Requests
due in the first W seconds are warm-up and not counted. Reported for the measured ones:
latency = answer complete - dispatch (the moment the generator took it up, before any connect),
p50/p90/p99/max; lag = dispatch - due (how far the generator itself fell behind: p99, max); the
same latency measured from the due time (p99); statuses; errors (connect/reset/bad response),
timeouts (no complete answer in T s); achieved rate = 200 answers completed inside the measured
window / S. CPU: utime+stime of the --pids process trees (all descendants, all threads) from the
first measured dispatch until every measured request has finished, / CLK_TCK, / 200 answers.

The 2,000-stream scenario has its own client (benches/ai/tools, `aibench streams`): Python could
not read 100,000 frames a second on the core it shares with the mock.
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time

try:
    import uvloop  # type: ignore
except ImportError:  # pragma: no cover
    uvloop = None

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Timestamps: perf_counter, not loop.time() (uvloop's clock has millisecond resolution).
now_ = time.perf_counter


# ---------------------------------------------------------------- /proc
def tree(roots):
    """roots and all their descendants (one pass over /proc)."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d, "rb") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_ticks(pids):
    t = 0
    for p in pids:
        try:
            with open("/proc/%d/stat" % p, "rb") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rfind(b")") + 2:].split()
        t += int(fields[11]) + int(fields[12])
    return t


def rss_kb(pids):
    t = 0
    for p in pids:
        try:
            with open("/proc/%d/status" % p, "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        t += int(line.split()[1])
                        break
        except OSError:
            continue
    return t


def pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(q / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[i]


def ms_stats(vals):
    v = sorted(vals)
    r = lambda x: None if x is None else round(x * 1000.0, 3)
    return {"n": len(v), "p50_ms": r(pct(v, 50)), "p90_ms": r(pct(v, 90)), "p99_ms": r(pct(v, 99)),
            "max_ms": r(v[-1] if v else None),
            "mean_ms": r(statistics.fmean(v) if v else None)}


def request_bytes(a, body):
    return (("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
             "Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n")
            % (a.path, a.host, a.port, a.key, len(body))).encode() + body


# ---------------------------------------------------------------- one HTTP/1.1 response reader
class Resp:
    """Incremental response framing: Content-Length, chunked, or until close."""
    __slots__ = ("buf", "status", "hend", "mode", "left", "close", "done")

    def __init__(self):
        self.buf = bytearray()
        self.status = 0
        self.hend = -1
        self.mode = None
        self.left = 0
        self.close = False
        self.done = False

    def feed(self, data):
        """Returns the count of bytes of `data` left over after a complete response (-1: not done)."""
        self.buf += data
        if self.hend < 0:
            e = self.buf.find(b"\r\n\r\n")
            if e < 0:
                return -1
            head = bytes(self.buf[:e]).lower()
            self.status = int(head[9:12])
            self.hend = e + 4
            del self.buf[:self.hend]
            self.close = b"\r\nconnection: close" in head
            i = head.find(b"\r\ncontent-length:")
            if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
                self.mode = "chunked"
            elif i >= 0:
                j = head.find(b"\r\n", i + 2)
                self.mode = "cl"
                self.left = int(head[i + 17: j if j >= 0 else len(head)])
            else:
                self.mode = "eof"
                self.close = True
        if self.mode == "cl":
            if len(self.buf) >= self.left:
                self.done = True
                return len(self.buf) - self.left
            return -1
        if self.mode == "chunked":
            # The end is the zero-size chunk; bodies here have no trailers.
            while True:
                k = self.buf.find(b"\r\n")
                if k < 0:
                    return -1
                size = int(bytes(self.buf[:k]).split(b";")[0], 16)
                if size == 0:
                    if len(self.buf) >= k + 4:
                        self.done = True
                        return len(self.buf) - (k + 4)
                    return -1
                if len(self.buf) < k + 2 + size + 2:
                    return -1
                del self.buf[:k + 2 + size + 2]
        return -1


# ---------------------------------------------------------------- rate mode
class RateConn(asyncio.Protocol):
    def __init__(self, gen):
        self.gen = gen
        self.t = None
        self.req = None        # (index, due, dispatch) in flight
        self.resp = None

    def connection_made(self, t):
        self.t = t

    def send(self, req):
        self.req = req
        self.resp = Resp()
        self.t.write(self.gen.payload)

    def data_received(self, data):
        if self.req is None:
            self.t.close()
            return
        extra = self.resp.feed(data)
        if extra < 0:
            return
        req, resp = self.req, self.resp
        self.req = self.resp = None
        self.gen.finished(req, resp.status, None)
        if resp.close or extra > 0:
            self.t.close()
            self.t = None
        else:
            self.gen.release(self)

    def connection_lost(self, exc):
        self.t = None
        if self.req is not None:
            req, self.req = self.req, None
            if self.resp is not None and self.resp.mode == "eof" and self.resp.status:
                self.gen.finished(req, self.resp.status, None)
            else:
                self.gen.finished(req, 0, "reset" if exc else "closed")
        self.gen.lost(self)


class RateGen:
    def __init__(self, a, loop):
        self.a, self.loop = a, loop
        body = json.dumps({"model": a.model, "max_tokens": 64, "messages": [
            {"role": "user", "content": "Say hello to the benchmark, in one short sentence."}]},
            separators=(",", ":")).encode()
        self.payload = request_bytes(a, body)
        self.idle = []
        self.conns = 0
        self.queue = []        # requests waiting for a connection (conns at max)
        self.inflight = {}     # conn -> req
        self.lat, self.lat_due, self.lag = [], [], []
        self.status = {}
        self.errors = {}
        self.timeouts = 0
        self.ok_in_window = 0
        self.outstanding = 0
        self.all_done = asyncio.Event()
        self.dispatching = True
        self.dump = [] if a.dump else None
        self.unaccounted = 0

    def measured(self, req):
        return req[0] >= self.n_warm

    def dispatch(self, req):
        if self.idle:
            c = self.idle.pop()
            self.inflight[c] = req
            c.send(req)
        elif self.conns < self.a.max_conns:
            self.conns += 1
            self.loop.create_task(self.connect(req))
        else:
            self.queue.append(req)

    def slot_freed(self):
        """A connection slot came free: a request queued for one gets a new connection."""
        self.conns -= 1
        if self.queue and self.conns < self.a.max_conns:
            self.conns += 1
            self.loop.create_task(self.connect(self.queue.pop(0)))

    def count_timeout(self, req):
        if self.measured(req):
            self.timeouts += 1
            self.lag.append(req[2] - req[1])
            self.outstanding -= 1
            if self.outstanding == 0 and not self.dispatching:
                self.all_done.set()

    async def connect(self, req):
        try:
            _, c = await asyncio.wait_for(
                self.loop.create_connection(lambda: RateConn(self), self.a.host, self.a.port),
                max(0.001, req[2] + self.a.timeout - now_()))
        except asyncio.TimeoutError:
            self.slot_freed()
            self.count_timeout(req)
            return
        except OSError as e:
            self.slot_freed()
            self.finished(req, 0, "connect:" + type(e).__name__)
            return
        self.inflight[c] = req
        c.send(req)

    def release(self, c):
        self.inflight.pop(c, None)
        if self.queue:
            req = self.queue.pop(0)
            self.inflight[c] = req
            c.send(req)
        else:
            self.idle.append(c)

    def lost(self, c):
        self.inflight.pop(c, None)
        try:
            self.idle.remove(c)
        except ValueError:
            pass
        self.slot_freed()

    def finished(self, req, status, err):
        if len(req) == 4:          # already counted as a timeout
            return
        now = now_()
        idx, due, disp = req
        if self.measured(req):
            if err:
                self.errors[err] = self.errors.get(err, 0) + 1
            else:
                self.status[status] = self.status.get(status, 0) + 1
                if status == 200:
                    self.lat.append(now - disp)
                    if self.dump is not None:
                        self.dump.append((idx, disp - self.t_m0, now - disp))
                    self.lat_due.append(now - due)
                    if now <= self.t_m0 + self.a.duration:
                        self.ok_in_window += 1
            self.lag.append(disp - due)
            self.outstanding -= 1
            if self.outstanding == 0 and not self.dispatching:
                self.all_done.set()

    async def watchdog(self):
        while True:
            await asyncio.sleep(0.1)
            now = now_()
            while self.queue and now - self.queue[0][2] > self.a.timeout:
                self.count_timeout(self.queue.pop(0))   # never got a connection
            for c, req in list(self.inflight.items()):
                if len(req) == 3 and now - req[2] > self.a.timeout:
                    self.count_timeout(req)
                    self.inflight[c] = req + (True,)
                    c.req = req + (True,)
                    if c.t is not None:
                        c.t.abort()
            if self.outstanding == 0 and not self.dispatching:
                self.all_done.set()

    async def run(self):
        a = self.a
        total = int(round(a.rate * (a.warmup + a.duration)))
        self.n_warm = int(round(a.rate * a.warmup))
        self.outstanding = total - self.n_warm
        pids = [int(p) for p in a.pids.split(",") if p] if a.pids else []
        wd = self.loop.create_task(self.watchdog())
        start = now_() + 0.05
        self.t_m0 = start + self.n_warm / a.rate
        step = 1.0 / a.rate
        i = 0
        c0 = None
        while i < total:
            now = now_()
            while i < total and start + i * step <= now:
                if i == self.n_warm:
                    procs = tree(pids)
                    c0 = cpu_ticks(procs)
                    w0 = time.time()
                self.dispatch((i, start + i * step, now))
                i += 1
            if i < total:
                await asyncio.sleep(max(0.0, start + i * step - now_()))
        self.dispatching = False
        if self.outstanding == 0:
            self.all_done.set()
        try:
            await asyncio.wait_for(self.all_done.wait(), a.timeout + 5)
        except asyncio.TimeoutError:
            # Safety net: whatever is still outstanding is counted as timed out, and said so.
            self.unaccounted = self.outstanding
            self.timeouts += self.outstanding
        c1 = cpu_ticks(procs) if pids else 0
        w1 = time.time()
        wd.cancel()
        if self.dump is not None:
            with open(a.dump, "w") as f:
                for idx, t, lat in self.dump:
                    f.write("%d\t%.6f\t%.6f\n" % (idx, t, lat * 1000.0))
        ok = self.status.get(200, 0)
        cpu_us = (c1 - c0) / CLK_TCK * 1e6 if pids else None
        return {
            "mode": "rate", "port": a.port, "rate": a.rate, "duration_s": a.duration,
            "warmup_s": a.warmup, "sent": total - self.n_warm,
            "ok": ok, "status": {str(k): v for k, v in sorted(self.status.items())},
            "errors": self.errors, "timeouts": self.timeouts, "unaccounted": self.unaccounted,
            "achieved_rps": round(self.ok_in_window / a.duration, 1),
            "latency": ms_stats(self.lat), "latency_from_due_p99_ms": ms_stats(self.lat_due)["p99_ms"],
            "lag": ms_stats(self.lag), "connections_opened_max": a.max_conns,
            "conns_at_end": self.conns, "cpu_s": None if cpu_us is None else round(cpu_us / 1e6, 3),
            "cpu_us_per_req": None if not pids or ok == 0 else round(cpu_us / ok, 2),
            "cpu_window_s": round(w1 - w0, 3) if pids else None, "pids": procs if pids else [],
        }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["rate"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--key", default="sk-bench")
    ap.add_argument("--model", default="gpt-mock")
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--timeout", type=float, default=5)
    ap.add_argument("--max-conns", type=int, default=4000)
    ap.add_argument("--pids", default="")
    ap.add_argument("--dump", default="", help="rate: write index, dispatch s, latency ms per 200 answer")
    a = ap.parse_args()
    loop = uvloop.new_event_loop() if uvloop else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    gen = RateGen(a, loop)
    res = loop.run_until_complete(gen.run())
    res["loop"] = "uvloop" if uvloop else "asyncio"
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
