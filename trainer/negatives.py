"""Hard negatives for training data that has none: ``dpr train --negatives {given,random,bm25,model}``.

* ``given``: the data's own (``hard_negative_ctxs`` / ``negatives``), then DPR's fallbacks.
* ``random``: random passages of the pool (in-batch negatives plus one random passage each).
* ``bm25``: the top BM25 passages of each question (DPR's hard negatives), by the project's BM25
  (:mod:`dpr_service.core.bm25`, as ``dpr mine --method bm25``).
* ``model``: the top passages by the model itself (the starting model, and the model being trained
  in re-mining rounds, as ANCE does), pool encoded once and searched exactly.

Both mining methods go through :func:`dpr_service.core.mining.select_negatives`, the rules ``dpr mine``
applies: never a known positive, never a passage whose text equals a positive's, and (model) never a
passage scoring above ``--mine-ratio`` (0.95, NV-Retriever) of the example's own positive (cosine only).
Each example keeps up to ``KEEP`` negatives; every epoch draws ``--hard-negatives`` of them at random.

Mined negatives are written to ``<output>/negatives/round-<r>.jsonl`` (round 0 before the first step,
round r after r * ``--remine-every`` epochs) and read back on ``--resume``, so a resumed run trains on
exactly the negatives the interrupted one mined.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from dpr_service.core.bm25 import BM25
from dpr_service.core.checkpoint import CheckpointError
from dpr_service.core.device import Runtime
from dpr_service.core.encoder import BiEncoder
from dpr_service.core.formats import DataError, Passage, TrainData
from dpr_service.core.inference import encode_texts, exact_search
from dpr_service.core.mining import MiningStats, score_ceiling, select_negatives
from dpr_service.core.tokenize import TextTokenizer

log = logging.getLogger("trainer")

KEEP = 20  # mined negatives kept per question; each epoch samples --hard-negatives of them


def choose_method(requested: str, data: TrainData, model_kind: str = "sentence-transformers") -> str:
    """``auto`` -> ``given`` when the data has hard negatives of its own; else ``model`` when the
    starting model is already a retriever (a sentence-transformers model or a dpr-service checkpoint,
    ``model_kind``), whose ranking makes hard negatives; else ``bm25`` (an untrained encoder such as
    plain BERT ranks almost at random), or ``random``, with a warning naming the corpus file, when
    BM25 finds no word to index in any passage (all stop words or punctuation: ``dpr index build``
    likewise builds its dense index without BM25). Other values are returned as is; ``bm25`` asked
    for on such a corpus raises DataError naming the corpus file."""
    method = requested
    if requested == "auto":
        if any(ex.hard_negatives or ex.negatives for ex in data.examples):
            return "given"
        method = "model" if model_kind in ("sentence-transformers", "dpr-service checkpoint") else "bm25"
    if method != "bm25" or bm25_can_index(data.corpus):
        return method
    why = ("no passage has a word BM25 can index (all stop words, punctuation or single characters; docs/index.md)")
    if requested == "auto":
        log.warning("--negatives auto: %s: %s; training with random negatives instead (--negatives model mines them "
                    "with the starting model)", pool_file(data), why)
        return "random"
    raise DataError(pool_file(data), None, f"--negatives bm25: {why}; pass --negatives random or model")


def bm25_can_index(corpus: list[Passage], chunk: int = 256) -> bool:
    """Whether BM25 (:class:`~dpr_service.core.bm25.BM25`, its analyser) finds a word to index in some
    passage of ``corpus``, looked at ``chunk`` passages at a time: a corpus of real text answers
    with its first chunk; only one with nothing to index is read whole."""
    bm25 = BM25(None)
    for start in range(0, len(corpus), chunk):
        if any(bm25.tokens([f"{p.title} {p.text}".strip() for p in corpus[start:start + chunk]])):
            return True
    return False


def pool_file(data: TrainData) -> str:
    """The file the passage pool was read from: a BEIR directory's ``corpus.jsonl``, else the training file."""
    root = Path(data.source.rsplit(" (", 1)[0]) if data.source.endswith(")") else Path(data.source)
    return str(root / "corpus.jsonl") if root.is_dir() else data.source


def round_path(output: Path, round_: int) -> Path:
    """``<output>/negatives/round-<r>.jsonl``, where round ``r``'s mined negatives are kept."""
    return Path(output) / "negatives" / f"round-{round_}.jsonl"


