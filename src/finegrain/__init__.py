"""finegrain: fine-grained image recognition from small, imbalanced sets of labelled photos."""

__version__ = "0.1.0"


def load(path: str, *, device: str = "cpu"):
    """Load a trained model folder; returns a Predictor (`predict(paths)`, `predict_proba(paths)`)."""
    from finegrain.evaluate.predictor import load as _load

    return _load(path, device=device)
