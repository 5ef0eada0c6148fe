"""Load test of `/search` on loopback: queries/s, p50/p99 latency and where the time goes (mean
seconds per stage from the server's `dpr_search_stage_seconds` histograms, mean batch size) at
several concurrencies, with dynamic batching on and off, alternated. Bounded: each level runs for
``--seconds`` and at most ``--max-requests``.

    python benchmarks/load.py --index runs/demo/index [--clients 1 8 32 64] [--seconds 10] [--rounds 2]
                              [--baseline OTHER_CHECKOUT] [--milvus-uri URI --collection NAME]

Starts one `dpr serve` process per mode itself (127.0.0.1 only): DPR_BATCHING=false and true and,
with ``--baseline DIR``, DPR_BATCHING=true from the code of another checkout of this repository
(a `git worktree` of an older commit, to compare two batchers) and, with ``--milvus-uri``, batching
with `/search` answered from that Milvus collection (the index exported by `dpr index export`), warms each, then runs every level on
one after the other, ``--rounds`` times, so that the modes meet the same background load. Prints
one JSON line per level and a Markdown table at the end; writes everything to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

QUERIES = ["who built the lighthouse on Hask", "ferry from Port Aubel to Brinny", "when is the lantern festival",
           "founder of the lamp makers company", "what do islanders pay with", "oldest lighthouse in the isles"]
STAGES = ("queue_wait", "encode", "search", "lookup")  # dpr_service.api.metrics.STAGES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(base: str) -> dict[str, float]:
    """:func:`histogram_totals` of the server's ``/metrics`` now."""
    return histogram_totals(httpx.get(f"{base}/metrics", timeout=10).text)


def histogram_totals(exposition: str) -> dict[str, float]:
    """Sums and counts of the stage and batch-size histograms of a Prometheus text exposition:
    {'<stage>_sum': seconds, '<stage>_count': n, ..., 'batch_sum': queries, 'batch_count': batches}."""
    out = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            if family.name == "dpr_search_stage_seconds" and s.name.endswith(("_sum", "_count")):
                out[s.labels["stage"] + s.name[len(family.name):]] = s.value
            elif family.name == "dpr_batch_size" and s.name.endswith(("_sum", "_count")):
                out["batch" + s.name[len(family.name):]] = s.value
    return out


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Mean milliseconds per request in each stage, and the mean batch size, between two scrapes."""
    def mean(name: str, scale: float) -> float | None:
        n = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        return (after[f"{name}_sum"] - before.get(f"{name}_sum", 0)) / n * scale if n else None

    return {**{f"{st}_ms": mean(st, 1000) for st in STAGES}, "mean_batch": mean("batch", 1)}


async def level(base: str, clients: int, seconds: float, max_requests: int) -> dict:
    latencies, statuses = [], []
    stop_at = time.perf_counter() + seconds

    async def worker(i: int):
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            n = i
            while time.perf_counter() < stop_at and len(statuses) < max_requests:
                t0 = time.perf_counter()
                r = await c.post("/search", json={"query": QUERIES[n % len(QUERIES)], "top_k": 10, "with_text": False})
                latencies.append(time.perf_counter() - t0)
                statuses.append(r.status_code)
                n += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = sorted(lat for lat, s in zip(latencies, statuses) if s == 200)
    pct = lambda p: ok[min(len(ok) - 1, int(p * len(ok)))] * 1000 if ok else None  # noqa: E731
    return {"clients": clients, "requests": len(statuses), "ok": len(ok), "non_200": len(statuses) - len(ok),
            "queries_per_s": len(ok) / wall, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def measured_level(base: str, clients: int, seconds: float, max_requests: int) -> dict:
    """:func:`level`, with the server's per-stage breakdown over the same requests."""
    before = scrape(base)
    row = asyncio.run(level(base, clients, seconds, max_requests))
    return {**row, **breakdown(before, scrape(base))}


