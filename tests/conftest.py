from __future__ import annotations

from pathlib import Path

import pytest

from clipfusion.data.synthetic import SyntheticSpec, generate

SMALL_SPEC = SyntheticSpec(
    categories=("fabric", "disc"), image_size=96, n_train=4, n_test_good=3, n_test_per_defect=2, seed=0
)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic MVTec-layout dataset, generated once per test session (read-only for tests)."""
    return generate(tmp_path_factory.mktemp("synthetic"), SMALL_SPEC, progress=False)
