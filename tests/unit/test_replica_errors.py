"""Errors cross from model replicas to the ingress pickled, and unpickling one imports the module that
defines its class. The ingress runs without torch: an error defined beside its model brought the model's stack
with it, 3 s and hundreds of MB in an ingress replica at the first such error (the first explanation over its
budget took 4 s longer than the explainer ran)."""

import importlib
import pkgutil
import subprocess
import sys

import deployments
from deployments.errors import MaasError


def error_classes() -> list[type[MaasError]]:
    """Every error class the deployments define."""
    for module in pkgutil.iter_modules(deployments.__path__):
        importlib.import_module(f"deployments.{module.name}")
    found, todo = [], [MaasError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_an_ingress_replica_takes_in_every_model_error_without_importing_torch():
    classes = error_classes()
    assert {"ExplanationTimeout", "PromptTooLong", "ModelUnavailable"} <= {cls.__name__ for cls in classes}
    modules = sorted({cls.__module__ for cls in classes})
    check = (
        "import importlib, sys; import deployments.ingress\n"
        "for module in sys.argv[1:]:\n"
        "    importlib.import_module(module)\n"
        "    print(module, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", check, *modules], capture_output=True, text=True, check=True)
    imported = dict(line.split() for line in out.stdout.splitlines())
    assert imported == {module: "False" for module in modules}
