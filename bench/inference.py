"""Bench 4, inference: D4 test-time augmentation with the 8 views batched into one forward pass
vs one forward pass per view, the same model and tiles (`predict.predict_tile`, whose
`per_view_loop` switch exists for this comparison).

    python bench/inference.py [--quick] [--device cuda] [--precision auto] [--size 1024]

`ratio` = per-view seconds / batched seconds (goal >= 1.5x on GPU; CPU reported for the record).
The two modes alternate within every repeat, so load drift on a shared machine hits both; both
must give the same prediction (`max_abs_diff_m`, metres of AGL).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench import common
from geopose_ray.config import ModelConfig
from geopose_ray.errors import run_cli

GOAL = (">=", 1.5)  # on GPU


def make_tiles(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n (size, size, 3) uint8 tiles (compute cost does not depend on the content)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def build(encoder: str, device: str) -> torch.nn.Module:
    """A randomly initialised Unet in eval mode (no weight download)."""
    from geopose_ray.models import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(arch="Unet", encoder=encoder, encoder_weights=None)).to(device).eval()


def tta_times(
    model: torch.nn.Module, tiles: list[np.ndarray], repeats: int, device: str, precision: str = "auto"
) -> dict[str, Any]:
    """Median seconds per tile, batched and per-view, after one warm-up round; and how far the
    two predictions are apart."""
    from geopose_ray.predict import predict_tile

    times: dict[bool, list[float]] = {False: [], True: []}
    preds: dict[bool, list[Any]] = {False: [], True: []}

    def one_pass(loop: bool) -> None:
        preds[loop] = [
            predict_tile(model, t, 0.5, 0, tta="d4", device=device, precision=precision, per_view_loop=loop)[
                0
            ]
            for t in tiles
        ]

    for r in range(repeats + 1):
        for loop in (False, True):
            secs = common.timed(lambda loop=loop: one_pass(loop), repeats=1, warmup=0)[0]
            if r > 0:
                times[loop].append(secs / len(tiles))
    diff = max(float(np.abs(a.agl - b.agl).max()) for a, b in zip(preds[False], preds[True]))
    batched, per_view = common.median(times[False]), common.median(times[True])
    return {
        "batched_s_per_tile": batched,
        "per_view_s_per_tile": per_view,
        "ratio": per_view / batched,
        "max_abs_diff_m": diff,
    }


def run(args: Any) -> list[dict[str, Any]]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or (256 if args.quick else 512)
    encoder = args.encoder or ("resnet18" if args.quick else "resnet34")
    n, repeats = (1, 2) if args.quick else (4, 3)
    res = tta_times(build(encoder, device), make_tiles(n, size), repeats, device, args.precision)
    ratio = res.pop("ratio")
    on_gpu = device.startswith("cuda")
    return [
        common.emit(
            f"inference_{'gpu' if on_gpu else 'cpu'}",
            ratio,
            **res,
            device=device,
            encoder=encoder,
            tile_px=size,
            tiles=n,
            repeats=repeats,
            precision=args.precision,
            threads=torch.get_num_threads(),
            goal=">= 1.5x on GPU" if on_gpu else "none on CPU (GPU goal >= 1.5x)",
            goal_met=common.goal_met(ratio, *GOAL) if on_gpu else None,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32")
    p.add_argument("--size", type=int, help="tile size, px (default 256 with --quick, else 512)")
    p.add_argument("--encoder", help="smp encoder (default resnet18 with --quick, else resnet34)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    run_cli(main)
