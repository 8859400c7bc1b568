"""The candidates `fit` tries: frozen-feature classifiers over extraction views, fine-tuning, and ensembles of the best
of them. Every candidate is scored on the same validation split; frozen ones (and their ensembles) also out-of-fold
over every training image (recipe/oof.py), the estimate they are ranked by. A candidate's probabilities are kept (for
the ensembles and for a resumed run); how to rebuild it is in its `params`."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from finegrain.embed import create_normalizer
from finegrain.heads import create_classifier

# Extraction views of the first backbone, cheapest first. BENCHMARKS.md (cub100, lite0): the eval view gives a 0.904
# GeM probe, 256 px full frame + flip 0.918-0.920 (for 2.6x the compute). Images much smaller than the backbone's input
# add a view at a resolution derived from theirs (`low_res_view`), and other backbones a view each (`views_for`).
VIEWS = {
    "eval": {"image_size": None, "crop_pct": None, "flip": False},
    "full256-flip": {"image_size": 256, "crop_pct": 1.0, "flip": True},
}
# The other backbones fit tries by default, in order, after the first one's views when the budget allows their
# extraction and test pass (and their weights load here): alone lite2 is no better on cub100 (GeM probe 0.909 at 260 px
# full frame + flip vs lite0's 0.918), but an ensemble of the two backbones' probes reaches 0.929-0.931
# (`python -m bench.fit`; two views of one backbone: 0.914); on a far domain another pre-training may be the closer.
DEFAULT_BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "efficientnet_lite1", "mobilenetv2_100")
SHORT_NAMES = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2",
               "mobilenetv2_100": "mobilenetv2"}  # fmt: skip
# Time left after the fine-tune goes to views at LATE_SCALE x a backbone's largest input (`late_views`).
LATE_SCALE = 1.25
LOW_RES_BELOW = 160  # median short side (px) under which a view at a resolution derived from the images' is added
POOLINGS = ("gem", "gap", "stages")  # stages: the last 3 stages, GAP and L2 each (models/pooling.py)
# Ties on validation go to the candidate expected to be better: its cub100 test top-1 in BENCHMARKS.md
# (representation table; the fine-tune is last:1 at 30 minutes). Small validation splits tie often.
PRIOR = {
    "eval/gap": {"probe-l2": 0.896, "probe-raw": 0.897, "ncm-pcaw": 0.882, "knn10-l2": 0.854},
    "eval/gem": {"probe-l2": 0.901, "probe-raw": 0.904, "ncm-pcaw": 0.892, "knn10-l2": 0.874},
    "full256-flip/gap": {"probe-l2": 0.904, "probe-raw": 0.897, "ncm-pcaw": 0.890, "knn10-l2": 0.867},
    "full256-flip/gem": {"probe-l2": 0.918, "probe-raw": 0.914, "ncm-pcaw": 0.906, "knn10-l2": 0.886},
    "lite2-full260-flip/gap": {"probe-l2": 0.899, "probe-raw": 0.907, "ncm-pcaw": 0.892, "knn10-l2": 0.863},
    "lite2-full260-flip/gem": {"probe-l2": 0.909, "probe-raw": 0.908, "ncm-pcaw": 0.904, "knn10-l2": 0.884},
    "finetune": {"finetune": 0.903},
}
# (name, classifier, its options, normalizer): the table's winners for each classifier family
HEADS = (
    ("probe-l2", "probe", {}, "l2"),
    ("probe-raw", "probe", {}, "none"),
    ("ncm-pcaw", "ncm", {}, "pca-whiten:256"),
    ("knn10-l2", "knn", {"n_neighbors": 10}, "l2"),
)
# fit's choice when no validation is possible (recipe/no_validation.py): SimpleShot's CL2N nearest class mean
NO_VAL_HEAD = ("ncm-cl2n", "ncm", {}, "cl2n")


@dataclass(frozen=True)
class Candidate:
    """One scored candidate. kind: frozen | semi | finetune | ensemble; val_top1 / val_mean_per_class on fit's
    validation split; oof_top1 / oof_mean_per_class out-of-fold over every training image when estimate is 'oof-K'
    (frozen candidates and their ensembles), None when estimate is 'val' (the validation split is all there is) or
    'none' (no validation possible: fit's documented choice, recipe/no_validation.py, scored on nothing). A value:
    a new score is a new Candidate (`dataclasses.replace`, `with_oof`)."""

    name: str
    kind: str
    val_top1: float | None  # None: not scored (no validation possible, recipe/no_validation.py)
    val_mean_per_class: float | None
    seconds: float
    params: dict = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    oof_top1: float | None = None
    oof_mean_per_class: float | None = None
    estimate: str = "val"
    rank_by: str = "top1"  # or "mean_per_class": on long-tailed data (fit sets it), balanced accuracy leads

    def with_oof(self, oof: np.ndarray, y: np.ndarray, estimate: str) -> Candidate:
        """This candidate scored out-of-fold: probabilities oof [N, C] of labels y [N], `estimate` ('oof-K')."""
        top1, mpc = val_scores(oof, y)
        return replace(self, oof_top1=top1, oof_mean_per_class=mpc, estimate=estimate)

    def _order(self, top1: float, mpc: float) -> tuple[float, float]:
        return (mpc, top1) if self.rank_by == "mean_per_class" else (top1, mpc)

    @property
    def score(self) -> tuple[float, float]:
        """The estimate the candidate is ranked by: (top-1, mean per-class), or the reverse with rank_by
        'mean_per_class'."""
        if self.estimate == "val":
            return self.val_score
        return self._order(self.oof_top1, self.oof_mean_per_class)

    @property
    def score_top1(self) -> float:
        """Top-1 of the candidate's estimate (out-of-fold, else the validation split), whatever it is ranked by."""
        return self.val_top1 if self.estimate == "val" else self.oof_top1

    @property
    def score_mean_per_class(self) -> float:
        return self.val_mean_per_class if self.estimate == "val" else self.oof_mean_per_class

    @property
    def val_score(self) -> tuple[float, float]:
        """The validation split's scores in the candidate's ranking order."""
        return self._order(self.val_top1, self.val_mean_per_class)

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "params"} | {"members": "+".join(self.members)}


