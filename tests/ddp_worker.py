"""Gradients of one training step, run by test_scale.py: under torchrun on each rank's slice (DDP,
gloo), or in one process on the whole batch. Not a test module itself.

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py MODEL_DIR DATA.jsonl OUT_DIR

and of one query-side step (``dpr train --index``; test_query_side_compat.py), for each --index-loss:

    torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py query-side CHECKPOINT INDEX BEIR_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from dpr_service.core.checkpoint import load_base_model
from dpr_service.core.config import EncoderConfig
from dpr_service.core.device import Runtime
from dpr_service.core.formats import read_train_data
from trainer import distributed
from dpr_service.core.batches import collate
from trainer.step import forward_backward, prepare_models

BATCH = 8  # questions in the global batch
CHUNKS = (None, 3)  # uncached, and cached with chunks that do not divide the batch


def batch_for(data_path: str, tokenizer, rank: int = 0, world: int = 1):
    """This rank's contiguous slice of an 8-question batch. The questions have 0 to 2 hard
    negatives, and question 5's hard negatives are questions 1 and 2's positives (duplicates of a
    passage that sits on another rank), so the two ranks hold 7 and 8 passages. Question 6 also
    knows question 3's positive as one of its own: a cross-rank known positive, and rows of
    known ids of different widths on the two ranks (1 and 2)."""
    data = read_train_data(data_path)
    examples = data.examples[:BATCH]
    negatives = [list(ex.hard_negatives)[: i % 3] for i, ex in enumerate(examples)]
    negatives[5] = [examples[1].positive, examples[2].positive]
    examples[6] = replace(examples[6], known_positive_ids=examples[6].known_positive_ids | {examples[3].positive.id})
    per = BATCH // world
    mine = slice(rank * per, (rank + 1) * per)
    return collate(examples[mine], negatives[mine], tokenizer)


def step_grads(model_dir: str, data_path: str, d: distributed.Dist, chunk_size: int | None,
               shared: bool = False) -> dict[str, torch.Tensor]:
    cpu = Runtime(torch.device("cpu"), "fp32")
    encoder, tokenizer = load_base_model(model_dir, EncoderConfig(pooling="mean", query_max_length=16,
                                                                  passage_max_length=32, shared=shared))
    encoder.eval()  # no dropout: ranks and the single process must compute the same function
    models = prepare_models(encoder, d, cpu.device)
    scaler = cpu.grad_scaler()
    loss = forward_backward(encoder, models, batch_for(data_path, tokenizer, d.rank, d.world_size), cpu, d, scaler, chunk_size)
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    grads["loss"] = loss.reshape(1)
    return grads


QUERY_SIDE_BATCH = 8  # questions in the global batch of a query-side step
QUERY_SIDE_LOSSES = ("topk", "corpus")
QUERY_SIDE_LORA = (None, 4)  # the whole query encoder, or LoRA adapters of rank 4 on it


def query_side_grads(checkpoint: str, index: str, data_path: str, d: distributed.Dist, mode: str,
                     k: int = 3, ratio: float | None = 0.95, lora_r: int | None = None) -> dict[str, torch.Tensor]:
    """The query encoder's gradients (and the loss) of the first query-side step of an epoch-0
    batch of :data:`QUERY_SIDE_BATCH` questions, this rank's slice of it (the trainer's own
    QueryBatches), against ``index``'s stored vectors; eval mode (no dropout). ``lora_r``: LoRA
    adapters of that rank (seeded, ``B`` random so that every adapter tensor gets a gradient) on
    what trains (the query encoder; the frozen passage encoder gets none)."""
    from dpr_service.core.checkpoint import load_checkpoint
    from dpr_service.core.formats import read_train_data
    from trainer import query_side

    cpu = Runtime(torch.device("cpu"), "fp32")
    corpus = query_side.load_indexed_corpus(index)
    encoder, tokenizer = query_side.start_encoder(checkpoint, load_checkpoint(checkpoint).config, corpus)
    if lora_r is not None:
        from dpr_service.core import lora

        torch.manual_seed(0)
        encoder = lora.add_adapters(encoder, lora.LoraSettings(lora_r, 2.0 * lora_r, 0.0, lora.default_targets(encoder.query_model)))
        with torch.no_grad():
            for name, p in encoder.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
    encoder.eval()
    models = prepare_models(encoder, d, cpu.device)
    data = read_train_data(data_path)
    batch = query_side.QueryBatches(data.examples, corpus.row_of, tokenizer, QUERY_SIDE_BATCH, seed=5, epoch=0,
                                    rank=d.rank, world_size=d.world_size)[0]
    loss, masked = query_side.forward_backward(encoder, models, batch, corpus, cpu, d, cpu.grad_scaler(), mode, k, ratio)
    grads = {name: p.grad.clone() for name, p in encoder.query_model.named_parameters() if p.grad is not None}
    assert not any(p.grad is not None for p in encoder.passage_model.parameters()), "the passage encoder got gradients"
    grads["loss"], grads["masked"] = loss.reshape(1), torch.tensor([float(masked)])
    return grads


def main_query_side(checkpoint: str, index: str, data_path: str, out_dir: str) -> None:
    d = distributed.from_env()
    distributed.setup(d, torch.device("cpu"))
    for mode in QUERY_SIDE_LOSSES:
        for lora_r in QUERY_SIDE_LORA:
            save_file(query_side_grads(checkpoint, index, data_path, d, mode, lora_r=lora_r),
                      str(Path(out_dir) / f"query-side-{mode}-lora{lora_r}-rank{d.rank}.safetensors"))
    distributed.teardown()


def main(model_dir: str, data_path: str, out_dir: str) -> None:
    d = distributed.from_env()
    distributed.setup(d, torch.device("cpu"))
    for chunk in CHUNKS:
        for shared in (False, True):
            grads = step_grads(model_dir, data_path, d, chunk, shared)
            save_file(grads, str(Path(out_dir) / f"rank{d.rank}-chunk{chunk}-shared{int(shared)}.safetensors"))
    distributed.teardown()


if __name__ == "__main__":
    if sys.argv[1] == "query-side":
        main_query_side(*sys.argv[2:6])
    else:
        main(*sys.argv[1:4])
