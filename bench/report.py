"""Run the benchmark suite and write its report (the one command behind ``./dev bench``).

    python bench/report.py                  # full suite -> bench/out/results.json, bench/out/summary.md,
                                            #               and bench/RESULTS.md (the committed report)
    VHUB_BENCH_QUICK=1 python bench/report.py   # short version: bench/out/ only, RESULTS.md untouched
    python bench/report.py --from bench/out/results.json [--results]   # re-render, no run
    python bench/report.py -k stream        # other arguments go to pytest (then RESULTS.md is not written)
    python bench/report.py --passes 1       # the relay benchmarks once (a full run repeats them: 3 passes)

The report is built only from the JSON pytest-benchmark writes: every benchmark
stores its numbers in ``extra_info`` (a ``kind`` plus fields), and the machine
line (CPU, cores, kernel, Python, load average at start and end) is in the
JSON's ``vhub_machine``. Every ratio compares numbers of the same run.
No timing assertions anywhere: the targets table says met/short, it never fails.

A full run repeats the relay benchmarks (bench/test_bench_relay.py: stream, RPC,
fan-out, each vhubd case beside its socat/tee/direct references) in ``--passes``
passes minutes apart, and reports every number as its median over the passes:
on a shared machine a burst of other work slows whichever case it lands on, and
one pass's ratio can move by 0.3; the median of three passes does not follow it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "out")

STREAM_TRANSPORTS = ["vhubd", "vhubd-pycodec", "direct", "socat-b262144", "socat-plain", "c-floor"]
STREAM_REFS = ["direct", "socat-b262144", "socat-plain", "vhubd-pycodec", "c-floor"]
RPC_TRANSPORTS = ["vhubd", "vhubd+client-lib", "direct", "socat-b262144", "socat-plain"]
RPC_REFS = ["direct", "socat-b262144", "socat-plain"]


# --- machine line ---------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    load = os.getloadavg()
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in load],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "quick": os.environ.get("VHUB_BENCH_QUICK", "") not in ("", "0"),
    }
    try:
        from vhubd import codec

        info["codec"] = codec.BACKEND
    except Exception:  # noqa: BLE001
        info["codec"] = "?"
    for mod in ("uvloop", "msgspec"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    if shutil.which("socat"):
        try:
            out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=5).stdout
            line = next((ln for ln in out.splitlines() if "socat version" in ln), "")
            info["socat"] = line.split("socat version", 1)[1].split()[0] if line else "?"
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_line(m: dict) -> str:
    cores = m.get("cores") or 1
    start = m.get("loadavg_start") or [0, 0, 0]
    end = m.get("loadavg_end")
    # the load at the end counts the benchmark's own processes: only the load
    # before the run says whether something else was using the machine
    noisy = start[0] > 0.25 * cores
    parts = [f"CPU {m.get('cpu', '?')}", f"{cores} cores", f"Linux {m.get('kernel', '?')}",
             f"Python {m.get('python', '?')}", f"codec {m.get('codec', '?')}"]
    for k in ("uvloop", "msgspec", "socat"):
        if m.get(k):
            parts.append(f"{k} {m[k]}")
    parts.append("load average at start " + " ".join(f"{x:.2f}" for x in start))
    if end:
        parts.append("at end (the benchmarks' own load included) " + " ".join(f"{x:.2f}" for x in end))
    line = "; ".join(parts)
    if noisy:
        line += (" — the machine was shared and busy (other jobs running): absolute numbers are noisy; "
                 "the ratios compare cases of the same run")
    if (m.get("passes") or 1) > 1:
        line += (f". The relay benchmarks (stream, RPC, fan-out: {m.get('merged', '?')} cases) ran in "
                 f"{m['passes']} passes, one after the other; each of their numbers is the median over the passes")
    return line


# --- formatting ---------------------------------------------------------------------------

def size_name(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def rx(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# --- the report ---------------------------------------------------------------------------

def index(rows: list[dict]) -> dict:
    by: dict = {}
    for r in rows:
        by.setdefault(r.get("kind"), []).append(r)
    return by


def find(rows, **kw):
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def gb_cpu(row):
    """A stream row's relay CPU seconds per GB of payload (None: not measured)."""
    return row and row.get("relay_cpu") is not None and row["relay_cpu"] / 100 / (row["mbps"] / 1000) or None


def targets(by: dict) -> list[dict]:
    """Each target of issue 15 (and the earlier ones still held) with its measured value (None: not measured)."""
    out = []
    stream = by.get("stream", [])
    for p in (64, 1024, 65536, 1 << 20):
        v, r = find(stream, payload=p, transport="vhubd"), find(stream, payload=p, transport="socat-b262144")
        out.append({"target": f"stream {size_name(p)}: MB/s ≥ 1.0× socat -b 262144", "need": 1.0, "op": ">=",
                    "value": ratio(v and v["mbps"], r and r["mbps"])})
        out.append({"target": f"stream {size_name(p)}: daemon CPU s/GB ≤ socat's (ratio ≤ 1.0)", "need": 1.0,
                    "op": "<=", "value": ratio(gb_cpu(v), gb_cpu(r))})
    v, r = find(stream, payload=1 << 20, transport="vhubd"), find(stream, payload=65536, transport="vhubd")
    out.append({"target": "stream: no cliff, 1 MiB frames ≥ 0.9× the MB/s of 64 KiB", "need": 0.9, "op": ">=",
                "value": ratio(v and v["mbps"], r and r["mbps"])})
    rpc = by.get("rpc", [])
    v, r = find(rpc, conc=1, transport="vhubd"), find(rpc, conc=1, transport="socat-plain")
    out.append({"target": "RPC C=1: p50 ≤ plain socat's (vhubd p50 / socat p50 ≤ 1.0)", "need": 1.0, "op": "<=",
                "value": ratio(v and v["p50_us"], r and r["p50_us"])})
    for c in (16, 64):
        v, r = find(rpc, conc=c, transport="vhubd"), find(rpc, conc=c, transport="socat-plain")
        out.append({"target": f"RPC C={c}: RPS ≥ 1.0× plain socat's", "need": 1.0, "op": ">=",
                    "value": ratio(v and v["rps"], r and r["rps"])})
        lib = find(rpc, conc=c, transport="vhubd+client-lib")
        out.append({"target": f"RPC C={c}: handler on vhubd.client ≥ 0.8× a raw handler", "need": 0.8, "op": ">=",
                    "value": ratio(lib and lib["rps"], v and v["rps"])})
    fan = by.get("fanout", [])
    for p in sorted({r["payload"] for r in fan}):
        v = find(fan, payload=p, subscribers=16, transport="vhubd")
        r = find(fan, payload=p, subscribers=16, transport="tee")
        out.append({"target": f"fan-out {size_name(p)}, 16 lossless subscribers: MB/s ≥ 0.9× tee", "need": 0.9,
                    "op": ">=", "value": ratio(v and v["agg_mbps"], r and r["agg_mbps"])})
    peaks = [r["daemon_peak_kib"] for k in ("stream", "rpc", "fanout") for r in by.get(k, [])
             if r.get("daemon_peak_kib")]
    out.append({"target": "daemon peak RSS over the relay benchmarks ≤ 64 MiB (bounded: 32 MiB max-output per peer)",
                "need": 64.0, "op": "<=", "unit": " MiB", "value": max(peaks) / 1024 if peaks else None})
    sc = (by.get("scale") or [None])[0]
    out.append({"target": "RSS per idle connection ≤ 16 KiB", "need": 16.0, "op": "<=", "unit": " KiB",
                "value": sc and sc["kib_per_conn"]})
    codec = by.get("codec", [])
    v, r = find(codec, op="scan 64B", backend="c"), find(codec, op="scan 64B", backend="python")
    out.append({"target": "C codec scan (64 B frames) ≥ 10× pure Python", "need": 10.0, "op": ">=",
                "value": ratio(v and v["rate"], r and r["rate"])})
    for t in out:
        val = t["value"]
        if val is None:
            t["status"] = "not measured"
        elif (val >= t["need"]) if t["op"] == ">=" else (val <= t["need"]):
            t["status"] = "**met**"
        else:
            t["status"] = "short"
    return out


