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
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.swin_transformer import WindowAttention
from torch import nn


@dataclass(frozen=True)
class HeadCount:
    """``heads``: the attribute with the number of heads; ``widths``: attributes equal to heads × head dim."""

    heads: str
    widths: tuple[str, ...] = ()

    def set(self, module: nn.Module, heads: int) -> None:
        """Make ``module`` run ``heads`` heads of its current size."""
        old = getattr(module, self.heads)
        for name in self.widths:
            setattr(module, name, getattr(module, name) // old * heads)
        setattr(module, self.heads, heads)


# exact classes: a subclass may compute its shapes differently
HEAD_COUNTS: dict[type, HeadCount] = {
    Attention: HeadCount("num_heads", ("attn_dim",)),  # ViT, DeiT, MobileViT's transformer blocks
    # Swin: its forward sizes heads from num_heads (the window mask too) and reads its relative position bias
    # table whole, which the partitioned model widens along heads (Heads.tables)
    WindowAttention: HeadCount("num_heads"),
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
