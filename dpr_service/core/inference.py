"""Batched encoding and exact search, shared by the trainer's evaluation, the index builder and the server."""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from .device import Runtime
from .encoder import BiEncoder
from .formats import Passage
from .onnx_export import OnnxRuntime
from .tokenize import TextTokenizer


class NonFiniteEmbeddings(ValueError):
    """An embedding came out NaN or infinite."""


@torch.inference_mode()  # lighter than no_grad: embeddings here never take part in autograd
def encode_texts(
    encoder: BiEncoder,
    tokenizer: TextTokenizer,
    items: Sequence[str] | Sequence[Passage],
    kind: str,
    runtime: Runtime,
    batch_size: int = 128,
    progress: bool = False,
) -> torch.Tensor:
    """Embed queries (``kind="query"``, strings) or passages (``kind="passage"``, :class:`Passage`).

    Items are sorted by length so each batch pads little, encoded without dropout (by the torch
    ``encoder``, or by ONNX Runtime when ``runtime`` is an :class:`~dpr_service.core.onnx_export.OnnxRuntime`
    of it), and returned as float32 (N, D) on the CPU in the input order. Raises NonFiniteEmbeddings (a ValueError) when
    the model gives a NaN or infinite embedding (e.g. fp16 overflow): an index, a mined negative or
    a served answer is never computed from one.
    """
    if kind not in ("query", "passage"):
        raise ValueError(f"kind must be 'query' or 'passage', got {kind!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(items)
    if n == 0:
        return torch.empty(0, encoder.dim)
    was_training = encoder.training
    encoder.eval()
    length = (lambda x: len(x)) if kind == "query" else (lambda p: len(p.title) + len(p.text))
    order = sorted(range(n), key=lambda i: -length(items[i]))
    out = torch.empty(n, encoder.dim)
    bar = tqdm(total=n, desc="encoding queries" if kind == "query" else "encoding passages", unit=kind[0], disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        batch = [items[i] for i in idx]
        enc = tokenizer.queries(batch) if kind == "query" else tokenizer.passages(batch)
        enc = {k: v.to(runtime.device, non_blocking=True) for k, v in enc.items()}
        if isinstance(runtime, OnnxRuntime):  # ONNX Runtime's graphs of the same encoder (--runtime onnx)
            emb = runtime.onnx.encode(kind, enc["input_ids"], enc["attention_mask"])
        else:
            with runtime.autocast():
                emb = encoder.encode_queries(**enc) if kind == "query" else encoder.encode_passages(**enc)
        emb = emb.float().cpu()
        if not bool(torch.isfinite(emb).all()):
            bad = [i for i, row in zip(idx, torch.isfinite(emb).all(dim=1).tolist()) if not row]
            raise NonFiniteEmbeddings(f"the model gave non-finite (NaN or inf) embeddings for {len(bad)} {kind}(s), "
                                      f"the first at position {bad[0]} of the input")
        out[torch.tensor(idx)] = emb
        bar.update(len(idx))
    bar.close()
    encoder.train(was_training)
    return out


@torch.no_grad()
def exact_search(
    q_emb: torch.Tensor, p_emb: torch.Tensor, k: int, device: torch.device | str = "cpu", block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force inner-product top-k: (Q, D) x (N, D) -> scores (Q, k), indices (Q, k), best first;
    ``block`` queries at a time (a (block, N) score matrix in memory)."""
    k = min(k, p_emb.shape[0])
    p = p_emb.to(device, torch.float32)
    all_scores, all_idx = [], []
    for start in range(0, q_emb.shape[0], block):
        s = q_emb[start : start + block].to(device, torch.float32) @ p.T  # (block, N)
        top = s.topk(k, dim=1)
        all_scores.append(top.values.cpu())
        all_idx.append(top.indices.cpu())
    if not all_scores:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(all_scores), torch.cat(all_idx)
