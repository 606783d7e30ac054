"""Benchmark: preprocessing throughput and memory against SentencePiece encoding alone.

Usage:
    python bench/preprocess.py [--scale 10] [--repeats 3] [--skip-scale] [--output bench/results/preprocess.json]

Corpora: the built-in ``news`` and ``wiki`` corpora (about 15.7 MB of text). Rows of the report:

- ``spm-encode``: SentencePiece encoding alone of the same documents' text, one thread, in this process
  (the floor any pipeline that tokenizes pays: BENCHMARKS.md row 1's peer).
- ``ours-1w`` / ``ours-2w``: ``albert-scale preprocess`` with the same tokenizer given (so SentencePiece
  training is not timed) and 1 or 2 encoding actors, on a local Ray started once beforehand. Its time
  covers reading, sentence splitting, normalization, encoding, SOP instances and writing shards.
- ``tokenizer``: training the SentencePiece model (vocab 30000) on the same text, reported apart.

Rates are MB of raw text per second, and per core (divided by the encoding actors). Peak RSS is the
largest sum of resident memory over this process and its children (Ray's workers included), sampled
every 0.1 s in a run of its own (not a timed one), for the corpus and for a copy ``--scale`` times
larger; flat means streaming. RSS counts a page shared by several processes (libraries, Ray's object
store) once in each, so each extra idle Ray worker adds ~150 MB; peak PSS (proportional set size)
counts every page once.
Medians of ``--repeats`` runs, alternating ours and the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from data_pipeline import preprocess
from data_pipeline import tokenizer as tok
from data_pipeline.corpora import fetch_corpus
from data_pipeline.text import normalize

REPO = Path(__file__).resolve().parent.parent


def proportional_set_size(pid: int) -> int:
    """A process's PSS in bytes: its private pages plus its share of the pages it shares (libraries, Ray's
    object store), so that the sum over processes counts every page once."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples the memory of this process tree in a background thread: the largest sum of RSS (pages
    shared by several processes counted in each) and of PSS (each page counted once)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = pss = 0
            for proc in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error, OSError):
                    total += proc.memory_info().rss
                    pss += proportional_set_size(proc.pid)
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def corpus_files(directory: Path) -> list[Path]:
    quiet = lambda message: None  # noqa: E731
    return [
        Path(fetch_corpus(name, output_dir=directory, progress=False, log=quiet).jsonl)
        for name in ("news", "wiki")
    ]


def texts_of(files: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for f in files for line in f.open()]


def run_ours(files: list[Path], spiece: Path, workers: int, output: Path) -> float:
    args = ["--config", "albert-base", "--quiet", "--tokenizer", str(spiece), "--num-workers", str(workers)]
    started = time.perf_counter()
    code = preprocess.main(["--input", *map(str, files), "--output", str(output), *args])
    elapsed = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"preprocess failed with exit code {code}")
    return elapsed


