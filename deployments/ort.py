"""ONNX Runtime for the vision and text models: the same weights, exported from PyTorch when a replica loads them.

On one CPU thread ONNX Runtime runs MobileNetV2 in about half the time eager PyTorch takes, and
all-MiniLM-L6-v2 on a short text in a third (benchmarks/NOTES.md, "Model runtimes"), with the same answers:
probabilities within 1e-6, embeddings at cosine 0.99999. So a model's ``runtime`` is ``auto`` by default:
ONNX Runtime on a CPU, PyTorch on a GPU (where the GPU profile's own choices are fastest). ``torch`` keeps
eager PyTorch everywhere; ``onnxruntime`` insists and fails to load when the model cannot be exported.

The export runs in the replica when it loads the model (about 0.4 s for MobileNetV2, 0.9 s for MiniLM on
one core) and stays in memory: there is no file to cache, trust or clean up, and a model swapped in by
``user_config`` is exported the same way. Only the weights the replica already loaded are exported, so the
ONNX graph is as trusted as they are.
"""

import io
import logging
from collections.abc import Callable
from typing import Literal

logger = logging.getLogger("ray.serve")

Runtime = Literal["auto", "torch", "onnxruntime"]
RUNTIME_DESCRIPTION = (
    "auto: ONNX Runtime on a CPU, PyTorch on a GPU; torch: eager PyTorch; onnxruntime: ONNX Runtime, "
    "or fail to load if the model cannot be exported."
)
OPSET = 17


def chosen(runtime: Runtime, device_type: str) -> Literal["torch", "onnxruntime"]:
    """The runtime ``runtime`` means on a device of ``device_type`` (``cpu``, ``cuda``)."""
    if runtime == "auto":
        return "onnxruntime" if device_type == "cpu" else "torch"
    return runtime


def load(name: str, runtime: Runtime, device_type: str, exported: Callable[[], bytes]):
    """The ONNX Runtime session a model runs on, or None where it runs on PyTorch: ``runtime`` chooses
    (``chosen``), ``exported`` gives the model's ONNX graph. A model that cannot be exported is served on
    PyTorch, with a warning, unless ``runtime`` is ``onnxruntime``: then the error is raised."""
    if chosen(runtime, device_type) != "onnxruntime":
        return None
    try:
        graph = exported()
    except Exception as exc:
        if runtime == "onnxruntime":
            raise
        logger.warning("%s cannot be exported to ONNX (%s): serving it on PyTorch", name, type(exc).__name__)
        return None
    import torch

    return session(graph, torch.get_num_threads())


def described(session) -> str:
    """The runtime a model with ``session`` (None: PyTorch) runs on, with its version, as ``GET /v1/models``
    shows it."""
    if session is not None:
        return version()
    import torch

    return f"torch {torch.__version__}"


def export(module, example: tuple, inputs: list[str], outputs: list[str], dynamic: dict[str, dict[int, str]]) -> bytes:
    """``module`` (on the CPU) as an ONNX model, traced on ``example``. The module is put in eval mode and left
    so: the exporter restores the mode it found, recursively, and a wrapper made for the export starts out
    in training mode (dropout on, batch norm updating) with the served model inside it."""
    import torch

    module.eval()
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            module,
            example,
            buffer,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,  # the TorchScript tracer: no onnxscript, and these models trace whole
        )
    return buffer.getvalue()


def session(model: bytes, threads: int):
    """A CPU ``onnxruntime.InferenceSession`` on ``threads`` intra-op threads, one model call at a time."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: its warnings about unused initializers are noise
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"
