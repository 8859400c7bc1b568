"""Long-tail data, samplers and evaluation: count profiles, subsets, shot groups, re-balancing samplers, plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finegrain.data import Sample
from finegrain.data.longtail import describe_counts, exponential_profile, make_longtailed, shot_groups
from finegrain.errors import FinegrainError
from finegrain.evaluate.longtail import per_class_vs_frequency_plot, shot_accuracy
from finegrain.evaluate.metrics import per_class_accuracy
from finegrain.train.samplers import SAMPLERS, InstanceSampler, ShardSampler, create_sampler
from finegrain.train.seeding import epoch_seed

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def _balanced(n_classes: int = 5, per_class: int = 40) -> list[Sample]:
    # Interleaved labels, so "kept in input order" is a real check.
    return [Sample(f"/d/{c}/{i}.jpg", c, "train") for i in range(per_class) for c in range(n_classes)]


def _counts(samples: list[Sample], n_classes: int) -> list[int]:
    return np.bincount([s.label for s in samples], minlength=n_classes).tolist()


# ---- profiles and subsets -----------------------------------------------------------------------------------------
def test_cifar_lt_profiles():
    assert exponential_profile(5000, 10, 100) == CIFAR10_LT_100 and sum(CIFAR10_LT_100) == 12406
    assert sum(exponential_profile(500, 100, 100)) == 10847  # CIFAR-100-LT, ρ = 100
    assert exponential_profile(30, 4, 1) == [30] * 4 and exponential_profile(7, 1, 50) == [7]
    with pytest.raises(ValueError, match="imbalance_ratio"):
        exponential_profile(10, 3, 0.5)


def test_make_longtailed_is_seeded_and_gives_class_c_the_cth_count():
    samples = _balanced()
    a = make_longtailed(samples, imbalance_ratio=10, seed=0)
    assert a == make_longtailed(samples, imbalance_ratio=10, seed=0)
    assert a != make_longtailed(samples, imbalance_ratio=10, seed=1)
    assert _counts(a, 5) == exponential_profile(40, 5, 10)
    positions = [samples.index(s) for s in a]
    assert positions == sorted(positions)  # a subset, in input order
    assert _counts(make_longtailed(samples, imbalance_ratio=10, seed=0, n_max=20), 5) == exponential_profile(20, 5, 10)


def test_make_longtailed_random_order_permutes_the_counts():
    samples = _balanced(n_classes=8)
    profile = exponential_profile(40, 8, 20)
    runs = [_counts(make_longtailed(samples, imbalance_ratio=20, seed=s, order="random"), 8) for s in range(4)]
    assert all(sorted(r) == sorted(profile) for r in runs)
    assert runs[0] == _counts(make_longtailed(samples, imbalance_ratio=20, seed=0, order="random"), 8)
    assert any(r != profile for r in runs)
    with pytest.raises(ValueError, match="index, random"):
        make_longtailed(samples, imbalance_ratio=20, seed=0, order="sorted")


def test_make_longtailed_keeps_all_of_a_short_class():
    samples = [s for s in _balanced() if not (s.label == 1 and int(s.path.rsplit("/", 1)[1][:-4]) >= 5)]
    out = make_longtailed(samples, imbalance_ratio=10, seed=0, n_max=40)
    profile = exponential_profile(40, 5, 10)
    assert _counts(out, 5) == [profile[0], 5, *profile[2:]]  # class 1 has 5 images, asked for more


def test_shot_group_thresholds():
    counts = [0, 19, 20, 100, 101, 5000]
    assert shot_groups(counts).tolist() == ["few", "few", "medium", "medium", "many", "many"]
    assert shot_groups(counts, many=50, few=5).tolist() == ["few", "medium", "medium", "many", "many", "many"]
    with pytest.raises(ValueError, match="few"):
        shot_groups(counts, many=10, few=20)


def test_describe_counts():
    d = describe_counts([500, 120, 40, 4, 0])
    assert d == {
        "classes": 5,
        "total": 664,
        "max": 500,
        "min": 4,
        "imbalance_ratio": 125.0,
        "many": 2,
        "medium": 1,
        "few": 2,
        "empty": 1,
    }


# ---- samplers -----------------------------------------------------------------------------------------------------
COUNTS = [400, 100, 25, 4, 1]
LABELS = np.repeat(np.arange(len(COUNTS)), COUNTS)[np.random.default_rng(0).permutation(sum(COUNTS))].tolist()


def _class_freq(name: str, epoch: int = 0, draws: int = 20_000, **kw) -> np.ndarray:
    s = create_sampler(name, LABELS, num_samples=draws, **kw)
    s.set_epoch(epoch)
    idx = list(s)
    assert len(idx) == len(s) == draws and min(idx) >= 0 and max(idx) < len(LABELS)
    return np.bincount(np.asarray(LABELS)[idx], minlength=len(COUNTS)) / draws


def test_sampler_registry():
    assert SAMPLERS.names() == ["class-balanced", "instance", "progressive", "sqrt"]
    with pytest.raises(FinegrainError, match="class-balanced"):
        create_sampler("oversample", LABELS)
    with pytest.raises(ValueError, match="twice"):
        SAMPLERS.register("instance")(InstanceSampler)
    assert len(create_sampler("sqrt", LABELS, num_samples=None, seed=None)) == len(LABELS)
    with pytest.raises(ValueError, match="rank"):
        create_sampler("instance", LABELS, rank=2, world_size=2)
    with pytest.raises(ValueError, match="labels"):
        create_sampler("instance", [])
    with pytest.raises(ValueError, match="no parameter epochs; valid: labels, seed, num_samples, total_epochs"):
        create_sampler("progressive", LABELS, epochs=3)


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("instance", np.array(COUNTS) / sum(COUNTS)),
        ("class-balanced", np.full(5, 0.2)),
        ("sqrt", np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()),
    ],
)
def test_empirical_class_frequencies_match_the_target(name, target):
    np.testing.assert_allclose(create_sampler(name, LABELS).class_probabilities(), target)
    np.testing.assert_allclose(_class_freq(name), target, atol=0.015)  # ≥ 5 standard errors at 20,000 draws


def test_progressive_interpolates_instance_to_balanced():
    inst, bal = np.array(COUNTS) / sum(COUNTS), np.full(5, 0.2)
    s = create_sampler("progressive", LABELS, total_epochs=10)
    for epoch, t in [(0, 0.0), (5, 0.5), (10, 1.0), (12, 1.0)]:
        np.testing.assert_allclose(s.class_probabilities(epoch), (1 - t) * inst + t * bal)
    np.testing.assert_allclose(_class_freq("progressive", 0, total_epochs=10), inst, atol=0.015)
    np.testing.assert_allclose(_class_freq("progressive", 5, total_epochs=10), (inst + bal) / 2, atol=0.015)
    np.testing.assert_allclose(_class_freq("progressive", 10, total_epochs=10), bal, atol=0.015)


def test_instance_epoch_is_a_permutation():
    assert sorted(create_sampler("instance", LABELS)) == list(range(len(LABELS)))


@pytest.mark.parametrize(("n", "world"), [(36, 1), (27, 2), (31, 4)])
def test_instance_is_the_engines_training_order(n, world):
    """The engine trains in this order: one permutation an epoch from epoch_seed(seed, epoch, 1), padded with its own
    start so every rank takes as many steps, rank r taking every world-th index (seeded runs depend on it)."""
    labels = [i % 3 for i in range(n)]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(7, 2, 1))).tolist()
    padded = order + order[: -n % world]
    for rank in range(world):
        s = create_sampler("instance", labels, seed=7, total_epochs=3, rank=rank, world_size=world)
        s.set_epoch(2)
        assert list(s) == padded[rank::world] and len(s) == -(-n // world)


def test_shard_sampler_is_the_unpadded_evaluation_order():
    shards = [list(ShardSampler(10, rank=r, world_size=3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]] and len(ShardSampler(10, rank=1, world_size=3)) == 3


def test_a_rare_class_cycles_through_its_images_before_repeating():
    s = create_sampler("class-balanced", LABELS, num_samples=200)
    tiny = [i for i in s if LABELS[i] == 3]  # 4 images, drawn ~40 times
    assert len(tiny) >= 8 and len(set(tiny[:4])) == 4 and set(tiny[4:8]) == set(tiny[:4])


@pytest.mark.parametrize("name", ["instance", "class-balanced", "sqrt", "progressive"])
def test_draws_are_deterministic_per_seed_and_epoch(name):
    def draw(seed: int, epoch: int) -> list[int]:
        s = create_sampler(name, LABELS, seed=seed, total_epochs=4)
        s.set_epoch(epoch)
        return list(s)

    assert draw(0, 1) == draw(0, 1)
    assert draw(0, 1) != draw(0, 2) and draw(0, 1) != draw(1, 1)


@pytest.mark.parametrize("name", ["instance", "class-balanced", "sqrt", "progressive"])
@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_the_epoch_without_overlap(name, world):
    n = 30 * world
    whole = create_sampler(name, LABELS, seed=3, num_samples=n, total_epochs=4)
    whole.set_epoch(2)
    shards = []
    for rank in range(world):
        s = create_sampler(name, LABELS, seed=3, num_samples=n, total_epochs=4, rank=rank, world_size=world)
        s.set_epoch(2)
        shards.append(list(s))
    assert all(len(sh) == 30 for sh in shards)
    interleaved = [shards[i % world][i // world] for i in range(n)]
    assert interleaved == list(whole)  # rank r holds positions r, r + world, ...: disjoint and together the epoch


def test_uneven_shards_take_equal_steps():
    lens = [len(create_sampler("sqrt", LABELS, num_samples=31, rank=r, world_size=4)) for r in range(4)]
    assert lens == [8, 8, 8, 8]


# ---- evaluation ---------------------------------------------------------------------------------------------------
def test_shot_accuracy_by_hand():
    counts = [150, 120, 50, 10, 3, 30]  # many: 0, 1; medium: 2, 5 (absent from test); few: 3, 4
    y = np.array([0, 0, 1, 1, 1, 1, 2, 2, 3, 4, 4])
    pred = np.array([0, 1, 1, 1, 1, 0, 2, 0, 3, 0, 0])
    acc = per_class_accuracy(y, pred, len(counts))  # class 5 has no test image: NaN, left out of its group
    out = shot_accuracy(acc, counts)
    assert out == pytest.approx({"many_shot": (0.5 + 0.75) / 2, "medium_shot": 0.5, "few_shot": (1.0 + 0.0) / 2})
    assert list(out) == ["many_shot", "medium_shot", "few_shot"]
    assert shot_accuracy(acc, counts, many=40, few=5) == pytest.approx(
        {"many_shot": (0.5 + 0.75 + 0.5) / 3, "medium_shot": 1.0, "few_shot": 0.0}
    )
    empty = shot_accuracy([0.5, np.nan], [150, 3])
    assert empty == {"many_shot": 0.5, "medium_shot": None, "few_shot": None}  # None: no class with test images
    with pytest.raises(ValueError, match="same length"):
        shot_accuracy(acc[:-1], counts)


def test_per_class_vs_frequency_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    counts = [500, 200, 90, 40, 12, 3, 0]
    acc = [0.9, 0.85, 0.7, np.nan, 0.4, 0.1, 0.0]
    path = per_class_vs_frequency_plot(acc, counts, tmp_path / "plots" / "acc_vs_freq.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    with pytest.raises(ValueError, match="same length"):
        per_class_vs_frequency_plot(acc[:3], counts, tmp_path / "x.png")
