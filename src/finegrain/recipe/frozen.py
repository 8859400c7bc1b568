"""fit's first stage: frozen features of train + val over each extraction view (resumable stores), and the
classifier families of BENCHMARKS.md's representation table on them, each scored on the validation split and
out-of-fold over every training image (recipe/oof.py) when the budget allows."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from finegrain.backbones import Backbone, create_backbone
from finegrain.data import ImageSet
from finegrain.embed import FeatureStore, extract_to_store
from finegrain.errors import FinegrainError
from finegrain.heads.to_model import frozen_model
from finegrain.models.zoom import ZOOM_FACTOR
from finegrain.recipe.candidates import (
    HEADS,
    NO_VAL_HEAD,
    POOLINGS,
    Candidate,
    class_proba,
    ensembles,
    fit_head,
    native_side,
    parse_backbones,
    pick,
    val_scores,
    views_for,
)
from finegrain.recipe.costs import CostModel, trunks
from finegrain.recipe.oof import Folds, fixed_params, head_fit_predict, oof_loop
from finegrain.runtime import Runtime

# A later view scores only the (pooling, head) pairs within noise of the best so far (`FrozenStage._kept_heads`):
KEEP_WITHIN = 1.0  # points, at least
KEEP_LEAST = 3  # pairs, at least


class FrozenStage:
    def __init__(self, cfg, data: ImageSet, state, clock, *, progress: bool = True) -> None:
        self.cfg, self.data, self.state, self.clock, self.progress = cfg, data, state, clock, progress
        self.skipped: list[dict] = []
        self.n_trainval = sum(s.split in ("train", "val") for s in data.samples)
        self.n_val = sum(s.split == "val" for s in data.samples)
        paths = [s.path for s in data.samples if s.split in ("train", "val")]
        self.native = native_side(paths)  # the images' median short side: small images get a view of their size
        self.views = views_for(parse_backbones(getattr(cfg, "backbones", ""), cfg.backbone), self.native)
        self.costs = CostModel(cfg, self.views, self.n_trainval, self.backbone)
        # what the cost model measured, per view: seconds an image, engine set-up, scoring every head
        self.spi, self.setup, self.head_seconds = self.costs.spi, self.costs.setup, self.costs.head_seconds
        self._keep = 0.0  # seconds kept free while a view's heads are scored (`_pair_reserve`)
        self._y_val: np.ndarray | None = None  # the validation labels and folds `run` scores with (`leader`)
        self._folds: Folds | None = None
        self._leaders: tuple = ()  # (the candidates' names and scores, `leader`'s answer for them)

    # ---- views -------------------------------------------------------------------------------------------------
    def backbone(self, view: str) -> Backbone:
        """The view's backbone with its geometry (a zoom view decodes at ZOOM_FACTOR x its side: models/zoom.py)."""
        geo = self.views[view]
        backbone = create_backbone(geo["backbone"])
        size = geo["image_size"] and geo["image_size"] * (ZOOM_FACTOR if geo.get("zoom") else 1)
        backbone.preprocess = backbone.preprocess.with_geometry(size, geo["crop_pct"])
        return backbone

    def passes(self, view: str) -> dict:
        """How a view's descriptor is computed from its decoded image: flip-averaged, and looking closer (zoom)."""
        return {"flip": self.views[view]["flip"], "zoom": bool(self.views[view].get("zoom"))}

    # ---- prices: the cost model (recipe/costs.py) ---------------------------------------------------------------
    def _estimate_spi(self, view: str) -> float:
        return self.costs.estimate_spi(view)

    def test_cost(self, view: str, n_test: int) -> float:
        return self.costs.test_cost(view, n_test)

    def reserve(self, n_test: int) -> float:
        """Seconds kept for the end: the cheapest test pass and the refit, or while a later view's heads are scored,
        the test pass of that view's ensemble with the leader (`_pair_reserve`)."""
        return max(self.costs.reserve(n_test), self._keep)

    def _pair_reserve(self, view: str, n_test: int) -> float:
        """Seconds to keep free while the heads of `view` are scored: the test pass of the leader so far (an
        ensemble of the candidates so far included: `leader`) grown by `view` (the larger ensemble is what a later
        view is worth most in), and the refit. Without it the heads of a slow view took the time that pass needed
        (issue 23, cub100 at 10 minutes, seed 1: the lite2 view's heads ran ~196 s against the ~102 s the last
        view's took, and every ensemble with it was dropped as unaffordable); keeping only the best single head's
        view and `view` let flowers17's last view leave 51 s for a 6-member near-tie ensemble over 4 views whose
        test pass needed ~93 s (out-of-fold 0.980, the leader; the 2-member ensemble that ran instead: test 0.963
        against its 0.971)."""
        leader, board = self.leader()
        if leader is None:
            return 0.0
        views = {v for _, v in trunks(leader, board)} | {view}
        return sum(self.test_cost(v, n_test) for v in views) + 20.0

    def leader(self) -> tuple[Candidate | None, dict[str, Candidate]]:
        """(The candidate fit would pick now, ensembles of the candidates so far included, and the candidates it
        may be made of), or (None, {}) before any: the test pass a later view's ensemble grows from. Kept until a
        candidate is added or rescored (a view's pricing asks several times)."""
        key = tuple(sorted((c.name, c.estimate, c.score) for c in self.state.candidates.values()))
        if self._leaders and self._leaders[0] == key:
            return self._leaders[1]
        pool = list(self.state.candidates.values())
        if not pool:
            found = (None, {})
        elif self._y_val is None:  # before `run` (a bare stage): the best candidate by its estimate
            found = (max(pool, key=lambda c: (c.score[0], c.name)), self.state.candidates)
        else:
            y_oof = self._folds.y if self._folds is not None else None
            extra = []
            if self.cfg.ensemble and len(pool) > 1:
                extra = ensembles(pool, self.state.probas, self._y_val, oof=self.state.oof, y_oof=y_oof)
            board = pool + [c for c, _ in extra]
            leader, _ = pick(board, self.state.probas | {c.name: p for c, p in extra}, self._y_val)
            found = (leader, {c.name: c for c in board})
        self._leaders = (key, found)
        return found

    def candidate_cost(self, cand: Candidate, candidates: dict[str, Candidate], n_test: int) -> float:
        return self.costs.candidate_cost(cand, candidates, n_test)

    def view_cost(self, view: str, n_test: int) -> float:
        return self.costs.view_cost(view, n_test, partner=self.leader_cost(n_test), heads=self._heads_seconds())

    def _heads_seconds(self) -> float | None:
        """Seconds scoring the heads `_kept_heads` keeps takes on a view: each pair's mean measured time so far."""
        seconds: dict[tuple[str, str], list[float]] = {}
        for c in self.state.candidates.values():
            if c.kind == "frozen" and "pooling" in c.params:
                seconds.setdefault((c.params["pooling"], c.params["head"]), []).append(c.seconds)
        if not seconds:
            return None
        return sum(float(np.mean(seconds[k])) for k in self._kept_heads() if k in seconds)

    def _kept_heads(self) -> set[tuple[str, str]]:
        """The (pooling, head) pairs scored on a new view: all of them on the first; after it, those whose best
        estimate on the views so far lies within 2 standard errors of a difference of two estimates over those
        images (at least KEEP_WITHIN points) of the best pair's, and at least KEEP_LEAST pairs. The pairs rank alike
        across views (cub100, lite0: GeM probes lead on every view, the stages' kNN trails by 25 points), and scoring
        all 12 took as long as extracting the view (~82 s of ~115 s, cub100 at 5 minutes): the time of a second view."""
        best: dict[tuple[str, str], float] = {}
        n = 0
        for c in self.state.candidates.values():  # of the views whose heads were all scored (a resumed run's too)
            if c.kind == "frozen" and "pooling" in c.params and c.params["view"] in self.head_seconds:
                key = (c.params["pooling"], c.params["head"])
                best[key] = max(best.get(key, -1.0), c.score[0])
                n = max(n, self.n_trainval if c.estimate.startswith("oof") else self.n_val)
        every = {(p, h[0]) for p in POOLINGS for h in HEADS}
        if not best or n == 0:
            return every
        ranked = sorted(best, key=lambda k: -best[k])
        top = best[ranked[0]]
        within = max(KEEP_WITHIN / 100, 2 * float(np.sqrt(2 * top * (1 - top) / n)))
        return {k for i, k in enumerate(ranked) if i < KEEP_LEAST or best[k] >= top - within}

    def leader_cost(self, n_test: int) -> float | None:
        """Seconds the test pass of the leader so far (`leader`) would take; None before any candidate. What a new
        view's ensemble adds to, and what a fine-tune must leave free, or the leader it did not beat could no longer
        be scored."""
        leader, board = self.leader()
        return None if leader is None else self.candidate_cost(leader, board, n_test)

    def _store(self, view: str) -> FeatureStore:
        samples = [s for s in self.data.samples if s.split in ("train", "val")]
        trainval = ImageSet(self.data.root, self.data.classes, samples)
        t0 = time.perf_counter()
        backbone = self.backbone(view)
        result = extract_to_store(
            trainval, backbone, os.path.join(self.cfg.out, "features", view), poolings=POOLINGS,
            **self.passes(view), batch_size=self.cfg.batch_size, num_workers=self.cfg.workers,
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

        embedder = Embedder(backbone, POOLINGS, **self.passes(view))
        rt = Runtime(str(self.cfg.device), self.cfg.precision, True, self.cfg.workers)
        return recorded_conversion_seconds(embedder, backbone.preprocess, rt)

    # ---- candidates ---------------------------------------------------------------------------------------------
    def run(self, y_val: np.ndarray, *, n_test: int, folds: Folds | None = None, late: bool = False) -> None:
        """Every view x pooling x head that fits the budget, in the views' order; the first view always runs. With
        `folds`, each head is also scored out-of-fold over every training image. Called again later with `late`
        (time left after a fine-tune), it tries the views it skipped, then the late ones (`late_views`); what was
        scored is kept."""
        self._y_val, self._folds = y_val, folds
        for i, view in enumerate(self._order(late)):
            if self._ran(view):
                continue  # done in an earlier call (or a cheaper variant of it was)
            self.skipped = [s for s in self.skipped if s.get("view") != view]
            try:
                cost = self.view_cost(view, n_test)
            except FinegrainError as e:  # another backbone whose weights cannot be had here (no network)
                self.skipped.append({"view": view, "why": str(e)})
                continue
            if i > 0 and self.clock.remaining() - 20.0 < cost:
                why = f"extraction and a test pass on it (~{cost:.0f} s) do not fit in the budget"
                cheaper = self._fallback(view, n_test)
                if cheaper is not None:
                    why += f"; its cheaper variant {cheaper} ran instead"
                self.skipped.append({"view": view, "why": why})
                print(f"fit: skipping the {view} view: {why}", flush=True)
                if cheaper is not None:
                    self._run_view(cheaper, y_val, n_test, folds)
                continue
            self._run_view(view, y_val, n_test, folds)

    def _variants(self, view: str) -> list[str]:
        """The cheaper variants of a view (`fallback_views`), in the order they are tried."""
        return [v for v, geo in self.views.items() if geo.get("fallback_of") == view]

    def _ran(self, view: str) -> bool:
        """Whether the view's heads were scored, or a cheaper variant's in its place."""
        return any(v in self.head_seconds for v in [view, *self._variants(view)])

    def _fallback(self, view: str, n_test: int) -> str | None:
        """The first cheaper variant of `view` whose cost fits in what is left of the budget (None if none does)."""
        for v in self._variants(view):
            try:
                if self.view_cost(v, n_test) <= self.clock.remaining() - 20.0:
                    return v
            except FinegrainError:
                return None
        return None

    def _order(self, late: bool) -> list[str]:
        """The views to try: those not late in their order, then (with `late`) the late ones, the backbone whose
        frozen candidates score best first."""
        views = [v for v in self.views if not self.views[v].get("late") and not self.views[v].get("fallback_of")]
        if not late:
            return views
        best: dict[str, float] = {}
        for c in self.state.candidates.values():
            if c.kind == "frozen":
                b = c.params.get("backbone", "")
                best[b] = max(best.get(b, -1.0), c.score[0])
        extra = [v for v in self.views if self.views[v].get("late")]
        return views + sorted(extra, key=lambda v: -best.get(self.views[v]["backbone"], -1.0))

    def untried(self, n_test: int) -> list[str]:
        """Views not run yet (late ones included) whose cost fits in what is left of the budget."""
        left = self.clock.remaining() - 20.0
        out = []
        for view in self._order(late=True):
            if not self._ran(view):
                try:
                    if self.view_cost(view, n_test) <= left or self._fallback(view, n_test) is not None:
                        out.append(view)
                except FinegrainError:
                    continue
        return out

    def _run_view(self, view: str, y_val: np.ndarray, n_test: int, folds: Folds | None) -> None:
        val_paths = [s.path for s in self.data.samples if s.split == "val"]
        store = self._store(view)
        t0 = time.perf_counter()
        self._keep = self._pair_reserve(view, n_test)
        kept = self._kept_heads()
        if len(kept) < len(POOLINGS) * len(HEADS):
            print(f"fit: on {view}, the heads that led so far: {', '.join('/'.join(k) for k in sorted(kept))}")
        try:
            for pooling in POOLINGS:
                heads = [h for h in HEADS if (pooling, h[0]) in kept]
                if not heads:
                    continue
                Xtr, ytr = _features(store, "train", pooling)
                Xva = _aligned(store, "val", pooling, val_paths)
                Xall = _aligned(store, ("train", "val"), pooling, folds.paths) if folds is not None else None
                for head in heads:
                    self._score(view, pooling, head, (Xtr, ytr, Xva, Xall), y_val, n_test, folds)
        finally:
            self._keep = 0.0
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
            why = "no time left in the budget"
            if self._keep > self.costs.reserve(n_test):
                why = "the time left is kept for the test pass of this view's ensemble with the leader"
                why += f" (~{self._keep:.0f} s)"
            self.skipped.append({"candidate": name, "why": why})
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
        cand, oof = self._oof(cand, head, clf, Xall, folds, n_test) if folds is not None else (cand, None)
        self.state.add(replace(cand, seconds=time.perf_counter() - t0), proba, oof)

    def _oof(self, cand: Candidate, head, clf, Xall: np.ndarray, folds: Folds, n_test: int):
        """A frozen head's out-of-fold probabilities (`cross_validate`), refitted with the hyperparameters its
        single fit chose; a fold costs about half that fit (one solver run, no C search)."""
        fit_predict = head_fit_predict(
            head, fixed=fixed_params(clf), seed=self.cfg.seed, n_classes=len(self.data.classes)
        )
        return self.cross_validate(cand, fit_predict, Xall, folds, n_test, fold_seconds=0.5 * cand.seconds)

    def cross_validate(self, cand: Candidate, fit_predict, Xall: np.ndarray, folds: Folds, n_test: int, *,
                       fold_seconds: float) -> tuple[Candidate, np.ndarray | None]:  # fmt: skip
        """(the candidate with its OOF scores, its out-of-fold probabilities [N, C]) (`oof_loop` with
        `fit_predict`), or (the candidate with the reason in params['oof'], None) when its folds (about fold_seconds
        each) do not fit in the budget (it keeps its validation-split score)."""
        left = lambda: self.clock.remaining() - self.reserve(n_test) - 5  # noqa: E731
        guess = folds.k * fold_seconds
        oof = None
        if guess <= left():
            oof = oof_loop(fit_predict, Xall, folds, n_classes=len(self.data.classes), time_left=left)
        if oof is None:
            why = f"not run: its {folds.k} folds (~{guess:.0f} s) did not fit in the budget"
            return replace(cand, params={**cand.params, "oof": why}), None
        return cand.with_oof(oof, folds.y, folds.estimate), oof

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
            self.backbone(view), clf, norm, classes=self.data.classes, pooling=pooling, **self.passes(view),
            gallery=(X, y), train_counts=counts, extra={"fit_candidate": cand.name, "refit": "train+val"},
        )  # fmt: skip


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
