"""finegrain: fine-grained image recognition from small, imbalanced sets of labelled photos."""

import os

__version__ = "0.1.0"


def load(path: str, *, device: str = "cpu", runtime: str = "torch"):
    """Load a trained model folder; returns a Predictor (`predict(paths)`, `predict_proba(paths)`).

    runtime: torch | onnx | auto (ONNX Runtime where it converts with parity and measures faster)."""
    from finegrain.evaluate.predictor import load as _load

    return _load(path, device=device, runtime=runtime)


def fit(data: str, *, out: str, budget_min: float = 10.0, progress: bool = True, **options):
    """The best model finegrain can make from a labelled folder in `budget_min` minutes (chosen on validation,
    written to `out` with leaderboard.csv and fit.json); returns it loaded, ready to predict."""
    from finegrain.evaluate.predictor import load as _load
    from finegrain.recipe import FitConfig
    from finegrain.recipe import fit as _fit

    result = _fit(FitConfig(data=data, out=out, budget_min=budget_min, **options), progress=progress)
    return _load(os.path.join(result.out, "model"))
