"""What a recompute in backward must reproduce of the forward: RNG, autocast, BatchNorm.

The reversible engine runs each block twice, once in forward (no grad) and once in
backward (with grad). The two runs must compute the same function: the same dropout
masks, the same autocast casts, and BatchNorm must not count the batch twice.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm


@dataclass(frozen=True)
class RngState:
    """CPU RNG state, and that of one CUDA device when the input lives there."""

    cpu: torch.Tensor
    device: Optional[torch.device]
    device_state: Optional[torch.Tensor]

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        if device.type == "cuda":
            return cls(torch.get_rng_state(), device, torch.cuda.get_rng_state(device))
        return cls(torch.get_rng_state(), None, None)

    @contextlib.contextmanager
    def replay(self):
        """Run the body with this state, then give back the RNG state it found."""
        devices = [self.device] if self.device is not None else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.device_state, self.device)
            yield


@dataclass(frozen=True)
class AutocastState:
    """Autocast settings of the CPU and of the input's device at forward time."""

    settings: tuple  # of (device_type, enabled, dtype)
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> "AutocastState":
        # meta tensors (models planned or initialised without memory) have no autocast
        types = ["cpu"] if device.type in ("cpu", "meta") else [device.type, "cpu"]
        settings = tuple(
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types
        )
        return cls(settings, torch.is_autocast_cache_enabled())

    @contextlib.contextmanager
    def replay(self):
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.settings:
                stack.enter_context(
                    torch.autocast(device_type, dtype=dtype, enabled=enabled,
                                   cache_enabled=self.cache_enabled)
                )
            yield


def stat_tracking_norms(modules: Iterable[nn.Module]) -> list:
    """Norms that update running statistics in train mode: BatchNorm (torch's and subclasses
    such as SyncBatchNorm or timm's BatchNormAct2d) and InstanceNorm(track_running_stats=True)."""
    return [m for m in modules
            if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.track_running_stats]


@contextlib.contextmanager
def frozen_running_stats(norms: list):
    """Recompute a train-mode norm without updating its running statistics.

    With `track_running_stats=False` a train-mode BatchNorm normalizes with the batch
    statistics, exactly as in forward, and neither reads nor updates its buffers (nor
    `num_batches_tracked`). InstanceNorm updates any running buffers it is given whatever
    that flag says, so its buffers are hidden (set to None) for the recompute instead.
    """
    active = [m for m in norms if m.training and m.track_running_stats]
    hidden = []
    try:
        for m in active:
            if isinstance(m, _InstanceNorm):
                hidden.append((m, m.running_mean, m.running_var))
                m.running_mean = None
                m.running_var = None
            else:
                m.track_running_stats = False
        yield
    finally:
        for m in active:
            if not isinstance(m, _InstanceNorm):
                m.track_running_stats = True
        for m, mean, var in hidden:
            m.running_mean = mean
            m.running_var = var


# NOTE [ Scratch running statistics ]
# `frozen_running_stats` turns `track_running_stats` off, which makes BatchNorm run another
# op (the no-stats variant) that saves other tensors for backward. A recompute matched to
# the forward's saved tensors by position (non-reentrant `torch.utils.checkpoint`) must run
# the same ops, so there the norms update scratch copies of their buffers instead, which
# are dropped afterwards: the same ops, the same saved tensors, the batch counted once.
_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def scratch_running_stats(norms: list):
    """Recompute train-mode norms with the same ops, their statistics updates discarded."""
    swapped = [(m, name, m._buffers[name]) for m in norms if m.training and m.track_running_stats
               for name in _STAT_BUFFERS if m._buffers.get(name) is not None]
    try:
        for m, name, buf in swapped:
            m._buffers[name] = buf.clone()
        yield
    finally:
        for m, name, buf in swapped:
            m._buffers[name] = buf
