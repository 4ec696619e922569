"""Step 1b (opt-in, `sdpa_attention`; after the trace, before `shapes.propagate`): explicit
attention computed through `F.scaled_dot_product_attention`.

`softmax(q·kᵀ·scale + bias + mask) · v` written out materialises a (windows × heads ×
N × N) matrix several times over and keeps it for backward; neither a reversible stage
nor checkpointing removes it, since every recompute makes it again. A fused SDPA kernel
(CUDA's memory-efficient one) never stores it; on a CPU a mask that needs a gradient (the
bias is a parameter) sends SDPA to its math backend, which does. The values are the same:
SDPA computes that very expression, with the bias and the mask as its additive `attn_mask`.

Rewritten: torchvision's `ShiftedWindowAttention3d` (swin3d), a leaf in revwire's trace
(its forward reads `self.training`). Its call becomes `window_attention_3d(module, x)`,
which runs the same module (the same parameters, its live `training` flag).
"""
from __future__ import annotations

import sys
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

_SWIN3D = "torchvision.models.video.swin_transformer"


@fx.wrap  # a leaf in any later trace, e.g. when a pickled GraphModule is rebuilt
def window_attention_3d(module: nn.Module, x: Tensor) -> Tensor:
    """`ShiftedWindowAttention3d.forward(x)` of `module`, its attention through SDPA."""
    tv = sys.modules[_SWIN3D]
    _, t, h, w, _ = x.shape
    window_size, shift_size = tv._get_window_and_shift_size(
        module.shift_size.copy(), [t, h, w], module.window_size.copy())
    bias = module.get_relative_position_bias(window_size)
    return shifted_window_attention_3d(
        x, module.qkv.weight, module.proj.weight, bias, window_size, module.num_heads, shift_size=shift_size,
        attention_dropout=module.attention_dropout, dropout=module.dropout, qkv_bias=module.qkv.bias,
        proj_bias=module.proj.bias, training=module.training)


def shifted_window_attention_3d(input: Tensor, qkv_weight: Tensor, proj_weight: Tensor,
                                relative_position_bias: Tensor, window_size: List[int], num_heads: int,
                                shift_size: List[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                                qkv_bias: Optional[Tensor] = None, proj_bias: Optional[Tensor] = None,
                                training: bool = True) -> Tensor:
    """torchvision's `shifted_window_attention_3d` (same signature, same values), with
    `softmax(q·kᵀ·scale + bias + mask)·v` as one `F.scaled_dot_product_attention`.

    The shift mask is added to the bias once per window position (nW × heads × N × N), and
    repeated over the batch only for a batch of more than one.
    """
    tv = sys.modules[_SWIN3D]
    b, t, h, w, c = input.shape
    pad_size = tv._compute_pad_size_3d((t, h, w), (window_size[0], window_size[1], window_size[2]))
    x = F.pad(input, (0, 0, 0, pad_size[2], 0, pad_size[1], 0, pad_size[0]))
    _, tp, hp, wp, _ = x.shape
    shifted = sum(shift_size) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1], -shift_size[2]), dims=(1, 2, 3))
    grid = (tp // window_size[0], hp // window_size[1], wp // window_size[2])
    num_windows, n = grid[0] * grid[1] * grid[2], window_size[0] * window_size[1] * window_size[2]
    x = x.view(b, grid[0], window_size[0], grid[1], window_size[1], grid[2], window_size[2], c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * num_windows, n, c)

    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.reshape(b * num_windows, n, 3, num_heads, c // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    # The mask in q's dtype from the start (SDPA casts it to that dtype under autocast):
    # a float32 (nW × heads × N × N) sum would cost twice the bf16 one, made again in recompute.
    mask = relative_position_bias.to(q.dtype)  # (1, heads, N, N): the same for every window
    if shifted:
        # the helper reads only its first argument's dtype and device (new_zeros)
        shift_mask = tv._compute_attention_mask_3d(q.new_empty(0), (tp, hp, wp), tuple(window_size),
                                                   tuple(shift_size))
        mask = mask + shift_mask.unsqueeze(1)  # (nW, heads, N, N)
        if b > 1:
            mask = mask.repeat(b, 1, 1, 1)  # window i of batch element j is row j * nW + i
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                       dropout_p=attention_dropout if training else 0.0,
                                       scale=(c // num_heads) ** -0.5)
    x = x.transpose(1, 2).reshape(b * num_windows, n, c)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)

    x = x.view(b, grid[0], grid[1], grid[2], window_size[0], window_size[1], window_size[2], c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)
    if shifted:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1], shift_size[2]), dims=(1, 2, 3))
    return x[:, :t, :h, :w, :].contiguous()


def is_explicit_attention(module: nn.Module) -> bool:
    """A torchvision `ShiftedWindowAttention3d` whose forward and bias are torchvision's own
    (a subclass that overrides them computes something else, and is left alone)."""
    tv = sys.modules.get(_SWIN3D)  # not imported: no model holds one
    if tv is None or not isinstance(module, tv.ShiftedWindowAttention3d):
        return False
    cls, base = type(module), tv.ShiftedWindowAttention3d
    return cls.forward is base.forward and cls.get_relative_position_bias is base.get_relative_position_bias


def sdpa_attention(gm: fx.GraphModule) -> int:
    """Make every call of an explicit-attention module in `gm.graph` compute its attention
    through `F.scaled_dot_product_attention`; returns the number of calls rewritten.

    Runs before `shapes.propagate`, which describes the new nodes. The module stays
    registered where it is (the same parameters and `state_dict()` keys); the graph reads
    it with a `get_attr` and calls `window_attention_3d` on it.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_explicit_attention(gm.get_submodule(node.target)):
            continue
        (x,) = node.args or (node.kwargs["x"],)  # its forward takes one tensor
        with gm.graph.inserting_before(node):
            module = gm.graph.get_attr(node.target)
            call = gm.graph.call_function(window_attention_3d, (module, x))
        call.meta = dict(node.meta)  # the module stack: block labels and scopes stay as they were
        call.meta["is_wrapped"] = True  # codegen emits wrap(...): rebuilt from code, it stays a call
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
