import pytest
import torch

from hubmerge.errors import UsageError
from hubmerge.partial import plan_group


def scores(n=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, n, generator=gen, dtype=torch.float64) * 2 - 1


def check_layout(p, n):
    ka, m, kb = p.sizes
    assert ka + m == n and m + kb == n
    assert sorted(torch.cat([p.a_only, p.shared_a]).tolist()) == list(range(n))
    assert sorted(torch.cat([p.shared_b, p.b_only]).tolist()) == list(range(n))


@pytest.mark.parametrize("gamma,k", [(0.0, 0), (0.2, 2), (0.55, 6), (1.0, 10)])
def test_forced_buffers_split_exactly_k(gamma, k):
    p = plan_group(scores(), gamma, "forced")
    check_layout(p, 10)
    assert p.sizes == (k, 10 - k, k)


def test_forced_buffers_reoptimise_the_remaining_pairs():
    """With k=1 the relaxed LAP drops the unit pair whose removal helps most, not a fixed one."""
    s = torch.eye(4, dtype=torch.float64)
    s[0, 0] = -1.0  # A0 and B0 fit nothing: they are the ones to split
    p = plan_group(s, 0.25, "forced")
    assert p.a_only.tolist() == [0] and p.b_only.tolist() == [0]
    assert p.shared_a.tolist() == p.shared_b.tolist() == [1, 2, 3]


def test_adaptive_splits_only_below_epsilon_and_at_most_k():
    s = torch.eye(5, dtype=torch.float64) * 0.9
    s[1, 1], s[3, 3] = 0.1, 0.2
    p = plan_group(s, 1.0, "adaptive", epsilon=0.5)
    assert p.a_only.tolist() == [1, 3] and p.sizes == (2, 3, 2)
    capped = plan_group(s, 0.2, "adaptive", epsilon=0.5)  # k = 1
    assert capped.sizes == (1, 4, 1) and capped.a_only.tolist() == [1]


def test_topk_keeps_the_worst_matched_pairs_apart():
    s = torch.eye(5, dtype=torch.float64)
    s[2, 2] = 0.3
    s[4, 4] = 0.5
    p = plan_group(s, 0.4, "topk")
    assert p.a_only.tolist() == [2, 4] and p.b_only.tolist() == [2, 4]


def test_random_split_is_seeded():
    a = plan_group(scores(), 0.3, "random", seed=1)
    b = plan_group(scores(), 0.3, "random", seed=1)
    c = plan_group(scores(), 0.3, "random", seed=2)
    assert torch.equal(a.a_only, b.a_only) and a.sizes == (3, 7, 3)
    assert not torch.equal(a.a_only, c.a_only)


def test_bad_gamma_and_method_are_usage_errors():
    with pytest.raises(UsageError, match="gamma"):
        plan_group(scores(), 1.5)
    with pytest.raises(UsageError, match="forced"):
        plan_group(scores(), 0.5, "magic")
