"""Memory meters: the step peak of live tensor storage (any device), what autograd stores,
and peak CUDA memory.

`step_peak(fn, *args)` / `StepMeter` answer "does this training step fit": the peak of the
bytes of live tensor storages while `fn` runs (forward, backward, optimizer step), what
was alive at the start (the baseline), and what was alive at the peak, by op and module.
`train_step_peak` meters one steady-state training step of a model.
"""
from __future__ import annotations

import collections
import contextlib
import gc
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import InputError

# NOTE [ How the step meter counts ]
# A TorchDispatchMode sees every aten op that runs while it is active, in the forward and
# in the backward (the autograd engine carries the mode to its worker threads) and in the
# optimizer step. After each op, every output tensor's *untyped storage* is looked up by
# its StorageImpl address (`_cdata`): a new storage is counted once, with its `nbytes`
# (rounded up to `rounding`: 512 on CUDA, as the caching allocator does), and gets a
# `weakref.finalize` that fires when the StorageImpl dies -- whoever held it (Python,
# autograd's saved variables, the engine's input buffers, a checkpoint's closure).
# So views cost nothing, in-place ops cost nothing (their output is an input's storage;
# `resize_` is caught by re-reading `nbytes`), and a storage freed by autograd internals
# is uncounted when it is freed, not when Python forgets it.
#
# Finalizers only append the key to a deque; the counter is updated by the op that
# follows (before its outputs are registered, so an address reused by a new storage is
# never confused with the dead one). That keeps the count consistent when a finalizer
# fires inside the meter's own code or on an autograd thread, and costs nothing in
# accuracy: the peak is read after each op, when every earlier free has been drained.
#
# The baseline: storages alive when the meter starts. Those reachable from `roots`
# (modules: parameters, their .grad, buffers, tensor attributes; optimizers: their state;
# tensors and containers of tensors: the batch) are registered up front, by kind. A
# storage first seen as an *input* of an op during the run was alive before it (every
# op output is registered), so it joins the baseline as "unseen" and is added to every
# peak recorded so far (it was alive then too): the peak stays exact without knowing
# every tensor in the process up front.
#
# What is not counted: temporaries a kernel allocates and frees inside one op (the mode
# sees op boundaries), storages the meter cannot read (sparse, mkldnn, nested, some
# subclasses: counted in `untracked`), and on CUDA the allocator's slack and workspaces.
# On CPU the figure is therefore exact at op granularity; on CUDA `PeakReport.cuda` holds
# the allocator's own `max_memory_allocated` over the same run, to compare.

_BASELINE_KINDS = ("parameters", "gradients", "optimizer_state", "buffers", "inputs", "unseen")


@dataclass
class BreakdownRow:
    """Storages alive at the peak made by one (phase, op, module); baseline kinds have
    phase 'baseline' and the kind as op."""

    bytes: int
    count: int
    phase: str
    op: str
    module: str
    largest: str  # shape and dtype of the largest storage in the group

    def to_dict(self) -> Dict[str, Any]:
        return dict(bytes=self.bytes, count=self.count, phase=self.phase, op=self.op,
                    module=self.module, largest=self.largest)


