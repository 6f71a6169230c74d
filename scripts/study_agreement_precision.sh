#!/usr/bin/env bash
# The precision study of docs/analyses/agreement.md: the built-in model's routing in float32
# (generate, KV cache) vs a bfloat16 replay of exactly the same tokens, over the built-in prompts.
# Also a bfloat16 generate() run of the same prompts: its greedy continuations may diverge, and
# agreement compares each pair up to the divergence.
# Writes docs/results/agreement/{results.json, fp32_replay/, bf16_generate/}; then run
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
$M capture --data "$PROMPTS" --out "$WORK/bf16" --dtype bfloat16 --generate "$GEN" --router-scores logits --overwrite
$M analyze agreement "$WORK/fp32" "$WORK/bf16" --out "$WORK/agreement-bf16-generate"
mkdir -p docs/results/agreement/fp32_replay docs/results/agreement/bf16_generate
cp "$WORK/agreement-bf16/results.json" docs/results/agreement/results.json
cp "$WORK/agreement-fp32/results.json" docs/results/agreement/fp32_replay/results.json
cp "$WORK/agreement-bf16-generate/results.json" docs/results/agreement/bf16_generate/results.json
