"""Reading the CPU's model and speed flags from /proc/cpuinfo text."""
from __future__ import annotations

from clipfusion.hardware import CpuInfo, parse_cpuinfo, precision_summary

AVX2_EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 ssse3 fma avx avx2 bmi2
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu avx avx2 avx512f avx512dq avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_an_avx2_only_cpu_has_no_native_bf16():
    cpu = parse_cpuinfo(AVX2_EPYC, cores=2)
    assert (cpu.model, cpu.cores, cpu.flags, cpu.native_bf16) == ("AMD EPYC 7B13", 2, ("avx2",), False)


def test_an_amx_cpu_has_native_bf16_and_every_speed_flag():
    cpu = parse_cpuinfo(SAPPHIRE_RAPIDS, cores=4)
    assert cpu.flags == ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") and cpu.native_bf16


def test_the_summary_says_what_auto_runs_and_who_decided():
    avx2, amx = parse_cpuinfo(AVX2_EPYC, cores=2), parse_cpuinfo(SAPPHIRE_RAPIDS, cores=4)
    assert precision_summary(avx2) == ("CPU AMD EPYC 7B13 (2 cores; avx2); native bfloat16: no (CLIPFUSION_NATIVE_BF16 "
                                       "unset); --dtype auto on the CPU: float32")
    assert precision_summary(amx).endswith("native bfloat16: yes (CLIPFUSION_NATIVE_BF16 unset); --dtype auto on the "
                                           "CPU: bfloat16")
    forced = CpuInfo(avx2.model, avx2.cores, avx2.flags, forced_bf16=True)
    assert "(2 cores; avx2); native bfloat16: yes (CLIPFUSION_NATIVE_BF16=1)" in precision_summary(forced)
