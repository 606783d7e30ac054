"""Fine-tune a pretrained ALBERT for sequence classification, from the MLflow registry or an export.

Usage:
    albert-scale finetune --model models:/NAME@ALIAS|models:/NAME/VERSION|EXPORT_DIR
                          (--task rotten-tomatoes | --data FILE.jsonl) [--output DIR] [key=value ...]

Downloads the model (a registry URI; every file is checked against the sha256 sums recorded when it was
registered) or checks an export's sha256 sums (a directory), loads weights from safetensors only (nothing
is unpickled), splits the labelled data into train and test by a hash of each text (the same split every
time), fine-tunes ``transformers.AlbertForSequenceClassification`` from the pretrained weights, and reports
test accuracy against two baselines run beside it: the majority label, and the same architecture and
recipe from random initialization, with the pretrained model's margin over it and the margin's 95%
interval (paired over the test examples). Logs its own MLflow run (experiment ``albert-scale-finetune``)
tagged with the source model version and its training run. ``--task rotten-tomatoes`` is the built-in
labelled corpus (``albert-scale corpus fetch rotten-tomatoes``); ``--data`` takes any JSONL with
``text`` and ``label``.

Settings (``key=value``): epochs, batch_size, lr, weight_decay, warmup_fraction, max_seq_length,
test_fraction, max_train_examples (0 = all), seed, baseline (true: also train from random init),
reinit_pooler (true: a fresh [CLS] pooler instead of the pretrained one).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from albert_scale.cli import stage_main
from albert_scale.config import _require, build, parse_override
from albert_scale.fileio import sha256_file
from albert_scale.register import SHA256_TAG

EXPERIMENT = "albert-scale-finetune"
TASKS = ("rotten-tomatoes",)


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning recipe (``key=value`` overrides on the command line)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_seq_length: int = 128
    test_fraction: float = 0.1
    max_train_examples: int = 0
    seed: int = 12345
    baseline: bool = True
    reinit_pooler: bool = False
    """Start from a fresh [CLS] pooler instead of the one sentence-order prediction trained (the rest of
    the encoder stays pretrained). Helps when pretraining was short: see the README's quick start."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_seq_length"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _require(self.lr > 0, "lr", self.lr, "must be > 0")
        _require(0 <= self.warmup_fraction < 1, "warmup_fraction", self.warmup_fraction, "must be in [0, 1)")
        _require(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "must be in (0, 1)")
        _require(self.max_train_examples >= 0, "max_train_examples", self.max_train_examples, "must be >= 0")


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune a pretrained ALBERT (registry URI or export directory) for text "
        "classification; report test accuracy against the majority label and against random init.",
        epilog="example: albert-scale finetune --model models:/albert-quickstart@candidate --task rotten-tomatoes epochs=2",
    )
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or an export directory"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=TASKS, help="a built-in labelled corpus")
    source.add_argument("--data", metavar="FILE.jsonl", help="JSONL with 'text' and 'label' fields")
    parser.add_argument("--output", metavar="DIR", help="write results.json (and the fine-tuned model) here")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe settings, e.g. epochs=2 lr=5e-5"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    config = load_finetune_config(args.overrides)
    results = finetune(args.model, task=args.task, data=args.data, config=config, output=args.output)
    print(format_results(results))
    return 0


def load_finetune_config(overrides: list[str]) -> FinetuneConfig:
    tree: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_override(item)
        tree[key] = value
    return build(FinetuneConfig, tree, prefix="")


@dataclass
class Source:
    """Where the pretrained model came from."""

    uri: str
    directory: Path
    name: str | None = None
    version: str | None = None
    run_id: str | None = None


def check_model_uri(model: str) -> None:
    """A registry URI must name a model and an alias or a version (ValueError naming it otherwise)."""
    if model.startswith("models:/"):
        _registry_reference(model)


