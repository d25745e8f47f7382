"""Choosing the device and the precision: CUDA fp16/bf16 when there is a GPU, CPU fp32 otherwise;
and the process-wide switches of the GPU fast path (:func:`configure_backends`)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DeviceError

DTYPE_NAMES = ("auto", "fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Placement:
    """Where a model runs: a torch device string and a torch dtype name (``fp32``/``fp16``/``bf16``)."""

    device: str
    dtype: str

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]


def resolve(device: str = "auto", dtype: str = "auto") -> Placement:
    """Resolve ``--device auto|cpu|cuda|cuda:N`` and ``--dtype auto|fp32|fp16|bf16``.

    ``auto`` picks the first CUDA device when one is usable, else the CPU. The ``auto`` dtype is
    fp16 on CUDA (what the reference sampled with) and fp32 on the CPU (CPU half-precision
    convolutions are slow or missing).
    """
    import torch

    device = (device or "auto").strip().lower()
    dtype = (dtype or "auto").strip().lower()
    if dtype not in DTYPE_NAMES:
        raise DeviceError(f"unknown precision {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                "--device cuda was asked for but no CUDA GPU is usable here "
                "(no GPU, no driver, or a CPU-only torch build); use --device cpu or --device auto"
            )
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(
                f"no CUDA device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif device != "cpu" and device != "mps":
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    if dtype == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise DeviceError("this GPU does not support bf16; use --dtype fp16")
    if dtype == "fp16" and device == "cpu":
        raise DeviceError("fp16 is not supported on the CPU; use --dtype fp32 (default) or bf16")
    return Placement(device=device, dtype=dtype)


def configure_backends(placement: Placement) -> list[str]:
    """The GPU fast path's process-wide switches, for a model placed on CUDA (nothing on the CPU,
    whose results must not change): TF32 tensor cores for fp32 matmuls and convolutions (Ampere and
    later; an fp16/bf16 model does not use them), and cuDNN's autotuner, which picks the fastest
    convolution once per input shape (the tiled tasks repeat one shape for thousands of windows).
    Returns what was switched on (for the log)."""
    import torch

    if not placement.device.startswith("cuda"):
        return []
    done = []
    index = int(placement.device.partition(":")[2] or 0)
    if torch.cuda.get_device_capability(index) >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        done.append("TF32 matmuls (fp32)")
    torch.backends.cudnn.benchmark = True
    done.append("cuDNN autotuning")
    return done
