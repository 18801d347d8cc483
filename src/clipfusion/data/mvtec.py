"""MVTec-AD (strict: every anomalous image needs its mask), on top of the shared MVTec-style folder reader."""
from __future__ import annotations

from clipfusion.data.folder import FolderDataset

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


class MVTecDataset(FolderDataset):
    """MVTec-AD (Bergmann et al.), or anything in its exact layout: every anomalous image needs a mask.

    All 15 MVTec-AD categories are recognised; other category folders in the same layout (for
    example the project's synthetic data) are listed too, after them.
    """

    name = "mvtec"
    masks_required = True

    def categories(self) -> list[str]:
        present = [p.name for p in self.root.iterdir() if (p / "test").is_dir()]
        known = [c for c in MVTEC_CATEGORIES if c in present]
        return known + sorted(c for c in present if c not in MVTEC_CATEGORIES)
