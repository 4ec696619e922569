"""Step 2: run the traced graph once on example inputs and describe every node.

Each node gets one `NodeInfo` (`node.meta["revwire"]`, read through `info(node)`), as
torch.fx's `shape_prop` stores a `TensorMetadata`: the shape and dtype of a tensor, the
value of a small non-tensor (an int, a size), and two classifications the matcher and
the rewriter rely on (`is_metadata`, `is_constant`). This pass is the only writer.

First with FakeTensors (shapes without arithmetic: a ViT-B costs about a second,
whatever the input size); where a module needs real values (data-dependent code), with
one real eager forward instead (eval mode, no grad, RNG untouched). Arguments are
handed to each node as ordinary lists, because some wrapped helpers (torchvision's
swin3d) mutate their list arguments and fx's immutable lists would refuse.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..errors import InputError

_KEY = "revwire"
_METADATA_METHODS = {"size", "dim", "numel"}
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device"}


@dataclass(frozen=True)
class NodeInfo:
    """What the example inputs showed of one node's value."""

    shape: Optional[torch.Size] = None  # a tensor's shape (None: not a tensor)
    dtype: Optional[torch.dtype] = None
    value: Any = None  # a small non-tensor's value (ints, sizes), if `has_value`
    has_value: bool = False
    # describes a tensor without reading it (x.shape, x.size(0), B * H, x.dtype, x.device):
    # any tensor described alike can stand in for its source
    is_metadata: bool = False
    # a parameter, buffer or constant, or a pure function of those (copied into blocks)
    is_constant: bool = False

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None


_UNKNOWN = NodeInfo()


def info(node: fx.Node) -> NodeInfo:
    """The node's `NodeInfo` (all unknown before `propagate`, or for a node it did not see)."""
    return node.meta.get(_KEY, _UNKNOWN)


def copy_info(src: fx.Node, dst: fx.Node) -> None:
    """Give `dst`, a node that replaces `src` (a rewritten chain's call), `src`'s description."""
    dst.meta[_KEY] = info(src)


def describe_derived(node: fx.Node, src: fx.Node) -> None:
    """Describe `node`, a non-tensor value a normalization pass computed from `src` alone
    (e.g. `torch.unbind(src)`): a constant if `src` is."""
    node.meta[_KEY] = NodeInfo(is_constant=info(src).is_constant)


def metadata_source(node: fx.Node) -> Optional[fx.Node]:
    """The tensor node whose shape `node` reads directly, if it is `t.shape` / `t.size()` / ..."""
    if node.op == "call_function" and node.target is getattr and len(node.args) >= 2:
        if node.args[1] in _METADATA_ATTRS and isinstance(node.args[0], fx.Node):
            return node.args[0]
    if node.op == "call_method" and node.target in _METADATA_METHODS and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def _mutable(value):
    # plain lists and tuples (and fx's immutable lists) only: not named tuples, nor torch's
    # structseqs (`x.max(dim)` returns one whose `.values` a later node reads)
    if isinstance(value, (list, tuple)) and (type(value) in (list, tuple) or isinstance(value, immutable_list)):
        items = [_mutable(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if type(value) is dict or isinstance(value, immutable_dict):  # not ModelOutput (an OrderedDict)
        return {k: _mutable(v) for k, v in value.items()}
    return value


class _Recorder(fx.Interpreter):
    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _mutable(args), _mutable(kwargs)

    def run_node(self, n):
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[_KEY] = NodeInfo(shape=result.shape, dtype=result.dtype)
        elif isinstance(result, (int, float, bool, torch.Size)) or (
            isinstance(result, tuple) and all(isinstance(v, int) for v in result)
        ):
            n.meta[_KEY] = NodeInfo(value=result, has_value=True)
        return result


def _propagate_fake(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> bool:
    """Propagate with FakeTensors; False if some node needs real data."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = pytree.tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                                   list(example_inputs))
            _Recorder(gm).run(*fake)
        return True
    except Exception:  # data-dependent code, an op without a fake kernel, ...
        for n in gm.graph.nodes:
            n.meta.pop(_KEY, None)
        return False


def _classify(graph: fx.Graph) -> None:
    """Add `is_metadata` / `is_constant` to every node's record (inputs before users)."""
    for n in graph.nodes:
        described = info(n)
        computed = n.op in ("call_function", "call_method")
        is_meta = computed and (metadata_source(n) is not None or (
            described.has_value and all(info(i).is_metadata for i in n.all_input_nodes)))
        is_const = n.op == "get_attr" or (
            computed and all(info(i).is_constant for i in n.all_input_nodes))
        n.meta[_KEY] = dataclasses.replace(described, is_metadata=is_meta, is_constant=is_const)


def propagate(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Describe every node of `gm.graph` (see `NodeInfo`); the model's state (BN stats,
    RNG, mode) is untouched."""
    modes = {m: m.training for m in gm.modules()}
    leaves = [t for t in pytree.tree_leaves(list(example_inputs)) if isinstance(t, torch.Tensor)]
    devices = [leaves[0].device] if leaves and leaves[0].is_cuda else []
    try:
        gm.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if not _propagate_fake(gm, example_inputs):
                _Recorder(gm).run(*example_inputs)
    except Exception as e:
        shapes = pytree.tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__,
                                 list(example_inputs))
        raise InputError(
            f"running {type(gm).__name__} on example_inputs of shapes {shapes} failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Pass example_inputs "
            f"that the model accepts (a tensor or a tuple of the forward's positional tensors)."
        ) from e
    finally:
        for m, training in modes.items():
            m.training = training
    _classify(gm.graph)
