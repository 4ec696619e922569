"""The reversible engine against the autograd engine on the same stage (docs/design.md §2-3)."""
import weakref

import pytest
import torch
from torch import nn

import revwire
from revwire import ReversibleStage
from revwire.errors import (
    BlockShapeError, ReconstructionError, RewireError, StageFreedError,
)

from conftest import (
    MLP, Attention, ConvBN, assert_engines_match, both_engines, loss_of, max_rel, rel, run_step,
    transformer_blocks,
)

pytestmark = pytest.mark.usefixtures("small_cpu")
D = torch.float64


def tokens(b=2, n=8, d=16, dtype=D):
    return torch.randn(b, n, d, dtype=dtype, requires_grad=True)


# -- exactness in float64 ---------------------------------------------------------------


def test_mlp_chain_matches_autograd():
    stage = ReversibleStage([MLP(16, p=0.1) for _ in range(6)]).to(D)
    ag, rev = both_engines(stage, tokens())
    assert_engines_match(ag, rev)


def test_coupling_is_the_re2tal_rewiring():
    """x_i = x_{i-2} + F_i(x_{i-1}), x_{-1} = x_0 = input, output = (x_{N-1} + x_N) / 2."""
    fs = [MLP(8) for _ in range(3)]
    stage = ReversibleStage(fs).to(D)
    x = torch.randn(3, 8, dtype=D)
    fs = [f.to(D) for f in fs]
    x1 = x + fs[0](x)
    x2 = x + fs[1](x1)
    x3 = x1 + fs[2](x2)
    with torch.no_grad():
        expect = (x2 + x3) / 2
        for engine in ("autograd", "reversible"):
            stage.engine = engine
            torch.testing.assert_close(stage(x), expect, rtol=0, atol=0)
    # the reversible Function itself (grad mode) computes the same
    stage.engine = "reversible"
    out = stage(x.requires_grad_())
    assert type(out.grad_fn).__name__ == "_StageOutputBackward"
    torch.testing.assert_close(out.detach(), expect, rtol=0, atol=0)


@pytest.mark.parametrize("sdpa", [False, True], ids=["manual-attn", "sdpa"])
def test_attention_chain_with_dropout_matches_autograd(sdpa):
    stage = ReversibleStage(transformer_blocks(3, 16, heads=2, p=0.2, sdpa=sdpa)).to(D)
    ag, rev = both_engines(stage, tokens(), seed=7)
    assert_engines_match(ag, rev)
    # dropout really was active: another seed gives another output
    other = run_step(stage, "reversible", tokens(), seed=8)
    assert rel(other["out"], rev["out"]) > 1e-3


def test_single_block_stage():
    stage = ReversibleStage([MLP(16, p=0.1)]).to(D)
    ag, rev = both_engines(stage, tokens())
    assert_engines_match(ag, rev)


def test_conv_bn_train_mode_running_stats_updated_once():
    stage = ReversibleStage([ConvBN(4) for _ in range(4)]).to(D)
    x = torch.randn(3, 4, 6, 6, dtype=D, requires_grad=True)
    state0 = {k: v.clone() for k, v in stage.state_dict().items()}
    ag, rev = both_engines(stage, x)
    assert_engines_match(ag, rev)  # running_mean / running_var / num_batches_tracked
    bns = [k for k in rev["buffers"] if k.endswith("num_batches_tracked")]
    assert len(bns) == 8
    for k in bns:
        assert rev["buffers"][k].item() == 1, k
        mean = k.replace("num_batches_tracked", "running_mean")
        assert not torch.equal(rev["buffers"][mean], state0[mean])  # it did move, once
    # and a second step counts one more batch, still equal to the autograd engine
    state = {k: v.clone() for k, v in stage.state_dict().items()}
    rev2 = run_step(stage, "reversible", x * 0.5, seed=1)
    stage.load_state_dict(state)
    ag2 = run_step(stage, "autograd", x * 0.5, seed=1)
    assert_engines_match(ag2, rev2)
    assert all(rev2["buffers"][k].item() == 2 for k in bns)