def _registry_reference(uri: str) -> tuple[str, str, str]:
    """``(NAME, "@", ALIAS)`` of ``models:/NAME@ALIAS``, ``(NAME, "/", VERSION)`` of ``models:/NAME/VERSION``."""
    reference = uri.removeprefix("models:/")
    name, sep, rest = reference.partition("@") if "@" in reference else reference.rpartition("/")
    if not (sep and name and rest):
        raise ValueError(f"--model {uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, sep, rest


def resolve_model(model: str, workdir: Path, say=print) -> Source:
    """A local directory with the model's config.json and tokenizer, downloaded or checked."""
    if model.startswith("models:/"):
        return _from_registry(model, workdir, say)
    directory = Path(model)
    if not directory.is_dir():
        raise FileNotFoundError(f"--model {model!r}: no such directory (or use models:/NAME@ALIAS)")
    from albert_scale.export import verify

    verify(directory)
    return Source(uri=str(directory.resolve()), directory=directory)


def _from_registry(uri: str, workdir: Path, say=print) -> Source:
    import mlflow

    from albert_scale.tracking import connect, first_line

    name, sep, alias_or_version = _registry_reference(uri)
    registry = connect(log_level=logging.ERROR)
    client = mlflow.MlflowClient()
    try:
        if sep == "@":
            version = client.get_model_version_by_alias(name, alias_or_version)
        else:
            version = client.get_model_version(name, alias_or_version)
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(workdir)))
    except Exception as err:
        first = first_line(err) or type(err).__name__
        raise ValueError(f"--model {uri}: not found in the registry at {registry} ({first})") from None
    _check_sums(uri, local, version.tags.get(SHA256_TAG), say)
    configs = sorted(local.rglob("config.json"))
    tokenizers = sorted(p.parent for p in local.rglob("tokenizer.json"))
    if not configs or not tokenizers:
        raise ValueError(f"--model {uri}: the registered model holds no transformers model and tokenizer")
    directory = configs[0].parent
    if tokenizers[0] != directory:  # the transformers flavor keeps the tokenizer in its own folder
        for file in tokenizers[0].iterdir():
            target = directory / file.name
            if not target.exists():
                target.symlink_to(file)
    return Source(
        uri=uri, directory=directory, name=name, version=str(version.version), run_id=version.run_id
    )


def _check_sums(uri: str, local: Path, recorded: str | None, say) -> None:
    """Every file the registration recorded is there with its sha256 (a version registered by other means
    has no record: said once, and used as it is)."""
    if not recorded:
        say(f"{uri}: no sha256 sums recorded at registration (not registered by albert-scale); not verified")
        return
    for name, digest in json.loads(recorded).items():
        path = local / name
        if not path.is_file():
            problem = "is missing"
        elif sha256_file(path) != digest:
            problem = "does not match the sha256 recorded at registration"
        else:
            continue
        raise ValueError(f"--model {uri}: {name} {problem} (changed or damaged in the artifact store)")


