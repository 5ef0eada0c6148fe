"""``dpr index export``: copy a verified index artifact into a Milvus collection
(:mod:`dpr_service.core.milvus` describes the collection's layout and reads it back for serving).

The export is resumable and idempotent: passages go in batches of consecutive rows, keyed by their
id (Milvus's primary key) and written with ``upsert``, and a batch whose rows are all present is
skipped, so running the same command again after a kill adds what is missing and never duplicates.
A collection exported from another checkpoint (or of another width or size) is refused.

The vectors are the artifact's own (``faiss`` ``reconstruct_n``): exact for Flat and HNSW indexes,
the compressed approximations for PQ, SQ or PCA indexes (logged); export from a Flat or HNSW
artifact to give Milvus the full vectors.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from dpr_service.core.artifact import ArtifactError
from dpr_service.core.milvus import (ID_MAX_BYTES, INDEX_TYPES, TEXT_MAX_BYTES, TITLE_MAX_BYTES, MilvusUnavailable,
                                     collection_properties, connect, read_properties, reason, redact, row_count)
from dpr_service.core.search import Searcher

log = logging.getLogger(__name__)

BATCH = 1000  # passages per upsert
INDEX_PARAMS = {"HNSW": {"M": 32, "efConstruction": 200}, "IVF_FLAT": {"nlist": 1024}, "IVF_SQ8": {"nlist": 1024},
                "IVF_PQ": {"nlist": 1024, "m": 16, "nbits": 8}, "FLAT": {}}


def export(index: Path | str, uri: str, collection: str, index_type: str = "HNSW", token: str | None = None,
           alias: str | None = None, batch_size: int = BATCH, progress: bool = True) -> int:
    """Write every passage of the artifact at ``index`` (id, row, vector, title, text) into the
    Milvus ``collection`` at ``uri``, build its ``index_type`` index (inner product), wait until every
    row is indexed, and load it;
    with ``alias``, point that alias at the collection once it is complete (servers that read the
    alias switch to it on their next reload). Returns the passages written by this call (0 when the
    collection was already complete).

    Raises ArtifactError for an artifact that fails its checks, a passage over Milvus's length limits
    (naming it; checked before anything is written) or a collection of another checkpoint;
    ValueError for an unknown ``index_type``; MilvusUnavailable when Milvus does not answer."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
    searcher = Searcher(index)
    n = searcher.count
    _check_lengths(searcher, batch_size)
    client = connect(uri, token)
    try:
        written = _write(client, searcher, collection, index_type, batch_size, alias, progress)
    except (ArtifactError, ValueError):
        raise
    except Exception as e:  # pymilvus's errors past the connection: Milvus failed, the input is fine
        raise MilvusUnavailable(f"Milvus failed during the export to {collection!r} ({reason(e)}); the same "
                                f"command continues where it stopped") from None
    finally:
        client.close()
    log.info("exported %d passages (%d written now) to %s at %s, index %s", n, written, collection, redact(uri), index_type)
    return written


def _write(client, searcher: Searcher, collection: str, index_type: str, batch_size: int, alias: str | None,
           progress: bool) -> int:
    """The export's writes (see :func:`export`); returns the passages written now."""
    manifest, n = searcher.manifest, searcher.count
    _create_or_check(client, collection, collection_properties(manifest, index_type), manifest.dim, index_type)
    _warn_if_lossy(searcher.index)
    written = 0
    bar = tqdm(total=n, unit="passage", desc=f"export to {collection}", disable=not progress)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if _present(client, collection, start, stop) < stop - start:
            client.upsert(collection, _entities(searcher, start, stop))
            written += stop - start
        bar.update(stop - start)
    bar.close()
    client.flush(collection)
    _wait_for_index(client, collection)
    found = row_count(client, collection)
    if found != n:  # another writer, or rows outside the artifact: never serve a mixture
        raise ArtifactError(f"Milvus collection {collection!r} holds {found} entities after the export, the artifact {n}")
    if alias:
        _point_alias(client, alias, collection)
    return written