class InstanceNormBranch(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)  # a bias before a norm has grad ~0
        self.norm = nn.InstanceNorm2d(c, affine=True, track_running_stats=True)

    def forward(self, x):
        return torch.tanh(self.norm(self.conv(x)))


def test_instance_norm_running_stats_updated_once():
    stage = ReversibleStage([InstanceNormBranch(3) for _ in range(3)]).to(D)
    x = torch.randn(2, 3, 5, 5, dtype=D, requires_grad=True)
    state0 = {k: v.clone() for k, v in stage.state_dict().items()}
    ag, rev = both_engines(stage, x)
    assert_engines_match(ag, rev)  # an update in the recompute would move running_* again
    means = [k for k in rev["buffers"] if k.endswith("running_mean")]
    assert len(means) == 3 and all(not torch.equal(rev["buffers"][k], state0[k]) for k in means)


# -- RNG ----------------------------------------------------------------------------


class RecordingNoise(nn.Module):
    """y = Linear(dropout(x)); records the dropout mask of every call (forward and recompute)."""

    def __init__(self, d, p=0.5):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.p = p
        self.masks = []

    def forward(self, x):
        mask = (torch.rand_like(x) > self.p).to(x.dtype)
        self.masks.append(mask)
        return self.lin(x * mask / (1 - self.p))


def test_recompute_replays_the_forward_masks_and_steps_draw_new_ones():
    blocks = [RecordingNoise(8) for _ in range(3)]
    stage = ReversibleStage(blocks).to(D)
    x = torch.randn(4, 8, dtype=D)
    outs, grads = [], []
    for step in range(2):  # no reseeding between the steps
        for b in blocks:
            b.masks.clear()
        rng = torch.get_rng_state()
        res = run_step(stage, "reversible", x)
        for b in blocks:  # forward, then the recompute in backward: same mask
            assert len(b.masks) == 2
            assert torch.equal(b.masks[0], b.masks[1])
        assert not torch.equal(blocks[0].masks[0], blocks[1].masks[0])  # per-block masks differ
        outs.append(res["out"])
        grads.append(res["grads"])
        # the autograd engine from the same RNG state gives the same step
        after = torch.get_rng_state()
        torch.set_rng_state(rng)
        ag = run_step(stage, "autograd", x)
        assert rel(res["out"], ag["out"]) <= 1e-12
        assert max_rel(res["grads"], ag["grads"]) <= 1e-10
        # both engines consumed the same random numbers
        assert torch.equal(torch.get_rng_state(), after)
    assert rel(outs[0], outs[1]) > 1e-2  # the two steps drew different masks
    assert max_rel(grads[0], grads[1]) > 1e-2


def test_no_stochastic_modules_leaves_rng_untouched():
    stage = ReversibleStage([MLP(8) for _ in range(3)]).to(D)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    before = torch.get_rng_state()
    res = run_step(stage, "reversible", x)
    assert res["grad_fn"] == "_StageOutputBackward"
    assert torch.equal(torch.get_rng_state(), before)


def test_rng_after_step_same_for_both_engines():
    stage = ReversibleStage(transformer_blocks(2, 8, p=0.3)).to(D)
    x = tokens(d=8)
    draws = []
    for engine in ("autograd", "reversible"):
        run_step(stage, engine, x, seed=3)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


# -- train / eval ----------------------------------------------------------------------


