#!/usr/bin/env bash
# Install moto's standalone S3 server (and boto3, to create buckets) into DEST/s3-server, a venv of its own
# (why: scripts/s3-server-requirements.txt). Idempotent: does nothing when the pinned versions are there.
#
# Usage: scripts/fetch-s3-server.sh DEST      (e.g. .tools -> .tools/s3-server/bin/moto_server)
# Env:   PY (default python3): the interpreter that creates the venv
set -euo pipefail

DEST="${1:?usage: $0 DEST}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQ="$ROOT/scripts/s3-server-requirements.txt"
VENV="$DEST/s3-server"
STAMP="$VENV/.installed-$(md5sum "$REQ" | cut -c1-12)"

if [[ -f "$STAMP" && -x "$VENV/bin/moto_server" ]]; then
    echo "moto_server already in $VENV/bin"
    exit 0
fi
"${PY:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | sed -e '/is ignored: it is neither/d'
"$VENV/bin/python" -m pip install -q -r "$REQ" 2>&1 | sed -e '/is ignored: it is neither/d'
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "moto_server in $VENV/bin"
