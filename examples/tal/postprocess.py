"""From raw window predictions to a video's final segments in seconds.

Windows of one video overlap, so the same action is found more than once: every window's
candidates are first converted to seconds and pooled per video, then per-class Gaussian
Soft-NMS (Bodla et al., 2017) decays the scores of overlapping candidates instead of
deleting them, which keeps recall at high tIoU, and the best `max_segments` are kept.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch


def tiou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Temporal IoU of every segment in a (N, 2) with every one in b (M, 2); 0 where the union is empty."""
    inter = (torch.minimum(a[:, None, 1], b[None, :, 1]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(inter))


def soft_nms(segments: torch.Tensor, scores: torch.Tensor, sigma: float = 0.5, min_score: float = 0.001,
             max_keep: int = 200) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gaussian Soft-NMS for one class: (indices into `segments`, their decayed scores), best first.

    Repeatedly takes the best remaining candidate and multiplies every other score by
    exp(-tIoU^2 / sigma); candidates that fall below `min_score` are dropped.
    """
    scores = scores.clone().float()
    alive = torch.arange(len(scores))
    kept, kept_scores = [], []
    while alive.numel() and len(kept) < max_keep:
        best = int(torch.argmax(scores[alive]))
        i = int(alive[best])
        if scores[i] < min_score:
            break
        kept.append(i)
        kept_scores.append(float(scores[i]))
        alive = torch.cat([alive[:best], alive[best + 1:]])
        if alive.numel():
            iou = tiou_matrix(segments[i:i + 1], segments[alive])[0]
            scores[alive] *= torch.exp(-(iou ** 2) / sigma)
            alive = alive[scores[alive] >= min_score]
    return torch.as_tensor(kept, dtype=torch.long), torch.as_tensor(kept_scores)


def window_to_seconds(segments: torch.Tensor, start: int, stride: float, fps: float, duration: float) -> torch.Tensor:
    """Window coordinates (sampled frames from sample `start`) -> seconds, clipped to the video."""
    return ((segments + start) * stride / fps).clamp(min=0.0, max=duration)


def merge_video(candidates: Sequence[Dict[str, torch.Tensor]], sigma: float = 0.5, min_score: float = 0.001,
                max_segments: int = 100) -> Dict[str, torch.Tensor]:
    """Pool a video's candidates (segments in seconds) and run per-class Soft-NMS."""
    segs = torch.cat([c["segments"] for c in candidates]) if candidates else torch.zeros(0, 2)
    scores = torch.cat([c["scores"] for c in candidates]) if candidates else torch.zeros(0)
    labels = torch.cat([c["labels"] for c in candidates]) if candidates else torch.zeros(0, dtype=torch.long)
    out_s, out_p, out_l = [], [], []
    for cls in labels.unique().tolist():
        idx = torch.nonzero(labels == cls).squeeze(1)
        keep, decayed = soft_nms(segs[idx], scores[idx], sigma, min_score, max_segments)
        out_s.append(segs[idx][keep])
        out_p.append(decayed)
        out_l.append(torch.full((len(keep),), cls, dtype=torch.long))
    if not out_s:
        return {"segments": torch.zeros(0, 2), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    segs, scores, labels = torch.cat(out_s), torch.cat(out_p), torch.cat(out_l)
    order = torch.argsort(scores, descending=True, stable=True)[:max_segments]
    return {"segments": segs[order], "scores": scores[order], "labels": labels[order]}


class VideoCollector:
    """Accumulates window predictions per video; `results()` gives the ActivityNet results dict."""

    def __init__(self, classes: Sequence[str], sigma: float = 0.5, min_score: float = 0.001,
                 max_segments: int = 100):
        self.classes = list(classes)
        self.sigma, self.min_score, self.max_segments = sigma, min_score, max_segments
        self.windows: Dict[str, List[Dict[str, torch.Tensor]]] = defaultdict(list)

    def add(self, video_id: str, pred: Dict[str, torch.Tensor], start: int, stride: float, fps: float,
            duration: float) -> None:
        self.windows[video_id].append({
            "segments": window_to_seconds(pred["segments"], start, stride, fps, duration),
            "scores": pred["scores"], "labels": pred["labels"],
        })

    def results(self, video_ids: Sequence[str] = ()) -> dict:
        """``{"results": {video: [{label, score, segment}]}}``; every id in `video_ids` appears, maybe empty."""
        out = {vid: [] for vid in video_ids}
        for vid, cands in self.windows.items():
            merged = merge_video(cands, self.sigma, self.min_score, self.max_segments)
            out[vid] = [
                {"label": self.classes[int(l)], "score": round(float(s), 6),
                 "segment": [round(float(a), 4), round(float(b), 4)]}
                for (a, b), s, l in zip(merged["segments"].tolist(), merged["scores"], merged["labels"])
            ]
        return {"version": "revwire-tal", "results": out, "external_data": {}}
