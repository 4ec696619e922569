"""The reversible engine: one autograd node per block, streams reconstructed in backward.

A stage's forward runs every block without grad through `_Block` (one autograd node per
block) and ends in `_StageOutput`, which keeps the final pair of streams. Backward enters
`_StageOutput` first, which hands that pair to the stage's `_Pass`; autograd then calls
the blocks' nodes last to first (each one's inputs are the previous one's outputs), and
each node inverts its block (`_invert`): it recomputes the block, returns the gradients of
its inputs and of *its own* parameters, and leaves the reconstructed older pair in the
`_Pass` for the node before it. See docs/design.md §2-3 for the coupling and the contract.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ReconstructionError, RewireError, StageFreedError
from . import fsdp
from .replay import AutocastState, RngState, frozen_running_stats

# NOTE [ Why one autograd node per block ]
# A single Function for the whole stage would return every parameter's gradient together
# at the end of its backward: at that moment one gradient per parameter of the stage is
# alive on top of the streams, so the step's peak grows with depth by the stage's
# parameter size. With one node per block, autograd hands a block's parameter gradients to
# their AccumulateGrad nodes as soon as the block is done; at the peak only one block's
# gradients, one block's recompute, the pair of streams and their gradients are alive.
# The nodes share the reconstructed streams through the `_Pass` object of their forward.

# NOTE [ Streams and what autograd sees ]
# The pair of streams can be kept in another dtype than the stage's input (`stream_dtype`;
# by default float64 under autocast or for half-precision inputs, where reconstruction by
# subtraction is otherwise not exact: a rounding error of 1e-7 in a block's input can
# flip bf16 roundings inside the block and come back as 1e-3). Autograd sees the streams
# in the input's dtype, so the gradients flowing between blocks keep that dtype: the
# streams' own dtype costs memory only for the pair that is kept, not for its gradients.

# NOTE [ In-place reconstruction ]
# x_{i-2} = x_i - F_i(x_{i-1}) overwrites x_i: after it, only (x_{i-2}, x_{i-1}) is needed.
# Only tensors this backward allocated are overwritten: the final pair is saved by
# `_StageOutput` (a second backward with retain_graph=True must find it intact), and
# gradients handed in by autograd may be referenced elsewhere. `_Pass.owned` holds the
# ids of the tensors this backward made. A stream of the final pair is adopted too once
# nothing else holds it (`_unshared`): without retain_graph=True, autograd releases
# `_StageOutput`'s saved tensors after its backward, and the streams never escape to the
# user, except the stage input itself (x_{-1} = x_0 = x), whose storage the user's tensor
# shares. Without adoption, the node after `_StageOutput`'s first would hold one more
# stream-sized tensor while it runs.


def _stand_in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `t`'s shape in `dtype` without storage of its own: what autograd sees of a
    stream kept in another dtype (its value is never read; its gradient is)."""
    return torch.zeros((), dtype=dtype, device=t.device).expand(t.shape)


