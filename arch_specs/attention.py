"""What tracing cannot know about attention modules: which attributes hold their head count, and which
settings make them call their layers.

A partial merge keeps some heads of each endpoint apart, so the merged attention runs more heads of the same
size; the module's forward reads its head count (and widths derived from it) from attributes, which the
partitioned model sets. Only the classes listed here are known to read them everywhere they matter; other
attention modules take full merges and the spec says why.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    # MaxViT's channels-last attention: its forward sizes heads from num_heads and dim_head and restores its
    # output with (-1) channels, reading q, k, v head by head where head_first; its relative position bias table
    # widens along heads
    AttentionCl: HeadCount("num_heads", whole="head_first"),
}

# attention whose forward reshapes its heads' output to the width of its input (``reshape(B, N, C)``, C read from
# the input): neither its heads nor its input stream can widen, as the two widths would then differ (BEiT, EVA);
# the rest of the model (MLP hidden units) still can
SIZED_BY_INPUT: frozenset[type] = frozenset({BeitAttention, EvaAttention})

# attribute settings under which a module calls its layers as modules, computing the same function: BEiT's and
# EVA's attention otherwise run ``F.linear(x, qkv.weight, bias)`` with a bias of their own, so their qkv layer
# is never called, and neither hooks (statistics, REPAIR, cost) nor a partitioned layer would see it; with the
# bias added after the call instead, it is (the sum is the same up to rounding in the last place)
CALLS_LAYERS: dict[type, dict[str, object]] = {
    BeitAttention: {"qkv_bias_separate": True},
    EvaAttention: {"qkv_bias_separate": True},
}
