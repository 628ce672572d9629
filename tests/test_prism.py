"""PRISM converter (prism.prism_to_pairs) on records written by hand after ../shared/real_data/prism/SCHEMA.md
(the codebook's field list; the real files are too large to ship), and train.py on its output."""
import json
import math
from collections import Counter
from pathlib import Path

import pytest

import data
import train as T
from data import DataError
from tests.helpers import toy_setup
from prepare import prism

ATTRIBUTES = prism.PRISM_ATTRIBUTES
USER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
END = "<|eot_id|>\n"


def survey(user, ratings=(50,) * 8, order=range(1, 9), **fields):
    """One survey.jsonl line in the codebook's shape (§4.1), with the fields the converter reads."""
    record = {
        "user_id": user, "survey_only": False, "num_completed_conversations": 1,
        "stated_prefs": {**dict(zip(ATTRIBUTES, ratings)), "other": 0, "other_text": ""},
        "order_stated_prefs": {**dict(zip(ATTRIBUTES, order)), "other": 9},
        "self_description": f"I am {user}.", "system_string": "SECRET SYSTEM STRING",
        "age": "25-34 years old", "education": "University Bachelors Degree", "employment_status": "Working full-time",
        "marital_status": "Never been married", "english_proficiency": "Native speaker", "gender": "Female",
    }
    record.update(fields)
    return record


def conversation(cid, user, turns):
    """One conversations.jsonl line (codebook §2). turns: [(user message, [(response, score, if_chosen), ...])]."""
    history = []
    for t, (message, responses) in enumerate(turns):
        history.append({"turn": t, "role": "user", "content": message})
        for i, (content, score, chosen) in enumerate(responses):
            history.append({"turn": t, "role": "model", "content": content, "model_name": "M", "model_provider": "P",
                            "score": score, "if_chosen": chosen, "within_turn_id": i})
    return {"conversation_id": cid, "user_id": user, "conversation_type": "unguided", "opening_prompt": turns[0][0],
            "conversation_turns": len(turns), "conversation_history": history,
            "performance_attributes": {"fluency": 50}, "open_feedback": ""}


def plain(cid, user):
    """4 pairs: 3 rejected responses at turn 0, 1 at turn 1."""
    return conversation(cid, user, [
        (f"Question {cid}?", [(f"best {cid}", 80, True), ("bad a", 10, False), ("bad b", 20, False),
                              ("bad c", 30, False)]),
        (f"Follow-up {cid}?", [(f"good {cid}", 70, True), ("worse", 20, False)]),
    ])


# user0's special conversation: every skip rule, turn by turn
SPECIAL = conversation("special", "user0", [
    ("Hi", [("Hello!", 90, True), ("Meh.", 40, False), ("Also good.", 90, False), ("EMPTY STRING", 10, False)]),
    ("How are you?", [("Fine, thanks.", 70, True), ("Go away.", 30, False)]),
    ("Nobody chose?", [("a", 50, False), ("b", 40, False)]),          # no response flagged if_chosen
    ("Two chosen?", [("second", 60, True), ("first", 80, True)]),      # both flagged: the best scored is chosen
    ("Empty?", [("EMPTY STRING", 90, True), ("something", 20, False)]),  # chosen response empty
])
SPECIAL_PAIRS = [("Hi", "Hello!", "Meh."), ("How are you?", "Fine, thanks.", "Go away."),
                 ("Two chosen?", "first", "second")]
# ten users with 1..10 plain conversations besides user0 (1 special + 3 plain) and longtalk (1 long + 1 plain)
CONVERSATIONS_PER_USER = {f"user{i}": i for i in range(1, 11)}
LONG_MESSAGE = "x" * 2000


def long_conversation(user):
    """Five turns of 400-character messages and replies, then a user message longer than any budget."""
    turns = [(f"{t}" * 400, [(f"{t}r" * 200, 90, True), ("no", 10, False)]) for t in range(5)]
    return conversation("long", user, turns + [(LONG_MESSAGE, [("ok", 90, True), ("no", 10, False)])])


def write_prism(directory: Path) -> Path:
    directory.mkdir()
    surveys = [survey("user0", ratings=(10, 50, 60, 95, 20, 80, 30, 95), order=(3, 1, 2, 4, 5, 6, 7, 8)),
               survey("longtalk"), survey("survey_only", num_completed_conversations=0, stated_prefs=None)]
    surveys += [survey(user, self_description="") for user in CONVERSATIONS_PER_USER]
    conversations = [SPECIAL] + [plain(f"u0c{k}", "user0") for k in range(3)]
    conversations += [long_conversation("longtalk"), plain("ltc", "longtalk")]
    conversations.append(conversation("ties", "user1", [("Tie?", [("x", 50, True), ("y", 50, False)])]))  # no pair
    for user, n in CONVERSATIONS_PER_USER.items():
        conversations += [plain(f"{user}c{k}", user) for k in range(n)]
    for name, records in (("survey.jsonl", surveys), ("conversations.jsonl", conversations)):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


