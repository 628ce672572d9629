"""A careless user's inputs to the commands that read runs (issue 34): eval.py, eval.py generate, adapt.py,
adapt.py users and python -m examples.toy --curve. Every numeric flag given bad values is refused where it is
parsed, in one line naming the flag and what it accepts, exit code 2; adapt.py writes its new user all or nothing
(into the run, or into a copy with --out); eval.py says what it did: the precision it scored in, every file it
wrote, a user it does not know and the closest known ones, a prompt that was not there.

The converters, data.py check and export.py: tests/test_careless.py. Last, docs/huggingface.md's full fine-tuning
run: export writes its users, and the page's code answers as eval.py does.
"""
import dataclasses
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import adapt as A
import cli
import data
import eval as E
import export
import model as lm
import prlhf
import runs as R
import train as T
from examples import toy as toy_tasks
from tests.helpers import toy_setup
from tests.hf_models import redraw_parameters_
from tests.test_careless import files_under, one_line_error


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny P-DPO run (individual user model, T_u = 2) of a toy task, trained for a few steps from a random
    base: enough to open, score, generate from and adapt, not to be good."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    d = toy_setup(tmp_path_factory.mktemp("careless_runs"), pairs_per_user=8, n_valid_per_user=2, n_unseen_users=1)
    T.train(T.TrainConfig(stage="pdpo", model=str(d / "base"), data=str(d / "train.jsonl"), out=str(d / "pdpo"),
                          quiet=True, batch_size=8, grad_accum=1, warmup_steps=1, max_steps=2, max_length=64,
                          max_prompt_length=16, n_user_tokens=2, lr=1e-3, user_lr=0.1))
    data_file = d / "newcomer.jsonl"
    fit, _ = toy_tasks.toy_user_pairs("newcomer", 8, 1, seed=1000)
    data.write_pairs(data_file, fit)
    yield d
    torch.set_num_threads(previous_threads)


# ----------------------------------------------------------------------------------------------
# Numeric flags: refused where parsed, one line naming the flag and what it accepts

BAD = {
    "an integer >= 1": ["0", "-1", "2.5", "1e3", "nan", "inf", "ten", ""],
    "an integer >= 0": ["-1", "-0.5", "0.5", "nan", "-inf", "seven", ""],
    "a number >= 0": ["-1", "-1e-9", "nan", "inf", "-inf", "hot", ""],
    "a number > 0": ["0", "-0.05", "nan", "inf", "1e400", "fast", ""],
    "a number > 0 and <= 1": ["0", "-0.2", "1.5", "1.0000001", "nan", "inf", "90%", ""],
}
# (command, argv before the flag, flag, what it accepts); the run need not exist: flags are checked first
EVAL, GENERATE = ["RUN", "--data", "d.jsonl"], ["generate", "RUN", "--user", "u", "--prompt", "p"]
ADAPT = ["RUN", "--user", "u", "--data", "d.jsonl"]
FLAGS = [(E.main, EVAL, flag, accepts) for flag, accepts in (
             ("--temperature", "a number >= 0"), ("--top-p", "a number > 0 and <= 1"),
             ("--max-new-tokens", "an integer >= 1"), ("--samples-per-user", "an integer >= 0"),
             ("--batch-size", "an integer >= 1"), ("--repetition-penalty", "a number > 0"),
             ("--no-repeat-ngram-size", "an integer >= 0"), ("--min-new-tokens", "an integer >= 0"),
             ("--seed", "an integer >= 0"))] + \
        [(E.main, GENERATE, flag, accepts) for flag, accepts in (
             ("--temperature", "a number >= 0"), ("--top-p", "a number > 0 and <= 1"),
             ("--max-new-tokens", "an integer >= 1"), ("--seed", "an integer >= 0"))] + \
        [(A.main, ADAPT, flag, accepts) for flag, accepts in (
             ("--steps", "an integer >= 1"), ("--lr", "a number > 0"), ("--batch-size", "an integer >= 1"),
             ("--seed", "an integer >= 0"))] + \
        [(A.main, ["users", "RUN"], "--neighbours", "an integer >= 1")]
CASES = [pytest.param(main, argv, flag, accepts, bad, id=f"{main.__module__}-{argv[0]}{flag}={bad}")
         for main, argv, flag, accepts in FLAGS for bad in BAD[accepts]]


@pytest.mark.parametrize("main, argv, flag, accepts, bad", CASES)
def test_a_bad_value_is_one_line_naming_the_flag(main, argv, flag, accepts, bad, capsys):
    err = one_line_error(main, [*argv, f"{flag}={bad}"], capsys)  # "--lr -1e-9" would read -1e-9 as a flag
    assert err == f"error: argument {flag}: got {bad!r}, expected {accepts} (see {err.rsplit('(see ', 1)[1]}", err


