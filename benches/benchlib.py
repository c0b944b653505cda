#!/usr/bin/env python3
"""Helpers for scripts/bench.sh (standard library only).

  benchlib.py freeports N                     print N free TCP ports on 127.0.0.1
  benchlib.py parse-wrk FILE                  wrk --latency output -> one TSV line
  benchlib.py idle HOST PORT N PATH READYFILE [tls]
                                              open N keep-alive connections, one request each,
                                              write "ok failed" to READYFILE, hold them until
                                              SIGTERM, then print how many were still open;
                                              "tls": each connection is a TLS handshake first
                                              (Python ssl, no verification, SNI localhost)
  benchlib.py tls-resume HOST PORT PATH       3 TLS connections, each one GET (Connection: close),
                                              the 2nd and 3rd offering the previous session:
                                              prints version, cipher and new/reused per connection
  benchlib.py report RESULTS.tsv META.txt     markdown report on stdout
"""
import os
import random
import re
import resource
import select
import signal
import socket
import ssl
import statistics
import sys
import time

PROXIES = ["ringway", "nginx", "haproxy"]


# ---------------------------------------------------------------- free ports
def freeports(n):
    """Prints n free loopback ports below the kernel's ephemeral range: a port from that
    range can be taken, between runs, by a client or upstream connection's local end (2,000
    streams open thousands of them), and a gateway restarted on it then fails to bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    socks, ports = [], []
    for _ in range(1000):
        if len(ports) == n:
            break
        p = rng.randrange(10000, max(low, 10001))
        if p in ports or p in (8080, 9901, 6379):
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            s.close()
            continue
        socks.append(s)
        ports.append(p)
    # Fallback: whatever the kernel hands out.
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


# ---------------------------------------------------------------- wrk output
_LAT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_SIZE = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def _lat_ms(tok):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", tok)
    return float(m.group(1)) * _LAT[m.group(2)] if m else float("nan")


def parse_wrk(path):
    """Fields: requests rps p50_ms p99_ms bytes_read non2xx sock_errors"""
    txt = open(path, errors="replace").read()
    req = re.search(r"^\s*(\d+) requests in ([0-9.]+\w+), ([0-9.]+)(B|KB|MB|GB|TB) read", txt, re.M)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", txt, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", txt, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", txt, re.M)
    non2 = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", txt)
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", txt)
    requests = int(req.group(1)) if req else 0
    bytes_read = int(float(req.group(3)) * _SIZE[req.group(4)]) if req else 0
    sock = sum(int(x) for x in se.groups()) if se else 0
    sock_detail = "c%s/r%s/w%s/t%s" % se.groups() if se else "0"
    print("\t".join(str(x) for x in [
        requests,
        rps.group(1) if rps else "0",
        "%.4f" % (_lat_ms(p50.group(1)) if p50 else float("nan")),
        "%.4f" % (_lat_ms(p99.group(1)) if p99 else float("nan")),
        bytes_read,
        non2.group(1) if non2 else 0,
        sock,
        sock_detail,
    ]))


# ---------------------------------------------------------------- idle connections
def _client_ctx():
    # Certificates are made at run time and self-signed: no verification. Cipher suites and
    # groups come from OPENSSL_CONF (bench.sh pins TLS 1.3, TLS_AES_128_GCM_SHA256, X25519).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def idle(host, port, n, path, readyfile, tls=False):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, n + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (path, host, port)).encode()
    ctx = _client_ctx() if tls else None
    conns, failed, batch = [], 0, 500
    t0 = time.time()
    while len(conns) + failed < n:
        todo = min(batch, n - len(conns) - failed)
        cur = []
        for _ in range(todo):
            try:
                s = socket.create_connection((host, port), timeout=10)
                if ctx is not None:
                    s = ctx.wrap_socket(s, server_hostname="localhost")   # full handshake
                s.sendall(req)
                cur.append(s)
            except OSError:   # ssl.SSLError is an OSError
                failed += 1
        for s in cur:
            try:
                if _read_response(s):
                    conns.append(s)
                else:
                    failed += 1
                    s.close()
            except OSError:
                failed += 1
                s.close()
    elapsed = time.time() - t0
    with open(readyfile + ".tmp", "w") as f:
        f.write("%d %d %.2f\n" % (len(conns), failed, elapsed))
    os.rename(readyfile + ".tmp", readyfile)

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.1)
    # How many are still open? A closed one is readable and returns b"".
    closed = 0
    for s in conns:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                closed += 1
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            closed += 1
    print("idle: opened %d failed %d still_open %d" % (len(conns), failed, len(conns) - closed))
    for s in conns:
        s.close()


def tls_resume(host, port, path):
    ctx = _client_ctx()
    sess, out = None, []
    req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (path, host, port)).encode()
    for _ in range(3):
        s = ctx.wrap_socket(socket.create_connection((host, port), timeout=10),
                            server_hostname="localhost", session=sess)
        s.sendall(req)
        status = b"?"
        data = b""
        while True:
            try:
                c = s.recv(65536)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not c:
                break
            data += c
        if data.startswith(b"HTTP/1.1 "):
            status = data.split(b" ", 2)[1]
        out.append("%s/%s/%s/%s" % (s.version(), s.cipher()[0], "reused" if s.session_reused else "new",
                                    status.decode(errors="replace")))
        sess = s.session
        s.close()
    print(" ".join(out))


def _read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status = head.split(b" ", 2)[1]
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    need = int(m.group(1)) if m else 0
    while len(body) < need:
        chunk = s.recv(65536)
        if not chunk:
            return False
        body += chunk
    return status == b"200"


# ---------------------------------------------------------------- report
def med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def fnum(x, nd=1):
    if x != x:
        return "n/a"
    return "{:,.{}f}".format(x, nd)


def ratio(a, b):
    if a != a or b != b or b == 0:
        return "n/a"
    return "%.2f×" % (a / b)


def report(tsv, meta):
    rows = [l.rstrip("\n").split("\t") for l in open(tsv) if l.strip() and not l.startswith("#")]
    out = []
    w = out.append
    w(open(meta).read().rstrip() + "\n")

    # wrk scenarios: kind scenario proxy round requests rps p50 p99 cpu_us_per_req hwm_kb bytes_read
    #                non2xx sockerr sockdetail bytes_ok
    wrk_rows = [r for r in rows if r[0] == "wrk"]
    scen_order = []
    for r in wrk_rows:
        if r[1] not in scen_order:
            scen_order.append(r[1])
    summary = []
    meds = {}
    for sc in scen_order:
        desc = next(r[15] for r in wrk_rows if r[1] == sc)
        w("\n### %s — %s\n" % (sc, desc))
        w("| proxy | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MiB | req/s vs nginx | p99 vs nginx | CPU vs nginx | RSS vs nginx | runs | non-2xx | socket errors | check |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        m = {}
        for p in PROXIES:
            rs = [r for r in wrk_rows if r[1] == sc and r[2] == p]
            if not rs:
                continue
            m[p] = dict(
                rps=med([float(r[5]) for r in rs]),
                p50=med([float(r[6]) for r in rs]),
                p99=med([float(r[7]) for r in rs]),
                cpu=med([float(r[8]) for r in rs]),
                rss=med([float(r[9]) / 1024 for r in rs]),
                non2=sum(int(r[11]) for r in rs),
                sock=sum(int(r[12]) for r in rs),
                sockd=",".join(r[13] for r in rs if r[13] != "0"),
                bytes_ok=all(r[14] == "ok" for r in rs),
                n=len(rs),
            )
        meds[sc] = m
        n = m.get("nginx")
        for p, x in m.items():
            flag = "ok"
            if x["non2"] or x["sock"] or not x["bytes_ok"]:
                flag = "**FLAGGED**" + ("" if x["bytes_ok"] else " (short bodies)")
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d | %d | %s | %s |" % (
                p, fnum(x["rps"], 0), fnum(x["p50"], 2), fnum(x["p99"], 2), fnum(x["cpu"], 2),
                fnum(x["rss"], 1),
                ratio(x["rps"], n["rps"]) if n else "n/a",
                ratio(x["p99"], n["p99"]) if n else "n/a",
                ratio(x["cpu"], n["cpu"]) if n else "n/a",
                ratio(x["rss"], n["rss"]) if n else "n/a",
                x["n"], x["non2"], x["sock"] if not x["sockd"] else "%d (%s)" % (x["sock"], x["sockd"]),
                flag))
        parts = []
        for p, x in m.items():
            parts.append("%s %s req/s (%s), p99 %s ms (%s), %s µs/req (%s)%s" % (
                p, fnum(x["rps"], 0), ratio(x["rps"], n["rps"]) if n else "n/a",
                fnum(x["p99"], 2), ratio(x["p99"], n["p99"]) if n else "n/a",
                fnum(x["cpu"], 2), ratio(x["cpu"], n["cpu"]) if n else "n/a",
                "" if (not x["non2"] and not x["sock"] and x["bytes_ok"]) else " [ERRORS]"))
        summary.append("%s: %s" % (sc, "; ".join(parts)))

    # 1 GiB download: dl scenario target round http_code size speed_Bps cpu_ms hwm_kb
    dl = [r for r in rows if r[0] == "dl"]
    dlm = {}
    if dl:
        w("\n### download1g — 1 GiB GET with curl, through each proxy and direct to the backend\n")
        w("| target | MiB/s | vs direct | proxy CPU s per GiB | peak RSS MiB | runs | all 200 + 1073741824 bytes |")
        w("|---|---|---|---|---|---|---|")
        for t in ["direct"] + PROXIES:
            rs = [r for r in dl if r[2] == t]
            if not rs:
                continue
            sp = med([float(r[6]) / 2**20 for r in rs])
            cpu = med([float(r[7]) / 1000 for r in rs]) if t != "direct" else float("nan")
            rss = med([float(r[8]) / 1024 for r in rs]) if t != "direct" else float("nan")
            ok = all(r[4] == "200" and r[5] == "1073741824" for r in rs)
            dlm[t] = dict(speed=sp, ok=ok)
            w("| %s | %s | %s | %s | %s | %d | %s |" % (
                t, fnum(sp, 0), "%.0f%%" % (100 * sp / dlm["direct"]["speed"]) if "direct" in dlm else "n/a",
                fnum(cpu, 2) if t != "direct" else "—", fnum(rss, 1) if t != "direct" else "—",
                len(rs), "yes" if ok else "**NO** (%s)" % ",".join(r[4] + "/" + r[5] for r in rs)))
        if "direct" in dlm:
            summary.append("download1g: direct %s MiB/s; %s" % (fnum(dlm["direct"]["speed"], 0), "; ".join(
                "%s %s MiB/s (%.0f%% of direct)%s" % (t, fnum(dlm[t]["speed"], 0),
                                                       100 * dlm[t]["speed"] / dlm["direct"]["speed"],
                                                       "" if dlm[t]["ok"] else " [ERRORS]")
                for t in PROXIES if t in dlm)))

    # idle: idle scenario proxy n_open n_failed still_open rss_before_kb rss_after_kb wanted round
    # (scenario "idle": plain keep-alive connections; "tls-idle": TLS keep-alive connections)
    idl = [r for r in rows if r[0] == "idle"]
    idm = {}      # the plain idle scenario (its target below)
    idle_all = {}
    for isc in [s for i, s in enumerate(r[1] for r in idl) if s not in [r[1] for r in idl][:i]]:
        irows = [r for r in idl if r[1] == isc]
        want = irows[0][8]
        if isc == "idle":
            w("\n### idle%s — %s idle keep-alive connections (one GET /hello each), proxy RSS before and after\n" % ("", want))
        else:
            w("\n### %s — %s idle TLS keep-alive connections (a TLS 1.3 handshake and one GET /hello each, Python ssl), proxy RSS before and after\n" % (isc, want))
        w("| proxy | RSS before MiB | RSS after MiB | user-space bytes per idle conn | vs nginx | opened | failed | still open at end | runs |")
        w("|---|---|---|---|---|---|---|---|---|")
        im = {}
        for p in PROXIES:
            rs = [r for r in irows if r[2] == p]
            if not rs:
                continue
            im[p] = dict(
                per=med([(float(r[7]) - float(r[6])) * 1024 / max(1, int(r[3])) for r in rs]),
                before=med([float(r[6]) / 1024 for r in rs]), after=med([float(r[7]) / 1024 for r in rs]),
                opened=min(int(r[3]) for r in rs), failed=max(int(r[4]) for r in rs),
                still=min(int(r[5]) for r in rs), n=len(rs))
        for p, x in im.items():
            w("| %s | %s | %s | %s | %s | %d | %d | %d | %d |" % (
                p, fnum(x["before"], 1), fnum(x["after"], 1), fnum(x["per"], 0),
                ratio(x["per"], im["nginx"]["per"]) if "nginx" in im else "n/a",
                x["opened"], x["failed"], x["still"], x["n"]))
        summary.append("%s: " % isc + "; ".join("%s %s B/conn (opened %d, failed %d, still open %d)" % (
            p, fnum(x["per"], 0), x["opened"], x["failed"], x["still"]) for p, x in im.items()))
        idle_all[isc] = im
        if isc == "idle":
            idm = im

    # Ringway A/B: ab scenario variant round requests rps p50 p99 cpu_us hwm_kb bytes non2 sock sockd
    #             check redis_cmds_per_req redis_cpu_us_per_req frames_per_response client_frames desc
    ab = [r for r in rows if r[0] == "ab"]
    abm = {}
    for sc in [s for i, s in enumerate(r[1] for r in ab) if s not in [r[1] for r in ab][:i]]:
        rs_sc = [r for r in ab if r[1] == sc]
        desc = rs_sc[0][19]
        fpr = int(rs_sc[0][17])
        m = {}
        for v in [x for i, x in enumerate(r[2] for r in rs_sc) if x not in [r[2] for r in rs_sc][:i]]:
            rs = [r for r in rs_sc if r[2] == v]
            m[v] = dict(
                rps=med([float(r[5]) for r in rs]), p50=med([float(r[6]) for r in rs]),
                p99=med([float(r[7]) for r in rs]), cpu=med([float(r[8]) for r in rs]),
                rss=med([float(r[9]) / 1024 for r in rs]),
                redis=med([float(r[15]) for r in rs]), redis_cpu=med([float(r[16]) for r in rs]),
                non2=sum(int(r[11]) for r in rs), sock=sum(int(r[12]) for r in rs),
                sockd=",".join(r[13] for r in rs if r[13] != "0"),
                ok=all(r[14] == "ok" for r in rs), checks=",".join(sorted(set(r[14] for r in rs))),
                cframes=",".join(sorted(set(r[18] for r in rs))), n=len(rs))
        abm[sc] = (m, fpr)
        off = m.get("off")
        w("\n### %s — Ringway vs itself: %s\n" % (sc, desc))
        if sc.startswith("sse"):
            w("| variant | req/s | SSE frames/s | p50 ms | p99 ms | CPU µs/req | CPU µs/frame | peak RSS MiB | req/s on/off | CPU/frame on/off | frames to client | runs | non-2xx | socket errors | check |")
            w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        else:
            w("| variant | req/s | p50 ms | p99 ms | CPU µs/req | Redis cmds per 1,000 req | Redis CPU µs/req | peak RSS MiB | req/s on/off | CPU on/off | runs | non-2xx | socket errors | check |")
            w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        parts = []
        for v, x in m.items():
            flag = "ok" if (not x["non2"] and not x["sock"] and x["ok"]) else "**FLAGGED** (%s)" % x["checks"]
            sockc = x["sock"] if not x["sockd"] else "%d (%s)" % (x["sock"], x["sockd"])
            if sc.startswith("sse"):
                w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d | %d | %s | %s |" % (
                    v, fnum(x["rps"], 0), fnum(x["rps"] * fpr, 0), fnum(x["p50"], 2), fnum(x["p99"], 2),
                    fnum(x["cpu"], 2), fnum(x["cpu"] / fpr, 3), fnum(x["rss"], 1),
                    ratio(x["rps"], off["rps"]) if off else "n/a", ratio(x["cpu"], off["cpu"]) if off else "n/a",
                    x["cframes"], x["n"], x["non2"], sockc, flag))
                parts.append("%s %s req/s = %s frames/s, %s µs/frame (%s)" % (
                    v, fnum(x["rps"], 0), fnum(x["rps"] * fpr, 0), fnum(x["cpu"] / fpr, 3),
                    ratio(x["cpu"], off["cpu"]) if off else "n/a"))
            else:
                w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d | %d | %s | %s |" % (
                    v, fnum(x["rps"], 0), fnum(x["p50"], 2), fnum(x["p99"], 2), fnum(x["cpu"], 2),
                    fnum(x["redis"] * 1000, 3), fnum(x["redis_cpu"], 2), fnum(x["rss"], 1),
                    ratio(x["rps"], off["rps"]) if off else "n/a", ratio(x["cpu"], off["cpu"]) if off else "n/a",
                    x["n"], x["non2"], sockc, flag))
                parts.append("%s %s req/s, %s µs/req (%s), %s Redis cmds per 1,000 req" % (
                    v, fnum(x["rps"], 0), fnum(x["cpu"], 2), ratio(x["cpu"], off["cpu"]) if off else "n/a",
                    fnum(x["redis"] * 1000, 3)))
        if sc.startswith("sse"):
            w("\nFrames per response = %d as sent by the origin (%d content frames + usage-only frame + [DONE]); "
              "CPU µs/frame = CPU µs/req ÷ %d for every variant. \"frames to client\": data: frames in the "
              "curl check (\"on\" removes the usage-only frame the client did not ask for)." % (fpr, fpr - 2, fpr))
        summary.append("%s (Ringway on vs off): %s" % (sc, "; ".join(parts)))

    # targets
    w("\n### Targets (Ringway, from the medians above)\n")
    w("| target | value | met? |")
    w("|---|---|---|")

    def tgt(name, val, ok):
        w("| %s | %s | %s |" % (name, val, "n/a" if ok is None else ("**met**" if ok else "**missed**")))
    sm = meds.get("small64", {})
    if "ringway" in sm and "nginx" in sm:
        r, n = sm["ringway"], sm["nginx"]
        tgt("CPU µs per small request ≤ 0.8 × nginx (small64)", "%.2f vs %.2f µs = %s" % (r["cpu"], n["cpu"], ratio(r["cpu"], n["cpu"])), r["cpu"] <= 0.8 * n["cpu"])
        tgt("req/s with one worker ≥ 1.25 × nginx (small64)", "%s vs %s = %s" % (fnum(r["rps"], 0), fnum(n["rps"], 0), ratio(r["rps"], n["rps"])), r["rps"] >= 1.25 * n["rps"])
    # TLS termination (issue: CPU per request and per handshake at or below nginx's)
    for sc, what in (("tls-small", "request"), ("tls-handshake", "resumed handshake (wrk Connection: close)"),
                     ("tls-handshake-new", "full handshake (openssl s_time -new)")):
        m = meds.get(sc, {})
        if "ringway" in m and "nginx" in m:
            r, n = m["ringway"], m["nginx"]
            tgt("TLS CPU µs per %s ≤ nginx (%s)" % (what, sc), "%.2f vs %.2f µs = %s" % (r["cpu"], n["cpu"], ratio(r["cpu"], n["cpu"])), r["cpu"] <= n["cpu"])
    for sc, m in meds.items():
        if "ringway" in m and "nginx" in m:
            r, n = m["ringway"], m["nginx"]
            if r["p99"] != r["p99"] or n["p99"] != n["p99"]:
                continue   # no latency distribution (openssl s_time rows)
            tgt("p99 ≤ nginx (%s)" % sc, "%.2f vs %.2f ms" % (r["p99"], n["p99"]), r["p99"] <= n["p99"])
    for sc, m in meds.items():
        if "ringway" in m:
            r = m["ringway"]
            if r["non2"] or r["sock"] or not r["bytes_ok"]:
                tgt("no errors (%s)" % sc, "non-2xx %d, socket errors %d, bodies %s" % (r["non2"], r["sock"], "ok" if r["bytes_ok"] else "SHORT"), False)
    if "ringway" in dlm and "direct" in dlm:
        pct = 100 * dlm["ringway"]["speed"] / dlm["direct"]["speed"]
        tgt("1 GiB download ≥ 80% of direct", "%.0f%%" % pct, pct >= 80 and dlm["ringway"]["ok"])
    if "ringway" in idm:
        x = idm["ringway"]
        tgt("≤ 1 KiB per idle connection", "%s B" % fnum(x["per"], 0), x["per"] <= 1024 and x["failed"] == 0)

    if "ratelimit" in abm:
        m = abm["ratelimit"][0]
        if "on" in m and "off" in m:
            a, b = m["on"]["cpu"], m["off"]["cpu"]
            tgt("cluster rate limit CPU µs/req ≤ 1.10 × off (ratelimit)", "%.2f vs %.2f µs = %s (%s Redis cmds per 1,000 req)" % (a, b, ratio(a, b), fnum(m["on"]["redis"] * 1000, 3)), a <= 1.10 * b)
    for sc in ("ssepaced", "sse"):
        if sc not in abm:
            continue
        m, fpr = abm[sc]
        if "on" in m and "off" in m:
            a, b = m["on"]["cpu"] / fpr, m["off"]["cpu"] / fpr
            tgt("SSE token accounting CPU µs/frame ≤ 1.15 × plain (%s)" % sc, "%.3f vs %.3f µs = %s" % (a, b, ratio(a, b)), a <= 1.15 * b)
    for sc, (m, _) in abm.items():
        for v, x in m.items():
            if x["non2"] or x["sock"] or not x["ok"]:
                tgt("no errors (%s %s)" % (sc, v), "non-2xx %d, socket errors %d, checks %s" % (x["non2"], x["sock"], x["checks"]), False)

    w("\n### Summary\n")
    for s in summary:
        w("- " + s)

    w("\n<details><summary>Every run (raw)</summary>\n")
    w("```")
    w("# wrk: kind scenario proxy round requests rps p50_ms p99_ms cpu_us_per_req peak_rss_kb bytes_read non2xx sock_errors sock_detail bytes_check desc")
    w("# dl: kind scenario target round http_code size_bytes speed_Bps proxy_cpu_ms peak_rss_kb")
    w("# idle: kind scenario proxy opened failed still_open rss_before_kb rss_after_kb wanted round")
    if any(r[1] == "tls-handshake-new" for r in wrk_rows):
        w("# tls-handshake-new rows (openssl s_time -new): requests = connections (each a full handshake + one GET), rps = connections/s, no latency (nan)")
    w("# ab: kind scenario variant round requests rps p50_ms p99_ms cpu_us_per_req peak_rss_kb bytes_read non2xx sock_errors sock_detail check redis_cmds_per_req redis_cpu_us_per_req frames_per_response client_frames desc")
    for r in rows:
        w("\t".join(r))
    w("```\n</details>")
    print("\n".join(out))
    return summary


def main():
    cmd = sys.argv[1]
    if cmd == "freeports":
        freeports(int(sys.argv[2]))
    elif cmd == "parse-wrk":
        parse_wrk(sys.argv[2])
    elif cmd == "idle":
        idle(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6],
             tls=len(sys.argv) > 7 and sys.argv[7] == "tls")
    elif cmd == "tls-resume":
        tls_resume(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif cmd == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
