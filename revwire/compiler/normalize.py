"""Step 2b: rewrite traced idioms into the ops eager PyTorch would run, before matching.

Tracing can produce a graph that computes the same values as the eager forward but
with a costlier backward. Each pass here fixes one such idiom, on a described graph
(`shapes.propagate` has run), and keeps every node's `NodeInfo` right, except
`readable_asserts`, which runs before propagation so that its messages are readable there too.
"""
from __future__ import annotations

import operator
import re

import torch
from torch import fx
from torch.overrides import handle_torch_function, has_torch_function

from .shapes import describe_derived, info


def unbind_unpacked_tensors(gm: fx.GraphModule) -> int:
    """`q, k, v = t` traces as `t[0], t[1], t[2]`; make it `torch.unbind(t)` again.

    Each `t[k]` is a select whose backward allocates a zero tensor of `t`'s full size and
    writes its gradient into it (three of them for an attention's q, k, v, ~3x the qkv
    activations at the peak of backward); unbind's backward stacks the gradients once.
    Rewritten only where the indices 0..n-1 are each read once and `t.shape[0] == n`.
    Returns the number of tensors rewritten.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        shape = info(node).shape
        if not shape or len(node.users) != shape[0] or shape[0] < 2:
            continue
        users = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2
                   and not u.kwargs and u.args[0] is node and isinstance(u.args[1], int) for u in users):
            continue
        if sorted(u.args[1] for u in users) != list(range(shape[0])):
            continue
        with gm.graph.inserting_after(node):
            parts = gm.graph.call_function(torch.unbind, (node,))
        describe_derived(parts, node)
        for u in users:
            u.replace_input_with(node, parts)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


_PROXY = re.compile(r"Proxy\((\w+)\)")


def assert_with_values(condition, template: str, *values) -> None:
    """`torch._assert(condition, message)` whose message shows values known only at run time.
    Traceable as `torch._assert` is (a GraphModule is re-traced when it is unpickled)."""
    if has_torch_function((condition, *values)):
        return handle_torch_function(assert_with_values, (condition, *values), condition, template, *values)
    if not condition:
        raise AssertionError(template.format(*values))


def readable_asserts(gm: fx.GraphModule) -> int:
    """A traced `assert H == self.img_size[0], f"Input height ({H}) ..."` has its message
    formatted at trace time, with `Proxy(getitem_2)` in place of the size; make the graph
    format it with the value the input has when the assert fails. Returns how many."""
    by_name = {n.name: n for n in gm.graph.nodes}
    rewritten = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert"
                and len(node.args) == 2 and isinstance(node.args[1], str)):
            continue
        message = node.args[1]
        names = _PROXY.findall(message)
        if not names or not all(n in by_name for n in names):
            continue
        template = _PROXY.sub("{}", message.replace("{", "{{").replace("}", "}}"))
        node.target = assert_with_values
        node.args = (node.args[0], template, *(by_name[n] for n in names))
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
