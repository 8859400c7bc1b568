"""THE model: one spec (backbone + pooling + normalizer + head + preprocessing + classes), one builder, save / load."""

from finegrain.models.checkpoint import load_checkpoint, save_checkpoint
from finegrain.models.classifier import HEADS, ImageClassifier, StageView, stage_view
from finegrain.models.io import (
    find_model_folder,
    load_model,
    save_model,
    save_timm_weights,
    save_weights,
    timm_state_dict,
)
from finegrain.models.layers import FeatureNorm, NormedLinear, msra_init_
from finegrain.models.pooling import POOLINGS, GeM, create_pooling, has_learned_pooling
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
    "StageView",
    "build_backbone",
    "build_model",
    "create_pooling",
    "find_model_folder",
    "has_learned_pooling",
    "load_checkpoint",
    "load_model",
    "msra_init_",
    "save_checkpoint",
    "save_model",
    "save_timm_weights",
    "save_weights",
    "stage_view",
    "timm_state_dict",
]
