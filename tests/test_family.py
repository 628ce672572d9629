"""examples/family.py: random preference tasks are deterministic, have the shares they say, classify their own
answers, and hold the demo's two toy tasks."""
import random
from collections import Counter

import pytest

from examples import family as F
from examples import toy

SEEDS = range(12)


def test_a_member_is_deterministic_in_its_seed():
    a, b, c = F.make_task(5), F.make_task(5), F.make_task(6)
    assert a.train == b.train and a.valid == b.valid and a.kinds == b.kinds
    assert a.kinds != c.kinds or a.train != c.train


def test_more_held_out_prompts_keep_the_training_pairs():
    """experiments/task_family.py --more-prompts draws a member with more held-out pairs per user: the users and the
    training pairs stay those the runs were trained on; the held-out pairs grow."""
    a, b = F.make_task(5), F.make_task(5, n_valid_per_user=32)
    assert a.train == b.train and a.users == b.users
    known = [p for p in b.valid if p.group != "unseen"]
    assert len(known) == 32 * b.n_users and len(b.valid) > len(a.valid)


@pytest.mark.parametrize("seed", [0, 7])
def test_language_pairs_cover_every_topic_and_prefer_nothing(seed):
    """experiments/task_family.py --sft-language: pairs from nobody, for the SFT only; the member's own pairs are kept."""
    task, again = F.make_task(seed), F.make_task(seed)
    pairs = task.language_pairs(1000)
    assert pairs == again.language_pairs(1000) and pairs[:10] == task.language_pairs(10)
    assert task.train == again.train and task.valid == again.valid
    assert {p.user for p in pairs} == {"anyone"} and {p.group for p in pairs} == {"language"}
    assert {task.topic(p.chosen) for p in pairs} == set(toy.NOUNS)  # so an SFT on them sees every topic answered
    kinds = Counter()
    for p in pairs:
        topic = task.topic(p.chosen)
        chosen, rejected = task.classify(topic, p.chosen), task.classify(topic, p.rejected)
        assert None not in (chosen, rejected) and chosen != rejected
        kinds[chosen] += 1
    assert set(kinds) == set(task.kinds)  # every kind chosen, in about equal numbers: no group's preference
    assert max(kinds.values()) < 1.3 * min(kinds.values()), kinds


@pytest.mark.parametrize("seed", SEEDS)
def test_group_shares_and_splits(seed):
    task = F.make_task(seed)
    assert 2 <= len(task.kinds) <= 4 and abs(sum(task.shares.values()) - 1) < 1e-9
    assert 0.15 <= min(task.shares.values()) <= 0.30 + 1e-9
    users = Counter(task.users.values())
    for group, share in task.shares.items():
        assert users[group] >= 2, (group, users)
        assert abs(users[group] - share * task.n_users) <= 1, (group, users, share)
    assert len(task.train) == task.n_users * task.pairs_per_user
    assert {p.group for p in task.valid} == set(task.kinds) | {"unseen"}
    unseen = {p.user for p in task.valid if p.group == "unseen"}
    assert len(unseen) == task.n_unseen_users and not unseen & {p.user for p in task.train}


@pytest.mark.parametrize("seed", SEEDS)
def test_every_answer_is_classified_as_its_kind(seed):
    task = F.make_task(seed)
    for p in task.train[::7] + task.valid[::7]:
        topic = task.topic(p.chosen)
        preferred = task.users.get(p.user)
        if preferred is not None:
            assert task.classify(topic, p.chosen) == preferred == p.group
        assert task.classify(topic, p.rejected) not in (None, task.classify(topic, p.chosen))
        words = p.chosen.split()
        assert task.classify(topic, " ".join(words[:-1])) is None  # a cut answer is broken
        assert task.classify(topic, p.chosen.replace(f" {topic} ", " zebra-x ")) is None  # another topic
    rng = random.Random(seed)
    for _ in range(50):  # every kind, not only those that pairs happen to contain
        _, answers = task.answers(rng)
        x = task.topic(next(iter(answers.values())))
        assert {g: task.classify(x, a) for g, a in answers.items()} == {g: g for g in answers}


def test_the_toys_are_members():
    style = F.from_toy("style", seed=3)
    train, valid = toy.make_style_task(seed=3)
    assert style.train == train and style.valid == valid  # the same pairs, rng draw for draw
    length = F.from_toy("length", seed=0)
    train, valid = toy.make_toy_task(seed=0)
    assert Counter(p.group for p in length.train) == Counter(p.group for p in train)
    for name, pairs in (("length", train + valid), ("style", toy.make_style_task(seed=0)[0])):
        member = F.from_toy(name)
        for p in pairs[::5]:
            topic = toy.toy_topic(p.chosen)
            assert member.classify(topic, p.chosen) == toy.toy_answer_kind(name, topic, p.chosen)
            assert member.classify(topic, p.rejected) == toy.toy_answer_kind(name, topic, p.rejected)
    assert F.from_toy("length").classify("kettle", " The kettle is warm. There is") is None


