"""Build an index artifact: encode a corpus in resumable shards, then build and save a FAISS index.

Embeddings are written chunk by chunk (``emb-000123.npy``) into ``.<output>.partial/`` as they are
computed, so a killed build resumes at the first missing chunk. ``--shard i/n`` encodes only the
chunks ``c`` with ``c % n == i``, so n processes (or machines sharing the directory) split the work;
whichever finds every chunk present builds the index (the merge step), and a plain build with all
chunks present only merges. The artifact is assembled in a temporary directory and renamed into
place when complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from dpr_service.core.checkpoint import Loaded, atomic_directory, load_checkpoint, recover_directory
from dpr_service.core.device import Runtime, pick_runtime
from dpr_service.core.formats import Passage, read_corpus
from dpr_service.core.inference import encode_texts

from .artifact import INDEX_FILE, PASSAGES_FILE, ArtifactError, create_passage_store, insert_passages, write_manifest

log = logging.getLogger("index")

CHUNK = 8192  # passages per embeddings file


UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'8GB', '512MB', '1.5G', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 8GB, 512MB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def choose_factory(n: int, dim: int, budget: int) -> tuple[str, str]:
    """Pick an index for n vectors of dim floats within a memory budget; returns (factory, why)."""
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    flat = n * dim * 4
    if flat <= budget and n <= 2_000_000:
        return "Flat", f"exact search: {n} x {dim} float32 = {gb(flat)} fits the {gb(budget)} budget"
    hnsw = n * (dim * 4 + 2 * 32 * 4 + 16)
    if hnsw <= budget:
        return "HNSW32", f"{n} vectors: exact search is slow at this size; HNSW32 needs ~{gb(hnsw)} of the {gb(budget)} budget"
    nlist = int(min(65536, max(256, 2 ** round(math.log2(4 * math.sqrt(n))))))
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if dim % m == 0 and n * (m + 8) <= budget:
            return f"IVF{nlist},PQ{m}", (
                f"{n} vectors: flat ({gb(flat)}) and HNSW ({gb(hnsw)}) exceed the {gb(budget)} budget; "
                f"IVF{nlist},PQ{m} stores {m} bytes per vector (~{gb(n * (m + 8))})"
            )
    raise ValueError(f"{n} vectors of {dim} dims do not fit {gb(budget)} even with PQ4; raise --memory-budget")


def make_index(factory: str, dim: int, xb: np.ndarray, use_gpu: bool, progress: bool) -> faiss.Index:
    """Build (train on a sample where needed, then add) an inner-product index; returns it on the CPU."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ArtifactError(f"bad --factory {factory!r}: {str(e).strip().splitlines()[-1]}") from None
    n = xb.shape[0]
    ivf = faiss.try_extract_index_ivf(index) if "IVF" in factory else None
    if ivf is not None and n < ivf.nlist:
        raise ArtifactError(f"--factory {factory}: {ivf.nlist} lists need at least {ivf.nlist} vectors, the corpus has {n}; use Flat, HNSW32 or auto")
    gpu = use_gpu and "HNSW" not in factory
    work = index
    if gpu:
        res = faiss.StandardGpuResources()
        work = faiss.index_cpu_to_gpu(res, torch.cuda.current_device(), index)
        log.info("building on the GPU with faiss-gpu")
    if not work.is_trained:
        size = min(n, max(64 * (ivf.nlist if ivf is not None else 256), 65_536))
        sample = xb[np.random.default_rng(0).choice(n, size, replace=False)] if size < n else xb
        log.info("training %s on %d of %d vectors", factory, size, n)
        work.train(np.ascontiguousarray(sample, dtype=np.float32))
    bar = tqdm(total=n, desc="adding to index", unit="vec", disable=not progress, leave=False)
    for start in range(0, n, 65_536):
        work.add(np.ascontiguousarray(xb[start : start + 65_536], dtype=np.float32))
        bar.update(min(65_536, n - start))
    bar.close()
    index = faiss.index_gpu_to_cpu(work) if gpu else work
    params = default_search_params(factory)  # the same values the manifest records for Searcher
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = params["efSearch"]
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    return index


def default_search_params(factory: str) -> dict:
    if "HNSW" in factory:
        return {"efSearch": 128}
    m = re.search(r"IVF(\d+)", factory)
    return {"nprobe": min(int(m.group(1)), 32)} if m else {}


