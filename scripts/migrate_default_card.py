"""One-off (kept for provenance): give the default model's older card.json the ``training`` section
that `python -m moescope.train.export --remeasure` needs, without the training run directory.

    .venv/bin/python scripts/migrate_default_card.py --corpus runs/corpus

The older card kept only measured figures in card.json; the training facts were in README.md only.
This script rebuilds them from configs/default-model.yaml (the run's config), the shipped weights
(parameter counts, size), the rebuilt corpus's corpus.json (data table) and, for the two facts no file
but the README holds (training hours, expert load at the end of training), the README itself. It then
renders the new card and refuses to write unless every training section (architecture, training,
data, curves, expert load) comes out identical to the older README, so nothing was retyped wrongly.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "moescope" / "data" / "default_model"
SECTIONS = ("## Architecture", "## Training", "## Data", "## Training curves",
            "## Expert load at the end of training (per layer)")


def _sections(readme: str) -> dict[str, str]:
    """Markdown sections (heading -> text up to the next heading) of the given headings."""
    parts = re.split(r"(?m)^(?=## )", readme)
    heading = lambda p: p.split("\n", 1)[0]  # noqa: E731
    return {h: p.strip() for p in parts for h in SECTIONS if heading(p) == h}


def main(corpus: Path) -> None:
    from moescope.capture.loading import load_model
    from moescope.train.card import render_card
    from moescope.train.modeling import count_parameters

    old_card = json.loads((MODEL / "card.json").read_text())
    if "training" in old_card:
        sys.exit("card.json already has a training section: nothing to migrate")
    readme = (MODEL / "README.md").read_text()
    cfg = yaml.safe_load((REPO / "configs" / "default-model.yaml").read_text())
    corpus_info = json.loads((corpus / "corpus.json").read_text())
    model, _ = load_model(str(MODEL))
    params = count_parameters(model)
    hours = float(re.search(r"training time: ([\d.]+) hours", readme).group(1))
    tokens, steps = (int(x.replace(",", "")) for x in re.search(r"tokens seen: ([\d,]+) .*?([\d,]+) steps", readme).groups())
    load = {m[0]: {"load_entropy": float(m[1]), "max_over_fair": float(m[2]), "dead_experts": int(m[3])}
            for m in re.findall(r"(?m)^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", readme)}
    training = {
        "config": cfg, "tokens": tokens, "steps": steps, "hours": hours,
        "parameters": {"total": params["total"], "active": params["active"]},
        "vocab_size": corpus_info["tokenizer"]["vocab_size"],
        "stored_mb": round(sum(p.stat().st_size for p in MODEL.glob("*.safetensors")) / 1e6, 1),
        "data": [{"name": d["name"], "description": d["description"], "licence": d["licence"],
                  "train_tokens": d["train"]["tokens"]} for d in corpus_info["domains"]],
        "end_of_training_load": load,
        "training_curves": "training_curves.png",
    }
    assert tokens == steps * cfg["optim"]["batch_size"] * cfg["data"]["seq_len"], "config does not match the run"
    new = {"training": training, "perplexity": old_card["perplexity"]}
    old_s, new_s = _sections(readme), _sections(render_card(new))
    for h in SECTIONS:
        if old_s.get(h) != new_s.get(h):
            sys.exit(f"section {h!r} differs from the older README:\n--- old\n{old_s.get(h)}\n--- new\n{new_s.get(h)}")
    card = {"training": training, **old_card}
    (MODEL / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"added the training section to {MODEL / 'card.json'}; every training section of README.md reproduced")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[args.index("--corpus") + 1]) if "--corpus" in args else REPO / "runs" / "corpus")
