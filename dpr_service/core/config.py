"""The encoder's configuration: everything a consumer of a checkpoint must agree on.

It is saved as ``dpr_config.json`` beside the weights, and the trainer, the index builder and the
server all read it from there (never from their own settings), so that a query is embedded the
same way at training, indexing and serving time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "dpr-service/1"
POOLINGS = ("cls", "mean")
SIMILARITIES = ("dot", "cosine")


class EncoderConfigError(ValueError):
    """A bad encoder setting: ``field`` names it, ``problem`` says what is wrong (the message is both)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class EncoderConfig:
    """How text becomes a vector and how two vectors become a score.

    pooling: ``cls`` (DPR) takes the first token's hidden state; ``mean`` averages the
        non-padding tokens (sentence-transformers' default).
    similarity: ``dot`` (DPR) is the inner product; ``cosine`` L2-normalises both sides first.
    temperature: scores are divided by it; 1.0 for DPR's dot product, about 0.05 for cosine.
    query_max_length / passage_max_length: truncation lengths in tokens.
    shared: one encoder for questions and passages instead of two.
    query_prompt / passage_prompt: text put before every question / passage (before its title when
        it has one) wherever it is tokenised: training, indexing, ``/search``, ``/encode``, ``/score``.
        Models such as e5 were trained with ``"query: "`` / ``"passage: "`` and expect them.
    """

    pooling: str = "cls"
    similarity: str = "dot"
    temperature: float = 1.0
    query_max_length: int = 64
    passage_max_length: int = 256
    shared: bool = False
    query_prompt: str = ""
    passage_prompt: str = ""

    def __post_init__(self) -> None:
        """Raises EncoderConfigError (a ValueError) naming the first bad setting."""
        for name, allowed in (("pooling", POOLINGS), ("similarity", SIMILARITIES)):
            if getattr(self, name) not in allowed:
                raise EncoderConfigError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise EncoderConfigError("temperature", f"must be > 0, got {self.temperature!r}")
        for name in ("query_max_length", "passage_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise EncoderConfigError(name, f"must be an integer >= 2, got {value!r}")
        if not isinstance(self.shared, bool):
            raise EncoderConfigError("shared", f"must be true or false, got {self.shared!r}")
        for name in ("query_prompt", "passage_prompt"):
            if not isinstance(getattr(self, name), str):
                raise EncoderConfigError(name, f"must be a string, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        """The config as saved in ``dpr_config.json``, with the format tag."""
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderConfig":
        """Parse a ``dpr_config.json`` dictionary; raises ValueError for unknown keys or bad values."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - {"format", "base_model", "fingerprint", "passage_fingerprint", "passage_source"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in fields})

    def save(self, path: Path, **extra) -> None:
        """Write ``dpr_config.json`` at ``path`` (``extra`` keys such as base_model and fingerprint beside the config)."""
        Path(path).write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")
