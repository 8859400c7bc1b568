import numpy as np

from finegrain.data import Sample
from finegrain.data.longtail import describe_counts, exponential_profile, make_longtailed, shot_groups
from finegrain.evaluate.longtail import shot_accuracy
from finegrain.evaluate.metrics import per_class_accuracy


def test_cifar10_lt_profile_matches_the_literature():
    profile = exponential_profile(5000, 10, 100)
    assert profile[0] == 5000 and profile[-1] == 50 and sum(profile) == 12406  # Cao et al.'s CIFAR-10-LT, ρ = 100


def test_make_longtailed_is_seeded_and_exact():
    samples = [Sample(f"{c}/{i}.jpg", c, "train") for c in range(5) for i in range(30)]
    a = make_longtailed(samples, imbalance_ratio=10, seed=0)
    b = make_longtailed(samples, imbalance_ratio=10, seed=0)
    c = make_longtailed(samples, imbalance_ratio=10, seed=1)
    assert a == b and a != c
    counts = np.bincount([s.label for s in a])
    assert counts.tolist() == exponential_profile(30, 5, 10) and describe_counts(counts)["imbalance_ratio"] == 10.0


def test_shot_groups_and_accuracy():
    counts = [150, 50, 10]
    assert shot_groups(counts).tolist() == ["many", "medium", "few"]
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 1, 0, 0, 0])
    assert shot_accuracy(per_class_accuracy(y, pred), counts) == {"many_shot": 1.0, "medium_shot": 0.5, "few_shot": 0.0}
