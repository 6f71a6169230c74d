"""Importers: routing logged by serving engines, written as moescope traces.

- :mod:`moescope.importers.responses`: vLLM and SGLang responses with routed experts, saved
  one JSON object a line exactly as the engine returned them (``--model`` gives the layout).
- :mod:`moescope.importers.vllm`: those responses, or moescope's older flat JSONL / .npz / .npy.
- :mod:`moescope.importers.sglang`: those responses, or the expert distribution recorder's
  per_token dumps.
- :mod:`moescope.importers.engine_model`: the served model's decoder layers, MoE layers, k, E
  and tokenizer, from its config (built on the meta device; no weights).

Engines record expert ids, not the weights applied to them: imported traces say so
(``capture.has_weights = false``, a null ``weights`` column), and analyses that need weights
refuse them with :meth:`moescope.store.reader.Trace.require_weights`.
"""
