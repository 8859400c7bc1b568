"""Preprocessing that travels with the weights: resolution, mean/std, crop, interpolation."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
from PIL import Image

_PIL_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing of a backbone: resize the short side to `input_size / crop_pct`, center-crop `input_size`."""

    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_INTERP:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_INTERP)}, got {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_timm(cls, model: torch.nn.Module) -> Preprocess:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        interp = cfg.get("interpolation", "bicubic")
        return cls(
            input_size=int(cfg["input_size"][-1]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            interpolation=interp if interp in _PIL_INTERP else "bicubic",
        )

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def to_dict(self) -> dict:
        return asdict(self)

    def with_size(self, input_size: int) -> Preprocess:
        return Preprocess(**{**self.to_dict(), "input_size": int(input_size)})

    def with_geometry(self, input_size: int | None = None, crop_pct: float | None = None) -> Preprocess:
        """A copy with another resolution and/or center-crop fraction; None keeps the current value."""
        return Preprocess(
            **{
                **self.to_dict(),
                "input_size": int(input_size or self.input_size),
                "crop_pct": crop_pct or self.crop_pct,
            }
        )

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def pil_to_uint8(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> [3, S, S] uint8 tensor, resized and center-cropped (same geometry as timm's eval)."""
        w, h = img.size
        short = self.resize_size
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), _PIL_INTERP[self.interpolation])
        s = self.input_size
        left = int(round((new_w - s) / 2.0))
        top = int(round((new_h - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(s, s, 3)
        return t.permute(2, 0, 1).contiguous()

    def normalize(self, batch_uint8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[B, 3, S, S] uint8 -> normalized float; done on the batch, after the workers, where it is cheap."""
        mean = torch.tensor(self.mean, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=batch_uint8.device).view(1, 3, 1, 1) * 255.0
        return ((batch_uint8.float() - mean) / std).to(dtype)
