import io
import json
import random
import subprocess
import sys

import pytest
import torch

from minialpaca import ModelArgs, Transformer, Tokenizer
from minialpaca.data import (
    IGNORE_INDEX, DataError, EncodeStats, StepSampler, check, collate, encode_example, encode_records,
    example_length, format_prompt, load_records, pack_examples, pad_id_for, padding_efficiency,
)
from conftest import REPO

ALPACA = "alpaca/alpaca_data_first200.json"


class CharTokenizer:
    """One token per character (id = code point + 3), BOS 1, EOS 2: lengths are easy to reason about."""
    bos_id, eos_id, pad_id = 1, 2, -1

    def encode(self, text, bos=True, eos=False):
        return ([1] if bos else []) + [ord(c) + 3 for c in text] + ([2] if eos else [])

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


# ---------------------------------------------------------------------------------------------- template
def test_format_prompt_is_stanfords_template():
    assert format_prompt("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:"
    )
    assert format_prompt("Say hi.") == format_prompt("Say hi.", "") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSay hi.\n\n### Response:"
    )


# ---------------------------------------------------------------------------------------------- real data
def test_real_alpaca_records_with_llama_tokenizer(shared_data):
    records = load_records(shared_data / ALPACA)
    assert len(records) == 200 and sum(bool(r["input"]) for r in records) == 118
    tok = Tokenizer(shared_data / "llama_tokenizer.model")
    examples, stats = encode_records(tok, records, max_seq_len=512)
    assert stats.n_kept == 200 and stats.n_dropped == stats.n_truncated == 0
    for record, ex in zip(records, examples):
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) and ids[0] == tok.bos_id
        k = labels.index(next(label for label in labels if label != IGNORE_INDEX))  # first trained position
        assert all(label == IGNORE_INDEX for label in labels[:k])
        assert tok.decode(ids[1:k]) == format_prompt(record["instruction"], record["input"])
        assert labels[k:] == ids[k:] and labels[-1] == tok.eos_id
        assert tok.decode(labels[k:-1]) == record["output"]  # exactly, leading space and all
    assert stats.n_target_tokens == sum(len(ex["labels"]) - ex["labels"].count(IGNORE_INDEX) for ex in examples)


def test_check_report_on_real_data(shared_data):
    out = io.StringIO()
    check(shared_data / ALPACA, shared_data / "llama_tokenizer.model", max_seq_len=512, micro_batch_size=8, out=out)
    report = out.getvalue()
    assert "200 records" in report and "with input: 118 (59.0%)" in report
    assert "0 truncated" in report and "0 dropped" in report and "packed rows of 512" in report


# ---------------------------------------------------------------------------------------------- encoding
def test_encoding_masks_the_prompt_and_keeps_response_and_eos():
    tok, rec = CharTokenizer(), {"instruction": "Do.", "input": "", "output": "abc"}
    prompt = tok.encode(format_prompt("Do."))
    ex = encode_example(tok, rec, 1000)
    assert ex["input_ids"] == prompt + tok.encode("abc", bos=False) + [2]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt) + tok.encode("abc", bos=False) + [2]
    on_inputs = encode_example(tok, rec, 1000, train_on_inputs=True)
    assert on_inputs["input_ids"] == ex["input_ids"]
    assert on_inputs["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]  # BOS is never a target


def test_truncation_at_the_boundary_and_drops_are_counted():
    tok, rec = CharTokenizer(), {"instruction": "Do.", "input": "", "output": "abcd"}
    P = len(tok.encode(format_prompt("Do.")))  # BOS + prompt
    full = encode_example(tok, rec, 1000)
    assert len(full["input_ids"]) == P + 5
    fits = encode_example(tok, rec, P + 5)  # exactly fits: EOS kept
    assert fits == full
    cut = encode_example(tok, rec, P + 4)  # one short: the EOS is what goes
    assert cut["input_ids"] == full["input_ids"][:-1] and cut["labels"] == full["labels"][:-1]
    one = encode_example(tok, rec, P + 1)  # room for a single response token
    assert one["input_ids"] == full["input_ids"][: P + 1] and one["labels"][-1] == ord("a") + 3
    assert encode_example(tok, rec, P) is None  # the prompt alone fills it: dropped

    records = [rec, {**rec, "output": "a"}, {**rec, "instruction": "Do this much longer thing."}]
    examples, stats = encode_records(tok, records, P + 3)
    assert stats == EncodeStats(n_records=3, n_kept=2, n_dropped=1, n_truncated=1, n_tokens=2 * P + 5, n_target_tokens=5)
    assert "1 dropped" in stats.summary() and "1 truncated" in stats.summary()


# ---------------------------------------------------------------------------------------------- loading
def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_json_and_json_lines(tmp_path):
    recs = [{"instruction": "a", "input": "b", "output": "c", "task": "t"}, {"instruction": "d", "output": ""}]
    as_json = load_records(_write(tmp_path, "d.json", json.dumps(recs)))
    lines = "\n".join(json.dumps(r) for r in recs) + "\n\n"
    assert load_records(_write(tmp_path, "d.jsonl", lines)) == as_json
    assert load_records(_write(tmp_path, "d.txt", lines)) == as_json  # sniffed
    assert load_records(_write(tmp_path, "e.jsonl", json.dumps(recs))) == as_json  # a list, whatever the suffix
    assert as_json[0] == recs[0] and as_json[1] == {"instruction": "d", "input": "", "output": ""}


@pytest.mark.parametrize("name, text, expected", [
    ("d.json", '[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}]',
     "record 1: missing required field 'output'"),
    ("d.json", '[{"instruction": "a", "input": 3, "output": "b"}]', "record 0: field 'input' must be a string, found a number"),
    ("d.json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}, {"instruction": " ", "output": "b"}]',
     "record 2: field 'instruction' is empty"),
    ("d.json", '[["a", "b"]]', "record 0: expected an object"),
    ("d.json", '[{"instruction": "a", "output": "b"},', "not valid JSON"),
    ("d.json", '{"data": []}', "expected a JSON list of records"),
    ("d.json", "[]", "contains no records"),
    ("d.json", "", "the file is empty"),
    ("d.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a"',
     "record 2 (line 3): not valid JSON"),
])
def test_malformed_input_gives_one_clear_error(tmp_path, name, text, expected):
    path = _write(tmp_path, name, text)
    with pytest.raises(DataError, match="^" + str(path).replace("\\", "\\\\") + ": ") as info:
        load_records(path)
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------- batching
def test_collate_pads_right_and_masks_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    batch = collate(examples, pad_id=0)
    assert set(batch) == {"input_ids", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]] and batch["input_ids"].dtype == torch.long
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    with pytest.raises(ValueError, match="pad_id_for"):
        collate(examples, pad_id=-1)
    assert pad_id_for(CharTokenizer()) == 2