def parse_backbones(text: str | None, first: str) -> list[str]:
    """The backbones of `fit --backbones a,b,...` (each a name `create_backbone` knows), checked without loading
    weights; empty: `first`, then DEFAULT_BACKBONES whose offline weights are installed here."""
    from finegrain.backbones.factory import _timm_names, list_backbones
    from finegrain.backbones.offline import OFFLINE_WEIGHTS, weights_file
    from finegrain.errors import FinegrainError

    if text:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for name in names:
            hub = name.startswith(("hf-hub:", "hf_hub:"))
            if name not in OFFLINE_WEIGHTS and not hub and name not in _timm_names():
                raise FinegrainError(
                    f"--backbones: unknown backbone {name!r}; use offline ones ({', '.join(list_backbones())}), timm "
                    "model names or hf-hub:org/name, separated by commas"
                )
        return list(dict.fromkeys(names))
    out = [first]
    for name in DEFAULT_BACKBONES:
        if name in out:
            continue
        try:
            weights_file(name)
        except (FinegrainError, KeyError):
            continue  # its weights package is not installed here: not offered by default
        out.append(name)
    return out


def low_res_view(native: float | None) -> int | None:
    """The input size of a view derived from the images' own (median short side `native`): about 3.5x it, within
    64-160 px, on a multiple of 16; None when the images are not small (LOW_RES_BELOW)."""
    if not native or native >= LOW_RES_BELOW:
        return None
    return int(min(160, max(64, 16 * round(3.5 * native / 16))))


