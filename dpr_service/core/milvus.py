"""A Milvus collection as the search backend: the layout ``dpr index export --milvus-uri`` writes and
the reader the server uses instead of a FAISS artifact (``dpr serve --milvus-uri``).

Milvus (https://milvus.io) is the distributed engine for corpora or traffic past one machine; Milvus
Lite runs the same ``MilvusClient`` code embedded on a local file (``--milvus-uri ./milvus.db``), which
is how the tests run it. The client library (``pymilvus``, the ``milvus`` extra) is imported only
when a collection is used, so the core does not depend on it.

A collection holds one entity per passage:

    id      VARCHAR primary key (the passage id, at most 512 bytes)
    row     INT64   the passage's row in the artifact it was exported from
    vector  FLOAT_VECTOR(dim), searched by inner product (cosine checkpoints emit unit vectors)
    title   VARCHAR (at most 8,192 bytes)
    text    VARCHAR (at most 65,535 bytes, Milvus's limit)

and, as collection properties, the artifact's ``dpr.format``, ``dpr.checkpoint_fingerprint``,
``dpr.passage_fingerprint``, ``dpr.similarity``, ``dpr.dim``, ``dpr.count``, ``dpr.index_type`` and ``dpr.checkpoint`` (the path
the artifact's manifest names, the server's default checkpoint), so that a server refuses a
collection built by another checkpoint, and one whose export has not finished (fewer rows than
``dpr.count``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .artifact import ArtifactError, EncoderIdentity, Manifest, check_binding
from .errors import first_line
from .formats import Passage

if TYPE_CHECKING:  # imported where used: `dpr index export --help` reads INDEX_TYPES without loading FAISS
    from .search import Hit

log = logging.getLogger(__name__)

FORMAT = "dpr-service-milvus/1"
ID_MAX_BYTES, TITLE_MAX_BYTES, TEXT_MAX_BYTES = 512, 8192, 65535
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ")
OUTPUT_FIELDS = ["row", "title", "text"]


class MilvusUnavailable(Exception):
    """Milvus did not answer (down, unreachable or too slow): the server answers 503 with Retry-After."""


class _LiteUnimplemented(logging.Filter):
    """Drops the ERROR (with a traceback) that Milvus Lite's embedded gRPC server logs in this process
    for each call it does not implement (``AllocTimestamp``: the client asks, is told
    ``Method not implemented!``, and goes on without it), so that a successful export or search prints
    no ERROR (issue 31.8). Any other error of that server is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, NotImplementedError) and "not implemented" in str(error).lower())


_LITE_FILTER = _LiteUnimplemented()


def connect(uri: str, token: str | None = None, timeout_s: float = 10.0) -> Any:
    """A ``pymilvus.MilvusClient`` for ``uri`` (``http://host:19530`` for a server or cluster, a local
    ``*.db`` path for Milvus Lite). Raises ImportError naming the extra when pymilvus is missing,
    MilvusUnavailable when the server cannot be reached within ``timeout_s`` seconds."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ImportError("Milvus support needs pymilvus: pip install 'dpr-service[milvus]'") from None
    if "://" not in uri:  # Milvus Lite: its gRPC server runs in this process and logs to grpc._server
        grpc_server_log = logging.getLogger("grpc._server")
        if _LITE_FILTER not in grpc_server_log.filters:
            grpc_server_log.addFilter(_LITE_FILTER)
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=timeout_s)
    except Exception as e:  # pymilvus raises its own MilvusException (and grpc errors) for an unreachable server
        raise MilvusUnavailable(f"Milvus at {redact(uri)} is unreachable ({reason(e)})") from None


def redact(uri: str) -> str:
    """The URI without any ``user:password@`` part, for logs and errors."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if sep and "@" in rest else uri


def reason(e: Exception) -> str:
    """One line (at most 200 characters) saying why a Milvus call failed, for an error message."""
    return first_line(e, limit=200)


def collection_properties(manifest: Manifest, index_type: str) -> dict[str, str]:
    """The ``dpr.*`` properties describing a collection exported from the artifact of ``manifest``."""
    return {"dpr.format": FORMAT, "dpr.checkpoint_fingerprint": manifest.checkpoint_fingerprint,
            "dpr.passage_fingerprint": str(manifest.extra.get("passage_fingerprint", "")),
            "dpr.similarity": manifest.similarity, "dpr.dim": str(manifest.dim), "dpr.count": str(manifest.count),
            "dpr.index_type": index_type, "dpr.checkpoint": str(manifest.extra.get("checkpoint", ""))}


def read_properties(client: Any, collection: str) -> dict[str, str]:
    """The collection's ``dpr.*`` properties (a name may be an alias). Raises ArtifactError when the
    collection does not exist or was not written by ``dpr index export``; MilvusUnavailable when
    Milvus does not answer."""
    try:
        if not client.has_collection(collection):
            raise ArtifactError(f"Milvus collection {collection!r} does not exist (dpr index export writes it)")
        props = client.describe_collection(collection).get("properties") or {}
    except ArtifactError:
        raise
    except Exception as e:
        raise MilvusUnavailable(f"Milvus did not describe {collection!r} ({reason(e)})") from None
    if props.get("dpr.format") != FORMAT:
        raise ArtifactError(f"Milvus collection {collection!r} was not written by dpr index export (no dpr.format property)")
    return props


