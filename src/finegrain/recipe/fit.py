"""`finegrain fit DATA --out DIR --budget-min M`: from a folder of labelled images to the best model finegrain can
make in the budget, chosen without the test split: frozen candidates (and their ensembles) by K-fold out-of-fold
predictions over every training image (recipe/oof.py), a fine-tune (which cannot be cross-validated) against them on
a validation split carved from train, the same images for both.

Order of work (expected value per second first): frozen-feature classifiers over the extraction views (the eval view,
then 256 px full frame + flip), fine-tuning in what time is left, then ensembles of the best candidates. The winner
is refitted on train + val when that is cheap (frozen heads), saved as one model folder (`finegrain.load` reads it),
and scored once on the test split. A killed run, started again with the same arguments, resumes: feature stores
and scored candidates are reused, a fine-tune continues from its checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from finegrain.atomic import atomic_write_json, atomic_write_text
from finegrain.config import FitConfig, TrainConfig, config_dict, save_config, save_splits
from finegrain.data import ImageSet, Sample, load_image_set
from finegrain.errors import FinegrainError
from finegrain.faults import kill_point
from finegrain.recipe.candidates import (
    Candidate,
    ensembles,
    finetune_candidate,
    noise_multiple,
    paired_difference,
    parse_backbones,
    pick,
)
from finegrain.recipe.frozen import FrozenStage
from finegrain.recipe.no_validation import NO_VAL_SELECTION, choose_without_validation
from finegrain.recipe.oof import Folds, make_folds
from finegrain.recipe.unlabeled import final_semi_model, run_semi, unlabeled_paths
from finegrain.runtime.settings import resolve_device
from finegrain.train.data import make_splits

FINETUNE_MIN_SECONDS = 120  # below this a fine-tune cannot do one useful pass on top of its LP start (cub100's size)
FINETUNE_FLOOR_SECONDS = 45  # a small set's floor: the trunk cache, its LP start and a few epochs of the last stage


@dataclass
class FitResult:
    """What `fit` made: the output folder, the chosen candidate and the leaderboard (best first), the test summary
    (None without a test split) and the seconds it took. `model` loads the saved model (on the engine and device
    fit's test pass used) the first time it is read; `predict` / `predict_proba` / `classes` are the model's."""

    out: str
    chosen: Candidate
    leaderboard: list[Candidate]
    test: dict | None
    seconds: float
    runtime: str = "auto"
    device: str = "cpu"
    _model: object = field(default=None, repr=False, compare=False)

    @property
    def model(self):
        if self._model is None:
            from finegrain.evaluate.predictor import load

            self._model = load(os.path.join(self.out, "model"), device=self.device, runtime=self.runtime)
        return self._model

    @property
    def test_top1(self) -> float | None:
        return self.test["metrics"]["top1"] if self.test else None

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def predict(self, images, *, k: int = 1, tta=None):
        return self.model.predict(images, k=k, tta=tta)

    def predict_proba(self, images, **kwargs):
        return self.model.predict_proba(images, **kwargs)


class Clock:
    """The budget of the whole command, in seconds. `now`: the time source (seconds; `time.perf_counter`), which
    tests replace to drive the budget without the wall clock: `fit(cfg, clock=Clock(1.0, now=...))`."""

    def __init__(self, budget_min: float, now=time.perf_counter) -> None:
        self.now = now
        self.t0, self.budget = now(), 60.0 * budget_min

    def elapsed(self) -> float:
        return self.now() - self.t0

    def remaining(self) -> float:
        return self.budget - self.elapsed()


@dataclass(frozen=True)
class FitContext:
    """What every stage of one fit reads, built once: the config, the data relabelled with fit's splits, the
    candidate store, the frozen stage (with its cost model), the budget's clock, the unlabeled images, the data's
    warnings and whether to show progress."""

    cfg: FitConfig
    data: ImageSet
    splits: object
    store: CandidateStore
    frozen: FrozenStage
    clock: Clock
    upaths: list[str]
    notes: list[str]
    progress: bool

    @property
    def y_val(self) -> np.ndarray:
        return np.array([s.label for s in self.splits.val])

    @property
    def n_test(self) -> int:
        return len(self.splits.test)

    @property
    def train_counts(self) -> np.ndarray:
        """Training images a class [C] of the model fit saves (train + val: it is refitted on both)."""
        return np.bincount([s.label for s in self.splits.train + self.splits.val], minlength=len(self.data.classes))


@dataclass(frozen=True)
class Choice:
    """The outcome of choosing: the leaderboard (best first), the chosen candidate, the reason, the folds."""

    board: list[Candidate]
    chosen: Candidate
    reason: str
    folds: Folds | None


class CandidateStore:
    """Scored candidates, their validation probabilities and (frozen ones) their out-of-fold probabilities over
    every training image, saved as they finish (a rerun resumes)."""

    def __init__(self, out: str, cfg: FitConfig) -> None:
        self.dir = os.path.join(out, "fit-state")
        key = {k: v for k, v in config_dict(cfg).items() if k not in ("workers", "bootstrap")}
        key["device"] = resolve_device(key.get("device", "cpu"))  # "auto" names the device it resolves to here
        for opt in ("unlabeled", "transductive", "backbones"):  # unset: the key a fit had before the option existed
            if not key.get(opt):
                key.pop(opt, None)
        self.key = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.candidates: dict[str, Candidate] = {}
        self.probas: dict[str, np.ndarray] = {}
        self.oof: dict[str, np.ndarray] = {}
        self.reused: dict[str, list[str]] = {"candidates": [], "views": []}  # what a resumed run found done
        path = os.path.join(self.dir, "candidates.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("key") != self.key:
                raise FinegrainError(f"{out} holds a fit with other settings: rerun with the same ones or a new --out")
            for c in saved["candidates"]:
                self.candidates[c["name"]] = Candidate(**c)
                self.probas[c["name"]] = np.load(self._proba_path(c["name"]))
                if self.candidates[c["name"]].estimate.startswith("oof"):
                    self.oof[c["name"]] = np.load(self._proba_path(c["name"], "oof"))
            self.reused["candidates"] = list(self.candidates)

    def _proba_path(self, name: str, kind: str = "val") -> str:
        key = hashlib.sha1(name.encode()).hexdigest()[:16]
        return os.path.join(self.dir, key + (".npy" if kind == "val" else f"-{kind}.npy"))

    def _save(self, path: str, array: np.ndarray) -> None:
        tmp = path + ".tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, path)

    def add(self, cand: Candidate, proba: np.ndarray, oof: np.ndarray | None = None) -> None:
        """Record a scored candidate: probabilities [N_val, C] on the validation split, and with an out-of-fold
        estimate its OOF probabilities [N_train_all, C] (written before the candidate is listed)."""
        os.makedirs(self.dir, exist_ok=True)
        self._save(self._proba_path(cand.name), proba)
        if oof is not None:
            self._save(self._proba_path(cand.name, "oof"), oof)
            self.oof[cand.name] = oof
        self.candidates[cand.name], self.probas[cand.name] = cand, proba
        rows = [asdict(c) for c in self.candidates.values()]
        atomic_write_json(os.path.join(self.dir, "candidates.json"), {"key": self.key, "candidates": rows})
        kill_point("candidate", len(self.candidates))  # tests of resume (finegrain/faults.py)


def _check_data(image_set: ImageSet, splits) -> list[str]:
    """One-line errors for data no classifier can be chosen on; warnings (returned) for what `fit` works around."""
    counts = np.bincount([s.label for s in splits.train], minlength=len(image_set.classes))
    labelled = splits.train + splits.val
    missing = [s.path for s in labelled if not os.path.isfile(s.path)]
    if labelled and len(missing) == len(labelled):
        raise FinegrainError(f"none of the {len(labelled)} training images of {image_set.root} exists (e.g. "
                             f"{missing[0]}): check the paths in the manifest or the folder")  # fmt: skip
    if (counts > 0).sum() < 2:
        raise FinegrainError(
            f"{image_set.root}: fit needs at least 2 classes with training images; found {(counts > 0).sum()}"
        )
    notes = list(image_set.warnings)
    if missing:
        notes.append(f"{len(missing)} of {len(labelled)} training images do not exist (e.g. {missing[0]}): skipped")
    val_classes = {s.label for s in splits.val}
    lonely = [image_set.classes[c] for c in range(len(counts)) if counts[c] > 0 and c not in val_classes]
    if not splits.val:
        notes.append("no validation possible: every class has a single training image; fit makes its documented "
                     "choice instead of a measured one (recipe/no_validation.py)")  # fmt: skip
    elif lonely:
        notes.append(
            f"{len(lonely)} class(es) have too few images for a validation image (e.g. {lonely[0]!r}): they are "
            "trained on but the choice is made on the other classes"
        )
    unseen = sorted({image_set.classes[s.label] for s in splits.test if counts[s.label] == 0})
    if unseen:
        notes.append(f"{len(unseen)} test class(es) have no training image (e.g. {unseen[0]!r}): always wrong")
    return notes


def _check_out(out: str) -> None:
    """A one-line error, before any work, when `out` cannot be written."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".finegrain-write-check")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as e:
        raise FinegrainError(f"cannot write to {out} ({e.strerror or e}): give --out a folder you can write") from None


def _relabelled(image_set: ImageSet, splits) -> ImageSet:
    """The image set with each sample's split set to fit's own train / val / test."""
    samples = [Sample(s.path, s.label, name) for name in ("train", "val", "test") for s in getattr(splits, name)]
    return ImageSet(image_set.root, image_set.classes, samples, list(image_set.warnings))


def fit(cfg: FitConfig, *, progress: bool = True, clock: Clock | None = None) -> FitResult:
    """Run (or resume) `fit`; returns the chosen candidate, the leaderboard and the test metrics. `clock`: the
    budget's clock (default: `Clock(cfg.budget_min)` on the wall clock)."""
    if cfg.budget_min <= 0:
        raise FinegrainError(f"budget_min must be positive (minutes), got {cfg.budget_min}")
    if not cfg.out:
        raise FinegrainError("fit needs an output folder: --out DIR")
    parse_backbones(cfg.backbones, cfg.backbone)  # an unknown name is a one-line error before any work
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    _check_out(cfg.out)
    clock = clock or Clock(cfg.budget_min)
    image_set = load_image_set(cfg.data)
    splits = make_splits(image_set, val_fraction=cfg.val_fraction, seed=cfg.seed)
    notes = _check_data(image_set, splits)
    upaths = unlabeled_paths(cfg.unlabeled, image_set) if cfg.unlabeled else []
    for note in notes:
        print(f"fit: warning: {note}", flush=True)
    data = _relabelled(image_set, splits)
    state = CandidateStore(cfg.out, cfg)
    if state.reused["candidates"]:
        print(f"fit: resuming the fit in {cfg.out}: {len(state.reused['candidates'])} scored candidates reused "
              "(extracted features and a fine-tune's checkpoint are reused as they are found)", flush=True)  # fmt: skip
    save_config(cfg, cfg.out, extra={"splits": {k: len(getattr(splits, k)) for k in ("train", "val", "test")}})
    # the final model learns from train + val (refit): evaluate and report score only the test images
    learned, tested = [s.path for s in splits.train + splits.val], [s.path for s in splits.test]
    save_splits(cfg.out, data=cfg.data, how=splits.note, splits={"train": learned, "test": tested})
    upaths = _with_test_images(cfg, upaths, splits)
    frozen = FrozenStage(cfg, data, state, clock, progress=progress)
    ctx = FitContext(cfg, data, splits, state, frozen, clock, upaths, notes, progress)
    choice = _choose(ctx) if splits.val else _choose_without_validation(ctx)  # one image a class: no scoring
    print(f"fit: chose {choice.chosen.name}: {choice.reason}", flush=True)
    model_dir = _build_final(ctx, choice.chosen)
    _save_calibration(ctx, choice, model_dir)
    test = _score_test(cfg, model_dir, splits, image_set, progress=progress) if splits.test else None
    _write_outputs(ctx, choice, test)
    return FitResult(cfg.out, choice.chosen, choice.board, test, clock.elapsed(), runtime=cfg.runtime,
                     device=cfg.device)  # fmt: skip


def _choose_without_validation(ctx: FitContext) -> Choice:
    chosen, reason = choose_without_validation(ctx.frozen, len(ctx.splits.train), ctx.upaths)
    ctx.store.add(chosen, np.zeros((0, len(ctx.data.classes))))
    return Choice([chosen], chosen, reason, None)


def _choose(ctx: FitContext) -> Choice:
    """Score every candidate that fits the budget and pick one."""
    cfg, data, splits, state, frozen, clock, upaths = (
        ctx.cfg, ctx.data, ctx.splits, ctx.store, ctx.frozen, ctx.clock, ctx.upaths
    )  # fmt: skip
    y_val = ctx.y_val
    folds = _folds(splits, cfg.seed)
    frozen.run(y_val, n_test=len(splits.test), folds=folds)
    if upaths:
        run_semi(frozen, y_val, upaths, n_test=len(splits.test), folds=folds)
    balanced = _long_tail(state, splits, len(data.classes), y_val, folds)
    if cfg.finetune:  # keep the test pass of the fine-tuned model's ensemble with the frozen leader
        # (issue 23, cub100 at 5 minutes: with the time for either alone, a 108 s fine-tune whose every ensemble's
        # test pass then did not fit was thrown away; alone it trailed the leader by 3 points)
        leader = frozen.leader_cost(len(splits.test)) or 0.0
        reserve = frozen.test_cost(_finetune_view(state, frozen), len(splits.test)) + leader + 20.0
        _finetune(ctx, reserve=reserve)
    untried = frozen.untried(len(splits.test))  # time the fine-tune left (or did not need): views skipped before it
    if untried:
        print(f"fit: time left: trying the views skipped before ({', '.join(untried)})")
        frozen.run(y_val, n_test=len(splits.test), folds=folds, late=True)
        if balanced:
            from finegrain.recipe.longtail import add_logit_adjusted

            add_logit_adjusted(state, ctx.train_counts, y_val, folds)
    rank_by = "mean_per_class" if balanced else "top1"
    state.candidates = {name: replace(c, rank_by=rank_by) for name, c in state.candidates.items()}
    pool = list(state.candidates.values())
    if cfg.ensemble and len(pool) > 1:
        y_oof = folds.y if folds is not None else None
        for cand, proba in ensembles(pool, state.probas, y_val, oof=state.oof, y_oof=y_oof):
            state.candidates.setdefault(cand.name, cand)
            state.probas.setdefault(cand.name, proba)
    # cross-validated candidates first (by their out-of-fold score), then those scored on the validation split only
    board = sorted(state.candidates.values(), key=lambda c: (c.estimate == "val", -c.score[0], -c.score[1], c.name))
    affordable = _affordable(board, state, frozen, clock, len(splits.test))
    chosen, challenger = pick(affordable, state.probas, y_val)
    among = sum(c.estimate == "val" and "member_only" not in c.params for c in affordable)
    margin = _margin(chosen, challenger, state, y_val, among=among)
    reason = _reason(chosen, challenger, affordable, len(board), folds=folds, n_val=len(splits.val), margin=margin)
    return Choice(board, chosen, reason, folds)


def _long_tail(state: CandidateStore, splits, n_classes: int, y_val: np.ndarray, folds) -> bool:
    """On long-tailed data (imbalance ratio >= 3): logit-adjusted probes join, and every candidate is ranked by mean
    per-class accuracy. Returns whether it is."""
    from finegrain.data.longtail import describe_counts
    from finegrain.recipe.longtail import LT_IMBALANCE, add_logit_adjusted

    counts = np.bincount([s.label for s in splits.train + splits.val], minlength=n_classes)
    ratio = describe_counts(counts)["imbalance_ratio"]
    if not ratio >= LT_IMBALANCE:
        return False
    added = add_logit_adjusted(state, counts, y_val, folds)
    print(f"fit: long-tailed data (imbalance {ratio:.1f}): ranked by mean per-class accuracy; {len(added)} "
          "logit-adjusted probes added", flush=True)  # fmt: skip
    return True


def _with_test_images(cfg: FitConfig, upaths: list[str], splits) -> list[str]:
    """With cfg.transductive, the test images (paths only) join the unlabeled ones; said once, loudly."""
    if not cfg.transductive:
        return upaths
    if not splits.test:
        raise FinegrainError("--transductive uses the test images as unlabeled data, but this data has no test split")
    print(
        f"fit: transductive: the {len(splits.test)} test images join the unlabeled pool (labels unread); "
        "the test score will be transductive, reported as test_transductive",
        flush=True,
    )
    return upaths + [s.path for s in splits.test]


def _affordable(board: list[Candidate], state: CandidateStore, frozen: FrozenStage, clock: Clock, n_test: int):
    """The candidates whose test pass still fits in the budget (at least the cheapest one)."""
    cost = {c.name: frozen.candidate_cost(c, state.candidates, n_test) for c in board}
    fits = [c for c in board if cost[c.name] <= clock.remaining() - 15.0]
    for c in board:
        if c not in fits:
            frozen.skipped.append({"candidate": c.name, "why": f"its test pass (~{cost[c.name]:.0f} s) does not fit"})
    return fits or [min(board, key=lambda c: cost[c.name])]


def _folds(splits, seed: int) -> Folds | None:
    """K folds over every training image (fit's train + val); None, said once, when a class has < 2 images."""
    samples = splits.train + splits.val
    folds = make_folds([s.path for s in samples], np.array([s.label for s in samples]), seed=seed)
    if folds is None:
        print("fit: no out-of-fold estimates (a class has fewer than 2 training images): choosing on validation")
    return folds


def _scores(c: Candidate, *, on_val: bool = False) -> str:
    if on_val or c.estimate == "val":
        return f"{c.val_top1:.4f}, mean per-class {c.val_mean_per_class:.4f}"
    return f"{c.oof_top1:.4f}, mean per-class {c.oof_mean_per_class:.4f}"


def _margin(chosen: Candidate, challenger: Candidate | None, state: CandidateStore, y_val: np.ndarray, *,
            among: int = 1) -> str:  # fmt: skip
    """The paired difference on the validation split between the chosen candidate and its challenger, and its
    standard error, in words ('' without a challenger); `among`: how many validation-only candidates competed."""
    if challenger is None or chosen.name not in state.probas or challenger.name not in state.probas:
        return ""
    ranked = sorted((chosen, challenger), key=lambda c: c.estimate == "val")  # the out-of-fold one first
    diff, se = paired_difference(state.probas[ranked[1].name], state.probas[ranked[0].name], y_val,
                                 rank_by=chosen.rank_by)  # fmt: skip
    text = f"validation-only minus out-of-fold candidate: {100 * diff:+.1f} points, standard error {100 * se:.1f}"
    return text + (f", the best of {among} validation-only candidates: it must win by {noise_multiple(among):.1f} "
                   "standard errors" if among > 1 else "")  # fmt: skip


def _reason(chosen, challenger, affordable: list[Candidate], n_all: int, *, folds, n_val: int, margin="") -> str:
    """Why `chosen` won: the estimate it was ranked by, what it was compared with and on which images."""
    n_oof = sum(c.estimate != "val" for c in affordable)
    what = "mean per-class accuracy (long-tailed data)" if chosen.rank_by == "mean_per_class" else "top-1"
    if chosen.estimate != "val":
        text = f"highest {folds.k}-fold out-of-fold {what} over all {len(folds.y)} training images "
        text += f"({_scores(chosen)}) of {n_oof} cross-validated candidates (frozen heads and their ensembles)"
    else:
        text = f"highest validation {what} ({_scores(chosen, on_val=True)}) on the {n_val}-image validation split"
        text += f" of {len(affordable) - n_oof} candidates scored there only" if n_oof else ""
    if len(affordable) < n_all:
        text += f"; {n_all - len(affordable)} more candidates' test pass did not fit in the time left (see fit.json)"
    if challenger is not None:
        a, b = _scores(chosen, on_val=True), _scores(challenger, on_val=True)
        if chosen.estimate == "val":
            text += f"; it beat the best out-of-fold candidate, {challenger.name}, on the {n_val} validation-split "
            text += "images "
        else:
            text += f"; the best candidate scored on the validation split only, {challenger.name}, did not beat it on "
            text += f"the {n_val} validation-split images "
        text += (
            f"(the same images for both: {a} vs {b}; {margin}; a fine-tune, alone or in an ensemble, cannot be "
            "cross-validated, so it is compared with the best out-of-fold candidate there and must win by more than "
            "the noise of the paired difference; within it, the out-of-fold one is kept)"
        )
    fallback = [c.name for c in affordable if c.kind == "frozen" and "oof" in c.params and c.estimate == "val"]
    if fallback:
        text += f"; {len(fallback)} frozen candidates kept their validation-split score (out-of-fold pass did not "
        text += f"fit in the budget, e.g. {fallback[0]})"
    if folds is None:
        text += "; no out-of-fold estimate: a class has fewer than 2 training images"
    runner = next((c for c in affordable if c.name != chosen.name and c.estimate == chosen.estimate), None)
    if runner is not None:
        text += f"; next on that estimate: {runner.name} ({_scores(runner)})"
    return text


def _finetune_view(state: CandidateStore, frozen: FrozenStage) -> str:
    """The view whose geometry the fine-tune trains and predicts at: with small images, the low-resolution view when
    its best frozen candidate scores at least as well as the eval view's (a fraction of the compute an epoch), else
    the eval view (the weights' own geometry)."""
    low = next((v for v in frozen.views if v.startswith("low")), None)
    if low is None:
        return "eval"

    def best(view: str) -> float:
        scores = [c.score for c in state.candidates.values() if c.kind == "frozen" and c.params.get("view") == view]
        return max(scores, default=(-1.0, -1.0))[0]

    return low if best(low) >= best("eval") else "eval"


def _finetune(ctx: FitContext, *, reserve: float) -> None:
    """Fine-tune in the time left (regime=auto from the data and that time, LP-FT start), scored on fit's val, at the
    geometry of `_finetune_view`."""
    from finegrain.train.engine import Trainer

    cfg, data, splits, state, clock, frozen, progress = (
        ctx.cfg, ctx.data, ctx.splits, ctx.store, ctx.clock, ctx.frozen, ctx.progress
    )  # fmt: skip

    name = "finetune"
    if name in state.candidates:
        return
    val_paths = [s.path for s in splits.val]
    available = clock.remaining() - reserve - 2.0 * len(val_paths) * state_spi(state)  # + val prediction
    # two training passes (a training step ~3 forward passes of the eval view), within the floor and the cap: a
    # small set can fine-tune in the minute or two a larger one cannot use (rsscn7 at 5 min ended at 161 s without)
    least = min(FINETUNE_MIN_SECONDS, max(FINETUNE_FLOOR_SECONDS, 6 * len(splits.train) * frozen._estimate_spi("eval")))
    if available < least:
        print(f"fit: no fine-tuning: {max(available, 0):.0f} s left after the frozen candidates", flush=True)
        return
    run = os.path.join(cfg.out, "candidates", name)
    resume = os.path.exists(os.path.join(run, "checkpoint-last.pt"))
    view = _finetune_view(state, frozen)
    geo = {"image_size": frozen.views[view]["image_size"], "crop_pct": frozen.views[view]["crop_pct"]}
    tcfg = TrainConfig(
        data=cfg.data, out=run, backbone=cfg.backbone, regime="auto", head_init="probe", epochs=30,
        time_budget_min=0.85 * available / 60, seed=cfg.seed, workers=cfg.workers, device=cfg.device, resume=resume,
        **(geo if view != "eval" else {}),
    )  # fmt: skip
    t0 = time.perf_counter()
    no_test = ImageSet(data.root, data.classes, [s for s in data.samples if s.split != "test"])  # fit scores test
    trainer = Trainer(tcfg, progress=progress, image_set=no_test)
    try:
        if trainer.setup().cfg.regime == "head" and not resume:
            # under one training pass of the backbone: a head on frozen features, which the probes already are
            print(f"fit: no fine-tuning: {trainer.regime_choice.reason}", flush=True)
            return
        trainer.fit()
    finally:
        trainer.close()
    y_val = np.array([s.label for s in splits.val])
    seconds = time.perf_counter() - t0
    params = {"view": view}
    state.add(*finetune_candidate(name, run, val_paths, y_val, len(data.classes), cfg, seconds=seconds, params=params))


def state_spi(state: CandidateStore) -> float:
    """Seconds an image of the costliest view measured so far (for time estimates); 0.05 before any."""
    return max((c.params.get("spi", 0.0) for c in state.candidates.values()), default=0.0) or 0.05


def _build_final(ctx: FitContext, chosen: Candidate) -> str:
    """Save the chosen candidate as <out>/model (frozen heads refitted on train + val); returns the folder."""
    from finegrain.evaluate.predictor import Ensemble, Predictor, load

    cfg, state, frozen, upaths = ctx.cfg, ctx.store, ctx.frozen, ctx.upaths

    names = chosen.members or [chosen.name]
    members = []
    for name in names:
        cand = state.candidates[name]
        if cand.kind == "finetune":
            members.append(load(cand.params["run"]))
        elif cand.kind == "semi":
            members.append(Predictor(*final_semi_model(frozen, cand, upaths), cfg.device))
        else:
            model, spec = frozen.final_model(cand)
            members.append(Predictor(model, spec, cfg.device))
    tmp, final = os.path.join(cfg.out, "model.tmp"), os.path.join(cfg.out, "model")
    shutil.rmtree(tmp, ignore_errors=True)
    if len(members) == 1:
        from finegrain.models import save_model

        save_model(members[0].model, tmp, members[0].spec)
    else:
        Ensemble(members).save(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _save_calibration(ctx: FitContext, choice: Choice, model_dir: str) -> None:
    """<model>/conformal.json: the chosen candidate's probabilities on images it did not train on (out-of-fold over
    every training image where it has them, else the validation split) calibrate its prediction sets
    (evaluate/conformal.py; on long-tailed data by bands of training counts, so the rare classes keep their
    coverage). The saved model is refitted on train + val, so the calibration is the cross-validated approximation
    (CV+), not exact split conformal."""
    from finegrain.evaluate.conformal import Conformal, count_bands

    store, chosen = ctx.store, choice.chosen
    names = chosen.members or [chosen.name]
    if choice.folds is not None and all(n in store.oof for n in names):
        proba, y, on = sum(store.oof[n] for n in names) / len(names), choice.folds.y, "out-of-fold"
    elif ctx.splits.val and chosen.name in store.probas:
        proba, y, on = store.probas[chosen.name], ctx.y_val, "validation split"
    else:
        return  # nothing held out to calibrate on (one image a class)
    groups = count_bands(ctx.train_counts) if chosen.rank_by == "mean_per_class" else None  # long-tailed
    conf = Conformal("lac", groups=groups).fit(proba, y)
    atomic_write_json(os.path.join(model_dir, "conformal.json"), {**conf.to_dict(), "calibrated_on": on})


def _score_test(cfg: FitConfig, model_dir: str, splits, image_set: ImageSet, *, progress: bool) -> dict:
    """The saved model on the test split, once: the summary with bootstrap intervals and shot groups, and the
    coverage and size of its prediction sets (evaluate.evaluation.set_coverage)."""
    from finegrain.evaluate.evaluation import set_coverage
    from finegrain.evaluate.inference import predict_paths
    from finegrain.evaluate.predictor import load
    from finegrain.evaluate.summary import summarize

    paths = [s.path for s in splits.test]
    y = np.array([s.label for s in splits.test])
    predictor = load(model_dir, runtime=cfg.runtime)
    pred = predict_paths(predictor, paths, precision=cfg.precision, workers=cfg.workers, progress=progress)
    counts = np.bincount([s.label for s in splits.train + splits.val], minlength=len(image_set.classes))
    summary = summarize(pred.proba, y[pred.index], image_set.classes, train_counts=counts, n_boot=cfg.bootstrap)
    sets = set_coverage([predictor], pred.proba, y[pred.index], counts)
    return {"metrics": summary["metrics"], "intervals": summary.get("intervals"), "n": int(len(pred.index)),
            "prediction_sets": sets}  # fmt: skip


def _test_note(cfg: FitConfig, test, splits) -> str:
    if not test:
        return "no test split"
    if cfg.transductive:
        return (f"transductive: the {len(splits.test)} test images were used, without their labels, as unlabeled "
                "data by the semi-supervised candidates; not comparable to an inductive score")  # fmt: skip
    return "scored once at the end; never used for a choice"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4f}"


def _write_outputs(ctx: FitContext, choice: Choice, test: dict | None) -> None:
    """leaderboard.csv and fit.json (the choice, its reason and estimate, the test score, timings, what was skipped
    or reused), both written atomically."""
    cfg, splits, clock, frozen, notes = ctx.cfg, ctx.splits, ctx.clock, ctx.frozen, ctx.notes
    board, chosen, reason, folds = choice.board, choice.chosen, choice.reason, choice.folds
    buf = io.StringIO()
    fields = ["name", "kind", "estimate", "score_top1", "score_mean_per_class", "val_top1", "val_mean_per_class",
              "oof_top1", "oof_mean_per_class", "seconds", "members"]  # fmt: skip
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for c in board:
        four = {k: _fmt(v) for k, v in c.row().items() if k.startswith(("val_", "oof_"))}
        score = {"score_top1": _fmt(c.score_top1), "score_mean_per_class": _fmt(c.score_mean_per_class)}
        w.writerow({**c.row(), **four, **score, "seconds": f"{c.seconds:.1f}"})
    atomic_write_text(os.path.join(cfg.out, "leaderboard.csv"), buf.getvalue())
    summary = {
        "chosen": chosen.name,
        "reason": reason,
        "estimate": chosen.estimate,
        "score_top1": chosen.score_top1,
        "score_mean_per_class": chosen.score_mean_per_class,
        "ranked_by": chosen.rank_by,
        "val_top1": chosen.val_top1,
        "oof_top1": chosen.oof_top1,
        "selection": _selection(folds) if splits.val else NO_VAL_SELECTION,
        "test_transductive" if cfg.transductive else "test": test,
        "transductive": cfg.transductive,
        "budget_min": cfg.budget_min,
        "seconds": round(clock.elapsed(), 1),
        "resumed": frozen.state.reused,  # a rerun of a killed fit: the candidates and feature stores it reused
        "splits": {k: len(getattr(splits, k)) for k in ("train", "val", "test")},
        "splits_note": splits.note,
        "warnings": notes,
        "skipped_candidates": frozen.skipped,
        "views": frozen.views,  # what each view name extracts: backbone, input size, crop, flip
        "native_short_side": frozen.native,
        "test_note": _test_note(cfg, test, splits),
    }
    atomic_write_json(os.path.join(cfg.out, "fit.json"), summary)


def _selection(folds) -> str:
    """How candidates were ranked, in words (fit.json, the benchmark's runs)."""
    if folds is None:
        return "validation split (no out-of-fold estimate: a class has fewer than 2 training images)"
    return (
        f"{folds.estimate}: frozen candidates and their ensembles by {folds.k}-fold out-of-fold top-1 over every "
        "training image; a fine-tune and ensembles with one against the best of those on the validation split"
    )
