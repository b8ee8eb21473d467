#!/usr/bin/env bash
# On a GPU machine (see benchmarks/README.md): install the carried wheels, then run benchmarks/run_device.py.
# Usage: bash benchmarks/device.sh llama deepseek [--budget-gib 16] [--oom-gib 8] [--paper-steps 4]
set -euo pipefail
# Installed once per machine (a call may run this script twice).
if compgen -G ".whl/*.whl" > /dev/null; then
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
# The peer's wheels (run_device.py --peer) apart: they pin an older datasets than the stages'.
if compgen -G ".whl/peer/*.whl" > /dev/null; then
  [ -d /tmp/peer-site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/peer-site .whl/peer/*.whl
  export PEER_SITE=/tmp/peer-site UNSLOTH_DISABLE_STATISTICS=1
fi
export PYTHONUNBUFFERED=1 HF_HUB_CACHE=$PWD/.carry/hf/hub HF_HUB_OFFLINE=1
export OUT=${OUT:-$PWD/out}
# DVCLive needs a commit, and the tests read the committed params.yaml: commit the tree as it came.
git add -A && git -c user.email=d@d -c user.name=d commit -q --allow-empty -m run
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv > "$OUT/gpu.csv"
python3 -c "import torch, transformers, peft, bitsandbytes, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'transformers': transformers.__version__, 'peft': peft.__version__, 'bitsandbytes': bitsandbytes.__version__}))" > "$OUT/versions.json"
cat "$OUT/gpu.csv" "$OUT/versions.json"
python3 benchmarks/run_device.py "$@"
