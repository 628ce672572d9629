"""A careless user's inputs to data.py check, export.py and prepare/*.py (issue 34): every numeric flag given bad
values, and damaged input files. Each is one line on stderr naming the flag, file, line or field and what would be
accepted, exit code 2, and every file the command could write is left exactly as it was.

data.py check and export.py take no numeric flags; their damaged inputs are here. export's half-way failures are
in tests/test_export.py, accepted byte-order marks and CRLF in tests/test_data.py.
"""
import json
import shutil
from pathlib import Path

import pytest

import data
import export
import prlhf
import runs
from prepare import prism, psoups, tldr
from tests.test_data import GOOD, save_as, tldr_record, write_psoups_fixture
from tests.test_prism import write_prism

CONVERTERS = {"tldr": tldr.main, "psoups": psoups.main, "prism": prism.main}
# every numeric flag of the converters, with what it accepts, as its --help and its errors say
FLAGS = [("tldr", "--n-users", "an integer >= 1"), ("tldr", "--p-long", "a number from 0 to 1"),
         ("tldr", "--seed", "an integer >= 0"), ("psoups", "--seed", "an integer >= 0"),
         ("prism", "--max-prompt-chars", "an integer >= 1"), ("prism", "--seed", "an integer >= 0")]
BAD_VALUES = {
    "an integer >= 1": ["0", "-1", "2.5", "1e3", "nan", "inf", "ten", "", " "],
    "an integer >= 0": ["-1", "-0.5", "0.5", "nan", "-inf", "0x10", "seven", ""],
    "a number from 0 to 1": ["-0.1", "1.5", "-1e-9", "1.0000001", "nan", "inf", "-inf", "1e400", "70%", "0,5", ""],
}


def files_under(root) -> dict:
    """Every path under root -> its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(Path(root).rglob("*"))}


def one_line_error(main, argv, capsys) -> str:
    """main(argv)'s message, after checking it refused: exit code 2, nothing on stdout, one line on stderr."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), (code, out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def converter_argv(command, d: Path) -> list:
    """Arguments of a converter that would be accepted, on inputs in d, writing into d/out."""
    return {"tldr": ["--comparisons", d / "comparisons.jsonl", "--out", d / "out"],
            "psoups": ["--dir", d / "rm_training", "--out", d / "out"],
            "prism": ["--dir", d / "prism", "--out", d / "out"]}[command]


