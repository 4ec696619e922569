"""Windows, sampling and augmentation."""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import numpy as np
import pytest
import torch

import data
import synthetic
from configs import DataConfig, SyntheticConfig
from datasets import (RandomWindows, SlidingWindows, build_index, choose_train_window, collate, crop_resize,
                      frame_indices, sampling, sliding_window_starts)


def test_frame_indices_centre_of_each_sample():
    assert frame_indices(0, 4, 1.0, 100) == [0, 1, 2, 3]
    assert frame_indices(2, 3, 4.0, 100) == [10, 14, 18]      # floor((j + 0.5) * 4)
    assert frame_indices(0, 3, 2.5, 6) == [1, 3, 5]
    assert frame_indices(0, 3, 4.0, 6) == [2, 5, 5]             # clamped to the last frame


def test_choose_train_window_keeps_whole_actions():
    rng = np.random.default_rng(0)
    segs = np.array([[10.0, 30.0], [50.0, 60.0], [100.0, 140.0]])
    for _ in range(200):
        j0, keep = choose_train_window(segs, 200, 64, rng)
        assert 0 <= j0 <= 136 and keep.any()
        for (a, b), k in zip(segs, keep):
            inside = a >= j0 and b <= j0 + 64
            outside = b <= j0 or a >= j0 + 64
            assert inside or outside                 # no action is cut
            assert k == inside


def test_choose_train_window_falls_back_to_truncation():
    rng = np.random.default_rng(0)
    segs = np.array([[0.0, 100.0]])                   # longer than the window: must be cut
    for _ in range(50):
        j0, keep = choose_train_window(segs, 120, 64, rng, trunc_thresh=0.5)
        inter = min(100, j0 + 64) - max(0, j0)
        assert keep[0] == (inter / 100 >= 0.5)
    j0, keep = choose_train_window(segs, 50, 64, rng)  # video shorter than the window
    assert j0 == 0 and keep.all()
    j0, keep = choose_train_window(np.zeros((0, 2)), 500, 64, rng)
    assert 0 <= j0 <= 436 and keep.shape == (0,)


@pytest.mark.parametrize("n, window, overlap", [(10, 64, 0.5), (64, 64, 0.5), (65, 64, 0.5), (300, 64, 0.25), (1000, 128, 0.0)])
def test_sliding_windows_cover_the_video(n, window, overlap):
    starts = sliding_window_starts(n, window, overlap)
    covered = np.zeros(n, dtype=bool)
    for s in starts:
        covered[s:s + window] = True
        assert s + window <= max(n, window)
    assert covered.all() and starts == sorted(set(starts))
    if n > window:
        assert starts[-1] == n - window
        gaps = np.diff(starts)
        assert gaps.max() <= round(window * (1 - overlap))


def test_crop_resize_shapes_and_flip():
    frames = torch.zeros(3, 3, 40, 60, dtype=torch.uint8)
    frames[:, 0, :, :30] = 255                                   # left half red
    out = crop_resize(frames, short=40, crop=40, box=(0.0, 0.0), flip=False)
    assert out.shape == (3, 3, 40, 40) and out.dtype == torch.float32
    assert out[0, 0, :, :20].mean() == pytest.approx(1.0) and out[0, 0, :, 35:].mean() < 0.01
    flipped = crop_resize(frames, short=40, crop=40, box=(0.0, 0.0), flip=True)
    assert torch.equal(flipped, out.flip(-1))
    small = crop_resize(frames, short=20, crop=16, box=(0.5, 0.5), flip=False)
    assert small.shape == (3, 3, 16, 16)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    cfg = SyntheticConfig(seed=5, num_train=4, num_val=2, num_classes=3, size=20, min_frames=30, max_frames=50,
                          fps=5.0, min_action=4, max_action=10, max_actions=2)
    return synthetic.ensure_dataset(cfg, tmp_path_factory.mktemp("syn"), verbose=False)


def test_random_windows_targets_match_frames(tiny_root):
    videos = data.load_annotations(tiny_root / "annotations.json")
    classes = data.class_names(videos)
    items = build_index(videos, "training", classes, str(tiny_root))
    cfg = DataConfig(window=16, resize=20, crop=16)
    ds = RandomWindows(items, cfg)
    torch.manual_seed(0)
    for i in range(len(ds)):
        x = ds[i]
        assert x["clip"].shape == (3, 16, 16, 16)
        assert 1 <= x["valid"] <= 16
        segs = x["segments"]
        assert segs.shape[1] == 2 and len(segs) == len(x["labels"])
        assert (segs >= 0).all() and (segs <= x["valid"]).all() and (segs[:, 1] > segs[:, 0]).all()
        assert (x["clip"][:, x["valid"]:] == 0).all()             # padding after the real frames
    batch = collate([ds[0], ds[1]])
    assert batch["clip"].shape == (2, 3, 16, 16, 16) and batch["valid"].shape == (2,)
    assert isinstance(batch["segments"], list) and len(batch["segments"]) == 2


def test_sliding_windows_enumerate_every_video(tiny_root):
    videos = data.load_annotations(tiny_root / "annotations.json")
    items = build_index(videos, "validation", data.class_names(videos), str(tiny_root))
    cfg = DataConfig(window=16, resize=20, crop=16, test_overlap=0.5)
    ds = SlidingWindows(items, cfg)
    for item in items:
        stride, n = sampling(item, cfg)
        starts = [j0 for k, j0 in ds.windows if ds.items[k].video_id == item.video_id]
        assert starts == sliding_window_starts(n, 16, 0.5)
    x = ds[0]
    assert x["clip"].shape == (3, 16, 16, 16) and x["start"] == 0 and x["stride"] == 1.0
    fixed = SlidingWindows(items, DataConfig(window=16, resize=20, crop=16, fixed_length=True))
    assert len(fixed) == len(items)                               # one resampled window per video
    assert fixed[0]["valid"] == 16 and fixed[0]["stride"] == pytest.approx(items[0].num_frames / 16)


def test_build_index_errors(tiny_root):
    videos = data.load_annotations(tiny_root / "annotations.json")
    with pytest.raises(ValueError, match="no videos in subset 'test'"):
        build_index(videos, "test", ["slide"], str(tiny_root))
    with pytest.raises(FileNotFoundError, match="no frames for video"):
        build_index(videos, "training", ["slide"], str(tiny_root / "elsewhere"))
