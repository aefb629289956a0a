#!/usr/bin/env bash
# Peer environments of the fidelity harness (never project dependencies): one venv with anomalib 2.7.0 (its own
# torch), which also runs the official MuSc / AA-CLIP checkouts, and untouched checkouts of the official repos.
#
# Checkouts: for each repo, FIDELITY_<NAME>_SRC may name a local clone or git dir to clone from (e.g. a mirror
# fetched beforehand on a machine without GitHub access); otherwise it is cloned from GitHub (needs the network).
#   FIDELITY_MUSC_SRC, FIDELITY_AACLIP_SRC, FIDELITY_PROMPTAD_SRC, FIDELITY_ANOMALYDINO_SRC
# Everything goes under $FIDELITY_DIR (default /tmp/fidelity): anomalib/ (venv), src/<repo>/ (checkouts).
set -euo pipefail
D=${FIDELITY_DIR:-/tmp/fidelity}
mkdir -p "$D/src"
PY=${PYTHON:-python3}

if [ ! -x "$D/anomalib/bin/python" ] || ! "$D/anomalib/bin/python" -c "import anomalib, open_clip, timm" 2>/dev/null; then
  echo "setup_peers: venv $D/anomalib (torch 2.14.1, anomalib 2.7.0, open_clip, timm, FrEIA)"
  "$PY" -m venv "$D/anomalib"
  "$D/anomalib/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 anomalib==2.7.0
  "$D/anomalib/bin/pip" install -q open_clip_torch timm FrEIA tqdm scikit-learn
fi

clone() {  # name url env-var
  local name=$1 url=$2 var=$3 from
  from=${!var:-$url}
  if [ -d "$D/src/$name/.git" ]; then echo "setup_peers: $name present ($(git -C "$D/src/$name" rev-parse --short HEAD))"; return; fi
  echo "setup_peers: clone $name from $from"
  git clone -q "$from" "$D/src/$name"
}
clone MuSc https://github.com/xrli-U/MuSc FIDELITY_MUSC_SRC
clone AA-CLIP https://github.com/Mwxinnn/AA-CLIP FIDELITY_AACLIP_SRC
clone PromptAD https://github.com/FuNz-0/PromptAD FIDELITY_PROMPTAD_SRC
clone AnomalyDINO https://github.com/dammsi/AnomalyDINO FIDELITY_ANOMALYDINO_SRC
echo "setup_peers: done ($D)"
