"""Model specs: parsing, building, recorded specs, default inputs (issue 4, item 2)."""
import copy
import textwrap

import pytest
import torch
from torch import nn

import revwire
from revwire.tools import specs
from revwire.errors import InputError, SpecError


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's own model file, importable as `revwire_spec_models`."""
    (tmp_path / "revwire_spec_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Residual(nn.Module):
            def __init__(self, width=8, depth=3):
                super().__init__()
                self.blocks = nn.ModuleList(
                    nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth))
                self.head = nn.Linear(width, 2)

            def forward(self, x):
                for b in self.blocks:
                    x = x + b(x)
                return self.head(x)

        def make(width=8, depth=3):
            return Residual(width, depth)

        class WithCfg(Residual):
            pretrained_cfg = {"input_size": (8,)}

        def not_a_model():
            return 42

        NAMESPACE = type("NS", (), {"make": staticmethod(make)})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "revwire_spec_models"


@pytest.mark.parametrize("spec, expected", [
    ("timm:resnet18", ("timm", "resnet18")),
    ("TIMM: vit_tiny_patch16_224.augreg_in21k", ("timm", "vit_tiny_patch16_224.augreg_in21k")),
    ("torchvision:swin3d_t", ("torchvision", "swin3d_t")),
    ("module:pkg.mod:factory", ("module", "pkg.mod:factory")),
])
def test_parse_spec(spec, expected):
    assert specs.parse_spec(spec) == expected


@pytest.mark.parametrize("spec, words", [
    ("resnet18", "timm:NAME"),
    ("keras:resnet18", "unknown kind 'keras'"),
    ("timm:", "name is empty"),
    ("module:pkg.mod", "module:package.module:factory"),
    ("module::factory", "module:package.module:factory"),
])
def test_parse_spec_rejects(spec, words):
    with pytest.raises(SpecError, match=words):
        specs.parse_spec(spec)


def test_parse_model_kwargs():
    kw = specs.parse_model_kwargs(
        ["num_classes=7", "drop_path_rate=0.1", "act_layer=gelu", "img_size=(64, 64)", "global_pool=''",
         "pretrained_strict=false", "x=None"])
    assert kw == {"num_classes": 7, "drop_path_rate": 0.1, "act_layer": "gelu", "img_size": (64, 64),
                  "global_pool": "", "pretrained_strict": False, "x": None}
    for bad in ["num_classes", "=3", "two words=1"]:
        with pytest.raises(SpecError, match="NAME=VALUE"):
            specs.parse_model_kwargs([bad])


def test_parse_input_size():
    assert specs.parse_input_size("3,224,224") == (3, 224, 224)
    assert specs.parse_input_size("3, 16, 112,112") == (3, 16, 112, 112)
    assert specs.parse_input_size("3x64x64") == (3, 64, 64)
    for bad in ["", "3,a,4", "3,x,4", "3,,4", "3,0,4", "3,-1,4"]:
        with pytest.raises(InputError, match="C,H,W"):
            specs.parse_input_size(bad)


def test_build_timm_with_kwargs_records_spec():
    m = revwire.build_model("timm:resnet18", {"num_classes": 7})
    assert m.fc.out_features == 7
    assert m.revwire_spec == {"spec": "timm:resnet18", "model_kwargs": {"num_classes": 7}}
    assert specs.spec_of(m) == m.revwire_spec


def test_unknown_names_suggest_closest():
    with pytest.raises(SpecError, match=r"unknown timm model 'resnet19'.*did you mean .*resnet18"):
        revwire.build_model("timm:resnet19")
    with pytest.raises(SpecError, match=r"unknown torchvision model 'swin3d'.*swin3d_t"):
        revwire.build_model("torchvision:swin3d")
    with pytest.raises(SpecError, match="not a classification or video model"):
        revwire.build_model("torchvision:fasterrcnn_resnet50_fpn")


def test_bad_constructor_argument_is_a_spec_error():
    with pytest.raises(SpecError, match="timm:resnet18"):
        revwire.build_model("timm:resnet18", {"no_such_argument": 1})


