"""Annotation format and converters, the synthetic generator, and frame decoding."""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import json
import os

import numpy as np
import pytest
import torch

import data
import synthetic
import video
from configs import SyntheticConfig


# -- annotation format -------------------------------------------------------------------------

def test_parse_database_round_trip(tmp_path):
    obj = {"database": {"v1": {"duration": 12.5, "subset": "training", "fps": 25,
                               "annotations": [{"segment": [1.0, 2.5], "label": "Jump"}]}}}
    path = tmp_path / "gt.json"
    data.atomic_write_json(path, obj)
    videos = data.load_annotations(path)
    rec = videos["v1"]
    assert (rec.duration, rec.subset, rec.fps) == (12.5, "training", 25.0)
    assert rec.segments == [data.Segment(1.0, 2.5, "Jump")]
    assert data.to_database(videos.values()) == obj
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left behind
    assert path.stat().st_mode & 0o777 == data.default_file_mode()          # not mkstemp's 0600


@pytest.mark.parametrize("entry, message", [
    ({"subset": "training"}, "numeric 'duration'"),
    ({"duration": 3}, "'subset'"),
    ({"duration": 3, "subset": "training", "fps": -1}, "'fps' must be a positive number"),
    ({"duration": 3, "subset": "training", "annotations": [{"segment": [2, 1], "label": "a"}]}, "before its start"),
    ({"duration": 3, "subset": "training", "annotations": [{"label": "a"}]}, "needs 'segment'"),
])
def test_parse_database_errors(entry, message):
    with pytest.raises(data.AnnotationError, match=message):
        data.parse_database({"database": {"v": entry}})
    with pytest.raises(data.AnnotationError, match="'database'"):
        data.parse_database({"videos": {}})


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    data.atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        data.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# -- converters --------------------------------------------------------------------------------

def write_thumos(tmp_path):
    ann = tmp_path / "annotation"
    ann.mkdir()
    (ann / "BaseballPitch_val.txt").write_text("video_validation_0000051 67.5 75.9\nvideo_validation_0000051 85.9 90.6\n")
    (ann / "CliffDiving_val.txt").write_text("video_validation_0000052 2.0 4.1\n")
    (ann / "Ambiguous_val.txt").write_text("video_validation_0000051 10.0 12.0\nvideo_validation_0000053 1 2\n")
    test = tmp_path / "test_annotation"
    test.mkdir()
    (test / "CliffDiving_test.txt").write_text("video_test_0000004 0.2 1.1\n")
    (test / "README.txt").write_text("not an annotation file")
    return [str(ann), str(test)]


def test_convert_thumos14_drops_ambiguous(tmp_path):
    durations = {"video_validation_0000051": 100.0, "video_validation_0000052": 50.0,
                 "video_validation_0000053": 20.0, "video_test_0000004": 10.0}
    out = data.convert_thumos14(write_thumos(tmp_path), durations, fps=30.0)
    db = out["database"]
    assert set(db) == set(durations)
    v51 = db["video_validation_0000051"]
    assert v51["subset"] == "validation" and v51["fps"] == 30.0 and v51["duration"] == 100.0
    assert [a["segment"] for a in v51["annotations"]] == [[67.5, 75.9], [85.9, 90.6]]
    assert db["video_validation_0000053"]["annotations"] == []     # only ambiguous: a background video
    assert db["video_test_0000004"]["subset"] == "test"
    labels = {a["label"] for v in db.values() for a in v["annotations"]}
    assert labels == {"BaseballPitch", "CliffDiving"}              # no "Ambiguous"
    data.parse_database(out)                                       # valid in our format


def test_convert_thumos14_errors(tmp_path):
    dirs = write_thumos(tmp_path)
    with pytest.raises(data.AnnotationError, match="no duration for video 'video_validation_0000051'"):
        data.convert_thumos14(dirs, {})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.AnnotationError, match="no THUMOS-14 annotation files"):
        data.convert_thumos14([str(empty)], {})


def test_convert_thumos14_cli_with_frame_counts(tmp_path, capsys):
    dirs = write_thumos(tmp_path)
    frames = tmp_path / "frames"
    for vid, n in (("video_validation_0000051", 9), ("video_validation_0000052", 3),
                   ("video_validation_0000053", 3), ("video_test_0000004", 6)):
        (frames / vid).mkdir(parents=True)
        for i in range(n):
            (frames / vid / f"img_{i:05d}.jpg").write_bytes(b"")
    out = tmp_path / "gt.json"
    argv = ["thumos14", "--annotations", dirs[0], "--annotations", dirs[1], "--frames-root", str(frames),
            "--fps", "3", "-o", str(out)]
    assert data.main(argv) == 0
    db = json.loads(out.read_text())["database"]
    assert db["video_validation_0000051"]["duration"] == 3.0


def test_convert_anet():
    anet = {"version": "1.3", "taxonomy": [], "database": {
        "abc": {"subset": "training", "duration": 30.2, "resolution": "640x360", "url": "u",
                "annotations": [{"segment": [3.0, 9.5], "label": "Long jump"}, {"segment": [1.0, 2.0], "label": "Long jump"}]},
        "xyz": {"subset": "testing", "duration": 12.0, "annotations": []},
    }}
    out = data.convert_anet(anet, fps=15.0, prefix="v_")
    db = out["database"]
    assert set(db) == {"v_abc", "v_xyz"}
    assert db["v_abc"]["fps"] == 15.0
    assert [a["segment"] for a in db["v_abc"]["annotations"]] == [[1.0, 2.0], [3.0, 9.5]]
    assert data.class_names(data.parse_database(out)) == ["Long jump"]


