"""MediaWiki XML dump → plain prose articles. Pure Python (no TensorFlow).

Used by the embedded `matlm_wiki` task. The stripper keeps running prose, headings
and list items as plain text and removes everything else a reader does not see as
prose: templates (`{{...}}`), tables (`{| ... |}`), references (`<ref>...</ref>`),
comments, file/category/interlanguage links, link syntax (`[[a|b]]` → `b`), external
link syntax, bold/italic quotes, magic words and the trailing reference-like sections
("References", "External links", "See also", ...). Redirects and non-article
namespaces are dropped.

The rules are deliberately simple (no full wikitext parser): they are tested on the
real articles shipped in the gensim wheel (see tests/test_data_wikitext.py).
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterator

# Bump when the stripping rules change: it is part of every cache key built on the text.
STRIPPER_VERSION = 1

GENSIM_WIKI_RELPATH = os.path.join(
    "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


class WikiDumpNotFoundError(FileNotFoundError):
    """The gensim wheel (which ships the embedded Wikipedia sample) is not installed."""


def gensim_wiki_dump_path() -> str:
    """Path of the Wikipedia sample inside the gensim wheel, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.origin:
        raise WikiDumpNotFoundError(
            "the default task matlm_wiki reads the Wikipedia sample shipped in the gensim "
            "wheel, but gensim is not installed: pip install 'gensim==4.4.0'")
    path = os.path.join(os.path.dirname(spec.origin), GENSIM_WIKI_RELPATH)
    if not os.path.isfile(path):
        raise WikiDumpNotFoundError(f"gensim is installed but {path} is missing")
    return path


@dataclass(frozen=True)
class Article:
    title: str
    text: str  # Plain prose after stripping.


def iter_raw_pages(path: str) -> Iterator[tuple[str, int, bool, str]]:
    """Yields (title, namespace, is_redirect, wikitext) for each <page> of a dump."""
    opener = bz2.open if path.endswith(".bz2") else open
    with opener(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            title = ns = text = None
            redirect = False
            for child in elem.iter():
                tag = _local(child.tag)
                if tag == "title":
                    title = child.text or ""
                elif tag == "ns":
                    ns = int(child.text or 0)
                elif tag == "redirect":
                    redirect = True
                elif tag == "text":
                    text = child.text or ""
            yield title or "", ns or 0, redirect, text or ""
            elem.clear()


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_articles(path: str, min_chars: int = 200) -> Iterator[Article]:
    """Articles (namespace 0, not redirects) with their markup stripped, in dump order."""
    for title, ns, redirect, wikitext in iter_raw_pages(path):
        if ns != 0 or redirect or wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_wikitext(wikitext)
        if len(text) >= min_chars:
            yield Article(title=title, text=text)


# ----------------------------------------------------------------------------- stripping
_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
# Elements whose content is not prose either.
_DROPPED_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|hiero|chem|table)\b[^>]*>"
    r".*?</\1\s*>", re.I | re.S)
_ANY_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_BARE_URL_BRACKETS = re.compile(r"\[(https?://[^\]]*)\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:", ":category:")
_LANG_LINK = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
# Trailing sections that are lists of sources rather than prose.
_DROPPED_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
}
_SPACES = re.compile(r"[ \t\u00a0]+")


def strip_wikitext(wikitext: str) -> str:
    """Plain prose of one article's wikitext (see the module docstring for the rules)."""
    text = _COMMENT.sub("", wikitext)
    text = _REF_SELF_CLOSING.sub("", text)
    text = _REF.sub("", text)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = _remove_nested(text)
    text = _remove_media_links(text)
    text = _replace_links(text)
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1), text)
    text = _BARE_URL_BRACKETS.sub("", text)
    text = _ANY_TAG.sub("", text)
    text = html.unescape(text)  # &nbsp; &ndash; ... (XML escapes were undone by the parser).
    text = _ANY_TAG.sub("", text)  # Tags that were written escaped in the wikitext.
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    return _clean_lines(text)


def _remove_nested(text: str) -> str:
    """Removes templates `{{...}}` and tables `{|...|}`, which nest inside each other.

    A single left-to-right scan with a stack of open constructs; only text at depth 0
    is kept. An opener that never closes (broken markup) is treated as literal text.
    """
    out: list[str] = []
    stack: list[tuple[str, int]] = []  # (kind, position in text where it opened)
    i, n = 0, len(text)
    while i < n:
        two = text[i:i + 2]
        if two == "{{":
            stack.append(("{{", i)); i += 2; continue
        if two == "{|" and _at_line_start(text, i):
            stack.append(("{|", i)); i += 2; continue
        if two == "}}" and stack and stack[-1][0] == "{{":
            stack.pop(); i += 2; continue
        if two == "|}" and stack and stack[-1][0] == "{|":
            stack.pop(); i += 2; continue
        if not stack:
            out.append(text[i])
        i += 1
    if stack:  # Unclosed: keep what followed the outermost opener, minus the opener itself.
        return "".join(out) + _remove_nested(text[stack[0][1] + 2:])
    return "".join(out)


def _at_line_start(text: str, i: int) -> bool:
    """Table openers only count at the start of a line (`{|` also occurs in prose/code)."""
    j = text.rfind("\n", 0, i)
    return not text[j + 1:i].strip()


_MEDIA_LINK_OPENER = re.compile(r"\[\[\s*:?\s*(file|image|media)\s*:", re.I)


def _remove_media_links(text: str) -> str:
    """Removes `[[File:...]]`/`[[Image:...]]` whole, counting nested `[[`/`]]` in captions."""
    out, pos = [], 0
    for m in _MEDIA_LINK_OPENER.finditer(text):
        if m.start() < pos:
            continue  # Inside a media link already removed.
        out.append(text[pos:m.start()])
        depth, i = 0, m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth += 1; i += 2
            elif text.startswith("]]", i):
                depth -= 1; i += 2
                if depth == 0:
                    break
            else:
                i += 1
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _replace_links(text: str) -> str:
    """`[[target|label]]` → label, `[[target]]` → target; file/category/language links → ''.

    Innermost links are resolved first, so a file caption containing links is removed whole.
    """
    def repl(m: re.Match) -> str:
        body = m.group(1)
        target = body.split("|", 1)[0].strip().lower()
        if target.startswith(_DROPPED_LINK_PREFIXES) or _LANG_LINK.match(target):
            return ""
        label = body.rsplit("|", 1)[-1] if "|" in body else body
        return label.lstrip(":")

    previous = None
    while previous != text:
        previous, text = text, _INNER_LINK.sub(repl, text)
    return text


def _clean_lines(text: str) -> str:
    lines: list[str] = []
    skipping_section_level = 0
    for raw in text.split("\n"):
        line = _SPACES.sub(" ", raw).strip()
        heading = _HEADING.match(line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skipping_section_level and level > skipping_section_level:
                continue
            skipping_section_level = level if title.lower() in _DROPPED_SECTIONS else 0
            if not skipping_section_level and title:
                lines.extend(["", title])
            continue
        if skipping_section_level:
            continue
        # Table/template debris that survived broken markup is not prose.
        if line.startswith(("|", "!", "{|", "|}", "{{", "}}")):
            continue
        line = _LIST_MARKER.sub("", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left by removed templates.
        line = re.sub(r" +([,.;:])", r"\1", line).strip()
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
