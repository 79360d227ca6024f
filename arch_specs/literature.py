"""Shared plumbing for hubmerge's own literature models (registered in timm so hub repos round-trip)."""

from __future__ import annotations

from torch import nn

# timm's create_model passes these to every entrypoint; our models have no pretrained weights to fetch.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def finish(model: nn.Module, architecture: str, model_args: dict, kwargs: dict, first_conv: str) -> nn.Module:
    """Attach the config timm writes to the hub (``pretrained_cfg``) and the args that rebuild the model."""
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    if kwargs:
        raise TypeError(f"{architecture} got unknown arguments {sorted(kwargs)}")
    chans = model_args["in_chans"]
    size = model_args.get("img_size", 32)
    model.model_args = dict(model_args)
    model.pretrained_cfg = {
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "input_size": (chans, size, size),
        "mean": (0.5,) * chans,
        "std": (0.5,) * chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "first_conv": first_conv,
        "classifier": "head",
        "license": "apache-2.0",
    }
    model.num_classes = model_args["num_classes"]
    # timm's hub writer reads num_features (the classifier's input width) from every model
    model.num_features = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
    return model
