"""Training input: memory-mapped shards, a stateless global shuffle, data-parallel sharding with a
resumable cursor, and dynamic ALBERT masking.

A preprocessed directory (``albert-scale preprocess``) holds Arrow IPC shards of unmasked SOP instances
and a manifest. :class:`ShardedDataset` validates the manifest, memory-maps the shards (nothing is read
into RAM) and gathers instances by global index. :class:`PretrainingLoader` walks an epoch in a keyed
pseudo-random order, hands each rank its slice of every global batch, and masks each example with
random numbers keyed by (seed, epoch, example index), so an example looks the same whatever the number of
ranks. Its cursor is counted in examples of the global order, so a run resumes exactly, also at another
world size.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from albert_scale.config import DataConfig
from albert_scale.fileio import sha256_file
from albert_scale.masking import IGNORE_INDEX, MaskedBatch, example_seeds, mask_batch, mix64, word_starts
from data_pipeline.instances import SHARD_SCHEMA, stable_hash
from data_pipeline.shards import read_manifest
from data_pipeline.tokenizer import CLS_ID, MODEL_FILENAME, SEP_ID

__all__ = ["Cursor", "EvalSet", "PretrainingLoader", "ShardedDataset", "StatelessPermutation", "crop_pair"]


class ShardedDataset:
    """One split of a preprocessed directory, memory-mapped.

    Checks on open: the manifest's schema version, the tokenizer's sha256, every shard's presence,
    schema and row count (a truncated or corrupt file is an error naming it). ``verify_checksums``
    also compares every shard's sha256 with the manifest (reads every byte once).
    """

    def __init__(self, directory: str | Path, *, split: str = "train", verify_checksums: bool = False):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if split not in self.manifest["splits"]:
            raise ValueError(f"dataset {str(self.directory)!r}: no split {split!r} in the manifest")
        self.split = split
        tokenizer = self.directory / MODEL_FILENAME
        if not tokenizer.is_file():
            raise FileNotFoundError(f"dataset {str(self.directory)!r}: {MODEL_FILENAME} is missing")
        if sha256_file(tokenizer) != self.manifest["tokenizer"]["sha256"]:
            raise ValueError(
                f"dataset {str(self.directory)!r}: {MODEL_FILENAME} is not the tokenizer the shards were made with "
                "(sha256 differs from the manifest)"
            )
        self.vocab_size = int(self.manifest["tokenizer"]["vocab_size"])
        self.max_seq_length = int(self.manifest["config"]["data"]["max_seq_length"])
        self._offsets: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._a_lengths: list[np.ndarray] = []
        self._sop: list[np.ndarray] = []
        rows = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.directory / shard["file"]
            if verify_checksums and sha256_file(path) != shard["sha256"]:
                raise ValueError(f"shard {str(path)!r}: sha256 differs from the manifest (corrupt file)")
            table = self._open(path, shard["rows"])
            ids = table["input_ids"].combine_chunks()
            self._offsets.append(ids.offsets.to_numpy())
            self._tokens.append(ids.values.to_numpy())
            self._a_lengths.append(table["segment_a_length"].to_numpy())
            self._sop.append(table["sop_label"].to_numpy())
            rows.append(shard["rows"])
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.fingerprint = str(self.manifest["fingerprint"])

    @staticmethod
    def _open(path: Path, expected_rows: int) -> pa.Table:
        if not path.is_file():
            raise FileNotFoundError(f"shard {str(path)!r}: missing")
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"shard {str(path)!r}: unreadable, truncated or corrupt ({err})") from None
        if table.schema != SHARD_SCHEMA:
            raise ValueError(f"shard {str(path)!r}: its schema is not the shard schema")
        if table.num_rows != expected_rows:
            raise ValueError(f"shard {str(path)!r}: {table.num_rows} rows, the manifest says {expected_rows}")
        return table

    def __len__(self) -> int:
        return int(self._starts[-1])

    @functools.cached_property
    def manifest_sha256(self) -> str:
        """sha256 of the dataset's manifest file (it names every shard's sha256 in turn)."""
        from data_pipeline.shards import MANIFEST

        return sha256_file(self.directory / MANIFEST)

    def instance(self, index: int) -> tuple[np.ndarray, int, int]:
        """(input_ids, segment A length, sop label) of one instance, as stored."""
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        row = index - int(self._starts[shard])
        offsets = self._offsets[shard]
        tokens = self._tokens[shard][offsets[row] : offsets[row + 1]]
        return tokens, int(self._a_lengths[shard][row]), int(self._sop[shard][row])

    def collate(self, indices: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
        """Padded arrays for the given instances, cropped to ``seq_len`` around the A/B boundary."""
        batch = len(indices)
        input_ids = np.zeros((batch, seq_len), dtype=np.int32)
        token_types = np.zeros((batch, seq_len), dtype=np.int32)
        sop = np.zeros(batch, dtype=np.int64)
        for i, index in enumerate(indices):
            tokens, a_len, label = self.instance(int(index))
            if len(tokens) > seq_len:
                tokens, a_len = crop_pair(tokens, a_len, seq_len)
            input_ids[i, : len(tokens)] = tokens
            token_types[i, a_len + 2 : len(tokens)] = 1
            sop[i] = label
        return {
            "input_ids": input_ids,
            "token_type_ids": token_types,
            "attention_mask": (input_ids != 0).astype(np.int32),
            "sentence_order_labels": sop,
        }


def crop_pair(tokens: np.ndarray, a_len: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Fits ``[CLS] A [SEP] B [SEP]`` into ``seq_len`` keeping the A/B boundary (the SOP signal):
    the longer segment loses tokens first, A from its front, B from its back."""
    a = tokens[1 : 1 + a_len]
    b = tokens[2 + a_len : -1]
    keep_a, keep_b = len(a), len(b)
    while keep_a + keep_b > seq_len - 3:  # as truncate_seq_pair: the longer one, B on a tie
        if keep_a > keep_b:
            keep_a -= 1
        else:
            keep_b -= 1
    cropped = np.concatenate([[CLS_ID], a[len(a) - keep_a :], [SEP_ID], b[:keep_b], [SEP_ID]]).astype(
        tokens.dtype
    )
    return cropped, keep_a


