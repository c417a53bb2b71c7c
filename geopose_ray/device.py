"""Running on a device, what training, validation and inference share: a batch moved onto it,
and the autocast that a precision name (`train.precision`: auto | bf16 | fp16 | fp32) means
there. One helper: `train_loop` and `predict` had one each, and they disagreed on fp16 on a CPU;
both now do what training always did."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def autocast_dtype(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype, None = fp32; whether a GradScaler is needed) for a precision name.

    "auto" is bf16 on a GPU and fp32 on a CPU, where autocast gives no reliable speed-up. fp16
    needs loss scaling, which only CUDA supports; on a CPU it falls back to bf16 autocast.
    """
    cuda = device.type == "cuda"
    table = {
        "auto": (torch.bfloat16 if cuda else None, False),
        "bf16": (torch.bfloat16, False),
        "fp16": (torch.float16 if cuda else torch.bfloat16, cuda),
        "fp32": (None, False),
    }
    if precision not in table:
        raise ValueError(f"unknown precision {precision!r}; known: {PRECISIONS}")
    return table[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device` (autocast off for fp32)."""
    dtype, _ = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def channels_last(flag: bool | None, device: torch.device) -> bool:
    """Whether to run in NHWC: as asked, or (None) on CUDA only, where cuDNN's NHWC convolutions
    are what bf16 needs to pay (2x on an H200) and a CPU gains nothing."""
    return device.type == "cuda" if flag is None else bool(flag)


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """A loader's batch with its tensors on `device` (copies that may overlap compute); the image
    in channels_last memory format when asked."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out
