"""The reversible stage and its autograd engine (docs/design.md §2-3).

A stage runs blocks F_1..F_N with the re2tal coupling

    x_i = x_{i-2} + F_i(x_{i-1}),   x_{-1} = x_0 = input,   output = (x_{N-1} + x_N) / 2

and, with the "reversible" engine, keeps only the final pair of streams: backward
walks the blocks in reverse, recomputes F_i(x_{i-1}) with grad, back-propagates
through it, and recovers x_{i-2} = x_i - F_i(x_{i-1}). Parameter gradients are
returned through autograd (parameters are inputs of the Function), so DDP hooks,
gradient accumulation, GradScaler and `torch.autograd.grad` work unchanged.
The "autograd" engine runs the same computation with ordinary autograd: the
ground truth that the reversible engine is tested against.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import contextlib

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import BlockShapeError, ReconstructionError, RewireError, StageFreedError
from .replay import AutocastState, RngState, frozen_running_stats, stat_tracking_norms

ENGINES = ("reversible", "autograd")


class ReversibleStage(nn.Module):
    """A chain of residual branches F_1..F_N run as one reversible stage.

    Args:
        blocks: the residual branches F_i (each maps a stream to a tensor of its shape).
        transitions: optional, one per gap between blocks (N-1 entries, None where
            there is none): a pure layout op (reshape, permute, roll, ...) applied to
            both streams after block i. It must only move elements around.
        register_blocks: register `blocks` as submodules (a standalone stage). The
            compiler passes False: the blocks then call modules that live, and are
            registered, in the model they came from, so that model's parameter names
            and `state_dict()` keys stay as they were.
        names: one name per block, used in error messages.
        stream_dtype: keep the two streams in this dtype (e.g. torch.float32 under
            autocast, or torch.float64 for a more exact inversion); blocks still see
            their input in the stage input's dtype. None keeps the input's dtype.
        check_finite: raise `ReconstructionError` when backward reconstructs a
            non-finite value (one device sync per stage backward).
        shape_context: call every block and transition as `f(stream, *metas)`, where
            `metas` holds one meta tensor per segment so far (a segment is a run of
            blocks between two transitions): code traced from a model may read the
            shape of an earlier stream (`B, H, W, C = x.shape`), which no longer exists.
        keep_last: run the last block with grad in forward and keep its activations, so
            backward need not recompute it (one block's memory for 1/N of the recompute).
            Worth it for the model's last stage; an earlier stage would hold them while
            every later stage runs, raising the peak.
        debug: also store every stream in forward (memory grows with depth, as with
            autograd) and record, per block, the relative error of its reconstruction
            in `last_reconstruction_error`.
    """

    def __init__(
        self,
        blocks: Sequence[Callable],
        transitions: Optional[Sequence[Optional[Callable]]] = None,
        *,
        register_blocks: bool = True,
        names: Optional[Sequence[str]] = None,
        name: str = "stage",
        engine: str = "reversible",
        stream_dtype: Optional[torch.dtype] = None,
        check_finite: bool = True,
        shape_context: bool = False,
        keep_last: bool = False,
        debug: bool = False,
    ):
        super().__init__()
        if len(blocks) == 0:
            raise RewireError("a ReversibleStage needs at least one block")
        transitions = list(transitions) if transitions is not None else [None] * (len(blocks) - 1)
        if len(transitions) != len(blocks) - 1:
            raise RewireError(
                f"stage '{name}': {len(blocks)} blocks need {len(blocks) - 1} transitions, "
                f"got {len(transitions)}"
            )
        if register_blocks:
            # Plain callables (functions, lambdas) have no parameters: wrap them to register.
            self.blocks = nn.ModuleList(b if isinstance(b, nn.Module) else _Callable(b) for b in blocks)
        else:
            # A plain list: not registered, so the parameters keep their original names.
            self.__dict__["blocks"] = list(blocks)
        self.transitions = transitions
        self.names = list(names) if names is not None else [f"block{i}" for i in range(len(blocks))]
        self.name = name
        self.engine = engine
        self.stream_dtype = stream_dtype
        self.check_finite = check_finite
        self.shape_context = shape_context
        self.keep_last = keep_last
        self._segment_of, segment = [], 0
        for i in range(len(blocks)):
            self._segment_of.append(segment)
            segment += int(i < len(transitions) and transitions[i] is not None)
        self.debug = debug
        self.last_reconstruction_error: List[float] = []
        self._leaves_checked: set = set()  # blocks whose recompute graph was checked once

    @property
    def engine(self) -> str:
        return self._engine

    @engine.setter
    def engine(self, value: str) -> None:
        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; choose one of {ENGINES}")
        self._engine = value

    def extra_repr(self) -> str:
        return f"name={self.name!r}, blocks={len(self.blocks)}, engine={self.engine!r}"

    def block_parameters(self) -> List[nn.Parameter]:
        """Parameters of all blocks, each once, in a fixed order."""
        seen, params = set(), []
        for block in self.blocks:
            if isinstance(block, nn.Module):
                for p in block.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        return params

    def forward(self, x: torch.Tensor, *aux) -> torch.Tensor:
        """`aux`: values computed before the stage that every block reads (shapes, an
        attention mask, a rotary table); tensors among them get their gradients."""
        params = self.block_parameters()
        aux_tensors = [t for t in aux if isinstance(t, torch.Tensor)]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in aux_tensors + params)
        )
        if self.engine == "reversible" and needs_grad:
            return _ReversibleFunction.apply(self, x, aux, *aux_tensors, *params)
        return self._forward_autograd(x, aux)

    # -- pieces shared by both engines --------------------------------------------

    def _stream(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stream_dtype is None else x.to(self.stream_dtype)

    def _context(self, metas: list, i: int, aux: tuple) -> tuple:
        """Extra arguments of block i and of the transition after it."""
        segments = tuple(metas[: self._segment_of[i] + 1]) if self.shape_context else ()
        return segments + tuple(aux)

    def _run_block(self, i: int, stream: torch.Tensor, in_dtype: torch.dtype, context: tuple) -> torch.Tensor:
        y = self.blocks[i](stream.to(in_dtype), *context)
        if not isinstance(y, torch.Tensor) or y.shape != stream.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise BlockShapeError(
                f"stage '{self.name}', block {i} ('{self.names[i]}'): a reversible block must "
                f"return a tensor of its input's shape {tuple(stream.shape)}, got {got}. "
                f"Leave this block out of the stage."
            )
        return y

    def _forward_autograd(self, x: torch.Tensor, aux: tuple = ()) -> torch.Tensor:
        a = b = self._stream(x)
        metas = [_meta(b)]
        for i in range(len(self.blocks)):
            context = self._context(metas, i, aux)
            a, b = b, a + self._run_block(i, b, x.dtype, context)
            if i < len(self.transitions) and self.transitions[i] is not None:
                a, b = self.transitions[i](a, *context), self.transitions[i](b, *context)
                metas.append(_meta(b))
        return ((a + b) / 2).to(x.dtype)


class _Callable(nn.Module):
    """A plain function as a registered block (it holds no parameters of its own)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)


