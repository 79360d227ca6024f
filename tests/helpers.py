"""Build merges of random endpoints through the public pipeline pieces."""

from __future__ import annotations

from functools import lru_cache

import torch

from hubmerge.api import Prepared
from hubmerge.options import MergeOptions

from conftest import labelled, make


def prepared(case: str, **options) -> Prepared:
    """A prepared random pair; shared across tests (building never mutates it), since statistics and
    alignment of the wide timm VGG take seconds."""
    return _prepared(case, tuple(sorted(options.items())))


@lru_cache(maxsize=None)
def _prepared(case: str, options: tuple) -> Prepared:
    a, b = make(case, 1), make(case, 2)
    return Prepared(a, b, labelled(case), MergeOptions.parse(**dict(options)))


def first_block_features(*models: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each test MLP's activations after its first block on ``x`` (the features of group ``blocks.0.fc``),
    the reference the statistics pass is checked against."""
    feats = []
    hooks = [m.blocks[0].act.register_forward_hook(lambda _m, _i, out: feats.append(out)) for m in models]
    try:
        for m in models:
            m(x)
    finally:
        for h in hooks:
            h.remove()
    return feats
