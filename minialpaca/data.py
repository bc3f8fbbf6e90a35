"""Instruction data: Alpaca records, the prompt template, encoding with loss masks, batching and packing.

`python -m minialpaca.data check FILE --tokenizer PATH` validates a data file and reports its token lengths
and the padding efficiency of each batching strategy.
"""
import argparse
import bisect
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# Stanford Alpaca's two prompt templates, exactly. The response follows "### Response:" directly.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record; an empty input uses the template without an input section."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


IGNORE_INDEX = -100  # label of a position the loss skips (PyTorch cross_entropy's default ignore_index)
REQUIRED_FIELDS = ("instruction", "output")


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, the record and the problem."""


# ---------------------------------------------------------------------------------------------------- records
def validate_record(record, index: int, path) -> dict:
    """Check one Alpaca record and return it normalized: instruction, input ("" when absent), output, plus
    any extra keys (e.g. a task name) unchanged. Raises DataError naming `path` and `index`."""
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with instruction/input/output, found {_json_type(record)}")
    for key in REQUIRED_FIELDS:
        if key not in record:
            raise DataError(f"{where}: missing required field {key!r}")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, found {_json_type(record[key])}")
    if not record["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    return {**record, "input": record.get("input", "")}


def load_records(path) -> list:
    """Read Alpaca records from a JSON file holding a list, or from JSON Lines: one object per line, chosen by
    the .jsonl suffix (unless the file opens with "[") or sniffed when the file is not a single JSON value.
    Every record is validated before anything else happens; the first problem raises DataError with the file,
    the record index and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".jsonl" and not text.lstrip().startswith("["):
        records = _parse_jsonl(text, path)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            # Several objects one per line are not one JSON value, but they are JSON Lines.
            if text.lstrip().startswith("{") and _first_line_is_object(text):
                records = _parse_jsonl(text, path)
            else:
                raise DataError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        else:
            if not isinstance(records, list):
                raise DataError(f"{path}: expected a JSON list of records (or JSON Lines), found {_json_type(records)}")
    if not records:
        raise DataError(f"{path}: contains no records")
    return [validate_record(r, i, path) for i, r in enumerate(records)]


def save_records(path, records):
    """Write records as an Alpaca JSON list, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(list(records), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _parse_jsonl(text: str, path) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are not records
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: record {len(records)} (line {lineno}): not valid JSON: {e.msg} at column {e.colno}") from None
    return records


def _first_line_is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.lstrip().splitlines()[0]), dict)
    except json.JSONDecodeError:
        return False


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------------------------- encoding
def encode_example(tokenizer, record: dict, max_seq_len: int, train_on_inputs: bool = False) -> Optional[dict]:
    """One record -> {"input_ids", "labels"}: BOS + prompt + response + EOS, labels IGNORE_INDEX over BOS and
    the prompt (kept over the prompt, never BOS, when train_on_inputs). Labels are aligned with input_ids; the
    loss shifts them (logits at t predict labels at t+1). Returns None when BOS + prompt leave no room for a
    single response token (the caller counts the drop).

    The prompt and the response are tokenized separately, so the mask boundary is exact: no SentencePiece
    piece can straddle it. The response is encoded as a sentence of its own, so its first piece carries
    SentencePiece's dummy-prefix space ("▁The"); decoding the response ids on their own drops it again, which
    makes the unmasked labels decode to exactly the output. Generation must likewise decode the generated ids
    on their own, not cut a decoded prompt+answer string. (Stanford tokenizes prompt and prompt+response and
    takes the suffix; the two agree except for that first piece.)

    Truncation cuts the response from the end, and the EOS goes with it: a truncated example teaches the
    model to keep talking, never to stop early."""
    prompt = tokenizer.encode(format_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False)
    if len(prompt) >= max_seq_len:
        return None
    response = tokenizer.encode(record["output"], bos=False, eos=False) + [tokenizer.eos_id]
    input_ids = (prompt + response)[:max_seq_len]
    labels = [IGNORE_INDEX] + (prompt[1:] if train_on_inputs else [IGNORE_INDEX] * (len(prompt) - 1)) + response
    return {"input_ids": input_ids, "labels": labels[:max_seq_len]}


@dataclass
class EncodeStats:
    n_records: int = 0
    n_kept: int = 0
    n_dropped: int = 0  # the prompt alone filled max_seq_len
    n_truncated: int = 0  # kept, but the response (and its EOS) was cut
    n_tokens: int = 0  # input tokens of the kept examples
    n_target_tokens: int = 0  # labels the loss sees

    def summary(self) -> str:
        return (f"kept {self.n_kept}/{self.n_records} records ({self.n_dropped} dropped: prompt too long; "
                f"{self.n_truncated} truncated), {self.n_tokens} tokens, {self.n_target_tokens} trained on")


def encode_records(tokenizer, records, max_seq_len: int, train_on_inputs: bool = False):
    """Encode every record; returns (examples, EncodeStats). Dropped records are counted, never silently lost."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (BOS and one token), got {max_seq_len}")
    examples, stats = [], EncodeStats()
    for record in records:
        stats.n_records += 1
        ex = encode_example(tokenizer, record, max_seq_len, train_on_inputs)
        if ex is None:
            stats.n_dropped += 1
            continue
        stats.n_kept += 1
        stats.n_truncated += ex["input_ids"][-1] != tokenizer.eos_id
        stats.n_tokens += len(ex["input_ids"])
        stats.n_target_tokens += sum(label != IGNORE_INDEX for label in ex["labels"])
        examples.append(ex)
    return examples, stats


