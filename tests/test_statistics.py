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