@pytest.mark.parametrize("parser", [E.evaluate_parser, E.generate_parser, A.adapt_parser, A.users_parser])
def test_every_numeric_flag_is_checked_and_its_help_gives_the_range(parser):
    checked = set()
    for action in parser()._actions:
        assert action.type not in (int, float), action.option_strings  # a bare int() or float() takes -1, nan
        if isinstance(action.type, cli.Number):
            assert str(action.type) in action.help % {"default": action.default}, action.option_strings
            checked.add((action.option_strings[0], str(action.type)))
    prog = parser().prog
    listed = {(flag, accepts) for main, argv, flag, accepts in FLAGS if prog == {
        (E.main, "RUN"): "eval.py", (E.main, "generate"): "eval.py generate", (A.main, "RUN"): "adapt.py",
        (A.main, "users"): "adapt.py users"}[main, argv[0]]}
    assert checked == listed  # the bad-value matrix above covers every numeric flag


def test_min_new_tokens_above_max_new_tokens_is_refused(capsys):
    err = one_line_error(E.main, [*EVAL, "--max-new-tokens", "8", "--min-new-tokens", "9"], capsys)
    assert err.startswith("error: argument --min-new-tokens: got 9, expected at most --max-new-tokens (8)"), err


def test_toy_curve_refuses_bad_steps_and_lr(capsys):
    for flag, bad in (("--steps", "0"), ("--lr", "nan"), ("--seed", "-1"), ("--held-out", "0")):
        err = one_line_error(toy_tasks.main, ["--curve", "RUN", flag, bad], capsys)
        assert err.startswith(f"error: argument {flag}: got {bad!r}, expected ") and "examples.toy --help" in err, err


@pytest.mark.parametrize("held_out", ["0", "-1"])
def test_toy_curve_with_no_held_out_pairs_is_one_line(run, tmp_path, capsys, held_out):
    run_dir = copy_of(run, tmp_path)
    before = files_under(run_dir)
    err = one_line_error(toy_tasks.main, ["--curve", run_dir, f"--held-out={held_out}", "--steps", "1", "--quiet"],
                         capsys)
    assert err.startswith("error: argument --held-out: got") and "expected an integer >= 1" in err, err
    assert files_under(run_dir) == before


def test_valid_values_at_the_edges_are_accepted():
    args = E.parse_evaluate_args([*EVAL, "--temperature", "0", "--top-p", "1", "--max-new-tokens", "1",
                                  "--samples-per-user", "0", "--min-new-tokens", "1", "--repetition-penalty", "0.5"])
    assert (args.temperature, args.top_p, args.max_new_tokens, args.min_new_tokens) == (0.0, 1.0, 1, 1)
    assert (args.samples_per_user, args.repetition_penalty, args.dtype) == (0, 0.5, None)


# ----------------------------------------------------------------------------------------------
# adapt.py: all or nothing, says it changes the run, --out for a copy


def copy_of(run, tmp_path) -> Path:
    import shutil

    target = tmp_path / "run"
    shutil.copytree(run / "pdpo", target, ignore=shutil.ignore_patterns("checkpoint"))
    return target


def adapt_argv(run, run_dir, *extra):
    return [str(run_dir), "--user", "newcomer", "--data", str(run / "newcomer.jsonl"), "--steps", "2", "--quiet",
            *map(str, extra)]


def broken_fit(*args, **kwargs):
    raise RuntimeError("out of memory, half-way")


def disk_full(directory, user_model, registry, save=prlhf.save_user_model):
    """The user model's files written but users.json, then a failure."""
    save(directory, user_model, registry)
    (Path(directory) / "users.json").unlink()
    raise OSError(28, "No space left on device, half-way")


@pytest.mark.parametrize("module, name, broken", [(A, "fit_user_row", broken_fit),
                                                  (prlhf, "save_user_model", disk_full)], ids=["fit", "save"])
def test_adapt_failing_half_way_leaves_the_run_byte_identical(run, tmp_path, monkeypatch, module, name, broken):
    run_dir = copy_of(run, tmp_path)
    before = files_under(run_dir)
    monkeypatch.setattr(module, name, broken)
    with pytest.raises((RuntimeError, OSError), match="half-way"):
        A.main(adapt_argv(run, run_dir))
    assert files_under(run_dir) == before