def _check_lengths(searcher: Searcher, batch_size: int) -> None:
    """Every passage within Milvus's VARCHAR limits (bytes of UTF-8), before anything is written."""
    limits = (("id", ID_MAX_BYTES), ("title", TITLE_MAX_BYTES), ("text", TEXT_MAX_BYTES))
    for start in range(0, searcher.count, batch_size):
        for row, fields in searcher.store.by_rows(range(start, min(start + batch_size, searcher.count))).items():
            for (name, limit), value in zip(limits, fields):
                size = len((value or "").encode("utf-8"))
                if size > limit:
                    raise ArtifactError(f"passage {fields[0][:80]!r} (row {row}): its {name} is {size} bytes, over "
                                        f"Milvus's {limit}; shorten it in the corpus and rebuild the index")


def _create_or_check(client, collection: str, props: dict[str, str], dim: int, index_type: str) -> None:
    """Create the collection (schema, properties, index) or check that the existing one is this artifact's."""
    from pymilvus import DataType

    if client.has_collection(collection):
        found = read_properties(client, collection)
        differ = [k for k in ("dpr.checkpoint_fingerprint", "dpr.dim", "dpr.count", "dpr.similarity")
                  if found.get(k) != props[k]]
        if differ:
            shown = "; ".join(f"{k} {found.get(k)!r:.30} there, {props[k]!r:.30} here" for k in differ)
            raise ArtifactError(f"Milvus collection {collection!r} holds another index ({shown}); export to another "
                                f"collection name, or drop it first")
        client.load_collection(collection)
        return
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    schema.add_field("row", DataType.INT64)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("title", DataType.VARCHAR, max_length=TITLE_MAX_BYTES)
    schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
    params = client.prepare_index_params()
    params.add_index("vector", index_type=index_type, metric_type="IP", params=INDEX_PARAMS[index_type])
    client.create_collection(collection, schema=schema, index_params=params, properties=props)


def _present(client, collection: str, start: int, stop: int) -> int:
    """How many of the rows [start, stop) the collection holds."""
    got = client.query(collection, filter=f"row >= {start} and row < {stop}", output_fields=["count(*)"])
    return int(got[0]["count(*)"])


def _entities(searcher: Searcher, start: int, stop: int) -> list[dict]:
    """The rows [start, stop) as Milvus entities."""
    vectors = searcher.index.reconstruct_n(start, stop - start)  # (stop - start, D) float32
    rows = searcher.store.by_rows(range(start, stop))
    return [{"id": rows[r][0], "row": r, "vector": np.asarray(v, dtype=np.float32).tolist(),
             "title": rows[r][1] or "", "text": rows[r][2] or ""} for r, v in zip(range(start, stop), vectors)]


def _warn_if_lossy(index: faiss.Index) -> None:
    """Make an IVF index reconstructible and say when its vectors are compressed approximations."""
    try:
        faiss.extract_index_ivf(index).make_direct_map()  # reconstruct_n needs it
    except RuntimeError:  # not an IVF index
        pass
    if not isinstance(index, (faiss.IndexFlat, faiss.IndexHNSWFlat, faiss.IndexIVFFlat)):
        log.warning("the artifact's index (%s) is compressed: Milvus gets its approximate vectors; export from a "
                    "Flat or HNSW artifact for the full ones", type(index).__name__)


def _wait_for_index(client, collection: str, timeout_s: float = 3600.0) -> None:
    """Wait until Milvus has indexed every row (until then searches scan unindexed segments: slow)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.describe_index(collection, "vector")
        if info.get("state") == "Finished" and not info.get("pending_index_rows"):
            return
        if time.monotonic() > deadline:
            raise MilvusUnavailable(f"Milvus did not finish indexing {collection!r} in {timeout_s:.0f} s ({info})")
        time.sleep(0.5)


def _point_alias(client, alias: str, collection: str) -> None:
    """Create ``alias`` for ``collection`` or move it there from another collection."""
    try:  # asked first: a failed alter_alias is logged by pymilvus as an ERROR with a traceback (issue 31.8)
        exists = alias in client.list_aliases().get("aliases", [])
    except Exception:  # a Milvus without the listing: try to move it, create it when that fails
        exists = None
    if exists is None:
        try:
            client.alter_alias(collection, alias)
        except Exception:  # pymilvus raises MilvusException when the alias does not exist yet
            client.create_alias(collection, alias)
    elif exists:
        client.alter_alias(collection, alias)
    else:
        client.create_alias(collection, alias)
    log.info("alias %s -> %s", alias, collection)


__all__ = ["export", "MilvusUnavailable"]