def fmt_target_value(t: dict) -> str:
    if t["value"] is None:
        return "-"
    return f"{t['value']:.1f}{t['unit']}" if t.get("unit") else f"{t['value']:.2f}×"


def render(rows: list[dict], machine: dict | None = None) -> str:
    by = index(rows)
    L: list[str] = []
    if machine:
        L += ["Machine: " + machine_line(machine), ""]

    tg = targets(by)
    if any(t["value"] is not None for t in tg):
        L += ["### Targets (issue 15; ratios measured in this run)", ""]
        L += table(["target", "measured", "status"],
                   [[t["target"], fmt_target_value(t), t["status"]] for t in tg], "lrl")
        L.append("")

    codec = by.get("codec", [])
    if codec:
        L += ["### Codec: C vs pure Python (in process)", ""]
        rows_ = []
        for op in ("scan 0B", "scan 64B", "pack", "rewrite"):
            c, p = find(codec, op=op, backend="c"), find(codec, op=op, backend="python")
            if c or p:
                unit = " headers/s" if op.startswith("scan") else " calls/s"
                rows_.append([op, rate(c and c["rate"]) + unit, rate(p and p["rate"]) + unit,
                              rx(ratio(c and c["rate"], p and p["rate"]))])
        L += table(["operation", "C", "pure Python", "C / Python"], rows_)
        L += ["", "(pack and rewrite are single calls on a 20-byte header: the cffi call costs more than the "
                  "work, so C loses to `struct` there. The relay rewrites two request_ids per forwarded RPC; "
                  "the stream path only scans.)", ""]

    stream = by.get("stream", [])
    if stream:
        L += ["### Stream: guest Stdout → relay → 1 subscriber (payload MB/s, 1 MB = 10⁶ B; every byte "
              "checksummed at the sink)", ""]
        rows_ = []
        for p in sorted({r["payload"] for r in stream}):
            for tr in STREAM_TRANSPORTS:
                r = find(stream, payload=p, transport=tr)
                if r:
                    cpu = r.get("relay_cpu")
                    rows_.append([size_name(p), tr, num(r["mbps"]), rate(r["fps"]),
                                  "-" if cpu is None else f"{cpu:.0f}"])
        L += table(["payload", "transport", "MB/s", "frames/s", "relay CPU %"], rows_, "llrrr")
        L += ["", "Ratios (vhubd MB/s ÷ reference MB/s, same run):", ""]
        rows_ = []
        for p in sorted({r["payload"] for r in stream}):
            v = find(stream, payload=p, transport="vhubd")
            if v:
                rows_.append([size_name(p)] + [rx(ratio(v["mbps"], (find(stream, payload=p, transport=ref)
                                                                   or {}).get("mbps")))
                                               for ref in STREAM_REFS])
        L += table(["payload", "vs direct", "vs socat -b 262144", "vs plain socat", "vs vhubd pure-Python codec",
                    "vs the C floor"], rows_)
        rows_ = []
        for p in sorted({r["payload"] for r in stream}):
            f, s = find(stream, payload=p, transport="c-floor"), find(stream, payload=p, transport="socat-b262144")
            if f and s:
                rows_.append([size_name(p), rx(ratio(f["mbps"], s["mbps"])), rx(ratio(gb_cpu(f), gb_cpu(s)))])
        if rows_:
            L += ["", "The C floor (bench/floor_relay.c: parses every header, forwards whole frames, copies each "
                  "batch into a 1 MiB scrollback ring; no daemon around it) against `socat -b 262144`: what a "
                  "data plane in C would reach:", ""]
            L += table(["payload", "MB/s ÷ socat's", "CPU s/GB ÷ socat's"], rows_)
        L.append("")

    fan = by.get("fanout", [])
    if fan:
        L += ["### Fan-out: 1 guest → N lossless subscribers (every byte checksummed at every sink)", "",
              "`tee` is the reference: the guest itself writes every batch to each sink (a relay that costs "
              "nothing); its aggregate ÷ 1-subscriber ratio is what this machine allows.", ""]
        rows_ = []
        for p in sorted({r["payload"] for r in fan}):
            for tr in ("vhubd", "tee"):
                one = find(fan, payload=p, subscribers=1, transport=tr)
                for n in sorted({r["subscribers"] for r in fan if r["payload"] == p}):
                    r = find(fan, payload=p, subscribers=n, transport=tr)
                    if r is None:
                        continue
                    ref = find(fan, payload=p, subscribers=n, transport="tee")
                    rows_.append([size_name(p), tr, str(n), num(r["agg_mbps"]), num(r["per_sub_mbps"]),
                                  rx(ratio(r["agg_mbps"], one and one["agg_mbps"])),
                                  rx(ratio(r["agg_mbps"], ref and ref["agg_mbps"])) if tr != "tee" else "",
                                  "-" if r.get("relay_cpu") is None else f"{r['relay_cpu']:.0f}"])
        L += table(["payload", "transport", "subscribers", "aggregate MB/s", "per-subscriber MB/s",
                    "aggregate ÷ 1-subscriber", "vs tee", "relay CPU %"], rows_, "llrrrrrr")
        L.append("")

    rpc = by.get("rpc", [])
    if rpc:
        L += ["### RPC: guest RpcRequest → host handler → RpcResponse (round trip)", ""]
        rows_ = []
        for c in sorted({r["conc"] for r in rpc}):
            for tr in RPC_TRANSPORTS:
                r = find(rpc, conc=c, transport=tr)
                if r:
                    cpu = r.get("relay_cpu_us")
                    rows_.append([str(c), tr, rate(r["rps"]), num(r["p50_us"]), num(r["p99_us"]),
                                  "-" if cpu is None else num(cpu, 1)])
        L += table(["concurrency", "transport", "RPS", "p50 µs", "p99 µs", "relay CPU µs per RPC"], rows_, "rlrrrr")
        L += ["", "Ratios (vhubd RPS ÷ reference RPS; vhubd p50 ÷ reference p50, lower is better):", ""]
        rows_ = []
        for c in sorted({r["conc"] for r in rpc}):
            v = find(rpc, conc=c, transport="vhubd")
            if not v:
                continue
            cells = [str(c)]
            for ref in RPC_REFS:
                r = find(rpc, conc=c, transport=ref)
                cells.append(f"{rx(ratio(v['rps'], r and r['rps']))} / {rx(ratio(v['p50_us'], r and r['p50_us']))}")
            lib = find(rpc, conc=c, transport="vhubd+client-lib")
            cells.append(rx(ratio(lib and lib["rps"], v["rps"])))
            r = find(rpc, conc=c, transport="socat-plain")
            cells.append(rx(ratio(v.get("relay_cpu_us"), r and r.get("relay_cpu_us"))))
            rows_.append(cells)
        L += table(["concurrency", "vs direct (RPS / p50)", "vs socat -b 262144", "vs plain socat",
                    "client-lib handler RPS ÷ raw handler", "relay CPU per RPC ÷ plain socat's"], rows_, "rrrrrr")
        L.append("")

    h2g = by.get("h2g", [])
    if h2g:
        L += ["### Host → guest: a host client calls the session's agent through vhubd (local backend)", ""]
        ref = find(h2g, op="reference: fork/exec `true` in the bench process")
        rows_ = []
        for r in h2g:
            rows_.append([r["op"], str(r["n"]), num(r["p50_us"] / 1e3, 2), num(r["p99_us"] / 1e3, 2),
                          rx(ratio(r["p50_us"], ref and ref["p50_us"])) if r is not ref else "1.00×"])
        L += table(["operation", "n", "p50 ms", "p99 ms", "p50 ÷ fork/exec reference"], rows_, "lrrrr")
        L.append("")

    boot = by.get("boot", [])
    if boot:
        L += ["### Boot on demand (local backend: the agent is a host process)", ""]
        ref = find(boot, op="reference: start the agent's Python and import it (no daemon)")
        rows_ = []
        for r in boot:
            rows_.append([r["op"], str(r["n"]), num(r["p50_ms"]), num(r["p99_ms"]),
                          rx(ratio(r["p50_ms"], ref and ref["p50_ms"])) if r is not ref else "1.00×"])
        L += table(["operation", "n", "p50 ms", "p99 ms", "p50 ÷ interpreter-start reference"], rows_, "lrrrr")
        L.append("")

    for kind in [k for k in by if k not in KNOWN_KINDS]:
        L += generic_section(kind, by[kind])
    for sc in by.get("scale", []):
        L += ["### Scale: idle connections held by one daemon", ""]
        L += table(["measure", "value"], [
            ["idle guests (anonymous session, --multiple-agents) + idle clients (subscribed)",
             f"{sc['guests']} + {sc['clients']}"],
            ["daemon RSS before → after accepting → after 3 s idle", f"{sc['rss_base_kib'] / 1024:.1f} → "
             f"{sc['rss_conn_kib'] / 1024:.1f} → {sc['rss_settled_kib'] / 1024:.1f} MiB"],
            ["RSS per connection (settled delta ÷ connections)", f"{sc['kib_per_conn']:.1f} KiB"],
            ["RSS per connection right after accepting", f"{sc['kib_per_conn_peak']:.1f} KiB"],
            ["time to accept + handshake the guests", f"{sc['guests_s'] * 1e3:.0f} ms "
             f"({rate(sc['guests'] / sc['guests_s'])} conn/s)"],
            ["time to accept + handshake the clients", f"{sc['clients_s'] * 1e3:.0f} ms "
             f"({rate(sc['clients'] / sc['clients_s'])} conn/s)"],
            ["daemon file descriptors open", str(sc.get("fds", "-"))],
        ], "lr")
        L.append("")
    return "\n".join(L)


