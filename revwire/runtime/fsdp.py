"""FSDP2 (`fully_shard`): gather a sharded block's parameters around its forward and recompute.

A rewired model calls a layer's submodules (its Linear, its LayerNorm), never the layer: the
hooks of `fully_shard(layer)` never fire and its parameters stay sharded. Sharded per
Linear, the hooks do fire, but inside the recompute as well, where they swap the modules'
parameters and undo the aliases the recompute binds. So a stage does FSDP's job for the
parameter groups whose hooks do not run around it: it all-gathers a block's groups around
the block's forward and its recompute, keeps FSDP's own hooks quiet meanwhile, and hands
each group to FSDP's `post_backward` (reduce-scatter, reshard) once no block left in the
backward reads it. Groups FSDP already holds gathered (the root's, around the whole
forward) are left to FSDP.

Memory: the reversible engine gathers one block's groups at a time, in forward and in
backward, as FSDP does per layer. The autograd engine's graph saves the gathered weights,
so with grad it gathers the stage's groups block by block and keeps them gathered until
FSDP's root reduce-scatters them at the end of backward (like `reshard_after_forward=False`
for the stage); without grad it reshards after each block.

Nothing here imports `torch.distributed` when FSDP was never imported: then nothing is
sharded, and `begin` returns None after one dictionary lookup.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Dict, Iterator, List, Optional, Tuple

from torch import nn

from ..errors import RewireError

_FSDP_STATE = "torch.distributed.fsdp._fully_shard._fsdp_state"
_NOTHING = contextlib.nullcontext()

# NOTE [ How a stage composes with FSDP2 ]
# FSDP moves each parameter between two Parameter objects: the sharded one (a DTensor) and
# the unsharded one, set into `module._parameters` by `unshard` and back by `reshard`. The
# unsharded Parameter is one object for the module's lifetime (its storage is freed and
# re-allocated), and FSDP's `post_backward` reduce-scatters `unsharded_param.grad`. So:
#
# - Forward of block i: its groups are unsharded *before* its parameters are read, so the
#   unsharded Parameters are the inputs of its `_Block` node and autograd accumulates their
#   gradients into `unsharded_param.grad`. A group the next block reads too (a transformer
#   layer's attention and MLP branches) is gathered once for both.
# - Hooks muted: while a block runs, the FSDP states of its groups are set to PRE_BACKWARD,
#   the state in which FSDP's own pre- and post-forward hooks do nothing (how FSDP composes
#   with activation checkpointing): a Linear's hooks neither reshard it after its forward
#   nor swap out the aliases `_bound_params` put in the recompute.
# - Backward of block i: `pre_backward` (unshard, state PRE_BACKWARD), recompute, return
#   the gradients. A group whose lowest reader was block i+1 gets its `post_backward` when
#   block i's node starts: autograd runs the AccumulateGrad nodes of block i+1's parameters
#   before the next node (they are first in its ready queue), so every gradient of the group
#   is in `unsharded_param.grad` by then. What is left (the groups of the lowest block whose
#   node runs, of frozen blocks) is done by FSDP's root final callback, which calls
#   `post_backward` on every group not in POST_BACKWARD; a group already done is skipped, and
#   one gathered again later (a second stage reads it) is back in PRE_BACKWARD, so each
#   gradient is reduce-scattered exactly once.
# - Which groups: those whose parameters fill the block's parameter slots, found through
#   FSDP's module-state registry by (module, name) and cached per stage; the cache is
#   rebuilt when the registry changes (fully_shard applied after a first forward). A group in
#   FORWARD is held gathered by an enclosing FSDP module that is running its forward (the
#   root's LayerNorms under per-Linear sharding): FSDP's own hooks manage it.
# - This drives FSDP2's groups and states as torch 2.14 has them (`_training_state`,
#   `_fsdp_param_groups`, `FSDPParam._module_info`, the module-state registry), which are not
#   public API: tests/runtime/test_fsdp.py checks gradients and every collective against them.

_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # stage -> (token, plan)


def begin(stage) -> Optional["Sharded"]:
    """FSDP's part in one pass of `stage`: None where no block reads a `fully_shard`-ed
    parameter (the common case, and then nearly free)."""
    fsdp_state = sys.modules.get(_FSDP_STATE)
    if fsdp_state is None:  # FSDP never imported: nothing can be sharded
        return None
    registry = sys.modules["torch.distributed._composable_state"]._module_state_mapping.data
    token = (len(registry), next(reversed(registry), None))  # fully_shard appends to it
    cached = _plans.get(stage)
    if cached is None or cached[0] != token:
        cached = (token, _plan(stage, registry, fsdp_state.FSDPState))
        _plans[stage] = cached
    plan = cached[1]
    return Sharded(stage, plan, fsdp_state.TrainingState) if plan is not None else None


def block_forward(sharded: Optional["Sharded"], i: int, keep: bool = False):
    """Around block i's forward: its groups gathered and FSDP's hooks muted; resharded after
    it (unless the next block reads them, or `keep`: the autograd engine's saved graph)."""
    return _NOTHING if sharded is None else sharded.forward(i, keep)


def block_backward(sharded: Optional["Sharded"], i: int):
    """Around block i's backward (recompute included): the groups no block left reads are
    reduce-scattered, block i's gathered again, FSDP's hooks muted."""
    return _NOTHING if sharded is None else sharded.backward(i)


def _plan(stage, registry, state_type) -> Optional[List[tuple]]:
    """Per block, the `(state, group)` pairs whose parameters fill its slots; None if none."""
    owner: Dict[Tuple[int, str], tuple] = {}
    for ref in list(registry.values()):  # module (weakly) -> state (weakly)
        state = ref()
        if not isinstance(state, state_type):
            continue
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                for module, name in ((info.module, info.param_name),
                                     *zip(info.shared_modules, info.shared_param_names)):
                    owner[(id(module), name)] = (state, group)
    plan = []
    for i in range(len(stage.blocks)):
        found = {}
        for module, name in stage.param_slots(i):
            hit = owner.get((id(module), name))
            if hit is not None:
                found[id(hit[1])] = hit
        plan.append(tuple(found.values()))
    return plan if any(plan) else None


class Sharded:
    """The groups one pass of a stage gathers itself, block by block (NOTE [ How a stage
    composes with FSDP2 ])."""

    def __init__(self, stage, plan: List[tuple], training_state):
        self.stage = stage
        self.plan = plan
        self.TrainingState = training_state  # FSDP's enum
        self.ours: List[tuple] = [()] * len(plan)  # per block, decided in its forward
        self.lowest: Dict[object, int] = {}  # group -> the lowest block that read it in forward

    @contextlib.contextmanager
    def forward(self, i: int, keep: bool) -> Iterator[None]:
        ours = tuple((s, g) for s, g in self.plan[i] if g._training_state != self.TrainingState.FORWARD)
        self.ours[i] = ours
        for state, group in ours:
            self._check_initialized(i, state, group)
            self.lowest.setdefault(group, i)
            group.unshard(group.unshard_async_op)
            group.wait_for_unshard()
        with self._muted(ours):
            yield
        if keep:
            return
        following = {id(g) for _, g in self.plan[i + 1]} if i + 1 < len(self.plan) else set()
        for _, group in ours:
            if id(group) not in following:
                with group.use_training_state(self.TrainingState.FORWARD):  # honours reshard_after_forward
                    group.reshard()

    @contextlib.contextmanager
    def backward(self, i: int) -> Iterator[None]:
        if i + 1 < len(self.ours):
            for _, group in self.ours[i + 1]:
                if self.lowest[group] == i + 1 and group._training_state == self.TrainingState.PRE_BACKWARD:
                    group.post_backward()
        for _, group in self.ours[i]:
            group.pre_backward(False)  # unshard; no prefetch (FSDP's order does not list it)
        with self._muted(self.ours[i]):
            yield

    @contextlib.contextmanager
    def _muted(self, pairs: tuple) -> Iterator[None]:
        states = {id(s): s for s, _ in pairs}.values()
        before = [(s, s._training_state) for s in states]
        for s in states:
            s._training_state = self.TrainingState.PRE_BACKWARD
        try:
            yield
        finally:
            for s, state in before:
                s._training_state = state

    def _check_initialized(self, i: int, state, group) -> None:
        if state._is_root is not None:
            return
        stage, block = self.stage, self.stage.blocks[i]
        paths = {id(m): path for path, m in block.named_modules()} if isinstance(block, nn.Module) else {}
        infos = [p._module_info for p in group.fsdp_params]
        info = next((f for f in infos if id(f.module) in paths), infos[0])  # one block i reads
        where = ".".join(filter(None, (paths.get(id(info.module)), info.param_name)))
        raise RewireError(
            f"stage '{stage.name}', block {i} ('{stage.names[i]}'): its parameter '{where}' is "
            f"sharded by fully_shard, but no FSDP root has run its forward around the stage, so "
            f"nothing would gather the parameters or reduce-scatter their gradients. Apply "
            f"fully_shard to the model's root as well, after its layers."
        )
