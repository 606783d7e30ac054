"""Preprocessing building blocks without Ray: text, readers, tokenizer, SOP instances, shards."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import tokenizer as tok
from data_pipeline.instances import SHARD_SCHEMA, document_instances, instances_table
from data_pipeline.readers import InputFile, ReadLimits, discover, read_documents
from data_pipeline.shards import BATCH_ROWS, ShardWriter
from data_pipeline.stages import DocumentEncoder, explode
from data_pipeline.text import _ABBREVIATIONS as ABBREVIATIONS
from data_pipeline.text import normalize, normalize_many, split_sentences

pytestmark = pytest.mark.unit

SENTENCES = [
    "The committee met on Tuesday to discuss the budget.",
    "Several members raised concerns about the new proposal.",
    "A vote is expected next week, after further review.",
    "Officials said the plan would reduce costs by ten percent.",
    "Critics argued that the savings were overstated.",
]


# --------------------------------------------------------------------------------------------- text


def test_normalize_as_albert():
    assert normalize("  Café\t``naïve''  RÉSUMÉ\n Ångström ") == 'cafe "naive" resume angstrom'
    assert normalize("Keep Case", lowercase=False) == "Keep Case"


def test_split_sentences_keeps_abbreviations_and_lines():
    text = 'Dr. Smith went to Washington. He arrived at 5 p.m. on Monday! "Great," he said.\nNew line here'
    assert split_sentences(text) == [
        "Dr. Smith went to Washington.",
        "He arrived at 5 p.m. on Monday!",
        '"Great," he said.',
        "New line here",
    ]
    assert split_sentences("\n \n") == []


def reference_normalize(sentence: str, *, lowercase: bool = True) -> str:
    """ALBERT's ``preprocess_text``, character by character as its definition reads."""
    text = sentence.replace("``", '"').replace("''", '"')
    if lowercase:
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    return " ".join(text.split())


def test_normalize_many_equals_the_reference_for_every_code_point():
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    # Each character alone, between ASCII letters, doubled, and after a letter it could combine with.
    sentences = [" ".join(f"{c}a{c}b{c}{c}e{c}Z".splitlines()) for c in chars]
    rng = random.Random(0)
    mixed = chars[:0x3000] + list("aeAE \t\u00a0\u0301\u0327`'")
    sentences += [" ".join("".join(rng.choices(mixed, k=12)).splitlines()) for _ in range(20000)]
    for lowercase in (True, False):
        expected = [reference_normalize(s, lowercase=lowercase) for s in sentences]
        assert normalize_many(sentences, lowercase=lowercase) == expected


def reference_split(text: str) -> list[str]:
    """``split_sentences`` as first written: a look-behind for the punctuation, and every candidate's
    last word cut out and looked up."""
    end = re.compile(r"""(?<=[.!?])["')\]’”]*\s+(?=["'(\[‘“]?[A-Z0-9])""")
    sentences = []
    for line in text.splitlines():
        line = line.strip()
        start = 0
        for match in end.finditer(line):
            word = line[start : match.start()].rstrip().rsplit(" ", 1)[-1].rstrip(".!?\"')]’”").lower()
            if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
            sentences.append(line[start : match.end()].strip())
            start = match.end()
        if line[start:].strip():
            sentences.append(line[start:].strip())
    return sentences


def test_split_sentences_equals_the_reference_on_random_text():
    rng = random.Random(0)
    pieces = ["Dr", "dr", "U.S", "e.g", "J", "x", "Word", "A", "1", "Sept", "etc", " ", "  ", "\t", "\n"]
    pieces += [".", "!", "?", "...", '"', "'", ")", "]", "’", "”", "(", "“", "‘", "é", "\u00a0"]
    for _ in range(20000):
        text = "".join(rng.choices(pieces, k=rng.randint(0, 14)))
        assert split_sentences(text) == reference_split(text), repr(text)


def test_preprocessing_workers_do_not_import_torch():
    """The encoding actors import data_pipeline.stages; torch would add a second and ~200 MB to each."""
    code = "import sys, data_pipeline.stages, data_pipeline.readers; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------ readers


