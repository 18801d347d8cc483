"""``clipfusion export``: a detector written as OpenVINO (or ONNX) graphs for the torch-free runtime
(:mod:`clipfusion.runtime`).  Needs torch (``clipfusion[models]``) and OpenVINO (``clipfusion[export]``)."""
