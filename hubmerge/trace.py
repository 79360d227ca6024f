"""Spec derivation by tracing (method §10): which parameter axes hold which units, read off the model's
own computation instead of a hand-written adapter.

One forward pass of a real example input runs under a :class:`torch.overrides.TorchFunctionMode`, which
sees every torch operation, also inside modules that timm keeps opaque to ``torch.fx`` (``NormFreeBlock``,
``MobileVitBlock``, ``BatchNormAct2d``) and without fx's control-flow limits (no train-mode tracing).
Every tensor carries *factors*: integer arrays broadcastable to its shape whose entries name the unit each
position belongs to (0 = no unit). A parameter gets fresh ids along each of its dims the first time it is
used; each op then either passes ids through, creates none, or *ties* ids (a residual add ties the two
streams, a conv ties its weight's input axis to the channels it reads, attention ties q to k within a head),
and records *labels* where an op treats units unequally (a slice takes some channels, a grouped conv or an
attention head keeps its block apart). Connected components of the ties are units; units that appear in
the same parameters with the same labels are interchangeable and form one group. Anything tied to a fixed
quantity (the image channels, the logits, a positional table indexed by channel) is never permuted.

An op the tracer does not know, applied to a tensor that carries units, is an error naming the op and the
module: a wrong spec would silently break the merge.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from timm.layers import Conv2dSame, Linear as TimmLinear, ScaledStdConv2d, ScaledStdConv2dSame
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import UnsupportedModelError
from .spec import Across, Axis, Group, Heads, Layer, Norm, Output, PermutationSpec, Point, Segment, Vector, Width

Factor = np.ndarray  # int64, same ndim as its tensor, each dim of size 1 or the tensor's size

UNARY = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "hardswish", "hardswish_",
    "hardsigmoid", "hardsigmoid_", "hardtanh", "hardtanh_", "relu6", "tanh", "tanh_", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "selu", "celu", "mish", "softplus", "erf", "exp", "log", "sqrt", "rsqrt", "reciprocal",
    "neg", "__neg__", "abs", "sign", "square", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max",
    "dropout", "dropout1d", "dropout2d", "alpha_dropout", "clone", "contiguous", "to", "type_as", "float",
    "double", "half", "bfloat16", "detach", "requires_grad_", "pow", "__pow__", "cpu", "cuda",
}
BINARY = {
    "add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__", "__rsub__",
    "mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__", "__itruediv__",
    "__rtruediv__", "maximum", "minimum", "where", "lerp", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__",
    "__lt__", "__le__", "__gt__", "__ge__", "addcmul", "addcdiv",
}
SPATIAL = {  # ops that act on spatial dims only and pass channels through
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "interpolate", "upsample",
    "upsample_nearest", "upsample_bilinear", "_max_pool2d", "max_pool2d_with_indices", "boolean_dispatch",
}
RESHAPE = {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "reshape_as", "view_as", "squeeze_",
           "unsqueeze_", "ravel"}
REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "max", "min", "prod"}
META = {"__get__", "dim", "size", "numel", "__len__", "_assert", "is_floating_point", "element_size", "stride",
        "get_device", "is_contiguous", "__format__", "__bool__", "item", "tolist", "__repr__", "__hash__",
        "data_ptr", "__index__", "__int__", "__float__"}


@dataclass
class Trace:
    """Raw result of tracing one model: unit classes per parameter axis, observation points, layers."""

    param_classes: dict[str, list[np.ndarray | None]]  # per param, per dim: class per position, or None
    points: dict[tuple[str, int], np.ndarray]  # (module, dim) → class per position of its output along dim
    point_kind: dict[str, str]  # module → "act" / "norm" / "weight"
    layers: list[tuple[str, str, str]]  # (module, kind, bias) of conv/linear ops with a module's own weight
    norms: list[tuple[str, str, str]]  # (norm module, kind, input producer module) for batch/layer norms
    mixing: dict[int, set[str]]  # class → kinds of ops that normalise across units (layer_norm, softmax, …)
    mixers: dict[int, list[tuple[str, str]]]  # class → (op, module) of every op that mixes its units
    # module → (dim, class per position there) for modules called once whose output holds the units
    # of their input on the same dim and inside which units are mixed: candidates for a partitioned norm
    norm_views: dict[str, tuple[int, np.ndarray]]
    labels: dict[int, frozenset]  # class → labels of ops that treat it unequally
    members: dict[int, tuple]  # class → sorted (param, dim, count) where it appears
    # (module, per head (q/k, v) classes, per-head tables: (param, dim) of the bias its scores add, head by head)
    attention: list[tuple[str, list[tuple[np.ndarray, np.ndarray]], tuple[tuple[str, int], ...]]]
    calls: dict[str, int]  # module → times it was called
    cut: set[int]  # classes on a dim some op indexed at constant positions
    # non-persistent all-zero 1-D buffers (BEiT's and EVA's k bias between trained q and v biases) → class per
    # entry: zeros are unchanged by any permutation, so their entries take the units they meet
    zeros: dict[str, np.ndarray] = field(default_factory=dict)
    kept: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (module, classes) of slices keeping a dim
    chunks: list[tuple[set[int], list[np.ndarray]]] = field(default_factory=list)  # (classes cut, of each piece)
    values: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (module, classes) of attention values
    # convs whose forward computes the weight it convolves with from their own (other than STANDARDISED ones)
    computed: set[str] = field(default_factory=set)
    # (module, input dim, classes there) of linear layers applied along another dim than the units of that one
    across: list[tuple[str, int, np.ndarray]] = field(default_factory=list)
    # classes a rotary embedding rotates (EVA's q/k dims): it pairs them by position, so they keep their order
    pinned: set[int] = field(default_factory=set)


class _Ids:
    """Fresh unit ids, the ties between them, and labels."""

    def __init__(self):
        self.next = 1
        self.tie_a: list[np.ndarray] = []
        self.tie_b: list[np.ndarray] = []
        self.label_ids: list[np.ndarray] = []
        self.label_vals: list[object] = []
        self.cuts: list[np.ndarray] = []  # ids on a dim indexed by constant positions (a slice, a split)
        self.mixing: list[tuple[np.ndarray, str, str]] = []  # (ids, op kind, module)
        self.ops = itertools.count()

    def fresh(self, n: int) -> np.ndarray:
        out = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        return out

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(a, b)
        self.tie_a.append(a.ravel().copy())
        self.tie_b.append(b.ravel().copy())

    def fix(self, ids: np.ndarray) -> None:
        """Tie units to the fixed quantity (id 0): they are never permuted."""
        self.tie(ids, np.zeros(1, np.int64))

    def join(self, ids: np.ndarray, other: np.ndarray | None) -> None:
        """Tie ``ids`` to ``other``; None there means fixed positions (the image channels), which fix them."""
        if other is None:
            self.fix(ids)
        else:
            self.tie(ids, other)

    def label(self, ids: np.ndarray, value: object) -> None:
        ids = np.unique(ids[ids > 0])
        if len(ids):
            self.label_ids.append(ids)
            self.label_vals.append(value)

    def classes(self, fixing: bool = True) -> np.ndarray:
        """class[id] for every id (0 = fixed): connected components of the ties, with 0's component fixed;
        without ``fixing``, of the ties between ids only (what is tied to what, fixed or not)."""
        n = self.next
        a = np.concatenate(self.tie_a) if self.tie_a else np.zeros(0, np.int64)
        b = np.concatenate(self.tie_b) if self.tie_b else np.zeros(0, np.int64)
        if not fixing:
            a, b = a[(a > 0) & (b > 0)], b[(a > 0) & (b > 0)]
        graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        # renumber by each component's smallest id: id 0 (fixed) comes first, so its component is class 0
        uniq, first = np.unique(comp, return_index=True)
        rank = np.empty(len(uniq), np.int64)
        rank[np.argsort(first)] = np.arange(len(uniq))
        return rank[np.searchsorted(uniq, comp)]


def _compress(f: np.ndarray) -> np.ndarray:
    """Shrink every dim along which the ids do not vary to size 1."""
    for d in range(f.ndim):
        if f.shape[d] > 1 and (f == f.take([0], axis=d)).all():
            f = f.take([0], axis=d)
    return f


def _support(f: np.ndarray) -> tuple[int, ...]:
    return tuple(d for d in range(f.ndim) if f.shape[d] > 1)


def _align(f: np.ndarray, ndim: int) -> np.ndarray:
    """Prepend size-1 dims so ``f`` broadcasts like a tensor of ``ndim`` dims."""
    return f.reshape((1,) * (ndim - f.ndim) + f.shape)


class TraceError(UnsupportedModelError):
    """The model uses an op on units that the tracer cannot describe exactly."""


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _varies(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Whether the values of a unit-less operand differ along any of ``dims`` (aligned to its own dims)."""
    for d in dims:
        if d < 0 or t.shape[d] == 1:
            continue
        if not bool((t == t.narrow(d, 0, 1)).all()):
            return True
    return False