def test_the_issue_task_is_a_member():
    task = F.make_task(0, **F.ISSUE_26)
    assert task.shares == {"A-long": 0.5, "B-long": 0.3, "plain-short": 0.2} and task.n_users == 20
    assert Counter(task.users.values()) == {"A-long": 10, "B-long": 6, "plain-short": 4}
    with pytest.raises(ValueError, match="unknown overrides"):
        F.make_task(0, n_group=3)


# ----------------------------------------------------------------------------------------------
# Members without a template (issue #35)

BAG_SEEDS = range(12)


@pytest.mark.parametrize("seed", BAG_SEEDS)
def test_a_bag_member_classifies_its_own_answers(seed):
    """Every chosen answer is its group's kind and every rejected one another group's; answers are unordered words
    of random lengths, so y_w and y_l usually part at their first word."""
    task = F.make_bag_task(seed)
    again = F.make_bag_task(seed)
    assert task.train == again.train and task.valid == again.valid and task.combos == again.combos
    assert 2 <= len(task.kinds) <= 3 and abs(sum(task.shares.values()) - 1) < 1e-9
    first_word_differs = 0
    for p in task.train + task.valid:
        assert task.kind_of(p, p.chosen) == p.group or p.group == "unseen"
        assert task.kind_of(p, p.rejected) not in (None, task.kind_of(p, p.chosen))
        first_word_differs += p.chosen.split()[0] != p.rejected.split()[0]
    assert first_word_differs > 0.7 * len(task.train + task.valid)
    lengths = Counter(len(p.chosen.split()) for p in task.train)
    assert len(lengths) >= 3  # random lengths


def test_bag_features_by_hand():
    task = F.make_bag_task(0, **F.ISSUE_35)
    assert task.summary() == "animals-stop 55%, food-stop 30%, any-question 15%"
    filler = task.word_sets["neutral"][:3]
    end_word = task.word_sets["end"][0]
    cases = {f" {filler[0]} cat {filler[1]} dog.": "animals-stop",
             f" {filler[0]} cat cat.": "animals-stop",  # a word may repeat, as greedy answers do
             f" tea {filler[0]} {filler[1]} {filler[2]}.": "food-stop",
             f" tea {filler[0]} {filler[1]} {filler[2]}?": "any-question",
             f" {filler[0]} owl {filler[1]}?": "any-question",
             f" {filler[0]} {filler[1]} {filler[2]}?": None,  # no topic: "any" needs one
             f" tea cat {filler[0]}.": None,  # two topics
             f" cat {filler[0]}.": "animals-stop",  # greedy answers are short: without a size axis any length
             f" cat {filler[0]} {filler[1]} {end_word}.": None,  # this member has no end-word kind
             f" cat {filler[0]} kettle.": None,  # a word the member never uses
             f" cat {filler[0]} {filler[1]}": None,  # no ending
             "": None}
    for text, group in cases.items():
        assert task.classify(None, text) == group, text
    assert task.features(f" tea {filler[0]} {filler[1]} {end_word}.")["end"] == "endword"


def test_the_template_members_are_unchanged_by_the_bag_members():
    """make_bag_task draws from its own stream: make_task(seed) gives what it gave before (its first pair, pinned)."""
    task = F.make_task(3)
    assert task.summary().startswith("long-P1 76%")
    assert task.train[0] == F.Pair("user_01", " What is the scooter like?", " The scooter is warm, often thereby now "
                                   "other such often there quite other and.", " The scooter is warm, often lo now other.",
                                   group="long-P1")
    assert task.kind_of(task.train[0], task.train[0].chosen) == task.train[0].group
    assert F.Task.subject(task.train[0]) == task.topic(task.train[0].chosen)


def test_a_size_axis_judges_the_length():
    task = F.make_bag_task(0, shares=[0.6, 0.4], axes=["size"], combos=[{"size": "long"}, {"size": "short"}])
    filler = task.word_sets["neutral"]
    assert task.classify(None, " " + " ".join(filler[:3]) + ".") == "short"
    assert task.classify(None, " " + " ".join(filler[:7]) + ".") is None  # between the two sizes
    assert task.classify(None, " " + " ".join(filler[:9]) + ".") == "long"
    assert {task.kind_of(p, p.chosen) for p in task.train} == {"long", "short"}
