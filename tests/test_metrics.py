from __future__ import annotations

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from clipfusion.evaluation import metrics
from clipfusion.evaluation.metrics import (
    f1max_threshold,
    image_ap,
    image_auroc,
    image_f1max,
    pixel_ap,
    pixel_aupro,
    pixel_aupro_legacy,
    pixel_auroc,
    pixel_f1max,
    pixel_metrics,
)


def _random_case(seed: int, n: int = 12, size: int = 40, round_to: int | None = 2):
    """Masks with several regions per image (some touching only diagonally) and noisy maps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(int(rng.integers(0, 4))):
            y, x = rng.integers(0, size - 8, 2)
            masks[i, y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = True
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region under 8-connectivity
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if round_to is not None:
        maps = np.round(maps, round_to)  # many ties
    return masks, maps.astype(np.float32)


def _sklearn_f1max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    return np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))


# --- image metrics -------------------------------------------------------------------------------

def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.random(200) + 0.3 * labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores))
    assert image_f1max(labels, scores) == pytest.approx(_sklearn_f1max(labels, scores))


def test_image_f1max_hand_computed():
    # threshold 0.35 flags {0.35, 0.4, 0.8}: TP 2, FP 1, FN 0 → P 2/3, R 1 → F1 0.8 (the best)
    f1, threshold = f1max_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_single_class_gives_nan_with_warning():
    with pytest.warns(UserWarning, match="undefined"):
        assert np.isnan(image_auroc(np.zeros(5), np.arange(5.0)))
    with pytest.warns(UserWarning, match="undefined"):
        result = pixel_metrics(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4)))
    assert all(np.isnan(v) for v in result.values())


# --- pixel metrics against scikit-learn ----------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_sklearn(seed):
    masks, maps = _random_case(seed)
    labels, scores = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert pixel_f1max(masks, maps) == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-9)


def test_chunk_boundaries_do_not_change_results(monkeypatch):
    masks, maps = _random_case(3, round_to=1)  # heavy ties, so tie groups straddle chunk borders
    whole = pixel_metrics(masks, maps)
    monkeypatch.setattr(metrics, "_CHUNK", 37)
    chunked = pixel_metrics(masks, maps)
    for key, value in whole.items():
        assert chunked[key] == pytest.approx(value, abs=1e-12), key


def test_images_of_different_sizes_are_accepted():
    masks, maps = _random_case(4, n=2, size=30)
    small_masks, small_maps = _random_case(5, n=1, size=17)
    mask_list = [masks[0], small_masks[0], masks[1]]
    map_list = [maps[0], small_maps[0], maps[1]]
    labels = np.concatenate([m.ravel() for m in mask_list])
    scores = np.concatenate([m.ravel() for m in map_list])
    assert pixel_auroc(mask_list, map_list) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


# --- exact AUPRO against an independent brute force ----------------------------------------------

def _brute_force_aupro(masks, maps, fpr_limit=0.3):
    """Threshold by threshold, region by region (skimage labels, connectivity 2 = 8-connected)."""
    regions = []
    for i, mask in enumerate(masks):
        labelled = measure.label(mask, connectivity=2)
        regions += [(i, labelled == r) for r in range(1, labelled.max() + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= fpr_limit
    x, y = list(fprs[inside]), list(pros[inside])
    if x[-1] < fpr_limit:
        j = int(np.argmax(~inside))
        y.append(np.interp(fpr_limit, fprs[j - 1:j + 1], pros[j - 1:j + 1]))
        x.append(fpr_limit)
    return np.trapezoid(y, x) / fpr_limit


@pytest.mark.parametrize(("seed", "round_to"), [(0, 2), (1, None), (2, 1)])
def test_exact_aupro_matches_brute_force(seed, round_to):
    masks, maps = _random_case(seed, n=6, size=24, round_to=round_to)
    assert pixel_aupro(masks, maps) == pytest.approx(_brute_force_aupro(masks, maps), abs=1e-3)


def test_aupro_hand_computed():
    mask = np.array([[[True, False], [False, False]]])
    # the defect pixel ranks first: PRO jumps to 1 at FPR 0, so the area to 0.3 is all of it
    assert pixel_aupro(mask, np.array([[[0.9, 0.8], [0.1, 0.2]]])) == pytest.approx(1.0)
    # one normal pixel ranks first: FPR 1/3 > 0.3 before any overlap, so the area is 0
    assert pixel_aupro(mask, np.array([[[0.5, 0.9], [0.1, 0.2]]])) == pytest.approx(0.0)
    # two regions, one found first: PRO 0.5 at FPR 0, then 1.0 only after FPR 0.5 → 0.5 on [0, 0.3]
    masks = np.array([[[True, False, False, True]]])
    maps = np.array([[[0.9, 0.5, 0.4, 0.3]]])
    assert pixel_aupro(masks, maps) == pytest.approx(0.5)


def test_region_pixels_weigh_by_region_not_by_pixel():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, :4, :4] = True  # a big region (16 px)
    masks[0, 8, 8] = True  # a one-pixel region
    maps = np.zeros((1, 10, 10))
    maps[0, 8, 8] = 1.0
    # points (0, 0) → (0, 0.5) [the tiny region found] → (1, 1) [everything else, tied];
    # PRO at FPR 0.3 is 0.65, so the area is 0.3 · (0.5 + 0.65) / 2 and AUPRO = 0.575
    assert pixel_aupro(masks, maps) == pytest.approx(0.575)


# --- the legacy variant ---------------------------------------------------------------------------

def _brute_force_legacy(masks, maps, max_step=200, expect_fpr=0.3):
    """The published definition, step by step: 200 thresholds, region props, FPR min-max rescaled."""
    lo, hi = maps.min(), maps.max()
    fprs, pros = [], []
    for threshold in np.arange(lo, hi, (hi - lo) / max_step):
        predicted = maps > threshold
        overlaps = [
            predicted[i][tuple(region.coords.T)].sum() / region.area
            for i, mask in enumerate(masks)
            for region in measure.regionprops(measure.label(mask))
        ]
        pros.append(np.mean(overlaps))
        fprs.append((predicted & ~masks).sum() / (~masks).sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < expect_fpr
    fprs = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    return auc(fprs, pros[keep])


def test_legacy_aupro_matches_its_definition():
    masks, maps = _random_case(7, n=6, size=24, round_to=None)
    maps = maps.astype(np.float64)
    assert pixel_aupro_legacy(masks, maps) == pytest.approx(_brute_force_legacy(masks, maps), abs=1e-6)


def test_legacy_and_exact_aupro_differ_where_the_curve_starts_late():
    # 10 % of the normal pixels score the maximum: the curve's first point is at FPR 0.1 with PRO 0.
    # Exact AUPRO integrates that empty stretch; legacy rescales [0.1, 0.3) to [0, 1] and drops it.
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 20, 20), bool)
    masks[:, 5:10, 5:10] = True
    maps = np.where(masks, rng.uniform(0.6, 0.9, masks.shape), rng.uniform(0.0, 0.5, masks.shape))
    normal = np.flatnonzero(~masks.ravel())
    maps.ravel()[rng.choice(normal, size=len(normal) // 10, replace=False)] = 1.0
    exact, legacy = pixel_aupro(masks, maps), pixel_aupro_legacy(masks, maps)
    assert exact == pytest.approx(_brute_force_aupro(masks, maps), abs=1e-3)
    assert legacy == pytest.approx(_brute_force_legacy(masks, maps), abs=1e-6)
    assert legacy > 0.99
    assert exact < 0.7


def test_pixel_metrics_returns_every_metric_consistently():
    masks, maps = _random_case(8)
    result = pixel_metrics(masks, maps)
    assert set(result) == set(metrics.PIXEL_METRICS)
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert result["pixel_aupro"] == pytest.approx(pixel_aupro(masks, maps))
    assert all(0.0 <= v <= 1.0 for v in result.values())


def test_rejects_mismatched_or_non_finite_input():
    with pytest.raises(ValueError, match="must be equal"):
        pixel_auroc(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5)))
    bad = np.zeros((1, 4, 4))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(np.eye(4, dtype=bool)[None], bad)


def test_descending_order_is_numpys_lexsort_order():
    """The packed-key sort behind the curves against NumPy's own sort: scores high to low, ties by index high to
    low; negative, tiny, huge and repeated values."""
    from clipfusion.evaluation.metrics import _descending_order

    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(size=5000), [1e-30, -1e-30, 3e38, -3e38, 0.0], np.repeat([0.25, -2.0], 50)])
    scores = rng.permutation(scores).astype(np.float32)
    order = _descending_order(scores)
    expected = np.lexsort((-np.arange(scores.size), -scores))  # last key first: score descending, then index
    np.testing.assert_array_equal(order, expected)