def _dims(arg, ndim: int) -> tuple[int, ...]:
    if arg is None:
        return tuple(range(ndim))
    if isinstance(arg, int):
        arg = (arg,)
    return tuple(sorted(d % ndim for d in arg))


def _cut_dims(index, ndim: int) -> set[int]:
    """Dims that ``x[index]`` indexes at constant positions (anything but ``:``); every dim where the index
    is not a plain tuple of ints, slices, None and Ellipsis."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index):
        return set(range(ndim))
    consumed = [i for i in index if i is not None and i is not Ellipsis]
    dims, d = set(), 0
    for i in index:
        if i is Ellipsis:
            d += ndim - len(consumed)
        elif i is not None:
            if not (isinstance(i, slice) and i == slice(None)):
                dims.add(d)
            d += 1
    return dims


def _name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    if name == "fn" and "boolean_dispatch" in getattr(func, "__qualname__", ""):
        return "boolean_dispatch"
    return name


class _Mode(TorchFunctionMode):
    """Propagates unit ids through every torch op of one forward pass."""

    def __init__(self, tracer: _Tracer):
        super().__init__()
        self.t = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.t.paused:  # inside a function the tracer knows whole (a rotary embedding)
            self.t.op(func, args, kwargs, out)
        return out


class _Tracer:
    def __init__(self, model: nn.Module):
        self.ids = _Ids()
        self.model = model
        self.units: dict[int, list[Factor]] = {}  # id(tensor) → factors
        self.keep: list[torch.Tensor] = []  # keeps traced tensors alive so their id() stays unique
        # state tensors only: a non-persistent buffer (a cached rotary table, say) is a constant, which the
        # permutation must not be allowed to move past
        state = set(model.state_dict())
        self.param_names = {id(p): n for n, p in model.named_parameters() if n in state}
        self.param_names.update({id(b): n for n, b in model.named_buffers() if n in state and b.is_floating_point()})
        # except an all-zero vector, which any permutation leaves as it is: its entries get units of their own
        self.zero_names = {id(b): n for n, b in model.named_buffers() if n not in state and b.is_floating_point()
                           and b.dim() == 1 and len(b) > 1 and not b.any()}
        self.zero_ids: dict[str, np.ndarray] = {}
        self.kept: list[tuple[str, np.ndarray]] = []  # (module, ids) of a unit dim indexed whole at constant positions
        self.chunks: list[tuple[list[np.ndarray], list[np.ndarray]]] = []  # (ids cut, ids of each piece) of chunks
        self.values: list[tuple[str, np.ndarray]] = []  # (module, ids) of every attention's values
        self.param_ids: dict[str, list[np.ndarray | None]] = {}
        self.module_names = {m: n for n, m in model.named_modules()}
        self.modules = dict(model.named_modules())
        self.computed: set[str] = set()  # convs convolving with a weight computed from their own (StdConv2d)
        self.across: list[tuple[str, int, np.ndarray]] = []  # (module, input dim, ids) of units a linear passes by
        self.stack: list[str] = []
        self.points: dict[str, list[Factor]] = {}
        self.point_kind: dict[str, str] = {}
        self.layers: list[tuple[str, str, str]] = []
        self.norms: list[tuple[str, str, str]] = []
        self.producer: dict[int, str] = {}  # id(tensor) → module whose conv/linear op made it
        self.inputs: dict[str, torch.Tensor] = {}  # module → its first tensor input (of its last call)
        self.calls: dict[str, int] = defaultdict(int)
        self.views: dict[str, tuple[int, np.ndarray]] = {}  # module → (input dim, ids) of units it mixes
        self.view_out: dict[str, np.ndarray] = {}  # module → ids on that dim of its output
        # (module, per head (q/k ids, v ids), ids along the heads of its bias or None) of every
        # scaled_dot_product_attention whose bias, if any, varies over heads only through its units
        self.attention: list[tuple[str, list[tuple[np.ndarray, np.ndarray]], np.ndarray | None]] = []
        self.pinned: list[np.ndarray] = []  # ids a rotary embedding rotated
        self.paused = 0

    # --- bookkeeping -------------------------------------------------------------------------------
    def where(self) -> str:
        return self.stack[-1] if self.stack else "<model>"

    def fail(self, what: str) -> TraceError:
        return TraceError(f"cannot derive a permutation spec: {what} in module {self.where()!r} "
                          f"({type(self.model).__name__}); hubmerge refuses rather than guess a wrong spec")

    def get(self, t) -> list[Factor]:
        if not isinstance(t, torch.Tensor):
            return []
        zero = self.zero_names.get(id(t))
        if zero is not None and id(t) not in self.units:
            self.zero_ids[zero] = self.ids.fresh(len(t))
            self.set(t, [self.zero_ids[zero]])
        name = self.param_names.get(id(t))
        if name is not None and id(t) not in self.units:
            per_dim = []
            factors = []
            for d, n in enumerate(t.shape):
                if n > 1:
                    ids = self.ids.fresh(n)
                    shape = [1] * t.dim()
                    shape[d] = n
                    factors.append(ids.reshape(shape))
                    per_dim.append(ids)
                else:
                    per_dim.append(None)
            self.param_ids[name] = per_dim
            self.set(t, factors)
        return self.units.get(id(t), [])

    def set(self, t, factors: list[Factor]) -> None:
        if isinstance(t, torch.Tensor):
            factors = [_compress(_align(f, t.dim())) for f in factors]
            factors = [f for f in factors if (f > 0).any()]
            self.units[id(t)] = factors
            self.keep.append(t)

    def factor_on(self, t: torch.Tensor, dim: int) -> np.ndarray | None:
        """The ids along ``dim`` of ``t`` as a vector; an error if the units along it depend on other dims."""
        dim %= t.dim()
        found = [f for f in self.get(t) if f.shape[dim] > 1]
        if not found:
            return None
        if len(found) > 1 or _support(found[0]) != (dim,):
            raise self.fail(f"units along dim {dim} that vary with other dims (shape {tuple(t.shape)})")
        return found[0].reshape(-1)

    def rotary(self, fn):
        """``fn(x, table, ...)``, a rotary embedding, traced whole: it rotates pairs of x's last-dim channels by
        angles read from ``table`` at fixed positions, so the channels pass through, each keeping its position
        (pinned: the permutation may move them only as a whole, an attention head at a time)."""
        def traced(x, table, *args, **kwargs):
            self.paused += 1
            try:
                out = fn(x, table, *args, **kwargs)
            finally:
                self.paused -= 1
            if any(self.get(t) for t in [table, *_tensors(args), *_tensors(kwargs)]):
                raise self.fail(f"{fn.__name__} with a rotary table that carries units")
            if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                raise self.fail(f"{fn.__name__} that changes its input's shape")
            factors = self.get(x)
            self.pinned += [f.reshape(-1) for f in factors if x.dim() - 1 in _support(_align(f, x.dim()))]
            self.set(out, factors)
            return out
        return traced

    # --- dispatch ----------------------------------------------------------------------------------
    def op(self, func, args, kwargs, out) -> None:
        name = _name(func)
        ins = _tensors(args) + _tensors(kwargs)
        outs = _tensors(out)
        carried = [t for t in ins if self.get(t)]
        if not outs:
            return
        if not carried:
            for t in outs:
                self.set(t, [])
            return
        if name == "__get__":  # a tensor property: only .data keeps the units
            if getattr(getattr(func, "__self__", None), "__name__", "") != "data":
                raise self.fail(f"tensor property {getattr(func, '__self__', func)!r} of a tensor that carries units")
            self.set(out, self.get(args[0]))
            return
        if name in META:
            raise self.fail(f"{name!r} returned a tensor from one that carries units")
        handler = getattr(self, f"op_{name.strip('_')}", None)
        if name in UNARY:
            if not isinstance(args[0], torch.Tensor):
                raise self.fail(f"{name!r} whose first argument is not the tensor that carries units")
            self.set(out, self.get(args[0]))
        elif name in BINARY:
            self.binary(args, kwargs, out, name)
        elif name in SPATIAL:
            self.spatial(args[0], out)
        elif name in RESHAPE:
            self.reshape(args[0], out)
        elif name in REDUCE:
            self.reduce(name, args, kwargs, out)
        elif handler is not None:
            handler(args, kwargs, out)
        else:
            raise self.fail(f"unsupported op {name!r} on a tensor that carries units")

    # --- elementwise -------------------------------------------------------------------------------
    def binary(self, args, kwargs, out, name) -> None:
        operands = [a for a in (list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
        if name == "where":
            operands = operands[1:]
        ndim = out.dim()
        merged: dict[tuple[int, ...], Factor] = {}
        fixed: list[tuple[int, ...]] = []
        own = [[_align(f, ndim) for f in self.get(t)] for t in operands]

        def nested(k: tuple[int, ...], g: Factor) -> bool:
            return set(_support(g)) <= set(k) or set(k) <= set(_support(g))

        def unmatched(j: int, k: tuple[int, ...]) -> bool:
            """Operand j varies along dims ``k`` with no factor of its own that moves with them."""
            lead = ndim - operands[j].dim()
            return not any(nested(k, g) for g in own[j]) and _varies(operands[j], tuple(d - lead for d in k))

        for i, factors in enumerate(own):
            for f in factors:
                key = _support(f)
                if any(unmatched(j, key) for j in range(len(operands)) if j != i):
                    # combined with values that differ along these units but move with none of them
                    # (a positional table against a channel, a fixed input): these units are fixed
                    self.ids.fix(f)
                    fixed.append(key)
                    continue
                same = [k for k in merged if set(k) <= set(key) or set(key) <= set(k)]  # nested supports
                if not same:
                    merged[key] = f
                    continue
                if len(same) > 1:
                    raise self.fail(f"{name} of tensors whose units overlap ambiguously")
                k = same[0]
                self.ids.tie(merged[k], f)
                if len(key) < len(k):  # keep the factor with the smaller support: they are tied now
                    del merged[k]
                    merged[key] = f
        self.set(out, [f for k, f in merged.items() if k not in fixed])

    def spatial(self, x: torch.Tensor, out) -> None:
        target = out[0] if isinstance(out, tuple) else out
        factors = self.get(x)
        for f in factors:
            for d in _support(f):
                if d >= target.dim() or x.shape[d] != target.shape[d]:
                    raise self.fail(f"a pooling/resizing op along dim {d}, which carries units")
        self.set(target, factors)

    def reshape(self, x: torch.Tensor, out: torch.Tensor) -> None:
        factors = []
        for f in self.get(x):
            full = np.broadcast_to(_align(f, x.dim()), tuple(x.shape))
            factors.append(full.reshape(tuple(out.shape)))
        self.set(out, factors)

    def reduce(self, name, args, kwargs, out) -> None:
        x = args[0]
        at = 2 if name == "norm" else 1  # norm(x, p, dim, keepdim)
        dim = kwargs.get("dim", args[at] if len(args) > at and not isinstance(args[at], bool) else None)
        keep = kwargs.get("keepdim", args[at + 1] if len(args) > at + 1 and isinstance(args[at + 1], bool) else False)
        dims = _dims(dim, x.dim())
        target = out[0] if isinstance(out, tuple) else out
        factors = []
        for f in self.get(x):
            sup = set(_support(f))
            if sup <= set(dims):
                self.mix(f, name)
                continue
            if sup & set(dims):
                raise self.fail(f"{name} over part of the dims that carry units")
            if not keep:
                f = f.reshape([s for d, s in enumerate(f.shape) if d not in dims])
            factors.append(f)
        self.set(target, factors)

    def per_unit_module(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        """A leaf module whose parameters are all vectors as long as one unit axis of its input (a layer
        scale, an affine): a candidate for a partitioned per-unit module, like a norm."""
        params = list(module.parameters())
        if list(module.children()) or not params or any(p.dim() != 1 for p in params):
            return
        width = params[0].shape[0]
        dims = [(_support(f)[0], f.reshape(-1)) for f in self.get(x) if len(_support(f)) == 1 and f.size == width]
        if len(dims) == 1 and all(p.shape[0] == width for p in params):
            self.views[name] = (dims[0][0] - x.dim(), dims[0][1])

    def mix(self, f: Factor, kind: str) -> None:
        """Record that an op mixes these units (normalises or sums across them), and, where they are the
        units of the innermost module's input along one dim, that module as a partitioned-norm candidate."""
        ids = f.reshape(-1)
        module = self.where()
        self.ids.mixing.append((ids, kind, module))
        x = self.inputs.get(module)
        dims = [_support(g)[0] for g in (self.get(x) if x is not None else ())
                if len(_support(g)) == 1 and g.size == len(ids) and np.array_equal(g.reshape(-1), ids)]
        if len(dims) == 1:
            self.views.setdefault(module, (dims[0] - x.dim(), ids))

    def op_softmax(self, args, kwargs, out) -> None:
        x = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None) % x.dim()
        for f in self.get(x):
            if dim in _support(f):
                self.mix(f, "softmax")
        self.set(out, self.get(x))

    op_log_softmax = op_softmax

    # --- shape ops ---------------------------------------------------------------------------------
    def op_permute(self, args, kwargs, out) -> None:
        x = args[0]
        dims = args[1:] if len(args) > 1 else kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        self.set(out, [_align(f, x.dim()).transpose([d % x.dim() for d in dims]) for f in self.get(x)])

    def op_transpose(self, args, kwargs, out) -> None:
        x, a, b = args[0], args[1] % args[0].dim(), args[2] % args[0].dim()
        self.set(out, [np.swapaxes(_align(f, x.dim()), a, b) for f in self.get(x)])

    op_swapaxes = op_transpose

    def op_movedim(self, args, kwargs, out) -> None:
        x = args[0]
        self.set(out, [np.moveaxis(_align(f, x.dim()), args[1], args[2]) for f in self.get(x)])

    def op_expand(self, args, kwargs, out) -> None:
        self.set(out, [_align(f, out.dim()) for f in self.get(args[0])])

    op_expand_as = op_expand
    op_broadcast_to = op_expand

    def op_repeat(self, args, kwargs, out) -> None:
        x = args[0]
        reps = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple, torch.Size)) else args[1]
        factors = []
        for f in self.get(x):
            f = _align(np.broadcast_to(_align(f, x.dim()), tuple(x.shape)), len(reps))
            factors.append(np.tile(f, tuple(reps)))
        self.set(out, factors)

    def select(self, x: torch.Tensor, index, out: torch.Tensor, label: object) -> None:
        """Index ``x`` like ``x[index]``; units taken apart from the rest of their dim get ``label``, and units on
        a dim the index cuts at constant positions are recorded as cut; where it keeps every position of one unit
        dim (``x[:, :C]`` of C channels), as kept, with the module doing it (whose C then must follow the width)."""
        factors = []
        cut = _cut_dims(index, x.dim())
        for f in self.get(x):
            full = np.broadcast_to(_align(f, x.dim()), tuple(x.shape))
            part = full[index]
            taken = np.unique(part)
            if len(taken) < len(np.unique(full)):
                self.ids.label(taken, label)
            if set(_support(f)) & cut:
                if len(cut) == 1 and _support(f) == tuple(cut) and np.array_equal(part, full):
                    self.kept.append((self.where(), f.reshape(-1)))  # ``x[:, :C]`` keeping all C: a width
                else:
                    self.ids.cuts.append(f.reshape(-1))
            factors.append(np.ascontiguousarray(part))
        self.set(out, factors)

    def op_getitem(self, args, kwargs, out) -> None:
        x, index = args[0], args[1]
        if isinstance(index, torch.Tensor):
            if self.get(index):
                raise self.fail("indexing with a tensor that carries units")
            index = index.cpu().numpy()
        elif isinstance(index, tuple):
            index = tuple(i.cpu().numpy() if isinstance(i, torch.Tensor) else i for i in index)
        self.select(x, index, out, (next(self.ids.ops), "slice"))

    def pieces(self, x: torch.Tensor, dim: int, outs: list[torch.Tensor]) -> None:
        op = next(self.ids.ops)
        start = 0
        dim %= x.dim()
        for i, piece in enumerate(outs):
            n = piece.shape[dim] if piece.dim() == x.dim() else 1
            index = [slice(None)] * x.dim()
            index[dim] = slice(start, start + n) if piece.dim() == x.dim() else start
            self.select(x, tuple(index), piece, (op, i))
            start += n

    def op_split(self, args, kwargs, out) -> None:
        """split / chunk / tensor_split(x, sizes or count, dim): the pieces' own shapes say where they cut."""
        self.pieces(args[0], kwargs.get("dim", args[2] if len(args) > 2 else 0), list(out))

    op_tensor_split = op_split

    def op_chunk(self, args, kwargs, out) -> None:
        """chunk(x, count, dim): cuts where it splits a unit dim, except that a split into pieces that hold the same
        groups alike (a gated MLP's value and gate halves) follows the widths, as equal pieces of the widened dim
        are the widened pieces; :func:`derive` decides which, from the pieces' units (``chunks``)."""
        x, dim = args[0], kwargs.get("dim", args[2] if len(args) > 2 else 0) % args[0].dim()
        before = len(self.ids.cuts)
        self.pieces(x, dim, list(out))
        parts = [self.get(p) for p in out]
        if len(self.ids.cuts) > before and all(len(f) == 1 and _support(f[0]) == (dim,) for f in parts):
            self.chunks.append((self.ids.cuts[before:], [f[0].reshape(-1) for f in parts]))
            del self.ids.cuts[before:]

    def op_unbind(self, args, kwargs, out) -> None:
        self.pieces(args[0], kwargs.get("dim", args[1] if len(args) > 1 else 0), list(out))

    def op_narrow(self, args, kwargs, out) -> None:
        x, dim, start, length = args[0], args[1] % args[0].dim(), args[2], args[3]
        index = [slice(None)] * x.dim()
        index[dim] = slice(int(start), int(start) + int(length))
        self.select(x, tuple(index), out, (next(self.ids.ops), "narrow"))

    def op_select(self, args, kwargs, out) -> None:
        x, dim, i = args[0], args[1] % args[0].dim(), args[2]
        index = [slice(None)] * x.dim()
        index[dim] = int(i)
        self.select(x, tuple(index), out, (next(self.ids.ops), "select"))

    def op_cat(self, args, kwargs, out) -> None:
        tensors = list(args[0]) if args else list(kwargs["tensors"])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.dim()
        factors = [self.get(t) for t in tensors]
        if any(len(f) > 1 for f in factors):
            raise self.fail("concatenation of tensors with several unit factors")
        along = [f[0] for f in factors if f and f[0].shape[dim] > 1]
        if not along:  # units are not on the concatenated dim: the pieces share them (cls token + patches)
            present = [f[0] for f in factors if f]
            for f in present[1:]:
                self.ids.tie(present[0], f)
            for t, f in zip(tensors, factors):
                if not f and _varies(t, _support(present[0])):
                    self.ids.fix(present[0])
            self.set(out, present[:1])
            return
        parts = []
        for t, f in zip(tensors, factors):
            shape = list(out.shape)
            shape[dim] = t.shape[dim]
            parts.append(np.broadcast_to(_align(f[0], t.dim()), shape) if f else np.zeros(shape, np.int64))
        self.set(out, [np.concatenate(parts, axis=dim)])

    op_concat = op_cat
    op_concatenate = op_cat

    def op_stack(self, args, kwargs, out) -> None:
        tensors = list(args[0]) if args else list(kwargs["tensors"])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % out.dim()
        parts = []
        for t in tensors:
            fs = self.get(t)
            if len(fs) > 1:
                raise self.fail("stack of tensors with several unit factors")
            full = np.broadcast_to(_align(fs[0], t.dim()), tuple(t.shape)) if fs else np.zeros(tuple(t.shape), np.int64)
            parts.append(np.expand_dims(full, dim))
        self.set(out, [np.concatenate(parts, axis=dim)])

    def op_pad(self, args, kwargs, out) -> None:
        x, pad = args[0], args[1] if len(args) > 1 else kwargs["pad"]
        padded = {x.dim() - 1 - i // 2 for i, p in enumerate(pad) if p}
        for f in self.get(x):
            if padded & set(_support(f)):
                raise self.fail("padding along a dim that carries units")
        self.set(out, self.get(x))

    def op_roll(self, args, kwargs, out) -> None:
        x = args[0]
        dims = kwargs.get("dims", args[2] if len(args) > 2 else None)
        for f in self.get(x):
            if dims is None or set(_dims(dims, x.dim())) & set(_support(f)):
                raise self.fail("roll along a dim that carries units")
        self.set(out, self.get(x))

    # --- layers ------------------------------------------------------------------------------------
    def weight_ids(self, w: torch.Tensor, dim: int) -> np.ndarray | None:
        if dim >= w.dim() or w.shape[dim] == 1:
            return None
        return self.factor_on(w, dim)

    def record_layer(self, w: torch.Tensor, b, kind: str, out) -> None:
        """Remember a conv/linear op whose weight is a module's own parameter (or, in a weight-standardised
        conv's forward, its standardised weight), and whether its bias is the module's own (``own``), absent
        (``none``) or computed (``other``): REPAIR folds only into the first."""
        module = self.param_names[id(w)].rpartition(".")[0] if id(w) in self.param_names else self.standardising(w)
        if module is not None:
            bias = "none" if b is None else "own" if self.param_names.get(id(b)) == f"{module}.bias" else "other"
            self.layers.append((module, kind, bias))
            self.producer[id(out)] = module

    def standardising(self, w: torch.Tensor) -> str | None:
        """The weight-standardised conv whose forward is running, where ``w`` is its weight standardised (any
        other conv that convolves with a weight of its own shape but not its own is remembered as computing it)."""
        module = self.modules.get(self.where())
        if not isinstance(module, nn.Conv2d) or w.shape != module.weight.shape:
            return None
        if isinstance(module, STANDARDISED):
            return self.where()
        self.computed.add(self.where())
        return None

    def op_conv(self, args, kwargs, out, kind: str) -> None:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        a = dict(zip(names, args), **kwargs)
        x, w, b, groups = a["input"], a["weight"], a.get("bias"), a.get("groups", 1) or 1
        ids_in = self.factor_on(x, 1)
        for d in range(2, w.dim()):  # kernel positions are fixed
            k = self.weight_ids(w, d)
            if k is not None:
                self.ids.fix(k)
        ids_out = self.weight_ids(w, 0)
        w_in = self.weight_ids(w, 1)
        c_out, per_in = w.shape[0], w.shape[1]
        if ids_out is None:
            ids_out = np.zeros(c_out, np.int64) if c_out > 1 else None
        if groups == 1:
            if w_in is not None:
                self.ids.join(w_in, ids_in)
        elif per_in == 1 and c_out == groups:  # depthwise: each channel passes through with its own filter
            self.ids.join(ids_out, ids_in)
        else:  # grouped: units stay in their block; the blocks' inputs share one permutation
            op = next(self.ids.ops)
            per_out = c_out // groups
            for g in range(groups):
                self.ids.label(ids_out[g * per_out:(g + 1) * per_out], (op, "group", g))
                block = ids_in[g * per_in:(g + 1) * per_in] if ids_in is not None else np.zeros(1, np.int64)
                if w_in is not None:
                    self.ids.tie(w_in, block)
                elif ids_in is not None:
                    self.ids.fix(block)
                    self.ids.label(block, (op, "group", g))
        if b is not None:
            bias = self.weight_ids(b, 0)
            if bias is not None:
                self.ids.tie(bias, ids_out)
        shape = [1] * out.dim()
        shape[1] = c_out
        self.set(out, [ids_out.reshape(shape)] if ids_out is not None else [])
        self.record_layer(w, b, kind, out)

    def op_conv1d(self, args, kwargs, out) -> None:
        self.op_conv(args, kwargs, out, "conv1d")

    def op_conv2d(self, args, kwargs, out) -> None:
        self.op_conv(args, kwargs, out, "conv2d")

    def op_linear(self, args, kwargs, out) -> None:
        a = dict(zip(("input", "weight", "bias"), args), **kwargs)
        x, w, b = a["input"], a["weight"], a.get("bias")
        ids_in = self.factor_on(x, -1)
        w_in, ids_out = self.weight_ids(w, 1), self.weight_ids(w, 0)
        if w_in is not None:
            self.ids.join(w_in, ids_in)
        if ids_out is None:
            ids_out = np.zeros(w.shape[0], np.int64)
        if b is not None and self.weight_ids(b, 0) is not None:
            self.ids.tie(self.weight_ids(b, 0), ids_out)
        others = [f for f in self.get(x) if f.shape[-1] == 1]
        for f in others:  # widened on both axes, the wide input's cross blocks (A's channels × B's tokens) are
            self.mix(f, "a linear layer along another unit axis")  # not zero, and this layer would mix them in
            if len(_support(f)) == 1:  # unless every section of those units runs its own copy (Across)
                self.across.append((self.where(), _support(f)[0] - x.dim(), f.reshape(-1)))
        shape = [1] * out.dim()
        shape[-1] = w.shape[0]
        self.set(out, others + [ids_out.reshape(shape)])
        self.record_layer(w, b, "linear", out)

    def per_unit(self, params: list, ids: np.ndarray | None) -> None:
        for p in params:
            if isinstance(p, torch.Tensor) and p.numel() > 1:
                if p.dim() != 1:
                    raise self.fail("a norm parameter that is not a vector")
                pid = self.factor_on(p, 0)
                self.ids.join(pid, ids)

    def op_batch_norm(self, args, kwargs, out) -> None:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        a = dict(zip(names, args), **kwargs)
        x = a["input"]
        ids = self.factor_on(x, 1)
        self.per_unit([a.get("running_mean"), a.get("running_var"), a.get("weight"), a.get("bias")], ids)
        self.set(out, self.get(x))
        self.record_norm(a.get("weight"), "batch_norm", x)

    def record_norm(self, w, kind: str, x: torch.Tensor) -> None:
        if w is not None and id(w) in self.param_names:
            self.norms.append((self.param_names[id(w)].rpartition(".")[0], kind, self.producer.get(id(x), "")))

    def op_layer_norm(self, args, kwargs, out) -> None:
        a = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), args), **kwargs)
        x, shape = a["input"], tuple(a["normalized_shape"])
        if len(shape) != 1:
            raise self.fail(f"layer_norm over {len(shape)} dims")
        ids = self.factor_on(x, -1)
        if ids is not None:
            self.mix(ids, "layer_norm")
        self.per_unit([a.get("weight"), a.get("bias")], ids)
        self.set(out, self.get(x))
        self.record_norm(a.get("weight"), "layer_norm", x)

    def op_rms_norm(self, args, kwargs, out) -> None:
        self.op_layer_norm(args[:2] + (args[2] if len(args) > 2 else kwargs.get("weight"), None), {}, out)

    def op_group_norm(self, args, kwargs, out) -> None:
        a = dict(zip(("input", "num_groups", "weight", "bias", "eps"), args), **kwargs)
        x, groups = a["input"], a["num_groups"]
        ids = self.factor_on(x, 1)
        if ids is not None:
            op = next(self.ids.ops)
            per = len(ids) // groups
            for g in range(groups):
                block = ids[g * per:(g + 1) * per]
                self.mix(block, "group_norm")
                if groups > 1:
                    self.ids.label(block, (op, "group_norm", g))
        self.per_unit([a.get("weight"), a.get("bias")], ids)
        self.set(out, self.get(x))
        self.record_norm(a.get("weight"), "group_norm", x)

    # --- attention ---------------------------------------------------------------------------------
    def contract(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
        """``a @ b``: a's last dim meets b's second-to-last; batch dims (heads) keep units apart."""
        nd = out.dim()
        op = next(self.ids.ops)
        fa = [_align(f, max(a.dim(), 2)) for f in self.get(a)]
        fb = [_align(f, max(b.dim(), 2)) for f in self.get(b)]
        ka = [f for f in fa if f.shape[-1] > 1]
        kb = [f for f in fb if f.shape[-2] > 1]
        if len(ka) > 1 or len(kb) > 1:
            raise self.fail("a matmul over several unit factors")
        if ka or kb:
            x = np.swapaxes(ka[0], -1, -2)[..., 0] if ka else None  # (..., k)
            y = kb[0][..., 0] if kb else None  # (..., k)
            if x is not None and y is not None:
                self.ids.tie(x, y)
                self.mix(x, "matmul")
            for f in (x, y):
                if f is not None:
                    self.label_batch(f[..., None], op)
            if (x is None) != (y is None):
                other = b if x is not None else a
                f = x if x is not None else y
                if _varies(other, (other.dim() - 2 if x is not None else other.dim() - 1,)):
                    self.ids.fix(f)
        keep = [f for f in fa if f.shape[-1] == 1] + [f for f in fb if f.shape[-2] == 1]
        for f in keep:
            self.label_batch(f, op)
        self.set(out, [_align(f, nd) for f in keep])

    def label_batch(self, f: np.ndarray, op: int) -> None:
        """Label units by their position along batch dims (all but the last two): one head's units stay
        in that head."""
        lead = f.shape[:-2] if f.ndim > 2 else ()
        for idx in np.ndindex(*lead):
            self.ids.label(f[idx], (op, "head", idx))

    def op_matmul(self, args, kwargs, out) -> None:
        self.contract(args[0], args[1], out)

    op_bmm = op_matmul

    def op_rmatmul(self, args, kwargs, out) -> None:
        self.contract(args[1], args[0], out)

    def op_scaled_dot_product_attention(self, args, kwargs, out) -> None:
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        masks = self.get(mask) if mask is not None else []
        for f in masks:
            self.ids.fix(f)  # a per-head bias: heads keep their order
        # a bias (batch, heads, tokens, tokens) whose ids along heads lie on that dim alone: a table read head by
        # head (ids along tokens are its other dims, relative positions, which nothing permutes)
        per_head = [_align(f, 4) for f in masks if mask.dim() == 4 and 1 in _support(_align(f, 4))]
        tables = per_head[0][0, :, 0, 0] if len(per_head) == 1 and _support(per_head[0]) == (1,) else None
        op = next(self.ids.ops)
        fq, fk, fv = self.get(q), self.get(k), self.get(v)
        for f in fq + fk + fv:
            if f.shape[-2] > 1:
                raise self.fail("attention inputs whose units vary along tokens")
        if fq or fk:
            if not (fq and fk):
                raise self.fail("attention where only one of q, k carries units")
            self.ids.tie(_align(fq[0], q.dim()), _align(fk[0], k.dim()))
            self.label_batch(_align(fq[0], q.dim()), op)
            self.mix(fq[0], "attention")
        for f in fv:
            self.label_batch(_align(f, v.dim()), op)
            self.values.append((self.where(), f.reshape(-1)))
        if len(fq) == len(fv) == 1 and q.dim() == v.dim() == 4 and (mask is None or tables is not None):
            # (batch, heads, tokens, head dim): per head, the ids of its q/k dims and of its v dims
            heads = [(_align(fq[0], 4)[0, h, 0], _align(fv[0], 4)[0, h, 0]) for h in range(q.shape[1])]
            self.attention.append((self.where(), heads, tables))
        self.set(out, fv)

    def op_einsum(self, args, kwargs, out) -> None:
        raise self.fail("einsum on tensors that carry units")


def _kind(module: nn.Module) -> str | None:
    """Observation category of a module's output: post-activation, normalised, or a layer's output."""
    if isinstance(module, (nn.Identity, nn.Dropout, nn.Sequential, nn.ModuleList)):
        return None
    own = list(module.parameters(recurse=False))
    if any(p.dim() >= 2 for p in own):
        return "weight"
    if own or "norm" in type(module).__name__.lower():
        return "norm"
    if not list(module.children()) and "pool" not in type(module).__name__.lower():
        return "act"
    return None


@torch.no_grad()
def trace(model: nn.Module, example: torch.Tensor, rotary: tuple[tuple[object, str], ...] = ()) -> Trace:
    """Trace ``model`` on ``example`` (a batch of inputs) and return unit classes per parameter axis. ``rotary``:
    (module, function name) of rotary embeddings ``f(x, table, ...)`` that the model's code calls by that name,
    traced whole (:meth:`_Tracer.rotary`) instead of op by op, whose slices of a head's channels would cut it."""
    tracer = _Tracer(model)
    hooks = []
    originals = [(owner, name, getattr(owner, name)) for owner, name in rotary if hasattr(owner, name)]

    def pre(module, inputs):
        name = tracer.module_names.get(module, "?")
        tracer.stack.append(name)
        tracer.calls[name] += 1
        if inputs and isinstance(inputs[0], torch.Tensor):
            tracer.inputs[name] = inputs[0]

    def post(module, inputs, output):
        tracer.stack.pop()
        name = tracer.module_names.get(module)
        if name not in tracer.views and inputs and isinstance(inputs[0], torch.Tensor):
            tracer.per_unit_module(name, module, inputs[0])
        if name in tracer.views and isinstance(output, torch.Tensor) and output.dim():
            d = tracer.views[name][0] % output.dim()
            same = [f.reshape(-1) for f in tracer.get(output) if _support(f) == (d,)]
            if same:
                tracer.view_out[name] = same[0]
        kind = _kind(module)
        if name and kind and isinstance(output, torch.Tensor) and id(output) in tracer.units:
            tracer.points[name] = tracer.units[id(output)]
            tracer.point_kind[name] = kind

    for m in model.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    # timm's attention modules compute the same either way; the fused path is one op the tracer knows whole
    # (heads, and a per-head bias), where the unfused one is matmuls and a softmax
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    for m, _ in fused:
        m.fused_attn = True
    try:
        for owner, name, fn in originals:
            setattr(owner, name, tracer.rotary(fn))
        with _Mode(tracer):
            out = model(example)
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise TraceError(f"tracing {type(model).__name__} on an example input of shape {tuple(example.shape)} "
                         f"failed ({exc}); give the input size the model takes") from exc
    finally:
        for h in hooks:
            h.remove()
        for m, flag in fused:
            m.fused_attn = flag
        for owner, name, fn in originals:
            setattr(owner, name, fn)
        model.train(was_training)
    for t in _tensors(out):  # the logits are fixed
        for f in tracer.get(t):
            tracer.ids.fix(f)
    return _finish(tracer)


def _tables(tracer: _Tracer, ids: np.ndarray | None, tied: np.ndarray) -> tuple[tuple[str, int], ...] | None:
    """The (param, dim) whose entries along ``dim`` are an attention bias's heads (``ids``, head by head), as
    a relative position bias table holds them; () for an attention without a bias, None where the bias's
    heads come from something else or also from another parameter (``tied``: components of the ties between
    ids), since the merged attention's heads would then not be known."""
    if ids is None:
        return ()
    found = tuple((name, d) for name, dims in tracer.param_ids.items() for d, got in enumerate(dims)
                  if got is not None and np.array_equal(got, ids))
    linked = [(name, d) for name, dims in tracer.param_ids.items() for d, got in enumerate(dims)
              if got is not None and np.isin(tied[got], tied[ids]).any()]
    return found if len(found) == 1 and linked == list(found) else None


def _finish(tracer: _Tracer) -> Trace:
    cls = tracer.ids.classes()
    tied = tracer.ids.classes(fixing=False) if any(ids is not None for *_, ids in tracer.attention) else None
    param_classes = {n: [None if ids is None else cls[ids] for ids in dims] for n, dims in tracer.param_ids.items()}
    labels: dict[int, set] = defaultdict(set)
    for ids, value in zip(tracer.ids.label_ids, tracer.ids.label_vals):
        for c in np.unique(cls[ids]):
            if c:
                labels[int(c)].add(value)
    mixing: dict[int, set[str]] = defaultdict(set)
    mixers: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for ids, kind, module in tracer.ids.mixing:
        for c in np.unique(cls[ids]):
            if c:
                mixing[int(c)].add(kind)
                mixers[int(c)].append((kind, module))
    views = {}
    for name, (dim, ids) in tracer.views.items():
        out = tracer.view_out.get(name)
        # (a unit may sit at several positions: Swin's patch merging normalises 2×2 neighbours' channels together)
        if tracer.calls[name] == 1 and out is not None and np.array_equal(cls[ids], cls[out]):
            views[name] = (dim, cls[ids])
    members: dict[int, list] = defaultdict(list)
    for name, dims in param_classes.items():
        for d, c in enumerate(dims):
            if c is None:
                continue
            vals, counts = np.unique(c[c > 0], return_counts=True)
            for v, k in zip(vals, counts):
                members[int(v)].append((name, d, int(k)))
    points = {}
    for module, factors in tracer.points.items():
        for f in factors:  # one point per unit dim (a token-mixing MLP's output has channels and token units)
            if len(_support(f)) == 1:
                d = _support(f)[0]
                points[(module, d)] = cls[f.reshape(-1)]
    return Trace(param_classes, points, {m: tracer.point_kind[m] for m, _ in points}, tracer.layers, tracer.norms,
                 dict(mixing), dict(mixers), views, {c: frozenset(v) for c, v in labels.items()},
                 {c: tuple(sorted(v)) for c, v in members.items()},
                 [(m, [(cls[qk], cls[v]) for qk, v in heads], _tables(tracer, ids, tied))
                  for m, heads, ids in tracer.attention], dict(tracer.calls),
                 {int(c) for ids in tracer.ids.cuts for c in np.unique(cls[ids]) if c},
                 {n: cls[ids] for n, ids in tracer.zero_ids.items()}, [(m, cls[ids]) for m, ids in tracer.kept],
                 [({int(c) for ids in cut for c in np.unique(cls[ids]) if c}, [cls[ids] for ids in pieces])
                  for cut, pieces in tracer.chunks], [(m, cls[ids]) for m, ids in tracer.values], tracer.computed,
                 [(m, d, cls[ids]) for m, d, ids in tracer.across],
                 {int(c) for ids in tracer.pinned for c in np.unique(cls[ids]) if c})


def interchangeable(tr: Trace) -> dict[int, tuple]:
    """class → key; classes with equal keys can be permuted among each other (one group)."""
    return {c: (members, tr.labels.get(c, frozenset())) for c, members in tr.members.items()}




OBSERVE_PREFERENCE = ("act", "norm", "weight")
# forwards that partitioned blocks (of the template's own type) reproduce: timm's Linear only adds a TorchScript
# cast, and timm's Conv2dSame pads by the input's size, kernel and stride, which no channel count changes
PLAIN_FORWARDS = (nn.Conv2d.forward, nn.Linear.forward, TimmLinear.forward, Conv2dSame.forward)
PARTIAL_NORMS = (nn.modules.batchnorm._BatchNorm,)  # incl. timm's BatchNormAct2d: per-unit, resizable
# weight-standardised convs with a per-unit gain (NF-Nets), which hubmerge.partitioned.PartitionedStdConv reproduces
STANDARDISED = (ScaledStdConv2d, ScaledStdConv2dSame)


def _segments(classes: np.ndarray, group_of: np.ndarray, unit_of: np.ndarray, names: list[str]) -> Axis:
    """Run-length encode one axis (class per position) into segments of (group, unit) runs."""
    g, u = group_of[classes], unit_of[classes]
    change = np.flatnonzero((g[1:] != g[:-1]) | ((u[1:] != u[:-1]) & (g[1:] >= 0))) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [len(classes)]]))
    segs: list[Segment] = []
    current: list[int] = []  # units of the segment being built
    taken: set[int] = set()
    key = None  # (group, repeat) of the segment being built

    def close():
        if current:
            units = tuple(current)
            order = None if units == tuple(range(len(units))) else units
            segs.append(Segment(names[key[0]], len(units), key[1], order))
            current.clear()
            taken.clear()

    for start, count in zip(starts.tolist(), counts.tolist()):
        grp, unit = int(g[start]), int(u[start])
        if grp < 0:
            close()
            segs.append(Segment(None, count))
            continue
        if key != (grp, count) or unit in taken:
            close()
            key = (grp, count)
        current.append(unit)
        taken.add(unit)
    close()
    return tuple(segs)


