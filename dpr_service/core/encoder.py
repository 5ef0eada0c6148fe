"""The bi-encoder: a question encoder and a passage encoder (or one shared), pooled to (B, D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .config import EncoderConfig


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, L, D) hidden states and (B, L) mask -> (B, D) embeddings."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class BiEncoder(nn.Module):
    """Question and passage encoders with the checkpoint's pooling.

    With ``similarity == "cosine"`` the embeddings come out L2-normalised, so an inner-product
    index over passage embeddings ranks exactly as the training scores do.
    """

    def __init__(self, query_model: PreTrainedModel, passage_model: PreTrainedModel | None, config: EncoderConfig):
        super().__init__()
        if config.shared and passage_model is not None and passage_model is not query_model:
            raise ValueError("a shared encoder takes one model")
        self.config = config
        self.query_model = query_model
        # A shared encoder is the same module twice; nn.Module registers it once in state_dict.
        self.passage_model = query_model if config.shared else passage_model
        if self.passage_model is None:
            raise ValueError("separate encoders need a passage model")
        # A speed setting, not part of the model: > 1 encodes a batch as that many length-sorted
        # buckets with their own padding. Results are the same up to float rounding.
        self.length_buckets = 1

    def encode_with(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) embeddings by ``model``: this encoder's query or passage model,
        or a wrapper of it (the trainer passes DistributedDataParallel ones)."""
        n = input_ids.shape[0]
        if self.length_buckets > 1 and n >= 2 * self.length_buckets:
            # Sort by length, cut into buckets and trim each bucket's padding: the same embeddings
            # (padding is masked out of attention and pooling) for fewer padded tokens of compute.
            lengths = attention_mask.sum(1)  # (B,)
            order = lengths.argsort(descending=True, stable=True)
            parts = []
            for idx in order.chunk(self.length_buckets):
                width = int(lengths[idx].max())
                parts.append(self._encode_padded(model, input_ids[idx, :width], attention_mask[idx, :width]))
            emb = torch.cat(parts)[order.argsort()]  # back to input order
        else:
            emb = self._encode_padded(model, input_ids, attention_mask)
        if self.config.similarity == "cosine":
            emb = F.normalize(emb.float(), dim=-1)
        return emb

    def _encode_padded(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        return pool(hidden, attention_mask, self.config.pooling)  # (B, D)

    def encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, Lq) token ids -> q_emb (B, D)."""
        return self.encode_with(self.query_model, input_ids, attention_mask)

    def encode_passages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, Lp) token ids -> p_emb (N, D)."""
        return self.encode_with(self.passage_model, input_ids, attention_mask)

    @property
    def dim(self) -> int:
        """The embedding width D."""
        return int(self.query_model.config.hidden_size)
