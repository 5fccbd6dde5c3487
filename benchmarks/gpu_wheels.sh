#!/usr/bin/env bash
# Wheels of the pure-Python packages ablate needs that the lent GPU machines' image lacks
# (fvcore and its iopath, yacs and termcolor; torch-fidelity), built here into .whl/ (ignored by
# git). A device call names .whl in its carry; benchmarks/gpu_check.sh installs them there
# (pip --target /tmp/site, on PYTHONPATH). Without fvcore every benchmark fails at import.
#   bash benchmarks/gpu_wheels.sh     # once per machine; then carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
# The versions this project is tested with (pip show); --no-deps: the image has the rest.
python3 -m pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 \
  termcolor==3.3.0 torch-fidelity==0.4.0
ls -l .whl
