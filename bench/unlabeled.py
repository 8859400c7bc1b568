"""Learning from unlabeled images on cub100 (issue 14): a few labelled train images a class, the rest of the train
split unlabeled, the full test split scored once. Supervised probe / NCM / 1-NN on the same features against label
propagation and self-training, and the pick made on a validation split carved from the labelled images.

Features: efficientnet_lite0, GeM, 256 px full frame + flip (bf16), L2 - the issue's reference - read from the
store `bench/cache/cub100-lite0-finegrain` (made by bench.representations: `finegrain extract` with --image-size 256
--crop-pct 1.0 --flip), extracted once and cached; numpy / scikit-learn from there on.

    python -m bench.unlabeled                 # everything (about 15 minutes on 2 cores)
    python -m bench.unlabeled --quick         # seed 0 only

Hyper-parameters, never tuned on test: label propagation's gamma = 3, alpha = 0.8 are the literature's for frozen
features (Lazarou et al., ICCV 2021); k = 10 (iLPC: 20) was set on a development protocol that reads train-split
labels only: seeds 5 and 6, pseudo-label accuracy on the unlabeled pool (`--dev` reruns it and records it).
With 5 labelled images a class the pick is fit's (recipe/fit.py) on this one view: fit's frozen heads and
semi-supervised candidates (label propagation with k 10 and 20, self-training), ranked by their 5-fold out-of-fold
top-1 over the labelled images; with --distill --in-pick the distilled student joins as fit adds it (averaged with its
teacher, compared with the leader on the validation split). With 1 labelled image a class there is nothing to
validate on: the pick is label propagation with its defaults.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

from bench.common import ROOT, record, require_dataset
from finegrain.embed import FeatureStore
from finegrain.heads import create_classifier
from finegrain.heads.index import l2_normalize
from finegrain.semi import LabelPropagationProbe, SelfTrainingProbe, suggest_to_label

STORE = os.path.join(ROOT, "bench", "cache", "cub100-lite0-finegrain")


def load_features(store_dir: str = STORE) -> tuple[np.ndarray, dict[str, int], np.ndarray]:
    """(GeM features [R, D] L2-normalised, 'split/class/file' -> row, labels [R])."""
    store = FeatureStore.open(store_dir)
    feats = l2_normalize(np.asarray(store.features("gem")))
    rows, labels = {}, np.zeros(len(feats), np.int64)
    for e in store.index():
        rows["/".join(e.path.split(os.sep)[-3:])] = e.row
        labels[e.row] = e.label
    return feats, rows, labels


def sample(base: str, rows: dict, shots: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(labelled rows, unlabeled rows, test rows): `shots` train images a class drawn as bench.fit draws them."""
    rng = np.random.default_rng(seed)
    lab, unl, test = [], [], []
    for cls in sorted(os.listdir(os.path.join(base, "train"))):
        files = sorted(os.listdir(os.path.join(base, "train", cls)))
        chosen = set(rng.choice(files, shots, replace=False))
        for f in files:
            (lab if f in chosen else unl).append(rows[f"train/{cls}/{f}"])
        test += [rows[f"test/{cls}/{f}"] for f in sorted(os.listdir(os.path.join(base, "test", cls)))]
    return lab, unl, test


def out_of_class(lab, unl, test, labels, seed: int, n_known: int = 50):
    """The first n_known classes are the task; images of the others make half of the unlabeled pool."""
    rng = np.random.default_rng(seed + 1000)
    inside = [r for r in unl if labels[r] < n_known]
    outside = [r for r in unl if labels[r] >= n_known]
    pool = inside + list(rng.choice(outside, len(inside), replace=False))
    return [r for r in lab if labels[r] < n_known], pool, [r for r in test if labels[r] < n_known]


def supervised(X, y, Xt, yt) -> dict[str, float]:
    out = {}
    for name, clf in (("probe", "probe"), ("ncm", "ncm"), ("1-nn", "knn")):
        opts = {"n_neighbors": 1} if clf == "knn" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_classifier(clf, **opts).fit(X, y)
        out[name] = float(np.mean(model.predict(Xt) == yt))
    return out


def semi_models():
    """(name, unfitted estimator) of the semi-supervised methods at their defaults."""
    return [("lp(k=10,alpha=0.8)", LabelPropagationProbe()), ("self-training", SelfTrainingProbe())]


def run_setting(F, labels, lab, unl, test, *, pick_on_val: bool, seed: int) -> dict:
    """Every row of one setting: supervised heads, each semi-supervised method, the pick (on validation)."""
    X, y, Xu = F[lab], labels[lab], F[unl]
    Xt, yt = F[test], labels[test]
    res = {"n_labelled": len(lab), "n_unlabeled": len(unl), "n_test": len(test), "supervised": supervised(X, y, Xt, yt)}
    res["best_supervised"] = max(res["supervised"].values())
    res["methods"], res["used"] = {}, {}
    for name, model in semi_models():
        t0 = time.perf_counter()
        model.fit(X, y, Xu)
        res["methods"][name] = float(np.mean(model.predict(Xt) == yt))
        res["used"][name] = {**model.report_, "seconds": round(time.perf_counter() - t0, 1)}
        if len(np.unique(labels[unl])) > len(np.unique(y)):  # out-of-class: how many foreign images were used
            foreign = labels[unl] >= y.max() + 1
            res["used"][name]["n_used_out_of_class"] = int(((model.pseudo_labels_ >= 0) & foreign).sum())
    res["pick"] = pick_on_validation(F, labels, lab, unl, test, seed) if pick_on_val else {
        "name": "lp(k=10,alpha=0.8)", "why": "1 labelled image a class: no validation, label propagation's defaults",
        "test": res["methods"]["lp(k=10,alpha=0.8)"]}  # fmt: skip
    res["gain_points"] = round(100 * (res["pick"]["test"] - res["best_supervised"]), 2)
    return res