def row_count(client: Any, collection: str) -> int:
    """Entities in the collection, by a ``count(*)`` query (exact, unlike flushed statistics); the
    collection must be loaded. Raises pymilvus's errors as they come (callers translate them)."""
    result = client.query(collection, filter="", output_fields=["count(*)"])
    return int(result[0]["count(*)"])


class MilvusSearcher:
    """A checked, loaded Milvus collection with :class:`dpr_service.core.search.Searcher`'s interface
    (``search``, ``passages``, ``count``, ``manifest``; ``bm25`` is None: dense search only).

    Checks on load: the collection's properties name ``checkpoint_fingerprint`` (when given), it holds
    ``dpr.count`` entities (an export that did not finish is refused) and it is loaded in memory.
    Raises ArtifactError for a wrong or unfinished collection, MilvusUnavailable when Milvus does
    not answer; ``search`` and ``passages`` raise MilvusUnavailable too.
    """

    bm25 = None
    no_bm25 = "a Milvus collection has no BM25 index (search with mode 'dense')"

    def __init__(self, uri: str, collection: str, checkpoint_fingerprint: EncoderIdentity | str | None = None,
                 token: str | None = None, timeout_s: float = 10.0, ef: int = 128, nprobe: int = 32):
        self.uri, self.collection, self.timeout_s = uri, collection, timeout_s
        self.directory = f"milvus:{redact(uri)}#{collection}"  # shown by /info and the logs
        self.client = connect(uri, token, timeout_s)
        try:
            self._check(collection, checkpoint_fingerprint)
        except BaseException:
            self.close()  # a server retrying every few seconds must not leak a client each time
            raise
        self.search_params = {"metric_type": "IP", "params": {"ef": ef} if self.index_type == "HNSW" else
                              {"nprobe": nprobe} if self.index_type.startswith("IVF") else {}}

    def _check(self, collection: str, checkpoint_fingerprint: EncoderIdentity | str | None) -> None:
        """The checks of the class docstring; sets ``dim``, ``index_type`` and ``manifest``."""
        props = read_properties(self.client, collection)
        built = props["dpr.checkpoint_fingerprint"]
        extra = {"milvus_collection": collection, "checkpoint": props.get("dpr.checkpoint", "")}
        if props.get("dpr.passage_fingerprint"):  # collections exported before the field have none
            extra["passage_fingerprint"] = props["dpr.passage_fingerprint"]
        self.dim, self.index_type = int(props["dpr.dim"]), props["dpr.index_type"]
        self.manifest = Manifest(checkpoint_fingerprint=built, dim=self.dim, similarity=props["dpr.similarity"],
                                 count=int(props["dpr.count"]), factory=f"milvus:{self.index_type}", created="",
                                 files={}, extra=extra)
        check_binding(self.manifest, checkpoint_fingerprint, f"Milvus collection {collection!r} (exported from an index)")
        try:
            self.client.load_collection(collection, timeout=self.timeout_s)  # before any query: Milvus refuses them on a released one
            found = row_count(self.client, collection)
        except Exception as e:
            raise MilvusUnavailable(f"Milvus did not load {collection!r} ({reason(e)})") from None
        if found != int(props["dpr.count"]):
            raise ArtifactError(f"Milvus collection {collection!r} holds {found} of {props['dpr.count']} passages: its "
                                f"export did not finish (run dpr index export again)")
        self.manifest = replace(self.manifest, count=found)

    @property
    def count(self) -> int:
        """Passages in the collection."""
        return self.manifest.count

    def search(self, q_emb: np.ndarray, k: int, with_text: bool = False) -> list[list[Hit]]:
        """q_emb (Q, D) float32 -> one ranked list of at most k hits per query (best first), scores
        the inner products Milvus computed. Raises ValueError for a bad shape or k, MilvusUnavailable."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        xq = np.asarray(q_emb, dtype=np.float32)
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"query embeddings must have shape (Q, {self.dim}), got {xq.shape}")
        from .search import Hit

        fields = OUTPUT_FIELDS if with_text else ["row"]
        try:
            results = self.client.search(self.collection, data=xq.tolist(), limit=min(k, self.count),
                                         search_params=self.search_params, output_fields=fields, timeout=self.timeout_s)
        except Exception as e:
            raise MilvusUnavailable(f"Milvus search failed ({reason(e)})") from None
        return [[Hit(h["id"], float(h["distance"]), int(h["entity"]["row"]),
                     *((h["entity"]["title"], h["entity"]["text"]) if with_text else ())) for h in hits]
                for hits in results]

    def passages(self, ids: list[str]) -> dict[str, Passage]:
        """id -> Passage for the ids in the collection (ids it does not hold are absent). Raises MilvusUnavailable."""
        out = {}
        try:
            for start in range(0, len(ids), 512):
                got = self.client.get(self.collection, ids=list(ids[start:start + 512]), output_fields=["title", "text"],
                                      timeout=self.timeout_s)
                out.update({e["id"]: Passage(text=e["text"], title=e["title"], id=e["id"]) for e in got})
        except Exception as e:
            raise MilvusUnavailable(f"Milvus lookup failed ({reason(e)})") from None
        return out

    def ready(self) -> bool:
        """Whether Milvus answers and holds the collection loaded (for ``/readyz``; never raises)."""
        try:
            state = self.client.get_load_state(self.collection, timeout=self.timeout_s)
        except Exception:  # down, slow or the collection gone
            return False
        return str(state.get("state")).endswith("Loaded")

    def close(self) -> None:
        """Close the client's connection."""
        try:
            self.client.close()
        except Exception:  # already closed or never connected: nothing to release
            pass
