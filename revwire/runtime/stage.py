"""`ReversibleStage`: a chain of residual branches run with the re2tal coupling.

A stage runs blocks F_1..F_N with the coupling (docs/design.md §2)

    x_i = x_{i-2} + F_i(x_{i-1}),   x_{-1} = x_0 = input,   output = (x_{N-1} + x_N) / 2

With the "reversible" engine (`runtime/engine.py`) it keeps only the final pair of
streams and reconstructs the rest in backward; parameter gradients are returned through
autograd, so DDP hooks, gradient accumulation, GradScaler and `torch.autograd.grad` work
unchanged. The "autograd" engine runs the same computation with ordinary autograd: the
ground truth that the reversible engine is tested against.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ..errors import BlockShapeError, RewireError
from ..options import ENGINES
from . import fsdp
from .engine import check_no_foreign_tensors, meta_like, modules_of, reversible_forward
from .replay import stat_tracking_norms


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
        self._slots: Dict[int, list] = {}  # per block: (module, name) of every parameter slot
        self._block_modules: Dict[int, list] = {}  # per block: its modules

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

    def param_slots(self, i: int) -> list:
        """`(module, name)` of every parameter slot in block i (walked once, then cached;
        the parameters themselves are read from the slots each time)."""
        slots = self._slots.get(i)
        if slots is None:
            slots = [(m, name) for m in self._modules_of(i)
                     for name, p in m._parameters.items() if p is not None]
            self._slots[i] = slots
        return slots

    def _modules_of(self, i: int) -> list:
        """Block i's modules, walked once (the module tree of a built stage does not change)."""
        modules = self._block_modules.get(i)
        if modules is None:
            modules = self._block_modules[i] = modules_of(self.blocks[i])
        return modules

    def block_params(self, i: int) -> List[nn.Parameter]:
        """Block i's parameters that require grad, each once, in a fixed order."""
        seen, params = set(), []
        for m, name in self.param_slots(i):
            p = m._parameters.get(name)
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def block_norms(self, i: int) -> list:
        """Block i's norms that track running statistics (frozen in its recompute)."""
        return stat_tracking_norms(self._modules_of(i))

    def check_leaves(self, i: int, y: torch.Tensor, leaves: list) -> None:
        """Once per block: its recompute reads no trainable tensor but its own leaves."""
        if i not in self._leaves_checked:
            check_no_foreign_tensors(self, i, y, leaves)
            self._leaves_checked.add(i)

    def forward(self, x: torch.Tensor, *aux) -> torch.Tensor:
        """`aux`: values computed before the stage that every block reads (shapes, an
        attention mask, a rotary table); tensors among them get their gradients."""
        if self.engine == "reversible" and torch.is_grad_enabled() and (
                x.requires_grad or any(isinstance(t, torch.Tensor) and t.requires_grad for t in aux)
                or any(self.block_params(i) for i in range(len(self.blocks)))):
            return reversible_forward(self, x, aux)
        return self._forward_autograd(x, aux)

    # -- pieces shared by both engines --------------------------------------------

    def stream_dtype_for(self, x: torch.Tensor) -> torch.dtype:
        """`stream_dtype`, or by default float64 where a stream in the input's dtype would
        not invert exactly: under autocast, or for a half-precision input."""
        if self.stream_dtype is not None:
            return self.stream_dtype
        if x.dtype in (torch.float16, torch.bfloat16) or _autocast_on(x.device):
            return torch.float32 if x.device.type == "mps" else torch.float64  # mps has no float64
        return x.dtype

    def _stream(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.stream_dtype_for(x))

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
        metas = [meta_like(b)]
        sharded, keep = fsdp.begin(self), torch.is_grad_enabled()  # the graph saves gathered params
        for i in range(len(self.blocks)):
            context = self._context(metas, i, aux)
            with fsdp.block_forward(sharded, i, keep):
                a, b = b, a + self._run_block(i, b, x.dtype, context)
            if i < len(self.transitions) and self.transitions[i] is not None:
                a, b = self.transitions[i](a, *context), self.transitions[i](b, *context)
                metas.append(meta_like(b))
        return ((a + b) / 2).to(x.dtype)


def _autocast_on(device: torch.device) -> bool:
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


class _Callable(nn.Module):
    """A plain function as a registered block (it holds no parameters of its own)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", type(self.fn).__name__)



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
