"""Read-only support for the ``meta.json`` index written by APRIL-GAN / AnomalyCLIP / AdaCLIP tools.

Structure: ``{"train"|"test": {category: [{"img_path", "mask_path", "cls_name", "specie_name",
"anomaly"}]}}`` with paths relative to the folder holding ``meta.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from clipfusion.data.base import NORMAL_DEFECT, AnomalyDataset, SampleRef
from clipfusion.errors import DatasetError


class MetaJsonDataset(AnomalyDataset):
    name = "meta"

    def __init__(self, root: str | Path, meta_file: str = "meta.json") -> None:
        super().__init__(root)
        self.meta_path = self.root / meta_file
        try:
            self._meta = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            raise DatasetError(f"{self.meta_path} not found: the meta layout needs a meta.json index") from None
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{self.meta_path} is not valid JSON: {exc}") from None
        if "test" not in self._meta:
            raise DatasetError(f"{self.meta_path} has no 'test' section")

    def categories(self) -> list[str]:
        return sorted(self._meta["test"])

    def train_images(self, category: str) -> list[Path]:
        entries = self._meta.get("train", {}).get(category, [])
        return sorted(self.root / e["img_path"] for e in entries if not int(e.get("anomaly", 0)))

    def test_samples(self, category: str) -> list[SampleRef]:
        samples = []
        for entry in self._meta["test"].get(category, []):
            image_path = self.root / entry["img_path"]
            label = int(entry.get("anomaly", 0))
            defect = entry.get("specie_name") or (NORMAL_DEFECT if label == 0 else "anomaly")
            if label == 0:
                samples.append(SampleRef(image_path, 0, category, defect))
                continue
            mask = entry.get("mask_path") or ""
            samples.append(
                SampleRef(image_path, 1, category, defect, self.root / mask if mask else None, has_mask=bool(mask))
            )
        return samples
