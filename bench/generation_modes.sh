#!/usr/bin/env bash
# Generated tokens per second of launch/evaluate.py under 2-rank ZeRO-3: gathered vs synced, same adapter,
# same inputs, measured in one run. Usage: bash bench/generation_modes.sh ADAPTER_DIR [NUM_INPUTS]
set -euo pipefail
cd "$(dirname "$0")/.."
adapter=${1:?adapter directory (e.g. outputs/default/adapter)}
num=${2:-64}
out=$(mktemp -d)
config="$out/zero3.json"
# tiny models are only partitioned with a zero persistence threshold
.venv/bin/python - "$config" <<'PY'
import json, sys
c = json.load(open("ds_configs/zero3.json"))
c["zero_optimization"]["stage3_param_persistence_threshold"] = 0
json.dump(c, open(sys.argv[1], "w"))
PY
for mode in gathered synced; do
  .venv/bin/deepspeed --num_gpus 2 launch/evaluate.py --ds_config "$config" --task e2e --split validation \
    --adapter "$adapter" --max_eval_samples "$num" --output_dir "$out/$mode" --eval_generation "$mode" \
    > "$out/$mode.log" 2>&1
done
.venv/bin/python - "$out" <<'PY'
import json, sys
rates = {m: json.load(open(f"{sys.argv[1]}/{m}/metrics.json")) for m in ("gathered", "synced")}
same = open(f"{sys.argv[1]}/gathered/predictions.jsonl").read() == open(f"{sys.argv[1]}/synced/predictions.jsonl").read()
for mode, m in rates.items():
    print(f"{mode:9s} {m['generated_tokens']} tokens in {m['generation_seconds']:.1f}s: {m['generated_tokens_per_second']:.0f} tokens/s")
print(f"gathered / synced = {rates['gathered']['generated_tokens_per_second'] / rates['synced']['generated_tokens_per_second']:.2f}x; identical predictions: {same}")
PY
