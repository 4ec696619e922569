"""What the recompute replays: RNG state, autocast state, norms without a second update."""
import pytest
import torch
from torch import nn

from revwire.runtime.replay import AutocastState, RngState, frozen_running_stats, stat_tracking_norms

pytestmark = pytest.mark.usefixtures("small_cpu")


def test_rng_replay_reproduces_draws_and_restores_the_global_state():
    torch.manual_seed(0)
    state = RngState.capture(torch.device("cpu"))
    first = torch.rand(5)
    after = torch.get_rng_state()
    with state.replay():
        again = torch.rand(5)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), after)  # replay leaves the stream where it was
    assert not torch.equal(torch.rand(5), first)


def test_rng_capture_is_a_snapshot():
    torch.manual_seed(0)
    state = RngState.capture(torch.device("cpu"))
    torch.rand(100)  # moving on must not change the captured state
    with state.replay():
        a = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(a, torch.rand(3))


def test_autocast_state_capture_and_replay():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on = AutocastState.capture(torch.device("cpu"))
    off = AutocastState.capture(torch.device("cpu"))
    lin = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with on.replay():
        assert torch.is_autocast_enabled("cpu")
        assert lin(x).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with off.replay():  # replaying "off" inside an autocast region turns it off
            assert not torch.is_autocast_enabled("cpu")
            assert lin(x).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


def test_stat_tracking_norms_selects_norms_with_running_stats():
    mods = [nn.BatchNorm2d(3), nn.BatchNorm1d(3, track_running_stats=False), nn.LayerNorm(3),
            nn.InstanceNorm2d(3), nn.InstanceNorm2d(3, track_running_stats=True),
            nn.SyncBatchNorm(3), nn.GroupNorm(1, 3)]
    assert stat_tracking_norms(mods) == [mods[0], mods[4], mods[5]]


def _check_frozen(norm, x):
    norm.train()
    before = {k: v.clone() for k, v in norm.named_buffers()}
    with frozen_running_stats([norm]):
        y_frozen = norm(x)
    for k, v in norm.named_buffers():  # nothing moved
        assert torch.equal(v, before[k]), k
    y = norm(x)  # an ordinary train-mode call: same output (batch stats), and it does update
    torch.testing.assert_close(y_frozen, y, rtol=0, atol=0)
    assert not torch.equal(norm.running_mean, before["running_mean"])
    assert norm.track_running_stats and norm.running_mean is not None  # restored


def test_frozen_running_stats_batchnorm():
    bn = nn.BatchNorm2d(3)
    _check_frozen(bn, torch.randn(4, 3, 5, 5) + 2)
    assert bn.num_batches_tracked.item() == 1


def test_frozen_running_stats_instancenorm():
    _check_frozen(nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
                  torch.randn(4, 3, 5, 5) + 2)


def test_frozen_running_stats_eval_mode_untouched():
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(1.0)
    x = torch.randn(2, 3, 4, 4)
    with frozen_running_stats([bn]):
        y = bn(x)  # eval: still the running statistics
    torch.testing.assert_close(y, bn(x), rtol=0, atol=0)
    assert torch.all(bn.running_mean == 1.0)


def test_frozen_running_stats_restores_on_error():
    bn = nn.BatchNorm1d(3)
    try:
        with frozen_running_stats([bn]):
            raise KeyError
    except KeyError:
        pass
    assert bn.track_running_stats