@pytest.fixture
def prism_dir(tmp_path):
    return write_prism(tmp_path / "prism")


def test_user_text_top_rated_and_shown_first(prism_dir):
    train, valid, _ = prism.prism_to_pairs(prism_dir)
    text = next(p.user_text for p in train + valid if p.user == "user0")
    assert text == ("User information:\nStated preferences: factuality, helpfulness, safety\n"
                    "Self-description: I am user0.\nAge: 25-34 years old\nGender: Female\n"
                    "Education: University Bachelors Degree\nEmployment: Working full-time\n"
                    "Marital status: Never been married\nEnglish proficiency: Native speaker\n")
    shown = prism.prism_to_pairs(prism_dir, stated_prefs="shown-first")
    text = next(p.user_text for p in shown[0] + shown[1] if p.user == "user0")
    assert text.startswith("User information:\nStated preferences: creativity, fluency, values\n")  # order 1, 2, 3
    empty = next(p.user_text for p in train + valid if p.user == "user3")
    assert "Self-description" not in empty  # an empty field is left out
    assert all("SECRET" not in p.user_text for p in train + valid)  # system_string is not used
    with pytest.raises(ValueError, match="stated_prefs='first-shown': expected 'top-rated' or 'shown-first'"):
        prism.prism_to_pairs(prism_dir, stated_prefs="first-shown")


def test_pairs_and_every_skip_rule(prism_dir):
    train, valid, stats = prism.prism_to_pairs(prism_dir)
    special = [p for p in train + valid if "Hi" in p.prompt and p.user == "user0"]
    found = [(p.prompt.rsplit(USER, 1)[1].split(END)[0], p.chosen, p.rejected) for p in special]
    assert sorted(found) == sorted(SPECIAL_PAIRS)
    by_message = {message: p for (message, _, _), p in zip(found, special)}
    assert by_message["Hi"].prompt == USER + "Hi" + END + ASSISTANT
    assert by_message["How are you?"].prompt == (USER + "Hi" + END + ASSISTANT + "Hello!" + END
                                                 + USER + "How are you?" + END + ASSISTANT)
    # a turn without a chosen response adds only its user message to the history
    assert by_message["Two chosen?"].prompt.endswith(
        ASSISTANT + "Fine, thanks." + END + USER + "Nobody chose?" + END + USER + "Two chosen?" + END + ASSISTANT)

    n_plain = 3 + 1 + sum(CONVERSATIONS_PER_USER.values())
    assert stats["train"] + stats["valid"] == 3 + 4 * n_plain + 6  # special, plain, long conversation
    assert (stats["skipped_tie"], stats["skipped_empty"]) == (1 + 1, 1 + 1)  # incl. the all-ties conversation
    assert (stats["turns_without_chosen"], stats["turns_several_chosen"]) == (1, 1)
    assert stats["conversations"] == 1 + 3 + 2 + 1 + sum(CONVERSATIONS_PER_USER.values())
    assert stats["conversations_without_pairs"] == 1
    assert stats["turns"] == 5 + 2 * n_plain + 6 + 1
    assert Counter(p.prompt.count(USER) for p in train + valid if p.user != "user0" and p.user != "longtalk") \
        == {1: 3 * (n_plain - 4), 2: n_plain - 4}  # up to 3 rejected at turn 0, 1 later


def test_long_history_is_cut_from_the_left(prism_dir):
    train, valid, stats = prism.prism_to_pairs(prism_dir)
    long = [p for p in train + valid if p.user == "longtalk" and "ltc" not in p.prompt]
    budget = 1500 - len(long[0].user_text)
    full = long_conversation("longtalk")["conversation_history"]
    uncut, cut = "", 0
    for i, pair in enumerate(long):
        message = full[3 * i]["content"]
        current = USER + message + END + ASSISTANT
        assert pair.prompt.endswith(current)  # the current user turn is never lost
        assert (uncut + current).endswith(pair.prompt)  # only the left was cut
        assert len(pair.prompt) == max(min(len(uncut + current), budget), len(current))
        cut += len(pair.prompt) < len(uncut + current)
        uncut += USER + message + END + ASSISTANT + full[3 * i + 1]["content"] + END
    assert long[-1].prompt == USER + LONG_MESSAGE + END + ASSISTANT  # longer than the budget: kept whole
    assert cut >= 3 and stats["prompts_cut"] == cut  # no other conversation is long


