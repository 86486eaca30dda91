"""The dtype a model runs in: ``--dtype auto | bfloat16 | float16 | float32`` (issue 23).

``auto`` follows the hardware. bfloat16 on CUDA where the GPU computes it natively, and on a CPU
whose matmuls take bfloat16 natively: AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``), where a
SmolLM2 prefill of 8K tokens ran 3.5x faster than in float32 (2-core Xeon, issue 23). float32
everywhere else: without those instructions torch converts bfloat16 in software, and a linear
layer of SmolLM2's shapes took ~5x float32's time on an AMD EPYC (Zen 3, AVX2 only), a plain
``torch.matmul`` ~45x.

What the CPU can do is read from what the machine reports (CPUID, through torch's cpuinfo:
``torch.cpu.get_capabilities()``), never from a vendor or model name. Detection and resolution
are separate functions so tests pass a fake capability.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import get_args

import torch

from compressors.base import dtype_name
from server.settings import DtypeName

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_CHOICES: tuple[str, ...] = get_args(DtypeName)
# CPU features with which torch (oneDNN) runs bfloat16 matmuls in hardware.
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
NATIVE_FP16_CPU_FLAGS = ("amx_fp16", "avx512_fp16")


class DtypeError(ValueError):
    """A dtype that is unknown or that the device cannot run (a one-line error on the CLI)."""


@dataclass(frozen=True)
class Capability:
    """What the device reports that bears on the dtype: its type, the CPU's feature flags, and
    (CUDA) whether the GPU computes bfloat16 natively."""

    device_type: str
    cpu_flags: frozenset[str] = frozenset()
    cuda_bf16: bool = False

    @property
    def native_bf16_flags(self) -> list[str]:
        return [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in self.cpu_flags]

    @property
    def native_fp16_flags(self) -> list[str]:
        return [flag for flag in NATIVE_FP16_CPU_FLAGS if flag in self.cpu_flags]


def cpu_flags() -> frozenset[str]:
    """The CPU features torch's cpuinfo found (``avx2``, ``avx512_bf16``, ``amx_bf16``...)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return frozenset(name for name, present in capabilities.items() if present is True)


def detect_capability(device: torch.device | str) -> Capability:
    device = torch.device(device)
    if device.type == "cuda":
        return Capability("cuda", cpu_flags(), bool(torch.cuda.is_bf16_supported(including_emulation=False)))
    return Capability(device.type, cpu_flags())


@dataclass(frozen=True)
class ResolvedDtype:
    """The dtype a model runs in, what was asked for, and why (the startup log line says it)."""

    name: str  # bfloat16 | float16 | float32
    requested: str  # auto | bfloat16 | float16 | float32
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def describe(self) -> str:
        return f"dtype {self.requested} -> {self.name}: {self.reason}"


def check_dtype_name(name: str, what: str = "--dtype") -> str:
    if name not in DTYPE_CHOICES:
        raise DtypeError(f"{what} must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    return name


def resolve_dtype(requested: str, device: torch.device | str, capability: Capability | None = None) -> ResolvedDtype:
    """``requested`` on ``device`` -> the dtype to run, or :class:`DtypeError` if it cannot run there."""
    check_dtype_name(requested)
    capability = capability or detect_capability(device)
    if capability.device_type == "cuda":
        return resolve_cuda(requested, capability.cuda_bf16)
    bf16, fp16 = capability.native_bf16_flags, capability.native_fp16_flags
    if requested == "auto":
        if bf16:
            return ResolvedDtype("bfloat16", requested, f"this CPU reports {', '.join(bf16)}: native bfloat16 matmuls")
        return ResolvedDtype("float32", requested, emulated_because(NATIVE_BF16_CPU_FLAGS, "bfloat16 would be"))
    if requested == "bfloat16" and not bf16:
        return ResolvedDtype(requested, requested, "asked for; " + emulated_because(NATIVE_BF16_CPU_FLAGS, "it is"))
    if requested == "float16" and not fp16:
        return ResolvedDtype(requested, requested, "asked for; " + emulated_because(NATIVE_FP16_CPU_FLAGS, "it is"))
    flags = {"bfloat16": bf16, "float16": fp16}.get(requested, [])
    return ResolvedDtype(
        requested, requested, "asked for" + (f" (this CPU reports {', '.join(flags)})" if flags else "")
    )


def emulated_because(flags: tuple[str, ...], subject: str) -> str:
    return f"this CPU reports none of {', '.join(flags)}: {subject} emulated in software, slower than float32"


def resolve_cuda(requested: str, native_bf16: bool) -> ResolvedDtype:
    if requested == "bfloat16" and not native_bf16:
        raise DtypeError("--dtype bfloat16 cannot run on this GPU (no native bfloat16 below compute capability 8.0)")
    if requested == "auto":
        name = "bfloat16" if native_bf16 else "float16"
        return ResolvedDtype(name, requested, f"a CUDA GPU {'with' if native_bf16 else 'without'} native bfloat16")
    return ResolvedDtype(requested, requested, "asked for, on a CUDA GPU")


def check_runs(dtype: torch.dtype, device: torch.device | str) -> None:
    """Run the ops a decoder needs (a linear layer, SDPA, RMS norm) once in ``dtype`` on ``device``:
    a device that cannot is a :class:`DtypeError` before any weight is loaded."""
    try:
        x = torch.ones(1, 2, 4, 8, dtype=dtype, device=device)
        torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
        torch.nn.functional.linear(x, torch.ones(8, 8, dtype=dtype, device=device)).float().pow(2).mean().rsqrt()
    except (RuntimeError, TypeError) as exc:
        first_line = str(exc).splitlines()[0]
        raise DtypeError(f"--dtype {dtype_name(dtype)} cannot run on {torch.device(device)}: {first_line}") from exc


@cache
def pick_dtype(
    requested: str, device: torch.device | str, what: str = "model", capability: Capability | None = None
) -> ResolvedDtype:
    """Resolve, check that it runs, and log the choice with what the hardware reported (once per
    arguments: the server checks its settings before it builds the engine). With ``capability``
    given (a GPU that another process will own, read without initialising CUDA here) nothing runs."""
    resolved = resolve_dtype(requested, device, capability)
    if capability is None:
        check_runs(resolved.torch_dtype, device)
    level = logging.WARNING if "emulated" in resolved.reason and resolved.requested != "auto" else logging.INFO
    logger.log(level, "%s on %s: %s", what, torch.device(device), resolved.describe())
    return resolved


def flags_of_interest(flags: Iterable[str] | None = None) -> list[str]:
    """The CPU flags that decide ``auto`` (and the vector width torch dispatches to), for benchmark JSON."""
    found = cpu_flags() if flags is None else frozenset(flags)
    wanted = ("avx2", "avx512_f", "avx512_vnni", *NATIVE_BF16_CPU_FLAGS, *NATIVE_FP16_CPU_FLAGS, "amx_tile")
    return [flag for flag in wanted if flag in found]
