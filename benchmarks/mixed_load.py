"""One client must not stall the service: ``/search`` latency alone, then beside each kind of heavy,
slow or administrative client (issue 30).

    python benchmarks/mixed_load.py --model <MiniLM dir> [--seconds 20] [--runs 2] [--out runs/mixed_load.json]

Starts ``dpr serve`` (defaults, an admin key set, jobs and data under a temporary directory) on an
index of the demo corpus built with ``--model``, then measures ``/search`` with 8 closed-loop clients:

- ``alone``: nothing else;
- ``score``: beside 8 clients each sending the largest ``/score`` the defaults allow (about
  ``DPR_MAX_REQUEST_TOKENS`` tokens: 4 items x 63 passages truncated at the passage max length),
  again and again (on 503 they wait its Retry-After);
- ``slow_bodies``: beside 256 sockets that each send ``/search`` headers with ``Content-Length:
  1000`` and 11 bytes of body, then hold (re-opened when the server closes them);
- ``uploads``: beside 4 clients each uploading a 50 MB training file (JSONL), again and again;
- ``events``: beside 200 open ``/jobs/{id}/events`` streams (the job's training process is paused
  with SIGSTOP so that its CPU does not count; it is resumed and cancelled at the end).

Each scenario reports ``/search`` q/s, p50, p99 and every status, what the side clients got, and
the server's peak RSS; ``score`` also the peak RSS of one largest ``/score`` alone. With ``--runs 2``
the scenarios run twice, alternated (alone, score, ..., alone, score, ...). The load generator
shares the machine's cores with the server: on 2 cores its figures are a lower bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overload import RssSampler, closed_loop, free_port, rss_mb, search_payloads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "dpr_service" / "demo_data"
ADMIN = "mixed-load-admin-key-0123456789"
QUERIES = ["who built the lighthouse on Hask", "ferry from Port Aubel to Brinny", "when is the lantern festival",
           "founder of the lamp makers company", "what do islanders pay with", "oldest lighthouse in the isles"]
WORDS = ("lighthouse ferry harbour lantern island festival keeper tower signal beacon granite tide storm "
         "channel reef pilot chart compass north south").split()


def long_text(i: int, words: int = 400) -> str:
    """A passage longer than any passage max length (it is truncated: the most tokens one passage costs)."""
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words))


def largest_score(items: int = 4, passages: int = 63) -> dict:
    """The largest /score the default token budget admits on MiniLM (256-token passages)."""
    return {"items": [{"question": f"which lighthouse keeper {i} saw the storm",
                       "positive": long_text(i * 100), "negatives": [long_text(i * 100 + j + 1) for j in range(passages - 1)]}
                      for i in range(items)]}


def train_file(path: Path, megabytes: int = 50) -> Path:
    """A plain-format training file of about ``megabytes`` MB (valid lines)."""
    line_no, written = 0, 0
    with open(path, "w") as fh:
        while written < megabytes * 1_000_000:
            line = json.dumps({"query": f"question {line_no} about the {WORDS[line_no % len(WORDS)]}",
                               "positive": {"title": "t", "text": long_text(line_no, 60), "id": f"p{line_no}"}}) + "\n"
            fh.write(line)
            written += len(line)
            line_no += 1
    return path


class Server:
    """``dpr serve`` of ``index`` with an admin key, jobs and data under ``root``."""

    def __init__(self, index: Path, root: Path, model: Path):
        self.root, self.port = root, free_port()
        (root / "data").mkdir(parents=True, exist_ok=True)
        shutil.copytree(model, root / "data" / "minilm", dirs_exist_ok=True)
        shutil.copytree(DEMO, root / "data" / "demo", dirs_exist_ok=True)
        env = {**os.environ, "DPR_INDEX": str(index), "DPR_ADMIN_KEY": ADMIN, "DPR_JOBS_DIR": str(root / "jobs"),
               "DPR_DATA_ROOT": str(root / "data"), "DPR_MAX_UPLOAD_BYTES": str(60_000_000)}
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "dpr"), "serve", "--port", str(self.port),
                                      "--log-level", "warning"], env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.proc.kill()
        raise SystemExit("the server did not become ready")

    def close(self):
        self.proc.terminate()  # the job runner stops its job first (it saves last/): give it time
        try:
            self.proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def side_score(base: str, stop: asyncio.Event, tally: Counter, latencies: list) -> None:
    body = json.dumps(largest_score()).encode()
    async with httpx.AsyncClient(base_url=base, timeout=900) as h:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = await h.post("/score", content=body, headers={"content-type": "application/json"})
            except httpx.TransportError as e:
                tally[type(e).__name__] += 1
                continue
            tally[r.status_code if r.status_code != 503 or r.headers.get("retry-after") else "503-no-retry-after"] += 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            elif r.status_code == 503:
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
            else:
                raise SystemExit(f"/score answered {r.status_code}: {r.text[:300]}")


async def side_slow_bodies(port: int, stop: asyncio.Event, tally: Counter, sockets: int = 256) -> None:
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"query": "')

    async def one():
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head)
                await writer.drain()
                answer = await reader.read(200)  # held until the server gives up on the body
                tally[answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1") else "closed"] += 1
                writer.close()
            except OSError as e:
                tally[type(e).__name__] += 1
                await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(one()) for _ in range(sockets)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def side_uploads(base: str, stop: asyncio.Event, tally: Counter, upload: Path, clients: int = 4) -> None:
    data = upload.read_bytes()
    counter = iter(range(10**6))
    prefix = f"{time.time_ns():x}"  # names never repeat across scenarios and runs (a taken name is 409)

    async def one(c):
        async with httpx.AsyncClient(base_url=base, timeout=900, headers={"X-Admin-Key": ADMIN}) as h:
            while not stop.is_set():
                r = await h.post(f"/datasets?name=up-{prefix}-{c}-{next(counter)}.jsonl", content=data)
                tally[r.status_code] += 1
                if r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                elif r.status_code not in (200, 201):
                    raise SystemExit(f"upload answered {r.status_code}: {r.text[:300]}")

    await asyncio.gather(*(one(c) for c in range(clients)))


async def side_events(base: str, stop: asyncio.Event, tally: Counter, job: str, streams: int = 200) -> None:
    async def one():
        async with httpx.AsyncClient(base_url=base, timeout=None, headers={"X-Admin-Key": ADMIN}) as h:
            async with h.stream("GET", f"/jobs/{job}/events") as r:
                tally[r.status_code] += 1
                if r.status_code != 200:
                    return
                async for _ in r.aiter_raw():
                    if stop.is_set():
                        return

    tasks = [asyncio.create_task(one()) for _ in range(streams)]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def job_processes(job: str) -> list[int]:
    """The pids whose command line names the job (its training process and any child of it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if job in (d / "cmdline").read_bytes().decode("utf-8", "replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def paused_job(server: Server) -> tuple[str, list[int]]:
    """A training job of the demo, its training processes paused (SIGSTOP): (job id, their pids)."""
    with httpx.Client(base_url=server.base, timeout=120, headers={"X-Admin-Key": ADMIN}) as h:
        r = h.post("/jobs", json={"model": "minilm", "train": "demo", "max_steps": 100000, "log_every": 1})
        assert r.status_code == 201, r.text[:300]
        job = r.json()["id"]
        for _ in range(600):
            if h.get(f"/jobs/{job}").json()["state"] == "running" and (pids := job_processes(job)):
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                return job, pids
            time.sleep(0.2)
    raise SystemExit("the job never started")


async def heavy_lane_idle(base: str, timeout: float = 900) -> None:
    """Wait until the server's heavy and admin lanes hold no work (``/metrics``), so that what one
    scenario left running does not count against the next."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=30) as h:
        while time.monotonic() < deadline:
            text = (await h.get("/metrics")).text
            busy = [line for line in text.splitlines() if line.startswith("dpr_lane_pending{")
                    and ('"heavy"' in line or '"admin"' in line) and not line.endswith(" 0.0")]
            if not busy:
                return
            await asyncio.sleep(0.5)


def scenario(name: str, server: Server, seconds: float, clients: int, upload: Path | None, job: str | None) -> dict:
    payloads = search_payloads(QUERIES)
    side: Counter = Counter()
    score_latencies: list = []

    async def run():
        stop = asyncio.Event()
        if name == "score":
            side_tasks = [asyncio.create_task(side_score(server.base, stop, side, score_latencies)) for _ in range(8)]
        elif name == "slow_bodies":
            side_tasks = [asyncio.create_task(side_slow_bodies(server.port, stop, side))]
        elif name == "uploads":
            side_tasks = [asyncio.create_task(side_uploads(server.base, stop, side, upload))]
        elif name == "events":
            side_tasks = [asyncio.create_task(side_events(server.base, stop, side, job))]
        else:
            side_tasks = []
        if side_tasks:
            await asyncio.sleep(3.0)  # the side load is under way before /search is measured
        tally = await closed_loop("127.0.0.1", server.port, payloads, clients, seconds, timeout=60)
        stop.set()
        await asyncio.gather(*side_tasks, return_exceptions=True)  # each side client finishes its request
        await heavy_lane_idle(server.base)
        return tally

    with RssSampler(server.proc.pid) as rss:
        tally = asyncio.run(run())
    out = {"search": {**tally.summary(), "failures": tally.failures(allowed=(200,))},
           "side": {str(k): v for k, v in side.items()}, "rss_peak_mb": rss.peak}
    if score_latencies:
        out["score_s"] = {"n": len(score_latencies), "median": round(sorted(score_latencies)[len(score_latencies) // 2], 1)}
    return out


def largest_score_rss(server: Server) -> dict:
    """Peak RSS of one largest /score, alone (the server idle otherwise)."""
    before = rss_mb(server.proc.pid)
    with RssSampler(server.proc.pid, every=0.05) as rss:
        t0 = time.perf_counter()
        r = httpx.post(f"{server.base}/score", json=largest_score(), timeout=900)
        took = time.perf_counter() - t0
    assert r.status_code == 200, r.text[:300]
    return {"status": r.status_code, "seconds": round(took, 1), "rss_before_mb": round(before, 1),
            "rss_peak_mb": round(rss.peak, 1), "texts": 4 * 64}


def build_index(model: Path, out: Path) -> Path:
    subprocess.run([str(Path(sys.executable).parent / "dpr"), "index", "build", "--checkpoint", str(model),
                    "--corpus", str(DEMO), "--output", str(out), "--no-progress"], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the starting model (MiniLM directory) to index the demo with")
    ap.add_argument("--seconds", type=float, default=20.0, help="/search measured this long per scenario")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--scenarios", nargs="+", default=["alone", "score", "slow_bodies", "uploads", "events"])
    ap.add_argument("--out", default="runs/mixed_load.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mixed-load-"))
    index = build_index(Path(args.model), root / "index")
    upload = train_file(root / "upload.jsonl") if "uploads" in args.scenarios else None
    server = Server(index, root, Path(args.model))
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "runs": []}
    job, pids = None, []
    try:
        results["largest_score_alone"] = largest_score_rss(server)
        print("largest /score alone:", json.dumps(results["largest_score_alone"]), flush=True)
        if "events" in args.scenarios:
            job, pids = paused_job(server)
        for run in range(args.runs):
            row = {}
            for name in args.scenarios:
                row[name] = scenario(name, server, args.seconds, args.clients, upload, job)
                print(f"run {run + 1} {name}:", json.dumps(row[name]), flush=True)
            results["runs"].append(row)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        if job is not None:
            httpx.post(f"{server.base}/jobs/{job}/cancel", headers={"X-Admin-Key": ADMIN}, timeout=60)
        server.close()
        shutil.rmtree(root, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
