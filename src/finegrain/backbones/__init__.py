from finegrain.backbones.factory import Backbone, create_backbone, list_backbones
from finegrain.backbones.preprocess import Preprocess

__all__ = ["Backbone", "Preprocess", "create_backbone", "list_backbones"]
