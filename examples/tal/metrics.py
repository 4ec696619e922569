"""ActivityNet temporal detection mAP, following the official protocol.

For each class with ground truth in the evaluated subset:
  1. its predictions are sorted by score, highest first (a stable sort: equal scores keep
     the order of the predictions file);
  2. at each tIoU threshold, each prediction in turn is matched to the ground-truth segment of
     its video, of its class, not yet matched at that threshold, with the highest tIoU, provided
     that tIoU >= threshold; otherwise it is a false positive;
  3. AP is the area under the precision envelope (all-point interpolation) of the resulting
     precision/recall curve, recall being over all ground truth of the class.
mAP is the mean of AP over the classes that have ground truth; the average mAP is the mean
over thresholds.

Edge cases, decided as the official code does:
  - a predicted label absent from the ground truth of the subset is not evaluated (no class to
    average over); `evaluate` counts such predictions in `ignored_predictions`;
  - a prediction for a video outside the subset, or for a video without ground truth of its
    class, is a false positive of its class;
  - a video with no predictions: its ground truth is simply never matched (lower recall);
  - zero-length segments: tIoU is intersection / union and 0 when the union is empty, so a
    zero-length prediction never matches (for thresholds > 0), and a zero-length ground
    truth counts as a positive that cannot be found;
  - duplicate predictions: the first matches, the copy finds its ground truth taken and is a
    false positive (unless another ground truth of that video fits).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np


def parse_tious(spec: str) -> np.ndarray:
    """"START:STOP:NUM" -> numpy.linspace(START, STOP, NUM)."""
    parts = spec.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        start, stop, num = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"tIoU thresholds {spec!r}: expected START:STOP:NUM, e.g. 0.5:0.95:10") from None
    if num < 1 or not (0 <= start <= 1 and 0 <= stop <= 1):
        raise ValueError(f"tIoU thresholds {spec!r}: need NUM >= 1 and START, STOP in [0, 1]")
    return np.linspace(start, stop, num)


def segment_tiou(segment: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """tIoU of one [start, end] with each row of candidates (N, 2); 0 where the union is empty."""
    inter = np.clip(np.minimum(segment[1], candidates[:, 1]) - np.maximum(segment[0], candidates[:, 0]), 0, None)
    union = (segment[1] - segment[0]) + (candidates[:, 1] - candidates[:, 0]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """All-point interpolated AP: area under the monotone envelope of precision over recall."""
    mprec = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))


def average_precision(gt: Mapping[str, np.ndarray], preds: Sequence[Tuple[str, float, Sequence[float]]],
                      tious: np.ndarray) -> np.ndarray:
    """AP of one class at each threshold.

    Args:
        gt: video id -> (N, 2) ground-truth segments of this class.
        preds: (video id, score, [start, end]) predictions of this class.
        tious: thresholds.
    """
    tious = np.asarray(tious, dtype=np.float64)
    npos = sum(len(v) for v in gt.values())
    if npos == 0:
        raise ValueError("average_precision needs at least one ground-truth segment")
    if not preds:
        return np.zeros(len(tious))
    scores = np.asarray([p[1] for p in preds], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    tp = np.zeros((len(tious), len(preds)))
    fp = np.zeros((len(tious), len(preds)))
    taken = {vid: np.zeros((len(tious), len(g)), dtype=bool) for vid, g in gt.items()}
    for rank, k in enumerate(order):
        vid, _, seg = preds[k]
        g = gt.get(vid)
        if g is None or len(g) == 0:
            fp[:, rank] = 1
            continue
        ious = segment_tiou(np.asarray(seg, dtype=np.float64), g)
        by_iou = np.argsort(-ious, kind="stable")
        for t, thr in enumerate(tious):
            for j in by_iou:
                if ious[j] < thr:
                    break
                if not taken[vid][t, j]:
                    taken[vid][t, j] = True
                    tp[t, rank] = 1
                    break
            if not tp[t, rank]:
                fp[t, rank] = 1
    tp_c, fp_c = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    recall = tp_c / npos
    precision = tp_c / (tp_c + fp_c)
    return np.asarray([interpolated_ap(precision[t], recall[t]) for t in range(len(tious))])


def ground_truth_by_class(database: Mapping, subset: Optional[str]) -> Tuple[Dict[str, Dict[str, np.ndarray]], set]:
    """{label: {video: (N, 2)}} for the videos of `subset` (all when None), and those videos' ids."""
    by_class: Dict[str, Dict[str, List]] = defaultdict(lambda: defaultdict(list))
    videos = set()
    for vid, entry in database.items():
        if subset is not None and entry.get("subset") != subset:
            continue
        videos.add(vid)
        for ann in entry.get("annotations", []):
            by_class[ann["label"]][vid].append([float(ann["segment"][0]), float(ann["segment"][1])])
    out = {label: {v: np.asarray(s, dtype=np.float64).reshape(-1, 2) for v, s in vids.items()}
           for label, vids in by_class.items()}
    return out, videos


def evaluate(gt: Mapping, pred: Mapping, subset: Optional[str] = "validation",
             tious: Sequence[float] = tuple(np.linspace(0.5, 0.95, 10))) -> dict:
    """mAP of an ActivityNet results dict against an annotation dict.

    Args:
        gt: ``{"database": {video: {subset, annotations: [{segment, label}]}}}``.
        pred: ``{"results": {video: [{label, score, segment}]}}``.
        subset: evaluate the videos of this subset (None: all).
        tious: tIoU thresholds.

    Returns ``{"tious", "mAP" (per threshold), "average_mAP", "ap" ({label: [AP per threshold]}),
    "ignored_predictions"}``.
    """
    if "database" not in gt:
        raise ValueError("ground truth needs a 'database' mapping (ActivityNet format)")
    if "results" not in pred:
        raise ValueError("predictions need a 'results' mapping (ActivityNet results format)")
    tious = np.asarray(tious, dtype=np.float64)
    gt_by_class, videos = ground_truth_by_class(gt["database"], subset)
    if not gt_by_class:
        raise ValueError(f"no ground-truth segments in subset {subset!r}; check --subset")
    preds_by_class: Dict[str, List] = defaultdict(list)
    ignored = 0
    for vid, items in pred["results"].items():
        for k, p in enumerate(items):
            try:
                label, score = p["label"], float(p["score"])
                seg = [float(p["segment"][0]), float(p["segment"][1])]
            except (KeyError, TypeError, ValueError, IndexError):
                raise ValueError(f"prediction {k} of video {vid!r}: needs label, score, segment [start, end]") from None
            if label not in gt_by_class:
                ignored += 1
                continue
            preds_by_class[label].append((vid, score, seg))
    ap = {label: average_precision(g, preds_by_class.get(label, []), tious) for label, g in sorted(gt_by_class.items())}
    m = np.mean(np.stack(list(ap.values())), axis=0)
    return {
        "tious": [round(float(t), 6) for t in tious],
        "mAP": [float(x) for x in m],
        "average_mAP": float(np.mean(m)),
        "ap": {label: [float(x) for x in v] for label, v in ap.items()},
        "ignored_predictions": ignored,
        "videos": len(videos),
    }
