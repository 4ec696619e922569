"""Clip classification on the synthetic trimmed clips: pretraining (the recipe's Kinetics step)
and recovery of a rewired backbone (a short fine-tune, optionally distilled toward the original).

Used by recipe.py; the clips come from ``synthetic.ensure_clip_dataset`` and are augmented with
the localisation data's own crop/flip/normalisation (datasets.py), the optimiser and schedule are
train.py's (AdamW with separate backbone / head learning rates, warm-up then cosine).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from configs import Config, DataConfig
from datasets import crop_resize, to_clip
from train import build_optimizer, optimizer_step, warmup_cosine


class ClipSet(Dataset):
    """The `subset` ("train" or "val") of a clip folder; training items are randomly cropped and flipped."""

    def __init__(self, root: Path, subset: str, cfg: DataConfig, train: bool):
        root = Path(root)
        meta = json.loads((root / "meta.json").read_text())
        self.classes: List[str] = meta["classes"]
        self.labels: List[int] = meta[f"{subset}_labels"]
        self.clips = np.load(root / f"{subset}.npy", mmap_mode="r")   # N, T, H, W, 3 uint8
        self.cfg, self.train = cfg, train

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        cfg = self.cfg
        frames = torch.from_numpy(np.array(self.clips[i])).permute(0, 3, 1, 2)   # T, 3, H, W
        if self.train:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))   # follows torch's seeding
            short = cfg.resize * rng.uniform(*cfg.scale_jitter)
            x = crop_resize(frames, short, cfg.crop, tuple(rng.random(2)), cfg.flip and rng.random() < 0.5)
        else:
            x = crop_resize(frames, cfg.resize, cfg.crop, (0.5, 0.5), False)
        return to_clip(x, len(frames), cfg), self.labels[i]


def clip_loaders(root: Path, cfg: Config, batch_size: int, seed: int):
    """(train loader, val loader) of the clip folder `root`, with the data settings of `cfg`."""
    g = torch.Generator()
    g.manual_seed(seed)
    train_ds, val_ds = ClipSet(root, "train", cfg.data, True), ClipSet(root, "val", cfg.data, False)
    workers = cfg.data.num_workers
    train = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True, generator=g,
                       num_workers=workers, persistent_workers=workers > 0)
    val = DataLoader(val_ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return train, val


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    """Top-1 accuracy of `model` on `loader` (eval mode)."""
    model.eval()
    right = total = 0
    for clip, label in loader:
        right += int((model(clip).argmax(-1) == label).sum())
        total += len(label)
    return right / max(total, 1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened logits, times T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def fit(model: torch.nn.Module, train_loader, val_loader, cfg: Config, epochs: int,
        teacher: Optional[torch.nn.Module] = None, distill_weight: float = 1.0, temperature: float = 2.0,
        on_epoch: Optional[Callable[[Dict], None]] = None, log: Callable = print, tag: str = "") -> List[Dict]:
    """Train `model` (a ClipClassifier) for `epochs` with cross-entropy (+ distillation toward
    `teacher`'s logits when given); returns one entry per epoch with the loss and val accuracy.

    Learning rates, weight decay, warm-up and clipping come from ``cfg.train``.
    """
    t = cfg.train
    optimizer = build_optimizer(model, cfg)
    steps = max(1, len(train_loader))
    scheduler = warmup_cosine(optimizer, int(t.warmup_epochs * steps), epochs * steps, t.min_lr_ratio)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0, sums, n = time.time(), {"loss": 0.0, "ce": 0.0, "kd": 0.0}, 0
        for clip, label in train_loader:
            logits = model(clip)
            ce = F.cross_entropy(logits, label)
            loss = ce
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(clip)
                kd = distill_loss(logits, target, temperature)
                loss = ce + distill_weight * kd
                sums["kd"] += kd.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{tag} epoch {epoch}: the loss is {float(loss)}; lower the learning rate")
            optimizer_step(loss, optimizer, scheduler, t.clip_grad)
            sums["loss"] += loss.item()
            sums["ce"] += ce.item()
            n += 1
        train_s = time.time() - t0
        entry = {"epoch": epoch, **{k: round(v / max(n, 1), 5) for k, v in sums.items()},
                 "val_acc": round(accuracy(model, val_loader), 5), "epoch_s": round(time.time() - t0, 2),
                 "step_s": round(train_s / max(n, 1), 4)}
        if teacher is None:
            entry.pop("kd")
        history.append(entry)
        log(f"{tag}epoch {epoch:3d}/{epochs} loss {entry['loss']:.4f} val acc {entry['val_acc']:.4f} "
            f"{entry['epoch_s']:.1f}s", flush=True)
        if on_epoch is not None:
            on_epoch(entry)
    return history
