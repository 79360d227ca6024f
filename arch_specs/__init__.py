"""Architecture adapters, registered by family name.

An adapter turns a model instance into a :class:`~hubmerge.spec.PermutationSpec` and tells how to rebuild
the same architecture with timm (name + ``model_args``). Adding an architecture means adding one module
here that defines an adapter and calls :func:`register_adapter`; importing this package registers all of
them, and with them hubmerge's own literature models in timm's registry.
"""

from __future__ import annotations

from typing import Protocol

import timm
import torch
from torch import nn

from hubmerge.errors import UnsupportedModelError
from hubmerge.spec import PermutationSpec


class Adapter(Protocol):
    """What every architecture family provides."""

    family: str
    description: str

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter describes ``model``."""

    def spec(self, model: nn.Module) -> PermutationSpec:
        """The permutation spec of ``model`` (groups and layers in forward order)."""

    def model_args(self, model: nn.Module) -> dict:
        """timm ``model_args`` that rebuild ``model``'s shapes from its architecture name."""


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> Adapter:
    """Add an adapter under its family name (a later registration of the same family replaces it)."""
    _ADAPTERS[adapter.family] = adapter
    return adapter


def families() -> dict[str, str]:
    """Supported families and what each covers."""
    return {name: a.description for name, a in _ADAPTERS.items()}


def _unsupported(what: str) -> UnsupportedModelError:
    names = ", ".join(f"{k} ({v})" for k, v in families().items())
    return UnsupportedModelError(
        f"no hubmerge adapter for {what}. Supported families: {names}. To add one, write a module in "
        "hubmerge/arch_specs/ that builds a PermutationSpec and calls register_adapter()."
    )


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter that describes ``model``, or a clear error naming the supported families."""
    for adapter in _ADAPTERS.values():
        if adapter.matches(model):
            return adapter
    raise _unsupported(f"model class {type(model).__name__}")


def spec_for(model: nn.Module) -> PermutationSpec:
    """The validated permutation spec of ``model``."""
    spec = adapter_for(model).spec(model)
    spec.validate(model)
    return spec


def architecture_of(model: nn.Module) -> tuple[str, dict]:
    """timm architecture name and ``model_args`` that rebuild ``model`` (checked by rebuilding it)."""
    adapter = adapter_for(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise _unsupported(f"a {type(model).__name__} without pretrained_cfg['architecture']")
    args = adapter.model_args(model)
    rebuilt = build_model(name, args)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        raise UnsupportedModelError(
            f"cannot rebuild this {name} from model_args {args}: its shapes differ from timm's construction"
        )
    return name, args


def build_model(architecture: str, model_args: dict) -> nn.Module:
    """Create an untrained model with timm (hubmerge's literature models are registered there)."""
    try:
        model = timm.create_model(architecture, pretrained=False, **model_args)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise _unsupported(f"architecture {architecture!r} ({exc})") from exc
    adapter_for(model)
    return model


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and norm statistic random values (for invariance tests and demos).

    Fresh timm models zero-initialise some norms (zero_init_last) and have unit running statistics, which
    would make permutation tests vacuous; this makes every unit distinct.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() > 1:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model


from . import mlp, resnet, vgg  # noqa: E402,F401  (registers the families)