class StatelessPermutation:
    """A keyed pseudo-random permutation of range(n), computed per index with no table in memory: a
    4-round Feistel network over the smallest even power-of-two domain, with cycle walking."""

    ROUNDS = 4

    def __init__(self, n: int, key: int):
        assert n >= 1
        self.n = n
        bits = max(2, int(np.ceil(np.log2(n))))
        bits += bits % 2
        self.half = bits // 2
        self.mask = np.uint64((1 << self.half) - 1)
        digest = hashlib.blake2b(str(key).encode(), digest_size=8 * self.ROUNDS).digest()
        self.round_keys = [
            np.uint64(int.from_bytes(digest[8 * i : 8 * i + 8], "little")) for i in range(self.ROUNDS)
        ]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left = (x >> np.uint64(self.half)) & self.mask
        right = x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(indices, dtype=np.uint64))
        outside = x >= np.uint64(self.n)
        while outside.any():  # cycle walking: at most a few rounds, the domain is < 4n
            x[outside] = self._feistel(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)


@dataclass
class Cursor:
    """Where training stands in the data: an epoch and the examples of its global order consumed.
    Counted in examples, not in rank-local batches, so it means the same at any world size."""

    epoch: int = 0
    consumed: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Cursor:
        return cls(int(state["epoch"]), int(state["consumed"]))


@dataclass(frozen=True)
class Phase:
    """A stretch of training at one sequence length (e.g. most steps at 128, then 512)."""

    seq_len: int
    max_predictions: int
    until_step: int | None  # exclusive; None = to the end


