#!/usr/bin/env bash
# The whole of issue 28's study, resumable: the tuning grid, its choice committed, then every cell at its
# tuned rate, then the rerun of the earliest cells. Each finished run is committed as it lands; rerunning
# this script skips them. Run from a separate worktree, in the background:
#   nohup bash repro/campaign.sh > study_runs/campaign.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" repro/study.py run --grid tuning --commit
"$PYTHON" repro/study.py report --grid tuning > /dev/null
git add repro/TUNING.md repro/results/tuning/chosen_rates.json
git diff --cached --quiet || git commit -q -m "study tuning: the chosen rates" -- repro/TUNING.md repro/results/tuning/chosen_rates.json
"$PYTHON" repro/study.py run --grid final --commit
"$PYTHON" repro/study.py run --grid rerun --commit
"$PYTHON" repro/study.py report --grid final > /dev/null
git add REPRODUCTION.md repro/figures/params_vs_bleu.png
git diff --cached --quiet || git commit -q -m "study final: REPRODUCTION.md regenerated" -- REPRODUCTION.md repro/figures/params_vs_bleu.png
