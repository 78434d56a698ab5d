#!/usr/bin/env python3
"""Offline checks of everything that ships beside the binary; one line per problem.

- deploy/: the kustomization is rendered (below, then compared with `kubectl kustomize`
  when a kubectl with kustomize v5 is installed) and every rendered object is validated
  against the Kubernetes JSON schemas of the oldest and newest versions we support
  (kubernetes-validate, strict: unknown fields fail). Then what the schemas cannot say:
  the collector keeps its least-privilege shape, every `--config` path and `${env:...}`
  has a source, the collector's OTLP endpoint is the sidecar's receiver, the sidecar's
  persistent sending queue lives on a hostPath (the pod's only writable mount), and the
  Prometheus scrape annotations and deploy/podmonitor.yaml (a Prometheus Operator CRD,
  outside the kustomization: checked against a minimal schema) point at /metrics on the
  health port.
- otel-config/: every Collector file parses and every pipeline names only receivers,
  processors and exporters (and the service only extensions) defined in that file, and
  every exporter's sending_queue storage is a file_storage extension the service runs;
  deploy/otel-sidecar.yaml is an identical copy of otel-config/sidecar.yaml.
- docker-compose.yml: `docker compose config` (or docker-compose) accepts it, images are
  pinned, the demo's collector has the DaemonSet's capabilities and a subset of its
  mounts, and the workload carries kubelet's labels and cgroup parent.
- The Grafana dashboards parse and use only provisioned data sources and labels that
  Prometheus and Loki are configured to produce; Prometheus queries read only the series
  the collector's metrics become there (Prometheus 3's OTLP names) and group only on
  their attributes, histogram_quantile keeps `le`; Jaeger queries are searches that
  name a service.

Usage: validate.py [REPO_ROOT]. Needs PyYAML and kubernetes-validate (requirements.txt);
VALIDATE_KUBECTL= (empty) skips the comparison with `kubectl kustomize`.
"""

import base64
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import kubernetes_validate
import yaml

# Native sidecars (initContainers with restartPolicy: Always) are on by default from 1.29;
# 1.31 is the newest schema set kubernetes-validate 1.31.0 bundles.
KUBERNETES_VERSIONS = ["1.29.0", "1.31.0"]
COLLECTOR_CAPABILITIES = ["BPF", "PERFMON"]
# A read-only mount does not stop connect(2) on a unix socket: no host path holding a
# container runtime's API socket may be mounted.
RUNTIME_SOCKETS = [
    "/run/containerd/containerd.sock", "/var/run/containerd/containerd.sock",
    "/run/containerd/s", "/run/docker.sock", "/var/run/docker.sock",
    "/run/crio/crio.sock", "/var/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
]
# Built here (scripts/image.sh), never pulled: the only images allowed an unpinned tag.
LOCAL_IMAGES = {"egress-collector:latest", "egress-test/busybox:latest"}


