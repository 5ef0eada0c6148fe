"""Search an index artifact: query embeddings -> ranked passage ids and scores; ids -> passages.

This is the API the server uses; it imports no web stack.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .artifact import (BM25_DIR, INDEX_FILE, MANIFEST, PASSAGES_FILE, ArtifactError, EncoderIdentity, Manifest, PassageStore, PinnedDirectory,
                       check_binding, resolve_artifact)
from .bm25 import BM25
from .formats import Passage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    """One search result: passage id, score (inner product of the embeddings; higher is better),
    row in the index, and the title and text when asked for."""

    id: str
    score: float
    row: int
    title: str | None = None  # set by ``search(..., with_text=True)`` only
    text: str | None = None


class Searcher:
    """A loaded, verified artifact. ``search`` is safe to call from several threads.

    The directory is opened once and every file is read through that handle: the manifest, the
    checksums of the files, then FAISS and SQLite on those same (verified) files. When a new artifact
    is renamed into the path meanwhile (and the old one removed), loading starts again on the new one.

    With ``bm25=True`` the artifact's BM25 index (``bm25/``, verified with the rest) is loaded too, as
    ``self.bm25``; it stays None without it, or for an artifact built with ``--no-bm25``
    (:func:`dpr_service.core.hybrid.artifact_bm25` builds one over the passage store then).
    """

    #: why ``bm25`` can be None, for a client's error message
    no_bm25 = "this index was built with --no-bm25 (rebuild it without --no-bm25, or search with mode 'dense')"

    def __init__(self, directory: str | Path, checkpoint_fingerprint: EncoderIdentity | str | None = None, bm25: bool = False):
        requested = Path(directory)
        for attempt in range(3):
            self.directory = resolve_artifact(requested)
            try:
                self._load(checkpoint_fingerprint, bm25)
                break
            except ArtifactError:
                if attempt == 2 or not _replaced(requested, self.directory, self._pinned_inode):
                    raise
                log.info("%s was replaced while loading; loading the new artifact", requested)
        self.set_search_params(**self.manifest.extra.get("search_params", {}))

    def _load(self, checkpoint_fingerprint: EncoderIdentity | str | None, bm25: bool) -> None:
        self._pinned_inode, self.bm25 = None, None
        with PinnedDirectory(self.directory) as pinned:
            self._pinned_inode = pinned.inode()
            self.manifest: Manifest = pinned.manifest()
            check_binding(self.manifest, checkpoint_fingerprint, str(self.directory / MANIFEST))
            pinned.verify(self.manifest)  # before faiss reads a byte; faiss and SQLite then open these very files
            try:
                self.index = faiss.read_index(pinned.fd_path(INDEX_FILE))
            except RuntimeError as e:
                raise ArtifactError(f"{self.directory / INDEX_FILE}: FAISS cannot read it ({str(e).strip().splitlines()[-1]})") from None
            if self.index.ntotal != self.manifest.count or self.index.d != self.manifest.dim:
                raise ArtifactError(
                    f"{self.directory / INDEX_FILE}: holds {self.index.ntotal} x {self.index.d} vectors, the manifest says "
                    f"{self.manifest.count} x {self.manifest.dim}"
                )
            try:
                self.store = PassageStore(self.directory / PASSAGES_FILE, open_as=pinned.fd_path(PASSAGES_FILE))
                stored = self.store.count()  # SQLite has its own descriptor from here on
            except Exception as e:  # sqlite3.DatabaseError for a damaged file
                raise ArtifactError(f"{self.directory / PASSAGES_FILE}: not a readable passage store ({e})") from None
            if bm25 and self.manifest.has_bm25:
                self.bm25 = _load_bm25(pinned, self.directory, self.manifest.count)
        if stored != self.manifest.count:
            raise ArtifactError(f"{self.directory / PASSAGES_FILE}: {stored} passages, the manifest says {self.manifest.count}")

    def set_search_params(self, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """Search-time parameters, through ``faiss.ParameterSpace`` (which reaches inside PCA/OPQ
        pre-transforms, refinement and an IVF's HNSW quantizer); a parameter the index does not
        have is ignored."""
        space = faiss.ParameterSpace()
        space.initialize(self.index)
        names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
        if nprobe is not None and "nprobe" in names:
            space.set_index_parameter(self.index, "nprobe", int(nprobe))
        if efSearch is not None:
            for name in ("efSearch", "quantizer_efSearch"):
                if name in names:
                    space.set_index_parameter(self.index, name, int(efSearch))

    @property
    def count(self) -> int:
        """Passages in the index."""
        return self.manifest.count

    def search(self, q_emb: np.ndarray, k: int, with_text: bool = False) -> list[list[Hit]]:
        """q_emb (Q, D) float32 -> one ranked list of at most k hits per query (best first).

        The passage store is read once for all hits: ids only, or ids, titles and texts with
        ``with_text``. The two steps are :meth:`nearest` and :meth:`hits` (``POST /search`` times them
        apart)."""
        return self.hits(*self.nearest(q_emb, k), with_text=with_text)

    def nearest(self, q_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS search: q_emb (Q, D) float32 -> (scores, rows), each (Q, min(k, count)), best
        first; row -1 where the index has no more. Raises ValueError for k < 1 or a shape not (Q, D)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        xq = np.ascontiguousarray(q_emb, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self.manifest.dim:
            raise ValueError(f"query embeddings must have shape (Q, {self.manifest.dim}), got {xq.shape}")
        return self.index.search(xq, min(k, self.count))  # (Q, k) scores and rows; -1 where none

    def hits(self, D: np.ndarray, I: np.ndarray, with_text: bool = False) -> list[list[Hit]]:
        """The passage lookup: :meth:`nearest`'s (scores, rows) -> one list of hits per query, from one
        read of the passage store (ids, and titles and texts with ``with_text``)."""
        found = I[I >= 0].tolist()
        rows = self.store.by_rows(found, text=with_text)
        return [
            [Hit(rows[r][0], float(s), int(r), *rows[r][1:]) for s, r in zip(ds, rs) if r >= 0 and r in rows]
            for ds, rs in zip(D, I)
        ]

    def passages(self, ids: list[str]) -> dict[str, Passage]:
        """id -> Passage for the ids in the index (ids it does not hold are absent)."""
        return {pid: Passage(text=text, title=title, id=pid) for pid, (_, title, text) in self.store.by_ids(ids).items()}


def _load_bm25(pinned: PinnedDirectory, directory: Path, count: int) -> BM25:
    """The verified ``bm25/`` of ``pinned`` (memory-mapped, read through the pinned directory)."""
    try:
        bm25 = BM25.load(pinned.subdirectory_path(BM25_DIR))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{directory / BM25_DIR}: not a readable BM25 index ({e})") from None
    if len(bm25.ids) != count:
        raise ArtifactError(f"{directory / BM25_DIR}: {len(bm25.ids)} passages, the manifest says {count}")
    return bm25


def _replaced(requested: Path, loaded: Path, inode: tuple[int, int] | None) -> bool:
    """Whether the artifact at ``requested`` is now another directory than the one that was read."""
    try:
        st = os.stat(resolve_artifact(requested))
    except OSError:
        return False
    return inode is not None and (st.st_dev, st.st_ino) != inode
