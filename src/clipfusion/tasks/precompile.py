"""``clipfusion compile``: build a model file's precompiled parts for this machine, once.

Loads the model with ``precompiled=build`` and runs one probe image through it: the UNet pass and
the autoencoder are compiled for the shapes that model feeds them (one image per call) into the cache
(``clipfusion.encoders.precompiled``), where ``serve``, ``watch`` and ``predict --precompiled auto``
find them.  Run again, it finds them and only loads them.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from clipfusion.config import RuntimeConfig
from clipfusion.errors import ClipfusionError
from clipfusion.inspection.fingerprint import probe_images
from clipfusion.inspection.models import ModelFile
from clipfusion.methods.clipfusion.detector import CLIPFusion


@dataclass(frozen=True)
class Precompiled:
    model: Path
    precision: str
    folders: tuple[Path, ...]  # one per package
    built: int  # how many of them were compiled now (the others were there)
    seconds: float

    def summary(self) -> str:
        sizes = sum(file.stat().st_size for folder in self.folders for file in folder.iterdir())
        where = ", ".join(str(folder) for folder in self.folders)
        done = f"compiled {self.built} of" if self.built else "found (built before)"
        return (f"{done} {len(self.folders)} parts of {self.model} for this machine in {self.precision} "
                f"({self.seconds:.0f} s, {sizes / 1e6:.0f} MB): {where}; serve and watch load them by default, "
                "predict with --precompiled auto")


def precompile(model_path: str | Path, runtime: RuntimeConfig) -> Precompiled:
    """Build (or find) ``model_path``'s packages for this machine in ``runtime``'s precision."""
    model = ModelFile.open(model_path)
    start = time.perf_counter()
    detector = model.detector(dataclasses.replace(runtime, precompiled="build"), batch_size=1)
    detector.predict(probe_images(count=1), model.category)
    parts = detector.precompiled_parts() if isinstance(detector, CLIPFusion) else None
    if parts is None or not parts.folders:
        raise ClipfusionError(f"--model {model_path}: its method has no parts to precompile")
    return Precompiled(Path(model_path), detector.precision, tuple(parts.folders), len(parts.missing),
                       time.perf_counter() - start)
