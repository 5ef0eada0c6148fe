"""Query-side training (issue 32): memory and time per step of the whole-corpus loss, and of the
top-k loss, against N random passage vectors.

    python benchmarks/corpus_loss.py                      # N = 10k, 1M, 10M; D = 384; B = 32; tau = 0.05; k = 32
    python benchmarks/corpus_loss.py --ns 10000 1000000 --steps 5 --out runs/corpus_loss
    python benchmarks/corpus_loss.py --rehearse --out /tmp/x    # tiny, in seconds (CI runs it)

What one step is: :func:`trainer.query_side.query_side_loss` on B random unit question embeddings
(a leaf tensor with ``requires_grad``, standing in for the query encoder's output), then
``loss.backward()``; the encoder itself is not run, so the figures are the loss's own cost.

* ``corpus``: the exact NLL over every passage (``--index-loss corpus``): a (B, N) score matrix,
  the (B, N) known-positive mask and :func:`dpr_service.core.loss.in_batch_nll` over all N columns.
* ``topk``: ``--index-loss topk`` with ``--index-negatives K``: the exact top-K search over all N
  vectors (no gradient), then the loss over the batch's positives and negatives.
* ``corpus-chunked``, ``corpus-online`` and ``topk-chunked``: PROPOSALS, measured here and not in the
  project: the same loss and the same negatives (tests/test_corpus_loss_bench.py checks them against
  the project's code) without any (B, N) tensor, ``--chunk`` passages at a time
  (:func:`chunked_corpus_nll`, :func:`online_corpus_nll`, :func:`chunked_index_negatives`), so that
  the step's memory no longer grows with N.

The passages are N random unit vectors of D float32 dimensions (seeded), each its own content
group; each question's positive is a random row and its embedding lies near that row (cosine about
0.9), its only known positive. The corpus's ``ids`` are ``range(N)``: the loss never reads them.

Each (N, mode) runs in a process of its own, one after the other. Time per step is the median of
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
MODES = ("corpus", "topk", "corpus-chunked", "corpus-online", "topk-chunked")
PROPOSALS = ("corpus-chunked", "corpus-online", "topk-chunked")  # their step's memory does not grow with N
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


# ----------------------------------------------------------------------------- the proposal, measured here only


def chunked_corpus_nll(q_emb, corpus, positive_rows, known_rows, temperature: float, chunk: int):
    """PROPOSAL, not the project's loss: ``query_side_loss(..., mode="corpus")``'s value and gradient
    without any (B, N) tensor. The log-sum-exp over the N passages is taken ``chunk`` columns at a
    time, each chunk under ``torch.utils.checkpoint`` so that only its (B,) log-sum-exp is kept and
    its (B, chunk) scores are recomputed in the backward pass (a third pass over the vectors).
    Known positives and their copies are masked as :func:`trainer.query_side.known_mask` masks them
    (-1e30 instead of -inf, so a fully masked chunk has a finite gradient of zero), and each
    question's own positive is added back once, as :func:`dpr_service.core.loss.in_batch_nll` keeps
    it. ``q_emb`` (B, D); returns the mean loss, a scalar."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from trainer.query_side import known_mask

    q = q_emb.float()
    vectors, n = corpus.vectors, corpus.count

    def chunk_lse(q: torch.Tensor, start: int) -> torch.Tensor:  # (B,) log-sum-exp of the chunk's allowed scores
        stop = min(n, start + chunk)
        scores = q @ vectors[start:stop].T / temperature  # (B, c)
        allowed = known_mask(torch.arange(start, stop), known_rows, corpus.content)  # (B, c)
        return torch.logsumexp(scores.masked_fill(~allowed, -1e30), dim=1)

    parts = [checkpoint(chunk_lse, q, start, use_reentrant=False) for start in range(0, n, chunk)]
    positive = (q * vectors[positive_rows]).sum(dim=1) / temperature  # (B,)
    lse = torch.logsumexp(torch.stack(parts + [positive], dim=1), dim=1)  # (B,)
    return (lse - positive).mean()


