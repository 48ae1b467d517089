"""MediaWiki dump -> plain-text articles, with a small dependency-free markup stripper.

`iter_wiki_articles` streams ``<page>`` elements from a (bz2-compressed) MediaWiki XML export and
yields main-namespace, non-redirect articles; `strip_wiki_markup` turns their wikitext into
plain prose. The stripper keeps what a reader sees as running text (link labels, bold/italic
text, headings, list items) and drops what is not prose: templates ``{{..}}`` (infoboxes,
citations), tables ``{|..|}``, ``<ref>`` footnotes, files/images, categories, interlanguage
links, HTML comments, math, galleries, and the reference/link sections at the end of articles.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

__all__ = ["iter_wiki_articles", "strip_wiki_markup"]

# Link namespaces whose links are not prose (dropped with their caption).
_DROP_LINK_PREFIXES = {"file", "image", "media", "category"}
# Sections that hold citations and link lists rather than prose; dropped with their content.
_DROP_SECTIONS = {
    "references",
    "notes",
    "footnotes",
    "citations",
    "sources",
    "bibliography",
    "further reading",
    "external links",
    "see also",
    "notes and references",
    "references and notes",
}
# HTML-like tags whose content is not prose.
_DROP_TAGS = (
    "ref",
    "math",
    "gallery",
    "timeline",
    "imagemap",
    "score",
    "graph",
    "syntaxhighlight",
    "source",
    "templatedata",
    "mapframe",
    "chem",
    "hiero",
)
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")
# Templates that wrap prose: keep one positional argument (index) instead of dropping them.
_TEXT_TEMPLATES = {"nowrap": 0, "nobr": 0, "lang": -1, "small": 0, "smaller": 0, "angbr": 0}
# Templates that stand for punctuation.
_SYMBOL_TEMPLATES = {
    "mdash": "\u2014",
    "mdashb": "\u2014",
    "ndash": "\u2013",
    "snd": " \u2013 ",
    "spnd": " \u2013 ",
    "spaced ndash": " \u2013 ",
    "'": "'",
}


def _matching_spans(text: str, open_: str, close: str) -> list[tuple[int, int]]:
    """Top-level ``[start, end)`` spans of balanced ``open_ ... close`` pairs (nesting-aware).

    An unclosed opener extends to the end of the text (a truncated template must not leak).
    """
    spans: list[tuple[int, int]] = []
    depth, start = 0, 0
    for m in re.finditer(f"{re.escape(open_)}|{re.escape(close)}", text):
        if m.group() == open_:
            if depth == 0:
                start = m.start()
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                spans.append((start, m.end()))
    if depth:
        spans.append((start, len(text)))
    return spans


def _replace_spans(text: str, spans: list[tuple[int, int]], fn) -> str:
    out, last = [], 0
    for a, b in spans:
        out.append(text[last:a])
        out.append(fn(text[a:b]))
        last = b
    out.append(text[last:])
    return "".join(out)


def _template_text(tpl: str) -> str:
    """Prose kept from a template ``{{name|args}}``: an argument of a few wrappers, else ''."""
    body = tpl[2:-2] if tpl.endswith("}}") else tpl[2:]
    if "{{" in body:  # nested templates: drop the whole thing
        return ""
    parts = body.split("|")
    name = parts[0].strip().lower()
    if name in _SYMBOL_TEMPLATES:
        return _SYMBOL_TEMPLATES[name]
    if name.startswith("lang-") and len(parts) >= 2:
        return parts[1]
    if name == "convert" and len(parts) >= 3:
        return f"{parts[1].strip()} {parts[2].strip()}"
    idx = _TEXT_TEMPLATES.get(name)
    if idx is None:
        return ""
    args = [p for p in parts[1:] if "=" not in p]
    return args[idx] if args and -len(args) <= idx < len(args) else ""


def _remove_templates(text: str) -> str:
    return _replace_spans(text, _matching_spans(text, "{{", "}}"), _template_text)


def _remove_tables(text: str) -> str:
    """Drop ``{| ... |}`` tables, nested ones included."""
    return _replace_spans(text, _matching_spans(text, "{|", "|}"), lambda _: "\n")


def _link_text(link: str) -> str:
    """``[[target|label]]`` -> label (or target); file/category/interlanguage links -> ''."""
    inner = link[2:-2] if link.endswith("]]") else link[2:]
    if "[[" in inner:  # a file caption holding links, or similar: never prose here
        inner_clean = _replace_spans(inner, _matching_spans(inner, "[[", "]]"), _link_text)
    else:
        inner_clean = inner
    if "{{" in inner_clean:  # [[target|label {{tpl|x}}]]: the template's "|" is not the link's
        inner_clean = _remove_templates(inner_clean)
    target = inner.split("|", 1)[0].strip()
    if target.startswith(":"):  # [[:Category:X|X]] is an ordinary link to that page
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _DROP_LINK_PREFIXES or _LANG_PREFIX.match(prefix):
            return ""
    if "|" in inner_clean:
        label = inner_clean.rsplit("|", 1)[1]
        if label.strip():
            return label
        return re.sub(r"\s*\(.*\)$", "", target.split(":")[-1])  # the "pipe trick"
    return inner_clean.lstrip(":")


_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|mailto:|//)[^\s\]]*(?:\s+([^\]]*))?\]")
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_SELF_CLOSING = re.compile(r"<(?:ref|references)\b[^>]*/>", re.I)
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(?:\s[^<>]*)?/?>")
_BOLD_ITALIC = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"(?<=\w)[ \t]+([,.;:!?])(?=\s|$)")
_MULTISPACE = re.compile(r"[ \t\u00a0]{2,}")


def _drop_tag_blocks(text: str) -> str:
    for tag in _DROP_TAGS:
        text = re.sub(rf"<{tag}\b[^>/]*>.*?(?:</{tag}\s*>|$)", " ", text, flags=re.S | re.I)
    return text


def _lines(text: str) -> str:
    """Headings -> plain lines; drop reference sections, list markers, rules and indentation."""
    out: list[str] = []
    skip_level = 0  # > 0 while inside a dropped section of that heading level
    for raw in text.split("\n"):
        line = raw.strip()
        m = _HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _DROP_SECTIONS else 0
            if not skip_level and title:
                out.extend(["", title])
            continue
        if skip_level:
            continue
        if line.startswith("----"):
            continue
        line = line.lstrip("*#:;").strip()
        if line.startswith("|") or line.startswith("!"):  # table rows left by broken tables
            continue
        out.append(line)
    return "\n".join(out)


def strip_wiki_markup(wikitext: str) -> str:
    """Plain text of one article's wikitext (see module docstring for what is kept)."""
    text = html.unescape(wikitext)  # the dump escapes some entities twice (&amp;nbsp;)
    text = _COMMENT.sub("", text)
    text = _SELF_CLOSING.sub("", text)
    text = _drop_tag_blocks(text)
    text = _remove_tables(text)
    text = _replace_spans(text, _matching_spans(text, "[[", "]]"), _link_text)
    text = _remove_templates(text)  # after links, so a link's "|" is not a template's
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BR.sub("\n", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = html.unescape(text).replace("\u00a0", " ")
    text = _lines(text)
    text = _EMPTY_PARENS.sub("", text)
    text = _MULTISPACE.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return "\n".join(line.rstrip() for line in text.strip().split("\n"))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_wiki_articles(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield ``(title, wikitext)`` for each main-namespace, non-redirect page of a MediaWiki
    XML export (``.xml`` or ``.xml.bz2``/``.bz2``), in file order, streaming."""
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        title, ns, redirect, text = "", "", False, ""
        root = None
        for event, elem in ET.iterparse(f, events=("start", "end")):
            if root is None:
                root = elem  # the first start event is <mediawiki>
            if event == "start":
                continue
            name = _local(elem.tag)
            if name == "title":
                title = elem.text or ""
            elif name == "ns":
                ns = (elem.text or "").strip()
            elif name == "redirect":
                redirect = True
            elif name == "text":
                text = elem.text or ""
            elif name == "page":
                if ns == "0" and not redirect and not text.lstrip().lower().startswith("#redirect"):
                    yield title, text
                title, ns, redirect, text = "", "", False, ""
                root.clear()  # drop finished pages so a full dump streams in constant memory
