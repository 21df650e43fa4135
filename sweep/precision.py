"""Which number format a from-scratch trial computes in: float32, or mixed bfloat16 where the hardware has it.

Mixed bfloat16 (Keras' ``mixed_bfloat16`` policy) computes convolutions in bfloat16 and keeps the weights, the
logits and the loss in float32. It pays only where the hardware multiplies bfloat16 natively: CPUs with
AVX512_BF16 or AMX, and GPUs from compute capability 8.0 (Ampere). Elsewhere it is emulated and slower, so
``auto`` chooses it only there.
"""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("auto", "float32", "mixed_bfloat16")
# /proc/cpuinfo flags of a CPU that computes bfloat16 natively
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def native_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """What here computes bfloat16 natively ("GPU (compute capability 9.0)", "CPU (amx_bf16)"), or None."""
    gpu = _bfloat16_gpu()
    if gpu:
        return gpu
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:  # not Linux: no flags to read
        return None
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    return f"CPU ({', '.join(found)})" if found else None


def _bfloat16_gpu() -> str | None:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and tuple(capability) >= (8, 0):
            return f"GPU (compute capability {capability[0]}.{capability[1]})"
    return None


def resolve(precision: str) -> str:
    """The Keras dtype policy for ``precision``: ``auto`` is mixed_bfloat16 where ``native_bfloat16`` finds
    hardware for it, else float32."""
    if precision == "auto":
        return "mixed_bfloat16" if native_bfloat16() else "float32"
    return precision
