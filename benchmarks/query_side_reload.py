"""What a query-side model costs to put into service (issue 32): ``POST /admin/reload`` that swaps
the query encoder alone (the served index's FAISS, passage store and BM25 stay loaded) against one
that loads everything again, and a query-side promotion (the index's files hard-linked under a
manifest naming the new checkpoint, then that reload), on a real index.

    python benchmarks/query_side_reload.py --index ../runs/scifact-zeroshot/index --out reload.json
    python benchmarks/query_side_reload.py --index ../runs/scifact-zeroshot/index --synthetic 1000000

The query-side checkpoints are made from the checkpoint that built the index (its manifest's, or
``--checkpoint``): the encoder split into a query encoder and the unchanged passage encoder, the
query encoder's weights moved by a little noise (two seeds: two distinct checkpoints), saved with
``passage_source`` as ``dpr train --index`` writes it: what is timed (loading, checking, warming
up) does not depend on how the query encoder was trained. Runs alternate (query-side reload, full
reload, then again), each timed with time.perf_counter around the request, in one server process
(TestClient; the app's own admin lane). ``--runtime onnx`` times the ONNX runtime's reload too
(the new checkpoint's export made, or read from the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def query_side_copy(built: str, out: Path, seed: int, passage_source: str) -> str:
    """A checkpoint at ``out``: ``built``'s passage encoder unchanged, its query encoder moved by noise
    of std 1e-3 (seeded); returns its fingerprint."""
    import torch

    from dpr_service.core.checkpoint import load_checkpoint, save_checkpoint
    from trainer.query_side import split_encoders

    loaded = load_checkpoint(built)
    encoder = split_encoders(loaded.encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.query_model.parameters():
            if p.dtype.is_floating_point:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return save_checkpoint(out, encoder, loaded.tokenizer, passage_source=passage_source)


def synthetic_index(like: Path, out: Path, n: int, seed: int = 0) -> None:
    """An artifact at ``out`` with ``like``'s manifest fields (checkpoint, passage fingerprint, dim)
    and ``n`` random unit vectors in a Flat index, ``n`` short passages and no BM25: an index of the
    size a reload would read, for the timing only (its rankings mean nothing)."""
    from datetime import datetime, timezone

    import faiss
    import numpy as np

    from dpr_service.core.artifact import (INDEX_FILE, PASSAGES_FILE, create_passage_store, insert_passages,
                                           read_manifest, write_manifest)
    from dpr_service.core.formats import Passage

    m = read_manifest(like)
    out.mkdir(parents=True)
    index = faiss.IndexFlatIP(m.dim)
    rng = np.random.default_rng(seed)
    for start in range(0, n, 100_000):
        x = rng.standard_normal((min(100_000, n - start), m.dim), dtype=np.float32)
        index.add(x / np.linalg.norm(x, axis=1, keepdims=True))
    faiss.write_index(index, str(out / INDEX_FILE))
    db = create_passage_store(out / PASSAGES_FILE)
    insert_passages(db, 0, (Passage(text=f"passage {i} of a synthetic corpus", title="", id=f"s{i}") for i in range(n)))
    db.commit()
    db.close()
    extra = {k: v for k, v in m.extra.items() if k in ("checkpoint", "passage_fingerprint", "encoder_runtime")}
    write_manifest(out, checkpoint_fingerprint=m.checkpoint_fingerprint, dim=m.dim, similarity=m.similarity, count=n,
                   factory="Flat", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   extra={**extra, "search_params": {}})


def point(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target``, replaced atomically (an operator deploying a checkpoint)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="an index artifact (copied into --work; the original is not changed)")
    ap.add_argument("--checkpoint", help="the checkpoint that built it (default: the one its manifest names)")
    ap.add_argument("--work", default="/tmp/query-side-reload", help="scratch directory (emptied first)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--runtime", default="torch", choices=("torch", "onnx", "onnx-int8"))
    ap.add_argument("--synthetic", type=int, help="time an index of this many random vectors instead (the given "
                    "index's checkpoint and dimension; no BM25): how a full reload grows with the corpus")
    ap.add_argument("--out", help="write the figures here (JSON)")
    args = ap.parse_args()

    from fastapi.testclient import TestClient

    from dpr_service.api.app import create_app
    from dpr_service.api.jobs.service import rebind_index
    from dpr_service.api.settings import Settings
    from dpr_service.core.artifact import read_manifest

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    index = work / "index"
    if args.synthetic:
        synthetic_index(Path(args.index), index, args.synthetic)
    else:
        shutil.copytree(args.index, index)
    manifest = read_manifest(index)
    built = args.checkpoint or manifest.extra["checkpoint"]
    fps = [query_side_copy(built, work / f"q{i}", i, manifest.checkpoint_fingerprint) for i in (1, 2)]
    serving = work / "serving"
    point(serving, work / "q1")
    extra = {"onnx_cache": work / "onnx-cache"} if args.runtime != "torch" else {}
    settings = Settings(index=index, checkpoint=serving, device="cpu", runtime=args.runtime, **extra)
    times: dict[str, list[float]] = {"query_encoder_reload_s": [], "full_reload_s": [], "query_side_promotion_s": []}
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").status_code == 200, c.get("/readyz").text
        which = 1
        for run in range(args.runs):
            which = 3 - which
            point(serving, work / f"q{which}")
            t = time.perf_counter()
            r = c.post("/admin/reload")
            times["query_encoder_reload_s"].append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["swapped"] == "query encoder", r.text
            assert r.json()["checkpoint"] == fps[which - 1]
            t = time.perf_counter()
            r = c.post("/admin/reload")  # nothing changed: checkpoint and index loaded and verified again
            times["full_reload_s"].append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["swapped"] == "checkpoint and index", r.text
            print(f"run {run + 1}: query encoder {times['query_encoder_reload_s'][-1]:.3f} s, "
                  f"everything {times['full_reload_s'][-1]:.3f} s", flush=True)
    # a query-side promotion as the training service does it: DPR_INDEX's files hard-linked under a
    # manifest naming the new checkpoint, then the reload (no DPR_CHECKPOINT: the manifest names it)
    settings = Settings(index=index, device="cpu", runtime=args.runtime, **extra)
    rebind_index(index, index, work / "q1")
    with TestClient(create_app(settings)) as c:
        which = 1
        for run in range(args.runs):
            which = 3 - which
            t = time.perf_counter()
            rebind_index(index, index, work / f"q{which}")
            r = c.post("/admin/reload")
            times["query_side_promotion_s"].append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["swapped"] == "query encoder", r.text
    summary = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for k, v in times.items()}
    result = {"index": str(args.index), "synthetic": bool(args.synthetic), "passages": manifest.count, "factory": manifest.factory, "runtime": args.runtime,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", **summary}
    for k, v in summary.items():
        print(f"{k}: median {v['median']:.3f} s (min {v['min']:.3f}, max {v['max']:.3f}) over {len(v['runs'])} runs")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
