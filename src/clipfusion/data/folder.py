"""MVTec-style folder layouts: users' own folders (masks optional); data/mvtec.py makes it strict.

Layout per category::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png)

Masks are matched to images by file stem, never by sort order.
"""
from __future__ import annotations

from pathlib import Path

from clipfusion.data.base import IMAGE_EXTENSIONS, NORMAL_DEFECT, AnomalyDataset, SampleRef, list_images
from clipfusion.errors import DatasetError


def find_mask(ground_truth: Path, defect: str, stem: str) -> Path | None:
    """The mask of image ``stem`` of ``defect``: ``<stem>_mask.<ext>`` first, then ``<stem>.<ext>``."""
    folder = ground_truth / defect
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for candidate in (folder / f"{name}{ext}", folder / f"{name}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


class FolderDataset(AnomalyDataset):
    """A user's own data in the MVTec layout; anomalous images may lack masks.

    ``root`` may hold several category folders, or be a single category folder itself (one that
    contains ``test/``); the category is then named after the folder.  An anomalous image without
    a mask gets ``has_mask=False`` and is left out of the pixel metrics (image metrics still count it).
    """

    name = "folder"
    masks_required = False

    def _category_dir(self, category: str) -> Path:
        if (self.root / "test").is_dir() and category == self.root.name:
            return self.root
        return self.root / category

    def categories(self) -> list[str]:
        if (self.root / "test").is_dir():
            return [self.root.name]
        return sorted(p.name for p in self.root.iterdir() if (p / "test").is_dir())

    def train_images(self, category: str) -> list[Path]:
        return list_images(self._category_dir(category) / "train" / NORMAL_DEFECT)

    def test_samples(self, category: str) -> list[SampleRef]:
        category_dir = self._category_dir(category)
        test_dir = category_dir / "test"
        if not test_dir.is_dir():
            raise DatasetError(f"{test_dir} is missing: expected <category>/test/<good|defect>/<images>")
        samples: list[SampleRef] = []
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for image_path in list_images(defect_dir):
                if defect == NORMAL_DEFECT:
                    samples.append(SampleRef(image_path, 0, category, defect))
                    continue
                mask_path = find_mask(category_dir / "ground_truth", defect, image_path.stem)
                if mask_path is None and self.masks_required:
                    raise DatasetError(
                        f"no ground-truth mask for {image_path}: expected "
                        f"{category_dir / 'ground_truth' / defect / (image_path.stem + '_mask.png')}"
                    )
                samples.append(
                    SampleRef(image_path, 1, category, defect, mask_path, has_mask=mask_path is not None)
                )
        if not samples:
            raise DatasetError(f"no test images found under {test_dir}")
        return samples
