"""Test-time augmentation: the views of one image (flips, 5 or 10 crops, several resolutions), probabilities averaged.

A view set is the product scales x crops x flips. Crops follow torchvision's FiveCrop / TenCrop: the image is
resized as for evaluation (short side to `size / crop_pct`), then the four corners and the centre are cut at `size`;
ten crops add their mirror images. Each resolution keeps the model's crop_pct, so size 288 resizes the short side
to 288 / 0.875 = 329 before cropping (the FixRes "test at a higher resolution" setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from finegrain.backbones import Preprocess
from finegrain.errors import FinegrainError

CROPS = (1, 5, 10)


@dataclass(frozen=True)
class TTA:
    """Which views to average. `sizes` empty: the model's own input size only."""

    flip: bool = False
    crops: int = 1
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.crops not in CROPS:
            raise FinegrainError(f"crops must be one of {CROPS} (centre, FiveCrop, TenCrop); got {self.crops}")
        if any(int(s) < 16 for s in self.sizes):
            raise FinegrainError(f"test sizes must be at least 16 pixels; got {list(self.sizes)}")

    @classmethod
    def parse(cls, text: str | None, sizes: str | list[int] | tuple[int, ...] | None = None) -> TTA:
        """`"none"`, `"flip"`, `"5crop"`, `"10crop"`, combined with `+` or `,` (e.g. `flip+5crop`);
        sizes: `"224,256,288"` or a list of ints."""
        flip, crops = False, 1
        for part in (text or "none").replace("+", ",").split(","):
            part = part.strip().lower()
            if part in ("", "none"):
                continue
            if part == "flip":
                flip = True
            elif part in ("5crop", "10crop"):
                crops = max(crops, int(part[:-4]))
            else:
                raise FinegrainError(f"unknown TTA {part!r}: use none, flip, 5crop, 10crop, combined with +")
        if isinstance(sizes, str):
            try:
                sizes = [int(s) for s in sizes.split(",") if s.strip()]
            except ValueError:
                raise FinegrainError(f"test sizes must be integers like 224,256,288; got {sizes!r}") from None
        return cls(flip=flip, crops=crops, sizes=tuple(int(s) for s in sizes or ()))

    def views_per_size(self) -> int:
        if self.crops == 10:
            return 10  # TenCrop already holds the mirror images
        return self.crops * (2 if self.flip else 1)

    def n_views(self) -> int:
        return self.views_per_size() * max(1, len(self.sizes))

    def describe(self) -> str:
        parts = []
        if self.crops > 1:
            parts.append(f"{self.crops}crop")
        if self.flip and self.crops != 10:
            parts.append("flip")
        name = "+".join(parts) or "single"
        if self.sizes:
            name += " @ " + ",".join(str(s) for s in self.sizes)
        return name

    def preprocesses(self, base: Preprocess) -> list[Preprocess]:
        return [base.with_size(s) for s in self.sizes] if self.sizes else [base]


def _resize_short(img: Image.Image, pre: Preprocess) -> Image.Image:
    from finegrain.backbones.preprocess import _PIL_INTERP

    w, h = img.size
    short = pre.resize_size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    return img if new == (w, h) else img.resize(new, _PIL_INTERP[pre.interpolation])


def _to_uint8(img: Image.Image) -> torch.Tensor:
    w, h = img.size
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).contiguous()


def image_views(img: Image.Image, pre: Preprocess, tta: TTA) -> torch.Tensor:
    """One RGB image -> [V, 3, S, S] uint8 views at `pre.input_size` (S); view 0 is the plain eval view."""
    if tta.crops == 1:
        views = [pre.pil_to_uint8(img)]
    else:  # torchvision's five_crop: corners (tl, tr, bl, br), then the centre; ours puts the centre first
        from torchvision.transforms.v2.functional import five_crop

        *corners, centre = five_crop(_to_uint8(_resize_short(img, pre)), [pre.input_size, pre.input_size])
        views = [centre, *corners]
    if tta.flip or tta.crops == 10:
        views = views + [v.flip(-1) for v in views]
    return torch.stack(views)


class TTAViews:
    """A picklable transform for `runtime.ImageFiles`: one RGB image -> [V, 3, S, S] uint8 per test size."""

    def __init__(self, pres: list[Preprocess], tta: TTA) -> None:
        self.pres, self.tta = pres, tta

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [image_views(img, p, self.tta) for p in self.pres]
