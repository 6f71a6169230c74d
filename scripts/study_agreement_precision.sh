#!/usr/bin/env bash
# The precision study of docs/analyses/agreement.md: the built-in model's routing in float32
# (generate, KV cache) vs a bfloat16 replay of exactly the same tokens, over the built-in prompts.
# Writes docs/results/agreement/{results.json, fp32_replay/results.json}; then run
#   python scripts/findings_agreement.py
# Usage: scripts/study_agreement_precision.sh [WORKDIR] [GENERATE]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-runs/agreement-precision}"
GEN="${2:-16}"
PY="${PYTHON:-.venv/bin/python}"
PROMPTS=moescope/data/prompts/tasks.jsonl
M="$PY -m moescope.cli"
$M capture --data "$PROMPTS" --out "$WORK/fp32" --dtype float32 --generate "$GEN" --router-scores logits --overwrite
$M capture --replay "$WORK/fp32" --out "$WORK/fp32-replay" --dtype float32 --router-scores logits --overwrite
$M capture --replay "$WORK/fp32" --out "$WORK/bf16-replay" --dtype bfloat16 --router-scores logits --overwrite
$M analyze agreement "$WORK/fp32" "$WORK/bf16-replay" --out "$WORK/agreement-bf16"
$M analyze agreement "$WORK/fp32" "$WORK/fp32-replay" --out "$WORK/agreement-fp32"
mkdir -p docs/results/agreement/fp32_replay
cp "$WORK/agreement-bf16/results.json" docs/results/agreement/results.json
cp "$WORK/agreement-fp32/results.json" docs/results/agreement/fp32_replay/results.json
