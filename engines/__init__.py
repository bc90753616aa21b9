"""The model repository: one folder per model with ``model.yaml`` and ``model.onnx``.

TensorRT plans are built from the ONNX on the GPU that runs them and cached beside it;
they are never committed.
"""

from pathlib import Path

ENGINES_DIR = Path(__file__).resolve().parent
