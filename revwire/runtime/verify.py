"""`verify`: do the reversible and the autograd engine agree on a training step?

The reversible engine's gradients come from reconstructed activations; the autograd
engine runs the same computation storing them, so it is the ground truth. This is the
check `revwire convert --verify` runs before writing a file.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from .stage import set_engine, stages


def snapshot_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of `model`'s buffers (BatchNorm statistics), to give back with `restore_buffers`."""
    return {n: b.detach().clone() for n, b in model.named_buffers()}


def restore_buffers(model: nn.Module, snapshot: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in snapshot:
                b.copy_(snapshot[n])


def _relative_error(a, b) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _engine_step(rev: nn.Module, x, params, seed: int):
    """Outputs and gradients (inputs, then `params`) of one training step, seeded. `x`: the
    forward's one input, a tensor or a list of tensors (`[slow, fast]`)."""
    device = tree_leaves(x)[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        xi = tree_map(lambda t: t.detach().clone().requires_grad_(True), x)
        outs = [t for t in tree_leaves(rev(xi)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
        inputs = tree_leaves(xi)
        grads = torch.autograd.grad(loss, [*inputs, *params], allow_unused=True)
    return [o.detach() for o in outs], grads[:len(inputs)], grads[len(inputs):]


def verify(rev: nn.Module, x, *, seed: int = 0, tolerance: float = 1e-3) -> Dict[str, Any]:
    """Compare the reversible engine with the autograd engine on one training step of
    `rev` on `x` (a tensor, or a list of tensors for a list input such as SlowFast's
    `[slow, fast]`; same RNG seed for both): outputs, the inputs' and every parameter's
    gradient, as relative errors. Buffers (BatchNorm statistics), the engine, the
    train/eval mode and the global RNG are left as they were. Returns a JSON-able dict
    whose `ok` says whether every error is finite and at most `tolerance`."""
    engines_before = [s.engine for s in stages(rev)]
    was_training = rev.training
    snapshot = snapshot_buffers(rev)
    named = [(n, p) for n, p in rev.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    results = {}
    try:
        for engine in ("autograd", "reversible"):
            set_engine(rev, engine)
            restore_buffers(rev, snapshot)
            rev.train()
            results[engine] = _engine_step(rev, x, params, seed)
    finally:
        restore_buffers(rev, snapshot)
        for s, e in zip(stages(rev), engines_before):
            s.engine = e
        rev.train(was_training)

    (ref_out, ref_in, ref_g), (rev_out, rev_in, rev_g) = results["autograd"], results["reversible"]
    out_err = max((_relative_error(a, b) for a, b in zip(rev_out, ref_out)), default=0.0)
    input_err = max(_relative_error(a, b) for a, b in zip(rev_in, ref_in))
    param_errs = [(_relative_error(a, b), n) for n, a, b in zip(names, rev_g, ref_g)]
    worst = max(param_errs, default=(0.0, None))
    finite = all(math.isfinite(e) for e, _ in param_errs) and math.isfinite(input_err)
    max_err = max(out_err, input_err, worst[0])
    return {
        "ok": bool(finite and max_err <= tolerance),
        "tolerance": tolerance,
        "input_shape": tree_map(lambda t: list(t.shape), x),
        "seed": seed,
        "output_rel_error": out_err,
        "input_grad_rel_error": input_err,
        "param_grad_max_rel_error": worst[0],
        "worst_param": worst[1],
        "num_params": len(param_errs),
    }
