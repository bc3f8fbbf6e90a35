"""train.py end to end on the CPU: 1 vs 2 processes, exact resume, SIGTERM, sharded memory, export, errors."""
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minialpaca.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

WORDS = "red green blue cat dog bird one two three big small fast slow up down left right".split()


def make_records(n):
    records = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 4)]
        if i % 3 == 0:
            records.append({"instruction": "Reverse the words.", "input": " ".join(words), "output": " ".join(words[::-1])})
        else:
            records.append({"instruction": f"Say {words[0]} twice.", "input": "", "output": f"{words[0]} {words[0]}"})
    return records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A small data file and a tokenizer trained on it, shared by the tests of this module."""
    d = tmp_path_factory.mktemp("train")
    records = make_records(96)
    (d / "data.json").write_text(json.dumps(records))
    from minialpaca.data import format_prompt

    texts = [format_prompt(r["instruction"], r["input"]) + " " + r["output"] for r in records] * 4
    Tokenizer.train(texts, d / "tokenizer.model", vocab_size=400)
    return d


def base_args(workdir, out, *extra):
    return ["--data", str(workdir / "data.json"), "--tokenizer", str(workdir / "tokenizer.model"), "--out", str(out),
            "--preset", "tiny", "--global-batch-size", "8", "--micro-batch-size", "2", "--max-seq-len", "96",
            "--lr", "3e-3", "--eval-examples", "4", "--max-new-tokens", "4", "--kernels", "torch", *extra]


def run_train(args, nproc=1, check=True, env=None):
    cmd = [PY, "train.py", *args] if nproc == 1 else [
        PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if not r.get("eval")}


def test_two_processes_match_one_and_resume_is_exact(workdir, tmp_path):
    one = tmp_path / "one"
    run_train(base_args(workdir, one, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "5"))
    two = tmp_path / "two"
    run_train(base_args(workdir, two, "--max-steps", "6", "--micro-batch-size", "1"), nproc=2)
    l1, l2 = train_losses(one), train_losses(two)
    assert sorted(l1) == list(range(1, 7))
    for step in l1:  # same global batch, split 4x2 on one process vs 4x1 on each of two: the same losses
        assert abs(l1[step] - l2[step]) < 1e-5, (step, l1[step], l2[step])
    assert l1[6] < l1[1]

    # Interrupted after step 2: throw away what came later, resume, and get the very same losses.
    import shutil

    for name in ("step-4", "step-6"):
        shutil.rmtree(one / "checkpoints" / name)
    shutil.rmtree(one / "final")
    proc = run_train(base_args(workdir, one, "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "5", "--resume"))
    assert f"resumed from {one / 'checkpoints' / 'step-2'} at step 2" in proc.stderr
    assert train_losses(one) == l1  # metrics.jsonl rewritten from step 3 on, with identical numbers

    # A checkpoint written by 1 process resumes on 2 (DCP reshards it): the same losses again.
    for name in ("step-4", "step-6"):
        shutil.rmtree(one / "checkpoints" / name)
    shutil.rmtree(one / "final")
    proc = run_train(base_args(workdir, one, "--max-steps", "6", "--save-every", "2", "--resume", "--micro-batch-size", "1"), nproc=2)
    assert f"resumed from {one / 'checkpoints' / 'step-2'} at step 2" in proc.stderr
    resumed = train_losses(one)
    assert resumed.keys() == l1.keys()
    for step in l1:
        assert abs(resumed[step] - l1[step]) < 1e-5, (step, l1[step], resumed[step])


def test_sigterm_saves_a_loadable_checkpoint(workdir, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, "train.py", *base_args(workdir, out, "--epochs", "100", "--micro-batch-size", "8")]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by signal" in err
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and ckpts[0].name.startswith("step-") and not ckpts[0].name.endswith(".tmp")
    step = int(ckpts[0].name[5:])
    assert step >= 2
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert state["step"] == step
    # It loads: resume continues from it.
    proc = run_train(base_args(workdir, out, "--epochs", "100", "--max-steps", str(step + 1), "--resume", "--micro-batch-size", "8"))
    assert f"resumed from {ckpts[0]}" in proc.stderr


def test_second_ctrl_c_quits_at_once_without_a_checkpoint(workdir, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "stderr.txt"
    # small-60m's steps take about a second here: time for the second Ctrl-C to land mid-step.
    cmd = [PY, "train.py", *base_args(workdir, out, "--epochs", "100", "--preset", "small-60m")]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stderr=err, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        while time.time() < deadline and "Ctrl-C again" not in log.read_text():
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    text = log.read_text()
    assert proc.returncode == 128 + signal.SIGINT, text[-3000:]
    assert "SIGINT: stopping after this step, with a checkpoint (Ctrl-C again to quit now" in text
    assert "interrupted: no checkpoint of this step" in text and "Traceback" not in text
    from minialpaca.distributed import list_checkpoints

    assert list_checkpoints(out / "checkpoints") == []  # at most an unfinished step-N.tmp, which --resume ignores


SHARD_SCRIPT = """
import json, sys, torch
from minialpaca import distributed
from minialpaca.model import Transformer
from minialpaca.presets import get_preset
d = distributed.setup("cpu")
with torch.device("meta"):
    model = Transformer(get_preset("tiny", vocab_size=256))
