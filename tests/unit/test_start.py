"""What a cold start pays before any model loads: building the application and creating each replica import no
PyTorch, transformers or llguidance (each costs seconds of CPU on a 2-core node, where Serve builds the app in
a process of its own before any replica starts, and every replica unpickles its class before it loads)."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "llguidance", "captum")


@pytest.mark.parametrize(
    "module",
    [
        "pipelines.multimodal",  # what Serve imports to build the application, then calls build_app in
        "deployments.vision",
        "deployments.text",
        "deployments.fusion",
        "deployments.ocr",
        "deployments.language",
        "deployments.explainer",
        "deployments.recognizer",
        "deployments.synthesizer",
        "deployments.ingress",
    ],
)
def test_building_the_app_and_creating_a_replica_import_no_heavy_library(module):
    check = (
        f"import sys, {module}\n"
        "if sys.argv[1] == 'pipelines.multimodal':\n"
        "    pipelines.multimodal.build_app()\n"
        f"print(' '.join(name for name in {HEAVY!r} if name in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check, module], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []
