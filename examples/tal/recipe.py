"""The Re²TAL recipe in one command, on synthetic data, sized for a CPU:

  1. data       the localisation videos (main task: `motion_only`, classes told apart by motion only)
                and a set of trimmed clips of *related but different* motions (the Kinetics stand-in)
  2. pretrain   the backbone (+ a linear classifier) trained on the clips, original network
  3. recover    rewired by revwire; clip accuracy before rewiring, right after, and after a short
                fine-tune (optionally distilled toward the original's logits, `--distill`)
  4. localise   the same localiser trained three ways on the same data, seeds and epochs:
                end to end through the rewired backbone (reversible engine, recovered weights),
                frozen pretrained features (only the head learns), end to end with checkpointing
                (original network, pretrained weights)
  5. report     a summary (report/done.json), a Markdown table and PNG plots (recovery, mAP vs epoch)

    python examples/tal/recipe.py                          # everything, resumable: rerun to continue
    python examples/tal/recipe.py --distill                # recover with distillation
    python examples/tal/recipe.py --backbone torchvision:swin3d_t --out runs/recipe_swin3d_t
    python examples/tal/recipe.py --set train.epochs=20    # any localisation setting (train.py's --set)

Every stage writes its outputs atomically (temporary file, then rename) and ends with
``OUT/<stage>/done.json``; a rerun skips the stages that have it, and a localisation run stopped
mid-way continues from its last epoch (train.py's ``--resume auto``). The settings of a run are
kept in ``OUT/recipe.json``; rerunning the same folder with other settings is refused (use
another ``--out`` or ``--restart``).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import train
from configs import ClipSetConfig, Config, get_config
from data import atomic_write_json
from model import ClipClassifier, rewire_report

HERE = Path(__file__).resolve().parent
STAGES = ("data", "pretrain", "recover", "localise", "report")
METHODS = {   # method -> (engine, weights from stage)
    "reversible": ("reversible", "recover"),
    "autograd": ("autograd", "recover"),
    "frozen": ("frozen", "pretrain"),
    "checkpoint": ("checkpoint", "pretrain"),
}
# Localisation settings of the recipe, before the user's --set items: a backbone learning rate 10x
# below the head's, and the head trained alone for 3 epochs before the backbone joins (linear
# probing, then fine-tuning). Without the delay, end-to-end training from pretrained weights fell
# well below frozen features on the main task (RESULTS.md).
LOC_DEFAULTS = ["train.backbone_lr=1e-4", "train.backbone_delay_epochs=3.0"]
LABELS = {"reversible": "end to end, rewired (reversible)", "autograd": "end to end, rewired (autograd)",
          "frozen": "frozen pretrained features", "checkpoint": "end to end, original (checkpoint)"}


@dataclasses.dataclass
class RecipeConfig:
    """Everything a recipe run depends on; saved to OUT/recipe.json."""

    loc_overrides: List[str]                 # train.py --set items for the localisation runs
    backbone: str = "tiny"                   # "tiny" (the preset's Swin3D) or a revwire model spec
    backbone_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    clips: Dict[str, Any] = dataclasses.field(default_factory=dict)   # ClipSetConfig overrides
    pretrain_epochs: int = 15
    pretrain_lr: float = 2e-3
    recover_epochs: int = 15
    recover_lr: float = 5e-4
    distill: bool = False
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    clip_batch: int = 16
    epochs: int = 15                         # localisation; 10 left end to end short of converging (RESULTS.md)
    eval_every: int = 3
    methods: List[str] = dataclasses.field(default_factory=lambda: ["reversible", "frozen", "checkpoint"])
    seed: int = 0


# -- helpers -----------------------------------------------------------------------------------

class Progress:
    """Stage banners with elapsed time."""

    def __init__(self, quiet: bool = False):
        self.t0, self.quiet = time.time(), quiet

    def __call__(self, *args, **kwargs):
        if not self.quiet:
            print(*args, **kwargs)

    def stage(self, k: int, name: str, what: str) -> None:
        self(f"\n[{k}/{len(STAGES)}] {name}: {what}  (recipe time {time.time() - self.t0:.0f}s)", flush=True)


def loc_config(rc: RecipeConfig) -> Config:
    """The localisation config every method shares (without engine and weights)."""
    cfg = get_config("tiny", rc.loc_overrides)
    if rc.backbone != "tiny":
        cfg.model.backbone, cfg.model.backbone_kwargs = rc.backbone, dict(rc.backbone_kwargs)
    return cfg


def clip_config(rc: RecipeConfig, cfg: Config) -> ClipSetConfig:
    """The clip set: frames as large as the localisation videos' unless overridden."""
    fields = {f.name for f in dataclasses.fields(ClipSetConfig)}
    bad = sorted(set(rc.clips) - fields)
    if bad:
        raise ValueError(f"unknown clip-set setting(s) {bad}; choose from {sorted(fields)}")
    clips = ClipSetConfig(**{"size": cfg.data.synthetic.size, **rc.clips})
    return dataclasses.replace(clips, classes=tuple(clips.classes))


