"""Fine-tuning parts on tiny tensors: augmentation presets, batch mixing, parameter groups, LR schedules, callbacks."""

from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from finegrain.backbones.preprocess import Preprocess
from finegrain.errors import FinegrainError
from finegrain.models.pooling import GeM
from finegrain.train.augment import AUGMENTATIONS, build_eval_transform, build_train_transform
from finegrain.train.callbacks import BestModel, EarlyStopping, FitState, MaxSteps, TimeBudget
from finegrain.train.mixing import MixConfig, mix_batch, smooth_one_hot
from finegrain.train.optim import build_optimizer, build_param_groups
from finegrain.train.schedule import LRSchedule

PRE = Preprocess(input_size=32, crop_pct=0.875)


def _noise_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
class TestAugmentationContract:
    @pytest.mark.parametrize(("w", "h", "mode"), [(37, 53, "RGB"), (61, 29, "RGB"), (33, 33, "L"), (45, 31, "RGBA")])
    def test_uint8_square_output(self, name, w, h, mode):
        out = build_train_transform(name, PRE)(_noise_image(w, h, mode))
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)

    def test_same_seed_same_output(self, name):
        t, img = build_train_transform(name, PRE), _noise_image(47, 39)
        torch.manual_seed(3)
        a = t(img)
        torch.manual_seed(3)
        assert torch.equal(a, t(img))

    def test_different_seeds_differ_except_none(self, name):
        t, img = build_train_transform(name, PRE), _noise_image(47, 39)
        outs = []
        for seed in range(3):
            torch.manual_seed(seed)
            outs.append(t(img))
        differ = any(not torch.equal(outs[0], o) for o in outs[1:])
        assert differ == (name != "none")

    def test_picklable(self, name):
        t, img = build_train_transform(name, PRE), _noise_image(40, 50)
        clone = pickle.loads(pickle.dumps(t))
        torch.manual_seed(7)
        a = t(img)
        torch.manual_seed(7)
        assert torch.equal(a, clone(img))


def test_none_and_eval_match_preprocess():
    img = _noise_image(41, 57)
    expected = PRE.pil_to_uint8(img)
    assert torch.equal(build_train_transform("none", PRE)(img), expected)
    assert torch.equal(build_eval_transform(PRE)(img), expected)


def test_augmentation_rejects_bad_input():
    with pytest.raises(FinegrainError, match="crop-flip"):
        build_train_transform("jitter", PRE)
    with pytest.raises(ValueError, match="scale"):
        build_train_transform("crop-flip", PRE, scale=(0.0, 1.0))


# ---------------------------------------------------------------- mixing


