"""What CPU a figure came from: model name, core count and the instruction-set flags that decide
speed and native precisions (torch-free; torch's own CPU build is added by ``torch_cpu_build``), and
the precision policy they imply: what ``auto`` means (``auto_device_dtype``, which imports torch only
for ``--device auto``) and which precision a model file runs in here (``model_precision``).

``CLIPFUSION_NATIVE_BF16=1`` (or ``0``) makes every decision as if the CPU had (or lacked) native
bfloat16: the tests run the precision-sensitive cases both ways on any machine.  The CPU computes as
it always does (bfloat16 without native support is emulated: slower, the same numbers)."""
from __future__ import annotations

import functools
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipfusion.errors import ClipfusionError

# The flags that change which kernels run: AVX2 / AVX-512, native bfloat16 (AVX-512 BF16, AMX) and VNNI.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
NATIVE_BF16_SWITCH = "CLIPFUSION_NATIVE_BF16"
# How far the image scores of one model on the same images may differ between bfloat16 and float32, or
# between bfloat16 runs that batch the images differently (oneDNN's bf16 kernels sum in an order that
# depends on the batch): the largest difference measured (docs/speed.md, benchmarks/results/precision.json),
# rounded up.  Front ends agree within it; float32 runs agree exactly.
BF16_SCORE_TOLERANCE = 2e-3


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    flags: tuple[str, ...]  # those of SPEED_FLAGS the CPU has
    forced_bf16: bool | None = None  # NATIVE_BF16_SWITCH when set: decide as if native bf16 were there or not

    @property
    def native_bf16(self) -> bool:
        """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX), where bf16 is fast (or
        what the switch says)."""
        if self.forced_bf16 is not None:
            return self.forced_bf16
        return "avx512_bf16" in self.flags or "amx_bf16" in self.flags


def forced_bf16() -> bool | None:
    """What ``CLIPFUSION_NATIVE_BF16`` says: True (``1``), False (``0``) or None (unset: the CPU decides)."""
    value = os.environ.get(NATIVE_BF16_SWITCH, "").strip()
    if value in ("", "0", "1"):
        return None if not value else value == "1"
    raise ClipfusionError(f"{NATIVE_BF16_SWITCH}={value!r}: set it to 1 (decide as if the CPU had native bfloat16), "
                          "0 (as if it had not), or unset it")


def parse_cpuinfo(text: str, cores: int) -> CpuInfo:
    """``/proc/cpuinfo`` text → :class:`CpuInfo` (the first processor's model name and flags)."""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    present = set(flags.group(1).split()) if flags else set()
    return CpuInfo(model.group(1).strip() if model else (platform.processor() or platform.machine()), cores,
                   tuple(flag for flag in SPEED_FLAGS if flag in present))


def cpu_info() -> CpuInfo:
    """This machine's CPU, as the switch sees it now (read at every call: tests set it per test)."""
    found = _this_cpu()
    return CpuInfo(found.model, found.cores, found.flags, forced_bf16())


@functools.cache
def _this_cpu() -> CpuInfo:
    """Linux reads /proc/cpuinfo (once per process: every detector asks); elsewhere only the platform's
    name is known."""
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


def runs_natively(dtype: str, device: str, cpu: CpuInfo | None = None) -> bool:
    """Whether ``device`` (concrete) computes ``dtype`` natively: float32 everywhere; on a CPU bfloat16
    only with AVX-512 BF16 or AMX (float16 is emulated on every CPU); on CUDA float16, and bfloat16 where
    the GPU supports it; on MPS float16."""
    if dtype == "float32":
        return True
    if device == "cpu":
        return dtype == "bfloat16" and (cpu or cpu_info()).native_bf16
    if device.startswith("cuda"):
        import torch

        return dtype == "float16" or bool(torch.cuda.is_bf16_supported())
    return dtype == "float16"


def model_precision(device: str, dtype: str, recorded: str | None, cpu: CpuInfo | None = None
                    ) -> tuple[str, str, str | None]:
    """The device and dtype a model runs in, from those asked (``auto`` allowed) and the precision its
    bank and thresholds were computed in (``recorded``; None for a detector that is not a model file).

    ``auto`` runs a model in its recorded precision where this machine computes it natively, otherwise
    in float32; without a recorded precision ``auto`` means :func:`auto_device_dtype`'s.  The third
    value says why the precision that runs is not the recorded one (None when it is, or none is recorded).
    """
    device, default = auto_device_dtype(device, "auto", cpu)
    if recorded is None:
        return device, default if dtype == "auto" else dtype, None
    if dtype == "auto":
        if runs_natively(recorded, device, cpu):
            return device, recorded, None
        where = "this CPU lacks native bfloat16 (AVX-512 BF16 or AMX)" if recorded == "bfloat16" and device == "cpu" \
            else f"{device} does not compute {recorded} natively"
        return device, "float32", f"its thresholds were derived in {recorded} and {where}: running in float32"
    if dtype != recorded:
        return device, dtype, f"its thresholds were derived in {recorded}: running in {dtype}, as asked"
    return device, dtype, None


def precision_note(source: str, reason: str, asked: str, fix: str) -> tuple[int, str]:
    """How to say ``reason`` (from :func:`model_precision`) about ``source`` (a model file, an export):
    a fallback from ``auto`` is a warning that names the ``fix``, a dtype asked for explicitly a note."""
    message = f"{source}: {reason}; scores can differ from that precision's by about {BF16_SCORE_TOLERANCE:g} " \
              "(docs/speed.md)"
    return (logging.WARNING, f"{message}; {fix}") if asked == "auto" else (logging.INFO, message)


def precision_summary(cpu: CpuInfo | None = None) -> str:
    """One line: the CPU, its speed flags, whether it has native bfloat16 (and whether the switch decided
    that), and what ``--dtype auto`` runs on it (torch-free: scripts/test.sh prints it at its top)."""
    cpu = cpu or cpu_info()
    switch = NATIVE_BF16_SWITCH + (" unset" if cpu.forced_bf16 is None else f"={int(cpu.forced_bf16)}")
    return (f"CPU {cpu.model} ({cpu.cores} cores; {' '.join(cpu.flags) or 'no speed flags'}); native bfloat16: "
            f"{'yes' if cpu.native_bf16 else 'no'} ({switch}); --dtype auto on the CPU: "
            f"{auto_device_dtype('cpu', 'auto', cpu)[1]}")


def torch_cpu_build() -> dict[str, Any]:
    """torch's CPU kernels: the capability it dispatches to, and its oneDNN and MKL versions."""
    import torch

    config = torch.__config__.show()
    onednn = re.search(r"MKL-DNN v([\d.]+)", config)
    mkl = re.search(r"Math Kernel Library Version ([\w.\-]+)", config)
    return {"capability": torch.backends.cpu.get_cpu_capability(),
            "onednn": onednn.group(1) if onednn else None, "mkl": mkl.group(1) if mkl else None}