def gpu_faiss_available() -> bool:
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _encode_chunks(loaded: Loaded, corpus: list[Passage], work: Path, chunks: list[int], runtime: Runtime,
                   batch_size: int, progress: bool, chunk: int = CHUNK) -> None:
    todo = [c for c in chunks if not (work / f"emb-{c:06d}.npy").exists()]
    done_passages = sum(min(chunk, len(corpus) - c * chunk) for c in chunks if c not in todo)
    if done_passages:
        log.info("resuming: %d passages already encoded in %s", done_passages, work)
    bar = tqdm(total=sum(min(chunk, len(corpus) - c * chunk) for c in chunks), initial=done_passages,
               desc="encoding passages", unit="p", disable=not progress, dynamic_ncols=True)
    for c in todo:
        part = corpus[c * chunk : (c + 1) * chunk]
        t0 = time.perf_counter()
        emb = encode_texts(loaded.encoder, loaded.tokenizer, part, "passage", runtime, batch_size).numpy()  # (n, D)
        tmp = work / f".emb-{c:06d}.{os.getpid()}.npy"
        np.save(tmp, emb.astype(np.float32))
        os.replace(tmp, work / f"emb-{c:06d}.npy")
        bar.update(len(part))
        bar.set_postfix(p_s=f"{len(part) / (time.perf_counter() - t0):.1f}")
    bar.close()


