"""The opt-in attention pass (`sdpa_attention`): torchvision swin3d's window attention through
`F.scaled_dot_product_attention`, with the same values and gradients (docs/design.md §4)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import revwire
from revwire.compiler.attention import window_attention_3d

swin = pytest.importorskip("torchvision.models.video.swin_transformer")


def tiny_swin3d(window_size, attention_dropout=0.0, dtype=torch.float32):
    """Two stages of two blocks (one plain, one shifted window attention each), no drop-path."""
    torch.manual_seed(0)
    model = swin.SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                   window_size=window_size, attention_dropout=attention_dropout,
                                   stochastic_depth_prob=0.0, num_classes=5)
    return model.to(dtype).train()


class CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def step(model, x):
    """Output, input gradient and every parameter's gradient of one backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def attention_calls(model, x):
    with torch.no_grad(), CountSDPA() as mode:
        model(x)
    return mode.calls


# window 2x3x3 on a 4x6x6 token grid: shifted windows (the mask), no padding;
# window 2x4x4 on 4x6x6: padded to 4x8x8, and shifted
CASES = {"shifted": ([2, 3, 3], (2, 3, 8, 24, 24)), "padded": ([2, 4, 4], (1, 3, 8, 24, 24))}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_pass_keeps_outputs_and_gradients(case, dtype, tol):
    window, shape = CASES[case]
    model = tiny_swin3d(window, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    plain = revwire.rewire(model, x)
    sdpa = revwire.rewire(model, x, sdpa_attention=True)
    expected, got = step(plain, x), step(sdpa, x)
    torch.testing.assert_close(got[0], expected[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], expected[1], rtol=tol, atol=tol)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], rtol=tol, atol=tol, msg=name)


def test_function_matches_torchvision_for_a_batch_of_shifted_padded_windows():
    """Batch 2 (the shift mask repeated per batch element), padding and the shift, in float64."""
    torch.manual_seed(0)
    attn = swin.ShiftedWindowAttention3d(8, window_size=[2, 4, 4], shift_size=[1, 2, 2], num_heads=2).double()
    x = torch.randn(2, 4, 6, 7, 8, dtype=torch.float64)
    results = []
    for forward in (attn, lambda t: window_attention_3d(attn, t)):
        attn.zero_grad(set_to_none=True)
        t = x.clone().requires_grad_()
        out = forward(t)
        out.square().sum().backward()
        results.append([out, t.grad] + [p.grad.clone() for p in attn.parameters()])
    for got, expected in zip(*reversed(results)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_pass_fires_once_per_attention_and_only_when_asked():
    model = tiny_swin3d([2, 3, 3])
    x = torch.randn(1, 3, 8, 24, 24)
    plain = revwire.rewire(model, x)
    sdpa = revwire.rewire(model, x, sdpa_attention=True)
    assert revwire.report(sdpa).attention_sites == 4
    assert "attention through F.scaled_dot_product_attention: 4 site(s)" in str(revwire.report(sdpa))
    assert attention_calls(sdpa, x) == 4
    assert revwire.report(plain).attention_sites == 0
    assert attention_calls(plain, x) == 0
    assert revwire.rewire(model, x).code == plain.code


def test_parameters_and_state_dict_stay_the_originals():
    model = tiny_swin3d([2, 3, 3])
    sdpa = revwire.rewire(model, torch.randn(1, 3, 8, 24, 24), sdpa_attention=True)
    assert {id(p) for p in sdpa.parameters()} == {id(p) for p in model.parameters()}
    assert sdpa.state_dict().keys() == model.state_dict().keys()


def test_attention_dropout_follows_the_modules_mode_and_replays_in_recompute():
    model = tiny_swin3d([2, 3, 3], attention_dropout=0.5, dtype=torch.float64)
    x = torch.randn(1, 3, 8, 24, 24, dtype=torch.float64)
    sdpa = revwire.rewire(model, x, sdpa_attention=True)
    assert revwire.verify(sdpa, x, tolerance=1e-10)["ok"]  # the recompute draws the forward's dropout
    torch.manual_seed(1)
    train = sdpa(x)
    sdpa.eval()
    with torch.no_grad():
        plain = revwire.rewire(model, x).eval()
        assert not torch.allclose(train, sdpa(x))
        torch.testing.assert_close(sdpa(x), plain(x), rtol=1e-12, atol=1e-12)


def test_rewired_copy_keeps_the_pass():
    model = tiny_swin3d([2, 3, 3])
    x = torch.randn(1, 3, 8, 24, 24)
    sdpa = revwire.rewire(model, x, sdpa_attention=True)
    twin = copy.deepcopy(sdpa)
    assert attention_calls(twin, x) == 4
    with torch.no_grad():
        torch.testing.assert_close(twin(x), sdpa(x), rtol=0, atol=0)