def mine(method: str, data: TrainData, encoder: BiEncoder | None, tokenizer: TextTokenizer | None,
         runtime: Runtime | None, depth: int, ratio: float, batch_size: int = 128, progress: bool = True
         ) -> tuple[dict[tuple[str, str], list[str]], dict]:
    """Mine negatives for every example of ``data``: {(query text, positive id): [passage ids, best
    first]} and counts. ``method`` is ``bm25`` or ``model`` (which needs the encoder).

    Each question's top ``depth`` candidates that are neither its known positives nor copies of one
    are found once; with the model and cosine similarity, each example then keeps those scoring at
    most ``ratio`` of *its own* positive's score (NV-Retriever scores each (question, positive) pair:
    a question with 40 positives of mixed scores keeps hard negatives for its strong positives)."""
    by_id = {p.id: p for p in data.corpus}
    positives: dict[str, dict] = {}
    for ex in data.examples:
        known = positives.setdefault(ex.query, {})
        for pid in ex.known_positive_ids | {ex.positive.id}:
            if pid in by_id or pid == ex.positive.id:
                known[pid] = by_id.get(pid, ex.positive)
    queries = list(positives)
    k = min(len(data.corpus), depth + max(len(v) for v in positives.values()))
    stats = MiningStats()
    if method == "bm25":
        ranked = BM25(data.corpus).search(queries, k)
        pair_score = None
    elif method == "model":
        p_emb = encode_texts(encoder, tokenizer, data.corpus, "passage", runtime, batch_size, progress=progress)  # (N, D)
        q_emb = encode_texts(encoder, tokenizer, queries, "query", runtime, batch_size, progress=progress)  # (Q, D)
        scores, idx = exact_search(q_emb, p_emb, k, runtime.device)  # (Q, k) each
        ranked = [[(data.corpus[j].id, s) for s, j in zip(row_s, row_j)] for row_s, row_j in zip(scores.tolist(), idx.tolist())]
        row, q_row = {p.id: i for i, p in enumerate(data.corpus)}, {q: i for i, q in enumerate(queries)}
        # the ratio rule reads cosine scores; a dot product's scale and offset are arbitrary (its
        # candidates are still cleared of positives and their copies)
        cosine = encoder.config.similarity == "cosine"
        pair_score = lambda q, pid: float(q_emb[q_row[q]] @ p_emb[row[pid]]) if cosine and pid in row else None  # noqa: E731
    else:
        raise ValueError(f"method must be bm25 or model, got {method!r}")
    candidates = {}  # query -> [(passage, score)] without its positives and their copies, best first
    for q, hits in zip(queries, ranked):
        score = dict(hits)
        kept = select_negatives(((by_id[pid], s) for pid, s in hits), list(positives[q].values()), depth, stats=stats)
        candidates[q] = [(p, score[p.id]) for p in kept]
    mined: dict[tuple[str, str], list[str]] = {}
    short = 0
    for ex in data.examples:
        pos_score = pair_score(ex.query, ex.positive.id) if pair_score else None
        ceiling = score_ceiling(pos_score, ratio=ratio) if pos_score is not None else float("inf")
        allowed = [p.id for p, s in candidates[ex.query] if s <= ceiling]
        stats.skipped["within_margin"] += len(candidates[ex.query]) - len(allowed)
        mined[(ex.query, ex.positive.id)] = allowed[:KEEP]
        short += not allowed
    return mined, stats.as_dict() | {"examples": len(data.examples), "examples_without_negatives": short}


def save_round(path: Path, mined: dict[tuple[str, str], list[str]], stats: dict) -> None:
    """Write one round's negatives atomically: a JSON header line with the counts, then one
    ``{"query", "positive", "negatives"}`` line per example (question, positive id)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"stats": stats}) + "\n")
        for (q, pid), ids in mined.items():
            fh.write(json.dumps({"query": q, "positive": pid, "negatives": ids}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_round(path: Path) -> tuple[dict[tuple[str, str], list[str]], dict]:
    """Read a round written by :func:`save_round`; raises CheckpointError naming the line if it is damaged."""
    mined, stats = {}, {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            try:
                obj = json.loads(line)
                if lineno == 1:
                    stats = obj["stats"]
                else:
                    mined[(obj["query"], obj["positive"])] = list(obj["negatives"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}:{lineno}: damaged mined-negatives file ({e}); delete it to mine "
                                      "the round again") from None
    return mined, stats


def apply(data: TrainData, mined: dict[tuple[str, str], list[str]] | None) -> None:
    """Give every example its mined negatives (``None``: random pool passages only)."""
    by_id = {p.id: p for p in data.corpus}
    for ex in data.examples:
        ex.hard_negatives = [by_id[i] for i in (mined or {}).get((ex.query, ex.positive.id), []) if i in by_id]
        ex.negatives = []


def prepare_round(method: str, round_: int, data: TrainData, output: Path, encoder: BiEncoder, tokenizer: TextTokenizer,
                  runtime: Runtime, depth: int, ratio: float, batch_size: int, progress: bool, is_main: bool,
                  barrier, hard_negatives: int = 1) -> None:
    """Make round ``round_``'s negatives the examples' hard negatives: read them from the output
    directory when a previous (interrupted) run wrote them, else mine and write them (rank 0 only;
    the other ranks wait at ``barrier`` and read the file). ``given`` leaves the data as it is."""
    if method == "given":
        short = sum(1 for ex in data.examples if len(ex.hard_negatives) < hard_negatives)
        if short and is_main:
            log.warning("%d of %d examples have fewer than %d hard negatives of their own: each is topped up with its "
                        "DPR negative_ctxs, then random passages of the pool (--negatives model mines them instead)",
                        short, len(data.examples), hard_negatives)
        return
    if method == "random":
        apply(data, None)
        return
    path = round_path(output, round_)
    if is_main and not path.is_file():
        what = "the starting model" if round_ == 0 else f"the model after {round_} round(s) of training"
        log.info("mining %s negatives (round %d) with %s over %d passages", method, round_,
                 "BM25" if method == "bm25" else what, len(data.corpus))
        with torch.inference_mode():
            mined, stats = mine(method, data, encoder, tokenizer, runtime, depth, ratio, batch_size, progress)
        save_round(path, mined, stats)
        log.info("mined negatives, round %d: %s (written to %s)", round_, stats, path)
    barrier()
    mined, stats = load_round(path)
    apply(data, mined)
    short = sum(1 for ex in data.examples if len(ex.hard_negatives) < hard_negatives)
    if short and is_main and round_ == 0:
        log.info("%d of %d examples got fewer than %d mined negatives (none passed the false-negative rules in the "
                 "top %d): random passages of the pool stand in for the missing ones", short, len(data.examples),
                 hard_negatives, depth)
