"""What requests are served with (checkpoint, index and its BM25 index, device, query batcher) and its reloader.

:func:`load_resources` loads and checks them (blocking); :class:`Reloader` swaps a new set in at
start-up, on ``POST /admin/reload`` and by itself when the artifact at ``DPR_INDEX`` changes.
When only the checkpoint changed and its passage side built the served index (a query encoder
trained against it, ``dpr train --index``), :func:`swap_query_encoder` loads the checkpoint alone
and keeps the loaded index (FAISS, passage store, BM25).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI

from dpr_service.core.artifact import (MANIFEST, ArtifactError, EncoderIdentity, Manifest, check_binding, read_manifest,
                                       served_fusion)
from dpr_service.core.checkpoint import CheckpointError, Loaded, load_checkpoint, read_config
from dpr_service.core.device import Runtime, pick_runtime
from dpr_service.core.fsio import readable_directory
from dpr_service.core.hybrid import Retriever
from dpr_service.core.inference import encode_texts
from dpr_service.core.milvus import MilvusSearcher
from dpr_service.core.onnx_export import pick_encoding_runtime
from dpr_service.core.search import Searcher

from .batching import QueryBatcher, Stopped, stage_seconds
from .lanes import lane, run_in_lane
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("dpr_service.api")
WARM_UP_QUERY = "warm-up query"
#: manifest fields that say which checkpoint serves an index, not what the index holds: an artifact
#: that differs from the served one in these alone is the same index (a query-side promotion
#: rewrites them: dpr_service/api/jobs/service.py rebind_index)
SERVING_FIELDS = ("checkpoint", "rebound")
ENCODE_ATTEMPTS = 3  # a search re-routed to new resources this often before it gives up (503)


@dataclass
class Resources:
    """What a request needs, loaded together and swapped together on reload."""

    loaded: Loaded
    searcher: Searcher | MilvusSearcher
    runtime: Runtime
    batcher: QueryBatcher | None

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Query embeddings, (len(texts), D) float32, encoded now (blocking: call it off the event loop)."""
        return encode_texts(self.loaded.encoder, self.loaded.tokenizer, texts, "query", self.runtime).numpy()

    @property
    def retriever(self) -> Retriever:
        """Dense, BM25 and hybrid rankings of the index (the core's, as ``dpr eval --mode``); its
        ``bm25`` is None for an index built with ``--no-bm25``."""
        return Retriever(self.searcher, self.searcher.bm25)

    @property
    def modes(self) -> list[str]:
        """The search modes this index serves: dense, and bm25 and hybrid when it has a BM25 index."""
        return ["dense", "bm25", "hybrid"] if self.searcher.bm25 is not None else ["dense"]

    @property
    def served_fusion(self) -> tuple[str, float | None]:
        """(fusion, alpha) of hybrid search by default: the manifest's ``hybrid`` field, else RRF."""
        return served_fusion(self.searcher.manifest)


def load_resources(settings: Settings, metrics: Metrics) -> Resources:
    """Load and verify checkpoint and index (its BM25 index too, when it has one), then search once
    (blocking; run it in a thread).

    The checkpoint is ``DPR_CHECKPOINT`` or the one the manifest names. With ``DPR_MILVUS_URI`` the
    index is the Milvus collection ``DPR_MILVUS_COLLECTION`` (:class:`MilvusSearcher`; dense search
    only) and the default checkpoint the one its properties name. Raises ArtifactError (no index
    configured, a missing or damaged index or collection, one of another checkpoint), CheckpointError
    (a missing or damaged checkpoint), MilvusUnavailable (Milvus does not answer) or ValueError (a
    bad device setting; OnnxError, a damaged ONNX export or one of another checkpoint).

    With ``DPR_RUNTIME=onnx`` (or ``onnx-int8``) the runtime is an OnnxRuntime: ``/search`` and
    ``/encode`` embed with ONNX Runtime (the export at ``DPR_ONNX_DIR``, or one made now and cached),
    while ``/score`` still runs the torch encoder, because it must give the trainer's loss exactly
    (dropout off, fp32, the same modules), not an approximation of it."""
    runtime = pick_runtime(settings.device, "auto")
    if settings.milvus_uri:
        loaded, searcher = _load_milvus(settings, runtime)
    else:
        if settings.index is None:
            raise ArtifactError("no index configured: set DPR_INDEX or pass --index (or DPR_MILVUS_URI)")
        manifest = read_manifest(settings.index)
        checkpoint = settings.checkpoint or manifest.extra.get("checkpoint")
        if not checkpoint:
            raise ArtifactError(f"{settings.index}: the manifest names no checkpoint; set DPR_CHECKPOINT")
        loaded = load_checkpoint(checkpoint, runtime.device)
        searcher = Searcher(settings.index, loaded.identity, bm25=True)
    try:
        runtime = pick_encoding_runtime(loaded, runtime, settings.runtime, settings.onnx_dir, settings.onnx_cache)
        res = Resources(loaded, searcher, runtime, None)
        res.searcher.search(res.encode_queries([WARM_UP_QUERY]), 1, with_text=True)  # warm-up: /readyz waits for this
    except BaseException:
        if isinstance(searcher, MilvusSearcher):
            searcher.close()
        raise
    if searcher.bm25 is not None:
        searcher.bm25.search([WARM_UP_QUERY], 1)
    else:
        log.info("%s has no BM25 index (built with --no-bm25): /search serves mode dense only", searcher.directory)
    metrics.index_size.set(searcher.count)
    return res


