"""Engine check for models whose inputs and outputs are structures (ModelOutput, lists)."""
import copy

import torch
import torch.utils._pytree as pytree

import revwire
from conftest import perturb_weights, rel


def _loss(out):
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            total = total + (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum()
    return total


def _step(model, engine, args, seed):
    revwire.set_engine(model, engine)
    model.zero_grad(set_to_none=True)
    args = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(t.is_floating_point())
                           if isinstance(t, torch.Tensor) else t, args)
    torch.manual_seed(seed)
    out = model(*args)
    _loss(out).backward()
    leaves = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.grad is not None]
    return {
        "out": [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)],
        "type": type(out),
        "x_grads": [t.grad for t in leaves],
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def check_rewire(model, args, *, blocks=None, seed=0, **options):
    """Rewire `model` (float64, train mode, weights perturbed) on `args` (a tuple of the
    forward's inputs) and assert what the compiler guarantees; returns the rewired model."""
    model.double()
    model.train()  # (mmaction2 backbones override train() and return None)
    model = perturb_weights(model, seed=seed)
    args = pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, args)
    keys = list(model.state_dict().keys())
    params = {n: p for n, p in model.named_parameters()}
    rev = revwire.rewire(model, _fresh(args), **options)
    report = revwire.report(rev)
    if blocks is not None:
        assert [c.num_blocks for c in report.chains] == blocks, str(report)
    assert list(rev.state_dict().keys()) == keys
    for n, p in rev.named_parameters():
        assert p is params[n], n
    torch.manual_seed(seed)
    expect = model(*_fresh(args))  # (pytorchvideo's forward assigns into its input list)
    state = copy.deepcopy(model.state_dict())
    ag = _step(rev, "autograd", args, seed)
    rev.load_state_dict(state)
    rv = _step(rev, "reversible", args, seed)
    rev.load_state_dict(state)
    assert ag["type"] is type(expect)
    assert max(rel(a, b) for a, b in zip(rv["out"], ag["out"])) <= 1e-9
    assert all(rel(a, b) <= 1e-7 for a, b in zip(rv["x_grads"], ag["x_grads"]))
    assert ag["grads"] and rv["grads"].keys() == ag["grads"].keys()
    assert grad_error(rv["grads"], ag["grads"]) <= 1e-7
    for k, b in ag["buffers"].items():
        if b.is_floating_point():
            assert rel(rv["buffers"][k], b) <= 1e-9, k
        else:
            assert torch.equal(rv["buffers"][k], b), k
    # saved bytes: the reversible engine keeps less for backward than autograd
    saved = {}
    for engine in ("autograd", "reversible"):
        revwire.set_engine(rev, engine)
        saved[engine] = _saved_bytes(rev, args)
    rev.load_state_dict(state)
    revwire.set_engine(rev, "reversible")
    assert saved["reversible"] < saved["autograd"], saved
    return rev


def _fresh(args):
    return pytree.tree_map(lambda t: t, args)  # new containers, same tensors


def grad_error(got, want):
    """Largest relative gradient error. A gradient that is zero in exact arithmetic (the
    bias of attention keys: softmax ignores it) is rounding noise in both engines, so the
    norm it is measured against is at least 1e-6 of the largest gradient's."""
    floor = 1e-6 * max(g.double().norm().item() for g in want.values())
    return max(((got[k].double() - g.double()).norm() / max(g.double().norm().item(), floor)).item()
               for k, g in want.items())


def _saved_bytes(model, args):
    seen, total = set(), [0]

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*_fresh(args))
    del out
    return total[0]
