"""fit's cost model: the seconds each piece of work is expected to take on this machine, from what was measured so far
(an extracted view's pace and engine set-up, the heads' scoring time) and, before that, from a short forward pass of
each backbone scaled by pixels and flips. `FrozenStage` measures, this prices: a view (its extraction, test pass
and heads), a candidate's test pass (one forward per distinct trunk it runs), the reserve kept for the end."""

from __future__ import annotations

import time

import torch

from finegrain.backbones import Backbone, create_backbone
from finegrain.recipe.candidates import Candidate
from finegrain.runtime import Runtime


class CostModel:
    def __init__(self, cfg, views: dict[str, dict], n_trainval: int, backbone) -> None:
        """`views`: fit's views (name -> geometry and backbone); `backbone(view)`: the Backbone a view extracts
        with; n_trainval: the images a view's extraction reads."""
        self.cfg, self.views, self.n_trainval, self.backbone = cfg, views, n_trainval, backbone
        self.spi: dict[str, float] = {}  # seconds an image, measured per view
        # seconds to set a view's engine up (ONNX export, parity check, the auto race), measured per view: paid once
        # by its extraction and once more by the test pass of a model on it (the saved model is converted anew)
        self.setup: dict[str, float] = {}
        self.head_seconds: dict[str, float] = {}  # seconds scoring every head on a view's features (OOF included)
        self._units: dict[str, float] = {}  # view -> compute relative to a 224 px forward of its backbone
        self._forward_spi: dict[str, float] = {}  # backbone -> seconds an image of its bare 224 px forward

    def _cost_units(self, view: str) -> float:
        """A view's compute relative to one 224 px forward (pixels x flips x passes); its geometry is read once."""
        if view not in self._units:
            size = self.backbone(view).preprocess.input_size
            # a zoom view decodes at twice its side and runs its trunk twice at that side: half the decoded pixels
            passes = (2 if self.views[view]["flip"] else 1) * (0.5 if self.views[view].get("zoom") else 1)
            self._units[view] = (size / 224) ** 2 * passes
        return self._units[view]

    def estimate_spi(self, view: str) -> float:
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

    def estimate_setup(self, view: str) -> float:
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
        return self.estimate_setup(view) + self.estimate_spi(view) * n_test

    def reserve(self, n_test: int) -> float:
        """Seconds to keep for the end: the test pass of a model on the cheapest view, and the refit."""
        first = self.views[next(iter(self.views))]["backbone"]
        return min(self.test_cost(v, n_test) for v in self.views if self.views[v]["backbone"] == first) + 20.0

    def candidate_cost(self, cand: Candidate, candidates: dict[str, Candidate], n_test: int) -> float:
        """Seconds the test pass of a candidate takes: one forward pass for each trunk it runs (members that share a
        view share its extraction, as the saved ensemble shares it: evaluate/predictor.py), a fine-tune its own at
        the eval view's cost."""
        return sum(self.test_cost(view, n_test) for _, view in trunks(cand, candidates))

    def view_cost(self, view: str, n_test: int, partner: float | None = None, heads: float | None = None) -> float:
        """Seconds a view's candidates take: its extraction (engine set-up included), a test pass on it, and
        scoring the heads (as long as the last view's did), and a partner's test pass (a later view is worth most in
        an ensemble with the leader so far, whose test pass fit keeps free while the view's heads are scored):
        `partner`, the leader's test pass, else the costliest extracted view's (pricing the cheapest one let fit
        extract a view whose ensemble with the leader it could then not afford: issue 23, cub100 at 10 minutes;
        leaving it out for the first backbone's second view let that view's heads run out of time for their
        out-of-fold pass: cub100 at 5 minutes). `heads`: seconds its heads will take, when the
        caller knows (fewer heads on a later view), else as long as the last view's took."""
        cost = self.estimate_setup(view) + self.n_trainval * self.estimate_spi(view)
        heads = max(self.head_seconds.values(), default=0.0) if heads is None else heads
        cost += self.test_cost(view, n_test) + heads
        if partner is None:
            partner = max((self.test_cost(v, n_test) for v in self.spi if v != view), default=0.0)
        return cost + partner


def trunks(cand: Candidate, candidates: dict[str, Candidate]) -> set[tuple[str, str]]:
    """The distinct forward passes a candidate's test pass runs: (what runs, its view), a frozen or semi-supervised
    head's view once however many heads read it, each fine-tuned model on its own."""
    if cand.members:
        return set().union(*(trunks(candidates[m], candidates) for m in cand.members))
    if cand.kind == "finetune":
        return {(cand.name, cand.params.get("view", "eval"))}
    view = cand.params.get("view", "eval")
    return {(view, view)}


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
