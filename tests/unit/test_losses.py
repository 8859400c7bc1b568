"""Losses: a contract suite over every LOSSES entry, then each loss against torch or its paper's formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.errors import FinegrainError
from finegrain.losses import LOSSES, CrossEntropy, LDAMLoss, create_loss
from finegrain.losses.class_balanced import effective_number_weights
from finegrain.losses.ldam import ldam_margins
from finegrain.models import NormedLinear
from finegrain.train.mixing import smooth_one_hot

B, C = 6, 5
COUNTS = [50, 20, 10, 5, 2]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * 3, torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("name", LOSSES.names())
class TestLossContract:
    def test_scalar_with_finite_gradients(self, name):
        logits, y = _batch()
        logits.requires_grad_(True)
        loss = create_loss(name, class_counts=COUNTS)(logits, y)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert logits.grad.shape == (B, C) and torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum() > 0

    def test_one_hot_soft_targets_equal_int_targets(self, name):
        logits, y = _batch(1)
        loss = create_loss(name, class_counts=COUNTS)
        torch.testing.assert_close(loss(logits, F.one_hot(y, C).float()), loss(logits, y))

    def test_accepts_class_counts_and_ignores_none(self, name):
        logits, y = _batch(2)
        plain = create_loss(name, class_counts=COUNTS)(logits, y)
        with_nones = create_loss(name, class_counts=COUNTS, label_smoothing=None, unused_option=None)(logits, y)
        torch.testing.assert_close(plain, with_nones)

    def test_fp16_logits_give_fp32_loss(self, name):
        logits, y = _batch(3)
        assert create_loss(name, class_counts=COUNTS)(logits.half(), y).dtype == torch.float32

    def test_mixed_soft_targets_give_finite_gradients(self, name):
        logits, y = _batch(7)
        logits.requires_grad_(True)
        soft = 0.3 * F.one_hot(y, C).float() + 0.7 * F.one_hot(y.flip(0), C).float()
        loss = create_loss(name, class_counts=COUNTS)(logits, soft)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0

    def test_label_smoothing_as_the_engine_passes_it(self, name):
        # The engine calls create_loss(name, label_smoothing=..., class_counts=...): int labels are smoothed like
        # mix_batch smooths soft targets, so both paths agree.
        logits, y = _batch(8)
        loss = create_loss(name, label_smoothing=0.1, class_counts=COUNTS)
        torch.testing.assert_close(loss(logits, y), loss(logits, smooth_one_hot(y, C, label_smoothing=0.1)))
        assert not torch.allclose(
            loss(logits, y), create_loss(name, label_smoothing=0.0, class_counts=COUNTS)(logits, y)
        )

    def test_set_epoch_if_any_keeps_a_finite_loss(self, name):
        logits, y = _batch(9)
        loss = create_loss(name, class_counts=COUNTS)
        for epoch in range(3):
            if hasattr(loss, "set_epoch"):
                loss.set_epoch(epoch, 3)
            assert torch.isfinite(loss(logits, y))


# The settings (and class counts) under which each loss is exactly plain cross-entropy.
REDUCES_TO_CE = {
    "ce": ({}, COUNTS),
    "focal": ({"gamma": 0.0}, COUNTS),
    "cb": ({"beta": 0.0}, COUNTS),
    "ldam": ({"max_margin": 0.0, "s": 1.0}, COUNTS),
    "logit-adjusted": ({"tau": 0.0}, COUNTS),
    "balanced-softmax": ({}, [7] * C),  # τ is fixed at 1: a uniform prior is the only neutral setting
}


def test_every_loss_has_a_reduction_to_ce():
    assert set(REDUCES_TO_CE) == set(LOSSES.names())


@pytest.mark.parametrize("name", sorted(REDUCES_TO_CE))
def test_reduces_to_plain_ce(name):
    params, counts = REDUCES_TO_CE[name]
    logits, y = _batch(10)
    loss = create_loss(name, class_counts=counts, **params)
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))
    soft = 0.4 * F.one_hot(y, C).float() + 0.6 * F.one_hot(y.flip(0), C).float()
    torch.testing.assert_close(loss(logits, soft), CrossEntropy()(logits, soft))


def test_cb_focal_with_beta_and_gamma_zero_is_ce():
    logits, y = _batch(11)
    loss = create_loss("cb", beta=0.0, base="focal", gamma=0.0, class_counts=COUNTS)
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_cb_sigmoid_focal_matches_the_reference_formula(gamma):
    """Cui et al.'s reference (src/cifar_main.py): Σ over the batch and classes of w_y (1 - p_t)^γ BCE, divided by
    the number of positives, p = sigmoid(z), p_t = p for the label and 1 - p elsewhere."""
    beta = 0.999
    logits, y = _batch(14)
    w = effective_number_weights(COUNTS, beta)
    t = F.one_hot(y, C).float()
    p = logits.sigmoid()
    p_t = torch.where(t == 1, p, 1 - p)
    bce = -(t * p.log() + (1 - t) * (1 - p).log())
    expected = (w[y][:, None] * (1 - p_t) ** gamma * bce).sum() / B
    base = "sigmoid-focal" if gamma else "sigmoid"
    loss = create_loss("cb", beta=beta, base=base, gamma=gamma or 1.0, class_counts=COUNTS)
    torch.testing.assert_close(loss(logits, y), expected)
    assert loss.head_bias_init(C) == pytest.approx(-math.log(C - 1))
    assert create_loss("cb", beta=beta, class_counts=COUNTS).head_bias_init(C) is None


def test_sigmoid_cb_loss_starts_a_new_head_at_the_reference_prior(tmp_path):
    from finegrain.config import TrainConfig
    from finegrain.train.regimes import Regime
    from finegrain.train.setup import build_classifier, init_head_bias_for_loss

    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "o"), backbone="resnet32_cifar", pretrained=False)
    model = build_classifier(cfg, Regime.parse("scratch"), [f"c{i}" for i in range(C)])
    init_head_bias_for_loss(model, create_loss("cb", base="sigmoid-focal", class_counts=COUNTS), cfg)
    torch.testing.assert_close(model.head.bias.detach(), torch.full((C,), -math.log(C - 1)))
    init_head_bias_for_loss(model, create_loss("ce"), cfg)  # softmax losses leave the head alone
    torch.testing.assert_close(model.head.bias.detach(), torch.full((C,), -math.log(C - 1)))


def test_focal_matches_formula():
    logits, y = _batch(12)
    p = logits.softmax(-1)[torch.arange(B), y]
    w = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    expected = (w[y] * (1 - p) ** 2 * -p.log()).mean()
    torch.testing.assert_close(create_loss("focal", gamma=2.0, weight=w.tolist())(logits, y), expected)


def test_class_balanced_weights_and_loss():
    beta = 0.99
    n = torch.tensor(COUNTS, dtype=torch.float64)
    w = (1 - beta) / (1 - beta**n)
    w = (w / w.sum() * C).float()
    torch.testing.assert_close(effective_number_weights(COUNTS, beta), w)
    assert w.argmin() == 0 and w.argmax() == C - 1  # the rarest class weighs most
    logits, y = _batch(13)
    expected = (w[y] * F.cross_entropy(logits, y, reduction="none")).mean()
    torch.testing.assert_close(create_loss("cb", beta=beta, class_counts=COUNTS)(logits, y), expected)
    # A soft row is weighted by Σ_c t_c w_c.
    soft = 0.25 * F.one_hot(y, C).float() + 0.75 * F.one_hot(y.flip(0), C).float()
    row = -(soft * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(
        create_loss("cb", beta=beta, class_counts=COUNTS)(logits, soft), ((soft @ w) * row).mean()
    )


def test_ldam_margins_follow_n_to_the_minus_quarter():
    m = ldam_margins(COUNTS, 0.5)
    n = torch.tensor(COUNTS, dtype=torch.float32)
    torch.testing.assert_close(m * n**0.25, torch.full((C,), float(m[0] * n[0] ** 0.25)))
    assert m.max() == pytest.approx(0.5) and m.argmax() == C - 1


def test_ldam_subtracts_the_margin_from_the_true_logit_then_scales():
    logits, y = _batch(14)
    cos = torch.tanh(logits)  # cosine-like logits in [-1, 1]
    m = ldam_margins(COUNTS, 0.5)
    expected = F.cross_entropy(30.0 * (cos - F.one_hot(y, C) * m), y)
    torch.testing.assert_close(create_loss("ldam", class_counts=COUNTS)(cos, y), expected)
    soft = 0.3 * F.one_hot(y, C).float() + 0.7 * F.one_hot(y.flip(0), C).float()
    expected_soft = CrossEntropy()(30.0 * (cos - soft * m), soft)
    torch.testing.assert_close(create_loss("ldam", class_counts=COUNTS)(cos, soft), expected_soft)


@pytest.mark.parametrize(("drw_start", "total", "first"), [(0.8, 200, 160), (0.7, 10, 7), (0.0, 5, 0), (1.0, 5, 5)])
def test_drw_switches_weights_at_the_right_epoch(drw_start, total, first):
    logits, y = _batch(15)
    cos = torch.tanh(logits)
    loss = LDAMLoss(drw_start=drw_start, drw_beta=0.999, class_counts=COUNTS)
    assert loss.drw_first_epoch(total) == first
    adjusted = 30.0 * (cos - F.one_hot(y, C) * ldam_margins(COUNTS, 0.5))
    plain = F.cross_entropy(adjusted, y)
    weighted = F.cross_entropy(adjusted, y, weight=effective_number_weights(COUNTS, 0.999))
    assert not torch.allclose(plain, weighted)
    for epoch in (0, first - 1, first, total - 1):
        if epoch < 0:
            continue
        loss.set_epoch(epoch, total)
        torch.testing.assert_close(loss(cos, y), weighted if epoch >= first else plain)


def test_ldam_without_drw_never_reweights():
    logits, y = _batch(16)
    loss = LDAMLoss(class_counts=COUNTS)
    before = loss(logits, y)
    loss.set_epoch(99, 100)
    assert loss.drw_first_epoch(100) is None
    torch.testing.assert_close(loss(logits, y), before)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_logit_adjustment_adds_tau_log_prior(tau):
    logits, y = _batch(17)
    prior = torch.tensor(COUNTS, dtype=torch.float32) / sum(COUNTS)
    expected = F.cross_entropy(logits + tau * prior.log(), y)
    torch.testing.assert_close(create_loss("logit-adjusted", tau=tau, class_counts=COUNTS)(logits, y), expected)


def test_balanced_softmax_is_logit_adjustment_with_tau_one():
    logits, y = _batch(18)
    expected = F.cross_entropy(logits + torch.tensor(COUNTS, dtype=torch.float32).log(), y)
    torch.testing.assert_close(create_loss("balanced-softmax", class_counts=COUNTS)(logits, y), expected)
    with pytest.raises(TypeError):
        create_loss("balanced-softmax", tau=2.0, class_counts=COUNTS)


@pytest.mark.parametrize("name", ["cb", "ldam", "logit-adjusted", "balanced-softmax"])
def test_count_based_losses_need_matching_class_counts(name):
    logits, y = _batch()
    with pytest.raises(ValueError, match="class_counts"):
        create_loss(name)
    with pytest.raises(ValueError, match="class_counts"):
        create_loss(name, class_counts=[-1, 2])
    with pytest.raises(ValueError, match="classes"):
        create_loss(name, class_counts=COUNTS + [3])(logits, y)


def test_a_class_without_training_images_keeps_losses_finite():
    logits, y = _batch(19)
    counts = [50, 20, 0, 5, 2]
    for name in ("cb", "ldam", "logit-adjusted", "balanced-softmax"):
        loss = create_loss(name, label_smoothing=0.1, class_counts=counts)
        assert torch.isfinite(loss(logits, y))


def test_long_tail_losses_reject_bad_parameters():
    with pytest.raises(ValueError, match="ce, focal, sigmoid, sigmoid-focal"):
        create_loss("cb", base="hinge", class_counts=COUNTS)
    with pytest.raises(ValueError, match="beta"):
        create_loss("cb", beta=1.0, class_counts=COUNTS)
    with pytest.raises(ValueError, match="gamma"):
        create_loss("focal", gamma=-1.0)
    with pytest.raises(ValueError, match="drw_start"):
        create_loss("ldam", drw_start=1.5, class_counts=COUNTS)
    with pytest.raises(ValueError, match="s must"):
        create_loss("ldam", s=0.0, class_counts=COUNTS)
    with pytest.raises(ValueError, match="label_smoothing"):
        create_loss("ldam", label_smoothing=1.0, class_counts=COUNTS)


def test_normed_linear_gives_cosines_and_trains_with_ldam():
    head = NormedLinear(8, C)
    x = torch.randn(B, 8) * 5
    out = head(x)
    assert out.shape == (B, C) and out.abs().max() <= 1 + 1e-6
    expected = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).t()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(C))
    _, y = _batch(20)
    create_loss("ldam", drw_start=0.5, class_counts=COUNTS)(head(x), y).backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_ce_equals_torch_with_smoothing(eps):
    logits, y = _batch(4)
    expected = F.cross_entropy(logits, y, label_smoothing=eps)
    torch.testing.assert_close(create_loss("ce", label_smoothing=eps)(logits, y), expected)


def test_ce_soft_smoothed_targets_equal_hard_smoothing():
    from finegrain.train.mixing import smooth_one_hot

    logits, y = _batch(5)
    soft = smooth_one_hot(y, C, label_smoothing=0.2)
    # Soft targets are used as given (mix_batch already smoothed them): no second smoothing.
    torch.testing.assert_close(CrossEntropy(0.2)(logits, soft), F.cross_entropy(logits, y, label_smoothing=0.2))


def test_ce_mixed_targets_are_linear():
    logits, y = _batch(6)
    y2, lam = y.flip(0), 0.3
    soft = lam * F.one_hot(y, C).float() + (1 - lam) * F.one_hot(y2, C).float()
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y2)
    torch.testing.assert_close(CrossEntropy()(logits, soft), expected)


def test_ce_rejects_bad_input():
    logits, y = _batch()
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(1.0)
    with pytest.raises(ValueError, match="soft targets"):
        CrossEntropy()(logits, torch.rand(B, C + 1))
    with pytest.raises(ValueError, match="target"):
        CrossEntropy()(logits, y.float())


def test_unknown_loss_lists_valid_names():
    with pytest.raises(FinegrainError, match="ce"):
        create_loss("hinge")


def test_registry_is_strict():
    with pytest.raises(ValueError, match="twice"):
        LOSSES.register("ce")(CrossEntropy)
