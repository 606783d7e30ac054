"""Text normalization and sentence splitting, as ALBERT's preprocessing does them.

Pure functions on strings; the pipeline maps them over Arrow batches.
"""

from __future__ import annotations

import functools
import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# A sentence ends at . ! ? (optionally followed by closing quotes or brackets) when whitespace and an
# upper-case letter, a digit or an opening quote follow. Abbreviations such as "Dr." or "U.S." are the
# usual exceptions: a short list covers the common English ones.
# The pattern starts at the punctuation mark itself (not a look-behind), so that the regex engine can
# scan for it quickly.
_SENTENCE_END = re.compile(r"""[.!?]["')\]’”]*\s+(?=["'(\[‘“]?[A-Z0-9])""")
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "mt",
        "vs",
        "etc",
        "inc",
        "ltd",
        "co",
        "corp",
        "no",
        "fig",
        "gen",
        "gov",
        "sen",
        "rep",
        "lt",
        "col",
        "sgt",
        "capt",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "e.g",
        "i.e",
        "u.s",
        "u.k",
        "a.m",
        "p.m",
    ]
)

_LONGEST_ABBREVIATION = max(map(len, _ABBREVIATIONS))
_CLOSING = ".!?\"')]’”"  # stripped from a sentence's last word before it is looked up


def normalize(text: str, *, lowercase: bool = True) -> str:
    """ALBERT's ``preprocess_text``: collapse whitespace, `` and '' to a double quote, strip accents
    (NFKD, then drop combining marks), lowercase."""
    return normalize_many([_WHITESPACE.sub(" ", text)], lowercase=lowercase)[0]


def normalize_many(sentences: list[str], *, lowercase: bool = True) -> list[str]:
    """``normalize`` for many single-line strings at once: each step runs once over their join, which
    is several times faster than sentence by sentence.

    ASCII sentences (most of an English corpus) are joined apart from the others: a string with one
    non-ASCII character stores every character in 2 or 4 bytes, which makes each pass over the join
    slower, and an ASCII join needs no accent stripping and usually no whitespace pass."""
    if all(s.isascii() for s in sentences):  # isascii is O(1): a flag of the string
        return _normalize_joined(sentences, lowercase=lowercase, plain=True)
    plain = iter(_normalize_joined([s for s in sentences if s.isascii()], lowercase=lowercase, plain=True))
    other = iter(
        _normalize_joined([s for s in sentences if not s.isascii()], lowercase=lowercase, plain=False)
    )
    return [next(plain) if s.isascii() else next(other) for s in sentences]


def _normalize_joined(sentences: list[str], *, lowercase: bool, plain: bool) -> list[str]:
    """The steps of ``normalize`` over the join of ``sentences``; ``plain``: they are all ASCII."""
    if not sentences:
        return []
    text = "\n".join(sentences)
    text = text.replace("``", '"').replace("''", '"')
    if lowercase:
        if not plain:
            # Only runs of non-ASCII characters change (NFKD leaves ASCII as it is, and the combining
            # marks it makes are dropped, so no character's result depends on its neighbours).
            text = _NON_ASCII.sub(_strip_accents, text)
        text = text.lower()
    if plain and not _needs_whitespace_pass(text):
        return text.split("\n")
    return [" ".join(line.split()) for line in text.split("\n")]


# What makes " ".join(line.split()) differ from an ASCII line: ASCII whitespace other than the space, two
# spaces in a row, or a space at either end of a line.
_ASCII_WHITESPACE_MARKS = ("  ", " \n", "\n ", *"\t\x0b\x0c\r\x1c\x1d\x1e\x1f")


def _needs_whitespace_pass(text: str) -> bool:
    """Whether an ASCII join of lines has a line that collapsing whitespace would change."""
    return text.startswith(" ") or text.endswith(" ") or any(mark in text for mark in _ASCII_WHITESPACE_MARKS)


def _strip_accents(match: re.Match[str]) -> str:
    return _strip_accents_of(match.group())


@functools.lru_cache(maxsize=1 << 16)
def _strip_accents_of(run: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKD", run) if not unicodedata.combining(ch))


def split_sentences(text: str) -> list[str]:
    """Splits a document into sentences: at line breaks, then at sentence-final punctuation.

    Runs on the original (cased) text, since capitalization marks sentence starts. Empty pieces are
    dropped.
    """
    sentences: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        start = 0
        for match in _SENTENCE_END.finditer(line):
            end = match.start() + 1  # just after the punctuation
            last_word = line[(line.rfind(" ", start, end) + 1) or start : end].rstrip(_CLOSING)
            if len(last_word) <= _LONGEST_ABBREVIATION and (
                last_word.lower() in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha())
            ):
                continue  # "Dr. Smith", "J. Doe": not a sentence end
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        tail = line[start:].strip()
        if tail:
            sentences.append(tail)
    return sentences
