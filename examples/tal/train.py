"""Train the temporal action localiser end to end through a rewired video backbone.

    python examples/tal/train.py                                  # synthetic data, tiny preset, CPU
    python examples/tal/train.py --engine checkpoint              # or autograd | frozen
    python examples/tal/train.py --config thumos14 --annotations gt.json --media-root frames/
    torchrun --nproc_per_node 8 examples/tal/train.py --config anet --annotations ... --media-root ...
    python examples/tal/train.py --resume runs/tiny_reversible/last.pt
    python examples/tal/train.py --eval-only --resume runs/tiny_reversible/last.pt

Every `eval_every` epochs (and after the last) the held-out subset is predicted with sliding
windows and the EMA weights, written in the ActivityNet results format to
``OUT/predictions.json`` and scored (metrics.py). One log line per epoch goes to stdout and
``OUT/log.jsonl``; ``OUT/last.pt`` is the checkpoint to resume from.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from configs import ENGINES, PRESETS, Config, apply_override, copy_config, get_config, validate
from data import atomic_write_json, class_names, default_file_mode, load_annotations
from datasets import RandomWindows, SlidingWindows, build_index, collate
from metrics import evaluate
from model import REWIRED_ENGINES, TALModel, build_model, rewire_report
from postprocess import VideoCollector

HERE = Path(__file__).resolve().parent


# -- distributed -------------------------------------------------------------------------------

def setup_distributed(device_arg: Optional[str]):
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
            dist.init_process_group("nccl")
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        return dist.get_rank(), world, device
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    return 0, 1, device


def is_main(rank: int) -> bool:
    return rank == 0


# -- optimisation ------------------------------------------------------------------------------

def build_optimizer(model: TALModel, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with separate backbone and head learning rates; no weight decay on biases and norms."""
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    groups = {(b, d): [] for b in (True, False) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith("relative_position_bias_table") or name == "scales"
        groups[(id(p) in backbone_ids, not no_decay)].append(p)
    t = cfg.train
    param_groups = [
        {"params": ps, "lr": t.backbone_lr if is_bb else t.lr, "weight_decay": t.weight_decay if decay else 0.0,
         "name": f"{'backbone' if is_bb else 'head'}{'' if decay else '_no_decay'}"}
        for (is_bb, decay), ps in groups.items() if ps
    ]
    return torch.optim.AdamW(param_groups, betas=(0.9, 0.999))


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
                  backbone_delay_steps: int = 0):
    """Linear warm-up from 0 to each group's lr, then cosine decay to lr * min_ratio (per step).

    With `backbone_delay_steps`, the backbone's groups (named ``backbone*``) keep lr 0 for that many
    steps, so only the head learns at first (linear probing, then fine-tuning: a random head's
    first gradients do not distort pretrained features), then follow the same warm-up and cosine
    over the remaining steps.
    """
    def schedule(offset: int):
        span = max(1, total_steps - offset)

        def factor(step: int) -> float:
            step -= offset
            if step < 0:
                return 0.0
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            progress = min(1.0, (step - warmup_steps) / max(1, span - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return factor

    lambdas = [schedule(backbone_delay_steps if g.get("name", "").startswith("backbone") else 0)
               for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


class EMA:
    """Exponential moving average of a model's floating-point state, swapped in for evaluation.

    Kept as named tensors rather than a model copy, so it works for rewired backbones too.
    The effective decay ramps up as min(decay, (1 + n) / (10 + n)) so short runs are not
    dominated by the random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """Temporarily load the averaged weights into `model`."""
        state = model.state_dict()
        backup = {k: state[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for k, v in self.shadow.items():
                state[k].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in backup.items():
                    state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


# -- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path: Path, obj: dict) -> None:
    """torch.save through a temporary file and os.replace: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- data --------------------------------------------------------------------------------------

def prepare_data(cfg: Config, rank: int, world: int):
    """(annotation path, media root, class names, train items, test items); makes synthetic data."""
    d = cfg.data
    if d.source == "synthetic":
        from synthetic import ensure_dataset

        root = None
        if is_main(rank):
            root = ensure_dataset(d.synthetic, d.cache_dir or None)
        if world > 1:
            holder = [root]
            dist.broadcast_object_list(holder, src=0)
            root = holder[0]
        ann_path, media_root = Path(root) / "annotations.json", str(root)
    else:
        ann_path, media_root = Path(d.annotations), d.media_root
    videos = load_annotations(ann_path)
    classes = class_names(videos, [d.train_subset])
    if not classes:
        raise ValueError(f"no labelled actions in subset {d.train_subset!r} of {ann_path}")
    train_items = build_index(videos, d.train_subset, classes, media_root)
    test_items = build_index(videos, d.test_subset, classes, media_root)
    return ann_path, media_root, classes, train_items, test_items


# -- loops -------------------------------------------------------------------------------------

def progress(iterable, total: int, desc: str, enabled: bool):
    """tqdm when it is installed and stderr is a terminal; the plain iterable otherwise."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            pass
    return iterable


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def optimizer_step(loss: torch.Tensor, optimizer, scheduler, clip_grad: float) -> None:
    """Backward, gradient clipping (when `clip_grad` > 0), optimizer and schedule step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    optimizer.step()
    scheduler.step()


def train_one_epoch(model, raw: TALModel, loader, optimizer, scheduler, ema: Optional[EMA], cfg: Config,
                    device, epoch: int, show: bool) -> Dict[str, float]:
    model.train()
    t = cfg.train
    sums = {"loss": 0.0, "cls_loss": 0.0, "reg_loss": 0.0}
    n = 0
    bar = progress(loader, len(loader), f"epoch {epoch}", show)
    for batch in bar:
        clip = batch["clip"].to(device, non_blocking=True)
        valid = batch["valid"].to(device)
        with autocast(device, t.amp):
            out = model(clip, valid)
            losses = raw.loss(out, batch["segments"], batch["labels"], t.focal_alpha, t.focal_gamma, t.reg_weight)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"epoch {epoch}: the loss is {loss.item()}; lower train.lr / train.backbone_lr or check the data"
            )
        optimizer_step(loss, optimizer, scheduler, t.clip_grad)
        if ema is not None:
            ema.update(raw)
        for k in sums:
            sums[k] += float(losses[k].detach())
        n += 1
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{sums['loss'] / n:.3f}")
    return {k: v / max(n, 1) for k, v in sums.items()}


@torch.no_grad()
def predict(model: TALModel, loader, cfg: Config, device, classes: Sequence[str], rank: int, world: int,
            show: bool) -> dict:
    """Sliding-window inference over the test loader; returns the ActivityNet results dict (rank 0)."""
    model.eval()
    e = cfg.eval
    windows = []
    for batch in progress(loader, len(loader), "eval", show):
        clip = batch["clip"].to(device, non_blocking=True)
        valid = batch["valid"].to(device)
        with autocast(device, cfg.train.amp):
            out = model(clip, valid)
        preds = model.predict(out, valid, e.score_thresh, e.pre_nms_topk)
        for k, p in enumerate(preds):
            windows.append((batch["video_id"][k], batch["start"][k], batch["stride"][k], batch["fps"][k],
                            batch["duration"][k], p))
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, windows)
        windows = [w for part in gathered for w in part]
    collector = VideoCollector(classes, e.nms_sigma, e.min_score, e.max_segments)
    seen = set()
    for vid, start, stride, fps, duration, p in windows:
        if (vid, start) in seen:   # DistributedSampler pads by repeating windows
            continue
        seen.add((vid, start))
        collector.add(vid, p, start, stride, fps, duration)
    video_ids = sorted({item.video_id for item in loader.dataset.items})
    return collector.results(video_ids)


def make_loaders(cfg: Config, train_items, test_items, world: int, rank: int, seed: int):
    d = cfg.data
    train_ds, test_ds = RandomWindows(train_items, d), SlidingWindows(test_items, d)
    train_sampler = DistributedSampler(train_ds, world, rank, shuffle=True, seed=seed, drop_last=True) \
        if world > 1 else None
    test_sampler = DistributedSampler(test_ds, world, rank, shuffle=False) if world > 1 else None
    g = torch.Generator()
    g.manual_seed(seed + rank)
    per_rank = max(1, cfg.train.batch_size)
    train_loader = DataLoader(
        train_ds, batch_size=per_rank, shuffle=train_sampler is None, sampler=train_sampler,
        num_workers=d.num_workers, collate_fn=collate, drop_last=len(train_ds) >= per_rank * world,
        pin_memory=torch.cuda.is_available(), generator=g, persistent_workers=d.num_workers > 0,
    )
    test_loader = DataLoader(
        test_ds, batch_size=cfg.eval.batch_size, shuffle=False, sampler=test_sampler,
        num_workers=d.num_workers, collate_fn=collate, pin_memory=torch.cuda.is_available(),
    )
    return train_loader, test_loader, train_sampler


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Temporal action localisation through a rewired video backbone.")
    p.add_argument("--config", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--engine", choices=ENGINES, help="backbone engine (default: the preset's, reversible)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    p.add_argument("--annotations", help="ActivityNet-style JSON (data.py); switches data.source to files")
    p.add_argument("--media-root", help="folder of <video_id>/ JPEG folders or <video_id>.mp4 files")
    p.add_argument("--weights", help="local state_dict of the backbone (a SwinTransformer3d's, or the spec's model)")
    p.add_argument("--out", help="output folder (default examples/tal/runs/<config>_<engine>)")
    p.add_argument("--resume", help="checkpoint to resume from ('auto': OUT/last.pt if it exists)")
    p.add_argument("--eval-only", action="store_true", help="predict and score the test subset, no training")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set train.batch_size=8 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, base: Optional[Config] = None) -> Config:
    """The preset named by --config (or `base`, a resumed run's config) with the command line applied."""
    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"model.engine={args.engine!r}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.eval_every is not None:
        overrides.append(f"train.eval_every={args.eval_every}")
    if args.annotations:
        overrides += ["data.source='files'", f"data.annotations={args.annotations!r}"]
    if args.media_root:
        overrides.append(f"data.media_root={args.media_root!r}")
    if args.weights:
        overrides.append(f"model.weights={args.weights!r}")
    if base is None:
        return get_config(args.config, overrides)
    cfg = copy_config(base)
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    cfg = config_from_args(args)
    rank, world, device = setup_distributed(args.device)
    show = is_main(rank) and not args.quiet
    log = print if is_main(rank) else (lambda *a, **k: None)
    out_dir = Path(args.out or HERE / "runs" / f"{cfg.name}_{cfg.model.engine}")
    resume = args.resume
    if resume == "auto":
        resume = str(out_dir / "last.pt") if (out_dir / "last.pt").is_file() else None
    ckpt = torch.load(resume, map_location="cpu", weights_only=False) if resume else None
    if is_main(rank):
        out_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is None and (out_dir / "log.jsonl").exists():
            (out_dir / "log.jsonl").unlink()   # a fresh run starts a fresh log
    if ckpt is not None:   # continue what was trained, with what the command line changes
        cfg = config_from_args(args, base=Config.from_dict(ckpt["config"]))
    if device.type == "cpu":
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    t_start = time.time()

    ann_path, media_root, classes, train_items, test_items = prepare_data(cfg, rank, world)
    if ckpt is not None and (ckpt["engine"] in REWIRED_ENGINES) != (cfg.model.engine in REWIRED_ENGINES):
        raise ValueError(
            f"checkpoint {resume} was trained with engine {ckpt['engine']!r}, which computes a different "
            f"function from {cfg.model.engine!r}; resume with --engine {ckpt['engine']} (or another of the same "
            f"family: reversible/autograd or checkpoint/frozen)"
        )
    if ckpt is not None and ckpt["classes"] != classes:
        raise ValueError(f"checkpoint {resume} was trained on classes {ckpt['classes']}, the data has {classes}")
    example = torch.zeros(1, 3, cfg.data.window, cfg.data.crop, cfg.data.crop, device=device)
    raw = build_model(cfg.model, len(classes), example)
    if cfg.model.engine in REWIRED_ENGINES and is_main(rank):
        log(rewire_report(raw.backbone))
    model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else raw
    train_loader, test_loader, train_sampler = make_loaders(cfg, train_items, test_items, world, rank, cfg.train.seed)
    optimizer = build_optimizer(raw, cfg)
    steps_per_epoch = max(1, len(train_loader))
    scheduler = warmup_cosine(optimizer, int(cfg.train.warmup_epochs * steps_per_epoch),
                              cfg.train.epochs * steps_per_epoch, cfg.train.min_lr_ratio,
                              int(cfg.train.backbone_delay_epochs * steps_per_epoch))
    ema = EMA(raw, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    start_epoch, history = 1, []
    if ckpt is not None:
        raw.load_state_dict(ckpt["model"])
        raw.loss_normalizer = ckpt.get("loss_normalizer", raw.loss_normalizer)
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
        if not args.eval_only:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history = ckpt["epoch"] + 1, ckpt.get("history", [])
        log(f"resumed from {resume} at epoch {ckpt['epoch']}")
    n_bb = sum(p.numel() for p in raw.backbone.parameters())
    n_all = sum(p.numel() for p in raw.parameters())
    log(f"config {cfg.name}, engine {cfg.model.engine}, device {device}, world {world}; "
        f"{len(classes)} classes, {len(train_items)} train / {len(test_items)} test videos, "
        f"{len(test_loader.dataset)} test windows; {n_bb / 1e6:.2f}M backbone + {(n_all - n_bb) / 1e6:.2f}M head "
        f"parameters; out {out_dir}")

    def evaluate_now(epoch: int) -> dict:
        with (ema.swapped_in(raw) if ema is not None else contextlib.nullcontext()):
            results = predict(raw, test_loader, cfg, device, classes, rank, world, show)
        if not is_main(rank):
            return {}
        atomic_write_json(out_dir / "predictions.json", results)
        e = cfg.eval
        res = evaluate(json.loads(Path(ann_path).read_text()), results, cfg.data.test_subset,
                       np.linspace(e.tious[0], e.tious[1], int(e.tious[2])))
        atomic_write_json(out_dir / "metrics.json", {"epoch": epoch, **res})
        return res

    if args.eval_only:
        if ckpt is None:
            raise SystemExit("error: --eval-only needs --resume CHECKPOINT")
        res = evaluate_now(start_epoch - 1)
        if is_main(rank):
            log(f"average mAP {res['average_mAP']:.4f} at tIoU {res['tious']}: {[round(m, 4) for m in res['mAP']]}")
        return res

    summary = {}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        t0 = time.time()
        stats = train_one_epoch(model, raw, train_loader, optimizer, scheduler, ema, cfg, device, epoch, show)
        entry = {"epoch": epoch, **{k: round(v, 5) for k, v in stats.items()},
                 "lr": optimizer.param_groups[0]["lr"], "epoch_s": round(time.time() - t0, 2)}
        if epoch % cfg.train.eval_every == 0 or epoch == cfg.train.epochs:
            res = evaluate_now(epoch)
            if is_main(rank):
                entry["average_mAP"] = round(res["average_mAP"], 5)
                entry["mAP"] = [round(m, 5) for m in res["mAP"]]
        entry["elapsed_s"] = round(time.time() - t_start, 1)
        history.append(entry)
        if is_main(rank):
            line = (f"epoch {epoch:3d}/{cfg.train.epochs} loss {stats['loss']:.4f} (cls {stats['cls_loss']:.4f} "
                    f"reg {stats['reg_loss']:.4f}) lr {entry['lr']:.2e} {entry['epoch_s']:.1f}s")
            if "average_mAP" in entry:
                line += f" | mAP@{cfg.eval.tious[0]}:{cfg.eval.tious[1]} avg {entry['average_mAP']:.4f}"
            log(line, flush=True)
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
            save_checkpoint(out_dir / "last.pt", {
                "model": raw.state_dict(), "ema": ema.state_dict() if ema else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "config": cfg.to_dict(), "classes": classes, "engine": cfg.model.engine,
                "loss_normalizer": raw.loss_normalizer, "history": history,
            })
        summary = entry
    if is_main(rank):
        log(f"done in {time.time() - t_start:.1f}s; predictions {out_dir / 'predictions.json'}")
    if world > 1:
        dist.destroy_process_group()
    return {"history": history, "final": summary, "out": str(out_dir), "wall_s": time.time() - t_start}


if __name__ == "__main__":
    main()
