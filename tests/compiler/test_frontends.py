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


def test_hf_gradient_checkpointing_is_refused():
    model = T.ViTModel(_vit_cfg(T.ViTConfig, image_size=32, patch_size=8))
    model.gradient_checkpointing_enable()
    with pytest.raises(revwire.TraceError, match="gradient_checkpointing_disable"):
        revwire.rewire(model, torch.randn(1, 3, 32, 32))
    model.gradient_checkpointing_disable()
    assert revwire.report(revwire.rewire(model, torch.randn(1, 3, 32, 32))).num_blocks == 6


def test_hf_videomae_with_dropout():
    """Hidden and attention dropout in train mode: the recompute must replay the same masks."""
    model = T.VideoMAEModel(_vit_cfg(T.VideoMAEConfig, image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
                                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    rev = check_rewire(model, (torch.randn(2, 4, 3, 32, 32),), blocks=[6])
    x = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    assert not torch.equal(rev(x).last_hidden_state, rev(x).last_hidden_state)  # dropout is on
    rev.eval()
    assert torch.equal(rev(x).last_hidden_state, rev(x).last_hidden_state)  # and off in eval mode


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


def test_hf_decoder_only_language_model():
    """GPT-2: pre-norm blocks, integer token ids; the cache off (a cache is state, not a graph)."""
    model = T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=50, n_positions=16,
                                     use_cache=False, bos_token_id=0, eos_token_id=0))
    check_rewire(model, (torch.randint(0, 50, (2, 8)),), blocks=[6])


def test_hf_kv_cache_error_says_use_cache_false():
    model = T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0))
    with pytest.raises(revwire.TraceError, match="use_cache=False"):
        revwire.rewire(model, torch.randint(0, 50, (2, 8)))


def test_hf_llama_with_keyword_inputs():
    model = T.LlamaModel(T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0))
    ids = torch.randint(0, 50, (2, 8))
    rev = revwire.rewire(model, {"input_ids": ids, "use_cache": False})
    assert [c.num_blocks for c in revwire.report(rev).chains] == [4]
    assert isinstance(rev(input_ids=ids), T.modeling_outputs.BaseModelOutputWithPast)


def test_pytorchvideo_slowfast_with_its_list_input():
    pv = pytest.importorskip("pytorchvideo.models.slowfast")
    # R50's depths ([3, 4, 6, 3] per pathway) at an eighth of its width; 32x32 frames: every
    # pathway's last stage is 1x1, the head pools all frames
    model = pv.create_slowfast(model_depth=50, stem_dim_outs=(8, 1), slowfast_channel_reduction_ratio=(8,),
                               head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1)), model_num_class=10,
                               dropout_rate=0.0)
    slow, fast = torch.randn(1, 3, 2, 32, 32), torch.randn(1, 3, 8, 32, 32)
    with pytest.raises(revwire.InputError, match="one input"):
        revwire.rewire(model, [slow, fast])
    rev = check_rewire(model, ([slow, fast],), blocks=[2, 2, 3, 3, 5, 5, 2, 2])  # both pathways
    assert rev.meta["revwire_capture"] == "concrete"  # `len()` in the head


def _mmaction_swin3d():
    """mmaction2's SwinTransformer3D, loaded from its file: `import mmaction.models` fails in
    the 1.2.0 wheel (it lacks mmaction/models/localizers/drn)."""
    import importlib.util
    import os

    mmaction = pytest.importorskip("mmaction")
    path = os.path.join(mmaction.__path__[0], "models", "backbones", "swin.py")
    spec = importlib.util.spec_from_file_location("revwire_test_mmaction_swin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SwinTransformer3D


def test_mmaction2_swin_transformer_3d():
    Swin3D = _mmaction_swin3d()
    model = Swin3D(arch={"embed_dims": 16, "depths": [2, 2], "num_heads": [1, 2]}, window_size=(2, 4, 4),
                   drop_path_rate=0.1, out_indices=(1,))
    rev = check_rewire(model, (torch.randn(1, 3, 4, 32, 32),), blocks=[4, 4])
    assert rev.meta["revwire_capture"] == "concrete"  # PatchEmbed3D pads on shapes; einops in the root
