"""Score-drift monitoring: windows of verdicts against the held-out normal scores behind the threshold."""
from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from scipy import stats

from clipfusion.data import read_rgb
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.inspection.drift import ALARM, DRIFTING, INSUFFICIENT, OK, DriftMonitor, DriftSettings
from clipfusion.methods.clipfusion.detector import CLIPFusion

from .commands import clipfusion_here
from .servers import start_server

SETTINGS = DriftSettings(window=100, alpha=1e-3, min_shift=0.25, alarm_after=3)


def _reference(rng: np.random.Generator) -> tuple[np.ndarray, float]:
    scores = rng.normal(0.5, 0.01, 80)
    return scores, float(np.quantile(scores, 0.99))  # the threshold as fit sets it


def _ks_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """The largest distance between the two empirical distribution functions (not SciPy's code)."""
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), points, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), points, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def test_unshifted_normals_raise_no_alarm_and_the_statistics_are_the_windows():
    rng = np.random.default_rng(0)
    reference, threshold = _reference(rng)
    monitor = DriftMonitor(reference, threshold, SETTINGS)
    assert monitor.state().state == INSUFFICIENT and "0 of the first window's 100" in monitor.state().detail
    states = []
    for _ in range(20):
        window = rng.normal(0.5, 0.01, 100)
        reports = [monitor.observe(s) for s in window]
        assert reports[:-1] == [None] * 99
        report = reports[-1]
        ok = window[window <= threshold]
        reference_ok = reference[reference <= threshold]
        assert report.ok_images == len(ok) and report.ng_rate == pytest.approx(1 - len(ok) / 100)
        assert report.ks_statistic == pytest.approx(_ks_by_hand(ok, reference_ok))
        margin = threshold - np.median(reference_ok)
        assert report.median_shift == pytest.approx((np.median(ok) - np.median(reference_ok)) / margin)
        states.append(monitor.state().state)
    assert ALARM not in states and monitor.state().windows == 20


def test_a_shift_of_the_ok_scores_alarms_after_three_windows_and_clears_after_a_good_one():
    rng = np.random.default_rng(1)
    reference, threshold = _reference(rng)
    monitor = DriftMonitor(reference, threshold, SETTINGS)
    margin = threshold - np.median(reference[reference <= threshold])
    states = []
    for _ in range(3):  # the camera darker: OK scores half a margin higher, still mostly OK
        for score in np.minimum(rng.normal(0.5 + 0.5 * margin, 0.004, 100), threshold):
            monitor.observe(score)
        states.append(monitor.state().state)
    assert states == [DRIFTING, DRIFTING, ALARM]
    assert "OK scores moved" in monitor.state().detail and monitor.state().last.median_shift > 0.25
    for score in rng.normal(0.5, 0.01, 100):
        monitor.observe(score)
    assert monitor.state().state == OK and monitor.state().bad_in_a_row == 0


def test_too_many_ng_verdicts_alarm_even_when_the_ok_scores_did_not_move():
    rng = np.random.default_rng(2)
    reference, threshold = _reference(rng)
    monitor = DriftMonitor(reference, threshold, SETTINGS)
    for _ in range(3):
        window = rng.normal(0.5, 0.01, 100)
        window[:20] = threshold + 0.05  # 20 % NG where the reference allows at most about 6 %
        for score in rng.permutation(window):
            monitor.observe(score)
    state = monitor.state()
    assert state.state == ALARM and "NG rate 2" in state.detail and state.last.ng_rate >= 0.2