# ---------------------------------------------------------------------------------------------------- batching
def pad_id_for(tokenizer) -> int:
    """An id to pad with. LLaMA's tokenizer has no pad piece (pad_id -1); any real id serves, since padded
    positions are masked out of the loss and, coming after the text, are never attended to by it."""
    return tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id


def pack_examples(examples, max_seq_len: int, pad_id: int) -> list:
    """Concatenate examples into rows of exactly max_seq_len tokens.

    Best-fit decreasing: longest examples first, each into the fullest row that still has room for it (a new
    row when none has). It fills rows tighter than keeping the data order, and the order is restored anyway by
    the sampler's shuffle of the rows. An example never straddles two rows. Each row carries `positions`
    restarting at 0 for every example (so each sees the rotary positions it would see alone) and `segment_ids`
    1, 2, 3, ... per example with 0 for the trailing padding, which the model turns into a block-diagonal
    causal mask: attention never crosses an example boundary. Labels start every example with IGNORE_INDEX
    (its BOS), so the loss never asks one example to predict the next."""
    _check_pad_id(pad_id)
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows = []  # lists of example indices
    free = []  # sorted (room left, row index): bisect finds the fullest row with room
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_seq_len {max_seq_len}; encode with the same max_seq_len")
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            rows.append([i])
            room, r = max_seq_len - n, len(rows) - 1
        else:
            room, r = free.pop(slot)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "positions": [], "segment_ids": []}
        for segment, i in enumerate(members, 1):
            n = len(examples[i]["input_ids"])
            row["input_ids"] += examples[i]["input_ids"]
            row["labels"] += examples[i]["labels"]
            row["positions"] += range(n)
            row["segment_ids"] += [segment] * n
        pad = max_seq_len - len(row["input_ids"])
        row["input_ids"] += [pad_id] * pad
        row["labels"] += [IGNORE_INDEX] * pad
        row["positions"] += range(pad)
        row["segment_ids"] += [0] * pad
        packed.append(row)
    return packed


def collate(examples, pad_id: int) -> dict:
    """Stack examples into (B, T) LongTensors, T the longest example, padding on the right: input_ids with
    pad_id, labels with IGNORE_INDEX. Right padding needs no attention mask: under the causal mask a real token
    only sees earlier positions, and the pads all come later. Packed rows also bring positions and segment_ids,
    which are stacked too (padded with 0: a segment of their own)."""
    _check_pad_id(pad_id)
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(ex["input_ids"]) for ex in examples)
    keys = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    if "segment_ids" in examples[0]:
        keys.update(positions=0, segment_ids=0)
    return {key: torch.tensor([ex[key] + [fill] * (T - len(ex[key])) for ex in examples], dtype=torch.long)
            for key, fill in keys.items()}


