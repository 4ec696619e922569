"""Step 2: run the traced graph once on example inputs and record each node's value type.

First with FakeTensors (shapes without arithmetic: a ViT-B costs about a second,
whatever the input size); where a module needs real values (data-dependent code), with
one real eager forward instead (eval mode, no grad, RNG untouched). Arguments are
handed to each node as ordinary lists, because some wrapped helpers (torchvision's
swin3d) mutate their list arguments and fx's immutable lists would refuse.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .errors import InputError

SHAPE = "revwire_shape"  # torch.Size of a tensor-valued node
DTYPE = "revwire_dtype"
VALUE = "revwire_value"  # the value itself for small non-tensor nodes (ints, sizes)


def _mutable(value):
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        items = [_mutable(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    return value


class _Recorder(fx.Interpreter):
    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE] = result.shape
            n.meta[DTYPE] = result.dtype
        elif isinstance(result, (int, float, bool, torch.Size)) or (
            isinstance(result, tuple) and all(isinstance(v, int) for v in result)
        ):
            n.meta[VALUE] = result
        return result


def _propagate_fake(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> bool:
    """Propagate with FakeTensors; False if some node needs real data."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in example_inputs]
            _Recorder(gm).run(*fake)
        return True
    except Exception:  # data-dependent code, an op without a fake kernel, ...
        for n in gm.graph.nodes:
            for key in (SHAPE, DTYPE, VALUE):
                n.meta.pop(key, None)
        return False


def propagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record shapes on `gm.graph`'s nodes; the model's state (BN stats, RNG, mode) is untouched."""
    modes = {m: m.training for m in gm.modules()}
    devices = [example_inputs[0].device] if example_inputs and example_inputs[0].is_cuda else []
    try:
        gm.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if not _propagate_fake(gm, example_inputs):
                _Recorder(gm).run(*example_inputs)
    except Exception as e:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs]
        raise InputError(
            f"running {type(gm).__name__} on example_inputs of shapes {shapes} failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass example_inputs "
            f"that the model accepts (a tensor or a tuple of the forward's positional tensors)."
        ) from e
    finally:
        for m, training in modes.items():
            m.training = training
