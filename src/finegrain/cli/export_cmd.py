"""`finegrain export MODEL --format onnx [--out F] [--quantize int8] [--calibration DATA]`: the graph, its
self-check printed (max |logit diff| vs PyTorch fp32, top-1 agreement), exit 0; a model that cannot be exported
(an ensemble, a k-NN gallery vote) or a graph that fails its check: one line, exit 2, nothing written."""

from __future__ import annotations

import argparse
import os

from finegrain.errors import FinegrainError


def cmd_export(args: argparse.Namespace) -> int:
    from finegrain.cli.commands import _overrides
    from finegrain.config import ExportConfig, build_config, config_choices
    from finegrain.export import export_model
    from finegrain.runtime.engine import INT8_MIN_AGREEMENT

    args = build_config(ExportConfig, yaml_path=args.config, overrides=_overrides(args, ExportConfig),
                        choices=config_choices(ExportConfig))  # fmt: skip
    if not os.path.exists(args.model):
        raise FinegrainError(f"no model at {args.model}: give a model folder (or run folder) saved by finegrain")
    if args.format == "timm":
        return _export_timm(args)
    result = export_model(
        args.model, out=args.out, quantize=args.quantize, calibration=args.calibration, max_images=args.max_images
    )
    print(f"{args.model} -> {result.path} (ONNX, dynamic batch; input: normalized float32 NCHW)")
    print("  " + result.fp32.line("fp32"))
    if result.int8 is not None:
        print(f"  {result.int8.line('int8')} -> {result.int8_path}")
        if result.int8.top1_agreement < INT8_MIN_AGREEMENT:
            print(f"  int8 agreement under {INT8_MIN_AGREEMENT}: --runtime auto will not use it")
    return 0


def _export_timm(args) -> int:
    """--format timm: the trunk (and a plain linear head) in the backbone's own key layout, as safetensors."""
    from finegrain.evaluate.predictor import load
    from finegrain.models import find_model_folder, save_timm_weights

    if args.quantize:
        raise FinegrainError("--quantize applies to --format onnx only")
    predictor = load(args.model)
    if not hasattr(predictor, "spec"):
        raise FinegrainError("an ensemble has no single backbone: export each member folder with --format timm")
    out = args.out or os.path.join(find_model_folder(args.model)[0], "timm.safetensors")
    with_head = save_timm_weights(predictor.model, out)
    name = predictor.model.backbone.model.default_cfg.get("architecture", predictor.spec.backbone)
    classes = f"num_classes={len(predictor.classes)}" if with_head else "num_classes=0"
    print(f"{args.model} -> {out} (timm key layout{', classifier included' if with_head else ', trunk only'})")
    print(f"  timm.create_model({name!r}, pretrained=True, {classes}, pretrained_cfg_overlay=dict(file={out!r}))")
    return 0
