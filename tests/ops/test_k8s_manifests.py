"""The Kubernetes manifests in ops/k8s: valid against the Kubernetes API schemas
(strict: an unknown field fails), consistent with each other, and running
`memsvc` with arguments that memsvc's own parser accepts.

Schemas: the ones kubernetes-validate bundles (offline) for KUBERNETES_VERSION,
the oldest Kubernetes the manifests are meant for.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from memsvc.cli import build_parser

K8S_DIR = Path(__file__).resolve().parents[2] / "ops" / "k8s"
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "memsvc"
KUSTOMIZATION = "kustomization.yaml"
EXAMPLE_SECRETS = "secrets.example.yaml"
WORKLOAD_KINDS = ("StatefulSet", "Deployment", "Job")
EXPANSION = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# The variables `memsvc` reads as defaults of its flags: cleared so that only the
# container's environment decides what the parser sees.
MEMSVC_ENV_DEFAULTS = ("DATABASE_URL", "REDIS_URL", "MEMSVC_DATA_DIR", "MEMSVC_METRICS_PORT")

Doc = dict[str, Any]


def load(name: str) -> list[Doc]:
    with (K8S_DIR / name).open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def manifest_files() -> list[str]:
    """Every YAML file in ops/k8s but the kustomization, example secrets included."""
    return sorted(
        path.name
        for path in K8S_DIR.iterdir()
        if path.suffix in (".yaml", ".yml") and path.name != KUSTOMIZATION
    )


def deployed() -> list[Doc]:
    """The documents `kubectl apply -k ops/k8s` creates."""
    return [doc for name in load(KUSTOMIZATION)[0]["resources"] for doc in load(name)]


def example_secrets() -> dict[str, dict[str, str]]:
    """Secret name -> its placeholder data, from secrets.example.yaml."""
    return {doc["metadata"]["name"]: doc["stringData"] for doc in load(EXAMPLE_SECRETS)}


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] in WORKLOAD_KINDS]


def containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def pod_labels(workload: Doc) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def selected_by(selector: dict[str, str], docs: list[Doc]) -> list[Doc]:
    """The workloads whose pods carry every label of selector."""
    return [w for w in workloads(docs) if selector.items() <= pod_labels(w).items()]


def config_maps() -> dict[str, dict[str, str]]:
    """ConfigMap name -> its data, of the deployed ConfigMaps."""
    return {d["metadata"]["name"]: d["data"] for d in deployed() if d["kind"] == "ConfigMap"}


def env_names(container: Doc) -> set[str]:
    """The environment variables the container is given, envFrom included."""
    names = {var["name"] for var in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(config_maps()[source["configMapRef"]["name"]])
    return names


def validate(doc: Doc) -> None:
    """Raises kubernetes_validate.ValidationError unless doc is a valid object."""
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def documents() -> Iterator[Any]:
    for name in manifest_files():
        for index, doc in enumerate(load(name)):
            yield pytest.param(doc, id=f"{name}:{index}:{doc['kind']}/{doc['metadata']['name']}")


def test_the_schemas_of_the_pinned_kubernetes_version_are_bundled() -> None:
    # A kubernetes-validate release without them fails inside validate() with an IndexError.
    assert KUBERNETES_VERSION in kubernetes_validate.utils.all_versions()


@pytest.mark.parametrize("doc", documents())
def test_document_is_valid_kubernetes(doc: Doc) -> None:
    validate(doc)


def _misspell_pod_field(doc: Doc) -> None:
    pod = doc["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")


def _misspell_probe_field(doc: Doc) -> None:
    container = doc["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["prot"] = container["readinessProbe"]["grpc"].pop("port")


def _quote_replicas(doc: Doc) -> None:
    doc["spec"]["replicas"] = str(doc["spec"]["replicas"])


def _drop_container_name(doc: Doc) -> None:
    del doc["spec"]["template"]["spec"]["containers"][0]["name"]


@pytest.mark.parametrize(
    "breakage",
    [_misspell_pod_field, _misspell_probe_field, _quote_replicas, _drop_container_name],
    ids=lambda breakage: breakage.__name__.strip("_"),
)
def test_validation_rejects_a_broken_statefulset(breakage: Callable[[Doc], None]) -> None:
    broken = copy.deepcopy(find(load("statefulset.yaml"), "StatefulSet", "memsvc"))
    validate(broken)
    breakage(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_kustomization_lists_every_manifest_but_the_example_secrets() -> None:
    kustomization = load(KUSTOMIZATION)[0]
    assert kustomization["namespace"] == NAMESPACE
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert set(listed) == set(manifest_files()) - {EXAMPLE_SECRETS}


def test_every_object_is_in_the_namespace() -> None:
    for name in manifest_files():
        for doc in load(name):
            if doc["kind"] == "Namespace":
                assert doc["metadata"]["name"] == NAMESPACE
            else:
                assert doc["metadata"].get("namespace") == NAMESPACE, (name, doc["kind"])


def test_no_secret_is_deployed_and_the_examples_hold_placeholders_only() -> None:
    assert not [doc for doc in deployed() if doc["kind"] == "Secret"]
    for doc in load(EXAMPLE_SECRETS):
        assert doc["kind"] == "Secret"
        assert "data" not in doc, "example values go in stringData, in plain sight"
        for key, value in doc["stringData"].items():
            assert "CHANGE_ME" in value, f"{doc['metadata']['name']}.{key} is not a placeholder"


@pytest.mark.parametrize("workload", workloads(deployed()), ids=lambda w: w["metadata"]["name"])
def test_workload_references_exist(workload: Doc) -> None:
    docs, secrets, data = deployed(), example_secrets(), config_maps()
    pod = workload["spec"]["template"]["spec"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    templates = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    for volume in volumes.values():
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims, volume
    for container in containers(workload):
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes.keys() | templates, mount
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in data
        for var in container.get("env", []):
            ref = var.get("valueFrom", {})
            if "secretKeyRef" in ref:
                secret = ref["secretKeyRef"]
                assert secret["key"] in secrets.get(secret["name"], {}), secret
            if "configMapKeyRef" in ref:
                config_map = ref["configMapKeyRef"]
                assert config_map["key"] in data.get(config_map["name"], {}), config_map

    if workload["kind"] == "StatefulSet":
        governing = find(docs, "Service", workload["spec"]["serviceName"])
        assert governing["spec"].get("clusterIP") == "None", "serviceName must be headless"
        assert governing["spec"]["selector"].items() <= pod_labels(workload).items()


def test_selectors_match_their_own_pod_labels() -> None:
    for workload in workloads(deployed()):
        if workload["kind"] != "Job":  # a Job's selector is generated
            assert workload["spec"]["selector"]["matchLabels"].items() <= (
                pod_labels(workload).items()
            )


@pytest.mark.parametrize(
    "service",
    [d for d in deployed() if d["kind"] == "Service"],
    ids=lambda s: s["metadata"]["name"],
)
def test_service_selects_one_workload_by_a_port_it_has(service: Doc) -> None:
    selected = selected_by(service["spec"]["selector"], deployed())
    assert len(selected) == 1, [w["metadata"]["name"] for w in selected]
    [workload] = selected
    ports = {p["name"]: p["containerPort"] for c in containers(workload) for p in c["ports"]}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in ports or target in ports.values(), (service["metadata"]["name"], target)


def test_memsvc_services_and_disruption_budget_select_the_statefulset() -> None:
    docs = deployed()
    memsvc = find(docs, "StatefulSet", "memsvc")
    headless = find(docs, "Service", "memsvc")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is False
    assert memsvc["spec"]["serviceName"] == "memsvc"
    assert selected_by(headless["spec"]["selector"], docs) == [memsvc]
    assert selected_by(find(docs, "Service", "memsvc-client")["spec"]["selector"], docs) == [memsvc]
    budget = find(docs, "PodDisruptionBudget", "memsvc")
    assert selected_by(budget["spec"]["selector"]["matchLabels"], docs) == [memsvc]


@pytest.mark.parametrize("workload", workloads(deployed()), ids=lambda w: w["metadata"]["name"])
def test_probe_ports_are_container_ports(workload: Doc) -> None:
    for container in containers(workload):
        ports = {p["name"] for p in container.get("ports", [])}
        ports |= {p["containerPort"] for p in container.get("ports", [])}
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind, {})
            for handler in ("grpc", "httpGet", "tcpSocket"):
                if handler in probe:
                    port = probe[handler]["port"]
                    assert port in ports, (container["name"], kind, port)


@pytest.mark.parametrize("workload", workloads(deployed()), ids=lambda w: w["metadata"]["name"])
def test_expansions_name_variables_of_the_container(workload: Doc) -> None:
    # Kubernetes leaves an undefined $(VAR) as it is: the program would get the literal text.
    for container in containers(workload):
        defined = env_names(container)
        for word in container.get("command", []) + container.get("args", []):
            for name in EXPANSION.findall(word):
                assert name in defined, f"{container['name']}: $({name}) is not in its env"


def test_every_config_map_key_is_passed_to_a_flag() -> None:
    memsvc = find(deployed(), "StatefulSet", "memsvc")
    expanded = {
        name
        for c in containers(memsvc)
        for word in c.get("args", [])
        for name in EXPANSION.findall(word)
    }
    for name, data in config_maps().items():
        assert set(data) <= expanded, f"{name} has keys no container reads: {set(data) - expanded}"


def container_env(workload: Doc, container: Doc) -> dict[str, str]:
    """The environment the kubelet gives the container of the workload's first pod,
    with the example secrets' placeholders for secret values."""
    secrets = example_secrets()
    pod_name = f"{workload['metadata']['name']}-0"
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= config_maps()[source["configMapRef"]["name"]]
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "fieldRef" in ref:
            assert ref["fieldRef"]["fieldPath"] == "metadata.name", ref
            env[var["name"]] = pod_name
        elif "secretKeyRef" in ref:
            env[var["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        else:
            env[var["name"]] = config_maps()[ref["configMapKeyRef"]["name"]][
                ref["configMapKeyRef"]["key"]
            ]
    return env


def parse_memsvc(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace:
    """memsvc's own parser on argv, with env as the process environment (flags
    default to some variables when the parser is built)."""
    for name in MEMSVC_ENV_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"memsvc rejects `{' '.join(argv)}`:\n{errors.getvalue()}")


def memsvc_argv(workload: Doc, container: Doc) -> tuple[list[str], dict[str, str]]:
    """The container's arguments to `memsvc`, $(VAR) expanded, and its environment."""
    env = container_env(workload, container)
    words = container["command"][1:] + container.get("args", [])
    return [EXPANSION.sub(lambda m: env[m.group(1)], word) for word in words], env


@pytest.mark.parametrize(
    ("workload", "container"),
    [
        pytest.param(w, c, id=f"{w['metadata']['name']}/{c['name']}")
        for w in workloads(deployed())
        for c in containers(w)
        if c["image"].startswith("ghcr.io/memsvc/")
    ],
)
def test_memsvc_accepts_the_container_arguments(
    workload: Doc, container: Doc, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert container["command"][0] == "memsvc"
    argv, env = memsvc_argv(workload, container)
    parse_memsvc(argv, env, monkeypatch)


def test_memsvc_serve_configuration_agrees_with_the_manifests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = deployed()
    memsvc = find(docs, "StatefulSet", "memsvc")
    pod = memsvc["spec"]["template"]
    [container] = pod["spec"]["containers"]
    argv, env = memsvc_argv(memsvc, container)
    args = parse_memsvc(argv, env, monkeypatch)
    assert args.command == "serve"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    pod_name = f"{memsvc['metadata']['name']}-0"
    assert args.node_id == pod_name
    assert args.address.rsplit(":", 1)[1] == str(ports["grpc"])
    # The advertised address is this pod's DNS name under the governing headless Service.
    dns = f"{pod_name}.{memsvc['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local"
    assert args.advertise_address == f"{dns}:{ports['grpc']}"

    assert args.metrics_port == ports["metrics"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    assert args.device == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args.shutdown_grace < pod["spec"]["terminationGracePeriodSeconds"]

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["name"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert str(args.data_dir) == mounts[claims["memsvc-data"]]
    shared = find(docs, "PersistentVolumeClaim", "memsvc-data")
    assert shared["spec"]["accessModes"] == ["ReadWriteMany"]

    assert args.database_url == example_secrets()["memsvc-db"]["url"]
    assert env["MEMSVC_ADMIN_KEY"] == example_secrets()["memsvc-admin"]["key"]
    for url in (args.redis_url, args.database_url):
        parts = urlsplit(url)
        service, namespace, *_ = parts.hostname.split(".")
        assert namespace == NAMESPACE, url
        assert parts.port in [p["port"] for p in find(docs, "Service", service)["spec"]["ports"]]
