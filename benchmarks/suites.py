"""Named benchmark suites: which models, at which sizes, and how to make their inputs.

A `Case` is one model architecture with a list of sizes along one axis ("batch" for
images, "frames" for video). The model is built once per case (random weights, fixed
seed); every size and every method reuses its parameters.

Full suites (issue 5, meant for a CUDA device):
  image: timm vit_base_patch16_224 (batch 32, 64, 128, 256), resnet50 and
         swin_tiny_patch4_window7_224 (batch 32, 64, 128), all at 224².
  video: torchvision swin3d_t at 224², batch 1, frames 16 .. 1024 (as in end-to-end TAL).
  depth: ViT-B width (768, 12 heads) at depth 6, 12, 24, 48, 224², batch 32.
`--quick` swaps in tiny sizes that a 2-core CPU runs in a few minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

SUITES = ("image", "video", "depth")


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


def full_cases() -> Dict[str, List[Case]]:
    img_fit = {"start": 32, "limit": 4096, "granularity": 8}
    return {
        "image": [
            Case("image", "vit_base_patch16_224", _timm("vit_base_patch16_224"), "batch",
                 [32, 64, 128, 256], _image(224), 1000, depth=12, max_fit=img_fit),
            Case("image", "resnet50", _timm("resnet50"), "batch",
                 [32, 64, 128], _image(224), 1000, max_fit=img_fit),
            Case("image", "swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224"), "batch",
                 [32, 64, 128], _image(224), 1000, max_fit=img_fit),
        ],
        "video": [
            Case("video", "swin3d_t", _swin3d(), "frames",
                 [16, 32, 64, 128, 256, 512, 1024], _video(224), 400,
                 max_fit={"start": 16, "limit": 8192, "granularity": 16}),
        ],
        "depth": [
            Case("depth", f"vit_b_depth{d}", _vit_b_depth(d, 224), "batch", [32], _image(224), 1000,
                 depth=d, kwargs={"embed_dim": 768, "num_heads": 12, "depth": d, "img_size": 224})
            for d in (6, 12, 24, 48)
        ],
    }


def quick_cases() -> Dict[str, List[Case]]:
    """Tiny sizes for a CPU: same architectures (widths), small images / few frames / shallow."""
    return {
        "image": [
            Case("image", "vit_base_patch16_224", _timm("vit_base_patch16_224", img_size=64, depth=2),
                 "batch", [2], _image(64), 1000, depth=2, kwargs={"img_size": 64, "depth": 2},
                 max_fit={"start": 2, "limit": 64, "granularity": 2}),
            Case("image", "resnet50", _timm("resnet50"), "batch", [2], _image(64), 1000,
                 kwargs={"img_size": 64},
                 max_fit={"start": 2, "limit": 64, "granularity": 2}),
            Case("image", "swin_tiny_patch4_window7_224",
                 _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), "batch", [2],
                 _image(64), 1000, kwargs={"img_size": 64, "window_size": 2},
                 max_fit={"start": 2, "limit": 64, "granularity": 2}),
        ],
        "video": [
            Case("video", "swin3d_t", _swin3d(), "frames", [4, 8], _video(64), 400,
                 kwargs={"img_size": 64},
                 max_fit={"start": 4, "limit": 256, "granularity": 4}),
        ],
        "depth": [
            Case("depth", f"vit_b_depth{d}", _vit_b_depth(d, 64), "batch", [2], _image(64), 1000,
                 depth=d, kwargs={"embed_dim": 768, "num_heads": 12, "depth": d, "img_size": 64})
            for d in (2, 4, 8)
        ],
    }


def cases(quick: bool, suites=SUITES, models=None) -> List[Case]:
    """The cases of `suites` (in order); `models`: keep only names containing one of these."""
    table = quick_cases() if quick else full_cases()
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
