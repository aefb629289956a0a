#!/usr/bin/env bash
# The fidelity harness in one command, from a fresh clone: builds the peer environments and official checkouts
# (scripts/fidelity/setup_peers.sh; kept under $FIDELITY_DIR, default /tmp/fidelity, and skipped when already
# there), then runs every check once (scripts/fidelity/run.py) and regenerates docs/FIDELITY.md.
#
#   scripts/fidelity/run_all.sh [run.py options, e.g. --only musc,knn]
#
# Our side runs with $FIDELITY_OURS_PYTHON, else the clone's .venv (scripts/setup.sh), else python3; the peers
# with the venv that setup_peers.sh builds. Offline: FIDELITY_<NAME>_SRC=<local clone or git dir> (setup_peers.sh).
# Exit code: run.py's (1 if a compared tensor is off its tolerance, 2 if the peers are missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
bash scripts/fidelity/setup_peers.sh
setup=$(( $(date +%s) - start ))
PY=${FIDELITY_OURS_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "run_all: peers ready in ${setup} s; harness with $PY"
export FIDELITY_SETUP_SECONDS=$setup
exec "$PY" scripts/fidelity/run.py "$@"
