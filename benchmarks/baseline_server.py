"""What a user would write without a serving cluster: one FastAPI process, one model call per request.

Same models, same preprocessing and the same fusion math as the cluster, so
the benchmark compares the serving architecture, not the model code. Handlers
are plain ``def``s (FastAPI runs them in its thread pool), the way a Flask app
would be ported. Run: ``uvicorn benchmarks.baseline_server:app --port 8100``.

The models run on eager PyTorch, as a user's hand-written server would
(``BASELINE_RUNTIME=torch``); ``BASELINE_RUNTIME=auto`` gives it the runtimes the
cluster ships (ONNX Runtime on a CPU), so the report can separate what the runtime
gains from what serving costs.
"""

import os

import numpy as np
from fastapi import FastAPI

from api.v1 import schemas
from deployments.contracts import FusionInput
from deployments.fusion import FusionConfig, fuse
from deployments.imaging import decode_base64, decode_image, prepare
from deployments.settings import limits
from deployments.text import TextConfig, TextModel
from deployments.vision import VisionConfig, VisionModel

app = FastAPI(title="single-process baseline")
RUNTIME = os.environ.get("BASELINE_RUNTIME", "torch")
vision = VisionModel(VisionConfig(runtime=RUNTIME))
text = TextModel(TextConfig(runtime=RUNTIME))
fusion_config = FusionConfig()
class_embeddings = text.embed([fusion_config.class_prompt.format(name) for name in vision.categories])


def _pixels(image_b64: str) -> np.ndarray:
    return prepare(decode_image(decode_base64(image_b64, limits()), limits()), vision.spec)


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@app.post("/v1/vision/classify")
def classify(body: schemas.VisionClassifyRequest) -> dict:
    (result,) = vision.classify([_pixels(body.image)], top_k=body.top_k)
    return {"labels": [{"label": label, "score": score} for label, score in result.labels]}


@app.post("/v1/multimodal/analyze")
def analyze(body: schemas.MultimodalRequest) -> dict:
    (image,) = vision.classify([_pixels(body.image)], top_k=body.top_k)
    embeddings = text.embed([*body.labels, body.text])
    weights = {"vision": 0.5, "text": 0.5}
    (result,) = fuse([FusionInput(image, embeddings[:-1], embeddings[-1], weights, class_embeddings)], fusion_config)
    order = np.argsort(-result.fused)
    return {"fused": [{"label": body.labels[i], "score": float(result.fused[i])} for i in order]}
