"""Plain-text helpers for the corpus builder: chunking, reStructuredText and HTML to text.

Everything here is a pure function of its input, so the corpus stays byte-for-byte
reproducible.
"""
from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["chunk_text", "html_to_text", "rst_to_text", "truncate_text"]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters.

    Cuts fall on blank lines where possible (paragraphs, top-level code blocks), then on
    line ends, and only as a last resort inside a line. Returns the non-empty pieces in order;
    joining them with blank lines gives back the text up to whitespace at the cuts.
    """
    text = text.strip("\n")
    if len(text) <= max_chars:
        return [text] if text.strip() else []
    pieces: list[str] = []
    current = ""
    for para in re.split(r"\n[ \t]*\n", text):
        for part in _split_long(para, max_chars):
            candidate = f"{current}\n\n{part}" if current else part
            if len(candidate) <= max_chars:
                current = candidate
            else:
                if current.strip():
                    pieces.append(current)
                current = part
    if current.strip():
        pieces.append(current)
    return pieces


def _split_long(para: str, max_chars: int) -> list[str]:
    if len(para) <= max_chars:
        return [para]
    out: list[str] = []
    current = ""
    for line in para.split("\n"):
        while len(line) > max_chars:  # a data table or a minified line: cut it blindly
            if current:
                out.append(current)
                current = ""
            out.append(line[:max_chars])
            line = line[max_chars:]
        candidate = f"{current}\n{line}" if current else line
        if len(candidate) <= max_chars:
            current = candidate
        else:
            out.append(current)
            current = line
    if current:
        out.append(current)
    return out


def truncate_text(text: str, max_chars: int) -> str:
    """Return a prefix of ``text`` of at most ``max_chars`` characters.

    Prefers ending at a line break, then at a space, as long as that keeps at least half of
    the allowance; otherwise cuts hard. May return "" when ``max_chars`` is tiny.
    """
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    for sep in ("\n", " "):
        pos = cut.rfind(sep)
        if pos >= max_chars // 2:
            return cut[:pos].rstrip()
    return cut.rstrip()


# --- reStructuredText (the Python docs' Sphinx sources) ------------------------------------

_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+<>.:_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\. ([\w:-]+)::\s*(.*)$")
_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`([^`]+)`")
_LINK = re.compile(r"`([^`<]*?)\s*<([^`>]+)>`__?")
_REF = re.compile(r"`([^`]+)`__?(?![\w`])")
_FOOTNOTE = re.compile(r"\s*\[(?:#[\w-]*|\d+|\*)\]_")
_SUBST = re.compile(r"\|(version|release)\|")
_STRONG = re.compile(r"\*\*(\S[^*\n]*?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*([A-Za-z_][\w.-]*)\*(?![\w*])")

# Directives whose whole block carries no prose: index entries, tables of contents, markup.
_DROP_BLOCK = frozenset(
    "index toctree raw image figure testsetup testcleanup highlight sectionauthor moduleauthor "
    "module currentmodule program tabularcolumns audit-event include literalinclude contents "
    "only miscnews limited-api-list".split()
)
_ADMONITION = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "important": "Important:",
    "caution": "Caution:", "tip": "Tip:", "hint": "Hint:", "attention": "Attention:",
    "impl-detail": "CPython implementation detail:", "availability": "Availability:",
}
_VERSION = {
    "versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
    "deprecated": "Deprecated since version {}.", "deprecated-removed": "Deprecated since version {}.",
}
# API description directives: their argument is a signature worth keeping as a line of text.
_SIGNATURE = frozenset(
    "function method class attribute data exception decorator classmethod staticmethod "
    "abstractmethod coroutinemethod coroutinefunction awaitablefunction opcode cmdoption option "
    "envvar describe object pdbcommand decoratormethod".split()
)


def _role(match: re.Match[str]) -> str:
    inner = match.group(2)
    if match.group(1) in ("rfc", "pep"):
        return f"{match.group(1).upper()} {inner.split('#')[0]}"
    if inner.endswith(">") and "<" in inner:
        title = inner[: inner.rfind("<")].strip()
        inner = title or inner[inner.rfind("<") + 1 : -1]
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    return inner.lstrip("!")


def _inline(line: str) -> str:
    # runs on whole documents: roles and links may wrap onto the next line
    line = _ROLE.sub(_role, line)
    line = _LINK.sub(lambda m: m.group(1) or m.group(2), line)
    line = line.replace("``", "")
    line = _REF.sub(r"\1", line)
    line = _FOOTNOTE.sub("", line)
    line = _SUBST.sub("3.11", line)
    line = _STRONG.sub(r"\1", line)
    line = _EMPHASIS.sub(r"\1", line)
    return line.replace("\\ ", "")


def rst_to_text(rst: str) -> str:
    """Turn a Sphinx reStructuredText source into readable plain text.

    Keeps prose, code examples and API signatures; drops section underlines, index entries,
    tables of contents, comments and link targets; rewrites roles (``:func:`len``` becomes
    ``len``) and version notes ("New in version 3.2."). Returns text with Unix line ends and at
    most one blank line in a row.
    """
    out: list[str] = []
    lines = rst.replace("\r\n", "\n").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        i += 1
        if _ADORNMENT.match(line) or line.strip() == "::":
            continue
        m = _DIRECTIVE.match(line)
        if m is not None:
            indent, name, arg = m.groups()
            name = name.split(":")[-1] if name.startswith(("c:", "py:")) else name
            # the directive's options (":noindex:") never hold prose
            while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):
                i += 1
            if name in _DROP_BLOCK:
                i = _skip_block(lines, i, len(indent))
            elif name in _ADMONITION:
                out.append(f"{indent}{_ADMONITION[name]} {arg}".rstrip())
            elif name in _VERSION:
                version, _, rest = arg.partition(" ")
                out.append(f"{indent}{_VERSION[name].format(version)} {rest}".rstrip())
            elif name in _SIGNATURE and arg:
                out.append(f"{indent}{arg}")
            elif name in ("rubric", "topic", "sidebar", "table") and arg:
                out.append(f"{indent}{arg}")
            continue  # code-block, doctest, productionlist...: keep only the content
        if re.match(r"^\s*\.\.(\s|$)", line):  # comment, link target or substitution
            if not line.strip().startswith(".. _") and not line.strip().startswith(".. |"):
                i = _skip_block(lines, i, len(line) - len(line.lstrip()))
            continue
        if line.endswith("::"):
            line = line[:-1]  # "Example::" introduces a code block: read as "Example:"
        out.append(line)
    text = _inline("\n".join(out))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n") + "\n"


def _skip_block(lines: list[str], i: int, indent: int) -> int:
    """Index of the first line after the block indented deeper than ``indent``."""
    while i < len(lines):
        line = lines[i]
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        i += 1
    return i


# --- HTML (fallback when a documentation package ships no sources) -------------------------

_BLOCK_TAGS = frozenset(
    "p div pre li ul ol dl dt dd h1 h2 h3 h4 h5 h6 br tr table blockquote section".split()
)
_SKIP_TAGS = frozenset("script style head nav".split())


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0  # depth inside <script>, <style>... whose text is not prose
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        if tag == "pre":
            self._pre += 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS and self._skip:
            self._skip -= 1
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))


def html_to_text(html: str) -> str:
    """Extract the readable text of an HTML page with the standard library's parser.

    Only the Sphinx main body (``role="main"``) is kept when present, so navigation and
    footers do not repeat across pages. Tolerates broken markup; returns plain text with
    Unix line ends and at most one blank line in a row.
    """
    start = re.search(r'<div[^>]*role="main"[^>]*>', html)
    if start is not None:
        end = html.find('<div class="sphinxsidebar"', start.end())
        html = html[start.end() : end if end > 0 else len(html)]
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    text = "\n".join(line if line.strip() else "" for line in lines)
    text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
    return text.replace("\u00b6", "") + "\n"  # Sphinx's pilcrow permalinks
