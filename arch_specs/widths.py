"""What tracing cannot know about modules that cut their output to a width: the attribute holding it.

A slice ``out[:, :C]`` that keeps every channel does nothing in the endpoint, but in a partial merge the
channels widen, and C, read from an attribute, would cut them. For the classes listed here the partitioned
model sets that attribute to the merged width; any other slice of channels is a cut, which partial merging
refuses to widen across (``hubmerge inspect`` says where).
"""

from __future__ import annotations

from timm.models.ghostnet import GhostModule

# GhostNet's ghost module concatenates its primary and cheap features (each half of its output) and keeps the
# first out_chs: all of them where out_chs is even, as it is in timm's configurations
CUT_TO: dict[type, str] = {GhostModule: "out_chs"}