def _first_order(backward):
    """A backward that computes first-order gradients only (what `once_differentiable`
    does), refusing `create_graph=True` with an error that says what to use instead."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RewireError(
                f"stage '{ctx.run.name}': the reversible engine computes first-order gradients "
                f"only, and backward was asked for a graph of them (create_graph=True: a double "
                f"backward, a gradient penalty, a Hessian). Use revwire.set_engine(model, "
                f"'autograd') for higher-order gradients."
            )
        return backward(ctx, *grads)

    return wrapper


class _Pass:
    """What one forward of a stage leaves for its backward, shared by its block nodes."""

    def __init__(self, stage, x: torch.Tensor, aux: tuple):
        self.stage = stage
        self.name = stage.name
        self.in_dtype = x.dtype
        self.autocast = AutocastState.capture(x.device)
        self.device = x.device
        self.aux = aux  # every aux value; tensors reach the nodes as inputs too
        self.metas: list = []  # shape stand-ins, one per segment (see ReversibleStage)
        self.cur: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # forward's pair of streams
        self.seen_dtype = x.dtype  # of the streams as autograd sees them
        self.rng: List[RngState] = []
        self.streams: Optional[list] = [] if stage.debug else None
        self.pair: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.owned: Dict[int, weakref.ref] = {}  # id -> tensor (ids of freed tensors recur)
        self.finite: list = []
        self.first: Optional[int] = None  # the lowest block whose autograd node runs
        self.fsdp = fsdp.begin(stage)  # None unless a block reads fully_shard-ed parameters

    def own(self, t: torch.Tensor) -> torch.Tensor:
        self.owned[id(t)] = weakref.ref(t)
        return t

    def disown(self, t: torch.Tensor) -> None:
        self.owned.pop(id(t), None)

    def owns(self, t: torch.Tensor) -> bool:
        ref = self.owned.get(id(t))
        return ref is not None and ref() is t


def reversible_forward(stage, x: torch.Tensor, aux: tuple) -> torch.Tensor:
    """Run `stage` on `x` so that backward reconstructs instead of storing."""
    run = _Pass(stage, x, aux)
    aux_tensors = tuple(t for t in aux if isinstance(t, torch.Tensor))
    n = len(stage.blocks)
    stream = stage._stream(x)
    run.cur = (stream, stream)
    run.metas.append(meta_like(stream))
    # what autograd sees (NOTE [ Streams and what autograd sees ])
    a = b = x.float() if x.dtype in (torch.float16, torch.bfloat16) and stream.dtype != x.dtype else x
    run.seen_dtype = a.dtype
    needs_grad = x.requires_grad or any(t.requires_grad for t in aux_tensors)
    for i in range(n):
        with fsdp.block_forward(run.fsdp, i):  # gathered first: the unsharded params are the inputs
            params = stage.block_params(i)
            if run.first is None and (needs_grad or params):
                run.first = i  # the first block whose node backward runs (earlier ones are frozen)
            keep = stage.keep_last and i == n - 1
            a, b = _Block.apply(run, i, keep, a, b, *aux_tensors, *params)
    return _StageOutput.apply(run, a, b, *(t.detach() for t in run.cur))


class _StageOutput(torch.autograd.Function):
    """`(x_{N-1} + x_N) / 2` in the input's dtype; keeps the pair for the block nodes.

    Inputs: the pass, the last block's outputs (as autograd sees them), then the pair of
    streams itself (what is kept)."""

    @staticmethod
    def forward(ctx, run: _Pass, a, b, stream_a, stream_b):
        ctx.run = run
        ctx.save_for_backward(stream_a, stream_b)
        run.cur = None  # kept by autograd now, and released by it after this node's backward
        if stream_a.dtype == run.in_dtype:
            return torch.add(stream_a, stream_b).div_(2)
        # halved in the streams' dtype before rounding: (a + b) may overflow the input's dtype
        return torch.add(stream_a, stream_b).div_(2).to(run.in_dtype)

    @staticmethod
    @_first_order  # a second-order backward raises instead of silently dropping terms
    def backward(ctx, grad_out):
        run = ctx.run
        try:
            run.pair = tuple(ctx.saved_tensors)
        except RuntimeError as e:
            raise StageFreedError(
                f"stage '{run.name}': backward was called a second time, but the reversible "
                f"stage freed its streams after the first. Run forward again, pass "
                f"retain_graph=True to the first backward, or use "
                f"revwire.set_engine(model, 'autograd')."
            ) from e
        run.owned.clear()
        run.finite.clear()
        if run.stage.debug:
            run.stage.last_reconstruction_error = [float("nan")] * len(run.stage.blocks)
        g = grad_out.to(run.seen_dtype) / 2
        return None, g, g, None, None


class _Block(torch.autograd.Function):
    """Block i of a stage: (x_{i-2}, x_{i-1}) -> (x_{i-1}, x_i), x_i = x_{i-2} + F_i(x_{i-1}).

    Inputs: the pass, i, whether to keep the block's graph (`keep_last`), the two streams
    as autograd sees them, then the stage's aux tensors and block i's parameters (so their
    gradients are returned). The values come from `run.cur`; nothing is saved: backward
    finds its outputs' values in `run.pair`.
    """

    @staticmethod
    def forward(ctx, run: _Pass, i: int, keep: bool, seen_a, seen_b, *tensors):
        stage = run.stage
        ctx.run, ctx.i = run, i
        a, b = run.cur
        run.rng.append(RngState.capture(run.device))
        if run.streams is not None:
            run.streams.append(a.clone())  # x_{i-2}, as backward will reconstruct it
        context = stage._context(run.metas, i, run.aux)
        if keep:
            # Runs with grad now, so backward need not recompute it (see ReversibleStage).
            ctx.kept = _recompute(run, i, b, keep_rng=False)
            y = ctx.kept[-1].detach()
        else:
            ctx.kept = None
            y = stage._run_block(i, b, run.in_dtype, context)
        a, b = b, a + y
        transition = stage.transitions[i] if i < len(stage.transitions) else None
        if transition is not None:
            ctx.shape = b.shape
            a, b = transition(a, *context), transition(b, *context)
            run.metas.append(meta_like(b))
        run.cur = (a, b)
        if a.dtype != seen_b.dtype:  # NOTE [ Streams and what autograd sees ]
            return _stand_in(a, seen_b.dtype), _stand_in(b, seen_b.dtype)
        return (seen_b if transition is None else a), b

    @staticmethod
    @_first_order
    def backward(ctx, g_a, g_b):
        with fsdp.block_backward(ctx.run.fsdp, ctx.i):
            grads = _invert(ctx, g_a, g_b)
        ctx.kept = None  # its graph was used; a retained second backward recomputes
        return (None, None, None, *grads)


def _invert(ctx, g_a, g_b) -> tuple:
    """Invert block i and back-propagate through it.

    With (a, b) = (x_{i-1}, x_i) in `run.pair` and (g_a, g_b) their gradients:

        y       = F_i(a)                 recomputed with grad (or kept from forward)
        x_{i-2} = b - y                  reconstructed in place (NOTE [ In-place reconstruction ])
        dx_{i-2} = g_b
        dx_{i-1} = g_a + J_F(a)^T g_b

    Leaves (x_{i-2}, x_{i-1}) in `run.pair`; returns the gradients of the node's inputs.
    """
    run, i = ctx.run, ctx.i
    stage = run.stage
    a, b = run.pair
    run.pair = None
    if not run.owns(b) and _unshared(b):  # NOTE [ In-place reconstruction ]
        run.own(b)
    transition = stage.transitions[i] if i < len(stage.transitions) else None
    if transition is not None:
        context = stage._context(run.metas, i, run.aux)
        moved = (a, b, g_a, g_b)
        a, b, g_a, g_b = _undo_layout(transition, ctx.shape, moved, context)
        for before, after in zip(moved, (a, b, g_a, g_b)):  # a view of a tensor we may not own
            if run.owns(before) or not _shares_storage(before, after):
                run.own(after)
    last = i == run.first and run.streams is None  # no node before this one needs x_{i-2}
    if last:
        # ... only that it is finite: b's total now, and b let go before the recompute
        b_total = _total(b) if stage.check_finite else None
        b = None
    if ctx.kept is not None:
        (inp, aliases, aux_leaves, y), ctx.kept = ctx.kept, None
    else:
        inp, aliases, aux_leaves, y = _recompute(run, i, a)
    leaves = [inp, *aliases, *[t for t in aux_leaves if t.requires_grad]]
    stage.check_leaves(i, y, leaves)
    with torch.no_grad():  # reconstruct first: y's values are then dead (NOTE [ Release y ])
        if last:
            older = None
            if stage.check_finite:  # x_{i-2} = b - y is finite if its total is
                run.finite.append(torch.isfinite(b_total - _total(y).to(b_total.dtype)))
        else:
            older = b.sub_(y) if run.owns(b) else run.own(torch.sub(b, y))  # x_{i-2}
            if stage.check_finite:
                run.finite.append(torch.isfinite(_total(older)))
    with torch.enable_grad():
        root = _Root.apply(y) if y.requires_grad else None
    del y
    if root is not None:
        # g_b as it is: autograd casts it to y's dtype inside, where the copy dies early
        grads = torch.autograd.grad(root, leaves, grad_outputs=g_b, allow_unused=True)
    else:  # F_i depends on neither its input nor a trainable tensor
        grads = (None,) * len(leaves)
    del root
    if run.owns(g_b) and any(g is not None and _shares_storage(g, g_b) for g in grads[1:]):
        # a parameter's or aux tensor's gradient *is* g_b (an add, a view passes it through):
        # autograd holds it, so it must not be accumulated into in place later
        run.disown(g_b)
    with torch.no_grad():
        if run.streams is not None:
            ref = run.streams[i]
            err = (older - ref).norm() / ref.norm().clamp_min(1e-30)
            stage.last_reconstruction_error[i] = float(err)
        g_inp = grads[0]
        if g_inp is None:
            g_older_b = g_a
        elif run.owns(g_a):
            g_older_b = g_a.add_(g_inp.to(g_a.dtype))
        else:
            g_older_b = run.own(g_a + g_inp.to(g_a.dtype))
    # The graph (and with it this `_Pass`) lives until the whole backward is done: the
    # stage's last node to run lets go of the streams so the earlier stages' backward does
    # not run beside them.
    run.pair = (older, a) if i != run.first else None
    if i == run.first and run.finite and run.device.type != "meta":  # meta tensors hold no values
        _raise_if_not_finite(run)
    n_params = len(aliases)
    param_grads = list(grads[1:1 + n_params])
    aux_grads_iter = iter(grads[1 + n_params:])
    aux_grads = [next(aux_grads_iter) if t.requires_grad else None for t in aux_leaves]
    return (g_b, g_older_b, *aux_grads, *param_grads)


def _recompute(run: _Pass, i: int, stream: torch.Tensor, keep_rng: bool = True):
    """Run block i with grad on a detached copy of `stream`: `(input, aliases, aux, output)`.

    The graph is built on detached aliases of the block's parameters and aux tensors (same
    storage): autograd.grad runs the hooks of the tensors it differentiates with respect
    to, so a `p.register_hook` would otherwise fire twice (here, and when the returned
    gradient reaches p). In backward the forward's RNG, autocast and BatchNorm state are
    replayed (`keep_rng=False`: this is the forward itself).
    """
    stage = run.stage
    params = stage.block_params(i)
    aliases = [p.detach().requires_grad_(True) for p in params]
    aux = tuple(t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                for t in run.aux)
    aux_leaves = [t for t in aux if isinstance(t, torch.Tensor)]
    with contextlib.ExitStack() as stack:
        if keep_rng:
            stack.enter_context(run.rng[i].replay())
            stack.enter_context(run.autocast.replay())
            stack.enter_context(frozen_running_stats(stage.block_norms(i)))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(_bound_params(stage.param_slots(i), dict(zip(map(id, params), aliases))))
        inp = stream.detach().to(run.in_dtype).requires_grad_(True)
        y = stage._run_block(i, inp, run.in_dtype, stage._context(run.metas, i, aux))
    return inp, aliases, aux_leaves, y


def _total(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` (float32 accumulation for half types), computed without a device sync
    or a stream-sized temporary: NaN or inf if any element is, which is all the finiteness
    check needs."""
    return t.sum(dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None)