def clip_train_config(cfg: Config, lr: float, seed: int) -> Config:
    """cfg with the clip stages' optimiser settings: one learning rate, no EMA."""
    c = copy.deepcopy(cfg)
    c.train.lr = c.train.backbone_lr = lr
    c.train.seed = seed
    return c


def example_clip(cfg: Config, frames: int) -> torch.Tensor:
    return torch.zeros(1, 3, frames, cfg.data.crop, cfg.data.crop)


def backbone_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The backbone's weights with the adapter's keys (the same for the original and the rewired one)."""
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def atomic_savefig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def done(out: Path, stage: str) -> Optional[dict]:
    f = out / stage / "done.json"
    return json.loads(f.read_text()) if f.is_file() else None


# -- stages ------------------------------------------------------------------------------------

def stage_data(rc: RecipeConfig, out: Path, log: Progress) -> dict:
    from synthetic import ensure_clip_dataset, ensure_dataset

    cfg = loc_config(rc)
    cache = cfg.data.cache_dir or None
    result = {}
    if cfg.data.source == "synthetic":
        result["videos"] = str(ensure_dataset(cfg.data.synthetic, cache, verbose=not log.quiet))
    result["clips"] = str(ensure_clip_dataset(clip_config(rc, cfg), cache, verbose=not log.quiet))
    log(f"localisation data {result.get('videos', cfg.data.annotations)}; clips {result['clips']}")
    return result


def _clip_setup(rc: RecipeConfig, out: Path, lr: float):
    from pretrain import clip_loaders

    cfg = clip_train_config(loc_config(rc), lr, rc.seed)
    root = Path(done(out, "data")["clips"])
    meta = json.loads((root / "meta.json").read_text())
    torch.manual_seed(rc.seed)
    train_loader, val_loader = clip_loaders(root, cfg, rc.clip_batch, rc.seed)
    return cfg, meta, train_loader, val_loader


def stage_pretrain(rc: RecipeConfig, out: Path, log: Progress) -> dict:
    from pretrain import accuracy, fit

    cfg, meta, train_loader, val_loader = _clip_setup(rc, out, rc.pretrain_lr)
    model = ClipClassifier(cfg.model, len(meta["classes"]))
    initial = accuracy(model, val_loader)
    history = fit(model, train_loader, val_loader, cfg, rc.pretrain_epochs, log=log, tag="pretrain ")
    train.save_checkpoint(out / "pretrain" / "classifier.pt", model.state_dict())
    train.save_checkpoint(out / "pretrain" / "backbone.pt", backbone_state(model))
    return {"classes": meta["classes"], "val_acc_initial": initial, "val_acc": history[-1]["val_acc"],
            "history": history, "step_s": statistics.median(h["step_s"] for h in history),
            "weights": str(out / "pretrain" / "backbone.pt")}


def stage_recover(rc: RecipeConfig, out: Path, log: Progress) -> dict:
    from pretrain import accuracy, fit

    cfg, meta, train_loader, val_loader = _clip_setup(rc, out, rc.recover_lr)
    model = ClipClassifier(cfg.model, len(meta["classes"]))
    model.load_state_dict(torch.load(out / "pretrain" / "classifier.pt", map_location="cpu", weights_only=True))
    original = accuracy(model, val_loader)
    teacher = copy.deepcopy(model) if rc.distill else None
    model.set_engine("reversible", example_clip(cfg, meta["frames"]))
    rewired = accuracy(model, val_loader)
    log(f"clip accuracy: original {original:.4f}, rewired {rewired:.4f}; fine-tuning {rc.recover_epochs} epochs"
        + (" with distillation" if rc.distill else ""), flush=True)
    history = fit(model, train_loader, val_loader, cfg, rc.recover_epochs, teacher=teacher,
                  distill_weight=rc.distill_weight, temperature=rc.distill_temperature, log=log, tag="recover ")
    train.save_checkpoint(out / "recover" / "backbone.pt", backbone_state(model))
    return {"val_acc_original": original, "val_acc_rewired": rewired, "val_acc_recovered": history[-1]["val_acc"],
            "curve": [rewired] + [h["val_acc"] for h in history], "distill": rc.distill, "history": history,
            "step_s": statistics.median(h["step_s"] for h in history),
            "report": str(rewire_report(model.backbone)), "weights": str(out / "recover" / "backbone.pt")}


def run_method(rc: RecipeConfig, out: Path, method: str, log: Progress) -> dict:
    """One localisation run through train.main (resumable), then its summary."""
    engine, source = METHODS[method]
    run_dir = out / f"localise_{method}"
    argv = ["--config", "tiny", "--engine", engine, "--weights", done(out, source)["weights"],
            "--epochs", str(rc.epochs), "--eval-every", str(rc.eval_every), "--out", str(run_dir),
            "--resume", "auto", "--quiet"]
    for item in rc.loc_overrides:
        argv += ["--set", item]
    argv += ["--set", f"train.seed={rc.seed}"]
    if rc.backbone != "tiny":
        argv += ["--set", f"model.backbone={rc.backbone!r}", "--set", f"model.backbone_kwargs={rc.backbone_kwargs!r}"]
    if not log.quiet:
        print(f"--- {method}: {LABELS[method]} (engine {engine}, weights from {source})", flush=True)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink if log.quiet else sys.stdout):
        res = train.main(argv)
    hist = res["history"]
    steps = _steps_per_epoch(run_dir)
    evals = [h for h in hist if "average_mAP" in h]
    return {"method": method, "engine": engine, "weights_from": source, "out": str(run_dir),
            "average_mAP": evals[-1]["average_mAP"], "mAP": evals[-1]["mAP"],
            "curve": [(h["epoch"], h["average_mAP"]) for h in evals],
            "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"],
            "step_s": statistics.median(h["epoch_s"] for h in hist) / steps,
            "train_s": sum(h["epoch_s"] for h in hist)}


def _steps_per_epoch(run_dir: Path) -> int:
    ckpt = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    return max(1, ckpt["scheduler"]["last_epoch"] // max(1, ckpt["epoch"]))


def memory(rc: RecipeConfig, methods: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """Per method, at the recipe's window and batch size (bench.one_engine, revwire's meters):
    bytes autograd saves in one training forward + loss of the localiser (parameters and buffers
    excluded), and the step peak of live tensor storage over a training step (forward, loss,
    backward, AdamW) with its activation peak (the part above what is alive when the step starts)."""
    from bench import one_engine

    cfg = loc_config(rc)
    rows = {}
    for m in methods:
        r = one_engine(cfg, METHODS[m][0], cfg.data.window, cfg.data.crop, cfg.train.batch_size, 1,
                       torch.device("cpu"), amp=False)
        rows[m] = {"forward_saved_bytes": r["saved_bytes"], "step_peak_bytes": r["peak_bytes"],
                   "activation_peak_bytes": r["act_peak_bytes"]}
    return rows


def stage_report(rc: RecipeConfig, out: Path, log: Progress, results_dir: Optional[Path]) -> dict:
    pre, rec, loc = done(out, "pretrain"), done(out, "recover"), done(out, "localise")
    runs = {m: loc["runs"][m] for m in rc.methods}   # done.json has sorted keys
    mem = memory(rc, list(runs))
    summary = {
        "pretrain_val_acc": pre["val_acc"], "clip_acc_original": rec["val_acc_original"],
        "clip_acc_rewired": rec["val_acc_rewired"], "clip_acc_recovered": rec["val_acc_recovered"],
        "distill": rec["distill"],
        "methods": {m: {"average_mAP": r["average_mAP"], "mAP": r["mAP"], "step_s": r["step_s"],
                        **mem[m], "curve": r["curve"]} for m, r in runs.items()},
    }
    if "reversible" in runs and "frozen" in runs:
        summary["reversible_minus_frozen"] = runs["reversible"]["average_mAP"] - runs["frozen"]["average_mAP"]
    if "reversible" in runs and "checkpoint" in runs:
        summary["reversible_minus_checkpoint"] = runs["reversible"]["average_mAP"] - runs["checkpoint"]["average_mAP"]
    lines = ["| stage / method | figure |", "| --- | ---: |",
             f"| pretraining: clip accuracy ({len(pre['classes'])} classes, held out) | {pre['val_acc']:.3f} |",
             f"| clip accuracy, original network | {rec['val_acc_original']:.3f} |",
             f"| clip accuracy, rewired, no fine-tune | {rec['val_acc_rewired']:.3f} |",
             f"| clip accuracy, rewired, fine-tuned {len(rec['history'])} epochs"
             f"{' (distilled)' if rec['distill'] else ''} | {rec['val_acc_recovered']:.3f} |",
             "", "| localisation | average mAP 0.3:0.7 | step (s) | forward-saved (MiB) | step peak (MiB) "
             "| activation peak (MiB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for m, r in runs.items():
        mib = [mem[m][k] / 2**20 for k in ("forward_saved_bytes", "step_peak_bytes", "activation_peak_bytes")]
        lines.append(f"| {LABELS[m]} | {r['average_mAP']:.4f} | {r['step_s']:.3f} | "
                     + " | ".join(f"{b:.1f}" for b in mib) + " |")
    table = "\n".join(lines) + "\n"
    (out / "report").mkdir(parents=True, exist_ok=True)
    from data import atomic_write_text

    atomic_write_text(out / "report" / "table.md", table)
    plots = plot(rec, runs, out / "report")
    if results_dir is not None:
        for p in plots:
            dest = Path(results_dir) / p.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(p, tmp)
            os.replace(tmp, dest)
    log(table)
    summary["plots"] = [str(p) for p in plots]
    return summary


def plot(rec: dict, runs: dict, folder: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finish(fig, ax, xlabel, ylabel, legend_size, name):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower right", fontsize=legend_size)
        fig.tight_layout()
        atomic_savefig(fig, folder / name)
        plt.close(fig)
        return folder / name

    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    xs = list(range(len(rec["curve"])))
    ax.plot(xs, rec["curve"], "o-", label="rewired, fine-tuned" + (" + distill" if rec["distill"] else ""))
    ax.axhline(rec["val_acc_original"], color="grey", ls="--", label="original")
    p1 = finish(fig, ax, "fine-tuning epochs after rewiring", "clip accuracy (held out)", 8, "recovery.png")

    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for m, r in runs.items():
        e, a = zip(*r["curve"])
        ax.plot(e, a, "o-", label=LABELS[m])
    p2 = finish(fig, ax, "epoch", "average mAP, tIoU 0.3:0.7", 7, "map_vs_epoch.png")
    return [p1, p2]


# -- driver ------------------------------------------------------------------------------------

def run_recipe(rc: RecipeConfig, out: Path, quiet: bool = False, results_dir: Optional[Path] = None,
               restart: bool = False) -> dict:
    """Run (or continue) every stage; returns {stage: its done.json}."""
    log = Progress(quiet)
    if restart and out.exists():
        shutil.rmtree(out)
    saved = out / "recipe.json"
    settings = dataclasses.asdict(rc)
    if saved.is_file():   # the methods may change: each has its own folder and done file
        before, now = json.loads(saved.read_text()), json.loads(json.dumps(settings))
        diff = sorted(k for k in set(before) | set(now) if k != "methods" and before.get(k) != now.get(k))
        if diff:
            raise SystemExit(f"error: {out} holds a recipe run with other settings ({', '.join(diff)} differ); "
                             f"use another --out, or --restart to start over")
    atomic_write_json(saved, settings)
    torch.set_num_threads(loc_config(rc).train.threads)
    results = {}
    what = {"data": "synthetic videos and trimmed clips", "pretrain": f"{rc.pretrain_epochs} epochs on clips",
            "recover": f"rewire, fine-tune {rc.recover_epochs} epochs",
            "localise": f"{', '.join(rc.methods)}; {rc.epochs} epochs each", "report": "table and plots"}
    for k, stage in enumerate(STAGES, 1):
        prev = done(out, stage)
        if stage in ("localise", "report") and prev is not None:   # done for other methods: redo (cheap)
            ran = prev["runs"] if stage == "localise" else prev["methods"]
            prev = prev if sorted(ran) == sorted(rc.methods) else None
        if prev is not None:
            log.stage(k, stage, "done before, skipped")
            results[stage] = prev
            continue
        log.stage(k, stage, what[stage])
        t0 = time.time()
        if stage == "data":
            res = stage_data(rc, out, log)
        elif stage == "pretrain":
            res = stage_pretrain(rc, out, log)
        elif stage == "recover":
            res = stage_recover(rc, out, log)
        elif stage == "localise":
            runs = {}
            for m in rc.methods:   # each method's own done file: a stopped stage redoes only what is missing
                sub = done(out, f"localise_{m}")
                if sub is None:
                    sub = run_method(rc, out, m, log)
                    atomic_write_json(out / f"localise_{m}" / "done.json", sub)
                log(f"{m}: average mAP {sub['average_mAP']:.4f}, step {sub['step_s']:.3f}s", flush=True)
                runs[m] = sub
            res = {"runs": runs}
        else:
            res = stage_report(rc, out, log, results_dir)
        res["stage_s"] = round(time.time() - t0, 1)
        atomic_write_json(out / stage / "done.json", res)
        results[stage] = done(out, stage)   # as a rerun will read it
    log(f"\nrecipe finished in {time.time() - log.t0:.0f}s; outputs in {out}")
    return results


def _kv(items: Sequence[str], what: str) -> Dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise SystemExit(f"error: {what} {item!r} must look like NAME=VALUE, e.g. num_train=32")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description="Pretrain, rewire and recover, then localise three ways (resumable).")
    p.add_argument("--out", help="output folder (default examples/tal/runs/recipe)")
    p.add_argument("--backbone", default="tiny",
                   help="'tiny' (the tiny preset's Swin3D) or a revwire model spec, e.g. torchvision:swin3d_t")
    p.add_argument("--backbone-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="keyword argument of the backbone spec (repeatable)")
    p.add_argument("--task", default="motion_only", choices=("motion_only", "default"),
                   help="localisation classes told apart by motion only (main task), or the default colours/shapes")
    p.add_argument("--methods", nargs="+", default=["reversible", "frozen", "checkpoint"], choices=sorted(METHODS))
    p.add_argument("--epochs", type=int, default=15, help="localisation epochs, every method")
    p.add_argument("--eval-every", type=int, default=3)
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--recover-epochs", type=int, default=15)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--clip-batch", type=int, default=16, help="batch size of the clip stages")
    p.add_argument("--distill", action="store_true", help="recover with distillation toward the original's logits")
    p.add_argument("--clip-set", action="append", default=[], metavar="NAME=VALUE",
                   help="clip-set setting (configs.ClipSetConfig), e.g. num_train=32 (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="localisation setting as in train.py --set (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", help="also copy the PNG plots here")
    p.add_argument("--restart", action="store_true", help="delete OUT and start from the first stage")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    for name in ("epochs", "eval_every", "pretrain_epochs", "clip_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.recover_epochs < 0:
        p.error("--recover-epochs must be 0 or more")
    return args


def config_from_args(args) -> RecipeConfig:
    loc = [f"data.synthetic.motion_only={args.task == 'motion_only'}"] + LOC_DEFAULTS + list(args.overrides)
    rc = RecipeConfig(loc_overrides=loc, backbone=args.backbone,
                      backbone_kwargs=_kv(args.backbone_arg, "--backbone-arg"), clips=_kv(args.clip_set, "--clip-set"),
                      pretrain_epochs=args.pretrain_epochs, recover_epochs=args.recover_epochs, distill=args.distill,
                      pretrain_lr=args.pretrain_lr, recover_lr=args.recover_lr, clip_batch=args.clip_batch,
                      epochs=args.epochs, eval_every=args.eval_every, methods=list(args.methods), seed=args.seed)
    if rc.backbone_kwargs and rc.backbone == "tiny":
        raise SystemExit("error: --backbone-arg needs --backbone SPEC (the tiny backbone is set with --set model.*)")
    try:   # fail now, not after pretraining, on a bad setting or spec
        cfg = loc_config(rc)
        from synthetic import check_clip_config

        check_clip_config(clip_config(rc, cfg))
        from model import build_backbone

        build_backbone(cfg.model)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return rc


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    rc = config_from_args(args)
    out = Path(args.out or HERE / "runs" / "recipe")
    return run_recipe(rc, out, args.quiet, Path(args.results_dir) if args.results_dir else None, args.restart)


if __name__ == "__main__":
    main()