def _check_pad_id(pad_id: int):
    if pad_id < 0:
        raise ValueError(f"pad_id must be a token id >= 0, got {pad_id}; use pad_id_for(tokenizer) for a tokenizer without a pad piece")


def example_length(example: dict) -> int:
    """Real (non-pad) tokens of an example or packed row."""
    if "segment_ids" in example:
        return sum(s != 0 for s in example["segment_ids"])
    return len(example["input_ids"])


def padding_efficiency(batches, row_len: Optional[int] = None) -> float:
    """Share of real tokens among all the tokens computed on. `batches`: for each batch, the real-token lengths
    of its rows. A batch costs len(batch) * row_len tokens: the longest row of the batch when row_len is None
    (pad to longest), else the fixed row length (packed rows)."""
    real = computed = 0
    for lengths in batches:
        if not len(lengths):
            continue
        real += sum(lengths)
        computed += len(lengths) * (row_len if row_len is not None else max(lengths))
    return real / computed if computed else 1.0


# ---------------------------------------------------------------------------------------------------- sampling
class StepSampler:
    """Which examples each optimizer step sees, on each rank: a pure function of (seed, epoch, step).

    An epoch is a seeded permutation of the dataset cut into steps_per_epoch global batches of
    global_batch_size (the remainder is dropped, and differs from epoch to epoch). The global batch of a step is
    the same whatever the number of processes or the micro-batch size, so a run can change either and still see
    the same data; the training state needs only (epoch, step) to resume mid-epoch exactly.

    A global batch is split into world_size * accum_steps micro-batches of micro_batch_size consecutive items;
    micro-batch j goes to rank j % world_size as its accumulation step j // world_size, so the ranks' shares
    are disjoint, cover the global batch, and ranks in the same micro-step get neighbouring items.

    group_by_length: the permutation is cut into mega-chunks of MEGA_BATCHES global batches; each is sorted by
    length (longest first) and cut into global batches, whose order is then shuffled. Items of a global batch
    have similar lengths, and since the micro-batches are consecutive runs of a sorted global batch, so do the
    items of each micro-batch: less padding, with the randomness of which items meet kept at the chunk level.
    """

    MEGA_BATCHES = 50  # global batches per sorted mega-chunk (as Hugging Face's megabatch_mult)

    def __init__(self, lengths, global_batch_size: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, group_by_length: bool = False):
        per_step = micro_batch_size * world_size
        if micro_batch_size < 1 or world_size < 1 or global_batch_size < 1:
            raise ValueError(f"batch sizes and world_size must be positive, got global {global_batch_size}, "
                             f"micro {micro_batch_size}, world_size {world_size}")
        if global_batch_size % per_step:
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                             f"{micro_batch_size} x world_size {world_size} = {per_step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(lengths) < global_batch_size:
            raise ValueError(f"{len(lengths)} examples are fewer than one global batch of {global_batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.steps_per_epoch = len(lengths) // global_batch_size
        self.accum_steps = global_batch_size // per_step
        self._epoch, self._batches = None, None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _epoch_batches(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global_batch_size) dataset indices of the epoch; cached for the current epoch."""
        if self._epoch != epoch:
            n, G = len(self.lengths), self.global_batch_size
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            order = order[: self.steps_per_epoch * G]
            if self.group_by_length:
                chunk = G * self.MEGA_BATCHES
                # Stable sort, longest first; ties keep their shuffled order.
                order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")]
                                        for c in np.split(order, range(chunk, len(order), chunk))])
            batches = order.reshape(self.steps_per_epoch, G)
            if self.group_by_length and self.shuffle:
                batches = batches[rng.permutation(self.steps_per_epoch)]
            self._epoch, self._batches = epoch, batches
        return self._batches

    def global_batch(self, epoch: int, step: int) -> list:
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"epoch {epoch}, step {step}: steps run from 0 to {self.steps_per_epoch - 1}")
        return self._epoch_batches(epoch)[step].tolist()

    def micro_batches(self, epoch: int, step: int) -> list:
        batch, B = self.global_batch(epoch, step), self.micro_batch_size
        return [batch[(k * self.world_size + self.rank) * B:][:B] for k in range(self.accum_steps)]


# ---------------------------------------------------------------------------------------------------- check CLI
def check(path, tokenizer_path=None, max_seq_len: int = 512, micro_batch_size: int = 8, out=sys.stdout):
    """Validate a data file and print what training on it would look like. Raises DataError/ValueError."""
    records = load_records(path)
    n = len(records)
    n_input = sum(bool(r["input"]) for r in records)
    print(f"{path}: {n} records, all valid", file=out)
    print(f"  with input: {n_input} ({100 * n_input / n:.1f}%), without: {n - n_input}", file=out)
    tasks = Counter(r["task"] for r in records if "task" in r)
    if tasks:
        print(f"  tasks: {len(tasks)} ({', '.join(f'{t} {c}' for t, c in tasks.items())})", file=out)
    if tokenizer_path is None:
        print("token statistics need a tokenizer: pass --tokenizer PATH", file=out)
        return
    from .tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    prompt = np.array([len(tok.encode(format_prompt(r["instruction"], r["input"]), bos=True)) for r in records])
    response = np.array([len(tok.encode(r["output"], bos=False, eos=True)) for r in records])
    print(f"tokenizer {tok.path} (vocab {tok.vocab_size}); lengths include BOS and EOS", file=out)
    print(f"  {'tokens':<10}{'min':>7}{'mean':>8}{'p50':>7}{'p95':>7}{'max':>7}", file=out)
    for name, lengths in (("prompt", prompt), ("response", response), ("total", prompt + response)):
        print(f"  {name:<10}{lengths.min():>7}{lengths.mean():>8.1f}{np.percentile(lengths, 50):>7.0f}"
              f"{np.percentile(lengths, 95):>7.0f}{lengths.max():>7}", file=out)
    examples, stats = encode_records(tok, records, max_seq_len)
    print(f"at max_seq_len {max_seq_len}: {stats.n_truncated} truncated (response cut), "
          f"{stats.n_dropped} dropped (prompt alone too long), {stats.n_kept} kept", file=out)
    if not examples:
        return
    lengths = [len(ex["input_ids"]) for ex in examples]
    B = min(micro_batch_size, len(lengths))
    print(f"padding efficiency (real tokens / tokens computed), micro-batch {B}:", file=out)
    for label, grouped in (("pad to longest, random order", False), ("pad to longest, length-grouped", True)):
        sampler = StepSampler(lengths, B, B, group_by_length=grouped)
        batches = [[lengths[i] for i in sampler.global_batch(0, s)] for s in range(sampler.steps_per_epoch)]
        print(f"  {label:<34}{100 * padding_efficiency(batches):5.1f}%  ({len(batches)} batches)", file=out)
    rows = pack_examples(examples, max_seq_len, pad_id_for(tok))
    eff = padding_efficiency([[example_length(r)] for r in rows], row_len=max_seq_len)
    print(f"  {f'packed rows of {max_seq_len}':<34}{100 * eff:5.1f}%  ({len(rows)} rows)", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minialpaca.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="validate a data file and report token lengths and padding efficiency")
    p.add_argument("file", help="Alpaca JSON (a list of records) or JSON Lines")
    p.add_argument("--tokenizer", help="SentencePiece model; without it only the records are checked")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    try:
        if args.max_seq_len < 2 or args.micro_batch_size < 1:
            raise ValueError(f"--max-seq-len must be >= 2 and --micro-batch-size >= 1, got {args.max_seq_len} and {args.micro_batch_size}")
        check(args.file, args.tokenizer, args.max_seq_len, args.micro_batch_size)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError; Tokenizer raises both
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