class Problems(list):
    """Problems found, each "where: what"; paths are shown relative to the root checked."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def add(self, where, message):
        if isinstance(where, pathlib.Path):
            where = where.relative_to(self.root) if where.is_relative_to(self.root) else where
        self.append(f"{where}: {message}")


# --- kustomize, the subset deploy/kustomization.yaml uses ------------------------------

class RenderError(Exception):
    pass


KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources",
                        "configMapGenerator", "secretGenerator"}
CLUSTER_SCOPED = {"Namespace", "PriorityClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "StorageClass", "PersistentVolume",
                  "RuntimeClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}


def kustomize_hash(obj):
    """kustomize's name suffix (api/hasher): sha256 of kind, type and data as Go's
    json.Marshal writes them; the name enters as "" (its lookup of "metadata/name" finds
    no such field)."""
    if obj["kind"] == "ConfigMap":
        fields = {"kind": "ConfigMap", "name": "", "data": obj.get("data", "")}
    else:
        fields = {"kind": "Secret", "type": obj.get("type", ""), "name": "", "data": obj.get("data", "")}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escape in [("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")]:
        text = text.replace(char, escape)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def kustomize_base64(text):
    """Base64 as kustomize writes Secret data: wrapped at 70 characters, each line ended by
    a newline once there is more than one (the API server's decoder skips newlines)."""
    encoded = base64.b64encode(text.encode()).decode()
    if len(encoded) < 70:
        return encoded
    return "".join(encoded[i:i + 70] + "\n" for i in range(0, len(encoded), 70))


def env_file_pairs(path):
    """kustomize's env-file rules: KEY=VALUE taken literally; blank and # lines skipped; a
    bare KEY takes its value from the environment."""
    pairs = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not re.fullmatch(r"[-._a-zA-Z][-._a-zA-Z0-9]*", key):
            raise RenderError(f"{path.name}:{number}: {key!r} is not a valid variable name")
        pairs[key] = value if sep else os.environ.get(key, "")
    return pairs


def generated(kdir, generator, kind):
    unknown = set(generator) - {"name", "files", "envs"}
    if unknown:
        raise RenderError(f"{kind} generator field(s) {sorted(unknown)} not implemented here")
    data = {}
    for entry in generator.get("files", []):
        key, sep, name = entry.partition("=")
        if not sep:
            key, name = pathlib.PurePath(entry).name, entry
        data[key] = (kdir / name).read_text()
    for name in generator.get("envs", []):
        data.update(env_file_pairs(kdir / name))
    obj = {"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]}}
    if kind == "Secret":
        obj["type"] = "Opaque"
        data = {k: kustomize_base64(v) for k, v in data.items()}
    obj["data"] = data
    return obj


def pod_specs(obj):
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        yield spec
    elif isinstance((spec.get("template") or {}).get("spec"), dict):
        yield spec["template"]["spec"]


def rename_references(obj, renamed):
    """kustomize's nameReference for generated ConfigMaps and Secrets in pod specs."""
    def swap(holder, field, kind):
        if isinstance(holder, dict) and holder.get(field) in renamed.get(kind, {}):
            holder[field] = renamed[kind][holder[field]]
    for spec in pod_specs(obj):
        for volume in spec.get("volumes", []):
            swap(volume.get("configMap"), "name", "ConfigMap")
            swap(volume.get("secret"), "secretName", "Secret")
            for source in (volume.get("projected") or {}).get("sources", []):
                swap(source.get("configMap"), "name", "ConfigMap")
                swap(source.get("secret"), "name", "Secret")
        for secret in spec.get("imagePullSecrets", []):
            swap(secret, "name", "Secret")
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for env in container.get("env", []):
                swap((env.get("valueFrom") or {}).get("configMapKeyRef"), "name", "ConfigMap")
                swap((env.get("valueFrom") or {}).get("secretKeyRef"), "name", "Secret")
            for source in container.get("envFrom", []):
                swap(source.get("configMapRef"), "name", "ConfigMap")
                swap(source.get("secretRef"), "name", "Secret")


def render(kdir):
    kustomization = yaml.safe_load((kdir / "kustomization.yaml").read_text()) or {}
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"kustomization field(s) {sorted(unknown)} not implemented by "
                          "deploy/tests/validate.py's renderer; extend it")
    objects = []
    for name in kustomization.get("resources", []):
        if not (kdir / name).is_file():
            raise RenderError(f"resource {name!r} is not a file (bases are not implemented here)")
        objects += [d for d in yaml.safe_load_all((kdir / name).read_text()) if d]
    generators = ([generated(kdir, g, "ConfigMap") for g in kustomization.get("configMapGenerator", [])]
                  + [generated(kdir, g, "Secret") for g in kustomization.get("secretGenerator", [])])
    objects += generators
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
    for entry in kustomization.get("labels", []):
        if entry.get("includeSelectors") or set(entry) - {"pairs", "includeSelectors", "includeTemplates"}:
            raise RenderError("labels: only pairs, includeSelectors: false and includeTemplates are implemented here")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(entry["pairs"])
            template = (obj.get("spec") or {}).get("template")
            if entry.get("includeTemplates") and isinstance(template, dict):
                template.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    renamed = {}
    for obj in generators:
        old = obj["metadata"]["name"]
        obj["metadata"]["name"] = f"{old}-{kustomize_hash(obj)}"
        renamed.setdefault(obj["kind"], {})[old] = obj["metadata"]["name"]
    for obj in objects:
        rename_references(obj, renamed)
    return objects


def kubectl_kustomize(kdir):
    """`kubectl kustomize` output, or None when no kubectl with kustomize v5+ is here (the
    kubectl of Debian's kubernetes-client embeds kustomize v2, which predates `labels`).
    VALIDATE_KUBECTL names another kubectl; set empty, the comparison is skipped."""
    kubectl = shutil.which(os.environ.get("VALIDATE_KUBECTL", "kubectl") or "/nonexistent")
    if not kubectl:
        return None
    try:
        version = json.loads(subprocess.run([kubectl, "version", "--client", "-o", "json"],
                                            capture_output=True, text=True, timeout=60).stdout)
    except (ValueError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)", version.get("kustomizeVersion", ""))
    if not match or int(match.group(1)) < 5:
        return None
    result = subprocess.run([kubectl, "kustomize", str(kdir)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def key(obj):
    return (obj.get("kind"), (obj.get("metadata") or {}).get("name"))


def name_of(obj):
    return "{}/{}".format(*key(obj))


def render_kustomization(root, problems):
    kdir = root / "deploy"
    try:
        ours = render(kdir)
        theirs = kubectl_kustomize(kdir)
    except (RenderError, OSError, yaml.YAMLError) as e:
        problems.add("deploy", f"cannot render the kustomization: {e}")
        return []
    if theirs is None:
        print("validate: note: no kubectl with kustomize v5; validating this script's rendering only",
              file=sys.stderr)
        return ours
    mine, real = {key(o): o for o in ours}, {key(o): o for o in theirs}
    for k in sorted(set(mine) | set(real), key=str):
        if mine.get(k) != real.get(k):
            problems.add("deploy", f"validate.py renders {'%s/%s' % k} unlike `kubectl kustomize`; fix its renderer")
    return theirs


def check_schemas(objects, problems):
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                problems.add(f"deploy: {name_of(obj)}", f"Kubernetes {version} schema: {path}: {e.message}")
            except Exception as e:  # an unknown kind or apiVersion
                problems.add(f"deploy: {name_of(obj)}", f"Kubernetes {version} schema: {e}")


# --- what the schemas cannot say -------------------------------------------------------

def containers_of(spec):
    return {c["name"]: c for c in spec.get("containers", []) + spec.get("initContainers", [])}


def flag(args, name):
    """The value of --name=VALUE or --name VALUE in an argument list."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def covers(parent, path):
    parent, path = parent.rstrip("/") or "/", path.rstrip("/")
    return path == parent or path.startswith(parent + "/") or parent == "/"


def check_collector_container(ds, pod, collector, problems):
    where = f"deploy: {name_of(ds)}: container collector"
    sc = collector.get("securityContext") or {}
    caps = sc.get("capabilities") or {}
    if sc.get("privileged"):
        problems.add(where, "must not be privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.add(where, "must set allowPrivilegeEscalation: false")
    if not sc.get("readOnlyRootFilesystem"):
        problems.add(where, "needs readOnlyRootFilesystem: true")
    if caps.get("drop") != ["ALL"]:
        problems.add(where, "must drop ALL capabilities before adding any")
    if sorted(caps.get("add") or []) != COLLECTOR_CAPABILITIES:
        problems.add(where, f"capabilities {sorted(caps.get('add') or [])} are not exactly {COLLECTOR_CAPABILITIES}")
    if not (sc.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile")):
        problems.add(where, "states no seccompProfile")
    for field in ["hostNetwork", "hostPID", "hostIPC"]:
        if pod.get(field):
            problems.add(f"deploy: {name_of(ds)}", f"{field} is not needed and must stay off")
    env = {e["name"]: e for e in collector.get("env", [])}
    if ((env.get("K8S_NODE_NAME") or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problems.add(where, "K8S_NODE_NAME must come from the downward API's spec.nodeName")
    args = collector.get("args", [])
    health = flag(args, "health-address")
    port = int(health.rsplit(":", 1)[1]) if health else None
    named = {p.get("name"): p["containerPort"] for p in collector.get("ports", [])}
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        get = (collector.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or named.get(get.get("port"), get.get("port")) != port:
            problems.add(where, f"{probe} must GET {path} on the --health-address port {port}")


def check_daemonset(objects, problems):
    by_key = {key(o): o for o in objects}
    daemonsets = [o for o in objects if o.get("kind") == "DaemonSet"]
    if not daemonsets:
        problems.add("deploy", "the rendered kustomization has no DaemonSet")
    for ds in daemonsets:
        pod = ds["spec"]["template"]["spec"]
        containers = containers_of(pod)
        where = f"deploy: {name_of(ds)}"
        if "collector" not in containers:
            problems.add(where, "has no container named collector")
            continue
        check_collector_container(ds, pod, containers["collector"], problems)
        sidecar = containers.get("otel-collector")
        if sidecar is None:
            problems.add(where, "has no otel-collector sidecar")
        else:
            sc = sidecar.get("securityContext") or {}
            if not (sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem")
                    and (sc.get("capabilities") or {}).get("drop") == ["ALL"]):
                problems.add(where, "the otel-collector sidecar must run as non-root, read-only, with ALL capabilities dropped")
        if not any(t.get("operator") == "Exists" and not t.get("key") for t in pod.get("tolerations", [])):
            problems.add(where, "must tolerate every taint (operator: Exists, no key) to run on every node")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        queue_volumes = check_persistent_queue(where, sidecar, volumes, by_key, problems)
        check_scrape_annotations(where, ds, containers["collector"], problems)
        for name, container in containers.items():
            resources = container.get("resources") or {}
            for kind in ["requests", "limits"]:
                if not {"cpu", "memory"} <= set(resources.get(kind) or {}):
                    problems.add(where, f"container {name} needs cpu and memory {kind}")
            for mount in container.get("volumeMounts", []):
                if not mount.get("readOnly") and mount["name"] not in queue_volumes:
                    problems.add(where, f"container {name}: mount {mount['mountPath']} must be read-only")
            check_config_flags(where, name, container, volumes, by_key, problems)
            check_env_sources(where, name, container, volumes, by_key, problems)
        for volume in volumes.values():
            host_path = (volume.get("hostPath") or {}).get("path")
            for socket in RUNTIME_SOCKETS:
                if host_path and covers(host_path, socket):
                    problems.add(where, f"hostPath {host_path} exposes the runtime socket {socket} (read-only does not stop connect)")


def sidecar_config(sidecar, volumes, by_key):
    """The sidecar's Collector config, parsed from its mounted ConfigMap."""
    path = flag((sidecar or {}).get("args", []), "config")
    text = configmap_files(sidecar or {}, volumes, by_key).get(path)
    try:
        return yaml.safe_load(text) or {} if text else {}
    except yaml.YAMLError:
        return {}


def check_persistent_queue(where, sidecar, volumes, by_key, problems):
    """The sidecar's file_storage directories are hostPath mounts of the sidecar (an
    emptyDir would not survive the pod's replacement), and the exporter to the backend
    queues on one. Returns the names of those volumes: the only ones mounted writable."""
    config = sidecar_config(sidecar, volumes, by_key)
    extensions = config.get("extensions") or {}
    mounts = {m["mountPath"].rstrip("/"): m for m in (sidecar or {}).get("volumeMounts", [])}
    allowed = set()
    for name, settings in extensions.items():
        if name.split("/")[0] != "file_storage":
            continue
        settings = settings or {}
        directories = [settings.get("directory"), (settings.get("compaction") or {}).get("directory")]
        for directory in [d for d in directories if d]:
            mount = mounts.get(directory.rstrip("/"))
            volume = volumes.get((mount or {}).get("name")) or {}
            if mount is None:
                problems.add(where, f"sidecar {name} directory {directory} is not a mount of the otel-collector container")
            elif "hostPath" not in volume:
                problems.add(where, f"sidecar {name} directory {directory} must be a hostPath volume (an emptyDir does not survive the pod's replacement)")
            elif mount.get("readOnly"):
                problems.add(where, f"sidecar {name} directory {directory} is mounted read-only")
            else:
                allowed.add(mount["name"])
    for exporter, settings in (config.get("exporters") or {}).items():
        settings = settings or {}
        if "BACKEND_OTLP_ENDPOINT" in str(settings.get("endpoint", "")):
            if not (settings.get("sending_queue") or {}).get("storage"):
                problems.add(where, f"sidecar exporter {exporter} sends to the backend without a persistent sending_queue (storage)")
    return allowed


def check_scrape_annotations(where, ds, collector, problems):
    """prometheus.io/* on the pod template name /metrics on the --health-address port."""
    annotations = (ds["spec"]["template"].get("metadata") or {}).get("annotations") or {}
    health = flag(collector.get("args", []), "health-address")
    port = health.rsplit(":", 1)[1] if health else None
    want = {"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"}
    for name, value in want.items():
        if annotations.get(name) != value:
            problems.add(where, f"pod annotation {name} is {annotations.get(name)!r}, want {value!r}")


# The fields of monitoring.coreos.com/v1 PodMonitor this check knows (a subset of the
# CRD's schema: the example uses no others).
PODMONITOR_SPEC = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel",
                   "podTargetLabels", "sampleLimit", "targetLimit"}
PODMONITOR_ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                       "relabelings", "metricRelabelings", "params", "tlsConfig"}


def check_podmonitor(root, objects, problems):
    """deploy/podmonitor.yaml selects the DaemonSet's pods in their namespace and scrapes
    /metrics on a named port of the collector container."""
    path = root / "deploy" / "podmonitor.yaml"
    try:
        monitor = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        problems.add(path, f"cannot read: {e}")
        return
    if monitor.get("apiVersion") != "monitoring.coreos.com/v1" or monitor.get("kind") != "PodMonitor":
        problems.add(path, "must be a monitoring.coreos.com/v1 PodMonitor")
    unknown = set(monitor) - {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor.get("spec") or {}
    unknown |= {f"spec.{k}" for k in set(spec) - PODMONITOR_SPEC}
    endpoints = spec.get("podMetricsEndpoints") or []
    for endpoint in endpoints:
        unknown |= {f"spec.podMetricsEndpoints[].{k}" for k in set(endpoint) - PODMONITOR_ENDPOINT}
    if unknown:
        problems.add(path, f"unknown field(s) {sorted(unknown)}")
    daemonset = next((o for o in objects if o.get("kind") == "DaemonSet"), None)
    if daemonset is None:
        return
    template = daemonset["spec"]["template"]
    if (monitor.get("metadata") or {}).get("namespace") != daemonset["metadata"].get("namespace"):
        problems.add(path, f"namespace {(monitor.get('metadata') or {}).get('namespace')!r} is not the DaemonSet's "
                     f"{daemonset['metadata'].get('namespace')!r}")
    match = (spec.get("selector") or {}).get("matchLabels") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    if not match or any(labels.get(k) != v for k, v in match.items()):
        problems.add(path, f"selector {match} does not select the DaemonSet's pods {labels}")
    collector = containers_of(template["spec"]).get("collector") or {}
    ports = {p.get("name") for p in collector.get("ports", [])}
    if not endpoints:
        problems.add(path, "has no podMetricsEndpoints")
    for endpoint in endpoints:
        if endpoint.get("port") not in ports:
            problems.add(path, f"endpoint port {endpoint.get('port')!r} is not a named port of the collector {sorted(ports)}")
        if endpoint.get("path", "/metrics") != "/metrics":
            problems.add(path, f"endpoint path {endpoint.get('path')!r} is not /metrics")


def configmap_files(container, volumes, by_key):
    """mountPath/key -> file text, for the container's ConfigMap mounts."""
    files = {}
    for mount in container.get("volumeMounts", []):
        source = (volumes.get(mount["name"]) or {}).get("configMap")
        if source:
            cm = by_key.get(("ConfigMap", source["name"])) or {}
            for name, text in (cm.get("data") or {}).items():
                files[f"{mount['mountPath'].rstrip('/')}/{name}"] = text
    return files


def check_config_flags(where, name, container, volumes, by_key, problems):
    files = configmap_files(container, volumes, by_key)
    path = flag(container.get("args", []), "config")
    if path is not None and path not in files:
        problems.add(where, f"container {name}: --config={path} is in no mounted ConfigMap")


def check_env_sources(where, name, container, volumes, by_key, problems):
    """Every ${env:NAME} in the container's mounted configs is set in its environment."""
    provided = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        ref = source.get("secretRef") or source.get("configMapRef") or {}
        kind = "Secret" if "secretRef" in source else "ConfigMap"
        provided |= set((by_key.get((kind, ref.get("name"))) or {}).get("data") or {})
    for path, text in configmap_files(container, volumes, by_key).items():
        for var in sorted(set(re.findall(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)", text))):
            if var not in provided:
                problems.add(where, f"container {name}: {path} uses ${{env:{var}}}, which nothing sets")


def check_endpoint_wiring(root, problems):
    """egress.toml's OTLP endpoint is the sidecar's receiver for that protocol."""
    try:
        toml = tomllib.loads((root / "deploy" / "egress.toml").read_text())
        sidecar = yaml.safe_load((root / "deploy" / "otel-sidecar.yaml").read_text())
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        problems.add("deploy/egress.toml", f"cannot read: {e}")
        return
    otlp = toml.get("otlp") or {}
    endpoint = re.sub(r"^https?://", "", otlp.get("endpoint", "")).rstrip("/")
    protocol = "grpc" if otlp.get("protocol", "grpc") == "grpc" else "http"
    listening = ((((sidecar.get("receivers") or {}).get("otlp") or {}).get("protocols") or {})
                 .get(protocol) or {}).get("endpoint")
    if endpoint != listening:
        problems.add("deploy/egress.toml", f"[otlp] endpoint {endpoint!r} ({protocol}) does not match the "
                     f"sidecar's otlp {protocol} receiver {listening!r}")


# --- OpenTelemetry Collector configs ---------------------------------------------------

def check_collector_config(path, problems):
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        problems.add(path, f"does not parse: {e}")
        return
    unknown = set(config) - {"receivers", "processors", "exporters", "extensions", "connectors", "service"}
    if unknown:
        problems.add(path, f"unknown top-level section(s) {sorted(unknown)}")
    defined = {kind: set(config.get(kind) or {}) for kind in
               ["receivers", "processors", "exporters", "extensions", "connectors"]}
    service = config.get("service") or {}
    for extension in service.get("extensions", []):
        if extension not in defined["extensions"]:
            problems.add(path, f"service uses undefined extension {extension!r}")
    for exporter, settings in (config.get("exporters") or {}).items():
        storage = ((settings or {}).get("sending_queue") or {}).get("storage")
        if storage and not (storage.split("/")[0] == "file_storage"
                            and storage in defined["extensions"]
                            and storage in service.get("extensions", [])):
            problems.add(path, f"exporter {exporter}: sending_queue storage {storage!r} is not a "
                         "file_storage extension the service runs")
    pipelines = service.get("pipelines") or {}
    if not pipelines:
        problems.add(path, "defines no pipelines")
    used = {kind: set() for kind in defined}
    for name, pipeline in pipelines.items():
        pipeline = pipeline or {}
        if name.split("/")[0] not in {"logs", "metrics", "traces"}:
            problems.add(path, f"pipeline {name!r} is not logs, metrics or traces")
        for kind in ["receivers", "processors", "exporters"]:
            for component in pipeline.get(kind) or []:
                used[kind].add(component)
                if component not in defined[kind] | defined["connectors"]:
                    problems.add(path, f"pipeline {name} uses undefined {kind[:-1]} {component!r}")
        for kind in ["receivers", "exporters"]:
            if not pipeline.get(kind):
                problems.add(path, f"pipeline {name} has no {kind}")
        processors = pipeline.get("processors") or []
        if "memory_limiter" in processors and processors[0] != "memory_limiter":
            problems.add(path, f"pipeline {name}: memory_limiter must come first")
    for kind in ["receivers", "processors", "exporters"]:
        for component in sorted(defined[kind] - used[kind]):
            problems.add(path, f"{kind[:-1]} {component!r} is defined but in no pipeline")


# --- docker-compose.yml ----------------------------------------------------------------

def compose_command():
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) and subprocess.run(
                command + ["version"], capture_output=True).returncode == 0:
            return command
    return None


def check_compose(root, daemonset, problems):
    path = root / "docker-compose.yml"
    command = compose_command()
    if command is None:
        problems.add(path, "neither `docker compose` nor docker-compose is installed")
        return
    result = subprocess.run(command + ["-f", str(path), "config"], capture_output=True, text=True)
    if result.returncode != 0:
        problems.add(path, f"{' '.join(command)} config: {' '.join(result.stderr.split())}")
        return
    services = (yaml.safe_load(result.stdout) or {}).get("services") or {}
    for name, service in services.items():
        image = service.get("image", "")
        if image not in LOCAL_IMAGES and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.add(path, f"service {name}: image {image!r} must be pinned to a version")
    check_compose_collector(path, services, daemonset, problems)
    check_compose_workload(path, services, problems)


def compose_mounts(service):
    """(source, target, read_only) of a service's bind mounts, short or long syntax."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            yield parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            yield volume.get("source"), volume.get("target"), bool(volume.get("read_only"))


def check_compose_collector(path, services, daemonset, problems):
    service = services.get("egress-collector")
    if service is None:
        problems.add(path, "has no egress-collector service")
        return
    where = f"{path.relative_to(problems.root)}: service egress-collector"
    if service.get("privileged"):
        problems.add(where, "must not be privileged")
    if not service.get("read_only"):
        problems.add(where, "needs read_only: true, as the DaemonSet")
    if [c.upper() for c in service.get("cap_drop", [])] != ["ALL"]:
        problems.add(where, "must drop ALL capabilities, as the DaemonSet")
    if sorted(c.upper().removeprefix("CAP_") for c in service.get("cap_add", [])) != COLLECTOR_CAPABILITIES:
        problems.add(where, f"must add exactly {COLLECTOR_CAPABILITIES}, as the DaemonSet")
    allowed = set()
    if daemonset:
        pod = daemonset["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in containers_of(pod).get("collector", {}).get("volumeMounts", []):
            host = (volumes.get(mount["name"]) or {}).get("hostPath")
            if host:
                allowed.add((host["path"], mount["mountPath"]))
    for source, target, read_only in compose_mounts(service):
        if not read_only:
            problems.add(where, f"mount {target} must be read-only")
        if daemonset and (source, target) not in allowed:
            problems.add(where, f"mounts {source} at {target}, which the DaemonSet does not")
    command = service.get("command") or []
    endpoint = flag(command, "otlp-endpoint") or ""
    host = re.sub(r"^https?://", "", endpoint).split(":")[0]
    if host not in services:
        problems.add(where, f"--otlp-endpoint {endpoint!r} names no compose service")


def check_compose_workload(path, services, problems):
    service = services.get("workload")
    if service is None:
        problems.add(path, "has no workload service")
        return
    labels = service.get("labels") or {}
    uid = labels.get("io.kubernetes.pod.uid", "")
    if not re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", uid):
        problems.add(f"{path.relative_to(problems.root)}: service workload", f"io.kubernetes.pod.uid {uid!r} is not a lowercase UUID as kubelet writes")
    for label in ["io.kubernetes.pod.name", "io.kubernetes.pod.namespace", "io.kubernetes.container.name"]:
        if not labels.get(label):
            problems.add(f"{path.relative_to(problems.root)}: service workload", f"lacks kubelet's label {label}")
    parent = service.get("cgroup_parent", "")
    if uid and uid not in parent and uid.replace("-", "_") not in parent:
        problems.add(f"{path.relative_to(problems.root)}: service workload", f"cgroup_parent {parent!r} is not the pod's (pod{uid})")


# --- Grafana ---------------------------------------------------------------------------

# The metrics the collector exports per workload (docs/connections.md, docs/dns.md): OTLP
# name -> (type, unit, data-point attributes). Self-metrics (egress_collector_*) are
# listed in docs/ecosystem.md and not checked by name here.
SPORT = ["network.transport", "destination.port", "destination.address"]
COLLECTOR_METRICS = {
    "egress.connections": ("sum", "{connection}", SPORT + [
        "network.type", "server.address", "error.type", "otel.metric.overflow"]),
    "egress.tcp.handshake.duration": ("histogram", "s", SPORT + ["error.type"]),
    "egress.tcp.connection.duration": ("histogram", "s", SPORT),
    "egress.network.io": ("sum", "By", SPORT + ["network.io.direction"]),
    "egress.dns.queries": ("sum", "{answer}", ["dns.response_code"]),
    "dns.lookup.duration": ("histogram", "s", ["dns.response_code"]),
}
PROMETHEUS_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}
JAEGER_QUERY_TYPES = {"search", "dependencyGraph"}


def prometheus_names(name, kind, unit):
    """The series names Prometheus 3's OTLP receiver gives a metric (its default
    UnderscoreEscapingWithSuffixes): dots as underscores, the unit as a suffix ({...}
    annotations dropped), _total on monotonic sums, _bucket/_sum/_count on histograms."""
    base = name.replace(".", "_")
    suffix = PROMETHEUS_UNITS.get(unit, "" if unit.startswith("{") or not unit else unit)
    if suffix and not base.endswith(f"_{suffix}"):
        base = f"{base}_{suffix}"
    if kind == "sum":
        return {f"{base}_total": name}
    return {f"{base}_{part}": name for part in ["bucket", "sum", "count"]}


PROMETHEUS_SERIES = {}
for _name, (_kind, _unit, _) in COLLECTOR_METRICS.items():
    PROMETHEUS_SERIES.update(prometheus_names(_name, _kind, _unit))


def check_prometheus_query(where, expr, promoted, problems):
    """Metric names are series the collector's metrics become; every label grouped on is
    a promoted resource attribute or an attribute of a metric the query reads; a
    histogram_quantile keeps `le`."""
    # Metric names: identifiers outside {matchers}, by/without (...) groups, and strings.
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\b(by|without)\s*\([^)]*\)|\[[^\]]*\]', " ", expr)
    read = set()
    for token in re.findall(r"\b(?:egress|dns)_[a-z0-9_]+\b", bare):
        if token.startswith("egress_collector_"):
            continue
        if token not in PROMETHEUS_SERIES:
            problems.add(where, f"reads {token}, which is no series of the collector's metrics "
                         f"({', '.join(sorted(PROMETHEUS_SERIES))})")
        else:
            read.add(PROMETHEUS_SERIES[token])
    labels = {"le"} | {a.replace(".", "_") for m in read for a in COLLECTOR_METRICS[m][2]}
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        names = [l.strip() for l in group.split(",") if l.strip()]
        for label in names:
            if re.match(r"(k8s|container|service|host)_", label):
                if label not in promoted:
                    problems.add(where, f"groups by {label}, which prometheus.yml does not promote")
            elif read and label not in labels:
                problems.add(where, f"groups by {label}, which no metric it reads carries")
    if "histogram_quantile" in expr:
        for group in re.findall(r"histogram_quantile\s*\([^,]*,\s*\w+\s+by\s*\(([^)]*)\)", expr):
            if "le" not in [l.strip() for l in group.split(",")]:
                problems.add(where, "histogram_quantile over a sum that drops le")


def check_jaeger_query(where, target, problems):
    """A Jaeger search names a service; only kinds a dashboard can run unattended."""
    kind = target.get("queryType")
    if kind not in JAEGER_QUERY_TYPES:
        problems.add(where, f"Jaeger queryType {kind!r} is not one of {sorted(JAEGER_QUERY_TYPES)}")
    elif kind == "search" and not target.get("service"):
        problems.add(where, "Jaeger search names no service")

def panel_queries(dashboard):
    for panel in dashboard.get("panels", []):
        yield from ((panel, t) for t in panel.get("targets", []))
        for inner in panel.get("panels", []):  # collapsed rows
            yield from ((inner, t) for t in inner.get("targets", []))


def check_dashboards(root, problems):
    demo = root / "otel-config" / "demo"
    try:
        sources = yaml.safe_load((demo / "grafana/provisioning/datasources/datasources.yaml").read_text())
        prometheus = yaml.safe_load((demo / "prometheus.yml").read_text()) or {}
        loki = yaml.safe_load((demo / "loki.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        problems.add(demo, f"cannot read the demo's configs: {e}")
        return
    types = {d["uid"]: d["type"] for d in sources.get("datasources", [])}
    promoted = {a.replace(".", "_") for a in (prometheus.get("otlp") or {}).get("promote_resource_attributes", [])}
    indexed = {"service_name"}
    for rule in (((loki.get("limits_config") or {}).get("otlp_config") or {})
                 .get("resource_attributes") or {}).get("attributes_config", []):
        if rule.get("action") == "index_label":
            indexed |= {a.replace(".", "_") for a in rule.get("attributes", [])}
    dashboards = sorted((demo / "grafana" / "dashboards").glob("*.json"))
    if not dashboards:
        problems.add(demo / "grafana" / "dashboards", "holds no dashboard")
    for path in dashboards:
        try:
            dashboard = json.loads(path.read_text())
        except ValueError as e:
            problems.add(path, f"does not parse: {e}")
            continue
        for panel, target in panel_queries(dashboard):
            where = f"{path.relative_to(problems.root)}: panel {panel.get('title')!r}"
            sources = [d for d in (panel.get("datasource"), target.get("datasource")) if d]
            for ds in sources:
                if ds.get("uid") not in types:
                    problems.add(where, f"uses unprovisioned data source {ds.get('uid')!r}")
            if not sources:
                problems.add(where, "names no data source")
            if not sources or any(ds.get("uid") not in types for ds in sources):
                continue
            ds = sources[-1]
            expr = target.get("expr", "")
            if types[ds["uid"]] == "prometheus":
                check_prometheus_query(where, expr, promoted, problems)
            if types[ds["uid"]] == "jaeger":
                check_jaeger_query(where, target, problems)
            if types[ds["uid"]] == "loki":
                selector = re.match(r"\s*\{([^}]*)\}", expr)
                for label in re.findall(r"(\w+)\s*=~?", selector.group(1) if selector else ""):
                    if label not in indexed:
                        problems.add(where, f"selects on {label}, which loki.yaml does not index")


# ---------------------------------------------------------------------------------------

def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[2])
    problems = Problems(root)
    objects = render_kustomization(root, problems)
    kinds = {o.get("kind") for o in objects}
    for wanted in ["Namespace", "ServiceAccount", "ConfigMap", "Secret", "DaemonSet"]:
        if objects and wanted not in kinds:
            problems.add("deploy", f"the rendered kustomization has no {wanted}")
    check_schemas(objects, problems)
    check_daemonset(objects, problems)
    check_podmonitor(root, objects, problems)
    check_endpoint_wiring(root, problems)
    configs = sorted((root / "otel-config").glob("*.yaml")) + [root / "deploy" / "otel-sidecar.yaml"]
    for path in configs:
        check_collector_config(path, problems)
    try:
        if (root / "deploy/otel-sidecar.yaml").read_bytes() != (root / "otel-config/sidecar.yaml").read_bytes():
            problems.add("deploy/otel-sidecar.yaml", "differs from otel-config/sidecar.yaml; copy it over")
    except OSError as e:
        problems.add("deploy/otel-sidecar.yaml", str(e))
    daemonset = next((o for o in objects if o.get("kind") == "DaemonSet"), None)
    check_compose(root, daemonset, problems)
    check_dashboards(root, problems)
    for problem in problems:
        print(f"validate: {problem}", file=sys.stderr)
    print(f"validate: {len(objects)} Kubernetes objects (schemas {', '.join(KUBERNETES_VERSIONS)}), "
          f"{len(configs)} Collector configs, compose, dashboards: "
          f"{f'{len(problems)} problem(s)' if problems else 'ok'}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
