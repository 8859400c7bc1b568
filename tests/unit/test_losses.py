"""Losses: a contract suite over every LOSSES entry, then cross-entropy against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finegrain.errors import FinegrainError
from finegrain.losses import LOSSES, CrossEntropy, create_loss

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
