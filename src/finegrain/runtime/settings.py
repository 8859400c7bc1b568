"""Where and how a model runs: device, precision, autocast, channels_last, decoding workers.

Fast paths are chosen by a capability check, never by assumption: bf16 autocast only where the hardware runs it
natively (CUDA with bf16; CPUs whose PyTorch kernels are AVX-512 or AMX); on an AVX2-only CPU bf16 is emulated and
slower, so `auto` means fp32 there. This is the place the export/serve work adds ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from finegrain.errors import FinegrainError

PRECISIONS = ("auto", "fp32", "bf16", "amp")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu; a device this machine does not have -> FinegrainError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise FinegrainError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise FinegrainError(f"device {name} is not available: no CUDA GPU on this machine (use auto or cpu)")
        if device.index is not None and device.index >= count:
            raise FinegrainError(f"device {name} is not available: this machine has {count} CUDA GPU(s)")
    elif device.type != "cpu":
        raise FinegrainError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls/convs run natively (fast) on `device`.

    CPU: PyTorch must run its AVX-512 (or AMX) kernels, and the CPU must have bf16 instructions (AVX512_BF16 or
    AMX-BF16): Skylake-X and Cascade Lake have AVX-512 without them, where oneDNN emulates bf16 (slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cap = torch.backends.cpu.get_cpu_capability()
    if not (cap in ("AVX512", "AMX") or "AVX512" in cap):
        return False
    flags = _cpu_flags()
    return flags is None or bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where the hardware runs it natively, else fp32. `amp` (CUDA autocast) is kept as asked."""
    if precision not in PRECISIONS:
        raise FinegrainError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def default_num_workers() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # One decoding worker per two cores: on small machines the model's threads need the rest.
    return max(1, min(8, n // 2))


@dataclass(frozen=True)
class Runtime:
    """How to run a model. precision: auto | fp32 | bf16 | amp (CUDA: fp16 where bf16 is not supported);
    workers: DataLoader decoding processes (None: one per two cores)."""

    device: str = "auto"  # cuda when available, else cpu
    precision: str = "auto"
    channels_last: bool = True
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.device == "auto":
            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")
        if self.precision not in PRECISIONS:
            raise FinegrainError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self.torch_device)

    @property
    def num_workers(self) -> int:
        return default_num_workers() if self.workers is None else self.workers

    def autocast(self):
        """The autocast context of this precision (a no-op for fp32)."""
        p, device = self.resolved_precision, self.torch_device
        if p == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        if p == "amp":
            if device.type != "cuda":
                raise FinegrainError("precision amp needs a CUDA device; use fp32 or bf16 on a CPU")
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this device, in eval mode, in channels_last layout when asked."""
        model = model.to(self.torch_device).eval()
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_input(self, x: torch.Tensor, preprocess) -> torch.Tensor:
        """uint8 images [B, 3, S, S] -> normalized float input on this device (channels_last when asked)."""
        x = preprocess.normalize(x.to(self.torch_device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