def _meta(t: torch.Tensor) -> torch.Tensor:
    """A storage-free stand-in that carries only `t`'s shape."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _transpose_layout(transition: Callable, shape, tensors, context: tuple):
    """Undo a layout transition on each tensor: for a permutation P, P^-1 = P^T = VJP."""
    out = []
    for t in tensors:
        z = torch.zeros(shape, dtype=t.dtype, device=t.device, requires_grad=True)
        (back,) = torch.autograd.grad(transition(z, *context), z, grad_outputs=t)
        out.append(back)
    return out


_TENSOR = object()  # marks where a tensor of `aux` goes (it is saved for backward instead)


def _with_aliases(aux: tuple) -> tuple:
    """`aux` with each tensor replaced by a detached alias (a leaf of the recompute's graph)."""
    return tuple(t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                 for t in aux)


class _ReversibleFunction(torch.autograd.Function):
    """Forward without storing activations; backward by reconstruction.

    Inputs: the stage, the stream input x, the `aux` values, then the tensors among
    `aux` and the blocks' parameters (so that autograd returns their gradients).
    """

    @staticmethod
    def forward(ctx, stage: ReversibleStage, x: torch.Tensor, aux: tuple, *tensors):
        n = len(stage.blocks)
        ctx.stage = stage
        ctx.stage_name = stage.name
        ctx.in_dtype = x.dtype
        ctx.autocast = AutocastState.capture(x.device)
        ctx.rng = []
        ctx.shapes = []  # stream shape before each transition
        ctx.streams = [] if stage.debug else None
        ctx.last = None
        ctx.aux = tuple(_TENSOR if isinstance(t, torch.Tensor) else t for t in aux)
        n_aux = sum(isinstance(t, torch.Tensor) for t in aux)
        with torch.no_grad():
            a = b = stage._stream(x)
            metas = [_meta(b)]
            for i in range(n):
                ctx.rng.append(RngState.capture(x.device))
                if stage.debug:
                    ctx.streams.append(a.clone())  # x_{i-2}, as backward will reconstruct it
                if i == n - 1 and stage.keep_last:
                    # The last block runs with grad now, so backward need not recompute it:
                    # one block's activations are stored, whatever the depth.
                    last_aux = _with_aliases(aux)
                    ctx.last = (last_aux, *_differentiable_call(
                        stage, i, b, x.dtype, stage._context(metas, i, last_aux)))
                    y = ctx.last[-1].detach()
                else:
                    y = stage._run_block(i, b, x.dtype, stage._context(metas, i, aux))
                a, b = b, a + y
                ctx.shapes.append(b.shape)
                if i < n - 1 and stage.transitions[i] is not None:
                    context = stage._context(metas, i, aux)
                    a, b = stage.transitions[i](a, *context), stage.transitions[i](b, *context)
                    metas.append(_meta(b))
            ctx.metas = metas
            out = ((a + b) / 2).to(x.dtype)
        ctx.save_for_backward(a, b, *tensors[:n_aux])
        return out

    @staticmethod
    @once_differentiable  # a second-order backward raises instead of silently dropping terms
    def backward(ctx, grad_out):
        try:
            a, b, *aux_tensors = ctx.saved_tensors
        except RuntimeError as e:
            raise StageFreedError(
                f"stage '{ctx.stage_name}': backward was called a second time, but the reversible "
                f"stage freed its streams after the first. Run forward again, pass "
                f"retain_graph=True to the first backward, or use "
                f"revwire.set_engine(model, 'autograd')."
            ) from e
        stage: ReversibleStage = ctx.stage
        fill = iter(aux_tensors)
        aux = _with_aliases(tuple(next(fill) if v is _TENSOR else v for v in ctx.aux))
        params = stage.block_parameters()
        index = {id(p): k for k, p in enumerate(params)}
        param_grads: List[Optional[torch.Tensor]] = [None] * len(params)
        aux_grads: List[Optional[torch.Tensor]] = [None] * len(aux_tensors)
        n = len(stage.blocks)
        g = grad_out.to(a.dtype) / 2
        ga, gb = g, g
        finite_flags = []
        stage.last_reconstruction_error = [float("nan")] * n if stage.debug else []
        for i in reversed(range(n)):
            if i < n - 1 and stage.transitions[i] is not None:
                with torch.enable_grad():
                    a, b, ga, gb = _transpose_layout(stage.transitions[i], ctx.shapes[i], (a, b, ga, gb),
                                                     stage._context(ctx.metas, i, aux))
            # state: (a, b) = (x_{i-1}, x_i), grads (ga, gb); block i: x_i = x_{i-2} + F_i(x_{i-1})
            if i == n - 1 and ctx.last is not None:
                block_aux, inp, originals, aliases, y = ctx.last
                ctx.last = None  # its graph is freed below; a retained second backward recomputes
            else:
                block_aux = aux
                with ctx.rng[i].replay(), ctx.autocast.replay(), \
                        frozen_running_stats(stat_tracking_norms(_modules_of(stage.blocks[i]))):
                    inp, originals, aliases, y = _differentiable_call(
                        stage, i, a, ctx.in_dtype, stage._context(ctx.metas, i, aux))
            aux_leaves = [t for t in block_aux if isinstance(t, torch.Tensor)]
            leaves = [inp] + aliases + [t for t in aux_leaves if t.requires_grad]
            if i not in stage._leaves_checked:
                _check_leaves(stage, i, y, leaves)
                stage._leaves_checked.add(i)
            if y.requires_grad:
                grads = torch.autograd.grad(y, leaves, grad_outputs=gb.to(y.dtype),
                                            allow_unused=True)
            else:  # F_i depends on neither its input nor a trainable tensor
                grads = (None,) * len(leaves)
            with torch.no_grad():
                older = b - y.detach()  # x_{i-2}
                if stage.check_finite:
                    finite_flags.append(torch.isfinite(older).all())
                if stage.debug:
                    ref = ctx.streams[i]
                    err = (older - ref).norm() / ref.norm().clamp_min(1e-30)
                    stage.last_reconstruction_error[i] = float(err)
            # By position: under an enclosing stage's recompute, `originals` may be that
            # stage's aliases, while `index` holds the parameters as they are now.
            block_params = _grad_params(stage.blocks[i])
            for p, gp in zip(block_params, grads[1:1 + len(aliases)]):
                if gp is not None:
                    k = index[id(p)]
                    param_grads[k] = gp if param_grads[k] is None else param_grads[k] + gp
            aux_iter = iter(grads[1 + len(aliases):])
            for k, t in enumerate(aux_leaves):
                gt = next(aux_iter) if t.requires_grad else None
                if gt is not None:
                    aux_grads[k] = gt if aux_grads[k] is None else aux_grads[k] + gt
            a, b, ga, gb = older, a, gb, (ga if grads[0] is None else ga + grads[0].to(ga.dtype))
        if finite_flags and not bool(torch.stack(finite_flags).all()):
            bad = n - 1 - int(torch.stack(finite_flags).logical_not().nonzero()[0])
            raise ReconstructionError(
                f"stage '{stage.name}', block {bad} ('{stage.names[bad]}'): backward reconstructed "
                f"a non-finite input. The forward overflowed or the inversion lost precision; "
                f"try stream_dtype=torch.float32 (or float64), a lower learning rate, or "
                f"revwire.set_engine(model, 'autograd') to compare."
            )
        # Now (a, b) = (x_{-1}, x_0): both are the input.
        grad_x = (ga + gb).to(ctx.in_dtype) if ctx.needs_input_grad[1] else None
        return (None, grad_x, None, *aux_grads, *param_grads)


def _differentiable_call(stage: ReversibleStage, i: int, stream: torch.Tensor, in_dtype, context):
    """Run block i with grad on a detached copy of `stream`: `(input, params, aliases, output)`.

    The graph is built on detached aliases of the block's parameters (same storage), not
    the parameters themselves: autograd.grad runs the hooks of the tensors it
    differentiates with respect to, so a `p.register_hook` would otherwise fire twice
    (here, and when the returned gradient reaches p).
    """
    block = stage.blocks[i]
    originals = _grad_params(block)
    aliases = [p.detach().requires_grad_(True) for p in originals]
    with torch.enable_grad(), _bound_params(block, dict(zip(map(id, originals), aliases))):
        inp = stream.detach().to(in_dtype).requires_grad_(True)
        y = stage._run_block(i, inp, in_dtype, context)
    return inp, originals, aliases, y


def _grad_params(block) -> List[nn.Parameter]:
    """The block's parameters that require grad, each once."""
    if not isinstance(block, nn.Module):
        return []
    return [p for p in block.parameters() if p.requires_grad]


@contextlib.contextmanager
def _bound_params(block, alias_of: Dict[int, torch.Tensor]) -> Iterator[None]:
    """Let every submodule of `block` see `alias_of[id(p)]` in place of its parameter p.

    Tied parameters (one Parameter under several names, or one module registered twice)
    all see the same alias. `torch.func.functional_call(..., tie_weights=True)` is not
    used: on a module registered under two names it leaves the aliases in the module
    for good (torch 2.14), replacing the model's parameters.
    """
    swapped = []
    if alias_of:
        for m in block.modules():
            for name, p in m._parameters.items():
                if p is not None and id(p) in alias_of:
                    swapped.append((m, name, p))
    try:
        for m, name, p in swapped:
            m._parameters[name] = alias_of[id(p)]
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def _check_leaves(stage: ReversibleStage, i: int, y: torch.Tensor, leaves: list) -> None:
    """Raise if the recompute of block i reads a trainable tensor that is not one of its
    parameters: the reversible engine could not return that tensor's gradient, and it would
    silently differ from the autograd engine."""
    if y.grad_fn is None:
        return
    allowed = {id(t) for t in leaves}
    seen, todo, foreign = set(), [y.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in allowed:
            foreign.append(tuple(var.shape))
        todo.extend(nxt for nxt, _ in fn.next_functions)
    if foreign:
        raise RewireError(
            f"stage '{stage.name}', block {i} ('{stage.names[i]}'): the block reads "
            f"{len(foreign)} tensor(s) that require grad but are not among its parameters "
            f"(shapes {foreign[:4]}), e.g. a closure over another module's parameters. The "
            f"reversible engine can only return gradients of the block's own parameters: make "
            f"the block an nn.Module that registers them, or use "
            f"revwire.set_engine(model, 'autograd')."
        )


def _modules_of(block) -> list:
    return list(block.modules()) if isinstance(block, nn.Module) else []


def stages(module: nn.Module) -> List[ReversibleStage]:
    """All reversible stages inside `module`."""
    return [m for m in module.modules() if isinstance(m, ReversibleStage)]


def set_engine(module: nn.Module, engine: str) -> nn.Module:
    """Switch every reversible stage inside `module` to "reversible" or "autograd"."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    found = stages(module)
    if not found:
        raise RewireError(
            f"{type(module).__name__} has no reversible stage: call revwire.rewire(model) first"
        )
    for stage in found:
        stage.engine = engine
    return module
