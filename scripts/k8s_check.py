"""Offline checks of deploy/k8s: render, validate against Kubernetes' schemas, project check.

No cluster can run on the machines this project is built on, so CI checks what can be checked
without one:
1. render: the subset of kustomize that deploy/k8s uses (`resources` files and folders,
   `namespace`, `images`); any other kustomization key is refused rather than ignored.
   Where `kubectl` is installed, tests/test_k8s.py also compares this with `kubectl kustomize`.
2. schemas: every rendered object against the stated Kubernetes version with PyPI
   `kubernetes-validate --strict` (wrong types, unknown fields, missing required fields).
3. project check, for what schemas cannot see: selectors that match the pod templates, the
   server's own flag parser and security policy on the container's args, probes that call the
   plaintext health port with a health name the server registers, a pinned fingerprint that is
   the registry's and the pods' label, an HPA metric and adapter series the server exports.

    python scripts/k8s_check.py [DIR] [--kubernetes-version 1.33.0]   # exit 1 on any problem
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "deploy" / "k8s"
ADAPTER_CONFIG = "prometheus-adapter/config.yaml"
KUBERNETES_VERSION = "1.33.0"
APP = "embedwarden"  # app.kubernetes.io/name of the server's pods
SERVER_CONTAINER = "server"
FINGERPRINT_LABEL = "embedwarden.io/fingerprint"
# Labels Prometheus adds when it discovers pods; the adapter maps them to resources.
DISCOVERY_LABELS = {"namespace", "pod"}

Obj = dict[str, Any]

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images"}
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}
_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}


class RenderError(Exception):
    """The kustomization uses something this renderer does not implement, or is broken."""


# --- 1. render ---------------------------------------------------------------------------------


def _load_documents(path: Path) -> list[Obj]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError as exc:
        raise RenderError(f"{path}: {exc}") from None
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return docs


def render(folder: Path) -> list[Obj]:
    """The objects `kubectl kustomize folder` builds, for the subset of kustomize used here."""
    spec_path = folder / "kustomization.yaml"
    if not spec_path.is_file():
        raise RenderError(f"{folder}: no kustomization.yaml")
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(spec) - _KUSTOMIZATION_KEYS)
    if unknown:
        raise RenderError(f"{spec_path}: unsupported kustomization keys {unknown}")
    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            objects += render(path)
        elif path.is_file():
            objects += _load_documents(path)
        else:
            raise RenderError(f"{spec_path}: resource {entry!r} does not exist")
    objects = [copy.deepcopy(o) for o in objects]
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in _CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for container in containers(objects):
            name, tag = _split_image(container.get("image", ""))
            if name == image["name"]:
                new_name = image.get("newName", name)
                new_tag = image.get("newTag", tag)
                container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        if key in seen:
            raise RenderError(f"{folder}: {key[0]}/{key[2]} is defined twice")
        seen.add(key)
    return objects


def _split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in _WORKLOADS:
        spec: Obj = obj["spec"]["template"]["spec"]
        return spec
    if obj["kind"] == "Pod":
        pod: Obj = obj["spec"]
        return pod
    return None


def containers(objects: list[Obj]) -> Iterator[Obj]:
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None:
            yield from spec.get("initContainers", [])
            yield from spec.get("containers", [])


def identity(obj: Obj) -> tuple[str, str, str]:
    meta = obj.get("metadata", {})
    return obj["kind"], meta.get("namespace", ""), meta.get("name", "")


# --- 2. schemas --------------------------------------------------------------------------------


def validate_schemas(objects: list[Obj], version: str = KUBERNETES_VERSION) -> list[str]:
    import kubernetes_validate

    problems = []
    for obj in objects:
        kind, _, name = identity(obj)
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{kind}/{name}: {exc.message} (at {'.'.join(map(str, exc.path))})")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError):
            problems.append(f"{kind}/{name}: no schema for {obj.get('apiVersion')} in {version}")
    return problems


# --- 3. project check --------------------------------------------------------------------------


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _template_labels(obj: Obj) -> dict[str, str]:
    labels: dict[str, str] = obj["spec"]["template"].get("metadata", {}).get("labels", {})
    return labels


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the server exports, with its label names."""
    from prometheus_client import Counter

    from embedwarden.server._metrics import METRICS

    out: dict[str, set[str]] = {}
    for value in vars(METRICS).values():
        name = getattr(value, "_name", None)
        if name is None:
            continue
        labels = set(getattr(value, "_labelnames", ()))
        out[f"{name}_total" if isinstance(value, Counter) else name] = labels
    return out


