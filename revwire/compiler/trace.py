"""Step 1 of the compiler: trace a model into a torch.fx graph, safely.

Modules whose behaviour depends on `self.training` (dropout, drop-path, stochastic
depth, attention with dropout) are kept as leaves: traced, an `if self.training`
would be frozen at trace time and silently wrong in the other mode. So are the
modules and functions that timm registers as untraceable.
"""
from __future__ import annotations

import functools
import inspect
import operator
import os
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.fx import _symbolic_trace
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.fx.immutable_collections import immutable_dict, immutable_list

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


_SKIP_METHODS = {"__init__", "__call__", "train", "eval", "extra_repr", "__repr__", "__setstate__"}


def _own_function(cls: type, name: str):
    """`cls.name` as a plain function when it is defined outside torch.nn (else None)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            if klass in (nn.Module, object) or klass.__module__.startswith("torch.nn"):
                return None
            fn = vars(klass)[name]
            fn = getattr(fn, "__func__", fn)
            return fn if inspect.isfunction(fn) else None
    return None


def _source_reads_training(code: str) -> bool:
    for line in code.splitlines():
        line = line.split("#", 1)[0]
        # `child.train(self.training)` only forwards the flag; it changes no computation.
        # transformers' `if self.gradient_checkpointing and self.training:` is off unless
        # gradient checkpointing is on, which `trace` refuses.
        if "self.training" in line and ".train(self.training)" not in line and "gradient_checkpointing" not in line:
            return True
    return False


@functools.lru_cache(maxsize=None)
def reads_training_flag(cls: type) -> bool:
    """Whether the module class's own `forward` (or a method of the class it calls, such as
    `self._drop(x)`) branches on `self.training`.

    Only the forward's own code counts: decorators around it (transformers' gradient
    checkpointing switch, its config-default merging) and methods the forward does not
    call (`__call__`, `gradient_checkpointing_enable`, ...) do not change what the
    forward computes, and making such a class a leaf would hide the blocks inside it.
    """
    seen, todo = set(), [(cls, "forward")]
    while todo:
        klass, name = todo.pop()
        if (klass, name) in seen or name in _SKIP_METHODS:
            continue
        seen.add((klass, name))
        fn = _own_function(klass, name)
        if fn is None:
            continue
        try:
            code = inspect.getsource(inspect.unwrap(fn))
        except (OSError, TypeError):
            continue
        if _source_reads_training(code):
            return True
        todo.extend((cls, m) for m in re.findall(r"self\.(\w+)\(", code))
        # `super().forward(x)`: the same name further up the MRO
        owner = next((k for k in cls.__mro__ if vars(k).get(name) is not None
                      and getattr(vars(k)[name], "__func__", vars(k)[name]) is fn), None)
        if owner is not None:
            parents = cls.__mro__[cls.__mro__.index(owner) + 1:]
            for m in re.findall(r"super\(\)\.(\w+)\(", code):
                parent = next((k for k in parents if m in vars(k)), None)
                if parent is not None:
                    todo.append((parent, m))
    return False


class _DataDependent(Exception):
    """Concrete capture met Python control flow on tensor values (not shapes)."""


_CONCRETE_ATTRS = {"dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta",
                   "requires_grad", "is_leaf"}
_META_ATTRS = {"shape", "ndim"}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device", "is_floating_point",
                 "is_complex", "is_contiguous", "element_size", "stride"}


class ValueProxy(fx.Proxy):
    """A Proxy that also carries the value the example inputs give it (concrete capture).

    Python control flow reads the value: `if x.shape[-1] % w`, `len(x)`, `for a in t`,
    `range(n)`, `x.dtype != dtype`. Tensors flow as graph nodes; shapes stay graph nodes
    too where they feed tensor ops, so the graph is specialised only where Python decided.
    A decision on a tensor's *values* (`if mask.any()`) is refused: it would freeze data.
    """

    value: Any = None
    data: bool = False  # derived from tensor values (not only from shapes / dtypes)
    src: Optional[int] = None  # a tensor: the index of the example input it is (None: computed)
    # a non-tensor: the input dimensions (input index, dim) it is computed from, None for
    # "any" (a shape of a computed tensor); a shape of an input: one such set per dimension
    dims: Any = None
    # a tensor: per dimension, the input dimensions its size is (an input, or an input moved
    # by transpose / permute / a dtype cast); None where unknown
    tdims: Any = None

    def _concrete(self, what: str):
        return self.tracer.concretize(self, what)

    def __bool__(self):
        return bool(self._concrete("bool"))

    def __len__(self):
        return len(self._concrete("len"))

    def __index__(self):
        return operator.index(self._concrete("index"))

    def __int__(self):
        return int(self._concrete("int"))

    def __float__(self):
        return float(self._concrete("float"))

    def __array__(self, *args, **kwargs):
        import numpy as np
        return np.asarray(self._concrete("array"), *args, **kwargs)

    def __iter__(self):
        n = len(self._concrete("iter"))
        return iter([self[i] for i in range(n)])

    def keys(self):
        return self._concrete("keys").keys()

    def __setitem__(self, key, value):  # `mask[:, h, w] = k`: recorded (a mutation, never dead code)
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def __getattr__(self, k):
        if k.startswith("__"):  # protocol probes (numpy's __array_struct__, copy's __deepcopy__)
            raise AttributeError(k)
        if k in _CONCRETE_ATTRS:
            return getattr(self.value, k)
        return ValueAttribute(self, k)


class ValueAttribute(ValueProxy, fx.proxy.Attribute):
    """`x.attr` of a ValueProxy: a method call (`x.view(...)`) or, if used, a getattr node."""

    @property
    def value(self):
        return getattr(self.root.value, self.attr)

    @property
    def data(self):
        return self.root.data and self.attr not in _META_ATTRS

    @property
    def dims(self):
        return _shape_dims(self.root) if self.attr == "shape" else None

    @property
    def src(self):
        return None


def _values(a):
    """`a` with every ValueProxy replaced by its value, in ordinary (mutable) containers."""
    if isinstance(a, ValueProxy):
        return a.value
    if isinstance(a, (list, tuple)) and (type(a) in (list, tuple) or isinstance(a, immutable_list)):
        items = [_values(x) for x in a]
        return items if isinstance(a, list) else tuple(items)
    if type(a) is dict or isinstance(a, immutable_dict):  # not ModelOutput (an OrderedDict)
        return {k: _values(v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_values(a.start), _values(a.stop), _values(a.step))
    return a


def _is_data(kind: str, target, args, kwargs, value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if kind == "call_function" and target is getattr and len(args) >= 2 and args[1] in _META_ATTRS:
        return False
    if kind == "call_method" and target in _META_METHODS:
        return False
    found = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, ValueProxy) and a.data else None)
    return bool(found)


def _shape_dims(t: "ValueProxy"):
    """Per-dimension provenance of `t.shape` (None unless known: see `ValueProxy.tdims`)."""
    return t.tdims if isinstance(t.value, torch.Tensor) else None


_SAME_SHAPE_METHODS = {"contiguous", "to", "float", "half", "double", "bfloat16", "type_as", "clone",
                       "detach", "cpu", "cuda"}
_SWAP_FUNCTIONS = {torch.transpose: "transpose", torch.swapaxes: "transpose", torch.swapdims: "transpose",
                   torch.permute: "permute"}


def _tensor_dims(kind: str, target, args, kwargs, value):
    """`tdims` of a tensor computed from one input tensor by a layout or dtype op whose
    result's sizes are the input's, moved; None for anything else."""
    src = args[0] if args else None
    if not (isinstance(src, ValueProxy) and isinstance(src.tdims, tuple) and isinstance(value, torch.Tensor)):
        return None
    name = target if kind == "call_method" else _SWAP_FUNCTIONS.get(target) if kind == "call_function" else None
    name = "transpose" if name in ("swapaxes", "swapdims") else name
    n, rest = len(src.tdims), _values(list(args[1:]))
    try:
        if name == "transpose" and len(rest) == 2 and not kwargs:
            a, b = (int(d) % n for d in rest)
            order = list(range(n))
            order[a], order[b] = b, a
        elif name == "permute" and not kwargs:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            order = [int(d) % n for d in dims]
        elif name in _SAME_SHAPE_METHODS:
            order = list(range(n))
        else:
            return None
    except (TypeError, ValueError):
        return None
    if tuple(value.shape) != tuple(src.value.shape[k] for k in order):
        return None
    return tuple(src.tdims[k] for k in order)


def _dims_of(kind: str, target, args, kwargs):
    """Which input dimensions a non-tensor value (a size, a size's arithmetic) derives from."""
    if kind == "call_function" and target is getattr and len(args) >= 2 and args[1] == "shape":
        return _shape_dims(args[0]) if isinstance(args[0], ValueProxy) else None
    if kind == "call_method" and target == "size" and isinstance(args[0], ValueProxy):
        per = _shape_dims(args[0])
        if per is None:
            return None
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        return per if dim is None else (per[dim] if isinstance(dim, int) and -len(per) <= dim < len(per) else None)
    if kind == "call_function" and target is operator.getitem and isinstance(args[0], ValueProxy) \
            and isinstance(args[0].dims, tuple) and isinstance(args[1], (int, slice)):
        try:
            return args[0].dims[args[1]]
        except IndexError:
            return None
    union: set = set()
    known = True

    def visit(a):
        nonlocal known
        if isinstance(a, ValueProxy):
            d = a.dims
            if d is None:
                known = False
            elif isinstance(d, tuple):
                for x in d:
                    union.update(x)
            else:
                union.update(d)
    fx.node.map_aggregate((args, kwargs), visit)
    return frozenset(union) if known else None


_SKIP_DIRS = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,  # torch's own code
              os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)  # revwire's


