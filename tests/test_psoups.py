"""examples/psoups.py (the paper's experiment 2) and its judge (examples/judge.py).

The judge's scores are checked on sentences counted by hand; pair labelling on answers whose scores are known;
the experiment end to end on a tiny random LLaMA whose "sampled" answers are written into the cache beforehand
(so the pairs, their labels and the arms' bookkeeping are known), in a few seconds.
"""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("vaderSentiment")
pytest.importorskip("pyphen")

import data  # noqa: E402
from examples import judge, psoups  # noqa: E402
from tests.helpers import toy_setup  # noqa: E402

SIMPLE = "The cat sat on the mat. It was happy."  # 9 words, 2 sentences, 10 syllables (hap-py)
EXPERT = ("Photosynthesis constitutes the biochemical mechanism whereby chlorophyll-containing organisms "
          "transform electromagnetic radiation into chemical energy.")


def test_syllables_and_reading_grade_by_hand():
    assert [judge.syllables(w) for w in ("cat", "happy", "water", "photosynthesis")] == [1, 2, 2, 5]
    # 0.39 * 9/2 + 11.8 * 10/9 - 15.59
    assert judge.reading_grade(SIMPLE) == pytest.approx(0.39 * 4.5 + 11.8 * 10 / 9 - 15.59)
    assert judge.reading_grade("Dogs run") == pytest.approx(0.39 * 2 + 11.8 * 2 / 2 - 15.59)  # one sentence, no stop
    assert judge.reading_grade(EXPERT) > 20 > 0 > judge.reading_grade(SIMPLE)
    assert judge.reading_grade("") == 0.0


def test_information_and_friendliness():
    assert judge.information(SIMPLE) == 9 and judge.information("It's 3 o'clock, isn't it?") == 4
    assert judge.friendliness("The box is on the table.") == 0.0  # no word of VADER's lexicon
    assert judge.friendliness("I love this, you are wonderful!") > 0.5
    assert judge.friendliness("This is a stupid question and I hate it.") < -0.5


def test_pairs_are_labelled_by_the_pole_with_a_margin():
    assert judge.label("P1A", EXPERT, SIMPLE) == (SIMPLE, EXPERT)
    assert judge.label("P1B", EXPERT, SIMPLE) == (EXPERT, SIMPLE)
    short, longer = "Yes.", "Yes. " + "It rains a lot here in the spring. " * 2  # 1 word against 17
    assert judge.label("P2A", short, longer) == (short, longer) and judge.label("P2B", short, longer) == (longer, short)
    nine = "one two three four five six seven eight nine"
    assert judge.label("P2B", nine, "Yes.") is None  # 8 words apart: a near-tie at the margin of 10
    assert judge.label("P2B", nine, "Yes.", margin=5) == (nine, "Yes.")
    assert judge.compare("P3A", "Thanks, you are great!", "Go away, you idiot.") == 1
    assert judge.compare("P3B", "Thanks, you are great!", "Go away, you idiot.") == -1
    assert judge.win_rate("P2A", ["a b", "a", "a b c"], ["a", "a", "a"]) == pytest.approx((0 + 0.5 + 0) / 3)


# The answers every hint "writes" in the end-to-end test: each pole's answer is clearly its pole's.
HINT_ANSWERS = {"instruct": "It is a thing that many people know about.",
                "P1A": SIMPLE, "P1B": EXPERT, "P2A": "It is fine.",
                "P2B": "It has a long history. " * 5 + "Many people study it and write about it every year.",
                "P3A": "What a wonderful question, I love it! You are great.",
                "P3B": "This is a stupid question and I hate it. Go away."}


def test_preference_pairs_follow_the_judge_and_the_shares():
    questions = [f"Explain thing {i}." for i in range(200)]
    answers = {h: {q: {"text": t, "finished": True} for q in questions} for h, t in HINT_ANSWERS.items()}
    answers["P2A"][questions[0]] = {"text": "It has a long history. " * 6, "finished": True}  # a near-tie with P2B
    who = psoups.users_of("profiles")
    pairs, ties = psoups.preference_pairs(questions, answers, who, seed=0, balanced=False, share=0.7)
    answers["P1A"][questions[1]] = {"text": "No sentence end here", "finished": False}  # whole sentences: ""
    assert psoups.pair_text(answers["P1A"][questions[1]]) == ""
    pairs, ties = psoups.preference_pairs(questions, answers, who, seed=0, balanced=False, share=0.7)
    assert ties["P2A"] == 1 and ties["P1A"] == 1 and sum(ties.values()) <= 4  # B poles judged them too, or not
    counts = {p: sum(x.group == p for x in pairs) + ties[p] for p in judge.PROFILES}
    for a, b in psoups.DIMENSION_POLES.values():  # the A pole judges every prompt, the B pole about 3 in 7
        assert counts[a] == 200 and 200 * 3 / 7 - 20 <= counts[b] <= 200 * 3 / 7 + 20
    for x in pairs:  # each user chose their own pole's answer, for the question alone (no hint)
        assert x.user == f"u-{x.group}" and x.chosen == HINT_ANSWERS[x.group]
        assert x.prompt in {psoups.chatml(q) for q in questions}
    valid, _ = psoups.preference_pairs(questions[2:4], answers, who, seed=0, balanced=True)
    assert len(valid) == 2 * 6 and {x.user for x in valid} == set(who)
    agreement = psoups.judge_agreement(questions, answers)
    assert agreement["P2"] == {"agree": 199, "disagree": 0, "near_tie": 1, "empty": 0, "agreement": 1.0}
    assert agreement["P1"] == {"agree": 199, "disagree": 0, "near_tie": 0, "empty": 1, "agreement": 1.0}


