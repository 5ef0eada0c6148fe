"""A training batch as the loss sees it: B questions, their passages, and which passages are the same.

Built here, in the core, so that the trainer's steps, its dev loss and the server's ``POST /score``
assemble batches with one function (:func:`collate`) and so apply the same masking rules: a passage
that appears twice is one passage, and a question's other known positives are never its negatives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .formats import Passage, TrainExample
from .tokenize import TextTokenizer


@dataclass
class Batch:
    """B questions and their N passages, tokenised, with what the loss needs to mask (see :func:`collate`)."""
    queries: dict  # input_ids, attention_mask: (B, Lq)
    passages: dict  # input_ids, attention_mask: (B * (1 + H), Lp)
    positive_idx: torch.Tensor  # (B,) column of each question's positive
    p_hashes: torch.Tensor  # (N,) int64 hashes of the passage ids (id_hash); equal means the same passage
    known_hashes: torch.Tensor  # (B, K) hashes of each question's known positives' ids, padded with -1

    def candidate_mask(self) -> torch.Tensor:
        """(B, N) False where passage j is a known positive of question i (other than the passage at
        its positive column, which the loss always keeps). Under torch.distributed, step.py masks
        every rank's passages with :func:`known_positive_mask` instead."""
        return known_positive_mask(self.p_hashes, self.known_hashes)

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
                     fn(self.positive_idx), fn(self.p_hashes), fn(self.known_hashes))


def known_positive_mask(p_hashes: torch.Tensor, known_hashes: torch.Tensor) -> torch.Tensor:
    """(N,) passage hashes and (B, K) known-positive hashes -> (B, N), False where p_j is known to
    answer question i (the loss keeps each question's own positive column regardless)."""
    return ~(p_hashes[None, :, None] == known_hashes[:, None, :]).any(-1)


def id_hash(passage_id: str) -> int:
    """A passage id as a non-negative int64 (blake2b): equal across processes and machines, so
    batches built on different ranks agree on which passages are the same."""
    return int.from_bytes(hashlib.blake2b(passage_id.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def collate(examples: list[TrainExample], negatives: list[list[Passage]], tokenizer: TextTokenizer) -> Batch:
    """Tokenise B questions and their passages into a :class:`Batch`.

    Passages are laid out question by question: the positive, then that question's negatives
    (``negatives[i]``, any number, may be empty). ``known_hashes`` holds each question's known positives
    (``known_positive_ids`` plus its own positive), so the loss never treats them as negatives.
    """
    passages: list[Passage] = []
    positive_idx = []
    for ex, negs in zip(examples, negatives):
        positive_idx.append(len(passages))
        passages.append(ex.positive)
        passages.extend(negs)
    p_hashes = torch.tensor([id_hash(p.id) for p in passages], dtype=torch.long)
    known = [sorted(id_hash(i) for i in ex.known_positive_ids | {ex.positive.id}) for ex in examples]
    known_hashes = torch.full((len(examples), max(map(len, known))), -1, dtype=torch.long)
    for i, row in enumerate(known):
        known_hashes[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return Batch(
        queries=tokenizer.queries([ex.query for ex in examples]),
        passages=tokenizer.passages(passages),
        positive_idx=torch.tensor(positive_idx, dtype=torch.long),
        p_hashes=p_hashes,
        known_hashes=known_hashes,
    )