def test_adapt_curve_failing_half_way_leaves_the_run_byte_identical(run, tmp_path, monkeypatch):
    run_dir = copy_of(run, tmp_path)
    before = files_under(run_dir)

    def broken_plot(points, name, file):
        file.write_bytes(b"half a png")
        raise RuntimeError("matplotlib broke, half-way")

    monkeypatch.setattr(A, "plot_curve", broken_plot)
    with pytest.raises(RuntimeError, match="half-way"):
        A.main(adapt_argv(run, run_dir, "--curve"))
    assert files_under(run_dir) == before


def test_adapt_steps_zero_is_refused_before_any_write(run, tmp_path, capsys):
    run_dir = copy_of(run, tmp_path)
    before = files_under(run_dir)
    err = one_line_error(A.main, adapt_argv(run, run_dir, "--steps", "0"), capsys)
    assert "argument --steps: got '0', expected an integer >= 1" in err
    with pytest.raises(ValueError, match="steps and batch size must be >= 1"):  # the function refuses it too
        A.adapt_user(run_dir, "newcomer", run / "newcomer.jsonl", steps=0)
    assert files_under(run_dir) == before


def test_adapt_says_it_changed_the_run_and_a_second_time_what_to_do(run, tmp_path, capsys):
    run_dir = copy_of(run, tmp_path)
    A.main(adapt_argv(run, run_dir))
    out = capsys.readouterr().out
    assert f"changed {run_dir}: rewrote user_model.safetensors, user_model.json, users.json" in out
    assert "--out NEW_RUN saves into a copy instead" in out
    assert prlhf.load_user_model(run_dir)[1].users[-1] == "newcomer"
    adapted = files_under(run_dir)
    err = one_line_error(A.main, adapt_argv(run, run_dir), capsys)
    assert f"{run_dir / 'users.json'}: user 'newcomer' is already known to this run (row 5" in err
    assert "give another --user name, or adapt a run without them with --out NEW_RUN" in err
    assert files_under(run_dir) == adapted


def test_adapt_out_leaves_the_run_and_the_copy_serves_the_new_user(run, tmp_path, capsys):
    run_dir, new = copy_of(run, tmp_path), tmp_path / "with-newcomer"
    before = files_under(run_dir)
    A.main(adapt_argv(run, run_dir, "--out", new))
    out = capsys.readouterr().out
    assert f"wrote {new}: a copy of {run_dir}" in out and f"{run_dir} is unchanged" in out
    assert files_under(run_dir) == before
    assert prlhf.load_user_model(new)[1].users == prlhf.load_user_model(run_dir)[1].users + ["newcomer"]
    assert os.stat(new / "model.safetensors").st_ino == os.stat(run_dir / "model.safetensors").st_ino  # linked
    assert os.stat(new / "users.json").st_ino != os.stat(run_dir / "users.json").st_ino
    copied = {name for name in files_under(new)}
    assert copied == {name for name in before} and not list(tmp_path.glob(".*"))  # no temporary left
    E.main(["generate", str(new), "--user", "newcomer", "--prompt", " Describe the apple.", "--max-new-tokens", "3",
            "--strict"])
    captured = capsys.readouterr()
    assert captured.out.startswith("[newcomer] ") and captured.err == ""  # known there, not given e_0


@pytest.mark.parametrize("where", ["not empty", "inside the run"])
def test_adapt_out_refuses_a_place_it_would_merge_into(run, tmp_path, capsys, where):
    run_dir = copy_of(run, tmp_path)
    before = files_under(run_dir)
    new = run_dir / "copy" if where == "inside the run" else tmp_path / "taken"
    if where == "not empty":
        new.mkdir()
        (new / "notes.txt").write_text("mine")
    err = one_line_error(A.main, adapt_argv(run, run_dir, "--out", new), capsys)
    assert f"--out {new}: {where}" in err
    assert files_under(run_dir) == before and (where != "not empty" or (new / "notes.txt").read_text() == "mine")


def test_adapt_out_failing_half_way_leaves_no_copy(run, tmp_path, monkeypatch):
    run_dir, new = copy_of(run, tmp_path), tmp_path / "deep" / "with-newcomer"
    before = files_under(run_dir)
    monkeypatch.setattr(prlhf, "save_user_model", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError):
        A.main(adapt_argv(run, run_dir, "--out", new))
    assert files_under(run_dir) == before and not (tmp_path / "deep").exists()


def test_adapt_curve_lists_what_it_wrote(run, tmp_path, capsys, monkeypatch):
    run_dir = copy_of(run, tmp_path)
    A.main(adapt_argv(run, run_dir, "--curve"))
    out = capsys.readouterr().out.splitlines()
    assert f"wrote {run_dir / 'adapt_curve.json'}" in out and f"wrote {run_dir / 'adapt_curve.png'}" in out
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    A.main(adapt_argv(run, run_dir, "--curve"))
    out = capsys.readouterr().out
    assert "plots skipped: matplotlib is not installed (pip install matplotlib" in out and ".png" not in out


