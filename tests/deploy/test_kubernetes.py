"""deploy/kubernetes parses, and agrees with the app: ports, probe paths, environment names, the metric the
autoscaler follows, and the names that tie the objects together."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
AWS_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_PROFILE"}


def _documents() -> dict[str, dict]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "kind" in doc and doc.get("apiVersion") != "kustomize.config.k8s.io/v1beta1":
                docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return _documents()


@pytest.fixture(scope="module")
def container(docs) -> dict:
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _app_paths() -> set[str]:
    from server.api.app import create_app

    schema = create_app(Settings(model="random-demo")).openapi()
    return {path for path, methods in schema["paths"].items() if "get" in methods}


def test_every_file_parses_and_kustomize_lists_them(docs):
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (DEPLOY / name).is_file(), name
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret"} <= set(docs)


@pytest.mark.slow  # a live server
def test_probes_use_the_real_endpoints_on_the_served_port(container):
    env = {e["name"]: e.get("value") for e in container["env"]}
    (port,) = container["ports"]
    assert port["containerPort"] == int(env.get("PROMPTSWAP_PORT", Settings.model_fields["port"].default))
    assert env["PROMPTSWAP_HOST"] == "0.0.0.0"  # reachable from the kubelet and the Service
    paths = _app_paths()
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    for kind, probe in probes.items():
        assert probe["path"] in paths, f"{kind}: {probe['path']} is not an endpoint"
        assert probe["port"] in (port["name"], port["containerPort"])
    assert probes["livenessProbe"]["path"] == "/health" and probes["readinessProbe"]["path"] == "/ready"


def test_environment_names_are_settings_the_app_reads(docs, container):
    secret_keys = set(docs["Secret"]["stringData"])
    named = {e["name"] for e in container["env"]} | secret_keys
    fields = {f"PROMPTSWAP_{name.upper()}" for name in Settings.model_fields}
    for name in named:
        assert name in fields or name in AWS_VARIABLES, f"{name} is read by nothing"
    (source,) = container["envFrom"]
    assert source["secretRef"]["name"] == docs["Secret"]["metadata"]["name"]
    assert {"PROMPTSWAP_PROMPT_STORE", "PROMPTSWAP_ADMIN_TOKEN"} <= secret_keys
    # The image sets a local prompt directory; the Deployment unsets it, since giving both is refused.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env.get("PROMPTSWAP_PROMPT_DIR") == ""
    Settings(prompt_dir=None, prompt_store=docs["Secret"]["stringData"]["PROMPTSWAP_PROMPT_STORE"])


def test_the_grace_period_outlasts_the_drain(docs, container):
    spec = docs["Deployment"]["spec"]["template"]["spec"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    assert spec["terminationGracePeriodSeconds"] > pause + Settings.model_fields["shutdown_timeout_s"].default


def test_service_and_autoscaler_point_at_the_deployment(docs, container):
    deployment = docs["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= {p["name"] for p in container["ports"]}
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_the_autoscaler_metric_is_one_the_app_exports():
    from server.api.metrics import Metrics
    from server.engine.loop import EngineStats

    hpa = _documents()["HorizontalPodAutoscaler"]["spec"]
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    stats = EngineStats(**{f: 0 for f in EngineStats.__dataclass_fields__})
    exported, _ = Metrics(engine_stats=lambda: stats, prompt_count=lambda: 0).render(None)
    assert f"\n{name} " in exported.decode() or exported.decode().startswith(f"{name} ")
    rules = yaml.safe_load((DEPLOY / "prometheus-adapter-rules.yaml").read_text())
    assert any(rule["name"]["as"] == name for rule in rules["rules"]["custom"])
