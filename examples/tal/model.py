"""The localiser: a video backbone (run by one of four engines), a temporal pyramid, and
ActionFormer-style anchor-free heads. The backbone is the config's Swin3D, or one built from a
revwire model spec and adapted to a sequence (torchvision Swin3D, pytorchvideo SlowFast,
transformers VideoMAE: "backbones from revwire model specs" below).

Engines for the backbone:
  reversible  rewired by ``revwire.rewire``; backward recomputes activations (memory O(1) per stage)
  autograd    the same rewired network with ordinary autograd (stores activations; the reference)
  checkpoint  the original network, ``torch.utils.checkpoint`` (non-reentrant) around each residual block
  frozen      the original network without gradients: features only, the backbone does not learn

A rewired network computes a different function from the original (docs/design.md §2), so a
model trained with reversible/autograd must be evaluated with one of those two, and one
trained with checkpoint/frozen with one of those; the state_dict keys are the same.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from configs import ENGINES, ModelConfig, check_window
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
        self.pool = check_pool(cfg.spatial_pool)
        self.out_channels = swin.num_features * pooled_width(self.pool)
        self.temporal_stride = int(swin.patch_embed.tuple_patch_size[0])
        self.checkpoint_blocks = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))            # B, T', H', W', C
        for layer in self.features:
            if self.checkpoint_blocks and isinstance(layer, nn.Sequential):
                for block in layer:
                    x = checkpoint_block(block, x)
            else:
                x = layer(x)
        x = self.norm(x)                                   # B, T', H', W', C
        return pool_space(x, self.pool, (2, 3)).transpose(1, 2)   # B, C, T'

    def load_weights(self, path: str) -> None:
        """Load a torchvision SwinTransformer3d state_dict (``.pt``/``.pth`` or ``.safetensors``)."""
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(("head.", "avgpool."))}
        load_checked(self, state, path, "check model.embed_dim, depths, num_heads, window_size and patch_size against it")


POOLS = ("mean", "max", "mean+max")


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise ValueError(f"model.spatial_pool={pool!r}: choose 'mean', 'max' or 'mean+max'")
    return pool


def pooled_width(pool: str) -> int:
    """Channels per backbone channel after `pool_space`: "mean+max" concatenates two."""
    return 2 if pool == "mean+max" else 1


def pool_space(x: torch.Tensor, pool: str, dims: Tuple[int, ...], channel_dim: int = -1) -> torch.Tensor:
    """Pool `x` over its spatial `dims`; "mean+max" concatenates both on `channel_dim`."""
    if pool == "mean":
        return x.mean(dim=dims)
    if pool == "max":
        return x.amax(dim=dims)
    # max keeps a small object's evidence that the mean dilutes over the frame
    return torch.cat([x.mean(dim=dims), x.amax(dim=dims)], dim=channel_dim)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A state_dict from ``.pt``/``.pth`` (bare or under "state_dict"/"model"/"model_state") or
    ``.safetensors``, without the "module."/"backbone." prefixes of DDP and of TALModel."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict):
            for key in ("state_dict", "model", "model_state"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_checked(module: nn.Module, state: Dict[str, torch.Tensor], path: str, hint: str) -> None:
    """load_state_dict that names the first misfit and says what to check (`hint`)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
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
# class name. Registered: torchvision's SwinTransformer3d (`torchvision:swin3d_t`, ...),
# pytorchvideo's SlowFast (`pytorchvideo:slowfast_r50`, class `Net`) and transformers'
# VideoMAEModel (`transformers:VideoMAEModel`). To add one:
#
#     @register_backbone("VivitModel")
#     def _vivit(net, cfg): return VivitSequence(net, cfg)    # (B, 3, T, H, W) -> (B, C, T')
#
# and run with `--set model.backbone='transformers:VivitModel'`.

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


@contextlib.contextmanager
def _batchnorm_stats_kept(module: nn.Module):
    """Around checkpoint's recompute: BatchNorm's running statistics (and batch count) are put
    back afterwards, so a checkpointed block updates them once per step, as without checkpointing."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def checkpoint_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch.utils.checkpoint (non-reentrant) around one residual block, BatchNorm-safe."""
    return checkpoint(block, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _batchnorm_stats_kept(block)))


