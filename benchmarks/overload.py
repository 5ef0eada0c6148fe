"""Overload and constant-rate load on loopback: capacity, a burst at a multiple of it, recovery,
then a long run below capacity.

    python benchmarks/overload.py --index runs/demo/index [--overload 3] [--burst-seconds 10]
                                  [--steady-fraction 0.5] [--steady-seconds 60] [--out runs/overload.json]
    python benchmarks/overload.py --url http://127.0.0.1:8000 --pid <server pid> ...   (a server already running)

1. capacity: closed loop, ``--clients`` connections sending ``/search`` back to back for
   ``--capacity-seconds``; capacity = answered 200s per second.
2. overload: open loop at ``--overload`` x capacity for ``--burst-seconds`` (requests are sent on
   schedule whether or not earlier ones were answered). Every answer must be 200, or 503 with
   Retry-After; anything else (another status, a reset, a timeout) is a failure. The server's RSS
   is sampled throughout.
3. recovery: one request every 50 ms after the burst until the latency is back near the idle p50.
4. steady: open loop at ``--steady-fraction`` x capacity for ``--steady-seconds``: every answer must
   be 200.

The load generator speaks HTTP/1.1 over raw asyncio streams with keep-alive (a few microseconds of
CPU a request), so that on a small machine it can offer several times what the server can take. Like
any HTTP client it drops a kept-alive connection idle for 2 s rather than race the server's 5 s
keep-alive timeout; any other closed connection, reset or timeout counts as a failure.
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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

QUERIES = ["who built the lighthouse on Hask", "ferry from Port Aubel to Brinny", "when is the lantern festival",
           "founder of the lamp makers company", "what do islanders pay with", "oldest lighthouse in the isles"]


def search_payloads(queries: list[str], key: str | None = None, top_k: int = 10) -> list[bytes]:
    """Ready-to-send HTTP/1.1 requests for ``POST /search``, one per query."""
    out = []
    for q in queries:
        body = json.dumps({"query": q, "top_k": top_k, "with_text": False}).encode()
        head = ("POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + (f"X-API-Key: {key}\r\n" if key else "") + f"Content-Length: {len(body)}\r\n\r\n")
        out.append(head.encode() + body)
    return out


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.last_used = time.monotonic()

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, payload: bytes) -> tuple[int, dict, bytes, bool]:
        """One request on this connection: (status, headers, body, keep-alive)."""
        self.writer.write(payload)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.strip().lower().decode()] = v.strip().decode("latin-1")
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        return status, headers, body, headers.get("connection", "").lower() != "close"

    def close(self) -> None:
        self.writer.close()


@dataclass
class Tally:
    """Answers of one phase: statuses, 503s without Retry-After, transport failures, latencies."""

    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    no_retry_after: int = 0
    latencies_ok: list = field(default_factory=list)
    sent: int = 0
    wall_s: float = 0.0

    def failures(self, allowed=(200, 503)) -> int:
        """Answers that are not allowed: other statuses, 503 without Retry-After, transport errors."""
        return sum(n for s, n in self.statuses.items() if s not in allowed) + self.no_retry_after + sum(self.errors.values())

    def summary(self) -> dict:
        ok = sorted(self.latencies_ok)
        pct = lambda p: round(ok[min(len(ok) - 1, int(p * len(ok)))] * 1000, 1) if ok else None  # noqa: E731
        return {"sent": self.sent, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "transport_errors": dict(self.errors), "503_without_retry_after": self.no_retry_after,
                "wall_s": round(self.wall_s, 2), "ok_per_s": round(len(ok) / self.wall_s, 1) if self.wall_s else None,
                "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(ok[-1] * 1000, 1) if ok else None}


IDLE_EXPIRY_S = 2.0  # below uvicorn's 5 s keep-alive timeout, as HTTP clients do: no race with its close


async def _exchange(host, port, payload, idle: list, tally: Tally, t_sched: float, timeout: float) -> None:
    conn = None
    while idle and conn is None:
        conn = idle.pop()
        if time.monotonic() - conn.last_used > IDLE_EXPIRY_S:
            conn.close()
            conn = None
    try:
        if conn is None:
            conn = await asyncio.wait_for(Conn.open(host, port), timeout)
        status, headers, _, keep = await asyncio.wait_for(conn.send(payload), timeout)
    except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
        tally.errors[type(e).__name__] += 1
        if conn is not None:
            conn.close()
        return
    tally.statuses[status] += 1
    if status == 200:
        tally.latencies_ok.append(time.perf_counter() - t_sched)
    elif status == 503 and "retry-after" not in headers:
        tally.no_retry_after += 1
    if keep:
        conn.last_used = time.monotonic()
        idle.append(conn)
    else:
        conn.close()


async def open_loop(host: str, port: int, payloads: list[bytes], rate: float, seconds: float,
                    timeout: float = 30.0, max_in_flight: int = 2000) -> Tally:
    """Send at ``rate`` requests/s for ``seconds`` on schedule (latency counts from the scheduled
    time, so a late send is not hidden), at most ``max_in_flight`` open at once."""
    tally, idle, tasks = Tally(), [], []
    gate = asyncio.Semaphore(max_in_flight)

    async def one(payload, t_sched):
        async with gate:
            await _exchange(host, port, payload, idle, tally, t_sched, timeout)

    start = time.perf_counter()
    i = 0
    while (t_sched := start + i / rate) < start + seconds:
        delay = t_sched - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(payloads[i % len(payloads)], t_sched)))
        i += 1
    tally.sent = i
    await asyncio.gather(*tasks)
    tally.wall_s = time.perf_counter() - start
    for conn in idle:
        conn.close()
    return tally


async def closed_loop(host: str, port: int, payloads: list[bytes], clients: int, seconds: float,
                      timeout: float = 30.0) -> Tally:
    """``clients`` connections, each sending its next request when the last one is answered."""
    tally = Tally()
    stop = time.perf_counter() + seconds

    async def client(c):
        idle, n = [], c
        while time.perf_counter() < stop:
            tally.sent += 1
            await _exchange(host, port, payloads[n % len(payloads)], idle, tally, time.perf_counter(), timeout)
            n += clients
        for conn in idle:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    tally.wall_s = time.perf_counter() - t0
    return tally


async def probe(host: str, port: int, payload: bytes, seconds: float, every: float = 0.05,
                stop_when=None) -> list[tuple[float, float, int]]:
    """One request every ``every`` s for ``seconds`` (or until ``stop_when(probes)``): a list of
    (time since start, latency, status)."""
    out, idle = [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds and not (stop_when and stop_when(out)):
        tally = Tally()
        t = time.perf_counter()
        await _exchange(host, port, payload, idle, tally, t, 30.0)
        status = next(iter(tally.statuses), -1)
        out.append((t - t0, time.perf_counter() - t, status))
        await asyncio.sleep(max(0.0, every - (time.perf_counter() - t)))
    for conn in idle:
        conn.close()
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """The server's resident memory, sampled every ``every`` s in a thread."""

    def __init__(self, pid: int | None, every: float = 0.1):
        self.pid, self.every, self.samples = pid, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if self.pid and (mb := rss_mb(self.pid)) is not None:
                self.samples.append(mb)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float | None:
        return max(self.samples) if self.samples else None