def read_all(path: Path, **limits) -> list[tuple[str, str]]:
    files, _ = discover([str(path)])
    return [doc for f in files for doc in read_documents(f, ReadLimits(**limits))]


def test_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\n\nnext document\n")
    assert read_all(path) == [("first line\nsecond line", ""), ("next document", "")]


@pytest.mark.parametrize("compression", ["gz", "zst"])
def test_compressed_inputs(tmp_path, compression):
    path = tmp_path / f"a.txt.{compression}"
    data = b"one\n\ntwo\n"
    if compression == "gz":
        path.write_bytes(gzip.compress(data))
    else:
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(data)
    assert read_all(path) == [("one", ""), ("two", "")]


def test_jsonl_parquet_and_datasets_directory(tmp_path):
    import datasets

    texts = ["alpha beta.", "gamma delta."]
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts))
    )
    pq.write_table(pa.table({"text": texts}), tmp_path / "b.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "hf"))
    for path in ("a.jsonl", "b.parquet", "hf"):
        assert read_all(tmp_path / path) == [(t, "") for t in texts], path


def test_bad_records_are_skipped_with_reasons(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n{"body": "x"}\n')
    assert read_all(tmp_path / "bad.jsonl") == [
        ("ok", ""),
        ("", "invalid JSON (line 2)"),
        ("", "no string field 'text'"),
    ]
    (tmp_path / "utf.txt").write_bytes(b"good\n\nbad \xff\xfe byte\n\nalso good\n")
    assert read_all(tmp_path / "utf.txt") == [("good", ""), ("", "invalid UTF-8"), ("also good", "")]
    (tmp_path / "empty.txt").write_bytes(b"")
    assert read_all(tmp_path / "empty.txt") == [("", "empty file")]
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    assert read_all(tmp_path / "binary.txt") == [("", "unreadable file: binary file (NUL bytes)")]


def test_long_line_skips_its_document_only(tmp_path):
    path = tmp_path / "long.txt"
    path.write_bytes(b"short\n\n" + b"x" * 5000 + b"\nmore of that doc\n\nlast\n")
    assert read_all(path, max_line_bytes=1000) == [
        ("short", ""),
        ("", "line longer than max_line_bytes=1000"),
        ("last", ""),
    ]


def test_discover_dirs_globs_and_errors(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "d" / "notes.pdf").write_bytes(b"%PDF")
    files, skipped = discover([str(tmp_path / "d")])
    assert [Path(f.uri).name for f in files] == ["b.txt", "a.jsonl"]
    assert [(Path(p).name, r) for p, r in skipped] == [("notes.pdf", "unsupported file type")]
    files, _ = discover([str(tmp_path / "d" / "**" / "*.jsonl")])
    assert [Path(f.uri).name for f in files] == ["a.jsonl"]
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        discover([str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="unsupported file type"):
        discover([str(tmp_path / "d" / "notes.pdf")])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        discover([str(tmp_path / "*.parquet")])


def test_file_uri_is_read_through_pyarrow_filesystems(tmp_path):
    (tmp_path / "a.txt").write_text("via uri\n")
    files, _ = discover([f"file://{tmp_path}/a.txt"])
    assert [doc for doc in read_documents(files[0], ReadLimits())] == [("via uri", "")]
    assert isinstance(files[0], InputFile)


# -------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("spiece")
    sample = directory / "sample.txt"
    rng = random.Random(0)
    words = " ".join(SENTENCES).lower().replace(".", " .").replace(",", " ,").split()
    sample.write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)) + "\n")
    return tok.train(sample, directory / "spiece.model", vocab_size=60, seed=1)


def test_trained_tokenizer_has_albert_special_ids_and_is_reproducible(spiece, tmp_path):
    processor = tok.load(spiece, vocab_size=60)
    assert [processor.id_to_piece(i) for i in range(5)] == ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    again = tok.train(spiece.parent / "sample.txt", tmp_path / "again.model", vocab_size=60, seed=1)
    assert again.read_bytes() == spiece.read_bytes()