def derive(model: nn.Module, example: torch.Tensor, family: str, cut_to: dict[type, str] | None = None,
           rotary: tuple[tuple[object, str], ...] = ()) -> PermutationSpec:
    """The permutation spec of ``model``, from one traced forward pass on ``example``. ``cut_to``: module classes
    that cut their output to the width an attribute holds (GhostNet's ``out[:, :out_chs]``), which the partitioned
    model can set to the merged width where the cut keeps every channel; any other slice of channels is a cut.
    ``rotary``: rotary embeddings to trace whole (:func:`trace`); the groups they rotate keep their order
    (``Group.ordered``), and outside attention heads, kept apart whole, their width too."""
    tr = trace(model, example, rotary)
    keys = interchangeable(tr)
    group_of_key: dict[tuple, str] = {}
    units: dict[str, list[int]] = {}
    unit_of: dict[int, tuple[str, int]] = {}
    for name, dims in tr.param_classes.items():  # first use = forward order, so names read front to back
        for cls in dims:
            if cls is None:
                continue
            for c in cls.tolist():
                if c == 0 or c in unit_of:
                    continue
                key = keys[c]
                if key not in group_of_key:
                    base = name.rpartition(".")[0] or name
                    label = base
                    k = 2
                    while label in units:
                        label, k = f"{base}#{k}", k + 1
                    group_of_key[key] = label
                    units[label] = []
                g = group_of_key[key]
                unit_of[c] = (g, len(units[g]))
                units[g].append(c)
    names = list(units)
    n = max(unit_of, default=0) + 1
    group_arr, unit_arr = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    index = {g: i for i, g in enumerate(names)}
    for c, (g, i) in unit_of.items():
        group_arr[c], unit_arr[c] = index[g], i
    axes = {name: tuple(None if cls is None or not (cls > 0).any() else _segments(cls, group_arr, unit_arr, names)
                        for cls in dims) for name, dims in tr.param_classes.items()}
    axes = {n: a for n, a in axes.items() if any(a)}
    points = _observation(tr, group_arr, unit_arr, names)
    groups = {}
    for i, (g, members) in enumerate(units.items()):
        normalised = any(tr.mixing.get(c) for c in members)
        groups[g] = Group(g, len(members), points.get(i, ()), normalised, any(c in tr.pinned for c in members))
    in_order = {}  # norm candidates whose input holds whole groups in unit order along the normalised dim
    for module, (dim, cls) in tr.norm_views.items():
        if (cls < n).all() and (group_arr[cls] >= 0).all():
            segments = _segments(cls, group_arr, unit_arr, names)
            if all(s.order is None and s.repeat == 1 for s in segments):
                in_order[module] = (dim, segments)
    heads = _heads(tr, group_arr, unit_arr, names, groups)
    whole = {g for h in heads for g in h.groups}
    # slices keeping every channel of a module that can follow the width; chunks into alike pieces
    def axis_of(cls: np.ndarray) -> Axis:  # classes seen outside parameters (buffers, slices) count as fixed
        return _segments(np.where(cls < n, cls, 0), group_arr, unit_arr, names)

    modules = dict(model.named_modules())
    widths, cut = [], set(tr.cut)
    for module, cls in tr.kept:
        attribute = (cut_to or {}).get(type(modules.get(module)))
        if attribute is not None and tr.calls.get(module) == 1 and getattr(modules[module], attribute) == len(cls):
            widths.append(Width(module, attribute, axis_of(cls)))
        else:
            cut.update(int(c) for c in np.unique(cls) if c)
    for classes, pieces in tr.chunks:  # equal pieces of alike groups follow the widths; others cut
        held = [axis_of(p) for p in pieces]
        if any(h != held[0] or any(s.group is None or s.order is not None for s in h) for h in held):
            cut.update(classes)
    # channels taken apart by position (a slice, a split) outside attention heads: widened, the op would take
    # them apart at the endpoint's positions, so every group of the tensor it cuts keeps its width
    cut_groups = {unit_of[c][0] for c in cut if c in unit_of} - whole
    view = _layer_view(model, tr, axes, in_order)
    zeros, reason = [], view.reason
    for key, cls in tr.zeros.items():  # zero buffers widen with zeros where their units widen
        axis = axis_of(cls)
        if any(s.group for s in axis):
            zeros.append(Vector(key, axis, 0))
            if _laid_out(axis, 0) is None or any(s.repeat != 1 for s in axis):
                reason = reason or f"the zero buffer {key} does not hold whole groups in unit order"
    across = _across(tr, view.layers, group_arr, unit_arr, names)
    explained = {norm.name for norm in view.norms} | {h.module for h in heads} | {a.layer for a in across}
    fixed = {g: "an op takes its channels apart by position (a slice or a split)" for g in sorted(cut_groups)}
    for g in sorted(g for g, grp in groups.items() if grp.ordered and g not in whole):
        fixed.setdefault(g, "a rotary embedding pairs its units by position, outside attention heads kept apart whole")
    for a in across:  # every section of the units passing by runs its own copy of the layer, of one width
        for g in sorted(next(l for l in view.layers if l.name == a.layer).groups):
            fixed.setdefault(g, f"{a.layer} runs along another axis, one copy per section of the units passing it "
                                "by, so its own units keep their width")
    # and widening would change what an op computes for the units it mixes, or for an attention whose heads are
    # not known, the units its heads hold
    for module, cls in tr.values:
        for c in np.unique(cls).tolist() if module not in explained else ():
            if c in unit_of:
                fixed.setdefault(unit_of[c][0], f"attention in {module} has heads hubmerge does not know")
    for c in sorted(tr.mixers):
        for kind, module in tr.mixers[c] if c in unit_of else ():
            if module not in explained:
                fixed.setdefault(unit_of[c][0], f"{kind} in {module} mixes its units")
    spec = PermutationSpec(family, groups, axes, view.layers, reason, _outputs(tr, axes), view.norms, view.vectors,
                           heads, view.ties, tuple(zeros), widths=tuple(widths), across=across)
    return spec.with_fixed(fixed)