def test_padding_efficiency():
    assert padding_efficiency([[2, 4], [3]]) == pytest.approx(9 / 11)
    assert padding_efficiency([[10, 6]], row_len=16) == pytest.approx(16 / 32)


def _random_examples(n, lo, hi, vocab, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(lo, hi)
        ids = [1] + [rng.randrange(3, vocab) for _ in range(L - 1)]
        p = rng.randint(1, L - 1)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def test_packing_layout():
    examples = _random_examples(40, 2, 30, 100)
    rows = pack_examples(examples, 32, pad_id=0)
    assert all(len(r[k]) == 32 for r in rows for k in r)
    seen = []
    for row in rows:
        segments = sorted(set(row["segment_ids"]) - {0})
        assert segments == list(range(1, len(segments) + 1))
        for s in segments:
            at = [t for t in range(32) if row["segment_ids"][t] == s]
            assert at == list(range(at[0], at[0] + len(at)))  # contiguous
            assert [row["positions"][t] for t in at] == list(range(len(at)))
            seen.append(([row["input_ids"][t] for t in at], [row["labels"][t] for t in at]))
        pads = [t for t in range(32) if row["segment_ids"][t] == 0]
        assert all(row["labels"][t] == IGNORE_INDEX and row["input_ids"][t] == 0 for t in pads)
        assert pads == list(range(32 - len(pads), 32))  # trailing
    assert sorted(seen) == sorted((ex["input_ids"], ex["labels"]) for ex in examples)  # each once, intact
    real = sum(len(ex["input_ids"]) for ex in examples)
    next_fit, room = 0, 0  # rows needed when filling in data order, a new row whenever the next one does not fit
    for ex in examples:
        next_fit, room = (next_fit + 1, 32) if len(ex["input_ids"]) > room else (next_fit, room)
        room -= len(ex["input_ids"])
    assert len(rows) < next_fit  # best-fit decreasing packs tighter (25 rows against 29 here)
    assert padding_efficiency([[example_length(r)] for r in rows], row_len=32) == pytest.approx(real / (32 * len(rows)))
    with pytest.raises(ValueError, match="more than max_seq_len"):
        pack_examples(examples, 8, pad_id=0)


def test_packed_rows_match_each_example_alone():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32)).eval()
    examples = _random_examples(7, 3, 12, 64, seed=1)
    rows = pack_examples(examples, 24, pad_id=0)
    assert len(rows) < len(examples)
    batch = collate(rows, pad_id=0)
    assert batch["positions"].shape == batch["segment_ids"].shape == (len(rows), 24)
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        leaky = model(batch["input_ids"])  # plain causal attention over the row: the control
        crossed = 0
        for r, row in enumerate(rows):
            for s in set(row["segment_ids"]) - {0}:
                at = torch.tensor([t for t in range(24) if row["segment_ids"][t] == s])
                alone = model(batch["input_ids"][r, at][None])[0]
                torch.testing.assert_close(packed[r, at], alone, atol=1e-5, rtol=1e-5)
                crossed += not torch.allclose(leaky[r, at], alone, atol=1e-5)
    assert crossed > 0  # without the segment mask examples would see each other