def test_tokenizer_errors_name_the_problem(spiece, tmp_path):
    with pytest.raises(
        ValueError, match=r"has 60 pieces but model.vocab_size=30000; set model.vocab_size=60"
    ):
        tok.load(spiece, vocab_size=30000)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        tok.load(junk)
    with pytest.raises(ValueError, match="too small for this vocabulary"):
        tok.train(spiece.parent / "sample.txt", tmp_path / "big.model", vocab_size=5000, seed=1)


def test_encoder_ids_equal_sentencepiece_ids_of_the_normalized_text(spiece):
    documents = pa.table(
        {
            "document": pa.array([7, 8, 9], pa.int64()),
            "text": [" ".join(SENTENCES), "A", " \n "],
            "skip": ["", "", ""],
        }
    )
    encoder = DocumentEncoder(
        spiece.read_bytes(), max_seq_length=512, short_seq_prob=0.0, seed=3, validation_fraction=0.0
    )
    encoded = encoder(documents)
    processor = tok.load(spiece)
    assert len(processor.encode("a")) == 1
    assert encoded["skip"].to_pylist() == ["", "too short for a sentence pair", "empty document"]
    expected = [processor.encode(normalize(s)) for s in split_sentences(" ".join(SENTENCES))]
    (ids,) = encoded["input_ids"][0].as_py()
    (a_len,) = encoded["segment_a_length"][0].as_py()
    (sop,) = encoded["sop_label"][0].as_py()
    a, b = ids[1 : 1 + a_len], ids[2 + a_len : -1]
    first, second = (b, a) if sop else (a, b)
    assert first + second == [t for sentence in expected for t in sentence]
    assert ids[0] == tok.CLS_ID and ids[1 + a_len] == tok.SEP_ID and ids[-1] == tok.SEP_ID
    train, validation = explode(encoded)
    assert train.num_rows == 1 and validation.num_rows == 0 and train.schema == SHARD_SCHEMA


# -------------------------------------------------------------------------------------- instances


def fake_document(rng: random.Random, sentences: int) -> list[list[int]]:
    return [[rng.randrange(5, 1000) for _ in range(rng.randint(1, 40))] for _ in range(sentences)]


def test_instances_follow_create_pretraining_data():
    rng = random.Random(0)
    labels: Counter[int] = Counter()
    lengths = []
    for doc_index in range(400):
        document = fake_document(rng, rng.randint(1, 30))
        tokens = Counter(t for s in document for t in s)
        for ids, a_len, sop in document_instances(
            document, max_seq_length=128, short_seq_prob=0.1, rng=random.Random(doc_index)
        ):
            assert len(ids) <= 128 and ids[0] == tok.CLS_ID and ids[1 + a_len] == tok.SEP_ID
            assert ids[-1] == tok.SEP_ID and a_len >= 1 and len(ids) - a_len - 3 >= 1
            body = ids[1 : 1 + a_len] + ids[2 + a_len : -1]
            assert not Counter(body) - tokens  # every token comes from this document
            labels[sop] += 1
            lengths.append(len(ids))
    total = labels[0] + labels[1]
    assert abs(labels[1] / total - 0.5) < 0.05
    assert max(lengths) == 128 and min(lengths) < 64  # full-length packing, and short targets


def reference_instances(
    sentences: list[list[int]], *, max_seq_length: int, short_seq_prob: float, rng: random.Random
) -> list[tuple[list[int], int, int]]:
    """create_pretraining_data's pairing on token lists, as plainly as it reads: chunks up to a target
    length, a random A/B split, a swap with p = 0.5, then the longer side trimmed token by token."""
    max_tokens = max_seq_length - 3
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    instances, chunk, length = [], [], 0
    for i, sentence in enumerate(sentences):
        if not sentence:
            continue
        chunk.append(sentence)
        length += len(sentence)
        if i < len(sentences) - 1 and length < target:
            continue
        if len(chunk) >= 2:
            a_end = rng.randint(1, len(chunk) - 1)
            a, b = [t for s in chunk[:a_end] for t in s], [t for s in chunk[a_end:] for t in s]
        elif len(chunk[0]) >= 2:
            cut = rng.randint(1, len(chunk[0]) - 1)
            a, b = list(chunk[0][:cut]), list(chunk[0][cut:])
        else:
            a, b = [], []
        if a and b:
            swapped = rng.random() < 0.5
            if swapped:
                a, b = b, a
            while len(a) + len(b) > max_tokens:
                longer = a if len(a) > len(b) else b
                if rng.random() < 0.5:
                    del longer[0]
                else:
                    longer.pop()
            instances.append(([tok.CLS_ID, *a, tok.SEP_ID, *b, tok.SEP_ID], len(a), int(swapped)))
        chunk, length = [], 0
    return instances


