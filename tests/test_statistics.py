import pytest
import torch

from hubmerge.arch_specs import spec_for
from hubmerge.errors import DataError, UsageError
from hubmerge.statistics import collect

from conftest import inputs, make
from helpers import first_block_features


def test_two_half_passes_equal_one_full_pass():
    a, b = make("timm_resnet18", 0), make("timm_resnet18", 1)
    spec = spec_for(a)
    data = [inputs("timm_resnet18", 4, seed=s) for s in range(4)]
    full = collect(a, b, spec, data)
    halves = collect(a, b, spec, data[:2]) + collect(a, b, spec, data[2:])
    assert halves.samples == full.samples == 16
    for grp in spec.groups.values():
        assert torch.allclose(halves.correlation(grp), full.correlation(grp), atol=1e-12, rtol=0)
    for name, mom in full.layers_a.items():
        assert torch.allclose(halves.layers_a[name].mean, mom.mean, atol=1e-12)
        assert torch.allclose(halves.layers_b[name].std, full.layers_b[name].std, atol=1e-12)


def test_correlation_matches_numpy_on_one_point():
    a, b = make("mlp", 0), make("mlp", 1)
    spec = spec_for(a)
    x = inputs("mlp", 50)
    stats = collect(a, b, spec, [x])
    fa, fb = first_block_features(a, b, x=x)
    ref = torch.corrcoef(torch.cat([fa.T, fb.T]))[:10, 10:]
    ref = torch.nan_to_num(ref)
    assert torch.allclose(stats.correlation(spec.groups["blocks.0.fc"]), ref, atol=1e-6)


def test_memory_does_not_grow_with_data():
    a, b = make("mlp", 0), make("mlp", 1)
    spec = spec_for(a)
    small = collect(a, b, spec, [inputs("mlp", 4)])
    large = collect(a, b, spec, [inputs("mlp", 4, seed=s) for s in range(10)])
    assert [pm.cross.shape for pm in small.points.values()] == [pm.cross.shape for pm in large.points.values()]


def test_empty_calibration_is_an_error():
    a, b = make("mlp", 0), make("mlp", 1)
    with pytest.raises(DataError, match="empty"):
        collect(a, b, spec_for(a), [])


def test_batch_estimator_is_the_repair_codes():
    """``correlation="batch"``: covariance over the mean of each batch's (unbiased) std plus 1e-4, as the code
    of REPAIR and of partial merging computes it (there, means and outer products are averaged per batch too,
    which equal batches make the pooled ones)."""
    a, b = make("mlp", 0), make("mlp", 1)
    spec = spec_for(a)
    xs = [inputs("mlp", 20, seed=s) for s in range(3)]
    stats = collect(a, b, spec, xs)
    feats = {"a": [], "b": []}
    hooks = [m.blocks[0].act.register_forward_hook(lambda _m, _i, o, k=k: feats[k].append(o.double()))
             for k, m in (("a", a), ("b", b))]
    for x in xs:
        a(x), b(x)
    for h in hooks:
        h.remove()
    fa, fb = torch.cat(feats["a"]), torch.cat(feats["b"])
    std_a = torch.stack([f.std(0) for f in feats["a"]]).mean(0)
    std_b = torch.stack([f.std(0) for f in feats["b"]]).mean(0)
    cov = fa.T @ fb / len(fa) - torch.outer(fa.mean(0), fb.mean(0))
    ref = cov / (torch.outer(std_a, std_b) + 1e-4)
    group = spec.groups["blocks.0.fc"]
    assert torch.allclose(stats.correlation(group, "batch"), ref, atol=1e-12)
    assert not torch.allclose(stats.correlation(group, "batch"), stats.correlation(group), atol=1e-3)
    with pytest.raises(UsageError, match="pooled"):
        stats.correlation(group, "median")


def test_a_float32_model_gets_float64_statistics_to_float32_precision():
    """A float32 model's products run in float32 on batch-centred features and every sum is kept in float64:
    its correlations and moments agree with those of the same model in float64 to float32 precision (the
    float32 forward pass alone differs by about 1e-6), also for units whose mean is many times their std (no
    large common term is cancelled). A unit's correlation with itself (the diagonal within a model, which a
    zip never pairs) comes from two different float32 sums and is left out."""
    a, b = make("timm_resnet18", 0), make("timm_resnet18", 1)
    with torch.no_grad():
        a.layer1[0].bn2.bias.add_(100.0)  # units whose mean is far above their spread
    spec = spec_for(a)
    data = [inputs("timm_resnet18", 8, seed=s) for s in range(3)]
    wide = collect(a, b, spec, data, within=True)
    narrow = collect(a.float(), b.float(), spec, [x.float() for x in data], within=True)
    for grp in spec.groups.values():
        for pair in ("ab", "aa"):
            error = (narrow.correlation(grp, pair=pair) - wide.correlation(grp, pair=pair)).abs()
            if pair == "aa":
                error.fill_diagonal_(0.0)
            assert error.max() < 1e-5
    for name, mom in wide.layers_a.items():
        got = narrow.layers_a[name]
        assert ((got.mean - mom.mean).abs() <= 1e-5 * (mom.mean.abs() + mom.std)).all(), name
        assert ((got.std - mom.std).abs() <= 1e-5 * mom.std.clamp_min(1e-6)).all(), name
