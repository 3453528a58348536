#!/bin/bash
# One call on the `device` tool (a GPU machine with torch + triton, no package registry), run from the repo root:
#   carry: .whl (xxhash + gguf wheels, ggml-python sdist: see BENCHMARKS.md) and out (the merged tiny model)
# installs what the machine lacks into /tmp/site, then runs "$@" with it on PYTHONPATH.
set -e
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if [ ! -d /tmp/site/ggml ]; then            # a warm machine keeps /tmp between calls
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/ggml_python-*.tar.gz
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
"$@"
