"""Where a classifier looks: CAM, Grad-CAM and learned attention maps, overlays, and boxes from thresholded maps.

- CAM (Zhou et al., 2016): for a GAP -> linear head, the class map is the head's class weights applied at each
  position of the last feature map (exactly the logit before averaging).
- Grad-CAM (Selvaraju et al., 2017): any backbone; the channels of a target layer's activations are weighted by the
  spatial mean of the class score's gradient, then ReLU. The target layer defaults to the last layer of the
  backbone with a spatial output (found by tracing one forward pass) and can be named instead.
- attention: the weights of `pooling=attn`, the map the model itself pools with.

Maps are normalised to [0, 1] and upsampled to the model's input view; `box_from_map` thresholds a map at a fraction
of its maximum and boxes the largest connected region (the weakly supervised localization protocol of the CAM paper,
threshold 0.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from finegrain.data import load_image
from finegrain.errors import FinegrainError
from finegrain.models.pooling import AttentionPool, GlobalAvgPool

METHODS = ("auto", "cam", "gradcam", "attention")


@dataclass
class Explanation:
    path: str
    method: str
    layer: str | None
    target: int  # class index explained
    target_name: str
    probability: float  # of the explained class
    predicted: str
    heatmap: np.ndarray  # [S, S] in [0, 1], over the input view
    view: Image.Image  # the S x S image the model saw
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 in view pixels
    box_original: tuple[int, int, int, int] | None  # the same box in the original image's pixels

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "method": self.method,
            "layer": self.layer,
            "class": self.target_name,
            "probability": round(self.probability, 6),
            "predicted": self.predicted,
            "box_view": list(self.box) if self.box else None,
            "box_original": list(self.box_original) if self.box_original else None,
        }


def _module_names(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


@torch.no_grad()
def auto_target_layer(model: torch.nn.Module, x: torch.Tensor) -> str:
    """Name of the last module of the backbone, in execution order, whose output is a [B, C, H, W] map."""
    names = _module_names(model)
    order: list[str] = []
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: order.append(names[mod]) if torch.is_tensor(out) and out.ndim == 4 else None
        )
        for n, m in model.named_modules()
        if n.startswith("backbone.") and n != "backbone.model"
    ]
    try:
        model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise FinegrainError("found no layer with a spatial output to explain; name one with --layer")
    return order[-1]


def _normalise(cam: torch.Tensor, size: int) -> np.ndarray:
    cam = F.interpolate(cam[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).numpy()


def _resolve_method(model, method: str) -> str:

    if method not in METHODS:
        raise FinegrainError(f"unknown explanation method {method!r}; valid: {', '.join(METHODS)}")
    if getattr(model, "zoom", False):
        raise FinegrainError("a look-closer (zoom) model runs its trunk twice: its zoom box shows where it looked")
    # CAM is exact for GAP -> linear; a feature norm rescales each image's logits, so Grad-CAM explains it instead
    linear = type(model.head) is torch.nn.Linear and not getattr(model, "feature_norm", False)
    if method == "auto":
        if isinstance(model.pool, AttentionPool):
            return "attention"
        return "cam" if isinstance(model.pool, GlobalAvgPool) and linear else "gradcam"
    if method == "cam" and not (isinstance(model.pool, GlobalAvgPool) and linear):
        raise FinegrainError(
            "CAM needs a model with GAP pooling and a linear head (no feature_norm); use --method gradcam"
        )
    if method == "attention" and not isinstance(model.pool, AttentionPool):
        raise FinegrainError("this model has no attention pooling (train with pooling=attn); use --method gradcam")
    return method


def explain_tensor(
    model, x: torch.Tensor, *, method: str = "auto", target: int | None = None, layer: str | None = None
) -> tuple[np.ndarray, int, np.ndarray, str, str | None]:
    """One normalised input [1, 3, S, S] -> (map [S, S], class explained, probabilities [C], method, layer)."""
    model.eval()
    method = _resolve_method(model, method)
    size = x.shape[-1]
    if method in ("cam", "attention"):
        with torch.no_grad():
            fmap = model.forward_features(x).float()
            proba = model.forward_head(fmap).float().softmax(-1)[0]
            t = int(proba.argmax()) if target is None else target
            if method == "cam":
                cam = torch.einsum("c,chw->hw", model.head.weight[t].float(), fmap[0])
            else:
                cam = model.pool.attention_map(fmap)[0]
        return _normalise(cam, size), t, proba.numpy(), method, None
    layer = layer or auto_target_layer(model, x)
    modules = dict(model.named_modules())
    if layer not in modules:
        raise FinegrainError(f"no layer {layer!r} in this model; e.g. {auto_target_layer(model, x)}")
    store: dict[str, torch.Tensor] = {}

    def hook(mod, inp, out):
        if not torch.is_tensor(out) or out.ndim != 4:
            raise FinegrainError(f"layer {layer} does not output a [B, C, H, W] map; choose another --layer")
        out.retain_grad()
        store["act"] = out

    h = modules[layer].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # so activations of frozen layers still carry gradients
            logits = model(x).float()
            proba = logits.softmax(-1)[0].detach()
            t = int(proba.argmax()) if target is None else target
            model.zero_grad(set_to_none=True)
            logits[0, t].backward()
    finally:
        h.remove()
    act, grad = store["act"].detach()[0].float(), store["act"].grad[0].float()
    cam = torch.relu(torch.einsum("c,chw->hw", grad.mean(dim=(1, 2)), act))
    return _normalise(cam, size), t, proba.numpy(), method, layer


def box_from_map(heatmap: np.ndarray, threshold: float = 0.2) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1; x1, y1 exclusive) of the largest region where the map >= threshold x max."""
    from scipy import ndimage

    if not 0 < threshold < 1:
        raise FinegrainError(f"box threshold must be between 0 and 1 (a fraction of the peak); got {threshold}")
    mask = heatmap >= threshold * heatmap.max()
    if heatmap.max() <= 0 or not mask.any():
        return None
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def view_to_original(box, original_size: tuple[int, int], pre) -> tuple[int, int, int, int]:
    """A box on the centre-cropped eval view -> the same box in the original image's pixels."""
    w, h = original_size
    short = pre.resize_size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = int(round((new_w - pre.input_size) / 2.0)), int(round((new_h - pre.input_size) / 2.0))
    sx, sy = w / new_w, h / new_h
    x0, y0, x1, y1 = box
    return (
        max(0, int(round((x0 + left) * sx))),
        max(0, int(round((y0 + top) * sy))),
        min(w, int(round((x1 + left) * sx))),
        min(h, int(round((y1 + top) * sy))),
    )