def views_for(backbones: list[str], native: float | None = None) -> dict[str, dict]:
    """The extraction views fit tries, in order: the first backbone's (a low-resolution one first when the images are
    small, then its eval view, then 256 px full frame + flip), then one view of each other backbone (its own input
    size, full frame + flip)."""
    from finegrain.backbones import create_backbone

    first = backbones[0]
    out = {}
    low = low_res_view(native)
    if low is not None:
        out[f"low{low}-flip"] = {"image_size": low, "crop_pct": 1.0, "flip": True, "backbone": first}
    out |= {name: {**geo, "backbone": first} for name, geo in VIEWS.items()}
    for name in backbones[1:]:
        try:
            size = create_backbone(name, pretrained=False).preprocess.input_size
        except Exception:  # noqa: BLE001 - a hub model whose config cannot be fetched: its extraction will say why
            size = 224
        if low is not None:
            size = min(size, 2 * low)
        short = SHORT_NAMES.get(name, name.replace("/", "-").replace(":", "-"))
        out[f"{short}-full{size}-flip"] = {"backbone": name, "image_size": size, "crop_pct": 1.0, "flip": True}
    return out | fallback_views(out, low) | late_views(out, native) | zoom_views(first, native)


def fallback_views(views: dict[str, dict], low: int | None) -> dict[str, dict]:
    """Cheaper variants of each flip view after the first, tried in their order only when the view itself does not
    fit in the time left (marked "fallback_of"): with small images, the same backbone at the low-resolution view's
    side (a quarter of the pixels of 2x it), then that without its flip (an eighth); then the view without its flip
    (half the compute). Without them a run whose next view cost more than it had left ended early (issue 23:
    cifar10-500 at 5 minutes used 55-59% of its budget, cub100 skipped every second view; with the low side's flip
    variant alone, 64% when it was priced 10 s over what was left)."""
    out = {}
    for i, (name, geo) in enumerate(views.items()):
        if i == 0 or not geo["flip"]:
            continue
        stem = name.removesuffix("-flip")
        prefix = stem.rsplit("full", 1)[0] if "full" in stem else f"{stem}-"
        if low is not None and (geo["image_size"] or 224) > low and f"{prefix}low{low}-flip" not in views:
            # (not the first backbone's: its low-resolution view with flip is the first view already)
            out[f"{prefix}low{low}-flip"] = {**geo, "image_size": low, "fallback_of": name}
            out[f"{prefix}low{low}"] = {**geo, "image_size": low, "flip": False, "fallback_of": name}
        out[stem] = {**geo, "flip": False, "fallback_of": name}
    return {k: v for k, v in out.items() if k not in views}


def late_views(views: dict[str, dict], native: float | None) -> dict[str, dict]:
    """A higher-resolution view of each backbone (LATE_SCALE x its largest view, on a multiple of 32; "test at a
    higher resolution than the weights were trained at", FixRes), tried only with the time a run would otherwise
    leave unspent (marked "late": after the fine-tune); none for small images (under LOW_RES_BELOW px: the
    low-resolution view is theirs). A 256 px photo seen at 320 px is upsampled 1.25x, as FixRes tests at a higher
    resolution than the weights trained at: the objects look larger, as RandomResizedCrop showed them in training."""
    out = {}
    for name in dict.fromkeys(v["backbone"] for v in views.values()):
        sizes = [v["image_size"] or 224 for v in views.values() if v["backbone"] == name]
        size = int(32 * round(LATE_SCALE * max(sizes) / 32))
        if native is not None and native < LOW_RES_BELOW:
            continue
        short = SHORT_NAMES.get(name, name.replace("/", "-").replace(":", "-"))
        prefix = "" if name == next(iter(views.values()))["backbone"] else f"{short}-"
        out[f"{prefix}full{size}-flip"] = {"backbone": name, "image_size": size, "crop_pct": 1.0, "flip": True,
                                           "late": True}  # fmt: skip
    return out


