#!/usr/bin/env python3
"""Markdown report for benches/ai/run.sh (standard library only).

  report.py RESULTS.tsv META.md

RESULTS.tsv, one run per line: scenario target round rate check "ai_requests ai_tokens" json
(json: loadgen.py rate or aibench streams output). Medians over rounds; "added" = the target's
median minus direct's median; ratios against nginx.
"""
import json
import statistics
import sys

ORDER = ["direct", "ringway", "ringway-plain", "nginx", "litellm"]
NAMES = {"direct": "direct (mock)", "ringway": "Ringway, AI route", "ringway-plain": "Ringway, plain route",
         "nginx": "nginx", "litellm": "LiteLLM proxy"}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=2, signed=False):
    if x is None:
        return "—"
    s = ("{:+,.%df}" if signed else "{:,.%df}") % nd
    return s.format(x)


def ratio(a, b):
    return "—" if a is None or not b else "%.2f×" % (a / b)


def load(path):
    rows = []
    for line in open(path):
        if not line.strip():
            continue
        p = line.rstrip("\n").split("\t", 6)
        try:
            d = json.loads(p[6])
        except (ValueError, IndexError):
            d = {}
        req, tok = (p[5].split() + ["-", "-"])[:2]
        rows.append(dict(scen=p[0], target=p[1], round=int(p[2]), rate=float(p[3]), check=p[4],
                         ai_req=None if req == "-" else int(req), ai_tok=None if tok == "-" else int(tok), d=d))
    return rows


def rates_section(rows, w):
    rs = [r for r in rows if r["scen"] == "rates"]
    if not rs:
        return {}
    targets = [t for t in ORDER if any(r["target"] == t for r in rs)]
    rates = sorted({r["rate"] for r in rs})
    w("\n### Non-streamed chat completions at fixed rates (open loop), medians of %d rounds\n"
      % max(r["round"] for r in rs))
    w("Latency = request dispatched → whole answer read (loadgen.py); added = target − direct "
      "(medians). CPU = the gateway's process tree (utime+stime) per 200 answer. \"sustained\": "
      "achieved ≥ 95 % of the rate with no errors or timeouts in any round.\n")
    w("| rate req/s | target | achieved req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | "
      "CPU µs/req | CPU vs nginx | gateway CPU % of a core | non-200 / errors / timeouts (all rounds) | sustained | "
      "gen lag p99 ms | tokens counted / req | checks |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = {}
    for rate in rates:
        m = {}
        for t in targets:
            g = [r for r in rs if r["target"] == t and r["rate"] == rate]
            if not g:
                continue
            ds = [r["d"] for r in g]
            lat = [d.get("latency", {}) for d in ds]
            non200 = sum(sum(v for k, v in d.get("status", {}).items() if k != "200") for d in ds)
            errs = sum(sum(d.get("errors", {}).values()) for d in ds)
            tos = sum(d.get("timeouts", 0) for d in ds)
            ach = med([d.get("achieved_rps") for d in ds])
            sustained = all((d.get("achieved_rps") or 0) >= 0.95 * rate and not d.get("errors")
                            and not d.get("timeouts") and set(d.get("status", {})) <= {"200"} for d in ds)
            tokq = [r["ai_tok"] / r["ai_req"] for r in g if r["ai_req"]]
            m[t] = dict(ach=ach, p50=med([x.get("p50_ms") for x in lat]), p99=med([x.get("p99_ms") for x in lat]),
                        cpu=med([d.get("cpu_us_per_req") for d in ds]), non200=non200,
                        busy=med([100.0 * d["cpu_s"] / d["cpu_window_s"] for d in ds
                                  if d.get("cpu_s") is not None and d.get("cpu_window_s")]), errs=errs, tos=tos,
                        sustained=sustained, lag=med([d.get("lag", {}).get("p99_ms") for d in ds]),
                        tok=med(tokq) if tokq else None, checks=",".join(sorted({r["check"] for r in g})),
                        runs=len(g))
        dr = m.get("direct", {})
        ng = m.get("nginx", {})
        for t in targets:
            if t not in m:
                continue
            x = m[t]
            add50 = None if t == "direct" or x["p50"] is None or dr.get("p50") is None else x["p50"] - dr["p50"]
            add99 = None if t == "direct" or x["p99"] is None or dr.get("p99") is None else x["p99"] - dr["p99"]
            x["add50"], x["add99"] = add50, add99
            w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %d / %d / %d | %s | %s | %s | %s |" % (
                f(rate, 0), NAMES[t], f(x["ach"], 1), f(x["p50"], 3), f(x["p99"], 3), f(add50, 3, True),
                f(add99, 3, True), f(x["cpu"], 1), "—" if t == "direct" else ratio(x["cpu"], ng.get("cpu")),
                f(x["busy"], 0),
                x["non200"], x["errs"], x["tos"], "yes" if x["sustained"] else "**no**", f(x["lag"], 3),
                f(x["tok"], 1) if x["tok"] is not None else "—", x["checks"]))
        out[rate] = m
    ua = sum(r["d"].get("unaccounted", 0) for r in rs)
    if ua:
        w("\n**%d requests were never answered nor timed out by the generator's own bookkeeping; they are "
          "counted as timeouts.**\n" % ua)
    w("\n\"tokens counted / req\": Ringway's `ringway_ai_tokens_total` ÷ `ringway_ai_requests_total` after "
      "the run (the mock reports 17 + 32 = 49 per answer); the plain route counts nothing. CPU µs/req "
      "divides all the gateway's CPU in the window by the 200 answers: where a gateway is overloaded it "
      "includes the work spent on requests that then timed out. \"gen lag\": how "
      "late the generator dispatched against the schedule (its own health). Every non-200, error and "
      "timeout is listed; latency percentiles are over the 200 answers only.\n")
    return out


