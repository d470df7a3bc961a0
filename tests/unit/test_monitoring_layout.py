"""monitoring/ holds what replicas import; its command-line tools, which may use deployment code, are in
monitoring/tools/."""

import ast
from pathlib import Path

from monitoring import catalog

MONITORING = catalog.MONITORING_DIR
TOOLS = MONITORING / "tools"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_runtime_monitoring_modules_import_no_deployment_code():
    runtime = [path for path in MONITORING.rglob("*.py") if TOOLS not in path.parents]
    assert {path.name for path in runtime} >= {"metrics.py", "drift.py", "catalog.py"}
    for path in runtime:
        imported = imported_modules(path)
        assert not {m for m in imported if m.split(".")[0] == "deployments"}, path
        assert not {m for m in imported if m.startswith("monitoring.tools")}, path
