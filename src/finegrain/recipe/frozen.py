"""fit's first stage: frozen features of train + val over each extraction view (resumable stores), and the
classifier families of BENCHMARKS.md's representation table on them, each scored on the validation split and
out-of-fold over every training image (recipe/oof.py) when the budget allows."""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from finegrain.backbones import Backbone, create_backbone
from finegrain.data import ImageSet
from finegrain.embed import FeatureStore, extract_to_store
from finegrain.errors import FinegrainError
from finegrain.heads.to_model import frozen_model
from finegrain.recipe.candidates import (
    HEADS,
    NO_VAL_HEAD,
    POOLINGS,
    Candidate,
    class_proba,
    fit_head,
    native_side,
    parse_backbones,
    val_scores,
    views_for,
)
from finegrain.recipe.oof import Folds, fixed_params, head_fit_predict, oof_loop
from finegrain.runtime import Runtime


class FrozenStage:
    def __init__(self, cfg, data: ImageSet, state, clock, *, progress: bool = True) -> None:
        self.cfg, self.data, self.state, self.clock, self.progress = cfg, data, state, clock, progress
        self.spi: dict[str, float] = {}  # seconds an image, measured per view
        # seconds to set a view's engine up (ONNX export, parity check, the auto race), measured per view: paid once
        # by its extraction and once more by the test pass of a model on it (the saved model is converted anew)
        self.setup: dict[str, float] = {}
        self.head_seconds: dict[str, float] = {}  # seconds scoring every head on a view's features (OOF included)
        self.skipped: list[dict] = []
        self.n_trainval = sum(s.split in ("train", "val") for s in data.samples)
        paths = [s.path for s in data.samples if s.split in ("train", "val")]
        self.native = native_side(paths)  # the images' median short side: small images get a view of their size
        self.views = views_for(parse_backbones(getattr(cfg, "backbones", ""), cfg.backbone), self.native)
        self._units: dict[str, float] = {}  # view -> compute relative to a 224 px forward of its backbone
        self._forward_spi: dict[str, float] = {}  # backbone -> seconds an image of its bare 224 px forward

    # ---- views -------------------------------------------------------------------------------------------------
    def backbone(self, view: str) -> Backbone:
        geo = self.views[view]
        backbone = create_backbone(geo["backbone"])
        backbone.preprocess = backbone.preprocess.with_geometry(geo["image_size"], geo["crop_pct"])
        return backbone

    def _cost_units(self, view: str) -> float:
        """A view's compute relative to one 224 px forward (pixels x flips); its geometry is read once."""
        if view not in self._units:
            size = self.backbone(view).preprocess.input_size
            self._units[view] = (size / 224) ** 2 * (2 if self.views[view]["flip"] else 1)
        return self._units[view]

    def _estimate_spi(self, view: str) -> float:
        """Seconds an image for a view: measured if extracted, else scaled from a measured view of the same backbone
        (pixels x flips), else from a short forward of that backbone here (measured once)."""
        if view in self.spi:
            return self.spi[view]
        name = self.views[view]["backbone"]
        for v, s in self.spi.items():
            if self.views[v]["backbone"] == name:
                return s * self._cost_units(view) / self._cost_units(v)
        return self._cost_units(view) * self._bare_spi(name) * self._calibration()

    def _bare_spi(self, name: str) -> float:
        """Seconds an image of a backbone's bare eager 224 px forward here (measured once)."""
        if name not in self._forward_spi:
            backbone = create_backbone(name)
            backbone.preprocess = backbone.preprocess.with_geometry(224, None)
            self._forward_spi[name] = _measure_spi(backbone, Runtime(self.cfg.device, self.cfg.precision))
        return self._forward_spi[name]

    def _calibration(self) -> float:
        """Measured extraction pace over the bare-forward estimate of the first extracted view (the engine, e.g.
        ONNX Runtime, and decoding make it differ from 1), applied to another backbone's estimate."""
        for v, s in self.spi.items():
            return s / (self._cost_units(v) * self._bare_spi(self.views[v]["backbone"]))
        return 1.0

    def _estimate_setup(self, view: str) -> float:
        """Seconds to set up a view's engine: measured if extracted, else the costliest measured setup scaled by the
        backbones' bare forward times (export and the engine race grow with the network), else 0."""
        if view in self.setup:
            return self.setup[view]
        if not self.setup:
            return 0.0
        v, s = max(self.setup.items(), key=lambda item: item[1])
        a, b = self.views[view]["backbone"], self.views[v]["backbone"]
        return s * (max(1.0, self._bare_spi(a) / self._bare_spi(b)) if a != b else 1.0)

    def test_cost(self, view: str, n_test: int) -> float:
        """Seconds to score the test split with a model on this view (its engine set up anew, then the images)."""
        return self._estimate_setup(view) + self._estimate_spi(view) * n_test

    def reserve(self, n_test: int) -> float:
        """Seconds to keep for the end: the test pass of a model on the cheapest view, and the refit."""
        first = self.views[next(iter(self.views))]["backbone"]
        return min(self.test_cost(v, n_test) for v in self.views if self.views[v]["backbone"] == first) + 20.0

    def candidate_cost(self, cand: Candidate, candidates: dict[str, Candidate], n_test: int) -> float:
        """Seconds the test pass of a candidate takes: one forward pass for each trunk it runs (members that share a
        view share its extraction, as the saved ensemble shares it: evaluate/predictor.py), a fine-tune its own at
        the eval view's cost."""
        return sum(self.test_cost(view, n_test) for _, view in trunks(cand, candidates))

    def _store(self, view: str) -> FeatureStore:
        samples = [s for s in self.data.samples if s.split in ("train", "val")]
        trainval = ImageSet(self.data.root, self.data.classes, samples)
        t0 = time.perf_counter()
        backbone = self.backbone(view)
        result = extract_to_store(
            trainval, backbone, os.path.join(self.cfg.out, "features", view), poolings=POOLINGS,
            flip=self.views[view]["flip"], batch_size=self.cfg.batch_size, num_workers=self.cfg.workers,
            precision=self.cfg.precision, device=self.cfg.device, progress=self.progress, runtime=self.cfg.runtime,
        )  # fmt: skip
        if result.n_extracted:
            self.setup[view] = max(time.perf_counter() - t0 - result.seconds, self._conversion_seconds(view, backbone))
            self.spi[view] = result.seconds / result.n_extracted
        else:
            self.spi.setdefault(view, self._estimate_spi(view))
            self.state.reused["views"].append(view)
            print(f"fit: reused the {view} features already extracted in {self.cfg.out}", flush=True)
        return result.store

    def _conversion_seconds(self, view: str, backbone: Backbone) -> float:
        """With `--runtime auto`, what converting a model on this view to ONNX took here (the saved model's test pass
        converts anew; the extraction may have reused a cached conversion and set up in no time)."""
        if self.cfg.runtime != "auto":
            return 0.0
        from finegrain.embed.extract import Embedder
        from finegrain.runtime.engine import recorded_conversion_seconds

        embedder = Embedder(backbone, POOLINGS, flip=self.views[view]["flip"])
        rt = Runtime(str(self.cfg.device), self.cfg.precision, True, self.cfg.workers)
        return recorded_conversion_seconds(embedder, backbone.preprocess, rt)

    # ---- candidates ---------------------------------------------------------------------------------------------
    def run(self, y_val: np.ndarray, *, n_test: int, folds: Folds | None = None, late: bool = False) -> None:
        """Every view x pooling x head that fits the budget, in the views' order; the first view always runs. With
        `folds`, each head is also scored out-of-fold over every training image. Called again later with `late`
        (time left after a fine-tune), it tries the views it skipped, then the late ones (`late_views`); what was
        scored is kept."""
        for i, view in enumerate(self._order(late)):
            if view in self.head_seconds:
                continue  # done in an earlier call
            self.skipped = [s for s in self.skipped if s.get("view") != view]
            try:
                cost = self.view_cost(view, n_test)
            except FinegrainError as e:  # another backbone whose weights cannot be had here (no network)
                self.skipped.append({"view": view, "why": str(e)})
                continue
            if i > 0 and self.clock.remaining() - 20.0 < cost:
                why = f"extraction and a test pass on it (~{cost:.0f} s) do not fit in the budget"
                self.skipped.append({"view": view, "why": why})
                print(f"fit: skipping the {view} view: {why}", flush=True)
                continue
            self._run_view(view, y_val, n_test, folds)

    def _order(self, late: bool) -> list[str]:
        """The views to try: those not late in their order, then (with `late`) the late ones, the backbone whose
        frozen candidates score best first."""
        views = [v for v in self.views if not self.views[v].get("late")]
        if not late:
            return views
        best: dict[str, float] = {}
        for c in self.state.candidates.values():
            if c.kind == "frozen":
                b = c.params.get("backbone", "")
                best[b] = max(best.get(b, -1.0), c.score[0])
        extra = [v for v in self.views if self.views[v].get("late")]
        return views + sorted(extra, key=lambda v: -best.get(self.views[v]["backbone"], -1.0))

    def view_cost(self, view: str, n_test: int) -> float:
        """Seconds a view's candidates take: its extraction (engine set-up included), a test pass on it, and
        scoring the heads (as long as the last view's did); another backbone's also counts a partner's test pass
        (it is worth most in an ensemble)."""
        cost = self._estimate_setup(view) + self.n_trainval * self._estimate_spi(view)
        cost += self.test_cost(view, n_test) + max(self.head_seconds.values(), default=0.0)
        if self.views[view]["backbone"] != self.views[next(iter(self.views))]["backbone"]:
            cost += min((self.test_cost(v, n_test) for v in self.spi), default=0.0)
        return cost

    def untried(self, n_test: int) -> list[str]:
        """Views not run yet (late ones included) whose cost fits in what is left of the budget."""
        left = self.clock.remaining() - 20.0
        out = []
        for view in self._order(late=True):
            if view not in self.head_seconds:
                try:
                    if self.view_cost(view, n_test) <= left:
                        out.append(view)
                except FinegrainError:
                    continue
        return out

    def _run_view(self, view: str, y_val: np.ndarray, n_test: int, folds: Folds | None) -> None:
        val_paths = [s.path for s in self.data.samples if s.split == "val"]
        store = self._store(view)
        t0 = time.perf_counter()
        for pooling in POOLINGS:
            Xtr, ytr = _features(store, "train", pooling)
            Xva = _aligned(store, "val", pooling, val_paths)
            Xall = _aligned(store, ("train", "val"), pooling, folds.paths) if folds is not None else None
            for head in HEADS:
                self._score(view, pooling, head, (Xtr, ytr, Xva, Xall), y_val, n_test, folds)
        self.head_seconds[view] = time.perf_counter() - t0

    def _done(self, name: str, folds: Folds | None) -> bool:
        """Scored already (a resumed run); one scored before out-of-fold estimates existed is scored again."""
        cand = self.state.candidates.get(name)
        return cand is not None and (folds is None or cand.estimate != "val" or "oof" in cand.params)

    def _score(self, view, pooling, head, feats, y_val, n_test, folds) -> None:
        name = f"{view}/{pooling}/{head[0]}"
        if self._done(name, folds):
            return
        if self.clock.remaining() < self.reserve(n_test) + 5 and self.state.candidates:  # the first always runs
            self.skipped.append({"candidate": name, "why": "no time left in the budget"})
            return
        Xtr, ytr, Xva, Xall = feats
        t0 = time.perf_counter()
        norm, clf = fit_head(head, Xtr, ytr, seed=self.cfg.seed)
        proba = np.zeros((len(y_val), len(self.data.classes)))
        ok = ~np.isnan(Xva[:, 0])
        proba[ok] = class_proba(clf, norm.transform(Xva[ok]), len(self.data.classes))
        top1, mpc = val_scores(proba, y_val)
        params = {"view": view, "pooling": pooling, "head": head[0], "source": f"{view}/{pooling}"}
        params["backbone"] = self.views[view]["backbone"]
        params["spi"] = self.spi.get(view, 0.0)
        cand = Candidate(name, "frozen", top1, mpc, time.perf_counter() - t0, params)
        oof = self._oof(cand, head, clf, Xall, folds, n_test) if folds is not None else None
        cand.seconds = time.perf_counter() - t0
        self.state.add(cand, proba, oof)

    def _oof(self, cand: Candidate, head, clf, Xall: np.ndarray, folds: Folds, n_test: int) -> np.ndarray | None:
        """A frozen head's out-of-fold probabilities (`cross_validate`), refitted with the hyperparameters its
        single fit chose; a fold costs about half that fit (one solver run, no C search)."""
        fit_predict = head_fit_predict(
            head, fixed=fixed_params(clf), seed=self.cfg.seed, n_classes=len(self.data.classes)
        )
        return self.cross_validate(cand, fit_predict, Xall, folds, n_test, fold_seconds=0.5 * cand.seconds)

    def cross_validate(self, cand: Candidate, fit_predict, Xall: np.ndarray, folds: Folds, n_test: int, *,
                       fold_seconds: float) -> np.ndarray | None:  # fmt: skip
        """The candidate's out-of-fold probabilities [N, C] (`oof_loop` with `fit_predict`; its OOF scores set), or
        None, with the reason in cand.params['oof'], when its folds (about fold_seconds each) do not fit in the
        budget (the candidate keeps its validation-split score)."""
        left = lambda: self.clock.remaining() - self.reserve(n_test) - 5  # noqa: E731
        guess = folds.k * fold_seconds
        oof = None
        if guess <= left():
            oof = oof_loop(fit_predict, Xall, folds, n_classes=len(self.data.classes), time_left=left)
        if oof is None:
            cand.params["oof"] = f"not run: its {folds.k} folds (~{guess:.0f} s) did not fit in the budget"
            return None
        cand.oof_top1, cand.oof_mean_per_class = val_scores(oof, folds.y)
        cand.estimate = folds.estimate
        return oof

    def final_model(self, cand: Candidate):
        """The candidate's head refitted on train + val features, as a model (and its spec) on its view."""
        view, pooling = cand.params["view"], cand.params["pooling"]
        head = next(h for h in (*HEADS, NO_VAL_HEAD) if h[0] == cand.params["head"])
        store = FeatureStore.open(os.path.join(self.cfg.out, "features", view))
        X, y = _features(store, ("train", "val"), pooling)
        norm, clf = fit_head(head, X, y, seed=self.cfg.seed)
        counts = np.bincount(y, minlength=len(self.data.classes))
        if "la_tau" in cand.params:  # a logit-adjusted probe (recipe/longtail.py), π from the refit's counts
            from finegrain.heads.decoupled import LogitAdjusted

            clf = LogitAdjusted(clf, tau=cand.params["la_tau"], class_counts=counts[clf.classes_]).fit()
        return frozen_model(
            self.backbone(view), clf, norm, classes=self.data.classes, pooling=pooling, flip=self.views[view]["flip"],
            gallery=(X, y), train_counts=counts, extra={"fit_candidate": cand.name, "refit": "train+val"},
        )  # fmt: skip