def test_eval_turns_off_dropout_and_uses_running_stats():
    blocks = [ConvBN(3), nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.5))] * 2
    stage = ReversibleStage(blocks).to(D)
    x = torch.randn(2, 3, 4, 4, dtype=D, requires_grad=True)
    run_step(stage, "reversible", x, seed=0)  # a train step moves the running stats
    stage.eval()
    buffers = {k: v.clone() for k, v in stage.named_buffers()}
    r1 = run_step(stage, "reversible", x, seed=1)
    r2 = run_step(stage, "reversible", x, seed=2)  # another seed: dropout is off
    ag = run_step(stage, "autograd", x, seed=3)
    assert r1["grad_fn"] == "_StageOutputBackward"
    assert torch.equal(r1["out"], r2["out"])
    assert_engines_match(ag, r1)
    for k, v in stage.named_buffers():  # eval reads the running stats, never writes them
        assert torch.equal(v, buffers[k]), k
    # and reading them matters: train mode (batch stats) gives another output
    stage.train()
    with torch.no_grad():
        stage.blocks[1][1].p = 0.0
        assert rel(stage(x), r1["out"]) > 1e-3


# -- gradients come back through autograd -------------------------------------------------


def test_parameter_hooks_fire_once_and_grads_flow_through_autograd():
    stage = ReversibleStage([MLP(8) for _ in range(3)]).to(D)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    ref = run_step(stage, "autograd", x)
    calls, post = {}, {}
    handles = []
    for n, p in stage.named_parameters():
        handles.append(p.register_hook(lambda g, n=n: calls.__setitem__(n, calls.get(n, 0) + 1) or 2 * g))
        handles.append(p.register_post_accumulate_grad_hook(
            lambda p, n=n: post.__setitem__(n, post.get(n, 0) + 1)))
    res = run_step(stage, "reversible", x)
    names = [n for n, _ in stage.named_parameters()]
    assert calls == {n: 1 for n in names}
    assert post == {n: 1 for n in names}
    for n in names:  # the hook's doubling was applied exactly once
        assert rel(res["grads"][n], 2 * ref["grads"][n]) <= 1e-10
    for h in handles:
        h.remove()


def test_autograd_grad_returns_param_grads_and_leaves_dot_grad_none():
    stage = ReversibleStage([MLP(8) for _ in range(3)]).to(D)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    ref = run_step(stage, "autograd", x)
    stage.zero_grad(set_to_none=True)
    stage.engine = "reversible"
    names, params = zip(*stage.named_parameters())
    grads = torch.autograd.grad(loss_of(stage(x)), params)
    assert all(p.grad is None for p in params)
    assert max_rel(dict(zip(names, grads)), ref["grads"]) <= 1e-10


def test_gradient_accumulation_sums():
    stage = ReversibleStage(transformer_blocks(2, 8, p=0.1)).to(D)
    x1, x2 = tokens(d=8), tokens(d=8)
    g1 = run_step(stage, "reversible", x1, seed=1)["grads"]
    g2 = run_step(stage, "reversible", x2, seed=2)["grads"]
    stage.zero_grad(set_to_none=True)
    for x, seed in ((x1, 1), (x2, 2)):
        torch.manual_seed(seed)
        loss_of(stage(x)).backward()
    for n, p in stage.named_parameters():
        assert rel(p.grad, g1[n] + g2[n]) <= 1e-10, n


def test_retain_graph_allows_a_second_backward():
    stage = ReversibleStage([MLP(8, p=0.2) for _ in range(3)]).to(D)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    ref = run_step(stage, "autograd", x, seed=5)
    stage.zero_grad(set_to_none=True)
    stage.engine = "reversible"
    torch.manual_seed(5)
    loss = loss_of(stage(x))
    loss.backward(retain_graph=True)
    loss.backward()
    for n, p in stage.named_parameters():
        assert rel(p.grad, 2 * ref["grads"][n]) <= 1e-10, n


def test_second_order_backward_raises_instead_of_being_silently_wrong():
    stage = ReversibleStage([MLP(8) for _ in range(2)], name="body").to(D)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    with pytest.raises(RewireError, match=r"stage 'body': the reversible engine computes first-order "
                                          r"gradients only.*set_engine\(model, 'autograd'\)"):
        torch.autograd.grad(stage(x).pow(2).sum(), x, create_graph=True)
    stage.engine = "autograd"  # what the message advises: second order works there
    (gx,) = torch.autograd.grad(stage(x).pow(2).sum(), x, create_graph=True)
    gx.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- parameters and inputs that need no grad, shared and foreign parameters ------------------