def test_psoups_end_to_end_in_small(tmp_path, monkeypatch, capsys):
    """The profiles configuration on a tiny random LLaMA: pairs from the cached answers, both arms trained,
    every known user answered on every held-out prompt, win rates and quality computed; a rerun reuses it all."""
    d = toy_setup(tmp_path, pairs_per_user=1, n_valid_per_user=1, n_unseen_users=0)
    small = {**psoups.PSOUPS, "train_prompts": 6, "valid_prompts": 3, "max_new_tokens": 6,
             "train": {**psoups.PSOUPS["train"], "max_steps": 2, "batch_size": 4}}
    monkeypatch.setattr(psoups, "PSOUPS", small)
    questions = psoups.make_questions(9)
    cache = {h: {q: {"text": t, "finished": True} for q in questions} for h, t in HINT_ANSWERS.items()}
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(cache))
    out = tmp_path / "psoups"
    r = psoups.psoups_demo(out=str(out), quiet=True, model_dir=str(d / "base"), precision="fp32", answers=str(answers))
    assert r["judge"]["pairs"]["valid"] == 18  # no near-tie: 3 prompts x 6 users
    assert 18 <= r["judge"]["pairs"]["train"] <= 36  # 6 prompts x 3 dimensions x (A pole, sometimes B)
    assert all(a["agreement"] == 1.0 for a in r["judge"]["agreement_valid"].values())
    train_pairs = data.read_pairs(out / "profiles" / "data" / "train.jsonl")
    assert all(p.chosen == HINT_ANSWERS[p.group] and p.user == f"u-{p.group}" for p in train_pairs)
    for method in ("dpo", "pdpo"):
        assert set(r[method]["groups"]) == set(judge.PROFILES)
        assert all(g["pairs"] == 3 for g in r[method]["groups"].values())
        gens = [json.loads(line) for line in open(out / "profiles" / method / "generations.jsonl")]
        assert len(gens) == 18 and all(g["response_tokens"] <= 6 for g in gens)
    for arm in ("instruct", "prompting"):  # the cached answers, as each user's
        assert r["answers"][arm]["u-P1B"]["answers"][0]["response"] == HINT_ANSWERS[arm if arm == "instruct" else "P1B"]
    # prompting's P1B answer is the expert one: a random tiny model's text can't read harder (it has no sentence end,
    # so its grade counts all words as one sentence, but 6 tokens are a few short words)
    assert r["win_rates"]["u-P1B"]["prompting"]["P1B"] < 0.5
    assert all(0 <= w <= 1 for u in r["win_rates"].values() for o in u.values() for w in o.values())
    assert json.loads((out / "profiles" / "results.json").read_text())["seed"] == 0
    before = answers.stat().st_mtime_ns
    again = psoups.psoups_demo(out=str(out), quiet=True, model_dir=str(d / "base"), precision="fp32",
                               answers=str(answers))
    assert answers.stat().st_mtime_ns == before
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in r.items() if k != "seconds"}
    assert "win vs dpo" in capsys.readouterr().out

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import psoups_seeds

    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "seed-0").symlink_to(out)  # the run above, read as seed 0: nothing trains again
    _, checks = psoups_seeds.main(["--seeds", "0", "--workdir", str(tmp_path / "seeds")])
    wins = [r["win_rates"][f"u-{p}"]["dpo"][p] for p in judge.PROFILES]
    assert checks[0]["win_vs_dpo_0.7_mean"] == (sum(wins) / 6 >= 0.7)
    assert checks[0]["pdpo_accuracy_0.8"] == all(g["accuracy"] >= 0.8 for g in r["pdpo"]["groups"].values())
    assert checks[0]["dpo_minority_0.5"] == all(r["dpo"]["groups"][p]["accuracy"] <= 0.5 for p in ("P1B", "P2B", "P3B"))
    assert "targets met on seeds" in capsys.readouterr().out