def zoom_views(backbone: str, native: float | None) -> dict[str, dict]:
    """Look closer (models/zoom.py): the first backbone's 256 px full frame + flip view, and a second pass on the box
    its attention map finds, decoded at twice the side; the head reads both descriptors. About twice the full view's
    compute (bench/zoom.py), so tried with the time a run would otherwise leave unspent (late); none for small images
    (a 32 px photo has no detail to zoom into)."""
    if native is not None and native < LOW_RES_BELOW:
        return {}
    return {"zoom256-flip": {"backbone": backbone, "image_size": 256, "crop_pct": 1.0, "flip": True, "zoom": True,
                             "late": True}}  # fmt: skip


def native_side(paths: list[str], n: int = 200) -> float | None:
    """The median short side (px) of up to n of the images, from their headers (no decoding); None if none reads."""
    from PIL import Image

    step = max(1, len(paths) // n)
    sides = []
    for p in paths[::step][:n]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):
            continue
    return float(np.median(sides)) if sides else None


def finetune_candidate(name: str, run: str, val_paths: list[str], y_val: np.ndarray, n_classes: int, cfg, *,
                       seconds: float, params: dict | None = None) -> tuple[Candidate, np.ndarray]:  # fmt: skip
    """A fine-tuned run folder as a candidate: its model on fit's validation images (unreadable ones score as
    wrong), (Candidate kind 'finetune', probabilities [N_val, n_classes])."""
    from finegrain.evaluate.inference import predict_paths
    from finegrain.evaluate.predictor import load

    pred = predict_paths(load(run), val_paths, precision=cfg.precision, workers=cfg.workers)
    proba = np.zeros((len(val_paths), n_classes))
    proba[pred.index] = pred.proba
    top1, mpc = val_scores(proba, y_val)
    return Candidate(name, "finetune", top1, mpc, seconds, {"source": name, "run": run, **(params or {})}), proba


def val_scores(proba: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(top-1, mean per-class accuracy over the classes in y) of probabilities [N, C] against labels [N]."""
    from finegrain.evaluate.metrics import mean_per_class_accuracy

    pred = proba.argmax(1)
    return float(np.mean(pred == y)), mean_per_class_accuracy(y, pred, proba.shape[1])


def fit_head(head: tuple, X: np.ndarray, y: np.ndarray, *, seed: int, fixed: dict | None = None):
    """(fitted normalizer, fitted classifier) of one HEADS entry on features X [N, D], labels y [N]; `fixed`
    overrides the classifier's options (an out-of-fold refit: the probe's C chosen once, `Cs=(C,)`)."""
    _, classifier, options, norm_name = head
    if norm_name.startswith("pca-whiten:"):  # fewer components than images - 1
        norm_name = f"pca-whiten:{min(int(norm_name.split(':')[1]), max(len(X) - 1, 1))}"
    norm = create_normalizer(norm_name).fit(X)
    kwargs = dict(options)
    if classifier == "probe":
        kwargs["random_state"] = seed
    if classifier == "knn":
        kwargs["n_neighbors"] = min(kwargs.get("n_neighbors", 10), len(X))
    kwargs.update(fixed or {})
    return norm, create_classifier(classifier, **kwargs).fit(norm.transform(X), y)


def class_proba(clf, X: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba over every class id [N, n_classes] (classes absent from the fit get 0)."""
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(clf.classes_, np.int64)] = clf.predict_proba(X)
    return out


def _combos(leaders: list[Candidate], need: list[Candidate] | None = None):
    """Sets of 2 and 3 leaders (each holding one of `need`, when given)."""
    for size in (2, 3):
        for combo in itertools.combinations(leaders, size):
            if need is None or any(c in need for c in combo):
                yield combo


def _leaders(cands: list[Candidate], n: int) -> list[Candidate]:
    """The best candidate of each source (view/pooling, or a fine-tune), the n best of those, by their estimate."""
    best_by_source: dict[str, Candidate] = {}
    for c in sorted(cands, key=lambda c: (-c.score[0], c.name)):
        best_by_source.setdefault(c.params.get("source", c.name), c)
    return sorted(best_by_source.values(), key=lambda c: (-c.score[0], c.name))[:n]


