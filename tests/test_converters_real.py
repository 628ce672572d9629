"""The converters on real records: openai/summarize_from_feedback comparison lines and the P-SOUPS evaluation
prompts, read from shared/real_data beside the repository (see its SOURCES.md; never copied into the project)."""
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

import data
from data import DataError
from prepare import tldr
from prepare import psoups
from tests.test_data import WINDOWS_STYLES, save_as

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "real_data"
TLDR = REAL / "tldr"
pytestmark = pytest.mark.skipif(not TLDR.is_dir(), reason=f"no real records at {REAL.resolve()} "
                                "(shared/real_data beside the repository)")


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (TLDR / name).read_text(encoding="utf-8").splitlines()]


def both_supervised(record: dict) -> bool:
    return all("sup" in s["policy"] and "ppo" not in s["policy"] and "cnn" not in s["policy"]
               for s in record["summaries"])


@pytest.fixture
def batch18_halves(tmp_path):
    """batch18 lines 1-100 (training) and 101-200 (validation), each as its own file in tmp_path."""
    lines = (TLDR / "batch18_lines1-200.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    train, valid = tmp_path / "batch18_1-100.jsonl", tmp_path / "batch18_101-200.jsonl"
    train.write_text("".join(lines[:100]), encoding="utf-8")
    valid.write_text("".join(lines[100:]), encoding="utf-8")
    return train, valid


def test_tldr_counts_on_batch18(batch18_halves):
    train_file, valid_file = batch18_halves
    train, valid, stats = tldr.tldr_to_pairs([train_file], valid_paths=[valid_file], seed=0)
    rows = records("batch18_lines1-200.jsonl")
    usable = [sum(both_supervised(r) for r in rows[:100]), sum(both_supervised(r) for r in rows[100:])]
    assert usable == [48, 49]  # SOURCES.md: 97 of the 200 lines are supervised-vs-supervised
    assert (stats["train"], stats["valid"], stats["skipped_not_supervised"]) == (48, 49, 103)
    assert stats["skipped_equal_length"] == 0 and stats["skipped_other_split"] == 0
    workers = Counter(r["worker"] for r in rows[:100] if both_supervised(r))
    assert stats["known_users"] == len(workers) == 6  # fewer workers than --n-users 10: all are known
    unseen = {r["worker"] for r in rows[100:] if both_supervised(r)} - set(workers)
    assert stats["unseen_users"] == len(unseen) == len({p.user for p in valid if p.group.startswith("unseen-")})
    assert {p.user for p in train} == set(workers)


def test_tldr_real_pairs_keep_prompt_and_summaries(batch18_halves):
    train_file, valid_file = batch18_halves
    train, valid, _ = tldr.tldr_to_pairs([train_file], valid_paths=[valid_file], seed=0)
    rows = [r for r in records("batch18_lines1-200.jsonl") if both_supervised(r)]
    assert len(rows) == len(train) + len(valid)
    for pair, row in zip(train + valid, rows):  # kept in file order
        info, texts = row["info"], [s["text"] for s in row["summaries"]]
        assert pair.prompt == f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"
        assert pair.user == row["worker"] and {pair.chosen, pair.rejected} == set(texts)
        assert all(t.startswith(" ") and not t.startswith("  ") for t in texts)  # one leading space, kept
        assert (len(pair.chosen) > len(pair.rejected)) == pair.group.endswith("long")


def test_tldr_messages_say_where_the_real_records_went(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"no training comparisons in .*batch18_lines1-200.jsonl: 200 records, "
                                        r"200 validation by their 'split' field; pass training files"):
        tldr.tldr_to_pairs([TLDR / "batch18_lines1-200.jsonl"])
    with pytest.raises(DataError, match=r"batch13_lines1-50.jsonl: 50 records, 50 training; every training record "
                                        r"was skipped: 50 not both from supervised policies \(e.g. PPO vs supervised"):
        tldr.tldr_to_pairs([TLDR / "batch13_lines1-50.jsonl"], valid_paths=[TLDR / "batch18_lines1-200.jsonl"])
    with pytest.raises(DataError, match=r"no validation comparisons in .*cnndm0_lines1-20.jsonl: 20 records, "
                                        r"20 validation; every validation record was skipped: 20 not both"):
        tldr.tldr_to_pairs([TLDR / "batch18_lines1-200.jsonl"], valid_paths=[TLDR / "cnndm0_lines1-20.jsonl"])
    # the one real 'train' record (PPO vs reference) and human edits: nothing usable for training
    argv = ["--comparisons", str(TLDR / "readme_example_batch9.jsonl"), str(TLDR / "edit_b2_eval_test.jsonl"),
            "--out", out]
    assert tldr.main(argv) == 2


def test_tldr_cli_on_real_records(batch18_halves, tmp_path, capsys):
    train_file, valid_file = batch18_halves
    out = tmp_path / "out"
    assert tldr.main(["--comparisons", str(train_file), "--valid", str(valid_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("train 48, valid 49, known_users 6, ")
    assert "skipped_not_supervised 103, skipped_equal_length 0" in printed[0]
    assert len(data.read_pairs(out / "train.jsonl")) == 48 and len(data.read_pairs(out / "valid.jsonl")) == 49


@pytest.mark.parametrize("style", WINDOWS_STYLES)
def test_tldr_real_records_saved_with_bom_and_crlf(batch18_halves, tmp_path, style):
    train_file, valid_file = batch18_halves
    plain = tldr.tldr_to_pairs([train_file], valid_paths=[valid_file], seed=0)
    for path in batch18_halves:
        save_as(path, style)
    assert tldr.tldr_to_pairs([train_file], valid_paths=[valid_file], seed=0) == plain
    out = tmp_path / "out"
    assert tldr.main(["--comparisons", str(train_file), "--valid", str(valid_file), "--out", str(out)]) == 0
    assert data.read_pairs(out / "valid.jsonl") == plain[1]


@pytest.mark.parametrize("style", WINDOWS_STYLES)
def test_psoups_real_prompts_saved_with_bom_and_crlf(tmp_path, style):
    """koala_eval_50.json with a byte-order mark or CRLF is still read as JSON: the error is the same field's."""
    directory = tmp_path / "rm_training"
    directory.mkdir()
    for user in psoups.PSOUPS_PREFERENCES:
        save_as(Path(shutil.copy(REAL / "psoups" / "koala_eval_50.json", directory / f"{user}.json")), style)
    with pytest.raises(DataError, match=r"P1A.json: record 0: needs string fields user_input, completion_a"):
        psoups.psoups_to_pairs(directory)


def test_psoups_evaluation_prompts_are_not_comparisons(tmp_path):
    """koala_eval_50.json holds the real P-SOUPS evaluation prompts ([{id, prompt}]), not comparisons:
    given as a training file, the converter names the fields it needs."""
    directory = tmp_path / "rm_training"
    directory.mkdir()
    for user in psoups.PSOUPS_PREFERENCES:
        shutil.copy(REAL / "psoups" / "koala_eval_50.json", directory / f"{user}.json")
    with pytest.raises(DataError, match=r"P1A.json: record 0: needs string fields user_input, completion_a"):
        psoups.psoups_to_pairs(directory)
