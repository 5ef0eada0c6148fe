"""One training step's forward and backward, on one process or many, with or without caching.

The loss is DPR's in-batch NLL over the *global* batch: under torch.distributed every rank's
question and passage embeddings are gathered, so each question sees every rank's passages as
negatives (Karpukhin et al. 2020 trained this way on 8 GPUs). Every rank computes the same global
loss; gradients reach this rank's encoder only through its own slice of the embeddings, and
DistributedDataParallel averages the ranks' gradients. The loss is therefore multiplied by the
world size before ``backward`` so that the averaged gradient is the gradient of the global mean
loss, i.e. the gradient single-process training on the whole batch would have.

Gradient caching (``chunk_size``; Gao, Zhang, Han and Callan 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup", RepL4NLP) splits the step in three:

1. encode every chunk of ``chunk_size`` texts without a graph, remembering the RNG state before
   each chunk, so the activations of only one chunk are alive at a time;
2. compute the loss on the full set of embeddings and its gradient with respect to them
   (cheap: a (B, N) matrix);
3. encode each chunk again *with* a graph, from the same RNG state (identical dropout), and
   back-propagate the cached embedding gradient through it.

The parameter gradients equal those of the uncached step (tests check it to 1e-5 in fp32), while
peak memory depends on the chunk size instead of the batch size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dpr_service.core.device import Runtime
from dpr_service.core.encoder import BiEncoder
from dpr_service.core.loss import in_batch_nll

from dpr_service.core.batches import Batch, known_positive_mask
from .distributed import Dist, gather_padded, gather_rows


@dataclass
class Models:
    """The modules a step runs for questions and for passages: the encoder's own transformers
    models, or DistributedDataParallel wrappers of them (the same object twice when shared)."""

    query: nn.Module
    passage: nn.Module


def prepare_models(encoder: BiEncoder, d: Dist, device: torch.device) -> Models:
    """The encoder's models, wrapped in DDP under torch.distributed.

    Each transformers model gets its own wrapper, so a chunk of questions uses every parameter of
    the query wrapper (DDP's default ``find_unused_parameters=False`` holds) and gradient caching can
    skip the all-reduce for all but each wrapper's last chunk. Parameters that never receive a
    gradient (BERT's pooler: the loss pools the hidden states itself) are frozen first, since DDP
    would otherwise wait for their gradients forever.
    """
    if not d.enabled:
        return Models(encoder.query_model, encoder.passage_model)
    _freeze_unused(encoder, device)
    ids = [device.index] if device.type == "cuda" else None
    query = DistributedDataParallel(encoder.query_model, device_ids=ids)
    if encoder.config.shared:
        return Models(query, query)
    frozen = not any(p.requires_grad for p in encoder.passage_model.parameters())  # query-side training (--index)
    return Models(query, encoder.passage_model if frozen else DistributedDataParallel(encoder.passage_model, device_ids=ids))


def _freeze_unused(encoder: BiEncoder, device: torch.device) -> None:
    probe = torch.full((1, 4), 1, dtype=torch.long, device=device)  # any valid token ids
    mask = torch.ones_like(probe)
    emb = encoder.encode_queries(probe, mask).sum() + encoder.encode_passages(probe, mask).sum()
    emb.backward()
    for p in encoder.parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
    encoder.zero_grad(set_to_none=True)


def global_loss(encoder: BiEncoder, q_emb: torch.Tensor, p_emb: torch.Tensor, batch: Batch, d: Dist) -> torch.Tensor:
    """Mean DPR loss of every rank's questions over every rank's passages (a scalar, equal on all
    ranks). ``q_emb`` (B_local, D) and ``p_emb`` (N_local, D) are this rank's; only they carry
    gradients."""
    q_all, _ = gather_rows(q_emb, d)  # (B, D)
    p_all, p_sizes = gather_rows(p_emb, d)  # (N, D)
    offset = sum(p_sizes[: d.rank])  # where this rank's passages start in p_all
    positive_idx, _ = gather_rows(batch.positive_idx + offset, d, keep_grad=False)  # (B,)
    p_hashes, _ = gather_rows(batch.p_hashes, d, keep_grad=False)  # (N,)
    c_hashes, _ = gather_rows(batch.c_hashes, d, keep_grad=False)  # (N,) content: copies are masked too
    known_hashes = gather_padded(batch.known_hashes, d, fill=-1)  # (B, K)
    cfg = encoder.config
    return in_batch_nll(
        q_all, p_all, positive_idx, similarity=cfg.similarity, temperature=cfg.temperature,
        p_ids=p_hashes, candidate_mask=known_positive_mask(p_hashes, known_hashes, c_hashes),
    )


def forward_backward(encoder: BiEncoder, models: Models, batch: Batch, runtime: Runtime, d: Dist,
                     scaler: torch.amp.GradScaler, chunk_size: int | None = None) -> torch.Tensor:
    """Accumulate this step's parameter gradients; returns the global mean loss (detached).

    ``chunk_size`` None: one forward with a graph over the whole local batch. Otherwise gradient
    caching with chunks of ``chunk_size`` questions and ``chunk_size`` passages.
    """
    batch = batch.to(runtime.device)
    if chunk_size is None:
        with runtime.autocast():
            q_emb = encoder.encode_with(models.query, **batch.queries)  # (B_local, D)
            p_emb = encoder.encode_with(models.passage, **batch.passages)  # (N_local, D)
        loss = global_loss(encoder, q_emb, p_emb, batch, d)
        scaler.scale(loss * d.world_size).backward()
        return loss.detach()

    # 1. embeddings without graphs, chunk by chunk, with the RNG state before each chunk
    jobs = [(models.query, part, state) for part, state in _encode_chunks(encoder, models.query, batch.queries, chunk_size, runtime)]
    n_query_chunks = len(jobs)
    jobs += [(models.passage, part, state) for part, state in _encode_chunks(encoder, models.passage, batch.passages, chunk_size, runtime)]
    q_emb = torch.cat([emb for _, (_, emb), _ in jobs[:n_query_chunks]]).float().requires_grad_()  # (B_local, D)
    p_emb = torch.cat([emb for _, (_, emb), _ in jobs[n_query_chunks:]]).float().requires_grad_()  # (N_local, D)

    # 2. the loss on the whole batch and its gradient with respect to the embeddings
    loss = global_loss(encoder, q_emb, p_emb, batch, d)
    scaler.scale(loss * d.world_size).backward()
    grads = list(q_emb.grad.split(chunk_size)) + list(p_emb.grad.split(chunk_size))

    # 3. each chunk again with a graph, from its RNG state, back-propagating its cached gradient;
    # DDP all-reduces once per wrapper, on the last chunk that wrapper runs
    last_use = {id(model): i for i, (model, _, _) in enumerate(jobs)}
    for i, ((model, (inputs, _), rng), grad) in enumerate(zip(jobs, grads)):
        sync = last_use[id(model)] == i or not isinstance(model, DistributedDataParallel)
        with _replay_rng(rng, runtime.device), (contextlib.nullcontext() if sync else model.no_sync()):
            with runtime.autocast():
                emb = encoder.encode_with(model, **inputs)
            (emb.float() * grad).sum().backward()
    return loss.detach()


def _encode_chunks(encoder: BiEncoder, model: nn.Module, inputs: dict, chunk_size: int, runtime: Runtime):
    """Yield ((chunk inputs, embeddings), rng state) for each chunk, encoded without a graph."""
    n = inputs["input_ids"].shape[0]
    for start in range(0, n, chunk_size):
        chunk = {k: v[start : start + chunk_size] for k, v in inputs.items()}
        state = _rng_state(runtime.device)
        with torch.no_grad(), runtime.autocast():
            emb = encoder.encode_with(model, **chunk)
        yield (chunk, emb), state


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextlib.contextmanager
def _replay_rng(state, device: torch.device):
    """Run a block from a saved RNG state; the RNG continues afterwards as if it had not run."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield
