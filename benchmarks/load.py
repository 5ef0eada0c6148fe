"""Load test of `/search` on loopback: queries/s and p50/p99 latency at several concurrencies, with
dynamic batching on and off. Bounded: each level runs for ``--seconds`` and at most ``--max-requests``.

    python benchmarks/load.py --index runs/demo/index [--clients 1 8 32 64] [--seconds 10]

Starts `dpr serve` itself (127.0.0.1 only), once with DPR_BATCHING=true and once with false.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUERIES = ["who built the lighthouse on Hask", "ferry from Port Aubel to Brinny", "when is the lantern festival",
           "founder of the lamp makers company", "what do islanders pay with", "oldest lighthouse in the isles"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run_server(index: str, batching: bool, port: int) -> subprocess.Popen:
    env = {**os.environ, "DPR_BATCHING": str(batching).lower(), "DPR_INDEX": index}
    dpr = str(Path(sys.executable).parent / "dpr")
    proc = subprocess.Popen([dpr, "serve", "--port", str(port), "--log-level", "warning"], env=env)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="runs/demo/index")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-requests", type=int, default=20000)
    ap.add_argument("--out", default="runs/load.json")
    args = ap.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU", "index": args.index, "levels": {}}
    for batching in (False, True):
        port = free_port()
        proc = run_server(args.index, batching, port)
        try:
            rows = []
            for clients in args.clients:
                rows.append(asyncio.run(level(f"http://127.0.0.1:{port}", clients, args.seconds, args.max_requests)))
                print(("batching " if batching else "no batching ") + json.dumps(rows[-1]), flush=True)
            results["levels"]["batching" if batching else "no_batching"] = rows
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
