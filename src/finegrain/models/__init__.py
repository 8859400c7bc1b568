"""THE model: one spec (backbone + pooling + normalizer + head + preprocessing + classes), one builder, save / load."""

from finegrain.models.checkpoint import load_checkpoint, save_checkpoint
from finegrain.models.classifier import (
    HEADS,
    ImageClassifier,
    StageView,
    backbone_maps,
    forward_stages,
    pooled_dim,
    stage_view,
)
from finegrain.models.io import (
    find_model_folder,
    load_model,
    save_model,
    save_timm_weights,
    save_weights,
    timm_state_dict,
)
from finegrain.models.layers import FeatureNorm, NormedLinear, msra_init_
from finegrain.models.pooling import (
    POOLINGS,
    GeM,
    StagePool,
    apply_pooling,
    create_pooling,
    has_learned_pooling,
    stage_maps_needed,
)
from finegrain.models.spec import FORMAT, ModelSpec, build_backbone, build_model

__all__ = [
    "FORMAT",
    "HEADS",
    "POOLINGS",
    "FeatureNorm",
    "GeM",
    "ImageClassifier",
    "ModelSpec",
    "NormedLinear",
    "StagePool",
    "StageView",
    "apply_pooling",
    "backbone_maps",
    "build_backbone",
    "build_model",
    "create_pooling",
    "find_model_folder",
    "forward_stages",
    "has_learned_pooling",
    "load_checkpoint",
    "load_model",
    "msra_init_",
    "pooled_dim",
    "save_checkpoint",
    "save_model",
    "save_timm_weights",
    "save_weights",
    "stage_maps_needed",
    "stage_view",
    "timm_state_dict",
]
