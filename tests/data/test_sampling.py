"""The O(1) shuffle (Feistel permutation) and the deterministic mixture schedule."""

from __future__ import annotations

from collections import Counter

import pytest

from strata.data.sampling import FeistelPermutation, GlobalSampler, MixtureSchedule


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4097])
def test_feistel_is_a_permutation(n):
    perm = FeistelPermutation(n, b"key")
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_feistel_depends_on_key_and_is_deterministic():
    a = [FeistelPermutation(10_000, b"seed:0")(i) for i in range(50)]
    assert a == [FeistelPermutation(10_000, b"seed:0")(i) for i in range(50)]
    assert a != [FeistelPermutation(10_000, b"seed:1")(i) for i in range(50)]
    assert a != list(range(50))


def test_feistel_evaluates_one_index_of_a_huge_range_without_tables():
    perm = FeistelPermutation(10**12 + 39, b"big")
    assert 0 <= perm(123_456_789_012) < 10**12 + 39
    assert not any(isinstance(v, list) and len(v) > 8 for v in vars(perm).values())


@pytest.mark.parametrize("weights", [[0.7, 0.2, 0.1], [1, 3], [0.5, 0.25, 0.125, 0.125], [0.333, 0.667], [0.9991, 0.0009]])
def test_mixture_proportions_within_one_per_thousand(weights):
    schedule = MixtureSchedule(weights)
    total = sum(weights)
    for n in (1000, 5000, 12_345, 50_000):
        counts = Counter(schedule(g)[0] for g in range(n))
        for c, w in enumerate(weights):
            assert abs(counts[c] - n * w / total) <= n / 1000, (n, c, counts)


def test_mixture_local_indices_are_consecutive_per_component():
    schedule = MixtureSchedule([0.6, 0.3, 0.1])
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for g in range(25_000):
        c, local = schedule(g)
        seen[c].append(local)
    for c, locals_ in seen.items():
        assert locals_ == list(range(len(locals_)))


def test_sampler_epochs_cover_each_component_once_per_epoch():
    sampler = GlobalSampler([7, 3], [0.5, 0.5], seed=4)
    draws = [sampler(g) for g in range(2 * 7 * 3 * 2)]
    for c, n in ((0, 7), (1, 3)):
        mine = [s for comp, s in draws if comp == c]
        for epoch in range(len(mine) // n):
            assert sorted(mine[epoch * n:(epoch + 1) * n]) == list(range(n))
        assert mine[:n] != mine[n:2 * n] or n < 3  # a new permutation each epoch
