#!/usr/bin/env bash
# The GPU path, end to end, in one script (under 8 minutes on one NVIDIA GPU):
#
#   benchmarks/gpu_check.sh              # on a machine with CUDA
#   benchmarks/gpu_check.sh --cpu        # the same steps, tiny, on the CPU: a smoke test (CI runs it)
#   benchmarks/gpu_check.sh --no-peers   # skip the sparsify timing (no network for its virtualenv)
#
# Steps (each PASS / FAIL / SKIP in the summary table at the end; exit status 1 if any FAILs):
#   env       torch, CUDA, the GPUs and their bf16 support
#   train     a TopK and a JumpReLU SAE, one sweep sharing one pass of the bundled SmolLM2-135M,
#             LM and SAE encoder in bfloat16 (--lm-dtype bfloat16 --autocast bfloat16), activation
#             cache on; checks each SAE's held-out FVU, dead fraction and CE-recovered interval
#   analyze   every latent's dashboard for the TopK SAE, then publishes it into a fresh SQLite store
#             and checks every latent is there
#   ddp       a 2-process NCCL DDP run (torchrun) from the same activation cache, if there are two
#             GPUs; with one it says so and skips
#   speed     our trainer against EleutherAI sparsify on the same cached activations, same batches,
#             same schedule (benchmarks/train_vs_peers.py --trainers ours-sparsify,sparsify); needs
#             the peers' virtualenv (.peers/venv, created with pip on first use)
#
# Everything is written under a fresh temporary folder (kept with --keep); the bundled model is
# converted into SAE_ATLAS_MODEL_CACHE_DIR (default data/models) once. Run from anywhere.
set -uo pipefail

MODE=gpu
PEERS=1
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --no-peers) PEERS=0 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown option $arg (use --cpu, --no-peers, --keep)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
WORK="$(mktemp -d -t gpu-check-XXXXXX)"
export SAE_ATLAS_DATA_DIR="$WORK/data"
export SAE_ATLAS_MODEL_CACHE_DIR="${SAE_ATLAS_MODEL_CACHE_DIR:-$REPO/data/models}"
export SAE_ATLAS_DATABASE_URL="sqlite:///$WORK/data/atlas.db"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
SUMMARY="$WORK/summary.tsv"
: > "$SUMMARY"
cd "$REPO"
[[ $KEEP == 1 ]] || trap 'rm -rf "$WORK"' EXIT

if [[ $MODE == gpu ]]; then
  DEVICE=cuda; TOKENS=2000000; WIDTH=4608; ANALYZE_TOKENS=200000; EVAL=65536; CE=512; BATCH=4096
  LM_DTYPE=bfloat16; SPEED_TOKENS=8000000
else
  # The smoke test: the same steps and code paths, tiny. The SAEs still train with bf16 autocast,
  # but the LM runs in float32: bf16 LM kernels on CPUs without AVX-512 BF16 are ~10x slower.
  DEVICE=cpu; TOKENS=8192; WIDTH=1152; ANALYZE_TOKENS=3000; EVAL=1024; CE=4; BATCH=1024
  LM_DTYPE=float32; SPEED_TOKENS=0
fi
COMMON=(--model smollm2-135m --site resid_post.15 --tokens "$TOKENS" --batch-size "$BATCH" --device "$DEVICE"
        --lm-dtype "$LM_DTYPE" --autocast bfloat16 --cache-activations --eval-tokens "$EVAL" --ce-contexts "$CE"
        --checkpoint-every 0)

# record NAME STATUS SECONDS DETAIL
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$SUMMARY"; echo "== $1: $2 ($3 s) $4"; }
now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

echo "gpu_check ($MODE) in $WORK; python $PY"

# --- env ----------------------------------------------------------------------------------------
t=$(now)
ENV_OUT=$("$PY" - "$MODE" <<'EOF' 2>&1
import sys, torch
mode = sys.argv[1]
if mode == "gpu":
    if not torch.cuda.is_available():
        sys.exit("CUDA is not available to torch " + torch.__version__ + " (run with --cpu for the CPU smoke test)")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}, "
          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'NO'}")
    print(f"NGPU={len(names)}")
else:
    print(f"torch {torch.__version__}, CPU only ({torch.get_num_threads()} threads)")
    print("NGPU=0")
EOF
)
rc=$?
NGPU=$(echo "$ENV_OUT" | sed -n 's/^NGPU=//p')
record env "$([[ $rc == 0 ]] && echo PASS || echo FAIL)" "$(since "$t")" "$(echo "$ENV_OUT" | head -1)"
if [[ $rc != 0 ]]; then
  column -t -s $'\t' "$SUMMARY"; exit 1
fi

