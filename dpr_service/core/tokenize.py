"""The only place text becomes token ids.

Passages with a title are encoded as the pair ``[CLS] title [SEP] text [SEP]``, as DPR does
(``tokenizer(title, text)``); passages without one as ``[CLS] text [SEP]``. Batches are padded to
their longest member (dynamic padding), and questions and passages have their own max lengths. A checkpoint's prompts
(``query_prompt`` / ``passage_prompt``, e.g. e5's ``"query: "``) are put before each question and
before each passage's title (its text when it has none), as sentence-transformers prepends them.
"""

from __future__ import annotations

import threading
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from .formats import Passage


class TextTokenizer:
    """Wraps a Hugging Face tokenizer with the checkpoint's max lengths. Thread-safe: a fast
    tokenizer keeps its truncation and padding settings as state that each call re-sets, so the
    server's threads take turns (a query tokenized while a passage batch re-set the state would
    silently get the passage max length)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, query_max_length: int, passage_max_length: int,
                 query_prompt: str = "", passage_prompt: str = ""):
        self.hf = tokenizer
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.query_prompt, self.passage_prompt = query_prompt, passage_prompt
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, tokenizer: PreTrainedTokenizerBase, config) -> "TextTokenizer":
        """The tokenizer with an :class:`~dpr_service.core.config.EncoderConfig`'s lengths and prompts."""
        return cls(tokenizer, config.query_max_length, config.passage_max_length, config.query_prompt, config.passage_prompt)

    def __getstate__(self) -> dict:  # DataLoader workers started by spawn get a copy, and their own lock
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def queries(self, texts: Sequence[str]) -> dict:
        """Token ids for questions: ``input_ids`` and ``attention_mask``, each (B, L)."""
        with self._lock:
            return self._queries(texts)

    def passages(self, passages: Sequence[Passage]) -> dict:
        """Token ids for passages (title [SEP] text when a title exists): each (N, L)."""
        passages = list(passages)
        if self.passage_prompt:
            passages = [Passage(p.text, self.passage_prompt + p.title, p.id) if p.title
                        else Passage(self.passage_prompt + p.text, "", p.id) for p in passages]
        with self._lock:
            return self._passages(passages)

    def lengths(self, texts: Sequence[str], kind: str) -> list[int]:
        """Untruncated token counts (with special tokens and prompt) of questions (``kind="query"``,
        strings) or passages (``"passage"``, :class:`Passage`): what the max lengths cut."""
        if kind == "query":
            with self._lock:
                return [len(ids) for ids in self.hf([self.query_prompt + t for t in texts], truncation=False, verbose=False)["input_ids"]]
        titled = [(self.passage_prompt + p.title, p.text) if p.title else (self.passage_prompt + p.text, None) for p in texts]
        with self._lock:
            return [len(self.hf(a, b, truncation=False, verbose=False)["input_ids"]) for a, b in titled]

    def _queries(self, texts: Sequence[str]) -> dict:
        enc = self.hf(
            [self.query_prompt + t for t in texts],
            max_length=self.query_max_length,
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _passages(self, passages: list[Passage]) -> dict:
        titled = [i for i, p in enumerate(passages) if p.title]
        if not titled:
            enc = self.hf(
                [p.text for p in passages],
                max_length=self.passage_max_length,
                truncation=True,
                padding="longest",
                return_tensors="pt",
            )
        else:
            # Titled and untitled passages are tokenized as two batches (a pair and a single
            # sequence, so an untitled passage gets no empty title segment), then padded together.
            ids: list = [None] * len(passages)
            untitled = [i for i, p in enumerate(passages) if not p.title]
            pairs = self.hf(
                [passages[i].title for i in titled],
                [passages[i].text for i in titled],
                max_length=self.passage_max_length,
                truncation="longest_first",
            )["input_ids"]
            for i, row in zip(titled, pairs):
                ids[i] = row
            if untitled:
                singles = self.hf(
                    [passages[i].text for i in untitled], max_length=self.passage_max_length, truncation=True
                )["input_ids"]
                for i, row in zip(untitled, singles):
                    ids[i] = row
            enc = self.hf.pad({"input_ids": ids}, padding="longest", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
