#!/usr/bin/env bash
# Every benchmark of bench/RESULTS.md, one after the other, on an otherwise idle machine.
# Usage: bash bench/run_all.sh [RESULTS_DIR]   (JSON and logs go to RESULTS_DIR, default bench/results)
# bench/generation_modes.sh needs a trained adapter: the default run's (outputs/default/adapter) is used
# when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
mkdir -p "$out"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
py=.venv/bin/python
torchrun() { "$py" -m torch.distributed.run --nproc_per_node 2 --master_port 29533 "$@"; }
quiet() { grep -v -e 'it/s' -e 'Warning' -e 'warn' -e '^\[' -e 'tokenize' -e 'filter' || true; }

echo "## machine"; lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Flags' | cut -c1-200; free -g | head -2
echo; echo "## training throughput, E2E, 1 process"
"$py" bench/train_throughput.py --task e2e --steps 20 --global_batch_size 32 --json "$out/train_e2e_1.json" 2>&1 | quiet
echo; echo "## training throughput, E2E, 2 ranks"
torchrun bench/train_throughput.py --task e2e --steps 20 --global_batch_size 32 --json "$out/train_e2e_2.json" 2>&1 | quiet
echo; echo "## training throughput, GSM8K, 1 process"
"$py" bench/train_throughput.py --task gsm8k --steps 8 --global_batch_size 16 --json "$out/train_gsm8k_1.json" 2>&1 | quiet
echo; echo "## training throughput, GSM8K, 2 ranks"
torchrun bench/train_throughput.py --task gsm8k --steps 8 --global_batch_size 16 --json "$out/train_gsm8k_2.json" 2>&1 | quiet
echo; echo "## real model (smollm2-135m): ours vs plain loop, HF Trainer, TRL SFTTrainer; E2E, 2 ranks, ZeRO-2"
"$py" bench/compare_trainers.py --task e2e --ranks 2 --rounds 2 --steps 8 --json "$out/trainers_e2e.json" 2>&1 | quiet
echo; echo "## same, ZeRO-3 (ds_configs/zero3.json)"
"$py" bench/compare_trainers.py --task e2e --ranks 2 --rounds 2 --steps 8 --ds_config ds_configs/zero3.json \
  --contenders hf_trainer ours --json "$out/trainers_e2e_zero3.json" 2>&1 | quiet
echo; echo "## same, DialogSum, ZeRO-2"
"$py" bench/compare_trainers.py --task dialogsum --ranks 2 --rounds 2 --steps 4 --json "$out/trainers_dialogsum.json" 2>&1 | quiet
echo; echo "## generation on the real model: batched vs per-example loop vs pipeline"
"$py" bench/generation_throughput.py --model smollm2-135m --num_inputs 64 --json "$out/generation_smollm2.json" 2>&1 | quiet
echo; echo "## profile, E2E, 1 process"
"$py" bench/profile_train_step.py --task e2e --steps 4 --warmup_steps 1 --global_batch_size 32 2>&1 | quiet
echo; echo "## generation: batched vs per-example loop"
"$py" bench/generation_throughput.py --num_inputs 128 --json "$out/generation.json" 2>&1 | quiet
if [ -d outputs/default/adapter ]; then
  echo; echo "## generation under 2-rank ZeRO-3: gathered vs synced"
  bash bench/generation_modes.sh outputs/default/adapter 64 2>&1 | quiet
fi
echo; echo "## memory plan, Llama-2-7b"
"$py" launch/plan_memory.py --model llama-2-7b --gpus 1 2 8 16
