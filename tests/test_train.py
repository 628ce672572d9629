"""train.py: LoRA, a short run whose loss falls, resume equality, the non-finite guard, the command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import model as lm
import lora
import runs
import train as T
from tests.helpers import toy_setup, train_interrupted_at

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny LLaMA-style checkpoint with the toy tokenizer, and a small toy task on disk."""
    return toy_setup(tmp_path_factory.mktemp("toy"), pairs_per_user=12, n_valid_per_user=4, n_unseen_users=2)


def config(toy, out, **kw):
    base = dict(stage="pdpo", model=str(toy / "base"), data=str(toy / "train.jsonl"), out=str(out), quiet=True,
                batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=2, max_steps=6, beta=0.1, max_length=96,
                max_prompt_length=32)
    base.update(kw)
    return T.TrainConfig(**base)


def trained_tensors(run):
    return load_file(str(Path(run) / "checkpoint" / "trainable.safetensors"))


def test_lora_merged_equals_unmerged(toy, tmp_path):
    model = lm.load_pretrained(toy / "base")
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    before = model(ids)
    lora.add_lora(model, r=4, alpha=8, dropout=0.0, targets=["wq", "wv", "w2", "tok_embeddings"])
    torch.manual_seed(1)
    for m in lora.lora_modules(model):  # adapters away from their zero start
        torch.nn.init.normal_(m.lora_A, std=0.1)
        torch.nn.init.normal_(m.lora_B, std=0.1)
    with torch.no_grad():
        unmerged = model(ids)
        with lora.lora_disabled(model):
            assert torch.allclose(model(ids), before, atol=1e-6)  # adapters off = the base model
        assert (unmerged - before).abs().max() > 1e-3  # the adapters do something
        merged = lora.merge_lora(model)(ids)
    assert model.config.tie_word_embeddings  # so tok_embeddings was left without an adapter
    assert not lora.lora_modules(model)
    assert torch.allclose(merged, unmerged, atol=1e-5), (merged - unmerged).abs().max()


def test_lora_run_saves_adapters_and_merges(toy, tmp_path):
    out = tmp_path / "lora"
    T.train(config(toy, out, lora_r=4, lora_dropout=0.0, lr=1e-2, merge=True))
    assert (out / "adapter.safetensors").is_file() and not (out / "model.safetensors").is_file()
    run = runs.load_run(out)  # base + adapters, merged on load
    merged = lm.load_pretrained(out / "merged")
    base = lm.load_pretrained(toy / "base")
    ids = torch.randint(3, merged.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.allclose(run.model(ids), merged(ids), atol=1e-5)
        assert (merged(ids) - base(ids)).abs().max() > 1e-4  # training moved the adapters
    frozen = [k for k in trained_tensors(out) if k.startswith("model.") and "lora_" not in k]
    assert frozen == []  # only adapters (and the user model) are trained with LoRA


def test_short_run_loss_falls(toy, tmp_path):
    out = tmp_path / "run"
    summary = T.train(config(toy, out, max_steps=30, lr=3e-3, user_lr=1e-2, valid=str(toy / "valid.jsonl")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.05, (first, last)
    assert set(summary["groups"]) == {"long", "short", "unseen"}
    for name in ("args.json", "config.json", "model.safetensors", "user_model.json", "tokenizer.json", "eval.json"):
        assert (out / name).is_file(), name


def test_resume_equals_uninterrupted(toy, tmp_path, monkeypatch):
    kw = dict(max_steps=8, save_every=1, lora_r=0, user_lr=1e-2)
    T.train(config(toy, tmp_path / "straight", **kw))
    assert train_interrupted_at(5, config(toy, tmp_path / "resumed", **kw), monkeypatch) == 130
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "state.json").read_text())["step"] == 5
    T.train(config(toy, tmp_path / "resumed", resume=True, **kw))
    a, b = trained_tensors(tmp_path / "straight"), trained_tensors(tmp_path / "resumed")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(toy, tmp_path, monkeypatch, capsys):
    real = T.pdpo_batch_loss
    calls = {"n": 0}

    def nan_on_fifth_batch(*args):
        calls["n"] += 1
        loss, m = real(*args)
        return (loss * float("nan") if calls["n"] == 5 else loss), m

    monkeypatch.setitem(T.BATCH_LOSS, "pdpo", nan_on_fifth_batch)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        T.train(config(toy, out, save_every=1))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "step 2" in err  # batches 1-4 are steps 0-1 with grad_accum 2
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in trained_tensors(out).values())


def test_sft_stage_learns_responses(toy, tmp_path):
    out = tmp_path / "sft"
    T.train(config(toy, out, stage="sft", sft_on="both", max_steps=25, lr=3e-3))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert not (out / "user_model.json").exists()  # SFT is not personalized


def test_prm_stage_runs_and_saves_head(toy, tmp_path):
    out = tmp_path / "prm"
    summary = T.train(config(toy, out, stage="prm", max_steps=4, valid=str(toy / "valid.jsonl")))
    assert (out / "reward_head.safetensors").is_file()
    assert runs.load_run(out).reward_head is not None
    assert sum(g["pairs"] for g in summary["groups"].values()) > 0


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_names_paper_symbols():
    r = run_cli("--help")
    assert r.returncode == 0
    for text in ("--alpha", "alpha", "--beta", "--n-user-tokens", "T_u", "--resume", "--lora-r"):
        assert text in r.stdout, text


