"""Bench 5, mixed precision: training images per second in fp32, bf16 and fp16 autocast, and
with channels_last, through the training core's own `train_one_epoch` (autocast, GradScaler for
fp16, clipping), on the same in-memory batches and the same initial weights.

    python bench/precision.py [--quick] [--device cuda] [--size 512] [--batch 8]

On an accelerator: fp32, bf16, fp16, and bf16 + channels_last. On CPU only fp32 and bf16 (fp16
autocast falls back to bf16 there, and channels_last has no CPU kernel benefit worth the time).
`ratio` = bf16 img/s / fp32 img/s; every variant is one more JSON line with its own ratio to fp32.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import common
from geopose_ray.config import Config
from geopose_ray.errors import run_cli

GPU_VARIANTS = (("fp32", False), ("bf16", False), ("fp16", False), ("bf16", True))
CPU_VARIANTS = (("fp32", False), ("bf16", False))


def make_batches(n: int, batch: int, size: int, seed: int = 0) -> list[dict[str, Any]]:
    """n training batches shaped like GeoposeDataset's collated items (targets consistent:
    mag = agl * scale; 1 % of the AGL pixels without data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        agl = torch.rand(batch, 1, size, size, generator=g) * 30.0  # (B, 1, H, W) m
        agl[torch.rand(agl.shape, generator=g) < 0.01] = math.nan
        scale = 0.5 + torch.rand(batch, generator=g)  # (B,) px/m
        angle = torch.rand(batch, generator=g) * 2 * math.pi
        out.append(
            {
                "image": torch.rand(batch, 3, size, size, generator=g),  # (B, 3, H, W) [0, 1]
                "agl": agl,
                "mag": agl * scale.view(-1, 1, 1, 1),  # (B, 1, H, W) px
                "scale": scale,
                "direction": torch.stack([angle.sin(), angle.cos()], dim=1),  # (B, 2)
                "gsd": torch.full((batch,), 0.5),  # (B,) m/px
                "city": torch.randint(0, 4, (batch,), generator=g),
            }
        )
    return out


def trainer(
    precision: str, channels_last: bool, device: str | torch.device, encoder: str
) -> tuple[torch.nn.Module, Any, Callable[[list], dict]]:
    """A model from seeded weights with its optimizer and scaler; returns (model, criterion,
    epoch) where `epoch(batches) -> metrics` is one `train_one_epoch` over the given batches.
    Also bench/gpu.py's trainer (it imports no Ray)."""
    from geopose_ray.device import autocast_dtype
    from geopose_ray.losses import build_criterion
    from geopose_ray.models import build_model
    from geopose_ray.optim import build_optimizer
    from geopose_ray.train_loop import train_one_epoch

    dev = torch.device(device)
    cfg = Config.from_dict(
        {
            "precision": precision,
            "channels_last": channels_last,
            "encoder": encoder,
            "encoder_weights": None,
            "arch": "Unet",
            "lr": 1e-4,
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(dev.type, enabled=autocast_dtype(precision, dev)[1])
    criterion = build_criterion(cfg.loss, None)
    return model, criterion, lambda b: train_one_epoch(model, b, criterion, optimizer, None, scaler, dev, cfg)


def train_rates(
    variants: Sequence[tuple[str, bool]],
    batches: list[dict[str, Any]],
    device: str,
    encoder: str,
    rounds: int,
) -> dict[tuple[str, bool], dict[str, float]]:
    """Best img/s of each (precision, channels_last) over `rounds` epochs, the variants taking
    turns within each round (load drift on a shared machine hits all of them), after a
    one-batch warm-up each (allocator, kernels, autotuning); and the last training loss."""
    runners = {v: trainer(*v, device, encoder)[2] for v in variants}
    for epoch in runners.values():
        epoch(batches[:1])
    best: dict[tuple[str, bool], dict[str, float]] = {}
    for _ in range(rounds):
        for v, epoch in runners.items():
            m = epoch(batches)
            rate = max(m["imgs_per_s"], best.get(v, {}).get("imgs_per_s", 0.0))
            best[v] = {"imgs_per_s": rate, "train_loss": m["train_loss"]}
    return best


def run(args: Any) -> list[dict[str, Any]]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    size = args.size or (256 if args.quick or not on_gpu else 512)
    batch = args.batch or (2 if not on_gpu else 8)
    steps, rounds = (2, 4) if args.quick else (6, 4)
    encoder = args.encoder or "resnet34"
    rates = train_rates(
        GPU_VARIANTS if on_gpu else CPU_VARIANTS, make_batches(steps, batch, size), device, encoder, rounds
    )
    base = rates[("fp32", False)]
    where = "gpu" if on_gpu else "cpu"
    records = []
    for (precision, cl), r in rates.items():
        if (precision, cl) == ("fp32", False):
            continue
        name = f"precision_{where}_{precision}{'_cl' if cl else ''}"
        records.append(
            common.emit(
                name,
                r["imgs_per_s"] / base["imgs_per_s"],
                imgs_per_s=r["imgs_per_s"],
                fp32_imgs_per_s=base["imgs_per_s"],
                train_loss=r["train_loss"],
                fp32_train_loss=base["train_loss"],
                device=device,
                encoder=encoder,
                crop_px=size,
                batch=batch,
                steps=steps,
                rounds=rounds,
                threads=torch.get_num_threads(),
                goal="record only (no goal)",
                goal_met=None,
            )
        )
    return records


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--size", type=int, help="crop px (default 256 on CPU / with --quick, else 512)")
    p.add_argument("--batch", type=int, help="batch size (default 2 on CPU, 8 on GPU)")
    p.add_argument("--encoder", help="smp encoder (default resnet34)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