def _load_milvus(settings: Settings, runtime: Runtime) -> tuple[Loaded, MilvusSearcher]:
    """The checkpoint and the checked Milvus collection (the checkpoint: DPR_CHECKPOINT, else the one
    the collection's properties name; the collection must have been exported with its fingerprint)."""
    if not settings.milvus_collection:
        raise ArtifactError("DPR_MILVUS_URI is set without DPR_MILVUS_COLLECTION (the collection or alias to serve)")
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
    searcher = MilvusSearcher(settings.milvus_uri, settings.milvus_collection, None, token, settings.milvus_timeout_s)
    try:
        checkpoint = settings.checkpoint or searcher.manifest.extra.get("checkpoint")
        if not checkpoint:
            raise ArtifactError(f"{searcher.directory}: the collection names no checkpoint; set DPR_CHECKPOINT")
        # a dpr-service checkpoint states its fingerprint: a collection of another checkpoint is refused
        # before any weights load (a server retrying every 5 s must not load a model each time)
        stated = stated_identity(checkpoint)
        if stated is not None:
            check_binding(searcher.manifest, stated, searcher.directory)
        loaded = load_checkpoint(checkpoint, runtime.device)
        check_binding(searcher.manifest, loaded.identity, searcher.directory)
    except BaseException:
        searcher.close()
        raise
    return loaded, searcher


def stated_identity(checkpoint: str | Path) -> EncoderIdentity | None:
    """What a dpr-service checkpoint's config states about it, read without loading weights (None
    for a plain model directory, whose fingerprint is known once loaded, or an unreadable one)."""
    try:
        raw = read_config(checkpoint)[1]
    except CheckpointError:
        return None
    return EncoderIdentity(str(raw.get("fingerprint", "")), str(raw.get("passage_fingerprint", "")),
                           str(raw.get("passage_source", "")))


def same_index(a: Manifest, b: Manifest) -> bool:
    """Whether manifests ``a`` and ``b`` describe the same index: equal in every field (the files'
    checksums, count, factory, creation time, served fusion...) but :data:`SERVING_FIELDS`."""
    def held(m: Manifest) -> dict:
        return {k: v for k, v in m.to_dict().items() if k not in SERVING_FIELDS}
    return held(a) == held(b)


def swap_query_encoder(settings: Settings, current: Resources | None) -> Resources | None:
    """New resources with the checkpoint alone loaded again and ``current``'s index kept (blocking;
    the admin lane runs it), or None when that does not apply and everything must be loaded
    (:func:`load_resources`): no resources yet, a Milvus collection, an artifact at ``DPR_INDEX``
    that is not the served index (:func:`same_index`), or the very checkpoint serving now (its
    fingerprint and path unchanged: a plain reload verifies everything again).

    The checkpoint is ``DPR_CHECKPOINT``, else the one the manifest names; its passage side must
    have built the index (:func:`~dpr_service.core.artifact.check_binding`: the same checkpoint,
    the same passage encoder, or a query encoder trained against an index of it), checked on its
    stated fingerprints before any weights load and on the loaded ones after. It is then loaded
    (``DPR_RUNTIME=onnx*``: its ONNX export too) and warmed up on the kept index. Raises ArtifactError
    naming both checkpoints and both passage encoders when it did not build the index,
    CheckpointError, ValueError / OnnxError / ImportError as :func:`load_resources`."""
    if current is None or settings.milvus_uri or settings.index is None or isinstance(current.searcher, MilvusSearcher):
        return None
    try:
        manifest = read_manifest(settings.index)
    except ArtifactError:
        return None  # load_resources says what is wrong with it
    if not same_index(manifest, current.searcher.manifest):
        return None
    checkpoint = settings.checkpoint or manifest.extra.get("checkpoint")
    if not checkpoint:
        return None
    stated = stated_identity(checkpoint)
    if stated is None or (stated.fingerprint == current.loaded.fingerprint
                          and Path(checkpoint).resolve() == Path(current.loaded.path).resolve()):
        return None
    where = str(Path(str(current.searcher.directory)) / MANIFEST)
    check_binding(manifest, stated, where)  # before any weights load
    runtime = pick_runtime(settings.device, "auto")
    loaded = load_checkpoint(checkpoint, runtime.device)
    check_binding(manifest, loaded.identity, where)
    runtime = pick_encoding_runtime(loaded, runtime, settings.runtime, settings.onnx_dir, settings.onnx_cache)
    searcher = current.searcher
    if manifest != searcher.manifest:  # the same index under a manifest naming the new checkpoint: /info shows it
        searcher = copy.copy(searcher)  # shares FAISS, the passage store and BM25 with the retired resources
        searcher.manifest = manifest
    res = Resources(loaded, searcher, runtime, None)
    res.searcher.search(res.encode_queries([WARM_UP_QUERY]), 1, with_text=True)  # warm-up, as a full load's
    log.info("swapped in the query encoder of %s (fingerprint %s); the index %s stays loaded", checkpoint,
             loaded.fingerprint[:12], searcher.directory)
    return res


