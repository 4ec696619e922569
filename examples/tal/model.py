"""The localiser: a Swin3D backbone (run by one of four engines), a temporal pyramid, and
ActionFormer-style anchor-free heads.

Engines for the backbone:
  reversible  rewired by ``revwire.rewire``; backward recomputes activations (memory O(1) per stage)
  autograd    the same rewired network with ordinary autograd (stores activations; the reference)
  checkpoint  the original network, ``torch.utils.checkpoint`` (non-reentrant) around each Swin block
  frozen      the original network without gradients: features only, the backbone does not learn

A rewired network computes a different function from the original (docs/design.md §2), so a
model trained with reversible/autograd must be evaluated with one of those two, and one
trained with checkpoint/frozen with one of those; the state_dict keys are the same.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from configs import ENGINES, ModelConfig
from losses import diou_loss_1d, sigmoid_focal_loss

REWIRED_ENGINES = ("reversible", "autograd")


class SwinBackbone(nn.Module):
    """torchvision's SwinTransformer3d without its classifier, pooled over space.

    (B, 3, T, H, W) -> (B, C, T / patch_size[0]), C doubled for "mean+max" pooling. Submodule
    names are torchvision's, so a torchvision swin3d state_dict loads into it (its ``head.*``
    keys are ignored). Built from the ModelConfig fields, or around an existing
    SwinTransformer3d (``swin=``, e.g. ``revwire.build_model("torchvision:swin3d_t")``).
    """

    def __init__(self, cfg: ModelConfig, swin: Optional[nn.Module] = None):
        super().__init__()
        if swin is None:
            from torchvision.models.video.swin_transformer import SwinTransformer3d

            swin = SwinTransformer3d(
                patch_size=list(cfg.patch_size), embed_dim=cfg.embed_dim, depths=list(cfg.depths),
                num_heads=list(cfg.num_heads), window_size=list(cfg.window_size), mlp_ratio=cfg.mlp_ratio,
                stochastic_depth_prob=cfg.drop_path, num_classes=1,
            )
        self.patch_embed, self.pos_drop, self.features, self.norm = (
            swin.patch_embed, swin.pos_drop, swin.features, swin.norm)
        if cfg.spatial_pool not in ("mean", "max", "mean+max"):
            raise ValueError(f"model.spatial_pool={cfg.spatial_pool!r}: choose 'mean', 'max' or 'mean+max'")
        self.pool = cfg.spatial_pool
        self.out_channels = swin.num_features * (2 if self.pool == "mean+max" else 1)
        self.temporal_stride = int(swin.patch_embed.tuple_patch_size[0])
        self.checkpoint_blocks = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))            # B, T', H', W', C
        for layer in self.features:
            if self.checkpoint_blocks and isinstance(layer, nn.Sequential):
                for block in layer:
                    x = checkpoint(block, x, use_reentrant=False)
            else:
                x = layer(x)
        x = self.norm(x)                                   # B, T', H', W', C
        if self.pool == "mean":
            x = x.mean(dim=(2, 3))
        elif self.pool == "max":
            x = x.amax(dim=(2, 3))
        else:   # max keeps a small object's evidence that the mean dilutes over the frame
            x = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=-1)
        return x.transpose(1, 2)                           # B, C, T'

    def load_weights(self, path: str) -> None:
        """Load a torchvision SwinTransformer3d state_dict (``.pt``/``.pth`` or ``.safetensors``)."""
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "avgpool."))}
        hint = "check model.embed_dim, depths, num_heads, window_size and patch_size against it"
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as e:   # shape mismatches
            first = str(e).split("size mismatch for ", 1)[-1].split("\n", 1)[0]
            raise ValueError(f"weights file {path!r} does not fit this backbone ({first}); {hint}") from None
        if missing or unexpected:
            raise ValueError(
                f"weights file {path!r} does not fit this backbone (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); {hint}"
            )


# -- backbones from revwire model specs ----------------------------------------------------------
#
# A sequence backbone maps clips (B, 3, T, H, W) to features (B, C, T'), and has `out_channels`,
# `temporal_stride` (T / T'), `checkpoint_blocks` (the checkpoint engine sets it: checkpoint each
# residual block in forward) and `load_weights(path)`. An adapter turns the module that
# `revwire.build_model(spec, kwargs)` returns into one; adapters are looked up by the module's
# class name. To add a backbone (pytorchvideo's SlowFast, transformers' VideoMAEModel, ...):
#
#     @register_backbone("VideoMAEModel")
#     def _videomae(net, cfg): return VideoMAESequence(net, cfg)    # (B, 3, T, H, W) -> (B, C, T')
#
# and run with `--set model.backbone='transformers:VideoMAEModel'` once revwire knows that spec.

BACKBONE_ADAPTERS: Dict[str, Callable[[nn.Module, ModelConfig], nn.Module]] = {}


def register_backbone(class_name: str):
    """Decorator: register `fn(net, cfg) -> sequence backbone` for modules of class `class_name`."""
    def deco(fn):
        BACKBONE_ADAPTERS[class_name] = fn
        return fn
    return deco


@register_backbone("SwinTransformer3d")
def _swin3d(net: nn.Module, cfg: ModelConfig) -> nn.Module:
    return SwinBackbone(cfg, swin=net)


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The sequence backbone of `cfg`: the spec `cfg.backbone` through revwire, or the config's Swin3D."""
    if not cfg.backbone:
        return SwinBackbone(cfg)
    import revwire

    try:
        net = revwire.build_model(cfg.backbone, dict(cfg.backbone_kwargs))
    except revwire.SpecError as e:
        raise ValueError(f"model.backbone={cfg.backbone!r}: {e}") from None
    kind = type(net).__name__
    if kind not in BACKBONE_ADAPTERS:
        raise ValueError(
            f"model.backbone={cfg.backbone!r} builds a {kind}, which has no sequence adapter (known: "
            f"{sorted(BACKBONE_ADAPTERS)}); register one in model.py with @register_backbone({kind!r})"
        )
    return BACKBONE_ADAPTERS[kind](net, cfg)