def trunks(cand: Candidate, candidates: dict[str, Candidate]) -> set[tuple[str, str]]:
    """The distinct forward passes a candidate's test pass runs: (what runs, its view), a frozen or semi-supervised
    head's view once however many heads read it, each fine-tuned model on its own."""
    if cand.members:
        return set().union(*(trunks(candidates[m], candidates) for m in cand.members))
    if cand.kind == "finetune":
        return {(cand.name, cand.params.get("view", "eval"))}
    view = cand.params.get("view", "eval")
    return {(view, view)}


def _features(store: FeatureStore, splits, pooling: str) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] and labels [N] of one split or several (of those the store holds: no val with one image a
    class)."""
    held = {e.split for e in store.index()}
    parts = [store.split(s, pooling) for s in ((splits,) if isinstance(splits, str) else splits) if s in held]
    return np.concatenate([np.asarray(p[0]) for p in parts]), np.concatenate([p[1] for p in parts])


def _aligned(store: FeatureStore, splits, pooling: str, paths: list[str]) -> np.ndarray:
    """Features [len(paths), D] of one split or several, in the order of `paths`; rows of files that could not be
    read are NaN."""
    out = None
    for split in (splits,) if isinstance(splits, str) else splits:
        X, _, stored = store.split(split, pooling)
        X = np.asarray(X)
        if out is None:
            out = np.full((len(paths), X.shape[1]), np.nan, np.float32)
        row = {p: i for i, p in enumerate(stored)}
        for i, p in enumerate(paths):
            if p in row:
                out[i] = X[row[p]]
    return out


@torch.no_grad()
def _measure_spi(backbone: Backbone, rt: Runtime, n: int = 8) -> float:
    """Seconds an image of the bare backbone forward (batch n, after one warm-up) at its input size."""
    model = rt.prepare(backbone)
    x = torch.randint(0, 256, (n, 3, backbone.preprocess.input_size, backbone.preprocess.input_size), dtype=torch.uint8)
    with rt.autocast():
        model.forward_features(rt.to_input(x, backbone.preprocess))
        t0 = time.perf_counter()
        model.forward_features(rt.to_input(x, backbone.preprocess))
    return 1.5 * (time.perf_counter() - t0) / n  # decoding and resizing come on top of the forward