def run_server(index: str, batching: bool, port: int, code: str | None = None,
               milvus: tuple[str, str] | None = None) -> subprocess.Popen:
    """`dpr serve` of ``index`` on ``port``, ready; with ``code``, the dpr_service of that checkout;
    with ``milvus`` (uri, collection), searching that collection instead of the index."""
    env = {**os.environ, "DPR_BATCHING": str(batching).lower(), "DPR_INDEX": os.path.abspath(index)}
    if milvus:
        del env["DPR_INDEX"]
        env.update(DPR_MILVUS_URI=milvus[0], DPR_MILVUS_COLLECTION=milvus[1])
    if code is None:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--port", str(port), "--log-level", "warning"], env=env)
    else:
        env["PYTHONPATH"] = os.path.abspath(code)
        proc = subprocess.Popen([sys.executable, "-m", "dpr_service.cli", "serve", "--port", str(port), "--log-level", "warning"],
                                env=env, cwd=code)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not become ready")


def table(levels: dict[str, list[dict]]) -> str:
    """Markdown: per concurrency and round, each mode's figures and its queries/s over no batching's."""
    lines = ["| clients | round | mode | q/s | p50 ms | p99 ms | vs no batching | mean batch | queue wait ms | encode ms | "
             "search ms | lookup ms |", "| --- " * 12 + "|"]
    fmt = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for i, off in enumerate(levels["no_batching"]):
        for mode, rows in levels.items():
            r = rows[i]
            lines.append(f"| {r['clients']} | {r['round']} | {mode} | {fmt(r['queries_per_s'])} | {fmt(r['p50_ms'])} | "
                         f"{fmt(r['p99_ms'])} | {r['queries_per_s'] / off['queries_per_s']:.2f}x | {fmt(r['mean_batch'])} | "
                         + " | ".join(fmt(r[f"{st}_ms"]) for st in STAGES) + " |")
    return "\n".join(lines)


def summary(levels: dict[str, list[dict]], clients: list[int]) -> list[str]:
    """Per concurrency and mode: median queries/s and p50 over the rounds, and the ratio to no batching."""
    out = []
    for n in clients:
        med = {mode: (statistics.median(r["queries_per_s"] for r in rows if r["clients"] == n),
                      statistics.median(r["p50_ms"] for r in rows if r["clients"] == n and r["p50_ms"] is not None))
               for mode, rows in levels.items()}
        base_qps, base_p50 = med["no_batching"]
        out.append(f"{n} clients, median over rounds: " + "; ".join(
            f"{mode} {qps:.1f} q/s ({qps / base_qps:.2f}x), p50 {p50:.1f} ms ({p50 - base_p50:+.1f})" for mode, (qps, p50) in med.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="runs/demo/index")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="times every level runs in each mode (alternated)")
    ap.add_argument("--warm-up", type=float, default=2, help="seconds of 8 clients on each server first, not measured")
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--baseline", help="another checkout of this repository: its batcher is served too, as mode 'baseline'")
    ap.add_argument("--milvus-uri", help="also serve from this Milvus (mode 'milvus', batching on): needs --collection")
    ap.add_argument("--collection", help="the collection or alias `dpr index export` wrote from --index")
    ap.add_argument("--out", default="runs/load.json")
    args = ap.parse_args()
    if bool(args.milvus_uri) != bool(args.collection):
        ap.error("--milvus-uri and --collection go together")
    modes = {"no_batching": (False, None, None), "batching": (True, None, None)}
    if args.baseline:
        modes["baseline"] = (True, args.baseline, None)
    if args.milvus_uri:
        modes["milvus"] = (True, None, (args.milvus_uri, args.collection))
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "index": args.index,
               "baseline": args.baseline, "milvus": args.milvus_uri and [args.milvus_uri, args.collection], "levels": {mode: [] for mode in modes}}
    servers = {}
    try:
        for mode, (batching, code, milvus) in modes.items():
            port = free_port()
            servers[mode] = (f"http://127.0.0.1:{port}", run_server(args.index, batching, port, code, milvus))
        for base, _ in servers.values():
            asyncio.run(level(base, 8, args.warm_up, args.max_requests))
        for rnd in range(1, args.rounds + 1):
            for clients in args.clients:
                for mode, (base, _) in servers.items():
                    row = {"round": rnd, **measured_level(base, clients, args.seconds, args.max_requests)}
                    results["levels"][mode].append(row)
                    print(f"{mode} " + json.dumps(row), flush=True)
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(table(results["levels"]))
    print("\n".join(summary(results["levels"], args.clients)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
