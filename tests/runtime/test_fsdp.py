"""FSDP2 (fully_shard; gloo, 2 CPU processes) over a rewired transformer, sharded per layer or
per Linear, with both engines: the stage gathers the groups whose hooks do not fire around it,
and the full gradients match one process's unsharded gradients (docs/design.md §3)."""
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import revwire
from conftest import MLP, Attention, rel, distributed_data, per_sample_loss

pytestmark = pytest.mark.usefixtures("small_cpu")
WORLD = 2
BATCH, TOKENS, DIM, LAYERS = 4, 8, 32, 3
CASES = [(shard, engine) for shard in ("layer", "linear") for engine in ("reversible", "autograd")]


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = Attention(DIM), MLP(DIM)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def _rewired():
    torch.manual_seed(0)  # every process builds the same weights
    x = torch.zeros(1, TOKENS, DIM, dtype=torch.float64)
    return revwire.rewire(Net().double(), x)


def _two_steps(model, x, w, phase=lambda name: None):
    """Gradients of two steps with an SGD step between, and the bytes of activations the last
    forward saved; `phase(name)` is told where the step is."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, saved = [], None
    for _ in range(2):
        phase("forward")
        loss, saved = _saved_activations(model, lambda: per_sample_loss(model(x), w))
        phase("backward")
        loss.backward()
        phase("done")
        grads.append({n: p.grad for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return grads, saved


def _saved_activations(model, fn):
    """`fn()` and the bytes of what autograd saves meanwhile, each storage once, weights
    excepted. (`revwire.saved_tensor_bytes` excludes storages known up front; FSDP allocates
    the gathered weights during the forward and frees them while saved, so its addresses
    recur: a weight is told apart when it is saved, as a parameter of the model then.)"""
    seen = {}

    def pack(t):
        weights = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in model.parameters()}
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _groups(model):
    from torch.distributed.fsdp._fully_shard._fsdp_state import _get_module_fsdp_state

    states = {id(s): s for m in model.modules() if (s := _get_module_fsdp_state(m)) is not None}
    return [g for s in states.values() for g in s._fsdp_param_groups]


def _watch_collectives(log):
    """Count FSDP's all-gathers per phase; record whose gradients each reduce-scatter carries."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg

    all_gather, reduce = pg.foreach_all_gather, pg.foreach_reduce

    def counted_all_gather(*args, **kwargs):
        log["gathered"][log["phase"]] += 1
        return all_gather(*args, **kwargs)

    def recorded_reduce(fsdp_params, *args, **kwargs):
        owner = next(g for g in _groups(log["model"]) if fsdp_params[0] in g.fsdp_params)
        log["reduced"].append(owner._module_fqn)
        return reduce(fsdp_params, *args, **kwargs)

    pg.foreach_all_gather, pg.foreach_reduce = counted_all_gather, recorded_reduce


def _run_case(rank, shard, engine, log):
    from torch.distributed.fsdp import fully_shard

    model = revwire.set_engine(_rewired(), engine)
    x, w = distributed_data(BATCH, TOKENS, DIM)
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    model(x[part])  # before sharding: what the stage caches about FSDP must not go stale
    for m in model.layers if shard == "layer" else [m for m in model.modules() if isinstance(m, nn.Linear)]:
        fully_shard(m)
    fully_shard(model)
    log.update(model=model, gathered={"forward": 0, "backward": 0, "done": 0}, reduced=[], after_forward=None)

    def phase(name):
        log["phase"] = name
        if name == "backward" and log["after_forward"] is None:
            log["after_forward"] = sorted(g._module_fqn for g in _groups(model) if not g.is_sharded)
        if name == "done":  # every gradient reduce-scattered, every group resharded
            assert all(g.is_sharded for g in _groups(model))
            assert not [p._param_fqn for g in _groups(model) for p in g.fsdp_params
                        if hasattr(p, "_unsharded_param") and p.unsharded_param.grad is not None]

    grads, saved = _two_steps(model, x[part], w[part], phase)
    with torch.no_grad():  # inference: each block's groups resharded after it (the root keeps its own)
        model(x[part])
    assert [g._module_fqn for g in _groups(model) if not g.is_sharded] == [""]
    return dict(grads=[{n: g.full_tensor() for n, g in step.items()} for step in grads], saved=saved,
                groups=sorted(g._module_fqn for g in _groups(model)), gathered=log["gathered"],
                reduced=log["reduced"], after_forward=log["after_forward"])


def _without_root():
    """The error of a forward with the layers sharded but not the root."""
    from torch.distributed.fsdp import fully_shard

    model = _rewired()
    for layer in model.layers:
        fully_shard(layer)
    try:
        model(distributed_data(BATCH, TOKENS, DIM)[0])
    except revwire.RewireError as e:
        return str(e)


