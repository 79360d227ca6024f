"""Architectures: specs derived by tracing, timm rebuilds, and what tracing cannot know.

Every model's permutation spec comes from its traced computation (:func:`hubmerge.trace.derive`); nothing
here is a hand-written spec. What stays in this package is what tracing cannot tell: hubmerge's own
literature models (registered in timm so hub repos round-trip), the table of families with the tiny
configuration each is tested on (``families.py``), where attention modules keep their head count
(``attention.py``), and where modules keep the width they cut their output to (``widths.py``).
"""

from __future__ import annotations

import json
import os

import timm
import torch
from torch import nn

from hubmerge.errors import UnsupportedModelError
from hubmerge.spec import PermutationSpec
from hubmerge.trace import derive

from .attention import CALLS_LAYERS, HEAD_COUNTS, ROTARY, SIZED_BY_INPUT, wide_forward_matches
from .families import FAMILIES, Family
from .widths import CUT_TO

_SPECS: dict[str, PermutationSpec] = {}


def families() -> dict[str, Family]:
    """The tested families, with the support level the family test measures."""
    return dict(FAMILIES)


def family_of(model: nn.Module) -> str:
    """The family name of a model: the module its class is defined in (``resnet``, ``vision_transformer``)."""
    return type(model).__module__.rpartition(".")[2]


def _input_size(default: tuple[int, ...], model_args: dict) -> tuple[int, int, int]:
    """The (C, H, W) a model built with ``model_args`` takes: timm's default cfg keeps its default size
    when ``in_chans`` or ``img_size`` say otherwise."""
    chans, height, width = default
    size = model_args.get("img_size")
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = size
    return (model_args.get("in_chans", chans), height, width)


def input_size_of(model: nn.Module) -> tuple[int, int, int] | None:
    """The (C, H, W) ``model`` takes: its ``pretrained_cfg['input_size']`` with the ``in_chans`` /
    ``img_size`` of its ``model_args``; None where the cfg names no size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" not in cfg:
        return None
    return _input_size(cfg["input_size"], getattr(model, "model_args", None) or {})


def example_input(model: nn.Module, input_size: tuple[int, ...] | None = None, batch: int = 2) -> torch.Tensor:
    """A fixed random batch at the size given, else the model's own (``pretrained_cfg['input_size']`` with
    the ``in_chans`` / ``img_size`` of its ``model_args``, which timm's default cfg does not follow), in the
    model's dtype and device: what specs are traced with."""
    if input_size is None:
        input_size = input_size_of(model)
        if input_size is None:
            raise UnsupportedModelError(f"{type(model).__name__} has no pretrained_cfg['input_size']: give the "
                                        "input size (C, H, W) to trace it with")
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *input_size, generator=gen, dtype=torch.float64).to(param.device, param.dtype)


def calling_layers(model: nn.Module) -> nn.Module:
    """``model``, with the settings under which its modules call their layers as modules
    (:data:`~hubmerge.arch_specs.attention.CALLS_LAYERS`: the same function), set in place: every model hubmerge
    traces, measures or builds runs so."""
    for module in model.modules():
        for name, value in CALLS_LAYERS.get(type(module), {}).items():
            setattr(module, name, value)
    return model