def load_examples(task: str | None, data: str | None) -> tuple[list[str], list[str]]:
    """(texts, labels) of a built-in task or a JSONL file; bad lines are errors naming the line."""
    if task is not None:
        from data_pipeline.corpora import fetch_corpus

        cache = Path(os.environ.get("ALBERT_SCALE_CACHE", Path.home() / ".cache" / "albert-scale")) / "tasks"
        path = fetch_corpus(task, output_dir=cache, progress=False, log=lambda message: None).jsonl
    else:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {data!r}: no such file")
    texts, labels = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{str(path)!r} line {number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, label = record["text"], record["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                reason = f"no {err} field" if isinstance(err, KeyError) else str(err)
                raise ValueError(
                    f"{str(path)!r} line {number}: expected a JSON object with text and label ({reason})"
                ) from None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{str(path)!r} line {number}: 'text' must be a non-empty string")
            texts.append(text)
            labels.append(str(label))
    if len(set(labels)) < 2:
        raise ValueError(f"{str(path)!r}: needs at least two distinct labels, found {sorted(set(labels))}")
    return texts, labels


def split(texts: list[str], labels: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and test indices by a keyed hash of each text: stable across runs and machines."""
    from data_pipeline.instances import stable_hash, text_hash

    test = [i for i, t in enumerate(texts) if stable_hash(seed, text_hash(t)) % 10_000 < fraction * 10_000]
    chosen = set(test)
    return [i for i in range(len(texts)) if i not in chosen], test


def split_examples(
    task: str | None, data: str | None, config: FinetuneConfig
) -> tuple[list[str], list[str], list[int], list[int]]:
    """(texts, labels, train indices, test indices) of the labelled data, as the recipe splits and caps it."""
    texts, labels = load_examples(task, data)
    train_idx, test_idx = split(texts, labels, config.test_fraction, config.seed)
    if config.max_train_examples:
        train_idx = train_idx[: config.max_train_examples]
    if not train_idx or not test_idx:
        raise ValueError(f"test_fraction={config.test_fraction}: leaves an empty train or test split")
    return texts, labels, train_idx, test_idx


def finetune(
    model: str,
    *,
    task: str | None,
    data: str | None,
    config: FinetuneConfig,
    output: str | None = None,
    say=print,
) -> dict[str, Any]:
    """Runs the fine-tuning and its baselines; returns the results (also logged to MLflow)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # no report of the new classifier head's weights
    check_model_uri(model)
    texts, labels, train_idx, test_idx = split_examples(task, data, config)
    names = sorted(set(labels))
    label_ids = [names.index(label) for label in labels]
    majority = Counter(label_ids[i] for i in train_idx).most_common(1)[0][0]
    majority_accuracy = sum(label_ids[i] == majority for i in test_idx) / len(test_idx)

    with tempfile.TemporaryDirectory(prefix="albert-scale-finetune-") as workdir:
        source = resolve_model(model, Path(workdir), say)
        tokenizer = transformers.AlbertTokenizer.from_pretrained(source.directory)
        positions = transformers.AlbertConfig.from_pretrained(source.directory).max_position_embeddings
        if config.max_seq_length > positions:
            say(
                f"max_seq_length={config.max_seq_length}: the model has {positions} positions; using {positions}"
            )
        encoded = tokenizer(texts, truncation=True, max_length=min(config.max_seq_length, positions))
        say(
            f"fine-tuning {source.uri} on {len(train_idx)} examples, testing on {len(test_idx)} "
            f"({len(names)} labels: {', '.join(names)})"
        )
        results: dict[str, Any] = {
            "model": source.uri,
            "model_version": source.version,
            "source_run_id": source.run_id,
            "labels": names,
            "train_examples": len(train_idx),
            "test_examples": len(test_idx),
            "config": asdict(config),
            "majority": {"test_accuracy": majority_accuracy, "label": names[majority]},
        }
        tracker = _Run(source, config, task or str(data))
        runs = [("pretrained", True)] + ([("random_init", False)] if config.baseline else [])
        correct: dict[str, list[bool]] = {}
        for label, pretrained in runs:
            torch.manual_seed(config.seed)
            if pretrained:
                net = transformers.AlbertForSequenceClassification.from_pretrained(
                    source.directory, num_labels=len(names), use_safetensors=True
                )
                if config.reinit_pooler:
                    reinit_pooler(net)
            else:
                hf_config = transformers.AlbertConfig.from_pretrained(source.directory, num_labels=len(names))
                net = transformers.AlbertForSequenceClassification(hf_config)
            results[label], correct[label] = _train_and_test(
                net, encoded, label_ids, train_idx, test_idx, config, label, tracker, say
            )
            if pretrained and output:
                net.save_pretrained(Path(output) / "model")
                tokenizer.save_pretrained(Path(output) / "model")
        if config.baseline:
            results["margin"] = paired_margin(correct["pretrained"], correct["random_init"])
        results["mlflow_run_id"] = tracker.finish(results)
    if output:
        Path(output).mkdir(parents=True, exist_ok=True)
        (Path(output) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def reinit_pooler(net) -> None:
    """Draws the pooler of an ``AlbertForSequenceClassification`` afresh, as the model's own init does.

    By hand: transformers' ``_init_weights`` leaves weights that ``from_pretrained`` loaded untouched
    (they are marked initialized), so calling it on the loaded pooler changes nothing.
    """
    import torch

    pooler = net.albert.pooler
    with torch.no_grad():
        pooler.weight.normal_(0.0, net.config.initializer_range)
        pooler.bias.zero_()


def _train_and_test(
    net, encoded, label_ids, train_idx, test_idx, config, label, tracker, say
) -> tuple[dict[str, float], list[bool]]:
    """Fine-tunes ``net``; returns its summary and, per test example, whether its final prediction is
    right."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    total = math.ceil(len(train_idx) / config.batch_size) * config.epochs
    optimizer, schedule = _optimizer(net, config, total)
    step, started = 0, time.perf_counter()
    bar = tqdm(total=total, desc=f"fine-tuning ({label})", unit="batch", file=sys.stderr, disable=None)
    for epoch in range(config.epochs):
        net.train()
        order = torch.randperm(len(train_idx), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), config.batch_size):
            batch = [train_idx[i] for i in order[start : start + config.batch_size]]
            losses.append(_train_batch(net, optimizer, schedule, encoded, label_ids, batch))
            step += 1
            bar.update()
        correct = _correct(net, encoded, label_ids, test_idx, config.batch_size)
        accuracy = sum(correct) / len(correct)
        mean_loss = sum(losses) / len(losses)
        tracker.log({f"{label}/train_loss": mean_loss, f"{label}/test_accuracy": accuracy}, epoch + 1)
        bar.write(
            f"{label}: epoch {epoch + 1}/{config.epochs} train loss {mean_loss:.4f} test accuracy {accuracy:.2%} "
            f"({time.perf_counter() - started:.0f} s)"
        )
    bar.close()
    summary = {"test_accuracy": accuracy, "train_loss": mean_loss, "seconds": time.perf_counter() - started}
    return summary, correct


def _optimizer(net, config: FinetuneConfig, total: int):
    """AdamW (no decay for norms and biases) and a linear warm-up then decay over ``total`` steps."""
    import torch

    decay = [
        p for n, p in net.named_parameters() if not any(k in n for k in ("LayerNorm", "layer_norm", "bias"))
    ]
    rest = [p for n, p in net.named_parameters() if any(k in n for k in ("LayerNorm", "layer_norm", "bias"))]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
    )
    warmup = int(total * config.warmup_fraction)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)),
    )
    return optimizer, schedule


def _train_batch(net, optimizer, schedule, encoded, label_ids, batch: list[int]) -> float:
    """One optimizer step on the examples ``batch``; returns the loss."""
    import torch

    out = net(**_collate(encoded, batch), labels=torch.tensor([label_ids[i] for i in batch]))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()


# A test batch (forward only) costs about this fraction of a training batch.
EVAL_COST = 1 / 3


def estimate_seconds(
    hf_config: dict[str, Any],
    spiece: Path,
    *,
    task: str | None,
    data: str | None,
    config: FinetuneConfig,
    batches: int = 6,
    lowercase: bool = True,
) -> float:
    """Seconds :func:`finetune` should take here for a model of ``hf_config`` (config.json contents)
    tokenized by ``spiece``: a few training batches of the real recipe on the task's own examples, timed,
    scaled to its epochs, test passes and models (the baseline too). Downloads and loading are not
    counted."""
    import sentencepiece as spm
    import torch
    import transformers

    from data_pipeline.text import normalize
    from data_pipeline.tokenizer import CLS_ID, SEP_ID

    texts, labels, train_idx, test_idx = split_examples(task, data, config)
    generator = torch.Generator().manual_seed(config.seed)
    sample = [
        train_idx[i]
        for i in torch.randint(len(train_idx), (batches * config.batch_size,), generator=generator)
    ]
    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    length = min(config.max_seq_length, hf_config["max_position_embeddings"])
    ids = {
        i: [CLS_ID, *sp.encode(normalize(texts[i], lowercase=lowercase))[: length - 2], SEP_ID]
        for i in sample
    }
    encoded = {
        "input_ids": ids,
        "token_type_ids": {i: [0] * len(v) for i, v in ids.items()},
        "attention_mask": {i: [1] * len(v) for i, v in ids.items()},
    }
    names = sorted(set(labels))
    label_ids = {i: names.index(labels[i]) for i in sample}
    torch.manual_seed(config.seed)
    net = transformers.AlbertForSequenceClassification(
        transformers.AlbertConfig(**{**hf_config, "num_labels": len(names)})
    )
    net.train()
    optimizer, schedule = _optimizer(net, config, batches)
    times = []
    for b in range(batches):
        batch = sample[b * config.batch_size : (b + 1) * config.batch_size]
        started = time.perf_counter()
        _train_batch(net, optimizer, schedule, encoded, label_ids, batch)
        times.append(time.perf_counter() - started)
    per_batch = statistics.median(times[1:])  # after a warm-up batch
    train_batches = math.ceil(len(train_idx) / config.batch_size)
    test_batches = math.ceil(len(test_idx) / config.batch_size)
    models = 2 if config.baseline else 1
    return models * config.epochs * (train_batches + EVAL_COST * test_batches) * per_batch


def _collate(encoded, batch: list[int]):
    import torch

    length = max(len(encoded["input_ids"][i]) for i in batch)
    out = {}
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        rows = [encoded[key][i] + [0] * (length - len(encoded[key][i])) for i in batch]
        out[key] = torch.tensor(rows)
    return out


def _correct(net, encoded, label_ids, indices, batch_size) -> list[bool]:
    """Whether the model predicts each of ``indices`` right, in order."""
    import torch

    net.eval()
    correct: list[bool] = []
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            predicted = net(**_collate(encoded, batch)).logits.argmax(-1)
            correct += (predicted == torch.tensor([label_ids[i] for i in batch])).tolist()
    return correct


# The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


def paired_margin(first: list[bool], second: list[bool]) -> dict[str, Any]:
    """The accuracy difference of two models on the same test examples, with its 95% interval.

    Paired: only the examples the two models disagree on carry information (``only_first``,
    ``only_second``); the interval is the normal one for a difference of paired proportions,
    ``d +- z * sqrt(b + c - (b - c)^2 / n) / n``. It covers the sampling of the test examples, not the
    randomness of training (another seed moves the margin too).
    """
    if len(first) != len(second) or not first:
        raise ValueError("paired_margin: two non-empty lists of the same length expected")
    n = len(first)
    b = sum(x and not y for x, y in zip(first, second, strict=True))
    c = sum(y and not x for x, y in zip(first, second, strict=True))
    difference = (b - c) / n
    half = Z95 * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n
    return {
        "points": difference,
        "ci95": [difference - half, difference + half],
        "only_first": b,
        "only_second": c,
        "significant": bool(difference - half > 0 or difference + half < 0),
    }


def describe_margin(margin: dict[str, Any]) -> str:
    """``+1.5 points (95% interval -0.9 to +3.8 over the test examples; not significant)``."""
    low, high = margin["ci95"]
    verdict = "significant" if margin["significant"] else "not significant"
    return (
        f"{margin['points'] * 100:+.1f} points (95% interval {low * 100:+.1f} to {high * 100:+.1f} "
        f"over the test examples; {verdict})"
    )


class _Run:
    """The fine-tuning's own MLflow run, tagged with its source; failures to log are reported, not fatal."""

    def __init__(self, source: Source, config: FinetuneConfig, data: str):
        import mlflow

        from albert_scale.tracking import connect

        self.mlflow = mlflow
        self.run_id = None
        try:
            connect(log_level=logging.ERROR)
            experiment = mlflow.set_experiment(EXPERIMENT)
            tags = {"albert_scale.source_model": source.uri, "albert_scale.data": data}
            if source.version:
                tags |= {
                    "albert_scale.source_version": source.version,
                    "albert_scale.source_run_id": source.run_id or "",
                }
            run = mlflow.MlflowClient().create_run(experiment.experiment_id, tags=tags)
            self.run_id = run.info.run_id
            mlflow.MlflowClient().log_batch(
                self.run_id,
                params=[mlflow.entities.Param(k, str(v)) for k, v in asdict(config).items()],
            )
        except Exception as err:
            print(
                f"warning: MLflow tracking unavailable ({type(err).__name__}); results are printed only",
                file=sys.stderr,
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id:
            self.mlflow.MlflowClient().log_batch(
                self.run_id,
                metrics=[
                    self.mlflow.entities.Metric(k, v, int(time.time() * 1000), step)
                    for k, v in metrics.items()
                ],
            )

    def finish(self, results: dict[str, Any]) -> str | None:
        if not self.run_id:
            return None
        client = self.mlflow.MlflowClient()
        client.log_batch(
            self.run_id,
            metrics=[
                self.mlflow.entities.Metric(
                    f"{name}/final_test_accuracy", results[name]["test_accuracy"], int(time.time() * 1000), 0
                )
                for name in ("pretrained", "random_init", "majority")
                if name in results
            ]
            + [
                self.mlflow.entities.Metric(f"margin/{name}", value, int(time.time() * 1000), 0)
                for name, value in _margin_metrics(results)
            ],
        )
        client.log_dict(self.run_id, results, "results.json")
        client.set_terminated(self.run_id)
        return self.run_id


def _margin_metrics(results: dict[str, Any]) -> list[tuple[str, float]]:
    if "margin" not in results:
        return []
    margin = results["margin"]
    return [("points", margin["points"]), ("ci95_low", margin["ci95"][0]), ("ci95_high", margin["ci95"][1])]


def format_results(results: dict[str, Any]) -> str:
    rows = [("pretrained", results["pretrained"]["test_accuracy"])]
    if "random_init" in results:
        rows.append(("random init, same recipe", results["random_init"]["test_accuracy"]))
    rows.append((f"majority label ({results['majority']['label']})", results["majority"]["test_accuracy"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"# test accuracy on {results['test_examples']} held-out examples"]
    lines += [f"{name:<{width}}  {value:.2%}" for name, value in rows]
    if "margin" in results:
        lines.append(f"pretraining margin over random init: {describe_margin(results['margin'])}")
    if results.get("mlflow_run_id"):
        lines.append(f"MLflow run {results['mlflow_run_id']} (experiment {EXPERIMENT})")
    return "\n".join(lines)


main = stage_main(run, build_parser)

if __name__ == "__main__":
    sys.exit(main())