def _across(tr: Trace, layers: tuple[Layer, ...], group_of: np.ndarray, unit_of: np.ndarray, names: list[str]
            ) -> tuple[Across, ...]:
    """Layers of the view, called once, applied along another dim than the one holding units that pass them by
    (a token-mixing MLP: the same weights for every channel), where those units are whole groups in unit order
    on one dim: widened, each section of them runs its own copy of the layer (:class:`~hubmerge.spec.Across`)."""
    n, seen = len(group_of), defaultdict(list)
    for module, dim, cls in tr.across:
        seen[module].append((dim, cls))
    out = []
    for layer in layers:
        found = seen.get(layer.name, [])
        plain = layer.norm is None and not layer.depthwise and layer.blocks == 1 and not layer.standardised
        if len(found) != 1 or tr.calls.get(layer.name) != 1 or not plain:  # (a BatchNorm after it would mix them)
            continue
        dim, cls = found[0]
        if (cls < n).all() and (group_of[cls] >= 0).all():
            axis = _segments(cls, group_of, unit_of, names)
            if all(s.group is not None and s.order is None and s.repeat == 1 for s in axis):
                out.append(Across(layer.name, axis, dim))
    return tuple(out)


def _heads(tr: Trace, group_of: np.ndarray, unit_of: np.ndarray, names: list[str], groups: dict[str, Group]
           ) -> tuple[Heads, ...]:
    """Attention modules (called once) whose every head holds its q/k dims and its v dims each as one whole
    group of its own, in unit order: those heads can be merged or kept apart whole. A head whose dims are
    tied elsewhere (a q/k norm's parameters shared by all heads, rotary tables) is not one. A bias added to
    the scores must come head by head from one table (a relative position bias), which then follows the heads."""
    out, used = [], set()
    for module, per_head, tables in tr.attention:
        if tr.calls.get(module) != 1 or tables is None:
            continue
        found = []
        for qk, v in per_head:
            head = []
            for cls in (qk, v):
                cls = np.where(cls < len(group_of), cls, 0)
                g = group_of[cls]
                in_order = np.array_equal(unit_of[cls], np.arange(len(cls)))
                if (cls == 0).any() or g[0] < 0 or (g != g[0]).any() or not in_order:
                    break
                name = names[g[0]]
                if groups[name].width != len(cls) or name in used or name in head:
                    break
                head.append(name)
            if len(head) != 2:
                break
            found.append(tuple(head))
        if len(found) == len(per_head):
            used.update(g for head in found for g in head)
            out.append(Heads(module, tuple(found), tables))
    return tuple(out)