@dataclass
class PeakReport:
    """What `step_peak` / `StepMeter` measured. Bytes are live storage bytes (rounded to
    `rounding` each); `peak` includes `baseline`."""

    peak: int
    baseline: int
    baseline_by_kind: Dict[str, int]
    end: int  # live bytes when the run ended
    phase_peaks: Dict[str, int]
    peak_phase: str
    peak_op: str
    peak_module: str
    breakdown: List[BreakdownRow]  # everything alive at the peak, largest group first
    ops: int
    untracked: int  # op outputs whose storage could not be read (not counted)
    device: Optional[str]
    rounding: int
    cuda: Optional[Dict[str, int]] = None  # {"allocated_at_start", "max_allocated"} (allocator)
    result: Any = field(default=None, repr=False)

    @property
    def above_baseline(self) -> int:
        """The peak minus what was alive at the start."""
        return self.peak - self.baseline

    def by_op(self) -> List[BreakdownRow]:
        """`breakdown` summed over modules: one row per (phase, op), largest first; its
        module is the largest group's, with '(+n)' for the n other modules."""
        groups: Dict[tuple, List[BreakdownRow]] = {}
        for r in self.breakdown:
            groups.setdefault((r.phase, r.op), []).append(r)
        rows = []
        for (phase, op), rs in groups.items():
            top = max(rs, key=lambda r: r.bytes)
            module = top.module + (f" (+{len(rs) - 1})" if len(rs) > 1 else "")
            rows.append(BreakdownRow(sum(r.bytes for r in rs), sum(r.count for r in rs), phase, op, module,
                                     top.largest))
        return sorted(rows, key=lambda r: (-r.bytes, r.phase, r.op))

    def to_dict(self, top: Optional[int] = None) -> Dict[str, Any]:
        rows = self.breakdown if top is None else self.breakdown[:top]
        return dict(peak=self.peak, baseline=self.baseline, above_baseline=self.above_baseline,
                    baseline_by_kind=dict(self.baseline_by_kind), end=self.end,
                    phase_peaks=dict(self.phase_peaks), peak_phase=self.peak_phase, peak_op=self.peak_op,
                    peak_module=self.peak_module, breakdown=[r.to_dict() for r in rows], ops=self.ops,
                    untracked=self.untracked, device=self.device, rounding=self.rounding, cuda=self.cuda)

    def format(self, top: int = 8) -> str:
        """A few lines: peak, baseline, and the largest groups alive at the peak."""
        mib = lambda n: f"{n / 2**20:,.2f} MiB"  # noqa: E731
        base = ", ".join(f"{k} {mib(v)}" for k, v in self.baseline_by_kind.items() if v)
        lines = [f"peak {mib(self.peak)} (baseline {mib(self.baseline)}: {base or 'none'}; "
                 f"above it {mib(self.above_baseline)}), after {self.peak_phase}:{self.peak_op} "
                 f"in {self.peak_module or '-'}"]
        for r in self.breakdown[:top]:
            lines.append(f"  {mib(r.bytes):>14}  {r.count:5d}x  {r.phase}:{r.op}  {r.module or '-'}  "
                         f"(largest {r.largest})")
        return "\n".join(lines)


