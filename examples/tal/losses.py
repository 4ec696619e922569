"""Losses of the ActionFormer-style head: sigmoid focal loss and 1-D distance-IoU loss.

Both return per-element losses (reduction is the caller's: the head normalises by the
number of positive points).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) on independent sigmoid outputs, per element.

    FL = -alpha_t * (1 - p_t)^gamma * log(p_t), with p_t = p for a positive target and 1 - p
    for a negative; alpha < 0 turns the class weighting off. Easy negatives, which are most
    points of a video, then contribute almost nothing.
    """
    logits, targets = logits.float(), targets.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def diou_loss_1d(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - IoU + (centre distance / enclosing length)^2 for 1-D segments, per segment.

    Both inputs are (..., 2): distances (left, right) >= 0 from one point to a segment's start
    and end. The centre term keeps a gradient when the segments do not overlap (DIoU, Zheng
    et al., 2020).
    """
    pred, target = pred.float(), target.float()
    lp, rp = pred[..., 0], pred[..., 1]
    lt, rt = target[..., 0], target[..., 1]
    inter = torch.minimum(lp, lt) + torch.minimum(rp, rt)
    union = (lp + rp) + (lt + rt) - inter
    iou = inter / union.clamp_min(eps)
    enclosing = torch.maximum(lp, lt) + torch.maximum(rp, rt)
    centre_dist = 0.5 * ((rp - lp) - (rt - lt))
    return 1 - iou + (centre_dist / enclosing.clamp_min(eps)) ** 2