def pick_on_validation(F, labels, lab, unl, test, seed: int) -> dict:
    """fit's way (recipe/fit.py) on this one view: fit's frozen heads (HEADS) and semi-supervised candidates
    (SEMI_HEADS), each scored out-of-fold over the labelled images (recipe/oof.py's 5 stratified folds; a semi one
    refitted in each fold on the other folds' labels + the pool) and on fit's validation split (1 labelled image a
    class held out, stratified, seeded); recipe.candidates.pick chooses; every candidate refitted on all labelled
    images (and the pool) is scored on test once, the chosen one's is the pick's."""
    from finegrain.data import stratified_split
    from finegrain.recipe.candidates import HEADS, Candidate, class_proba, fit_head, pick, val_scores
    from finegrain.recipe.oof import make_folds, oof_loop
    from finegrain.recipe.unlabeled import SEMI_HEADS

    lab, n_classes = np.asarray(lab), int(labels.max()) + 1
    y, Xu = labels[lab], F[unl]
    folds = make_folds([str(r) for r in lab], y, seed=seed)
    tr, va = stratified_split(y, test_size=0.2, seed=seed)

    def fitter(name: str):
        head = next((h for h in HEADS if h[0] == name), None)

        def fit_predict(X, yy, Xh):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if head is not None:
                    norm, clf = fit_head(head, X, yy, seed=seed)
                    return class_proba(clf, norm.transform(Xh), n_classes)
                return class_proba(dict(SEMI_HEADS)[name](seed).fit(X, yy, Xu), Xh, n_classes)

        return fit_predict

    cands, tests, semi = [], {}, {h[0] for h in SEMI_HEADS}
    for name in [h[0] for h in HEADS] + [h[0] for h in SEMI_HEADS]:
        fp = fitter(name)
        oof = oof_loop(fp, F[lab], folds, n_classes=n_classes, time_left=lambda: np.inf)
        p_val = fp(F[lab[tr]], y[tr], F[lab[va]])
        kind = "semi" if name in semi else "frozen"
        cand = Candidate(name, kind, *val_scores(p_val, y[va]), 0.0, {"source": "gem", "head": name})
        cand = cand.with_oof(oof, y, folds.estimate)
        cands.append(cand)
        tests[name] = float(np.mean(fp(F[lab], y, F[test]).argmax(1) == labels[test]))
    chosen, _ = pick(cands)
    best_semi = max((c for c in cands if c.kind == "semi"), key=lambda c: c.score)
    return {
        "name": chosen.name, "estimate": chosen.estimate, "teacher": best_semi.name,
        "leader_val": [chosen.val_top1, chosen.val_mean_per_class],
        "oof": {c.name: round(c.oof_top1, 4) for c in cands}, "val": {c.name: c.val_top1 for c in cands},
        "test_all": {k: round(v, 4) for k, v in tests.items()}, "test": tests[chosen.name],
        "best_fit_supervised_head": max(tests[h[0]] for h in HEADS),
    }  # fmt: skip


def suggest_vs_random(F, labels, base, rows, seed: int, n_more: int = 100) -> dict:
    """Start from 1 labelled image a class, label n_more more (suggested by each strategy vs random), label
    propagation (and the supervised probe) scored on test."""
    from finegrain.semi.suggest import STRATEGIES

    lab, unl, test = sample(base, rows, 1, seed)
    first = LabelPropagationProbe().fit(F[lab], labels[lab], F[unl])
    proba = first.predict_proba(F[unl])
    choices = {s: suggest_to_label(F[unl], proba, n_more, X_lab=F[lab], strategy=s, seed=seed) for s in STRATEGIES}
    choices["random"] = np.random.default_rng(seed + 2000).choice(len(unl), n_more, replace=False)
    out = {}
    for name, picked in choices.items():
        key = "suggest" if name == STRATEGIES[0] else name  # the default strategy is `suggest`
        new_lab = list(lab) + [unl[i] for i in picked]
        rest = [r for i, r in enumerate(unl) if i not in set(picked.tolist())]
        model = LabelPropagationProbe().fit(F[new_lab], labels[new_lab], F[rest])
        out[key] = float(np.mean(model.predict(F[test]) == labels[test]))
        sup = create_classifier("probe").fit(F[new_lab], labels[new_lab])
        out[f"{key}_supervised_probe"] = float(np.mean(sup.predict(F[test]) == labels[test]))
    out["gain_points"] = round(100 * (out["suggest"] - out["random"]), 2)
    out["strategy"] = STRATEGIES[0]
    return out


def rerun_suggest(F, labels, base, rows, seeds: list[int]) -> None:
    """--suggest-only: the suggest rows and headline of the recorded cub100 entry, measured again."""
    from bench.common import command_line

    data = _results()
    entry = data["cub100"]
    entry["suggest"] = {f"seed{s}": suggest_vs_random(F, labels, base, rows, s) for s in seeds}
    entry["suggest_command"] = command_line()
    entry["headline"] = headline(entry["settings"], entry["suggest"])
    print("suggest vs random:", entry["suggest"], flush=True)
    _save_results(data)