class PretrainingLoader:
    """Yields this rank's micro-batches, global step by global step, as torch tensors.

    Every global batch is ``global_batch_size`` consecutive examples of the epoch's order; rank r takes
    the r-th contiguous slice and cuts it into ``accumulation`` micro-batches. An epoch has
    ``len(dataset) // global_batch_size`` steps on every rank (the remainder waits for the next epoch's
    order), so no rank ever waits on another for data.
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int,
        phases: list[Phase],
        masked_lm_prob: float,
        static_masking: bool = False,
        cursor: Cursor | None = None,
    ):
        per_rank, remainder = divmod(global_batch_size, world_size)
        if remainder or per_rank % micro_batch_size:
            raise ValueError(
                f"global batch {global_batch_size} does not split into micro batches of {micro_batch_size} "
                f"over {world_size} ranks"
            )
        if len(dataset) < global_batch_size:
            raise ValueError(
                f"dataset {str(dataset.directory)!r} ({dataset.split}) has {len(dataset)} instances, fewer than "
                f"one global batch of {global_batch_size}"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.accumulation = per_rank // micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.phases = phases
        self.masked_lm_prob = masked_lm_prob
        self.static_masking = static_masking
        self.cursor = cursor or Cursor()
        self.steps_per_epoch = len(dataset) // global_batch_size
        if self.cursor.consumed % global_batch_size:
            raise ValueError(
                f"the data cursor stands at {self.cursor.consumed} examples into epoch {self.cursor.epoch}, "
                f"not a multiple of the global batch {global_batch_size}: resume with the batch size it was saved with"
            )
        self.word_start = word_start_table(dataset)

    @property
    def step(self) -> int:
        """Global steps taken over all epochs."""
        return self.cursor.epoch * self.steps_per_epoch + self.cursor.consumed // self.global_batch_size

    def phase(self, step: int) -> Phase:
        for phase in self.phases:
            if phase.until_step is None or step < phase.until_step:
                return phase
        return self.phases[-1]

    def order(self, epoch: int) -> StatelessPermutation:
        """The epoch's order: position in the epoch -> dataset index."""
        return StatelessPermutation(len(self.dataset), key=stable_hash(self.seed, epoch))

    def global_batch_indices(self, epoch: int, consumed: int) -> np.ndarray:
        """Dataset indices of the global batch that starts ``consumed`` examples into ``epoch``."""
        return self.order(epoch)(np.arange(consumed, consumed + self.global_batch_size))

    def micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """The next global step's micro-batches for this rank; advances the cursor."""
        if self.cursor.consumed + self.global_batch_size > self.steps_per_epoch * self.global_batch_size:
            self.cursor = Cursor(self.cursor.epoch + 1, 0)
        phase = self.phase(self.step)
        indices = self.global_batch_indices(self.cursor.epoch, self.cursor.consumed)
        per_rank = self.global_batch_size // self.world_size
        mine = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
        mask_epoch = 0 if self.static_masking else self.cursor.epoch
        # The rank's whole slice is collated and masked at once, then cut: one call pays masking's fixed
        # cost once per step, and an example's mask does not depend on the batch it is masked in.
        whole = self.make_batch(mine, phase, mask_epoch)
        self.cursor = Cursor(self.cursor.epoch, self.cursor.consumed + self.global_batch_size)
        return [
            {key: tensor[start : start + self.micro_batch_size] for key, tensor in whole.items()}
            for start in range(0, per_rank, self.micro_batch_size)
        ]

    def mask(self, indices: np.ndarray, input_ids: np.ndarray, phase: Phase, mask_epoch: int) -> MaskedBatch:
        """Masks padded ``input_ids`` of the given dataset indices, keyed by (seed, epoch, index)."""
        return mask_batch(
            input_ids,
            seeds=example_seeds(self.seed, mask_epoch, indices),
            word_start=self.word_start,
            vocab_size=self.dataset.vocab_size,
            masked_lm_prob=self.masked_lm_prob,
            max_predictions=phase.max_predictions,
        )

    def make_batch(self, indices: np.ndarray, phase: Phase, mask_epoch: int) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for the given dataset indices."""
        arrays = self.dataset.collate(indices, phase.seq_len)
        masked = self.mask(indices, arrays["input_ids"], phase, mask_epoch)
        return {
            "input_ids": torch.from_numpy(masked.input_ids.astype(np.int64)),
            "attention_mask": torch.from_numpy(arrays["attention_mask"].astype(np.int64)),
            "token_type_ids": torch.from_numpy(arrays["token_type_ids"].astype(np.int64)),
            "masked_lm_positions": torch.from_numpy(masked.masked_positions.astype(np.int64)),
            "masked_lm_labels": torch.from_numpy(masked.masked_labels.astype(np.int64)),
            "sentence_order_labels": torch.from_numpy(arrays["sentence_order_labels"]),
        }

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield self.micro_batches()

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor.state_dict(), "dataset": self.dataset.fingerprint, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["dataset"] != self.dataset.fingerprint:
            raise ValueError(
                "the checkpoint's data cursor belongs to another dataset (manifest fingerprint differs)"
            )
        self.cursor = Cursor.from_state_dict(state["cursor"])


def word_start_table(dataset: ShardedDataset) -> np.ndarray:
    """Per token id, whether its piece starts a word (for whole-word masking), from the dataset's tokenizer."""
    from data_pipeline.tokenizer import from_proto

    processor = from_proto((dataset.directory / MODEL_FILENAME).read_bytes())
    return word_starts([processor.id_to_piece(i) for i in range(processor.get_piece_size())])