# --- train: TopK and JumpReLU in one sweep, bf16 ---------------------------------------------------
t=$(now)
if "$PY" -m app.cli train "${COMMON[@]}" --arch topk,jumprelu --width "$WIDTH" --k 32 --out "$WORK/sweep" \
    > "$WORK/train.log" 2>&1; then
  DETAIL=$("$PY" - "$WORK/sweep" <<'EOF'
import json, sys
from pathlib import Path
bad, parts = [], []
for folder in sorted(Path(sys.argv[1]).iterdir()):
    if not (folder / "metrics.json").is_file():
        continue
    m = json.loads((folder / "metrics.json").read_text())
    arch = folder.name.split("-")[1]
    parts.append(f"{arch} FVU {m['fvu']:.3f} L0 {m['l0']:.1f} dead {m['dead_frac']:.1%} "
                 f"CE rec {m.get('ce_recovered', float('nan')):.1%}±{m.get('ce_recovered_ci95', float('nan')):.1%}")
    if not (m["fvu"] < 0.9 and m["dead_frac"] < 0.9 and "ce_recovered_ci95" in m):
        bad.append(arch)
print("; ".join(parts) + (f" -- out of range: {bad}" if bad else ""))
sys.exit(1 if bad or len(parts) != 2 else 0)
EOF
  )
  record train "$([[ $? == 0 ]] && echo PASS || echo FAIL)" "$(since "$t")" "$DETAIL"
else
  record train FAIL "$(since "$t")" "$(tail -1 "$WORK/train.log")"
fi
TOPK_DIR=$(ls -d "$WORK"/sweep/*topk* 2>/dev/null | head -1)

# --- analyze and publish one ----------------------------------------------------------------------
t=$(now)
if [[ -n "$TOPK_DIR" ]] && "$PY" -m app.cli db upgrade > "$WORK/analyze.log" 2>&1 \
   && "$PY" -m app.cli analyze "$TOPK_DIR" --tokens "$ANALYZE_TOKENS" --device "$DEVICE" --lm-dtype "$LM_DTYPE" \
        --publish --name gpu-check-topk >> "$WORK/analyze.log" 2>&1; then
  DETAIL=$("$PY" - <<'EOF'
import sys
from store.db import session_scope
from store.models import SAE, Feature
from sqlalchemy import func, select
with session_scope() as s:
    sae = s.scalar(select(SAE).where(SAE.name == "gpu-check-topk"))
    n = s.scalar(select(func.count()).select_from(Feature).where(Feature.sae_id == sae.id)) if sae else 0
    print(f"published {sae.name if sae else 'nothing'}: {n} latents, status {sae.status if sae else '-'}")
    sys.exit(0 if sae is not None and n == sae.d_sae else 1)
EOF
  )
  record analyze "$([[ $? == 0 ]] && echo PASS || echo FAIL)" "$(since "$t")" "$DETAIL"
else
  record analyze FAIL "$(since "$t")" "$(tail -1 "$WORK/analyze.log")"
fi

# --- DDP ------------------------------------------------------------------------------------------
t=$(now)
if [[ $MODE == gpu && ${NGPU:-0} -ge 2 ]]; then
  TORCHRUN="$(dirname "$PY")/torchrun"
  if "$TORCHRUN" --standalone --nproc_per_node 2 -m app.cli train "${COMMON[@]}" --arch topk --width "$WIDTH" --k 32 \
      --out "$WORK/ddp" > "$WORK/ddp.log" 2>&1; then
    record ddp PASS "$(since "$t")" "$("$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); print(f\"2 x NCCL: FVU {m['fvu']:.3f}, world size {json.load(open(sys.argv[2]))['sae_atlas']['training']['world_size']}\")" "$WORK/ddp/metrics.json" "$WORK/ddp/cfg.json" 2>&1)"
  else
    record ddp FAIL "$(since "$t")" "$(tail -1 "$WORK/ddp.log")"
  fi
elif [[ $MODE == gpu ]]; then
  record ddp SKIP 0 "one GPU: the 2-process DDP run needs two (gloo DDP on CPU is tests/test_train.py)"
else
  record ddp SKIP 0 "--cpu: 2-process DDP on CPU is covered by tests/test_train.py (gloo)"
fi

# --- speed against sparsify -----------------------------------------------------------------------
t=$(now)
if [[ $MODE == gpu && $PEERS == 1 ]]; then
  if "$PY" benchmarks/train_vs_peers.py --device cuda --trainers ours-sparsify,sparsify --tokens "$SPEED_TOKENS" \
      --rounds 2 --results "$WORK/train_vs_peers.json" > "$WORK/speed.log" 2>&1; then
    record speed PASS "$(since "$t")" "$(grep -m1 'vs EleutherAI sparsify' "$WORK/speed.log")"
  else
    record speed FAIL "$(since "$t")" "$(tail -1 "$WORK/speed.log")"
  fi
else
  record speed SKIP 0 "$([[ $MODE == cpu ]] && echo '--cpu: the CPU comparison is benchmarks/train_vs_peers.py' || echo '--no-peers')"
fi

# --- summary --------------------------------------------------------------------------------------
echo
echo "gpu_check summary ($MODE)"
"$PY" - "$SUMMARY" <<'EOF'
import sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
head = ("step", "status", "seconds", "detail")
w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
print(f"{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:>{w[2]}}  {head[3]}")
for r in rows:
    print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}")
EOF
[[ $KEEP == 1 ]] && echo "outputs kept in $WORK"
if grep -q $'\tFAIL\t' "$SUMMARY"; then exit 1; fi
exit 0