def recovery_time(probes: list[tuple[float, float, int]], normal_s: float, run: int = 5) -> float | None:
    """Seconds after the burst until ``run`` probes in a row answered 200 within ``normal_s``."""
    streak_start, streak = None, 0
    for t, latency, status in probes:
        if status == 200 and latency <= normal_s:
            if streak == 0:
                streak_start = t
            streak += 1
            if streak >= run:
                return streak_start
        else:
            streak = 0
    return None


def run_all(host: str, port: int, pid: int | None, key: str | None, overload: float = 3.0, clients: int = 32,
            capacity_seconds: float = 5.0, burst_seconds: float = 8.0, steady_fraction: float = 0.5,
            steady_seconds: float = 60.0, recovery_seconds: float = 10.0, log=print) -> dict:
    payloads = search_payloads(QUERIES, key)
    out: dict = {}
    idle = asyncio.run(probe(host, port, payloads[0], 2.0))
    idle_p50 = statistics.median(lat for _, lat, s in idle if s == 200)
    rss_idle = rss_mb(pid) if pid else None
    out["idle"] = {"p50_ms": round(idle_p50 * 1000, 1), "rss_mb": rss_idle}
    log(f"idle: p50 {idle_p50 * 1000:.1f} ms, rss {rss_idle} MB")

    cap = asyncio.run(closed_loop(host, port, payloads, clients, capacity_seconds))
    capacity = cap.statuses[200] / cap.wall_s
    out["capacity"] = {"clients": clients, **cap.summary(), "requests_per_s": round(capacity, 1)}
    log(f"capacity: {capacity:.1f} requests/s ({json.dumps(cap.summary())})")

    normal = max(3 * idle_p50, idle_p50 + 0.05)  # "normal latency again"
    with RssSampler(pid) as rss:

        async def burst_and_recovery():
            task = asyncio.create_task(open_loop(host, port, payloads, overload * capacity, burst_seconds))
            await asyncio.sleep(burst_seconds)  # the schedule ends here; answers may still be arriving
            probes = await probe(host, port, payloads[0], recovery_seconds,
                                 stop_when=lambda p: recovery_time(p, normal) is not None)
            return await task, probes

        tally, probes = asyncio.run(burst_and_recovery())
    rec = recovery_time(probes, normal)
    out["overload"] = {"offered_per_s": round(overload * capacity, 1), "factor": overload, **tally.summary(),
                       "failures": tally.failures(), "rss_peak_mb": rss.peak, "rss_idle_mb": rss_idle,
                       "recovery_s": None if rec is None else round(rec, 2), "normal_latency_ms": round(normal * 1000, 1),
                       "probes": len(probes)}
    log(f"overload x{overload}: {json.dumps(out['overload'])}")

    if steady_seconds > 0:
        with RssSampler(pid) as rss:
            steady = asyncio.run(open_loop(host, port, payloads, steady_fraction * capacity, steady_seconds))
        out["steady"] = {"rate_per_s": round(steady_fraction * capacity, 1), "fraction": steady_fraction, **steady.summary(),
                         "failures": steady.failures(allowed=(200,)), "rss_peak_mb": rss.peak}
        log(f"steady at {steady_fraction} x capacity: {json.dumps(out['steady'])}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", help="start `dpr serve` on this index (127.0.0.1, a free port)")
    ap.add_argument("--url", help="or use a running server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--pid", type=int, help="the running server's pid, for its memory")
    ap.add_argument("--key", default=os.environ.get("DPR_API_KEY"))
    ap.add_argument("--overload", type=float, default=3.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--capacity-seconds", type=float, default=5.0)
    ap.add_argument("--burst-seconds", type=float, default=8.0)
    ap.add_argument("--steady-fraction", type=float, default=0.5)
    ap.add_argument("--steady-seconds", type=float, default=60.0)
    ap.add_argument("--out", default="runs/overload.json")
    args = ap.parse_args()
    proc = None
    if args.index:
        port = free_port()
        env = {**os.environ, "DPR_INDEX": args.index}
        proc = subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--port", str(port), "--log-level", "warning"], env=env)
        host, pid = "127.0.0.1", proc.pid
        import httpx

        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"http://{host}:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            proc.kill()
            raise SystemExit("server did not become ready")
    elif args.url:
        from urllib.parse import urlsplit

        u = urlsplit(args.url)
        host, port, pid = u.hostname, u.port or 80, args.pid
    else:
        raise SystemExit("give --index or --url")
    try:
        results = run_all(host, port, pid, args.key, args.overload, args.clients, args.capacity_seconds,
                          args.burst_seconds, args.steady_fraction, args.steady_seconds)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