def _take_lock(path: Path) -> bool:
    """One builder: the first process to create the lock file. The file appears with its owner's
    pid already in it (written beside it, then hard-linked into place), so an empty or unreadable
    lock, or one whose process is gone (killed mid-build), is stale and taken over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                try:
                    pid = int(path.read_text())
                    if pid <= 0 or pid == os.getpid():
                        raise ValueError(pid)
                    os.kill(pid, 0)
                    return False  # its owner is alive
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    path.unlink(missing_ok=True)
                except PermissionError:
                    return False  # a live process of another user
        return False
    finally:
        tmp.unlink(missing_ok=True)


def build(checkpoint: str | Path, corpus_path: str | Path, output: str | Path, factory: str = "auto",
          batch_size: int = 0, shard: tuple[int, int] | None = None, memory_budget: str = "8GB",
          device: str = "auto", progress: bool = True, chunk: int = 0) -> Path | None:
    """Encode (this shard of) the corpus and, when every shard is encoded, build the artifact.

    ``chunk`` passages (default ``CHUNK``) go to each resumable embeddings file; shard i of n
    encodes the chunks c with c % n == i. Returns the artifact path, or None when other shards are
    still missing.
    """
    chunk = chunk or CHUNK
    output = recover_directory(Path(output))
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    corpus = read_corpus(corpus_path)
    n, dim = len(corpus), loaded.encoder.dim
    batch_size = batch_size or (512 if runtime.device.type == "cuda" else 64)
    budget = parse_size(memory_budget)
    if factory == "auto":
        factory, why = choose_factory(n, dim, budget)
        log.info("--factory auto chose %s: %s", factory, why)

    work = output.with_name(f".{output.name}.partial")
    for stale in work.parent.glob(f"{work.name}.done-*"):  # a finished build's removal, killed
        shutil.rmtree(stale, ignore_errors=True)
    if work.exists() and not (work / "build.json").exists():
        shutil.rmtree(work)  # chunks without the job that made them (a kill mid-cleanup): unusable
    work.mkdir(parents=True, exist_ok=True)
    job = {"checkpoint_fingerprint": loaded.fingerprint, "corpus": str(Path(corpus_path).resolve()), "count": n,
           "first_id": corpus[0].id, "last_id": corpus[-1].id, "chunk": chunk, "dim": dim}
    job_file = work / "build.json"
    if job_file.exists():
        previous = json.loads(job_file.read_text())
        if previous != job:
            changed = ", ".join(k for k in job if previous.get(k) != job[k])
            raise ArtifactError(f"{work}: a build of another checkpoint or corpus was interrupted here ({changed} differ); remove {work} to start over")
    else:  # atomically: shards started together (torchrun) may read it while another writes it
        tmp = work / f".build.json.{os.getpid()}"
        tmp.write_text(json.dumps(job, indent=2) + "\n")
        os.replace(tmp, job_file)

    n_chunks = math.ceil(n / chunk)
    mine = [c for c in range(n_chunks) if shard is None or c % shard[1] == shard[0]]
    _encode_chunks(loaded, corpus, work, mine, runtime, batch_size, progress, chunk)
    missing = [c for c in range(n_chunks) if not (work / f"emb-{c:06d}.npy").exists()]
    if missing:
        log.info("shard done; %d of %d chunks still missing (other shards); the last shard builds the index", len(missing), n_chunks)
        return None
    if not _take_lock(work / "merge.lock"):
        log.info("another process is building the index from %s", work)
        return None
    try:
        xb = np.concatenate([np.load(work / f"emb-{c:06d}.npy") for c in range(n_chunks)])  # (n, D)
        if xb.shape != (n, dim):
            raise ArtifactError(f"{work}: embeddings have shape {xb.shape}, expected {(n, dim)}; remove {work} and rebuild")
        t0 = time.perf_counter()
        index = make_index(factory, dim, xb, gpu_faiss_available(), progress)
        with atomic_directory(output) as tmp:
            faiss.write_index(index, str(tmp / INDEX_FILE))
            db = create_passage_store(tmp / PASSAGES_FILE)
            try:
                with db:
                    insert_passages(db, 0, corpus)
            finally:
                db.close()
            write_manifest(
                tmp, checkpoint_fingerprint=loaded.fingerprint, dim=dim, similarity=loaded.config.similarity,
                count=n, factory=factory, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                extra={"search_params": default_search_params(factory), "checkpoint": str(checkpoint)},
            )
        log.info("built %s (%s, %d passages) in %.1fs", output, factory, n, time.perf_counter() - t0)
    except BaseException:
        os.unlink(work / "merge.lock")
        raise
    done = work.with_name(f"{work.name}.done-{os.getpid()}")
    os.rename(work, done)  # no longer a resumable build, even if the removal is killed half-way
    shutil.rmtree(done)
    return output


def add(index_dir: str | Path, corpus_path: str | Path, checkpoint: str | Path | None = None,
        output: str | Path | None = None, batch_size: int = 0, device: str = "auto", progress: bool = True) -> Path:
    """Add passages to an artifact, producing a new verified artifact (in place unless ``output``).

    Duplicate ids (already indexed, or repeated in the new file) are an error, never an overwrite.
    """
    from .search import Searcher

    index_dir = Path(index_dir)
    old = Searcher(index_dir)  # verified before anything is read
    checkpoint = checkpoint or old.manifest.extra.get("checkpoint")
    if not checkpoint:
        raise ArtifactError(f"{index_dir}: the manifest names no checkpoint; pass --checkpoint")
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    if loaded.fingerprint != old.manifest.checkpoint_fingerprint:
        raise ArtifactError(f"{index_dir}: built with another checkpoint than {checkpoint}; new passages would not be comparable")
    new = read_corpus(corpus_path)
    clash = sorted(old.store.by_ids([p.id for p in new]))
    if clash:
        raise ArtifactError(f"{corpus_path}: {len(clash)} passage ids are already in the index (first: {clash[0]!r}); nothing was added")
    emb = encode_texts(loaded.encoder, loaded.tokenizer, new, "passage", runtime,
                       batch_size or (512 if runtime.device.type == "cuda" else 64), progress).numpy()
    target = Path(output) if output else index_dir
    count = old.count + len(new)
    with atomic_directory(target) as tmp:
        shutil.copy2(index_dir / PASSAGES_FILE, tmp / PASSAGES_FILE)
        db = sqlite3.connect(tmp / PASSAGES_FILE)
        try:
            with db:
                insert_passages(db, old.count, new)
        finally:
            db.close()
        index = old.index
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        faiss.write_index(index, str(tmp / INDEX_FILE))
        m = old.manifest
        write_manifest(
            tmp, checkpoint_fingerprint=m.checkpoint_fingerprint, dim=m.dim, similarity=m.similarity, count=count,
            factory=m.factory, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra={**m.extra, "added": m.extra.get("added", 0) + len(new)},
        )
    log.info("added %d passages to %s (now %d)", len(new), target, count)
    return target