def reload_resources(settings: Settings, metrics: Metrics, current: Resources | None) -> tuple[Resources, str]:
    """What a reload swaps in (blocking): :func:`swap_query_encoder` where it applies, else
    :func:`load_resources`; with ``"query encoder"`` or ``"checkpoint and index"`` saying which.
    Raises as they do."""
    res = swap_query_encoder(settings, current)
    if res is not None:
        return res, "query encoder"
    return load_resources(settings, metrics), "checkpoint and index"


def start_batcher(res: Resources, settings: Settings, metrics: Metrics, executor: Executor | None = None) -> None:
    """Give ``res`` a running :class:`QueryBatcher` when ``DPR_BATCHING`` is on (call on the event loop);
    it encodes on ``executor``'s threads (the interactive lane's)."""
    if settings.batching:
        res.batcher = QueryBatcher(res.encode_queries, settings.batch_max_size, settings.batch_max_wait_ms,
                                   settings.queue_max, observe=metrics.batch.observe, executor=executor)
        res.batcher.start()


async def encode_for_search(app: FastAPI, res: Resources, texts: list[str]) -> tuple[Resources, np.ndarray]:
    """Query embeddings (Q, D) for ``texts``, through the batcher when there is one, and the
    resources that encoded them: when a reload retired ``res`` meanwhile, the texts are encoded by
    (and must be searched on) the new resources. Raises Stopped after :data:`ENCODE_ATTEMPTS` reloads
    in a row, Overloaded when the queue is full."""
    metrics: Metrics = app.state.metrics
    for _ in range(ENCODE_ATTEMPTS):
        try:
            if res.batcher is None:
                return res, await _encode_unbatched(app, res, texts)
            metrics.queue.set(res.batcher.depth)
            return res, await res.batcher.submit(texts)
        except Stopped:
            fresh = app.state.resources
            if fresh is None or fresh is res:
                raise
            res = fresh
    raise Stopped("reloaded again and again")


async def _encode_unbatched(app: FastAPI, res: Resources, texts: list[str]) -> np.ndarray:
    """``res.encode_queries(texts)`` in the interactive lane; the seconds it waited for the thread
    (``queue_wait``) and encoded (``encode``) go to :data:`~dpr_service.api.batching.stage_seconds`
    when the caller set it, as the batcher's do."""
    handed = time.perf_counter()

    def timed() -> tuple[np.ndarray, float, float]:
        started = time.perf_counter()
        return res.encode_queries(texts), started - handed, time.perf_counter() - started

    q_emb, waited, encoding = await run_in_lane(app, "interactive", timed)
    stages = stage_seconds.get()
    if stages is not None:
        stages["queue_wait"], stages["encode"] = waited, encoding
    return q_emb


def artifact_stamp(index: Path | None) -> tuple | None:
    """What identifies the artifact at ``index`` now (a cheap stat): a rebuild or ``dpr index add``
    renames a new directory into place; a manifest rewritten in place changes its inode or mtime.
    None when there is none to read."""
    if index is None:
        return None
    directory = readable_directory(index)  # resolve_artifact's choice, without its log line
    try:
        d, m = os.stat(directory), os.stat(directory / MANIFEST)
    except OSError:
        return None
    return str(directory), d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size


