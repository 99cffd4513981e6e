import subprocess

import pytest

import zoo.runtime.cpu
from zoo.runtime.cpu import RELEVANT_FLAGS, _parse_cpuinfo, auto_precision, cpu_info

CPUINFO = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 9R14
flags		: fpu sse avx2 avx512f avx512_bf16 avx512_vnni sha_ni
"""
LSCPU = """Architecture:            x86_64
Model name:              Intel(R) Xeon(R) Platinum 8480+
Flags:                   fpu avx2 avx512f amx_bf16 amx_tile amx_int8
"""


def test_model_and_flags_are_read_from_cpuinfo_and_lscpu_text():
    assert _parse_cpuinfo(CPUINFO) == ("AMD EPYC 9R14", {"fpu", "sse", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "sha_ni"})
    model, flags = _parse_cpuinfo(LSCPU)
    assert model == "Intel(R) Xeon(R) Platinum 8480+" and {"amx_int8", "amx_bf16"} <= flags
    assert _parse_cpuinfo("") == (None, set())


def test_the_running_cpu_is_named_with_only_the_relevant_flags():
    model, flags = cpu_info()
    assert model and model != "unknown"
    assert set(flags) <= set(RELEVANT_FLAGS) and list(flags) == [f for f in RELEVANT_FLAGS if f in flags]


def test_fallbacks_when_proc_cpuinfo_is_missing(monkeypatch):
    cpu_info.cache_clear()
    monkeypatch.setattr(zoo.runtime.cpu, "Path", lambda path: _Missing())
    monkeypatch.setattr(zoo.runtime.cpu.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, LSCPU, ""))
    try:
        assert cpu_info() == ("Intel(R) Xeon(R) Platinum 8480+", ("avx2", "avx512f", "amx_bf16", "amx_int8", "amx_tile"))
        cpu_info.cache_clear()

        def no_lscpu(*a, **k):
            raise FileNotFoundError("lscpu")

        monkeypatch.setattr(zoo.runtime.cpu.subprocess, "run", no_lscpu)
        monkeypatch.setattr(zoo.runtime.cpu.platform, "processor", lambda: "arm")
        assert cpu_info() == ("arm", ())
    finally:
        cpu_info.cache_clear()


class _Missing:
    def read_text(self):
        raise FileNotFoundError("/proc/cpuinfo")


@pytest.mark.parametrize("flags, precision", [
    (("avx2", "avx512f", "avx512_vnni", "avx512_bf16"), "int8"), (("avx2", "avx_vnni"), "int8"),
    (("avx2", "amx_bf16", "amx_int8", "amx_tile"), "int8"), (("avx2", "avx512f", "avx512_bf16"), "bf16"),
    (("avx2", "avx512f"), "fp32"), ((), "fp32")])
def test_auto_precision_follows_the_instruction_set(flags, precision):
    assert auto_precision(flags) == precision
