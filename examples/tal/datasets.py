"""Windows of frames for training and testing, and their augmentation.

Coordinates. A video is sampled every `stride` frames (a float when a whole video is
resampled to a fixed length): sample j, counted from the video's start, covers frames
[j*stride, (j+1)*stride), i.e. seconds [j*stride / fps, (j+1)*stride / fps), and shows frame
floor((j + 0.5) * stride). A window is `window` consecutive samples starting at sample j0. Targets and predictions
inside a window are in sample units u, relative to the window: seconds = (j0 + u) * stride / fps.

Training windows are random; they keep whole actions where the video allows it (random
truncation among the windows that cut no action), else cut actions that keep at least
`trunc_thresh` of their length. Test windows slide with overlap and cover the whole video;
their predictions are merged per video before NMS (postprocess.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from configs import DataConfig
from data import VideoRecord
from video import open_video


@dataclass
class VideoItem:
    """One video of a subset: where its frames are, and its actions in seconds."""

    video_id: str
    fps: float
    num_frames: int
    duration: float
    segments: np.ndarray        # (N, 2) seconds
    labels: np.ndarray          # (N,) class indices
    media_root: str

    def open(self):
        return open_video(self.media_root, self.video_id, self.fps)


def build_index(videos: Mapping[str, VideoRecord], subset: str, classes: Sequence[str],
                media_root: str) -> List[VideoItem]:
    """The videos of `subset` with their frame counts; labels outside `classes` are dropped."""
    index = {name: k for k, name in enumerate(classes)}
    items = []
    for vid, rec in sorted(videos.items()):
        if rec.subset != subset:
            continue
        source = open_video(media_root, vid, rec.fps)
        fps = rec.fps or source.fps
        if not fps:
            raise ValueError(f"video {vid!r}: no frame rate; add 'fps' to its annotation entry")
        segs = [(s.start, s.end, index[s.label]) for s in rec.segments if s.label in index]
        arr = np.asarray([(a, b) for a, b, _ in segs], dtype=np.float64).reshape(-1, 2)
        labels = np.asarray([k for _, _, k in segs], dtype=np.int64)
        items.append(VideoItem(vid, float(fps), source.num_frames, rec.duration, arr, labels, str(media_root)))
    if not items:
        raise ValueError(f"no videos in subset {subset!r}; check data.train_subset / data.test_subset")
    return items


def sampling(item: VideoItem, cfg: DataConfig) -> Tuple[float, int]:
    """(stride in frames, number of samples) for a video."""
    if cfg.fixed_length:
        return item.num_frames / cfg.window, cfg.window
    return float(cfg.snippet_stride), math.ceil(item.num_frames / cfg.snippet_stride)


def frame_indices(j0: int, count: int, stride: float, num_frames: int) -> List[int]:
    """Frame numbers shown by samples j0 .. j0+count-1 (clamped to the video)."""
    return [min(int(math.floor((j0 + j + 0.5) * stride)), num_frames - 1) for j in range(count)]


def choose_train_window(segments: np.ndarray, n: int, window: int, rng: np.random.Generator,
                        trunc_thresh: float = 0.5, tries: int = 10) -> Tuple[int, np.ndarray]:
    """Pick a window start j0 for `n` samples; return (j0, keep) where keep flags the kept segments.

    `segments` are (N, 2) in sample units. Starts that cut no action and contain at least one
    are preferred; otherwise ActionFormer's rule: up to `tries` random starts, keeping actions
    with at least `trunc_thresh` of their length inside, until one keeps some action.
    """
    if n <= window:
        return 0, np.ones(len(segments), dtype=bool)
    starts = np.arange(n - window + 1)
    if len(segments):
        a, b = segments[:, 0][None], segments[:, 1][None]
        s = starts[:, None]
        inside = (a >= s) & (b <= s + window)
        outside = (b <= s) | (a >= s + window)
        whole = (inside | outside).all(axis=1) & inside.any(axis=1)
        if whole.any():
            j0 = int(rng.choice(starts[whole]))
            return j0, (segments[:, 0] >= j0) & (segments[:, 1] <= j0 + window)
    keep = np.zeros(len(segments), dtype=bool)
    j0 = 0
    for _ in range(tries):
        j0 = int(rng.integers(0, n - window + 1))
        if not len(segments):
            break
        inter = np.clip(np.minimum(segments[:, 1], j0 + window) - np.maximum(segments[:, 0], j0), 0, None)
        length = np.maximum(segments[:, 1] - segments[:, 0], 1e-6)
        keep = inter / length >= trunc_thresh
        if keep.any():
            break
    return j0, keep


def sliding_window_starts(n: int, window: int, overlap: float) -> List[int]:
    """Starts of sliding windows over `n` samples, `overlap` apart, the last one ending at n."""
    if n <= window:
        return [0]
    step = max(1, int(round(window * (1 - overlap))))
    starts = list(range(0, n - window + 1, step))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


def crop_resize(frames: torch.Tensor, short: float, crop: int, box: Tuple[float, float], flip: bool,
                chunk: int = 64) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> float (T, 3, crop, crop) in [0, 1].

    Equivalent to resizing the shorter side to `short` and cropping a `crop` square at relative
    offset `box` (each in [0, 1]), but crops first so only the crop is resized.
    """
    t, _, h, w = frames.shape
    scale = short / min(h, w)
    size = min(crop / scale, h, w)                     # crop side in source pixels
    y0 = int(round(box[0] * (h - size)))
    x0 = int(round(box[1] * (w - size)))
    side = max(1, int(round(size)))
    region = frames[:, :, y0:y0 + side, x0:x0 + side]
    out = torch.empty(t, 3, crop, crop)
    for i in range(0, t, chunk):
        part = region[i:i + chunk].float().div_(255)
        out[i:i + chunk] = F.interpolate(part, size=(crop, crop), mode="bilinear", align_corners=False,
                                         antialias=side > crop)
    return out.flip(-1) if flip else out


