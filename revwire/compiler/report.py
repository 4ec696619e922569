"""What `rewire` did: chains converted, and what it left alone and why."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List

from .match import Residual
from .trace import scope_of


@dataclass
class ChainInfo:
    name: str  # the stage's attribute name in the rewired model
    blocks: List[str]  # where each residual branch lives: "module.path [first module]"
    block_scopes: List[str]  # the module path each residual add was traced in ("" for the root)
    shape: List[int]  # stream shape at the stage input (example inputs)
    num_blocks: int
    post_activations: int  # `act(x + F(x))` rewired with act moved into the branch
    transitions: int  # layout ops carried across the chain on both streams


@dataclass
class SkippedInfo:
    where: str
    reason: str


@dataclass
class SegmentInfo:
    name: str  # the CheckpointedSegment's attribute name in the rewired model
    scope: str  # the block it runs ("layer2.0"), or its first .. last node at the top level
    shape: List[int]  # its input's shape (example inputs)
    num_nodes: int


@dataclass
class Report:
    model: str
    chains: List[ChainInfo] = field(default_factory=list)
    skipped: List[SkippedInfo] = field(default_factory=list)
    segments: List[SegmentInfo] = field(default_factory=list)  # checkpointed (checkpoint_rest)
    capture: str = "symbolic"  # the front end that captured the model: "symbolic" or "concrete"
    decisions: List[str] = field(default_factory=list)  # concrete capture: where Python read a size
    attention_sites: int = 0  # explicit attentions computed through SDPA (sdpa_attention)

    @property
    def num_blocks(self) -> int:
        return sum(c.num_blocks for c in self.chains)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"revwire report for {self.model}: {len(self.chains)} reversible stage(s), "
                 f"{self.num_blocks} residual blocks"]
        if self.chains:
            rows = [("stage", "blocks", "stream shape", "post-act", "layout", "first .. last block")]
            for c in self.chains:
                span = c.blocks[0] if len(c.blocks) == 1 else f"{c.blocks[0]} .. {c.blocks[-1]}"
                rows.append((c.name, str(c.num_blocks), "x".join(map(str, c.shape)),
                             str(c.post_activations), str(c.transitions), span))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for k, r in enumerate(rows):
                lines.append("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
                if k == 0:
                    lines.append("  " + "  ".join("-" * w for w in widths))
        if self.segments:
            lines.append(f"checkpointed outside the stages ({len(self.segments)}): "
                         + ", ".join(f"{s.name} [{s.scope}]" for s in self.segments))
        if self.attention_sites:
            lines.append(f"attention through F.scaled_dot_product_attention: {self.attention_sites} site(s)")
        if self.capture == "concrete" and self.decisions:
            lines.append("captured with the example inputs' values; Python decided on sizes, checked on every "
                         f"call: {'; '.join(self.decisions[:2])}" + (" ..." if len(self.decisions) > 2 else ""))
        elif self.capture == "concrete":
            lines.append("captured with the example inputs' values (no decision on sizes: any input size)")
        if self.skipped:
            lines.append(f"not converted ({len(self.skipped)}):")
            for s in self.skipped:
                lines.append(f"  {s.where}: {s.reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def block_scope(r: Residual) -> str:
    """The module path a residual add was traced in, e.g. `blocks.3` or `layer1.1`."""
    return scope_of(r.add)


def block_label(r: Residual) -> str:
    """`scope [first module of the branch]`, e.g. `blocks.3 [norm2]` or `layer1.1 [conv1]`."""
    scope = block_scope(r)
    for node in r.add.graph.nodes:
        if node not in r.branch:
            continue
        paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op == "call_module":
            paths.append(node.target)
        inner = [p for p in paths if p.startswith(scope + ".") or (not scope and p)]
        if inner:
            leaf = inner[0][len(scope) + 1:] if scope else inner[0]
            return f"{scope} [{leaf}]" if scope else leaf
    return scope or r.add.name