def _constant_batch(b: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i + 1, label i: where a pixel came from is readable from its value."""
    x = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, size, size).clone()
    return x, torch.arange(b)


MIXES = {
    "mixup": MixConfig(mixup_alpha=0.8),
    "cutmix": MixConfig(cutmix_alpha=1.0),
    "both": MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0),
}


@pytest.mark.parametrize("cfg", MIXES.values(), ids=MIXES.keys())
def test_mix_targets_are_distributions_and_reproducible(cfg):
    x, y = _constant_batch()
    results = []
    for _ in range(2):
        g = torch.Generator().manual_seed(11)
        results.append([mix_batch(x, y, 4, cfg, label_smoothing=0.1, generator=g) for _ in range(5)])
    for (xa, ta), (xb, tb) in zip(*results):
        torch.testing.assert_close(ta.sum(1), torch.ones(4))
        assert (ta >= 0).all() and ta.shape == (4, 4)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    lams = {round(float(t[0, 0]), 6) for _, t in results[0]}
    assert len(lams) > 1, "five batches drew the same lambda"


def test_mix_resumes_from_generator_state():
    x, y = _constant_batch()
    g = torch.Generator().manual_seed(5)
    mix_batch(x, y, 4, MIXES["both"], generator=g)
    state = g.get_state()
    a = mix_batch(x, y, 4, MIXES["both"], generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    b = mix_batch(x, y, 4, MIXES["both"], generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("cfg", [MixConfig(), MixConfig(mixup_alpha=1.0, prob=0.0)], ids=["alphas0", "prob0"])
def test_no_mixing_gives_smoothed_one_hot(cfg):
    x, y = _constant_batch()
    g = torch.Generator().manual_seed(0)
    xm, t = mix_batch(x, y, 6, cfg, label_smoothing=0.3, generator=g)
    assert torch.equal(xm, x)
    torch.testing.assert_close(t, smooth_one_hot(y, 6, label_smoothing=0.3))
    torch.testing.assert_close(t[0], torch.tensor([0.75, 0.05, 0.05, 0.05, 0.05, 0.05]))


def test_mixup_is_convex_combination_with_flipped_batch():
    x, y = _constant_batch()
    for seed in range(5):
        xm, t = mix_batch(x, y, 4, MIXES["mixup"], generator=torch.Generator().manual_seed(seed))
        lam = float(t[0, 0])
        torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))


def test_cutmix_area_matches_lambda():
    x, y = _constant_batch(size=20)
    boxes = 0
    for seed in range(10):
        xm, t = mix_batch(x, y, 4, MIXES["cutmix"], generator=torch.Generator().manual_seed(seed))
        for i in range(4):
            pasted = (xm[i] == x.flip(0)[i]).float().mean()
            torch.testing.assert_close(float(pasted), 1.0 - float(t[i, i]), atol=1e-6, rtol=0)
            assert torch.isin(xm[i], torch.tensor([float(i + 1), float(4 - i)])).all()
        boxes += int(float(t[0, 0]) < 1)
    assert boxes > 0


def test_mix_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        MixConfig(mixup_alpha=-1)
    with pytest.raises(ValueError, match="switch_prob"):
        MixConfig(switch_prob=2)
    x, y = _constant_batch()
    g = torch.Generator()
    with pytest.raises(ValueError, match="float"):
        mix_batch(x.to(torch.uint8), y, 4, MIXES["mixup"], generator=g)
    with pytest.raises(ValueError, match="labels"):
        mix_batch(x, y[:2], 4, MIXES["mixup"], generator=g)


# ---------------------------------------------------------------- parameter groups and optimizers


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.stage1 = nn.Sequential(nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4))
        self.stage2 = nn.Sequential(nn.Conv2d(4, 8, 1), nn.GroupNorm(2, 8))
        self.pool = GeM(learnable=True)
        self.head = nn.Linear(8, 3)
        self.pos = nn.Parameter(torch.zeros(1, 8, 2))
        for p in self.stem.parameters():
            p.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stage2(self.stage1(self.stem(x)))))


def _by_name(groups: list[dict]) -> dict[str, dict]:
    return {n: g for g in groups for n in g["param_names"]}


def test_param_groups_decay_and_coverage():
    model = _Tiny()
    groups = build_param_groups(model, lr=0.1, weight_decay=0.05)
    named = _by_name(groups)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(named) == sorted(trainable)
    assert sum(len(g["param_names"]) for g in groups) == len(trainable)
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert not any(n.startswith("stem.") for n in named)
    decayed = {n for n, g in named.items() if g["weight_decay"] > 0}
    assert decayed == {"stage1.0.weight", "stage2.0.weight", "head.weight"}
    assert named["pool.p"]["weight_decay"] == 0 and named["pos"]["weight_decay"] == 0
    for g in groups:
        assert g["lr"] == g["initial_lr"] == 0.1 and g["lr_scale"] == 1.0
        assert all(p is dict(model.named_parameters())[n] for p, n in zip(g["params"], g["param_names"]))


def _head_full_rest_tenth(name: str) -> float:
    return 1.0 if name.startswith("head.") else 0.1


def test_param_groups_lr_scales():
    scales = {"stage1": 0.25, "stage2": 0.5, "head": 1.0}  # e.g. layer-wise decay 0.5

    def lr_scale(name: str) -> float:
        return scales.get(name.split(".")[0], 0.1)

    groups = build_param_groups(_Tiny(), lr=0.2, weight_decay=0.01, lr_scale=lr_scale)
    named = _by_name(groups)
    assert named["stage1.0.weight"]["lr"] == pytest.approx(0.05)
    assert named["stage2.0.bias"]["lr"] == pytest.approx(0.1) and named["stage2.0.bias"]["weight_decay"] == 0
    assert named["head.weight"]["lr"] == pytest.approx(0.2) and named["head.weight"]["lr_scale"] == 1.0
    assert named["pool.p"]["lr_scale"] == 0.1
    keys = [(g["lr_scale"], g["weight_decay"] > 0) for g in groups]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize(("name", "cls"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_keeps_group_lrs(name, cls):
    model = _Tiny()
    groups = build_param_groups(model, lr=0.1, weight_decay=0.01, lr_scale=_head_full_rest_tenth)
    opt = build_optimizer(name, groups, lr=0.1)
    assert isinstance(opt, cls)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.01, 0.01, 0.1, 0.1])
    model(torch.randn(2, 3, 7, 7)).sum().backward()
    opt.step()
    assert opt.state_dict()["param_groups"][0]["lr_scale"] in (0.1, 1.0)


def test_optim_rejects_bad_input():
    groups = build_param_groups(_Tiny(), lr=0.1, weight_decay=0.0)
    with pytest.raises(FinegrainError, match="adamw"):
        build_optimizer("lamb", groups, lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer("sgd", groups, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="lr_scale"):
        build_param_groups(_Tiny(), lr=0.1, weight_decay=0.0, lr_scale=lambda name: -1.0)


def test_each_optimizer_gets_only_its_own_options():
    groups = build_param_groups(_Tiny(), lr=0.1, weight_decay=0.0)
    options = {"momentum": 0.5, "nesterov": False, "betas": (0.8, 0.9)}  # one config serves every optimizer
    sgd = build_optimizer("sgd", groups, lr=0.1, **options).defaults
    assert sgd["momentum"] == 0.5 and sgd["nesterov"] is False
    assert build_optimizer("adamw", groups, lr=0.1, **options).defaults["betas"] == (0.8, 0.9)
    unset = build_optimizer("sgd", groups, lr=0.1, momentum=None, nesterov=None, betas=None).defaults
    assert unset["momentum"] == 0.9 and unset["nesterov"] is True  # None keeps the optimizer's default
    assert build_optimizer("adamw", groups, lr=0.1, momentum=1.5).defaults["betas"] == (0.9, 0.999)  # not AdamW's
    with pytest.raises(ValueError, match="betas"):
        build_optimizer("adamw", groups, lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="no optimizer takes momentun"):
        build_optimizer("sgd", groups, lr=0.1, momentun=0.9)


# ---------------------------------------------------------------- schedules


def test_warmup_then_cosine_to_min():
    s = LRSchedule("cosine", total_steps=110, warmup_steps=10, warmup_start=0.1, min_lr_ratio=0.01)
    assert s.lr_factor(0) == pytest.approx(0.1)
    assert s.lr_factor(5) == pytest.approx(0.55)
    assert s.lr_factor(10) == pytest.approx(1.0)
    assert s.lr_factor(60) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.lr_factor(110) == pytest.approx(0.01) and s.lr_factor(500) == pytest.approx(0.01)
    factors = [s.lr_factor(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_step_and_constant():
    s = LRSchedule("step", total_steps=100, step_milestones=(0.5, 0.8), step_gamma=0.1)
    assert [s.lr_factor(i) for i in (0, 49, 50, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    c = LRSchedule("constant", total_steps=10, warmup_steps=4, warmup_start=0.0)
    assert [c.lr_factor(i) for i in (0, 2, 4, 9)] == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert not math.isnan(LRSchedule("cosine", total_steps=3, warmup_steps=3).lr_factor(3))


def test_apply_sets_scaled_lrs_statelessly():
    model = _Tiny()
    groups = build_param_groups(model, lr=0.1, weight_decay=0.0, lr_scale=_head_full_rest_tenth)
    opt = build_optimizer("sgd", groups, lr=0.1)
    s = LRSchedule("cosine", total_steps=20, warmup_steps=5, warmup_start=0.2)
    s.apply(opt, 13)
    factor = s.apply(opt, 2)  # going back (a resume) gives the same lrs as coming forward
    assert factor == pytest.approx(s.lr_factor(2))
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_scale"] * factor)
    plain = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.5)
    s.apply(plain, 0)
    s.apply(plain, 5)
    assert plain.param_groups[0]["lr"] == pytest.approx(0.5)


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="cosine"):
        LRSchedule("linear", total_steps=10)
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="step_milestones"):
        LRSchedule("step", total_steps=10, step_milestones=(0.8, 0.5))


# ---------------------------------------------------------------- callbacks
def _fake_trainer(val: list | None = None, *, test_seconds: float = 0.0) -> SimpleNamespace:
    """What the callbacks read of a Trainer; rank > 0, so nothing is written. The test split's pass takes
    `test_seconds` (10 images at a tenth of it each)."""
    splits = SimpleNamespace(val=[1] if val is None else val, test=list(range(10)))
    t = SimpleNamespace(planned_epochs=10, steps_per_epoch=4, splits=splits, dist=SimpleNamespace(is_main=False))
    t.steps = SimpleNamespace(eval_pace=lambda: test_seconds / 10)
    t.plan_epochs = lambda n: setattr(t, "planned_epochs", n)
    return t


def test_time_budget_plans_the_epochs_that_fit_and_stops_when_spent():
    clock = [0.0]  # a driven clock: no wall time in this test
    trainer, budget = _fake_trainer(), TimeBudget(1.0, now=lambda: clock[0])  # 60 s
    budget.on_epoch_start(trainer, 0)
    clock[0] += 10.0  # an epoch of 10 s
    assert not budget.on_epoch_end(trainer, FitState(), 0, {"seconds": 15.0})  # 45 s left: 4 more epochs
    assert trainer.planned_epochs == 5
    assert not budget.on_epoch_end(trainer, FitState(), 1, {"seconds": 20.0})  # a plan is never raised again
    assert trainer.planned_epochs == 5
    budget.on_epoch_start(trainer, 4)
    assert budget.on_epoch_end(trainer, FitState(), 4, {"seconds": 60.0})
    assert MaxSteps(8).on_epoch_end(trainer, FitState(), 1, {}) and not MaxSteps(9).on_epoch_end(trainer, None, 1, {})
    # the final test pass (here 20 s at its measured pace) is reserved: 25 s left for epochs of 10 s -> 2 more
    trainer, budget = _fake_trainer(test_seconds=20.0), TimeBudget(1.0, now=lambda: clock[0])
    budget.on_epoch_start(trainer, 0)
    clock[0] += 10.0
    assert not budget.on_epoch_end(trainer, FitState(), 0, {"seconds": 15.0}) and trainer.planned_epochs == 3
    assert budget.on_epoch_end(trainer, FitState(), 2, {"seconds": 41.0})  # 41 + 20 s of test: spent


def test_best_model_judges_improvement_and_early_stopping_counts_from_it(tmp_path):
    trainer, state = _fake_trainer(), FitState()
    best, patience = BestModel(str(tmp_path)), EarlyStopping(2)
    stops = []
    for epoch, top1 in enumerate([0.5, 0.4, 0.6, 0.6, 0.3, 0.9]):
        best.on_epoch_end(trainer, state, epoch, {"val_top1": top1})
        stops.append(patience.on_epoch_end(trainer, state, epoch, {"val_top1": top1}))
    assert (state.best_epoch, state.best_val_top1) == (5, 0.9)
    assert stops == [False, False, False, False, True, False]  # a tie is no improvement
    state = FitState()
    best.on_epoch_end(_fake_trainer(val=[]), state, 0, {"val_top1": math.nan})
    assert state.best_epoch == 0 and math.isnan(state.best_val_top1)  # without val the newest model is kept
