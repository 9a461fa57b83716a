"""deploy/k8s offline: it renders, passes kubernetes-validate --strict and the project check, and
broken copies fail them; the probe contract (plaintext health port, `live`) on a real server."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from helpers import make_settings

from embedwarden.client import Client, EmbedwardenError
from embedwarden.server import build_registry
from embedwarden.server._metrics import METRICS
from embedwarden.server.testing import ServerThread

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
_spec = importlib.util.spec_from_file_location("k8s_check", ROOT / "scripts" / "k8s_check.py")
assert _spec is not None and _spec.loader is not None
k8s_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(k8s_check)

FINGERPRINT = build_registry().resolve("efficientnet_lite0", "1").fingerprint()


def test_the_manifests_render_validate_and_pass_the_project_check():
    objects = k8s_check.render(K8S)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "HorizontalPodAutoscaler",
        "Namespace",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]
    assert k8s_check.check(K8S) == []


def test_the_pinned_fingerprint_is_the_registry_one():
    (statefulset,) = [o for o in k8s_check.render(K8S) if o["kind"] == "StatefulSet"]
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--require-fingerprint=efficientnet_lite0@1={FINGERPRINT}" in args
    assert statefulset["metadata"]["name"] == f"embedwarden-{FINGERPRINT[:16]}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_renderer_agrees_with_kubectl_kustomize():
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    theirs = sorted(yaml.safe_load_all(out.stdout), key=k8s_check.identity)
    ours = sorted(k8s_check.render(K8S), key=k8s_check.identity)
    assert ours == theirs


BROKEN = [
    (  # the client Service selects a fingerprint no StatefulSet has
        "service.yaml",
        "embedwarden.io/fingerprint: afb24615fc6100d8",
        "embedwarden.io/fingerprint: 0000000000000000",
        "matches no pods",
    ),
    ("blue/statefulset.yaml", "  podManagementPolicy:", "  podManagmentPolicy:", "podManagment"),
    ("blue/statefulset.yaml", "periodSeconds: 5", "periodSeconds: five", "'five' is not of type"),
    (
        "blue/statefulset.yaml",
        "service: model:efficientnet_lite0@1",
        "service: model:efficientnet_lite0@2",
        "health name 'model:efficientnet_lite0@2'",
    ),
    ("blue/statefulset.yaml", "- --health-port=8081", "- --health-port=8082", "--health-port 8082"),
    ("blue/statefulset.yaml", "- --tokens-file=/etc/embedwarden/tokens/tokens.toml", "", "refuse"),
    ("blue/statefulset.yaml", "- --port=50051", "- --portt=50051", "refuses its args"),
    (
        "blue/statefulset.yaml",
        f"efficientnet_lite0@1={FINGERPRINT}",
        f"efficientnet_lite0@1={'0' * 64}",
        "has fingerprint",
    ),
    ("blue/pdb.yaml", "app.kubernetes.io/name: embedwarden", "app: embedwarden", "matches no pods"),
    ("blue/hpa.yaml", "name: embedwarden_queue_depth", "name: embedwarden_queue_len", "no prom"),
    ("blue/hpa.yaml", "fingerprint: afb24615fc6100d8", "fp: afb24615fc6100d8", "no labels ['fp']"),
    (
        "prometheus-adapter/config.yaml",
        "seriesQuery: 'embedwarden_queue_depth{",
        "seriesQuery: 'embedwarden_queue_size{",
        "exports no series 'embedwarden_queue_size'",
    ),
    ("kustomization.yaml", "namespace: embedwarden", "namePrefix: x-", "unsupported"),
    ("Dockerfile", "USER 10001:10001", "USER 0", "USER 0 but the pods run as 10001"),
    ("Dockerfile", "EXPOSE 50051 8081 9464", "EXPOSE 50051 9464", "EXPOSE lacks [8081]"),
    ("Dockerfile", " /opt/embedwarden/golden/", " /golden/", "nothing is copied to /opt"),
]


@pytest.mark.parametrize(("path", "old", "new", "expected"), BROKEN)
def test_a_broken_copy_fails(tmp_path, path, old, new, expected):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    target = copy / path
    text = target.read_text()
    assert old in text, old
    text = text.replace(old, new)
    target.write_text(text)
    problems = k8s_check.check(copy)
    assert any(expected in p for p in problems), problems
    assert k8s_check.main([str(copy)]) == 1


def test_liveness_on_the_model_name_fails_the_check(tmp_path):
    """A liveness probe on the model's readiness would crash-loop a replica that failed a
    consistency check instead of draining it."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    target = copy / "blue" / "statefulset.yaml"
    probe = "          livenessProbe:\n            grpc:\n              port: 8081\n"
    text = target.read_text()
    assert probe + "              service: live\n" in text
    target.write_text(
        text.replace(
            probe + "              service: live\n",
            probe + "              service: model:efficientnet_lite0@1\n",
        )
    )
    problems = k8s_check.check(copy)
    assert any("livenessProbe must ask for 'live'" in p for p in problems), problems


# --- the probe contract on a real server -------------------------------------------------------


def test_health_port_answers_health_only_and_live_stays_serving_for_a_drained_model(tmp_path):
    """A model that may not serve (here: pinned to another fingerprint) is not ready, but the
    process is alive: liveness must not restart it. The health port serves nothing else."""
    settings = make_settings(
        tmp_path,
        models=("efficientnet_lite0@1",),
        require_fingerprints=(f"efficientnet_lite0@1={'0' * 64}",),
        health_port=0,
    )
    with ServerThread(settings) as thread:
        assert thread.app.health_port not in (0, thread.app.port)
        with Client(f"127.0.0.1:{thread.app.health_port}") as health:
            assert health.health("live") == "SERVING"
            assert health.health("model:efficientnet_lite0@1") == "NOT_SERVING"
            assert health.health("") == "NOT_SERVING"
            with pytest.raises(EmbedwardenError) as caught:
                health.list_models()
            assert caught.value.code is grpc.StatusCode.UNIMPLEMENTED


def test_queue_depth_carries_the_fingerprint_label_the_hpa_selects(client, photos):
    client.extract([photos["chelsea"]], "efficientnet_lite0", cache="off")
    labels = {"model": "efficientnet_lite0", "version": "1", "fingerprint": FINGERPRINT[:16]}
    assert METRICS.sample("embedwarden_queue_depth", labels) == 0.0  # idle again
    # Verify's background diagnosis waits in a gauge of its own, which the HPA does not read.
    background = {"model": "efficientnet_lite0", "version": "1"}
    assert METRICS.sample("embedwarden_background_queue_depth", background) == 0.0
