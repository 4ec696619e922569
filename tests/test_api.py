"""`revwire.rewire` / `revwire.report` contract (docs/design.md §4-5): parameters, state_dict,
modes, dtype, copies, pickling, options and errors."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revwire

import timm

D = 4


class Branch(nn.Module):
    def __init__(self, d=D):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return torch.tanh(self.bn(self.fc(x)))


class Net(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.stem = nn.Linear(3, D)
        self.blocks = nn.ModuleList(Branch() for _ in range(n))
        self.head = nn.Linear(D, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def tiny_vit(drop_path_rate=0.0, **kw):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3,
                             drop_path_rate=drop_path_rate, **kw).double()


X32 = lambda: torch.randn(2, 3, 32, 32, dtype=torch.float64)  # noqa: E731


def test_parameters_are_the_models_objects_and_names():
    model = tiny_vit()
    rev = revwire.rewire(model, X32())
    assert {id(p) for p in rev.parameters()} == {id(p) for p in model.parameters()}
    assert [n for n, _ in rev.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(rev.get_parameter(n) is p for n, p in model.named_parameters())


def test_state_dict_keys_equal_and_strict_load_both_ways():
    model = Net()
    rev = revwire.rewire(model, torch.randn(2, 3))
    assert list(rev.state_dict().keys()) == list(model.state_dict().keys())
    other = Net()
    rev.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(model.stem.weight, other.stem.weight)  # shared with the model
    fresh = Net()
    fresh.load_state_dict(rev.state_dict(), strict=True)
    assert torch.equal(fresh.blocks[2].bn.running_var, model.blocks[2].bn.running_var)


def test_eval_is_deterministic_and_drop_path_follows_the_mode():
    x = X32()
    # Traced in train mode, drop-path (and dropout) turn off in eval.
    model = tiny_vit(0.5, drop_rate=0.3).train()
    rev = revwire.rewire(model, x)
    assert rev.training
    ref = revwire.rewire(tiny_vit(0.0).eval(), x).eval()  # same weights (same seed), no drop-path
    rev.eval()
    torch.manual_seed(1)
    a = rev(x)
    torch.manual_seed(2)
    b = rev(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, ref(x), rtol=1e-12, atol=1e-12)
    rev.train()
    torch.manual_seed(1)
    c = rev(x)
    torch.manual_seed(2)
    assert not torch.allclose(c, rev(x))
    # Traced in eval mode, drop-path turns on in train.
    rev2 = revwire.rewire(tiny_vit(0.5).eval(), x)
    assert not rev2.training
    rev2.train()
    torch.manual_seed(1)
    c = rev2(x)
    torch.manual_seed(2)
    assert not torch.allclose(c, rev2(x))


def test_train_step_updates_batchnorm_once():
    model = Net().train()
    x = torch.randn(8, 3)
    rev = revwire.rewire(model, x)
    before = model.blocks[1].bn.num_batches_tracked.item()
    rev(x.requires_grad_()).sum().backward()
    assert model.blocks[1].bn.num_batches_tracked.item() == before + 1


def test_to_dtype():
    model = Net().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    rev = revwire.rewire(model, x).eval()
    y64 = rev(x)
    rev.to(torch.float32)
    assert model.stem.weight.dtype == torch.float32  # the parameters are shared
    y32 = rev(x.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)
    rev.train()
    xi = x.float().requires_grad_()
    rev(xi).sum().backward()
    assert xi.grad.dtype == torch.float32 and model.stem.weight.grad.dtype == torch.float32


def test_deepcopy_works_and_shares_nothing():
    model = Net().eval()
    x = torch.randn(4, 3)
    rev = revwire.rewire(model, x)
    dup = copy.deepcopy(rev)
    torch.testing.assert_close(dup(x), rev(x), rtol=0, atol=0)
    assert not ({id(p) for p in dup.parameters()} & {id(p) for p in rev.parameters()})
    with torch.no_grad():
        next(dup.parameters()).add_(1.0)
    assert not torch.equal(dup(x), rev(x))
    # The copy's stage calls the copy's modules: its gradients land on its own parameters.
    dup.train()
    dup(x.requires_grad_()).sum().backward()
    assert dup.get_submodule("blocks.0.fc").weight.grad is not None
    assert model.blocks[0].fc.weight.grad is None
    assert len(revwire.stages(dup)) == 1 and revwire.set_engine(dup, "autograd") is dup


def test_deepcopy_keeps_the_report():
    model = timm.create_model("resnet18", pretrained=False)
    dup = copy.deepcopy(revwire.rewire(model, torch.randn(2, 3, 32, 32)))
    assert revwire.report(dup).num_blocks == 2
    assert dup.num_classes == model.num_classes


def test_torch_save_and_load_of_the_whole_module():
    model = Net().eval()
    x = torch.randn(4, 3)
    rev = revwire.rewire(model, x)
    buf = io.BytesIO()
    torch.save(rev, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), rev(x), rtol=0, atol=0)
    assert revwire.report(loaded).num_blocks == 4
    loaded.train()
    xi = x.clone().requires_grad_()
    out = loaded(xi)
    assert all(s.engine == "reversible" for s in revwire.stages(loaded))
    assert "_StageOutputBackward" in _backward_node_names(out)
    out.sum().backward()
    assert loaded.get_submodule("blocks.3.fc").weight.grad is not None


def _backward_node_names(t: torch.Tensor) -> set:
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


def test_torch_save_of_a_timm_model():
    from torch.fx import _symbolic_trace as fx_trace
    x = X32()
    before = dict(fx_trace._wrapped_fns_to_patch)
    try:
        rev = revwire.rewire(tiny_vit().eval(), x)
        buf = io.BytesIO()
        torch.save(rev, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        torch.testing.assert_close(loaded(x), rev(x), rtol=0, atol=0)
        revwire.rewire(Net(), torch.randn(2, 3))  # tracing still works afterwards
    finally:  # do not poison the tests that run after this one
        for key in set(fx_trace._wrapped_fns_to_patch) - set(before):
            del fx_trace._wrapped_fns_to_patch[key]


def test_model_saved_bytes_smaller_with_the_reversible_engine():
    model = Net(8).train()
    x = torch.randn(16, 3, requires_grad=True)
    rev = revwire.rewire(model, x)
    revwire.set_engine(rev, "autograd")
    ag = revwire.model_saved_bytes(rev, x)
    revwire.set_engine(rev, "reversible")
    rv = revwire.model_saved_bytes(rev, x)
    assert 0 < rv < ag


class PostAct(nn.Module):
    """Two stages: pre-activation blocks (x + F(x)), then ResNet-style relu(x + F(x))."""

    def __init__(self):
        super().__init__()
        self.pre = nn.ModuleList(Branch() for _ in range(3))
        self.post = nn.ModuleList(Branch() for _ in range(3))

    def forward(self, x):
        for b in self.pre:
            x = x + b(x)
        x = torch.sin(x)
        for b in self.post:
            x = F.relu(x + b(x))
        return x


def test_post_activation_skip_leaves_post_activated_blocks_alone():
    x = torch.randn(4, D)
    rep = revwire.report(revwire.rewire(PostAct(), x))
    assert [(c.num_blocks, c.post_activations) for c in rep.chains] == [(3, 0), (3, 3)]
    rep = revwire.report(revwire.rewire(PostAct(), x, post_activation="skip"))
    assert [(c.num_blocks, c.post_activations) for c in rep.chains] == [(3, 0)]
    assert sum("post_activation='skip'" in s.reason for s in rep.skipped) == 3


def test_post_activation_skip_on_resnet():
    import torchvision
    model = torchvision.models.resnet18(weights=None)
    x = torch.randn(2, 3, 32, 32)
    assert revwire.report(revwire.rewire(model, x)).chains[0].post_activations == 2
    with pytest.raises(revwire.NoChainError, match="post_activation='skip'"):
        revwire.rewire(model, x, post_activation="skip")
    with pytest.warns(UserWarning, match="unchanged"):
        assert revwire.rewire(model, x, post_activation="skip", strict=False) is model


def test_min_blocks():
    x = torch.randn(4, D)
    rep = revwire.report(revwire.rewire(PostAct(), x, min_blocks=3))
    assert [c.num_blocks for c in rep.chains] == [3, 3]
    with pytest.raises(revwire.NoChainError, match="min_blocks=4"):
        revwire.rewire(PostAct(), x, min_blocks=4)
    with pytest.raises(ValueError, match="min_blocks"):
        revwire.rewire(PostAct(), x, min_blocks=0)


class Tapped(nn.Module):
    """A tiny backbone returning an intermediate value (a feature tap) beside its output."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Branch() for _ in range(6))

    def forward(self, x):
        for b in self.blocks[:3]:
            x = x + b(x)
        tap = x
        x = x + self.blocks[3](x)
        tap = tap * 2
        for b in self.blocks[4:]:
            x = x + b(x)
        return x, tap


