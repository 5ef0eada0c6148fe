"""Build an index artifact: encode a corpus in resumable shards, then build and save a FAISS index.

Embeddings are written chunk by chunk (``emb-000123.npy``) into ``.<output>.partial/`` as they are
computed, so a killed build resumes at the first missing chunk. ``--shard i/n`` encodes only the
chunks ``c`` with ``c % n == i``, so n processes (or machines sharing the directory) split the work;
whichever finds every chunk present builds the index (the merge step), and a plain build with all
chunks present only merges. ``build.json`` in that directory records the job: the checkpoint's
fingerprint, the chunk size and a sha256 of the corpus (ids, titles, texts), so chunks are reused
only for the same corpus; an edited corpus starts over.

The factory is checked against the corpus size before anything is encoded. The merge trains the
index on a sample and adds the memory-mapped chunks a slice at a time, so it holds the index, the
sample and one slice, never all n x D floats. The artifact is assembled in a temporary directory
and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from dpr_service.core.checkpoint import Loaded, atomic_directory, load_checkpoint, recover_directory
from dpr_service.core.device import Runtime, pick_runtime
from dpr_service.core.formats import Passage, read_corpus
from dpr_service.core.inference import encode_texts

from dpr_service.core.artifact import (INDEX_FILE, PASSAGES_FILE, ArtifactError, create_passage_store, insert_passages, prepare_output,
                       write_manifest)

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


def _training_needs(index: faiss.Index) -> list[tuple[int, str]]:
    """(vectors, what) that training ``index`` needs at least: each k-means in it (IVF lists, PQ and
    OPQ codebooks) needs as many training vectors as centroids, and a PCA as many as it keeps."""
    x = faiss.downcast_index(index)
    needs: list[tuple[int, str]] = []
    if isinstance(x, faiss.IndexPreTransform):
        for i in range(x.chain.size()):
            t = faiss.downcast_VectorTransform(x.chain.at(i))
            if isinstance(t, faiss.OPQMatrix):
                needs.append((256, f"the 256-centroid codebooks of OPQ{t.M}"))
            elif isinstance(t, (faiss.PCAMatrix, faiss.ITQTransform)):
                if t.d_out > t.d_in:
                    raise ArtifactError(f"a PCA cannot make {t.d_out} dimensions out of {t.d_in}")
                needs.append((t.d_out, f"a {type(t).__name__.removesuffix('Matrix').removesuffix('Transform')} to {t.d_out} dimensions"))
    if isinstance(x, faiss.IndexIVF):
        needs.append((x.nlist, f"{x.nlist} IVF lists"))
    pq = getattr(x, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
        needs.append((pq.ksub, f"PQ codebooks of {pq.ksub} centroids"))
    for sub in _parts_of(x):
        needs += _training_needs(sub)
    return needs


def _parts_of(x: faiss.Index) -> list[faiss.Index]:
    """The indexes inside a (downcast) index: a pre-transform's or IDMap's index, an IVF's
    quantizer, an HNSW's storage, a refinement's two."""
    subs = (getattr(x, a, None) for a in ("index", "quantizer", "storage", "base_index", "refine_index"))
    return [sub for sub in subs if isinstance(sub, faiss.Index)]


def _contains(index: faiss.Index, kinds: tuple) -> bool:
    x = faiss.downcast_index(index)
    return isinstance(x, kinds) or any(_contains(sub, kinds) for sub in _parts_of(x))


def check_factory(factory: str, dim: int, n: int) -> faiss.Index:
    """The empty inner-product index ``factory`` makes for ``dim``-dimensional vectors, checked for
    a corpus of ``n`` passages before any passage is encoded: FAISS parses it, rows can be added
    without ids (row r is passage r), and ``n`` vectors are enough to train it. What only training
    itself can tell still fails later, as an :class:`ArtifactError` naming the factory."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ArtifactError(f"bad --factory {factory!r} (for an inner-product index of {dim} dimensions): {_faiss_message(e)}") from None
    if _contains(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        raise ArtifactError(f"--factory {factory}: IDMap indexes take explicit ids, and here row r of the index is "
                            "passage r; leave out IDMap")
    if index.is_trained:  # nothing to learn: it must accept vectors as they come
        try:
            index.add(np.zeros((0, dim), dtype=np.float32))
        except RuntimeError as e:
            raise ArtifactError(f"--factory {factory}: cannot add vectors ({_faiss_message(e)})") from None
    try:
        needs = _training_needs(index)
    except ArtifactError as e:
        raise ArtifactError(f"--factory {factory}: {e}") from None
    for needed, what in needs:
        if n < needed:
            raise ArtifactError(f"--factory {factory}: training {what} needs at least {needed} vectors, the corpus has {n}; "
                                "use Flat, HNSW32, auto, or fewer lists or centroids")
    return index


def _faiss_message(e: Exception) -> str:
    """The useful last line of a FAISS exception (the first ones are C++ file and function names)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    return re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", last)


@dataclass(frozen=True)
class GpuPlan:
    """How faiss-gpu builds an index: on CUDA ``device``, with ``GpuClonerOptions.useFloat16``
    (fp16 PQ lookup tables: IVF-PQ with 64-byte codes exceeds a GPU's shared memory in fp32; for
    Flat the same option would store the vectors in fp16, so it is off there)."""

    device: int
    use_float16: bool


def gpu_plan(index: faiss.Index, device: torch.device | None, gpu_faiss: bool) -> GpuPlan | None:
    """Where ``index`` is trained and filled: on the GPU (a plan) or on the CPU (None).

    faiss-gpu implements Flat and IVF with a flat coarse quantizer and Flat, SQ or 8-bit PQ codes;
    HNSW, PQ, SQ, LSH, pre-transformed (PCA, OPQ), refined or IDMap indexes stay on the CPU, as
    does everything when ``device`` is not CUDA or faiss has no GPU support. Pure, so a test on a
    CPU machine checks it."""
    if not gpu_faiss or device is None or device.type != "cuda":
        return None
    gpu = device.index if device.index is not None else 0
    x = faiss.downcast_index(index)
    flat = (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2)
    if type(x) in flat:
        return GpuPlan(gpu, use_float16=False)
    if isinstance(x, faiss.IndexIVF) and type(faiss.downcast_index(x.quantizer)) in flat:
        if type(x) in (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer):
            return GpuPlan(gpu, use_float16=False)
        if type(x) is faiss.IndexIVFPQ and x.pq.nbits == 8:
            return GpuPlan(gpu, use_float16=True)
    return None


def make_index(factory: str, dim: int, xb: np.ndarray | Sequence[np.ndarray], use_gpu: bool = False,
               progress: bool = False, device: torch.device | None = None) -> faiss.Index:
    """Build (train on a sample where needed, then add) an inner-product index; returns it on the CPU.

    ``xb`` is an (n, D) array or a list of them (the memory-mapped chunk files: only the training
    sample and one slice at a time are read into memory). With ``use_gpu`` (faiss-gpu present)
    the index is built on CUDA ``device`` where :func:`gpu_plan` allows, else on the CPU; a GPU
    failure falls back to the CPU with a warning. FAISS errors become :class:`ArtifactError`.
    """
    parts = [xb] if isinstance(xb, np.ndarray) else list(xb)
    n = sum(len(p) for p in parts)
    index = check_factory(factory, dim, n)
    device = device if device is not None else (torch.device("cuda", torch.cuda.current_device()) if use_gpu else None)
    plan = gpu_plan(index, device, use_gpu)
    built = None
    if plan is not None:
        try:
            res = faiss.StandardGpuResources()
            options = faiss.GpuClonerOptions()
            options.useFloat16 = plan.use_float16
            work = faiss.index_cpu_to_gpu(res, plan.device, index, options)  # a copy: `index` stays empty
            log.info("building %s on GPU %d with faiss-gpu (useFloat16=%s)", factory, plan.device, plan.use_float16)
            _train_and_add(work, parts, n, factory, progress)
            built = faiss.index_gpu_to_cpu(work)
        except RuntimeError as e:
            log.warning("faiss-gpu cannot build %s (%s); building it on the CPU", factory, _faiss_message(e))
    if built is None:
        try:
            _train_and_add(index, parts, n, factory, progress)
        except RuntimeError as e:
            raise ArtifactError(f"--factory {factory}: FAISS failed to build it from {n} vectors: {_faiss_message(e)}") from None
        built = index
    tune_search(built)  # the values the manifest records for Searcher, saved in the index file too
    return built


def _train_and_add(index: faiss.Index, parts: list[np.ndarray], n: int, factory: str, progress: bool) -> None:
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        size = min(n, max(64 * (ivf.nlist if ivf is not None else 256), 65_536))
        rows = np.sort(np.random.default_rng(0).choice(n, size, replace=False)) if size < n else np.arange(n)
        log.info("training %s on %d of %d vectors", factory, size, n)
        index.train(_take_rows(parts, rows))
    bar = tqdm(total=n, desc="adding to index", unit="vec", disable=not progress, leave=False)
    for part in parts:
        for start in range(0, len(part), 65_536):
            block = np.ascontiguousarray(part[start : start + 65_536], dtype=np.float32)  # (<=65536, D)
            index.add(block)
            bar.update(len(block))
    bar.close()


def _take_rows(parts: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows (sorted global row numbers) of the concatenation of ``parts``, without concatenating."""
    out = np.empty((len(rows), parts[0].shape[1]), dtype=np.float32)  # (len(rows), D)
    first = 0
    for part in parts:
        lo, hi = np.searchsorted(rows, [first, first + len(part)])
        out[lo:hi] = part[rows[lo:hi] - first]
        first += len(part)
    return out


def tune_search(index: faiss.Index) -> dict:
    """Set the search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW, also an IVF's HNSW
    quantizer) through ``faiss.ParameterSpace``, which reaches inside pre-transforms (PCA, OPQ),
    refinement and quantizers; returns them for the manifest. They are saved in the index file too."""
    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    params = {}
    ivf = faiss.try_extract_index_ivf(index)
    if "nprobe" in names and ivf is not None:
        params["nprobe"] = min(ivf.nlist, 32)
    if names & {"efSearch", "quantizer_efSearch"}:
        params["efSearch"] = 128
    for name, value in params.items():
        space.set_index_parameter(index, name, value)
    return params


def gpu_faiss_available() -> bool:
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _encode_chunks(loaded: Loaded, corpus: list[Passage], work: Path, chunks: list[int], runtime: Runtime,
                   batch_size: int, progress: bool, chunk: int = CHUNK) -> None:
    """Encode the ``chunks`` not yet in ``work``, one embeddings file each; the bar moves per encoder batch."""
    todo = [c for c in chunks if not (work / f"emb-{c:06d}.npy").exists()]
    done_passages = sum(min(chunk, len(corpus) - c * chunk) for c in chunks if c not in todo)
    if done_passages:
        log.info("resuming: %d passages already encoded in %s", done_passages, work)
    bar = tqdm(total=sum(min(chunk, len(corpus) - c * chunk) for c in chunks), initial=done_passages,
               desc="encoding passages", unit="p", disable=not progress, dynamic_ncols=True)
    t0, encoded = time.perf_counter(), 0
    for c in todo:
        part = corpus[c * chunk : (c + 1) * chunk]
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
        os.replace(tmp, work / f"emb-{c:06d}.npy")
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


def corpus_sha256(corpus: Sequence[Passage]) -> str:
    """sha256 over every passage's id, title and text, in order (each field length-prefixed)."""
    h = hashlib.sha256()
    for p in corpus:
        for field in (p.id, p.title, p.text):
            data = field.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


JOB_IDENTITY = ("checkpoint_fingerprint", "chunk", "dim")  # differing: refuse; a differing corpus: start over


def _read_job(work: Path) -> dict | None:
    """The job in ``work/build.json``; ``{}`` for a directory without a readable one, None for no directory."""
    try:
        job = json.loads((work / "build.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or not JSON
        return {} if work.is_dir() else None
    return job if isinstance(job, dict) else {}


def _same_job(found: dict | None, job: dict) -> bool:
    return bool(found) and all(found.get(k) == v for k, v in job.items() if k != "corpus")  # a moved corpus file is the same


def _prepare_work(work: Path, job: dict) -> None:
    """Make ``work`` this build job's directory, keeping the chunks of an interrupted run of the same job.

    Processes starting together (torchrun ranks, shards on one machine) take turns under an
    exclusive lock on a file beside it (``flock``, which the kernel releases when a process dies):
    the first one decides and the others find its directory. Whatever has to go (a leftover without
    build.json, or the chunks of a corpus that was edited since) is renamed aside before it is
    removed, and the new directory appears with its build.json already in it, so a kill at any point
    leaves either nothing or a directory the next build understands. Chunks of another checkpoint
    (or --chunk) are an error, not discarded.
    """
    work.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(_lock_path(work)):
        found = _read_job(work)
        if _same_job(found, job):
            return
        if found:
            other = [k for k in JOB_IDENTITY if found.get(k) != job[k]]
            if other:
                raise ArtifactError(f"{work}: a build with another checkpoint or --chunk was interrupted here "
                                    f"({', '.join(other)} differ); remove {work} to start over")
            why = ("its build.json, from an older version, has no corpus hash" if "corpus_sha256" not in found else
                   f"{found.get('count')} passages, sha256 {str(found.get('corpus_sha256'))[:12]} then; "
                   f"{job['count']}, sha256 {job['corpus_sha256'][:12]} now")
            log.warning("%s: the corpus changed since this build was interrupted (%s): its encoded chunks are discarded "
                        "and encoding starts over", work, why)
        elif found is not None:
            log.info("%s: chunks without the build.json of their job (a kill mid-cleanup, or an older version): removed", work)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if found is not None:
            aside = work.with_name(f"{work.name}.stale-{tag}")
            os.rename(work, aside)
            shutil.rmtree(aside, ignore_errors=True)
        tmp = work.with_name(f"{work.name}.new-{tag}")
        tmp.mkdir()
        (tmp / "build.json").write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, work)


def _lock_path(work: Path) -> Path:
    return work.with_suffix(".lock")  # .<index>.partial -> .<index>.lock


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive flock on ``path`` for the duration of the block (created if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_leftovers(work: Path) -> None:
    """Directories that killed processes left beside ``work``: a finished build's removal
    (``.done-<pid>``), a discarded one's (``.stale-<pid>-*``) and a work directory never renamed into
    place (``.new-<pid>-*``). The last two only of dead processes: a live one is still using its own."""
    for path in work.parent.glob(f"{work.name}.*-*"):
        kind, _, rest = path.name[len(work.name) + 1 :].partition("-")
        if kind not in ("done", "new", "stale"):
            continue
        if kind != "done":
            try:
                pid = int(rest.split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and _pid_alive(pid):
                continue
        shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def build(checkpoint: str | Path, corpus_path: str | Path, output: str | Path, factory: str = "auto",
          batch_size: int | None = 0, shard: tuple[int, int] | None = None, memory_budget: str = "8GB",
          device: str = "auto", progress: bool = True, chunk: int | None = 0) -> Path | None:
    """Encode (this shard of) the corpus and, when every shard is encoded, build the artifact.

    ``chunk`` passages (default ``CHUNK``) go to each resumable embeddings file; shard i of n
    encodes the chunks c with c % n == i. ``batch_size`` 0 or None: 512 on a GPU, 64 on the CPU.
    The factory is checked against the corpus before anything is encoded. Returns the artifact
    path, or None when other shards are still missing.
    """
    started = time.perf_counter()
    if batch_size is not None and batch_size < 0:
        raise ValueError(f"batch_size must be positive (or 0 for the default), got {batch_size}")
    if chunk is not None and chunk < 0:
        raise ValueError(f"chunk must be positive (or 0 for the default), got {chunk}")
    chunk = chunk or CHUNK
    output = recover_directory(prepare_output(output, directory=True))
    runtime = pick_runtime(device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    corpus = read_corpus(corpus_path)
    n, dim = len(corpus), loaded.encoder.dim
    batch_size = batch_size or (512 if runtime.device.type == "cuda" else 64)
    budget = parse_size(memory_budget)
    if factory == "auto":
        factory, why = choose_factory(n, dim, budget)
        log.info("--factory auto chose %s: %s", factory, why)
    check_factory(factory, dim, n)  # a factory that cannot work fails now, not after hours of encoding

    work = output.with_name(f".{output.name}.partial")
    _remove_leftovers(work)
    job = {"checkpoint_fingerprint": loaded.fingerprint, "corpus": str(Path(corpus_path).resolve()),
           "corpus_sha256": corpus_sha256(corpus), "count": n, "chunk": chunk, "dim": dim}
    _prepare_work(work, job)

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
        # memory-mapped: the index is trained on a sample and filled a slice at a time, never from all n x D floats at once
        parts = [np.load(work / f"emb-{c:06d}.npy", mmap_mode="r") for c in range(n_chunks)]  # (<=chunk, D) each
        shapes = [p.shape for p in parts]
        if any(len(s) != 2 or s[1] != dim for s in shapes) or sum(s[0] for s in shapes) != n:
            raise ArtifactError(f"{work}: embeddings have shapes {sorted(set(shapes))} ({sum(s[0] for s in shapes)} rows), "
                                f"expected {n} rows of {dim}; remove {work} and rebuild")
        t0 = time.perf_counter()
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
            write_manifest(
                tmp, checkpoint_fingerprint=loaded.fingerprint, dim=dim, similarity=loaded.config.similarity,
                count=n, factory=factory, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                # absolute: `dpr serve` and `dpr index add` may run from another directory
                extra={"search_params": tune_search(index), "checkpoint": str(Path(checkpoint).resolve())},
            )
        log.info("built %s (%s, %d passages) in %.1fs (FAISS and saving: %.1fs)", output, factory, n,
                 time.perf_counter() - started, time.perf_counter() - t0)
    except BaseException:
        os.unlink(work / "merge.lock")
        raise
    done = work.with_name(f"{work.name}.done-{os.getpid()}")
    os.rename(work, done)  # no longer a resumable build, even if the removal is killed half-way
    shutil.rmtree(done)
    _lock_path(work).unlink(missing_ok=True)
    return output


def add(index_dir: str | Path, corpus_path: str | Path, checkpoint: str | Path | None = None,
        output: str | Path | None = None, batch_size: int | None = 0, device: str = "auto", progress: bool = True) -> Path:
    """Add passages to an artifact, producing a new verified artifact (in place unless ``output``).

    Duplicate ids (already indexed, or repeated in the new file) are an error, never an overwrite.
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
    if loaded.fingerprint != old.manifest.checkpoint_fingerprint:
        raise ArtifactError(f"{index_dir}: built with another checkpoint than {checkpoint}; new passages would not be comparable")
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
        m = old.manifest
        write_manifest(
            tmp, checkpoint_fingerprint=m.checkpoint_fingerprint, dim=m.dim, similarity=m.similarity, count=count,
            factory=m.factory, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            extra={**m.extra, "checkpoint": str(Path(checkpoint).resolve()), "added": m.extra.get("added", 0) + len(new)},
        )
    log.info("added %d passages to %s (now %d)", len(new), target, count)
    return target
