#!/usr/bin/env python3
"""validate.py catches what it claims to. Each breakage below, applied to a copy of the
repository's deployment files, must make it fail with a line naming the problem; each
variation must still pass (with kubectl present, that also proves validate.py's own
kustomize rendering matches `kubectl kustomize` on it). The unmodified copy must pass
with and without kubectl."""

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
VALIDATE = ROOT / "deploy" / "tests" / "validate.py"
DS = "deploy/daemonset.yaml"
COMPOSE = "docker-compose.yml"
DASHBOARD = "otel-config/demo/grafana/dashboards/egress-by-pod.json"

# (file, text to replace, replacement, expected in validate.py's output)
BREAKAGES = [
    ("otel-config/gateway.yaml", "exporters: [otlphttp/loki, debug]",
     "exporters: [otlphttp/loki, kafka]", "undefined exporter 'kafka'"),
    ("otel-config/gateway.yaml", "processors: [memory_limiter, batch]",
     "processors: [batch, memory_limiter]", "memory_limiter must come first"),
    ("otel-config/gateway.yaml", "  debug:\n    verbosity: basic\n",
     "  debug:\n    verbosity: basic\n  otlp/unused:\n    endpoint: x:4317\n",
     "exporter 'otlp/unused' is defined but in no pipeline"),
    ("otel-config/sidecar.yaml", "processors: [memory_limiter, batch]",
     "processors: [memory_limiter, batchy]", "undefined processor 'batchy'"),
    ("deploy/otel-sidecar.yaml", "limit_mib: 200", "limit_mib: 300",
     "differs from otel-config/sidecar.yaml"),
    (DS, "      maxUnavailable: 1", "      maxUnavailable: 1\n      maxSurgeTypo: 1",
     "DaemonSet/egress-collector: Kubernetes 1.29.0 schema"),
    (DS, "add: [BPF, PERFMON]", "add: [BPF, PERFMON, SYS_ADMIN]", "are not exactly ['BPF', 'PERFMON']"),
    (DS, "privileged: false", "privileged: true", "must not be privileged"),
    (DS, "mountPath: /host/proc\n              readOnly: true", "mountPath: /host/proc",
     "mount /host/proc must be read-only"),
    (DS, "path: /run/containerd/io.containerd.runtime.v2.task", "path: /run/containerd",
     "exposes the runtime socket /run/containerd/containerd.sock"),
    (DS, "path: /run/k3s/containerd/io.containerd.runtime.v2.task", "path: /run/k3s",
     "exposes the runtime socket /run/k3s/containerd/containerd.sock"),
    (DS, "--config=/etc/egress/egress.toml", "--config=/etc/egress/egress.yaml",
     "--config=/etc/egress/egress.yaml is in no mounted ConfigMap"),
    (DS, "path: /readyz", "path: /healthz", "readinessProbe must GET /readyz"),
    (DS, "      tolerations:\n        - operator: Exists\n", "",
     "must tolerate every taint"),
    ("deploy/kustomization.yaml", "namespace: egress-collector\n",
     "namespace: egress-collector\nnamePrefix: x-\n", "not implemented by"),
    ("deploy/egress.toml", 'endpoint = "http://127.0.0.1:4317"', 'endpoint = "http://127.0.0.1:4319"',
     "does not match the sidecar's otlp grpc receiver"),
    ("deploy/backend.env", "BACKEND_AUTH=", "#BACKEND_AUTH=", "${env:BACKEND_AUTH}, which nothing sets"),
    (COMPOSE, "  loki:\n", "  loki:\n    bogus_key: 1\n", "docker-compose.yml"),
    (COMPOSE, "grafana/grafana:11.4.0", "grafana/grafana:latest", "must be pinned"),
    (COMPOSE, "cap_add: [BPF, PERFMON]", "cap_add: [BPF, PERFMON, SYS_ADMIN]", "must add exactly"),
    (COMPOSE, "/var/lib/docker/containers:/host/var/lib/docker/containers:ro",
     "/var/lib/docker:/host/var/lib/docker:ro", "which the DaemonSet does not"),
    (COMPOSE, "io.kubernetes.pod.uid: 8f2c6a4e-1b7d-4e3a-9c5f-2d8e0b6a7c14",
     "io.kubernetes.pod.uid: 8f2c6a4e-1b7d-4e3a-9c5f-2d8e0b6a7cZZ", "is not a lowercase UUID"),
    # The persistent queue: on a hostPath, named by the exporter, run by the service.
    (DS, "          hostPath:\n            path: /var/lib/egress-collector/otel-queue\n            type: DirectoryOrCreate",
     "          emptyDir: {}", "must be a hostPath volume"),
    ("otel-config/sidecar.yaml", "storage: file_storage/queue", "storage: file_storage/gone",
     "sending_queue storage 'file_storage/gone' is not a file_storage extension"),
    ("deploy/otel-sidecar.yaml", "      storage: file_storage/queue\n", "",
     "sends to the backend without a persistent sending_queue"),
    ("deploy/otel-sidecar.yaml", "    directory: /var/lib/otelcol/egress-queue\n    timeout",
     "    directory: /var/lib/otelcol/elsewhere\n    timeout",
     "directory /var/lib/otelcol/elsewhere is not a mount of the otel-collector container"),
    (DS, "mountPath: /etc/otelcol\n              readOnly: true", "mountPath: /etc/otelcol",
     "mount /etc/otelcol must be read-only"),
    # Prometheus: the annotations and the PodMonitor point at /metrics on the health port.
    (DS, 'prometheus.io/port: "8686"', 'prometheus.io/port: "9090"', "pod annotation prometheus.io/port"),
    ("deploy/podmonitor.yaml", "    - port: health", "    - port: metrics", "endpoint port 'metrics'"),
    ("deploy/podmonitor.yaml", "  selector:\n    matchLabels:\n      app.kubernetes.io/name: egress-collector",
     "  selector:\n    matchLabels:\n      app.kubernetes.io/name: other", "does not select the DaemonSet's pods"),
    ("deploy/podmonitor.yaml", "      interval: 30s", "      intervall: 30s", "unknown field(s)"),
    (DASHBOARD, '"uid": "loki"', '"uid": "elastic"', "unprovisioned data source 'elastic'"),
    (DASHBOARD, "sum by (k8s_namespace_name, k8s_pod_name)", "sum by (k8s_node_name, k8s_pod_name)",
     "groups by k8s_node_name, which prometheus.yml does not promote"),
    # Panel queries read the names the collector's metrics get in Prometheus, by their labels.
    (DASHBOARD, "rate(egress_tcp_handshake_duration_seconds_bucket[5m])",
     "rate(egress_tcp_handshake_duration_bucket[5m])",
     "reads egress_tcp_handshake_duration_bucket, which is no series"),
    (DASHBOARD, "sum by (le, k8s_namespace_name", "sum by (k8s_namespace_name",
     "histogram_quantile over a sum that drops le"),
    (DASHBOARD, "k8s_pod_name, dns_response_code)", "k8s_pod_name, dns_rcode)",
     "groups by dns_rcode, which no metric it reads carries"),
    (DASHBOARD, '"service": "shop"', '"service": ""', "Jaeger search names no service"),
]

