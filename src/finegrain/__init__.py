"""finegrain: fine-grained image recognition from small, imbalanced sets of labelled photos."""

__version__ = "0.1.0"


def load(path: str, *, device: str = "auto", runtime: str = "auto"):
    """Load a saved model: a model folder, a training run or a `fit` output folder. Returns a Predictor (or an
    Ensemble) with `predict(paths, k=...)`, `predict_proba(paths)` and `classes`.

    device: auto (cuda when available, else cpu), cpu, cuda or cuda:N. runtime: auto (ONNX Runtime where it converts
    with parity and measures faster here; the CLI's and fit's default), torch or onnx."""
    from finegrain.evaluate.predictor import load as _load

    return _load(path, device=device, runtime=runtime)


def fit(data: str, *, out: str, budget_min: float = 10.0, progress: bool = True, **options):
    """The best model finegrain can make from a labelled folder in `budget_min` minutes (chosen without the test
    split), written to `out` (model/, leaderboard.csv, fit.json). Returns a `FitResult`: `.leaderboard`, `.chosen`,
    `.test` / `.test_top1` (scored once, at the end), and the loaded model (`.model`, `.predict(paths, k=...)`,
    `.predict_proba(paths)`). `options`: the fields of `finegrain.recipe.FitConfig` (`finegrain fit --help`)."""
    from finegrain.config import build_config, config_choices
    from finegrain.recipe import FitConfig
    from finegrain.recipe import fit as _fit

    values = {"data": data, "out": out, "budget_min": budget_min, **options}  # checked as the command line is
    return _fit(build_config(FitConfig, overrides=values, choices=config_choices(FitConfig)), progress=progress)