distributed.shard_model(model)
model.to_empty(device="cpu"); model.reset_rope("cpu")
full = Transformer(get_preset("tiny", vocab_size=256)).state_dict() if d.is_main else None
distributed.load_full_state_dict(model, full)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
tokens = torch.randint(0, 256, (2, 16))
model(tokens, labels=tokens).backward(); opt.step()
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
params = sum(local(p).numel() for p in model.parameters())
optim = sum(local(v).numel() for s in opt.state.values() for k, v in s.items() if k != "step")
total = sum(p.numel() for p in model.parameters())
json.dump({"params": params, "optim": optim, "total": total}, open(sys.argv[1] + f"/rank{d.rank}.json", "w"))
distributed.teardown()
"""


def test_each_rank_holds_a_shard_of_params_and_optimizer(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
                   cwd=REPO, check=True, capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = ranks[0]["total"]
    assert sum(r["params"] for r in ranks) == total
    for r in ranks:  # about half each (FSDP2 shards every tensor on dim 0, padding the last shard)
        assert abs(r["params"] - total / 2) <= 0.02 * total
        assert r["optim"] == 2 * r["params"]  # Adam's two moments, sharded like the parameters


def test_export_answers_in_generate_py(workdir, tmp_path):
    out = tmp_path / "run"
    run_train(base_args(workdir, out, "--epochs", "8", "--micro-batch-size", "8", "--save-every", "20",
                        "--keep-checkpoints", "2", "--eval-every", "40", "--hf-export"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    last = steps[-1]["step"]
    assert [r["step"] for r in steps] == list(range(1, last + 1))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gb"):
        assert key in steps[0], key
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["step"] for r in rows if r.get("eval")] == [*range(40, last + 1, 40), *([last] if last % 40 else [])]
    # Only the newest two of the checkpoints saved every 20 steps are kept.
    saved = list(range(20, last + 1, 20))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(f"step-{s}" for s in saved[-2:])
    if importlib.util.find_spec("matplotlib"):
        assert (out / "loss.png").stat().st_size > 0

    final = out / "final"
    assert (final / "params.json").is_file() and (final / "model.safetensors").is_file() and (final / "tokenizer.model").is_file()
    # The Hugging Face export holds the same model.
    from minialpaca.checkpoint import load_model

    ours, theirs = load_model(final), load_model(out / "final-hf")
    tokens = torch.randint(0, ours.args.vocab_size, (1, 12))
    torch.testing.assert_close(ours(tokens), theirs(tokens))
    proc = subprocess.run([PY, "generate.py", "--checkpoint", str(final), "--instruction", "Reverse the words.",
                           "--input", "red cat", "--max-new-tokens", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # some answer was streamed
    assert "tok/s" in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/data.json"], "/nonexistent/data.json"),
    (["--preset", "gigantic"], "unknown preset 'gigantic'"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"], "not a multiple of --micro-batch-size"),
    (["--preset", "alpaca-7b"], "pass --model PATH"),
    (["--kernels", "cuda"], "--kernels must be one of"),
])
def test_bad_input_is_one_clear_error(workdir, tmp_path, extra, message):
    proc = run_train(base_args(workdir, tmp_path / "bad") + extra, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()  # no work started


@pytest.mark.parametrize("flags, message", [
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1, got 0"),
    (["--lr", "0"], "--lr must be above 0, got 0.0"),
    (["--grad-clip", "-1"], "--grad-clip must be at least 0, got -1.0"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be below 1, got 1.5"),
])
def test_numbers_out_of_range_are_refused(flags, message):
    from train import ConfigError, parse_args

    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_micro_batch_is_capped_at_each_process_share():
    """The tiny recipe (global batch 16, micro-batch 16) must run on 2 processes too: 8 each."""
    from train import ConfigError, fit_batch_sizes, parse_args

    said = []
    cfg = parse_args([])
    fit_batch_sizes(cfg, 2, said.append)
    assert (cfg.global_batch_size, cfg.micro_batch_size) == (16, 8) and "using 8" in said[0]
    cfg = parse_args(["--global-batch-size", "16", "--micro-batch-size", "4"])
    fit_batch_sizes(cfg, 2, said.append)
    assert cfg.micro_batch_size == 4  # 2 micro-batches of 4 on each process
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        fit_batch_sizes(parse_args([]), 3, said.append)
    with pytest.raises(ConfigError, match="not a multiple of --micro-batch-size 3 x 2 processes"):
        fit_batch_sizes(parse_args(["--micro-batch-size", "3"]), 2, said.append)


def test_help_describes_every_option():
    proc = subprocess.run([PY, "train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "clip the global gradient norm" in proc.stdout and "alpaca-7b: model_preset=llama-7b" in proc.stdout


def test_fine_tunes_pretrained_weights_loaded_into_shards(shared_data, tmp_path):
    """stories260K (Meta's format) fine-tuned on 2 processes: rank 0 reads the weights and each rank gets its
    shards. The first loss is a pretrained model's, not a random one's, and the export is those weights
    moved by two small steps."""
    from minialpaca.checkpoint import read_checkpoint

    stories = shared_data / "stories260K" / "meta"
    records = [{"instruction": "Tell a story.", "input": "", "output": "Once upon a time, there was a little girl named "
                f"{name}. She liked to play with her {toy} in the park."}
               for name in ("Lily", "Tom", "Sue", "Ben") for toy in ("ball", "dog", "kite")]
    (tmp_path / "stories.json").write_text(json.dumps(records))
    out = tmp_path / "ft"
    run_train(["--model", str(stories), "--data", str(tmp_path / "stories.json"), "--out", str(out),
               "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--lr", "1e-5",
               "--warmup-ratio", "0", "--eval-examples", "1", "--max-new-tokens", "4", "--device", "cpu"], nproc=2)
    losses = train_losses(out)
    assert losses[1] < 0.6 * math.log(512), losses  # a random 512-word model starts at ln(512)
    _, pretrained = read_checkpoint(stories, dtype=torch.float32)
    _, tuned = read_checkpoint(out / "final")
    assert pretrained.keys() == tuned.keys()
    moved = max((tuned[k] - pretrained[k]).abs().max().item() for k in pretrained)
    assert 0 < moved < 1e-4  # Adam moves each weight by at most about lr per step


def test_tokenizer_that_does_not_fit_the_model(workdir, tmp_path):
    small = Tokenizer.train([r["output"] for r in make_records(96)] * 10, tmp_path / "small.model", vocab_size=330)
    out = tmp_path / "run"
    run_train(base_args(workdir, out, "--max-steps", "1"))
    proc = run_train(base_args(workdir, tmp_path / "ft", "--model", str(out / "final"), "--tokenizer", str(small.path)), check=False)
    assert proc.returncode == 2 and "vocab" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_without_a_checkpoint_starts_from_scratch(workdir, tmp_path):
    out = tmp_path / "run"
    proc = run_train(base_args(workdir, out, "--max-steps", "1", "--resume"))
    assert "no complete checkpoint" in proc.stderr and "starting from scratch" in proc.stderr
    assert train_losses(out).keys() == {1}


def test_resume_with_another_model_shape_is_refused(workdir, tmp_path):
    out = tmp_path / "run"
    run_train(base_args(workdir, out, "--max-steps", "2", "--save-every", "1"))
    # Other settings are allowed, with a warning that names them.
    proc = run_train(base_args(workdir, out, "--max-steps", "3", "--save-every", "1", "--resume", "--lr", "1e-3"))
    assert "warning: resuming with other settings than step-2 had: --max-steps 3 (was 2), --lr 0.001 (was 0.003)" in proc.stderr
    proc = run_train(base_args(workdir, out, "--max-steps", "3", "--resume", "--preset", "small-60m"), check=False)
    assert proc.returncode == 2 and "another model shape" in proc.stderr
    # Forgetting --resume does not start a second run among the first one's checkpoints.
    proc = run_train(base_args(workdir, out, "--max-steps", "3"), check=False)
    assert proc.returncode == 2 and "holds an earlier run's checkpoints (newest: step-3): pass --resume" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]


def test_nan_loss_stops_without_overwriting_a_checkpoint(workdir, tmp_path):
    out = tmp_path / "run"
    proc = run_train(base_args(workdir, out, "--max-steps", "6", "--save-every", "1", "--lr", "1e30",
                               "--warmup-ratio", "0", "--grad-clip", "1e30"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "at step" in proc.stderr and "Traceback" not in proc.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    saved = distributed_steps(out)
    assert saved and max(saved) == max(steps)  # every finished step was saved; the failing one was not


def distributed_steps(out):
    return [int(p.name[5:]) for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp")]


def test_packing_with_activation_checkpointing(workdir, tmp_path):
    """Packed rows train, and recomputing activations in backward changes nothing but memory."""
    runs = {}
    for name, extra in [("plain", []), ("ac", ["--activation-checkpointing"])]:
        out = tmp_path / name
        run_train(base_args(workdir, out, "--max-steps", "3", "--packing", "--max-seq-len", "128", "--eval-every", "3", *extra))
        runs[name] = train_losses(out)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("eval") for r in rows)  # held-out loss on packed rows too
    assert runs["plain"].keys() == runs["ac"].keys() == {1, 2, 3}
    for step in runs["plain"]:
        assert abs(runs["plain"][step] - runs["ac"][step]) < 1e-6


def test_bf16_on_one_and_two_processes(workdir, tmp_path):
    """bf16 as GPUs run it, on CPU processes: autocast on one process; FSDP2's mixed-precision policy on two,
    where the blocks compute in bf16 while the rotary tables stay fp32. Losses follow fp32's within bf16's
    precision."""
    runs = {}
    for name, nproc, extra in [("fp32", 1, []), ("bf16-autocast", 1, ["--dtype", "bfloat16"]),
                               ("bf16", 2, ["--dtype", "bfloat16", "--micro-batch-size", "4"])]:
        run_train(base_args(workdir, tmp_path / name, "--max-steps", "3", *extra), nproc=nproc)
        runs[name] = train_losses(tmp_path / name)
    for name in ("bf16-autocast", "bf16"):
        assert runs[name].keys() == runs["fp32"].keys() == {1, 2, 3}
        for step, loss in runs["fp32"].items():
            assert abs(runs[name][step] - loss) < 0.02 * loss, (name, step, loss, runs[name][step])
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_triton_kernels_inside_fsdp2_blocks(workdir, tmp_path):
    """kernels=triton (Triton's interpreter on the CPU) in FSDP2-sharded blocks on 2 processes gives the
    losses of the plain torch path on 1."""
    reference, sharded = tmp_path / "torch", tmp_path / "triton"
    small = ["--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "1", "--max-seq-len", "64"]
    run_train(base_args(workdir, reference, *small))
    args = base_args(workdir, sharded, *small)
    args[args.index("--kernels") + 1] = "triton"
    run_train(args, nproc=2, env={"TRITON_INTERPRET": "1"})
    for step, loss in train_losses(reference).items():
        assert abs(train_losses(sharded)[step] - loss) < 1e-4


def test_compiled_blocks_inside_fsdp2_match_eager(workdir, tmp_path):
    """--compile (torch.compile per block, after activation checkpointing, before sharding) on 2 processes
    gives the losses of eager on 1; RoPE there runs as real arithmetic (inductor has no complex numbers)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    small = ["--max-steps", "2", "--global-batch-size", "2", "--micro-batch-size", "1", "--max-seq-len", "64"]
    run_train(base_args(workdir, eager, *small))
    run_train(base_args(workdir, compiled, *small, "--compile"), nproc=2)
    for step, loss in train_losses(eager).items():
        assert abs(train_losses(compiled)[step] - loss) < 1e-4
