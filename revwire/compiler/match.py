"""Step 3: find residual adds in a shape-annotated graph and group them into chains.

A residual add is `add(x, F(x))` whose branch F depends only on x, parameters and
constants, and whose result has x's shape. A chain is a maximal run of residual
adds where each one's result (after an optional post-activation and pure layout
ops) is the next one's skip input and is read by nothing else.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from .shapes import info, metadata_source
from .trace import scope_of

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_LAYOUT_METHODS = {"reshape", "view", "permute", "transpose", "contiguous", "flatten", "unflatten",
                   "roll", "squeeze", "unsqueeze", "movedim", "swapaxes", "swapdims"}
_LAYOUT_FUNCTIONS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.roll,
                     torch.squeeze, torch.unsqueeze, torch.movedim, torch.swapaxes, torch.unflatten}
_ACTIVATION_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.relu6, torch.nn.functional.gelu,
    torch.nn.functional.silu, torch.nn.functional.hardswish, torch.nn.functional.leaky_relu,
    torch.nn.functional.elu, torch.nn.functional.mish, torch.sigmoid, torch.tanh,
    torch.nn.functional.relu_, torch.relu_,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "tanh"}
_NOT_ELEMENTWISE = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU)
# Positions of the arguments an op reads only for their dtype, device or shape, never their
# values: `pos.type_as(x)` does not make `x + pos.type_as(x)` a residual of x.
_METADATA_ARGS_OF_METHODS = {"type_as": (1,), "expand_as": (1,), "view_as": (1,), "reshape_as": (1,),
                             "new_zeros": (0,), "new_ones": (0,), "new_empty": (0,), "new_full": (0,),
                             "new_tensor": (0,)}
_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                   torch.rand_like, torch.randn_like, torch.randint_like}


@dataclass
class Residual:
    """One residual add `out = act?(skip + F(skip))`."""

    add: fx.Node
    skip: fx.Node
    branch_out: fx.Node
    branch: Set[fx.Node]  # nodes computed from skip, up to branch_out
    act: Optional[fx.Node] = None  # a post-activation moved into the branch
    # (reader, value): shape reads of a value inside the branch by a node outside it (a
    # later block); `skip` has that shape too, and the rewriter points them at it
    shape_reads: List[Tuple[fx.Node, fx.Node]] = field(default_factory=list)

    @property
    def out(self) -> fx.Node:
        return self.act if self.act is not None else self.add


@dataclass
class Chain:
    residuals: List[Residual]
    transitions: List[List[fx.Node]]  # layout ops after residual i (len N-1)

    @property
    def input(self) -> fx.Node:
        return self.residuals[0].skip

    @property
    def output(self) -> fx.Node:
        return self.residuals[-1].out

    def owned(self) -> Set[fx.Node]:
        """Nodes that exist only inside the chain and disappear when it is rewired."""
        nodes: Set[fx.Node] = set()
        for r in self.residuals:
            nodes |= r.branch | {r.add, r.out}
        for t in self.transitions:
            nodes |= set(t)
        return nodes


@dataclass
class Skipped:
    where: str
    reason: str


@dataclass
class MatchResult:
    chains: List[Chain] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)


# -- node classification ---------------------------------------------------------------

def same_description(a: fx.Node, b: fx.Node, reader: fx.Node) -> bool:
    """Whether `reader` (a shape, dtype or device read) gives the same for `a` and `b`."""
    attr = reader.args[1] if reader.target is getattr else None
    if attr == "dtype":
        return info(a).dtype == info(b).dtype
    if attr == "device":
        return True  # one chain's values live on one device
    if attr == "ndim" or (reader.op == "call_method" and reader.target == "dim"):
        return len(info(a).shape or ()) == len(info(b).shape or ())
    return info(a).shape == info(b).shape


def _metadata_positions(node: fx.Node) -> Tuple[int, ...]:
    if node.op == "call_method":
        if node.target == "to":  # x.to(other): other's dtype and device
            return tuple(k for k, a in enumerate(node.args) if k > 0 and _is_tensor(a))
        return _METADATA_ARGS_OF_METHODS.get(node.target, ())
    if node.op == "call_function" and node.target in _LIKE_FUNCTIONS:
        return (0,)
    return ()


def metadata_reads(node: fx.Node) -> List[fx.Node]:
    """Tensor inputs `node` reads only for their metadata (`x` in `pos.type_as(x)`)."""
    positions = _metadata_positions(node)
    if not positions:
        return []
    read_for_values: Set[fx.Node] = set()
    others = [a for k, a in enumerate(node.args) if k not in positions] + list(node.kwargs.values())
    fx.node.map_arg(others, read_for_values.add)
    return [node.args[k] for k in positions
            if k < len(node.args) and isinstance(node.args[k], fx.Node) and node.args[k] not in read_for_values]


def data_inputs(node: fx.Node) -> List[fx.Node]:
    """The inputs whose values `node` reads (not shape reads, not `x` in `pos.type_as(x)`)."""
    shape_only = metadata_reads(node)
    return [i for i in node.all_input_nodes if not info(i).is_metadata and i not in shape_only]


def data_users(node: fx.Node) -> List[fx.Node]:
    return [u for u in node.users if not info(u).is_metadata]


def _is_tensor(node) -> bool:
    return isinstance(node, fx.Node) and info(node).is_tensor


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    return None


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise activation of one tensor (so it can move into a branch)."""
    if len(data_inputs(node)) != 1:
        return False
    if node.op == "call_module":
        m = _module(gm, node)
        if isinstance(m, _NOT_ELEMENTWISE):
            return False
        mod = type(m).__module__
        return mod == "torch.nn.modules.activation" or mod.startswith("timm.layers.activations")
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    return False


