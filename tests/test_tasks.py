import re
import string
import subprocess
import sys

import pytest

from minialpaca.data import format_prompt, load_records
from minialpaca.tasks import ANTONYMS, TASKS, WORDS, demo_tokenizer, evaluate, make_records, score
from minialpaca.tasks import main as tasks_main
from conftest import REPO


@pytest.fixture(scope="module")
def train():
    return make_records("train", 300, seed=0)


@pytest.fixture(scope="module")
def test():
    return make_records("test", 40, seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("cache"))


def test_a_dozen_tasks_as_alpaca_records(train):
    assert len(TASKS) == 12
    assert len(train) == 12 * 300 and {r["task"] for r in train} == set(TASKS)
    for r in train:
        assert set(r) == {"instruction", "input", "output", "task"}
        assert r["instruction"] and r["output"] and all(isinstance(v, str) for v in r.values())
    share = sum(bool(r["input"]) for r in train) / len(train)
    assert 0.35 <= share <= 0.45  # Alpaca: about 40% of records have an input
    for name, task in TASKS.items():  # two or three phrasings of each instruction, each one used
        patterns = [re.compile(re.sub(r"\\\{\w+\\\}", r"\\S+", re.escape(p)) + "$") for p in task.phrasings]
        used = {next(i for i, pat in enumerate(patterns) if pat.match(r["instruction"])) for r in train if r["task"] == name}
        assert len(used) == len(task.phrasings) >= 2


def test_outputs_are_the_one_right_answer(train):
    for r in train:
        task, inp, out, ins = r["task"], r["input"], r["output"], r["instruction"]
        nums = [int(w) for w in ins.rstrip("?.").replace("?", " ").split() if w.isdigit()]
        if task == "reverse_words":
            assert out.split() == inp.split()[::-1] and 2 <= len(inp.split()) <= 3
        elif task == "sort_numbers":
            assert [int(x) for x in out.split()] == sorted(int(x) for x in inp.split())
        elif task == "add":
            assert int(out) == sum(nums) and all(0 <= n < 10 for n in nums)
        elif task == "uppercase":
            assert out == inp.upper() and out != inp
        elif task == "count_words":
            assert int(out) == len(inp.split())
        elif task == "repeat_word":
            w, n = ins.split()[-3], int(ins.split()[-2])
            assert out == " ".join([w] * n)
        elif task == "antonym":
            word = ins.rstrip("?.").split()[-1]
            assert ANTONYMS[word] == out and ANTONYMS[out] == word
        elif task == "next_letter":
            letter = next(w for w in ins.rstrip("?.").split() if len(w) == 1)
            assert out == string.ascii_lowercase[string.ascii_lowercase.index(letter) + 1]
        elif task == "max_number":
            assert int(out) == max(int(x) for x in inp.split())
        elif task == "even_odd":
            assert out == ("even" if nums[0] % 2 == 0 else "odd")
        elif task == "first_letter":
            word = next(w for w in ins.rstrip("?.").split() if w in WORDS)
            assert out == word[0]
        elif task == "count_up":
            assert [int(x) for x in out.split()] == list(range(nums[0], nums[1] + 1))


def test_deterministic_and_seeded(train):
    assert make_records("train", 300, seed=0) == train
    assert make_records("train", 300, seed=1) != train
    small = make_records("train", 100, seed=0)
    for name in TASKS:  # each task's draws are a prefix of a larger draw
        big = [r for r in train if r["task"] == name]
        assert all(r in big for r in small if r["task"] == name)
    with pytest.raises(ValueError, match="split must be one of"):
        make_records("valid", 10)


def test_splits_are_disjoint(train, test):
    text = lambda r: (r["instruction"], r["input"])
    assert not {text(r) for r in train} & {text(r) for r in test}
    assert len(test) == 12 * 40
    for name in TASKS:  # held-out records are distinct until a task's small pool runs out (the fact tasks: 25 to 50)
        texts = [text(r) for r in test if r["task"] == name]
        pool = {"count_up": 15, "next_letter": 25, "first_letter": 30}.get(name, len(texts))
        assert len(set(texts)) >= min(pool, len(texts))
    # A fact is tested only if it was trained (with another phrasing).
    for name in ("antonym", "first_letter", "next_letter", "add"):
        facts = lambda rs: {(re.sub(r"\D+", " ", r["instruction"]) if name == "add" else r["output"]) for r in rs if r["task"] == name}
        assert facts(test) <= facts(train)


def test_scorer_and_evaluate(test):
    assert score("add", " 12\n", "12") and not score("add", "12.", "12") and not score("add", "1 2", "12")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        score("nope", "a", "a")
    preds = [r["output"] if r["task"] == "add" else "wrong" for r in test]
    result = evaluate(test, preds)
    assert result["per_task"]["add"] == 1.0 and result["per_task"]["antonym"] == 0.0
    assert result["exact_match"] == pytest.approx(1 / 12)
    with pytest.raises(ValueError, match="predictions"):
        evaluate(test, preds[:-1])


def test_demo_tokenizer_trains_once_and_round_trips_held_out_text(tokenizer, test, tmp_path):
    assert tokenizer.vocab_size == 512 and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    cached = demo_tokenizer(tokenizer.path.parent)
    assert cached.path == tokenizer.path and len(list(tokenizer.path.parent.iterdir())) == 1  # no temp left
    for r in test:
        text = format_prompt(r["instruction"], r["input"]) + r["output"]
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text and 0 not in ids  # no unknown piece
        assert tokenizer.decode(tokenizer.encode(r["output"], bos=False)) == r["output"]
    pieces = tokenizer.sp.EncodeAsPieces("Add 1234 and 56.")
    assert "1" in pieces and "2" in pieces and not any(sum(c.isdigit() for c in p) > 1 for p in pieces)
    assert tokenizer.decode(tokenizer.encode("naïve 漢字")) == "naïve 漢字"  # byte fallback
    # The prompt template is cheap: its fixed text is made of whole-word pieces.
    assert len(tokenizer.encode(format_prompt("Count the words.", "cat dog"))) < 45


def test_task_records_fit_the_tiny_model(tokenizer, train):
    # Outputs of a few to ~15 tokens, and whole examples far inside the tiny preset's 256 positions.
    out_lens = [len(tokenizer.encode(r["output"], bos=False)) for r in train]
    assert max(out_lens) <= 16 and sum(out_lens) / len(out_lens) < 8
    assert max(len(tokenizer.encode(format_prompt(r["instruction"], r["input"]) + r["output"])) for r in train) < 100


def test_check_cli_on_the_task_suite(tokenizer, test, tmp_path):
    path = tmp_path / "tasks.json"
    tasks_main([str(path), "--split", "test", "--n-per-task", "40"])  # python -m minialpaca.tasks
    assert load_records(path) == test
    run = subprocess.run([sys.executable, "-m", "minialpaca.data", "check", str(path), "--tokenizer",
                          str(tokenizer.path), "--max-seq-len", "64", "--micro-batch-size", "16"],
                         capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    for line in ("480 records, all valid", "tokens", "prompt", "response", "at max_seq_len 64:",
                 "pad to longest, random order", "pad to longest, length-grouped", "packed rows of 64"):
        assert line in run.stdout
    missing = subprocess.run([sys.executable, "-m", "minialpaca.data", "check", str(tmp_path / "none.json")],
                             capture_output=True, text=True, cwd=REPO)
    assert missing.returncode == 1 and missing.stderr.strip() == f"error: {tmp_path / 'none.json'}: no such file"