def online_corpus_nll(q_emb, corpus, positive_rows, known_rows, temperature: float, chunk: int):
    """PROPOSAL, not the project's loss: the same value and gradient as :func:`chunked_corpus_nll`
    with no recomputation. One pass over the vectors, ``chunk`` at a time, keeps per question a
    running maximum m, sum l and softmax-weighted sum of passage vectors a (the online softmax of
    FlashAttention, Dao et al. 2022); the loss is ``mean(m + log l - s_pos)`` and its gradient with
    respect to q_i is ``(a_i / l_i - p_pos(i)) / (temperature * B)``, known in the forward pass, so the
    backward pass is one multiplication. Two matrix products per chunk, as the unchunked loss has
    over all N (scores forward, scores' gradient times the vectors backward). The passage vectors
    must not require gradients (they are the index's). ``q_emb`` (B, D); returns a scalar."""
    import torch

    from trainer.query_side import known_mask

    class OnlineNLL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):  # (B, D) -> the mean loss
            vectors, n = corpus.vectors, corpus.count
            positives = vectors[positive_rows]  # (B, D)
            positive = (q * positives).sum(dim=1) / temperature  # (B,) each question's own positive, kept once
            m, total, weighted = positive.clone(), torch.ones_like(positive), positives.clone()
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                scores = q @ vectors[start:stop].T / temperature  # (B, c)
                allowed = known_mask(torch.arange(start, stop), known_rows, corpus.content)  # (B, c)
                scores = scores.masked_fill_(~allowed, float("-inf"))
                m_new = torch.maximum(m, scores.amax(dim=1))  # finite: m starts at the positive's score
                decay = torch.exp(m - m_new)  # (B,)
                weights = torch.exp(scores.sub_(m_new.unsqueeze(1)))  # (B, c), 0 where masked
                total = total * decay + weights.sum(dim=1)
                weighted = weighted * decay.unsqueeze(1) + weights @ vectors[start:stop]
                m = m_new
            ctx.save_for_backward((weighted / total.unsqueeze(1) - positives) / (temperature * q.shape[0]))
            return (m + torch.log(total) - positive).mean()

        @staticmethod
        def backward(ctx, grad_output):
            (grad_q,) = ctx.saved_tensors
            return grad_output * grad_q

    if corpus.vectors.requires_grad:
        raise ValueError("online_corpus_nll: the passage vectors must not require gradients")
    return OnlineNLL.apply(q_emb.float())


def chunked_index_negatives(q_emb, corpus, positive_rows, known_rows, k: int, ratio, chunk: int):
    """PROPOSAL, not the project's code: :func:`trainer.query_side.index_negatives` (the same (B, k)
    rows, the same mining rules) with the exact search taken ``chunk`` rows at a time, each chunk's
    top k merged into a running top k, so that no (B, N) tensor is made."""
    import torch

    from dpr_service.core.mining import score_ceiling
    from trainer.query_side import known_mask

    with torch.no_grad():
        q = q_emb.float()
        positive_scores = (q * corpus.vectors[positive_rows]).sum(dim=1)  # (B,)
        ceilings = torch.tensor([score_ceiling(float(s), 0.0, ratio) if ratio is not None else float("inf")
                                 for s in positive_scores.tolist()])  # (B,) no ceiling without a ratio
        best = torch.full((q.shape[0], 0), float("-inf"))
        best_rows = torch.full((q.shape[0], 0), -1, dtype=torch.long)
        for start in range(0, corpus.count, chunk):
            stop = min(corpus.count, start + chunk)
            scores = q @ corpus.vectors[start:stop].T  # (B, c)
            allowed = known_mask(torch.arange(start, stop), known_rows, corpus.content) & (scores <= ceilings.unsqueeze(1))
            top = scores.masked_fill(~allowed, float("-inf")).topk(min(k, stop - start), dim=1)
            merged = torch.cat([best, top.values], dim=1).topk(min(k, best.shape[1] + top.values.shape[1]), dim=1)
            best = merged.values
            best_rows = torch.cat([best_rows, top.indices + start], dim=1).gather(1, merged.indices)
        return torch.where(torch.isfinite(best), best_rows, -1)


# ----------------------------------------------------------------------------- one N, in its own process


