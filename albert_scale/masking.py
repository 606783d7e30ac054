"""Dynamic ALBERT masking, vectorized over a batch: whole-word n-grams, keyed by example.

Usage:
    word_start = word_starts([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    batch = mask_batch(input_ids, seeds=example_seeds(seed, epoch, indices), word_start=word_start,
                       vocab_size=sp.get_piece_size(), max_predictions=77)

Semantics (create_pretraining_data's create_masked_lm_predictions with n-grams, minus its bugs):

- Candidates are the ids >= 5: [CLS], [SEP], pad, <unk> and [MASK] are never masked. A word is a start
  piece (``word_starts``) and the non-start pieces after it; a word never spans a special token, nor
  does an n-gram: its n words are contiguous, so none crosses [SEP].
- ``num_to_predict = min(max_predictions, max(1, round(real_tokens * masked_lm_prob)))``, where
  real_tokens counts the non-pad tokens, [CLS] and [SEP] included (0 when ``masked_lm_prob`` is 0).
- Spans are placed one after another. Span k draws n in 1..max_ngram with P(n) proportional to 1/n
  (0.545, 0.273, 0.182 for 3) and keeps it until the span is placed; its start is uniform among the
  n-grams whose words are all unmasked and whose t tokens fit the budget left, r. Starts that leave
  r - t = 0 or r - t >= max_ngram are preferred when there are any: a remainder of 1 or 2 can only be
  filled with short n-grams. n is shortened (n - 1, ..., 1, as the original tries shorter n-grams)
  only when no n-gram of n words fits anywhere. The spans never overlap.
- So the count is exactly num_to_predict, unless every unmasked word is longer than what is left
  (words are never split): then the row stops short.
- Each masked token becomes [MASK] with probability 0.8, a random id drawn uniformly from the regular
  ids [5, vocab_size) with 0.1, and stays unchanged with 0.1; its label is the original id.

Why these rules: measured on news text (vocab 30000), the realized n-gram frequencies are within 0.007
of 1/n at seq 128 and within 0.002 at seq 512. Drawing a fresh n for every candidate start, as the
original does, rejects long n-grams more often (they collide more) and gives 0.03 (seq 512) to 0.06
(seq 128) too many 1-grams; without the preferred remainders, the end of each budget adds 0.01-0.03.

Randomness is counter-based. An example's seed hashes (seed, epoch, dataset index) (``example_seeds``).
Output i of its stream s is splitmix64's ``mix64(key + (i + 1) * GAMMA)`` with ``key = mix64(seed ^ s *
STREAM)``, a pure function of (seed, stream, i) that numpy computes for a whole batch at once in uint64
arithmetic; a uniform is one 32-bit half of an output. The streams: the n of each span (i = span
number), the start draws of phase 1 and phase 2 (i = round or step number x draws + draw), exact
searches (i = step) and replacements (i = token position). Every row runs its own rounds and steps on
its own numbers, so an example gets the same mask in any batch, on any rank or worker: the mask depends
on (seed, epoch, index) only, and a new epoch gives a new mask.

Vectorization: no Python loop runs per token or per example. Two loops run over the batch:

1. Rounds, while a row has at least ``ROUND_MIN_BUDGET`` tokens left: each round proposes the row's
   next ``ROUND`` spans together. Each takes the first of its ``ROUND_TRIALS`` random starts whose words
   were unmasked at the start of the round; span q is kept if it fits the budget left after spans < q,
   overlaps none of them, and every span before it was kept. A kept span is thus exactly the first
   draw that is allowed in the state it is placed in: rejection sampling, uniform over the allowed
   starts. About 7 rounds place ~40 spans at seq 512.
2. Steps, for the last few tokens, where the preferred remainders matter: one span per row and step,
   with ``STEP_TRIALS`` starts drawn from the n-grams whose token counts the current rule allows (the
   starts of each row and n are sorted by token count once per batch, so those are one or two
   contiguous slices); a row whose draws fail ``FALLBACK_AFTER`` steps in a row gets an exact search
   of its words (about once per batch).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# The special ids (the same as data_pipeline/tokenizer.py; this module imports only numpy).
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
FIRST_REGULAR_ID = 5
IGNORE_INDEX = -100  # label of an unused prediction slot (torch's cross-entropy ignore_index)
SPACE_MARK = "\u2581"
# ALBERT's _is_start_piece list of lone pieces that start a word (ASCII, with some symbols).
_ALBERT_START_PIECES = frozenset('!"#$%&"()*+,-./:;?@[\\]^_`{|}~')

MASK_PROB, RANDOM_PROB = 0.8, 0.1  # and 0.1 unchanged
ROUND = 8  # spans proposed per row and round (phase 1)
ROUND_TRIALS = 4  # start draws per proposed span
ROUND_MIN_BUDGET = 6  # rounds run while at least this much budget is left
STEP_TRIALS = 8  # start draws per row and step (phase 2)
FALLBACK_AFTER = 2  # steps of failed draws before an exact search
_BLOCK = 8  # rounds or steps whose draws are generated at once

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment
_STREAM = 0xD1B54A32D192ED03  # odd multiplier that spreads the stream numbers
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = (np.uint64(s) for s in (30, 27, 31, 32))
_LOW32 = np.uint64(0xFFFFFFFF)
_NGRAM_STREAM, _ROUND_STREAM, _STEP_STREAM, _FALLBACK_STREAM, _REPLACE_STREAM = 1, 2, 3, 4, 5


@dataclass(frozen=True)
class MaskedBatch:
    """The masked batch. B rows, S positions, P = max_predictions prediction slots."""

    input_ids: np.ndarray
    """int32 [B, S]: the input with masked tokens replaced (80% [MASK], 10% random, 10% unchanged)."""
    masked_positions: np.ndarray
    """int32 [B, P]: positions of the predictions, ascending per row; 0 in unused slots."""
    masked_labels: np.ndarray
    """int32 [B, P]: the original ids at those positions; -100 in unused slots."""
    masked_span_ids: np.ndarray
    """int32 [B, P]: which whole-word n-gram of its row each prediction belongs to (0, 1, ... in order
    of position); -1 in unused slots. Adjacent n-grams are told apart only by this."""
    num_to_predict: np.ndarray
    """int32 [B]: the budget of each row, min(max_predictions, max(1, round(real_tokens * prob)))."""

    @property
    def masked_weights(self) -> np.ndarray:
        """float32 [B, P]: 1.0 where a slot holds a prediction, 0.0 where it is unused."""
        return (self.masked_labels != IGNORE_INDEX).astype(np.float32)

    @property
    def num_masked(self) -> np.ndarray:
        """int32 [B]: predictions per row (num_to_predict unless the whole-word rule stopped short)."""
        return (self.masked_labels != IGNORE_INDEX).sum(axis=1).astype(np.int32)


def is_start_piece(piece: str) -> bool:
    """Whether a SentencePiece piece starts a word: it begins with the space mark, or it is a lone
    punctuation character (Unicode category P*, or one of ALBERT's ASCII start pieces such as ``$``)."""
    if piece.startswith(SPACE_MARK):
        return True
    return len(piece) == 1 and (piece in _ALBERT_START_PIECES or unicodedata.category(piece).startswith("P"))


def word_starts(pieces: Sequence[str]) -> np.ndarray:
    """bool [V]: whether piece i starts a word (``is_start_piece``); False for the special ids 0..4."""
    starts = np.fromiter((is_start_piece(p) for p in pieces), dtype=bool, count=len(pieces))
    starts[:FIRST_REGULAR_ID] = False
    return starts


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (a bijection of uint64), elementwise; wraps modulo 2**64."""
    z = z ^ (z >> _S30)
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31
    return z


def _as_uint64(value: int) -> np.ndarray:
    return np.array([value % (1 << 64)], dtype=np.uint64)


def example_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """uint64 per example: a hash of (seed, epoch, dataset index), the key of all its random numbers."""
    indices = np.asarray(indices)
    if indices.dtype.kind not in "iu":
        raise ValueError(f"indices: integer dataset indices expected, got dtype {indices.dtype}")
    base = mix64(mix64(_as_uint64(seed)) + _as_uint64(epoch))
    return mix64(mix64(base + indices.astype(np.uint64)))


def _stream_keys(seeds: np.ndarray, stream: int) -> np.ndarray:
    return mix64(seeds ^ np.uint64(stream * _STREAM % (1 << 64)))


def _outputs(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """uint64 outputs number ``counters`` (broadcast against ``keys``) of splitmix64 streams."""
    return mix64(keys + (counters.astype(np.uint64) + np.uint64(1)) * _GAMMA)


def _uniforms(keys: np.ndarray, first: int, count: int) -> np.ndarray:
    """float64 [B, count] in [0, 1): uniforms ``first .. first + count - 1`` of each row's stream.
    Uniform k is the high (k even) or low (k odd) 32 bits of output k // 2, over 2**32."""
    assert first % 2 == 0 and count % 2 == 0
    z = _outputs(keys[:, None], np.arange(first // 2, (first + count) // 2, dtype=np.uint64))
    out = np.empty((len(keys), count // 2, 2), dtype=np.float64)
    out[..., 0] = z >> _S32
    out[..., 1] = z & _LOW32
    out *= 1.0 / (1 << 32)
    return out.reshape(len(keys), count)


def ngram_probabilities(max_ngram: int) -> np.ndarray:
    """P(n) for n = 1..max_ngram, proportional to 1/n."""
    p = 1.0 / np.arange(1, max_ngram + 1)
    return p / p.sum()


def num_to_predict(input_ids: np.ndarray, *, masked_lm_prob: float, max_predictions: int) -> np.ndarray:
    """int32 [B]: min(max_predictions, max(1, round(real_tokens * masked_lm_prob))) per row (Python's
    round, half to even, as the original), 0 when masked_lm_prob is 0."""
    if masked_lm_prob == 0:
        return np.zeros(len(input_ids), dtype=np.int32)
    real = np.count_nonzero(input_ids != PAD_ID, axis=1)
    return np.minimum(max_predictions, np.maximum(1, np.rint(real * masked_lm_prob))).astype(np.int32)


class _Words:
    """The words of a batch on a grid of B rows of Wp cells: word w of row b is cell b * Wp + G + w,
    with G = max_ngram empty cells on both sides of a row (cell 0 serves as scratch)."""

    def __init__(self, x: np.ndarray, word_start: np.ndarray, max_ngram: int):
        G = max_ngram
        B, S = x.shape
        cand = x >= FIRST_REGULAR_ID
        start = word_start.take(x)
        start &= cand
        start[:, 0] = cand[:, 0]
        start[:, 1:] |= cand[:, 1:] > cand[:, :-1]  # a word also starts after a special token
        last = cand  # the last piece of a word: the next token starts a word or is special
        last[:, :-1] &= start[:, 1:] | ~cand[:, 1:]
        first = np.flatnonzero(start)
        rows = first // S
        row_start = rows * S
        first -= row_start
        end = np.flatnonzero(last) - row_start + 1  # the same words in the same order; one past the last
        count = np.bincount(rows, minlength=B)  # words per row
        Wp = int(count.max(initial=0)) + 2 * G
        cell = np.arange(len(rows)) + (rows * Wp + G - (np.cumsum(count) - count)[rows])
        pos_type = np.int16 if S < 2**15 - 1 else np.int32
        # Token span [begin, end) of each word's cell, as positions in its row; empty cells get
        # begin -1 and end -2 so that they never look contiguous with anything.
        self.begin = np.full(B * Wp, -1, dtype=pos_type)
        self.end = np.full(B * Wp, -2, dtype=pos_type)
        self.begin[cell] = first
        self.end[cell] = end
        # run[c] = contiguous words from cell c on (no special token between), capped at G.
        touch = self.end[:-1] == self.begin[1:]
        reach = self.begin >= 0
        run = reach.astype(np.int8)
        for i in range(1, G):
            reach[:-i] &= touch[i - 1 :]
            reach[-i:] = False
            run += reach
        self.G, self.B, self.S, self.Wp = G, B, S, Wp
        self.run = run

    def ngram_tokens(self, cell: np.ndarray, j: np.ndarray | int) -> np.ndarray:
        """Tokens of the j-gram starting at ``cell`` (meaningful where ``run[cell] >= j``)."""
        return self.end[cell + (j - 1)].astype(np.intp) - self.begin[cell]


class _StartIndex:
    """For each (row, n): the starts of all n-grams sorted by token length, in buckets (each length
    below ``cap``, one bucket for >= cap, a last one for "no n-gram here"), so that the starts whose
    length lies in a range of buckets are one contiguous slice of ``keys``. A key's low ``shift`` bits
    are the start's column in its row (``cell``)."""

    def __init__(self, words: _Words):
        G, B, Wp = words.G, words.B, words.Wp
        self.cap = cap = 3 * G
        nb = cap + 2
        self.stride = nb + 1
        self.shift = shift = (Wp - 1).bit_length()
        self.mask = (1 << shift) - 1
        key_type = np.int32 if (B * G * nb) << shift < 2**31 else np.int64
        # One scratch entry at the end (key 0: column 0, an empty cell) keeps reads of empty slices in
        # bounds.
        flat = np.zeros(B * G * Wp + 1, dtype=key_type)
        keys = flat[:-1].reshape(B, G, Wp)
        row_key = (np.arange(B * G, dtype=key_type).reshape(B, G, 1) * nb << shift) + np.arange(
            Wp, dtype=key_type
        )
        begin = words.begin.reshape(B, Wp)
        end = words.end.reshape(B, Wp)
        run = words.run.reshape(B, Wp)
        for j in range(1, G + 1):
            width = Wp - j + 1
            bucket = np.subtract(end[:, j - 1 :], begin[:, :width], dtype=key_type)
            np.minimum(bucket, cap, out=bucket)
            bucket[run[:, :width] < j] = nb - 1
            np.left_shift(bucket, shift, out=bucket)
            np.add(bucket, row_key[:, j - 1, :width], out=keys[:, j - 1, :width])
            keys[:, j - 1, width:] = row_key[:, j - 1, width:] + ((nb - 1) << shift)
        keys.reshape(B * G, Wp).sort(axis=-1)  # the keys are distinct, so the fast unstable sort is exact
        self.keys = flat
        queries = (
            np.arange(B * G, dtype=key_type)[:, None] * nb + np.arange(nb + 1, dtype=key_type)
        ) << shift
        # bounds[(b*G + j-1) * stride + v]: index of the first sorted start of bucket >= v
        self.bounds = np.searchsorted(flat[:-1], queries).ravel()

    def cells(self, slot: np.ndarray, row_cell: np.ndarray) -> np.ndarray:
        """The cells of sorted starts ``slot`` (rows' first cells ``row_cell`` broadcast against it)."""
        return (self.keys[slot] & self.mask) + row_cell


def _any_last(a: np.ndarray) -> np.ndarray:
    """``a.any(axis=-1)`` for a bool array; a last axis of 2, 4 or 8 is read as one integer per row
    (numpy's reductions over a short last axis are an order of magnitude slower)."""
    width = a.shape[-1]
    if width in (2, 4, 8) and a.flags.c_contiguous:
        return a.view(np.dtype(f"u{width}"))[..., 0] != 0
    return a.any(axis=-1)


def _place(nfree: np.ndarray, cell: np.ndarray, n: np.ndarray, placed: np.ndarray, G: int) -> None:
    """Marks the spans ``cell .. cell + n - 1`` where ``placed`` as masked in ``nfree`` (free
    contiguous words from each cell, capped at G), and ends each free run that reached into one before
    it. Spans of one call never overlap; writes meant for nothing go to scratch cell 0."""
    for back in range(G - 1, 0, -1):  # nearest last: where two spans shorten one run, the nearer wins
        before = np.where(placed, cell - back, 0)
        nfree[before] = np.minimum(nfree[before], back)
    for i in range(G):
        nfree[np.where(placed & (n > i), cell + i, 0)] = 0


def _sample_spans(words: _Words, budget: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Places the whole-word n-gram spans of every row (rounds, then steps: see the module
    docstring). Returns their first tokens as flat indices into a [B, S + 1] grid, and their token
    counts (0 for unused entries)."""
    G, B, S, Wp = words.G, words.B, words.S, words.Wp
    index = _StartIndex(words)
    cap, stride, bounds = index.cap, index.stride, index.bounds
    begin, end = words.begin, words.end
    nfree = words.run.copy()  # free contiguous words from each cell, capped at G
    ar = np.arange(B)
    row_cell = ar * Wp
    grid_row = ar * (S + 1)
    starts_out: list[np.ndarray] = []
    lengths_out: list[np.ndarray] = []

    # n of each span, drawn per span (not per attempt, which would favour short n-grams).
    K = max(int(budget.max(initial=0)), 1)
    u = _uniforms(_stream_keys(seeds, _NGRAM_STREAM), 0, K + K % 2)[:, :K]
    span_n = np.ones(B * K, dtype=np.intp)
    for threshold in np.cumsum(ngram_probabilities(G))[:-1]:
        span_n += u.ravel() >= threshold
    span_n_row = ar * K
    r = budget.astype(np.intp)  # budget left
    span = np.zeros(B, dtype=np.intp)  # spans placed

    # Phase 1: rounds of ROUND spans per row.
    keys = _stream_keys(seeds, _ROUND_STREAM)
    q_ar = np.arange(ROUND)
    earlier = q_ar[:, None] > q_ar  # [q, q']: q' comes before q
    first_of = np.arange(B * ROUND).reshape(B, ROUND) * ROUND_TRIALS
    live = r >= ROUND_MIN_BUDGET
    round_no = 0
    while live.any():
        n = span_n[span_n_row[:, None] + np.minimum(span[:, None] + q_ar, K - 1)]  # [B, Q]
        # Draws from all n-grams that fit the whole budget left: a superset of every allowed set.
        table = (ar[:, None] * G + n - 1) * stride
        lo = bounds[table + n]
        size = np.maximum(bounds[table + np.minimum(r, cap)[:, None] + 1] - lo, 0)
        if round_no % _BLOCK == 0:
            per_round = ROUND * ROUND_TRIALS
            draws = _uniforms(keys, round_no * per_round, _BLOCK * per_round).reshape(
                B, _BLOCK, ROUND, ROUND_TRIALS
            )
        u = draws[:, round_no % _BLOCK]
        cell = index.cells(lo[..., None] + (u * size[..., None]).astype(np.intp), row_cell[:, None, None])
        free = nfree[cell] >= n[..., None]
        found = _any_last(free) & (size > 0)
        cell = cell.ravel()[first_of + free.argmax(axis=-1)]
        t = end[cell + (n - 1)] - begin[cell].astype(np.intp)
        left = r[:, None] - (np.cumsum(t, axis=1) - t)  # budget before span q if all before it are kept
        ok = found & ((t <= left - G) | (t == left))
        stop = cell + n
        ok &= ~_any_last(
            (cell[:, :, None] < stop[:, None, :]) & (cell[:, None, :] < stop[:, :, None]) & earlier
        )
        kept = np.logical_and.accumulate(ok, axis=1) & live[:, None]
        _place(nfree, cell, n, kept, G)
        t *= kept
        starts_out.append((grid_row[:, None] + begin[cell]).ravel())
        lengths_out.append(t.ravel())
        r -= t.sum(axis=1)
        span += kept.sum(axis=1)
        live &= kept[:, 0] & (r >= ROUND_MIN_BUDGET)
        round_no += 1

    if (r > 0).any():
        _steps(words, index, nfree, r, span, span_n, K, seeds, starts_out, lengths_out)
    if not starts_out:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.intp)
    return np.concatenate(starts_out), np.concatenate(lengths_out)


def _steps(
    words: _Words,
    index: _StartIndex,
    nfree: np.ndarray,
    r: np.ndarray,
    span: np.ndarray,
    span_n: np.ndarray,
    K: int,
    seeds: np.ndarray,
    starts_out: list[np.ndarray],
    lengths_out: list[np.ndarray],
) -> None:
    """Phase 2 of ``_sample_spans``: one span per row and step. Updates ``nfree``, ``r`` and ``span``
    in place and appends the spans to the lists.

    Stage e = 2 * (G - j) + tier: j words; tier 0 takes the preferred remainders (0 or >= G), tier 1
    anything that fits. A span of n starts at stage 2 * (G - n) and moves on only when its stage has no
    allowed start (n-grams of n words that fit nowhere: try n - 1, as the original does)."""
    G, B, S, Wp = words.G, words.B, words.S, words.Wp
    cap, stride, bounds = index.cap, index.stride, index.bounds
    begin, end = words.begin, words.end
    E = 2 * G
    # From cap + G on, the slices no longer depend on the budget left: the tables stop there.
    R = min(int(r.max()), cap + G) + 1
    # Per (row, stage, budget left): slice a = lengths [j, min(r - reserve, cap)], and for tier 0 slice
    # b = the bucket of exactly r when that lies above slice a.
    e_ar = np.arange(E)
    j_of = G - e_ar // 2
    reserve_of = np.where(e_ar % 2 == 0, G, 0)
    rr = np.arange(R)
    limit = rr - reserve_of[:, None]  # [E, R]
    table = ((np.arange(B)[:, None] * G + j_of - 1) * stride)[:, :, None]  # [B, E, 1]
    lo_a = bounds[table + j_of[:, None]]
    len_a = bounds[table + np.minimum(np.maximum(limit, j_of[:, None] - 1), cap) + 1] - lo_a
    b_v = np.minimum(rr, cap)
    lo_b = bounds[table + b_v]
    len_b = (bounds[table + b_v + 1] - lo_b) * (limit < b_v)
    total = len_a + len_b
    # One lookup per step: the first stage >= e with a non-empty slice, and that stage's slices.
    # Columns: stage, lo_a, len_a, jump (from slice a's end to slice b), total, j, reserve.
    columns = np.zeros((B, E + 1, R, 7), dtype=np.intp)
    columns[:, :E, :, 0] = e_ar[:, None]
    columns[:, :E, :, 1] = lo_a
    columns[:, :E, :, 2] = len_a
    columns[:, :E, :, 3] = lo_b - lo_a - len_a
    columns[:, :E, :, 4] = total
    columns[:, :E, :, 5] = j_of[:, None]
    columns[:, :E, :, 6] = reserve_of[:, None]
    columns[:, E, :, 0] = E  # no stage left: reads the scratch start, one word
    columns[:, E, :, 1] = len(index.keys) - 1
    columns[:, E, :, 5] = 1
    next_stage = np.full((B, E + 1, R), E, dtype=np.intp)
    for e in range(E - 1, -1, -1):
        next_stage[:, e] = np.where(total[:, e] > 0, e, next_stage[:, e + 1])
    resolved = (np.arange(B)[:, None, None] * (E + 1) + next_stage) * R + np.arange(R)
    tab = columns.reshape(-1, 7)[resolved.ravel()]
    keys = _stream_keys(seeds, _STEP_STREAM)
    fallback_keys = _stream_keys(seeds, _FALLBACK_STREAM)
    ar = np.arange(B)
    tab_row = ar * (E + 1) * R
    row_cell = ar * Wp
    grid_row = ar * (S + 1)
    first_of = ar * STEP_TRIALS
    span_n_row = ar * K
    stage = 2 * (G - span_n[span_n_row + np.minimum(span, K - 1)])
    fails = np.zeros(B, dtype=np.intp)
    active = r > 0
    step = 0
    while active.any():
        if step % _BLOCK == 0:
            draws = _uniforms(keys, step * STEP_TRIALS, _BLOCK * STEP_TRIALS).reshape(B, _BLOCK, STEP_TRIALS)
        row = tab[tab_row + stage * R + np.minimum(r, R - 1)]
        stage = row[:, 0]
        active &= stage < E
        j = row[:, 5]
        pick = (draws[:, step % _BLOCK] * row[:, 4:5]).astype(np.intp)
        cell = index.cells(row[:, 1:2] + pick + (pick >= row[:, 2:3]) * row[:, 3:4], row_cell[:, None])
        t = end[cell + (j - 1)[:, None]] - begin[cell].astype(np.intp)
        ok = (nfree[cell] >= j[:, None]) & ((t <= (r - row[:, 6])[:, None]) | (t == r[:, None]))
        got = _any_last(ok) & active
        first = first_of + ok.argmax(axis=1)
        cell, t = cell.ravel()[first], t.ravel()[first]
        fails = np.where(got, 0, fails + 1)
        stuck = np.flatnonzero(active & (fails >= FALLBACK_AFTER))
        if len(stuck):
            u_stuck = (_outputs(fallback_keys[stuck], np.full(len(stuck), step)) >> _S32) * (1.0 / (1 << 32))
            for b, u_b in zip(stuck.tolist(), u_stuck.tolist(), strict=True):
                found = _exact_search(words, nfree, b, int(stage[b]), int(r[b]), u_b)
                if found is None:
                    active[b] = False
                else:
                    stage[b], cell[b], t[b] = found
                    j[b] = G - stage[b] // 2
                    got[b] = True
        _place(nfree, cell, j, got, G)
        t *= got
        starts_out.append(grid_row + begin[cell])
        lengths_out.append(t)
        r -= t
        span += got
        stage = np.where(got, 2 * (G - span_n[span_n_row + np.minimum(span, K - 1)]), stage)
        fails *= ~got
        active &= r > 0
        step += 1


def _exact_search(
    words: _Words, nfree: np.ndarray, row: int, stage: int, r: int, u: float
) -> tuple[int, int, int] | None:
    """The allowed starts of one row computed exactly, from ``stage`` on: (stage, cell, tokens) of a
    uniform choice in the first stage that has any, or None when no n-gram fits at all."""
    G, Wp = words.G, words.Wp
    cells = np.arange(row * Wp, (row + 1) * Wp - G)
    for e in range(stage, 2 * G):
        j = G - e // 2
        t = words.ngram_tokens(cells, j)
        limit = r - G if e % 2 == 0 else r
        allowed = np.flatnonzero((nfree[cells] >= j) & ((t <= limit) | (t == r)))
        if len(allowed):
            w = int(allowed[min(int(u * len(allowed)), len(allowed) - 1)])
            return e, int(cells[w]), int(t[w])
    return None


def mask_batch(
    input_ids: np.ndarray,
    *,
    seeds: np.ndarray,
    word_start: np.ndarray,
    vocab_size: int,
    masked_lm_prob: float = 0.15,
    max_predictions: int,
    max_ngram: int = 3,
) -> MaskedBatch:
    """Masks a padded batch (int [B, S], pad = 0) the ALBERT way; ``seeds`` (uint64 [B], from
    ``example_seeds``) key each row's random numbers. See the module docstring for the semantics."""
    x = np.asarray(input_ids)
    if x.ndim != 2 or x.dtype.kind not in "iu":
        raise ValueError(f"input_ids: an integer array [batch, seq] expected, got {x.dtype} {x.shape}")
    x = x.astype(np.int32, copy=False)
    B, S = x.shape
    seeds = np.asarray(seeds)
    if seeds.shape != (B,) or seeds.dtype != np.uint64:
        raise ValueError(f"seeds: uint64 [{B}] expected (example_seeds), got {seeds.dtype} {seeds.shape}")
    word_start = np.asarray(word_start, dtype=bool)
    if vocab_size <= FIRST_REGULAR_ID:
        raise ValueError(f"vocab_size={vocab_size}: must exceed the {FIRST_REGULAR_ID} special ids")
    if word_start.ndim != 1 or len(word_start) < vocab_size:
        raise ValueError(f"word_start: bool [{vocab_size}] expected (word_starts), got {word_start.shape}")
    if x.size and (x.min() < 0 or x.max() >= vocab_size):
        raise ValueError(
            f"input_ids: ids must lie in [0, vocab_size={vocab_size}), found [{x.min()}, {x.max()}]"
        )
    if not 0.0 <= masked_lm_prob <= 1.0:
        raise ValueError(f"masked_lm_prob={masked_lm_prob}: must lie in [0, 1]")
    if max_predictions < 1:
        raise ValueError(f"max_predictions={max_predictions}: must be at least 1")
    if max_ngram < 1:
        raise ValueError(f"max_ngram={max_ngram}: must be at least 1")

    budget = num_to_predict(x, masked_lm_prob=masked_lm_prob, max_predictions=max_predictions)
    if x.size:
        span_starts, span_lengths = _sample_spans(_Words(x, word_start, max_ngram), budget, seeds)
    else:
        span_starts = span_lengths = np.empty(0, dtype=np.intp)

    # Masked tokens from the spans, in row-major order: each span's tokens are consecutive.
    used = span_lengths > 0
    span_starts, span_lengths = span_starts[used], span_lengths[used]
    order = np.argsort(span_starts)
    span_starts, span_lengths = span_starts[order], span_lengths[order]
    span_rows = span_starts // (S + 1)
    spans_per_row = np.bincount(span_rows, minlength=B)
    span_ordinal = np.arange(len(span_rows)) - (np.cumsum(spans_per_row) - spans_per_row)[span_rows]
    offsets = np.cumsum(span_lengths) - span_lengths
    grid = np.repeat(span_starts - offsets, span_lengths) + np.arange(int(span_lengths.sum()))
    rows = np.repeat(span_rows, span_lengths)
    cols = grid - rows * (S + 1)
    per_row = np.bincount(rows, minlength=B)
    slots = np.arange(len(rows)) - (np.cumsum(per_row) - per_row)[rows]
    flat = rows * S + cols
    labels = x.ravel()[flat]

    # 80% [MASK], 10% a random regular id, 10% unchanged; one 64-bit number per token position.
    z = _outputs(_stream_keys(seeds, _REPLACE_STREAM)[rows], cols)
    choice = z >> _S32
    random_ids = FIRST_REGULAR_ID + (((z & _LOW32) * np.uint64(vocab_size - FIRST_REGULAR_ID)) >> _S32)
    replaced = np.where(
        choice < np.uint64(int(MASK_PROB * 2**32)),
        MASK_ID,
        np.where(
            choice < np.uint64(int((MASK_PROB + RANDOM_PROB) * 2**32)), random_ids.astype(np.int64), labels
        ),
    )
    out = x.copy()
    out.ravel()[flat] = replaced
    at = rows * max_predictions + slots
    positions = np.zeros((B, max_predictions), dtype=np.int32)
    positions.ravel()[at] = cols
    target = np.full((B, max_predictions), IGNORE_INDEX, dtype=np.int32)
    target.ravel()[at] = labels
    span_ids = np.full((B, max_predictions), -1, dtype=np.int32)
    span_ids.ravel()[at] = np.repeat(span_ordinal, span_lengths)
    return MaskedBatch(
        input_ids=out,
        masked_positions=positions,
        masked_labels=target,
        masked_span_ids=span_ids,
        num_to_predict=budget,
    )
