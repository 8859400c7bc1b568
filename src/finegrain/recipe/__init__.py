from finegrain.recipe.regime import RegimeChoice, auto_cache_views, choose_regime, measure_training_speed

__all__ = ["RegimeChoice", "auto_cache_views", "choose_regime", "measure_training_speed"]
