"""GPU figures: D4 inference seconds per model-view at 2048 px, training img/s and MFU, and peak
memory, in one command for a GPU box with torch, timm and smp but no Ray (it imports no Ray; the
H200s lent here lack smp: carry its wheel, docs/BENCHMARKS.md "Accelerator rows").

    python bench/gpu.py [--compile] [--batch 32] [--peak-tflops 790] [--peak-tflops-fp32 T]
    python bench/gpu.py --device cpu --tiny      # the same code paths on CPU, < 1 min

One JSON line per figure on stdout (logs on stderr): {"figure", "model", "device", "torch",
"value", "unit", ...details}; on CUDA every line also names the GPU (`device_name`).

- `inference_fp32_loop` / `inference_default`: seconds per model-view (a D4 tile / 8) through
  `predict.predict_tile`: one fp32 forward per view vs the project's default path (8 views in one
  batch, `precision="auto"` = bf16 on GPU, channels_last; `--compile` adds torch.compile).
  `x_flop_bound` = measured / (matmul+conv FLOPs of one view, FlopCounterMode) / peak; mfu = 1/x.
- `inference_memory`: torch.cuda.max_memory_allocated of one default-path 2048 px D4 prediction,
  weights included (null on CPU).
- `train_fp32` / `train_bf16` / `train_bf16_cl`: img/s of Unet-resnet34 on 512 px synthetic crops
  through `train_loop.train_one_epoch`; `mfu` = FLOPs per step (forward + backward) x steps/s / peak.
  The training core imports the data stack (rasterio, albumentations): without it these lines
  carry `error` and the exit code is 1; the inference lines need only torch, timm and smp.

Peaks, TFLOPS: bf16 790, what an 8192^3 bf16 matmul reached on the H200s lent to this project
(769-798; the H100 SXM / H200 datasheet says 989 dense), so mfu is against an achievable ceiling.
"fp32" (datasheet, dense): 494 = TF32 tensor cores, which cuDNN uses for fp32 convolutions while
`torch.backends.cudnn.allow_tf32` is on (torch's default), else 67 = plain FP32. Pass your GPU's.
On CPU no peak is assumed (ratios null) unless given. Full mode is sized for 8 min on one
H100/H200 without `--compile` (compiling the big encoders can add minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `geopose_ray` importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import segmentation_models_pytorch as smp
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from geopose_ray.config import ModelConfig
from geopose_ray.models import build_model
from geopose_ray.predict import predict_tile

FULL_ENCODERS = ("resnet34", "tu-efficientnet_b7", "tu-tf_efficientnetv2_l")
TINY_ENCODERS = ("resnet18", "tu-resnet10t", "tu-efficientnet_b0")
TRAIN_VARIANTS = (("fp32", False), ("bf16", False), ("bf16", True))  # (precision, channels_last)
PEAK_BF16 = 790.0  # TFLOPS, bf16 matmul measured on this project's H200s (datasheet 989)
PEAK_TF32, PEAK_FP32 = 494.0, 67.0  # TFLOPS, H100 SXM / H200 datasheet, dense
VIEWS = 8  # D4


def log(msg: str) -> None:
    print(f"[gpu.py] {msg}", file=sys.stderr, flush=True)


def sig(x: Any, digits: int = 4) -> Any:
    """Floats to `digits` significant digits, so the JSON stays readable."""
    if isinstance(x, float) and math.isfinite(x) and x != 0.0:
        return round(x, digits - 1 - math.floor(math.log10(abs(x))))
    return x


def emit(
    base: dict[str, Any], figure: str, model: str, value: float | None, unit: str, **details: Any
) -> dict:
    """Print one figure as a JSON line and return it."""
    record = {"figure": figure, "model": model, **base, "value": value, "unit": unit, **details}
    record = {k: sig(v) for k, v in record.items()}
    print(json.dumps(record), flush=True)
    return record


def base_record(device: torch.device) -> dict[str, Any]:
    """What every line repeats: where and with which versions it was measured."""
    out: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "smp": smp.__version__,
    }
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
    else:
        out["threads"] = torch.get_num_threads()
    return out


def peaks(args: argparse.Namespace, device: torch.device) -> dict[str, float | None]:
    """TFLOPS peaks per precision: the flags, else the H100/H200 defaults on CUDA, none on CPU."""
    cuda = device.type == "cuda"
    fp32_default = PEAK_TF32 if torch.backends.cudnn.allow_tf32 else PEAK_FP32
    bf16 = args.peak_tflops if args.peak_tflops is not None else (PEAK_BF16 if cuda else None)
    fp32 = args.peak_tflops_fp32 if args.peak_tflops_fp32 is not None else (fp32_default if cuda else None)
    return {"bf16": bf16, "fp32": fp32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset_peak; None off CUDA (no allocator stats)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bound(flops: float, seconds: float, peak_tflops: float | None) -> dict[str, float | None]:
    """How far a measured time is from the FLOP bound: x_flop_bound = measured / bound, mfu = 1/x."""
    if peak_tflops is None or seconds <= 0:
        return {"peak_tflops": peak_tflops, "bound_s": None, "x_flop_bound": None, "mfu": None}
    b = flops / (peak_tflops * 1e12)
    return {"peak_tflops": peak_tflops, "bound_s": b, "x_flop_bound": seconds / b, "mfu": b / seconds}


# --- inference ----------------------------------------------------------------------------------
def build(encoder: str, device: torch.device) -> torch.nn.Module:
    """A randomly initialised Unet (encoder_weights None: no download) in eval mode."""
    torch.manual_seed(0)
    return build_model(ModelConfig(arch="Unet", encoder=encoder, encoder_weights=None)).to(device).eval()


@torch.inference_mode()
def view_flops(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Matmul/conv FLOPs of one (1, 3, size, size) view (FlopCounterMode counts no elementwise ops)."""
    x = torch.rand(1, 3, size, size, device=device)
    gsd, city = torch.full((1,), 0.5, device=device), torch.zeros(1, dtype=torch.int64, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, gsd, city)
    return float(counter.get_total_flops())


