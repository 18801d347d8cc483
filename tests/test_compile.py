"""``--compile``: the UNet pass and the autoencoder through torch.compile (frozen weights, one image per
call) give the eager path's maps.  The eager path is held elsewhere to diffusers' full forward and to
a manual softmax (test_encoders), so agreement with it is agreement with those references."""
from __future__ import annotations

import numpy as np
import pytest
from torch._dynamo.utils import counters

from clipfusion.cli import _runtime, build_parser
from clipfusion.config import MAP_NAMES, RuntimeConfig
from clipfusion.errors import SettingError
from clipfusion.methods.clipfusion.detector import CLIPFusion
from clipfusion.service.database import make_engine, migrate, session_factory
from clipfusion.service.inspector import ServedModel
from clipfusion.service.settings import ServiceSettings
from clipfusion.service.tables import Inspection

# Compiled kernels may sum in another order than eager ones: float32 rounding, far below this.
RELATIVE_TOLERANCE = 1e-4
FLOAT32 = RuntimeConfig("cpu", "float32")  # what that tolerance is for, on either CPU kind


def _relative_difference(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / max(float(np.ptp(expected)), 1e-12))


def test_compiled_detector_gives_the_eager_maps_scores_and_decisions(scenes):
    normal, defective, _ = scenes
    eager = CLIPFusion("tiny", FLOAT32, fusion__sigma=0.0).fit(normal[:2], "plate").calibrate(normal[2:], "plate")
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = CLIPFusion("tiny", RuntimeConfig("cpu", "float32", compile=True), fusion__sigma=0.0)
    compiled.fit(normal[:2], "plate")  # the bank's features come compiled too
    graphs_after_fit = counters["stats"]["unique_graphs"]
    assert graphs_after_fit > graphs_before  # dynamo really compiled the parts
    compiled.calibrate(normal[2:], "plate")
    # 8 different images in one batch, one per compiled call: a mix-up of images would show below
    expected, got = eager.encode(defective, "plate"), compiled.encode(defective, "plate")
    assert counters["stats"]["unique_graphs"] == graphs_after_fit  # references and queries share the graphs
    for name in ("clip_score", *MAP_NAMES):
        assert getattr(got, name).shape == getattr(expected, name).shape, name
        assert _relative_difference(getattr(got, name), getattr(expected, name)) <= RELATIVE_TOLERANCE, name
    eager_prediction, compiled_prediction = eager.predict(defective, "plate"), compiled.predict(defective, "plate")
    assert _relative_difference(compiled_prediction.maps, eager_prediction.maps) <= RELATIVE_TOLERANCE
    np.testing.assert_allclose(compiled_prediction.scores, eager_prediction.scores, rtol=0,
                               atol=RELATIVE_TOLERANCE * float(np.ptp(eager_prediction.maps)))
    assert compiled_prediction.labels() == eager_prediction.labels()


def test_serve_compiles_before_the_first_request(model, tmp_path):
    # float32, as above: the graphs compiled there serve here (a bfloat16 model says it runs in float32)
    settings = ServiceSettings(models=(model,), data_dir=tmp_path, runtime=RuntimeConfig("cpu", "float32",
                                                                                         compile=True))
    engine = make_engine(settings.url)
    migrate(engine)
    served = ServedModel("disc", model, settings, session_factory(engine))
    assert served.inspector.detector.runtime is not None and served.inspector.detector.runtime.compile
    assert served.inspector.detector.timings_.seconds["unet"] > 0  # an image went through the models at start-up
    with session_factory(engine)() as session:  # the warm-up image is not an inspection
        assert session.query(Inspection).count() == 0


def test_compile_option_reaches_the_runtime_and_is_refused_where_it_cannot_run():
    command = ["predict", "images", "--out", "out", "--device", "cpu", "--dtype", "float32"]
    assert _runtime(build_parser().parse_args([*command, "--compile"])).compile
    assert not _runtime(build_parser().parse_args(command)).compile
    with pytest.raises(SettingError, match="drop --compile"):
        RuntimeConfig(device="mps", compile=True)
