"""FAISS for the index stage: choose a factory for a memory budget, check it against the corpus
before encoding, make it (train on a sample, add memory-mapped embedding parts a slice at a time, on the GPU
where faiss-gpu can), and tune its search-time parameters.

Names follow FAISS (``xb``, ``D``, ``I``); every FAISS error becomes an :class:`ArtifactError`
naming the factory.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from dpr_service.core.artifact import ArtifactError

log = logging.getLogger("index")

UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'8GB', '512MB', '1.5G', '1000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"bad size {text!r} (examples: 8GB, 512MB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def bytes_per_vector(factory: str, dim: int) -> float:
    """Bytes an index made by ``factory`` keeps per ``dim``-dimensional vector, read from FAISS's own
    structures (an empty index, nothing trained): an IVF list entry is its code (``code_size``) and
    an 8-byte id; HNSW stores its vectors (the storage's ``code_size``), 4 bytes per link (level 0
    has ``nb_neighbors(0)``, and a vector reaches each upper level with probability 1/M, M links
    there) and 12 bytes of level and offsets; other indexes their ``code_size``. Fixed costs
    (centroids, codebooks) are left out: they do not grow with the corpus."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf.code_size + 8
    x = faiss.downcast_index(index)
    if isinstance(x, faiss.IndexPreTransform):
        x = faiss.downcast_index(x.index)
    hnsw = getattr(x, "hnsw", None)
    if hnsw is not None:
        m = hnsw.nb_neighbors(1)
        return faiss.downcast_index(x.storage).code_size + 4 * (hnsw.nb_neighbors(0) + m / (m - 1)) + 12
    return x.code_size


def choose_factory(n: int, dim: int, budget: int) -> tuple[str, str]:
    """Pick an index for n vectors of dim floats within a memory budget (bytes, as
    :func:`bytes_per_vector` counts them); returns (factory, why). Raises ValueError when not even
    IVF-PQ with 4-byte codes fits."""
    gb = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    flat = n * bytes_per_vector("Flat", dim)
    if flat <= budget and n <= 2_000_000:
        return "Flat", f"exact search: {n} x {dim} float32 = {gb(flat)} fits the {gb(budget)} budget"
    hnsw = n * bytes_per_vector("HNSW32", dim)
    if hnsw <= budget:
        return "HNSW32", f"{n} vectors: exact search is slow at this size; HNSW32 needs ~{gb(hnsw)} of the {gb(budget)} budget"
    nlist = int(min(65536, max(256, 2 ** round(math.log2(4 * math.sqrt(n))))))
    for m in (64, 48, 32, 24, 16, 12, 8, 4):
        if dim % m:
            continue
        factory = f"IVF{nlist},PQ{m}"
        size = n * bytes_per_vector(factory, dim)
        if size <= budget:
            return factory, (f"{n} vectors: flat ({gb(flat)}) and HNSW ({gb(hnsw)}) exceed the {gb(budget)} budget; "
                             f"{factory} stores {m} bytes of code and an 8-byte id per vector (~{gb(size)})")
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

    ``xb`` is an (n, D) array or a list of them (the memory-mapped part files: only the training
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
    """True when faiss was built with GPU support and sees a GPU."""
    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