def streams_again_section(rows, w):
    rs = [r for r in rows if r["scen"] == "streams-again"]
    if not rs:
        return {}
    targets = [t for t in ORDER if any(r["target"] == t for r in rs)]
    w("\n### The same burst again on the same process (warm), medians of %d rounds\n" % max(r["round"] for r in rs))
    w("1 s after the first burst ended, the same %s streams again: pool buffers, allocator and upstream "
      "keep-alive connections (up to the idle limit) are already there. LiteLLM is not run twice (its "
      "first burst does not finish). RSS is not meaningful here (the memory of the first burst is "
      "kept).\n" % f(rs[0]["rate"], 0))
    w("| target | 200 and complete | non-200 | errors | TTFT p50 ms | TTFT p99 ms | added TTFT p99 ms | "
      "first→[DONE] p50 ms | CPU µs / 1,000 chunks | CPU vs nginx |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    m = {}
    for t in targets:
        ds = [r["d"] for r in rs if r["target"] == t]
        m[t] = dict(complete=med([d.get("complete_200") for d in ds]), non200=sum(d.get("non_200", 0) for d in ds),
                    errs=sum(sum(d.get("errors", {}).values()) for d in ds),
                    t50=med([d.get("ttft", {}).get("p50_ms") for d in ds]),
                    t99=med([d.get("ttft", {}).get("p99_ms") for d in ds]),
                    dur=med([d.get("first_to_done", {}).get("p50_ms") for d in ds]),
                    cpu=med([d.get("cpu_us_per_1000_chunks") for d in ds]))
    dr, ng = m.get("direct", {}), m.get("nginx", {})
    for t in targets:
        x = m[t]
        x["add99"] = None if t == "direct" or x["t99"] is None or dr.get("t99") is None else x["t99"] - dr["t99"]
        w("| %s | %s | %d | %d | %s | %s | %s | %s | %s | %s |" % (
            NAMES[t], f(x["complete"], 0), x["non200"], x["errs"], f(x["t50"], 1), f(x["t99"], 1),
            f(x["add99"], 1, True), f(x["dur"], 1), f(x["cpu"], 0),
            "—" if t == "direct" else ratio(x["cpu"], ng.get("cpu"))))
    return m


def streams_section(rows, w):
    rs = [r for r in rows if r["scen"] == "streams"]
    if not rs:
        return {}
    targets = [t for t in ORDER if any(r["target"] == t for r in rs)]
    n = int(rs[0]["rate"])
    w("\n### %s concurrent streams opened together, medians of %d rounds\n" % (f(n, 0), max(r["round"] for r in rs)))
    w("TTFT = from t0 (all connects started at once) to the stream's first chunk; added = target − direct "
      "(medians), over the streams that got one (\"no first chunk\": those that did not, all rounds). "
      "first→[DONE] is 49 × 20 ms = 980 ms when nothing falls behind. CPU per 1,000 chunks delivered "
      "(content frames received, at most 50 per stream). RSS per open stream = (RSS at the 10 ms sample "
      "with the most streams open − idle RSS after a 50-stream warm-up) ÷ streams open then. Direct: "
      "CPU and RSS are the mock's.\n")
    w("| target | 200 and complete | non-200 answers | no answer (no head) | errors | no first chunk | TTFT p50 ms | TTFT p99 ms | added TTFT p99 ms | "
      "first→[DONE] p50 ms | wall s | CPU µs / 1,000 chunks | CPU vs nginx | idle RSS MiB | "
      "RSS, most open MiB | most open | bytes per open stream | vs nginx | tokens counted / stream | checks |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    m = {}
    for t in targets:
        g = [r for r in rs if r["target"] == t]
        ds = [r["d"] for r in g]
        tokq = [r["ai_tok"] / r["ai_req"] for r in g if r["ai_req"]]
        m[t] = dict(
            complete=med([d.get("complete_200") for d in ds]),
            non200=sum(v for d in ds for k, v in d.get("status", {}).items() if k not in ("200", "0")),
            nohead=sum(d.get("status", {}).get("0", 0) for d in ds),
            errs=sum(sum(d.get("errors", {}).values()) for d in ds),
            errd=sorted({k for d in ds for k in d.get("errors", {})}),
            nofirst=sum(d.get("streams", 0) - d.get("ttft", {}).get("n", 0) for d in ds),
            t50=med([d.get("ttft", {}).get("p50_ms") for d in ds]), t99=med([d.get("ttft", {}).get("p99_ms") for d in ds]),
            dur=med([d.get("first_to_done", {}).get("p50_ms") for d in ds]), wall=med([d.get("wall_s") for d in ds]),
            cpu=med([d.get("cpu_us_per_1000_chunks") for d in ds]),
            idle=med([d.get("rss_idle_kb") for d in ds]), most=med([d.get("rss_at_max_open_kb") for d in ds]),
            maxopen=med([d.get("max_open") for d in ds]), per=med([d.get("bytes_per_open_stream") for d in ds]),
            tok=med(tokq) if tokq else None, checks=",".join(sorted({r["check"] for r in g})),
            rounds=len(g))
    dr, ng = m.get("direct", {}), m.get("nginx", {})
    for t in targets:
        x = m[t]
        x["add99"] = None if t == "direct" or x["t99"] is None or dr.get("t99") is None else x["t99"] - dr["t99"]
        w("| %s | %s | %d | %d | %d%s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            NAMES[t], f(x["complete"], 0), x["non200"], x["nohead"], x["errs"],
            (" (%s)" % ", ".join(x["errd"])) if x["errd"] else "",
            x["nofirst"],
            f(x["t50"], 1), f(x["t99"], 1), f(x["add99"], 1, True), f(x["dur"], 1), f(x["wall"], 2), f(x["cpu"], 0),
            "—" if t == "direct" else ratio(x["cpu"], ng.get("cpu")),
            f(None if x["idle"] is None else x["idle"] / 1024, 1), f(None if x["most"] is None else x["most"] / 1024, 1),
            f(x["maxopen"], 0), f(x["per"], 0), "—" if t == "direct" else ratio(x["per"], ng.get("per")),
            f(x["tok"], 1) if x["tok"] is not None else "—", x["checks"]))
    w("\nCounts (non-200 answers, no answer, errors, no first chunk) are summed over all rounds; \"200 and "
      "complete\" is the median per round. A stream not finished by the time limit counts as an error "
      "(timeout), whether or not it had an answer head. \"tokens counted / stream\": Ringway's /metrics "
      "after the run (the mock reports 17 + 50 = 67 per stream, in the usage frame Ringway asked for).\n")
    return m


def main():
    rows = load(sys.argv[1])
    out = []
    w = out.append
    w(open(sys.argv[2]).read().rstrip() + "\n")
    rm = rates_section(rows, w)
    sm = streams_section(rows, w)
    am = streams_again_section(rows, w)
    # Targets of issue 13
    w("\n### Targets (issue 13)\n")
    w("| target | measured | met? |")
    w("|---|---|---|")
    if 1000.0 in rm and "ringway" in rm[1000.0]:
        x = rm[1000.0]["ringway"]
        w("| added p99 under 1 ms at 1,000 req/s (Ringway, AI route) | %s ms (p99 %s vs direct %s ms) | %s |" % (
            f(x["add99"], 3, True), f(x["p99"], 3), f(rm[1000.0].get("direct", {}).get("p99"), 3),
            "**met**" if x["add99"] is not None and x["add99"] < 1.0 else "**missed**"))
    if "ringway" in sm:
        x = sm["ringway"]
        w("| user-space memory per open stream under 4 KiB (Ringway, AI route) | %s B | %s |" % (
            f(x["per"], 0), "**met**" if x["per"] is not None and x["per"] < 4096 else "**missed**"))
        y = am.get("ringway", {})
        bad = x["non200"] + x["nohead"] + x["errs"] + y.get("non200", 0) + y.get("errs", 0)
        nstreams = int(next(r["rate"] for r in rows if r["scen"] == "streams"))
        w("| %s streams through one worker with default upstream settings: no 503, no refused stream | "
          "%s non-200, %s errors over %d rounds (and %s / %s in the second bursts) | %s |" % (
              f(nstreams, 0), x["non200"], x["errs"], x["rounds"], y.get("non200", "—"), y.get("errs", "—"),
              "**met**" if bad == 0 else "**missed**"))
    w("\n<details><summary>Every run (raw)</summary>\n\n```")
    w("# scenario target round rate check ai_requests/ai_tokens json")
    for line in open(sys.argv[1]):
        w(line.rstrip("\n"))
    w("```\n</details>")
    print("\n".join(out))


if __name__ == "__main__":
    main()
