"""Memory and step time of one training step, per backbone engine, side by side.

    python examples/tal/bench.py --config thumos14 --frames 512 --size 224      # on a GPU
    python examples/tal/bench.py --frames 64 --size 32                          # tiny preset, CPU

A step is forward, loss, backward and the optimiser step, on random clips (memory and time
do not depend on the pixels) with a few target actions. On CUDA it reports the peak
step time over `--steps` steps after warm-up, measured with CUDA events, under bf16 autocast
as in training. Everywhere it reports the step peak of live tensor storage
(`revwire.step_peak`, exact on a CPU, docs/design.md §7) and the part of it above what is
alive when the step starts (parameters, AdamW state, the batch): the activation peak.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from typing import Optional, Sequence

import torch

import revwire
from configs import ENGINES, PRESETS, get_config
from model import build_model


def one_engine(cfg, engine: str, frames: int, size: int, batch: int, steps: int, device: torch.device,
               amp: bool) -> dict:
    torch.manual_seed(0)
    example = torch.zeros(1, 3, frames, size, size, device=device)
    model = build_model(cfg.model, num_classes=20, example=example, engine=engine).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randn(batch, 3, frames, size, size, device=device)
    valid = torch.full((batch,), frames, device=device)
    segs = [torch.tensor([[frames * 0.1, frames * 0.3], [frames * 0.5, frames * 0.55]])] * batch
    labels = [torch.tensor([1, 7])] * batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp and device.type == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            out = model(x, valid)
            loss = model.loss(out, segs, labels)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # exact bytes autograd keeps for backward (parameters and buffers excluded)
    exclude = list(model.parameters()) + list(model.buffers())

    def forward_loss():
        with autocast:
            return model.loss(model(x, valid), segs, labels)["loss"]

    loss, saved = revwire.saved_tensor_bytes(forward_loss, exclude=exclude)
    del loss
    for _ in range(2):   # warm-up (allocator, kernels, optimizer state)
        step()
    metered = revwire.step_peak(step)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return {"engine": engine, "frames": frames, "size": size, "batch": batch, "device": str(device),
            "saved_bytes": saved, "peak_bytes": metered.peak, "act_peak_bytes": metered.above_baseline,
            "step_s": statistics.median(times)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Per-engine memory and step time of a training step.")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--frames", type=int, help="frames per window (default: the preset's)")
    p.add_argument("--size", type=int, help="crop size (default: the preset's)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--engines", nargs="+", default=["reversible", "autograd", "checkpoint"], choices=ENGINES)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="float32 instead of bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON line per engine")
    args = p.parse_args(argv)
    cfg = get_config(args.config)
    frames, size = args.frames or cfg.data.window, args.size or cfg.data.crop
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    for engine in args.engines:
        try:
            row = one_engine(cfg, engine, frames, size, args.batch, args.steps, device, not args.no_amp)
        except torch.OutOfMemoryError:
            row = {"engine": engine, "frames": frames, "size": size, "batch": args.batch, "device": str(device),
                   "saved_bytes": None, "peak_bytes": None, "act_peak_bytes": None, "step_s": None,
                   "error": "out of memory"}
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{args.config}: {frames} frames at {size}², batch {args.batch}, {device}")
        print("| engine | saved by the forward (MiB) | step peak (MiB) | activation peak (MiB) | step (s) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"
            step = "-" if r["step_s"] is None else f"{r['step_s']:.3f}"
            print(f"| {r['engine']} | {mib(r['saved_bytes'])} | {mib(r['peak_bytes'])} | "
                  f"{mib(r['act_peak_bytes'])} | {step} |"
                  + (f" {r['error']}" if "error" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
