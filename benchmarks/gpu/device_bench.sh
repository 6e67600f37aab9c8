#!/usr/bin/env bash
# On the GPU machine (the device tool's `run`, with carry [".whl"]): install the carried wheels,
# build the SDXL pair there (16 cores), then time the plain merge and ours with the pre-pass
# products on the GPU. Output goes to $OUT/bench.log.
#   run(command="bash benchmarks/gpu/device_bench.sh", carry=[".whl"], timeout_s=590)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 benchmarks/bench_merge.py sdxl-sgm --kinds plain,ours,ours-bf16 --no-quality --device cuda 2>&1 | tee "${OUT:-.}/bench.log"