class SlowFastBackbone(nn.Module):
    """pytorchvideo's SlowFast without its pooling and head: two pathways, pooled over space.

    The clip is the fast pathway; every `alpha`-th frame of it is the slow one (`alpha` is the
    temporal stride of the fast-to-slow fusion, which the pathways' lengths must match). Each
    pathway is pooled over space, the fast one averaged over each `alpha` frames to the slow's
    length, and the two concatenated on channels: (B, 3, T, H, W) -> (B, C_slow + C_fast, T / alpha)
    (doubled for "mean+max"). Submodule names are pytorchvideo's (``blocks.N``), so its
    state_dicts load (the head's ``blocks.5``/``blocks.6`` keys are ignored).
    """

    def __init__(self, net: nn.Module, cfg: ModelConfig):
        super().__init__()
        from pytorchvideo.models.net import MultiPathWayWithFuse
        from pytorchvideo.models.slowfast import FuseFastToSlow

        blocks = list(getattr(net, "blocks", []))
        stem = blocks[0] if blocks else None
        if not (isinstance(stem, MultiPathWayWithFuse) and len(stem.multipathway_blocks) == 2
                and isinstance(stem.multipathway_fusion, FuseFastToSlow)):
            raise ValueError(f"{type(net).__name__} is not a two-pathway SlowFast (pytorchvideo:slowfast_r50, "
                             f"slowfast_r101, ...); other pytorchvideo models need an adapter of their own")
        n = next((i for i, b in enumerate(blocks) if not isinstance(b, MultiPathWayWithFuse)), len(blocks))
        self.blocks = nn.ModuleList(blocks[:n])     # stem and stages; the rest pools and classifies
        self.alpha = int(stem.multipathway_fusion.conv_fast_to_slow.stride[0])
        self.pool = check_pool(cfg.spatial_pool)
        widths = [[m for m in path.modules() if isinstance(m, nn.Conv3d)][-1].out_channels
                  for path in self.blocks[-1].multipathway_blocks]
        self.out_channels = sum(widths) * pooled_width(self.pool)
        self.temporal_stride = self.alpha
        self.checkpoint_blocks = False

    def _pathway(self, path: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if hasattr(path, "res_blocks"):             # a ResStage: checkpoint block by block
            for block in path.res_blocks:
                x = checkpoint_block(block, x)
            return x
        return path(x)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        if clip.shape[2] % self.alpha:
            raise ValueError(f"SlowFast needs a multiple of alpha={self.alpha} frames, got {clip.shape[2]}")
        x = [clip[:, :, ::self.alpha], clip]        # frames 0, alpha, ...: where the fusion's stride samples
        for block in self.blocks:
            if self.checkpoint_blocks:
                x = [self._pathway(path, xi) for path, xi in zip(block.multipathway_blocks, x)]
                x = block.multipathway_fusion(x) if block.multipathway_fusion is not None else x
            else:
                x = block(list(x))                  # a fresh list: the block may write into it
        slow, fast = (pool_space(xi, self.pool, (3, 4), channel_dim=1) for xi in x)   # B, C, T
        fast = F.avg_pool1d(fast, self.alpha)
        return torch.cat([slow, fast], dim=1)

    def load_weights(self, path: str) -> None:
        """Load a pytorchvideo SlowFast state_dict (its pretrained files keep it under "model_state")."""
        state = {k: v for k, v in read_state_dict(path).items()
                 if not (k.startswith("blocks.") and int(k.split(".")[1]) >= len(self.blocks))}
        load_checked(self, state, path, "check model.backbone_kwargs (depth, stem_dim_outs, ...) against it")


@register_backbone("Net")
def _slowfast(net: nn.Module, cfg: ModelConfig) -> nn.Module:
    return SlowFastBackbone(net, cfg)


class VideoMAEBackbone(nn.Module):
    """transformers' VideoMAEModel, its tokens pooled over space per tubelet.

    (B, 3, T, H, W) -> tokens (B, T/tubelet * H/p * W/p, C) -> (B, C, T / tubelet) (C doubled for
    "mean+max"). Its position table is fixed: T and H, W must be the config's num_frames and
    image_size. The model is kept as ``videomae``, so the keys are those of
    VideoMAEForVideoClassification and a VideoMAEModel's own state_dict loads too.
    """

    def __init__(self, net: nn.Module, cfg: ModelConfig):
        super().__init__()
        c = net.config
        self.videomae = net
        self.frames, self.size = c.num_frames, c.image_size
        self.pool = check_pool(cfg.spatial_pool)
        self.out_channels = c.hidden_size * pooled_width(self.pool)
        self.temporal_stride = c.tubelet_size

    @property
    def checkpoint_blocks(self) -> bool:
        return self.videomae.is_activation_checkpointing

    @checkpoint_blocks.setter
    def checkpoint_blocks(self, on: bool) -> None:
        # transformers' own mechanism: torch.utils.checkpoint (non-reentrant) around each encoder layer
        if on:
            self.videomae.activation_checkpointing_enable()
        else:
            self.videomae.activation_checkpointing_disable()

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        T, H, W = clip.shape[2:]
        if (T, H, W) != (self.frames, self.size, self.size):
            raise ValueError(
                f"VideoMAE was built for {self.frames} frames at {self.size}² (its position table is fixed), "
                f"got {T} at {H}x{W}: set model.backbone_kwargs num_frames={T} and image_size={H}"
            )
        tokens = self.videomae(pixel_values=clip.transpose(1, 2)).last_hidden_state   # B, N, C
        tokens = tokens.unflatten(1, (T // self.temporal_stride, -1))     # B, T', H'W', C (any batch size)
        return pool_space(tokens, self.pool, (2,)).transpose(1, 2)                    # B, C, T'

    def rewire(self, example: torch.Tensor) -> "VideoMAEBackbone":
        """Rewire the VideoMAEModel itself, on its own input layout and a batch of two; see
        BackboneEngines.set_engine for why not the whole adapter on `example` (1, 3, T, H, W)."""
        import revwire

        pixels = example.transpose(1, 2)
        self.videomae = revwire.rewire(self.videomae, (pixels.expand(2, *pixels.shape[1:]).clone(),))
        return self

    @property
    def rewired_part(self) -> nn.Module:
        return self.videomae

    def load_weights(self, path: str) -> None:
        """Load a VideoMAE state_dict: VideoMAEModel's, or a classifier's / pretraining model's encoder."""
        state = read_state_dict(path)
        state = {(k if k.startswith("videomae.") else f"videomae.{k}"): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k.split(".")[1] in ("embeddings", "encoder", "layernorm")}
        load_checked(self, state, path, "check model.backbone_kwargs (hidden_size, num_hidden_layers, ...) against it")


@register_backbone("VideoMAEModel")
def _videomae(net: nn.Module, cfg: ModelConfig) -> nn.Module:
    return VideoMAEBackbone(net, cfg)


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


def rewire_report(backbone: nn.Module):
    """revwire's report of a rewired backbone (of its rewired part, for an adapter with `rewire`)."""
    import revwire

    return revwire.report(getattr(backbone, "rewired_part", backbone))


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
                if hasattr(self.backbone, "rewire"):
                    # An adapter may rewire only its library module, on that module's own input. VideoMAE
                    # does: behind the adapter's transpose, revwire's shape guard pins the batch size to
                    # the example's, and with a batch of one it takes the position-table add for a
                    # residual block, which fails at any other batch size.
                    self.backbone = self.backbone.rewire(example)
                else:
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
    """A TALModel whose backbone runs with `engine` (default cfg.engine); `example` is a window."""
    model = TALModel(cfg, num_classes)
    if example is not None:
        check_window(example.shape[2], model.temporal_stride, cfg.pyramid_levels)
        model.to(example.device)
    return model.set_engine(engine or cfg.engine, example)