def test_frozen_parameters_and_blocks():
    blocks = [MLP(8) for _ in range(4)]
    for p in blocks[1].parameters():
        p.requires_grad_(False)  # a frozen block
    blocks[2].fc1.weight.requires_grad_(False)  # a partly frozen block
    stage = ReversibleStage(blocks).to(D)
    ag, rev = both_engines(stage, torch.randn(2, 8, dtype=D, requires_grad=True))
    assert_engines_match(ag, rev)
    assert "blocks.1.fc1.weight" not in rev["grads"] and "blocks.2.fc1.weight" not in rev["grads"]
    assert "blocks.2.fc2.weight" in rev["grads"]


def test_input_without_grad():
    stage = ReversibleStage([MLP(8, p=0.1) for _ in range(3)]).to(D)
    ag, rev = both_engines(stage, torch.randn(2, 8, dtype=D))
    assert_engines_match(ag, rev)
    assert rev["x_grad"] is None


def test_all_frozen_input_with_grad():
    stage = ReversibleStage([MLP(8) for _ in range(3)]).to(D).requires_grad_(False)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    grads = {}
    for engine in ("autograd", "reversible"):
        stage.engine = engine
        xx = x.detach().clone().requires_grad_()
        loss_of(stage(xx)).backward()
        grads[engine] = xx.grad
    assert rel(grads["reversible"], grads["autograd"]) <= 1e-10


def test_nothing_needs_grad_runs_plain_forward():
    stage = ReversibleStage([MLP(8) for _ in range(3)]).to(D).requires_grad_(False)
    out = stage(torch.randn(2, 8, dtype=D))
    assert out.grad_fn is None
    stage.requires_grad_(True)
    with torch.no_grad():
        assert stage(torch.randn(2, 8, dtype=D)).grad_fn is None


class TiedTwice(nn.Module):
    """One Linear under two names inside a block."""

    def __init__(self, d):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = self.first

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_shared_parameters_between_blocks():
    shared = MLP(8)
    other = MLP(8)
    tied = MLP(8)
    tied.fc1.weight = other.fc1.weight  # a parameter shared by two different modules
    stage = ReversibleStage([shared, other, shared, tied, TiedTwice(8)]).to(D)
    before = [(n, p) for n, p in stage.named_parameters(remove_duplicate=False)]
    ag, rev = both_engines(stage, torch.randn(2, 8, dtype=D, requires_grad=True))
    assert_engines_match(ag, rev)
    # the recompute left the model's own Parameter objects in place
    after = [(n, p) for n, p in stage.named_parameters(remove_duplicate=False)]
    assert [n for n, _ in after] == [n for n, _ in before]
    assert all(p is q and isinstance(p, nn.Parameter) for (_, p), (_, q) in zip(after, before))


def test_nested_stages():
    """A block that is itself a stage: its recompute runs the inner reversible Function."""
    inner = ReversibleStage(transformer_blocks(1, 8, p=0.2), name="inner")
    stage = ReversibleStage([MLP(8, p=0.2), inner, Attention(8, p=0.2)], name="outer").to(D)
    ag, rev = both_engines(stage, tokens(d=8), seed=11)
    assert inner.engine == "reversible"
    assert_engines_match(ag, rev)


def test_parameterless_and_constant_blocks():
    blocks = [torch.tanh, MLP(8), lambda x: torch.ones_like(x), torch.sin]
    stage = ReversibleStage(blocks).to(D)
    ag, rev = both_engines(stage, torch.randn(2, 8, dtype=D, requires_grad=True))
    assert_engines_match(ag, rev)


