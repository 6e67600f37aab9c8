#!/usr/bin/env bash
# Here (a machine with pip access): fetch the wheels the GPU machine lacks into .whl/ (gitignored).
# The device image has python 3.12 with torch, numpy, scipy, safetensors, tqdm, click and pyyaml;
# it lacks sd-mecha, lapx and sd-mecha's fuzzy-matching dependencies. About 7 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "sd-mecha==1.1.8" "lapx==0.11.1" "fuzzywuzzy==0.18.0" "python-Levenshtein==0.27.5" "Levenshtein==0.27.5" \
  "rapidfuzz==3.14.6"
ls .whl
