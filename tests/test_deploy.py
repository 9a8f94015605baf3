"""The deployment files (Dockerfile, compose.yaml, k8s/) checked offline.

No Docker engine or cluster is needed: the Kubernetes objects are validated
against the schemas that the pinned ``kubernetes-validate`` package ships, and
compose.yaml against the Compose specification schema that the pinned
``check-jsonschema`` package ships. Beyond the schemas, the checks are the ones
that break a multi-pod deployment without any error at apply time: probes on
paths the app does not serve, a grace period shorter than the lease TTL, env
names the settings never read, a Redis any pod can reach.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from coordinator.settings import CoordinatorSettings  # noqa: E402

from .support.dockerfile import Image, instructions, listen_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: `kubectl kustomize` cannot render k8s/"
)

# Kubernetes versions to validate against: an old supported one and the newest shipped.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())

# Maps whose keys are free (any label, any ConfigMap key): the only places where the
# strict schemas accept a field they do not know.
FREE_FORM_MAPS = {
    "labels",
    "annotations",
    "data",
    "stringData",
    "matchLabels",
    "requests",
    "limits",
}

APP_LABELS = {"app.kubernetes.io/name": "coordinator-demo"}
REDIS_LABELS = {"app.kubernetes.io/name": "redis"}
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# ---------------------------------------------------------------- helpers


def _kustomize(path: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _base_files(base: Path = K8S / "base") -> list[dict[str, Any]]:
    """The base's objects as written, for machines without kubectl."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        objects += [d for d in yaml.safe_load_all((base / name).read_text()) if d]
    return objects


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    return _kustomize(K8S) if KUBECTL else _base_files()


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _app(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(objects, "Deployment", "coordinator-demo")


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert not selector.get("matchExpressions"), "checks here only read matchLabels"
    match = selector.get("matchLabels", {})
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def _config(objects: list[dict[str, Any]]) -> dict[str, str]:
    return dict(_one(objects, "ConfigMap", "coordinator-config")["data"])


def _setting_env_names() -> set[str]:
    """Every env name CoordinatorSettings reads."""
    names = set()
    for field, info in CoordinatorSettings.model_fields.items():
        names.add(f"COORDINATOR_{field.upper()}")
        alias = info.validation_alias
        for choice in getattr(alias, "choices", ()):
            if isinstance(choice, str):
                names.add(choice.upper())
    return names


def _unknown_settings(env_names: set[str]) -> set[str]:
    return {n for n in env_names if n.startswith("COORDINATOR_")} - _setting_env_names()


def _settings_from(env: dict[str, str]) -> CoordinatorSettings:
    """Construct the settings these env values give (raises when they are invalid)."""
    values: dict[str, object] = {"redis_url": "redis://redis:6379/0"}
    for name, value in env.items():
        if name.startswith("COORDINATOR_"):
            values[name.removeprefix("COORDINATOR_").lower()] = value
    return CoordinatorSettings(**values)


def _lease_ttl_s(env: dict[str, str]) -> float:
    default = CoordinatorSettings.model_fields["lease_ttl_ms"].default
    return int(env.get("COORDINATOR_LEASE_TTL_MS", default)) / 1000


def _duration_s(value: str) -> float:
    """Compose durations: 1m30s, 45s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ---------------------------------------------------------------- Kubernetes


@needs_kubectl
@pytest.mark.parametrize(
    "path", ["k8s", "k8s/base", "k8s/overlays/sentinel", "k8s/overlays/cluster"]
)
def test_kustomize_renders(path: str) -> None:
    kinds = {o["kind"] for o in _kustomize(ROOT / path)}
    assert {"Deployment", "Service", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schema(
    k8s_objects: list[dict[str, Any]], version: str
) -> None:
    kinds = set()
    for obj in k8s_objects:
        kubernetes_validate.validate(obj, version, strict=True)
        kinds.add(obj["kind"])
    assert kinds >= {
        "Deployment",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
        "NetworkPolicy",
    }


def test_schema_validation_catches_a_typo(k8s_objects: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(_app(k8s_objects))
    _container(broken, "app")["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def _fixed_field_objects(node: Any, kind: str, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every mapping in ``node`` whose fields the API defines (not a free-form map)."""
    found = []
    if isinstance(node, dict):
        free = bool(path) and (
            path[-1] in FREE_FORM_MAPS or (kind == "Service" and path == ("spec", "selector"))
        )
        if not free:
            found.append(path)
        for key, value in node.items():
            found += _fixed_field_objects(value, kind, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _fixed_field_objects(value, kind, (*path, i))
    return found


@pytest.mark.parametrize("path", ["k8s", "k8s/overlays/sentinel", "k8s/overlays/cluster"])
def test_strict_validation_rejects_an_unknown_field_anywhere(path: str) -> None:
    """kubeconform's -strict, offline: ``strict=True`` picks schemas with
    ``additionalProperties: false`` on every object, so an unknown field at any depth of
    any rendered object fails."""
    if KUBECTL is None and path != "k8s":
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot render the overlay")
    objects = _kustomize(ROOT / path) if KUBECTL else _base_files()
    checked = 0
    for obj in objects:
        for where in _fixed_field_objects(obj, obj["kind"]):
            broken = copy.deepcopy(obj)
            node = broken
            for key in where:
                node = node[key]
            node["unknownField"] = "x"
            with pytest.raises(kubernetes_validate.ValidationError) as caught:
                kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
            assert "'unknownField' was unexpected" in caught.value.message, (where, caught.value)
            checked += 1
    assert checked >= 50, checked  # the walk really went deep


def test_a_manifest_with_a_misspelt_field_fails(tmp_path: Path) -> None:
    """The base with ``terminationGracePeriodSecond`` (no s), rendered as `kubectl apply -k`
    would: strict validation rejects it; the non-strict schemas would let it through, and
    the API server would drop the field, leaving the 30 s default grace period."""
    base = tmp_path / "base"
    shutil.copytree(K8S / "base", base)
    deployment = base / "deployment.yaml"
    text = deployment.read_text()
    assert text.count("terminationGracePeriodSeconds:") == 1
    deployment.write_text(
        text.replace("terminationGracePeriodSeconds:", "terminationGracePeriodSecond:")
    )
    objects = _kustomize(base) if KUBECTL else _base_files(base)

    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append((obj["kind"], obj["metadata"]["name"], list(exc.path), exc.message))
    assert errors == [
        (
            "Deployment",
            "coordinator-demo",
            ["spec", "template", "spec"],
            "Additional properties are not allowed ('terminationGracePeriodSecond' was unexpected)",
        )
    ]
    kubernetes_validate.validate(_app(objects), K8S_VERSIONS[-1], strict=False)


@needs_kubectl
@pytest.mark.parametrize("overlay", ["sentinel", "cluster"])
def test_overlay_validates_and_drops_the_single_redis(overlay: str) -> None:
    objects = _kustomize(K8S / "overlays" / overlay)
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    assert not [o for o in objects if o["metadata"]["name"].startswith("redis")]
    env = _container(_app(objects), "app")["env"]
    url = next(e["value"] for e in env if e["name"] == "REDIS_URL")
    assert url.startswith(f"redis+{overlay}://")
    _check_var_refs_defined_first(env)
    if overlay == "cluster":
        parsed = CoordinatorSettings(redis_url=url.replace("$(REDIS_PASSWORD)", "pw"))
        assert parsed.redis_url.startswith("redis+cluster://")


def test_probes_point_at_the_contract_paths(k8s_objects: list[dict[str, Any]]) -> None:
    app = _container(_app(k8s_objects), "app")
    port_names = {p["name"]: p["containerPort"] for p in app["ports"]}
    assert port_names == {"http": 8000}
    assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert app["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert app["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert app[probe]["httpGet"]["port"] in port_names


def test_the_app_serves_the_paths_the_deployment_files_use() -> None:
    try:
        from app.main import app
    except ModuleNotFoundError as exc:
        if exc.name not in ("app", "app.main"):
            raise
        pytest.skip("the demo app (app.main) is not written yet")
    from fastapi.testclient import TestClient

    # Ask the app itself (no lifespan: no Redis needed): a missing route is a 404.
    client = TestClient(app)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path).status_code != 404, path


def test_grace_period_outlasts_prestop_lease_ttl_and_graceful_shutdown(
    k8s_objects: list[dict[str, Any]],
) -> None:
    config = _config(k8s_objects)
    pod = _app(k8s_objects)["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = _container(_app(k8s_objects), "app")["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", pre_stop
    pre_stop_s = float(pre_stop[1])
    # The new leader must be in place (at worst one TTL) before the pod is killed.
    assert grace > pre_stop_s + _lease_ttl_s(config)
    # uvicorn's own bound on a graceful stop ends before the kubelet's SIGKILL.
    assert grace > pre_stop_s + float(config["GRACEFUL_SHUTDOWN_S"])


def test_configmap_settings_are_real_and_valid(k8s_objects: list[dict[str, Any]]) -> None:
    config = _config(k8s_objects)
    assert not _unknown_settings(set(config)), "CoordinatorSettings reads no such env"
    settings = _settings_from(config)
    assert settings.lease_ttl_ms == int(config["COORDINATOR_LEASE_TTL_MS"])
    assert int(config["WEB_CONCURRENCY"]) >= 1


def test_env_names_set_anywhere_are_read_by_the_settings(
    k8s_objects: list[dict[str, Any]],
) -> None:
    names = set()
    for obj in k8s_objects:
        if obj["kind"] == "ConfigMap":
            names |= set(obj.get("data", {}))
        if obj["kind"] == "Deployment":
            for container in obj["spec"]["template"]["spec"]["containers"]:
                names |= {e["name"] for e in container.get("env", [])}
    assert "COORDINATOR_LEASE_TTL_MS" in names
    assert not _unknown_settings(names)


def _check_var_refs_defined_first(env: list[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for entry in env:
        for ref in VAR_REF.findall(entry.get("value", "")):
            assert ref in seen, f"{entry['name']} uses $({ref}) before {ref} is defined"
        seen.add(entry["name"])


def test_redis_password_comes_from_the_secret(k8s_objects: list[dict[str, Any]]) -> None:
    secret = _one(k8s_objects, "Secret", "coordinator-redis")
    assert "REDIS_PASSWORD" in {**secret.get("stringData", {}), **secret.get("data", {})}

    env = _container(_app(k8s_objects), "app")["env"]
    by_name = {e["name"]: e for e in env}
    assert by_name["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "coordinator-redis",
        "key": "REDIS_PASSWORD",
    }
    assert by_name["REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
    _check_var_refs_defined_first(env)
    # Instance ids are <pod name>-<pid> (coordinator.settings.default_instance_id).
    assert by_name["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    redis = _container(_one(k8s_objects, "Deployment", "redis"), "redis")
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    redis_env = {e["name"]: e for e in redis["env"]}
    assert redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "coordinator-redis"


def test_pods_run_as_non_root_with_read_only_root(k8s_objects: list[dict[str, Any]]) -> None:
    for name in ("coordinator-demo", "redis"):
        pod = _one(k8s_objects, "Deployment", name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["requests"])
            assert "memory" in container["resources"]["limits"]


def test_app_replicas_service_ingress_pdb_hpa_fit_together(
    k8s_objects: list[dict[str, Any]],
) -> None:
    deployment = _app(k8s_objects)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 3
    assert _selects(deployment["spec"]["selector"], pod_labels)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    service = _one(k8s_objects, "Service", "coordinator-demo")
    assert _selects({"matchLabels": service["spec"]["selector"]}, pod_labels)
    service_ports = {p["name"] for p in service["spec"]["ports"]}

    ingress = _one(k8s_objects, "Ingress", "coordinator-demo")
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 600
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == "coordinator-demo"
            assert backend["port"]["name"] in service_ports

    pdb = _one(k8s_objects, "PodDisruptionBudget", "coordinator-demo")
    assert _selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"]["maxUnavailable"] == 1

    hpa = _one(k8s_objects, "HorizontalPodAutoscaler", "coordinator-demo")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "coordinator-demo"
    assert hpa["spec"]["minReplicas"] >= deployment["spec"]["replicas"]

    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true"
    assert notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == 8000


def test_network_policy_admits_only_app_pods_to_redis(
    k8s_objects: list[dict[str, Any]],
) -> None:
    redis_pods = _one(k8s_objects, "Deployment", "redis")["spec"]["template"]["metadata"]
    app_pods = _app(k8s_objects)["spec"]["template"]["metadata"]
    redis_service = _one(k8s_objects, "Service", "redis")
    assert _selects({"matchLabels": redis_service["spec"]["selector"]}, redis_pods["labels"])

    policies = [o for o in k8s_objects if o["kind"] == "NetworkPolicy"]
    guarding = [p for p in policies if _selects(p["spec"]["podSelector"], redis_pods["labels"])]
    assert len(guarding) == 1, "exactly one NetworkPolicy should select the Redis pods"
    spec = guarding[0]["spec"]
    assert not _selects(spec["podSelector"], app_pods["labels"])
    assert "Ingress" in spec["policyTypes"]
    assert spec["ingress"], "an empty ingress list would deny the app too"
    for rule in spec["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
        assert rule["from"], "a rule without `from` admits every source"
        for peer in rule["from"]:
            # A namespaceSelector or ipBlock would admit pods other than the app's.
            assert set(peer) == {"podSelector"}, peer
            assert _selects(peer["podSelector"], app_pods["labels"])
            assert not _selects(peer["podSelector"], redis_pods["labels"])


# ---------------------------------------------------------------- Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def _compose_schema() -> dict[str, Any]:
    # The Compose specification schema as check-jsonschema (pinned in the test
    # extra) vendors it from compose-spec/compose-spec.
    text = (
        importlib.resources.files("check_jsonschema")
        / "builtin_schemas"
        / "vendor"
        / "compose-spec.json"
    ).read_text()
    return dict(json.loads(text))


def test_compose_file_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = _compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors

    broken = copy.deepcopy(compose)
    broken["services"]["app"]["depends_on"]["redis"]["condition"] = "service_ready"
    assert list(validator.iter_errors(broken)), "the schema should reject a bad condition"


def test_compose_runs_three_replicas_of_two_workers_behind_nginx(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    app = services["app"]
    assert app["deploy"]["replicas"] == 3
    assert app["environment"]["WEB_CONCURRENCY"] == "2"
    assert "ports" not in app, "only the load balancer publishes a port"
    assert list(services["lb"]["ports"]) and "ports" not in services["redis"]

    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["lb"]["depends_on"]["app"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(app["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["lb"]["healthcheck"]["test"])

    # A stopping leader hands over, and streams close, before Docker's SIGKILL.
    assert _duration_s(app["stop_grace_period"]) > _lease_ttl_s(app["environment"])


def test_compose_redis_password_matches_the_app_url(compose: dict[str, Any]) -> None:
    services = compose["services"]
    password = services["redis"]["environment"]["REDIS_PASSWORD"]
    assert password.startswith("${REDIS_PASSWORD"), "the password comes from the environment"
    assert "--requirepass" in " ".join(services["redis"]["command"])
    url = services["app"]["environment"]["REDIS_URL"]
    assert url == f"redis://:{password}@redis:6379/0"


def test_compose_env_names_are_read_by_the_settings(compose: dict[str, Any]) -> None:
    env = compose["services"]["app"]["environment"]
    assert not _unknown_settings(set(env))
    _settings_from(env)


def test_nginx_is_configured_for_sse(compose: dict[str, Any]) -> None:
    mounts = [v.split(":") for v in compose["services"]["lb"]["volumes"]]
    source = next(src for src, dst, *_ in mounts if dst == "/etc/nginx/nginx.conf")
    conf = (ROOT / source).read_text()
    directives = {
        line.strip().rstrip(";")
        for line in conf.splitlines()
        if line.strip() and not line.strip().startswith("#")
    }
    assert "proxy_buffering off" in directives
    assert "proxy_http_version 1.1" in directives
    assert 'proxy_set_header Connection ""' in directives
    assert "proxy_read_timeout 1h" in directives
    assert "server app:8000 resolve max_fails=1 fail_timeout=2s" in directives
    # The port the client used survives into the app's redirects ($host drops it).
    assert "proxy_set_header Host $http_host" in directives
    # A graceful stop or reload with streams open ends, within the stop grace period.
    shutdown = next(d for d in directives if d.startswith("worker_shutdown_timeout "))
    lb = compose["services"]["lb"]
    assert _duration_s(shutdown.split()[1]) < _duration_s(lb["stop_grace_period"])
    assert lb["stop_signal"] == "SIGQUIT"
    # nginx drops an idle upstream connection before uvicorn does (its keep-alive is 5 s).
    keepalive = next(d for d in directives if d.startswith("keepalive_timeout "))
    assert _duration_s(keepalive.split()[1]) < 5


def test_compose_file_runs_on_compose_v1(compose: dict[str, Any]) -> None:
    assert "name" not in compose, "Compose v1 rejects a top-level name:"


# ---------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined."""
    return instructions(ROOT / "Dockerfile")


def test_dockerfile_base_images_are_pinned(dockerfile: list[tuple[str, str]]) -> None:
    bases = [args.split()[0] for instruction, args in dockerfile if instruction == "FROM"]
    assert bases
    for image in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image


def test_dockerfile_runs_as_a_numeric_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    last_from = max(i for i, (instruction, _) in enumerate(dockerfile) if instruction == "FROM")
    users = [args for instruction, args in dockerfile[last_from:] if instruction == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    k8s_uid = yaml.safe_load((K8S / "base" / "deployment.yaml").read_text())
    assert int(uid) == k8s_uid["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_dockerfile_command_and_healthcheck(dockerfile: list[tuple[str, str]]) -> None:
    instructions = dict(dockerfile)
    assert "RUN /opt/venv/bin/pip install ." in {f"{i} {a}" for i, a in dockerfile}

    command = json.loads(instructions["CMD"])  # exec form: no shell between Docker and uvicorn
    if command[:2] == ["sh", "-c"]:
        assert command[2].startswith("exec "), "the shell must exec uvicorn to pass signals"
        command = shlex.split(command[2])[1:]
    assert command[:2] == ["uvicorn", "app.main:app"]
    assert command[command.index("--workers") + 1] == "${WEB_CONCURRENCY:-2}"
    assert command[command.index("--port") + 1] == "8000"

    health = instructions["HEALTHCHECK"]
    check = json.loads(health[health.index("CMD") + 3 :])
    assert check[0] == "python" and "curl" not in health
    assert "http://127.0.0.1:8000/healthz" in check[-1]


def _runs(container: dict[str, Any], image: Image) -> list[str]:
    """The command line a container runs: Kubernetes' ``command`` replaces the image's
    ENTRYPOINT and CMD, ``args`` alone replaces the CMD (this image has no ENTRYPOINT)."""
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return list(container.get("args", image.cmd))


def _port_disagreements(objects: list[dict[str, Any]], image: Image) -> list[str]:
    """Where the app Deployment, its Service and the image disagree on the app's port."""
    deployment = _app(objects)
    container = _container(deployment, "app")
    port = listen_port(_runs(container, image))
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    found = {"containerPort http": named.get("http")}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        target = container[probe]["httpGet"]["port"]
        found[probe] = named.get(target, target)
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    found["prometheus.io/port"] = int(notes["prometheus.io/port"])
    for service_port in _one(objects, "Service", "coordinator-demo")["spec"]["ports"]:
        target = service_port["targetPort"]
        found[f"Service targetPort {target}"] = named.get(target, target)
    return [
        f"{what} is {value}, the server listens on {port}"
        for what, value in found.items()
        if value != port
    ]


def test_k8s_and_the_image_agree_on_the_port(
    k8s_objects: list[dict[str, Any]], dockerfile: list[tuple[str, str]]
) -> None:
    image = Image.load(ROOT / "Dockerfile")
    assert "ENTRYPOINT" not in dict(dockerfile), "_runs assumes the image has no ENTRYPOINT"
    assert _port_disagreements(k8s_objects, image) == []
    if KUBECTL:
        for name in ("sentinel", "cluster"):
            overlay = _kustomize(K8S / "overlays" / name)
            assert _port_disagreements(overlay, image) == []
    # The image's own EXPOSE and HEALTHCHECK, too.
    assert dict(dockerfile)["EXPOSE"] == str(image.port)
    assert f"http://127.0.0.1:{image.port}/" in dict(dockerfile)["HEALTHCHECK"]

    # A Deployment that overrides the CMD with another port is caught, as is a probe's port.
    moved = copy.deepcopy(k8s_objects)
    _container(_app(moved), "app")["args"] = image.cmd_on_port(9000)
    assert len(_port_disagreements(moved, image)) == 6
    probed = copy.deepcopy(k8s_objects)
    _container(_app(probed), "app")["livenessProbe"]["httpGet"]["port"] = 8080
    assert _port_disagreements(probed, image) == [
        "livenessProbe is 8080, the server listens on 8000"
    ]


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from nothing and allow what the build needs"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "coordinator", "app"}