def test_block_reading_foreign_parameters_is_refused():
    """A callable that closes over a module's parameters: the reversible engine could not return
    their gradients (they are not the block's parameters), so it must say so, not drop them."""
    lin = nn.Linear(8, 8).to(D)
    stage = ReversibleStage([MLP(8), lambda x: lin(x)], names=["mlp", "closure"], name="s").to(D)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    stage.engine = "autograd"
    stage(x).sum().backward()
    assert lin.weight.grad is not None
    stage.engine = "reversible"
    with pytest.raises(RewireError, match=r"stage 's', block 1 \('closure'\).*require grad"):
        stage(x).sum().backward()


# -- layout transitions, stream dtype, debug ----------------------------------------------


def test_transitions_match_autograd():
    b = 2
    blocks = [MLP(8), MLP(8), MLP(8), Attention(8), MLP(8)]
    transitions = [
        lambda t: torch.roll(t, shifts=(1, -2), dims=(1, 2)),  # (B, 4, 6, 8)
        lambda t: t.permute(0, 2, 1, 3),  # -> (B, 6, 4, 8), non-contiguous
        lambda t: t.reshape(b, 24, 8),  # -> (B, 24, 8)
        None,
    ]
    stage = ReversibleStage(blocks, transitions).to(D)
    x = torch.randn(b, 4, 6, 8, dtype=D, requires_grad=True)
    ag, rev = both_engines(stage, x)
    assert rev["out"].shape == (b, 24, 8)
    assert_engines_match(ag, rev)


def test_transition_count_is_checked():
    with pytest.raises(RewireError, match="2 transitions"):
        ReversibleStage([MLP(8)] * 3, [None])


def test_stream_dtype_float64_with_float32_input():
    blocks = [MLP(16, p=0.1) for _ in range(8)]
    x = torch.randn(2, 8, 16, requires_grad=True)
    stage = ReversibleStage(blocks, stream_dtype=torch.float64)
    ag, rev = both_engines(stage, x)
    assert rev["out"].dtype == torch.float32 and rev["x_grad"].dtype == torch.float32
    assert_engines_match(ag, rev, out_tol=1e-7, grad_tol=1e-5)
    # the two kept streams really are float64: twice the bytes of float32 streams
    stage.engine = "reversible"
    _, b64 = revwire.saved_tensor_bytes(stage, x, exclude=stage.parameters())
    stage.stream_dtype = None
    _, b32 = revwire.saved_tensor_bytes(stage, x, exclude=stage.parameters())
    assert b64 == 2 * b32 == 2 * 2 * x.numel() * 4


def test_debug_records_reconstruction_error():
    n = 6
    stage = ReversibleStage([MLP(8) for _ in range(n)], debug=True).to(D)
    x = torch.randn(2, 8, dtype=D, requires_grad=True)
    run_step(stage, "reversible", x)
    errs = stage.last_reconstruction_error
    assert len(errs) == n
    assert all(0 <= e <= 1e-12 for e in errs)  # float64: exact to rounding
    # float32: measurably inexact, still small
    stage32 = ReversibleStage([MLP(8) for _ in range(n)], debug=True)
    for blk in stage32.blocks:  # large branches make the subtraction lose bits
        blk.fc2.weight.data.mul_(30)
    run_step(stage32, "reversible", x.float())
    errs32 = stage32.last_reconstruction_error
    assert len(errs32) == n and all(e == e for e in errs32)
    assert 0 < max(errs32) < 1e-3


# -- autocast ---------------------------------------------------------------------------


