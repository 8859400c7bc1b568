"""Look closer (issue 25): a second pass of the same trunk on the region its first pass found discriminative.

The image is decoded at twice the view's side (`ZOOM_FACTOR`); the first pass sees it halved (a 2x2 average, an
exact anti-aliased downscale), the second a square crop of the full-resolution decode around the attention box, resized
to the view's side (`torchvision.ops.roi_align`, 2x2 samples a bin). Everything is a tensor op of the batch, so the same
code runs at training time, in `predict`, in `serve` and in the ONNX export, and no label ever reaches it.

The attention map (`attention_map`): the class-agnostic mean channel activation of the last stage (Wei et al.,
"Selective Convolutional Descriptor Aggregation", TIP 2017), or, given a linear head's weights, the CAM of the class
that head predicts (Zhou et al., CVPR 2016). The box: every cell at or above the map's mean (SCDA's threshold; the
bounding box of all of them, not only the largest connected region, so it stays a batched tensor op), enlarged by
`margin` of its side on each edge, made square, at least `min_side` of the image, shifted inside the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ZOOM_FACTOR = 2  # the decode is this many times the view's side: the crop is cut from it
ZOOM_MARGIN = 0.1
ZOOM_MIN_SIDE = 0.4  # never zoom past 2.5x: a box from a 7x7 map is coarse


def attention_map(fmap: torch.Tensor, weights: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """[B, C, h, w] -> [B, h, w]: the mean channel activation, or with a linear head (weights [K, C], bias [K]) on the
    map's average, the CAM of its predicted class (ReLU of the class weights over the map)."""
    fmap = fmap.float()
    if weights is None:
        return fmap.mean(1)
    logits = fmap.mean((2, 3)) @ weights.t() + (0 if bias is None else bias)
    return torch.relu(torch.einsum("bc,bchw->bhw", weights[logits.argmax(1)], fmap))


def attention_box(amap: torch.Tensor, *, margin: float = ZOOM_MARGIN, min_side: float = ZOOM_MIN_SIDE) -> torch.Tensor:
    """Maps [B, h, w] -> square boxes [B, 4] (x0, y0, x1, y1) as fractions of the image side."""
    b, h, w = amap.shape
    mask = (amap >= amap.mean((1, 2), keepdim=True)).float()
    rows, cols = mask.amax(2), mask.amax(1)  # [B, h], [B, w]: a row (column) holds a cell at or above the mean
    y0 = rows.argmax(1).float() / h
    y1 = 1 - rows.flip(1).argmax(1).float() / h
    x0 = cols.argmax(1).float() / w
    x1 = 1 - cols.flip(1).argmax(1).float() / w
    side = torch.maximum(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = side.clamp(min=min_side, max=1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = torch.minimum(torch.clamp(cx - side / 2, min=0.0), 1 - side)
    top = torch.minimum(torch.clamp(cy - side / 2, min=0.0), 1 - side)
    return torch.stack([left, top, left + side, top + side], 1)


def crop_boxes(x_hi: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The boxes (fractions) cut from the full-resolution batch [B, 3, H, W] and resized to [B, 3, size, size]."""
    from torchvision.ops import roi_align

    idx = torch.arange(x_hi.shape[0], device=x_hi.device, dtype=x_hi.dtype).unsqueeze(1)
    scale = torch.tensor([x_hi.shape[3], x_hi.shape[2], x_hi.shape[3], x_hi.shape[2]], dtype=x_hi.dtype,
                         device=x_hi.device)  # fmt: skip
    rois = torch.cat([idx, boxes.to(x_hi.dtype) * scale], 1)
    return roi_align(x_hi, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


def first_pass(maps, x_hi: torch.Tensor, *, weights=None, bias=None):
    """The full view's pass: `maps(x)` -> (final map, stage maps) of the trunk on the halved decode. Returns (its
    maps, the boxes [B, 4] as fractions of the image)."""
    full = maps(F.avg_pool2d(x_hi, ZOOM_FACTOR))
    return full, attention_box(attention_map(full[0], weights, bias))


def zoom_maps(maps, x_hi: torch.Tensor, *, weights=None, bias=None):
    """Both passes. Returns (the full view's maps, the zoom's maps, the boxes [B, 4] as fractions of the image)."""
    full, boxes = first_pass(maps, x_hi, weights=weights, bias=bias)
    zoom = maps(crop_boxes(x_hi, boxes, x_hi.shape[-1] // ZOOM_FACTOR))
    return full, zoom, boxes


def box_in_photo(box, photo_size: tuple[int, int], crop_pct: float) -> list[float]:
    """A box (fractions of the centre-cropped view) -> fractions (x0, y0, x1, y1) of the whole photo (w, h): the
    view is the centre square of side crop_pct x the photo's short side (Preprocess.pil_to_uint8's geometry)."""
    w, h = photo_size
    side = crop_pct * min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    x0, y0, x1, y1 = (float(v) for v in box)
    return [(left + x0 * side) / w, (top + y0 * side) / h, (left + x1 * side) / w, (top + y1 * side) / h]


__all__ = ["ZOOM_FACTOR", "attention_box", "attention_map", "box_in_photo", "crop_boxes", "first_pass", "zoom_maps"]