def test_bad_eval_prompts_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "prompts.json"
    bad.write_text('[{"question": "no prompt field"}]')
    with pytest.raises(SystemExit) as e:
        psoups.read_eval_prompts(str(bad))
    assert e.value.code != 0
    assert "--eval-prompts" in capsys.readouterr().err


@pytest.mark.parametrize("users", ["composite", "user-info"])
def test_other_configurations_end_to_end_in_small(users, tmp_path, monkeypatch):
    """--users composite (8 users, one pole per dimension, pairs on all three) and --users user-info (implicit,
    explicit, both; seen and unseen users with informative and vague lines) on the tiny random LLaMA."""
    d = toy_setup(tmp_path, pairs_per_user=1, n_valid_per_user=1, n_unseen_users=0)
    small = {**psoups.PSOUPS, "train_prompts": 4, "valid_prompts": 2, "max_new_tokens": 4,
             "train": {**psoups.PSOUPS["train"], "max_steps": 1, "batch_size": 4}}
    monkeypatch.setattr(psoups, "PSOUPS", small)
    questions = psoups.make_questions(6)
    combos = {"-".join(c): HINT_ANSWERS["P3A"] for c in psoups.users_of("composite").values()}
    cache = {h: {q: {"text": t, "finished": True} for q in questions} for h, t in {**HINT_ANSWERS, **combos}.items()}
    (tmp_path / "answers.json").write_text(json.dumps(cache))
    r = psoups.psoups_demo(out=str(tmp_path / "psoups"), quiet=True, model_dir=str(d / "base"), precision="fp32",
                           users=users, answers=str(tmp_path / "answers.json"))
    valid = data.read_pairs(tmp_path / "psoups" / users / "data" / "valid.jsonl")
    if users == "composite":
        assert len(r["users"]) == 8 and len(valid) == 2 * 8 * 3  # every user judges every dimension
        assert set(r["pdpo"]["groups"]) == {u[2:] for u in r["users"]}
        assert all(set(w["dpo"]) == set(r["users"][u]) for u, w in r["win_rates"].items())  # one rate per pole
    else:
        assert {"dpo", "implicit", "explicit", "both"} <= set(r) and "win_rates" not in r
        groups = set(r["both"]["groups"])
        assert groups == {f"{s}-{how}-{p}" for s in ("seen", "unseen") for how in ("informative", "vague")
                          for p in judge.PROFILES}
        texts = {p.user: p.user_text for p in valid}
        assert texts["u-P1A-informative"] == psoups.DESCRIPTIONS["P1A"][0]
        assert texts["new-P1A-informative"] == psoups.DESCRIPTIONS["P1A"][1]
        assert texts["new-P1A-vague"] in psoups.VAGUE
        args = json.loads((tmp_path / "psoups" / users / "explicit" / "args.json").read_text())
        assert args["user_info"] == "explicit" and args["user_model"] == "uniform"


def test_eval_prompts_are_answered_and_judged(tmp_path, monkeypatch, capsys):
    """--eval-prompts FILE: each known user's answers to those prompts, win rates on them (not trained on)."""
    d = toy_setup(tmp_path, pairs_per_user=1, n_valid_per_user=1, n_unseen_users=0)
    small = {**psoups.PSOUPS, "train_prompts": 4, "valid_prompts": 2, "max_new_tokens": 4,
             "train": {**psoups.PSOUPS["train"], "max_steps": 1, "batch_size": 4}}
    monkeypatch.setattr(psoups, "PSOUPS", small)
    extra = ["List three protocols of the TCP/IP model.", "Why is the sky blue?"]
    (tmp_path / "prompts.json").write_text(json.dumps([{"prompt": q} for q in extra]))
    questions = psoups.make_questions(6) + extra
    cache = {h: {q: {"text": t, "finished": True} for q in questions} for h, t in HINT_ANSWERS.items()}
    (tmp_path / "answers.json").write_text(json.dumps(cache))
    r = psoups.psoups_demo(out=str(tmp_path / "psoups"), quiet=True, model_dir=str(d / "base"), precision="fp32",
                           eval_prompts=str(tmp_path / "prompts.json"), answers=str(tmp_path / "answers.json"))
    assert r["eval_prompts"]["prompts"] == 2 and set(r["eval_prompts"]["win_rates"]) == set(r["users"])
    gens = [json.loads(line) for line in open(tmp_path / "psoups" / "profiles" / "pdpo" / "generations.jsonl")]
    assert len(gens) == 6 * 2  # generations.jsonl keeps the held-out questions only
    # the cached prompting answer to an extra prompt is the expert one: nothing a tiny model says reads harder
    assert r["eval_prompts"]["win_rates"]["u-P1B"]["prompting"]["P1B"] < 0.5
    assert r["eval_prompts"]["answers"]["prompting"]["u-P2A"]["answers"][0] == {"question": extra[0],
                                                                               "response": HINT_ANSWERS["P2A"]}
    assert "--eval-prompts (2 prompts)" in capsys.readouterr().out
