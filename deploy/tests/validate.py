#!/usr/bin/env python3
"""Offline checks of everything that ships beside the binary.

- deploy/: rendered with `kubectl kustomize` (what `kubectl apply -k` applies), every
  object validated against the Kubernetes JSON schemas (kubernetes-validate, strict);
  the DaemonSet's sidecar config is an identical copy of otel-config/sidecar.yaml.
- otel-config/: every Collector file parses, and every pipeline names only receivers,
  processors and exporters (and the service only extensions) defined in that file.
- docker-compose.yml: `docker-compose config -q` (or `docker compose config -q`).
- The Grafana dashboard parses and uses only provisioned data sources.

Exits non-zero with one line per problem. Usage: validate.py [REPO_ROOT]
"""

import json
import pathlib
import shutil
import subprocess
import sys

import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.31.0"


def render_kustomization(root, problems):
    try:
        out = subprocess.run(
            ["kubectl", "kustomize", str(root / "deploy")],
            check=True, capture_output=True, text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        problems.append(f"deploy: kubectl kustomize failed: {getattr(e, 'stderr', e)}".strip())
        return []
    return [doc for doc in yaml.safe_load_all(out) if doc]


def check_manifests(root, problems):
    objects = render_kustomization(root, problems)
    kinds = sorted(o.get("kind", "?") for o in objects)
    for wanted in ["ConfigMap", "DaemonSet", "Namespace", "Secret", "ServiceAccount"]:
        if wanted not in kinds:
            problems.append(f"deploy: the rendered kustomization has no {wanted}")
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            problems.append(f"deploy: {name}: {path}: {e.message}")
        except Exception as e:  # an unknown kind or version is a problem too
            problems.append(f"deploy: {name}: {e}")
    return objects


def check_daemonset(objects, problems):
    for ds in (o for o in objects if o.get("kind") == "DaemonSet"):
        containers = {c["name"]: c for c in ds["spec"]["template"]["spec"]["containers"]}
        collector = containers.get("collector")
        if collector is None:
            problems.append("deploy: the DaemonSet has no collector container")
            continue
        sc = collector.get("securityContext", {})
        if sc.get("privileged"):
            problems.append("deploy: the collector must not be privileged")
        if sorted(sc.get("capabilities", {}).get("add", [])) != ["BPF", "PERFMON"]:
            problems.append("deploy: the collector adds capabilities beyond BPF and PERFMON")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append("deploy: the collector must drop ALL capabilities first")
        if not sc.get("readOnlyRootFilesystem"):
            problems.append("deploy: the collector's root filesystem must be read-only")
        for mount in collector.get("volumeMounts", []):
            if not mount.get("readOnly"):
                problems.append(f"deploy: mount {mount['mountPath']} must be read-only")
        for probe in ["livenessProbe", "readinessProbe"]:
            if probe not in collector:
                problems.append(f"deploy: the collector has no {probe}")
        env = {e["name"]: e for e in collector.get("env", [])}
        if env.get("K8S_NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
            problems.append("deploy: K8S_NODE_NAME must come from spec.nodeName")
        if "otel-sidecar" not in containers:
            problems.append("deploy: the DaemonSet has no otel-sidecar container")


def check_collector_config(path, problems):
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        problems.append(f"{path}: does not parse: {e}")
        return
    defined = {kind: set((config.get(kind) or {}).keys())
               for kind in ["receivers", "processors", "exporters", "extensions"]}
    service = config.get("service") or {}
    for extension in service.get("extensions", []):
        if extension not in defined["extensions"]:
            problems.append(f"{path}: service uses undefined extension {extension!r}")
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        problems.append(f"{path}: no pipelines")
    for name, pipeline in pipelines.items():
        for kind in ["receivers", "processors", "exporters"]:
            for component in pipeline.get(kind, []):
                if component not in defined[kind]:
                    problems.append(f"{path}: pipeline {name} uses undefined {kind[:-1]} {component!r}")
        for kind in ["receivers", "exporters"]:
            if not pipeline.get(kind):
                problems.append(f"{path}: pipeline {name} has no {kind}")


def check_compose(root, problems):
    compose = shutil.which("docker-compose")
    command = [compose] if compose else ["docker", "compose"]
    result = subprocess.run(command + ["-f", str(root / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        problems.append(f"docker-compose.yml: {result.stderr.strip()}")


def check_dashboards(root, problems):
    demo = root / "otel-config" / "demo" / "grafana"
    sources = yaml.safe_load((demo / "provisioning" / "datasources" / "datasources.yaml").read_text())
    uids = {d["uid"] for d in sources["datasources"]}
    for path in sorted((demo / "dashboards").glob("*.json")):
        try:
            dashboard = json.loads(path.read_text())
        except ValueError as e:
            problems.append(f"{path}: does not parse: {e}")
            continue
        for panel in dashboard.get("panels", []):
            for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
                if ds and ds.get("uid") not in uids:
                    problems.append(f"{path}: panel {panel.get('title')!r} uses unprovisioned data source {ds.get('uid')!r}")


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[2])
    problems = []
    objects = check_manifests(root, problems)
    check_daemonset(objects, problems)
    for path in sorted((root / "otel-config").glob("*.yaml")) + [root / "deploy" / "otel-sidecar.yaml"]:
        check_collector_config(path, problems)
    if (root / "deploy" / "otel-sidecar.yaml").read_text() != (root / "otel-config" / "sidecar.yaml").read_text():
        problems.append("deploy/otel-sidecar.yaml differs from otel-config/sidecar.yaml")
    check_compose(root, problems)
    check_dashboards(root, problems)
    for problem in problems:
        print(f"validate: {problem}", file=sys.stderr)
    print(f"validate: {len(objects)} Kubernetes objects, "
          f"{len(list((root / 'otel-config').glob('*.yaml')))} Collector configs, compose, dashboards: "
          f"{'FAILED' if problems else 'ok'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
