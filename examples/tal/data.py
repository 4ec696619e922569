"""The one annotation format of this example, and converters into it.

Format (ActivityNet style)::

    {"database": {VIDEO_ID: {"duration": seconds, "subset": "training" | "validation" | "test",
                             "fps": frames per second of the frames on disk,
                             "annotations": [{"segment": [start_s, end_s], "label": NAME}, ...]}}}

Converters:
  python examples/tal/data.py thumos14 --annotations DIR [--annotations DIR2] --durations D.json -o gt.json
  python examples/tal/data.py anet --input activity_net.v1-3.min.json --fps 15 -o gt.json

THUMOS-14 ships one text file per class and split (``<Class>_val.txt``, ``<Class>_test.txt``)
with lines ``video_id start end``; the ``Ambiguous`` files mark unlabeled regions and are kept
out of training and evaluation. Durations are not in those files: give them as a JSON
``{video_id: seconds}`` (``--durations``) or count JPEG frames (``--frames-root DIR --fps F``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

SUBSETS = ("training", "validation", "test")
THUMOS_IGNORED = ("Ambiguous",)
_THUMOS_SPLIT = {"val": "validation", "validation": "validation", "test": "test"}


class AnnotationError(ValueError):
    """An annotation file that does not follow the format."""


@dataclass
class Segment:
    start: float
    end: float
    label: str


@dataclass
class VideoRecord:
    video_id: str
    duration: float
    subset: str
    fps: Optional[float]
    segments: List[Segment] = field(default_factory=list)


def default_file_mode() -> int:
    """Permissions a plain open() would give a new file (mkstemp's are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path, text: str) -> None:
    """Write `text` to `path` through a temporary file and os.replace, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path, what: str = "JSON file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{what} {str(path)!r} is not valid JSON ({e}); rewrite or regenerate it") from e


def parse_database(obj: Mapping, source: str = "annotations") -> Dict[str, VideoRecord]:
    """Validate an ActivityNet-style dict and return {video_id: VideoRecord}."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get("database"), Mapping):
        raise AnnotationError(f"{source}: expected a JSON object with a 'database' mapping of video ids")
    videos = {}
    for vid, entry in obj["database"].items():
        where = f"{source}: video {vid!r}"
        if not isinstance(entry, Mapping):
            raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
        try:
            duration = float(entry["duration"])
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(f"{where}: needs a numeric 'duration' in seconds") from None
        subset = entry.get("subset")
        if not isinstance(subset, str):
            raise AnnotationError(f"{where}: needs a 'subset' string such as {SUBSETS}")
        fps = entry.get("fps")
        if fps is not None and (not isinstance(fps, (int, float)) or fps <= 0):
            raise AnnotationError(f"{where}: 'fps' must be a positive number, got {fps!r}")
        segments = []
        for k, ann in enumerate(entry.get("annotations", [])):
            try:
                start, end = (float(x) for x in ann["segment"])
                label = str(ann["label"])
            except (KeyError, TypeError, ValueError):
                raise AnnotationError(
                    f"{where}, annotation {k}: needs 'segment': [start_s, end_s] and 'label'"
                ) from None
            if end < start:
                raise AnnotationError(f"{where}, annotation {k}: segment end {end} is before its start {start}")
            segments.append(Segment(start, end, label))
        videos[str(vid)] = VideoRecord(str(vid), duration, subset, None if fps is None else float(fps), segments)
    return videos


def load_annotations(path) -> Dict[str, VideoRecord]:
    """Read and validate an annotation file in this example's format."""
    return parse_database(read_json(path, "annotation file"), source=str(path))


def to_database(videos: Iterable[VideoRecord]) -> dict:
    db = {}
    for v in videos:
        entry = {
            "duration": round(v.duration, 6),
            "subset": v.subset,
            "annotations": [{"segment": [round(s.start, 6), round(s.end, 6)], "label": s.label} for s in v.segments],
        }
        if v.fps is not None:
            entry["fps"] = v.fps
        db[v.video_id] = entry
    return {"database": db}


def class_names(videos: Mapping[str, VideoRecord], subsets: Optional[Sequence[str]] = None) -> List[str]:
    """Sorted label names that occur in `subsets` (all subsets when None)."""
    names = {s.label for v in videos.values() if subsets is None or v.subset in subsets for s in v.segments}
    return sorted(names)


# -- THUMOS-14 ---------------------------------------------------------------------------------

_THUMOS_FILE = re.compile(r"^(?P<label>.+)_(?P<split>val|validation|test)\.txt$")


def convert_thumos14(
    annotation_dirs: Sequence[str],
    durations: Mapping[str, float],
    fps: Optional[float] = None,
) -> dict:
    """THUMOS-14 per-class text files -> this example's format.

    Args:
        annotation_dirs: folders holding ``<Class>_val.txt`` / ``<Class>_test.txt`` files.
        durations: seconds per video id; every annotated video needs one.
        fps: rate of the extracted frames, stored per video (None leaves it out).
    """
    videos: Dict[str, VideoRecord] = {}
    found = 0
    for folder in annotation_dirs:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"THUMOS-14 annotation folder {str(folder)!r} does not exist")
        for path in sorted(folder.glob("*.txt")):
            m = _THUMOS_FILE.match(path.name)
            if m is None:
                continue
            found += 1
            label, subset = m.group("label"), _THUMOS_SPLIT[m.group("split")]
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 3:
                    raise AnnotationError(f"{path}:{lineno}: expected 'video_id start end', got {line!r}")
                vid, start, end = parts[0], float(parts[1]), float(parts[2])
                if vid not in durations:
                    raise AnnotationError(
                        f"{path}:{lineno}: no duration for video {vid!r}; add it to --durations "
                        f"or give --frames-root with its frame folder"
                    )
                rec = videos.setdefault(vid, VideoRecord(vid, float(durations[vid]), subset, fps, []))
                if label in THUMOS_IGNORED:
                    continue  # ambiguous regions: neither a target nor a ground truth
                rec.segments.append(Segment(start, end, label))
    if found == 0:
        raise AnnotationError(
            f"no THUMOS-14 annotation files (<Class>_val.txt, <Class>_test.txt) in {list(annotation_dirs)}"
        )
    for rec in videos.values():
        rec.segments.sort(key=lambda s: (s.start, s.end, s.label))
    return to_database(v for _, v in sorted(videos.items()))


