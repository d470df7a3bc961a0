"""ONNX Runtime for the vision and text models: the same weights, exported from PyTorch, compiled once.

On one CPU thread ONNX Runtime runs MobileNetV2 in about half the time eager PyTorch takes, and
all-MiniLM-L6-v2 on a short text in a third (benchmarks/NOTES.md, "Model runtimes"), with the same answers:
probabilities within 1e-6, embeddings at cosine 0.99999. So a model's ``runtime`` is ``auto`` by default:
ONNX Runtime on a CPU, PyTorch on a GPU (where the GPU profile's own choices are fastest). ``torch`` keeps
eager PyTorch everywhere; ``onnxruntime`` insists and fails to load when the model cannot be exported.

``compiled`` keeps an exported model in the model cache (``$MAAS_MODEL_CACHE/onnx``, beside the converted
language model): the ONNX graph and what serving it needs (classes, preprocessing, version), named by a
digest of the weights file, the model's configuration and the exporting versions. The first replica to
load a model exports it (``make install`` does it for the shipped ones); every later one reads it, without
importing PyTorch: a vision replica then starts in a fraction of the CPU time and memory. The graph is
data (a protobuf of tensors and operators, never code), is checked against its recorded digest, and is
written to a temporary name and renamed, so replicas exporting at once, or one killed halfway, leave no
partial file. A model the cache cannot key (weights downloaded by torchvision, a Hugging Face folder) is
exported in the replica, in memory, as ``load`` does.
"""

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

logger = logging.getLogger("ray.serve")

Runtime = Literal["auto", "torch", "onnxruntime"]
RUNTIME_DESCRIPTION = (
    "auto: ONNX Runtime on a CPU, PyTorch on a GPU; torch: eager PyTorch; onnxruntime: ONNX Runtime, "
    "or fail to load if the model cannot be exported."
)
OPSET = 17
FORMAT = 1  # of what ``compiled`` keeps; raise it when the export or the kept fields change


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


def distribution(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def compiled(kind: str, key: dict, build: Callable[[], tuple[bytes, dict]], root: Path) -> tuple[bytes, dict]:
    """The ONNX graph and serving facts (JSON-able) of the model ``key`` identifies, from ``root`` (the model
    cache) or from ``build`` (which imports PyTorch and exports it), then kept there. ``key`` must name
    everything the export depends on besides the exporting versions: the weights' digest and the model's
    configuration. A cache that cannot be written is warned about and the export served anyway. The facts
    carry ``compiled``, the name it is kept under: a digest of everything the graph depends on."""
    full = {
        "kind": kind,
        "format": FORMAT,
        "opset": OPSET,
        "exporter": {name: distribution(name) for name in ("torch", "onnx")},
        **key,
    }
    name = f"{kind}-{hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:24]}"
    graph_path, facts_path = root / f"{name}.onnx", root / f"{name}.json"
    try:
        facts = json.loads(facts_path.read_text())
        graph = graph_path.read_bytes()
        if hashlib.sha256(graph).hexdigest() == facts["graph_sha256"]:
            return graph, {**facts["model"], "compiled": name}
        logger.warning("%s in the model cache does not match its recorded digest: exporting it again", graph_path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s in the model cache is unreadable (%s): exporting it again", facts_path, type(exc).__name__)
    logger.info("Exporting %s to ONNX into %s (once)", kind, root)
    graph, model = build()
    facts = {"key": full, "graph_sha256": hashlib.sha256(graph).hexdigest(), "model": model}
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_file(graph_path, graph)
        write_file(facts_path, json.dumps(facts, indent=1).encode())  # last: it marks the pair complete
    except OSError as exc:
        logger.warning("Cannot keep the exported %s in %s (%s): each start exports it again", kind, root, exc)
    return graph, {**model, "compiled": name}


def write_file(path: Path, data: bytes) -> None:
    """``data`` at ``path``, written under a temporary name and renamed into place."""
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def load_compiled(
    kind: str,
    runtime: Runtime,
    device_type: str,
    key: dict | None,
    build: Callable[[], tuple[bytes, dict]],
    from_graph: Callable[[bytes, dict], object],
    otherwise: Callable[[Runtime | None], object],
):
    """The model a replica serves: ``from_graph(graph, facts)`` of the compiled model where ``runtime`` means
    ONNX Runtime on ``device_type`` and ``key`` (``compiled``'s) exists, else ``otherwise(None)``. A model that
    cannot be exported is ``otherwise("torch")``, with a warning, unless ``runtime`` is ``onnxruntime``: then
    the error is raised."""
    if key is None or chosen(runtime, device_type) != "onnxruntime":
        return otherwise(None)
    from deployments.runtime import model_cache

    try:
        graph, facts = compiled(kind, key, build, model_cache("onnx"))
    except Exception as exc:
        if runtime == "onnxruntime":
            raise
        logger.warning("The %s model cannot be exported to ONNX (%s): serving it on PyTorch", kind, type(exc).__name__)
        return otherwise("torch")
    return from_graph(graph, facts)


def compile_now(kind: str, key: dict, build: Callable[[], tuple[bytes, dict]]) -> Path:
    """Compile a model into the model cache now, as its first CPU replica would (``make install`` and the image
    do it for the shipped ones, so no replica pays for the export). Returns the cache folder."""
    from deployments.runtime import model_cache

    folder = model_cache("onnx")
    _, facts = compiled(kind, key, build, folder)
    logger.info("%s %s compiled for ONNX Runtime in %s", facts["name"], facts["version"], folder)
    return folder