def _frame_text(frames) -> str:
    """`file.py:123 (code)` of the innermost frame outside torch and revwire."""
    for frame in reversed(frames):
        if os.path.abspath(frame.filename).startswith(_SKIP_DIRS):
            continue
        return f"{os.path.basename(frame.filename)}:{frame.lineno} ({(frame.line or '').strip()[:80]})"
    return ""


def _user_line() -> str:
    return _frame_text(traceback.extract_stack()[:-1]) or "?"


def _tb_line(e: BaseException) -> str:
    return _frame_text(traceback.extract_tb(e.__traceback__))


@dataclass(frozen=True)
class Decision:
    """Where concrete capture let Python decide on a shape, and the input dimensions the
    decision read ((input index, dim) pairs; None: possibly any)."""

    where: str
    dims: Optional[frozenset]


class RewireTracer(fx.Tracer):
    """A Tracer that keeps mode-dependent and untraceable modules as leaves.

    Two ways to capture, one Tracer:
    - symbolic (default): torch.fx's own symbolic tracing;
    - concrete (`concrete=True`): every Proxy also carries the value the example inputs
      give it (`ValueProxy`), so Python control flow on shapes, dtypes and lengths is
      resolved at capture time, as `torch.export` does, while the graph still calls the
      model's own submodules (`call_module`), reads its own parameters, and records
      tensor ops at the level the model's code wrote them.

    It remembers the module path being traced, so a failure can say where; with
    `root_inputs` (positional and keyword example inputs, any pytree of tensors) it
    builds the root's placeholders itself, so decorated forwards
    (`functools.wraps(forward)` wrappers with `*args, **kwargs`) are called as they are.
    """

    def __init__(self, leaf_modules: Iterable[type] = (), autowrap_functions: Iterable[Callable] = (),
                 not_leaf: Iterable[type] = (), *, concrete: bool = False, root_inputs=None):
        timm_modules, timm_functions = _timm_notrace()
        self.not_leaf_types = tuple(not_leaf)
        self.leaf_types = tuple(set(leaf_modules) | timm_modules | _torchvision_leaves())
        super().__init__(autowrap_functions=tuple(set(autowrap_functions) | timm_functions | _einops()))
        self.path_stack: list = []
        self.concrete = concrete
        self.root_inputs = root_inputs
        self.decisions: List[Decision] = []  # concrete capture: where Python decided on a shape

    # -- leaves -------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.not_leaf_types and isinstance(m, self.not_leaf_types):
            return False
        if isinstance(m, self.leaf_types):
            return True
        if qualname and reads_training_flag(type(m)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:
            # a module made inside a forward (`nn.Softmax(dim=-1)(x)`, ImageGPT): with no state
            # of its own it is just its forward's code, traced through
            if next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None:
                return forward(*args, **kwargs)
            raise
        # On failure the stack is left as it is: its top says where.
        self.path_stack.append(path)
        result = super().call_module(m, forward, args, kwargs)
        self.path_stack.pop()
        return result

    # -- the root's inputs ----------------------------------------------------------------
    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        if self.root_inputs is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        names, values, constants = self.root_inputs.names, self.root_inputs.values, self.root_inputs.constants
        n_pos = self.root_inputs.n_positional
        flat, in_spec = pytree.tree_flatten(tuple(values))
        placeholders = []
        for i, (path, leaf) in enumerate(zip(_leaf_paths(names, values), flat)):
            proxy = self.create_proxy("placeholder", path, (), {})
            if isinstance(proxy, ValueProxy):
                proxy.value, proxy.data, proxy.src = leaf, True, i
                if isinstance(leaf, torch.Tensor):
                    proxy.tdims = tuple(frozenset({(i, d)}) for d in range(leaf.dim()))
            placeholders.append(proxy)
        self.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(list(names), in_spec, None))
        tracer = self

        def root_call(root, *flat_args):
            tree = pytree.tree_unflatten(list(flat_args), in_spec)
            args = tuple(tree[:n_pos])
            kwargs = dict(zip(names[n_pos:], tree[n_pos:]), **constants)
            out = root_fn(root, *args, **kwargs)
            flat_out, out_spec = pytree.tree_flatten(out)
            tracer.graph._codegen.pytree_info = tracer.graph._codegen.pytree_info._replace(out_spec=out_spec)
            return flat_out

        return root_call, [self.root, *placeholders]

    # -- concrete capture -------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self) if self.concrete else super().proxy(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.concrete and isinstance(proxy, ValueProxy) and kind != "placeholder":
            proxy.value = self._run(kind, target, args, kwargs)
            proxy.data = _is_data(kind, target, args, kwargs, proxy.value)
            if not isinstance(proxy.value, torch.Tensor):
                proxy.dims = _dims_of(kind, target, args, kwargs)
            else:
                proxy.tdims = _tensor_dims(kind, target, args, kwargs, proxy.value)
            if type(proxy.value) in (list, tuple) and kind != "get_attr":
                # a list or tuple of values (two pathways, `torch.split`) is one: the code
                # may take its length, iterate it, or assign into it
                items = [proxy[i] for i in range(len(proxy.value))]
                return items if isinstance(proxy.value, list) else tuple(items)
        return proxy

    def _run(self, kind, target, args, kwargs):
        """The value of one node, computed eagerly from its inputs' values (fx's patches
        lifted, no autograd, modules in eval mode so BatchNorm statistics stay)."""
        vargs, vkwargs = _values(args), _values(kwargs)
        patcher = _symbolic_trace.CURRENT_PATCHER
        if patcher is not None:
            patcher.revert_all_patches()
        try:
            with torch.no_grad():
                if kind == "get_attr":
                    return _fetch_attr(self.root, target)
                if kind == "call_function":
                    return target(*vargs, **vkwargs)
                if kind == "call_method":
                    return getattr(vargs[0], target)(*vargs[1:], **vkwargs)
                if kind == "call_module":
                    module = self.root.get_submodule(target)
                    modes = {m: m.training for m in module.modules()}
                    try:
                        for m in modes:  # the flag only: some libraries' train() overrides do more
                            m.training = False
                        return module(*vargs, **vkwargs)
                    finally:
                        for m, t in modes.items():
                            m.training = t
        finally:
            if patcher is not None:
                patcher.reapply_all_patches()
        return None

    def concretize(self, proxy: ValueProxy, what: str):
        """The value of `proxy` for Python control flow (`what`: bool, len, iter, ...)."""
        value = proxy.value
        if isinstance(value, (list, tuple, dict)) and what in ("len", "iter", "keys") and not isinstance(
                value, torch.Size):
            return value  # the structure of a module's output: fixed by the code
        if proxy.data:
            raise _DataDependent(
                f"Python control flow ({what}) on tensor values at {_user_line()}: the graph would "
                f"freeze one input's data")
        if isinstance(value, torch.Size) and what in ("len", "iter"):
            return value  # the rank: fixed by the code
        dims = proxy.dims
        if isinstance(dims, tuple):
            dims = frozenset().union(*dims)
        self.decisions.append(Decision(f"{what} at {_user_line()}", dims))
        return value

    def to_bool(self, obj):
        return bool(self.concretize(obj, "bool")) if isinstance(obj, ValueProxy) else super().to_bool(obj)

    def iter(self, obj):
        return iter(obj) if isinstance(obj, ValueProxy) else super().iter(obj)

    def keys(self, obj):
        return obj.keys() if isinstance(obj, ValueProxy) else super().keys(obj)


def _fetch_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _einops() -> set:
    """einops' functions are called as they are: they dispatch on the tensor's type."""
    try:
        import einops
    except ImportError:
        return set()
    return {f for f in (getattr(einops, n, None) for n in ("rearrange", "repeat", "reduce", "einsum")) if f}


def _leaf_paths(names, values) -> List[str]:
    """Placeholder names: the argument's name, `name_0`, `name_1` for a list's tensors."""
    out = []
    for name, value in zip(names, values):
        leaves = pytree.tree_leaves(value)
        if isinstance(value, torch.Tensor):
            out.append(name)
        else:
            out.extend(f"{name}_{i}" for i in range(len(leaves)))
    return out


def _is_tensor_tree(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple, dict)) and not hasattr(value, "_fields"):
        leaves = pytree.tree_leaves(value)
        return bool(leaves) and all(isinstance(t, torch.Tensor) for t in leaves)
    return False


def bind_inputs(model: nn.Module, args: tuple, kwargs: Optional[dict] = None) -> "RootInputs":
    """Bind example inputs to `model.forward`'s parameters (read through decorators).

    Positional inputs are tensors or lists / tuples / dicts of tensors (`[slow, fast]`
    for a two-pathway video model is one argument: pass `([slow, fast],)`); keyword
    inputs may also be constants (`interpolate_pos_encoding=True`), which are
    specialised. Raises InputError when they do not fit the signature.
    """
    from ..errors import InputError

    kwargs = dict(kwargs or {})
    for i, a in enumerate(args):
        if not _is_tensor_tree(a):
            raise InputError(
                f"example input {i} is a {type(a).__name__}: positional example inputs must be tensors "
                f"(or lists / tuples / dicts of tensors); pass constants by keyword")
    fn = inspect.unwrap(type(model).forward)
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(None, *args, **kwargs)
    except TypeError as e:
        hint = ""
        positional = [p for p in list(sig.parameters.values())[1:]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > 1 and all(isinstance(a, torch.Tensor) for a in args) and len(positional) == 1:
            hint = (f"; {type(model).__name__}.forward takes one input: to pass a list of "
                    f"{len(args)} tensors as that input, write example_inputs=([a, b, ...],)")
        raise InputError(
            f"example inputs do not fit {type(model).__name__}.forward{_signature_text(fn)}: {e}{hint}"
        ) from None
    except ValueError:  # no signature: take the inputs as they come
        return RootInputs([f"input_{i}" for i in range(len(args))], list(args), len(args), {})
    names, values, constants = [], [], {}
    params = list(sig.parameters.values())
    self_name = params[0].name
    for name, value in bound.arguments.items():
        if name == self_name:
            continue
        kind = sig.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            names.extend(f"{name}_{i}" for i in range(len(value)))
            values.extend(value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            for k, v in value.items():
                if _is_tensor_tree(v):
                    names.append(k)
                    values.append(v)
                else:
                    constants[k] = v
        elif name in kwargs and not _is_tensor_tree(value):
            constants[name] = value
        else:
            names.append(name)
            values.append(value)
    n_positional = len(args)
    if not values:
        raise InputError(f"example inputs hold no tensor for {type(model).__name__}.forward")
    return RootInputs(names, values, n_positional, constants)


def _signature_text(fn) -> str:
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return "(...)"
    return "(" + ", ".join(p.name if p.default is p.empty else f"{p.name}=..." for p in params
                           if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)) + ", ...)"


class RootInputs:
    """The example inputs bound to the forward's parameters (see `bind_inputs`)."""

    def __init__(self, names, values, n_positional, constants):
        self.names = list(names)  # the parameters given a tensor (or a pytree of tensors)
        self.values = list(values)
        self.n_positional = n_positional
        self.constants = dict(constants)  # keyword inputs that are not tensors: specialised

    @property
    def call_args(self) -> tuple:
        """The values, in the order the traced GraphModule's forward takes them."""
        return tuple(self.values)

    def __repr__(self) -> str:
        return f"RootInputs({self.names}, constants={sorted(self.constants)})"


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


CAPTURES = ("auto", "symbolic", "concrete")


def trace(model: nn.Module, inputs, *, leaf_modules: Sequence[type] = (),
          autowrap_functions: Sequence[Callable] = (), not_leaf: Sequence[type] = (),
          capture: str = "auto") -> fx.GraphModule:
    """Trace `model` into a GraphModule that shares every module and parameter object.

    `inputs`: the number of positional tensors the forward is called with (symbolic
    tracing only, the historical form), or a `RootInputs` (`bind_inputs`) holding the
    example inputs. `capture`: "symbolic" (torch.fx), "concrete" (shapes, dtypes and
    lengths read from the example inputs, see `ValueProxy`), or "auto": symbolic first,
    concrete where symbolic tracing fails. The GraphModule's `meta["revwire_capture"]`
    says which one it took, and `meta["revwire_decisions"]` where concrete capture let
    Python decide on a shape (the result then holds for inputs of those shapes only).
    Raises TraceError naming the module path, the source line and, for "auto", both
    front ends' reasons.
    """
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    if isinstance(inputs, int):
        root_inputs, n_inputs = None, inputs
        modes = ["symbolic"]
    else:
        root_inputs, n_inputs = inputs, len(inputs.values)
        modes = {"auto": ["symbolic", "concrete"], "symbolic": ["symbolic"], "concrete": ["concrete"]}[capture]
    checkpointed = [name for name, m in model.named_modules() if getattr(m, "gradient_checkpointing", False) is True]
    if checkpointed:
        raise TraceError(
            f"'{checkpointed[0] or '<model>'}' has gradient checkpointing on (transformers' "
            f"gradient_checkpointing_enable()): turn it off before rewiring "
            f"(model.gradient_checkpointing_disable()); the reversible stages replace it")
    plain = root_inputs is None or _plain_call(model, root_inputs)
    failures = []
    before = {m: dict(vars(m)) for m in model.modules()}
    for mode in modes:
        concrete_mode = mode == "concrete"
        # the historical call (positional tensors into an undecorated forward) keeps fx's own
        # signature handling: optional arguments specialised to their defaults, and guarded
        own_root = None if (plain and not concrete_mode) else root_inputs
        tracer = RewireTracer(leaf_modules, autowrap_functions, not_leaf, concrete=concrete_mode,
                              root_inputs=own_root)
        concrete = _concrete_optional_args(model, n_inputs) if own_root is None else {}
        try:
            if concrete_mode:
                devices = [t.device for t in pytree.tree_leaves(root_inputs.values)
                           if isinstance(t, torch.Tensor) and t.is_cuda][:1]
                with torch.random.fork_rng(devices=devices):
                    graph = tracer.trace(model, concrete_args=None)
            else:
                graph = tracer.trace(model, concrete_args=concrete or None)
        except Exception as e:  # fx raises anything: TraceError, TypeError, RuntimeError, ...
            _take_tensor_constants(model)  # leave the user's model as it was
            _scrub_proxies(before)
            where = (tracer.path_stack[-1] if tracer.path_stack else "") or "<model forward>"
            failures.append((mode, where, e))
            continue
        _scrub_proxies(before)
        break
    else:
        raise _trace_error(model, failures)
    _bind_functional_dropout(graph)
    if own_root is None:
        _keep_argument_names(graph, concrete)
        _replace_none_asserts(graph)
    if tracer.decisions:
        _guard_input_shapes(graph, root_inputs, tracer.decisions)
    # tensors the graph reads that are neither parameters nor buffers: fx's constants, and
    # plain attributes (`self.mean = torch.zeros(3)`); not part of the model's state_dict
    tensors = {**_take_tensor_constants(model), **_plain_tensors(model)}
    gm = fx.GraphModule(_mirror(model, tensors), graph, type(model).__name__)
    _adopt_hierarchy(gm, model)
    gm._non_persistent_buffers_set.update(tensors)
    _inline_identities(gm)
    gm.meta["revwire_capture"] = mode
    gm.meta["revwire_decisions"] = [d.where for d in tracer.decisions]
    gm.meta["revwire_trace_failures"] = [f"{m}: {_reason(e)}" for m, _, e in failures]
    return gm


def _has_proxy(value) -> bool:
    if isinstance(value, fx.Proxy):
        return True
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, fx.Proxy) for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, fx.Proxy) for v in value.values())
    return False


