"""The CPU a timing was measured on, and the precision that runs fastest on it.

Whether INT8 or bf16 pays depends on the instruction set: INT8 matrix products are fast with VNNI (AVX-512 VNNI,
AVX-VNNI) or AMX, and slower than f32 without them; bf16 needs AVX512_BF16 or AMX. So every latency is recorded
with the CPU's model name and these flags.
"""

from __future__ import annotations

import platform
import re
import subprocess
from functools import lru_cache
from pathlib import Path

# The flags (as Linux names them in /proc/cpuinfo) that decide which precision is fast.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) from /proc/cpuinfo's or `lscpu`'s text: 'model name : X' / 'Model name: X', 'flags : ...'."""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE | re.IGNORECASE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE | re.IGNORECASE)
    return (model.group(1).strip() if model else None), set(flags.group(1).split()) if flags else set()


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """(model name, the RELEVANT_FLAGS it has): from /proc/cpuinfo, else `lscpu`, else (other systems)
    platform.processor() with no flags known."""
    sources = [lambda: Path("/proc/cpuinfo").read_text(),
               lambda: subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout]
    for read in sources:
        try:
            model, flags = _parse_cpuinfo(read())
        except (OSError, subprocess.SubprocessError):
            continue
        if model or flags:
            return model or platform.processor() or "unknown", tuple(f for f in RELEVANT_FLAGS if f in flags)
    return platform.processor() or platform.machine() or "unknown", ()


def cpu_model() -> str:
    return cpu_info()[0]


def cpu_flags() -> tuple[str, ...]:
    return cpu_info()[1]


def openvino_supports_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can compute in bf16 here (it lists 'BF16' among its optimization
    capabilities on CPUs with AVX512_BF16 or AMX): the authority for a bf16 variant, whatever /proc says."""
    from zoo.runtime.backends import openvino_core

    return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def auto_precision(flags: tuple[str, ...] | None = None) -> str:
    """The precision that runs fastest on a CPU with these flags (default: this one): int8 with VNNI or AMX,
    bf16 with AVX512_BF16, else fp32."""
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in INT8_FLAGS):
        return "int8"
    if any(f in flags for f in BF16_FLAGS):
        return "bf16"
    return "fp32"