# ----------------------------------------------------------------------------------------------
# eval.py generate: nothing to answer, unknown users


@pytest.mark.parametrize("stdin, argv", [("", []), ("\n  \n\n", []), ("ignored\n", ["--prompt", "  "])])
def test_generate_with_nothing_to_answer_says_so(run, capsys, monkeypatch, stdin, argv):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    err = one_line_error(E.main, ["generate", str(run / "pdpo"), "--user", "user_01", *argv], capsys)
    assert "no prompt to answer" in err or "--prompt is empty" in err, err


def test_an_unknown_user_is_told_the_closest_known_ids(run, capsys):
    E.main(["generate", str(run / "pdpo"), "--user", "user_1", "--prompt", " Describe the apple.",
            "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert captured.out.startswith("[user_1, unseen: e_0] ")
    [line] = captured.err.splitlines()
    assert line.startswith(f"warning: 'user_1' is not a user of {run / 'pdpo'}: answered with the generic embedding "
                           f"e_0; closest known users: user_01"), line
    err = one_line_error(E.main, ["generate", str(run / "pdpo"), "--user", "user_01", "--user", "user_1",
                                  "--prompt", "x", "--strict"], capsys)
    assert "'user_1' is not a user of" in err and "refused (--strict); closest known users: user_01" in err


# ----------------------------------------------------------------------------------------------
# eval.py RUN: the precision the run trained in, every file written


@pytest.mark.parametrize("trained, native, choice, expected", [
    ("fp32", True, None, "fp32"), ("bf16", True, None, "bf16"), ("bf16", False, None, "fp32"),
    ("fp16", False, None, "fp32"), (None, True, None, "fp32"), ("fp32", True, "bf16", "bf16"),
    ("bf16", True, "fp32", "fp32"), ("fp32", True, "auto", "bf16"), ("fp32", False, "auto", "fp32")])
def test_the_run_is_scored_in_the_precision_it_trained_in(tmp_path, monkeypatch, trained, native, choice, expected):
    (tmp_path / "args.json").write_text(json.dumps({"stage": "pdpo"} | ({"precision": trained} if trained else {})))
    monkeypatch.setattr(R, "native_bf16", lambda device: native)
    dtype, why = R.run_dtype(tmp_path, choice, "cpu")
    assert dtype == expected and (choice is None) == ("--dtype to choose" in why), why


def test_eval_failing_half_way_leaves_the_run_byte_identical(run, tmp_path, monkeypatch):
    """The report goes into the run by default: results.json and generations.jsonl written, then a plot fails."""
    run_dir = copy_of(run, tmp_path)
    E.main([str(run_dir), "--data", str(run / "valid.jsonl"), "--samples-per-user", "0", "--quiet"])  # a report
    before = files_under(run_dir)

    def broken_plots(*args, **kwargs):
        raise RuntimeError("matplotlib broke, half-way")

    monkeypatch.setattr(E.report, "write_plots", broken_plots)
    with pytest.raises(RuntimeError, match="half-way"):
        E.main([str(run_dir), "--data", str(run / "valid.jsonl"), "--samples-per-user", "1", "--max-new-tokens", "2",
                "--quiet"])
    assert files_under(run_dir) == before


def test_eval_out_that_is_a_file_is_one_line(run, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    err = one_line_error(E.main, [run / "pdpo", "--data", run / "valid.jsonl", "--out", taken], capsys)
    assert err == f"error: {taken}: exists and is not a directory; give a directory to write into"
    assert taken.read_text() == "mine"


def test_eval_says_its_precision_and_lists_every_file_it_wrote(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    E.main([str(run / "pdpo"), "--data", str(run / "valid.jsonl"), "--out", str(out), "--samples-per-user", "1",
            "--max-new-tokens", "2", "--quiet"])
    captured = capsys.readouterr()
    assert "note: run pdpo scored in fp32: the precision it trained in (args.json 'precision'" in captured.err
    listed = {line.removeprefix("wrote ") for line in captured.out.splitlines() if line.startswith("wrote ")}
    assert listed == {str(p) for p in out.iterdir()} and any(p.endswith(".png") for p in listed), listed
    assert json.loads((out / "results.json").read_text())["pdpo"]["dtype"] == "fp32"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    bare = tmp_path / "bare"
    E.main([str(run / "pdpo"), "--data", str(run / "valid.jsonl"), "--out", str(bare), "--samples-per-user", "0",
            "--quiet", "--dtype", "fp32"])
    printed = capsys.readouterr()
    listed = {line.removeprefix("wrote ") for line in printed.out.splitlines() if line.startswith("wrote ")}
    assert listed == {str(p) for p in bare.iterdir()} and not any(p.endswith(".png") for p in listed)
    assert "plots skipped: matplotlib is not installed (pip install matplotlib, then run this command again)" \
        in printed.out
    assert "note: run pdpo scored in fp32: --dtype fp32" in printed.err


# ----------------------------------------------------------------------------------------------
# docs/huggingface.md, "A full fine-tuning run": export writes the users, the page's code answers as eval.py does


def test_a_full_run_exports_its_users_and_the_page_answers_as_eval_does(run, tmp_path):
    """On a copy of the run with every weight and user row redrawn (std 0.2 and 1): a few steps from a random base
    answer every user alike, and a misplaced row must change the answers."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    full, out = copy_of(run, tmp_path), tmp_path / "hf"
    lm.save_pretrained(redraw_parameters_(R.load_base(full, torch.float32, "cpu"), 0.2), full)
    user_model, registry = prlhf.load_user_model(full)
    prlhf.save_user_model(full, redraw_parameters_(user_model, 1.0), registry)
    notes = export.export_run(full, out)
    names = {p.name for p in out.iterdir()}
    assert {export.USER_EMBEDDINGS, export.USER_ROWS, "tokenizer.json"} <= names and export.ADAPTER_WEIGHTS not in names
    assert f"{full} is a full fine-tuning run: the model is {full} itself" in notes[0]
    page = (Path(__file__).resolve().parents[1] / "docs" / "huggingface.md").read_text()
    first, swap = re.findall(r"```python\n(.*?)```", page, re.S)[:2]
    paths, model_line = swap.splitlines()[:2]  # the two lines the page swaps in
    assert paths.startswith("BASE, OUT = ") and model_line.startswith("model = ")
    code = [f"BASE, OUT = {str(full)!r}, {str(out)!r}" if line.startswith("BASE, OUT = ") else
            model_line if line.startswith("model = ") else line
            for line in first.splitlines() if not line.startswith("print(answer(")]
    page_ns = {}
    exec("\n".join(code), page_ns)
    opened = R.open_run(full, torch.float32, "cpu")
    pairs = [data.Pair(u, "Tell me about the kettle.", "a", "b") for u in ("user_01", "someone unseen")]
    ours = E.generate_responses(opened.model, opened.user_model, opened.registry, opened.tokenizer,
                                R.tokenize(opened, pairs), max_new_tokens=12)
    assert ours[0]["response"] != ours[1]["response"]  # user_01's row is not e_0: the rows matter
    for pair, mine in zip(pairs, ours):
        assert mine["response_tokens"] >= 3, mine
        assert page_ns["answer"](pair.user, pair.prompt, max_new_tokens=12) == mine["response"], pair.user


# ----------------------------------------------------------------------------------------------
# train.py: every numeric flag checked where parsed (TrainConfig.FLAG_RANGES and PDPOConfig's own checks)

TRAIN_BAD = [("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--user-lr", "-1"), ("--weight-decay", "-0.1"),
             ("--warmup-steps", "-5"), ("--epochs", "0"), ("--epochs", "inf"), ("--max-steps", "-3"),
             ("--batch-size", "0"), ("--grad-accum", "0"), ("--grad-clip", "-1"), ("--max-length", "0"),
             ("--max-prompt-length", "0"), ("--lora-r", "-1"), ("--lora-alpha", "0"), ("--lora-dropout", "1.5"),
             ("--seed", "-1"), ("--eval-every", "-1"), ("--save-every", "-2"), ("--log-every", "0"),
             ("--user-init-range", "-1"), ("--user-init-range", "nan"), ("--alpha", "nan"), ("--beta", "inf"),
             ("--n-user-tokens", "-1"), ("--generic-delay", "nan"), ("--nll-weight", "-1"), ("--label-smoothing", "0.7")]


@pytest.mark.parametrize("flag, bad", TRAIN_BAD)
def test_train_refuses_a_bad_value_in_one_line_naming_the_flag(flag, bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        T.main(["--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "run"),
                f"{flag}={bad}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith(f"error: {flag} "), err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_every_numeric_train_flag_has_a_range():
    numeric = {f.name for f in dataclasses.fields(T.TrainConfig) if type(f.default) in (int, float)}
    own = numeric - {f.name for f in dataclasses.fields(prlhf.PDPOConfig)}
    assert own == set(T.FLAG_RANGES), own ^ set(T.FLAG_RANGES)