def spec_for(model: nn.Module, input_size: tuple[int, ...] | None = None) -> PermutationSpec:
    """The permutation spec of ``model``, derived by tracing (cached per architecture, arguments, input size
    and the module classes and state shapes, so a model whose modules were swapped is traced anew); ``model``
    is set to call its layers (:func:`calling_layers`)."""
    calling_layers(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    args = getattr(model, "model_args", None)
    key = None
    if cfg.get("architecture") and args is not None:
        structure = [(n, type(m).__module__, type(m).__qualname__) for n, m in model.named_modules()]
        shapes = [(k, list(t.shape)) for k, t in model.state_dict().items()]
        key = json.dumps([cfg["architecture"], args, list(input_size or cfg.get("input_size") or []), structure,
                          shapes], sort_keys=True, default=str)
        if key in _SPECS:
            return _SPECS[key]
    x = example_input(model, input_size)
    spec = _known_heads(model, derive(model, x, family_of(model), CUT_TO, ROTARY), wide_forward_matches(model, x))
    if key is not None:
        _SPECS[key] = spec
    return spec


def _known_heads(model: nn.Module, spec: PermutationSpec, wide: dict[str, bool]) -> PermutationSpec:
    """The spec, with attention modules whose head count cannot be raised (their class is not in
    :data:`~hubmerge.arch_specs.attention.HEAD_COUNTS`, or its count is not the traced one) kept at their width:
    their heads and their input, which their forward may size its output by; and for attention that does
    (:data:`~hubmerge.arch_specs.attention.SIZED_BY_INPUT`), every group its layers read or write, heads derived
    or not, unless a merged model runs a forward sized by its heads that computes the same (``wide``: per
    module, whether :func:`~hubmerge.arch_specs.attention.wide_forward_matches` found it did)."""
    if spec.partial is not None:
        return spec
    fixed = {}

    def keep(module: str, groups, why: str) -> None:
        inputs = [s.group for layer in spec.layers if layer.name.startswith(f"{module}.") for s in layer.in_axis]
        fixed.update({g: why for g in [*groups, *inputs] if g is not None and g not in fixed})

    for name, module in model.named_modules():
        if type(module) in SIZED_BY_INPUT and not wide.get(name):
            outputs = [s.group for layer in spec.layers if layer.name.startswith(f"{name}.") for s in layer.out_axis]
            why = (" (and hubmerge's forward sized by its heads computes something else for this configuration or "
                   "timm version)" if name in wide else "")
            keep(name, outputs, f"attention {name} ({type(module).__name__}) sizes its output by its input's "
                 f"width{why}")
    whole = set()
    for h in spec.heads:
        module = model.get_submodule(h.module)
        count = HEAD_COUNTS.get(type(module))
        if count is None or getattr(module, count.heads, None) != len(h.heads):
            keep(h.module, h.groups, f"attention {h.module} is a {type(module).__name__}, whose head count hubmerge "
                 "does not know how to raise (arch_specs/attention.py)")
        elif count.head_by_head(module):
            whole.add(h.module)
    spec = spec.with_whole_heads(whole) if whole else spec
    return spec.with_fixed(fixed) if fixed else spec


def _weight_bytes(architecture: str, model_args: dict) -> int | None:
    """Bytes of a model's parameters and buffers, from a copy on the meta device (nothing allocated); None
    for a model whose construction computes values (meta tensors have none), whose size is then not known
    in advance."""
    try:
        with torch.device("meta"):
            shapes = timm.create_model(architecture, pretrained=False, **model_args)
    except (RuntimeError, NotImplementedError):
        return None
    return sum(t.numel() * t.element_size() for t in [*shapes.parameters(), *shapes.buffers()])


def build_model(architecture: str, model_args: dict, pretrained_cfg: dict | None = None) -> nn.Module:
    """Create an untrained model with timm (hubmerge's literature models are registered there); it keeps
    ``model_args`` so the merge can rebuild it. ``pretrained_cfg`` (a repo's stored one) overlays timm's;
    its ``input_size`` follows ``in_chans`` / ``img_size`` of ``model_args``, which a stored cfg written from
    timm's defaults can contradict (a ViT built with ``img_size=32`` takes nothing else)."""
    try:
        need, have = _weight_bytes(architecture, model_args), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need is not None and need > have:  # model_args come from config files: sizes before allocating
            raise UnsupportedModelError(f"{architecture} with model_args {model_args} needs {need / 2**30:.1f} GiB "
                                        f"for its weights, more than this machine's {have / 2**30:.1f} GiB; "
                                        "check the sizes in its config")
        model = timm.create_model(architecture, pretrained=False, **model_args)
        cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **(pretrained_cfg or {})}
        if "input_size" in cfg:  # the size this model takes, which preprocessing and the card read
            cfg["input_size"] = _input_size(cfg["input_size"], model_args)
        model.pretrained_cfg = cfg
    except RuntimeError as exc:  # timm's "Unknown model"
        raise UnsupportedModelError(f"timm does not know the architecture {architecture!r} ({exc})") from exc
    except (TypeError, ValueError) as exc:
        raise UnsupportedModelError(f"{architecture} does not take model_args {model_args}: {exc}") from exc
    model.model_args = dict(model_args)
    return model


@torch.no_grad()
def architecture_of(model: nn.Module) -> tuple[str, dict]:
    """timm architecture name and ``model_args`` that rebuild ``model``.

    ``model_args`` are the model's own (``model.model_args``, which hubmerge sets on every model it loads
    from a timm-format repo's ``config.json``). A model created in Python carries none; then only
    ``num_classes`` is assumed, and the assumption is checked: the rebuilt model, given the same weights,
    must compute the same outputs.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise UnsupportedModelError(
            f"a {type(model).__name__} without pretrained_cfg['architecture']: hubmerge rebuilds merges with "
            "timm.create_model(architecture, **model_args), so give it a timm model")
    args = getattr(model, "model_args", None)
    assumed = args is None
    if assumed:
        args = {"num_classes": model.num_classes} if hasattr(model, "num_classes") else {}
    hint = ("set model.model_args to the keyword arguments you gave timm.create_model" if assumed else
            "its model_args do not rebuild it")
    rebuilt = build_model(name, args).to(next(model.parameters()).dtype)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        raise UnsupportedModelError(f"cannot rebuild this {name} from model_args {args}: {hint}")
    if assumed:
        rebuilt.load_state_dict(model.state_dict())
        rebuilt.eval().to(next(model.parameters()).device)
        x = example_input(model)
        if not torch.equal(rebuilt(x), model.eval()(x)):
            raise UnsupportedModelError(f"{name} rebuilt from model_args {args} computes something else: {hint}")
    return name, dict(args)


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


from . import mlp, resnet, vgg  # noqa: E402,F401  (registers hubmerge's literature models in timm)