def ensembles(pool: list[Candidate], probas: dict[str, np.ndarray], y: np.ndarray, *, oof=None, y_oof=None, top=4):
    """Equal-weight averages of 2 and 3 of the `top` best candidates from different sources: [(Candidate, proba)],
    proba on the validation split. Candidates with out-of-fold probabilities (`oof`: name -> [N, C], labels
    `y_oof`) are led and scored out-of-fold; the others (a fine-tune) join 3 of those leaders in ensembles scored
    on the validation split only, like themselves. Near-ties are better averaged than picked: every source's best
    within the noise of the leader's out-of-fold estimate (`near_ties`, up to NEAR_TIE_MAX) is also averaged."""
    oof = oof or {}
    cross = [c for c in pool if c.estimate != "val" and c.name in oof]
    val_only = [c for c in pool if c not in cross]
    out = []
    if cross:
        combos = list(_combos(_leaders(cross, top)))
        near = near_ties(cross, oof, y_oof)
        if len(near) > 3:
            combos.append(tuple(near))
        per_backbone = _best_per_backbone(cross)  # pre-trainings differ most: their errors do
        if len(per_backbone) > 1 and per_backbone not in combos:
            combos.append(per_backbone)
        if val_only:
            mixed = _leaders(val_only, 2)
            combos += list(_combos(_leaders(cross, 3) + mixed, need=mixed))
    else:
        combos = list(_combos(_leaders(pool, top)))
    for combo in combos:
        cand, p = average(combo, probas, y)
        if all(c in cross for c in combo):
            cand = cand.with_oof(sum(oof[c.name] for c in combo) / len(combo), y_oof, combo[0].estimate)
        out.append((cand, p))
    return out


def _best_per_backbone(cands: list[Candidate]) -> tuple[Candidate, ...]:
    """The best candidate of each backbone (frozen and semi-supervised heads, by their estimate), best first."""
    best: dict[str, Candidate] = {}
    for c in sorted(cands, key=lambda c: (-c.score[0], c.name)):
        if not c.members and "backbone" in c.params:
            best.setdefault(c.params["backbone"], c)
    return tuple(best.values())


NEAR_TIE_MAX = 6  # the most members of a near-tie ensemble (its test pass grows with the views it needs)


def near_ties(cross: list[Candidate], oof: dict[str, np.ndarray], y: np.ndarray) -> list[Candidate]:
    """The best candidate of each source whose out-of-fold score is within one standard error (paired, over the
    same images) of the leader's, the leader first; at most NEAR_TIE_MAX."""
    leaders = _leaders(cross, NEAR_TIE_MAX)
    if not leaders:
        return []
    out = [leaders[0]]
    for c in leaders[1:]:
        diff, se = paired_difference(oof[leaders[0].name], oof[c.name], y, rank_by=leaders[0].rank_by)
        if diff <= se:
            out.append(c)
    return out


def paired_difference(pa: np.ndarray, pb: np.ndarray, y: np.ndarray, *, rank_by: str = "top1"):
    """(score of a - score of b, the standard error of that difference) from probabilities [N, C] of two models on
    the same N labelled images: the per-image difference of correctness, weighted so that its mean is the
    difference of top-1 (or, rank_by 'mean_per_class', of mean per-class accuracy)."""
    y = np.asarray(y)
    w = np.ones(len(y))
    if rank_by == "mean_per_class":
        classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        w = len(y) / (len(classes) * counts[inverse])
    d = w * ((pa.argmax(1) == y).astype(float) - (pb.argmax(1) == y).astype(float))
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    return float(d.mean()), se


