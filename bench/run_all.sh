#!/usr/bin/env bash
# Run the benchmarks as recorded in bench/results/ (the CPU settings of bench/PERFORMANCE.md); each results
# file starts with its command, date and machine. On a GPU, drop the size flags.
#   bench/run_all.sh                      # everything (about 40 minutes on 2 CPU cores)
#   bench/run_all.sh pdpo_vs_trl generate # only the results files whose name starts with these
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p bench/results
only=("$@")
run() {  # run NAME TAG ARGS...: python bench/NAME.py ARGS > bench/results/NAME[-TAG].txt
  local name=$1 tag=$2; shift 2
  local file="${name}${tag:+-$tag}"
  if ((${#only[@]})); then
    local hit=0; for o in "${only[@]}"; do [[ $file == "$o"* ]] && hit=1; done
    ((hit)) || return 0
  fi
  {
    echo "# command: python bench/${name}.py $*"
    echo "# date: $(date -u +%Y-%m-%d) ($(date -u +%H:%M) UTC)"
    echo "# machine: $(nproc) CPUs, $(python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'); shared with other jobs"
    python "bench/${name}.py" "$@" 2> >(grep -v '^USDT' >&2)
  } > "bench/results/${file}.txt" 2>&1
  echo "wrote bench/results/${file}.txt"
}
run memory_plan validate --validate
run memory_plan gpt-j-6b --model bench/configs/gpt-j-6b.json --n-user-tokens 1
run memory_plan gpt-j-6b-tu10 --model bench/configs/gpt-j-6b.json --n-user-tokens 10
run memory_plan llama-7b --model bench/configs/llama-7b.json --n-user-tokens 1
run memory_plan llama-7b-tu10 --model bench/configs/llama-7b.json --n-user-tokens 10
run memory_plan llama-7b-no-dropout --model bench/configs/llama-7b.json --n-user-tokens 10 --lora-dropout 0
run model_vs_hf fp32 --dtypes fp32 --reps 3
run model_vs_hf bf16 --dtypes bf16 --seq 128 --batch 1 --reps 3   # bf16 is emulated (slow) on AVX2-only CPUs
run generate "" --reps 3
run grad_checkpointing "" --reps 3
run shared_prompt ""
run shared_prompt long-responses --prompt 20 --response 200 --reps 3
run profile_step ""
run pdpo_vs_trl "" --rounds 5
run generic_sampling ""
