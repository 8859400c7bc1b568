"""Learning from unlabeled images on frozen embeddings: label propagation, self-training, the out-of-class guard,
and which unlabeled images to label next. Distillation into a fine-tuned student lives in `finegrain.semi.distill`
(not imported here: it needs torch and the training engine)."""

from finegrain.semi.graph import certainty, diffuse, knn_graph
from finegrain.semi.guard import guard_mask, mass_threshold, similarity_guard
from finegrain.semi.probe import WeightedProbe
from finegrain.semi.propagation import LabelPropagationProbe
from finegrain.semi.self_training import SelfTrainingProbe, capped_pseudo_labels
from finegrain.semi.suggest import suggest_to_label, write_suggestions

__all__ = [
    "LabelPropagationProbe",
    "SelfTrainingProbe",
    "WeightedProbe",
    "capped_pseudo_labels",
    "certainty",
    "diffuse",
    "guard_mask",
    "knn_graph",
    "mass_threshold",
    "similarity_guard",
    "suggest_to_label",
    "write_suggestions",
]
