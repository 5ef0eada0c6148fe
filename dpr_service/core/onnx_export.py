"""ONNX export of a checkpoint's encoders, and ONNX Runtime encoding (``--runtime onnx``).

An export directory (``dpr export --format onnx``, or the cache ``--runtime onnx`` fills)::

    query.onnx, passage.onnx   the two encoders (a shared encoder: one encoder.onnx), each
                               (input_ids, attention_mask) int64 (B, L) -> embedding float32 (B, D),
                               pooled (and L2-normalised for cosine) inside the graph; B and L dynamic
    tokenizer/                 the checkpoint's tokenizer (input_ids and attention_mask only)
    onnx_config.json           the encoder settings (prompts, max lengths, similarity), which file
                               encodes which side, the checkpoint's fingerprint, the quantisation
    README.md                  the model card (:func:`dpr_service.core.export.model_card`)
    checksums.json             sha256 of every other file, checked before a session reads one

The graphs come from torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``),
which traces the very :meth:`BiEncoder.encode_queries` / ``encode_passages`` the trainer uses.
``int8`` is onnxruntime's dynamic quantisation (``quantize_dynamic``: int8 weights of MatMul/Gemm,
activations quantised at run time), the method sentence-transformers' efficiency guide measures
~3x faster than fp32 torch on CPUs. Weights are quantised per output channel: with one scale per
tensor, all-MiniLM-L6-v2's passage embeddings kept a mean cosine of only 0.934 to fp32's (64
SciFact passages), per channel 0.994 (measured here, onnxruntime 1.32).

Dynamic quantisation takes one activation scale per tensor *per call*, over the whole batch
(onnxruntime#10111): batched, a text's int8 embedding depended on its batch-mates (2.98e-2 between
a query alone and beside another). :class:`OnnxEncoder` therefore runs an int8 graph one text per
call, on the text's own tokens (no padding): its scales are its own, and a text gets bit-identical
vectors alone or in any batch. Measured against the alternatives (MiniLM, SciFact passages, same
machine): int8 weights with fp32 activations (``MatMulNBits``, accuracy level 0) are batch-exact
but no faster than fp32; ``MatMulNBits`` with int8 compute (accuracy level 4) is not batch-exact
(4e-3). One call per text is no slower than batched int8: alternated in four pairs on the shared
2-core machine (load 5-6; 96 SciFact queries in batches of 32, 64 passages in one batch), per text /
batched was 0.65-1.43x for passages (median 1.13x) and 0.91-2.17x for queries (median 1.4x): the
passages' matrix products stay large, and no padding is computed. fp32 graphs are batched as before
(a text's vector moves ~1e-7 with its batch).

The export cache (:func:`onnx_runtime`) is bounded: ``$DPR_ONNX_CACHE_MAX_BYTES`` (default
:data:`CACHE_MAX_BYTES`); after each load the least recently used exports are removed until the
cache fits, never one that a process is using (each holds a shared flock on ``<name>.inuse``
while its sessions live) nor one being loaded or exported (``<name>.lock``).

ONNX Runtime encoding is a :class:`OnnxRuntime` (a :class:`~dpr_service.core.device.Runtime`):
:func:`~dpr_service.core.inference.encode_texts` given one runs the tokens through the ONNX
session instead of the torch encoder, and everything else (tokenisation, length sorting, checks)
stays the same. The training loss (``/score``, the trainer) never uses it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError, Loaded, verify_checksums, write_checksums
from .device import Runtime
from .fsio import atomic_directory, exclusive, tree_bytes

log = logging.getLogger(__name__)
FORMAT = "dpr-service-onnx/1"
CONFIG_FILE = "onnx_config.json"
RUNTIMES = ("torch", "onnx", "onnx-int8")
OPSET = 17
QUANTIZATION = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8", "per_channel": True}
INT8_DESCRIPTION = ("int8: weights per output channel, activations per text "
                    "(onnxruntime dynamic quantisation, one text per call)")
CACHE_MAX_BYTES = 2 * 1024**3  # default bound of the export cache, bytes ($DPR_ONNX_CACHE_MAX_BYTES)
_CACHE_ENTRY = re.compile(r"[0-9a-f]{8,}-(fp32|int8)\Z")  # what the cache may evict: its own directories only


class OnnxError(ValueError):
    """An ONNX export directory that cannot be used (damaged, of another checkpoint, other quantisation)."""


class _Side(nn.Module):
    """One side of a :class:`~dpr_service.core.encoder.BiEncoder` as a module of (input_ids, attention_mask)."""

    def __init__(self, loaded: Loaded, kind: str):
        super().__init__()
        self.encoder, self.kind = loaded.encoder, kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encode = self.encoder.encode_queries if self.kind == "query" else self.encoder.encode_passages
        return encode(input_ids, attention_mask).float()


def side_files(shared: bool) -> dict[str, str]:
    """The graph file of each side: one ``encoder.onnx`` for a shared encoder, else one per side."""
    return {"query": "encoder.onnx", "passage": "encoder.onnx"} if shared else {"query": "query.onnx", "passage": "passage.onnx"}


def write_onnx(loaded: Loaded, out: Path, quantize: str | None = None) -> None:
    """Export ``loaded``'s encoders into ``out`` (the layout in the module docstring), fp32 or
    ``quantize="int8"``; writes ``checksums.json`` last. Raises ImportError without onnx/onnxruntime."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx extra: pip install 'dpr-service[onnx]' ({e})") from None
    from .export import export_tokenizer

    cfg, files = loaded.config, side_files(loaded.config.shared)
    was_buckets, loaded.encoder.length_buckets = loaded.encoder.length_buckets, 1  # no data-dependent branch in the graph
    # a padded batch: traced without padding, transformers may drop the attention mask from the graph
    sample = loaded.tokenizer.queries(["a", "a question to trace the encoder with, longer than the first"])
    assert not bool(sample["attention_mask"].all()), "the tracing batch must have padding"
    try:
        for kind in ("query",) if cfg.shared else ("query", "passage"):
            target = out / files[kind]
            fp32 = out / f".{target.name}.fp32" if quantize else target
            with warnings.catch_warnings():  # the tracer's notes on constants (shapes, is_causal) that hold here
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _Side(loaded, kind).eval(), (sample["input_ids"], sample["attention_mask"]), str(fp32),
                    input_names=["input_ids", "attention_mask"], output_names=["embedding"], opset_version=OPSET,
                    dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                                  "embedding": {0: "batch"}},
                    dynamo=False,
                )
            if quantize:
                root = logging.getLogger()  # quantize_dynamic logs "consider pre-processing" on the root logger
                was, root.disabled = root.disabled, True
                try:
                    quantize_dynamic(str(fp32), str(target), weight_type=QuantType.QInt8, per_channel=True)
                finally:
                    root.disabled = was
                fp32.unlink()
    finally:
        loaded.encoder.length_buckets = was_buckets
    export_tokenizer(loaded, out / "tokenizer")
    (out / CONFIG_FILE).write_text(json.dumps({
        "format": FORMAT, "encoder": cfg.to_dict(), "files": files, "checkpoint_fingerprint": loaded.fingerprint,
        "checkpoint": str(loaded.path), "quantize": quantize or "none", "opset": OPSET,
        **({"quantization": QUANTIZATION} if quantize else {}),
    }, indent=2) + "\n")
    write_checksums(out)


