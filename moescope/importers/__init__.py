"""Importers: routing logged by serving engines, written as moescope traces.

- :mod:`moescope.importers.vllm`: the routed experts vLLM returns with
  ``--enable-return-routed-experts`` (JSONL / .npz / .npy per request).
- :mod:`moescope.importers.sglang`: SGLang's expert distribution recorder dumps (per_token).

Engines record expert ids, not the weights applied to them: imported traces say so
(``capture.has_weights = false``, a null ``weights`` column), and analyses that need weights
refuse them with :meth:`moescope.store.reader.Trace.require_weights`.
"""