# ---------------------------------------------------------------------------------------------- sampler
def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size 3 x world_size 2"):
        StepSampler([1] * 100, 8, 3, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler([1] * 7, 8, 4)
    with pytest.raises(ValueError, match="rank 2"):
        StepSampler([1] * 100, 8, 4, rank=2, world_size=2)
    with pytest.raises(IndexError):
        StepSampler([1] * 100, 8, 4).global_batch(0, 12)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_sampler_shards_cover_and_do_not_depend_on_world_size(group_by_length):
    lengths = [random.Random(i).randint(1, 300) for i in range(1003)]
    G = 16
    ref = StepSampler(lengths, G, 16, seed=3, group_by_length=group_by_length)
    assert ref.steps_per_epoch == 62 and ref.accum_steps == 1
    for micro, world in [(4, 1), (2, 2), (8, 2), (1, 4)]:
        ranks = [StepSampler(lengths, G, micro, rank=r, world_size=world, seed=3, group_by_length=group_by_length)
                 for r in range(world)]
        assert ranks[0].accum_steps == G // (micro * world)
        for step in (0, 17, 61):
            gb = ref.global_batch(1, step)
            shares = [i for s in ranks for mb in s.micro_batches(1, step) for i in mb]
            assert all(len(mb) == micro for s in ranks for mb in s.micro_batches(1, step))
            assert sorted(shares) == sorted(gb)  # disjoint, and together the whole global batch
            assert all(s.global_batch(1, step) == gb for s in ranks)
    epoch = [i for step in range(ref.steps_per_epoch) for i in ref.global_batch(0, step)]
    assert len(set(epoch)) == len(epoch) == 62 * G  # an epoch covers the data but the remainder
    assert sorted(epoch) != sorted(i for step in range(62) for i in ref.global_batch(1, step))  # remainder varies


def test_sampler_is_deterministic_and_resumes_mid_epoch():
    lengths = list(range(1, 201))
    run = lambda s, e, steps: [s.micro_batches(e, k) for k in steps]
    a = StepSampler(lengths, 8, 2, seed=5)
    b = StepSampler(lengths, 8, 2, seed=5)
    assert run(a, 0, range(25)) == run(b, 0, range(25))
    assert run(a, 0, range(25)) != run(a, 1, range(25))
    assert run(a, 0, range(25)) != run(StepSampler(lengths, 8, 2, seed=6), 0, range(25))
    # A run stopped after (epoch 1, step 9) resumes in a fresh process at step 10: same batches as going on.
    through = [a.micro_batches(e, k) for e in range(3) for k in range(25)]
    resumed = StepSampler(lengths, 8, 2, seed=5)
    rest = [resumed.micro_batches(1, k) for k in range(10, 25)] + [resumed.micro_batches(2, k) for k in range(25)]
    assert through[35:] == rest
    plain = StepSampler(lengths, 8, 8, shuffle=False)
    assert plain.global_batch(0, 3) == plain.global_batch(4, 3) == list(range(24, 32))


def test_group_by_length_cuts_padding():
    lengths = [random.Random(i).randint(20, 400) for i in range(2000)]
    eff = {}
    for grouped in (False, True):
        s = StepSampler(lengths, 32, 8, seed=0, group_by_length=grouped)
        micro = [[lengths[i] for i in mb] for k in range(s.steps_per_epoch) for mb in s.micro_batches(0, k)]
        eff[grouped] = padding_efficiency(micro)
    assert eff[False] < 0.7 and eff[True] > 0.95
    # Grouped global batches still come in shuffled order, not longest first.
    s = StepSampler(lengths, 32, 8, group_by_length=True)
    firsts = [lengths[s.global_batch(0, k)[0]] for k in range(s.steps_per_epoch)]
    assert firsts != sorted(firsts, reverse=True)


# ---------------------------------------------------------------------------------------------- check CLI
def test_check_cli_reports_and_fails_cleanly(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "input": "x" * (i % 2), "output": str(i)})
                              for i in range(10)))
    cli = [sys.executable, "-m", "minialpaca.data", "check"]
    ok = subprocess.run(cli + [str(path)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "10 records, all valid" in ok.stdout and "with input: 5 (50.0%)" in ok.stdout
    assert "need a tokenizer" in ok.stdout
    path.write_text('[{"instruction": "a", "output": 5}]')
    bad = subprocess.run(cli + [str(path)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"error: {path}: record 0: field 'output' must be a string, found a number"