def to_clip(frames: torch.Tensor, window: int, cfg: DataConfig) -> torch.Tensor:
    """float (T, 3, S, S) -> normalised (3, window, S, S), zero-padded after T."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    clip = torch.zeros(window, 3, frames.shape[-2], frames.shape[-1])
    clip[: len(frames)] = (frames - mean) / std
    return clip.permute(1, 0, 2, 3).contiguous()


class RandomWindows(Dataset):
    """Random windows with augmentation; one item per video per epoch."""

    def __init__(self, items: Sequence[VideoItem], cfg: DataConfig):
        self.items, self.cfg = list(items), cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item, cfg = self.items[i], self.cfg
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))  # follows torch's seeding
        stride, n = sampling(item, cfg)
        segs = item.segments * item.fps / stride          # sample units, from the video start
        j0, keep = choose_train_window(segs, n, cfg.window, rng, cfg.trunc_thresh)
        valid = min(cfg.window, n - j0)
        segs = np.clip(segs[keep] - j0, 0, valid)
        labels = item.labels[keep]
        frames = item.open().read(frame_indices(j0, valid, stride, item.num_frames))
        short = cfg.resize * rng.uniform(*cfg.scale_jitter)
        flip = cfg.flip and rng.random() < 0.5
        x = crop_resize(frames, short, cfg.crop, tuple(rng.random(2)), flip)
        return {
            "clip": to_clip(x, cfg.window, cfg),
            "valid": valid,
            "segments": torch.as_tensor(segs, dtype=torch.float32).reshape(-1, 2),
            "labels": torch.as_tensor(labels, dtype=torch.long),
            "video_id": item.video_id,
        }


class SlidingWindows(Dataset):
    """Sliding windows over every video, centre crop, no flip."""

    def __init__(self, items: Sequence[VideoItem], cfg: DataConfig):
        self.items, self.cfg = list(items), cfg
        self.windows: List[Tuple[int, int]] = []
        for k, item in enumerate(self.items):
            _, n = sampling(item, cfg)
            self.windows += [(k, j0) for j0 in sliding_window_starts(n, cfg.window, cfg.test_overlap)]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        k, j0 = self.windows[i]
        item, cfg = self.items[k], self.cfg
        stride, n = sampling(item, cfg)
        valid = min(cfg.window, n - j0)
        frames = item.open().read(frame_indices(j0, valid, stride, item.num_frames))
        x = crop_resize(frames, cfg.resize, cfg.crop, (0.5, 0.5), False)
        return {
            "clip": to_clip(x, cfg.window, cfg),
            "valid": valid,
            "video_id": item.video_id,
            "start": j0,
            "stride": stride,
            "fps": item.fps,
            "duration": item.duration,
        }


def collate(batch: List[dict]) -> dict:
    """Stack clips; keep per-window targets and metadata as lists."""
    out = {"clip": torch.stack([b["clip"] for b in batch]),
           "valid": torch.as_tensor([b["valid"] for b in batch], dtype=torch.long)}
    for key in batch[0]:
        if key not in out:
            out[key] = [b[key] for b in batch]
    return out
