from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfusion.data import (
    FolderDataset,
    MetaJsonDataset,
    MVTecDataset,
    VisADataset,
    load_dataset,
    read_mask,
    read_rgb,
    sample_references,
    synthetic,
)
from clipfusion.errors import DatasetError, ImageReadError


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def _square_mask(y: int, x: int, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[y:y + 2, x:x + 2] = 255
    return mask


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Images 1, 10, 2 whose masks sort as 10, 1, 2: positional pairing would swap 1 and 10."""
    cat = tmp_path / "bottle"
    for i in range(3):
        _save(cat / "train" / "good" / f"{i:03d}.png", _rgb(100))
    _save(cat / "test" / "good" / "000.png", _rgb(100))
    for stem, (y, x) in {"1": (0, 0), "10": (6, 6), "2": (0, 6)}.items():
        _save(cat / "test" / "broken" / f"{stem}.png", _rgb(50))
        _save(cat / "ground_truth" / "broken" / f"{stem}_mask.png", _square_mask(y, x))
    return tmp_path


def test_mvtec_matches_masks_by_stem_not_by_sort_order(mvtec_root):
    dataset = MVTecDataset(mvtec_root)
    assert dataset.categories() == ["bottle"]
    samples = {s.image_path.stem: s.load() for s in dataset.test_samples("bottle") if s.label == 1}
    assert samples["1"].mask[0, 0] and not samples["1"].mask[6, 6]
    assert samples["10"].mask[6, 6] and not samples["10"].mask[0, 0]
    assert samples["2"].mask[0, 6]
    assert all(s.defect == "broken" and s.category == "bottle" for s in samples.values())


def test_normal_test_images_get_an_all_zero_mask(mvtec_root):
    normal = [s for s in MVTecDataset(mvtec_root).test_samples("bottle") if s.label == 0]
    sample = normal[0].load()
    assert sample.mask.shape == (8, 8) and not sample.mask.any()
    assert sample.image.shape == (8, 8, 3) and sample.image.dtype == np.uint8


def test_missing_mask_is_an_error_naming_the_image(mvtec_root):
    (mvtec_root / "bottle" / "ground_truth" / "broken" / "10_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"broken/10\.png"):
        MVTecDataset(mvtec_root).test_samples("bottle")


def test_folder_layout_tolerates_missing_masks(mvtec_root):
    (mvtec_root / "bottle" / "ground_truth" / "broken" / "10_mask.png").unlink()
    dataset = FolderDataset(mvtec_root / "bottle")  # a single category folder as the root
    assert dataset.categories() == ["bottle"]
    samples = {s.image_path.stem: s for s in dataset.test_samples("bottle")}
    assert samples["10"].has_mask is False and samples["10"].load().mask is None
    assert samples["1"].load().mask.any()
    assert len(dataset.train_images("bottle")) == 3


def test_mask_of_another_size_is_an_error_naming_both_files(mvtec_root):
    _save(mvtec_root / "bottle" / "ground_truth" / "broken" / "2_mask.png", np.zeros((5, 5), np.uint8))
    sample = next(s for s in MVTecDataset(mvtec_root).test_samples("bottle") if s.image_path.stem == "2")
    with pytest.raises(DatasetError, match=r"2_mask\.png.*5x5.*broken/2\.png.*8x8"):
        sample.load()


def test_unknown_category_lists_the_available_ones(mvtec_root):
    with pytest.raises(DatasetError, match="available: bottle"):
        load_dataset("mvtec", mvtec_root).check_categories(["cable"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_image_modes_are_converted_to_rgb(tmp_path, mode):
    path = tmp_path / f"image.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.fromarray(_rgb(120)).convert(mode).save(path)
    image = read_rgb(path)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768], [65535, 257]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = read_rgb(path)
    assert image[:, :, 0].tolist() == [[0, 128], [255, 1]]
    assert (image[:, :, 0] == image[:, :, 2]).all()


def test_truncated_and_non_image_files_raise_image_read_error(tmp_path):
    good = _save(tmp_path / "good.png", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path in (truncated, text, tmp_path / "absent.png"):
        with pytest.raises(ImageReadError) as info:
            read_rgb(path)
        assert info.value.path == str(path) and info.value.reason


def test_masks_are_binarised_with_greater_than_zero(tmp_path):
    labels = np.array([[0, 1], [2, 0]], np.uint8)  # VisA-style label values
    assert read_mask(_save(tmp_path / "m.png", labels)).tolist() == [[False, True], [True, False]]


def test_visa_reads_the_one_class_split(tmp_path):
    rows = ["object,split,label,image,mask"]
    for i in range(3):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        _save(tmp_path / rel, _rgb(90))
        rows.append(f"candle,{'train' if i < 2 else 'test'},normal,{rel},")
    rel, mask_rel = "candle/Data/Images/Anomaly/0100.JPG", "candle/Data/Masks/Anomaly/0100.png"
    _save(tmp_path / rel, _rgb(40))
    _save(tmp_path / mask_rel, (_square_mask(2, 2) > 0).astype(np.uint8) * 3)
    rows.append(f"candle,test,anomaly,{rel},{mask_rel}")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")

    dataset = VisADataset(tmp_path)
    assert dataset.categories() == ["candle"]
    assert len(dataset.train_images("candle")) == 2
    samples = dataset.test_samples("candle")
    assert [s.label for s in samples] == [1, 0]
    anomalous = samples[0].load()
    assert anomalous.mask.sum() == 4 and anomalous.mask[2, 2]


def test_visa_without_split_file_says_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"1cls\.csv"):
        VisADataset(tmp_path)


def test_meta_json_index(tmp_path):
    _save(tmp_path / "a" / "train.png", _rgb(10))
    _save(tmp_path / "a" / "ok.png", _rgb(10))
    _save(tmp_path / "a" / "bad.png", _rgb(200))
    _save(tmp_path / "a" / "bad_mask.png", _square_mask(1, 1))
    entry = {"cls_name": "widget", "specie_name": "good", "anomaly": 0, "mask_path": ""}
    meta = {
        "train": {"widget": [{**entry, "img_path": "a/train.png"}]},
        "test": {"widget": [
            {**entry, "img_path": "a/ok.png"},
            {**entry, "img_path": "a/bad.png", "mask_path": "a/bad_mask.png", "specie_name": "dent", "anomaly": 1},
        ]},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    dataset = MetaJsonDataset(tmp_path)
    assert dataset.categories() == ["widget"]
    assert dataset.train_images("widget") == [tmp_path / "a" / "train.png"]
    ok, bad = dataset.test_samples("widget")
    assert (ok.label, bad.label, bad.defect) == (0, 1, "dent")
    assert bad.load().mask.sum() == 4


def test_reference_draw_is_seeded_and_order_independent(tmp_path):
    pool = [tmp_path / f"{i:03d}.png" for i in range(10)]
    first = sample_references(pool, 3, seed=0)
    assert first == sample_references(list(reversed(pool)), 3, seed=0)
    assert len(set(first)) == 3
    assert any(sample_references(pool, 3, seed=s) != first for s in (1, 2, 3))
    with pytest.raises(DatasetError, match="only 10"):
        sample_references(pool, 11, seed=0)


# --- synthetic data -----------------------------------------------------------------------------

@pytest.mark.parametrize("defect", sorted(synthetic.DEFECT_FUNCTIONS))
def test_synthetic_mask_is_exactly_the_changed_pixels(defect):
    category = next(c for c, kinds in synthetic.DEFECTS_BY_CATEGORY.items() if defect in kinds)
    scene = synthetic.RENDERERS[category](128, np.random.default_rng(1))
    image, mask = synthetic.DEFECT_FUNCTIONS[defect](scene, np.random.default_rng(2))
    changed = np.abs(image - scene.image).max(axis=2) > 0
    assert mask.sum() > 20
    np.testing.assert_array_equal(changed, mask)


def test_synthetic_dataset_is_deterministic_and_in_mvtec_layout(tmp_path, synthetic_root):
    from tests.conftest import SMALL_SPEC

    again = synthetic.generate(tmp_path / "again", SMALL_SPEC, progress=False)
    files = sorted(p.relative_to(synthetic_root) for p in synthetic_root.rglob("*.png"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for rel in files[::7]:
        assert (synthetic_root / rel).read_bytes() == (again / rel).read_bytes()

    dataset = MVTecDataset(synthetic_root)  # strict layout: every defect has its mask
    assert dataset.categories() == ["disc", "fabric"]
    samples = dataset.test_samples("disc")
    assert {s.defect for s in samples} == {"good", *synthetic.DEFECTS_BY_CATEGORY["disc"]}
    assert all(s.load().mask.any() == bool(s.label) for s in samples)


def test_ensure_synthetic_reuses_a_matching_dataset(tmp_path, monkeypatch):
    spec = synthetic.SyntheticSpec(categories=("marble",), image_size=32, n_train=1, n_test_good=1,
                                   n_test_per_defect=1)
    synthetic.ensure_synthetic(tmp_path, spec, progress=False)
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("regenerated a matching dataset"))
    assert synthetic.ensure_synthetic(tmp_path, spec, progress=False) == tmp_path
