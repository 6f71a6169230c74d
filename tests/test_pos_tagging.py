"""Tagging for the POS analysis: CoNLL-U (SpaceAfter, multiword tokens, empty nodes), spaCy, the built-in sample."""
from __future__ import annotations

import io

import pytest

from moescope.errors import DataError
from moescope.pos.pipeline import SAMPLE, tagged_input
from moescope.pos.tagging import UPOS_TAGS, TaggedText, conllu_text, parse_conllu, read_conllu, tag_texts

CONLLU = """\
# sent_id = a
# text = Don't stop, Bob.
1-2	Don't	_	_	_	_	_	_	_	_
1	Do	do	AUX	_	_	3	aux	_	_
2	n't	not	PART	_	_	3	advmod	_	_
3	stop	stop	VERB	_	_	0	root	_	SpaceAfter=No
4	,	,	PUNCT	_	_	5	punct	_	_
4.1	stopped	stop	VERB	_	_	_	_	_	_
5	Bob	Bob	PROPN	_	_	3	vocative	_	SpaceAfter=No
6	.	.	PUNCT	_	_	3	punct	_	_

# sent_id = b
1	du	_	_	_	_	_	_	_	_
1-2	au	_	_	_	_	_	_	_	SpacesAfter=\\s\\s
1	à	à	ADP	_	_	_	_	_	_
2	le	le	DET	_	_	_	_	_	_
3	bout	bout	NOUN	_	_	_	_	_	SpaceAfter=No
4	!	!	PUNCT	_	_	_	_	_	_

"""


def _parse(text: str, **kw) -> list[TaggedText]:
    return list(parse_conllu(io.StringIO(text), **kw))


def test_conllu_rebuilds_text_and_spans():
    first = _parse(CONLLU.split("\n\n# sent_id = b")[0] + "\n\n")[0]
    assert first.text == "Don't stop, Bob."
    assert first.forms == ("Don't", "stop", ",", "Bob", ".")
    # the multiword token is one surface word with its first syntactic word's tag; empty node 4.1 is skipped
    assert first.upos == ("AUX", "VERB", "PUNCT", "PROPN", "PUNCT")
    assert [first.text[a:b] for a, b in first.spans] == list(first.forms)
    assert first.spans[:2] == ((0, 5), (6, 10))
    assert first.meta == {"sent_id": "a"}


def test_conllu_join_mode_and_spaces_after():
    text = CONLLU.replace("1\tdu\t_\t_\t_\t_\t_\t_\t_\t_\n", "")
    a, b = _parse(text, mwt="join")
    assert a.upos[0] == "AUX+PART"
    assert b.text == "au  bout!"  # SpacesAfter=\s\s: two spaces; SpaceAfter=No before '!'
    assert b.upos == ("ADP+DET", "NOUN", "PUNCT") and b.spans == ((0, 2), (4, 8), (8, 9))


def test_conllu_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_conllu(tmp_path / "missing.conllu")
    bad = tmp_path / "bad.conllu"
    bad.write_text(CONLLU)  # sentence b has a word without a tag ('du' before its MWT line is malformed input)
    with pytest.raises(DataError, match="without a form or UPOS tag"):
        read_conllu(bad)
    empty = tmp_path / "empty.conllu"
    empty.write_text("# just a comment\n\n")
    with pytest.raises(DataError, match="no CoNLL-U sentence"):
        read_conllu(empty)


def test_conllu_round_trip_keeps_text_exactly():
    tagged = [TaggedText("Hello, world!  Next\tline", ((0, 5), (5, 6), (7, 12), (12, 13), (15, 19), (20, 24)),
                         ("INTJ", "PUNCT", "NOUN", "PUNCT", "ADJ", "NOUN"), meta={"sent_id": "x", "source": "test"})]
    back = _parse(conllu_text(tagged, comments=["header"]))
    assert back[0].text == tagged[0].text and back[0].spans == tagged[0].spans and back[0].upos == tagged[0].upos
    assert back[0].meta["source"] == "test"


def test_spacy_tags_words_with_exact_spans():
    texts = ["Don't stop: the quick-brown fox's den.  New line\nhere", "Python 3 runs code."]
    tagged = tag_texts(texts, metas=[{"i": 0}, {"i": 1}])
    assert [t.text for t in tagged] == texts and tagged[1].meta == {"i": 1}
    for t in tagged:
        assert [t.text[a:b] for a, b in t.spans] == list(t.forms)
        assert set(t.upos) <= set(UPOS_TAGS)  # spaCy's SPACE tokens are not words
        assert all(not f.isspace() for f in t.forms)
    forms = tagged[0].forms
    assert forms[:2] == ("Do", "n't") and tagged[0].upos[forms.index("fox")] == "NOUN"
    assert tagged[0].upos[forms.index(":")] == "PUNCT"


def test_builtin_sample_and_its_provenance():
    tagged, source = tagged_input()
    assert len(tagged) == 300 and "silver" in source and "spaCy" in source
    assert sum(len(t.upos) for t in tagged) > 5000
    assert {t.meta["sent_id"].rsplit("-", 1)[0] for t in tagged} == {"kjv", "shakespeare", "python-docs"}
    assert {u for t in tagged for u in t.upos} <= set(UPOS_TAGS)
    readme = (SAMPLE.parent / "README.md").read_text()
    for needed in ("en_core_web_sm", "3.8.0", "silver", "public domain", "MIT", "PSF"):
        assert needed in readme


def test_tagged_input_refuses_two_sources(tmp_path):
    from moescope.errors import MoescopeError

    with pytest.raises(MoescopeError, match="not both"):
        tagged_input(conllu=tmp_path / "a.conllu", data=tmp_path / "b.txt")


def test_tagged_input_tags_a_text_file(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"text": "The cat sat.", "label": "x"}\n{"text": "   "}\n{"text": "The dogs bark loudly."}\n')
    tagged, source = tagged_input(data=path)
    assert [t.text for t in tagged] == ["The cat sat.", "The dogs bark loudly."]  # the empty text is skipped
    assert tagged[0].meta == {"label": "x"} and tagged[1].upos[1] == "NOUN" and "silver" in source
