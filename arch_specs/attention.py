"""What tracing cannot know about attention modules: which attributes hold their head count.

A partial merge keeps some heads of each endpoint apart, so the merged attention runs more heads of the same
size; the module's forward reads its head count (and widths derived from it) from attributes, which the
partitioned model sets. Only the classes listed here are known to read them everywhere they matter; other
attention modules take full merges and the spec says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers.attention import Attention
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
