"""Capturing models no one here wrote: Hugging Face transformers, pytorchvideo, mmaction2.

Each model is built from a small config with random weights, rewired in float64, and
checked as the compiler promises: both engines agree (outputs <= 1e-9, gradients <= 1e-7
relative, BatchNorm buffers), the parameters are the original objects, the state_dict
keys are unchanged and the reversible engine saves fewer bytes for backward.
"""
import pytest
import torch

import revwire
from _frontend_check import check_rewire

T = pytest.importorskip("transformers")


def _vit_cfg(cls, **kw):
    return cls(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, **kw)


def test_hf_vit_returns_its_model_output():
    model = T.ViTModel(_vit_cfg(T.ViTConfig, image_size=32, patch_size=8))
    rev = check_rewire(model, (torch.randn(2, 3, 32, 32),), blocks=[6])
    assert rev.meta["revwire_capture"] == "concrete"
    out = rev(torch.randn(3, 3, 32, 32, dtype=torch.float64))  # another batch size: not guarded
    assert isinstance(out, T.modeling_outputs.BaseModelOutputWithPooling)
    with pytest.raises(ValueError, match="captured for inputs of shape"):
        rev(torch.randn(2, 3, 40, 40, dtype=torch.float64))  # the forward decided on H, W


def test_hf_videomae():
    model = T.VideoMAEModel(_vit_cfg(T.VideoMAEConfig, image_size=32, patch_size=8, num_frames=4, tubelet_size=2))
    check_rewire(model, (torch.randn(2, 4, 3, 32, 32),), blocks=[6])


def test_hf_vivit():
    model = T.VivitModel(_vit_cfg(T.VivitConfig, image_size=32, tubelet_size=[2, 8, 8], num_frames=4))
    check_rewire(model, (torch.randn(2, 4, 3, 32, 32),), blocks=[6])


def test_hf_convnext():
    model = T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 3, 2]))
    check_rewire(model, (torch.randn(2, 3, 64, 64),), blocks=[2, 2, 3, 2])


def test_hf_swin_pads_and_windows():
    model = T.SwinModel(T.SwinConfig(image_size=32, patch_size=2, embed_dim=8, depths=[2, 2],
                                     num_heads=[1, 2], window_size=4))
    check_rewire(model, (torch.randn(2, 3, 32, 32),), blocks=[4, 4])
