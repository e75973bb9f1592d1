"""deploy/k8s/ is valid Kubernetes (every document against the API's own schema, offline, with
kubernetes-validate) and says what docs/deploy.md says it does: the flags are nextword's, the probes ask the
health service on the gRPC port, termination waits longer than the drain, the init container fills the cache
the server reads, and the Services and the PodDisruptionBudget select the Deployment's pods."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from nextword.client.cli import build_parser

ROOT = Path(__file__).parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.30.0"  # gRPC probes are stable from 1.27
SERVICE = "nextword.v1.Inference"


def documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d["kind"] == kind]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_matches_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # strict: an unknown or misspelt field fails


def test_schema_validation_catches_a_wrong_field():
    """The validation above is not vacuous: a probe field of the wrong type fails it."""
    doc = by_kind("Deployment")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_deployment_runs_nextword_as_documented():
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    (pull,) = pod["initContainers"]
    parser = build_parser()
    serve = parser.parse_args([*server["command"][1:], *server["args"]])  # fails on a flag nextword lacks
    assert serve.command == "serve" and parser.parse_args(pull["command"][1:]).command == "pull"
    assert pod["terminationGracePeriodSeconds"] > serve.grace  # the drain finishes before the SIGKILL
    grpc_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    assert serve.port == grpc_port and serve.host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == grpc_port
    assert server["readinessProbe"]["grpc"]["service"] == SERVICE  # what the clients' health checks watch
    liveness = server["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > pod["terminationGracePeriodSeconds"]
    # the init container writes the cache where the server reads it: same volume, same $HOME
    env = {c["name"]: {e["name"]: e.get("value") for e in c.get("env", [])} for c in (server, pull)}
    assert env["nextword"]["HOME"] == env["pull"]["HOME"]
    mounts = [{m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (server, pull)]
    assert mounts[0]["cache"] == mounts[1]["cache"] == env["pull"]["HOME"] + "/.cache/nextword"
    assert "NEXTWORD_REPLICA_NAME" in env["nextword"]  # each pod names itself (x-nextword-replica)


def test_services_and_budget_select_the_pods():
    (deployment,) = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind("Service")}
    assert services["nextword-headless"]["clusterIP"] == "None"  # DNS returns every ready pod
    assert "clusterIP" not in services["nextword"]  # one virtual IP, for proxies and tools
    for spec in services.values():
        assert spec["selector"].items() <= labels.items()
        assert [p["targetPort"] for p in spec["ports"]] == ["grpc"]
    (budget,) = by_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