def measure(n: int, dim: int, batch: int, temperature: float, k: int, ratio: float, modes: list[str],
            steps: int, warmup: int, seed: int, chunk: int, mode_seconds: float) -> dict:
    """Build the random corpus and time each mode's steps (see the module docstring): ``warmup``
    untimed, then ``steps`` timed, fewer (at least 3) once ``mode_seconds`` have passed. Returns a dict:
    ``n``, ``corpus_rss_bytes``, ``threads``, ``load``, and per mode ``ms`` and ``cpu_ms`` (per step),
    ``loss`` and ``peak_extra_bytes``."""
    import torch

    import trainer.query_side as qs
    from dpr_service.core.config import EncoderConfig
    from trainer.distributed import Dist

    torch.manual_seed(seed)
    gc.collect()
    before = rss_bytes()
    vectors = torch.empty(n, dim, dtype=torch.float32)  # (N, D)
    for start in range(0, n, GEN_ROWS):
        block = vectors[start : start + GEN_ROWS]
        block.normal_()
        block.div_(block.norm(dim=1, keepdim=True))
    content = torch.arange(n, dtype=torch.int64)  # (N,) every passage its own content group
    corpus = qs.IndexedCorpus(Path("random"), None, vectors, range(n), {}, content, True)
    corpus_rss = rss_bytes() - before

    positive_rows = torch.randint(0, n, (batch,))  # (B,)
    batch_ = qs.QueryBatch({}, positive_rows, positive_rows.unsqueeze(1).clone())  # known rows (B, 1)
    near = vectors[positive_rows] + 0.5 * torch.randn(batch, dim) / dim**0.5  # cosine ~0.9 with the positive
    q0 = near / near.norm(dim=1, keepdim=True)  # (B, D)
    encoder = types.SimpleNamespace(config=EncoderConfig(pooling="mean", similarity="cosine", temperature=temperature))
    single = Dist()
    project_negatives = qs.index_negatives

    def step(mode: str) -> float:
        q = q0.clone().requires_grad_(True)
        if mode == "corpus-chunked":
            loss = chunked_corpus_nll(q, corpus, positive_rows, batch_.known_rows, temperature, chunk)
        elif mode == "corpus-online":
            loss = online_corpus_nll(q, corpus, positive_rows, batch_.known_rows, temperature, chunk)
        elif mode == "topk-chunked":  # the project's topk loss with the proposed search in place of index_negatives
            qs.index_negatives = lambda q_, c_, p_, kr_, k_, r_: chunked_index_negatives(q_, c_, p_, kr_, k_, r_, chunk)
            try:
                loss, _ = qs.query_side_loss(encoder, q, batch_, corpus, single, "topk", k, ratio)
            finally:
                qs.index_negatives = project_negatives
        else:
            loss, _ = qs.query_side_loss(encoder, q, batch_, corpus, single, mode, k, ratio)
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
        began = time.perf_counter()
        while len(times) < steps and (len(times) < 3 or time.perf_counter() - began < mode_seconds):
            start, start_cpu = time.perf_counter(), time.process_time()
            losses.append(step(mode))
            times.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
        out["modes"][mode] = {"ms": times, "cpu_ms": cpu, "loss": losses[-1], "load": os.getloadavg()[0],
                              "peak_extra_bytes": max(0, peak_bytes() - resident)}
    return out


# ----------------------------------------------------------------------------- the parent: N after N


def predict_need(n: int, batch: int, dim: int, done: list[dict], mode: str) -> tuple[int, str]:
    """Bytes ``mode`` needs at N passages (vectors, content groups, the step's peak extra) and how the
    extra was obtained from the largest N at which ``mode`` was measured: for the project's modes its
    peak extra per (question, passage) pair scaled to B x N; for the proposals its peak extra
    as it was (a chunk's tensors do not grow with N), plus a quarter. Before any measurement, 24 bytes
    per pair (six float32 (B, N) tensors)."""
    stored = n * dim * 4 + n * 8
    measured = [r for r in done if mode in r.get("modes", {})]
    if not measured:
        return stored + 24 * batch * n, "estimate: 24 bytes per (question, passage) pair, nothing measured yet"
    ref = max(measured, key=lambda r: r["n"])
    extra = ref["modes"][mode]["peak_extra_bytes"]
    if mode in PROPOSALS:
        return stored + int(1.25 * extra), f"peak extra measured at N={ref['n']:,} is {extra / GB:.2f} GB"
    per_pair = extra / (ref["batch"] * ref["n"])
    return (stored + int(per_pair * batch * n),
            f"peak extra measured at N={ref['n']:,} is {per_pair:.1f} bytes per (question, passage) pair")


def run_case(args, n: int, modes: list[str]) -> dict:
    """N passages and ``modes`` in a child process (a clean heap); returns its result, or ``error``."""
    cmd = [sys.executable, __file__, "--child", "--ns", str(n), "--dim", str(args.dim), "--batch-size", str(args.batch_size),
           "--temperature", str(args.temperature), "--k", str(args.k), "--ratio", str(args.ratio), "--chunk", str(args.chunk),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--mode-seconds", str(args.mode_seconds),
           "--seed", str(args.seed), "--modes", *modes]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"n": n, "dim": args.dim, "batch": args.batch_size, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


LABELS = {"corpus": "corpus (exact NLL over all N)", "topk": "topk (k={k})",
          "corpus-chunked": "corpus, chunked + checkpoint (proposal)", "corpus-online": "corpus, chunked online softmax (proposal)", "topk-chunked": "topk (k={k}), chunked search (proposal)"}


