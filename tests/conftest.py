"""Shared fixtures: a tiny random BERT and tokenizer built on the spot (no downloads), and small
data files in each accepted format."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _dpr_environment_restored():
    """Each test leaves the ``DPR_*`` environment as it found it: ``dpr serve``'s main, called in
    process by some tests, writes its flags there for its workers (a leaked DPR_MILVUS_URI once
    turned every later app in the run into a Milvus one)."""
    before = {k: v for k, v in os.environ.items() if k.startswith("DPR_")}
    yield
    for key in [k for k in os.environ if k.startswith("DPR_") and k not in before]:
        del os.environ[key]
    os.environ.update(before)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [
    "apple", "river", "mountain", "engine", "violin", "desert", "planet", "harbor", "glacier", "lantern",
    "copper", "falcon", "meadow", "canyon", "orchid", "thunder", "marble", "saddle", "comet", "walnut",
    "pepper", "island", "bridge", "castle", "forest", "garden", "ocean", "rocket", "silver", "tunnel",
    "winter", "yellow", "zebra", "anchor", "basket", "candle", "dragon", "feather", "guitar", "helmet",
]
FILLER = ["the", "a", "of", "is", "in", "and", "what", "which", "near", "about", "story", "fact"]


def make_tiny_model(directory: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-wide random BERT with a word-level vocabulary, saved like a hub model."""
    import torch
    import transformers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS + FILLER))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    assert tokenizer.unk_token_id not in tokenizer("apple river")["input_ids"], "tokenizer lost its vocabulary"
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


def synthetic_examples(n: int, seed: int = 0, hard_negatives: int = 1) -> list[dict]:
    """Questions whose positive shares their two key words: learnable by a tiny model."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        negs = []
        for _ in range(hard_negatives):
            c, d = rng.sample([w for w in WORDS if w not in (a, b)], 2)
            negs.append({"title": c, "text": f"the {c} and the {d} story", "id": f"n{i}-{c}-{d}"})
        out.append({
            "query": f"what is the {a} near the {b}",
            "positive": {"title": a, "text": f"the {a} is near the {b} fact", "id": f"p{i}"},
            "negatives": negs,
        })
    return out


def write_plain(path: Path, n: int = 24, seed: int = 0, hard_negatives: int = 1) -> Path:
    with open(path, "w") as fh:
        for ex in synthetic_examples(n, seed, hard_negatives):
            fh.write(json.dumps(ex) + "\n")
    return path


def write_dpr(path: Path, n: int = 24, seed: int = 0) -> Path:
    records = []
    for ex in synthetic_examples(n, seed):
        pos = ex["positive"]
        records.append({
            "question": ex["query"],
            "answers": [pos["text"].split()[1]],
            "positive_ctxs": [{"title": pos["title"], "text": pos["text"], "passage_id": pos["id"]}],
            "negative_ctxs": [],
            "hard_negative_ctxs": [{"title": n["title"], "text": n["text"], "passage_id": n["id"]} for n in ex["negatives"]],
        })
    path.write_text(json.dumps(records, indent=2))
    return path


def write_beir(root: Path, n: int = 24, seed: int = 0, splits=("train", "dev")) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    examples = synthetic_examples(n, seed, hard_negatives=0)
    with open(root / "corpus.jsonl", "w") as fh:
        for i, ex in enumerate(examples):
            p = ex["positive"]
            fh.write(json.dumps({"_id": f"d{i}", "title": p["title"], "text": p["text"]}) + "\n")
    with open(root / "queries.jsonl", "w") as fh:
        for i, ex in enumerate(examples):
            fh.write(json.dumps({"_id": f"q{i}", "text": ex["query"], "metadata": {"leak": [f"d{i}"]}}) + "\n")
    for s, split in enumerate(splits):
        rows = [f"q{i}\td{i}\t1" for i in range(n) if i % len(splits) == s or split == "train"]
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return root


class AsgiForward:
    """An ASGI app that forwards to ``target``, set at run time: schemathesis needs an app when the
    test module is collected, the app under test is built later by a fixture (and its lifespan run once)."""

    target = None

    async def __call__(self, scope, receive, send):
        await self.target(scope, receive, send)

