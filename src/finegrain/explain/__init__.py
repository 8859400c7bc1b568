"""Where a model looks: CAM, Grad-CAM, attention maps and weakly supervised boxes."""

from finegrain.explain.cam import Explanation, box_from_map, explain_images, explain_tensor, overlay

__all__ = ["Explanation", "box_from_map", "explain_images", "explain_tensor", "overlay"]
