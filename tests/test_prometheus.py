"""A restarted server: every check reports difference 0, and a real Prometheus (Debian's
`prometheus` package, which scripts/test.sh installs when run as root) scrapes the restart and
co-load values from its metrics endpoint. The deploy/ files, checked by promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import free_port, make_settings

from embedwarden.client import Client
from embedwarden.server import build_registry
from embedwarden.server._metrics import METRICS
from embedwarden.server.testing import ServerThread

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="needs Debian's prometheus package (scripts/test.sh installs it when run as root)",
)
SUFFIXES = ("", "_total", "_created", "_bucket", "_sum", "_count", "_info")
DEFAULT = build_registry().resolve("efficientnet_lite0")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The default model served twice from one data directory: the first server records the
    golden embeddings, the second (with a metrics endpoint) compares with them at load."""
    data = tmp_path_factory.mktemp("restart")
    first = ServerThread(make_settings(data, max_batch_size=4))
    first.start()
    try:
        results = first.app.monitor.results("efficientnet_lite0", "1")
        restart = next(o for o in results if o.check == "restart" and not o.layer)
        assert restart.passed and "golden record made now" in restart.detail
    finally:
        first.stop()
    second = ServerThread(make_settings(data, max_batch_size=4, metrics_port=0))
    second.start()
    yield second
    second.stop()


def test_a_restart_with_nothing_changed_reports_difference_0_everywhere(restarted):
    golden = list((restarted.app.settings.golden_dir).iterdir())
    assert [p.name for p in golden] == [f"efficientnet_lite0@1-{DEFAULT.fingerprint()[:16]}"]
    record = json.loads((golden[0] / "record.json").read_text())
    assert record["environment"]["torch"] and len(record["canaries"]) == 7
    with Client(restarted.address) as client:
        assert client.health("model:efficientnet_lite0@1") == "SERVING"
        report = client.check_consistency("efficientnet_lite0")
    assert report.passed
    assert {r.check for r in report.results} == {
        "weights",
        "training_mode",
        "preprocess",
        "restart",
        "coload",
        "batch",
        "flags",
    }
    for r in report.results:
        if r.check == "batch":
            # Rounding only: oneDNN blocks a batch of 4 differently from a batch of 1. The row
            # carries no scale: measured 9.5e-7 (AVX-512) .. 1.9e-6 (AVX2) on logits up to 16
            # (1.2e-7 relative), 50x below the manifest's tolerance_abs (1e-4).
            assert r.max_abs_diff < r.tolerance_abs, (r.layer, r.max_abs_diff)
        else:
            assert (r.max_abs_diff, r.min_cosine) == (0.0, 1.0), (r.check, r.layer, r)
            assert r.tolerance_abs == 0.0  # exact: the environment is the recorded one
    restart = [r for r in report.results if r.check == "restart"]
    assert len(restart) == len(DEFAULT.layers) + 1
    assert "vs the golden record" in restart[0].detail
    assert "environment as recorded" in restart[0].detail


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_prometheus
def test_alert_rules_and_scrape_config_pass_promtool():
    rules = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 10 rules found" in rules.stdout
    config = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    unit = promtool("test", "rules", str(DEPLOY / "alerts_test.yml"))  # alerts fire as meant
    assert unit.returncode == 0, unit.stdout + unit.stderr


def exported_names() -> set[str]:
    names = set()
    for family in METRICS.registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES)
    return names


def test_dashboard_and_alerts_use_only_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana" / "embedwarden.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 30
    text = "\n".join(exprs) + (DEPLOY / "alerts.yml").read_text()
    used = set(re.findall(r"\b((?:embedwarden|process)_[a-z0-9_]+)", text))
    assert {
        "embedwarden_consistency_check_passed",
        "embedwarden_consistency_max_abs_diff",
        "embedwarden_weight_mutations_total",
        "embedwarden_cache_audit_total",
        "embedwarden_model_serving",
    } <= used
    assert used - exported_names() == set()
    for panel in dashboard["panels"]:  # panels tile the 24-column grid without overlaps
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


@needs_prometheus
def test_prometheus_scrapes_restart_and_coload_checks_of_the_default_model(
    restarted, tmp_path, photos
):
    server = restarted
    prometheus = None
    images = [photos["chelsea"], photos["coffee"]]
    with Client(server.address, timeout=120) as client:  # two pipelines verified, for the scrape
        vectors = client.extract(images, "efficientnet_lite0").array
        assert client.verify(images, vectors, "efficientnet_lite0", pipeline="exact").passed
        wrong = np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32)
        report = client.verify(images, wrong, "efficientnet_lite0", pipeline="broken-export")
        assert report.failed == 2
    try:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {DEPLOY / 'alerts.yml'}\n"
            "scrape_configs:\n  - job_name: embedwarden\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{server.app.metrics_port}']\n"
        )
        port = free_port()
        assert PROMETHEUS is not None
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        expr = (
            'embedwarden_consistency_max_abs_diff{job="embedwarden", '
            'model="efficientnet_lite0", version="1", layer="", check=~"restart|coload"}'
        )
        deadline = time.monotonic() + 90
        found: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            assert prometheus.poll() is None, prometheus.stderr.read() if prometheus.stderr else ""
            try:
                found = query(port, expr)
            except OSError:  # not listening yet
                found = []
            if len(found) == 2:
                break
            time.sleep(0.5)
        assert sorted(r["metric"]["check"] for r in found) == ["coload", "restart"]
        assert all(r["value"][1] == "0" for r in found)  # nothing changed: difference 0
        passed = query(
            port,
            'embedwarden_consistency_check_passed{model="efficientnet_lite0", layer="", '
            'check=~"restart|coload"}',
        )
        assert [r["value"][1] for r in passed] == ["1", "1"]
        layers = query(
            port,
            'count(embedwarden_consistency_max_abs_diff{model="efficientnet_lite0", '
            'check="restart", layer!=""} == 0)',
        )
        assert layers[0]["value"][1] == "19"  # every catalogued layer, difference 0
        assert query(port, "embedwarden_process_flags_info")[0]["metric"]["torch"]
        verified = {
            (r["metric"]["pipeline"], r["metric"]["verdict"]): r["value"][1]
            for r in query(port, 'embedwarden_verify_items_total{pipeline=~"exact|broken-export"}')
        }
        assert verified == {("exact", "pass"): "2", ("broken-export", "fail"): "2"}
        diagnosed = query(port, 'embedwarden_verify_diagnosis_total{pipeline="broken-export"}')
        assert [(r["metric"]["mistake"], r["value"][1]) for r in diagnosed] == [("unknown", "2")]
        lowest = query(port, 'embedwarden_verify_min_cosine{pipeline=~"exact|broken-export"}')
        assert {r["metric"]["pipeline"]: float(r["value"][1]) < 0.5 for r in lowest} == {
            "exact": False,
            "broken-export": True,
        }
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as r:
            groups = json.loads(r.read())["data"]["groups"]
        assert {g["name"] for g in groups} == {
            "embedwarden-consistency",
            "embedwarden-service",
            "embedwarden-storage",
            "embedwarden-verify",
        }
        assert all(rule["health"] != "err" for g in groups for rule in g["rules"])
    finally:
        if prometheus is not None:
            prometheus.terminate()
            try:
                prometheus.wait(10)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait()
            if prometheus.stderr:
                prometheus.stderr.close()