def _raise_if_not_finite(run: _Pass) -> None:
    flags = torch.stack(run.finite)
    run.finite.clear()
    if bool(flags.all()):  # the one device sync of a stage's backward
        return
    n = len(run.stage.blocks)
    bad = n - 1 - int(flags.logical_not().nonzero()[0])
    raise ReconstructionError(
        f"stage '{run.name}', block {bad} ('{run.stage.names[bad]}'): backward reconstructed "
        f"a non-finite input. The forward overflowed or the inversion lost precision; "
        f"try stream_dtype=torch.float32 (or float64), a lower learning rate, or "
        f"revwire.set_engine(model, 'autograd') to compare."
    )


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A storage-free stand-in that carries only `t`'s shape."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    # The storage object itself, not its data pointer: fake and meta tensors all have 0.
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


# NOTE [ Release y ]
# Once x_{i-2} = x_i - y is reconstructed, the recomputed block output y is needed only as
# the root of its graph: backward reads its grad_fn, never its values. Held as the root of
# autograd.grad, its storage (one stream-sized tensor) would stay alive through the whole
# backward of the block, where the block's peak is. `_Root` takes y's place: a storage-free
# tensor of y's shape whose backward hands the gradient to y's grad_fn, so y's storage is
# freed as soon as the graph does not save it (a sigmoid that saved its own output keeps it).