def is_layout(node: fx.Node) -> bool:
    """A pure layout op (moves elements, computes nothing) of one tensor."""
    ok = (node.op == "call_method" and node.target in _LAYOUT_METHODS) or (
        node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS)
    if not ok or len(data_inputs(node)) != 1 or not _is_tensor(node):
        return False
    src = data_inputs(node)[0]
    return node.args[0] is src and _numel(node) == _numel(src)


def _numel(node: fx.Node) -> int:
    n = 1
    for d in info(node).shape:
        n *= d
    return n


def _mutates_input(gm: fx.GraphModule, node: fx.Node, target: fx.Node) -> bool:
    if not node.args or node.args[0] is not target:
        return False
    if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("__"):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    m = _module(gm, node)
    return m is not None and getattr(m, "inplace", False) is True


def _add_operands(node: fx.Node):
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
            return None
        return node.args
    if node.op == "call_method" and node.target == "add" and len(node.args) == 2:
        if node.kwargs.get("alpha", 1) != 1:
            return None
        return node.args
    return None


# -- residual adds ----------------------------------------------------------------------

class _NotResidual(Exception):
    pass


def _branch_of(gm: fx.GraphModule, skip: fx.Node, out: fx.Node, add: fx.Node,
               order: Dict[fx.Node, int]) -> Tuple[Set[fx.Node], List[Tuple[fx.Node, fx.Node]]]:
    """Nodes of F in `add(skip, F(skip))`, and the shape reads of F's values from outside
    F (see `Residual.shape_reads`); raises _NotResidual with the reason. Reads the graph only.

    F may also read parameters, constants, and values computed before the block (an
    attention mask, a rotary table): those reach the stage as extra inputs.
    """
    ancestors: Set[fx.Node] = set()
    stack = [out]
    reaches_skip = False
    while stack:
        n = stack.pop()
        if n is skip:
            reaches_skip = True
            continue
        if n in ancestors or order[n] < order[skip]:
            continue  # already seen, or computed before the block
        ancestors.add(n)
        # Shape reads are not followed: a shape computed before the block reaches the
        # stage as an argument, one of the block's own values is recomputed with it.
        stack.extend(data_inputs(n))
    if not reaches_skip:
        raise _NotResidual("its branch does not read the skip input")
    # Nodes that read skip's values (or a shape of the branch's own values) form the
    # branch; the rest (constants, values computed before the block or from the skip's
    # shape only) are copied into the block or handed to the stage.
    branch: Set[fx.Node] = set()
    for n in _in_graph_order(ancestors):
        if any(i is skip or i in branch for i in data_inputs(n)) or any(i in branch for i in metadata_reads(n)) or any(
                s in branch for i in n.all_input_nodes if info(i).is_metadata for s in metadata_sources(i)):
            branch.add(n)
    shape_reads = []
    for n in branch:
        if _mutates_input(gm, n, skip):
            raise _NotResidual(f"'{n.name}' in its branch modifies the skip input in place")
        for u in list(n.users):
            if u in branch or u is add or is_dead_pure(u):
                continue
            if info(u).is_metadata and _meta_users_within(u, branch | {add}):
                continue
            if metadata_source(u) is n and same_description(n, skip, u):
                shape_reads.append((u, n))  # a later block reads it: the skip has that shape too
                continue
            raise _NotResidual(f"'{n.name}' inside its branch is also read by '{u.name}' (a tapped value)")
    return branch, shape_reads


def is_dead_pure(node: fx.Node) -> bool:
    """An unused element or shape read (`a, b = torch.split(...)` with `b` unused)."""
    return not node.users and (info(node).is_metadata or (
        node.op == "call_function" and node.target is operator.getitem))


def metadata_sources(node: fx.Node) -> List[fx.Node]:
    """The tensor nodes whose shapes a metadata node is computed from."""
    src = metadata_source(node)
    if src is not None:
        return [src]
    out = []
    for i in node.all_input_nodes:
        out.extend(metadata_sources(i))
    return out


def _meta_users_within(node: fx.Node, allowed: Set[fx.Node]) -> bool:
    return all((u in allowed) or (info(u).is_metadata and _meta_users_within(u, allowed)) for u in node.users)


def where(node: fx.Node) -> str:
    """The module path a node was traced in, and its name: `layer1.0 (add)`."""
    scope = scope_of(node)
    return f"{scope} ({node.name})" if scope else node.name


def _in_graph_order(nodes) -> List[fx.Node]:
    nodes = set(nodes)
    if not nodes:
        return []
    graph = next(iter(nodes)).graph
    return [n for n in graph.nodes if n in nodes]


