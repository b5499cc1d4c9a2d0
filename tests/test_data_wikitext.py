"""Markup stripping on the real Wikipedia articles shipped in the gensim wheel."""
import bz2
import re

import pytest

from matlm.data import documents, wikitext


@pytest.fixture(scope="module")
def articles():
    return {title: text for title, text in documents.wiki_articles()}


def test_no_markup_left_in_any_article(articles):
    assert len(articles) > 100
    for title, text in articles.items():
        for marker in ("{{", "}}", "[[", "]]", "<ref", "</ref", "{|", "|}", "'''", "<!--",
                       "&nbsp;", "&lt;"):
            assert marker not in text, (title, marker, text[text.find(marker) - 80:][:160])
        for line in text.split("\n"):
            assert not line.startswith(("|", "!", "*", "#")), (title, line)  # Table/list syntax.
            assert not re.fullmatch(r"=+.*=+", line), (title, line)  # Heading syntax.


def test_prose_is_kept(articles):
    assert articles["Anarchism"].startswith(
        "Anarchism is a political philosophy that advocates self-governed societies based "
        "on voluntary institutions.")
    # Link labels survive as words; headings as plain lines.
    assert "stateless societies" in articles["Anarchism"]
    assert "\nEtymology and terminology\n" in articles["Anarchism"]
    assert "Huxley" in articles["Aldous Huxley"]
    # Most of an article is prose: stripped text is a large share of its words.
    assert len(articles["Anarchism"].split()) > 5000


def test_redirects_and_other_namespaces_dropped(articles):
    raw = bz2.open(wikitext.gensim_wiki_dump_path(), "rt", encoding="utf-8").read()
    pages = re.findall(r"<page>.*?</page>", raw, re.S)
    redirects = {re.search(r"<title>(.*?)</title>", p).group(1) for p in pages
                 if "<redirect" in p}
    assert "AccessibleComputing" in redirects
    assert not redirects & set(articles)
    non_articles = {re.search(r"<title>(.*?)</title>", p).group(1) for p in pages
                    if "<ns>0</ns>" not in p}
    assert non_articles and not non_articles & set(articles)
    # Every real article (namespace 0, not a redirect) is kept.
    titles = {re.search(r"<title>(.*?)</title>", p).group(1) for p in pages}
    assert set(articles) == titles - redirects - non_articles


def test_strip_rules_on_a_constructed_example():
    wikitext_src = (
        "{{Infobox person|name=X|note={{nested|a}}}}\n"
        "'''Ada''' was a [[mathematician]] and [[writer|author]].<ref name=a>{{cite|x}}</ref>"
        " She wrote notes.<ref name=b/><!-- hidden -->\n"
        "{| class=\"wikitable\"\n|-\n| cell {{tpl}} || cell\n|}\n"
        "[[File:Ada.jpg|thumb|Portrait by [[Alfred Chalon]]]]\n"
        "== Life ==\n* A [http://example.com link text] item&nbsp;here\n"
        "[[Category:Mathematicians]][[de:Ada Lovelace]]\n"
        "== References ==\n* Some book, 1999\n")
    assert wikitext.strip_wikitext(wikitext_src) == (
        "Ada was a mathematician and author. She wrote notes.\n\nLife\nA link text item here")


def test_train_validation_split_is_by_article_and_stable(articles):
    keyed = documents.wiki_articles()
    train = documents.select_split(keyed, "train", 0.1)
    validation = documents.select_split(keyed, "validation", 0.1)
    assert 0 < len(validation) < len(train)
    assert not set(train) & set(validation)
    assert len(train) + len(validation) == len(keyed)
    assert documents.select_split(keyed, "validation", 0.1) == validation
