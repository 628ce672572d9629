"""Tests for data.py: tokenizer files, pair validation, truncation, batching, collate, converters, toy task."""

import json
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
from data import DataError, Pair, TokenizedPair
from tests.helpers import tiny_tokenizer
from prepare import tldr
from prepare import psoups
from prepare import prism
from examples import toy as toy_tasks
from examples import smollm2 as smollm2_example

REPO = Path(__file__).resolve().parent.parent
SENTENCE = " Tell me about kettle and zebra. Both are brave."


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return data.load_tokenizer(tokenizer_dir)


def copy_tokenizer_json(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------------
# 1. Tokenizer
# ---------------------------------------------------------------------------------------------------


def test_round_trip_without_special_tokens(tok):
    for text in (SENTENCE, " naïve café — 東京 🙂", "\n<|user|>\nHi\n"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    ids = tok.encode(SENTENCE)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)  # encode adds no special tokens
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == SENTENCE  # decode skips them


def test_special_ids_and_vocab_size_read_back_from_files(tok, tokenizer_dir):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 384
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")


def test_training_is_deterministic():
    texts = toy_tasks.toy_corpus_texts(seed=1, n_examples=50)
    a = data.train_bpe_tokenizer(texts, 320)
    b = data.train_bpe_tokenizer(texts, 320)
    assert a.backend.get_vocab() == b.backend.get_vocab()
    assert a.encode(SENTENCE) == b.encode(SENTENCE)


def test_vocab_size_too_small_for_byte_level():
    with pytest.raises(ValueError, match="259"):
        data.train_bpe_tokenizer(["a b c"], 259)


def test_save_keeps_every_tokenizer_file_of_the_base(tokenizer_dir, tmp_path):
    d = copy_tokenizer_json(tokenizer_dir, tmp_path / "base")
    files = {"tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{x}}"}),
             "chat_template.jinja": "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}\n",
             "special_tokens_map.json": json.dumps({"eos_token": "</s>"}),
             "generation_config.json": json.dumps({"eos_token_id": 1, "max_new_tokens": 7})}
    for name, text in files.items():
        (d / name).write_text(text)
    data.load_tokenizer(d).save(tmp_path / "saved")
    for name, text in files.items():
        assert (tmp_path / "saved" / name).read_text() == text, name  # byte for byte, not rewritten
    again = data.load_tokenizer(tmp_path / "saved")
    again.save(tmp_path / "saved")  # over its own directory: nothing lost
    again.save(tmp_path / "twice")  # and from a saved copy onwards
    assert sorted(p.name for p in (tmp_path / "twice").iterdir()) == sorted([*files, "tokenizer.json"])
    trained = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(0, n_examples=20), 300)  # no base: a config is written
    trained.save(tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"


def test_dict_form_tokenizer_config(tokenizer_dir, tmp_path):
    d = copy_tokenizer_json(tokenizer_dir, tmp_path / "ckpt")
    config = {
        "bos_token": {"content": "</s>", "lstrip": False, "special": True},
        "eos_token": {"content": "<pad>", "lstrip": False},
        "pad_token": None,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = data.load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # pad falls back to eos


def test_special_tokens_map_then_config_json_fallback(tokenizer_dir, tmp_path):
    d = copy_tokenizer_json(tokenizer_dir, tmp_path / "ckpt")
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<s>"}))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": None}))
    tok = data.load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 0, 0)

    (d / "special_tokens_map.json").unlink()
    (d / "config.json").write_text(json.dumps({"eos_token_id": [1, 2], "pad_token_id": 2}))
    tok = data.load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 1, 2)  # bos falls back to eos

    (d / "config.json").unlink()
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    tok = data.load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)


def test_missing_files_and_unknown_tokens_are_named(tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path)
    d = copy_tokenizer_json(tokenizer_dir, tmp_path / "ckpt")
    with pytest.raises(DataError, match="eos"):
        data.load_tokenizer(d)  # no file names an end-of-sequence token
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json: eos_token '<\|end\|>' is not in"):
        data.load_tokenizer(d)