# Must still pass: backend.env as users edit it (long values wrap kustomize's base64).
VARIATIONS = [
    ("deploy/backend.env", "BACKEND_AUTH=Basic REPLACE_WITH_BASE64_OF_INSTANCE_ID_COLON_TOKEN",
     "  # indented comment\n\nBACKEND_AUTH=Basic " + "MTIzNDU2OmdsY19leUp" * 12),
]


def copy_repo(dst):
    for name in ["deploy", "otel-config"]:
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / COMPOSE, dst / COMPOSE)


def validate(root, env=None):
    return subprocess.run([sys.executable, str(VALIDATE), str(root)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def case(tmp, i, change, must_fail, env=None):
    """One copy of the repository, changed; returns a failure message or None."""
    root = pathlib.Path(tmp) / f"case{i}"
    copy_repo(root)
    if change:
        file, old, new, *_ = change
        text = (root / file).read_text()
        if old not in text:
            return f"case {i}: {old!r} not found in {file}"
        (root / file).write_text(text.replace(old, new, 1))
    result = validate(root, env)
    if must_fail:
        expected = change[3]
        if result.returncode == 0 or expected not in result.stderr:
            return f"breakage {i} ({change[0]}: {change[2]!r}) not reported as {expected!r}:\n{result.stderr}"
    elif result.returncode != 0:
        return f"case {i} ({change[0] if change else 'unmodified'}{', no kubectl' if env else ''}) fails:\n{result.stderr}"
    return None


def main():
    cases = [(None, False, None), (None, False, {"VALIDATE_KUBECTL": ""})]
    cases += [(v, False, None) for v in VARIATIONS] + [(b, True, None) for b in BREAKAGES]
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = pool.map(lambda c: case(tmp, c[0], *c[1]), enumerate(cases))
        failures = [r for r in results if r]
    for failure in failures:
        print(f"test_validate: {failure}", file=sys.stderr)
    print(f"test_validate: {len(BREAKAGES)} breakages, {len(VARIATIONS) + 2} passing cases: "
          f"{'FAILED' if failures else 'all as expected'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