def test_bf16_autocast_grads_close_to_autograd_engine():
    stage = ReversibleStage(transformer_blocks(2, 32, heads=2, p=0.1))
    x0 = torch.randn(2, 16, 32)

    def step(engine, autocast=True):
        stage.engine = engine
        stage.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = stage(x)
        assert out.dtype == torch.float32  # float32 input: the streams stay float32
        loss_of(out).backward()  # outside the autocast region, as AMP training does
        grads = {n: p.grad for n, p in stage.named_parameters()}
        return out.detach(), type(out.grad_fn).__name__, x.grad, grads

    ag_out, _, ag_x, ag_g = step("autograd")
    rev_out, fn, rev_x, rev_g = step("reversible")
    assert fn == "_StageOutputBackward"
    # float32 streams: the recompute reproduces the bf16 forward, the rest is float32 rounding
    assert rel(rev_out, ag_out) <= 1e-6
    assert rel(rev_x, ag_x) <= 1e-5
    assert max_rel(rev_g, ag_g) <= 1e-5
    # and bf16 was in effect: float32 grads differ from both by much more
    _, _, _, f32_g = step("autograd", autocast=False)
    assert max_rel(f32_g, ag_g) > 10 * max_rel(rev_g, ag_g)


class AutocastProbe(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.seen = []

    def forward(self, x):
        y = self.lin(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), y.dtype))
        return y.float()


def test_recompute_runs_under_the_forward_autocast_state():
    probe = AutocastProbe(8)
    stage = ReversibleStage([probe, MLP(8)])
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stage(x)
    out.sum().backward()  # backward outside the autocast context
    assert probe.seen == [(True, torch.bfloat16), (True, torch.bfloat16)]
    # and the other way round: forward without autocast, backward inside it
    probe.seen.clear()
    out = stage(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.sum().backward()
    assert probe.seen == [(False, torch.float32), (False, torch.float32)]


# -- engines, bad input, errors ------------------------------------------------------------


def test_set_engine_switches_every_nested_stage():
    inner = ReversibleStage([MLP(8)] * 2, name="inner")
    outer = ReversibleStage([MLP(8)] * 2, name="outer")
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), inner), outer)
    assert revwire.stages(model) == [inner, outer]
    assert revwire.set_engine(model, "autograd") is model
    assert inner.engine == outer.engine == "autograd"
    revwire.set_engine(model, "reversible")
    assert inner.engine == outer.engine == "reversible"
    with pytest.raises(ValueError, match="unknown engine"):
        revwire.set_engine(model, "checkpoint")
    assert inner.engine == "reversible"
    with pytest.raises(ValueError, match="unknown engine"):
        inner.engine = "nope"
    with pytest.raises(RewireError, match="no reversible stage"):
        revwire.set_engine(nn.Linear(2, 2), "autograd")
    with pytest.raises(ValueError):
        ReversibleStage([MLP(8)], engine="fast")


@pytest.mark.parametrize("engine", ["autograd", "reversible"])
def test_block_changing_shape_raises(engine):
    stage = ReversibleStage([MLP(8), nn.Linear(8, 4)], names=["mlp", "proj_down"], name="s1",
                            engine=engine)
    with pytest.raises(BlockShapeError, match=r"stage 's1', block 1 \('proj_down'\).*\(2, 8\).*\(2, 4\)"):
        stage(torch.randn(2, 8, requires_grad=True))
    stage = ReversibleStage([lambda x: (x, x)], names=["pair"], engine=engine)
    with pytest.raises(BlockShapeError, match="pair.*tuple"):
        stage(torch.randn(2, 8, requires_grad=True))


