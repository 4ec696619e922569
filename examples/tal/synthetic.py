"""Synthetic untrimmed videos for temporal action localization: the default data, no download.

Each video is a moving, grey textured background; on it, 1..max_actions actions of K classes
happen one after another at random times, places and durations. A class is a distinct
object (colour and shape) doing a distinct motion, so a small video backbone trained from
scratch can learn both what happens and exactly when it starts and ends. No class depends
on left/right, so horizontal flipping is a valid augmentation.

The data is written once, in the on-disk format of real data (JPEG folders, or mp4 files
with PyAV), to ``<cache>/synthetic-<hash>/`` where the hash covers every parameter, and is
fully determined by the seed. A finished dataset is moved into place with one rename, so an
interrupted run never leaves a half-written dataset behind.

    python examples/tal/synthetic.py [--cache DIR] [--seed 0] [--format jpg|mp4]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from configs import ClipSetConfig, SyntheticConfig
from data import Segment, VideoRecord, atomic_write_json, to_database

DEFAULT_CACHE = Path(__file__).resolve().parent / "cache"
FORMAT_VERSION = 4

# (name, RGB colour) per class; a class's motion is drawn by _draw_action.
CLASSES: Tuple[Tuple[str, Tuple[float, float, float]], ...] = (
    ("slide", (1.0, 0.15, 0.1)),     # square crossing the frame horizontally
    ("bounce", (0.1, 0.95, 0.2)),    # disc bouncing up and down
    ("pulse", (0.15, 0.35, 1.0)),    # square growing and shrinking in place
    ("spin", (1.0, 0.9, 0.1)),       # bar rotating about its centre
    ("blink", (0.95, 0.2, 0.95)),    # disc switching on and off
    ("orbit", (0.1, 0.95, 0.95)),    # disc moving on a circle
    # motions used by the trimmed-clip pretraining set (the "Kinetics" of this example), related
    # to the localisation classes above but not the same: see ClipSetConfig
    ("shake", (1.0, 0.55, 0.1)),     # square oscillating left and right (slide's relative)
    ("zoom", (0.6, 0.3, 1.0)),       # disc growing or shrinking once (pulse's relative)
    ("sway", (0.5, 1.0, 0.5)),       # bar rocking back and forth about its centre (spin's relative)
)
CLASS_SHAPES = ("square", "disc", "square", "bar", "disc", "disc", "square", "disc", "bar")
CLASS_INDEX = {name: k for k, (name, _) in enumerate(CLASSES)}
SHARED_COLOUR = (0.95, 0.95, 0.95)


def dataset_dir(cfg: SyntheticConfig, cache: Optional[os.PathLike] = None, fmt: str = "jpg") -> Path:
    """Where the dataset for `cfg` lives: the name hashes every parameter."""
    key = json.dumps({"cfg": dataclasses.asdict(cfg), "format": fmt, "version": FORMAT_VERSION}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return Path(cache or DEFAULT_CACHE) / f"synthetic-{digest}"


def ensure_dataset(cfg: SyntheticConfig, cache: Optional[os.PathLike] = None, fmt: str = "jpg",
                   verbose: bool = True) -> Path:
    """Return the dataset folder for `cfg`, generating it first if it is not there yet."""
    if not 1 <= cfg.num_classes <= len(CLASSES):
        raise ValueError(f"synthetic.num_classes={cfg.num_classes}: choose 1..{len(CLASSES)}")
    if cfg.min_action > cfg.max_action or cfg.max_action > cfg.min_frames:
        raise ValueError(
            f"synthetic actions of {cfg.min_action}..{cfg.max_action} frames do not fit videos of "
            f"{cfg.min_frames} frames; lower max_action or raise min_frames"
        )
    if fmt not in ("jpg", "mp4"):
        raise ValueError(f"synthetic format {fmt!r}: choose 'jpg' or 'mp4'")
    final = dataset_dir(cfg, cache, fmt)
    if (final / "annotations.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"generating synthetic dataset in {final} ...", flush=True)
    try:
        records = generate(cfg, tmp, fmt)
        atomic_write_json(tmp / "annotations.json", to_database(records))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "annotations.json").is_file():  # not a concurrent writer that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def clip_dataset_dir(cfg: ClipSetConfig, cache: Optional[os.PathLike] = None) -> Path:
    """Where the trimmed-clip set for `cfg` lives: the name hashes every parameter."""
    key = json.dumps({"clips": dataclasses.asdict(cfg), "version": FORMAT_VERSION}, sort_keys=True)
    return Path(cache or DEFAULT_CACHE) / f"clips-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def check_clip_config(cfg: ClipSetConfig) -> None:
    """Raise ValueError, saying what to change, for a clip set that cannot be generated."""
    unknown = [c for c in cfg.classes if c not in CLASS_INDEX]
    if unknown or len(set(cfg.classes)) != len(cfg.classes) or len(cfg.classes) < 2:
        raise ValueError(f"clip classes {cfg.classes}: give two or more distinct names from {list(CLASS_INDEX)}")
    if cfg.frames < 4 or cfg.num_train < 1 or cfg.num_val < 1:
        raise ValueError("clip set needs frames >= 4 and at least one train and one val clip per class")


def ensure_clip_dataset(cfg: ClipSetConfig, cache: Optional[os.PathLike] = None, verbose: bool = True) -> Path:
    """The folder of the trimmed-clip set for `cfg`, generated first if needed.

    It holds ``train.npy`` / ``val.npy`` (uint8, N x frames x size x size x 3) and ``meta.json``
    (class names, per-clip labels); built in a temporary folder and renamed into place.
    """
    check_clip_config(cfg)
    final = clip_dataset_dir(cfg, cache)
    if (final / "meta.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if verbose:
        print(f"generating synthetic clip set in {final} ...", flush=True)
    try:
        rng = np.random.default_rng(cfg.seed)
        s = cfg.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        meta = {"classes": list(cfg.classes), "frames": cfg.frames}
        for subset, per_class in (("train", cfg.num_train), ("val", cfg.num_val)):
            labels = [k for _ in range(per_class) for k in range(len(cfg.classes))]
            clips = np.empty((len(labels), cfg.frames, s, s, 3), dtype=np.uint8)
            for i, k in enumerate(labels):
                frames = _background(cfg.frames, s, rng)
                cls = CLASS_INDEX[cfg.classes[k]]
                _draw_action(frames, cls, CLASSES[cls][1], xx, yy, s, rng, cfg.motion_only)
                frames += rng.normal(0.0, 0.02, size=frames.shape).astype(np.float32)
                clips[i] = (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            np.save(tmp / f"{subset}.npy", clips)
            meta[f"{subset}_labels"] = labels
        atomic_write_json(tmp / "meta.json", meta)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def generate(cfg: SyntheticConfig, root: Path, fmt: str = "jpg") -> List[VideoRecord]:
    """Render every video of `cfg` under `root` and return their annotation records."""
    rng = np.random.default_rng(cfg.seed)
    names = [name for name, _ in CLASSES[: cfg.num_classes]]
    records = []
    for subset, count in (("training", cfg.num_train), ("validation", cfg.num_val)):
        for i in range(count):
            vid = f"syn_{subset[:5]}_{i:04d}"
            frames, actions = render_video(cfg, rng)
            write_frames(frames, root, vid, fmt, cfg.fps)
            segs = [Segment(a / cfg.fps, b / cfg.fps, names[k]) for a, b, k in actions]
            records.append(VideoRecord(vid, len(frames) / cfg.fps, subset, cfg.fps, segs))
    return records


def place_actions(cfg: SyntheticConfig, n_frames: int, rng: np.random.Generator) -> List[Tuple[int, int, int]]:
    """Random, non-overlapping (start, end, class) frame intervals, end exclusive, at least one."""
    n = int(rng.integers(1, cfg.max_actions + 1))
    lengths = rng.integers(cfg.min_action, cfg.max_action + 1, size=n)
    while lengths.sum() + 2 * (n - 1) > n_frames and n > 1:  # keep a gap of >= 2 frames
        n -= 1
        lengths = lengths[:n]
    slack = n_frames - int(lengths.sum()) - 2 * (n - 1)
    # split the slack into n + 1 random gaps
    cuts = np.sort(rng.integers(0, slack + 1, size=n))
    gaps = np.diff(np.concatenate([[0], cuts, [slack]]))
    out, t = [], 0
    for k in range(n):
        t += int(gaps[k]) + (2 if k else 0)
        out.append((t, t + int(lengths[k]), int(rng.integers(cfg.num_classes))))
        t += int(lengths[k])
    return out


def render_video(cfg: SyntheticConfig, rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[int, int, int]]]:
    """One video as uint8 (T, H, W, 3) and its actions as (start, end, class) frame intervals."""
    n_frames = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    s = cfg.size
    frames = _background(n_frames, s, rng)
    actions = place_actions(cfg, n_frames, rng)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    for start, end, cls in actions:
        _draw_action(frames[start:end], cls, CLASSES[cls][1], xx, yy, s, rng, cfg.motion_only)
    frames += rng.normal(0.0, 0.02, size=frames.shape).astype(np.float32)  # sensor noise
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), actions


def _background(n_frames: int, s: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random grey texture, larger than the frame, drifting at a constant velocity."""
    big = 2 * s
    coarse = rng.uniform(0.15, 0.55, size=(big // 4, big // 4, 3)).astype(np.float32)
    tex = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(2, 0, 1)[None], size=(big, big), mode="bicubic", align_corners=False
    )[0].permute(1, 2, 0).numpy()
    tex = np.repeat(tex.mean(axis=2, keepdims=True), 3, axis=2)  # grey: colour belongs to the actions
    speed = rng.uniform(0.2, 0.8)
    angle = rng.uniform(0, 2 * math.pi)
    vy, vx = speed * math.sin(angle), speed * math.cos(angle)
    y0, x0 = rng.integers(0, big, size=2)
    out = np.empty((n_frames, s, s, 3), dtype=np.float32)
    for t in range(n_frames):
        dy, dx = int(round(y0 + vy * t)) % big, int(round(x0 + vx * t)) % big
        out[t] = np.roll(tex, (-dy, -dx), axis=(0, 1))[:s, :s]
    return out


def _draw_action(frames, cls, colour, xx, yy, s, rng, shared: bool = False) -> None:
    """Paint action `cls` into `frames` (a view of the action's frames) in place.

    With `shared`, every class is the same grey bar (at a random resting angle) and only the
    motion tells the classes apart.
    """
    n = len(frames)
    colour = np.asarray(SHARED_COLOUR if shared else colour, dtype=np.float32)
    r = s * rng.uniform(0.16, 0.2)                   # object radius
    cx, cy = rng.uniform(0.3 * s, 0.7 * s, size=2)   # where it happens
    phase = rng.uniform(0, 2 * math.pi)
    direction = rng.choice([-1.0, 1.0])
    rest = rng.uniform(0, math.pi) if shared else phase
    shape = "bar" if shared else CLASS_SHAPES[cls]
    for t in range(n):
        u = t / max(n - 1, 1)                        # progress through the action, 0..1
        x, y, scale, angle = cx, cy, 1.0, rest
        if cls == 0:    # slide: cross the frame horizontally (either way)
            x = s * (0.15 + 0.7 * (u if direction > 0 else 1 - u))
        elif cls == 1:  # bounce: vertical oscillation
            y = min(max(cy + 0.3 * s * math.sin(phase + 2 * math.pi * t / 8), r), s - r)
        elif cls == 2:  # pulse: size oscillation in place
            scale = 0.6 + 0.6 * (0.5 + 0.5 * math.sin(phase + 2 * math.pi * t / 6))
        elif cls == 3:  # spin: rotation about its centre
            angle = rest + direction * 2 * math.pi * t / 10
        elif cls == 4:  # blink: on for 2 frames, off for 2
            if (t // 2) % 2:
                continue
        elif cls == 5:  # orbit: move on a circle
            a = phase + direction * 2 * math.pi * t / 12
            x, y = cx + 0.22 * s * math.cos(a), cy + 0.22 * s * math.sin(a)
        elif cls == 6:  # shake: horizontal oscillation
            x = min(max(cx + 0.3 * s * math.sin(phase + 2 * math.pi * t / 8), r), s - r)
        elif cls == 7:  # zoom: one monotonic change of size
            scale = 0.5 + 0.8 * (u if direction > 0 else 1 - u)
        else:           # sway: rotation oscillating about the resting angle
            angle = rest + 0.7 * math.sin(phase + 2 * math.pi * t / 8)
        frames[t][_shape_mask(shape, xx, yy, x, y, r * scale, angle)] = colour


def _shape_mask(shape: str, xx, yy, x: float, y: float, r: float, angle: float) -> np.ndarray:
    """Pixels of a square (half-side r), disc (radius r) or bar (1.6r by 0.35r half-sizes) at (x, y)."""
    if shape == "square":
        return (np.abs(xx - x) <= r) & (np.abs(yy - y) <= r)
    if shape == "disc":
        return (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    ux, uy = math.cos(angle), math.sin(angle)
    along = (xx - x) * ux + (yy - y) * uy
    across = -(xx - x) * uy + (yy - y) * ux
    return (np.abs(along) <= 1.6 * r) & (np.abs(across) <= 0.35 * r)


def write_frames(frames: np.ndarray, root: Path, video_id: str, fmt: str, fps: float) -> None:
    """Write uint8 (T, H, W, 3) frames as ``root/video_id/img_00000.jpg...`` or ``root/video_id.mp4``."""
    if fmt == "jpg":
        from PIL import Image

        folder = root / video_id
        folder.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(frames):
            Image.fromarray(frame).save(folder / f"img_{t:05d}.jpg", quality=92)
    else:
        from video import write_video

        write_video(root / f"{video_id}.mp4", frames, fps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Generate (or find) the synthetic TAL dataset and print its folder.")
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    p.add_argument("--format", default="jpg", choices=("jpg", "mp4"))
    for f in dataclasses.fields(SyntheticConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = SyntheticConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)})
    print(ensure_dataset(cfg, args.cache, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main())
