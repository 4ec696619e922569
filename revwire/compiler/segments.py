"""Step 5 (option `checkpoint_rest`): what stays ordinary between the stages runs as
`CheckpointedSegment`s, recomputed in backward instead of stored.

A segment is a run of consecutive nodes of the outer graph traced in one block: a residual
block that joined no chain (`layer2.0`), a top-level child (`patch_embed`, r3d's `stem`),
or the top-level glue between them (ResNet's `conv1 .. maxpool`, `avgpool .. fc`). Its
copy calls the same module objects (as a stage's blocks do), so parameters and
`state_dict()` keys are the original's.
"""
from __future__ import annotations

import operator
from typing import Dict, List, Optional

from torch import fx, nn

from ..runtime.recompute import CheckpointedSegment
from ..runtime.stage import ReversibleStage
from .report import Report, SegmentInfo, SkippedInfo
from .rewrite import read_attributes_live
from .shapes import copy_info, info
from .trace import scope_of

# NOTE [ Segment granularity ]
# A checkpointed segment keeps its input and, in backward, holds its whole recompute at
# once. One segment per block is what `torch.utils.checkpoint` per residual block costs;
# one per top-level leaf module (conv1, bn1, relu, maxpool) would keep every input, as
# plain autograd does. So the key of a node is the first module on its path that is not a
# plain container (Sequential, ModuleList, ModuleDict), and top-level leaf modules and
# top-level functions share one key (""): ResNet's stem is one segment.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _block_key(gm: fx.GraphModule, node: fx.Node) -> str:
    path = node.target if node.op == "call_module" else scope_of(node)
    key, module = "", gm
    for part in path.split(".") if path else []:
        module = getattr(module, part, None)
        key = f"{key}.{part}" if key else part
        if module is None or type(module) not in _CONTAINERS:
            break
    if "." not in key and module is not None and next(module.children(), None) is None:
        return ""  # a top-level leaf module: glue
    return key


def _runs(gm: fx.GraphModule) -> List[List[fx.Node]]:
    """Consecutive outer nodes with one block key; stages, inputs and the output cut runs,
    get_attr nodes belong to no run (every segment reading one copies it)."""
    runs: List[List[fx.Node]] = []
    current: List[fx.Node] = []
    key: Optional[str] = None
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        cut = node.op in ("placeholder", "output") or (
            node.op == "call_module" and isinstance(gm.get_submodule(node.target), ReversibleStage))
        k = None if cut else _block_key(gm, node)
        if current and (cut or k != key):
            runs.append(current)
            current = []
        if not cut:
            current.append(node)
            key = k
    return runs


def _label(gm: fx.GraphModule, run: List[fx.Node]) -> str:
    key = _block_key(gm, run[0])
    if key:
        return key
    names = [n.target if n.op == "call_module" else n.name for n in run]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def _reads_parameter(gm: fx.GraphModule, run: List[fx.Node]) -> bool:
    for node in run:
        if node.op == "call_module" and next(gm.get_submodule(node.target).parameters(), None) is not None:
            return True
        if any(d.op == "get_attr" and isinstance(_attr(gm, d.target), nn.Parameter) for d in node.all_input_nodes):
            return True
    return False


def _attr(gm: fx.GraphModule, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name, None)


def _modifies(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    """Whether `node` may write into `value` in place (a saved input must stay intact)."""
    if not node.args or node.args[0] is not value:
        return False
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return True
    if node.op == "call_module" and getattr(gm.get_submodule(node.target), "inplace", False):
        return True
    return (bool(node.kwargs.get("inplace")) or node.target in _INPLACE_OPERATORS
            or getattr(node.target, "__name__", "").endswith("_"))


def _why_not(gm: fx.GraphModule, run: List[fx.Node]) -> tuple:
    """`(reason, input, output)`: reason is None when the run can be a segment."""
    members = set(run)
    inputs = [d for n in run for d in n.all_input_nodes if d not in members and d.op != "get_attr"]
    inputs = list(dict.fromkeys(inputs))
    outputs = [n for n in run if any(u not in members for u in n.users)]
    if not _reads_parameter(gm, run):
        return "no parameters (nothing worth recomputing)", None, None
    if len(inputs) != 1 or len(outputs) != 1:
        return (f"reads {len(inputs)} values and gives {len(outputs)} to the rest of the model "
                f"(a segment takes one tensor and gives one)"), None, None
    (x,), (y,) = inputs, outputs
    for node, what in ((x, "input"), (y, "output")):
        d = info(node)
        if d.is_metadata or d.shape is None or not (d.dtype is not None and d.dtype.is_floating_point):
            return f"its {what} '{node.name}' is not a floating-point tensor", None, None
    if any(_modifies(gm, n, x) for n in run):
        return f"it modifies its input '{x.name}' in place", None, None
    return None, x, y


def _emit(gm: fx.GraphModule, run: List[fx.Node], x: fx.Node, y: fx.Node, name: str, scope: str) -> None:
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {x: graph.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # a get_attr read by the run: copied
            env[a] = graph.node_copy(a)
        return env[a]

    for node in run:
        env[node] = graph.node_copy(node, arg)
    graph.output(env[y])
    read_attributes_live(graph)
    body = fx.GraphModule(gm, graph, "RevwireSegment")
    gm.add_submodule(name, CheckpointedSegment(body, name, scope))
    with gm.graph.inserting_after(run[-1]):
        call = gm.graph.call_module(name, (x,))
    copy_info(y, call)
    members = set(run)
    y.replace_all_uses_with(call, delete_user_cb=lambda u: u not in members and u is not call)
    for node in reversed(run):
        gm.graph.erase_node(node)


def checkpoint_segments(gm: fx.GraphModule, report: Report) -> None:
    """Emit every run that can be a segment as one `CheckpointedSegment` call, in place,
    and say in `report` which were checkpointed and why the others were not."""
    k = 0
    for run in _runs(gm):
        scope = _label(gm, run)
        reason, x, y = _why_not(gm, run)
        if reason is not None:
            report.skipped.append(SkippedInfo(scope, f"not checkpointed: {reason}"))
            continue
        name = f"revwire_segment{k}"
        _emit(gm, run, x, y, name, scope)
        report.segments.append(SegmentInfo(name, scope, list(info(x).shape), len(run)))
        k += 1
    for node in list(gm.graph.nodes):  # parameters and constants only the segments read now
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
