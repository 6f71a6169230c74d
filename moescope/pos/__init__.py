"""Part-of-speech tagging of input texts and word-to-subword alignment (for `moescope analyze pos`).

- :mod:`moescope.pos.tagging`: texts -> words with character spans and Universal POS tags,
  from spaCy (silver) or CoNLL-U files (gold);
- :mod:`moescope.pos.align`: word spans -> a tag per subword token of a trace;
- :mod:`moescope.pos.pipeline`: tag, capture and align into a tagged trace;
- :mod:`moescope.pos.sample`: how the built-in tagged sample (moescope/data/pos/) was built.
"""