def time_predict(
    model: torch.nn.Module, tile: np.ndarray, device: torch.device, precision: str, loop: bool, repeats: int
) -> tuple[dict[str, Any], Any]:
    """({s_per_tile: median of `repeats` D4 `predict_tile` calls, warmup_s: the untimed first call
    (kernels, autotuning, compilation), peak_mem_gib: of the timed calls}, the last prediction)."""

    def once() -> tuple[float, Any]:
        sync(device)
        t0 = time.perf_counter()
        pred = predict_tile(
            model, tile, 0.5, 0, tta="d4", device=device, precision=precision, per_view_loop=loop
        )
        sync(device)
        return time.perf_counter() - t0, pred[0]

    warmup_s, _ = once()
    reset_peak(device)
    runs = [once() for _ in range(repeats)]
    stats = {"s_per_tile": float(np.median([s for s, _ in runs])), "warmup_s": warmup_s}
    return {**stats, "peak_mem_gib": peak_gib(device)}, runs[-1][1]


def inference_figures(
    encoder: str, args: argparse.Namespace, device: torch.device, base: dict, pk: dict
) -> list[dict]:
    """fp32 per-view loop vs the default path for one encoder, and the default path's memory."""
    size, name = args.tile, f"Unet-{encoder}"
    log(f"inference {encoder} at {size} px on {device}")
    model = build(encoder, device)
    flops = view_flops(model, size, device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    tile = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    loop, loop_pred = time_predict(model, tile, device, "fp32", True, args.repeats)
    model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile()
    fast, fast_pred = time_predict(model, tile, device, "auto", False, args.repeats)
    del model
    free(device)
    fast_precision = "bf16" if device.type == "cuda" else "fp32"  # what predict's "auto" resolves to
    s_loop, s_fast = loop["s_per_tile"] / VIEWS, fast["s_per_tile"] / VIEWS
    common = {"tile_px": size, "views": VIEWS, "gflops_per_view": flops / 1e9, "repeats": args.repeats}
    loop.update(precision="fp32", batched=False, channels_last=False, compile=False)
    loop.update(bound(flops, s_loop, pk["fp32"]))
    mode = {"precision": fast_precision, "batched": True, "channels_last": True, "compile": args.compile}
    fast.update(mode, speedup_vs_fp32_loop=s_loop / s_fast, **bound(flops, s_fast, pk[fast_precision]))
    diff = float(np.abs(loop_pred.agl - fast_pred.agl).max())  # AGL m, random weights
    # Random weights can put a deep encoder's output at 1e10 m, where bf16's 3 significant digits
    # leave absolute gaps of 1e8: the relative figure is the one comparable across models.
    fast.update(max_abs_diff_m=diff, max_rel_diff=diff / max(float(np.abs(loop_pred.agl).max()), 1e-12))
    memory = {"tile_px": size, "views": VIEWS, **mode, "params_m": params_m}
    memory.update(fp32_loop_gib=loop["peak_mem_gib"], note=None if device.type == "cuda" else "no CUDA")
    return [
        emit(base, "inference_fp32_loop", name, s_loop, "s/view", **common, **loop),
        emit(base, "inference_default", name, s_fast, "s/view", **common, **fast),
        emit(base, "inference_memory", name, fast["peak_mem_gib"], "GiB", **memory),
    ]


# --- training -----------------------------------------------------------------------------------
def make_batches(n: int, batch: int, size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """n training batches shaped like GeoposeDataset's collated items, already on the device (the
    figure is compute, not host-to-device copies); 2 distinct ones, repeated."""
    g = torch.Generator().manual_seed(0)
    distinct = []
    for _ in range(min(n, 2)):
        agl = torch.rand(batch, 1, size, size, generator=g) * 30.0  # (B, 1, H, W) m
        agl[torch.rand(agl.shape, generator=g) < 0.01] = math.nan  # 1 % without data
        scale = 0.5 + torch.rand(batch, generator=g)  # (B,) px/m
        angle = torch.rand(batch, generator=g) * 2 * math.pi
        b = {
            "image": torch.rand(batch, 3, size, size, generator=g),  # (B, 3, H, W) [0, 1]
            "agl": agl,
            "mag": agl * scale.view(-1, 1, 1, 1),  # (B, 1, H, W) px
            "scale": scale,
            "direction": torch.stack([angle.sin(), angle.cos()], dim=1),  # (B, 2) (sin, cos)
            "gsd": torch.full((batch,), 0.5),  # (B,) m/px
            "city": torch.randint(0, 4, (batch,), generator=g),  # (B,) int64
        }
        distinct.append({k: v.to(device) for k, v in b.items()})
    return [distinct[i % len(distinct)] for i in range(n)]


def trainer(
    encoder: str, precision: str, channels_last: bool, device: torch.device
) -> tuple[Any, Any, Callable]:
    """(model, criterion, epoch) where epoch(batches) runs the training core's `train_one_epoch`
    (autocast, GradScaler for fp16, clipping) with the optimizer the project builds: the CPU
    precision bench's trainer, imported here because it needs the data stack (rasterio)."""
    from bench.precision import trainer as core_trainer

    return core_trainer(precision, channels_last, device, encoder)


def step_flops(model: torch.nn.Module, criterion: Any, batch: dict[str, torch.Tensor]) -> float:
    """Matmul/conv FLOPs of one training step, forward + loss + backward (fp32 count; the
    count does not depend on the autocast dtype)."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        loss, _ = criterion(model(batch["image"], batch["gsd"], batch["city"]), batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def train_rate(epoch: Callable, batches: list[dict], device: torch.device, rounds: int) -> dict[str, Any]:
    """Best img/s over `rounds` epochs (wall clock around the synchronised epoch) after a
    one-batch warm-up, the last loss and the peak memory of the timed epochs."""
    epoch(batches[:1])
    reset_peak(device)
    best, loss = 0.0, math.nan
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        m = epoch(batches)
        sync(device)
        imgs = sum(b["image"].shape[0] for b in batches)
        best, loss = max(best, imgs / (time.perf_counter() - t0)), m["train_loss"]
    return {"imgs_per_s": best, "train_loss": loss, "peak_gib": peak_gib(device)}


def training_core_error() -> str | None:
    """Why the training core cannot be imported (it pulls the data stack: rasterio,
    albumentations, pandas, which a bare GPU box may lack), or None."""
    try:
        import geopose_ray.train_loop  # noqa: F401
    except ImportError as e:
        return f"cannot import the training core ({e}): pip install the project's data dependencies"
    return None


def train_variant(
    args: argparse.Namespace, precision: str, cl: bool, batches: list[dict], device: torch.device
) -> dict[str, Any]:
    """One variant's rate (train_rate) and FLOPs per step, on a fresh model freed afterwards."""
    model, criterion, epoch = trainer(args.train_encoder, precision, cl, device)
    flops = step_flops(model, criterion, batches[0])
    return {**train_rate(epoch, batches, device, args.rounds), "flops": flops}


def train_figures(args: argparse.Namespace, device: torch.device, base: dict, pk: dict) -> list[dict]:
    """img/s and MFU of each (precision, channels_last) variant, one model at a time."""
    name, error = f"Unet-{args.train_encoder}", training_core_error()
    batches = make_batches(args.steps, args.batch, args.crop, device) if error is None else []
    out = []
    for precision, cl in TRAIN_VARIANTS:
        figure = f"train_{precision}{'_cl' if cl else ''}"
        details = {"crop_px": args.crop, "batch": args.batch, "steps": args.steps, "rounds": args.rounds}
        details.update(precision=precision, channels_last=cl)
        r = None
        if error is None:
            log(f"{figure} {name} {args.crop} px batch {args.batch} on {device}")
            try:
                r = train_variant(args, precision, cl, batches, device)
            except torch.cuda.OutOfMemoryError:
                details["error"] = f"out of memory at batch {args.batch}: pass a smaller --batch"
            free(device)  # after the except block, which keeps the failed frame's tensors alive
        else:
            details["error"] = error
        if r is None:
            out.append(emit(base, figure, name, None, "img/s", **details))
            continue
        steps_s, flops = r["imgs_per_s"] / args.batch, r["flops"]
        details.update(steps_per_s=steps_s, gflops_per_step=flops / 1e9, train_loss=r["train_loss"])
        details.update(peak_mem_gib=r["peak_gib"], **bound(flops, 1.0 / steps_s, pk[precision]))
        out.append(emit(base, figure, name, r["imgs_per_s"], "img/s", **details))
    return out


# --- command line -------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--tiny", action="store_true", help="128 px tiles, 64 px crops, tiny encoders: < 1 min on CPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the default inference path")
    p.add_argument("--batch", type=int, help="training batch (default 32; 2 with --tiny)")
    p.add_argument(
        "--encoders", help="comma-separated inference encoders (default: " + ",".join(FULL_ENCODERS) + ")"
    )
    p.add_argument("--peak-tflops", type=float, help=f"bf16 peak (default {PEAK_BF16} on CUDA, none on CPU)")
    p.add_argument(
        "--peak-tflops-fp32",
        type=float,
        help=f"fp32 peak (default on CUDA {PEAK_TF32} with TF32 on, else {PEAK_FP32})",
    )
    p.add_argument("--skip-train", action="store_true", help="inference and memory figures only")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; 1 with --tiny on CPU: 2 threads thrash on a shared box)",
    )
    args = p.parse_args(argv)
    args.tile, args.crop = (128, 64) if args.tiny else (2048, 512)
    args.repeats, args.steps, args.rounds = (1, 2, 1) if args.tiny else (2, 10, 2)
    args.batch = args.batch or (2 if args.tiny else 32)
    default = TINY_ENCODERS if args.tiny else FULL_ENCODERS
    args.encoders = tuple(args.encoders.split(",")) if args.encoders else default
    args.train_encoder = default[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if args.tiny and device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    base, pk = base_record(device), peaks(args, device)
    t0 = time.perf_counter()
    records = [r for enc in args.encoders for r in inference_figures(enc, args, device, base, pk)]
    if not args.skip_train:
        records += train_figures(args, device, base, pk)
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
