"""torch.distributed for the trainer: who we are, gathering embeddings, and agreeing to stop.

``torchrun --nproc-per-node N -m trainer ...`` (or ``dpr train`` under torchrun) starts N processes
with RANK / LOCAL_RANK / WORLD_SIZE in the environment; :func:`setup` joins them into one group
(NCCL on CUDA, gloo on CPU). Without torchrun everything here is a no-op for a world of one.

Every rank calls the same collectives in the same order on every step (the gather of the step's
embeddings, then the stop flag); the tensors may differ in length between ranks, so they are
padded to the longest first, and nothing can wait forever on a rank that sent less.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun: ``rank``, ``local_rank`` (its GPU) and ``world_size`` (1 without torchrun)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """The one rank that writes checkpoints, logs and progress."""
        return self.rank == 0


def from_env() -> Dist:
    """Read torchrun's environment (a world of one without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world_size)


def setup(d: Dist, device: torch.device) -> None:
    """Join the process group; the timeout covers rank 0 evaluating while the others wait."""
    if d.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2),
                                device_id=device if device.type == "cuda" else None)


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_rows(local: torch.Tensor, d: Dist, keep_grad: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's ``local`` (n_r, ...) along dim 0, in rank order.

    The result is the same on every rank. With ``keep_grad`` this rank's slice is ``local`` itself,
    so gradients flow back into this rank's encoder; the other slices are constants. Returns the
    tensor and the row count of each rank.
    """
    if not d.enabled:
        return local, [local.shape[0]]
    sizes = torch.zeros(d.world_size, dtype=torch.long, device=local.device)
    dist.all_gather_into_tensor(sizes, torch.tensor([local.shape[0]], device=local.device))
    sizes = sizes.tolist()
    longest = max(sizes)
    padded = local.detach().new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in range(d.world_size)]
    dist.all_gather(parts, padded.contiguous())
    parts = [p[:n] for p, n in zip(parts, sizes)]
    if keep_grad:
        parts[d.rank] = local
    return torch.cat(parts), sizes


def gather_padded(local: torch.Tensor, d: Dist, fill: int) -> torch.Tensor:
    """Concatenate (n, k_r) integer tensors along dim 0 after padding dim 1 to the widest with ``fill``."""
    if not d.enabled:
        return local
    widths = torch.zeros(d.world_size, dtype=torch.long, device=local.device)
    dist.all_gather_into_tensor(widths, torch.tensor([local.shape[1]], device=local.device))
    wide = int(widths.max())
    padded = torch.full((local.shape[0], wide), fill, dtype=local.dtype, device=local.device)
    padded[:, : local.shape[1]] = local
    return gather_rows(padded, d, keep_grad=False)[0]


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop after the same step)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(d: Dist) -> None:
    """Wait until every rank gets here (a no-op for a world of one)."""
    if d.enabled:
        dist.barrier()