def converter_inputs(command, d: Path) -> None:
    """Good inputs for `command` in d, and an earlier output d/out that a refused command must leave alone."""
    if command == "tldr":
        records = [tldr_record(f"w{k % 3}", "train", k) for k in range(9)] + [tldr_record("w0", "valid1", 99)]
        (d / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    elif command == "psoups":
        write_psoups_fixture(d / "rm_training")
    else:
        write_prism(d / "prism")
    (d / "out").mkdir()
    (d / "out" / "train.jsonl").write_text(GOOD + "\n")


# ------------------------------------------------------------------------------------------------
# Numeric flags


@pytest.mark.parametrize("command, flag, accepted, value",
                         [(c, f, a, v) for c, f, a in FLAGS for v in BAD_VALUES[a]])
def test_a_bad_number_names_the_flag_and_its_range(tmp_path, capsys, command, flag, accepted, value):
    converter_inputs(command, tmp_path)
    before = files_under(tmp_path)
    err = one_line_error(CONVERTERS[command], converter_argv(command, tmp_path) + [f"{flag}={value}"], capsys)
    assert err == f"error: argument {flag}: got {value!r}, expected {accepted} (see python -m prepare.{command} --help)"
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("command, flag, accepted", FLAGS)
def test_help_gives_each_range(capsys, command, flag, accepted):
    with pytest.raises(SystemExit) as exit_info:
        CONVERTERS[command](["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"{flag} {flag[2:].upper().replace('-', '_')} " in text and accepted in text


@pytest.mark.parametrize("command, argv", [
    ("tldr", ["--n-users", "1", "--p-long", "0", "--seed", "0"]), ("tldr", ["--p-long", "1", "--seed", "12345678901"]),
    ("psoups", ["--seed", "0"]), ("prism", ["--max-prompt-chars", "1", "--seed", "0"])])
def test_the_ends_of_each_range_are_accepted(tmp_path, capsys, command, argv):
    converter_inputs(command, tmp_path)
    assert CONVERTERS[command]([str(a) for a in converter_argv(command, tmp_path)] + argv) == 0
    assert data.read_pairs(tmp_path / "out" / "train.jsonl")


def test_other_argument_errors_are_one_line_too(tmp_path, capsys):
    err = one_line_error(tldr.main, ["--comparisons", tmp_path / "c.jsonl"], capsys)
    assert err == "error: the following arguments are required: --out (see python -m prepare.tldr --help)"
    err = one_line_error(prism.main, ["--dir", tmp_path, "--out", tmp_path, "--stated-prefs", "best"], capsys)
    assert err.startswith("error: argument --stated-prefs: invalid choice: 'best' (choose from ")
    assert one_line_error(data.main, ["chek", "x.jsonl"], capsys).startswith("error: argument command: invalid choice")
    err = one_line_error(export.main, [tmp_path], capsys)
    assert err == "error: the following arguments are required: out (see export.py --help)"


# ------------------------------------------------------------------------------------------------
# Damaged inputs: (name, how to damage the file, the message with {file})

INVALID_UTF8 = GOOD.encode() + b"\n" + b'{"user": "\xff\xfe", "prompt": "p", "chosen": "c", "rejected": "r"}\n'
PAIRS_DAMAGE = [
    ("empty file", "", "{file}: no pairs found (the file is empty or has only blank lines)"),
    ("only blank CRLF lines", "\r\n  \r\n", "{file}: no pairs found (the file is empty or has only blank lines)"),
    ("a directory", None, "{file}: is a directory, expected a file"),
    ("missing", "missing", "{file}: file not found"),
    ("a missing field", '{"user": "u", "prompt": "p", "chosen": "c"}\n', "{file}:1: missing field 'rejected'"),
    ("a wrong type", GOOD + '\n{"user": "u", "prompt": 7, "chosen": "c", "rejected": "r"}\n',
     "{file}:2: field 'prompt' must be a string, got number"),
    ("invalid UTF-8", INVALID_UTF8, "{file}:2: not valid UTF-8 (byte 0xff at column 11); save the file as UTF-8"),
    ("invalid UTF-8 after a BOM", b"\xef\xbb\xbf" + INVALID_UTF8[len(GOOD) + 1:],
     "{file}:1: not valid UTF-8 (byte 0xff at column 11)"),
    ("cut mid-line", GOOD + '\n{"user": "u", "prom',
     "{file}:2: not valid JSON (Unterminated string starting at: column 15); each line must hold one complete JSON "
     "object"),
    ("a list, not an object", '["u", "p", "c", "r"]\n', "{file}:1: expected a JSON object {{...}}, got a list"),
]


def damage(file: Path, content) -> None:
    """Make `file` as a damage case says: text or bytes, None for a directory, "missing" for no file."""
    if file.is_dir():
        shutil.rmtree(file)
    elif file.exists():
        file.unlink()
    if content is None:
        file.mkdir()
    elif content != "missing":
        file.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.parametrize("name, content, expected", PAIRS_DAMAGE, ids=[c[0] for c in PAIRS_DAMAGE])
def test_check_damaged_files(tmp_path, capsys, name, content, expected):
    file = tmp_path / "pairs.jsonl"
    damage(file, content)
    err = one_line_error(data.main, ["check", file], capsys)
    assert err.startswith("error: " + expected.format(file=file)), err


TLDR_DAMAGE = [
    ("empty file", "", "{file}: no comparison records found (the file is empty or has only blank lines)"),
    ("a directory", None, "{file}: is a directory, expected a file"),
    ("missing", "missing", "{file}: file not found"),
    ("a missing field", json.dumps({k: v for k, v in tldr_record("w0", "train", 0).items() if k != "worker"}) + "\n",
     "{file}:1: field 'worker' must be a string, got nothing (the field is missing)"),
    ("a wrong type", json.dumps({**tldr_record("w0", "train", 0), "info": {"post": 5}}) + "\n",
     "{file}:1: info: field 'post' must be a string or null, got number"),
    ("three summaries", json.dumps({**tldr_record("w0", "train", 0), "summaries": [{"text": "a"}] * 3}) + "\n",
     "{file}:1: field 'summaries' must be a list of two objects with 'text' and 'policy'"),
    ("invalid UTF-8", b'{"worker": "\xe9"}\n', "{file}:1: not valid UTF-8 (byte 0xe9 at column 13)"),
]
PSOUPS_DAMAGE = [
    ("empty file", "", "{file}: no records found (the file is empty or has only blank lines)"),
    ("an empty list", "[]", "{file}: expected a JSON list of records, got an empty list"),
    ("a directory", None, "{file}: is a directory, expected a file"),
    ("missing", "missing", "{file}: file not found (expected P1A.json .. P3B.json"),
    ("a missing field", '[{"user_input": "q", "completion_a": "a"}]',
     "{file}: record 0: needs string fields user_input, completion_a (preferred), completion_b"),
    ("a wrong type", '[\n{"user_input": "q", "completion_a": "a", "completion_b": "b"},\n'
                     '{"user_input": "q", "completion_a": "a", "completion_b": 3}]',
     "{file}: record 1: needs string fields"),
    ("invalid UTF-8", b'[\n{"user_input": "q",\n"completion_a": "\xc3\x28"}]',
     "{file}:3: not valid UTF-8 (byte 0xc3 at column 18)"),
    ("cut short", '[{"user_input": "q", "completion_a": "a",\n',
     "{file}:2: not valid JSON (Expecting property name enclosed in double quotes: column 1)"),
]
PRISM_DAMAGE = [
    ("empty survey", "survey.jsonl", "", "{file}: no survey records found"),
    ("empty conversations", "conversations.jsonl", "\n", "{file}: no conversations found"),
    ("survey a directory", "survey.jsonl", None, "{file}: is a directory, expected a file"),
    ("conversations missing", "conversations.jsonl", "missing", "{file}: file not found (expected PRISM's"),
    ("a missing field", "conversations.jsonl", '{"conversation_history": []}\n',
     "{file}:1: field 'user_id' must be a string, got nothing (the field is missing)"),
    ("a wrong type", "survey.jsonl", '{"user_id": 12}\n', "{file}:1: field 'user_id' must be a string, got number"),
    ("invalid UTF-8", "survey.jsonl", b'\n{"user_id": "\x80"}\n', "{file}:2: not valid UTF-8 (byte 0x80 at column 14)"),
]
CONVERTER_DAMAGE = ([("tldr", "comparisons.jsonl", *case) for case in TLDR_DAMAGE]
                    + [("psoups", "rm_training/P2A.json", *case) for case in PSOUPS_DAMAGE]
                    + [("prism", f"prism/{name}", case, content, expected)
                       for case, name, content, expected in PRISM_DAMAGE])


@pytest.mark.parametrize("command, name, case, content, expected", CONVERTER_DAMAGE,
                         ids=[f"{c[0]}-{c[2]}" for c in CONVERTER_DAMAGE])
def test_converters_damaged_files(tmp_path, capsys, command, name, case, content, expected):
    converter_inputs(command, tmp_path)
    damage(tmp_path / name, content)
    before = files_under(tmp_path)
    err = one_line_error(CONVERTERS[command], converter_argv(command, tmp_path), capsys)
    assert err.startswith("error: " + expected.format(file=tmp_path / name)), err
    assert files_under(tmp_path) == before


def test_a_split_that_would_be_empty_is_not_written(tmp_path, capsys):
    """Four P-SOUPS questions: a tenth of them for validation rounds to none."""
    converter_inputs("psoups", tmp_path)
    for user, sentences in psoups.PSOUPS_PREFERENCES.items():
        records = [{"user_input": f"What is {q}? {sentences[0]}", "completion_a": "a", "completion_b": "b"}
                   for q in range(4)]
        (tmp_path / "rm_training" / f"{user}.json").write_text(json.dumps(records))
    before = files_under(tmp_path)
    assert psoups.main([str(a) for a in converter_argv("psoups", tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("train 24, valid 0, questions 4, valid_questions 0")
    assert err == f"error: {tmp_path / 'out'}: nothing written, the valid split would be empty (counts above)\n"
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("command", CONVERTERS)
@pytest.mark.parametrize("out", ["a file", "below a file"])
def test_converters_out_that_cannot_be_a_directory(tmp_path, capsys, command, out):
    converter_inputs(command, tmp_path)
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").write_text("notes\n")
    argv = converter_argv(command, tmp_path)
    argv[-1] = tmp_path / "out" / "sub" if out == "below a file" else argv[-1]
    before = files_under(tmp_path)
    err = one_line_error(CONVERTERS[command], argv, capsys)
    assert err == {"a file": f"error: {tmp_path / 'out'}: exists and is not a directory; give a directory to write "
                             f"into",
                   "below a file": f"error: {argv[-1]}: cannot be written, {tmp_path / 'out'} is not a writable "
                                   f"directory"}[out]
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------------------------------------
# export.py on damaged runs


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A tiny LoRA P-DPO run (two steps), as tests/test_export.py trains one."""
    from tests.test_export import make_base, USER_MODEL
    from examples import toy as toy_tasks
    import train as T

    d = tmp_path_factory.mktemp("careless_export")
    base = make_base(d, "llama")
    train_pairs, _ = toy_tasks.make_toy_task(seed=0, n_users=3, pairs_per_user=4, n_valid_per_user=1, n_unseen_users=1)
    data.write_pairs(d / "train.jsonl", train_pairs)
    T.train(T.TrainConfig(stage="pdpo", model=str(base), data=str(d / "train.jsonl"), out=str(d / "run"), quiet=True,
                          batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=0, max_steps=2, max_length=64,
                          max_prompt_length=32, lora_r=4, lora_alpha=8.0, user_model=USER_MODEL["llama"],
                          n_user_tokens=2))
    return d / "run"


def edit_args(**fields):
    """A damage that rewrites args.json with `fields` changed (a value of ... removes the field)."""
    def apply(run: Path):
        args = {k: v for k, v in {**runs.read_json(run / "args.json"), **fields}.items() if v is not ...}
        (run / "args.json").write_text(json.dumps(args))
    return apply


def write_to(name, content):
    return lambda run: damage(run / name, content)


EXPORT_DAMAGE = [
    ("args.json empty", write_to("args.json", ""), "{run}/args.json: empty file, expected JSON"),
    ("args.json invalid UTF-8", write_to("args.json", b'{"model": "\xff"}'),
     "{run}/args.json:1: not valid UTF-8 (byte 0xff at column 12)"),
    ("args.json cut short", write_to("args.json", '{\n"model": "x",\n'), "{run}/args.json:3: not valid JSON"),
    ("args.json a list", write_to("args.json", "[]"),
     "{run}/args.json: expected a JSON object of train.py's flags, got a list"),
    ("args.json a directory", write_to("args.json", None), "{run}: not a run directory (no args.json)"),
    ("no model", edit_args(model=...), "{run}/args.json: field 'model' must be a string, got nothing"),
    ("lora_r a string", edit_args(lora_r="4"), "{run}/args.json: field 'lora_r' must be an integer >= 1, got '4'"),
    ("lora_r 0", edit_args(lora_r=0), "{run}/args.json: field 'lora_r' must be an integer >= 1, got 0"),
    ("lora_alpha true", edit_args(lora_alpha=True), "{run}/args.json: field 'lora_alpha' must be a number, got True"),
    ("base gone", edit_args(model="/nonexistent/base"),
     "{run}/args.json: its base model /nonexistent/base is not here (no config.json); the adapters only make sense "
     "on it"),
    ("adapters truncated", lambda run: (run / "adapter.safetensors").write_bytes(b"\x10\x00"),
     "{run}/adapter.safetensors: not a readable safetensors file"),
    ("tokenizer.json not JSON", write_to("tokenizer.json", "{"), "{run}/tokenizer.json: not a readable tokenizer.json"),
    ("tokenizer.json invalid UTF-8", write_to("tokenizer.json", b"{\xff}"), "{run}/tokenizer.json:1: not valid UTF-8"),
    ("user_model.json cut short", write_to("user_model.json", '{"kind": '), "{run}/user_model.json:1: not valid JSON"),
    ("users.json missing", write_to("users.json", "missing"), "{run}/users.json: missing; the run's users are kept in"),
    ("user model missing", lambda run: [damage(run / n, "missing") for n in prlhf.USER_MODEL_FILES],
     "{run}/user_model.safetensors: missing; the run's users are kept in"),
]


@pytest.mark.parametrize("case, damage_run, expected", EXPORT_DAMAGE, ids=[c[0] for c in EXPORT_DAMAGE])
def test_export_damaged_runs(lora_run, tmp_path, capsys, case, damage_run, expected):
    run = Path(shutil.copytree(lora_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint")))
    damage_run(run)
    before = files_under(tmp_path)
    err = one_line_error(export.main, [run, tmp_path / "out"], capsys)
    assert err.startswith("error: " + expected.format(run=run)), err
    assert files_under(tmp_path) == before  # the run as it was, and no OUT


def test_export_accepts_args_json_saved_with_bom_and_crlf(lora_run, tmp_path):
    run = Path(shutil.copytree(lora_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint")))
    (run / "args.json").write_text(json.dumps(runs.read_json(run / "args.json"), indent=1))
    save_as(run / "args.json", "bom+crlf")
    export.export_run(run, tmp_path / "out")
    export.export_run(lora_run, tmp_path / "plain")
    assert files_under(tmp_path / "out") == files_under(tmp_path / "plain")
