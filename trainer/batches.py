"""Training batches: B questions, each with its positive and H negatives, tokenised and padded.

A batch is a pure function of (seed, epoch, step): the order of an epoch is a seeded permutation and
each step draws its random negatives from its own seeded generator. So ``--resume`` continues with
exactly the batches the interrupted run would have seen, and batches can be built in DataLoader
workers without any shared random state.
"""

from __future__ import annotations

import logging
import random

import torch
from torch.utils.data import Dataset

from dpr_service.core.batches import Batch, collate, count_masked
from dpr_service.core.formats import Passage, TrainExample
from dpr_service.core.tokenize import TextTokenizer

log = logging.getLogger(__name__)


def pick_negatives(ex: TrainExample, h: int, rng: random.Random, corpus: list[Passage], shuffle: bool) -> list[Passage]:
    """H negatives for one question: its hard negatives first (a random H of them when training),
    then DPR's ``negative_ctxs``, then random corpus passages that are not known positives."""
    hard = list(ex.hard_negatives)
    if shuffle:
        rng.shuffle(hard)
    chosen = hard[:h]
    if len(chosen) < h:
        chosen += ex.negatives[: h - len(chosen)]
    tries = 0
    while len(chosen) < h and tries < 100 * h:
        p = corpus[rng.randrange(len(corpus))]
        tries += 1
        if p.id not in ex.known_positive_ids and p.id != ex.positive.id:
            chosen.append(p)
    return chosen


def group_by_question(examples: list[TrainExample]) -> list[list[int]]:
    """Indices of the examples of each question (same query text), in first-seen order: the unit of
    ``--pairs sample``, which trains on one positive of each question per epoch."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.query, []).append(i)
    return list(groups.values())


class EpochBatches(Dataset):
    """Step ``i`` of epoch ``epoch`` -> :class:`Batch`. Incomplete final batches are dropped so every
    step has the same number of in-batch negatives.

    ``batch_size`` is the global batch. Under torch.distributed each of ``world`` ranks builds the
    same global batch (order and negatives) and keeps its contiguous slice of ``batch_size / world_size``
    questions, so the ranks' slices put together are exactly the single-process batch.

    ``groups`` (from :func:`group_by_question`) makes an epoch one example per question: each
    question's positive is drawn from its examples by a generator seeded with (seed, epoch), as
    Tevatron samples positives. Without it every example (question, positive pair) is used.
    """

    def __init__(self, examples: list[TrainExample], corpus: list[Passage], tokenizer: TextTokenizer,
                 batch_size: int, hard_negatives: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 groups: list[list[int]] | None = None):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {world_size}")
        self.examples, self.corpus, self.tokenizer = examples, corpus, tokenizer
        self.batch_size, self.h, self.seed, self.epoch = batch_size, hard_negatives, seed, epoch
        self.rank, self.local = rank, batch_size // world_size
        units = list(range(len(examples)))
        if groups is not None:
            pick = random.Random(f"{seed}/{epoch}/positives")
            units = [group[pick.randrange(len(group))] if len(group) > 1 else group[0] for group in groups]
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.order = [units[i] for i in torch.randperm(len(units), generator=g).tolist()]

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def __getitem__(self, step: int) -> Batch:
        rng = random.Random(f"{self.seed}/{self.epoch}/{step}")
        chosen = [self.examples[i] for i in self.order[step * self.batch_size : (step + 1) * self.batch_size]]
        negatives = [pick_negatives(ex, self.h, rng, self.corpus, shuffle=True) for ex in chosen]
        mine = slice(self.rank * self.local, (self.rank + 1) * self.local)
        batch = collate(chosen[mine], negatives[mine], self.tokenizer)
        if self.local < self.batch_size:  # the pairs the global batch masks, as the loss sees them
            batch.masked = count_masked(chosen, negatives)
        return batch


def fixed_batches(examples: list[TrainExample], corpus: list[Passage], tokenizer: TextTokenizer,
                  batch_size: int, hard_negatives: int, seed: int = 0):
    """Batches in file order with deterministic negatives (the first H), for evaluation. The last
    batch may be smaller."""
    rng = random.Random(f"eval/{seed}")
    for start in range(0, len(examples), batch_size):
        chosen = examples[start : start + batch_size]
        if len(chosen) < 2 and start > 0:
            break  # a lone question has no in-batch negatives; it is scored in no batch
        negatives = [pick_negatives(ex, hard_negatives, rng, corpus, shuffle=False) for ex in chosen]
        yield collate(chosen, negatives, tokenizer)