def _device_filter(device) -> Tuple[Optional[torch.device], Callable[[torch.device], bool]]:
    if device is None:
        return None, lambda d: d.type != "meta"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"step meter: bad device {device!r} ({e})") from None
    if dev.type == "meta":
        raise InputError("step meter: meta tensors have no storage to count; pick a real device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("step meter: device cuda, but no CUDA device is available")
    if dev.index is None:
        return dev, lambda d: d.type == dev.type
    return dev, lambda d: d == dev


def _describe(t: torch.Tensor) -> Tuple[tuple, str]:
    return tuple(t.shape), str(t.dtype).replace("torch.", "")


class StepMeter(TorchDispatchMode):
    """Context manager: the peak of live tensor storage bytes while it is active.

        with StepMeter(roots=[model, opt, x]) as meter:
            with meter.phase("forward"):
                loss = model(x).sum()
            ...
        report = meter.report()

    `roots`: modules, optimizers and tensors (or lists / dicts of them) alive before the
    run; their storages form the named part of the baseline, and module names label the
    breakdown. `device`: count only storages there (default: every device but meta).
    `rounding`: round each storage up to a multiple of this (default 512 on CUDA, as the
    caching allocator does, else 1). See NOTE [ How the step meter counts ].
    """

    def __init__(self, roots: Iterable[Any] = (), device=None, rounding: Optional[int] = None):
        super().__init__()
        self._device, self._counts = _device_filter(device)
        if rounding is None:
            rounding = 512 if self._device is not None and self._device.type == "cuda" else 1
        if not isinstance(rounding, int) or isinstance(rounding, bool) or rounding < 1:
            raise InputError(f"step meter: rounding must be an integer >= 1, got {rounding!r}")
        self.rounding = rounding
        self._roots = list(roots) if isinstance(roots, (list, tuple)) else [roots]
        self._names: Dict[int, str] = {}
        self._records: Dict[int, list] = {}  # live storage key -> record
        self._all: List[list] = []  # [nbytes, born, died, phase, op, module, shape, dtype]
        self._finalizers: Dict[int, weakref.finalize] = {}
        self._dead: "collections.deque[int]" = collections.deque()
        self._stack: List[str] = []
        self._phase = "run"
        self.live = self.peak = self.nops = self.untracked = 0
        self._peak_at = (0, "start", "start", "")
        self._phase_peaks: Dict[str, int] = {}
        self._baseline_by_kind = {k: 0 for k in _BASELINE_KINDS}
        self._hooks: list = []
        self._active = False
        self._done = False
        self._cuda: Optional[Dict[str, int]] = None

    # ------------------------------------------------------------------ storages

    def _round(self, n: int) -> int:
        r = self.rounding
        return 0 if n == 0 else -(-n // r) * r

    def _storage(self, t) -> Optional[torch.UntypedStorage]:
        if not isinstance(t, torch.Tensor) or not self._counts(t.device):
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):
            self.untracked += 1
            return None

    def _add(self, t, born: int, phase: str, op: str, module: str) -> int:
        """Count t's storage if it is new; returns the bytes of a new storage (0 for one
        already counted, whose size is brought up to date: `resize_`)."""
        st = self._storage(t)
        if st is None:
            return 0
        key = st._cdata
        n = self._round(st.nbytes())
        rec = self._records.get(key)
        if rec is not None:
            if rec[0] != n:  # resized in place
                self.live += n - rec[0]
                rec[0] = n
            return 0
        shape, dtype = _describe(t)
        rec = [n, born, None, phase, op, module, shape, dtype]
        self._records[key] = rec
        self._all.append(rec)
        self.live += n
        fin = weakref.finalize(st, self._dead.append, key)
        fin.atexit = False
        self._finalizers[key] = fin
        return n

    def _drain(self, died: int) -> None:
        """Uncount the storages freed since the last drain; `died`: the first op after
        whose end they are no longer alive."""
        while self._dead:
            key = self._dead.popleft()
            rec = self._records.pop(key, None)
            self._finalizers.pop(key, None)
            if rec is not None:
                self.live -= rec[0]
                rec[2] = died

    def _register_baseline(self, t, kind: str) -> None:
        self._baseline_by_kind[kind] += self._add(t, 0, "baseline", kind, "")

    def _register_roots(self) -> None:
        modules, optimizers, tensors = [], [], []
        for root in self._roots:
            if isinstance(root, nn.Module):
                modules.append(root)
            elif isinstance(root, torch.optim.Optimizer):
                optimizers.append(root)
            else:
                leaves = tree_leaves(root)
                bad = [type(v).__name__ for v in leaves if not isinstance(v, torch.Tensor) and v is not None]
                if bad:
                    raise InputError(f"step meter: roots must be modules, optimizers or tensors "
                                     f"(or containers of them), got {bad[0]}")
                tensors += [v for v in leaves if isinstance(v, torch.Tensor)]
        for i, m in enumerate(modules):
            for name, sub in m.named_modules(prefix="" if i == 0 else f"root{i}", remove_duplicate=False):
                self._names.setdefault(id(sub), name or type(m).__name__)
        for m in modules:  # parameters first: a buffer sharing a parameter's storage is a parameter
            for p in m.parameters():
                self._register_baseline(p, "parameters")
        for m in modules:
            for p in m.parameters():
                if p.grad is not None:
                    self._register_baseline(p.grad, "gradients")
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    self._register_baseline(p, "parameters")
                    if p.grad is not None:
                        self._register_baseline(p.grad, "gradients")
            for state in opt.state.values():
                for v in tree_leaves(state):
                    self._register_baseline(v, "optimizer_state")
        for m in modules:
            for sub in m.modules():
                for b in sub._buffers.values():
                    self._register_baseline(b, "buffers")
                for v in vars(sub).values():
                    if isinstance(v, torch.Tensor):
                        self._register_baseline(v, "buffers")
        for t in tensors:
            self._register_baseline(t, "inputs")

    # ------------------------------------------------------------------ modules

    def _module_name(self, m: nn.Module) -> str:
        return self._names.get(id(m)) or type(m).__name__

    def _pre_hook(self, module, args):
        name = self._module_name(module)
        # nodes made before this module (outside any module, or by the caller) are the
        # caller's: label them now so that this module's post-hook does not claim them
        self._label_graph(tree_leaves(args), self._stack[-1] if self._stack else "")
        self._stack.append(name)

    def _post_hook(self, module, args, output):
        name = self._stack.pop() if self._stack else self._module_name(module)
        self._label_graph(tree_leaves(output), name)

    @staticmethod
    def _label_graph(leaves, name: str) -> None:
        """Label the autograd nodes behind `leaves` not yet labeled with `name` (the
        module whose forward made them, innermost first): the backward's ops are then
        attributed to the module of the node that runs them."""
        todo = [t.grad_fn for t in leaves if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None:
                continue
            meta = node.metadata
            if "revwire_module" in meta:
                continue
            meta["revwire_module"] = name
            todo.extend(n for n, _ in node.next_functions)

    def _current_module(self) -> str:
        if self._stack:
            return self._stack[-1]
        node = torch._C._current_autograd_node()
        if node is not None:
            return node.metadata.get("revwire_module", "")
        return ""

    # ------------------------------------------------------------------ the mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.nops += 1
        self._drain(self.nops)  # freed since the last op ended: not alive when this one ends
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                added = self._add(t, 0, "baseline", "unseen", "")
                if added:  # alive before the run: it was alive at every peak so far, too
                    self._baseline_by_kind["unseen"] += added
                    self.peak += added
                    for k in self._phase_peaks:
                        self._phase_peaks[k] += added
        out = func(*args, **kwargs)
        self._drain(self.nops)
        op = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        module = self._current_module()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, self.nops, self._phase, op, module)
        schema = getattr(func, "_schema", None)
        if schema is not None and schema.is_mutable:
            for t in tree_leaves((args, kwargs)):  # resize_ / set_ and friends
                if isinstance(t, torch.Tensor):
                    self._add(t, self.nops, self._phase, op, module)
        self._note_peak(op, module)
        return out

    def _note_peak(self, op: str, module: str) -> None:
        if self.live > self.peak:
            self.peak = self.live
            self._peak_at = (self.nops, self._phase, op, module)
        if self.live > self._phase_peaks.get(self._phase, -1):
            self._phase_peaks[self._phase] = self.live

    @contextlib.contextmanager
    def phase(self, name: str):
        """Label the ops run inside (e.g. "forward", "backward", "optimizer"); each phase
        gets its own peak in the report."""
        if not isinstance(name, str) or not name or name == "baseline":
            raise InputError(f"step meter: a phase is a non-empty name other than 'baseline', got {name!r}")
        old, self._phase = self._phase, name
        self._drain(self.nops + 1)
        self._phase_peaks.setdefault(name, self.live)
        try:
            yield self
        finally:
            self._drain(self.nops + 1)
            self._phase = old

    def __enter__(self):
        if self._active or self._done:
            raise InputError("step meter: a StepMeter runs once; make a new one")
        gc.collect()  # free dead cycles now, not in the middle of the run
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            self._cuda = {"allocated_at_start": torch.cuda.memory_allocated(self._device)}
        self._register_roots()
        self.peak = self.live
        self._phase_peaks[self._phase] = self.live
        from torch.nn.modules import module as _m
        self._hooks = [_m.register_module_forward_pre_hook(self._pre_hook),
                       _m.register_module_forward_hook(self._post_hook, always_call=True)]
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            if self._cuda is not None:
                torch.cuda.synchronize(self._device)
                self._cuda["max_allocated"] = torch.cuda.max_memory_allocated(self._device)
            self._drain(self.nops + 1)
            self._end = self.live
            for fin in self._finalizers.values():  # storages still alive: stop watching them
                fin.detach()
            self._finalizers.clear()
            self._records.clear()
            self._active, self._done = False, True

    # ------------------------------------------------------------------ the report

    def report(self, result: Any = None) -> PeakReport:
        """What was measured (call after the `with` block)."""
        if not self._done:
            raise InputError("step meter: call report() after the `with StepMeter(...)` block")
        at, phase, op, module = self._peak_at
        groups: Dict[tuple, list] = {}
        for n, born, died, ph, o, mod, shape, dtype in self._all:
            if born <= at and (died is None or died > at):
                g = groups.setdefault((ph, o, mod), [0, 0, -1, ""])
                g[0] += n
                g[1] += 1
                if n > g[2]:
                    g[2], g[3] = n, f"{'x'.join(map(str, shape)) or 'scalar'} {dtype}"
        rows = sorted((BreakdownRow(v[0], v[1], k[0], k[1], k[2], v[3]) for k, v in groups.items()),
                      key=lambda r: (-r.bytes, r.phase, r.op, r.module))
        baseline = sum(self._baseline_by_kind.values())
        return PeakReport(
            peak=self.peak, baseline=baseline, baseline_by_kind=dict(self._baseline_by_kind),
            end=self._end, phase_peaks=dict(self._phase_peaks), peak_phase=phase, peak_op=op,
            peak_module=module, breakdown=rows, ops=self.nops, untracked=self.untracked,
            device=None if self._device is None else str(self._device), rounding=self.rounding,
            cuda=dict(self._cuda) if self._cuda is not None else None, result=result)


def step_peak(fn: Callable, *args, roots: Iterable[Any] = (), device=None,
              rounding: Optional[int] = None) -> PeakReport:
    """Run `fn(*args)` under a `StepMeter` and return its `PeakReport` (`.result` holds
    what `fn` returned). `args` are part of the baseline (as inputs), with `roots`."""
    if not callable(fn):
        raise InputError(f"step_peak expects a callable, got {type(fn).__name__}")
    roots = list(roots) if isinstance(roots, (list, tuple)) else [roots]
    roots += [a for a in args if isinstance(a, (nn.Module, torch.optim.Optimizer))]
    roots += [t for t in tree_leaves(list(args)) if isinstance(t, torch.Tensor)]
    meter = StepMeter(roots=roots, device=device, rounding=rounding)
    with meter:
        result = fn(*args)
    return meter.report(result)


def _default_loss(out) -> torch.Tensor:
    leaves = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not leaves:
        raise InputError("train_step_peak: the model returned no floating tensor to take a loss of; pass loss_fn")
    return sum(t.float().mean() for t in leaves)


def train_step_peak(model: nn.Module, inputs, targets: Optional[torch.Tensor] = None, *,
                    loss_fn: Optional[Callable] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                    autocast_dtype: Optional[torch.dtype] = None, device=None,
                    warmup: int = 1) -> PeakReport:
    """The step peak of one steady-state training step of `model` on `inputs`: forward
    (under autocast if `autocast_dtype`), loss, backward, optimizer step (AdamW, lr 1e-6,
    unless `optimizer`), after `warmup` unmetered steps. It trains `model` (those steps
    update its parameters) and leaves its gradients allocated (zeros). See NOTE [ The
    metered training step ].

    `loss_fn(output, targets)` (or `loss_fn(output)` without targets; default:
    cross-entropy with targets, else the sum of the outputs' means). The report's
    `above_baseline` is the step's activation peak: its baseline is the parameters, their
    gradients, the optimizer state, the buffers and the batch.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"train_step_peak expects an nn.Module, got {type(model).__name__}")
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    leaves = tree_leaves(inputs)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise InputError("train_step_peak: inputs must be a tensor or a non-empty tuple of tensors "
                         "(or of lists of tensors, for a list input: ([slow, fast],))")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < (0 if optimizer is not None else 1):
        raise InputError(f"train_step_peak: warmup must be an integer >= 1 (>= 0 with an optimizer that "
                         f"already stepped): the optimizer state must exist before the metered step; "
                         f"got {warmup!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("train_step_peak: the model has no parameter that requires grad")
    opt = optimizer if optimizer is not None else torch.optim.AdamW(params, lr=1e-6)
    if loss_fn is None:
        loss_fn = (lambda out, t: torch.nn.functional.cross_entropy(out.float(), t)) if targets is not None \
            else (lambda out: _default_loss(out))
    dev_type = leaves[0].device.type
    meter: Optional[StepMeter] = None

    def phase(name):
        return meter.phase(name) if meter is not None else contextlib.nullcontext()

    def step():
        with phase("forward"):
            with torch.autocast(dev_type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                # a fresh list per call: some models (pytorchvideo's) write into a list input
                out = model(*(list(a) if isinstance(a, list) else a for a in inputs))
            loss = loss_fn(out, targets) if targets is not None else loss_fn(out)
            del out
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=False)
        return loss.detach()

    was_training = model.training
    model.train()
    try:
        for _ in range(warmup):
            step()
        opt.zero_grad(set_to_none=False)
        meter = StepMeter(roots=[model, opt, leaves, targets], device=device or leaves[0].device)
        with meter:
            loss = step()
        return meter.report(loss)
    finally:
        model.train(was_training)


# NOTE [ The metered training step ]
# The step `train_step_peak` meters runs with the gradients already allocated (zeroed in
# place after the warm-up, `zero_grad(set_to_none=False)`), as every micro-batch but the
# first of gradient accumulation does. Then parameters, gradients, optimizer state,
# buffers and batch are all alive at the start -- the baseline -- and the peak minus the
# baseline is exactly the memory the step adds on top of the model's state: activations
# kept for backward, what the backward recomputes, gradient temporaries before they are
# accumulated, the optimizer's temporaries. That is the "activation peak" the benchmarks
# report. With `set_to_none=True` gradients are born during backward instead, and the
# step's peak can be lower by up to their size (a method that holds a stage's gradients
# until its end pays nothing for it there).


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


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr()), storage.nbytes()


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


__all__ = ["StepMeter", "PeakReport", "BreakdownRow", "step_peak", "train_step_peak",
           "saved_tensor_bytes", "model_saved_bytes", "cuda_peak_bytes"]