KNOWN_KINDS = {"codec", "stream", "fanout", "rpc", "h2g", "boot", "scale"}


def generic_section(kind: str, rows: list[dict]) -> list[str]:
    """Any other kind of row (e.g. added by another bench file): one table, its fields as columns."""
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k != "kind" and k not in cols:
                cols.append(k)

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    out = [f"### {kind}", ""]
    out += table(cols, [[cell(r.get(c)) for c in cols] for r in rows], "l" + "r" * (len(cols) - 1))
    out.append("")
    return out


# --- JSON in, files out -------------------------------------------------------------------

def rows_from_json(data: dict) -> list[dict]:
    rows = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        more = info.pop("rows", [])
        if info.get("kind"):
            rows.append(info)
        rows.extend(r for r in more if r.get("kind"))
    return rows


def markdown_document(data: dict, title: str = "vhubd benchmark results") -> str:
    machine = data.get("vhub_machine") or {}
    quick = machine.get("quick")
    head = [f"# {title}", "",
            "Written by `./dev bench` (`python bench/report.py`) from `bench/out/results.json` "
            f"({'short CI run, VHUB_BENCH_QUICK=1' if quick else 'full run'}, {machine.get('started', '?')}).",
            "Every number comes from one run; every ratio compares cases measured side by side in that run. "
            "No timing assertions: correctness (every byte, every answer) is what passes or fails.", "", ""]
    return "\n".join(head) + render(rows_from_json(data), machine) + "\n"


