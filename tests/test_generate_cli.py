"""generate.py on a tiny checkpoint saved in our format: as users run it (a subprocess) where the process
boundary matters (stdout vs stderr, exit status, no traceback), else through main() in-process, because each
subprocess pays seconds of `import torch` on a busy CPU."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as cli
from minialpaca.checkpoint import load_model, save_model
from minialpaca.data import format_prompt
from minialpaca.generation import generate
from minialpaca.model import ModelArgs, Transformer
from minialpaca.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    format_prompt("Name three colors."),
    format_prompt("Add the numbers.", "2 and 3"),
    "Once upon a time there was a little cat. The cat liked to play in the sun with a red ball.",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny model with a tokenizer trained here, saved with save_model (params.json, safetensors,
    tokenizer.model)."""
    root = tmp_path_factory.mktemp("cli")
    tok = Tokenizer.train(TEXTS * 10, root / "train" / "tokenizer.model", vocab_size=400)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, multiple_of=16,
                     max_seq_len=256)
    model = Transformer(args)
    model.init_weights(seed=3)
    with torch.no_grad():  # peaked logits: greedy choices far from ties, so batching cannot flip one
        model.output.weight.mul_(20)
    return save_model(model, root / "tiny-ckpt", tokenizer_path=tok.path)


def run(*argv, ok=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only cost time on a shared CPU
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), *map(str, argv), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


def expected_answer(ckpt, prompt_ids, n):
    model, tok = load_model(ckpt), Tokenizer(ckpt / "tokenizer.model")
    new = generate(model, [prompt_ids], n, eos_id=tok.eos_id)[0]
    return tok.decode(prompt_ids + new), tok.decode(prompt_ids)


def test_prompt_streams_completion_to_stdout_and_speed_to_stderr(ckpt):
    proc = run("--checkpoint", ckpt, "--prompt", "Once upon a time", "--max-new-tokens", 12)
    tok = Tokenizer(ckpt / "tokenizer.model")
    full, _ = expected_answer(ckpt, tok.encode("Once upon a time"), 12)
    assert proc.stdout == full + "\n"  # the prompt echoed, then its continuation; nothing else
    assert "tok/s" in proc.stderr and "prefill" in proc.stderr and "decode" in proc.stderr


def test_instruction_uses_the_alpaca_template(ckpt, capsys):
    cli.main(["--checkpoint", str(ckpt), "--instruction", "Add the numbers.", "--input", "4 and 5",
              "--max-new-tokens", "10", "--device", "cpu"])
    stdout = capsys.readouterr().out
    tok = Tokenizer(ckpt / "tokenizer.model")
    full, prompt_text = expected_answer(ckpt, tok.encode(format_prompt("Add the numbers.", "4 and 5")), 10)
    assert stdout == full[len(prompt_text):].lstrip() + "\n"


def test_prompts_file_writes_alpaca_eval_format_same_for_any_batch_size(ckpt, tmp_path):
    records = [
        {"instruction": "Name three colors.", "dataset": "helpful_base"},
        {"instruction": "Add the numbers.", "input": "2 and 3"},
        {"instruction": "Tell me about the cat in the sun with a red ball."},
        {"instruction": "Hi"},
        {"instruction": "Name the numbers.", "input": "one two three four five six seven"},
    ]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    for bs in (1, 4):
        cli.main(["--checkpoint", str(ckpt), "--prompts-file", str(src), "--out", str(tmp_path / f"out{bs}.json"),
                  "--batch-size", str(bs), "--max-new-tokens", "8", "--device", "cpu"])
    one, four = (tmp_path / "out1.json").read_text(), (tmp_path / "out4.json").read_text()
    assert one == four
    outputs = json.loads(one)
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in records]
    assert [o["input"] for o in outputs] == [r.get("input", "") for r in records]
    assert all(o["generator"] == "tiny-ckpt" and o["output"] for o in outputs)
    assert outputs[0]["dataset"] == "helpful_base"
    tok = Tokenizer(ckpt / "tokenizer.model")
    full, prompt_text = expected_answer(ckpt, tok.encode(format_prompt("Hi")), 8)
    assert outputs[3]["output"] == full[len(prompt_text):].strip()


def test_bad_input_gives_one_clear_error(ckpt, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "ok"}, {"instruction": "fine"}, {"input": "no instruction"}]))
    proc = run("--checkpoint", ckpt, "--prompts-file", bad, "--out", tmp_path / "o.json", ok=False)
    assert "record 2" in proc.stderr and "'instruction'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.json").exists()


def test_tokenizer_problems_are_refused(ckpt, tmp_path):
    bare = save_model(load_model(ckpt), tmp_path / "no-tokenizer")
    with pytest.raises(ValueError, match="no tokenizer.model beside checkpoint .*; pass --tokenizer"):
        cli.main(["--checkpoint", str(bare), "--prompt", "hi", "--device", "cpu"])
    other = Tokenizer.train(TEXTS * 10, tmp_path / "other.model", vocab_size=350)
    with pytest.raises(ValueError, match="350 pieces but the model's vocabulary has 400"):
        cli.main(["--checkpoint", str(bare), "--tokenizer", str(other.path), "--prompt", "hi", "--device", "cpu"])


def test_interactive_answers_each_line_until_an_empty_one(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name three colors.\nHi\n\nnever read\n"))
    cli.main(["--checkpoint", str(ckpt), "--interactive", "--max-new-tokens", "6", "--device", "cpu"])
    tok = Tokenizer(ckpt / "tokenizer.model")
    expected = ""
    for instruction in ("Name three colors.", "Hi"):
        full, prompt_text = expected_answer(ckpt, tok.encode(format_prompt(instruction)), 6)
        expected += full[len(prompt_text):].lstrip() + "\n"
    assert capsys.readouterr().out == expected
