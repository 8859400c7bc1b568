"""fit: candidates tried on validation inside a time budget, a leaderboard, the chosen model saved and scored."""

from finegrain.recipe.fit import FitConfig, FitResult, fit

__all__ = ["FitConfig", "FitResult", "fit"]
