"""Build an index artifact: encode a corpus in resumable shards, then build and save a FAISS index.

The orchestration of ``dpr index build`` and ``dpr index add``. The work directory (embedding parts, shards,
locks, what a killed build leaves) is :mod:`index.workdir`; FAISS (choosing, checking, making and
tuning an index) is :mod:`index.factory`.

Embeddings are written one file at a time (``emb-000123.npy``) into ``.<output>.partial/`` as they are
computed, so a killed build resumes at the first missing file. ``--shard i/n`` encodes only the
parts ``c`` with ``c % n == i``, so n processes (or machines sharing the directory) split the work;
whichever finds every part present builds the index (the merge step), and a plain build with all
parts present only merges. ``build.json`` in that directory records the job: the checkpoint's
fingerprint, the part size and a sha256 of the corpus (ids, titles, texts), so parts are reused
only for the same corpus; an edited corpus starts over.

The factory is checked against the corpus size before anything is encoded. The merge trains the
index on a sample and adds the memory-mapped embedding parts a slice at a time, so it holds the index, the
sample and one slice, never all n x D floats. The artifact is assembled in a temporary directory
and renamed into place when complete; it holds a BM25 index of the same passages (``bm25/``, for
hybrid search) unless ``--no-bm25``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from dpr_service.core.artifact import (BM25_DIR, INDEX_FILE, PASSAGES_FILE, ArtifactError, check_binding, create_passage_store,
                                       insert_passages, prepare_output, write_manifest)
from dpr_service.core.bm25 import BM25, BM25Error
from dpr_service.core.checkpoint import Loaded, atomic_directory, load_checkpoint, recover_directory
from dpr_service.core.device import Runtime, pick_runtime
from dpr_service.core.formats import Passage, read_corpus
from dpr_service.core.hybrid import stored_passages
from dpr_service.core.inference import encode_texts
from dpr_service.core.onnx_export import OnnxRuntime, pick_encoding_runtime

from .factory import check_factory, choose_factory, gpu_faiss_available, make_index, parse_size, tune_search
from .workdir import corpus_sha256, part_path, finish, prepare_work, remove_leftovers, take_lock

log = logging.getLogger("index")

PART_SIZE = 8192  # passages per embeddings file


def _encode_parts(loaded: Loaded, corpus: list[Passage], work: Path, parts: list[int], runtime: Runtime,
                  batch_size: int, progress: bool, part_size: int = PART_SIZE) -> None:
    """Encode the ``parts`` not yet in ``work``, one embeddings file each; the bar moves per encoder batch."""
    todo = [c for c in parts if not part_path(work, c).exists()]
    done_passages = sum(min(part_size, len(corpus) - c * part_size) for c in parts if c not in todo)
    if done_passages:
        log.info("resuming: %d passages already encoded in %s", done_passages, work)
    bar = tqdm(total=sum(min(part_size, len(corpus) - c * part_size) for c in parts), initial=done_passages,
               desc="encoding passages", unit="p", disable=not progress, dynamic_ncols=True)
    t0, encoded = time.perf_counter(), 0
    for c in todo:
        part = corpus[c * part_size : (c + 1) * part_size]
        # longest first, one encoder batch per call: the batches encode_texts would form, and the bar moves with each
        order = sorted(range(len(part)), key=lambda i: -(len(part[i].title) + len(part[i].text)))
        emb = np.empty((len(part), loaded.encoder.dim), dtype=np.float32)  # (n, D)
        for start in range(0, len(part), batch_size):
            rows = order[start : start + batch_size]
            emb[rows] = encode_texts(loaded.encoder, loaded.tokenizer, [part[i] for i in rows], "passage", runtime,
                                     batch_size).numpy()
            encoded += len(rows)
            bar.update(len(rows))
            bar.set_postfix(p_s=f"{encoded / (time.perf_counter() - t0):.1f}")
        tmp = work / f".emb-{c:06d}.{os.getpid()}.npy"
        np.save(tmp, emb)
        os.replace(tmp, part_path(work, c))
    bar.close()


def build(checkpoint: str | Path, corpus_path: str | Path, output: str | Path, factory: str = "auto",
          batch_size: int | None = 0, shard: tuple[int, int] | None = None, memory_budget: str = "8GB",
          device: str = "auto", progress: bool = True, part_size: int | None = 0, bm25: bool = True,
          encoder_runtime: str = "torch", onnx_dir: str | Path | None = None) -> Path | None:
    """Encode (this shard of) the corpus and, when every shard is encoded, build the artifact (with
    a BM25 index of the same passages unless ``bm25`` is False: ``--no-bm25``).

    ``encoder_runtime`` ``onnx`` or ``onnx-int8`` (``--runtime``) encodes with ONNX Runtime on the
    CPU: the export at ``onnx_dir``, or one made now and cached
    (:func:`dpr_service.core.onnx_export.onnx_runtime`); the manifest records which runtime encoded.

    ``part_size`` passages (default ``PART_SIZE``) go to each resumable embeddings file; shard i of n
    encodes the parts c with c % n == i. ``batch_size`` 0 or None: 512 on a GPU, 64 on the CPU.
    The factory is checked against the corpus before anything is encoded. Returns the artifact
    path, or None when other shards are still missing (or another process is merging). Raises
    ValueError (bad arguments), DataError (the corpus), CheckpointError, ArtifactError (FAISS, a
    work directory of another job).
    """
    started = time.perf_counter()
    if batch_size is not None and batch_size < 0:
        raise ValueError(f"batch_size must be positive (or 0 for the default), got {batch_size}")
    if part_size is not None and part_size < 0:
        raise ValueError(f"part_size must be positive (or 0 for the default), got {part_size}")
    part_size = part_size or PART_SIZE
    output = recover_directory(prepare_output(output, directory=True))
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    runtime = pick_encoding_runtime(loaded, runtime, encoder_runtime, onnx_dir)
    corpus = read_corpus(corpus_path)
    n, dim = len(corpus), loaded.encoder.dim
    batch_size = batch_size or (512 if runtime.device.type == "cuda" else 64)
    if factory == "auto":
        factory, why = choose_factory(n, dim, parse_size(memory_budget))
        log.info("--factory auto chose %s: %s", factory, why)
    check_factory(factory, dim, n)  # a factory that cannot work fails now, not after hours of encoding

    work = output.with_name(f".{output.name}.partial")
    remove_leftovers(work)
    prepare_work(work, {"checkpoint_fingerprint": loaded.fingerprint, "corpus": str(Path(corpus_path).resolve()),
                        "corpus_sha256": corpus_sha256(corpus), "count": n, "part_size": part_size, "dim": dim})
    n_parts = math.ceil(n / part_size)
    mine = [c for c in range(n_parts) if shard is None or c % shard[1] == shard[0]]
    _encode_parts(loaded, corpus, work, mine, runtime, batch_size, progress, part_size)
    missing = [c for c in range(n_parts) if not part_path(work, c).exists()]
    if missing:
        log.info("shard done; %d of %d parts still missing (other shards); the last shard builds the index", len(missing), n_parts)
        return None
    if not take_lock(work / "merge.lock"):
        log.info("another process is building the index from %s", work)
        return None
    try:
        t0 = time.perf_counter()
        _merge(loaded, corpus, work, n_parts, output, factory, Path(checkpoint), runtime, progress, bm25)
        log.info("built %s (%s, %d passages) in %.1fs (FAISS and saving: %.1fs)", output, factory, n,
                 time.perf_counter() - started, time.perf_counter() - t0)
    except BaseException:
        os.unlink(work / "merge.lock")
        raise
    finish(work)
    return output


def _merge(loaded: Loaded, corpus: list[Passage], work: Path, n_parts: int, output: Path, factory: str,
           checkpoint: Path, runtime: Runtime, progress: bool, bm25: bool = True) -> None:
    """Build the FAISS index from every part of ``work`` and write the artifact at ``output`` (with
    its BM25 index when ``bm25``)."""
    n, dim = len(corpus), loaded.encoder.dim
    # memory-mapped: the index is trained on a sample and filled a slice at a time, never from all n x D floats at once
    parts = [np.load(part_path(work, c), mmap_mode="r") for c in range(n_parts)]  # (<=part_size, D) each
    shapes = [p.shape for p in parts]
    if any(len(s) != 2 or s[1] != dim for s in shapes) or sum(s[0] for s in shapes) != n:
        raise ArtifactError(f"{work}: embeddings have shapes {sorted(set(shapes))} ({sum(s[0] for s in shapes)} rows), "
                            f"expected {n} rows of {dim}; remove {work} and rebuild")
    index = make_index(factory, dim, parts, gpu_faiss_available(), progress, runtime.device)
    del parts
    with atomic_directory(output) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        db = create_passage_store(tmp / PASSAGES_FILE)
        try:
            with db:
                insert_passages(db, 0, corpus)
        finally:
            db.close()
        if bm25:
            _write_bm25(corpus, tmp, progress)
        write_manifest(
            tmp, checkpoint_fingerprint=loaded.fingerprint, dim=dim, similarity=loaded.config.similarity,
            count=n, factory=factory, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # absolute: `dpr serve` and `dpr index add` may run from another directory; the passage
            # fingerprint lets a query encoder trained against this index (dpr train --index) serve it
            extra={"search_params": tune_search(index), "checkpoint": str(checkpoint.resolve()),
                   "passage_fingerprint": loaded.passage_fingerprint,
                   "encoder_runtime": runtime.name if isinstance(runtime, OnnxRuntime) else "torch"},
        )


def _write_bm25(corpus: list[Passage], artifact: Path, progress: bool) -> None:
    """``bm25/`` of a new artifact: BM25 over ``corpus`` (the passage rows, in order), no pickle. A
    corpus with nothing BM25 can index (all stop words or punctuation) gets none, as with
    ``--no-bm25``, and a warning: the dense index is built all the same."""
    t0 = time.perf_counter()
    try:
        bm25 = BM25(corpus, progress=progress)
    except BM25Error as e:
        log.warning("no BM25 index (as with --no-bm25; /search serves mode dense only): %s", e)
        return
    bm25.save(artifact / BM25_DIR)
    log.info("BM25 index of %d passages (analyzer %s) written in %.1fs", len(corpus), bm25.analyzer,
             time.perf_counter() - t0)


def add(index_dir: str | Path, corpus_path: str | Path, checkpoint: str | Path | None = None,
        output: str | Path | None = None, batch_size: int | None = 0, device: str = "auto", progress: bool = True,
        encoder_runtime: str = "torch", onnx_dir: str | Path | None = None) -> Path:
    """Add passages to an artifact, producing a new verified artifact (in place unless ``output``),
    encoded by ``encoder_runtime`` as in :func:`build`.

    Duplicate ids (already indexed, or repeated in the new file) are an error, never an overwrite.
    An artifact with a BM25 index gets a new one over all its passages (BM25's statistics are
    corpus-wide); one without stays without.
    """
    from dpr_service.core.search import Searcher

    index_dir = Path(index_dir)
    old = Searcher(index_dir)  # verified before anything is read
    checkpoint = checkpoint or old.manifest.extra.get("checkpoint")
    if not checkpoint:
        raise ArtifactError(f"{index_dir}: the manifest names no checkpoint; pass --checkpoint")
    if batch_size is not None and batch_size < 0:
        raise ValueError(f"batch_size must be positive (or 0 for the default), got {batch_size}")
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    runtime = pick_encoding_runtime(loaded, runtime, encoder_runtime, onnx_dir)
    check_binding(old.manifest, loaded.identity, f"{index_dir} (new passages would not be comparable)")
    new = read_corpus(corpus_path)
    clash = sorted(old.store.by_ids([p.id for p in new]))
    if clash:
        raise ArtifactError(f"{corpus_path}: {len(clash)} passage ids are already in the index (first: {clash[0]!r}); nothing was added")
    emb = encode_texts(loaded.encoder, loaded.tokenizer, new, "passage", runtime,
                       batch_size or (512 if runtime.device.type == "cuda" else 64), progress).numpy()
    target = prepare_output(output, directory=True) if output else index_dir
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
        if old.manifest.has_bm25:
            _write_bm25(stored_passages(old) + new, tmp, progress)
        m = old.manifest
        write_manifest(
            tmp, checkpoint_fingerprint=m.checkpoint_fingerprint, dim=m.dim, similarity=m.similarity, count=count,
            factory=m.factory, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra={**m.extra, "checkpoint": str(Path(checkpoint).resolve()), "added": m.extra.get("added", 0) + len(new)},
        )
    log.info("added %d passages to %s (now %d)", len(new), target, count)
    return target