def _outputs(tr: Trace, axes: dict) -> tuple[Output, ...]:
    """Conv/linear modules (applied once, with their own weight) whose outputs hold units and that have
    their own bias or a BatchNorm reading them directly: where REPAIR measures and folds its corrections.
    A layer with neither (or a bias computed elsewhere, BEiT's q/v bias) cannot take a shift and is left
    as it is."""
    norm_after = {producer: norm for norm, kind, producer in tr.norms if kind == "batch_norm"}
    count = defaultdict(int)
    for name, _, _ in tr.layers:
        count[name] += 1
    out = []
    for name, _kind, bias in tr.layers:
        w, norm = axes.get(f"{name}.weight"), norm_after.get(name)
        foldable = norm is not None or bias == "own"
        if count[name] == 1 and foldable and w and w[0] and any(s.group for s in w[0]):
            out.append(Output(name, norm))
    return tuple(out)


def _observation(tr: Trace, group_of: np.ndarray, unit_of: np.ndarray, names: list[str]
                 ) -> dict[int, tuple[Point, ...]]:
    """Per group: points where it is observed, post-activation outputs where it has them, else normalised
    outputs, else layer outputs (attention's q and k live only there)."""
    found: dict[int, dict[str, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for (module, dim), cls in tr.points.items():
        cls = np.where(cls < len(group_of), cls, 0)
        g, u = group_of[cls], unit_of[cls]
        for grp in np.unique(g[g >= 0]).tolist():
            pos = np.flatnonzero(g == grp)
            units = u[pos]
            width = int(units.max()) + 1
            counts = np.bincount(units, minlength=width)
            if counts.min() == 0 or counts.min() != counts.max():
                continue
            order = np.argsort(units, kind="stable")  # per unit, its positions in order of occurrence
            table = pos[order].reshape(width, counts[0]).T
            found[grp][tr.point_kind[module]].append(Point(module, dim, tuple(map(tuple, table.tolist()))))
    out = {}
    for grp, kinds in found.items():
        for kind in OBSERVE_PREFERENCE:
            if kinds[kind]:
                out[grp] = tuple(kinds[kind])
                break
    return out


def _single(axis: Axis | None) -> tuple[str | None, int] | None:
    """(group, repeat) of an axis that holds one group in unit order (or is fixed); None otherwise."""
    if axis is None:
        return (None, 1)
    if len(axis) == 1 and axis[0].order is None:
        return axis[0].group, axis[0].repeat
    if all(s.group is None for s in axis):
        return (None, 1)
    return None


@dataclass(frozen=True)
class _View:
    """The partitioned build's view of a model, and why partial merging is unavailable (None: it is)."""

    layers: tuple[Layer, ...]
    norms: tuple[Norm, ...]
    vectors: tuple[Vector, ...]
    reason: str | None
    ties: tuple[tuple[str, ...], ...] = ()


def _blocks(out: Axis, inp: Axis, groups: int) -> tuple[str, ...] | None:
    """The groups of a grouped conv's blocks, where the partitioned build can widen them: each of its
    ``groups`` blocks writes one whole segment of one group (all of one width) and reads the weight's input
    axis, one group or fixed positions in unit order (the layer's input holds it once per block); None
    otherwise. Distinct groups must widen alike (:attr:`~hubmerge.spec.PermutationSpec.ties`), or the
    blocks of the merged conv would differ in width."""
    single = _single(inp)
    if single is None or single[1] != 1 or len(out) != groups:
        return None
    if any(s.group is None or s.order is not None or s.repeat != 1 or s.width != out[0].width for s in out):
        return None
    return tuple(dict.fromkeys(s.group for s in out))


def _tied(sets: list[tuple[str, ...]]) -> tuple[tuple[str, ...], ...]:
    """Overlapping sets of groups joined (groups that must widen alike), each in first-seen order."""
    joined: list[list[str]] = []
    for new in sets:
        hit = [t for t in joined if set(t) & set(new)]
        merged = list(dict.fromkeys([g for t in hit for g in t] + list(new)))
        joined = [t for t in joined if t not in hit] + [merged]
    return tuple(tuple(t) for t in joined if len(t) > 1)


def _laid_out(axis: Axis | None, width: int) -> Axis | None:
    """The axis as complete segments (fixed positions as one segment of group None) where the partitioned
    build can lay it out: groups (one, or what a concatenation holds: ``torch.cat`` of widened pieces is the
    per-segment layout) and fixed positions, each in unit order; None otherwise (a shuffled order). Where an op
    takes a tensor's channels apart by position, its groups keep their width (:func:`derive`), so their
    positions stay the endpoint's."""
    single = _single(axis)
    if single is not None:
        return (Segment(None, width),) if single[0] is None else axis
    if all(s.order is None for s in axis):
        return axis
    return None


def _layer_view(model: nn.Module, tr: Trace, axes: dict, views: dict[str, tuple[int, Axis]]) -> _View:
    """Conv/linear layers whose axes the partitioned build lays out (:func:`_laid_out`), depthwise convs, and
    their BatchNorms; norms (``views``: modules that mix the units of one group along a dim, whose parameters
    must be per-unit vectors of that group); per-unit vectors; and why partial merging is not available when
    some parameter falls outside that view."""
    modules = dict(model.named_modules())
    norm_after = {producer: norm for norm, kind, producer in tr.norms if kind == "batch_norm"}
    layers, covered, reason, ties = [], set(), None, []
    seen = set()
    for name, _kind, _bias in tr.layers:
        if name in seen:
            reason = reason or f"{name} is applied twice (shared weights)"
            continue
        seen.add(name)
        module = modules.get(name)
        if not tr.calls.get(name):
            reason = reason or (f"{name} is not called: its weight is read by another module's forward, which a "
                                "partitioned layer cannot stand in for")
            continue
        weight = f"{name}.weight"
        w_axes = axes.get(weight, (None, None))
        shape = module.weight.shape if isinstance(module, (nn.Conv2d, nn.Linear)) else (0, 0)
        out = _laid_out(w_axes[0], shape[0])
        inp = _laid_out(w_axes[1] if len(w_axes) > 1 else None, shape[1])
        plain = isinstance(module, (nn.Conv2d, nn.Linear))
        if not plain or out is None or inp is None or any(s.repeat != 1 for s in out):
            reason = reason or f"{name} ({type(module).__name__}) does not map whole groups to whole groups"
            continue
        depthwise = isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1
        single_out = all(s.group is not None for s in out)  # one unit per channel, of any groups
        grouped = 1
        if depthwise and single_out:  # resized as a copy, so a subclass keeps its own forward
            inp = out
        elif isinstance(module, nn.Conv2d) and module.groups != 1:
            blocks = _blocks(out, inp, module.groups)
            if blocks is None:
                reason = reason or (f"{name} is a grouped conv whose {module.groups} blocks do not each write one "
                                    "whole group and read one")
                continue
            grouped = module.groups
            ties.append(blocks)
        standardised = isinstance(module, STANDARDISED)
        if type(module).forward not in PLAIN_FORWARDS and not (depthwise and single_out) and not standardised:
            reason = reason or f"{name} is a {type(module).__name__}, whose forward partitioned blocks would lose"
            continue
        if standardised and not single_out:
            reason = reason or f"{name} is a weight-standardised conv writing outputs without units"
            continue
        norm = norm_after.get(name)
        if norm is not None and not isinstance(modules.get(norm), PARTIAL_NORMS):  # per unit: any layout widens it
            reason = reason or f"{norm} ({type(modules.get(norm)).__name__}) after {name}"
            continue
        layers.append(Layer(name, out, inp, norm, depthwise and single_out, grouped, standardised))
        covered.update(f"{name}.{p}" for p, _ in module.named_parameters())
        if norm is not None:
            covered.update(f"{norm}.{p}" for p in ("weight", "bias", "running_mean", "running_var"))
    norms = []
    for name, (dim, axis) in views.items():
        params = dict(modules[name].named_parameters())
        per_unit = all("." not in p and axes.get(f"{name}.{p}", (None,))[0] == axis and t.dim() == 1
                       for p, t in params.items())
        if per_unit and not list(modules[name].buffers()) and _laid_out(axis, 0) is not None:
            norms.append(Norm(name, axis, dim))
            covered.update(f"{name}.{p}" for p in params)
    vectors = []
    for key, key_axes in axes.items():
        held = [(d, _laid_out(a, 0)) for d, a in enumerate(key_axes) if a is not None]
        if (key not in covered and len(held) == 1 and held[0][1] is not None and all(s.repeat == 1 for s in held[0][1])
                and any(s.group for s in held[0][1])):
            vectors.append(Vector(key, held[0][1], held[0][0]))
            covered.add(key)
    left = [n for n in axes if n not in covered]
    computed = [n for n in left if n.rpartition(".")[0] in tr.computed]
    if computed:
        module = computed[0].rpartition(".")[0]
        reason = reason or (f"{module} ({type(modules[module]).__name__}) convolves with a weight its forward computes "
                            "from its own (as weight standardisation without a gain does), which no partitioned layer "
                            "reproduces")
    if left:
        reason = reason or f"{left[0]} lies outside conv/linear layers, norms and per-unit vectors"
    return _View(tuple(layers), tuple(norms), tuple(vectors), reason, _tied(ties))
