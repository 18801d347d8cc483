"""Datasets: MVTec-AD, VisA, users' folders, meta.json indexes, and the synthetic generator."""
from __future__ import annotations

from pathlib import Path

from clipfusion.data.base import (
    AnomalyDataset,
    Sample,
    SampleRef,
    read_mask,
    read_rgb,
    sample_references,
)
from clipfusion.data.folder import FolderDataset
from clipfusion.data.metajson import MetaJsonDataset
from clipfusion.data.mvtec import MVTEC_CATEGORIES, MVTecDataset
from clipfusion.data.visa import VISA_CATEGORIES, VisADataset
from clipfusion.errors import DatasetError

DATASETS: dict[str, type[AnomalyDataset]] = {
    "mvtec": MVTecDataset,
    "visa": VisADataset,
    "folder": FolderDataset,
    "meta": MetaJsonDataset,
}


def load_dataset(kind: str, root: str | Path) -> AnomalyDataset:
    """Index the dataset at ``root`` in the named layout (``mvtec``, ``visa``, ``folder`` or ``meta``)."""
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset layout {kind!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[kind](root)


__all__ = [
    "DATASETS",
    "MVTEC_CATEGORIES",
    "VISA_CATEGORIES",
    "AnomalyDataset",
    "FolderDataset",
    "MVTecDataset",
    "MetaJsonDataset",
    "Sample",
    "SampleRef",
    "VisADataset",
    "load_dataset",
    "read_mask",
    "read_rgb",
    "sample_references",
]
