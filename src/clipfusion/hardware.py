"""What CPU a figure came from: model name, core count and the instruction-set flags that decide
speed and native precisions (torch-free; torch's own CPU build is added by ``torch_cpu_build``), and
the default device and dtype they imply (``auto_device_dtype``, which imports torch only for ``auto``)."""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The flags that change which kernels run: AVX2 / AVX-512, native bfloat16 (AVX-512 BF16, AMX) and VNNI.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    flags: tuple[str, ...]  # those of SPEED_FLAGS the CPU has

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where bf16 is fast."""
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """``/proc/cpuinfo`` text → :class:`CpuInfo` (the first processor's model name and flags)."""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    return CpuInfo(model.group(1).strip() if model else (platform.processor() or platform.machine()), cores,
                   tuple(flag for flag in SPEED_FLAGS if flag in present))


def cpu_info() -> CpuInfo:
    """This machine's CPU (Linux reads /proc/cpuinfo; elsewhere only the platform's name is known)."""
    cores = os.cpu_count() or 1
    source = Path("/proc/cpuinfo")
    if source.is_file():
        return parse_cpuinfo(source.read_text(errors="replace"), cores)
    return CpuInfo(platform.processor() or platform.machine(), cores, ())


def slow_on_cpu(dtype: str, cpu: CpuInfo) -> bool:
    """float16 is emulated on every CPU we know; bfloat16 is native only with AVX-512 BF16 or AMX."""
    return dtype == "float16" or (dtype == "bfloat16" and not cpu.native_bf16)


def auto_device_dtype(device: str, dtype: str, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """``auto`` resolved: the device to cuda, then mps, then cpu; the dtype to float16 on CUDA, bfloat16
    on a CPU with native bf16 (``cpu``, default this machine's; 2x faster than float32 on the one we
    measured) and float32 elsewhere.  Other values pass through."""
    if device == "auto":
        import torch  # here, not at the top: resolving the device must not load the models' packages

        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if dtype == "auto":
        if device.startswith("cuda"):
            dtype = "float16"
        elif device == "cpu" and (cpu or cpu_info()).native_bf16:
            dtype = "bfloat16"
        else:
            dtype = "float32"
    return device, dtype


def torch_cpu_build() -> dict[str, Any]:
    """torch's CPU kernels: the capability it dispatches to, and its oneDNN and MKL versions."""
    import torch

    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": onednn.group(1) if onednn else None, "mkl": mkl.group(1) if mkl else None}
