"""Step 4: replace each chain by one ReversibleStage call whose blocks are its branches.

Each branch F_i (and each layout transition) is copied into a small graph of its
own; the copies call the *same* module objects and read the same parameters, so
the rewired model shares every parameter with the original and keeps its names.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Set

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import RewireError
from ..options import RewireOptions
from ..runtime.stage import ReversibleStage
from .match import Chain, MatchResult, is_dead_pure, metadata_sources, same_description, where
from .report import ChainInfo, Report, SkippedInfo, block_label, block_scope
from .shapes import copy_info, info, metadata_source


class _Unsupported(Exception):
    """The chain cannot be emitted; the message says why (it is reported, not raised)."""


def rewrite(gm: fx.GraphModule, found: MatchResult, options: RewireOptions, model_name: str) -> Report:
    """Replace every chain `match` found by a ReversibleStage `revwire_stage<k>`, in place.

    Chains are emitted last first: emitting a chain replaces its output node, which may be
    the next chain's input; in reverse, no chain ever holds a replaced node. The stages are
    then registered in forward order. Only the model's last stage keeps its last block's
    graph (`keep_last`): an earlier stage would hold it while every later stage runs. With
    `checkpoint_rest` none does: what follows the last stage is recomputed block by block
    too, and the kept graph would be alive beside all of it (r3d_18: 64 MiB more kept).
    """
    report = Report(model_name, skipped=[SkippedInfo(s.where, s.reason) for s in found.skipped])
    for k, chain in reversed(list(enumerate(found.chains))):
        name = f"revwire_stage{k}"
        keep_last = k == len(found.chains) - 1 and not options.checkpoint_rest
        try:
            stage = emit_chain(gm, chain, name, engine=options.engine, stream_dtype=options.stream_dtype,
                               check_finite=options.check_finite, keep_last=keep_last)
        except _Unsupported as e:
            report.skipped.append(SkippedInfo(where(chain.output), f"chain not emitted: {e}"))
            continue
        report.chains.insert(0, ChainInfo(
            name=name,
            blocks=list(stage.names),
            block_scopes=[block_scope(r) for r in chain.residuals],
            shape=list(info(chain.input).shape),
            num_blocks=len(chain.residuals),
            post_activations=sum(r.act is not None for r in chain.residuals),
            transitions=sum(1 for t in chain.transitions if t),
        ))
    for c in report.chains:
        gm._modules[c.name] = gm._modules.pop(c.name)
    return report


def _segments(chain: Chain) -> Dict[fx.Node, int]:
    """Segment index of every stream value of the chain (a segment ends at a transition)."""
    seg, where = 0, {chain.input: 0}
    for i, r in enumerate(chain.residuals):
        if i > 0:
            where[r.skip] = seg
        where[r.add] = where[r.out] = seg
        if i < len(chain.transitions) and chain.transitions[i]:
            seg += 1
            where[chain.transitions[i][-1]] = seg
    return where


def _collect(stream_in: fx.Node, output: fx.Node, segments: Dict[fx.Node, int], internal: Set[fx.Node]):
    """The nodes a block (or transition) needs, its shape reads of stream values, and the
    shapes it reads of values computed before the stage (passed to it as arguments)."""
    needed: Set[fx.Node] = set()
    shape_reads: Set[fx.Node] = set()
    aux: Set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in needed or node is stream_in:
            continue
        needed.add(node)
        for dep in node.all_input_nodes:
            if dep is stream_in:
                continue
            if dep in segments and metadata_source(node) is dep:
                shape_reads.add(node)
            elif dep in segments:
                raise _Unsupported(f"'{node.name}' in a block reads '{dep.name}', another stream value")
            elif info(dep).is_metadata and not (set(metadata_sources(dep)) & internal):
                aux.add(dep)  # a shape computed before the stage
            elif dep in internal or info(dep).is_metadata or info(dep).is_constant:
                stack.append(dep)  # the block's own computation, its shapes, constants: copied
            else:
                aux.add(dep)  # a value computed before the stage (or a forward argument)
    return needed, shape_reads, aux


def build_subgraph(root: fx.GraphModule, segments: Dict[fx.Node, int], stream_in: fx.Node,
                   output: fx.Node, n_segments: int, aux: List[fx.Node], internal: Set[fx.Node], *,
                   act: Optional[fx.Node] = None, add: Optional[fx.Node] = None) -> fx.GraphModule:
    """Copy what `output` (then `act`, in place of `add`) needs into a graph
    `(x, seg0..segK, aux0..auxM) -> out`.

    `x` stands for `stream_in`. A shape read of another stream value of the chain
    (which exists only inside the stage) reads the segment placeholder instead; a shape
    computed before the stage is one of the `aux` arguments.
    """
    needed, shape_reads, _ = _collect(stream_in, output, segments, internal)
    graph = fx.Graph()
    x = graph.placeholder("x")
    segs = [graph.placeholder(f"seg{k}") for k in range(n_segments)]
    env: Dict[fx.Node, fx.Node] = {stream_in: x}
    for j, node in enumerate(aux):
        env[node] = graph.placeholder(f"aux{j}")
    for node in output.graph.nodes:
        if node not in needed:
            continue
        if node in shape_reads:
            src = metadata_source(node)
            # a segment placeholder is a meta tensor: right shape and dtype, not the device
            stand_in = x if node.args[1:2] == ("device",) else segs[segments[src]]
            env[node] = graph.node_copy(node, lambda a: stand_in if a is src else env[a])
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    out = env[output]
    if act is not None:  # post-activation moved into the branch: act(F(x))
        env[add] = out
        relu = _relu_kind(root, act)
        if relu is not None:  # NOTE [ A moved ReLU ]
            out = graph.call_function(branch_relu, (out, relu == "inplace"))
        else:
            out = graph.node_copy(act, lambda a: env[a])
    graph.output(out)
    read_attributes_live(graph)
    return fx.GraphModule(root, graph, "RevwireBlock")


# NOTE [ A moved ReLU ]
# `relu(x + F(x))` becomes `x_i = x_{i-2} + relu(F(x_{i-1}))`. A block whose last norm starts
# at zero (torchvision's `zero_init_residual`, pytorchvideo's default init: each block begins
# as the identity) then has F = 0 and computes relu(0), whose derivative torch takes as 0:
# the norm's weight gets no gradient and never leaves zero. In the original, relu(x + 0)
# passes gradient wherever x > 0. So a moved ReLU is `branch_relu`: the same values, and
# derivative 1 at exactly 0 (a subgradient too), so the zero-initialised block learns and
# still starts as the identity.


class _BranchReLU(torch.autograd.Function):
    """relu(y) that keeps only the mask y >= 0 (one byte per element) for backward; in
    place where the original ReLU was, as the memory of the original block was."""

    @staticmethod
    def forward(ctx, y, inplace: bool):
        mask = y >= 0
        ctx.save_for_backward(mask)
        if inplace:
            ctx.mark_dirty(y)
            return y.clamp_min_(0)
        return y.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None


@fx.wrap
def branch_relu(y, inplace: bool = False):
    """ReLU with derivative 1 at 0: a post-activation moved into a branch (NOTE [ A moved ReLU ])."""
    return _BranchReLU.apply(y, inplace)


def _relu_kind(root: fx.GraphModule, act: fx.Node) -> Optional[str]:
    """"inplace" or "relu" for a ReLU activation node, None for any other."""
    if act.op == "call_module":
        m = root.get_submodule(act.target)
        return None if type(m) is not nn.ReLU else "inplace" if m.inplace else "relu"
    if act.op == "call_function" and act.target in (torch.relu_, F.relu_):
        return "inplace"
    if act.op == "call_function" and act.target in (torch.relu, F.relu):
        return "inplace" if act.kwargs.get("inplace") or act.args[1:2] == (True,) else "relu"
    if act.op == "call_method" and act.target in ("relu", "relu_"):
        return "inplace" if act.target == "relu_" else "relu"
    return None


def read_attributes_live(graph: fx.Graph) -> None:
    """`get_attr("a.b.weight")` becomes `getattr(get_attr("a.b"), "weight")`.

    A GraphModule copies the tensors its get_attr nodes name; a block is not registered
    in the model, so after `model.to(...)` (which replaces buffers) or `.eval()` (a
    module's `training` flag) its copies would be stale. Read through the module instead.
    """
    for node in list(graph.nodes):
        if node.op == "get_attr" and "." in node.target:
            owner, name = node.target.rsplit(".", 1)
            with graph.inserting_before(node):
                live = graph.call_function(getattr, (graph.get_attr(owner), name))
            node.replace_all_uses_with(live)
            graph.erase_node(node)


def _uses_segments(gm: fx.GraphModule) -> bool:
    return any(n.op == "placeholder" and n.name.startswith("seg") and n.users for n in gm.graph.nodes)


def _drop_segment_inputs(gm: fx.GraphModule) -> None:
    for n in list(gm.graph.nodes):
        if n.op == "placeholder" and n.name.startswith("seg"):
            gm.graph.erase_node(n)
    gm.recompile()


def _outer_metadata_fixups(chain: Chain, owned: Set[fx.Node]) -> List[tuple]:
    """Shape reads of chain-internal values by nodes that stay outside the stage.

    Each is re-pointed at the stage input when the shapes agree; otherwise the chain
    cannot be emitted.
    """
    fixes = []
    for node in owned - {chain.output}:  # shape reads of the output read the stage's output
        for user in list(node.users):
            if user in owned or not info(user).is_metadata or metadata_source(user) is not node:
                continue
            if _all_users_within(user, owned):
                continue  # erased with the chain
            if same_description(node, chain.input, user):
                fixes.append((user, node))
            else:
                raise _Unsupported(f"the shape of '{node.name}' (inside the chain) is read by '{user.name}' outside it")
    return fixes


def _all_users_within(node: fx.Node, owned: Set[fx.Node]) -> bool:
    return all(u in owned or (info(u).is_metadata and _all_users_within(u, owned)) for u in node.users)


def emit_chain(gm: fx.GraphModule, chain: Chain, name: str, **stage_options) -> ReversibleStage:
    """Rewrite `gm.graph` in place so that `chain` runs as one ReversibleStage `name`."""
    # Shape reads of a block's values by later blocks read the block's skip instead (same
    # shape, as `match` checked): the later blocks then see a stream value, not another
    # block's internals. Neutral for the graph's meaning, so done even if emitting fails.
    for r in chain.residuals:
        for reader, value in r.shape_reads:
            reader.replace_input_with(value, r.skip)
    owned = chain.owned()
    segments = _segments(chain)
    fixes = _outer_metadata_fixups(chain, owned)
    internal = owned | set(segments)
    parts = []  # (stream in, output, segments it sees, act, add) of every block and transition
    for i, r in enumerate(chain.residuals):
        k = segments[r.add] + 1
        parts.append((r.skip, r.branch_out, k, r.act, r.add))
        if i < len(chain.transitions) and chain.transitions[i]:
            parts.append((r.out, chain.transitions[i][-1], k, None, None))
    aux: Set[fx.Node] = set()
    for stream_in, output, *_ in parts:
        aux |= _collect(stream_in, output, segments, internal)[2]
    aux_nodes = [n for n in gm.graph.nodes if n in aux]
    built = {(p[0], p[1]): build_subgraph(gm, segments, p[0], p[1], p[2], aux_nodes, internal,
                                          act=p[3], add=p[4]) for p in parts}
    blocks = [built[(r.skip, r.branch_out)] for r in chain.residuals]
    names = [block_label(r) for r in chain.residuals]
    transitions = [built[(r.out, t[-1])] if t else None
                   for r, t in zip(chain.residuals, chain.transitions)]
    subgraphs = blocks + [t for t in transitions if t is not None]
    shape_context = any(_uses_segments(g) for g in subgraphs)
    if not shape_context:
        for g in subgraphs:
            _drop_segment_inputs(g)
    stage = ReversibleStage(blocks, transitions, register_blocks=False, names=names, name=name,
                            shape_context=shape_context, **stage_options)

    # Mutate the outer graph only now that nothing above can fail.
    gm.add_submodule(name, stage)
    graph = gm.graph
    for user, node in fixes:
        user.replace_input_with(node, chain.input)
    with graph.inserting_after(chain.output):
        call = graph.call_module(name, (chain.input, *aux_nodes))
    copy_info(chain.output, call)
    chain.output.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call and u not in owned)
    _erase(graph, owned)
    return stage


def _erase(graph: fx.Graph, owned: Set[fx.Node]) -> None:
    """Erase the chain's nodes, then the shape reads and constants only they used (the
    blocks compute their own copies)."""
    for node in reversed([n for n in graph.nodes if n in owned]):
        for user in list(node.users):
            if user not in owned:
                _erase_pure_tree(graph, user)
        graph.erase_node(node)
    changed = True
    while changed:  # parameters and constants that only the chain read
        changed = False
        for node in reversed(list(graph.nodes)):
            if not node.users and (info(node).is_constant or info(node).is_metadata):
                graph.erase_node(node)
                changed = True


def _erase_pure_tree(graph: fx.Graph, node: fx.Node) -> None:
    if node._erased:  # reached twice (shape arithmetic that reads two of the chain's values)
        return
    for user in list(node.users):
        _erase_pure_tree(graph, user)
    if not (info(node).is_metadata or is_dead_pure(node)):
        raise RewireError(f"revwire internal error: '{node.name}' still reads a rewired value")
    graph.erase_node(node)
