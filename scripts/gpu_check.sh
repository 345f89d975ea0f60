#!/usr/bin/env bash
# The GPU check. GPU support (device="cuda": NCCL, model and KV cache on the GPU, the CUDA attention
# kernels) is written but unverified until this script has passed on a machine with a GPU.
#
#   scripts/gpu_check.sh            # PY=path/to/python to use another interpreter (default .venv/bin/python, else python3)
#
# 1. tests/test_gpu.py: the CUDA kernels against the reference, the engine on cuda against
#    transformers (SP 1; SP 2-4 and TP 2, a GPU per rank where there are enough, else sharing one);
# 2. `seqpar generate --device cuda` end to end on the default model, a short prompt and a ~4K-token
#    document prefilled in chunks: greedy tokens equal to the CPU engine's (fp32 on both).
# Exits non-zero on any failure, and when no GPU is visible (nothing would have been checked).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"

GPUS=$("$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: FAILED: no CUDA GPU visible (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
             "nothing was checked")
n = torch.cuda.device_count()
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {n} x {torch.cuda.get_device_name(0)}",
      file=sys.stderr)
print(n)
EOF
)

echo "gpu_check: 1/2 tests/test_gpu.py" >&2
"$PY" -m pytest -q -rs tests/test_gpu.py

echo "gpu_check: 2/2 seqpar generate --device cuda, against --device cpu" >&2
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
DOC=seqpar/data/harrowmere.txt  # the demo's document, ~4K tokens
GREEDY=(--temperature 0 --json)
run() {  # run NAME ARGS...: one generate, its JSON in $OUT/NAME.json
    local name=$1; shift
    "$PY" -m seqpar generate "$@" "${GREEDY[@]}" > "$OUT/$name.json"
}
run short-cpu --device cpu --prompt "The capital of France is" --max-tokens 16
run short-cuda --device cuda --prompt "The capital of France is" --max-tokens 16
run doc-cpu --device cpu --prompt-file "$DOC" --max-tokens 8 --max-num-batched-tokens 1024
run doc-cuda --device cuda --prompt-file "$DOC" --max-tokens 8 --max-num-batched-tokens 1024
PAIRS="short-cpu:short-cuda doc-cpu:doc-cuda"
if [ "$GPUS" -ge 2 ]; then
    run short-cuda-sp2 --device cuda --sp 2 --prompt "The capital of France is" --max-tokens 16
    run doc-cuda-sp2 --device cuda --sp 2 --prompt-file "$DOC" --max-tokens 8 --max-num-batched-tokens 1024
    PAIRS="$PAIRS short-cpu:short-cuda-sp2 doc-cpu:doc-cuda-sp2"
else
    echo "gpu_check: one GPU: seqpar generate --device cuda --sp 2 not run" >&2
fi

"$PY" - "$OUT" $PAIRS <<'EOF'
import json
import sys

out, failed = sys.argv[1], False
for pair in sys.argv[2:]:
    ref, got = (json.load(open(f"{out}/{name}.json")) for name in pair.split(":"))
    same = ref["token_ids"] == got["token_ids"]
    failed |= not same
    print(f"gpu_check: {pair.replace(':', ' vs ')}: {'same tokens' if same else 'DIFFERENT'} "
          f"{got['token_ids']} {got['text']!r}", file=sys.stderr)
    if not same:
        print(f"gpu_check:   expected {ref['token_ids']} {ref['text']!r}", file=sys.stderr)
sys.exit("gpu_check: FAILED: greedy tokens on cuda differ from the CPU engine's" if failed else 0)
EOF
echo "gpu_check: PASSED" >&2