def test_module_spec(user_module):
    m = revwire.build_model(f"module:{user_module}:make", {"width": 4, "depth": 2})
    assert isinstance(m, nn.Module) and len(m.blocks) == 2 and m.head.in_features == 4
    assert m.revwire_spec["spec"] == f"module:{user_module}:make"
    m = revwire.build_model(f"module:{user_module}:NAMESPACE.make")  # dotted attribute
    assert len(m.blocks) == 3
    m = revwire.build_model(f"module:{user_module}:Residual")  # a class is a factory too
    assert len(m.blocks) == 3


def test_module_spec_errors(user_module):
    with pytest.raises(SpecError, match="cannot import module 'no_such_pkg_xyz'"):
        revwire.build_model("module:no_such_pkg_xyz:make")
    with pytest.raises(SpecError, match=r"has no attribute 'mak'.*did you mean make"):
        revwire.build_model(f"module:{user_module}:mak")
    with pytest.raises(SpecError, match="returned an object of type int, not an nn.Module"):
        revwire.build_model(f"module:{user_module}:not_a_model")
    with pytest.raises(SpecError, match="--pretrained works for timm: and torchvision:"):
        revwire.build_model(f"module:{user_module}:make", pretrained=True)


def test_default_input_sizes(user_module):
    vit = revwire.build_model("timm:vit_tiny_patch16_224", {"img_size": 64})
    assert specs.default_input_size(vit, "timm:vit_tiny_patch16_224", {"img_size": 64}) == (3, 64, 64)
    r18 = revwire.build_model("timm:resnet18", {"in_chans": 1})
    assert specs.default_input_size(r18, "timm:resnet18", {"in_chans": 1}) == (1, 224, 224)
    assert specs.default_input_size(nn.Identity(), "torchvision:swin3d_t") == (3, 16, 224, 224)
    assert specs.default_input_size(nn.Identity(), "torchvision:r3d_18") == (3, 16, 112, 112)
    assert specs.default_input_size(nn.Identity(), "torchvision:inception_v3") == (3, 299, 299)
    assert specs.default_input_size(nn.Identity(), "torchvision:resnet18") == (3, 224, 224)
    with_cfg = revwire.build_model(f"module:{user_module}:WithCfg")
    assert specs.default_input_size(with_cfg, f"module:{user_module}:WithCfg") == (8,)
    plain = revwire.build_model(f"module:{user_module}:make")
    with pytest.raises(InputError, match="--input-size"):
        specs.default_input_size(plain, f"module:{user_module}:make")


def test_default_input_uses_recorded_spec_and_leaves_global_rng_alone():
    m = revwire.build_model("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})
    state = torch.random.get_rng_state()
    x = revwire.default_input(m, batch=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x, revwire.default_input(m, batch=2))  # seeded: reproducible
    assert revwire.default_input(m, input_size=(3, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(InputError, match="batch"):
        revwire.default_input(m, batch=0)


def test_spec_travels_with_the_model_object(user_module):
    m = revwire.build_model(f"module:{user_module}:make", {"depth": 3})
    rev = revwire.rewire(m, torch.randn(2, 8))
    assert specs.spec_of(rev) == {"spec": f"module:{user_module}:make", "model_kwargs": {"depth": 3}}
    assert specs.spec_of(copy.deepcopy(rev)) == specs.spec_of(rev)
    # A model that merely contains (or shares parameters with) a built model is not that model.
    assert specs.spec_of(nn.Sequential(m, nn.Linear(8, 2))) is None
    rev.__dict__.pop(specs.SPEC_ATTR)
    assert specs.spec_of(rev) is None
    assert specs.spec_of(nn.Linear(2, 2)) is None


def test_fit_input_size():
    fit = specs.fit_input_size
    assert fit("timm:vit_tiny_patch16_224", {}, (3, 64, 64))[0] == {"img_size": 64}
    assert fit("timm:vit_tiny_patch16_224.augreg_in21k", {}, (3, 64, 96))[0] == {"img_size": [64, 96]}
    assert fit("timm:vit_tiny_patch16_224", {"img_size": 32}, (3, 64, 64)) == ({"img_size": 32}, None)
    assert fit("timm:vit_tiny_patch16_224", {}, (3, 224, 224)) == ({}, None)
    assert fit("timm:resnet18", {}, (3, 64, 64)) == ({}, None)  # any size works
    assert fit("torchvision:vit_b_16", {}, (3, 64, 64)) == ({}, None)
    assert fit("timm:vit_tiny_patch16_224", {}, None) == ({}, None)
