"""finegrain: fine-grained image recognition from small, imbalanced sets of labelled photos."""

__version__ = "0.1.0"
