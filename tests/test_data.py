"""The training loader on real shards: validation, sharding over ranks, resume, phases, masking stats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from albert_scale.config import load_config
from albert_scale.data import (
    Cursor,
    PretrainingLoader,
    ShardedDataset,
    StatelessPermutation,
    crop_pair,
    phases,
)
from data_pipeline.shards import MANIFEST

pytestmark = pytest.mark.multiprocess  # the shards are made through a local Ray

SEQ = 64


@pytest.fixture(scope="module")
def shards(tiny_shards) -> Path:
    """Real shards: gensim's Lee corpus through the preprocessing pipeline (tiny config, seq 64)."""
    return tiny_shards


def loader(
    shards: Path, *, rank=0, world=1, micro=4, global_batch=16, cursor=None, **data
) -> PretrainingLoader:
    config = load_config("tiny", [f"data.{k}={v}" for k, v in data.items()])
    return PretrainingLoader(
        ShardedDataset(shards),
        global_batch_size=global_batch,
        micro_batch_size=micro,
        rank=rank,
        world_size=world,
        seed=7,
        phases=phases(config.data),
        masked_lm_prob=config.data.masked_lm_prob,
        static_masking=config.data.masking == "static",
        cursor=cursor,
    )


def by_example(batches: list[dict[str, torch.Tensor]]) -> list[tuple]:
    """Each example of a list of micro-batches as a hashable tuple of everything the model sees."""
    rows = []
    for b in batches:
        for i in range(len(b["input_ids"])):
            rows.append(tuple(tuple(b[k][i].flatten().tolist()) for k in sorted(b)))
    return rows


def test_dataset_reads_every_instance_memory_mapped(shards):
    dataset = ShardedDataset(shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    assert len(dataset) == manifest["splits"]["train"]["rows"]
    assert len(ShardedDataset(shards, split="validation")) == manifest["splits"]["validation"]["rows"]
    tokens, a_len, sop = dataset.instance(len(dataset) - 1)
    assert tokens[0] == 2 and tokens[1 + a_len] == 3 and tokens[-1] == 3 and sop in (0, 1)
    batch = dataset.collate(np.arange(8), SEQ)
    assert batch["input_ids"].shape == (8, SEQ)
    types = batch["token_type_ids"]
    mask = batch["attention_mask"]
    assert np.all(types[mask == 0] == 0) and np.all(types[:, 0] == 0)


@pytest.mark.reliability
def test_corrupt_truncated_and_mismatched_shards_are_named(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = copy / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit in the token data
    shard.write_bytes(bytes(data))
    ShardedDataset(copy)  # structure intact: only the checksum can tell
    with pytest.raises(ValueError, match=r"train-00000.arrow'?: sha256 differs"):
        ShardedDataset(copy, verify_checksums=True)
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match=r"train-00000.arrow'?: unreadable, truncated or corrupt"):
        ShardedDataset(copy)
    (copy / "train-00000.arrow").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-00000.arrow'?: missing"):
        ShardedDataset(copy)
    shutil.copyfile(shards / "train-00000.arrow", copy / "train-00000.arrow")
    (copy / "spiece.model").write_bytes(b"other")
    with pytest.raises(ValueError, match="not the tokenizer the shards were made with"):
        ShardedDataset(copy)


def test_permutation_is_a_bijection_and_keyed():
    for n in (1, 2, 7, 100, 1000, 4097):
        perm = StatelessPermutation(n, key=3)(np.arange(n))
        assert sorted(perm.tolist()) == list(range(n))
    a = StatelessPermutation(1000, key=1)(np.arange(1000))
    b = StatelessPermutation(1000, key=2)(np.arange(1000))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))


def test_crop_keeps_the_boundary():
    tokens = np.array([2, 10, 11, 12, 13, 14, 3, 20, 21, 3], dtype=np.int32)
    cropped, a_len = crop_pair(tokens, 5, 8)
    assert cropped.tolist() == [2, 12, 13, 14, 3, 20, 21, 3] and a_len == 3
    cropped, a_len = crop_pair(tokens, 5, 6)
    assert cropped.tolist() == [2, 13, 14, 3, 20, 3] and a_len == 2


def test_every_rank_gets_its_own_slice_and_the_union_is_the_single_process_batch(shards):
    single = loader(shards, world=1, micro=4)
    ranks = [loader(shards, rank=r, world=2, micro=4) for r in range(2)]
    for _ in range(3):
        whole = by_example(single.micro_batches())
        parts = [by_example(r.micro_batches()) for r in ranks]
        assert len(parts[0]) == len(parts[1]) == 8
        assert parts[0] + parts[1] == whole  # identical examples, masks included, in the same order


def test_equal_batches_on_every_rank_across_an_epoch(shards):
    ranks = [loader(shards, rank=r, world=2, micro=2, global_batch=16) for r in range(2)]
    steps = ranks[0].steps_per_epoch
    for _ in range(steps + 2):  # into the next epoch: no rank runs out
        sizes = [sum(len(b["input_ids"]) for b in r.micro_batches()) for r in ranks]
        assert sizes == [8, 8]
    assert ranks[0].cursor.epoch == ranks[1].cursor.epoch == 1


def test_resume_is_exact_and_works_at_another_world_size(shards):
    straight = loader(shards, world=1, micro=4)
    expected = [by_example(straight.micro_batches()) for _ in range(6)]
    first = loader(shards, world=2, micro=4, rank=0)
    for _ in range(3):
        first.micro_batches()
    state = first.state_dict()
    resumed = loader(shards, world=1, micro=8)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # through a checkpoint's JSON
    assert [by_example(resumed.micro_batches()) for _ in range(3)] == expected[3:]


def test_cursor_from_another_batch_size_is_refused(shards):
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        loader(shards, cursor=Cursor(0, 24), global_batch=16)


def test_dynamic_masks_change_per_epoch_static_ones_do_not(shards):
    for masking, same in (("dynamic", False), ("static", True)):
        run = loader(shards, masking=masking)
        epoch0 = run.make_batch(np.arange(8), run.phases[0], 0)
        epoch1 = run.make_batch(np.arange(8), run.phases[0], 0 if run.static_masking else 1)
        assert torch.equal(epoch0["masked_lm_positions"], epoch1["masked_lm_positions"]) is same


def test_phases_switch_sequence_length(shards):
    run = loader(shards, phase1_seq_length=32, phase1_steps=2, phase1_max_predictions=5)
    shapes = [
        (b[0]["input_ids"].shape[1], b[0]["masked_lm_positions"].shape[1])
        for b in (run.micro_batches() for _ in range(4))
    ]
    assert shapes == [(32, 5), (32, 5), (SEQ, 10), (SEQ, 10)]


def test_batches_feed_the_model(shards):
    from albert_scale.model import AlbertForPreTraining

    config = load_config("tiny")
    model = AlbertForPreTraining(config.model)
    batch = loader(shards).micro_batches()[0]
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.mlm_logits.shape[:2] == batch["masked_lm_positions"].shape