RELAY_SUITE = os.path.join(HERE, "test_bench_relay.py")


def _median(xs: list) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _median_fields(infos: list[dict]) -> dict:
    """One row from the same row of several passes: numbers as their median."""
    out = dict(infos[0])
    for k, v in infos[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [i[k] for i in infos if isinstance(i.get(k), (int, float))]
            out[k] = _median(vals)
    return out


def merge_passes(data: dict, passes: list[dict]) -> dict:
    """``data`` with every benchmark that the other ``passes`` ran again
    replaced by the median of its numbers over all of them."""
    again: dict = {}
    for extra in passes:
        for b in extra.get("benchmarks", []):
            again.setdefault(b["fullname"], []).append(b.get("extra_info") or {})
    merged = 0
    for b in data.get("benchmarks", []):
        more = again.get(b["fullname"])
        if not more:
            continue
        infos = [b.get("extra_info") or {}, *more]
        info = _median_fields(infos)
        rows = [i.get("rows", []) for i in infos]
        if rows[0] and all(len(r) == len(rows[0]) for r in rows):
            info["rows"] = [_median_fields([r[j] for r in rows]) for j in range(len(rows[0]))]
        b["extra_info"] = info
        merged += 1
    data.setdefault("vhub_machine", {})["passes"] = 1 + len(passes)
    data["vhub_machine"]["merged"] = merged
    return data


def write_outputs(json_path: str, results: bool) -> str:
    with open(json_path) as f:
        data = json.load(f)
    doc = markdown_document(data)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "summary.md"), "w") as f:
        f.write(doc)
    if results:
        with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
            f.write(doc)
    return doc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", help="render an existing pytest-benchmark JSON; do not run")
    ap.add_argument("--json", default=os.path.join(OUT, "results.json"), help="where pytest writes its JSON")
    ap.add_argument("--results", action="store_true", default=None,
                    help="also write bench/RESULTS.md (default: yes for a full run, no for a quick one)")
    ap.add_argument("--no-results", dest="results", action="store_false")
    ap.add_argument("--passes", type=int, default=None,
                    help="passes of the relay benchmarks, reported as medians (default: 3 for a full run, else 1)")
    args, pytest_args = ap.parse_known_args()
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    args.pytest_args = pytest_args
    quick = os.environ.get("VHUB_BENCH_QUICK", "") not in ("", "0")
    if args.src:
        doc = write_outputs(args.src, bool(args.results))
        print(doc)
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE), f"--benchmark-json={args.json}",
           "--benchmark-columns=median,ops,rounds", *args.pytest_args]
    print("==> " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, VHUB_BENCH_NO_SUMMARY="1"))
    if not os.path.exists(args.json):
        print("no benchmark JSON was written", file=sys.stderr)
        return rc or 1
    passes = args.passes if args.passes is not None else (1 if quick or args.pytest_args else 3)
    extra = []
    for i in range(2, passes + 1):
        path = os.path.join(OUT, f"relay-pass{i}.json")
        cmd = [sys.executable, "-m", "pytest", RELAY_SUITE, f"--benchmark-json={path}",
               "--benchmark-columns=median,ops,rounds", "-q"]
        print(f"==> pass {i} of {passes}: " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, VHUB_BENCH_NO_SUMMARY="1")) or rc
        with open(path) as f:
            extra.append(json.load(f))
    if extra:
        with open(args.json) as f:
            data = merge_passes(json.load(f), extra)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    results = args.results if args.results is not None else (rc == 0 and not quick and not args.pytest_args)
    doc = write_outputs(args.json, results)
    print()
    print(doc)
    print(f"==> wrote {args.json}, {os.path.join(OUT, 'summary.md')}"
          + (f" and {os.path.join(HERE, 'RESULTS.md')}" if results else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