def _mixed_precision(rank, engine):
    """Full gradients of one step, layers and root sharded with bf16 parameters (FSDP casts
    the root's input; the layers' own input casts never run: the graph never calls them)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = revwire.set_engine(_rewired().float(), engine)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    x, w = (t.float() for t in distributed_data(BATCH, TOKENS, DIM))
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    per_sample_loss(model(x[part]).float(), w[part]).backward()
    return {n: p.grad.full_tensor() for n, p in model.named_parameters()}


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP on a Linear of 3-D input
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=WORLD)
    try:
        mixed = {e: _mixed_precision(rank, e) for e in ("autograd", "reversible")}  # before the watch
        log = {"phase": "done"}
        _watch_collectives(log)
        results = {case: _run_case(rank, *case, log) for case in CASES}
        results["no root"] = _without_root()
        results["mixed precision"] = mixed
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """Every case in one pair of processes (spawning is most of the time)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """One process, no sharding, plain autograd, the whole batch; and one half batch."""
    x, w = distributed_data(BATCH, TOKENS, DIM)
    grads, _ = _two_steps(revwire.set_engine(_rewired(), "autograd"), x, w)
    half = _rewired()
    per_sample_loss(half(x[: BATCH // WORLD]), w[: BATCH // WORLD]).backward()
    return grads, {n: p.grad for n, p in half.named_parameters()}


@pytest.mark.parametrize("shard, engine", CASES)
def test_full_gradients_match_one_process_for_two_steps(sharded_runs, reference, shard, engine):
    (ref_steps, half), runs = reference, [r[shard, engine] for r in sharded_runs]
    for step, ref in enumerate(ref_steps):  # the second after an SGD step on the shards
        assert runs[0]["grads"][step].keys() == ref.keys()
        for n, g in ref.items():
            assert torch.equal(runs[0]["grads"][step][n], runs[1]["grads"][step][n]), (step, n)
            assert rel(runs[0]["grads"][step][n], g) <= 1e-9, (step, n)
    # a half batch alone would not do: the reduction really happened
    name = "layers.1.mlp.fc1.weight"
    assert rel(half[name], ref_steps[0][name]) > 1e-3


@pytest.mark.parametrize("shard, engine", CASES)
def test_each_group_is_gathered_once_per_forward_and_reduced_once_per_backward(sharded_runs, shard, engine):
    run = sharded_runs[0][shard, engine]
    groups, reduced = run["groups"], run["reduced"]
    stage = [f for f in groups if f.startswith("layers.")]
    assert len(stage) == (LAYERS if shard == "layer" else 4 * LAYERS)
    # one all-gather per group and forward: a layer's attention and MLP branches share one
    assert run["gathered"]["forward"] == 2 * len(groups)
    assert sorted(reduced) == sorted(groups * 2)  # neither twice nor missed, in each of two steps
    if engine == "reversible":
        # resharded after each block's forward (the root keeps its own gathered) and gathered
        # again for the recompute: once per group, the root's excepted
        assert run["after_forward"] == [""]
        assert run["gathered"]["backward"] == 2 * (len(groups) - 1)
        # a group is reduce-scattered as soon as the blocks that read it are inverted (layer
        # by layer, last first), before FSDP's final callback does the rest: the root's, and
        # those of block 0 (layers.0's attention branch), whose node runs last
        first_step = reduced[: len(groups)]
        early = [f for f in first_step[: first_step.index("")] if f.startswith("layers.")]
        block0 = "layers.0" if shard == "layer" else "layers.0.attn"
        assert sorted(early) == [f for f in stage if not f.startswith(block0)], first_step
        assert early == sorted(early, key=lambda f: -int(f.split(".")[1])), first_step
    else:
        # the autograd engine's graph saves the gathered weights: kept until the final callback
        assert run["after_forward"] == sorted(["", *stage])


@pytest.mark.parametrize("shard", ["layer", "linear"])
def test_reversible_engine_keeps_no_block_activations_when_sharded(sharded_runs, shard):
    rev, ag = (sharded_runs[0][shard, engine]["saved"] for engine in ("reversible", "autograd"))
    x, w = distributed_data(BATCH, TOKENS, DIM)
    single = revwire.set_engine(_rewired(), "reversible")
    _, unsharded = _saved_activations(single, lambda: per_sample_loss(single(x[: BATCH // WORLD]), w[: BATCH // WORLD]))
    assert rev == unsharded  # the pair of streams, the last block's and the outer graph's
    assert rev < ag / 3  # the autograd engine keeps every block's activations


def test_layers_sharded_without_the_root_is_a_clear_error(sharded_runs):
    msg = sharded_runs[0]["no root"]
    assert msg is not None and "block 0 ('layers.0 [attn]')" in msg and "'layers.0.attn.norm.weight'" in msg
    assert "Apply fully_shard to the model's root as well" in msg


def test_mixed_precision_per_layer_gives_both_engines_the_same_gradients(sharded_runs):
    mixed = sharded_runs[0]["mixed precision"]
    ref, rev = mixed["autograd"], mixed["reversible"]
    assert ref.keys() == rev.keys() and all(g.dtype == torch.float32 for g in rev.values())
    for n, g in ref.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
        assert rel(rev[n], g) <= 1e-3, n  # bf16 parameters: float64 streams invert exactly
