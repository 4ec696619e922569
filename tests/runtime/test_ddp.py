"""DistributedDataParallel (gloo, 2 CPU processes) over a reversible stage: parameter gradients
come back through autograd, so DDP's reducer sees and averages them like any other."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import revwire
from conftest import rel, transformer_blocks, distributed_data, per_sample_loss

pytestmark = pytest.mark.usefixtures("small_cpu")
WORLD = 2
BATCH, TOKENS, DIM = 4, 8, 16


def _model():
    torch.manual_seed(0)  # every process builds the same weights
    # No BatchNorm (a batch split would change its statistics), no dropout (per-rank masks).
    stage = revwire.ReversibleStage(transformer_blocks(2, DIM, heads=2, p=0.0), name="trunk")
    return nn.Sequential(nn.Linear(DIM, DIM), stage, nn.LayerNorm(DIM)).double()


def _worker(rank, out_dir):
    torch.set_num_threads(1)
    # a file rendezvous: no TCP port to pick, so no race with other processes for one
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x, w = distributed_data(BATCH, TOKENS, DIM)
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        out = model(x[part])
        assert type(out.grad_fn).__name__ != "_StageOutputBackward"  # the head's norm
        per_sample_loss(out, w[part]).backward()
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save(grads, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model = _model()
    x, w = distributed_data(BATCH, TOKENS, DIM)
    ref = {}
    for engine in ("autograd", "reversible"):
        revwire.set_engine(model, engine)
        model.zero_grad(set_to_none=True)
        per_sample_loss(model(x), w).backward()
        ref[engine] = {n: p.grad.clone() for n, p in model.named_parameters()}

    names = list(ref["autograd"])
    assert any(n.startswith("1.") for n in names)  # the stage's parameters are included
    for n in names:
        assert ranks[0][n] is not None, n
        assert torch.equal(ranks[0][n], ranks[1][n]), n  # all-reduced: identical on every rank
        assert rel(ranks[0][n], ref["reversible"][n]) <= 1e-9, n
        assert rel(ranks[0][n], ref["autograd"][n]) <= 1e-9, n
    # and a half batch alone would not do: the reduction really happened
    model.zero_grad(set_to_none=True)
    per_sample_loss(model(x[: BATCH // WORLD]), w[: BATCH // WORLD]).backward()
    assert rel(model[1].blocks[0].qkv.weight.grad, ranks[0]["1.blocks.0.qkv.weight"]) > 1e-3
