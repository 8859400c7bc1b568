"""fit's unlabeled images (`finegrain fit DATA --unlabeled DIR`, `finegrain suggest`): the folder is read and checked,
its frozen features extracted on each view (same robust decoding: bad files skipped and listed in the store's
skipped.csv), and the semi-supervised probes (label propagation, self-training) become candidates scored like every
frozen head: on the labelled validation split and out-of-fold over every labelled image (recipe/oof.py; each fold
refits on the other folds' labels + the unlabeled pool). A chosen one is refitted on train + val + the unlabeled
images. When the time left affords a student, the best of them (by its out-of-fold score) also teaches one
(`run_distill`, semi/distill.py): a fine-tuned candidate scored on the validation split like fit's own fine-tune, and
chosen only averaged with other models (MEMBER_ONLY), its teacher's average always among them. Alone, on cub100 at 5
labelled images a class, it scored 1.2 points below its label-propagation teacher on test (bench.unlabeled --distill,
3 seeds) yet beat it on 2 of 3 validation splits of 100 images; averaged with it, it scored above the teacher on a
development protocol that never reads the test split (MEMBER_ONLY's comment)"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from finegrain.data import IMAGE_EXTENSIONS, ImageSet, Sample
from finegrain.embed import FeatureStore, extract_to_store
from finegrain.errors import FinegrainError
from finegrain.heads.index import l2_normalize
from finegrain.semi import LabelPropagationProbe, SelfTrainingProbe

# (name, estimator factory); the literature's defaults (semi/propagation.py), never tuned on a test split
SEMI_HEADS = (
    ("lp-l2", lambda seed: LabelPropagationProbe(random_state=seed)),
    ("lp-k20-l2", lambda seed: LabelPropagationProbe(k=20, random_state=seed)),
    ("selftrain-l2", lambda seed: SelfTrainingProbe(random_state=seed)),
)


def _inside(a: str, b: str) -> bool:
    """Whether folder a is b or inside it."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def unlabeled_paths(folder: str, image_set: ImageSet) -> list[str]:
    """The image files under `folder` (any depth, sorted); one-line errors for a missing or empty folder, or one
    that is (or overlaps) the labelled data."""
    if not folder or not os.path.isdir(folder):
        raise FinegrainError(f"unlabeled folder {folder!r} does not exist or is not a folder")
    if _inside(image_set.root, folder):  # the labelled data itself, or a folder that holds it
        raise FinegrainError(f"unlabeled folder {folder} overlaps the labelled data {image_set.root}")
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [os.path.abspath(os.path.join(dirpath, f)) for f in sorted(filenames)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]  # fmt: skip
    if not paths:
        raise FinegrainError(f"unlabeled folder {folder} has no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    labelled = {os.path.realpath(s.path) for s in image_set.samples}
    if any(os.path.realpath(p) in labelled for p in paths):
        raise FinegrainError(f"unlabeled folder {folder} overlaps the labelled data: it holds {image_set.root} images")
    return paths


def unlabeled_store(frozen, view: str, paths: list[str]) -> FeatureStore:
    """Features of the unlabeled images on one view (resumable store <out>/features-unlabeled/<view>)."""
    from finegrain.recipe.candidates import POOLINGS

    image_set = ImageSet(frozen.data.root, frozen.data.classes, [Sample(p, 0, "unlabeled") for p in paths])
    cfg = frozen.cfg
    result = extract_to_store(
        image_set, frozen.backbone(view), os.path.join(cfg.out, "features-unlabeled", view), poolings=POOLINGS,
        **frozen.passes(view), batch_size=cfg.batch_size, num_workers=cfg.workers,
        precision=cfg.precision, device=cfg.device, progress=frozen.progress,
    )  # fmt: skip
    if result.skipped:
        listed = os.path.join(cfg.out, "features-unlabeled", view, "skipped.csv")
        print(f"fit: warning: {len(result.skipped)} unlabeled image(s) could not be read: listed in {listed}")
    return result.store


def _unlabeled_X(store: FeatureStore, pooling: str) -> np.ndarray:
    entries = store.index()
    if not entries:
        return np.zeros((0, store.dim_of(pooling)), np.float32)
    return np.asarray(store.features(pooling)[np.array([e.row for e in entries])])


def run_semi(frozen, y_val: np.ndarray, paths: list[str], *, n_test: int, folds=None) -> list[dict]:
    """Score the SEMI_HEADS on every extracted view x pooling: on fit's validation split, and out-of-fold over every
    training image (`folds`, recipe/oof.py) when the budget allows, like the frozen heads; into the frozen stage's
    candidate store, on its clock. Returns their reports."""
    from finegrain.recipe.candidates import POOLINGS, VIEWS, Candidate, class_proba, val_scores
    from finegrain.recipe.frozen import _aligned, _features

    state, clock = frozen.state, frozen.clock
    reports, best = [], None  # best: (candidate, estimator, its unlabeled features, their paths) -> the teacher
    val_paths = [s.path for s in frozen.data.samples if s.split == "val"]
    n_classes = len(frozen.data.classes)
    for view in VIEWS:
        store_dir = os.path.join(frozen.cfg.out, "features", view)
        if not os.path.exists(os.path.join(store_dir, "index.csv")):
            continue  # fit skipped this view (budget)
        if clock.remaining() < frozen.reserve(n_test) + len(paths) * frozen._estimate_spi(view) + 10:
            frozen.skipped.append({"view": view, "why": "no time left to extract the unlabeled images"})
            continue
        store, ustore = FeatureStore.open(store_dir), unlabeled_store(frozen, view, paths)
        for pooling in POOLINGS:
            Xtr, ytr = _features(store, "train", pooling)
            Xva, Xu = _aligned(store, "val", pooling, val_paths), l2_normalize(_unlabeled_X(ustore, pooling))
            Xall = _aligned(store, ("train", "val"), pooling, folds.paths) if folds is not None else None
            for head, make in SEMI_HEADS:
                name = f"{view}/{pooling}/{head}"
                if frozen._done(name, folds):
                    continue
                t0 = time.perf_counter()
                clf = make(frozen.cfg.seed).fit(l2_normalize(Xtr), ytr, Xu)
                proba = np.zeros((len(y_val), n_classes))
                ok = ~np.isnan(Xva[:, 0])
                proba[ok] = class_proba(clf, l2_normalize(Xva[ok]), n_classes)
                top1, mpc = val_scores(proba, y_val)
                params = {"view": view, "pooling": pooling, "head": head, "source": f"{view}/{pooling}",
                          "spi": frozen.spi.get(view, 0.0), "unlabeled": clf.report_}  # fmt: skip
                cand = Candidate(name, "semi", top1, mpc, time.perf_counter() - t0, params)
                no_oof = (cand, None)
                cand, oof = _semi_oof(frozen, cand, make, Xall, Xu, folds, n_test) if folds is not None else no_oof
                cand = replace(cand, seconds=time.perf_counter() - t0)
                state.add(cand, proba, oof)
                reports.append({"candidate": name, **clf.report_})
                if best is None or cand.score > best[0].score:
                    best = (cand, clf, Xu, [e.path for e in ustore.index()])
    if best is not None and frozen.cfg.finetune:
        reports += run_distill(frozen, y_val, *best, n_test=n_test)
    if reports:  # how many unlabeled images each candidate used, at what confidence
        from finegrain.atomic import atomic_write_json

        atomic_write_json(os.path.join(frozen.cfg.out, "unlabeled.json"), {"n_files": len(paths), "runs": reports})
    return reports


def _semi_oof(frozen, cand, make, Xall: np.ndarray, Xu: np.ndarray, folds, n_test: int) -> np.ndarray | None:
    """A semi-supervised candidate's out-of-fold probabilities (FrozenStage.cross_validate): each fold refits it on
    the other folds' labelled images + every unlabeled one (Xu, L2-normalised), about as long as its single fit."""
    from finegrain.recipe.candidates import class_proba

    n_classes, seed = len(frozen.data.classes), frozen.cfg.seed

    def fit_predict(X_fit: np.ndarray, y_fit: np.ndarray, X_held: np.ndarray) -> np.ndarray:
        clf = make(seed).fit(l2_normalize(X_fit), y_fit, Xu)
        return class_proba(clf, l2_normalize(X_held), n_classes)

    return frozen.cross_validate(cand, fit_predict, Xall, folds, n_test, fold_seconds=cand.seconds)


DISTILL_MIN_SECONDS = 120  # a student below this cannot do one useful pass on top of its LP start
DISTILL_SHARE = 0.45  # of the time left: fit's plain fine-tune comes after and gets the rest


def run_distill(frozen, y_val: np.ndarray, teacher_cand, teacher_clf, Xu: np.ndarray,
                upaths: list[str], *, n_test: int) -> list[dict]:  # fmt: skip
    """A distilled student (semi/distill.py: last:1 over the cached trunk, LP-FT start) of the best semi candidate
    `teacher_cand` (its estimator `teacher_clf`, fitted with the unlabeled features Xu [M, D] of the files upaths),
    scored on fit's validation split as a fine-tuned candidate that is only chosen inside an ensemble (MEMBER_ONLY),
    and the average of it and its teacher added as a candidate of its own; skipped (and said) when the time left
    cannot afford the student or ensembles are off."""
    state, clock = frozen.state, frozen.clock
    from finegrain.config import TrainConfig
    from finegrain.recipe.candidates import finetune_candidate
    from finegrain.semi.distill import DistillTrainer, make_teacher

    cfg, name, views = frozen.cfg, "distill", 2
    val_paths = [s.path for s in frozen.data.samples if s.split == "val"]
    spi = max(frozen.spi.values(), default=0.05)
    available = DISTILL_SHARE * (clock.remaining() - frozen.reserve(n_test) - 2 * len(val_paths) * spi)
    train_seconds = available - views * len(upaths) * spi  # the unlabeled trunk cache comes first
    if name in state.candidates or train_seconds < DISTILL_MIN_SECONDS or not len(upaths) or not cfg.ensemble:
        if name not in state.candidates:
            why = f"{max(train_seconds, 0):.0f} s for the student" if cfg.ensemble else MEMBER_ONLY + " (--no-ensemble)"
            frozen.skipped.append({"candidate": name, "why": why})
        return []
    run = os.path.join(cfg.out, "candidates", name)
    resume = os.path.exists(os.path.join(run, "checkpoint-last.pt"))
    tcfg = TrainConfig(
        data=cfg.data, out=run, backbone=cfg.backbone, regime="last:1", head_init="probe", epochs=30,
        cache_views=views, time_budget_min=max(train_seconds, 1.0) / 60, seed=cfg.seed, workers=cfg.workers,
        device=cfg.device, resume=resume,
    )  # fmt: skip
    teacher = make_teacher(teacher_clf, Xu, len(frozen.data.classes))
    no_test = ImageSet(frozen.data.root, frozen.data.classes, [s for s in frozen.data.samples if s.split != "test"])
    t0 = time.perf_counter()
    trainer = DistillTrainer(tcfg, upaths, teacher=teacher, progress=frozen.progress, image_set=no_test)
    try:
        trainer.fit()
    finally:
        trainer.close()
    seconds, extra = time.perf_counter() - t0, {"unlabeled": teacher.report, "member_only": MEMBER_ONLY}
    student, proba = finetune_candidate(name, run, val_paths, y_val, len(frozen.data.classes), cfg, seconds=seconds,
                                        params=extra)  # fmt: skip
    state.add(student, proba)
    state.add(*with_teacher(student, proba, teacher_cand, state.probas[teacher_cand.name], y_val))
    return [{"candidate": name, **teacher.report}]


# Measured on a development protocol that reads train-split labels only (cub100, 5 labelled images a class, seeds 5
# and 6, half of the rest of train held out, the other half unlabeled): the student alone 0.814 / 0.784 against its
# label-propagation teacher's 0.824 / 0.814, the average of the two 0.833 / 0.821 (bench.unlabeled --dev-with-teacher).
MEMBER_ONLY = "a distilled student is chosen only averaged with other models: alone it scored below its teacher"


def with_teacher(student, p_student: np.ndarray, teacher, p_teacher: np.ndarray, y_val: np.ndarray):
    """(the ensemble candidate of a distilled student and its teacher, its validation probabilities [N_val, C])."""
    from finegrain.recipe.candidates import average

    return average([teacher, student], {teacher.name: p_teacher, student.name: p_student}, y_val)


def final_semi_model(frozen, cand, paths: list[str]):
    """The semi-supervised candidate refitted on train + val + the unlabeled images, as (model, spec)."""
    from finegrain.embed import create_normalizer
    from finegrain.heads.to_model import frozen_model
    from finegrain.recipe.frozen import _features

    view, pooling = cand.params["view"], cand.params["pooling"]
    X, y = _features(FeatureStore.open(os.path.join(frozen.cfg.out, "features", view)), ("train", "val"), pooling)
    Xu = _unlabeled_X(unlabeled_store(frozen, view, paths), pooling)
    make = dict(SEMI_HEADS)[cand.params["head"]]
    clf = make(frozen.cfg.seed).fit(l2_normalize(X), y, l2_normalize(Xu))
    counts = np.bincount(y, minlength=len(frozen.data.classes))
    return frozen_model(
        frozen.backbone(view), clf, create_normalizer("l2").fit(X), classes=frozen.data.classes, pooling=pooling,
        **frozen.passes(view), train_counts=counts,
        extra={"fit_candidate": cand.name, "refit": "train+val+unlabeled", "unlabeled": clf.report_},
    )  # fmt: skip


def suggest(cfg, *, progress: bool = True) -> dict:
    """Rank the unlabeled images of `cfg.unlabeled` to label next (`semi.suggest_to_label` with label propagation's
    probabilities, on frozen GeM features of one view) into <cfg.out>/suggestions.csv; returns the summary, also
    saved as suggest.json. `cfg`: a config.SuggestConfig (its options declared once)."""
    from finegrain.atomic import atomic_write_json
    from finegrain.backbones import create_backbone
    from finegrain.data import load_image_set
    from finegrain.recipe.candidates import VIEWS
    from finegrain.semi import suggest_to_label, write_suggestions

    data, unlabeled, out, n, view, seed = cfg.data, cfg.unlabeled, cfg.out, cfg.n, cfg.view, cfg.seed
    if not unlabeled or not out:
        raise FinegrainError("suggest needs --unlabeled FOLDER (the images without labels) and --out FOLDER")
    if n < 1:
        raise FinegrainError(f"-n must be at least 1, got {n}")
    if view not in VIEWS:
        raise FinegrainError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    image_set = load_image_set(data)
    labelled = [s for s in image_set.samples if s.split in ("train", "val", "all")]
    if len({s.label for s in labelled}) < 2:
        raise FinegrainError(f"{data}: suggest needs labelled images of at least 2 classes")
    paths = unlabeled_paths(unlabeled, image_set)
    net = create_backbone(cfg.backbone)
    net.preprocess = net.preprocess.with_geometry(VIEWS[view]["image_size"], VIEWS[view]["crop_pct"])
    opts = {"poolings": ("gem",), "flip": VIEWS[view]["flip"], "batch_size": cfg.batch_size, "progress": progress,
            "num_workers": cfg.workers, "precision": cfg.precision, "device": cfg.device}  # fmt: skip
    lab = extract_to_store(ImageSet(image_set.root, image_set.classes, labelled), net, os.path.join(out, "features"),
                           **opts).store  # fmt: skip
    unl = extract_to_store(ImageSet(image_set.root, image_set.classes, [Sample(p, 0, "unlabeled") for p in paths]),
                           net, os.path.join(out, "features-unlabeled"), **opts)  # fmt: skip
    entries = unl.store.index()
    if not entries:
        raise FinegrainError(f"no image of {unlabeled} could be read (listed in {out}/features-unlabeled/skipped.csv)")
    X_lab = np.concatenate([lab.split(s, "gem")[0] for s in sorted({e.split for e in lab.index()})])
    y = np.concatenate([lab.split(s, "gem")[1] for s in sorted({e.split for e in lab.index()})])
    X_unl = _unlabeled_X(unl.store, "gem")
    model = LabelPropagationProbe(random_state=seed).fit(l2_normalize(X_lab), y, l2_normalize(X_unl))
    from finegrain.recipe.candidates import class_proba

    proba = class_proba(model, l2_normalize(X_unl), len(image_set.classes))
    order = suggest_to_label(X_unl, proba, n, X_lab=X_lab, seed=seed)
    csv_path = write_suggestions(os.path.join(out, "suggestions.csv"), [e.path for e in entries], proba, order,
                                 image_set.classes)  # fmt: skip
    summary = {"suggestions": csv_path, "n": int(len(order)), "n_unlabeled": len(paths), "seed": seed,
               "view": view, "backbone": cfg.backbone, "skipped": [list(s) for s in unl.skipped],
               "propagation": model.report_}  # fmt: skip
    atomic_write_json(os.path.join(out, "suggest.json"), summary)
    return summary


def train_distilled_from_folder(cfg, *, progress: bool = True):
    """`train --unlabeled DIR`: the folder `cfg.unlabeled` checked (one-line errors), then `train_distilled` on its
    images at `cfg.distill_temperature` and `cfg.distill_weight`."""
    from finegrain.data import load_image_set
    from finegrain.semi.distill import train_distilled

    paths = unlabeled_paths(cfg.unlabeled, load_image_set(cfg.data))
    return train_distilled(cfg, paths, temperature=cfg.distill_temperature, weight=cfg.distill_weight,
                           progress=progress)  # fmt: skip
