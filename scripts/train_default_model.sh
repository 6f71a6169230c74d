#!/usr/bin/env bash
# Reproduces the built-in default model (moescope/data/default_model) from scratch:
# corpus (20 s) -> training (1.2 h on 2 CPU cores; resumes if interrupted) -> export with model card (1 min).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
.venv/bin/moescope data --out runs/corpus --chars-per-domain 8000000
.venv/bin/moescope train --config configs/default-model.yaml --out runs/default-model
.venv/bin/python -m moescope.train.export runs/default-model moescope/data/default_model