def average(combo, probas: dict[str, np.ndarray], y: np.ndarray) -> tuple[Candidate, np.ndarray]:
    """The equal-weight ensemble of the candidates `combo` (named after them, in order), scored on the validation
    split: (Candidate kind 'ensemble', its probabilities [N_val, C])."""
    p = sum(probas[c.name] for c in combo) / len(combo)
    name = "ensemble(" + " + ".join(c.name for c in combo) + ")"
    members = [c.name for c in combo]
    cand = Candidate(name, "ensemble", *val_scores(p, y), sum(c.seconds for c in combo), {}, members,
                     rank_by=combo[0].rank_by)  # fmt: skip
    return cand, p


def prior(cand: Candidate, by_name: dict[str, Candidate]) -> float:
    """The expected accuracy of a candidate before validation (PRIOR); an ensemble: its best member's + 0.001."""
    if cand.members:
        return max(prior(by_name[m], by_name) for m in cand.members) + 0.001
    return PRIOR.get(cand.params.get("source", ""), {}).get(cand.params.get("head", cand.name), 0.0)


def _best(candidates: list[Candidate], by_name: dict[str, Candidate], *, on_val: bool = False) -> Candidate:
    """Best top-1 of the candidates' estimate (the validation split's with on_val); ties go to the better mean
    per-class accuracy, then to the higher prior, then to fewer models; never to a timing, so a resumed run chooses
    as an uninterrupted one."""
    ranked = sorted(candidates, key=lambda c: c.name)

    def key(c: Candidate):
        return (*(c.val_score if on_val else c.score), prior(c, by_name), -len(c.members))

    return max(ranked, key=key)


def pick(candidates: list[Candidate], probas: dict[str, np.ndarray] | None = None, y_val: np.ndarray | None = None
         ) -> tuple[Candidate, Candidate | None]:  # fmt: skip
    """(chosen, its strongest challenger on the validation split or None). The best out-of-fold candidate, unless a
    candidate with only a validation score (a fine-tune, an ensemble with one, a frozen head whose OOF pass did not
    fit the budget) beats it on the validation split's images, which both were scored on (ties go to the OOF one).
    With the validation probabilities (`probas`, labels `y_val`) it must beat it by more than the standard error of
    the paired difference on those images (`paired_difference`), times `noise_multiple` of how many such
    candidates there were: a win within the noise of a few hundred images does not displace an estimate made on
    all of them. Without OOF estimates: the best on the validation split. A
    candidate with params 'member_only' (a distilled student) is never chosen alone, only inside an ensemble."""
    by_name = {c.name: c for c in candidates}
    candidates = [c for c in candidates if "member_only" not in c.params] or candidates
    cross = [c for c in candidates if c.estimate != "val"]
    val_only = [c for c in candidates if c.estimate == "val"]
    if not cross:
        return _best(candidates, by_name), None
    best = _best(cross, by_name)
    if not val_only:
        return best, None
    challenger = _best(val_only, by_name, on_val=True)
    if challenger.val_score > best.val_score and beyond_noise(challenger, best, probas, y_val, among=len(val_only)):
        return challenger, best
    return best, challenger


def noise_multiple(among: int) -> float:
    """How many standard errors the best of `among` validation-only candidates must win by: 1 for one, else
    sqrt(2 ln m), about the expected maximum of m standard normal draws, since the best of m noisy scores is chosen
    for being high (issue 23, cub100 at 5 minutes: the best of 8 val-only heads won by 0.9 points, its standard
    error 0.9, and lost 0.6 points on test to the out-of-fold leader it displaced)."""
    return max(1.0, float(np.sqrt(2 * np.log(max(among, 1)))))


def beyond_noise(a: Candidate, b: Candidate, probas: dict[str, np.ndarray] | None, y: np.ndarray | None, *,
                 among: int = 1) -> bool:  # fmt: skip
    """Whether a, the best of `among` validation-only candidates, beats b on the validation split by more than
    `noise_multiple(among)` standard errors of the paired difference (True when the probabilities are not given:
    the plain comparison decides)."""
    if probas is None or y is None or a.name not in probas or b.name not in probas:
        return True
    diff, se = paired_difference(probas[a.name], probas[b.name], y, rank_by=a.rank_by)
    return diff > noise_multiple(among) * se
