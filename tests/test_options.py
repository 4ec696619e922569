"""`RewireOptions`: one record for `rewire`, revwire files and the CLI (docs/design.md §5)."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from revwire.errors import OptionError
from revwire.options import RewireOptions
from revwire.tools.cli import _rewire_options, build_parser

_OTHER = {"int": lambda d, f: d + 1,
          "bool": lambda d, f: not d,
          "choice": lambda d, f: next(c for c in f.metadata["choices"] if c != d),
          "dtype": lambda d, f: torch.float64}


def non_default_options(**code) -> RewireOptions:
    """Every field set to a value other than its default (`code`: values of the classes /
    functions fields; others hold nn.Identity)."""
    values = {}
    for f in dataclasses.fields(RewireOptions):
        kind = f.metadata["kind"]
        values[f.name] = code.get(f.name, (nn.Identity,)) if kind == "code" else _OTHER[kind](f.default, f)
    options = RewireOptions(**values)
    assert all(getattr(options, f.name) != f.default for f in dataclasses.fields(options))
    return options


def test_every_option_round_trips_through_its_file_form():
    options = non_default_options(leaf_modules=(nn.Identity,), autowrap_functions=(torch.nn.functional.gelu,))
    data = json.loads(json.dumps(options.to_dict()))  # what a file holds
    assert RewireOptions.from_dict(data) == options
    assert RewireOptions.from_dict({}) == RewireOptions()


def test_every_field_is_documented():
    for f in dataclasses.fields(RewireOptions):
        assert f.metadata["doc"], f.name


def test_cli_flags_are_the_options_fields():
    flagged = [f for f in dataclasses.fields(RewireOptions) if f.metadata["flag"]]
    argv = ["inspect", "timm:resnet18"]
    for f in flagged:
        kind = f.metadata["kind"]
        value = _OTHER[kind](f.default, f) if kind != "code" else "torch.nn.modules.linear:Identity"
        if kind == "bool":
            argv += [f.metadata["flag"] if value else "--no-" + f.metadata["flag"][2:]]
        else:
            argv += [f.metadata["flag"], str(value).replace("torch.float", "float")]
    args = build_parser().parse_args(argv)
    got = _rewire_options(args)
    for f in flagged:
        assert getattr(got, f.name) != f.default, f.name
    assert _rewire_options(build_parser().parse_args(["inspect", "timm:resnet18"])) == RewireOptions()


@pytest.mark.parametrize("data, field", [
    ({"min_blocks": 0}, "min_blocks"),
    ({"min_blocks": "2"}, "min_blocks"),
    ({"strict": "yes"}, "strict"),
    ({"engine": "fast"}, "engine"),
    ({"stream_dtype": "int8"}, "stream_dtype"),
    ({"stream_dtype": "nonsense"}, "stream_dtype"),
    ({"leaf_modules": "torch.nn:Linear"}, "leaf_modules"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_a_bad_option_names_its_field(data, field):
    with pytest.raises(OptionError, match=field):
        RewireOptions.from_dict(data)


def test_unknown_keyword_lists_the_options():
    with pytest.raises(OptionError, match=r"unknown rewire option\(s\) \['min_block'\].*min_blocks"):
        RewireOptions.from_kwargs(min_block=3)