class _Root(torch.autograd.Function):
    """y's stand-in as the root of its block's graph (NOTE [ Release y ])."""

    @staticmethod
    def forward(ctx, y):
        return _stand_in(y, y.dtype)

    @staticmethod
    def backward(ctx, g):
        return g


def _unshared(t: torch.Tensor) -> bool:
    """Whether the caller's reference is the only one to `t` and to its storage: no saved
    variable of a retained graph holds it (`_use_count`: references to the tensor) and no
    other tensor views its storage (the storage's use count: `t` and the temporary)."""
    return t._use_count() == 1 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2


def _undo_layout(transition, shape, tensors, context: tuple):
    """Undo a layout transition on each tensor: for a permutation P, P^-1 = P^T = VJP."""
    z = torch.empty(shape, dtype=tensors[0].dtype, device=tensors[0].device, requires_grad=True)
    with torch.enable_grad():
        moved = transition(z, *context)
    out = []
    for k, t in enumerate(tensors):
        (back,) = torch.autograd.grad(moved, z, grad_outputs=t.to(moved.dtype),
                                      retain_graph=k < len(tensors) - 1)
        out.append(back.to(t.dtype))
    return out


@contextlib.contextmanager
def _bound_params(slots, alias_of: Dict[int, torch.Tensor]) -> Iterator[None]:
    """Let every (module, name) slot holding a parameter p see `alias_of[id(p)]` instead.

    Tied parameters (one Parameter under several names, or one module registered twice)
    all see the same alias. `torch.func.functional_call(..., tie_weights=True)` is not
    used: on a module registered under two names it leaves the aliases in the module
    for good (torch 2.14), replacing the model's parameters.
    """
    swapped = []
    for m, name in slots:
        p = m._parameters.get(name)
        if p is not None and id(p) in alias_of:
            swapped.append((m, name, p))
    try:
        for m, name, p in swapped:
            m._parameters[name] = alias_of[id(p)]
        yield
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def foreign_grad_tensors(y: torch.Tensor, leaves: list) -> list:
    """Shapes of the trainable tensors the graph of `y` reads besides `leaves`."""
    if y.grad_fn is None:
        return []
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
    return foreign


def check_no_foreign_tensors(stage, i: int, y: torch.Tensor, leaves: list) -> None:
    """Raise if the recompute of block i reads a trainable tensor that is not one of its
    parameters: the reversible engine could not return that tensor's gradient, and it would
    silently differ from the autograd engine."""
    foreign = foreign_grad_tensors(y, leaves)
    if foreign:
        raise RewireError(
            f"stage '{stage.name}', block {i} ('{stage.names[i]}'): the block reads "
            f"{len(foreign)} tensor(s) that require grad but are not among its parameters "
            f"(shapes {foreign[:4]}), e.g. a closure over another module's parameters. The "
            f"reversible engine can only return gradients of the block's own parameters: make "
            f"the block an nn.Module that registers them, or use "
            f"revwire.set_engine(model, 'autograd')."
        )


def modules_of(block) -> List[nn.Module]:
    return list(block.modules()) if isinstance(block, nn.Module) else []