def test_feature_tap_cuts_the_chain():
    x = torch.randn(4, D)
    model = Tapped().eval()
    rev = revwire.rewire(model, x)
    # The tap reads the value after block 2, the skip input of block 3: two chains of 3.
    assert [c.num_blocks for c in revwire.report(rev).chains] == [3, 3]
    assert [c.block_scopes for c in revwire.report(rev).chains] == [[""] * 3, [""] * 3]
    out, tap = rev(x)
    # The tap is the exact value after the first three rewired blocks.
    a = b = x
    for blk in model.blocks[:3]:
        a, b = b, a + blk(b)
    torch.testing.assert_close(tap, (a + b), rtol=1e-6, atol=1e-6)


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class Gated(Net):
    def __init__(self):
        super().__init__()
        self.gate = nn.Sequential(nn.Identity(), Gate())

    def forward(self, x):
        return super().forward(self.gate(x))


def test_untraceable_model_raises_trace_error_naming_the_module():
    with pytest.raises(revwire.TraceError, match=r"'gate\.1'.*leaf_modules=\[Gate\]"):
        revwire.rewire(Gated(), torch.randn(2, 3))


def test_leaf_modules_fix_it():
    model = Gated().eval()
    x = torch.randn(2, 3)
    rev = revwire.rewire(model, x, leaf_modules=[Gate])
    assert revwire.report(rev).num_blocks == 4


class NoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_no_residual_raises_no_chain_error():
    with pytest.raises(revwire.NoChainError, match="strict=False"):
        revwire.rewire(NoResidual(), torch.randn(2, 3))


def test_no_residual_non_strict_returns_the_model_with_a_warning():
    model = NoResidual()
    with pytest.warns(UserWarning, match="unchanged"):
        assert revwire.rewire(model, torch.randn(2, 3), strict=False) is model


@pytest.mark.parametrize("bad", [torch.randn(2, 5), "a string", (), [torch.randn(2, 3), 3]])
def test_bad_example_inputs_raise_input_error(bad):
    with pytest.raises(revwire.InputError):
        revwire.rewire(Net(), bad)


class ConvNet(nn.Module):
    """A conv stem and residual conv blocks: no pretrained_cfg."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()) for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b(x)
        return x.mean((2, 3))


@pytest.mark.parametrize("make, shape, words", [
    (tiny_vit, (2, 32, 32), r"VisionTransformer takes 4-D inputs \(batch, C, H, W\), but the example input has "
                            r"shape \(2, 32, 32\) \(3-D\)"),
    (tiny_vit, (2, 3, 4, 32, 32), r"VisionTransformer takes 4-D inputs .* shape \(2, 3, 4, 32, 32\) \(5-D\)"),
    (ConvNet, (2, 8), r"ConvNet takes 4-D inputs \(batch, C, H, W\), but the example input has shape \(2, 8\)"),
])
def test_wrong_rank_input_says_the_rank(make, shape, words):
    model = make()
    p = next(model.parameters())
    with pytest.raises(revwire.InputError, match=words) as e:
        revwire.rewire(model, torch.randn(shape, dtype=p.dtype))
    assert "IndexError" not in str(e.value) and "Proxy" not in str(e.value)


def test_compiled_model_is_unwrapped_with_a_warning():
    model = Net()
    compiled = torch.compile(model)
    with pytest.warns(UserWarning, match=r"torch\.compile\(Net\).*_orig_mod.*torch\.compile\(rewired\)"):
        rev = revwire.rewire(compiled, torch.randn(2, 3))
    assert revwire.report(rev).num_blocks == 4
    assert all(rev.get_parameter(n) is p for n, p in model.named_parameters())
    x = torch.randn(2, 3)
    torch.testing.assert_close(rev.eval()(x), revwire.rewire(model, x).eval()(x), rtol=0, atol=0)
    plain = torch.compile(NoResidual())
    with pytest.warns(UserWarning, match="unchanged") as caught:  # nothing to rewire: the model as given
        assert revwire.rewire(plain, torch.randn(2, 3), strict=False) is plain
    assert not any("_orig_mod" in str(w.message) for w in caught)


def test_missing_example_inputs():
    with pytest.raises(revwire.InputError, match="example_inputs"):
        revwire.rewire(Net())
    # timm models carry their input size: example_inputs may be left out.
    model = timm.create_model("resnet18", pretrained=False)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32))
    assert revwire.report(revwire.rewire(model)).num_blocks == 2


def test_not_a_module():
    with pytest.raises(revwire.InputError):
        revwire.rewire(lambda x: x, torch.randn(2))


def test_report_prints_a_table():
    rev = revwire.rewire(PostAct(), torch.randn(4, D))
    rep = revwire.report(rev)
    text = str(rep)
    assert "2 reversible stage(s), 6 residual blocks" in text
    assert "stage" in text and "blocks" in text and "stream shape" in text
    assert "revwire_stage0" in text and "revwire_stage1" in text and "4x4" in text
    d = rep.to_dict()
    assert d["model"] == "PostAct" and len(d["chains"]) == 2
    assert d["chains"][1]["post_activations"] == 3
    assert [b.split(" ")[0] for b in rep.chains[0].blocks] == ["pre.0", "pre.1", "pre.2"]
    with pytest.raises(revwire.RewireError):
        revwire.report(PostAct())


def test_set_engine():
    rev = revwire.rewire(Net(), torch.randn(2, 3))
    assert revwire.set_engine(rev, "autograd") is rev
    assert all(s.engine == "autograd" for s in revwire.stages(rev))
    with pytest.raises(ValueError):
        revwire.set_engine(rev, "magic")
    with pytest.raises(revwire.RewireError):
        revwire.set_engine(Net(), "autograd")


def test_engine_option_and_attributes():
    model = timm.create_model("resnet18", pretrained=False)
    rev = revwire.rewire(model, torch.randn(2, 3, 32, 32), engine="autograd")
    assert all(s.engine == "autograd" for s in revwire.stages(rev))
    assert rev.num_classes == model.num_classes  # plain attributes users read are kept


class ScaledBranch(nn.Module):
    """Reads a buffer directly (a get_attr in the graph) and calls functional dropout."""

    def __init__(self, d=D):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.register_buffer("scale", torch.ones(d))
        self.extra = nn.Linear(d, d)  # registered, never called

    def forward(self, x):
        return F.dropout(self.fc(x), p=0.5, training=self.training) * self.scale


class ScaledNet(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(ScaledBranch() for _ in range(depth))
        self.bn = nn.BatchNorm1d(D)
        self.offset = torch.zeros(D)  # a plain tensor attribute, read by forward

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.bn(x) + self.offset


def test_rewire_keeps_the_users_modules_their_modes_and_unused_children():
    model = ScaledNet().train()
    model.bn.eval()  # e.g. a frozen BatchNorm
    rev = revwire.rewire(model, torch.randn(2, D))
    assert model.bn.training is False and model.blocks[0].training is True
    assert rev.get_submodule("blocks.0") is model.blocks[0]  # the user's own object
    assert rev.get_submodule("blocks.1.extra") is model.blocks[1].extra
    assert list(rev.state_dict()) == list(model.state_dict())


def test_blocks_see_buffers_and_modes_as_they_are_now():
    torch.manual_seed(0)
    model = ScaledNet()
    x = torch.randn(8, D)
    rev = revwire.rewire(model, x)
    rev.eval()  # functional dropout inside the stage's blocks turns off
    torch.testing.assert_close(rev(x), rev(x), rtol=0, atol=0)
    rev.double()  # buffers are replaced; the blocks must read the new ones
    state = {k: (torch.zeros_like(v) if k.endswith("scale") else v) for k, v in rev.state_dict().items()}
    rev.load_state_dict(state)
    xd = x.double()
    # every branch is now zero: each stream is the input, and so is the stage's output
    expected = model.bn(xd) + model.offset.double()
    torch.testing.assert_close(rev(xd), expected)


# -- parameters stay the original's (issue: reliability at scale) ------------------------------


def _vit_tiny():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=2).eval()


def _same_parameters(a, b):
    return [n for n, p in a.named_parameters() if p is not dict(b.named_parameters())[n]]


def test_root_parameters_stay_shared_through_assign_and_conversions():
    m = _vit_tiny()
    rev = revwire.rewire(m, torch.randn(1, 3, 32, 32))
    rev.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    assert _same_parameters(rev, m) == [] and rev.cls_token is m.cls_token
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # .to() makes new Parameters
    try:
        rev.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert _same_parameters(rev, m) == [] and m.pos_embed.dtype == torch.float64
    rev.to("meta")  # always new Parameters
    assert _same_parameters(rev, m) == [] and m.cls_token.is_meta


def test_a_deepcopy_shares_with_itself_not_with_the_original():
    m = _vit_tiny()
    rev = revwire.rewire(m, torch.randn(1, 3, 32, 32))
    c = copy.deepcopy(rev).train()
    assert {id(p) for p in c.parameters()}.isdisjoint(id(p) for p in m.parameters())
    c(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in c.named_parameters() if p.grad is None]
    assert missing == [] and all(p.grad is None for p in m.parameters())


def test_meta_device_training_forward_and_backward():
    m = _vit_tiny()
    rev = revwire.rewire(m, torch.randn(1, 3, 32, 32)).to("meta").train()
    out = rev(torch.randn(2, 3, 32, 32, device="meta"))
    assert out.is_meta and out.shape == (2, 1000)
    assert "_StageOutputBackward" in _backward_node_names(out)  # the reversible engine ran
    out.sum().backward()
    assert all(p.grad is not None and p.grad.is_meta for p in rev.parameters())


def test_torch_compile_of_a_rewired_model_gives_the_eager_gradients():
    # The engine's nodes run eagerly inside a compiled model (a graph break per block); the
    # compiled graph around them must hand them the same values.
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                              patch_size=8, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    rev = revwire.rewire(model, x)

    def grads(m):
        rev.zero_grad(set_to_none=True)
        m(x).sum().backward()
        return [p.grad.clone() for p in rev.parameters()]

    eager = grads(rev)
    compiled = grads(torch.compile(rev, backend="aot_eager"))
    assert len(compiled) == len(eager) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(eager, compiled))
    assert revwire.stages(rev) and all(s.engine == "reversible" for s in revwire.stages(rev))
