"""Presets, overrides and their validation."""
import _tal_path  # noqa: F401  (examples/tal on sys.path)
import pytest

from configs import PRESETS, Config, apply_override, get_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    cfg = get_config(name, ["data.annotations='gt.json'", "data.media_root='frames'"] if name != "tiny" else [])
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_gpu_presets_follow_the_issue():
    th = get_config("thumos14", ["data.annotations='a'", "data.media_root='m'"])
    assert th.data.window >= 512 and th.data.crop == 224
    assert (th.model.embed_dim, th.model.depths) == (96, (2, 2, 6, 2))           # swin3d_t
    assert th.eval.tious == (0.3, 0.7, 5) and th.data.test_subset == "test"
    an = get_config("anet", ["data.annotations='a'", "data.media_root='m'"])
    assert an.data.fixed_length and an.eval.tious == (0.5, 0.95, 10)


def test_overrides():
    cfg = get_config("tiny", ["train.epochs=3", "model.depths=[2, 4]", "model.num_heads=(2, 4)", "train.lr=1",
                              "data.synthetic.seed=7", "model.engine=checkpoint"])
    assert cfg.train.epochs == 3 and cfg.model.depths == (2, 4) and cfg.train.lr == 1.0
    assert cfg.data.synthetic.seed == 7 and cfg.model.engine == "checkpoint"


@pytest.mark.parametrize("item, message", [
    ("train.epochs", "must look like section.key=value"),
    ("train.nope=1", "unknown key 'train.nope'"),
    ("nope.epochs=1", "not a config section"),
    ("train.epochs='many'", "must be of type int"),
    ("data.flip=1", "needs True or False"),
])
def test_bad_overrides(item, message):
    with pytest.raises(ValueError, match=message):
        apply_override(get_config("tiny"), item)


@pytest.mark.parametrize("overrides, message", [
    (["model.engine='fast'"], "choose one of"),
    (["model.num_heads=(2,)"], "same length"),
    (["model.pyramid_levels=4"], "one \\(low, high\\) range per level"),
    (["data.window=60"], "must be a multiple"),
    (["data.crop=64"], "larger than data.resize"),
    (["data.source='files'"], "needs --annotations"),
])
def test_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", overrides)
    with pytest.raises(ValueError, match="unknown config"):
        get_config("kinetics")
