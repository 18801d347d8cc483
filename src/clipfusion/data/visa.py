"""VisA (Zou et al., 2022) in its raw layout, split by the official one-class CSV.

``<root>/split_csv/1cls.csv`` has the columns ``object,split,label,image,mask``; ``label`` is
``normal`` or ``anomaly``; paths are relative to ``root``.  Masks are label-valued PNGs (0, 1, 2...)
and are binarised with ``> 0`` by :func:`clipfusion.data.base.read_mask`.
"""
from __future__ import annotations

import csv
from pathlib import Path

from clipfusion.data.base import NORMAL_DEFECT, AnomalyDataset, SampleRef
from clipfusion.errors import DatasetError

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
_COLUMNS = ("object", "split", "label", "image", "mask")


class VisADataset(AnomalyDataset):
    name = "visa"

    def __init__(self, root: str | Path, split_csv: str = "split_csv/1cls.csv") -> None:
        super().__init__(root)
        self.split_csv = self.root / split_csv
        if not self.split_csv.is_file():
            raise DatasetError(
                f"{self.split_csv} not found: VisA needs the official split file split_csv/1cls.csv "
                "inside the dataset root (it ships with VisA_20220922.tar)"
            )
        with self.split_csv.open(newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(f"{self.split_csv} lacks the column(s) {', '.join(missing)}")
            self._rows = [row for row in reader if row["object"]]

    def categories(self) -> list[str]:
        present = {row["object"] for row in self._rows}
        return [c for c in VISA_CATEGORIES if c in present] + sorted(present - set(VISA_CATEGORIES))

    def train_images(self, category: str) -> list[Path]:
        return sorted(
            self.root / row["image"] for row in self._rows
            if row["object"] == category and row["split"] == "train" and row["label"] == "normal"
        )

    def test_samples(self, category: str) -> list[SampleRef]:
        samples = []
        for row in self._rows:
            if row["object"] != category or row["split"] != "test":
                continue
            image_path = self.root / row["image"]
            if row["label"] == "normal":
                samples.append(SampleRef(image_path, 0, category, NORMAL_DEFECT))
                continue
            if not row["mask"]:
                raise DatasetError(f"{self.split_csv}: anomalous image {row['image']} has no mask entry")
            samples.append(SampleRef(image_path, 1, category, "anomaly", self.root / row["mask"]))
        if not samples:
            raise DatasetError(f"{self.split_csv} lists no test images for {category}")
        return sorted(samples, key=lambda s: str(s.image_path))