# The distilled student (semi/distill.py): finegrain's engine, last:1 over the trunk cached over 2 augmented views
# (LP-FT start), at the teacher's geometry (256 px full frame, GeM); no validation split (the last epoch is kept).
STUDENT = dict(backbone="efficientnet_lite0", regime="last:1", head_init="probe", image_size=256, crop_pct=1.0,
               pooling="gem", epochs=15, cache_views=2, lr=0.05, backbone_lr_scale=0.2, val_fraction=0.0,
               warmup_epochs=1.0)  # fmt: skip


def student_run(base: str, paths: list[str], labels, lab, test, unl, *, seed: int, teacher=None,
                temperature: float = 2.0, epochs: int | None = None, proba: bool = False) -> dict:  # fmt: skip
    """Test top-1 of the student trained on the labelled rows (distilled from `teacher` on the unlabeled rows;
    None: the same student on the labelled images alone), scored once on the test rows (with `proba` also its
    probabilities [len(test), C] under "proba")."""
    import shutil

    from finegrain.config import TrainConfig
    from finegrain.data import ImageSet, Sample
    from finegrain.semi.distill import DistillTrainer
    from finegrain.train.engine import Trainer

    classes = FeatureStore.open(STORE).classes
    samples = [Sample(paths[r], int(labels[r]), "train") for r in lab]
    samples += [Sample(paths[r], int(labels[r]), "test") for r in test]
    tag = "distill" if teacher is not None else "student"
    out = os.path.join(ROOT, "bench", "cache", f"{tag}-{len(lab)}lab-s{seed}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(data=base, out=out, seed=seed, **{**STUDENT, "epochs": epochs or STUDENT["epochs"]})
    image_set, t0 = ImageSet(base, list(classes), samples), time.perf_counter()
    if teacher is None:
        trainer = Trainer(cfg, progress=False, image_set=image_set)
    else:
        trainer = DistillTrainer(cfg, [paths[r] for r in unl], teacher=teacher, temperature=temperature,
                                 progress=False, image_set=image_set)  # fmt: skip
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    row = {"test": result.test_metrics["top1"], "minutes": round((time.perf_counter() - t0) / 60, 2)}
    if proba:  # the saved student on the scored rows, as fit scores a candidate (evaluate.inference)
        from finegrain.evaluate.inference import predict_paths
        from finegrain.evaluate.predictor import load

        pred = predict_paths(load(os.path.join(out, "model")), [paths[r] for r in test])
        row["proba"] = np.zeros((len(test), len(classes)))
        row["proba"][pred.index] = pred.proba
    return {**row, "used": teacher.report} if teacher is not None else row


def distill_setting(F, labels, paths, base, rows, shots: int, seed: int, *, baseline: bool, in_pick: bool,
                    temperature: float, ooc: bool = False, epochs: int | None = None,
                    teacher_head: str = "lp-l2") -> dict:  # fmt: skip
    """The distillation row of one setting: label propagation (fit's `teacher_head`, by default its defaults) as
    the teacher, its soft labels on the unlabeled rest of train, the distilled student on test, and the average of
    the two; with `baseline` the same student without unlabeled images; with `in_pick` the student and its teacher
    fitted without the validation images (fit's split), scored on them alone and averaged, as fit scores them."""
    from finegrain.recipe.candidates import class_proba, val_scores
    from finegrain.recipe.unlabeled import SEMI_HEADS
    from finegrain.semi.distill import make_teacher

    lab, unl, test = sample(base, rows, shots, seed)
    if ooc:  # the first 50 classes labelled, half the pool from the other 50 (out_of_class)
        lab, unl, test = out_of_class(lab, unl, test, labels, seed)
    n_classes, make = int(labels.max()) + 1, dict(SEMI_HEADS)[teacher_head]
    clf = make(seed).fit(F[lab], labels[lab], F[unl])
    teacher = make_teacher(clf, F[unl], n_classes, temperature=temperature)
    if ooc:
        teacher.report["n_used_out_of_class"] = int((teacher.use & (labels[unl] > labels[lab].max())).sum())
    p_teacher = class_proba(clf, F[test], n_classes)
    out = {
        "teacher": teacher_head,
        "teacher_lp_test": float(np.mean(p_teacher.argmax(1) == labels[test])),
        "student": {**STUDENT, "epochs": epochs or STUDENT["epochs"]},
        "temperature": temperature,
    }
    out["distill"] = student_run(base, paths, labels, lab, test, unl, seed=seed, teacher=teacher,
                                 temperature=temperature, epochs=epochs, proba=True)  # fmt: skip
    p_both = (p_teacher + out["distill"].pop("proba")) / 2
    out["with_teacher_test"] = float(np.mean(p_both.argmax(1) == labels[test]))
    if baseline:
        out["student_supervised"] = student_run(base, paths, labels, lab, test, unl, seed=seed)
    out["distill_minus_lp_points"] = round(100 * (out["distill"]["test"] - out["teacher_lp_test"]), 2)
    out["with_teacher_minus_lp_points"] = round(100 * (out["with_teacher_test"] - out["teacher_lp_test"]), 2)
    if in_pick and shots > 1:  # as fit: the same held-out labelled image a class
        from finegrain.data import stratified_split

        tr, va = stratified_split(labels[lab], test_size=0.2, seed=seed)
        tr, va = list(np.asarray(lab)[tr]), list(np.asarray(lab)[va])
        clf = make(seed).fit(F[tr], labels[tr], F[unl])
        val_teacher = make_teacher(clf, F[unl], n_classes, temperature=temperature)
        val = student_run(base, paths, labels, tr, va, unl, seed=seed, teacher=val_teacher, temperature=temperature,
                          proba=True)  # fmt: skip
        out["val"] = val["test"]
        p_val = (class_proba(clf, F[va], n_classes) + val["proba"]) / 2
        out["val_with_teacher"] = list(val_scores(p_val, labels[va]))
    return out


def add_to_pick(setting: dict, row: dict) -> None:
    """The distilled student joins the recorded pick's candidates as fit adds it: never alone (member only), and
    averaged with its teacher as a candidate scored on the validation split, which becomes the pick only if it beats
    the out-of-fold leader there (top-1, then mean per-class; ties keep the leader); its test score is then the
    5-shot run's average of student and teacher."""
    pick = setting["pick"]
    pick.setdefault("before_distill", {"name": pick["name"], "test": pick["test"]})
    pick["name"], pick["test"] = pick["before_distill"]["name"], pick["before_distill"]["test"]
    name = f"ensemble({row['teacher']} + distill)"
    pick["val"]["distill"] = row["val"]  # member only: reported, never chosen alone
    pick["val"][name] = row["val_with_teacher"][0]
    if tuple(row["val_with_teacher"]) > tuple(pick["leader_val"]):
        pick["name"], pick["test"] = name, row["with_teacher_test"]
    setting["gain_points"] = round(100 * (pick["test"] - setting["best_supervised"]), 2)


def run_distill(F, labels, base, rows, shots: list[int], seeds: list[int], *, baseline: bool, in_pick: bool,
                temperature: float, ooc: bool = False, epochs: int | None = None) -> None:  # fmt: skip
    """--distill: distillation rows added to the recorded cub100 entry (the rest kept), written after each run."""
    from bench.common import command_line

    store = FeatureStore.open(STORE)
    paths = [""] * len(F)
    for e in store.index():
        paths[e.row] = e.path
    for n in shots:
        for seed in seeds:
            key = f"{n}shot{'_out_of_class' if ooc else ''}/seed{seed}"
            key += f"/epochs{epochs}" if epochs and epochs != STUDENT["epochs"] else ""
            # the teacher fit would take: the recorded pick's best semi candidate
            setting = _results()["cub100"]["settings"].get(f"{n}shot{'_out_of_class' if ooc else ''}/seed{seed}")
            teacher = (setting or {}).get("pick", {}).get("teacher", "lp-l2")
            r = distill_setting(F, labels, paths, base, rows, n, seed, baseline=baseline and seed == seeds[0],
                                in_pick=in_pick, temperature=temperature, ooc=ooc, epochs=epochs,
                                teacher_head=teacher)  # fmt: skip
            print(f"distill {n} shot seed {seed}: {r}", flush=True)
            data = _results()
            entry = data["cub100"]
            entry.setdefault("distill", {})[key] = r
            cmds = entry.setdefault(
                "distill_commands", [entry.pop("distill_command")] if "distill_command" in entry else []
            )
            cmds += [command_line()] if command_line() not in cmds else []
            if "val" in r:
                add_to_pick(entry["settings"][f"{n}shot{'_out_of_class' if ooc else ''}/seed{seed}"], r)
                entry["headline"] = headline(entry["settings"], entry["suggest"])
            _save_results(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="seed 0 only")
    ap.add_argument("--dev", action="store_true", help="only the development protocol that set k (train labels)")
    ap.add_argument("--suggest-only", action="store_true", help="measure suggest vs random again, keep the rest")
    ap.add_argument("--distill", action="store_true", help="only the distillation rows, added to the recorded entry")
    ap.add_argument("--shots", type=int, nargs="+", default=[5], help="with --distill: labelled images a class")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="with --distill: seeds (default 0 1 2)")
    ap.add_argument("--baseline", action="store_true", help="with --distill: the same student without unlabeled")
    ap.add_argument("--in-pick", action="store_true", help="with --distill: a candidate of the validation pick")
    ap.add_argument("--temperature", type=float, default=2.0, help="with --distill: the softening T")
    ap.add_argument("--out-of-class", action="store_true", help="with --distill: the out-of-class setting")
    ap.add_argument("--epochs", type=int, default=None, help="with --distill: the student's epochs (default 15)")
    ap.add_argument("--dev-distill", action="store_true", help="only the train-labels-only protocol that set T")
    ap.add_argument(
        "--dev-with-teacher",
        action="store_true",
        help="only the train-labels-only protocol: the student alone vs averaged with its teacher",
    )
    ap.add_argument(
        "--settings-only",
        action="store_true",
        help="measure the settings (supervised, methods, pick) again, keep suggest and distillation rows",
    )
    ap.add_argument("--fit", type=float, default=None, metavar="MIN", help="only `finegrain fit` itself, 5 shots")
    args = ap.parse_args()
    base = require_dataset("cub100")
    F, rows, labels = load_features()
    if args.dev:
        record("unlabeled.json", "cub100/dev", develop_k(F, labels, base, rows))
        return
    if args.distill:
        seeds = args.seeds or [0, 1, 2]
        run_distill(
            F,
            labels,
            base,
            rows,
            args.shots,
            seeds,
            baseline=args.baseline,
            in_pick=args.in_pick,
            temperature=args.temperature,
            ooc=args.out_of_class,
            epochs=args.epochs,
        )
        return
    if args.dev_distill or args.dev_with_teacher:
        from bench.common import command_line

        dev = _results().get("cub100/dev_distill", {})
        if args.dev_distill:
            dev.update(develop_temperature(F, labels, base, rows))
        else:
            dev["with_teacher"] = {**develop_with_teacher(F, labels, base, rows), "command": command_line()}
        kept = {k: v for k, v in dev.items() if k not in ("command", "machine")}
        record("unlabeled.json", "cub100/dev_distill", kept)
        return
    if args.fit:
        r = run_fit(base, rows, args.fit)
        settings = {k: v for k, v in _results()["cub100"]["settings"].items() if k == "5shot/seed0"}
        r["best_supervised_same_labels"] = settings["5shot/seed0"]["best_supervised"]
        r["gain_points"] = round(100 * (r["test_top1"] - r["best_supervised_same_labels"]), 2)
        print(f"fit with unlabeled images: {r}", flush=True)
        record("unlabeled.json", f"cub100/fit-5shot-{args.fit:g}min", r)
        _save_results(_results())
        return
    if args.suggest_only:
        rerun_suggest(F, labels, base, rows, [0] if args.quick else [0, 1, 2])
        return
    seeds = [0] if args.quick else [0, 1, 2]
    settings = measure_settings(F, labels, base, rows, seeds)
    if args.settings_only:
        keep_rows(settings)
        return
    sug = {f"seed{s}": suggest_vs_random(F, labels, base, rows, s) for s in seeds}
    print("suggest vs random:", sug, flush=True)
    record("unlabeled.json", "cub100", {"settings": settings, "suggest": sug, "seeds": seeds,
                                        "headline": headline(settings, sug), "features": features_note()})  # fmt: skip
    record("unlabeled.json", "headline", headline(settings, sug))  # the figures, at the top of the file


