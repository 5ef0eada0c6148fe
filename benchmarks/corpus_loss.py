"""Query-side training (issue 32): memory and time per step of the whole-corpus loss, and of the
top-k loss, against N random passage vectors.

    python benchmarks/corpus_loss.py                      # N = 10k, 1M, 10M; D = 384; B = 32; tau = 0.05
    python benchmarks/corpus_loss.py --ns 10000 1000000 --steps 5 --out runs/corpus_loss
    python benchmarks/corpus_loss.py --rehearse --out /tmp/x    # tiny, in seconds (CI runs it)

What one step is: :func:`trainer.query_side.query_side_loss` on B random unit question embeddings
(a leaf tensor with ``requires_grad``, standing in for the query encoder's output), then
``loss.backward()``; the encoder itself is not run, so the figures are the loss's own cost.

* ``corpus``: the exact NLL over every passage (``--index-loss corpus``): a (B, N) score matrix,
  the (B, N) known-positive mask and :func:`dpr_service.core.loss.in_batch_nll` over all N columns.
* ``topk``: ``--index-loss topk`` with ``--index-negatives K``: the exact top-K search over all N
  vectors (no gradient), then the loss over the batch's positives and negatives.

The passages are N random unit vectors of D float32 dimensions (seeded), each its own content
group; each question's positive is a random row and its embedding lies near that row (cosine about
0.9), its only known positive. The corpus's ``ids`` are ``range(N)``: the loss never reads them.

Each N runs in a process of its own, one after the other. Time per step is the median of
``--steps`` timed steps after ``--warmup`` untimed ones (min and max beside it), wall-clock, and
beside it the median CPU time of the process per step (all threads; on a shared machine the wall
time grows with the load, the CPU time much less). Memory is read
from Linux's own accounting of the process: ``corpus RSS`` is what the vectors and content groups
add to the process, ``peak extra`` the largest resident size during the mode's steps above the
resident size before them (VmHWM after resetting it through /proc/self/clear_refs), i.e. what a step
needs beside the stored vectors. GB are 10^9 bytes.

Before each N the parent predicts what the case needs (the vectors, plus the largest peak extra per
(question, passage) pair measured at a smaller N, scaled to B x N) and runs it only when that fits in
MemAvailable less ``--headroom-gb``; otherwise the row says why it was not run. Writes
``OUT/result.md`` (the table) and ``OUT/result.json``; prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GB = 1e9
MODES = ("corpus", "topk")
GEN_ROWS = 262_144  # vectors drawn this many rows at a time, so generating them needs no second copy


# ----------------------------------------------------------------------------- Linux accounting


def _status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: the resident peak)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    """This process's resident peak since start or since :func:`reset_peak`, in bytes."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def mem_available_bytes() -> int:
    """The kernel's estimate of memory available to a new allocation without swapping (MemAvailable)."""
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(match.group(1)) * 1024


def machine() -> str:
    """The CPU model, the cores this process may use, total memory, and the load at the time."""
    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    total = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1)) * 1024
    load = os.getloadavg()[0]
    return f"CPU-{len(os.sched_getaffinity(0))} ({model}, {total / 2**30:.0f} GiB, load {load:.1f})"


# ----------------------------------------------------------------------------- one N, in its own process