def table(rows: list[dict], machine_: str, date: str) -> str:
    """The markdown table: one line per (N, mode), measured or not run (and why)."""
    head = ("| N | vectors GB | mode | ms/step, median (min-max) | CPU ms/step | peak extra RSS GB | corpus RSS GB | machine | date |\n"
            "|---:|---:|---|---|---:|---:|---:|---|---|\n")
    lines = []
    for r in rows:
        vec = f"{r['n'] * r['dim'] * 4 / GB:.2f}"
        for mode, m in r.get("modes", {}).items():
            ms = m["ms"]
            where = re.sub(r"load [\d.]+", f"load {m['load']:.1f}", machine_)  # the load when the mode's steps ended
            lines.append(f"| {r['n']:,} | {vec} | {LABELS[mode].format(k=r['k'])} | "
                         f"{statistics.median(ms):,.1f} ({min(ms):,.1f}-{max(ms):,.1f}) | {statistics.median(m['cpu_ms']):,.1f} | "
                         f"{m['peak_extra_bytes'] / GB:.3f} | {r['corpus_rss_bytes'] / GB:.2f} | {where} | {date} |")
        for mode, why in r.get("skipped", {}).items():
            lines.append(f"| {r['n']:,} | {vec} | {LABELS[mode].format(k=r['k'])} | not run: {why} | - | - | - | {machine_} | {date} |")
        for mode, why in r.get("errors", {}).items():
            lines.append(f"| {r['n']:,} | {vec} | {LABELS[mode].format(k=r['k'])} | failed: {why} | - | - | - | {machine_} | {date} |")
    return head + "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000], help="corpus sizes N, run in this order")
    ap.add_argument("--dim", type=int, default=384, help="D, the vectors' width (MiniLM: 384)")
    ap.add_argument("--batch-size", type=int, default=32, help="B, questions per step (dpr train's default)")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--k", type=int, default=32, help="--index-negatives of the topk mode")
    ap.add_argument("--ratio", type=float, default=0.95, help="--mine-ratio of the topk mode")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                    help="the project's corpus and topk losses; *-chunked: the proposed chunked versions, measured")
    ap.add_argument("--chunk", type=int, default=262_144, help="passages per chunk of the chunked proposals")
    ap.add_argument("--mode-seconds", type=float, default=120.0, help="stop timing a mode after this many seconds (3 steps at least)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--headroom-gb", type=float, default=2.0, help="memory left to everything else on the machine")
    ap.add_argument("--available-gb", type=float, default=None, help="use this instead of MemAvailable (to plan or test)")
    ap.add_argument("--out", default="runs/corpus_loss", help="folder for result.md and result.json")
    ap.add_argument("--rehearse", action="store_true", help="tiny sizes, in seconds: N = 2k, 8k; D = 16; B = 4; k = 4; chunks of 1k; 2 steps; --shared-process")
    ap.add_argument("--shared-process", action="store_true",
                    help="all modes of an N in one process (faster; later modes' peaks may be understated)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rehearse:
        ap.set_defaults(ns=[2_000, 8_000], dim=16, batch_size=4, k=4, steps=2, chunk=1_000, shared_process=True)
        args = ap.parse_args(argv)
    bad = [name for name in ("dim", "batch_size", "k", "steps", "chunk") if getattr(args, name) < 1] + [f"ns {n}" for n in args.ns if n < 2]
    if bad or args.warmup < 0 or args.temperature <= 0:
        ap.error(f"--{(bad or ['warmup/temperature'])[0].replace('_', '-')} is out of range")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        (n,) = args.ns
        print(json.dumps(measure(n, args.dim, args.batch_size, args.temperature, args.k, args.ratio, args.modes,
                                 args.steps, args.warmup, args.seed, args.chunk, args.mode_seconds)), flush=True)
        return 0
    machine_, date = machine(), datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    rows: list[dict] = []
    for n in args.ns:
        available = int(args.available_gb * GB) if args.available_gb is not None else mem_available_bytes()
        runnable, skipped = [], {}
        for mode in args.modes:
            need, basis = predict_need(n, args.batch_size, args.dim, rows, mode)
            if need > available - args.headroom_gb * GB:
                skipped[mode] = (f"needs about {need / GB:.1f} GB ({n * args.dim * 4 / GB:.1f} GB of vectors; {basis}), "
                                 f"{available / GB:.1f} GB available less {args.headroom_gb:g} GB headroom")
                print(f"N={n:,} {mode}: {skipped[mode]}", flush=True)
            else:
                runnable.append(mode)
        result = {"n": n, "dim": args.dim, "batch": args.batch_size, "k": args.k, "modes": {}, "skipped": skipped}
        # each mode in a process of its own: its peak is not hidden by heap that an earlier mode left behind
        for modes in ([runnable] if args.shared_process and runnable else [[mode] for mode in runnable]):
            print(f"N={n:,}: running {' '.join(modes)}", flush=True)
            done = run_case(args, n, modes)
            print(json.dumps(done), flush=True)
            if "error" in done:
                result.setdefault("errors", {}).update({mode: done["error"] for mode in modes})
                continue
            result["modes"].update(done.pop("modes"))
            result.update(done)
        rows.append(result)
    text = table(rows, machine_, date)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.md").write_text(text)
    (out / "result.json").write_text(json.dumps({"machine": machine_, "date": date, "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(text)
    return 1 if any(r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
