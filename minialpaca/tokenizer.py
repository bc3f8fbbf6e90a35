"""SentencePiece tokenizer: the LLaMA one, or a small one trained here for the demo."""
import io
import os
from pathlib import Path
from typing import Iterable, List

import sentencepiece as spm


class Tokenizer:
    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path}: no such file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except Exception as e:  # sentencepiece raises a bare OSError/RuntimeError with a C++ message
            raise ValueError(f"tokenizer {self.path}: not a SentencePiece model ({e})") from None
        self.vocab_size: int = self.sp.GetPieceSize()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for LLaMA's tokenizer: it has no pad piece

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @staticmethod
    def train(texts: Iterable[str], out_path, vocab_size: int, model_type: str = "bpe",
              split_by_whitespace: bool = True) -> "Tokenizer":
        """Train a SentencePiece model on `texts` and write it atomically to `out_path`.

        Ids follow LLaMA's convention (unk 0, bos 1, eos 2, no pad). Digits are split into single
        pieces so arithmetic tasks see every digit, and unknown bytes fall back to byte pieces (so any
        text round-trips; the 256 byte pieces count toward vocab_size). split_by_whitespace=False lets
        pieces span words: text that repeats verbatim, like a prompt template, becomes a few pieces.
        """
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        model = io.BytesIO()
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True, byte_fallback=True,
            character_coverage=1.0, num_threads=1, minloglevel=2, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_by_whitespace=split_by_whitespace, max_sentencepiece_length=16 if split_by_whitespace else 64,
        )
        tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(model.getvalue())
        os.replace(tmp, out_path)
        return Tokenizer(out_path)