def durations_from_frames(frames_root, fps: float) -> Dict[str, float]:
    """Duration of every JPEG folder under `frames_root`: frame count / fps."""
    root = Path(frames_root)
    if not root.is_dir():
        raise FileNotFoundError(f"frames root {str(root)!r} does not exist")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        n = sum(1 for f in d.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))
        if n:
            out[d.name] = n / fps
    return out


# -- ActivityNet-1.3 --------------------------------------------------------------------------

def convert_anet(obj: Mapping, fps: Optional[float] = None, prefix: str = "",
                 fps_by_video: Optional[Mapping[str, float]] = None) -> dict:
    """ActivityNet-1.3's JSON (``activity_net.v1-3.min.json``) -> this example's format.

    Keeps duration, subset and annotations; adds the frame rate of the extracted frames
    (`fps`, or per video from `fps_by_video`) and prefixes ids (folders are often ``v_<id>``).
    Test videos, which have no public annotations, are kept with an empty list.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("database"), Mapping):
        raise AnnotationError("ActivityNet JSON: expected an object with a 'database' mapping")
    videos = []
    for vid, entry in sorted(obj["database"].items()):
        rate = (fps_by_video or {}).get(vid, fps)
        segments = [Segment(float(a["segment"][0]), float(a["segment"][1]), str(a["label"]))
                    for a in entry.get("annotations", [])]
        segments.sort(key=lambda s: (s.start, s.end, s.label))
        videos.append(VideoRecord(prefix + vid, float(entry["duration"]), entry["subset"], rate, segments))
    return to_database(videos)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Convert THUMOS-14 or ActivityNet-1.3 annotations to this example's JSON.")
    sub = p.add_subparsers(dest="dataset", required=True)
    t = sub.add_parser("thumos14", help="per-class text files -> JSON")
    t.add_argument("--annotations", action="append", required=True,
                   help="folder of <Class>_val.txt / <Class>_test.txt files (repeat for val and test)")
    t.add_argument("--durations", help="JSON {video_id: seconds}")
    t.add_argument("--frames-root", help="folder of <video_id>/ JPEG folders; durations = frames / --fps")
    t.add_argument("--fps", type=float, help="frame rate of the extracted frames (stored per video)")
    t.add_argument("-o", "--output", required=True)
    a = sub.add_parser("anet", help="activity_net.v1-3.min.json -> JSON")
    a.add_argument("--input", required=True)
    a.add_argument("--fps", type=float, help="frame rate of the extracted frames (stored per video)")
    a.add_argument("--prefix", default="", help="prepended to every video id, e.g. v_")
    a.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    try:
        if args.dataset == "thumos14":
            if args.durations:
                durations = {k: float(v) for k, v in read_json(args.durations, "durations file").items()}
            elif args.frames_root and args.fps:
                durations = durations_from_frames(args.frames_root, args.fps)
            else:
                p.error("thumos14 needs --durations, or --frames-root with --fps")
            out = convert_thumos14(args.annotations, durations, fps=args.fps)
        else:
            out = convert_anet(read_json(args.input, "ActivityNet JSON"), fps=args.fps, prefix=args.prefix)
    except (AnnotationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write_json(args.output, out)
    n = len(out["database"])
    print(f"wrote {n} videos to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
