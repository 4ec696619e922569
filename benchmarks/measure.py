"""Measurements of one training step (forward, loss, backward, AdamW step).

- `step_times_ms`: CUDA events on CUDA (>= 3 warm-up steps, then the median of >= 10),
  `time.perf_counter` on CPU.
- `step_memory`: the step peak of one steady-state step, measured by `revwire.train_step_peak`
  (live tensor storage, any device; NOTE [ The metered training step ] in
  revwire/runtime/meter.py): the peak, the activation peak (the peak minus parameters,
  gradients, AdamW state, buffers and batch), where the peak is and what is alive there;
  on CUDA also the allocator's `max_memory_allocated` over the same step.
- `max_fit`: the largest size (batch or frames) for which a step runs, found by doubling
  and then bisection, with out-of-memory caught and memory released between tries.
"""
from __future__ import annotations

import gc
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import revwire


def autocast_dtype(dtype: str) -> Optional[torch.dtype]:
    """"float32" -> None (autocast off), "bfloat16"/"bf16" -> torch.bfloat16 (autocast on)."""
    if dtype in ("float32", "fp32"):
        return None
    if dtype in ("bfloat16", "bf16"):
        return torch.bfloat16
    raise ValueError(f"unknown dtype {dtype!r}: use float32 or bfloat16")


def loss_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
            amp: Optional[torch.dtype]) -> torch.Tensor:
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = model(x)
    return F.cross_entropy(out.float(), target)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # A small learning rate: the steps only exist to be timed, the weights barely move.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               target: torch.Tensor, amp: Optional[torch.dtype]) -> torch.Tensor:
    loss = loss_of(model, x, target, amp)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def step_times_ms(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Run `step` `warmup` times, then time `repeats` runs; returns per-step milliseconds."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def step_memory(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
                amp: Optional[torch.dtype], top: int = 6) -> Dict[str, object]:
    """The meter's record of one steady-state training step (after one warm-up step with
    `opt`, which allocates the gradients): keys of a benchmark record."""
    r = revwire.train_step_peak(model, x, target, loss_fn=lambda out, t: F.cross_entropy(out.float(), t),
                                optimizer=opt, autocast_dtype=amp, warmup=1)
    out: Dict[str, object] = {
        "step_peak_bytes": r.peak, "act_peak_bytes": r.above_baseline, "base_mem_bytes": r.baseline,
        "base_by_kind": {k: v for k, v in r.baseline_by_kind.items() if v},
        "phase_act_peaks": {k: v - r.baseline for k, v in r.phase_peaks.items() if k != "run"},
        "fwbw_act_peak_bytes": max(r.phase_peaks.get(k, r.baseline) for k in ("forward", "backward")) - r.baseline,
        "peak_at": f"{r.peak_phase}:{r.peak_op}", "peak_module": r.peak_module,
        "at_peak": [row.to_dict() for row in r.breakdown if row.phase != "baseline"][:top],
        "at_peak_by_op": [row.to_dict() for row in r.by_op() if row.phase != "baseline"][:top]}
    if r.cuda is not None:
        out["cuda_peak_bytes"] = r.cuda["max_allocated"]
        out["cuda_base_bytes"] = r.cuda["allocated_at_start"]
    return out


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def max_fit(fits: Callable[[int], bool], start: int, limit: int, granularity: int = 1,
            progress: Optional[Callable[[int, bool], None]] = None) -> Tuple[int, bool]:
    """Largest n <= limit, a multiple of `granularity`, with fits(n), assuming fits is monotone
    (true up to some n, false after). Doubles from `start` until a failure, then bisects.
    Returns (n, capped): n = 0 when even `granularity` does not fit; capped = True when
    `limit` itself fits (the true maximum may be larger)."""
    if granularity < 1 or start < granularity or limit < start:
        raise ValueError(f"need 1 <= granularity <= start <= limit, got {granularity}, {start}, {limit}")
    start = start // granularity * granularity

    def check(n: int) -> bool:
        ok = bool(fits(n))
        if progress is not None:
            progress(n, ok)
        return ok

    lo, hi = 0, None  # lo: largest known fit (0: none); hi: smallest known failure
    n = start
    while True:
        if check(n):
            lo = n
            if n >= limit:
                return lo, True
            n = min(2 * n, limit // granularity * granularity)
            if n <= lo:
                return lo, True
        else:
            hi = n
            break
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            mid = lo + granularity
        if check(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def fits_once(model: nn.Module, make_input: Callable[[int], Tuple[torch.Tensor, torch.Tensor]],
              amp: Optional[torch.dtype], device: torch.device, steps: int = 2) -> Callable[[int], bool]:
    """A `fits(n)` predicate: `steps` training steps at size n (fresh AdamW, so the second
    step runs with the optimizer state allocated) without running out of memory. Memory is
    released after each try, whether it fit or not."""

    def fits(n: int) -> bool:
        ok = False
        try:
            x, target = make_input(n)
            opt = make_optimizer(model)
            for _ in range(steps):
                train_step(model, opt, x, target, amp)
            sync(device)
            ok = True
        except Exception as e:  # noqa: BLE001 - anything but OOM is re-raised
            if not is_oom(e):
                raise
        finally:
            x = target = opt = None  # noqa: F841 - drop references before releasing
            model.zero_grad(set_to_none=True)
        release(device)
        return ok

    return fits