def _scrub_proxies(before: dict) -> None:
    """Attributes a forward set on its modules while being traced (transformers' Swin stores
    `self.window_size = min(input_resolution)`) must not keep a Proxy: a later trace would
    read a node of this graph. A concretely captured value becomes what an eager run would
    have stored; otherwise the attribute is put back as it was."""
    for module, saved in before.items():
        for name, value in list(vars(module).items()):
            if not _has_proxy(value):
                continue
            if isinstance(value, ValueProxy) and not isinstance(value.value, torch.Tensor):
                setattr(module, name, value.value)
            elif name in saved:
                setattr(module, name, saved[name])
            else:
                delattr(module, name)


def _plain_call(model: nn.Module, root_inputs: "RootInputs") -> bool:
    """Positional tensors only, into a forward that no decorator wraps."""
    fn = type(model).forward
    return (not root_inputs.constants and root_inputs.n_positional == len(root_inputs.values)
            and all(isinstance(v, torch.Tensor) for v in root_inputs.values)
            and inspect.unwrap(fn) is fn)


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    line = _tb_line(e)
    return f"{type(e).__name__}: {text}" + (f" at {line}" if line and line not in text else "")


def _trace_error(model: nn.Module, failures) -> TraceError:
    """One message for every front end that failed: where, the line, why, what to do."""
    parts = [f"{mode} capture failed at module '{where}': {_reason(e)}" for mode, where, e in failures]
    cls = _class_at(model, failures[-1][1]) or _class_at(model, failures[0][1])
    builtin = False
    try:
        builtin = type(model.get_submodule(failures[-1][1])).__module__.startswith("torch.nn")
    except (AttributeError, ValueError):
        pass
    if builtin:
        advice = (f"'{failures[-1][1]}' is a {cls} (a leaf) that failed on the example inputs' values: "
                  f"pass example_inputs the model accepts (shapes, dtype, device)")
    elif cls:
        advice = (f"Pass leaf_modules=[{cls}] (or autowrap_functions=[...] for a function) to keep "
                  f"it out of the trace")
    else:
        advice = ("the failing code is in the model's own forward, which is always traced: pass "
                  "autowrap_functions=[f] for a function it calls that cannot be traced, move the code that "
                  "decides on tensor values into a module of its own and pass leaf_modules=[ThatModule], or "
                  "rewire a submodule (e.g. the backbone) instead of the whole model")
    if any("Cache" in str(e) for _, _, e in failures):
        advice = ("a key/value cache is state, not a graph: pass use_cache=False (e.g. example_inputs="
                  "{'input_ids': ids, 'use_cache': False}, or config.use_cache = False); otherwise, " + advice)
    return TraceError(f"could not trace {type(model).__name__}: " + "; ".join(parts) + f". {advice}.")


