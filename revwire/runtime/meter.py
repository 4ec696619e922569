"""Memory meters: what autograd stores (exact, any device) and peak CUDA memory."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr()), storage.nbytes()


def saved_tensor_bytes(fn: Callable, *args, exclude: Iterable[torch.Tensor] = (), **kwargs) -> Tuple[object, int]:
    """Run `fn(*args, **kwargs)` and count the bytes of tensors autograd saves for backward.

    Each storage is counted once (views and re-saves of one tensor cost nothing more).
    Tensors in `exclude` (typically the model's parameters and buffers, which exist
    anyway) are not counted. Returns `(result, bytes)`; keep the result alive if you
    want to call backward on it.
    """
    excluded = {_storage_key(t)[0] for t in exclude}
    seen = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in excluded:
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn(*args, **kwargs)
    return result, sum(seen.values())


def model_saved_bytes(model: torch.nn.Module, *inputs, loss_fn: Optional[Callable] = None) -> int:
    """Bytes autograd saves during one training forward of `model` (parameters excluded).

    With `loss_fn`, the forward is `loss_fn(model(*inputs))`, so what the loss saves counts too.
    """
    exclude = list(model.parameters()) + list(model.buffers())

    def step(*args):
        out = model(*args)
        return loss_fn(out) if loss_fn is not None else out

    _, nbytes = saved_tensor_bytes(step, *inputs, exclude=exclude)
    return nbytes


def cuda_peak_bytes(fn: Callable, *args, device=None, **kwargs) -> Tuple[object, int]:
    """Run `fn` and return `(result, peak allocated CUDA bytes during the call)`."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_peak_bytes needs a CUDA device")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn(*args, **kwargs)
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device)


def cuda_step_peak(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Peak CUDA memory of one full training step of `model` on `x` (forward, backward,
    SGD step with momentum), after one warm-up step so the optimizer state exists.
    Returns `{"peak": bytes, "before_step": bytes allocated when the step starts}`."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = sum(t.float().mean() for t in tree_leaves(out)
                   if isinstance(t, torch.Tensor) and t.is_floating_point())
        loss.backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    _, peak = cuda_peak_bytes(step)
    opt.zero_grad(set_to_none=True)
    return {"peak": int(peak), "before_step": int(before)}
