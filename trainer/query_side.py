"""Query-side training against a fixed index: ``dpr train --index ARTIFACT``.

The passage side is the artifact's stored vectors and stays as it is; only the query encoder trains,
so the corpus is never re-encoded and the new query encoder goes into service with a reload, not an
index build. This is ADORE (Zhan, Mao, Liu, Guo, Zhang and Ma 2021, "Optimizing Dense Retrieval
Model Training with Hard Negatives", SIGIR): every step, each question's negatives are the top
passages of the *whole* index under the current query encoder (the very query embeddings of the
step, detached), so the negatives are always the ones the model now ranks highest.

* **The passage vectors** are those the index scores with: ``faiss`` ``reconstruct_n`` of the
  artifact's index, exact for indexes that store vectors whole (``Flat``, ``HNSW..,Flat``,
  ``IVF..,Flat``), the decoded codes for compressed ones (PQ, SQ, OPQ's rotation included), which are
  what such an index serves with. A PCA index scores in its reduced space, which reconstructed vectors
  cannot reproduce: it is refused. Scores are inner products, the index's metric (the query
  encoder's embeddings are normalised for cosine checkpoints, as at serving time).
* **Negatives** (``--index-loss topk``): the top ``--index-negatives`` passages of each question,
  with the mining rules of :mod:`dpr_service.core.mining`: never a known positive (by id), never a
  copy of one (by content, :func:`~dpr_service.core.mining.content_key`), never a passage scoring above
  ``--mine-ratio`` of the positive (:func:`~dpr_service.core.mining.score_ceiling`; cosine only, as
  the trainer's own mining: a dot product's scale is arbitrary). The batch's
  passages are shared: each question also sees the other questions' positives and negatives, as in
  DPR's in-batch training, and a passage retrieved for several questions is one candidate.
* **The whole corpus** (``--index-loss corpus``): the exact NLL over every passage of the index (a
  log-sum-exp over all N scores), known positives and their copies masked. It is the limit of what
  negatives can be; it costs a (B, N) score matrix per step.

Both are :func:`dpr_service.core.loss.in_batch_nll`, the one loss function. Under torch.distributed
the query embeddings are gathered and every rank retrieves the same global negatives from its copy
of the vectors. The result is a checkpoint with two encoders: the trained query encoder and the
index's passage encoder, unchanged, which records the checkpoint that built the index
(``passage_source``) so that ``dpr serve`` and ``dpr eval`` accept it with that index.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from dpr_service.core.artifact import ArtifactError, EncoderIdentity, Manifest, binding_message, binds
from dpr_service.core.batches import content_hash, masked_pairs
from dpr_service.core.checkpoint import PASSAGE_SETTINGS, CheckpointError, load_checkpoint
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import Runtime
from dpr_service.core.encoder import BiEncoder
from dpr_service.core.formats import Passage, TrainExample
from dpr_service.core.loss import in_batch_nll
from dpr_service.core.mining import score_ceiling
from dpr_service.core.search import Searcher
from dpr_service.core.tokenize import TextTokenizer

from .batches import EpochBatches
from .config import ConfigError
from .distributed import Dist, gather_padded, gather_rows

log = logging.getLogger("trainer")

COMPRESSED = ("PQ", "SQ", "OPQ", "LSH", "RQ", "LSQ", "ITQ")  # factory parts that store no exact vectors
ROWS_PER_READ = 50_000  # passages read from the store at a time when hashing their content
SEARCH_CHUNK = 262_144  # passages scored at a time by index_negatives (a (B, SEARCH_CHUNK) matrix)


@dataclass
class IndexedCorpus:
    """An index artifact's passages as training needs them: ``vectors`` (N, D) float32, row r being
    passage ``ids[r]``; ``row_of`` (id -> row); ``content`` (N,) int64 content groups, equal for
    copies (the same title and text under other ids); ``hashes`` (N,) the rows' own
    :func:`~dpr_service.core.batches.content_hash` (to check that training data names the same texts)."""

    directory: Path
    manifest: Manifest
    vectors: torch.Tensor
    ids: list[str]
    row_of: dict[str, int]
    content: torch.Tensor
    hashes: np.ndarray

    def same_text(self, passages: list[Passage]) -> str | None:
        """The id of the first passage whose id the index lacks or holds with another text; None when all match."""
        for p in passages:
            row = self.row_of.get(p.id)
            if row is None or int(self.hashes[row]) != content_hash(p):
                return p.id
        return None

    @property
    def count(self) -> int:
        """N, the passages in the index."""
        return len(self.ids)

    def to(self, device: torch.device) -> "IndexedCorpus":
        """The vectors and content groups on ``device`` (where the step's scores are computed)."""
        return dataclasses.replace(self, vectors=self.vectors.to(device), content=self.content.to(device))


def load_indexed_corpus(directory: str | Path, progress: bool = False) -> IndexedCorpus:
    """Read and verify the artifact at ``directory`` (checksums first, as the server does) and take
    its vectors out of FAISS. Raises ConfigError naming the artifact when it cannot be read or its
    index cannot give its vectors back."""
    try:
        searcher = Searcher(directory)
    except (ArtifactError, OSError) as e:
        raise ConfigError(f"--index {directory}: {e}") from None
    n, factory = searcher.count, searcher.manifest.factory
    index = searcher.index
    if "PCA" in factory.upper():
        raise ConfigError(f"--index {directory}: a {factory} index scores in its PCA-reduced space, which its "
                          "reconstructed vectors cannot reproduce; train against a Flat, HNSW or IVF index")
    try:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.make_direct_map()  # IVF lists keep no row -> entry map until asked
        vectors = torch.from_numpy(np.ascontiguousarray(index.reconstruct_n(0, n), dtype=np.float32))  # (N, D)
    except RuntimeError as e:
        raise ConfigError(f"--index {directory}: the {factory} index cannot give its vectors back "
                          f"({str(e).strip().splitlines()[-1]}); rebuild it with --factory Flat or HNSW32") from None
    exact = not any(part in factory.upper() for part in COMPRESSED)  # for the log
    ids, content = [], np.empty(n, dtype=np.int64)
    bar = tqdm(total=n, desc="reading the index's passages", unit="p", disable=not progress, leave=False)
    for start in range(0, n, ROWS_PER_READ):
        rows = searcher.store.by_rows(list(range(start, min(n, start + ROWS_PER_READ))), text=True)
        for r in range(start, min(n, start + ROWS_PER_READ)):
            pid, title, text = rows[r]
            ids.append(pid)
            content[r] = content_hash(Passage(text=text, title=title, id=pid))
        bar.update(len(rows))
    bar.close()
    _, groups = np.unique(content, return_inverse=True)  # copies share a group
    log.info("--index %s: %d passages x %d dims (%s), %s", directory, n, vectors.shape[1], factory,
             "its exact vectors" if exact else "the decoded codes of a compressed index (what it serves with)")
    return IndexedCorpus(Path(searcher.directory), searcher.manifest, vectors, ids, {pid: r for r, pid in enumerate(ids)},
                         torch.from_numpy(groups.astype(np.int64)), content)


def check_starting_model(corpus: IndexedCorpus, identity: EncoderIdentity, model: str) -> None:
    """Refuse (ConfigError naming both fingerprints) a starting model whose passage encoder did not
    build the index: its query vectors would be trained against vectors of another encoder."""
    built_passage = str(corpus.manifest.extra.get("passage_fingerprint", ""))
    if not binds(corpus.manifest.checkpoint_fingerprint, built_passage, identity):
        raise ConfigError(f"--index {corpus.directory} --model {model}: "
                          f"{binding_message(corpus.manifest.checkpoint_fingerprint, built_passage, identity)}")


def check_positives(corpus: IndexedCorpus, examples: list[TrainExample], source: str) -> None:
    """Every positive of the training data must be a passage of the index, with the same text (ids
    such as "0", "1" recur across corpora). Known positives the index lacks are simply not masked."""
    missing = sorted({ex.positive.id for ex in examples} - corpus.row_of.keys())
    if missing:
        raise ConfigError(f"--index {corpus.directory} --train {source}: {len(missing)} positive passage ids are "
                          f"not in the index (first: {missing[0]!r}); train against an index of the same corpus")
    other = corpus.same_text([ex.positive for ex in examples])
    if other is not None:
        raise ConfigError(f"--index {corpus.directory} --train {source}: passage {other!r} has another title or "
                          "text in the index; train against an index of the same corpus")


def start_encoder(model: str, config: EncoderConfig, corpus: IndexedCorpus) -> tuple[BiEncoder, TextTokenizer]:
    """The starting encoder of a query-side run: ``model`` (a checkpoint or model directory) checked
    against the index (:func:`check_starting_model`), split into a trainable query encoder and its
    frozen passage encoder (:func:`split_encoders`), with ``config``'s query-side settings
    (temperature, query length and prompt). Raises ConfigError when ``config`` changes a passage
    setting (:data:`~dpr_service.core.checkpoint.PASSAGE_SETTINGS`): the index was encoded with them."""
    try:
        loaded = load_checkpoint(model)
    except CheckpointError as e:
        raise ConfigError(f"--model {model}: {e}") from None
    check_starting_model(corpus, loaded.identity, model)
    changed = [k for k in PASSAGE_SETTINGS if getattr(config, k) != getattr(loaded.config, k)]
    if changed:
        k = changed[0]
        raise ConfigError(f"--{k.replace('_', '-')} {getattr(config, k)!r}: with --index the passage side stays as the "
                          f"index was built ({getattr(loaded.config, k)!r}); leave it unset")
    encoder = split_encoders(loaded.encoder)
    encoder.config = dataclasses.replace(config, shared=False)
    return encoder, TextTokenizer.for_config(loaded.tokenizer.hf, encoder.config)


def split_encoders(encoder: BiEncoder) -> BiEncoder:
    """Two encoders from ``encoder``: a trainable query encoder (a copy, when ``encoder`` is shared)
    and the passage encoder, frozen (its weights must stay those that built the index)."""
    query = copy.deepcopy(encoder.query_model) if encoder.config.shared else encoder.query_model
    out = BiEncoder(query, encoder.passage_model, dataclasses.replace(encoder.config, shared=False))
    out.length_buckets = encoder.length_buckets
    freeze_passage_encoder(out)
    return out


def freeze_passage_encoder(encoder: BiEncoder) -> None:
    """No gradient and no optimiser state for the passage encoder; eval mode (it never runs in training)."""
    encoder.passage_model.requires_grad_(False)
    encoder.passage_model.eval()


# ----------------------------------------------------------------------------- batches


@dataclass
class QueryBatch:
    """B questions of a step, as query-side training needs them: ``queries`` tokenised (B, Lq);
    ``positive_rows`` (B,) the index row of each question's positive; ``known_rows`` (B, K) the rows of
    each question's known positives (its own included), padded with -1."""

    queries: dict
    positive_rows: torch.Tensor
    known_rows: torch.Tensor

    @property
    def size(self) -> int:
        """B, the number of questions."""
        return int(self.positive_rows.shape[0])

    def to(self, device: torch.device) -> "QueryBatch":
        """The batch with every tensor on ``device``."""
        return QueryBatch({k: v.to(device, non_blocking=True) for k, v in self.queries.items()},
                          self.positive_rows.to(device), self.known_rows.to(device))


class QueryBatches(EpochBatches):
    """:class:`~trainer.batches.EpochBatches`' order (the same seeded questions at each step, the
    same slice per rank), without passages: they come from the index."""

    def __init__(self, examples: list[TrainExample], row_of: dict[str, int], tokenizer: TextTokenizer,
                 batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                 groups: list[list[int]] | None = None):
        super().__init__(examples, [], tokenizer, batch_size, 0, seed, epoch, rank, world_size, groups)
        self.row_of = row_of

    def __getitem__(self, step: int) -> QueryBatch:
        chosen = [self.examples[i] for i in self.order[step * self.batch_size : (step + 1) * self.batch_size]]
        mine = chosen[self.rank * self.local : (self.rank + 1) * self.local]
        known = [sorted(self.row_of[pid] for pid in ex.known_positive_ids | {ex.positive.id} if pid in self.row_of) for ex in mine]
        known_rows = torch.full((len(mine), max(map(len, known))), -1, dtype=torch.long)
        for i, rows in enumerate(known):
            known_rows[i, : len(rows)] = torch.tensor(rows, dtype=torch.long)
        return QueryBatch(self.tokenizer.queries([ex.query for ex in mine]),
                          torch.tensor([self.row_of[ex.positive.id] for ex in mine], dtype=torch.long), known_rows)


# ----------------------------------------------------------------------------- the step


def known_mask(columns: torch.Tensor, known_rows: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """(B, M) candidate mask over index rows ``columns`` (M,): False where the column is a known
    positive of question i, or a copy of one (same content group); ``known_rows`` (B, K), -1 padded.
    One (B, M) comparison per known positive, never a (B, M, K) tensor."""
    col_content = content[columns]  # (M,)
    known_content = torch.where(known_rows >= 0, content[known_rows.clamp(min=0)], -1)  # (B, K)
    hit = torch.zeros(known_rows.shape[0], columns.shape[0], dtype=torch.bool, device=columns.device)
    for k in range(known_rows.shape[1]):
        hit |= col_content.unsqueeze(0) == known_content[:, k : k + 1]
    return ~hit


@torch.no_grad()
def index_negatives(q_emb: torch.Tensor, corpus: IndexedCorpus, positive_rows: torch.Tensor, known_rows: torch.Tensor,
                    k: int, ratio: float | None) -> torch.Tensor:
    """(B, k) index rows of each question's top negatives by ``q_emb`` (B, D), -1 where fewer
    qualify: exact inner-product search over every stored vector, skipping known positives, their
    copies and, with ``ratio`` (None: no such rule), passages above ``ratio`` of the positive's score
    (the mining rules)."""
    q = q_emb.float()
    device = corpus.vectors.device
    positive_scores = (q * corpus.vectors[positive_rows]).sum(dim=1)  # (B,)
    ceilings = torch.tensor([score_ceiling(float(s), 0.0, ratio) if ratio is not None else float("inf")
                             for s in positive_scores.tolist()], dtype=q.dtype, device=device)
    # SEARCH_CHUNK passages at a time, each chunk's top k merged into the running top k: no (B, N)
    # tensor, so the step's memory beside the vectors does not grow with N (benchmarks/corpus_loss.py)
    best = torch.full((q.shape[0], 0), float("-inf"), device=device)
    best_rows = torch.full((q.shape[0], 0), -1, dtype=torch.long, device=device)
    for start in range(0, corpus.count, SEARCH_CHUNK):
        stop = min(corpus.count, start + SEARCH_CHUNK)
        scores = q @ corpus.vectors[start:stop].T  # (B, c)
        allowed = known_mask(torch.arange(start, stop, device=device), known_rows, corpus.content) & (scores <= ceilings.unsqueeze(1))
        top = scores.masked_fill(~allowed, float("-inf")).topk(min(k, stop - start), dim=1)
        merged = torch.cat([best, top.values], dim=1).topk(min(k, best.shape[1] + top.values.shape[1]), dim=1)
        best, best_rows = merged.values, torch.cat([best_rows, top.indices + start], dim=1).gather(1, merged.indices)
    return torch.where(torch.isfinite(best), best_rows, -1)


def query_side_loss(encoder: BiEncoder, q_emb: torch.Tensor, batch: QueryBatch, corpus: IndexedCorpus, d: Dist,
                    mode: str, k: int, ratio: float | None) -> tuple[torch.Tensor, int]:
    """The global mean DPR loss of the step's questions against the index (a scalar, equal on every
    rank; only this rank's ``q_emb`` (B_local, D) carries gradients) and the pairs it masked.

    ``mode`` ``topk``: the candidates are every question's positive and its ``k`` index negatives
    (:func:`index_negatives`), shared across the batch; ``corpus``: every passage of the index."""
    q_all, _ = gather_rows(q_emb.float(), d)  # (B, D)
    positive_rows, _ = gather_rows(batch.positive_rows, d, keep_grad=False)  # (B,)
    known_rows = gather_padded(batch.known_rows, d, fill=-1)  # (B, K)
    temperature = encoder.config.temperature
    device = corpus.vectors.device
    if mode == "corpus":
        columns = torch.arange(corpus.count, device=device)
        mask = known_mask(columns, known_rows, corpus.content)  # (B, N)
        loss = in_batch_nll(q_all, corpus.vectors, positive_rows, similarity="dot", temperature=temperature,
                            candidate_mask=mask)
        return loss, masked_pairs(mask)
    ratio = ratio if encoder.config.similarity == "cosine" else None  # mining's rule: a dot product's scale is arbitrary
    negatives = index_negatives(q_all.detach(), corpus, positive_rows, known_rows, k, ratio)  # (B, k)
    # the batch's passages, each once: the positives, then every question's negatives not yet there
    column_of: dict[int, int] = {}
    for row in positive_rows.tolist() + [r for r in negatives.flatten().tolist() if r >= 0]:
        column_of.setdefault(row, len(column_of))
    columns = torch.tensor(list(column_of), dtype=torch.long, device=device)  # (M,) index rows
    positive_idx = torch.tensor([column_of[r] for r in positive_rows.tolist()], device=device)  # (B,)
    mask = known_mask(columns, known_rows, corpus.content)  # (B, M)
    loss = in_batch_nll(q_all, corpus.vectors[columns], positive_idx, similarity="dot", temperature=temperature,
                        candidate_mask=mask)
    return loss, masked_pairs(mask)


def forward_backward(encoder: BiEncoder, models, batch: QueryBatch, corpus: IndexedCorpus, runtime: Runtime, d: Dist,
                     scaler: torch.amp.GradScaler, mode: str, k: int, ratio: float | None) -> tuple[torch.Tensor, int]:
    """Accumulate this step's gradients of the query encoder (:func:`query_side_loss`, scaled by the
    world size as in :func:`trainer.step.forward_backward`); returns the global mean loss (detached)
    and the pairs masked as known positives or their copies."""
    batch = batch.to(runtime.device)
    with runtime.autocast():
        q_emb = encoder.encode_with(models.query, **batch.queries)  # (B_local, D)
    loss, masked = query_side_loss(encoder, q_emb, batch, corpus, d, mode, k, ratio)
    scaler.scale(loss * d.world_size).backward()
    return loss.detach(), masked