class Reloader:
    """Loads the artifact at ``DPR_INDEX`` and swaps it in: at start, on ``POST /admin/reload``, and
    by itself when the artifact there changes (checked on requests, at most once a second).

    The check is what keeps every worker of ``dpr serve --workers N`` on the new artifact:
    ``/admin/reload`` reaches only the worker that got it; the others each notice the new artifact
    at their next request. A load that fails keeps the previous resources serving and is not retried
    until the artifact changes again. The batcher of the retired resources drains: everything
    queued on it is answered, and requests that reach it after the swap go to the new resources.
    """

    check_every_s = 1.0

    def __init__(self, app: FastAPI, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.seen: tuple | None = None  # the stamp of the artifact last loaded, or last tried
        self._serving: tuple | None = None  # the stamp of the artifact serving now
        self._lock = asyncio.Lock()
        self._checked = float("-inf")
        self._background: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # background reloads and retiring batchers, kept referenced
        self._closing: set[asyncio.Task] = set()  # delayed closes of retired Milvus clients
        self._retired: set[MilvusSearcher] = set()  # their searchers, closed at once at shutdown
        self.swapped = ""  # what the last successful load swapped in: "query encoder" or "checkpoint and index"

    async def load(self, if_changed: bool = False) -> Resources:
        """Load, verify and swap in the artifact; raises (and keeps the old one serving) when it
        fails: ArtifactError, CheckpointError or ValueError as :func:`load_resources`. With
        ``if_changed``, an artifact already loaded (by a background reload, say) is not loaded again.
        When the index is the one serving and only the checkpoint changed, the checkpoint alone is
        loaded and the index kept (:func:`swap_query_encoder`); :attr:`swapped` says which it was."""
        async with self._lock:
            stamp = artifact_stamp(self.settings.index)  # before loading: a change during the load is seen next time
            current = self.app.state.resources
            if if_changed and current is not None and stamp is not None and stamp == self._serving:
                return current
            try:
                # the admin lane: a load never takes a thread that /search needs
                res, swapped = await lane(self.app, "admin").run_own(reload_resources, self.settings, self.metrics, current)
            finally:
                self.seen = stamp
            start_batcher(res, self.settings, self.metrics, lane(self.app, "interactive").executor)
            self._serving, self.swapped = stamp, swapped
            old, self.app.state.resources = self.app.state.resources, res
            self.app.state.load_error = None
            if old is not None and old.batcher is not None:
                self._spawn(old.batcher.stop())  # drains: what is queued on it is still answered
            if old is not None and isinstance(old.searcher, MilvusSearcher):
                self._closing.add(self._spawn(self._close_later(old.searcher)))
            return res

    def check(self) -> None:
        """Start a reload in the background when the artifact changed (cheap; at most once a second)."""
        now = time.monotonic()
        if now - self._checked < self.check_every_s or self._lock.locked() or (self._background and not self._background.done()):
            return
        self._checked = now
        stamp = artifact_stamp(self.settings.index)
        if stamp is not None and stamp != self.seen:
            self._background = self._spawn(self._reload_changed())

    def watch_until_loaded(self) -> None:
        """``DPR_WAIT_FOR_INDEX``: check every second, without waiting for requests, until an
        artifact is serving (it may not exist yet when the server starts)."""

        async def watch() -> None:
            while self.app.state.resources is None:
                if self.settings.milvus_uri:  # no artifact to stat: try to load again (every 5 s)
                    await self._reload_changed()
                    await asyncio.sleep(5 * self.check_every_s)
                    continue
                self.check()
                await asyncio.sleep(self.check_every_s)

        self._watch = self._spawn(watch())

    async def _reload_changed(self) -> None:
        try:
            res = await self.load()
        except Exception as e:  # logged; the previous artifact (if any) keeps serving
            log.error("the artifact at %s changed but does not load; still serving the previous one: %s",
                      self.settings.milvus_collection if self.settings.milvus_uri else self.settings.index, e)
            if self.app.state.resources is None:
                self.app.state.load_error = str(e)
        else:
            log.info("the artifact at %s changed: now serving %d passages", self.settings.index, res.searcher.count)

    async def close(self) -> None:
        """At shutdown: no more reloads; every batcher drains; Milvus clients close at once."""
        for task in (self._background, self._watch, *self._closing):
            if task is not None:
                task.cancel()  # a retired collection's delayed close: closed below instead
        await asyncio.gather(*self._tasks, return_exceptions=True)
        res = self.app.state.resources
        if res is not None and res.batcher is not None:
            await res.batcher.stop()
        for searcher in [*self._retired, *([res.searcher] if res is not None else [])]:
            if isinstance(searcher, MilvusSearcher):
                searcher.close()
        self._retired.clear()

    async def _close_later(self, searcher: MilvusSearcher, after_s: float = 30.0) -> None:
        """Close a retired collection's client once the searches already routed to it are done."""
        self._retired.add(searcher)
        await asyncio.sleep(after_s)
        self._retired.discard(searcher)
        searcher.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
