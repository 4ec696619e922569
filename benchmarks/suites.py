"""Named benchmark suites: which models, at which sizes, and how to make their inputs.

A `Case` is one model architecture with a list of sizes along one axis ("batch" for
images and the transformer, "frames" for video). The model is built once per case (random
weights, fixed seed); every size and every method reuses its parameters.

Three size profiles of the same suites (`cases(profile)`):
  gpu (a CUDA device):
    image:       timm vit_base_patch16_224 (batch 32, 64, 128, 256), resnet50 and
                 swin_tiny_patch4_window7_224 (batch 32, 64, 128), torchvision resnet18
                 (batch 64, 128), all at 224².
    video:       torchvision swin3d_t at 224², batch 1, frames 16 .. 1024 (as in end-to-end
                 TAL); r3d_18 at 112², frames 16 .. 128.
    depth:       ViT-B width (768, 12 heads) at depth 6, 12, 24, 48, 224², batch 32.
    transformer: issue 10's pre-norm transformer (width 256, 4 heads, seq 128, batch 8) at
                 1, 2, 6, 12, 24 layers of two residual blocks.
  cpu (the default on a CPU): the same architectures at sizes where, as on the GPU, the
    activations and not the model state decide the step peak: ViT-B/16 224² batch 2 and
    4, resnet18 224² batch 4, resnet50 and swin_tiny 224² batch 2; swin3d_t 224² 8 and 16
    frames, r3d_18 112² 16 frames; ViT-B width depth 12 and 24 at 224² batch 2; the
    transformer as on the GPU.
  quick (`--quick`): tiny sizes that a 2-core CPU runs in a few minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

SUITES = ("image", "video", "depth", "transformer")
PROFILES = ("quick", "cpu", "gpu")


@dataclass
class Case:
    suite: str
    name: str  # short model name used in records ("vit_base_patch16_224", "vit_b_depth12", ...)
    build: Callable[[], nn.Module]
    axis: str  # "batch" or "frames": what `sizes` (and the max-fit search) vary
    sizes: List[int]
    input_shape: Callable[[int], Tuple[int, ...]]  # size -> full input shape
    num_classes: int
    depth: Optional[int] = None
    max_fit: Optional[Dict[str, int]] = None  # {"start", "limit", "granularity"}; None: no search
    kwargs: Dict[str, object] = field(default_factory=dict)  # constructor arguments, for the record

    def batch_frames(self, size: int) -> Tuple[int, Optional[int]]:
        shape = self.input_shape(size)
        return shape[0], (shape[2] if len(shape) == 5 else None)


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import timm
        return timm.create_model(name, pretrained=False, **kwargs)
    return build


def _swin3d(**kwargs) -> Callable[[], nn.Module]:
    def build():
        from torchvision.models.video import swin3d_t
        return swin3d_t(weights=None, **kwargs)
    return build


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build():
        import torchvision
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return build


class Attention(nn.Module):
    """Pre-norm multi-head self-attention branch; the attention matrix made explicitly
    (what the memory suites measure) or, with `sdpa`, through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, sdpa: bool = False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            o = (q @ k.transpose(-2, -1) * (C // self.heads) ** -0.5).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ratio * dim)
        self.fc2 = nn.Linear(ratio * dim, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class _Residual(nn.Module):
    """x + branch(x): one residual block (so checkpoint wraps each block, not each layer)."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


class PreNormTransformer(nn.Module):
    """Issue 10's transformer: `layers` x (x + attn(ln x), x + mlp(ln x)) on (B, N, dim)
    tokens, then LayerNorm, mean over tokens and a linear classifier."""

    def __init__(self, layers: int, dim: int = 256, heads: int = 4, num_classes: int = 10):
        super().__init__()
        blocks = []
        for _ in range(layers):
            blocks += [_Residual(Attention(dim, heads)), _Residual(Mlp(dim))]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x)).mean(1))


def _prenorm(layers: int, dim: int) -> Callable[[], nn.Module]:
    return lambda: PreNormTransformer(layers, dim=dim)


def _tokens(seq: int, dim: int) -> Callable[[int], Tuple[int, ...]]:
    return lambda b: (b, seq, dim)


def _transformer_cases(layers: List[int], batch: int, seq: int, dim: int = 256) -> List["Case"]:
    return [Case("transformer", f"prenorm_l{n}", _prenorm(n, dim), "batch", [batch], _tokens(seq, dim), 10,
                 depth=n, kwargs={"layers": n, "dim": dim, "heads": 4, "seq": seq})
            for n in layers]


def _vit_b_depth(depth: int, img: int, **kwargs) -> Callable[[], nn.Module]:
    def build():
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer(img_size=img, patch_size=16, embed_dim=768, num_heads=12,
                                 depth=depth, num_classes=1000, **kwargs)
    return build


def _image(img: int) -> Callable[[int], Tuple[int, ...]]:
    return lambda b: (b, 3, img, img)


def _video(img: int, batch: int = 1) -> Callable[[int], Tuple[int, ...]]:
    return lambda t: (batch, 3, t, img, img)


def gpu_cases() -> Dict[str, List[Case]]:
    img_fit = {"start": 32, "limit": 4096, "granularity": 8}
    return {
        "image": [
            Case("image", "vit_base_patch16_224", _timm("vit_base_patch16_224"), "batch",
                 [32, 64, 128, 256], _image(224), 1000, depth=12, max_fit=img_fit),
            Case("image", "resnet50", _timm("resnet50"), "batch",
                 [32, 64, 128], _image(224), 1000, max_fit=img_fit),
            Case("image", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224"), "batch",
                 [32, 64, 128], _image(224), 1000, max_fit=img_fit),
            Case("image", "resnet18", _torchvision("resnet18"), "batch", [64, 128], _image(224), 1000,
                 max_fit=img_fit),
        ],
        "video": [
            Case("video", "swin3d_t", _swin3d(), "frames",
                 [16, 32, 64, 128, 256, 512, 1024], _video(224), 400,
                 max_fit={"start": 16, "limit": 8192, "granularity": 16}),
            Case("video", "r3d_18", _torchvision("r3d_18"), "frames", [16, 32, 64, 128], _video(112), 400,
                 max_fit={"start": 16, "limit": 8192, "granularity": 16}),
        ],
        "depth": [
            Case("depth", f"vit_b_depth{d}", _vit_b_depth(d, 224), "batch", [32], _image(224), 1000,
                 depth=d, kwargs={"embed_dim": 768, "num_heads": 12, "depth": d, "img_size": 224})
            for d in (6, 12, 24, 48)
        ],
        "transformer": _transformer_cases([1, 2, 6, 12, 24], batch=8, seq=128),
    }


def cpu_cases() -> Dict[str, List[Case]]:
    """GPU architectures at CPU sizes that keep the GPU cases' proportions: activations,
    not parameters + gradients + AdamW state, decide the step peak."""
    return {
        "image": [
            Case("image", "vit_base_patch16_224", _timm("vit_base_patch16_224"), "batch", [2, 4],
                 _image(224), 1000, depth=12),
            Case("image", "resnet18", _torchvision("resnet18"), "batch", [4], _image(224), 1000),
            Case("image", "resnet50", _timm("resnet50"), "batch", [2], _image(224), 1000),
            Case("image", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224"), "batch",
                 [2], _image(224), 1000),
        ],
        "video": [
            Case("video", "swin3d_t", _swin3d(), "frames", [8, 16], _video(224), 400),
            Case("video", "r3d_18", _torchvision("r3d_18"), "frames", [16], _video(112), 400),
        ],
        "depth": [
            Case("depth", f"vit_b_depth{d}", _vit_b_depth(d, 224), "batch", [2], _image(224), 1000,
                 depth=d, kwargs={"embed_dim": 768, "num_heads": 12, "depth": d, "img_size": 224})
            for d in (12, 24)
        ],
        "transformer": _transformer_cases([1, 2, 6, 12, 24], batch=8, seq=128),
    }


def quick_cases() -> Dict[str, List[Case]]:
    """Tiny sizes for a CPU: same architectures (widths), small images / few frames / shallow."""
    fit = {"start": 2, "limit": 64, "granularity": 2}
    vfit = {"start": 4, "limit": 256, "granularity": 4}
    return {
        "image": [
            Case("image", "vit_base_patch16_224", _timm("vit_base_patch16_224", img_size=64, depth=2),
                 "batch", [2], _image(64), 1000, depth=2, kwargs={"img_size": 64, "depth": 2}, max_fit=fit),
            Case("image", "resnet18", _torchvision("resnet18"), "batch", [2], _image(64), 1000,
                 kwargs={"img_size": 64}, max_fit=fit),
            Case("image", "resnet50", _timm("resnet50"), "batch", [2], _image(64), 1000,
                 kwargs={"img_size": 64}, max_fit=fit),
            Case("image", "swin_tiny_patch4_window7_224",
                 _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), "batch", [2],
                 _image(64), 1000, kwargs={"img_size": 64, "window_size": 2}, max_fit=fit),
        ],
        "video": [
            Case("video", "swin3d_t", _swin3d(), "frames", [4, 8], _video(64), 400,
                 kwargs={"img_size": 64}, max_fit=vfit),
            Case("video", "r3d_18", _torchvision("r3d_18"), "frames", [4], _video(56), 400,
                 kwargs={"img_size": 56}, max_fit=vfit),
        ],
        "depth": [
            Case("depth", f"vit_b_depth{d}", _vit_b_depth(d, 64), "batch", [2], _image(64), 1000,
                 depth=d, kwargs={"embed_dim": 768, "num_heads": 12, "depth": d, "img_size": 64})
            for d in (2, 4, 8)
        ],
        "transformer": _transformer_cases([1, 2, 4], batch=2, seq=32),
    }


def cases(profile: str, suites=SUITES, models=None) -> List[Case]:
    """The cases of `suites` (in order) at `profile`'s sizes ("quick", "cpu" or "gpu");
    `models`: keep only names containing one of these."""
    tables = {"quick": quick_cases, "cpu": cpu_cases, "gpu": gpu_cases}
    if profile not in tables:
        raise ValueError(f"unknown size profile {profile!r}; choose from {list(tables)}")
    table = tables[profile]()
    unknown = [s for s in suites if s not in table]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {list(table)}")
    out = [c for s in suites for c in table[s]]
    if models:
        out = [c for c in out if any(m in c.name for m in models)]
    return out


def make_batch(case: Case, size: int, device, seed: int = 0):
    """A random input of `case` at `size` and random class targets (own generator)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    shape = case.input_shape(size)
    x = torch.randn(shape, generator=g, device=device)
    target = torch.randint(0, case.num_classes, (shape[0],), generator=g, device=device)
    return x, target
