"""Device and precision, chosen once at the edge of a program and passed down.

CUDA: bf16 autocast by default (fp16 with a gradient scaler on request). CPU: fp32, always; on
these CPUs bf16 matmuls are hundreds of times slower than fp32.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: PRECISIONS (a command line's parsing) costs no torch
    import torch

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Runtime:
    """The device and precision chosen once for a run: autocast context and gradient scaler come from here."""
    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (bf16 or fp16), or None for fp32."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self):
        """The context every forward pass runs in: autocast on CUDA in bf16/fp16, nothing otherwise."""
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only for fp16 (bf16 and fp32 need none)."""
        import torch

        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")


def pick_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve ``device`` ("auto", "cpu", "cuda", "cuda:1") and ``precision`` once; logs the choice."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    if dev.type == "cuda" and dev.index is None:  # torch.cuda.set_device and NCCL need the index
        dev = torch.device("cuda", torch.cuda.current_device())
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dev.type == "cpu" and precision != "fp32":
        raise ValueError(f"precision {precision} is for CUDA; on CPU use fp32 (bf16 there is far slower)")
    log.info("device %s, precision %s", dev, precision)
    return Runtime(dev, precision)