def measure(n: int, dim: int, batch: int, temperature: float, k: int, ratio: float, modes: list[str],
            steps: int, warmup: int, seed: int) -> dict:
    """Build the random corpus and time ``steps`` steps of each mode (see the module docstring).
    Returns a dict: ``n``, ``corpus_rss_bytes``, ``threads``, and per mode ``ms`` (the per-step times)
    and ``peak_extra_bytes``."""
    import torch

    from dpr_service.core.config import EncoderConfig
    from trainer.distributed import Dist
    from trainer.query_side import IndexedCorpus, QueryBatch, query_side_loss

    torch.manual_seed(seed)
    gc.collect()
    before = rss_bytes()
    vectors = torch.empty(n, dim, dtype=torch.float32)  # (N, D)
    for start in range(0, n, GEN_ROWS):
        block = vectors[start : start + GEN_ROWS]
        block.normal_()
        block.div_(block.norm(dim=1, keepdim=True))
    content = torch.arange(n, dtype=torch.int64)  # (N,) every passage its own content group
    corpus = IndexedCorpus(Path("random"), None, vectors, range(n), {}, content, True)
    corpus_rss = rss_bytes() - before

    positive_rows = torch.randint(0, n, (batch,))  # (B,)
    batch_ = QueryBatch({}, positive_rows, positive_rows.unsqueeze(1).clone())  # known rows (B, 1)
    near = vectors[positive_rows] + 0.5 * torch.randn(batch, dim) / dim**0.5  # cosine ~0.9 with the positive
    q0 = near / near.norm(dim=1, keepdim=True)  # (B, D)
    encoder = types.SimpleNamespace(config=EncoderConfig(pooling="mean", similarity="cosine", temperature=temperature))
    single = Dist()

    def step(mode: str) -> float:
        q = q0.clone().requires_grad_(True)
        loss, _ = query_side_loss(encoder, q, batch_, corpus, single, mode, k, ratio)
        loss.backward()
        if not (torch.isfinite(loss) and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0):
            raise RuntimeError(f"{mode} at N={n}: loss {float(loss)} or its gradient is not finite and nonzero")
        return float(loss)

    out = {"n": n, "dim": dim, "batch": batch, "corpus_rss_bytes": corpus_rss, "vector_bytes": n * dim * 4,
           "threads": torch.get_num_threads(), "torch": torch.__version__, "load": os.getloadavg()[0], "modes": {}}
    for mode in modes:
        gc.collect()
        resident = rss_bytes()
        reset_peak()
        for _ in range(warmup):
            step(mode)
        times, cpu, losses = [], [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            losses.append(step(mode))
            times.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
        out["modes"][mode] = {"ms": times, "cpu_ms": cpu, "loss": losses[-1],
                              "peak_extra_bytes": max(0, peak_bytes() - resident)}
    return out


# ----------------------------------------------------------------------------- the parent: N after N


def predict_need(n: int, batch: int, dim: int, done: list[dict]) -> tuple[int, str]:
    """Bytes a case of N passages needs (vectors, content groups, the step's peak extra) and how the
    figure was obtained: the peak extra per (question, passage) pair of the largest N measured so far,
    scaled to B x N; before any measurement, 24 bytes per pair (six float32 (B, N) tensors)."""
    stored = n * dim * 4 + n * 8
    measured = [r for r in done if r.get("modes")]
    if not measured:
        return stored + 24 * batch * n, "estimate: 24 bytes per (question, passage) pair, nothing measured yet"
    ref = max(measured, key=lambda r: r["n"])
    per_pair = max(m["peak_extra_bytes"] for m in ref["modes"].values()) / (ref["batch"] * ref["n"])
    return (stored + int(per_pair * batch * n),
            f"peak extra measured at N={ref['n']:,} is {per_pair:.1f} bytes per (question, passage) pair")


def run_case(args, n: int) -> dict:
    """One N in a child process (so that each case starts from a clean heap); returns its result."""
    cmd = [sys.executable, __file__, "--child", "--ns", str(n), "--dim", str(args.dim), "--batch-size", str(args.batch_size),
           "--temperature", str(args.temperature), "--k", str(args.k), "--ratio", str(args.ratio),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed), "--modes", *args.modes]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"n": n, "dim": args.dim, "batch": args.batch_size, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def table(rows: list[dict], machine_: str, date: str) -> str:
    """The markdown table: one line per (N, mode), or per N when it was not run."""
    head = ("| N | vectors GB | mode | ms/step, median (min-max) | CPU ms/step | peak extra RSS GB | corpus RSS GB | machine | date |\n"
            "|---:|---:|---|---|---:|---:|---:|---|---|\n")
    lines = []
    for r in rows:
        vec = f"{r['n'] * r.get('dim', 0) * 4 / GB:.2f}" if "dim" in r else "-"
        if not r.get("modes"):
            lines.append(f"| {r['n']:,} | {vec} | - | not run: {r.get('error') or r.get('skipped')} | - | - | - | {machine_} | {date} |")
            continue
        for mode, m in r["modes"].items():
            ms = m["ms"]
            label = "corpus (exact NLL over all N)" if mode == "corpus" else f"topk (k={r['k']})"
            where = re.sub(r"load [\d.]+", f"load {r['load']:.1f}", machine_)  # the load when this N started
            lines.append(f"| {r['n']:,} | {vec} | {label} | {statistics.median(ms):,.1f} ({min(ms):,.1f}-{max(ms):,.1f}) | "
                         f"{statistics.median(m['cpu_ms']):,.1f} | {m['peak_extra_bytes'] / GB:.3f} | "
                         f"{r['corpus_rss_bytes'] / GB:.2f} | {where} | {date} |")
    return head + "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000], help="corpus sizes N, run in this order")
    ap.add_argument("--dim", type=int, default=384, help="D, the vectors' width (MiniLM: 384)")
    ap.add_argument("--batch-size", type=int, default=32, help="B, questions per step (dpr train's default)")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--k", type=int, default=32, help="--index-negatives of the topk mode")
    ap.add_argument("--ratio", type=float, default=0.95, help="--mine-ratio of the topk mode")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--headroom-gb", type=float, default=2.0, help="memory left to everything else on the machine")
    ap.add_argument("--available-gb", type=float, default=None, help="use this instead of MemAvailable (to plan or test)")
    ap.add_argument("--out", default="runs/corpus_loss", help="folder for result.md and result.json")
    ap.add_argument("--rehearse", action="store_true", help="tiny sizes, in seconds: N = 2k, 8k; D = 16; B = 4; k = 4; 2 steps")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rehearse:
        ap.set_defaults(ns=[2_000, 8_000], dim=16, batch_size=4, k=4, steps=2)
        args = ap.parse_args(argv)
    bad = [name for name in ("dim", "batch_size", "k", "steps") if getattr(args, name) < 1] + [f"ns {n}" for n in args.ns if n < 2]
    if bad or args.warmup < 0 or args.temperature <= 0:
        ap.error(f"--{(bad or ['warmup/temperature'])[0].replace('_', '-')} is out of range")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        (n,) = args.ns
        print(json.dumps(measure(n, args.dim, args.batch_size, args.temperature, args.k, args.ratio, args.modes,
                                 args.steps, args.warmup, args.seed)), flush=True)
        return 0
    machine_, date = machine(), datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    rows: list[dict] = []
    for n in args.ns:
        need, basis = predict_need(n, args.batch_size, args.dim, rows)
        available = int(args.available_gb * GB) if args.available_gb is not None else mem_available_bytes()
        if need > available - args.headroom_gb * GB:
            rows.append({"n": n, "dim": args.dim, "batch": args.batch_size, "need_bytes": need,
                         "skipped": f"needs about {need / GB:.1f} GB ({n * args.dim * 4 / GB:.1f} GB of vectors; {basis}), "
                                    f"{available / GB:.1f} GB available less {args.headroom_gb:g} GB headroom"})
            print(f"N={n:,}: {rows[-1]['skipped']}", flush=True)
            continue
        print(f"N={n:,}: running (predicted need {need / GB:.1f} GB)", flush=True)
        result = run_case(args, n)
        result["k"] = args.k
        rows.append(result)
        print(json.dumps(result), flush=True)
    text = table(rows, machine_, date)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.md").write_text(text)
    (out / "result.json").write_text(json.dumps({"machine": machine_, "date": date, "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(text)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