def overlay(view: Image.Image, heatmap: np.ndarray, box=None, *, alpha: float = 0.45) -> Image.Image:
    """The view with the heatmap blended in (jet colours) and the box drawn."""
    from matplotlib import colormaps

    colours = (colormaps["jet"](heatmap)[..., :3] * 255).astype(np.uint8)
    out = Image.blend(view.convert("RGB"), Image.fromarray(colours), alpha)
    if box is not None:
        ImageDraw.Draw(out).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 255, 255), width=2)
    return out


def explain_images(
    predictor,
    images,
    *,
    method: str = "auto",
    target: str | int | None = None,
    layer: str | None = None,
    threshold: float = 0.2,
) -> list[Explanation]:
    """Explain image files (or PIL images) with a loaded model (`finegrain.load`). Undecodable files raise
    ImageDecodeError; `explain` in the CLI skips and reports them."""

    model, pre = predictor.model, predictor.preprocess
    t_index = None
    if target is not None:
        if isinstance(target, str):
            if target not in predictor.classes:
                raise FinegrainError(f"unknown class {target!r}; the model knows {len(predictor.classes)} classes")
            t_index = predictor.classes.index(target)
        else:
            t_index = int(target)
    out = []
    for item in images:
        img = item if isinstance(item, Image.Image) else load_image(item)
        img = img.convert("RGB")
        u8 = pre.pil_to_uint8(img)
        x = pre.normalize(u8[None].to(predictor.device))
        heat, t, proba, used, used_layer = explain_tensor(model, x, method=method, target=t_index, layer=layer)
        view = Image.fromarray(u8.permute(1, 2, 0).numpy())
        box = box_from_map(heat, threshold)
        out.append(
            Explanation(
                path=item if isinstance(item, str) else "<image>",
                method=used,
                layer=used_layer,
                target=t,
                target_name=predictor.classes[t],
                probability=float(proba[t]),
                predicted=predictor.classes[int(proba.argmax())],
                heatmap=heat,
                view=view,
                box=box,
                box_original=view_to_original(box, img.size, pre) if box else None,
            )
        )
    return out
