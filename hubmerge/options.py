"""Merge options: one validated model at the boundary, shared by the Python API, the CLI and recipes.

Validation happens before any download or compute, so a bad option costs nothing.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UsageError


class MergeOptions(BaseModel):
    """Every knob of a merge, with the defaults a user gets when saying nothing."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="interpolation factor; 0 = model A, 1 = model B")
    align: Literal["activation", "weight", "zip"] = Field(
        "activation", description="match units by activation correlation (needs data), by weights, or zip "
                                  "them (ZipIt!: correlated units within a model merge too)")
    # measured on eight pairs (examples/zip.py, README "Zip and N-way merges"): tied best mean rank with 0.1,
    # and 6.7 pp better than 0.1 on the pair trained on disjoint classes
    zip_beta: float = Field(
        0.5, ge=0.0, le=1.0, description="zip: share of each model's units that may merge within their own "
                                         "model (0 = the permutation merge)")
    zip_depth: Optional[int] = Field(
        None, ge=0, description="zip: merge the groups the first N layers write (forward order, as hubmerge "
                                "inspect lists them) and keep the later ones apart, each model's own: a partial "
                                "zip (0 = the ensemble); none = every group, or the least depth a budget affords")
    tasks: Literal["auto", "shared", "separate"] = Field(
        "auto", description="the endpoints' classifiers: shared (one task, logits averaged), separate (one "
                            "output per task, side by side), auto (separate where class counts or label names "
                            "differ)")
    # measured on the panel of examples/panel.py (README "Defaults"): with BatchNorm, RESET has the better mean
    # rank by accuracy barrier; without, REPAIR is the only variant
    repair: Optional[Literal["auto", "repair", "reset", "reset_repair"]] = Field(
        "auto", description="renormalise merged units (repair), re-estimate BatchNorm statistics (reset), both "
                            "(reset_repair: reset, then repair the layers no BatchNorm reads), auto "
                            "(reset_repair with BatchNorm, else repair), or none")
    # measured on the panel: better mean rank than shared-only REPAIR for both kinds of model
    repair_unmerged: bool = Field(True, description="also renormalise unmerged units toward their endpoint")
    # measured on the panel: the batch estimator changes no assignment of the conv pairs, and ties elsewhere
    correlation: Literal["pooled", "batch"] = Field(
        "pooled", description="correlation estimate: pooled std of all samples, or per-batch std + 1e-4 "
                              "(REPAIR's and the thesis's code)")
    match_heads: bool = Field(True, description="match each endpoint's attention heads to A's as wholes before "
                                                "their units (by activations, or by weights for weight matching)")
    gamma: Union[float, dict[str, float]] = Field(
        0.0, description="share of units kept apart when no budget: one number, or per group or attention "
                         "module (round(γ·heads) heads kept apart whole) in --config")
    partial: Literal["forced", "adaptive", "topk", "random"] = Field(
        "forced", description="how pairs are chosen to stay apart")
    epsilon: float = Field(0.0, ge=-1.0, le=1.0, description="adaptive buffers: split pairs scoring below this")
    # measured on the panel (examples/panel.py): fill has the better mean rank for both kinds of model;
    # interpolate keeps α=0 ⇒ A exact and is the rule to pick for that property; a partial zip's zipped units
    # read whole blocks kept apart, which fill would add up (N blocks' updates into one residual stream)
    cross: Literal["auto", "interpolate", "fill"] = Field(
        "auto", description="cross blocks of shared rows (interpolate: alpha=0 gives A exactly); auto = fill, "
                            "and interpolate for a zip (its zipped units read each endpoint's later blocks "
                            "weighted, so a model zipped with itself is itself at any depth)")
    budget: Optional[float] = Field(None, ge=0.0, description="relative size increase over one endpoint: 0 = the "
                                    "full merge, 1 = the ensemble of two endpoints (N−1 of N)")
    budget_unit: Literal["params", "flops"] = Field("params", description="what the budget counts")
    # measured (examples/budget.py, three pairs): greedy's barrier is at most a little lower than benefit's
    # (loss, its objective) and not consistently in accuracy, at 5-15x the candidate evaluations
    allocator: Literal["benefit", "greedy", "uniform", "adaptive"] = Field(
        "benefit", description="how the budget is spread over groups")
    score: Literal["auto", "accuracy", "loss", "agreement"] = Field(
        "auto", description="benefit measure; auto = loss with labels, KL to the ensemble without")
    greedy_step: float = Field(0.25, gt=0.0, le=1.0, description="γ step of the greedy allocator")
    seed: int = Field(0, description="seed of data subsets and random choices")
    device: str = Field("cpu", description="cpu, cuda, cuda:N, mps, or auto (cuda when available)")
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    activation_memory: float = Field(
        4.0, gt=0.0, description="GiB of calibration activations REPAIR keeps in memory; more waits in a temporary folder")

    @property
    def activation_bytes(self) -> float:
        return self.activation_memory * 2**30

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", value):
            raise ValueError(f"device must be cpu, cuda, cuda:N, mps or auto, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> MergeOptions:
        gammas = self.gamma.values() if isinstance(self.gamma, dict) else [self.gamma]
        if any(not 0.0 <= g <= 1.0 for g in gammas):
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        if self.align == "zip" and any(gammas):
            raise ValueError("align='zip' keeps units apart by depth only (zip_depth, or the depth a budget "
                             "affords), not by gamma: leave gamma at 0, or use align='activation' for a partial merge")
        if self.zip_depth is not None and self.budget is not None:
            raise ValueError("give zip_depth or a budget, not both: with align='zip' a budget chooses the depth")
        if self.zip_depth is not None and self.align != "zip":
            raise ValueError(f"zip_depth is a depth of zip alignment; it means nothing with align={self.align!r}")
        return self

    def check_budget(self, endpoints: int) -> None:
        """Refuse a budget above what keeping every unit of ``endpoints`` endpoints apart costs (their ensemble,
        N−1 endpoints more than one), which no allocation could spend."""
        if self.budget is not None and self.budget > endpoints - 1:
            raise UsageError(f"budget must be in [0, {endpoints - 1}] for {endpoints} endpoints (0 = full merge, "
                             f"{endpoints - 1} = their ensemble), got {self.budget}")

    @classmethod
    def parse(cls, **values) -> MergeOptions:
        """Validate, turning pydantic's report into one UsageError line per problem."""
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise UsageError(f"invalid merge options: {problems}") from None

    @classmethod
    def combine(cls, options: MergeOptions | None, overrides: dict) -> MergeOptions:
        """``options`` (a ``MergeOptions``, or None for the defaults) with keyword ``overrides`` on top."""
        if options is not None and not isinstance(options, MergeOptions):
            raise UsageError(f"options must be a MergeOptions, got {type(options).__name__}; "
                             "or pass the options as keywords")
        return cls.parse(**{**(options.model_dump(exclude_unset=True) if options else {}), **overrides})

    @property
    def needs_data(self) -> bool:
        """Whether this merge needs calibration data (only weight matching without REPAIR does not)."""
        return self.align in ("activation", "zip") or self.repair is not None or self.budget is not None
