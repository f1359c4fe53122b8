#!/usr/bin/env bash
# Install Superset into its own virtualenv (<project>/.venv-superset) and Chromium + chromedriver for the
# browser checks. Idempotent: the virtualenv is rebuilt only when requirements-superset.txt changes.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$ROOT/.venv-superset"
REQUIREMENTS="$HERE/requirements-superset.txt"
PYTHON="${FLEAD_SUPERSET_PYTHON:-python3}"

requirements_hash="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
stamp="$VENV/.flead-requirements-$requirements_hash"

if [[ -f "$stamp" ]]; then
  echo "superset: $VENV is up to date"
else
  echo "superset: installing into $VENV (about 820 MB)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet -r "$REQUIREMENTS"
  rm -f "$VENV"/.flead-requirements-*
  touch "$stamp"
  echo "superset: installed $("$VENV/bin/pip" show apache-superset | grep ^Version)"
fi

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  echo "superset: chromium and chromedriver present"
else
  echo "superset: installing chromium and chromium-driver with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
