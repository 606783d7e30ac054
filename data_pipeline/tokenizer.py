"""SentencePiece with ALBERT's settings: training, loading with checks, and the special ids.

ALBERT's vocabulary: a unigram model, <pad>=0, <unk>=1, and the control symbols [CLS]=2, [SEP]=3,
[MASK]=4. Text is lowercased and stripped of accents before SentencePiece (``data_pipeline.text``).
"""

from __future__ import annotations

import io
from pathlib import Path

import sentencepiece as spm

from albert_scale.fileio import atomic_write_bytes

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", CLS_ID: "[CLS]", SEP_ID: "[SEP]", MASK_ID: "[MASK]"}
CHARACTER_COVERAGE = 0.99995
MODEL_FILENAME = "spiece.model"


def train(
    sentences: Path,
    output: Path,
    *,
    vocab_size: int,
    seed: int,
    character_coverage: float = CHARACTER_COVERAGE,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 1,
) -> Path:
    """Trains a unigram model on ``sentences`` (one normalized sentence per line) and writes it to
    ``output`` atomically. Raises ValueError when the sample cannot support ``vocab_size``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    # Sentences come from an iterator and the model goes to memory: with file names, SentencePiece would
    # record the temporary paths in the model, and its bytes would differ from run to run.
    model = io.BytesIO()
    with sentences.open(encoding="utf-8") as lines:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=lines,
                model_writer=model,
                model_type="unigram",
                vocab_size=vocab_size,
                character_coverage=character_coverage,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=-1,
                eos_id=-1,
                pad_piece=SPECIAL_PIECES[PAD_ID],
                unk_piece=SPECIAL_PIECES[UNK_ID],
                control_symbols=[SPECIAL_PIECES[i] for i in (CLS_ID, SEP_ID, MASK_ID)],
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as err:
            message = " ".join(str(err).split())
            if "Vocabulary size too high" in message or "vocab_size" in message:
                raise ValueError(
                    f"model.vocab_size={vocab_size}: the tokenizer sample is too small for this vocabulary "
                    f"({message}); lower model.vocab_size or give more text"
                ) from None
            raise ValueError(f"SentencePiece training failed: {message}") from None
    atomic_write_bytes(output, model.getvalue())
    return output


def load(path: Path, *, vocab_size: int | None = None) -> spm.SentencePieceProcessor:
    """Loads a SentencePiece model and checks ALBERT's special ids (and the vocabulary size, if given)."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r}: no such file")
    processor = spm.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError):
        raise ValueError(f"tokenizer {str(path)!r}: not a SentencePiece model") from None
    check_special_ids(processor, str(path))
    if vocab_size is not None and processor.get_piece_size() != vocab_size:
        raise ValueError(
            f"tokenizer {str(path)!r} has {processor.get_piece_size()} pieces but model.vocab_size={vocab_size}; "
            f"set model.vocab_size={processor.get_piece_size()}"
        )
    return processor


def from_proto(model_proto: bytes) -> spm.SentencePieceProcessor:
    """A processor from a serialized model (as read from a checked ``spiece.model``)."""
    return spm.SentencePieceProcessor(model_proto=model_proto)


def check_special_ids(processor: spm.SentencePieceProcessor, name: str) -> None:
    for expected_id, piece in SPECIAL_PIECES.items():
        found = processor.piece_to_id(piece)
        if piece in ("[CLS]", "[SEP]", "[MASK]") and not processor.is_control(found):
            found = -1
        if found != expected_id:
            raise ValueError(
                f"tokenizer {name!r}: {piece} has id {found}, ALBERT needs {expected_id} "
                "(pad=0, unk=1, [CLS]=2, [SEP]=3, [MASK]=4)"
            )


def user_defined_pieces(model_proto: bytes) -> list[str]:
    """The user-defined symbols of a SentencePiece model (pieces always kept whole, e.g. Google's
    ALBERT model's punctuation)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    user = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return [piece.piece for piece in proto.pieces if piece.type == user]
