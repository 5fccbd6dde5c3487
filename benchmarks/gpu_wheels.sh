#!/usr/bin/env bash
# Wheels for a GPU machine without a network: its image has torch, but not the pure-Python
# packages ablate needs (fvcore and its iopath, yacs and termcolor; torch-fidelity). Built
# here, where pip reaches its registry, into .whl/ (ignored by git); copy the repository with
# .whl/ to the GPU machine, and benchmarks/gpu_check.sh installs them there (pip --target
# /tmp/site, on PYTHONPATH) before it runs its sections. Without fvcore every benchmark fails
# at import. Where `pip install -e .` works on the GPU machine, this is not needed.
#   bash benchmarks/gpu_wheels.sh     # once; then copy .whl/ along with the repository
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
# The versions the tests run with (pip show); --no-deps: the image has the rest.
python3 -m pip wheel -q --no-deps -w .whl fvcore==0.1.5.post20221221 iopath==0.1.10 yacs==0.1.8 \
  termcolor==3.3.0 torch-fidelity==0.4.0
ls -l .whl