def measure_settings(F, labels, base, rows, seeds: list[int]) -> dict:
    """Every setting's rows (run_setting) for 5 shots, 1 shot and 5 shots out-of-class, each seed."""
    settings = {}
    for key, shots, ooc in (("5shot", 5, False), ("1shot", 1, False), ("5shot_out_of_class", 5, True)):
        for seed in seeds:
            t0 = time.perf_counter()
            lab, unl, test = sample(base, rows, shots, seed)
            if ooc:
                lab, unl, test = out_of_class(lab, unl, test, labels, seed)
            r = run_setting(F, labels, lab, unl, test, pick_on_val=shots > 1, seed=seed)
            settings[f"{key}/seed{seed}"] = r
            print(f"{key} seed {seed}: best supervised {r['best_supervised']:.3f}, {r['methods']}, pick "
                  f"{r['pick']['name']} {r['pick']['test']:.3f} ({r['gain_points']:+.1f}) "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    return settings


def _results() -> dict:
    """bench/results/unlabeled.json as recorded."""
    import json

    from bench.common import RESULTS

    with open(os.path.join(RESULTS, "unlabeled.json")) as f:
        return json.load(f)


def _save_results(data: dict) -> None:
    """Write it back, the top-level headline made anew: the cub100 entry's (the issue's figures) + headline_extras."""
    from bench.common import RESULTS
    from finegrain.atomic import atomic_write_json

    data["headline"] = {**data["cub100"]["headline"], **headline_extras(data)}
    atomic_write_json(os.path.join(RESULTS, "unlabeled.json"), data)


def headline_extras(data: dict) -> dict:
    """Beside the issue's figures: `finegrain fit` itself with the unlabeled folder (--fit MIN), and the commands
    that measured the recorded rows."""
    entry = data.get("cub100", {})
    cmds = [entry.get("command"), entry.get("suggest_command"), *entry.get("distill_commands", [])]
    out = {"commands": [c for c in cmds if c]}
    for key, v in data.items():
        if key.startswith("cub100/fit-5shot-"):
            tag = key.split("fit-5shot-")[1]
            out[f"fit_itself_5shot_{tag}_gain_points"] = v["gain_points"]
            out[f"fit_itself_5shot_{tag}_test_top1"] = round(v["test_top1"], 4)
            out["commands"].append(v["command"])
    return out


def keep_rows(settings: dict) -> None:
    """--settings-only: the new settings into the recorded cub100 entry; its suggest and distillation rows kept
    (the 5-shot picks are made again without the student: rerun --distill --in-pick to add it)."""
    from bench.common import command_line

    data = _results()
    entry = data["cub100"]
    entry.update(settings=settings, command=command_line(), features=features_note())
    entry["headline"] = headline(settings, entry["suggest"])
    _save_results(data)


def run_fit(base: str, rows: dict, budget_min: float, seed: int = 0) -> dict:
    """`finegrain fit` itself, cold start, on 5 labelled train images a class (bench.fit's cub100-5shot manifest,
    the same draw as sample(seed 0)) with the rest of train as a folder of unlabeled images (links under
    bench/cache), the full test split scored once by fit."""
    import shutil

    from bench.fit import _manifest
    from finegrain.recipe import FitConfig, fit

    manifest = _manifest("cub100-5shot")
    lab, unl, _ = sample(base, rows, 5, seed)
    folder = os.path.join(ROOT, "bench", "cache", "cub100-5shot-unlabeled")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    pool = set(unl)
    for key in rows:  # every train image not drawn: linked, never copied
        if key.startswith("train/") and rows[key] in pool:
            cls, name = key.split("/")[1:]
            os.symlink(os.path.join(base, "train", cls, name), os.path.join(folder, f"{cls}__{name}"))
    out = os.path.join(ROOT, "bench", "cache", f"fit-cub100-5shot-unlabeled-{budget_min:g}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = fit(FitConfig(data=manifest, out=out, budget_min=budget_min, seed=seed, unlabeled=folder), progress=False)
    board = [{"name": c.name, "estimate": c.estimate, "score_top1": c.score_top1, "val_top1": c.val_top1}
             for c in result.leaderboard[:8]]  # fmt: skip
    return {
        "budget_min": budget_min, "wall_s": round(time.perf_counter() - t0, 1), "n_labelled": len(lab),
        "n_unlabeled": len(unl), "chosen": result.chosen.name, "chosen_estimate": result.chosen.estimate,
        "test_top1": result.test["metrics"]["top1"], "leaderboard_top": board,
    }  # fmt: skip


def develop_with_teacher(F, labels, base, rows) -> dict:
    """The distilled student alone, its label-propagation teacher and their average on held-out train images (the
    test split is not read): 5 labelled images a class, development seeds 5 and 6, half of the rest of train held
    out, the other half the unlabeled pool."""
    from finegrain.data import stratified_split
    from finegrain.recipe.candidates import class_proba
    from finegrain.semi.distill import make_teacher

    paths = [""] * len(F)
    for e in FeatureStore.open(STORE).index():
        paths[e.row] = e.path
    out, n_classes = {}, int(labels.max()) + 1
    for seed in (5, 6):
        lab, rest, _ = sample(base, rows, 5, seed)
        rest = np.asarray(rest)
        a, b = stratified_split(labels[rest], test_size=0.5, seed=seed)
        pool, held = list(rest[a]), list(rest[b])
        clf = LabelPropagationProbe().fit(F[lab], labels[lab], F[pool])
        p_teacher = class_proba(clf, F[held], n_classes)
        teacher = make_teacher(clf, F[pool], n_classes, temperature=2.0)
        r = student_run(base, paths, labels, lab, held, pool, seed=seed, teacher=teacher, proba=True)
        probas = {"teacher_lp": p_teacher, "student": r["proba"], "with_teacher": (p_teacher + r["proba"]) / 2}
        scores = {name: round(float(np.mean(p.argmax(1) == labels[held])), 4) for name, p in probas.items()}
        out[f"5shot/seed{seed}"] = {"n_held_out": len(held), "n_pool": len(pool), **scores}
        print(f"dev with teacher seed {seed}: {out[f'5shot/seed{seed}']}", flush=True)
    return {"held_out_accuracy": out, "note": "train split only: held-out train images, never in the pool"}


def develop_temperature(F, labels, base, rows) -> dict:
    """The distilled student's accuracy on the unlabeled pool (hidden train labels; the test split is not read) for
    T in (1, 2), 5 labelled images a class, development seed 5."""
    from finegrain.semi.distill import make_teacher

    store = FeatureStore.open(STORE)
    paths = [""] * len(F)
    for e in store.index():
        paths[e.row] = e.path
    lab, unl, _ = sample(base, rows, 5, 5)
    clf = LabelPropagationProbe().fit(F[lab], labels[lab], F[unl])
    out = {"lp_pseudo_label_accuracy": float(np.mean(clf.pseudo_labels_ == labels[unl]))}
    for t in (1.0, 2.0):
        teacher = make_teacher(clf, F[unl], int(labels.max()) + 1, temperature=t)
        r = student_run(base, paths, labels, lab, unl, unl, seed=5, teacher=teacher, temperature=t)
        out[f"5shot/seed5/T{t:g}"] = r["test"]
        print(f"dev distill T {t}: accuracy on the unlabeled pool {r['test']:.4f} ({r['minutes']} min)", flush=True)
    return {"student_accuracy_on_pool": out, "note": "train split only: the unlabeled pool's hidden labels"}


def develop_k(F, labels, base, rows) -> dict:
    """Pseudo-label accuracy of label propagation on the unlabeled pool (train split; the test split is not read)
    for k in (10, 20), 1 and 5 labelled images a class, development seeds 5 and 6."""
    out = {}
    for shots in (1, 5):
        for seed in (5, 6):
            lab, unl, _ = sample(base, rows, shots, seed)
            for k in (10, 20):
                model = LabelPropagationProbe(k=k, guard="none").fit(F[lab], labels[lab], F[unl])
                out[f"{shots}shot/seed{seed}/k{k}"] = float(np.mean(model.pseudo_labels_ == labels[unl]))
                print(f"dev {shots} shot seed {seed} k {k}: {out[f'{shots}shot/seed{seed}/k{k}']:.4f}", flush=True)
    return {"pseudo_label_accuracy": out, "note": "train split only: the unlabeled pool's hidden labels"}


def _mean_gain(settings: dict, key: str) -> float:
    return round(float(np.mean([v["gain_points"] for k, v in settings.items() if k.startswith(key + "/")])), 2)


def _gain_without_distill(settings: dict) -> dict:
    """Where distillation joined the pick (--distill --in-pick): the 5-shot gain of the pick made without it."""
    runs = [v for k, v in settings.items() if k.startswith("5shot/")]
    if not any("before_distill" in r["pick"] for r in runs):
        return {}
    gains = [100 * (r["pick"].get("before_distill", r["pick"])["test"] - r["best_supervised"]) for r in runs]
    note = "5 shots: the distilled student (bench.unlabeled --distill --in-pick) is one of the pick's candidates"
    return {"gain_5shot_points_without_distill": round(float(np.mean(gains)), 2), "note_distill": note}


def _gain_over_fit_heads(settings: dict) -> dict:
    """The 5-shot gains over the best of fit's own supervised heads too (its PCA-whitened NCM, k-NN and probes, best
    on test in hindsight), a stricter baseline than the issue's probe / NCM / 1-NN."""
    out = {}
    for key in ("5shot", "5shot_out_of_class"):
        runs = [v for k, v in settings.items() if k.startswith(key + "/") and "best_fit_supervised_head" in v["pick"]]
        if runs:
            gains = [100 * (r["pick"]["test"] - max(r["best_supervised"], r["pick"]["best_fit_supervised_head"]))
                     for r in runs]  # fmt: skip
            out[f"gain_{key}_over_fit_heads_points"] = round(float(np.mean(gains)), 2)
    return out


def headline(settings: dict, sug: dict) -> dict:
    return {
        **_gain_without_distill(settings),
        "gain_5shot_points": _mean_gain(settings, "5shot"),
        "gain_1shot_points": _mean_gain(settings, "1shot"),
        "gain_5shot_out_of_class_points": _mean_gain(settings, "5shot_out_of_class"),
        "worst_gain_points": round(min(v["gain_points"] for v in settings.values()), 2),
        **_gain_over_fit_heads(settings),
        "suggest_gain_over_random_points": round(float(np.mean([v["gain_points"] for v in sug.values()])), 2),
        "note": "gains of the pick over the best supervised head (probe / NCM / 1-NN, best on test in hindsight), "
        "mean over seeds; worst: the lowest single gain",
    }


def features_note() -> dict:
    meta = FeatureStore.open(STORE).meta
    pre = meta["backbone"]["preprocess"]
    return {"store": os.path.relpath(STORE, ROOT), "backbone": meta["backbone"]["name"], "pooling": "gem",
            "image_size": pre["input_size"], "crop_pct": pre["crop_pct"], "flip": meta.get("flip"),
            "precision": meta["precision"], "normalizer": "l2"}  # fmt: skip


if __name__ == "__main__":
    main()


def _row(name: str, values: list[float]) -> str:
    mean = float(np.mean(values))
    spread = f" (±{np.std(values):.3f})" if len(values) > 1 else ""
    return f"| {name} | {mean:.3f}{spread} | " + " / ".join(f"{v:.3f}" for v in values) + " |"


def _setting_rows(settings: dict, key: str) -> list[str]:
    runs = [v for k, v in sorted(settings.items()) if k.startswith(key + "/")]
    out = [_row(f"supervised {n}", [r["supervised"][n] for r in runs]) for n in ("probe", "ncm", "1-nn")]
    out.append(_row("best supervised (in hindsight, on test)", [r["best_supervised"] for r in runs]))
    if all("best_fit_supervised_head" in r["pick"] for r in runs):  # PCA-whitened NCM, k-NN 10, probes
        out.append(_row("best of fit's supervised heads (in hindsight)", [r["pick"]["best_fit_supervised_head"]
                                                                          for r in runs]))  # fmt: skip
    for m in runs[0]["methods"]:
        used = [r["used"][m] for r in runs]
        ooc = [u.get("n_used_out_of_class") for u in used]
        note = f"; of them out of class {'/'.join(map(str, ooc))}" if ooc[0] is not None else ""
        label = f"{m} (used {'/'.join(str(u['n_used']) for u in used)} of {used[0]['n_unlabeled']} unlabeled, mean "
        label += f"certainty {'/'.join(str(u['mean_confidence']) for u in used)}{note})"
        out.append(_row(label, [r["methods"][m] for r in runs]))
    picks = "/".join(f"`{r['pick']['name']}`" for r in runs)
    out.append(_row(f"**pick** ({picks})", [r["pick"]["test"] for r in runs]))
    gains = [r["gain_points"] for r in runs]
    by_seed = " / ".join(f"{g:+.1f}" for g in gains)
    out.append(f"| gain of the pick over the best supervised (points) | {np.mean(gains):+.1f} | {by_seed} |")
    return out


def _lp_alone(settings: dict) -> str:
    """The gain of label propagation with its defaults (no choice made) beside the pick's."""
    parts = []
    for key in ("5shot", "5shot_out_of_class"):
        runs = [v for k, v in settings.items() if k.startswith(key + "/")]
        gain = np.mean([100 * (r["methods"]["lp(k=10,alpha=0.8)"] - r["best_supervised"]) for r in runs])
        parts.append(f"{key} {gain:+.1f}")
    return (
        "Label propagation with its defaults, no choice made: " + ", ".join(parts) + " points. Self-training hurts at "
        "1 image a class (the probe's few confident pseudo-labels are too often wrong), label propagation never does "
        "here."
    )


def _suggest_note(sug: dict) -> str:
    runs = list(sug.values())
    if "margin-kcenter" not in runs[0]:
        return ""
    kc = np.mean([100 * (v["margin-kcenter"] - v["random"]) for v in runs])
    return (
        f" `suggest` labels typical images of uncovered clusters (the default, set on a train-labels-only development "
        f"protocol before these test runs); margin + k-center coverage gains {kc:+.1f} points over random here."
    )


def _distill_rows(r: dict, doc: dict) -> list[str]:
    """The distillation table: the LP teacher, its distilled student, the student without unlabeled images."""
    runs = r.get("distill")
    if not runs:
        return []
    st, t = next(iter(runs.values()))["student"], next(iter(runs.values())).get("temperature", 2.0)
    out = [
        f"### Distillation (semi/distill.py): a {st['regime']} student ({st['backbone']}, {st['image_size']} px, "
        f"{st['pooling'].upper()}, {st['cache_views']} cached views, {st['epochs']} epochs, LP-FT start) trained on "
        f"the labelled images + KL to label propagation's soft labels (T = {t:g}) "
        "on the unlabeled ones",
        "",
        "| setting | LP teacher | distilled student | student + teacher | student, labelled only | unlabeled used "
        "(mean confidence) | val: student / student + teacher / leader | minutes |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for key, v in runs.items():
        d, u = v["distill"], v["distill"]["used"]
        sup = f"{v['student_supervised']['test']:.3f}" if "student_supervised" in v else "-"
        both = f"{v['with_teacher_test']:.3f}" if "with_teacher_test" in v else "-"
        val = "-"
        if "val_with_teacher" in v:
            leader = r["settings"][key]["pick"]["leader_val"][0]
            val = f"{v['val']:.2f} / {v['val_with_teacher'][0]:.2f} / {leader:.2f}"
        foreign = f", {u['n_used_out_of_class']} of them out of class" if "n_used_out_of_class" in u else ""
        out.append(f"| {key} | {v['teacher_lp_test']:.3f} | {d['test']:.3f} | {both} | {sup} | {u['n_used']} of "
                   f"{u['n_unlabeled']}{foreign} ({u['mean_confidence']}) | {val} | {d['minutes']} |")  # fmt: skip
    dev = doc.get("cub100/dev_distill", {}).get("with_teacher")
    if dev:
        cells = "; ".join(f"seed {k.split('seed')[1]}: teacher {x['teacher_lp']:.3f}, student {x['student']:.3f}, "
                          f"average {x['with_teacher']:.3f}" for k, x in dev["held_out_accuracy"].items())  # fmt: skip
        why = "Why the student is chosen only averaged with other models (a development protocol on train labels "
        why += f"only: 5 labelled a class, half of the rest of train held out): {cells} (`{dev['command']}`)."
        out += ["", why]
    cmds = "; ".join(f"`{c}`" for c in r.get("distill_commands", []))
    return [*out, "", f"Commands: {cmds}", ""]


def _fit_rows(doc: dict) -> list[str]:
    """`finegrain fit` itself with the unlabeled folder (bench.unlabeled --fit MIN)."""
    runs = {k: v for k, v in doc.items() if k.startswith("cub100/fit-5shot-")}
    if not runs:
        return []
    title = "### `finegrain fit` itself: 5 labelled a class (seed 0) + the unlabeled rest of train as a folder"
    head = "| budget | wall | chosen (estimate) | test top-1 | best supervised, same labels | gain (points) |"
    out = [title + ", cold start", "", head, "|---:|---:|---|---:|---:|---:|"]
    for v in runs.values():
        chosen = f"`{v['chosen']}` ({v['chosen_estimate']})"
        out.append(f"| {v['budget_min']:g} min | {v['wall_s'] / 60:.1f} min | {chosen} | {v['test_top1']:.3f} | "
                   f"{v['best_supervised_same_labels']:.3f} | {v['gain_points']:+.1f} |")  # fmt: skip
    cmds = "; ".join(f"`{v['command']}`" for v in runs.values())
    return [*out, "", f"Command: {cmds}", ""]


def report_section(doc: dict) -> list[str]:
    """BENCHMARKS.md's section (bench/report.py renders it)."""
    r = doc.get("cub100")
    if not r:
        return []
    h, f, s = r["headline"], r["features"], r["settings"]
    out = [
        "## Unlabeled images: label propagation, self-training, `suggest` (cub100, few labels)",
        "",
        f"Features: {f['backbone']} {f['pooling'].upper()}, {f['image_size']} px, crop {f['crop_pct']}, "
        f"flip-averaged, {f['precision']}, L2 (`{f['store']}`). A few labelled train images a class (seeds "
        f"{r['seeds']}), the rest of the train split unlabeled, the full test split scored once. The pick: 5 labelled "
        "a class, fit's choice (recipe.candidates.pick) among its frozen heads and semi-supervised candidates (label "
        "propagation k 10 / 20, self-training), each ranked by 5-fold out-of-fold top-1 over the labelled images, "
        "refitted on all 5 (with the distilled student: averaged with its teacher, against the leader on fit's "
        "validation split); 1 labelled a class, label propagation with its defaults (nothing to validate on). Cells: "
        "mean (± std) then seed by seed.",
        "",
    ]
    titles = {"5shot": "5 labelled images a class (100 classes)", "1shot": "1 labelled image a class (100 classes)",
              "5shot_out_of_class": "5 labelled a class of the first 50 classes; half the unlabeled pool from the "
              "other 50"}  # fmt: skip
    for key, title in titles.items():
        out += [f"### {title}", "", "| model | test top-1 | by seed |", "|---|---:|---|", *_setting_rows(s, key), ""]
    out += _distill_rows(r, doc)
    out += _fit_rows(doc)
    sug = r["suggest"]
    out += [
        f"### `suggest` vs random (start 1 labelled a class, label 100 more, label propagation scored on test; "
        f"suggest = strategy `{next(iter(sug.values())).get('strategy', 'margin-kcenter')}`)",
        "",
        "| seed | suggest | margin + k-center | random | gain (points) | supervised probe: suggest / random |",
        "|---|---:|---:|---:|---:|---|",
        *[f"| {k} | {v['suggest']:.3f} | {v.get('margin-kcenter', v['suggest']):.3f} | {v['random']:.3f} | "
          f"{v['gain_points']:+.1f} | {v['suggest_supervised_probe']:.3f} / {v['random_supervised_probe']:.3f} |"
          for k, v in sug.items()],
        "",
        "Headline: " + ", ".join(f"{k} {v:+.1f}" for k, v in h.items() if isinstance(v, int | float))
        + f" ({h['note']}" + (f"; {h['note_distill']}" if "note_distill" in h else "") + "). "
        + _lp_alone(s)
        + _suggest_note(sug),
        "",
        f"Command: `{r['command']}`" + (f"; suggest rows: `{r['suggest_command']}`" if "suggest_command" in r else ""),
        "",
    ]  # fmt: skip
    return out
