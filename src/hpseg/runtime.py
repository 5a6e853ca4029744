"""Where and how computation runs: one :class:`Runtime` decided at the entry point.

The entry layer (``hpseg.pipeline``, the CLI, the demo) builds a :class:`Runtime` once — device,
numeric precision, distributed rank and world size, whether to show progress bars — and passes
it down. Library code never reads environment variables or picks a device on its own; it asks
the runtime for an autocast context, a gradient scaler or the matmul precision of the loss.

Precision (``train.precision``):

* ``fp16`` — autocast to float16 with a gradient scaler initialised as the authors' code does
  (``init_scale=2048, growth_interval=1000``); the paper presets use it;
* ``bf16`` — autocast to bfloat16 (no scaler needed);
* ``fp32`` — no autocast;
* ``auto`` — bf16 where the GPU supports it, else fp16.

Mixed precision applies to CUDA only: on CPU (and Apple MPS) everything runs in float32, and
the runtime says so once in the log.

Determinism (``train.deterministic``, default on): :func:`make_deterministic` asks PyTorch for
deterministic kernels (``torch.use_deterministic_algorithms``, cuDNN without autotuning, cuBLAS
with a fixed workspace, ``CUBLAS_WORKSPACE_CONFIG=:4096:8``), so two runs — and a killed and
resumed run — give bit-identical weights on one GPU as they do on CPU. hpseg's own training step
uses no operation without a deterministic kernel (no atomic float additions in the loss, the
probes' upsampling as matrix products).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hpseg.errors import HPSegError

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "Runtime", "eval_mode", "make_deterministic", "resolve_device", "seed_everything"]

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
#: the authors' GradScaler settings (run.py)
FP16_INIT_SCALE, FP16_GROWTH_INTERVAL = 2048.0, 1000


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA (``cuda:<local_rank>``), then Apple MPS, then CPU; explicit names
    are checked. A bare ``cuda`` becomes ``cuda:<local_rank>`` (one GPU per process).

    Raises:
        HPSegError: the requested device is not available on this machine.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise HPSegError(f"device {name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HPSegError(f"device {name!r} but CUDA is not available here: use train.device=cpu (or --device cpu)")
        if device.index is None:
            device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise HPSegError(f"device {name!r} but Apple MPS is not available here: use cpu")
    return device


@dataclass(frozen=True)
class Runtime:
    """Device, precision, distributed position and progress display of one process.

    Attributes:
        device: where tensors live.
        precision: the *effective* precision: ``fp16`` | ``bf16`` | ``fp32`` (``auto`` resolved;
            ``fp32`` whenever the device is not CUDA).
        requested: the precision asked for (for the protocol block).
        rank, world_size, local_rank: this process in a torchrun job (0, 1, 0 otherwise).
        progress: show progress bars (main process only).
    """

    device: torch.device
    precision: str = "fp32"
    requested: str = "fp32"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    progress: bool = False

    @classmethod
    def create(
        cls,
        device: str | torch.device = "auto",
        precision: str = "auto",
        *,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        progress: bool = False,
    ) -> Runtime:
        """Resolve ``device`` and ``precision`` (see the module docstring)."""
        if precision not in PRECISIONS:
            raise HPSegError(f"train.precision={precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
        dev = device if isinstance(device, torch.device) else resolve_device(device, local_rank)
        effective = "fp32"
        if dev.type == "cuda":
            effective = precision
            if precision == "auto":
                effective = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            if effective == "bf16" and not torch.cuda.is_bf16_supported():
                raise HPSegError(f"{dev} does not support bfloat16: use train.precision=fp16")
        elif precision in ("fp16", "bf16") and rank == 0:
            log.info("train.precision=%s applies to CUDA only: running in fp32 on %s", precision, dev)
        return cls(dev, effective, precision, rank, world_size, local_rank, progress and rank == 0)

    @property
    def is_main(self) -> bool:
        """True on the process that logs, validates and writes files."""
        return self.rank == 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for full precision."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Mixed precision per :attr:`precision`; a no-op in fp32."""
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, active only for fp16 (with the authors' settings)."""
        enabled = self.precision == "fp16"
        return torch.amp.GradScaler(self.device.type if enabled else "cpu", init_scale=FP16_INIT_SCALE,
                                    growth_interval=FP16_GROWTH_INTERVAL, enabled=enabled)

    @property
    def matmul_dtype(self) -> torch.dtype:
        """Precision of the loss's similarity products: float16 under CUDA mixed precision (as
        the authors' autocast), float32 otherwise."""
        return torch.float16 if self.device.type == "cuda" and self.precision != "fp32" else torch.float32

    def describe(self) -> str:
        """``"cuda:0 · fp16"`` (plus the rank when distributed)."""
        where = f" · rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return f"{self.device} · {self.precision}{where}"


def make_deterministic(enabled: bool = True) -> None:
    """Deterministic kernels for this process (see the module docstring); ``False`` restores
    PyTorch's defaults. Called by the entry layer before the first CUDA matrix product.

    Uninitialised memory is not filled (hpseg never reads it), which keeps ``torch.empty`` free.
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.utils.deterministic.fill_uninitialized_memory = not enabled  # type: ignore[attr-defined]
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Temporarily put modules in eval mode, restoring their previous modes."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, was in zip(modules, modes):
            m.train(was)