def test_bad_data_fails_fast_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "a", "prompt": "p", "chosen": "c", "rejected": "r"}\n{"user": "a", "prompt": 3}\n')
    r = run_cli("--model", str(tmp_path / "no-such-model"), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}:2:" in lines[0], r.stderr


@pytest.mark.parametrize("stage", ["pdpo", "prm"])
def test_alpha_zero_trains_the_generic_term_alone(toy, tmp_path, stage):
    out = tmp_path / stage
    T.train(config(toy, out, stage=stage, alpha=0.0, max_steps=2))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["accuracy"] <= 1 for r in rows)


# ----------------------------------------------------------------------------------------------
# Errors for people: one line naming the file or flag, exit code 2, no traceback


def one_line_error(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return lines[0]


def test_invalid_utf8_names_file_and_line(toy, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    good = '{"user": "a", "prompt": "p", "chosen": "c", "rejected": "r"}\n'
    bad.write_bytes(good.encode() + b'{"user": "a", "prompt": "caf\xe9", "chosen": "c", "rejected": "r"}\n')
    line = one_line_error(run_cli("--model", str(toy / "base"), "--data", str(bad), "--out", str(tmp_path / "o")))
    assert f"{bad}:2:" in line and "UTF-8" in line and "0xe9" in line, line


def test_truncated_checkpoint_names_the_file(toy, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (toy / "base").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut in the middle
    line = one_line_error(run_cli("--model", str(broken), "--data", str(toy / "train.jsonl"),
                                  "--out", str(tmp_path / "o"), "--max-steps", "1", "--quiet"))
    assert str(weights) in line and "truncated or corrupt" in line, line


def test_missing_data_file_names_the_flag(toy, tmp_path):
    line = one_line_error(run_cli("--model", str(toy / "base"), "--data", str(tmp_path / "nope.jsonl"),
                                  "--out", str(tmp_path / "o")))
    assert f"--data {tmp_path / 'nope.jsonl'}: no such file" in line, line


def test_corrupt_checkpoint_on_resume_names_the_file(toy, tmp_path):
    out = tmp_path / "run"
    T.train(config(toy, out, max_steps=2))
    (out / "checkpoint" / "optimizer.safetensors").write_bytes(b"\x00" * 10)
    args = ["--model", str(toy / "base"), "--data", str(toy / "train.jsonl"), "--out", str(out), "--max-steps", "4",
            "--batch-size", "4", "--grad-accum", "2", "--beta", "0.1", "--max-length", "96",
            "--max-prompt-length", "32", "--quiet", "--resume"]
    line = one_line_error(run_cli(*args))
    assert str(out / "checkpoint" / "optimizer.safetensors") in line, line


@pytest.mark.parametrize("flags, expected", [
    (["--alpha", "1.5"], "--alpha 1.5"),
    (["--beta", "0"], "--beta 0.0"),
    (["--user-info", "explicit"], "--user-info explicit"),  # individual model, alpha 0.5: both inert
    (["--user-info", "explicit", "--user-model", "uniform"], "--alpha 0.5"),
])
def test_config_errors_come_before_anything_is_loaded(tmp_path, flags, expected):
    out = tmp_path / "o"
    line = one_line_error(run_cli("--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.jsonl"),
                                  "--out", str(out), *flags))
    assert expected in line, line
    assert not out.exists()  # nothing written


def test_explicit_user_info_trains_with_the_uniform_model(toy, tmp_path):
    out = tmp_path / "explicit"
    T.train(config(toy, out, user_info="explicit", user_model="uniform", alpha=1.0, max_steps=2))
    assert json.loads((out / "user_model.json").read_text())["n_user_tokens"] == 0  # T_u = 0: the text alone


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_is_bf16_only_where_bf16_is_native(toy, tmp_path, monkeypatch, native):
    """--precision auto: fp32 on a CPU that emulates bf16 (13x slower per step on an AVX2 EPYC), bf16 where it is
    native; the outcome, not "auto", is what args.json keeps. Explicit choices pass through untouched."""
    monkeypatch.setattr(runs, "native_bf16", lambda device: native)
    want = "bf16" if native else "fp32"
    assert runs.pick_precision("auto", "cpu") == want
    assert [runs.pick_precision(p, "cpu") for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    T.train(config(toy, tmp_path / "run", precision="auto", max_steps=1))
    assert json.loads((tmp_path / "run" / "args.json").read_text())["precision"] == want


def test_generic_delay_trains_the_personalized_term_alone_first(toy, tmp_path):
    """--generic-delay 0.5 over 4 steps (beyond the paper): alpha = 1 at steps 0 and 1, so eq. (pdpo)'s generic
    term is off, then the paper's alpha; the alpha each step used is in metrics.jsonl."""
    cfg = config(toy, tmp_path / "run", alpha=0.5, generic_delay=0.5, max_steps=4)
    assert [T.get_alpha(step, 4, cfg.generic_delay, cfg.alpha) for step in range(4)] == [1.0, 1.0, 0.5, 0.5]
    T.train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["alpha"] for r in rows] == [1.0, 1.0, 0.5, 0.5]
    assert [T.get_alpha(s, 10, config(toy, tmp_path / "p").generic_delay, 0.5) for s in (0, 9)] == [0.5, 0.5]  # off by default
    with pytest.raises(ValueError, match="--generic-delay 1.0"):
        config(toy, tmp_path / "x", generic_delay=1.0)
