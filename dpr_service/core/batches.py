"""A training batch as the loss sees it: B questions, their passages, and which passages are the same.

Built here, in the core, so that the trainer's steps, its dev loss and the server's ``POST /score``
assemble batches with one function (:func:`collate`) and so apply the same masking rules: a passage
that appears twice is one passage, a question's other known positives are never its negatives, and
neither is a copy of any of them under another id (equal title and text up to case and spacing,
:func:`dpr_service.core.mining.content_key`, the rule mining uses to skip copies).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .formats import Passage, TrainExample
from .mining import content_key
from .tokenize import TextTokenizer


@dataclass
class Batch:
    """B questions and their N passages, tokenised, with what the loss needs to mask (see :func:`collate`)."""
    queries: dict  # input_ids, attention_mask: (B, Lq)
    passages: dict  # input_ids, attention_mask: (B * (1 + H), Lp)
    positive_idx: torch.Tensor  # (B,) column of each question's positive
    p_hashes: torch.Tensor  # (N,) int64 hashes of the passage ids (id_hash); equal means the same passage
    known_hashes: torch.Tensor  # (B, K) hashes of each question's known positives' ids, padded with -1
    c_hashes: torch.Tensor  # (N,) int64 hashes of the passages' content (content_hash); equal means a copy
    masked: int = 0  # (question, passage) pairs masked besides each question's positive, over the global batch

    def candidate_mask(self) -> torch.Tensor:
        """(B, N) False where passage j is a known positive of question i, or a copy of one that is in the
        batch (the loss keeps the passage at i's positive column regardless). Under torch.distributed,
        step.py masks every rank's passages with :func:`known_positive_mask` instead."""
        return known_positive_mask(self.p_hashes, self.known_hashes, self.c_hashes)

    @property
    def size(self) -> int:
        """B, the number of questions."""
        return int(self.positive_idx.shape[0])

    def to(self, device: torch.device) -> "Batch":
        """The batch with every tensor on ``device`` (non-blocking copies)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader (``pin_memory=True``) so that ``to(cuda)`` copies asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> "Batch":
        return Batch({k: fn(v) for k, v in self.queries.items()}, {k: fn(v) for k, v in self.passages.items()},
                     fn(self.positive_idx), fn(self.p_hashes), fn(self.known_hashes), fn(self.c_hashes), self.masked)


def known_positive_mask(p_hashes: torch.Tensor, known_hashes: torch.Tensor,
                        c_hashes: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) passage id hashes and (B, K) known-positive id hashes -> (B, N), False where p_j is known
    to answer question i (the loss keeps each question's own positive column regardless).

    With ``c_hashes`` (N,), the passages' content hashes, a passage whose content equals that of a
    passage known to answer question i (by id, in this batch) is masked too: a copy under another id.
    """
    known = (p_hashes[None, :, None] == known_hashes[:, None, :]).any(-1)  # (B, N)
    if c_hashes is not None:  # a column counts if any known column has its content; O(B * N), no (N, N)
        contents, which = torch.unique(c_hashes, return_inverse=True)  # (U,), (N,) content index of each column
        seen = torch.zeros(known.shape[0], contents.shape[0], device=known.device)  # (B, U)
        seen.index_add_(1, which, known.float())
        known = seen[:, which] > 0
    return ~known


def masked_pairs(mask: torch.Tensor) -> int:
    """The number of (question, passage) pairs a (B, N) candidate mask removes, besides each question's
    own positive column (which is always False in the mask and always kept by the loss)."""
    return int((~mask).sum()) - mask.shape[0]


def id_hash(passage_id: str) -> int:
    """A passage id as a non-negative int64 (blake2b): equal across processes and machines, so
    batches built on different ranks agree on which passages are the same."""
    return int.from_bytes(hashlib.blake2b(passage_id.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def content_hash(p: Passage) -> int:
    """A passage's content (:func:`dpr_service.core.mining.content_key`: title and text, case-folded,
    whitespace collapsed) as a non-negative int64; equal for copies under different ids."""
    key = content_key(p).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8, person=b"content").digest(), "little") & (2**63 - 1)


def batch_hashes(examples: list[TrainExample], negatives: list[list[Passage]]):
    """The passages in batch order (each question's positive, then its negatives), their positive
    columns (B,), id hashes (N,), content hashes (N,) and known-positive id hashes (B, K), padded with -1."""
    passages: list[Passage] = []
    positive_idx = []
    for ex, negs in zip(examples, negatives):
        positive_idx.append(len(passages))
        passages.append(ex.positive)
        passages.extend(negs)
    p_hashes = torch.tensor([id_hash(p.id) for p in passages], dtype=torch.long)
    c_hashes = torch.tensor([content_hash(p) for p in passages], dtype=torch.long)
    known = [sorted(id_hash(i) for i in ex.known_positive_ids | {ex.positive.id}) for ex in examples]
    known_hashes = torch.full((len(examples), max(map(len, known))), -1, dtype=torch.long)
    for i, row in enumerate(known):
        known_hashes[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return passages, torch.tensor(positive_idx, dtype=torch.long), p_hashes, c_hashes, known_hashes


def count_masked(examples: list[TrainExample], negatives: list[list[Passage]]) -> int:
    """How many (question, passage) pairs :func:`collate` would mask for these examples, besides each
    question's positive; without tokenising (the trainer counts its global batch on every rank)."""
    _, _, p_hashes, c_hashes, known_hashes = batch_hashes(examples, negatives)
    return masked_pairs(known_positive_mask(p_hashes, known_hashes, c_hashes))


def collate(examples: list[TrainExample], negatives: list[list[Passage]], tokenizer: TextTokenizer) -> Batch:
    """Tokenise B questions and their passages into a :class:`Batch`.

    Passages are laid out question by question: the positive, then that question's negatives
    (``negatives[i]``, any number, may be empty). ``known_hashes`` holds each question's known positives
    (``known_positive_ids`` plus its own positive) and ``c_hashes`` every passage's content, so the
    loss never treats them, or copies of them under other ids, as negatives. ``masked`` counts the
    pairs so removed (besides each question's positive).
    """
    passages, positive_idx, p_hashes, c_hashes, known_hashes = batch_hashes(examples, negatives)
    return Batch(
        queries=tokenizer.queries([ex.query for ex in examples]),
        passages=tokenizer.passages(passages),
        positive_idx=positive_idx,
        p_hashes=p_hashes,
        known_hashes=known_hashes,
        c_hashes=c_hashes,
        masked=masked_pairs(known_positive_mask(p_hashes, known_hashes, c_hashes)),
    )