# -- synthetic data ----------------------------------------------------------------------------

SMALL = SyntheticConfig(seed=3, num_train=3, num_val=2, num_classes=3, size=16, min_frames=24, max_frames=40,
                        fps=8.0, min_action=4, max_action=10, max_actions=3)


def test_synthetic_is_deterministic_and_valid(tmp_path):
    a = synthetic.ensure_dataset(SMALL, tmp_path / "a", verbose=False)
    b = synthetic.ensure_dataset(SMALL, tmp_path / "b", verbose=False)
    assert a.name == b.name                                          # the name hashes the parameters
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    videos = data.load_annotations(a / "annotations.json")
    assert sorted(v.subset for v in videos.values()) == ["training"] * 3 + ["validation"] * 2
    for vid, rec in videos.items():
        n = len(list((a / vid).glob("*.jpg")))
        assert rec.duration == pytest.approx(n / SMALL.fps) and SMALL.min_frames <= n <= SMALL.max_frames
        assert 1 <= len(rec.segments) <= SMALL.max_actions
        prev_end = -1.0
        for s in rec.segments:
            length = round((s.end - s.start) * SMALL.fps)
            assert SMALL.min_action <= length <= SMALL.max_action
            assert s.start >= prev_end and 0 <= s.start < s.end <= rec.duration
            prev_end = s.end
    other = synthetic.ensure_dataset(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}), tmp_path / "a", verbose=False)
    assert other != a
    assert synthetic.ensure_dataset(SMALL, tmp_path / "a", verbose=False) == a   # cached, not regenerated
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]


def test_synthetic_actions_are_visible():
    rng = np.random.default_rng(0)
    cfg = SyntheticConfig(**{**SMALL.__dict__, "size": 32})
    frames, actions = synthetic.render_video(cfg, rng)
    colours = np.asarray([c for _, c in synthetic.CLASSES]) * 255
    for start, end, cls in actions:
        inside = frames[start:end].reshape(-1, 3).astype(float)
        # many pixels close to the class colour during the action ...
        near = (np.abs(inside - colours[cls]).max(axis=1) < 60).mean()
        assert near > 0.02
    mask = np.ones(len(frames), dtype=bool)
    for start, end, _ in actions:
        mask[start:end] = False
    outside = frames[mask].reshape(-1, 3).astype(float)
    for cls in range(cfg.num_classes):    # ... and none outside any action
        assert (np.abs(outside - colours[cls]).max(axis=1) < 60).mean() < 0.002


def test_synthetic_motion_only_shares_appearance():
    cfg = SyntheticConfig(**{**SMALL.__dict__, "size": 32, "motion_only": True, "num_classes": 4, "max_actions": 3})
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(6):
        frames, actions = synthetic.render_video(cfg, rng)
        shared = np.asarray(synthetic.SHARED_COLOUR) * 255
        for start, end, cls in actions:
            seen.add(cls)
            pixels = frames[start:end].reshape(-1, 3).astype(float)
            assert (np.abs(pixels - shared).max(axis=1) < 40).mean() > 0.01       # the grey bar is there
            for colour in np.asarray([c for _, c in synthetic.CLASSES]) * 255:   # no class colour is
                assert (np.abs(pixels - colour).max(axis=1) < 40).mean() < 0.002
    assert len(seen) >= 3


def test_synthetic_rejects_bad_config(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.ensure_dataset(SyntheticConfig(num_classes=99), tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        synthetic.ensure_dataset(SyntheticConfig(min_frames=10, max_action=20), tmp_path)


# -- decoding ----------------------------------------------------------------------------------

def test_jpeg_folder(tmp_path):
    root = synthetic.ensure_dataset(SMALL, tmp_path, verbose=False)
    src = video.open_video(root, "syn_train_0000")
    assert isinstance(src, video.JpegFolder)
    frames = src.read([0, 1, 1, src.num_frames + 5])
    assert frames.shape == (4, 3, 16, 16) and frames.dtype == torch.uint8
    assert torch.equal(frames[1], frames[2]) and torch.equal(frames[3], src.read([src.num_frames - 1])[0])
    with pytest.raises(FileNotFoundError, match="no frames for video 'nope'"):
        video.open_video(root, "nope")


def test_video_file_matches_rendered_frames(tmp_path):
    pytest.importorskip("av")
    rng = np.random.default_rng(1)
    cfg = SyntheticConfig(**{**SMALL.__dict__, "size": 32})
    frames, _ = synthetic.render_video(cfg, rng)
    video.write_video(tmp_path / "clip.mp4", frames, fps=8.0)
    src = video.open_video(tmp_path, "clip")
    assert isinstance(src, video.VideoFile)
    assert src.num_frames == len(frames) and src.fps == pytest.approx(8.0)
    picks = [len(frames) - 1, 0, 5, 5, 17]
    got = src.read(picks).permute(0, 2, 3, 1).float()
    want = torch.from_numpy(frames[picks]).float()
    assert (got - want).abs().mean() < 6      # lossy codec, same frames
    # a wrong frame would differ much more (the background moves, actions come and go)
    assert (src.read([6]).permute(0, 2, 3, 1).float()[0] - want[2]).abs().mean() > (got[2] - want[2]).abs().mean()