class OnnxEncoder:
    """ONNX Runtime sessions of an export directory: :meth:`encode` gives the embeddings the
    torch encoder gives (to ~1e-6 in fp32; int8 within the tolerance docs/export.md states)."""

    def __init__(self, directory: Path | str, expected_fingerprint: str | None = None, threads: int = 0):
        """Check ``directory`` (every file against ``checksums.json``; its checkpoint fingerprint
        against ``expected_fingerprint`` when given) and open one session per graph file
        (``threads``: ONNX Runtime's intra-op threads, 0 = its default, one per core).
        Raises OnnxError naming the file at fault, ImportError without onnxruntime."""
        import onnxruntime as ort

        self.directory = Path(directory)
        path = self.directory / CONFIG_FILE
        if not path.is_file():
            raise OnnxError(f"{path}: missing; {self.directory} is not an ONNX export (dpr export --format onnx)")
        try:
            if not verify_checksums(self.directory):
                raise OnnxError(f"{self.directory / 'checksums.json'}: missing; the export is incomplete")
            self.meta = json.loads(path.read_text())
            if self.meta.get("format") != FORMAT:
                raise OnnxError(f"{path}: format is {self.meta.get('format')!r}, expected {FORMAT!r}")
        except (CheckpointError, json.JSONDecodeError) as e:
            raise OnnxError(str(e)) from None
        if expected_fingerprint is not None and self.meta["checkpoint_fingerprint"] != expected_fingerprint:
            raise OnnxError(f"{self.directory}: exported from checkpoint {self.meta['checkpoint_fingerprint'][:16]}, "
                            f"not from the one in use ({expected_fingerprint[:16]}); export this checkpoint")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {name: ort.InferenceSession(str(self.directory / name), options, providers=["CPUExecutionProvider"])
                    for name in set(self.meta["files"].values())}
        self.sessions = {kind: sessions[name] for kind, name in self.meta["files"].items()}

    @property
    def quantize(self) -> str:
        """'none' or 'int8'."""
        return self.meta.get("quantize", "none")

    @property
    def per_text(self) -> bool:
        """Whether :meth:`encode` runs one text per call (int8: activation scales are per call)."""
        return self.quantize != "none"

    def encode(self, kind: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 token ids and mask of queries (``kind="query"``) or passages -> (B, D) float32.

        An int8 export runs each row alone on its attended tokens (the mask's ones, padding dropped):
        row i's embedding is the one its text gets in a batch of one, whatever the other rows are."""
        ids, mask = input_ids.cpu().numpy().astype("int64"), attention_mask.cpu().numpy().astype("int64")
        session = self.sessions[kind]
        if not self.per_text or ids.shape[0] == 0:
            return torch.from_numpy(session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0])
        rows = []
        for i in range(ids.shape[0]):
            keep = mask[i].astype(bool)
            if not keep.any():  # nothing attended (not made by our tokenizers): the row as it is
                keep[:] = True
            rows.append(session.run(["embedding"], {"input_ids": ids[i : i + 1, keep], "attention_mask": mask[i : i + 1, keep]})[0])
        return torch.from_numpy(np.concatenate(rows))


@dataclass(frozen=True)
class OnnxRuntime(Runtime):
    """A CPU fp32 :class:`Runtime` whose query and passage encoding runs on ``onnx``'s sessions
    (:func:`~dpr_service.core.inference.encode_texts`); autocast and the device are torch's CPU fp32,
    for whatever still runs in torch (``/score``'s loss)."""

    onnx: OnnxEncoder = field(default=None, compare=False)
    name: str = "onnx"

    @property
    def description(self) -> dict[str, str]:
        """What serves (for ``/info`` and the load's log line), without absolute paths::

            {"runtime": "onnx-int8", "engine": "onnxruntime 1.32.0", "provider": "CPUExecutionProvider",
             "quantization": "int8: ...", "export": "<cache entry or directory name>"}"""
        import onnxruntime

        return {"runtime": self.name, "engine": f"onnxruntime {onnxruntime.__version__}", "provider": "CPUExecutionProvider",
                "quantization": INT8_DESCRIPTION if self.onnx.quantize == "int8" else "none (fp32)",
                "export": self.onnx.directory.name}


def default_cache_dir() -> Path:
    """Where on-the-fly exports are kept: ``$DPR_ONNX_CACHE``, else ``$XDG_CACHE_HOME/dpr-service/onnx``
    (``~/.cache/dpr-service/onnx``)."""
    if os.environ.get("DPR_ONNX_CACHE"):
        return Path(os.environ["DPR_ONNX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpr-service" / "onnx"


def cache_max_bytes() -> int:
    """The export cache's bound in bytes: ``$DPR_ONNX_CACHE_MAX_BYTES`` (a whole number >= 0), else
    :data:`CACHE_MAX_BYTES` (2 GiB). Raises ValueError naming the variable for any other value."""
    raw = os.environ.get("DPR_ONNX_CACHE_MAX_BYTES", "").strip()
    if not raw:
        return CACHE_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"DPR_ONNX_CACHE_MAX_BYTES must be a whole number of bytes >= 0, got {raw!r}")
    return value


def _hold(entry: Path) -> int:
    """Take a shared flock on ``<entry>.inuse`` (the export is in use); returns the open descriptor,
    whose closing (or the process's end) releases it."""
    fd = os.open(entry.with_name(entry.name + ".inuse"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd




def evict_cache(cache_dir: Path | str, max_bytes: int, keep: Path | None = None) -> list[str]:
    """Remove the least recently used exports of ``cache_dir`` (by the directory's mtime, which each
    load sets) until the exports together take at most ``max_bytes``. Never removed: ``keep``, an
    export another load or export holds (``<name>.lock``), or one in use (``<name>.inuse``); so the
    cache may stay above the bound while they need the room. Only directories named like the
    cache's own (``<fingerprint>-fp32|int8``) count. Returns the names removed."""
    cache_dir = Path(cache_dir)
    removed: list[str] = []
    with exclusive(cache_dir / ".evict.lock", blocking=False) as mine:
        if not mine:  # another process is evicting now
            return removed
        found = []
        for p in cache_dir.iterdir():
            if _CACHE_ENTRY.match(p.name) and p.is_dir():
                try:
                    found.append((p.stat().st_mtime_ns, p, tree_bytes(p)))
                except OSError:
                    continue
        total = sum(size for _, _, size in found)
        for _, p, size in sorted(found, key=lambda f: f[0]):  # least recently used first
            if total <= max_bytes:
                break
            if keep is not None and p.name == keep.name:
                continue
            with exclusive(p.with_name(p.name + ".lock"), blocking=False) as free, \
                    exclusive(p.with_name(p.name + ".inuse"), blocking=False) as unused:
                if not (free and unused):
                    continue
                shutil.rmtree(p, ignore_errors=True)
            total -= size
            removed.append(p.name)
            log.info("removed the ONNX export %s from the cache (%.1f MB, least recently used; cache bound %d bytes)",
                     p.name, size / 1e6, max_bytes)
    return removed


def onnx_runtime(loaded: Loaded, runtime: str = "onnx", onnx_dir: Path | str | None = None,
                 cache_dir: Path | str | None = None) -> OnnxRuntime:
    """The :class:`OnnxRuntime` for ``loaded`` and ``runtime`` (``onnx`` fp32 or ``onnx-int8``).

    With ``onnx_dir``: that export, which must be of this checkpoint (fingerprint) and of this
    quantisation. Otherwise the cached export ``<cache_dir>/<fingerprint>-<fp32|int8>`` (default
    :func:`default_cache_dir`), exported now when it is missing or fails its checksums (written
    atomically: a killed export leaves nothing that loads); it is marked in use while the returned
    runtime lives, and the cache is then trimmed to :func:`cache_max_bytes` (:func:`evict_cache`).
    Logs what serves (:attr:`OnnxRuntime.description`). Raises OnnxError, ImportError, ValueError
    (a bad runtime name or ``DPR_ONNX_CACHE_MAX_BYTES``)."""
    if runtime not in ("onnx", "onnx-int8"):
        raise ValueError(f"runtime must be onnx or onnx-int8, got {runtime!r}")
    quantize = "int8" if runtime == "onnx-int8" else "none"
    if onnx_dir is not None:
        encoder = OnnxEncoder(onnx_dir, loaded.fingerprint)
        if encoder.quantize != quantize:
            raise OnnxError(f"{onnx_dir}: an export with quantize {encoder.quantize}, but runtime {runtime} was asked for")
        source = f"--onnx-dir {Path(onnx_dir).name}"
    else:
        max_bytes = cache_max_bytes()
        target = Path(cache_dir or default_cache_dir()) / f"{loaded.fingerprint}-{'int8' if quantize == 'int8' else 'fp32'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        # one exporter at a time (server workers, index builds starting together); flock ends with the process
        with exclusive(target.with_name(target.name + ".lock")):
            try:
                encoder = OnnxEncoder(target, loaded.fingerprint)
                if quantize != "none" and encoder.meta.get("quantization") != QUANTIZATION:
                    raise OnnxError(f"{target}: quantised by other settings than {QUANTIZATION}")
            except OnnxError as e:
                if target.exists():
                    log.warning("re-exporting the cached ONNX export: %s", e)
                    shutil.rmtree(target)
                log.info("exporting %s to ONNX (%s) in %s", loaded.path, runtime, target)
                with atomic_directory(target) as tmp:
                    write_onnx(loaded, tmp, None if quantize == "none" else quantize)
                encoder = OnnxEncoder(target, loaded.fingerprint)
            # in use from here (taken before the export lock is let go, so no eviction slips in between)
            weakref.finalize(encoder, os.close, _hold(target))
            now = time.time_ns()
            os.utime(target, ns=(now, now))  # the least-recently-used order
        evict_cache(target.parent, max_bytes, keep=target)
        source = "cache"
    rt = OnnxRuntime(torch.device("cpu"), "fp32", onnx=encoder, name=runtime)
    d = rt.description
    log.info("encoding with ONNX Runtime: --runtime %s, %s (%s), quantisation %s, export %s (%s)",
             d["runtime"], d["engine"], d["provider"], d["quantization"], d["export"], source)
    return rt


def pick_encoding_runtime(loaded: Loaded, base: Runtime, runtime: str = "torch", onnx_dir: Path | str | None = None,
                          cache_dir: Path | str | None = None) -> Runtime:
    """``base`` for ``runtime="torch"``, else :func:`onnx_runtime` (which needs ``base`` on the CPU:
    ONNX Runtime runs here on CPUs only). Raises ValueError (a bad runtime name, a CUDA device),
    OnnxError, ImportError."""
    if runtime == "torch":
        if onnx_dir is not None:
            raise ValueError("an ONNX export directory is for --runtime onnx or onnx-int8, not torch")
        return base
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if base.device.type != "cpu":
        raise ValueError(f"--runtime {runtime} encodes on the CPU; use --device cpu (the device is {base.device})")
    return onnx_runtime(loaded, runtime, onnx_dir, cache_dir)
