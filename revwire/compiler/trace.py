"""Step 1 of the compiler: trace a model into a torch.fx graph, safely.

Modules whose behaviour depends on `self.training` (dropout, drop-path, stochastic
depth, attention with dropout) are kept as leaves: traced, an `if self.training`
would be frozen at trace time and silently wrong in the other mode. So are the
modules and functions that timm registers as untraceable.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable, Sequence, Tuple

import torch
from torch import fx, nn

from ..errors import TraceError

_FUNCTIONAL_DROPOUTS = {
    torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout,
}


def _timm_notrace() -> Tuple[set, set]:
    """timm's own registrations of untraceable modules and functions."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:  # timm absent or reorganised: nothing to add
        return set(), set()
    modules = {m for m in timm_fx.get_notrace_modules() if isinstance(m, type)}
    functions = {f for f in timm_fx.get_notrace_functions() if callable(f)}
    return modules, functions


def _torchvision_leaves() -> set:
    try:
        from torchvision.ops import StochasticDepth
        from torchvision.ops.drop_block import DropBlock2d, DropBlock3d
    except ImportError:
        return set()
    return {StochasticDepth, DropBlock2d, DropBlock3d}


@functools.lru_cache(maxsize=None)
def reads_training_flag(cls: type) -> bool:
    """Whether a module class's own code (not nn.Module's) branches on `self.training`."""
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or klass.__module__.startswith("torch.nn"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            code = line.split("#", 1)[0]
            # `child.train(self.training)` only forwards the flag; it changes no computation.
            if "self.training" in code and ".train(self.training)" not in code:
                return True
    return False


class RewireTracer(fx.Tracer):
    """A Tracer that keeps mode-dependent and untraceable modules as leaves.

    It also remembers the module path being traced, so a failure can say where.
    """

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = ()):
        timm_modules, timm_functions = _timm_notrace()
        self.leaf_types = tuple(set(leaf_modules) | timm_modules | _torchvision_leaves())
        super().__init__(autowrap_functions=tuple(set(autowrap_functions) | timm_functions))
        self.path_stack: list = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types):
            return True
        if qualname and reads_training_flag(type(m)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        # On failure the stack is left as it is: its top says where.
        self.path_stack.append(self.path_of_module(m))
        result = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()
        return result


def _concrete_optional_args(model: nn.Module, n_given: int) -> dict:
    """Arguments after the given inputs that default to a constant are traced as that constant.

    A Proxy is never None, so `if mask is None` would take the wrong branch.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    concrete = {}
    for p in params[n_given:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            concrete[p.name] = p.default
    return concrete


def trace(model: nn.Module, n_inputs: int, *, leaf_modules: Sequence[type] = (),
          autowrap_functions: Sequence[Callable] = ()) -> fx.GraphModule:
    """Trace `model` called with `n_inputs` positional tensors into a GraphModule.

    The GraphModule shares every module and parameter object with `model`.
    Raises TraceError naming the module path and the fx error.
    """
    tracer = RewireTracer(leaf_modules, autowrap_functions)
    concrete = _concrete_optional_args(model, n_inputs)
    try:
        graph = tracer.trace(model, concrete_args=concrete or None)
    except Exception as e:  # fx raises anything: TraceError, TypeError, RuntimeError, ...
        _take_tensor_constants(model)  # leave the user's model as it was
        where = tracer.path_stack[-1] if tracer.path_stack else "<model forward>"
        where = where or "<model forward>"
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__} at module '{where}': "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Pass leaf_modules=[{_class_at(model, where)}] (or autowrap_functions=[...] for a "
            f"function) to keep it out of the trace."
        ) from e
    _bind_functional_dropout(graph)
    _keep_argument_names(graph, concrete)
    _replace_none_asserts(graph)
    # tensors the graph reads that are neither parameters nor buffers: fx's constants, and
    # plain attributes (`self.mean = torch.zeros(3)`); not part of the model's state_dict
    tensors = {**_take_tensor_constants(model), **_plain_tensors(model)}
    gm = fx.GraphModule(_mirror(model, tensors), graph, type(model).__name__)
    _adopt_hierarchy(gm, model)
    gm._non_persistent_buffers_set.update(tensors)
    _inline_identities(gm)
    return gm


def _adopt_hierarchy(gm: fx.GraphModule, model: nn.Module) -> None:
    """Put `model`'s own children (and root parameters and buffers) into `gm`, in order.

    GraphModule copies only what the graph names, into fresh intermediate modules:
    the user's modules (their methods, attributes, unused children) would be lost, and
    `state_dict()` keys could differ.
    """
    extra = {k: v for k, v in gm._modules.items() if k not in model._modules}
    gm._modules.clear()
    gm._modules.update(model._modules)
    gm._modules.update(extra)
    # One dict for both: a root parameter replaced on either (`load_state_dict(assign=True)`,
    # `.to("meta")`) is replaced on both, so every parameter stays the original's.
    gm._parameters = model._parameters
    for name, b in model.named_buffers(recurse=False):
        gm.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)


def _take_tensor_constants(model: nn.Module) -> dict:
    """The `_tensor_constantN` attributes fx set on `model` while tracing it, removed from it."""
    constants = {k: v for k, v in vars(model).items() if k.startswith("_tensor_constant")}
    for k in constants:
        delattr(model, k)
    return constants


def _mirror(model: nn.Module, tensors: dict) -> nn.Module:
    """A root from which GraphModule copies what the graph names: `model`'s children,
    parameters and buffers, and the plain `tensors` the graph reads.

    (`_adopt_hierarchy` then puts the user's own modules in place.)
    """
    root = nn.Module()
    for name, child in model.named_children():
        root.add_module(name, child)
    for name, p in model.named_parameters(recurse=False):
        root.register_parameter(name, p)
    for name, b in model.named_buffers(recurse=False):
        root.register_buffer(name, b, persistent=name not in model._non_persistent_buffers_set)
    for name, value in tensors.items():
        setattr(root, name, value)
    root.training = model.training
    return root


def _plain_tensors(model: nn.Module) -> dict:
    """Tensors kept as plain attributes (`self.mean = torch.zeros(3)`), read by forward."""
    return {k: v for k, v in vars(model).items() if isinstance(v, torch.Tensor) and not k.startswith("_")}


@fx.wrap  # a leaf in any later trace, e.g. when a pickled GraphModule is rebuilt
def require_none(value, name: str) -> None:
    """An argument traced as None (a specialised optional argument) must stay None."""
    if value is not None:
        raise TypeError(f"'{name}' was specialised to None when the model was rewired; it must stay None")


def _replace_none_asserts(graph: fx.Graph) -> None:
    """fx's `_assert_is_none` is an fx-wrapped function: a GraphModule calling it breaks
    later tracing once pickled and loaded (a KeyError in fx's patcher); call a plain one."""
    from torch.fx._symbolic_trace import _assert_is_none
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _assert_is_none:
            node.target = require_none
            node.meta["is_wrapped"] = True  # codegen emits wrap(...): rebuilt from code, it stays a call
            node.args = (node.args[0], str(node.args[1]).split(" has been")[0])


def _keep_argument_names(graph: fx.Graph, concrete: dict) -> None:
    """fx renames specialised arguments (`attn_mask` -> `attn_mask_1`); callers use the real names."""
    for node in graph.nodes:
        if node.op == "placeholder" and node.target not in concrete:
            base = node.target.rsplit("_", 1)[0]
            if base in concrete and node.target.rsplit("_", 1)[-1].isdigit():
                node.target = base


def _class_at(model: nn.Module, path: str) -> str:
    try:
        return type(model.get_submodule(path)).__name__
    except (AttributeError, ValueError):
        return "TheModuleClass"


def _inline_identities(gm: fx.GraphModule) -> None:
    """Calls of `nn.Identity` (ConvNeXt's `shortcut`, disabled drop-paths) read their input directly.

    A skip written `self.shortcut(x)` is then recognised as the identity it is. The
    modules stay registered; only the graph stops calling them.
    """
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity:
            if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    gm.recompile()


def scope_of(node: fx.Node) -> str:
    """The path of the innermost module `node` was traced in ("" at the model's top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _bind_functional_dropout(graph: fx.Graph) -> None:
    """`F.dropout(x, training=self.training)` in a traced forward reads the model's flag at run time.

    Tracing turns `self.training` into a constant; here it becomes the `training`
    attribute of the module it is called in again, so `.train()` / `.eval()` on the
    result behave.
    """
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_DROPOUTS:
            if isinstance(node.kwargs.get("training"), bool):
                owner = scope_of(node)
                with graph.inserting_before(node):
                    flag = graph.get_attr(f"{owner}.training" if owner else "training")
                node.update_kwarg("training", flag)
