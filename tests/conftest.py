from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clipfusion.data.synthetic import SyntheticSpec, generate

from .commands import clipfusion_here
from .scenes import CORNERS, scene

SMALL_SPEC = SyntheticSpec(
    categories=("fabric", "disc"), image_size=96, n_train=4, n_test_good=3, n_test_per_defect=2, seed=0
)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec-layout dataset, generated once per test session (read-only for tests)."""
    return generate(tmp_path_factory.mktemp("synthetic"), SMALL_SPEC, progress=False)


@pytest.fixture(scope="session")
def scenes() -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Four normal scenes; eight defective ones (a dark square in each corner, twice) and their masks."""
    normal = [scene(s)[0] for s in range(4)]
    defective = [scene(10 + i, corner) for i, corner in enumerate(CORNERS * 2)]
    return normal, [img for img, _ in defective], np.stack([m for _, m in defective])


@pytest.fixture(scope="session")
def model(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-shot tiny-preset model file of 'disc' (``clipfusion fit --out disc.cfm``), written once."""
    path = tmp_path_factory.mktemp("model") / "disc.cfm"
    result = clipfusion_here("fit", "--normal", str(synthetic_root / "disc" / "train" / "good"), "--category", "disc",
                             "--shots", "2", "--preset", "tiny", "--set", "fusion__sigma=2", "--out", str(path),
                             "--quiet")
    assert result.returncode == 0, result.stderr
    return path


CHROMIUM = "/usr/bin/chromium"  # Debian's; scripts/test.sh installs it


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Chromium for every browser test of the session (Playwright driving Debian's build)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


API_KEY = "test-key-5f2b"  # the shared service's only key: every request must carry it


@pytest.fixture(scope="session")
def service(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One ``clipfusion serve`` (SQLite) for the session: the tiny 'disc' model as /v1/models/disc, an API
    key, and small limits the tests can reach (8 queued images, 0.5 MB uploads, 20 000 pixels)."""
    from .servers import start_server

    folder = tmp_path_factory.mktemp("service")
    served = folder / "disc.cfm"
    served.write_bytes(model.read_bytes())
    (folder / "keys.txt").write_text(f"# operators\n{API_KEY}\n")
    server = start_server([served], folder / "data", "--api-key-file", str(folder / "keys.txt"), "--max-queue", "8",
                          "--max-upload-mb", "0.5", "--max-pixels", "20000", "--min-region-area", "1")
    yield server
    server.stop()