def _series_selector(query: str) -> tuple[str, set[str]]:
    """'name{a!="",b="x"}' -> ('name', {'a', 'b'})."""
    match = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*", query)
    if not match:
        raise RenderError(f"cannot read the series query {query!r}")
    labels = {
        m.group(1)
        for m in re.finditer(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", match[2] or "")
    }
    return match[1], labels


def _check_server_container(obj: Obj, container: Obj) -> list[str]:
    """The container's args through the server's own parser, policy, registry and health
    names; the probes against its plaintext health port."""
    from embedwarden.server import build_registry
    from embedwarden.server._app import LIVE_NAME, model_health_name
    from embedwarden.server._errors import EmbedwardenError
    from embedwarden.server._settings import parse
    from embedwarden.server.rpc import check_policy
    from embedwarden.server.serving._manager import parse_pins

    where = f"{obj['kind']}/{obj['metadata']['name']} container {container['name']}"
    problems: list[str] = []
    args = [str(a) for a in container.get("args", [])]
    try:
        settings = parse(args, env={})
    except SystemExit:
        return [f"{where}: `embedwarden serve` refuses its args {args}"]
    registry = build_registry(settings.models_dirs)
    try:
        check_policy(settings)
        pins = parse_pins(settings.require_fingerprints, registry)
        served = [registry.resolve_ref(ref) for ref in settings.models]
    except EmbedwardenError as exc:
        return [f"{where}: the server would refuse to start: {exc}"]
    if settings.insecure:
        problems.append(f"{where}: --insecure: serve TLS and tokens from Secrets instead")
    health_names = {LIVE_NAME, *(model_health_name(m) for m in served)}
    label = _template_labels(obj).get(FINGERPRINT_LABEL)
    for manifest in served:
        pinned = pins.get((manifest.name, manifest.version))
        if pinned is None:
            problems.append(f"{where}: {manifest.ref} is served without --require-fingerprint")
        elif pinned != manifest.fingerprint():
            problems.append(
                f"{where}: every replica would refuse to load: {manifest.ref} has fingerprint "
                f"{manifest.fingerprint()} in this build, --require-fingerprint pins {pinned}"
            )
        elif label != pinned[:16]:
            problems.append(
                f"{where}: pod label {FINGERPRINT_LABEL}={label} is not the pinned {pinned[:16]}"
            )
    mounts = [Path(m["mountPath"]) for m in container.get("volumeMounts", [])]
    for flag, path in (
        ("--tls-cert", settings.tls_cert),
        ("--tls-key", settings.tls_key),
        ("--tokens-file", settings.tokens_file),
    ):
        if path is not None and not any(path.is_relative_to(m) for m in mounts):
            problems.append(f"{where}: {flag} {path} is not under any volume mount (a Secret)")
    ports = {p["containerPort"] for p in container.get("ports", [])}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            problems.append(f"{where}: no {kind}")
            continue
        grpc_probe = probe.get("grpc")
        if grpc_probe is None:
            problems.append(f"{where}: {kind} is not a native gRPC health probe")
            continue
        if grpc_probe["port"] != settings.health_port or settings.health_port not in ports:
            problems.append(
                f"{where}: {kind} calls port {grpc_probe['port']}, not the plaintext "
                f"--health-port {settings.health_port} (kubelet gRPC probes cannot use TLS)"
            )
        service = grpc_probe.get("service", "")
        if service not in health_names:
            problems.append(
                f"{where}: {kind} asks for health name {service!r}; the server registers "
                f"{sorted(health_names)}"
            )
    readiness = container.get("readinessProbe", {}).get("grpc", {}).get("service")
    if readiness is not None and not readiness.startswith("model:"):
        problems.append(f"{where}: readiness must name the model (model:NAME@VERSION)")
    for kind in ("startupProbe", "livenessProbe"):
        if container.get(kind, {}).get("grpc", {}).get("service") != LIVE_NAME:
            problems.append(
                f"{where}: {kind} must ask for {LIVE_NAME!r}: a model that fails a consistency "
                "check is drained (not ready), not restarted"
            )
    return problems


def project_check(objects: list[Obj], adapter_rules: list[Obj] | None = None) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, list[Obj]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    workloads = [o for o in objects if o["kind"] in _WORKLOADS]
    templates = [_template_labels(o) for o in workloads]

    for obj in workloads:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        selector = obj["spec"].get("selector", {}).get("matchLabels", {})
        if not _matches(selector, _template_labels(obj)):
            problems.append(f"{name}: selector {selector} does not match its pod template labels")
        if obj["kind"] == "StatefulSet":
            service = obj["spec"].get("serviceName")
            if service not in {s["metadata"]["name"] for s in by_kind.get("Service", [])}:
                problems.append(f"{name}: serviceName {service!r} is not a Service here")
            for claim in obj["spec"].get("volumeClaimTemplates", []):
                mounted = {
                    m["name"]
                    for c in pod_spec(obj)["containers"]
                    for m in c.get("volumeMounts", [])
                }
                if claim["metadata"]["name"] not in mounted:
                    problems.append(f"{name}: claim {claim['metadata']['name']} is never mounted")
        if _template_labels(obj).get("app.kubernetes.io/name") == APP:
            for container in pod_spec(obj)["containers"]:
                if container["name"] == SERVER_CONTAINER:
                    problems += _check_server_container(obj, container)
                    break
            else:
                problems.append(f"{name}: no container named {SERVER_CONTAINER!r}")

    for obj in by_kind.get("Service", []):
        selector = obj["spec"].get("selector", {})
        if not any(_matches(selector, t) for t in templates):
            problems.append(
                f"Service/{obj['metadata']['name']}: selector {selector} matches no pods"
            )
        if FINGERPRINT_LABEL not in selector:
            problems.append(
                f"Service/{obj['metadata']['name']}: selects no {FINGERPRINT_LABEL}: it could "
                "mix model versions"
            )
    for obj in by_kind.get("PodDisruptionBudget", []):
        selector = obj["spec"].get("selector", {}).get("matchLabels", {})
        if not any(_matches(selector, t) for t in templates):
            name = f"PodDisruptionBudget/{obj['metadata']['name']}"
            problems.append(f"{name}: selector {selector} matches no pods")

    exported = exported_metrics()
    rules = adapter_rules or []
    served_by_adapter: dict[str, str] = {}
    for i, rule in enumerate(rules):
        try:
            series, labels = _series_selector(rule["seriesQuery"])
        except (KeyError, RenderError) as exc:
            problems.append(f"adapter rule {i}: {exc}")
            continue
        if series not in exported:
            problems.append(f"adapter rule {i}: the server exports no series {series!r}")
            continue
        unknown = labels - exported[series] - DISCOVERY_LABELS
        if unknown:
            problems.append(f"adapter rule {i}: {series} has no labels {sorted(unknown)}")
        overrides = set(rule.get("resources", {}).get("overrides", {}))
        if not overrides >= DISCOVERY_LABELS:
            problems.append(
                f"adapter rule {i}: map the labels {sorted(DISCOVERY_LABELS)} to resources"
            )
        served_by_adapter[rule.get("name", {}).get("as", series)] = series
    targets = {(o["kind"], o["metadata"]["name"]) for o in workloads}
    for obj in by_kind.get("HorizontalPodAutoscaler", []):
        name = f"HorizontalPodAutoscaler/{obj['metadata']['name']}"
        ref = obj["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in targets:
            problems.append(f"{name}: scales {ref['kind']}/{ref['name']}, which is not here")
        for metric in obj["spec"].get("metrics", []):
            if metric["type"] != "Pods":
                continue
            metric_name = metric["pods"]["metric"]["name"]
            series = served_by_adapter.get(metric_name)
            if series is None:
                problems.append(f"{name}: no prometheus-adapter rule serves {metric_name!r}")
                continue
            keys = set(metric["pods"]["metric"].get("selector", {}).get("matchLabels", {}))
            if keys - exported[series]:
                problems.append(
                    f"{name}: {metric_name} has no labels {sorted(keys - exported[series])}"
                )
    return problems


def check_dockerfile(path: Path, objects: list[Obj]) -> list[str]:
    """The image the manifests run: entry point, user, ports and shipped golden records agree
    with the pod spec (the image itself cannot be built here: no base image can be pulled)."""
    import json

    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.split(maxsplit=1) for line in text.splitlines() if line.strip()]
    final = [x for x in lines if x[0] != "#"]
    stage = max(i for i, x in enumerate(final) if x[0] == "FROM")
    last = {x[0]: x[1] if len(x) > 1 else "" for x in final[stage:]}
    problems = []
    if json.loads(last.get("ENTRYPOINT", "[]")) != ["embedwarden", "serve"]:
        problems.append(f'{path.name}: ENTRYPOINT must be ["embedwarden", "serve"]')
    exposed = {int(p) for p in last.get("EXPOSE", "").split()}
    user = last.get("USER", "").split(":")[0]
    copies = [x[1].split()[-1].rstrip("/") for x in final[stage:] if x[0] == "COPY"]
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None or _template_labels(obj).get("app.kubernetes.io/name") != APP:
            continue
        uid = spec.get("securityContext", {}).get("runAsUser")
        if uid is not None and str(uid) != user:
            problems.append(f"{path.name}: USER {user or '(root)'} but the pods run as {uid}")
        for container in spec["containers"]:
            ports = {p["containerPort"] for p in container.get("ports", [])}
            if ports - exposed:
                problems.append(f"{path.name}: EXPOSE lacks {sorted(ports - exposed)}")
            for arg in container.get("args", []):
                if str(arg).startswith("--golden-dir=") and arg.split("=", 1)[1] not in copies:
                    problems.append(f"{path.name}: nothing is copied to {arg.split('=', 1)[1]}")
    return problems


def check(folder: Path = DEFAULT_DIR, version: str = KUBERNETES_VERSION) -> list[str]:
    """Every problem found in the rendered kustomization at `folder` (empty: all good)."""
    try:
        objects = render(folder)
    except RenderError as exc:
        return [f"render: {exc}"]
    adapter = folder / ADAPTER_CONFIG
    rules = (
        yaml.safe_load(adapter.read_text(encoding="utf-8"))["rules"] if adapter.is_file() else []
    )
    problems = validate_schemas(objects, version) + project_check(objects, rules)
    dockerfile = folder / "Dockerfile"
    return problems + (check_dockerfile(dockerfile, objects) if dockerfile.is_file() else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args(argv)
    problems = check(args.folder, args.kubernetes_version)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.folder}: renders, valid for Kubernetes {args.kubernetes_version}, checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
