"""Engine runtimes behind one small interface (``load``, ``infer``).

See :mod:`spine_node.inference.runtime.base` for the interface; backends live one per module
(``tensorrt_backend``, ``onnxruntime_backend``, ``torch_backend``) and are imported only
when tried. :func:`load_engine` picks the first backend that can run a model here;
:class:`EngineProvider` is the cached ``ModelProvider`` that pipelines are given.
"""

from spine_node.inference.runtime.base import (
    Engine,
    EngineError,
    EngineInputError,
    EngineOptions,
    EngineUnavailable,
)
from spine_node.inference.runtime.selection import (
    DEFAULT_BACKENDS,
    EngineProvider,
    NoEngineAvailable,
    load_engine,
)

__all__ = [
    "DEFAULT_BACKENDS",
    "Engine",
    "EngineError",
    "EngineInputError",
    "EngineOptions",
    "EngineProvider",
    "EngineUnavailable",
    "NoEngineAvailable",
    "load_engine",
]
