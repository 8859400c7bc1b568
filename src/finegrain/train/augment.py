"""Train-time augmentation presets: PIL image -> [3, S, S] uint8 tensor (normalization happens on the batch).

Built on torchvision.transforms.v2, whose randomness comes from torch's global RNG, so a DataLoader worker seeded
by torch gives the same crops on every re-run. Every transform is a plain object graph: picklable for workers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from finegrain.backbones.preprocess import Preprocess
from finegrain.registry import Registry

ImageTransform = Callable[[Image.Image], torch.Tensor]

AUGMENTATIONS: Registry[Callable[[Preprocess, tuple[float, float]], ImageTransform]] = Registry("augmentation")

_INTERP = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
    "lanczos": InterpolationMode.LANCZOS,
}


class _ToRGB:
    """Guard for callers that skip `load_image`: palette, grayscale or RGBA images become RGB."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class EvalTransform:
    """Resize the short side to `preprocess.resize_size`, center-crop `input_size`: PIL -> [3, S, S] uint8."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.preprocess.pil_to_uint8(_ToRGB()(img))

    def __repr__(self) -> str:
        return f"EvalTransform({self.preprocess})"


def _crop_flip(preprocess: Preprocess, scale: tuple[float, float]) -> list[v2.Transform]:
    size = preprocess.input_size
    crop = v2.RandomResizedCrop(size, scale=scale, interpolation=_INTERP[preprocess.interpolation], antialias=True)
    return [_ToRGB(), crop, v2.RandomHorizontalFlip()]


def _compose(steps: list) -> ImageTransform:
    return v2.Compose([*steps, v2.PILToTensor()])


@AUGMENTATIONS.register("none")
def _none(preprocess: Preprocess, scale: tuple[float, float]) -> ImageTransform:
    return EvalTransform(preprocess)


@AUGMENTATIONS.register("crop-flip")
def _crop_flip_preset(preprocess: Preprocess, scale: tuple[float, float]) -> ImageTransform:
    return _compose(_crop_flip(preprocess, scale))


@AUGMENTATIONS.register("pad-crop-flip")
def _pad_crop_flip(preprocess: Preprocess, scale: tuple[float, float]) -> ImageTransform:
    """The CIFAR recipe (He et al., 2016): resize to the input size, pad 4 px, random crop back, flip."""
    size = preprocess.input_size
    resize = v2.Resize((size, size), interpolation=_INTERP[preprocess.interpolation], antialias=True)
    return _compose([_ToRGB(), resize, v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()])


@AUGMENTATIONS.register("autoaugment")
def _autoaugment(preprocess: Preprocess, scale: tuple[float, float]) -> ImageTransform:
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.BILINEAR)
    return _compose([*_crop_flip(preprocess, scale), policy])


@AUGMENTATIONS.register("randaugment")
def _randaugment(preprocess: Preprocess, scale: tuple[float, float]) -> ImageTransform:
    policy = v2.RandAugment(num_ops=2, magnitude=9, interpolation=InterpolationMode.BILINEAR)
    return _compose([*_crop_flip(preprocess, scale), policy])


@AUGMENTATIONS.register("trivialaugment")
def _trivialaugment(preprocess: Preprocess, scale: tuple[float, float]) -> ImageTransform:
    policy = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
    return _compose([*_crop_flip(preprocess, scale), policy])


def build_train_transform(
    name: str, preprocess: Preprocess, *, scale: tuple[float, float] = (0.25, 1.0)
) -> ImageTransform:
    """Preset `name` (see AUGMENTATIONS) as a PIL -> [3, S, S] uint8 callable; `scale` is the RandomResizedCrop
    area range, as fractions of the image (ignored by "none")."""
    lo, hi = (float(s) for s in scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    return AUGMENTATIONS.get(name)(preprocess, (lo, hi))


def build_eval_transform(preprocess: Preprocess) -> ImageTransform:
    """PIL -> [3, S, S] uint8 with the backbone's eval geometry (`Preprocess.pil_to_uint8`)."""
    return EvalTransform(preprocess)