class Blowup(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return self.lin(x) * 1e20


def test_nonfinite_reconstruction_raises_naming_stage_and_block():
    """float32: x_1 ~ 1e20, x_2 = x_0 + F(x_1) ~ 1e40 = inf; block 1 then reconstructs
    x_0 = x_2 - F(x_1) = inf - inf = nan."""
    stage = ReversibleStage([Blowup(4), Blowup(4)], names=["first", "second"], name="trunk")
    x = torch.randn(2, 4, requires_grad=True)
    out = stage(x)
    assert not torch.isfinite(out).all()
    with pytest.raises(ReconstructionError, match=r"stage 'trunk', block 1 \('second'\)"):
        out.sum().backward()
    stage.check_finite = False  # the check can be turned off
    stage(x).sum().backward()


def test_second_backward_raises_stage_freed():
    stage = ReversibleStage([MLP(8)] * 2, name="body")
    x = torch.randn(2, 8, requires_grad=True)
    loss = stage(x).sum()
    loss.backward()
    with pytest.raises(StageFreedError, match="stage 'body'.*second time") as info:
        loss.backward()
    assert isinstance(info.value, RewireError)


# -- memory ---------------------------------------------------------------------------------


def _saved(depth, engine):
    torch.manual_seed(0)
    stage = ReversibleStage(transformer_blocks(depth // 2, 32), engine=engine)
    x = torch.randn(2, 16, 32, requires_grad=True)
    _, nbytes = revwire.saved_tensor_bytes(stage, x, exclude=list(stage.parameters()))
    assert nbytes == revwire.model_saved_bytes(stage, x)
    return nbytes


def test_saved_bytes_constant_in_depth_for_reversible_only():
    rev4, rev32 = _saved(4, "reversible"), _saved(32, "reversible")
    ag4, ag32 = _saved(4, "autograd"), _saved(32, "autograd")
    assert abs(rev32 - rev4) <= 0.1 * rev4
    assert rev4 == 2 * 2 * 16 * 32 * 4  # just the final pair of streams
    assert ag32 > 6 * ag4
    assert ag32 > 20 * rev32


def test_keep_last_keeps_the_last_blocks_graph_instead_of_recomputing_it():
    torch.manual_seed(0)
    blocks = [RecordingNoise(8) for _ in range(3)]
    stage = ReversibleStage(blocks, keep_last=True).to(D)
    x = torch.randn(4, 8, dtype=D, requires_grad=True)
    rng = torch.get_rng_state()
    rev = run_step(stage, "reversible", x)
    assert [len(b.masks) for b in blocks] == [2, 2, 1]  # the last block ran once
    torch.set_rng_state(rng)
    ag = run_step(stage, "autograd", x)
    assert rel(rev["out"], ag["out"]) <= 1e-12 and max_rel(rev["grads"], ag["grads"]) <= 1e-10
    # what it stores: the pair of streams and the last block's graph, at any depth
    sizes = []
    for depth in (2, 8):
        s = ReversibleStage(transformer_blocks(depth, 32), keep_last=True)
        xs = torch.randn(2, 16, 32, requires_grad=True)
        sizes.append(revwire.saved_tensor_bytes(s, xs, exclude=list(s.parameters()))[1])
    assert sizes[0] == sizes[1] > 2 * xs.numel() * 4


# -- found in review: aliasing, frozen first blocks, fp16 output range ------------------------


class _AddsAux(nn.Module):
    """A branch whose output adds an aux tensor: its gradient is the incoming one, passed through."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, c):
        return torch.tanh(self.fc(x)) + c


class _TanhAux(_AddsAux):
    def forward(self, x, c):
        return torch.tanh(self.fc(x))


def test_a_gradient_passed_through_to_an_aux_tensor_is_not_overwritten():
    stage = ReversibleStage([_TanhAux(4), _AddsAux(4), _TanhAux(4)]).to(D)
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    c = torch.randn(3, 4, dtype=D, requires_grad=True)
    grads = {}
    for engine in ("autograd", "reversible"):
        stage.engine = engine
        grads[engine] = torch.autograd.grad(stage(x, c).pow(2).sum(), [x, c, *stage.parameters()])
    assert max(rel(a, b) for a, b in zip(grads["reversible"], grads["autograd"])) <= 1e-12


def test_frozen_first_blocks_still_check_and_release():
    stage = ReversibleStage([Blowup(4), Blowup(4), Blowup(4)], name="trunk")
    stage.blocks[0].requires_grad_(False)
    out = stage(torch.randn(2, 4))  # no grad into the stage: block 0 gets no autograd node
    with pytest.raises(ReconstructionError, match="stage 'trunk'"):
        out.sum().backward()
    assert out.grad_fn.run.pair is None  # released by the last node that ran


def test_float16_output_does_not_overflow_where_autograd_does_not():
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * 0

    stage = ReversibleStage([Zero(), Zero()]).half()
    x = torch.full((2, 4), 40000.0, dtype=torch.float16, requires_grad=True)
    outs = {}
    for engine in ("autograd", "reversible"):
        stage.engine = engine
        outs[engine] = stage(x)
    assert torch.equal(outs["reversible"], outs["autograd"]) and torch.isfinite(outs["reversible"]).all()


class _Probe(torch.autograd.Function):
    """Identity whose backward (the last step of its block's backward) calls `check`."""

    @staticmethod
    def forward(ctx, x, check):
        ctx.check = check
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.check()
        return g, None


class _WatchesItsOutput(nn.Module):
    """A Linear branch that records, during its own backward, whether its output is still alive."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.out, self.alive_in_backward = None, []

    def forward(self, x):
        y = self.fc(_Probe.apply(x, lambda: self.alive_in_backward.append(self.out() is not None)))
        self.out = weakref.ref(y)
        return y


def test_the_recomputed_block_output_is_freed_before_the_blocks_backward():
    # NOTE [ Release y ]: once x_{i-2} = x_i - y is reconstructed, y's values are dead; its
    # storage must not stay alive through the block's backward, where the block's peak is.
    blocks = [_WatchesItsOutput(8) for _ in range(3)]
    stage = ReversibleStage(blocks).to(D)
    x = torch.randn(4, 8, dtype=D, requires_grad=True)
    stage(x).sum().backward()
    assert [b.alive_in_backward for b in blocks] == [[False]] * 3
    probe = _WatchesItsOutput(8).to(D)  # the probe sees an output that is held
    y = probe(x)
    y.sum().backward()
    assert probe.alive_in_backward == [True]
    ag, rev = both_engines(stage, x)
    assert max_rel(rev["grads"], ag["grads"]) <= 1e-12


def test_storage_sharing_is_decided_by_the_storage_not_its_pointer():
    # meta and fake tensors all have data pointer 0: a pointer test would call them shared,
    # disowning every gradient (no in-place accumulation, one extra stream-sized tensor).
    from revwire.runtime.engine import _shares_storage

    a, b = torch.empty(4, 4, device="meta"), torch.empty(4, 4, device="meta")
    assert not _shares_storage(a, b)
    assert _shares_storage(a, a[1:].t())
    c = torch.randn(4, 4)
    assert _shares_storage(c, c.view(16)) and not _shares_storage(c, c.clone())


def _backward_peak_in_streams(blocks: int) -> float:
    """The backward's peak above what is alive at its start (which holds the final pair), in
    float64 streams, for a stage of Linear blocks on a batch large enough that the streams
    dominate; also checks the gradients against the autograd engine."""
    b, d = 4096, 8
    stage = ReversibleStage([nn.Linear(d, d) for _ in range(blocks)]).to(D)
    x = torch.randn(b, d, dtype=D, requires_grad=True)
    out = stage(x)
    loss = out.sum()
    r = revwire.step_peak(loss.backward, roots=[stage, x, out])
    ag, rev = both_engines(stage, x)
    assert max_rel(rev["grads"], ag["grads"]) <= 1e-12
    return (r.peak - r.baseline) / (b * d * 8)


def test_the_first_block_lets_go_of_the_stream_it_does_not_need():
    # The first block's node only checks that x_{-1} = x_1 - F(x_0) is finite: x_1 (kept by the
    # stage for backward) is summed and let go before the recompute. Alive: the output's
    # gradient (one tensor for both streams) and the block's input gradient; before, x_1 too.
    assert _backward_peak_in_streams(1) <= 2.01


def test_the_final_pair_is_reconstructed_in_place_once_autograd_lets_go_of_it():
    # NOTE [ In-place reconstruction ]: without retain_graph, the second node adopts x_N.
    # Alive: the older stream, the two stream gradients and the block's input gradient; a
    # copy of x_N would make it 5.
    assert _backward_peak_in_streams(4) <= 4.01
