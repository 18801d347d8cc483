from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from clipfusion import notices
from clipfusion.config import PRECOMPILED_CACHE_ENV
from clipfusion.data.synthetic import SyntheticSpec, generate
from clipfusion.encoders.text_cache import TEXT_CACHE_ENV
from clipfusion.hardware import NATIVE_BF16_SWITCH

from .commands import clipfusion_here
from .scenes import CORNERS, scene


def pytest_configure(config: pytest.Config) -> None:
    """Precompiled packages and text embeddings go to folders of this session's (inherited by the commands
    it starts), never the user's ~/.cache; they start empty, so serve and watch (``--precompiled auto``) run
    eager unless a test builds packages in a folder of its own."""
    os.environ[PRECOMPILED_CACHE_ENV] = tempfile.mkdtemp(prefix="clipfusion-compiled-")
    os.environ[TEXT_CACHE_ENV] = tempfile.mkdtemp(prefix="clipfusion-text-")


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


def fit_disc(synthetic_root: Path, path: Path) -> Path:
    """``clipfusion fit`` of a 2-shot tiny-preset model of 'disc' to ``path``, in this process's precision."""
    result = clipfusion_here("fit", "--normal", str(synthetic_root / "disc" / "train" / "good"), "--category", "disc",
                             "--shots", "2", "--preset", "tiny", "--set", "fusion__sigma=2", "--out", str(path),
                             "--quiet")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="session")
def model(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-shot tiny-preset model file of 'disc' (``clipfusion fit --out disc.cfm``), written once, in the
    precision this machine (or CLIPFUSION_NATIVE_BF16) gives ``--dtype auto``."""
    return fit_disc(synthetic_root, tmp_path_factory.mktemp("model") / "disc.cfm")


@pytest.fixture(params=["1", "0"], ids=["native-bf16", "no-bf16"])
def cpu_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs as if the CPU had native bfloat16 (``1``) and as if it had not (``0``): the switch
    CLIPFUSION_NATIVE_BF16, seen by this process and the commands it starts.  What a precision-sensitive
    test needs, so that a machine of either kind catches what the other would."""
    monkeypatch.setenv(NATIVE_BF16_SWITCH, request.param)
    return str(request.param)


@pytest.fixture(scope="session")
def model_fitted_as(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``model_fitted_as(switch)``: the ``model`` fixture's fit made with CLIPFUSION_NATIVE_BF16=switch
    (``1``: the file records bfloat16; ``0``: float32), each written once per session."""
    fitted: dict[str, Path] = {}

    def fit(switch: str) -> Path:
        if switch not in fitted:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv(NATIVE_BF16_SWITCH, switch)
                fitted[switch] = fit_disc(synthetic_root, tmp_path_factory.mktemp(f"model-bf16-{switch}") / "disc.cfm")
        return fitted[switch]

    return fit


@pytest.fixture
def model_here(cpu_kind: str, model_fitted_as: Callable[[str], Path]) -> Path:
    """The model fitted as the CPU kind of ``cpu_kind`` would fit it (the test runs as that kind too)."""
    return model_fitted_as(cpu_kind)


CHROMIUM = "/usr/bin/chromium"  # Debian's; scripts/test.sh installs it


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """One headless Chromium for every browser test of the session (Playwright driving Debian's build)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


API_KEY = "test-key-5f2b"  # the shared service's operator key: every request must carry a key


@pytest.fixture(scope="session")
def service(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One ``clipfusion serve`` (SQLite) for the session: the tiny 'disc' model as /v1/models/disc, an
    operator key (API_KEY), its API page (--docs), and small limits the tests can reach (8 queued images,
    0.5 MB uploads, 20 000 pixels)."""
    from .servers import start_server

    folder = tmp_path_factory.mktemp("service")
    served = folder / "disc.cfm"
    served.write_bytes(model.read_bytes())
    (folder / "keys.txt").write_text(f"# NAME ROLE KEY\nstation-1 operator {API_KEY}\n")
    server = start_server([served], folder / "data", "--api-key-file", str(folder / "keys.txt"), "--docs",
                          "--max-queue", "8",
                          "--max-upload-mb", "0.5", "--max-pixels", "20000", "--min-region-area", "1")
    yield server
    server.stop()


@pytest.fixture
def warnings_said(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """``warnings_said()``: clipfusion's warnings since the test began.  Messages said once per process are
    forgotten first (this test hears them again), and clipfusion's log reaches pytest (the command line
    stops its propagation)."""
    monkeypatch.setattr(notices, "_said", set())
    monkeypatch.setattr(logging.getLogger("clipfusion"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="clipfusion")
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name.startswith("clipfusion") and r.levelno >= logging.WARNING]


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray cluster for the session (2 CPUs, no dashboard, on 127.0.0.1 only); commands join it
    with --ray-address."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's loopback-only mode, read at its import
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


# marker → what puts a test in it: the fixtures it uses, or its module
LAYERS = {"ray": ({"ray_address"}, {"test_ray"}),
          "service": ({"service"}, {"test_service", "test_service_faults", "test_operator_page"}),
          "browser": ({"browser"}, {"test_operator_page"}),
          "export": (set(), {"test_export"}),
          "slow": (set(), {"test_compile", "test_precompiled", "test_frontends"})}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test gets the markers of the layers it exercises (pyproject.toml lists them)."""
    for item in items:
        fixtures, module = set(getattr(item, "fixturenames", ())), item.module.__name__.rpartition(".")[2] \
            if getattr(item, "module", None) else ""
        for marker, (by_fixture, by_module) in LAYERS.items():
            if fixtures & by_fixture or module in by_module:
                item.add_marker(getattr(pytest.mark, marker))


LEFT_THREADS_GRACE_S = 15.0


def _idle_pool_worker(thread: threading.Thread, frames: dict) -> bool:
    """A ``concurrent.futures`` worker waiting for work: the interpreter's exit wakes and joins it."""
    frame = frames.get(thread.ident)
    stack = traceback.extract_stack(frame) if frame is not None else []
    return any(entry.name == "_worker" and "work_queue.get" in (entry.line or "") for entry in stack)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A thread that is not a daemon and outlives the session would keep the interpreter from exiting
    after every test passed (a CI run that never ends): name it with its stack and exit with an error."""
    def blocking() -> list[threading.Thread]:
        frames = sys._current_frames()
        return [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon
                and t.is_alive() and not _idle_pool_worker(t, frames)]

    for folder in (PRECOMPILED_CACHE_ENV, TEXT_CACHE_ENV):
        shutil.rmtree(os.environ.get(folder, ""), ignore_errors=True)
    deadline = time.monotonic() + LEFT_THREADS_GRACE_S
    while (left := blocking()) and time.monotonic() < deadline:
        left[0].join(timeout=0.5)
    if left:
        frames = sys._current_frames()
        for thread in left:
            stack = "".join(traceback.format_stack(frames[thread.ident])) if thread.ident in frames else ""
            sys.stderr.write(f"\nthread {thread.name!r} (not a daemon) still runs after the tests:\n{stack}")
        sys.stderr.flush()
        os._exit(3)
