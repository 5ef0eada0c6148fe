"""Service settings from the environment (``DPR_*``), behind a cached getter tests can override.

An empty variable counts as unset (``env_ignore_empty``): Compose's ``DPR_API_KEY: ${DPR_API_KEY:-}``
passes an empty string when no key is given, and that must not switch auth on with an empty key.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting of the service; each field ``name`` is read from ``DPR_<NAME>``. Limits are
    counts (queries, items, passages), characters or bytes, as named; times in ms or s as named.
    Raises pydantic's ValidationError for a value of the wrong type or out of range."""

    model_config = SettingsConfigDict(env_prefix="DPR_", env_file=None, env_ignore_empty=True)

    index: Path | None = Field(None, description="index artifact directory (dpr index build's --output)")
    checkpoint: Path | None = Field(None, description="checkpoint; default: the one named in the index manifest")
    api_key: SecretStr | None = Field(None, description="when set (and not empty), every route but /healthz, /readyz and / needs it")
    device: str = "auto"
    # ONNX Runtime for query and passage embeddings (/search, /encode); /score keeps torch (docs/serving.md)
    runtime: Literal["torch", "onnx", "onnx-int8"] = Field("torch", description="what encodes queries and passages: "
                                                           "torch, or ONNX Runtime on the CPU (fp32 or dynamic int8)")
    onnx_dir: Path | None = Field(None, description="with runtime onnx*: an export of the checkpoint (dpr export "
                                  "--format onnx); default: exported on start and cached in DPR_ONNX_CACHE")
    onnx_cache: Path | None = Field(None, description="where on-the-fly ONNX exports are cached "
                                    "(default ~/.cache/dpr-service/onnx)")
    # Milvus instead of the artifact's FAISS index for /search (docs/milvus.md); /score and /encode are unchanged
    milvus_uri: str | None = Field(None, description="serve /search from this Milvus (http://host:19530, or a Milvus "
                                   "Lite file) instead of DPR_INDEX's FAISS index")
    milvus_collection: str | None = Field(None, description="the collection or alias dpr index export wrote")
    milvus_token: SecretStr | None = Field(None, description="Milvus token (user:password or an API key)")
    milvus_timeout_s: float = Field(5.0, gt=0, description="a Milvus call slower than this is a 503 with Retry-After")
    wait_for_index: bool = Field(False, description="an index missing (or unloadable) at start-up is waited for: "
                                 "checked every second, 503 until it loads; without it `dpr serve` exits 2")
    # limits: requests over them get a 4xx naming the field
    max_body_bytes: int = Field(1_000_000, ge=1)
    max_queries: int = Field(64, ge=1)
    max_items: int = Field(64, ge=1)
    max_passages_per_item: int = Field(64, ge=1)
    max_text_chars: int = Field(4000, ge=1)
    max_top_k: int = Field(100, ge=1)
    # dynamic batching of query encoding
    batching: bool = True
    batch_max_size: int = Field(64, ge=1)
    batch_max_wait_ms: float = Field(5.0, ge=0)
    queue_max: int = Field(512, ge=1)
    # admission: requests in progress at once; more get 503 + Retry-After before their body is read
    max_in_flight: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=1)
    # cost, not count: tokens after truncation (docs/serving.md#lanes-and-cost)
    max_request_tokens: int = Field(65_536, ge=1, description="tokens one /score, /encode or /v1/embeddings request "
                                    "may encode (after truncation to the checkpoint's max lengths); more: 413")
    interactive_max_tokens: int = Field(2_048, ge=0, description="/encode and /v1/embeddings requests of at most this "
                                        "many tokens run in the interactive lane; larger ones in the heavy lane")
    heavy_max_tokens: int = Field(262_144, ge=1, description="tokens queued and running in the heavy lane together; "
                                  "a request that would pass it gets 503 with Retry-After")
    encode_batch_size: int = Field(32, ge=1, le=4096, description="texts encoded at once by /score and /encode: "
                                   "a request's memory is O(this), not O(request)")
    # lanes: each kind of work has its own threads and queue (api/lanes.py)
    lane_interactive_threads: int = Field(4, ge=1, le=256)
    lane_interactive_queue: int = Field(256, ge=0, le=100_000)
    lane_heavy_threads: int = Field(1, ge=1, le=256)
    lane_heavy_queue: int = Field(16, ge=0, le=100_000)
    lane_admin_threads: int = Field(2, ge=1, le=256)
    lane_admin_queue: int = Field(16, ge=0, le=100_000)
    lane_admin_processes: int = Field(1, ge=1, le=64, description="child processes that check large uploads (each "
                                      "~350 MB: it imports torch; started at the first), so that a long check never "
                                      "holds the server's GIL")
    upload_child_bytes: int = Field(16_000_000, ge=0, description="uploads of at least this many bytes are checked "
                                    "in a child process; smaller ones on an admin lane thread")
    lane_events_threads: int = Field(2, ge=1, le=256)
    lane_events_queue: int = Field(256, ge=0, le=100_000)
    lane_nice: int = Field(10, ge=0, le=19, description="how much lower the CPU priority of heavy and admin threads is "
                           "(Linux nice increment; 0: the same as interactive work)")
    # slow clients: a body must arrive within body_timeout_s + its bytes / body_min_bytes_per_s (else 408)
    body_timeout_s: float = Field(10.0, gt=0, le=3600)
    body_min_bytes_per_s: int = Field(50_000, ge=1)
    # connections (dpr serve's uvicorn): idle keep-alive connections close after keep_alive_s; more than
    # max_connections open connections and requests get uvicorn's 503
    keep_alive_s: float = Field(5.0, gt=0, le=3600)
    max_connections: int = Field(1024, ge=1, le=1_000_000)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value):
        """An empty key is no key (auth off), never a key that only the empty string matches."""
        if value == "" or (isinstance(value, SecretStr) and value.get_secret_value() == ""):
            return None
        return value


@lru_cache
def get_settings() -> Settings:
    """The settings from the environment, read once (tests pass their own to ``create_app``)."""
    return Settings()
