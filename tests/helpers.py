"""Build merges of random endpoints through the public pipeline pieces."""

from __future__ import annotations

from functools import lru_cache

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