class ChannelNorm(nn.Module):
    """LayerNorm over channels of a (B, C, T) sequence, per time step."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ConvUnit(nn.Module):
    """Conv1d (k=3) -> LayerNorm -> ReLU, zeroing padded steps so they never leak in."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, 3, stride=stride, padding=1)
        self.norm = ChannelNorm(cout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x))) * mask.unsqueeze(1).to(x.dtype)


class TemporalPyramid(nn.Module):
    """Projection of backbone features, then levels of temporal stride 1, 2, 4, ..."""

    def __init__(self, cin: int, dim: int, layers: int, levels: int):
        super().__init__()
        self.embed = nn.ModuleList([ConvUnit(cin if i == 0 else dim, dim) for i in range(layers)])
        self.down = nn.ModuleList([ConvUnit(dim, dim, stride=2) for _ in range(levels - 1)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        x = x * mask.unsqueeze(1).to(x.dtype)
        for unit in self.embed:
            x = unit(x, mask)
        feats, masks = [x], [mask]
        for unit in self.down:
            mask = mask[:, ::2]
            x = unit(x, mask)
            feats.append(x)
            masks.append(mask)
        return feats, masks


class Head(nn.Module):
    """Conv layers shared by all pyramid levels, then a k=3 conv to `out` channels."""

    def __init__(self, dim: int, out: int, layers: int, bias: float = 0.0):
        super().__init__()
        self.units = nn.ModuleList([ConvUnit(dim, dim) for _ in range(layers)])
        self.out = nn.Conv1d(dim, out, 3, padding=1)
        nn.init.normal_(self.out.weight, std=0.01)
        nn.init.constant_(self.out.bias, bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x, mask)
        return self.out(x)


class BackboneEngines(nn.Module):
    """A model with a ``self.backbone`` that one of the four engines runs (set_engine)."""

    engine = "plain"

    def set_engine(self, engine: str, example: Optional[torch.Tensor] = None) -> "BackboneEngines":
        """Run the backbone with `engine`; rewiring needs an example clip (1, 3, T, H, W)."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        if self.engine != "plain" and (engine in REWIRED_ENGINES) != (self.engine in REWIRED_ENGINES):
            raise ValueError(
                f"cannot switch engine from {self.engine!r} to {engine!r}: the rewired and the original "
                f"backbone compute different functions; build a new model"
            )
        import revwire

        if engine in REWIRED_ENGINES:
            if self.engine not in REWIRED_ENGINES:
                if example is None:
                    raise ValueError(f"engine {engine!r} rewires the backbone and needs an example clip")
                was_training = self.backbone.training
                self.backbone.train()   # trace in train mode: stochastic modules stay live (docs/design.md §4)
                self.backbone = revwire.rewire(self.backbone, (example,))
                self.backbone.train(was_training)
            revwire.set_engine(self.backbone, engine)
        else:
            self.backbone.checkpoint_blocks = engine == "checkpoint"
        self.backbone.requires_grad_(engine != "frozen")
        self.engine = engine
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> "BackboneEngines":
        super().train(mode)
        if self.engine == "frozen":
            self.backbone.eval()   # a frozen backbone is a fixed feature extractor
        return self

    def backbone_features(self, clip: torch.Tensor) -> torch.Tensor:
        """The backbone's (B, C, T') features of `clip`, without gradients when it is frozen."""
        if self.engine == "frozen":
            with torch.no_grad():
                return self.backbone(clip)
        return self.backbone(clip)


class TALModel(BackboneEngines):
    """Clips (B, 3, T, H, W) -> per-point class logits and boundary distances on a pyramid.

    Points live in backbone steps (one step = `temporal_stride` sampled frames); the point k
    of level l covers steps [k * 2**l, (k + 1) * 2**l) and sits at its centre.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError("TALModel needs at least one class")
        self.cfg, self.num_classes = cfg, num_classes
        self.backbone = build_backbone(cfg)
        if cfg.weights:
            self.backbone.load_weights(cfg.weights)
        self.temporal_stride = self.backbone.temporal_stride
        self.out_channels = self.backbone.out_channels
        self.pyramid = TemporalPyramid(self.out_channels, cfg.neck_dim, cfg.neck_layers, cfg.pyramid_levels)
        prior = -math.log((1 - cfg.prior_prob) / cfg.prior_prob)
        self.cls_head = Head(cfg.neck_dim, num_classes, cfg.head_layers, bias=prior)
        self.reg_head = Head(cfg.neck_dim, 2, cfg.head_layers)
        self.scales = nn.Parameter(torch.ones(cfg.pyramid_levels))
        self.engine = "plain"
        self.loss_normalizer: Optional[float] = None   # EMA of positives per batch, set by the first batch

    def backbone_parameters(self) -> List[nn.Parameter]:
        return list(self.backbone.parameters())

    # -- forward -------------------------------------------------------------------------------

    def forward(self, clip: torch.Tensor, valid: torch.Tensor) -> Dict[str, torch.Tensor]:
        """clip (B, 3, T, H, W), valid (B,) sampled frames that are real, not padding.

        Returns cls (B, P, K) logits, reg (B, P, 2) distances in each point's level stride,
        mask (B, P), and per point: centre (P,), stride (P,), level (P,).
        """
        if clip.dim() != 5 or clip.shape[1] != 3:
            raise ValueError(f"expected clips of shape (B, 3, T, H, W), got {tuple(clip.shape)}")
        feats = self.backbone_features(clip)
        steps = feats.shape[-1]
        valid_steps = torch.div(valid + self.temporal_stride - 1, self.temporal_stride, rounding_mode="floor")
        mask = torch.arange(steps, device=clip.device)[None] < valid_steps.to(clip.device)[:, None]
        levels, masks = self.pyramid(feats, mask)
        cls, reg, centres, strides, level_ids, all_masks = [], [], [], [], [], []
        for l, (x, m) in enumerate(zip(levels, masks)):
            cls.append(self.cls_head(x, m).transpose(1, 2))
            reg.append(F.relu(self.scales[l] * self.reg_head(x, m)).transpose(1, 2))
            s = 2 ** l
            centres.append((torch.arange(x.shape[-1], device=x.device, dtype=torch.float32) + 0.5) * s)
            strides.append(torch.full((x.shape[-1],), float(s), device=x.device))
            level_ids.append(torch.full((x.shape[-1],), l, device=x.device, dtype=torch.long))
            all_masks.append(m)
        return {
            "cls": torch.cat(cls, 1), "reg": torch.cat(reg, 1), "mask": torch.cat(all_masks, 1),
            "centre": torch.cat(centres), "stride": torch.cat(strides), "level": torch.cat(level_ids),
        }

    # -- training ------------------------------------------------------------------------------

    @torch.no_grad()
    def assign(self, out: Dict[str, torch.Tensor], segments: Sequence[torch.Tensor],
               labels: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Targets per point: one-hot classes (B, P, K) and distances (B, P, 2) in level strides.

        `segments` are (N, 2) in sampled frames of the window. A point is positive for an action
        that contains it, whose centre is within `center_radius` level strides of it, and whose
        longer boundary distance fits the level's regression range; of several, the shortest wins.
        """
        centre, stride, level = out["centre"], out["stride"], out["level"]
        ranges = torch.as_tensor(self.cfg.regression_ranges, dtype=torch.float32, device=centre.device)[level]
        P, K = centre.shape[0], self.num_classes
        cls_t = centre.new_zeros(len(segments), P, K)
        reg_t = centre.new_zeros(len(segments), P, 2)
        for b, (seg, lab) in enumerate(zip(segments, labels)):
            if len(seg) == 0:
                continue
            seg = seg.to(centre.device).float() / self.temporal_stride      # backbone steps
            start, end = seg[:, 0][None], seg[:, 1][None]                 # 1, N
            c = centre[:, None]                                           # P, 1
            left, right = c - start, end - c
            mid = 0.5 * (start + end)
            radius = self.cfg.center_radius * stride[:, None]
            box_lo, box_hi = torch.maximum(start, mid - radius), torch.minimum(end, mid + radius)
            inside = (c > box_lo) & (c < box_hi) & (torch.minimum(left, right) > 0)
            farthest = torch.maximum(left, right)
            fits = (farthest >= ranges[:, :1]) & (farthest <= ranges[:, 1:])
            length = (end - start).expand(P, -1).clone()
            length[~(inside & fits)] = float("inf")
            best_len, best = length.min(dim=1)
            pos = torch.isfinite(best_len)
            cls_t[b, pos, lab.to(centre.device)[best[pos]]] = 1.0
            reg_t[b, pos, 0] = left[pos, best[pos]] / stride[pos]
            reg_t[b, pos, 1] = right[pos, best[pos]] / stride[pos]
        return cls_t, reg_t

    def loss(self, out: Dict[str, torch.Tensor], segments, labels, alpha: float = 0.25,
             gamma: float = 2.0, reg_weight: float = 1.0) -> Dict[str, torch.Tensor]:
        """Focal loss on all real points + DIoU on positives, both over an EMA of the positive count."""
        cls_t, reg_t = self.assign(out, segments, labels)
        mask = out["mask"]
        pos = (cls_t.sum(-1) > 0) & mask
        num_pos = int(pos.sum())
        if self.training:   # an EMA keeps the loss scale steady across batches (ActionFormer)
            prev = self.loss_normalizer if self.loss_normalizer is not None else max(num_pos, 1)
            self.loss_normalizer = 0.9 * prev + 0.1 * max(num_pos, 1)
        norm = self.loss_normalizer if self.training else max(num_pos, 1)
        cls_loss = sigmoid_focal_loss(out["cls"][mask], cls_t[mask], alpha, gamma).sum() / norm
        if num_pos:
            reg_loss = diou_loss_1d(out["reg"][pos], reg_t[pos]).sum() / norm
        else:
            reg_loss = out["reg"].sum() * 0.0   # keeps the graph connected (DDP)
        total = cls_loss + reg_weight * reg_loss
        return {"loss": total, "cls_loss": cls_loss.detach(), "reg_loss": reg_loss.detach(),
                "num_pos": torch.tensor(num_pos)}

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, out: Dict[str, torch.Tensor], valid: torch.Tensor, score_thresh: float = 0.001,
                topk: int = 2000) -> List[Dict[str, torch.Tensor]]:
        """Per window: segments (M, 2) in sampled frames of the window, scores (M,), labels (M,).

        Keeps (point, class) pairs scoring above `score_thresh`, at most `topk`, decodes their
        boundaries and clips them to the window's real frames; no NMS (that is per video).
        """
        results = []
        scores_all = torch.sigmoid(out["cls"].float())
        K = self.num_classes
        for b in range(scores_all.shape[0]):
            scores = scores_all[b] * out["mask"][b, :, None]
            flat = scores.flatten()
            keep = torch.nonzero(flat > score_thresh).squeeze(1)
            if keep.numel() > topk:
                keep = keep[flat[keep].topk(topk).indices]
            point, label = keep // K, keep % K
            stride, centre = out["stride"][point], out["centre"][point]
            dist = out["reg"][b, point].float() * stride[:, None]
            seg = torch.stack([centre - dist[:, 0], centre + dist[:, 1]], 1) * self.temporal_stride
            seg = seg.clamp(min=0, max=float(valid[b]))
            ok = seg[:, 1] - seg[:, 0] > 1e-3
            results.append({"segments": seg[ok].cpu(), "scores": flat[keep][ok].cpu(), "labels": label[ok].cpu()})
        return results


class ClipClassifier(BackboneEngines):
    """Trimmed clips (B, 3, T, H, W) -> class logits (B, K): the sequence backbone, mean over time,
    a linear layer. Pretraining (the Kinetics step) and recovery after rewiring use it; its
    ``backbone`` has the same state_dict keys as TALModel's, so the weights move between them.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone = build_backbone(cfg)
        if cfg.weights:
            self.backbone.load_weights(cfg.weights)
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)
        self.engine = "plain"

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone_features(clip).mean(dim=-1))


def build_model(cfg: ModelConfig, num_classes: int, example: Optional[torch.Tensor] = None,
                engine: Optional[str] = None) -> TALModel:
    """A TALModel whose backbone runs with `engine` (default cfg.engine)."""
    model = TALModel(cfg, num_classes)
    if example is not None:
        model.to(example.device)
    return model.set_engine(engine or cfg.engine, example)