def run_peer(texts: list[str], spiece: Path) -> float:
    processor = tok.load(spiece)
    normalized = [normalize(t) for t in texts]  # the same normalized text our pipeline encodes
    started = time.perf_counter()
    processor.encode(normalized, num_threads=1)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--scale", type=int, default=10, help="size factor of the larger copy for the RSS check"
    )
    parser.add_argument("--skip-scale", action="store_true", help="skip the larger-copy RSS run")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "preprocess.json")
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = corpus_files(tmp / "corpora")
        texts = texts_of(files)
        megabytes = sum(len(t.encode()) for t in texts) / 1e6
        print(f"corpus: news + wiki, {len(texts):,} documents, {megabytes:.1f} MB of text", flush=True)

        # The tokenizer, trained once through the pipeline itself (reported apart).
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        started = time.perf_counter()
        code = preprocess.main(
            [
                "--config",
                "albert-base",
                "--quiet",
                "--input",
                *map(str, files),
                "--output",
                str(tmp / "trained"),
            ]
        )
        assert code == 0
        tokenizer_seconds = time.perf_counter() - started
        spiece = tmp / "trained" / "spiece.model"

        results: dict[str, list[float]] = {"spm-encode": [], "ours-1w": [], "ours-2w": []}
        peaks: dict[str, int] = {}
        peaks_pss: dict[str, int] = {}
        for repeat in range(args.repeats):
            results["spm-encode"].append(run_peer(texts, spiece))
            for workers in (1, 2):
                seconds = run_ours(files, spiece, workers, tmp / f"ours-{workers}-{repeat}")
                results[f"ours-{workers}w"].append(seconds)
            print(
                f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results.items()),
                flush=True,
            )

        if not args.skip_scale:
            big = tmp / "big"
            big.mkdir()
            big_files = []
            for i in range(args.scale):
                for f in files:
                    target = big / f"{f.stem}-{i:02d}.jsonl"
                    target.write_bytes(f.read_bytes())
                    big_files.append(target)
            big_seconds = run_ours(big_files, spiece, 2, tmp / "ours-big")
            # One worker on the same large copy: the scaling once fixed start-up costs are amortized.
            big_one_worker = run_ours(big_files, spiece, 1, tmp / "ours-big-1w")

        # Memory in runs of their own: sampling it (PSS above all) takes CPU from the timed runs.
        runs = [(f"ours-{w}w", files, w) for w in (1, 2)]
        if not args.skip_scale:
            runs.append((f"ours-2w-x{args.scale}", big_files, 2))
        for name, inputs, workers in runs:
            with PeakRss() as rss:
                run_ours(inputs, spiece, workers, tmp / f"memory-{name}")
            peaks[name], peaks_pss[name] = rss.peak, rss.peak_pss
        ray.shutdown()

    median = {k: statistics.median(v) for k, v in results.items()}
    rate = {k: megabytes / v for k, v in median.items()}
    per_core = {"spm-encode": rate["spm-encode"], "ours-1w": rate["ours-1w"], "ours-2w": rate["ours-2w"] / 2}
    report = {
        "megabytes": megabytes,
        "seconds": median,
        "mb_per_s": rate,
        "mb_per_s_per_core": per_core,
        "ratio_ours_1w_per_core_vs_spm": per_core["ours-1w"] / per_core["spm-encode"],
        "ratio_2w_vs_1w": rate["ours-2w"] / rate["ours-1w"],
        "tokenizer_training_seconds_incl_pipeline": tokenizer_seconds,
        "peak_rss_bytes": peaks,
        "peak_pss_bytes": peaks_pss,
    }
    if not args.skip_scale:
        report["scale"] = {
            "factor": args.scale,
            "seconds": big_seconds,
            "mb_per_s": megabytes * args.scale / big_seconds,
            "seconds_1w": big_one_worker,
            "mb_per_s_1w": megabytes * args.scale / big_one_worker,
            "ratio_2w_vs_1w": big_one_worker / big_seconds,
        }
        # The per-core ratio once start-up (Ray Data's execution, the actor's process and imports, about a
        # second) is amortized over ten times the text.
        report["scale"]["ratio_1w_per_core_vs_spm"] = report["scale"]["mb_per_s_1w"] / per_core["spm-encode"]
        report["ratio_peak_rss_scaled_vs_base"] = peaks[f"ours-2w-x{args.scale}"] / peaks["ours-2w"]
        report["ratio_peak_pss_scaled_vs_base"] = peaks_pss[f"ours-2w-x{args.scale}"] / peaks_pss["ours-2w"]

    print()
    print(f"{'run':<14}{'seconds':>10}{'MB/s':>10}{'MB/s/core':>12}{'peak RSS':>12}{'peak PSS':>12}")
    for name in median:
        memory = [f"{p[name] / 2**20:.0f} MiB" if name in p else "-" for p in (peaks, peaks_pss)]
        print(
            f"{name:<14}{median[name]:>10.2f}{rate[name]:>10.2f}{per_core[name]:>12.2f}{memory[0]:>12}{memory[1]:>12}"
        )
    if not args.skip_scale:
        name = f"ours-2w-x{args.scale}"
        print(
            f"{name:<14}{big_seconds:>10.2f}{report['scale']['mb_per_s']:>10.2f}{report['scale']['mb_per_s'] / 2:>12.2f}"
            f"{peaks[name] / 2**20:>9.0f} MiB{peaks_pss[name] / 2**20:>9.0f} MiB"
        )
        one = report["scale"]["mb_per_s_1w"]
        print(
            f"{f'ours-1w-x{args.scale}':<14}{big_one_worker:>10.2f}{one:>10.2f}{one:>12.2f}{'-':>12}{'-':>12}"
        )
    print()
    print(
        f"ours per core / SentencePiece alone: {report['ratio_ours_1w_per_core_vs_spm']:.2f} (target >= 0.50)"
    )
    print(f"2 workers / 1 worker:                {report['ratio_2w_vs_1w']:.2f} (target >= 1.7)")
    if not args.skip_scale:
        print(
            f"ours per core / SentencePiece alone on x{args.scale} (1 worker): "
            f"{report['scale']['ratio_1w_per_core_vs_spm']:.2f} (target >= 0.50)"
        )
        print(
            f"2 workers / 1 worker on x{args.scale}: {report['scale']['ratio_2w_vs_1w']:.2f} (target >= 1.7)"
        )
        print(
            f"peak RSS x{args.scale} corpus / x1:         {report['ratio_peak_rss_scaled_vs_base']:.2f} (target: flat, ~1.0)"
        )
        print(f"peak PSS x{args.scale} corpus / x1:         {report['ratio_peak_pss_scaled_vs_base']:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