def test_instances_equal_the_reference_draw_for_draw():
    rng = random.Random(0)
    for doc in range(1500):
        sizes = [rng.choice([0, 1, 2, 3, 5, 20, 40, 200, 600]) for _ in range(rng.randint(1, 30))]
        document = [[rng.randrange(5, 1000) for _ in range(n)] for n in sizes]
        for seq in (16, 64, 512):
            kwargs = {"max_seq_length": seq, "short_seq_prob": 0.1}
            ours = document_instances(document, rng=random.Random(doc), **kwargs)
            assert ours == reference_instances(document, rng=random.Random(doc), **kwargs)


def test_instances_depend_only_on_the_document_and_its_seed():
    document = fake_document(random.Random(1), 20)
    a = document_instances(document, max_seq_length=64, short_seq_prob=0.1, rng=random.Random(5))
    b = document_instances(document, max_seq_length=64, short_seq_prob=0.1, rng=random.Random(5))
    assert a == b


def test_shard_writer_cuts_fixed_row_counts(tmp_path):
    rows = [([2, i, 3, i, 3], 1, i % 2, i) for i in range(2500)]
    writer = ShardWriter(tmp_path, "train", shard_rows=1100)
    for start in range(0, 2500, 300):
        writer.add(instances_table(rows[start : start + 300]))
    shards = writer.close()
    assert [s["rows"] for s in shards] == [1100, 1100, 300]
    assert [s["tokens"] for s in shards] == [5500, 5500, 1500]
    reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / "train-00001.arrow")))
    assert reader.schema == SHARD_SCHEMA
    assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == [
        BATCH_ROWS,
        1100 - BATCH_ROWS,
    ]
    assert reader.read_all()["document"][0].as_py() == 1100
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_bytes_do_not_depend_on_how_the_stream_was_cut(tmp_path):
    rng = random.Random(0)
    rows = [([2, *range(rng.randint(1, 30)), 3, i, 3], 1, i % 2, i) for i in range(5000)]
    whole = instances_table(rows)
    cuts = {
        "one table": [whole],
        "single rows": [whole.slice(i, 1) for i in range(whole.num_rows)],
        "random slices of one table": [],
        "tables of their own, chunked": [],
    }
    start = 0
    while start < len(rows):
        n = rng.randint(1, 1500)
        cuts["random slices of one table"].append(whole.slice(start, n))
        own = instances_table(rows[start : start + n])
        cuts["tables of their own, chunked"].append(
            pa.concat_tables([own.slice(0, n // 2), own.slice(n // 2)])
        )
        start += n
    digests = {}
    for name, tables in cuts.items():
        directory = tmp_path / name.replace(" ", "-")
        directory.mkdir()
        writer = ShardWriter(directory, "train", shard_rows=1900)
        for table in tables:
            writer.add(table)
        digests[name] = [(shard["rows"], shard["sha256"]) for shard in writer.close()]
    assert len(set(map(tuple, digests.values()))) == 1, digests
    assert [rows for rows, _ in digests["one table"]] == [1900, 1900, 1200]


def test_default_workers_are_every_cpu_but_one_per_32_mb_of_input():
    from data_pipeline.preprocess import default_workers

    mb = 1 << 20
    assert default_workers(2, 0) == 1  # empty inputs are reported later; still one worker
    assert default_workers(2, 16 * mb) == 1  # the built-in corpora: a second actor would only start
    assert default_workers(2, 32 * mb + 1) == 2
    assert default_workers(2, 10_000 * mb) == 2  # never more than the CPUs
    assert default_workers(64, 100 * mb) == 4
    assert default_workers(64, 10_000 * mb) == 64