def test_split_seen_unseen(prism_dir):
    train, valid, stats = prism.prism_to_pairs(prism_dir, seed=0)
    users = {p.user for p in train + valid}
    assert len(users) == 12 and stats["users_seen"] + stats["users_unseen"] == 12
    seen, unseen = {p.user for p in train}, {p.user for p in valid if p.group == "unseen"}
    assert stats["users_seen"] == len(seen) and not seen & unseen
    assert all(p.group == "seen" for p in train) and {p.group for p in valid} == {"seen", "unseen"}
    assert seen <= {p.user for p in valid}  # every seen user also has validation conversations
    drawn_seen = int(0.9 * 12)
    assert stats["users_seen"] == drawn_seen - stats["unseen_with_one_conversation"]
    assert "user1" not in seen  # one conversation with pairs: never seen
    per_user = Counter()
    for p in train:
        per_user[p.user, p.prompt.split(END)[0]] += 1
    conversations_in_train = Counter(u for u, _ in per_user)
    for user in seen - {"user0", "longtalk"}:
        assert conversations_in_train[user] == int(0.9 * CONVERSATIONS_PER_USER[user])
    assert stats["valid_unseen"] == sum(p.group == "unseen" for p in valid) > 0

    assert prism.prism_to_pairs(prism_dir, seed=0) == (train, valid, stats)  # deterministic
    splits = {frozenset(p.user for p in prism.prism_to_pairs(prism_dir, seed=s)[0]) for s in range(5)}
    assert len(splits) > 1  # the seed matters


def test_errors_name_file_line_and_field(tmp_path, prism_dir):
    lines = (prism_dir / "conversations.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["conversation_history"][2]["score"] = "high"
    (prism_dir / "conversations.jsonl").write_text("\n".join([lines[0], json.dumps(bad)] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"conversations.jsonl:2: conversation_history\[2\]: field 'score' "
                                        r"must be a number, got string"):
        prism.prism_to_pairs(prism_dir)

    other = write_prism(tmp_path / "other")
    record = survey("user0")
    del record["stated_prefs"]["safety"]
    (other / "survey.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"survey.jsonl:1: stated_prefs: field 'safety' must be a number, "
                                        r"got nothing \(the field is missing\)"):
        prism.prism_to_pairs(other)
    (other / "survey.jsonl").write_text(json.dumps(survey("user0")) + "\n")
    with pytest.raises(DataError, match=r"conversations.jsonl:5: user_id 'longtalk' has no survey"):
        prism.prism_to_pairs(other)
    (other / "survey.jsonl").unlink()
    with pytest.raises(DataError, match="survey.jsonl: file not found"):
        prism.prism_to_pairs(other)


def test_cli_prints_counts_and_writes_pairs(prism_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert prism.main(["--dir", str(prism_dir), "--out", str(out), "--stated-prefs", "shown-first"]) == 0
    printed = capsys.readouterr().out
    train, valid, stats = prism.prism_to_pairs(prism_dir, stated_prefs="shown-first")
    assert printed.splitlines()[0] == ", ".join(f"{k} {v}" for k, v in stats.items())
    assert data.read_pairs(out / "train.jsonl") == train and data.read_pairs(out / "valid.jsonl") == valid
    assert prism.main(["--dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "survey.jsonl: file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny checkpoint (the toy BPE encodes any text) and the PRISM-format records, converted with a short budget."""
    d = toy_setup(tmp_path_factory.mktemp("toy"), pairs_per_user=2, n_valid_per_user=1, n_unseen_users=0)
    train, valid, _ = prism.prism_to_pairs(write_prism(d / "prism"), max_prompt_chars=400)
    data.write_pairs(d / "prism_train.jsonl", train)
    data.write_pairs(d / "prism_valid.jsonl", valid)
    return d


def test_user_text_reaches_the_policy_rows_only(converted):
    tokenizer = data.load_tokenizer(converted / "base")
    pairs = data.read_pairs(converted / "prism_train.jsonl")[:3]
    items, _ = data.tokenize_pairs(pairs, tokenizer, max_length=4096, max_prompt_length=2048)
    batch = data.collate_pairs(items, tokenizer, lambda user: 1, use_user_text=True)
    def prefix(name, row):  # the tokens before the response (and the pads after it), decoded
        return tokenizer.decode(batch[f"{name}_input_ids"][row][~batch[f"{name}_response_mask"][row]].tolist())

    for row, pair in enumerate(pairs):
        policy, reference = prefix("policy", row), prefix("reference", row)
        assert policy.startswith(pair.user_text + pair.prompt) and "User information" not in reference


@pytest.mark.parametrize("user_info, user_model, alpha", [("explicit", "uniform", 1.0), ("both", "individual", 0.5)])
def test_train_runs_on_converted_prism(converted, tmp_path, user_info, user_model, alpha):
    cfg = T.TrainConfig(stage="pdpo", model=str(converted / "base"), data=str(converted / "prism_train.jsonl"),
                        valid=str(converted / "prism_valid.jsonl"), out=str(tmp_path / user_info), quiet=True,
                        user_info=user_info, user_model=user_model, alpha=alpha, batch_size=4, grad_accum=1,
                        max_steps=2, warmup_steps=1, lr=1e-3, max_length=128, max_prompt_length=96)
    summary = T.train(cfg)
    valid = data.read_pairs(converted / "prism_valid.jsonl")
    assert {g: s["pairs"] for g, s in summary["groups"].items()} == Counter(p.group for p in valid)
    rows = [json.loads(line) for line in (tmp_path / user_info / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