def test_opens_in_transformers_with_same_ids(tok, tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    ids = tok.encode(SENTENCE)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    assert fast.encode(SENTENCE, add_special_tokens=False) == ids
    auto = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert auto.encode(SENTENCE, add_special_tokens=False) == ids
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert auto.decode(ids + [tok.eos_id], skip_special_tokens=True) == tok.decode(ids)


# ---------------------------------------------------------------------------------------------------
# 2. Pairs
# ---------------------------------------------------------------------------------------------------


WINDOWS_STYLES = ["bom", "crlf", "bom+crlf"]


def save_as(path: Path, style: str) -> Path:
    """Rewrite a UTF-8 file as Windows editors and spreadsheet exports save it: with a byte-order mark, CRLF
    line ends, or both (style "bom", "crlf", "bom+crlf")."""
    raw = path.read_bytes()
    if "crlf" in style:
        raw = raw.replace(b"\n", b"\r\n")
    path.write_bytes(b"\xef\xbb\xbf" * ("bom" in style) + raw)
    return path


@pytest.mark.parametrize("style", WINDOWS_STYLES)
def test_read_pairs_and_check_accept_bom_and_crlf(tmp_path, style):
    pairs = [Pair("u1", "p", "c", "r", group="long"), Pair("u2", "p é", "c\nwith a line", "r", user_text="t")]
    path = tmp_path / "pairs.jsonl"
    data.write_pairs(path, pairs)
    path.write_text(path.read_text() + "\n")  # and a blank line at the end, which becomes "\r\n"
    save_as(path, style)
    raw = path.read_bytes()
    assert (raw.startswith(b"\xef\xbb\xbf"), b"\r\n" in raw) == ("bom" in style, "crlf" in style)
    assert data.read_pairs(path) == pairs
    result = subprocess.run([sys.executable, "data.py", "check", str(path)], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"{path}: 2 pairs, 2 users, 1 groups (long 1)\n"


def test_a_bom_elsewhere_than_a_line_start_is_still_an_error(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(f"{GOOD}\n".encode() + b'{"user": "u", \xef\xbb\xbf"prompt": "p"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:2: not valid JSON \(Expecting property name"):
        data.read_pairs(path)


@pytest.mark.parametrize("style", WINDOWS_STYLES)
def test_tokenizer_files_with_bom_and_crlf(tokenizer_dir, tmp_path, tok, style):
    directory = copy_tokenizer_json(tokenizer_dir, tmp_path / "tok")
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>", "bos_token": "</s>"}, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        save_as(directory / name, style)
    loaded = data.load_tokenizer(directory)
    assert (loaded.eos_id, loaded.bos_id) == (tok.bos_id, tok.eos_id)  # read from the config, swapped there
    assert loaded.encode(SENTENCE) == tok.encode(SENTENCE)


def test_write_read_round_trip(tmp_path):
    pairs = [
        Pair("7", "p", "c", "r"),
        Pair("alice", "p2 é", "c2", "r2", user_text="likes cats", group="g"),
    ]
    path = tmp_path / "sub" / "pairs.jsonl"
    data.write_pairs(path, pairs)
    assert data.read_pairs(path) == pairs
    assert "user_text" not in path.read_text().splitlines()[0]  # None fields are left out
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no temporary file left


def test_int_user_becomes_string_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('\n{"user": 3, "prompt": "p", "chosen": "c", "rejected": "r", "extra": 1}\n\n')
    assert data.read_pairs(path) == [Pair("3", "p", "c", "r")]


GOOD = '{"user": "u", "prompt": "p", "chosen": "c", "rejected": "r"}'


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"user": "u", "prompt": "p", "chosen": "c"', "not valid JSON"),
        ('["u", "p", "c", "r"]', "expected a JSON object"),
        ('{"user": "u", "prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
        ('{"user": "u", "prompt": "p", "chosen": 5, "rejected": "r"}', "field 'chosen' must be a string, got number"),
        ('{"user": true, "prompt": "p", "chosen": "c", "rejected": "r"}', "'user' must be a string or an integer"),
        ('{"user": [1], "prompt": "p", "chosen": "c", "rejected": "r"}', "'user' must be a string or an integer"),
        ('{"user": "u", "prompt": "p", "chosen": "c", "rejected": "r", "group": 1}', "'group' must be a string or null"),
    ],
)
def test_read_pairs_errors_name_file_line_and_field(tmp_path, bad_line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{bad_line}\n{GOOD}\n")  # the bad line is line 4
    with pytest.raises(DataError) as info:
        data.read_pairs(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert expected in message
    assert "\n" not in message


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match="no pairs"):
        data.read_pairs(path)


def test_cli_check(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    data.write_pairs(good, [Pair("a", "p", "c", "r", group="long"), Pair("b", "p", "c", "r", group="short")])
    assert data.main(["check", str(good)]) == 0
    assert "2 pairs, 2 users, 2 groups (long 1, short 1)" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + '\n{"user": "u", "prompt": "p", "chosen": "c"}\n')
    result = subprocess.run(
        [sys.executable, "data.py", "check", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{bad}:2: missing field 'rejected'" in result.stderr


# ---------------------------------------------------------------------------------------------------
# 3. Tokenization
# ---------------------------------------------------------------------------------------------------


def test_tokenize_skips_identical_and_adds_eos(tok):
    pairs = [
        Pair("a", " Tell me.", " Yes.", " No."),
        Pair("b", " Tell me.", " Same.", " Same."),
        Pair("c", " Tell me.", " Long answer here.", " No.", user_text=" likes cats", group="g"),
    ]
    items, stats = data.tokenize_pairs(pairs, tok)
    assert (stats["pairs"], stats["skipped_identical"], stats["truncated"], stats["users"]) == (2, 1, 0, 2)
    assert [item.index for item in items] == [0, 2]
    first, last = items
    assert first.prompt_ids == tok.encode(" Tell me.")  # no BOS
    assert first.chosen_ids == tok.encode(" Yes.") + [tok.eos_id]
    assert first.rejected_ids == tok.encode(" No.") + [tok.eos_id]
    assert first.user_text_ids == []
    assert last.user_text_ids == tok.encode(" likes cats") and last.group == "g"
    assert last.length == 1 + len(last.user_text_ids) + len(last.prompt_ids) + len(last.chosen_ids)
    line = data.format_stats(stats)
    assert "2 pairs" in line and "skipped 1" in line and "\n" not in line


def test_truncation_obeys_limits_and_is_counted(tok):
    long_text = " " + " ".join(["kettle zebra brave"] * 20)
    pairs = [
        Pair("a", " Hi.", " Yes.", " No."),  # fits
        Pair("b", long_text, " Yes.", " No."),  # prompt too long
        Pair("c", " Hi.", long_text, " No."),  # chosen too long
        Pair("d", " Hi.", " Yes.", " No.", user_text=long_text),  # user text fills the prompt budget
    ]
    max_length, max_prompt_length = 24, 10
    items, stats = data.tokenize_pairs(pairs, tok, max_length=max_length, max_prompt_length=max_prompt_length)
    assert stats["truncated"] == 3 and stats["pairs"] == 4
    assert stats["longest"] == max_length
    for item in items:
        assert len(item.user_text_ids) + len(item.prompt_ids) <= max_prompt_length
        assert item.length <= max_length
    fits, cut_prompt, cut_chosen, cut_user = items
    assert fits.chosen_ids[-1] == tok.eos_id
    assert cut_prompt.prompt_ids == tok.encode(long_text)[:max_prompt_length]  # kept from the start
    assert cut_prompt.chosen_ids[-1] == tok.eos_id  # short responses keep their EOS
    budget = max_length - 1 - len(cut_chosen.prompt_ids)
    assert cut_chosen.chosen_ids == tok.encode(long_text)[:budget]  # cut at the end, EOS dropped
    assert tok.eos_id not in cut_chosen.chosen_ids
    assert cut_user.user_text_ids == tok.encode(long_text)[:max_prompt_length] and cut_user.prompt_ids == []


def test_tokenize_rejects_impossible_limits(tok):
    with pytest.raises(ValueError, match="max_prompt_length"):
        data.tokenize_pairs([Pair("a", "p", "c", "r")], tok, max_length=10, max_prompt_length=9)


# ---------------------------------------------------------------------------------------------------
# 4. Batching
# ---------------------------------------------------------------------------------------------------


@dataclass
class Item:
    length: int


def varied_items(n=1000, seed=0):
    rng = random.Random(seed)
    return [Item(rng.randint(5, 400)) for _ in range(n)]


def padding_waste(items, batches):
    return sum(max(items[i].length for i in b) * len(b) - sum(items[i].length for i in b) for b in batches)


def test_batches_cover_every_index_once_and_are_deterministic():
    items = varied_items(1003)
    batches = data.make_batches(items, 16, shuffle=True, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(items)))
    assert sum(len(b) != 16 for b in batches) == 1  # only one partial batch
    assert batches == data.make_batches(items, 16, shuffle=True, seed=3, epoch=0)
    assert batches != data.make_batches(items, 16, shuffle=True, seed=3, epoch=1)
    assert batches != data.make_batches(items, 16, shuffle=True, seed=4, epoch=0)


def test_unshuffled_batches_are_sorted_by_length():
    items = varied_items(100)
    flat = [i for b in data.make_batches(items, 8, shuffle=False) for i in b]
    assert [items[i].length for i in flat] == sorted(item.length for item in items)


def test_shards_partition_the_batches():
    items = varied_items(500)
    full = data.make_batches(items, 8, shuffle=True, seed=0, epoch=2)
    shards = [data.make_batches(items, 8, shuffle=True, seed=0, epoch=2, num_shards=3, shard=s) for s in range(3)]
    assert sorted(map(tuple, full)) == sorted(tuple(b) for shard in shards for b in shard)
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(len(items)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="shard"):
        data.make_batches(items, 8, shuffle=True, num_shards=2, shard=2)


def test_bucketing_wastes_less_padding_than_random_batches():
    items = varied_items(2000)
    bucketed = data.make_batches(items, 8, shuffle=True, seed=0, epoch=0)
    order = list(range(len(items)))
    random.Random(0).shuffle(order)
    random_batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding_waste(items, bucketed) < 0.25 * padding_waste(items, random_batches)


# ---------------------------------------------------------------------------------------------------
# 5. Collate
# ---------------------------------------------------------------------------------------------------

IDS = SimpleNamespace(bos_id=0, eos_id=1, pad_id=2)


def hand_made_items():
    return [
        TokenizedPair("alice", "long", prompt_ids=[10, 11], user_text_ids=[50], chosen_ids=[20, 21, 1],
                      rejected_ids=[30, 1], index=4),
        TokenizedPair("zed", None, prompt_ids=[12], user_text_ids=[], chosen_ids=[22, 1],
                      rejected_ids=[31, 32, 33, 34, 1], index=9),
    ]


def test_collate_pairs_layout_and_masks():
    rows = {"alice": 3, "zed": 0}
    batch = data.collate_pairs(hand_made_items(), IDS, row_of=rows.__getitem__, use_user_text=True)
    assert batch["user_rows"].tolist() == [3, 0]
    assert batch["index"].tolist() == [4, 9]
    assert batch["users"] == ["alice", "zed"] and batch["groups"] == ["long", None]
    assert batch["policy_input_ids"].dtype == torch.long and batch["policy_response_mask"].dtype == torch.bool
    assert batch["policy_input_ids"].tolist() == [
        [0, 50, 10, 11, 20, 21, 1],  # chosen rows first
        [0, 12, 22, 1, 2, 2, 2],
        [0, 50, 10, 11, 30, 1, 2],  # then rejected
        [0, 12, 31, 32, 33, 34, 1],
    ]
    assert batch["policy_response_mask"].int().tolist() == [
        [0, 0, 0, 0, 1, 1, 1],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1, 1, 1],
    ]
    assert batch["reference_input_ids"].tolist() == [  # no user text for the reference model
        [0, 10, 11, 20, 21, 1, 2],
        [0, 12, 22, 1, 2, 2, 2],
        [0, 10, 11, 30, 1, 2, 2],
        [0, 12, 31, 32, 33, 34, 1],
    ]
    assert batch["reference_response_mask"].int().tolist() == [
        [0, 0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
    ]


def test_collate_pairs_without_user_text_matches_reference():
    batch = data.collate_pairs(hand_made_items(), IDS, row_of=lambda user: 0, use_user_text=False)
    assert torch.equal(batch["policy_input_ids"], batch["reference_input_ids"])
    assert torch.equal(batch["policy_response_mask"], batch["reference_response_mask"])


def test_collate_pairs_with_real_tokenizer(tok):
    pairs = toy_tasks.make_toy_task(seed=0, n_users=2, pairs_per_user=3, n_valid_per_user=0, n_unseen_users=0)[0]
    items, _ = data.tokenize_pairs(pairs, tok)
    batch = data.collate_pairs(items, tok, row_of=lambda user: 1, use_user_text=True)
    B = len(items)
    ids, mask = batch["policy_input_ids"], batch["policy_response_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2 * B
    assert ids.shape[1] == max(item.length for item in items)
    for b, item in enumerate(items):
        assert ids[b][mask[b]].tolist() == item.chosen_ids
        assert ids[B + b][mask[B + b]].tolist() == item.rejected_ids
        end = 1 + len(item.prompt_ids) + len(item.rejected_ids)
        assert (ids[B + b, end:] == tok.pad_id).all()


def test_sft_examples_and_collate():
    items = hand_made_items() + [hand_made_items()[0]]  # a repeated pair adds no new examples
    examples = data.sft_examples_from_pairs(items)
    assert [(e.prompt_ids, e.response_ids) for e in examples] == [
        ([10, 11], [20, 21, 1]), ([10, 11], [30, 1]), ([12], [22, 1]), ([12], [31, 32, 33, 34, 1])
    ]
    batch = data.collate_sft(examples[:2], IDS)
    assert batch["input_ids"].tolist() == [[0, 10, 11, 20, 21, 1], [0, 10, 11, 30, 1, 2]]
    assert batch["response_mask"].int().tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert examples[0].length == 6


# ---------------------------------------------------------------------------------------------------
# 6a. TL;DR converter
# ---------------------------------------------------------------------------------------------------


def tldr_record(worker, split, k, policies=("sup2", "sup4"), texts=None, subreddit="cats"):
    texts = texts or (f" short {k} ", f"a much longer summary {k}")
    info = {"id": f"t{k}", "post": f"post {k}", "title": f"title {k}", "subreddit": subreddit}
    return {
        "info": info,
        "summaries": [{"text": t, "policy": p, "note": None} for t, p in zip(texts, policies)],
        "choice": k % 2,
        "worker": worker,
        "batch": "batch3",
        "split": split,
    }


def write_tldr_fixture(path: Path) -> None:
    """Workers w0..w4 with 6, 5, 4, 3, 2 usable training comparisons, plus noise the converter skips."""
    records, k = [], 0
    for w, n in enumerate((6, 5, 4, 3, 2)):
        for _ in range(n):
            records.append(tldr_record(f"w{w}", "train", k))
            k += 1
    records.append(tldr_record("w4", "train", 100, policies=("sup2", "sup4_ppo_rm3_kl10")))  # not supervised
    records.append(tldr_record("w4", "train", 101, policies=("sup2_cnndm", "sup2")))  # CNN/DM policy
    records.append(tldr_record("w4", "train", 102, texts=("same", "size")))  # equal length
    records.append(tldr_record("w4", "test", 103))  # neither train nor valid
    records.append(tldr_record("w0", "valid1", 200))
    records.append(tldr_record("w1", "valid2", 201))
    records.append(tldr_record("w9", "valid1", 202, subreddit=None))  # an unseen worker
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_tldr_converter(tmp_path):
    path = tmp_path / "comparisons.jsonl"
    write_tldr_fixture(path)
    train, valid, stats = tldr.tldr_to_pairs([path], n_users=3, seed=0)
    assert len(train) == 6 + 5 + 4 and {p.user for p in train} == {"w0", "w1", "w2"}
    assert stats["skipped_not_supervised"] == 2
    assert stats["skipped_equal_length"] == 1 and stats["skipped_other_split"] == 1
    assert (stats["known_users"], stats["unseen_users"], len(valid)) == (3, 1, 3)
    assert stats["unused_train_comparisons"] == 3 + 2  # w3 and w4 are not among the top 3

    group_of = {p.user: p.group for p in train}
    assert set(group_of.values()) <= {"long", "short"}
    for pair in train + valid:
        assert pair.chosen.startswith(" ") and pair.chosen[1:] == pair.chosen[1:].strip()
        longer = len(pair.chosen) > len(pair.rejected)
        assert longer == pair.group.endswith("long")  # "long", "short", "unseen-long", "unseen-short"
    assert train[0].prompt == "SUBREDDIT: r/cats\nTITLE: title 0\nPOST: post 0\nTL;DR:"
    assert train[0].chosen in (" short 0", " a much longer summary 0")
    unseen = [p for p in valid if p.user == "w9"]
    assert unseen[0].group in ("unseen-long", "unseen-short")
    assert unseen[0].prompt == "TITLE: title 202\nPOST: post 202\nTL;DR:"
    assert stats["unseen_long_users"] == (unseen[0].group == "unseen-long")
    assert {p.user: p.group for p in valid if p.user != "w9"} == {u: group_of[u] for u in ("w0", "w1")}

    assert tldr.tldr_to_pairs([path], n_users=3, seed=0) == (train, valid, stats)  # deterministic
    assignments = {
        tuple(sorted({(p.user, p.group) for p in tldr.tldr_to_pairs([path], n_users=3, seed=s)[0]}))
        for s in range(10)
    }
    assert len(assignments) > 1  # the seed matters
    unseen_groups = {next(p.group for p in tldr.tldr_to_pairs([path], n_users=3, seed=s)[1] if p.user == "w9")
                     for s in range(10)}
    assert unseen_groups == {"unseen-long", "unseen-short"}  # each unseen worker draws a preference


@pytest.mark.parametrize("style", WINDOWS_STYLES)
def test_tldr_converter_accepts_bom_and_crlf(tmp_path, style):
    plain, windows = tmp_path / "plain.jsonl", tmp_path / "windows.jsonl"
    write_tldr_fixture(plain)
    write_tldr_fixture(windows)
    save_as(windows, style)
    assert tldr.tldr_to_pairs([windows], n_users=3) == tldr.tldr_to_pairs([plain], n_users=3)
    assert tldr.main(["--comparisons", str(windows), "--n-users", "3", "--out", str(tmp_path / "out")]) == 0
    assert data.read_pairs(tmp_path / "out" / "train.jsonl") == tldr.tldr_to_pairs([plain], n_users=3)[0]


def test_tldr_unseen_majority_keeps_known_preferences(tmp_path):
    path = tmp_path / "comparisons.jsonl"
    write_tldr_fixture(path)
    own = tldr.tldr_to_pairs([path], n_users=3, seed=0)
    majority = tldr.tldr_to_pairs([path], n_users=3, seed=0, unseen_majority=True)
    assert majority[0] == own[0]  # training pairs and known preferences do not change
    unseen = [p for p in majority[1] if p.user == "w9"]
    assert [p.group for p in unseen] == ["unseen"] and len(unseen[0].chosen) > len(unseen[0].rejected)
    short = tldr.tldr_to_pairs([path], n_users=3, seed=0, p_long=0.2, unseen_majority=True)[1]
    assert all(len(p.chosen) < len(p.rejected) for p in short if p.user == "w9")  # the majority is short


def test_tldr_converter_with_separate_valid_files_and_cli(tmp_path, capsys):
    train_file, valid_file = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train_file.write_text("".join(json.dumps(tldr_record("w0", None, k)) + "\n" for k in range(3)))
    valid_file.write_text(json.dumps(tldr_record("w7", "train", 9)) + "\n")  # the file, not 'split', decides
    with pytest.raises(DataError, match=r"no validation comparisons in .*train.jsonl: 3 records, 3 training by "
                                        r"their 'split' field; pass --valid"):
        tldr.tldr_to_pairs([train_file])
    out = tmp_path / "out"
    argv = ["--comparisons", str(train_file), "--valid", str(valid_file), "--out", str(out)]
    assert tldr.main(argv) == 0
    assert "train 3, valid 1" in capsys.readouterr().out
    assert len(data.read_pairs(out / "train.jsonl")) == 3
    assert [p.group for p in data.read_pairs(out / "valid.jsonl")] in (["unseen-long"], ["unseen-short"])
    assert tldr.main(argv + ["--unseen-majority"]) == 0
    assert [p.group for p in data.read_pairs(out / "valid.jsonl")] == ["unseen"]


# ---------------------------------------------------------------------------------------------------
# 6b. P-SOUPS converter
# ---------------------------------------------------------------------------------------------------


def write_psoups_fixture(directory: Path) -> None:
    """20 questions per profile; P1A has a duplicate and a record whose instruction is not the known one;
    P2A uses the comma-less spelling; P3B is stored as JSON Lines."""
    directory.mkdir()
    for user, sentences in psoups.PSOUPS_PREFERENCES.items():
        sentence = sentences[-1]
        records = [
            {"user_input": f"What is thing {q}? {sentence}", "completion_a": f" good {user} {q} ",
             "completion_b": f"bad {user} {q}"}
            for q in range(20)
        ]
        if user == "P1A":
            records.append(dict(records[0]))
            records.append({"user_input": "Explain thing 3. Please be nice to kids.", "completion_a": "a",
                            "completion_b": "b"})
        path = directory / f"{user}.json"
        if user == "P3B":
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            path.write_text(json.dumps(records, indent=1))


def test_psoups_converter(tmp_path):
    write_psoups_fixture(tmp_path / "rm_training")
    train, valid, stats = psoups.psoups_to_pairs(tmp_path / "rm_training", seed=0)
    assert stats["duplicates_removed"] == 1 and stats["fallback_removals"] == 1
    assert len(train) + len(valid) == 6 * 20 + 1
    assert stats["questions"] == 21 and stats["valid_questions"] == 2
    assert not {p.prompt for p in train} & {p.prompt for p in valid}  # split by question
    assert Counter(p.user for p in train + valid) == {u: 20 + (u == "P1A") for u in psoups.PSOUPS_PREFERENCES}
    assert all(p.group == p.user for p in train + valid)
    for pair in train + valid:
        assert "Generate" not in pair.prompt and "Please" not in pair.prompt
        assert pair.prompt.startswith("<|user|>\n") and pair.prompt.endswith("\n<|assistant|>\n")
    first = next(p for p in train + valid if p.user == "P2A" and "thing 5?" in p.prompt)
    assert first.prompt == "<|user|>\nWhat is thing 5?\n<|assistant|>\n"
    assert (first.chosen, first.rejected) == ("good P2A 5", "bad P2A 5")
    assert any(p.prompt == "<|user|>\nExplain thing 3.\n<|assistant|>\n" for p in train + valid)

    assert psoups.psoups_to_pairs(tmp_path / "rm_training", seed=0) == (train, valid, stats)
    other_valid = psoups.psoups_to_pairs(tmp_path / "rm_training", seed=1)[1]
    assert {p.prompt for p in other_valid} != {p.prompt for p in valid}


@pytest.mark.parametrize("style", WINDOWS_STYLES)
def test_psoups_converter_accepts_bom_and_crlf(tmp_path, style):
    """Both forms of P-SOUPS files: the JSON lists (P1A .. P3A) and JSON Lines (P3B)."""
    write_psoups_fixture(tmp_path / "plain")
    write_psoups_fixture(tmp_path / "windows")
    for user in psoups.PSOUPS_PREFERENCES:
        save_as(tmp_path / "windows" / f"{user}.json", style)
    assert psoups.psoups_to_pairs(tmp_path / "windows") == psoups.psoups_to_pairs(tmp_path / "plain")
    assert psoups.main(["--dir", str(tmp_path / "windows"), "--out", str(tmp_path / "out")]) == 0
    assert data.read_pairs(tmp_path / "out" / "valid.jsonl") == psoups.psoups_to_pairs(tmp_path / "plain")[1]


@pytest.mark.parametrize("style", WINDOWS_STYLES)
def test_prism_converter_accepts_bom_and_crlf(tmp_path, style):
    from tests.test_prism import write_prism  # the hand-written PRISM records of test_prism.py

    plain, windows = write_prism(tmp_path / "plain"), write_prism(tmp_path / "windows")
    for name in ("survey.jsonl", "conversations.jsonl"):
        save_as(windows / name, style)
    assert prism.prism_to_pairs(windows) == prism.prism_to_pairs(plain)
    assert prism.main(["--dir", str(windows), "--out", str(tmp_path / "out")]) == 0
    assert data.read_pairs(tmp_path / "out" / "train.jsonl") == prism.prism_to_pairs(plain)[0]


def test_psoups_missing_file_and_cli(tmp_path, capsys):
    directory = tmp_path / "rm_training"
    write_psoups_fixture(directory)
    (directory / "P3A.json").unlink()
    with pytest.raises(DataError, match="P3A.json: file not found"):
        psoups.psoups_to_pairs(directory)
    assert psoups.main(["--dir", str(directory), "--out", str(tmp_path / "out")]) == 2
    assert "P3A.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# 7. Toy task
# ---------------------------------------------------------------------------------------------------


def test_toy_task_shape_and_groups():
    train, valid = toy_tasks.make_toy_task(seed=0)
    assert (train, valid) == toy_tasks.make_toy_task(seed=0)
    assert train != toy_tasks.make_toy_task(seed=1)[0]
    assert len(train) == 10 * 60 and len(valid) == (10 + 4) * 20

    group_of = {p.user: p.group for p in train}
    assert sorted(group_of) == [f"user_{i:02d}" for i in range(1, 11)]
    assert Counter(group_of.values()) == {"long": 7, "short": 3}
    assert all(group_of[p.user] == p.group for p in valid if p.group != "unseen")

    unseen = {p.user for p in valid if p.group == "unseen"}
    assert unseen == {"new_01", "new_02", "new_03", "new_04"} and not unseen & set(group_of)
    prefers_long = {p.user: len(p.chosen) > len(p.rejected) for p in valid if p.group == "unseen"}
    assert Counter(prefers_long.values()) == {True: 3, False: 1}  # the same 70/30 split

    for pair in train + valid:
        short, long = sorted((pair.chosen, pair.rejected), key=len)
        assert len(short.split()) == 4 and len(long.split()) == 14
        assert long.startswith(short)  # the answers part at one decision: stop, or go on
        assert (pair.chosen == long) == (pair.group == "long" or (pair.group == "unseen" and prefers_long[pair.user]))


def test_toy_task_is_short_in_tokens():
    tok = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(seed=0), 768)
    train, valid = toy_tasks.make_toy_task(seed=0)
    items, stats = data.tokenize_pairs(train + valid, tok)
    assert stats["truncated"] == 0 and stats["longest"] <= 48
    assert tok.decode(items[0].prompt_ids) == train[0].prompt


def test_cli_toy(tmp_path, capsys):
    assert toy_tasks.main(["--out", str(tmp_path)]) == 0
    assert data.read_pairs(tmp_path / "train.jsonl") == toy_tasks.make_toy_task(seed=0)[0]
    assert "600 pairs, 10 users, 2 groups (long 420, short 180)" in capsys.readouterr().out


def gpt2_style_tokenizer(path):
    """A byte-level BPE whose only special token is <|endoftext|>: BOS = EOS = pad, as GPT-2 and GPT-J's."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(toy_tasks.toy_corpus_texts(0, n_examples=100),
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>",
                                                            "eos_token": "<|endoftext|>"}))
    return data.load_tokenizer(path)


def test_a_prompt_that_begins_with_bos_gets_no_second_one(tmp_path):
    tok = gpt2_style_tokenizer(tmp_path / "gpt2")
    assert tok.bos_id == tok.eos_id == tok.pad_id == tok.backend.token_to_id("<|endoftext|>")
    plain, opened = tok.encode(" Tell me about the kettle."), tok.encode("<|endoftext|> Tell me about the kettle.")
    assert opened == [tok.bos_id] + plain  # the special token is one id in the text
    text = tok.encode(" I like short answers.")
    assert data.prefix_ids(tok, opened) == data.prefix_ids(tok, plain) == [tok.bos_id] + plain
    assert data.prefix_ids(tok, opened, text) == [tok.bos_id] + text + plain  # e_u goes after position 0
    pair = data.Pair("u", "<|endoftext|> Tell me about the kettle.", " The kettle is warm.", " No.", user_text=" I like it.")
    items, _ = data.tokenize_pairs([pair], tok, 64, 32)
    batch = data.collate_pairs(items, tok, lambda u: 1, use_user_text=True)
    for key in ("policy_input_ids", "reference_input_ids"):
        row = batch[key][0].tolist()
        assert row[0] == tok.bos_id and row[1] != tok.bos_id, key  # one BOS, then user text / prompt


def test_instructions_and_length_preference_pairs():
    questions = smollm2_example.make_instructions(40, seed=1)
    assert len(set(questions)) == 40 and questions == smollm2_example.make_instructions(40, seed=1)
    with pytest.raises(ValueError, match="352"):
        smollm2_example.make_instructions(353)
    assert smollm2_example.chatml("Hi?", "Be kind.") == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    samples = [{"question": q, "prompt": smollm2_example.chatml(q), "short": f"s{i}", "long": f"long {i}"}
               for i, q in enumerate(questions)]
    users = {"a": "long", "b": "long", "c": "short"}
    pairs = smollm2_example.length_preference_pairs(samples, users, seed=0, judges=2)
    assert len(pairs) == 80
    for first, second in zip(pairs[::2], pairs[1::2]):  # two distinct users judge each prompt
        assert first.prompt == second.prompt and first.user != second.user
    for p in pairs:
        i = p.chosen.split()[-1].lstrip("s")
        assert (p.chosen, p.rejected) == ((f"long {i}", f"s{i}") if users[p.user] == "long" else (f"s{i}", f"long {i}"))
        assert p.group == users[p.user]
    held_out = smollm2_example.length_preference_pairs(samples[:4], users, balanced=True, group_prefix="unseen-")
    assert [p.group for p in held_out] == ["unseen-long", "unseen-short"] * 4
    assert [p.user for p in held_out] == ["a", "c", "b", "c", "a", "c", "b", "c"]


def test_whole_sentences_cuts_after_the_last_complete_sentence():
    assert smollm2_example.whole_sentences("Snow is white. It falls in winter. It is col") == "Snow is white. It falls in winter."
    assert smollm2_example.whole_sentences("Why? Because it rains!") == "Why? Because it rains!"
    assert smollm2_example.whole_sentences("1. Tea\n2. Coffee") == ""  # a list number is no sentence end
    assert smollm2_example.whole_sentences("It was built in 1903. Then") == ""  # nor is a number's full stop
    assert smollm2_example.whole_sentences("no sentence at all") == ""
