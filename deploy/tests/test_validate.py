#!/usr/bin/env python3
"""The validator catches what it claims to: each breakage below, applied to a copy of the
repository's deployment files, must make validate.py fail naming the problem."""

import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
VALIDATE = ROOT / "deploy" / "tests" / "validate.py"

BREAKAGES = [
    # (file, text to replace, replacement, expected in the output)
    ("otel-config/gateway.yaml", "exporters: [otlphttp/loki, debug]",
     "exporters: [otlphttp/loki, kafka]", "undefined exporter 'kafka'"),
    ("otel-config/sidecar.yaml", "processors: [memory_limiter, batch]",
     "processors: [memory_limiter, batchy]", "undefined processor 'batchy'"),
    ("deploy/daemonset.yaml", "maxUnavailable: 1", "maxUnavailable: 1\n      maxSurgeTypo: 1",
     "DaemonSet/egress-collector"),
    ("deploy/daemonset.yaml", "add: [BPF, PERFMON]", "add: [BPF, PERFMON, SYS_ADMIN]",
     "beyond BPF and PERFMON"),
    ("deploy/daemonset.yaml", "privileged: false", "privileged: true", "must not be privileged"),
    ("deploy/otel-sidecar.yaml", "limit_mib: 200", "limit_mib: 300", "differs from"),
    ("docker-compose.yml", "  loki:\n", "  loki:\n    bogus_key: 1\n", "docker-compose.yml"),
    ("otel-config/demo/grafana/dashboards/egress-by-pod.json", '"uid": "loki"', '"uid": "elastic"',
     "unprovisioned data source"),
]


def copy_repo(dst):
    for name in ["deploy", "otel-config"]:
        shutil.copytree(ROOT / name, dst / name)
    shutil.copy(ROOT / "docker-compose.yml", dst / "docker-compose.yml")


def run(root):
    return subprocess.run([sys.executable, str(VALIDATE), str(root)], capture_output=True, text=True)


def main():
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = pathlib.Path(tmp) / "clean"
        copy_repo(clean)
        result = run(clean)
        if result.returncode != 0:
            failures.append(f"the unmodified copy fails:\n{result.stderr}")
        for i, (file, old, new, expected) in enumerate(BREAKAGES):
            root = pathlib.Path(tmp) / f"broken{i}"
            copy_repo(root)
            path = root / file
            text = path.read_text()
            if old not in text:
                failures.append(f"breakage {i}: {old!r} not found in {file}")
                continue
            path.write_text(text.replace(old, new, 1))
            result = run(root)
            if result.returncode == 0 or expected not in result.stderr:
                failures.append(f"breakage {i} ({file}: {new!r}) not reported as {expected!r}:\n{result.stderr}")
    for failure in failures:
        print(f"test_validate: {failure}", file=sys.stderr)
    print(f"test_validate: {len(BREAKAGES)} breakages: {'FAILED' if failures else 'all caught'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