def test_a_reference_too_small_is_insufficient_data_said_as_such():
    monitor = DriftMonitor([0.5, 0.51, 0.52], 0.515, SETTINGS)
    for score in np.full(500, 0.9):
        monitor.observe(score)
    state = monitor.state()
    assert state.state == INSUFFICIENT and state.images == 500 and state.windows == 0
    assert "2 reference normal scores below the threshold (at least 5 needed" in state.detail


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset root, model file): a 2-shot tiny model of 'disc' whose thresholds come from 12 held-out
    normal images (the reference a window is compared with)."""
    folder = tmp_path_factory.mktemp("drift")
    root = generate(folder / "synthetic", SyntheticSpec(categories=("disc",), image_size=96, n_train=14,
                                                        n_test_good=1, n_test_per_defect=1, seed=1), progress=False)
    model = folder / "disc.cfm"
    fitted = clipfusion_here("fit", "--normal", str(root / "disc" / "train" / "good"), "--category", "disc",
                             "--shots", "2", "--preset", "tiny", "--out", str(model), "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    return root, model


def test_serve_reports_drift_in_health_and_metrics_from_the_verdicts_it_stores(line, tmp_path):
    """Windows of 10: the model's normals make a window like the reference; pictures of static (a camera
    gone to noise) are NG far more often than the thresholds allow, and two such windows raise the alarm —
    in /v1/models/NAME/health and /metrics, with the statistics of the scores computed here."""
    root, model = line
    detector = CLIPFusion.load(model)
    threshold = detector.thresholds_.image
    normals = [read_rgb(p) for p in sorted((root / "disc" / "train" / "good").glob("*.png"))][:10]
    rng = np.random.default_rng(0)
    static = [rng.integers(0, 256, image.shape, dtype=np.uint8) for image in normals]  # a camera gone to noise
    with safe_open(str(model), framework="np") as handle:
        reference = np.array([n["score"] for n in json.loads(handle.metadata()["fingerprint"])["normals"]])
    reference_ok = reference[reference <= threshold]
    ng = int(np.sum(detector.predict(static, "disc").scores > threshold))
    above = int(np.sum(reference > threshold))
    implied = stats.beta.ppf(0.95, above + 1, len(reference) - above)  # the reference's upper bound
    # the data carries the signal: the static pictures are NG beyond what the thresholds allow
    assert stats.binom.sf(ng - 1, 10, implied) < 1e-3

    server = start_server([model], tmp_path / "data", "--drift-window", "10", "--drift-alarm-after", "2")
    try:
        def post(images: list[np.ndarray]) -> np.ndarray:
            """The scores of the verdicts the server stored (its window is of these)."""
            answer = httpx.post(f"{server.url}/v1/models/disc/inspect", timeout=120,
                                files=[("files", (f"{i}.png", _png(image), "image/png"))
                                       for i, image in enumerate(images)])
            assert answer.status_code == 200 and len(answer.json()["inspections"]) == 10, answer.text
            return np.array([inspection["score"] for inspection in answer.json()["inspections"]])

        def health() -> dict:
            return httpx.get(f"{server.url}/v1/models/disc/health", timeout=30).json()

        first = health()
        assert first["self_check"]["verdict"] == "same" and first["self_check"]["causes"] == []
        assert first["drift"]["state"] == INSUFFICIENT and first["drift"]["images"] == 0
        scores = post(normals)
        drift = health()["drift"]
        assert drift["windows"] == 1 and drift["images"] == 10
        # the server's scores, not this process's: the normals are also the reference's images, and a score
        # that differs in its last bit (batched otherwise) would break a tie with its own reference copy
        np.testing.assert_allclose(scores, detector.predict(normals, "disc").scores, rtol=0, atol=1e-6)
        ok = scores[scores <= threshold]
        assert drift["last"]["ok_images"] == len(ok)
        assert drift["last"]["ks_statistic"] == pytest.approx(_ks_by_hand(ok, reference_ok), abs=1e-6)
        assert drift["last"]["ks_p_value"] == pytest.approx(stats.ks_2samp(ok, reference_ok).pvalue, rel=1e-3)
        first_bad = drift["last"]["bad"]
        post(static)
        post(static)
        drift = health()["drift"]
        assert drift["windows"] == 3 and drift["last"]["ng_rate"] == pytest.approx(ng / 10)
        assert drift["last"]["implied_ng_rate"] == pytest.approx(implied, rel=1e-6)
        assert drift["state"] == ALARM and drift["bad_in_a_row"] >= 2 and "NG rate" in drift["detail"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert 'clipfusion_drift_alarm{model="disc"} 1.0' in metrics
        assert f'clipfusion_drift_windows_total{{model="disc",outcome="bad"}} {2.0 + first_bad}' in metrics
        assert f'clipfusion_drift_ng_rate_ratio{{model="disc"}} {ng / 10}' in metrics
    finally:
        server.stop()
    assert "score-drift alarm" in server.log.read_text()


def test_watch_logs_the_drift_alarm_of_its_own_verdicts(line, tmp_path):
    _, model = line
    folder = tmp_path / "incoming"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for number in range(20):  # a camera gone to noise
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(folder / f"{number:02d}.png")
    done = clipfusion_here("watch", str(folder), "--model", str(model), "--out", str(tmp_path / "out"), "--settle",
                           "0.1", "--poll", "0.1", "--once", "--batch-size", "10", "--drift-window", "10",
                           "--drift-alarm-after", "2")
    assert done.returncode == 0, done.stderr
    assert "score drift: drifting after 10 images (NG rate" in done.stderr
    assert "score-drift alarm (2 bad windows in a row): NG rate" in done.stderr