def find_residuals(gm: fx.GraphModule, post_activation: str, result: MatchResult) -> List[Residual]:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    residuals = []
    for node in gm.graph.nodes:
        operands = _add_operands(node)
        if node.op == "call_method" and node.target == "add_":
            result.skipped.append(Skipped(where(node), "in-place add_ (left as it is)"))
            continue
        if operands is None or not all(_is_tensor(a) for a in operands) or not _is_tensor(node):
            continue
        reasons = []
        for skip, out in (operands, operands[::-1]):
            try:
                residuals.append(_residual(gm, node, skip, out, post_activation, order))
                break
            except _NotResidual as e:
                reasons.append(str(e))
        else:
            reason = _best_reason(operands, reasons)
            if reason is not None:
                result.skipped.append(Skipped(where(node), reason))
    return residuals


def _best_reason(operands, reasons) -> Optional[str]:
    """Why an add that looks like a residual is not one (None: not residual-like at all)."""
    a, b = operands
    if not _share_ancestor(a, b):
        return None  # e.g. `x + pos_embed`: nothing residual about it
    unrelated = ("does not read the skip", "also reads the input")
    informative = [r for r in reasons if not any(u in r for u in unrelated)]
    if informative:
        return "not a residual: " + informative[0]
    if info(a).shape != info(b).shape:
        return "shape change across the block"
    return "projection shortcut: the skip is computed (e.g. downsampled), not the identity"


def _share_ancestor(a: fx.Node, b: fx.Node, depth: int = 40) -> bool:
    def ancestors(n):
        seen, frontier = set(), [n]
        for _ in range(depth):
            frontier = [i for f in frontier for i in f.all_input_nodes
                        if i not in seen and i.op not in ("get_attr",)]
            seen.update(frontier)
            if not frontier:
                break
        return seen | {n}
    return bool(ancestors(a) & ancestors(b))


def _residual(gm, add, skip, out, post_activation, order) -> Residual:
    if info(skip).shape != info(add).shape or info(out).shape != info(add).shape:
        raise _NotResidual("shape change across the block")
    if info(skip).dtype != info(add).dtype:
        raise _NotResidual("the add changes the dtype")
    branch, shape_reads = _branch_of(gm, skip, out, add, order)
    users = data_users(add)
    act = None
    if len(users) == 1 and is_activation(gm, users[0]) and not any(info(u).is_metadata for u in add.users):
        if post_activation != "branch":
            raise _NotResidual("post-activation act(x + F(x)) and post_activation='skip'")
        act = users[0]
    return Residual(add=add, skip=skip, branch_out=out, branch=branch, act=act, shape_reads=shape_reads)


# -- chains -------------------------------------------------------------------------------

def _next_link(r: Residual, by_skip: Dict[fx.Node, Residual]):
    """The residual that continues the chain after `r`, and the layout ops between them."""
    node, layout = r.out, []
    while True:
        nxt = by_skip.get(node)
        if nxt is not None and set(data_users(node)) <= nxt.branch | {nxt.add}:
            return nxt, layout
        users = data_users(node)
        if len(users) == 1 and is_layout(users[0]):
            node = users[0]
            layout.append(node)
            continue
        return None, []


def group_chains(residuals: List[Residual], min_blocks: int, result: MatchResult) -> None:
    by_skip = {r.skip: r for r in residuals}
    links = {}
    for r in residuals:
        nxt, layout = _next_link(r, by_skip)
        if nxt is not None:
            links[r.add] = (nxt, layout)
    has_prev = {nxt.add for nxt, _ in links.values()}
    chains = []
    for r in residuals:
        if r.add in has_prev:
            continue
        chain = Chain([r], [])
        while chain.residuals[-1].add in links:
            nxt, layout = links[chain.residuals[-1].add]
            if any(x is nxt for x in chain.residuals):
                break
            chain.residuals.append(nxt)
            chain.transitions.append(layout)
        chains.append(chain)
    # Nested residuals (a chain inside a branch of another): keep the outer chain.
    chains.sort(key=lambda c: len(c.owned()), reverse=True)
    taken: Set[fx.Node] = set()
    for chain in chains:
        owned = chain.owned()
        if owned & taken:
            result.skipped.append(Skipped(where(chain.output), "nested inside another chain's branch"))
            continue
        if len(chain.residuals) < min_blocks:
            result.skipped.append(Skipped(
                where(chain.output), f"chain too short ({len(chain.residuals)} < min_blocks={min_blocks})"))
            continue
        taken |= owned
        result.chains.append(chain)
    order = {n: i for i, n in enumerate(residuals[0].add.graph.nodes)} if residuals else {}
    result.chains.sort(key=lambda c: order[c.residuals[0].add])


def match(gm: fx.GraphModule, *, min_blocks: int = 2, post_activation: str = "branch") -> MatchResult:
    if post_activation not in ("branch", "skip"):
        raise ValueError(f"post_activation must be 'branch' or 'skip', got {post_activation!r}")
    result = MatchResult()
    residuals = find_residuals(gm, post_activation, result)
    group_chains(residuals, min_blocks, result)
    return result
