"""What tracing cannot know about attention modules: which attributes hold their head count, and which
settings make them call their layers.

A partial merge keeps some heads of each endpoint apart, so the merged attention runs more heads of the same
size; the module's forward reads its head count (and widths derived from it) from attributes, which the
partitioned model sets. Only the classes listed here are known to read them everywhere they matter; other
attention modules take full merges and the spec says why.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import timm.models.eva
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.layers.attention import Attention
from timm.layers.pos_embed_rel import RelPosBias
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.maxxvit import AttentionCl
from timm.models.swin_transformer import WindowAttention
from torch import nn


@dataclass(frozen=True)
class HeadCount:
    """``heads``: the attribute with the number of heads; ``widths``: attributes equal to heads × head dim;
    ``whole``: an attribute that is true where the forward reads its fused projection head by head (q, k and v
    of each head side by side), so more heads are laid out head by head too (the trace of a single head cannot
    tell)."""

    heads: str
    widths: tuple[str, ...] = ()
    whole: str | None = None

    def head_by_head(self, module: nn.Module) -> bool:
        """Whether ``module`` reads its fused projection head by head."""
        return self.whole is not None and bool(getattr(module, self.whole))

    def set(self, module: nn.Module, heads: int) -> None:
        """Make ``module`` run ``heads`` heads of its current size (its relative position bias too)."""
        old = getattr(module, self.heads)
        for name in self.widths:
            setattr(module, name, getattr(module, name) // old * heads)
        setattr(module, self.heads, heads)
        for sub in module.modules():
            if type(sub) in BIAS_SHAPES:
                shape = list(sub.bias_shape)
                shape[BIAS_SHAPES[type(sub)]] = heads
                sub.bias_shape = tuple(shape)


# relative position bias modules that reshape their table by a ``bias_shape`` attribute: the index of its head count
# (the table itself widens along heads with the attention, as Heads.tables says)
BIAS_SHAPES: dict[type, int] = {RelPosBias: -1}


# exact classes: a subclass may compute its shapes differently
HEAD_COUNTS: dict[type, HeadCount] = {
    Attention: HeadCount("num_heads", ("attn_dim",)),  # ViT, DeiT, MobileViT's transformer blocks
    # Swin: its forward sizes heads from num_heads (the window mask too) and reads its relative position bias
    # table whole, which the partitioned model widens along heads (Heads.tables)
    WindowAttention: HeadCount("num_heads"),
    # BEiT: its forward sizes heads from num_heads; a merged model runs beit_forward, sized by its heads, and its
    # relative position bias table widens along heads
    BeitAttention: HeadCount("num_heads"),
    # EVA: as BEiT's, a merged model runs eva_forward; its rotary embedding rotates every head alike, so more
    # heads read the same table
    EvaAttention: HeadCount("num_heads"),
    # MaxViT's channels-last attention: its forward sizes heads from num_heads and dim_head and restores its
    # output with (-1) channels, reading q, k, v head by head where head_first; its relative position bias table
    # widens along heads
    AttentionCl: HeadCount("num_heads", whole="head_first"),
}

# rotary embeddings ``f(x, table, ...)`` the tracer traces whole (module, name as the model's code calls it): they
# pair a head's q/k channels by position, which keep their order (``Group.ordered``) where a trace op by op would
# see slices cutting the head
ROTARY: tuple[tuple[object, str], ...] = ((timm.models.eva, "apply_rot_embed_cat"),)


def beit_forward(self: BeitAttention, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """BEiT's attention, its heads' output sized by its heads (``reshape(B, N, -1)``) instead of by its input's
    width as timm's forward does, so that heads and the stream they read may widen apart. The same function as
    timm's (:func:`wide_forward_matches` checks it on every model traced)."""
    B, N, _ = x.shape
    qkv = self.qkv(x)
    if self.q_bias is not None:
        qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
    q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = self._get_rel_pos_bias() if self.relative_position_bias_table is not None else None
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale,
                                       dropout_p=self.attn_drop.p if self.training else 0.0)
    return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def eva_forward(self: EvaAttention, x: torch.Tensor, rope: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """EVA's attention, its heads' output sized by its heads (``reshape(B, N, -1)``) instead of by its input's
    width as timm's forward does, so that heads and the stream they read may widen apart (the rotary embedding
    rotates every head alike, so more heads read the same table). The same function as timm's
    (:func:`wide_forward_matches` checks it on every model traced)."""
    B, N, _ = x.shape
    gate = self.gate(x).sigmoid() if self.gate is not None else None
    if self.qkv is not None:
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
        npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(v)
                for t in (q, k))
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                                       dropout_p=self.attn_drop.p if self.training else 0.0)
    x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


# attention whose forward reshapes its heads' output to the width of its input (``reshape(B, N, C)``, C read from
# the input): its heads and its input stream can only widen apart where a merged model runs a forward sized by its
# heads instead (WIDE_FORWARDS, the same function: checked against timm's on every model traced); otherwise neither
# can widen, while the rest of the model (MLP hidden units) still can
SIZED_BY_INPUT: frozenset[type] = frozenset({BeitAttention, EvaAttention})
WIDE_FORWARDS: dict[type, Callable[..., torch.Tensor]] = {BeitAttention: beit_forward, EvaAttention: eva_forward}


def run_wide(module: nn.Module) -> None:
    """Make ``module`` (of a merged model) run its forward sized by its heads, where its class has one."""
    forward = WIDE_FORWARDS.get(type(module))
    if forward is not None:
        module.forward = types.MethodType(forward, module)


def wide_forward_matches(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """Per attention module of ``model`` whose class has a forward sized by its heads (:data:`WIDE_FORWARDS`),
    whether that forward computes what the module's own does on the inputs ``model(x)`` gives it (to rounding:
    it attends through ``scaled_dot_product_attention``): a timm release or a configuration whose forward differs
    is caught here, and the module then keeps its width."""
    found: dict[str, bool] = {}

    def check(name: str, module: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        try:  # a variant this forward does not cover may also fail outright: it then does not match either
            wide = WIDE_FORWARDS[type(module)](module, *args, **kwargs)
        except (RuntimeError, AttributeError, TypeError, ValueError):
            found[name] = False
            return
        tol = 1e-10 if out.dtype == torch.float64 else 1e-4
        found[name] = wide.shape == out.shape and bool((wide - out).abs().max() <= tol * out.abs().max())

    hooks = [m.register_forward_hook(functools.partial(check, name), with_kwargs=True)
             for name, m in model.named_modules() if type(m) in WIDE_FORWARDS]
    if hooks:
        try:
            with torch.no_grad():
                model.eval()(x)
        finally:
            for h in hooks:
                h.remove()
    return found

# attribute settings under which a module calls its layers as modules, computing the same function: BEiT's and
# EVA's attention otherwise run ``F.linear(x, qkv.weight, bias)`` with a bias of their own, so their qkv layer
# is never called, and neither hooks (statistics, REPAIR, cost) nor a partitioned layer would see it; with the
# bias added after the call instead, it is (the sum is the same up to rounding in the last place)
CALLS_LAYERS: dict[type, dict[str, object]] = {
    BeitAttention: {"qkv_bias_separate": True},
    EvaAttention: {"qkv_bias_separate": True},
}