class EvalSet:
    """A fixed validation set: the first ``limit`` instances of a split (0 = all), masked once and for all.

    Masking is keyed by (seed, epoch 0, index), as static masking in training, so every pass sees the
    same inputs. Rank r takes instances r, r + W, r + 2W, ... and every rank runs the same number of
    micro-batches (a rank that runs out repeats an instance with its labels ignored), so no rank waits
    on another, also under ZeRO-3 where a forward pass is collective.
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        *,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        phase: Phase,
        masked_lm_prob: float,
        limit: int = 0,
    ):
        total = len(dataset) if limit == 0 else min(limit, len(dataset))
        if total == 0:
            raise ValueError(
                f"dataset {str(dataset.directory)!r} ({dataset.split}) has no instances to evaluate"
            )
        self.dataset = dataset
        self.total = total
        self.seed = seed
        self.phase = phase
        self.masked_lm_prob = masked_lm_prob
        self.word_start = word_start_table(dataset)
        mine = np.arange(rank, total, world_size)
        per_rank = -(-total // world_size)
        self.num_batches = -(-per_rank // micro_batch_size)
        padded = np.full(self.num_batches * micro_batch_size, -1, dtype=np.int64)
        padded[: len(mine)] = mine
        self._chunks = padded.reshape(self.num_batches, micro_batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for chunk in self._chunks:
            real = chunk >= 0
            indices = np.where(real, chunk, 0)
            arrays = self.dataset.collate(indices, self.phase.seq_len)
            masked = mask_batch(
                arrays["input_ids"],
                seeds=example_seeds(self.seed, 0, indices),
                word_start=self.word_start,
                vocab_size=self.dataset.vocab_size,
                masked_lm_prob=self.masked_lm_prob,
                max_predictions=self.phase.max_predictions,
            )
            labels = masked.masked_labels.astype(np.int64)
            labels[~real] = IGNORE_INDEX
            sop = arrays["sentence_order_labels"].copy()
            sop[~real] = IGNORE_INDEX
            yield {
                "input_ids": torch.from_numpy(masked.input_ids.astype(np.int64)),
                "attention_mask": torch.from_numpy(arrays["attention_mask"].astype(np.int64)),
                "token_type_ids": torch.from_numpy(arrays["token_type_ids"].astype(np.int64)),
                "masked_lm_positions": torch.from_numpy(masked.masked_positions.astype(np.int64)),
                "masked_lm_labels": torch.from_numpy(labels),
                "sentence_order_labels": torch.from_numpy(sop),
            }


def phases(data: DataConfig) -> list[Phase]:
    """The sequence-length phases of a run: an optional phase 1, then ``max_seq_length``."""
    final = Phase(data.max_seq_length, data.max_predictions_per_seq, None)
    if data.phase1_seq_length and data.phase1_steps:
        return [Phase(data.phase1_seq_length, data.phase1_max_predictions, data.phase1_steps), final]
    return [final]