@fx.wrap
def require_input_shape(value, shape, why: str) -> None:
    """A graph captured concretely holds for inputs whose guarded dimensions (the ints of
    `shape`; None: any size) are the example's."""
    if len(value.shape) != len(shape) or any(s is not None and v != s for v, s in zip(value.shape, shape)):
        pattern = ["*" if s is None else s for s in shape]
        raise ValueError(
            f"this rewired model was captured for inputs of shape {pattern}, not {list(value.shape)}: "
            f"its forward decided on those sizes while it was captured ({why}); rewire it again "
            f"with example inputs of the shape you call it with")


def _guard_input_shapes(graph: fx.Graph, root_inputs: "RootInputs", decisions: List[Decision]) -> None:
    """Check, at call time, the input sizes that concrete capture's decisions read."""
    leaves = pytree.tree_leaves(root_inputs.values)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    any_dim = any(d.dims is None for d in decisions)
    read = set().union(*(d.dims for d in decisions if d.dims is not None))
    texts = list(dict.fromkeys(d.where for d in decisions))
    why = "; ".join(texts[:3]) + (f"; and {len(texts) - 3} more" if len(texts) > 3 else "")
    if not placeholders:
        return
    with graph.inserting_after(placeholders[-1]):
        for i, (node, leaf) in reversed(list(enumerate(zip(placeholders, leaves)))):
            if not isinstance(leaf, torch.Tensor):
                continue
            shape = tuple(s if any_dim or (i, d) in read else None for d, s in enumerate(leaf.shape))
            if all(s is None for s in shape):
                continue
            guard = graph.call_function(require_input_shape, (node, shape, why))
            guard.meta["is_wrapped"] = True


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
    """The class name of the module at `path` ('' for the model's own forward)."""
    if not path or path == "<model forward>":
        return ""
    try:
        return type(model.get_submodule(path)).__name__
    except (AttributeError, ValueError):
        return ""


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
