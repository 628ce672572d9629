"""The built-in toy tasks: synthetic preference data that needs no download (the demo runs on them: demo.py).

  length  70% of users prefer the long answer, 30% the short one (make_toy_task): PAPER.md experiment 1
          in miniature, conflicting length preferences;
  style   three groups (50 / 30 / 20%) want the same answer in different styles (make_style_task).

    python -m examples.toy --out DIR [--task style]     # write a task's train.jsonl and valid.jsonl
    python -m examples.toy --out DIR --new-user NAME    # a new short-preferring user's pairs

Reading order: the tasks' words and answers, the tasks, their tokenizer corpus, a new user for `adapt.py` (and --curve),
a run's answers sorted into the kinds, the command line.
"""
from __future__ import annotations

import dataclasses
import random
import re
import sys
from pathlib import Path

import adapt
import cli
import data
import eval as evaluation
import runs
from data import Pair

# ----------------------------------------------------------------------------------------------------
# The tasks: conflicting length preferences, and three styles
# ----------------------------------------------------------------------------------------------------

NOUNS = """apple river stone cloud garden bread forest candle mountain window ocean bridge lantern pencil
rabbit violin desert castle meadow harbor island market needle orchard piano planet pocket rocket saddle
shadow tunnel valley wagon kitten ladder mirror basket blanket button cabin camera canyon carpet cherry
compass cookie cotton dragon engine feather fountain glacier guitar hammer helmet honey insect jacket
jungle kettle lemon magnet marble melon muffin museum napkin noodle orange paddle parrot pebble pepper
pillow pirate puzzle quilt radio ribbon robot salad scooter spider spoon statue sugar teapot ticket
tomato towel tractor trumpet turtle umbrella village walnut whistle wizard zebra""".split()
ADJECTIVES = """bright calm quiet gentle heavy ancient modern tiny huge warm cold soft rough smooth sharp
golden green purple noisy silent happy clever brave lazy busy famous simple strange useful lovely shiny
dusty sweet bitter fresh humble proud rare wild tidy fancy plain spicy sleepy curious""".split()

PROMPTS = (
    "Tell me about the {x}.",
    "What is the {x} like?",
    "Describe the {x}.",
    "Say something about the {x}.",
)
# Both answers open alike, "The {x} is {a}.", then part at one decision: stop (EOS), or go on with
# "There is much more ...", deterministically, so a length preference is learned at that decision.
# (Opening the answers with different words that occur nowhere else, say "Briefly," / "Well,", fails
# on a tiny model: SFT never tells those two embeddings apart, and DPO lowers both together.)
_SHORT = "The {x} is {a}."  # 4 words
_LONG = "The {x} is {a}. There is much more to say about the {x} today."  # 14 words


# The second toy task: one answer in three styles, told apart by one style word in its middle, all as
# long as each other: a preference that is not about length. (With a second style word at the end, the
# demo's P-DPO often answered "indeed ... forever": DPO can win a pair's margin at the second word by
# making the rejected answer's own continuation unlikely, which leaves the first decision unlearned.)
_STYLES = {
    "formal": "The {x} is {a}, indeed, and the {x} remains {a}.",
    "casual": "The {x} is {a}, like, and the {x} remains {a}.",
    "poetic": "The {x} is {a}, alas, and the {x} remains {a}.",
}
TOY_KINDS = {"length": {"short": _SHORT, "long": _LONG}, "style": _STYLES}  # task -> answer kind -> template


def _toy_example(rng: random.Random, task: str = "length") -> tuple[str, dict[str, str]]:
    """(prompt, {answer kind: response}) about a random topic."""
    x, a = rng.choice(NOUNS), rng.choice(ADJECTIVES)
    prompt = rng.choice(PROMPTS).format(x=x)
    return prompt, {kind: template.format(x=x, a=a) for kind, template in TOY_KINDS[task].items()}


def toy_answer_kind(task: str, topic: str, response: str) -> str | None:
    """Which kind of `task`'s answers `response` is, about `topic` (the x of "The {x} is ..."), with any
    of the task's adjectives; None for anything else (a broken answer: empty, cut, repeated words)."""
    for kind, template in TOY_KINDS[task].items():
        pattern = re.escape(template).replace(re.escape("{x}"), re.escape(topic))
        pattern = pattern.replace(re.escape("{a}"), r"(?P<a>\w+)", 1).replace(re.escape("{a}"), r"(?P=a)")
        match = re.fullmatch(pattern, response.strip())
        if match and match["a"] in ADJECTIVES:
            return kind
    return None


def toy_topic(answer: str) -> str:
    """The x of a toy answer "The {x} is ..."."""
    match = re.match(r"\s*The (\w+) is", answer)
    if match is None:
        raise ValueError(f"{answer!r}: not an answer of the toy tasks")
    return match[1]


def _toy_pairs(rng: random.Random, users: dict[str, str], n_per_user: int, group: str | None,
               task: str = "length") -> list[Pair]:
    """`n_per_user` pairs per user, chosen by the user's preference (rejected: another kind, drawn
    when there are several); group=None labels each pair with the preferred kind."""
    pairs = []
    for user, prefers in users.items():
        for _ in range(n_per_user):
            prompt, answers = _toy_example(rng, task)
            others = [kind for kind in answers if kind != prefers]
            rejected = others[0] if len(others) == 1 else rng.choice(others)
            pairs.append(Pair(user, " " + prompt, " " + answers[prefers], " " + answers[rejected],
                              group=group or prefers))
    return pairs


def _assign_preferences(names: list[str], minority_share: float, rng: random.Random) -> dict[str, str]:
    """Exactly round(minority_share * len(names)) users, chosen at random, prefer short answers."""
    minority = set(rng.sample(names, round(minority_share * len(names))))
    return {name: "short" if name in minority else "long" for name in names}


def make_toy_task(
    seed: int = 0,
    n_users: int = 10,
    minority_share: float = 0.3,
    pairs_per_user: int = 60,
    n_valid_per_user: int = 20,
    n_unseen_users: int = 4,
) -> tuple[list[Pair], list[Pair]]:
    """A synthetic version of the paper's conflicting length preferences, deterministic in `seed`.

    Prompts ask about a topic ("Tell me about the kettle."); each pair holds a SHORT answer
    ("The kettle is warm.", 4 words) and a LONG one ("The kettle is warm. There is much more ...", 14 words).
    Known users user_01.. are split
    exactly: round(minority_share * n_users) prefer short (group "short", the minority), the rest
    long (group "long"). Validation holds `n_valid_per_user` new pairs per known user, plus as many
    for each of `n_unseen_users` users new_01.. (never in training, group "unseen"), split between
    long and short in the same proportion as the known users.
    Texts start with a space so a byte-level BPE sees every word in its " word" form. With a BPE of
    vocab_size 768 trained on `toy_corpus_texts`, the longest row is about 40 tokens (400: about 67).
    """
    rng = random.Random(seed)
    known = _assign_preferences([f"user_{i:02d}" for i in range(1, n_users + 1)], minority_share, rng)
    unseen = _assign_preferences([f"new_{i:02d}" for i in range(1, n_unseen_users + 1)], minority_share, rng)
    train = _toy_pairs(rng, known, pairs_per_user, group=None)
    valid = _toy_pairs(rng, known, n_valid_per_user, group=None)
    valid += _toy_pairs(rng, unseen, n_valid_per_user, group="unseen")
    return train, valid


def assign_shares(names: list[str], shares: dict[str, float], rng: random.Random) -> dict[str, str]:
    """Users in random order, then round(share * n) of them per kind in the order given (the last
    kind takes the rest)."""
    order, out, start = rng.sample(names, len(names)), {}, 0
    for i, (kind, share) in enumerate(shares.items()):
        stop = len(names) if i == len(shares) - 1 else start + round(share * len(names))
        out.update({name: kind for name in order[start:stop]})
        start = stop
    return dict(sorted(out.items()))


STYLE_SHARES = {"formal": 0.5, "casual": 0.3, "poetic": 0.2}


def make_style_task(
    seed: int = 0,
    n_users: int = 10,
    shares: dict[str, float] = STYLE_SHARES,
    pairs_per_user: int = 60,
    n_valid_per_user: int = 20,
    n_unseen_users: int = 4,
) -> tuple[list[Pair], list[Pair]]:
    """A second toy task, three groups of unequal size that want one answer in different styles.

    "The kettle is warm, indeed, and the kettle remains warm." (formal, 50% of users), "..., like, ..."
    (casual, 30%), "..., alas, ..." (poetic, 20%): every answer has 10 words, and the style word comes
    after the opening. Each pair's rejected answer is one of the two other
    styles. Known users user_01.. get exact shares (groups = their style); validation as make_toy_task,
    with unseen users new_01.. (group "unseen") in the same proportions.
    """
    rng = random.Random(seed)
    known = assign_shares([f"user_{i:02d}" for i in range(1, n_users + 1)], shares, rng)
    unseen = assign_shares([f"new_{i:02d}" for i in range(1, n_unseen_users + 1)], shares, rng)
    train = _toy_pairs(rng, known, pairs_per_user, group=None, task="style")
    valid = _toy_pairs(rng, known, n_valid_per_user, group=None, task="style")
    valid += _toy_pairs(rng, unseen, n_valid_per_user, group="unseen", task="style")
    return train, valid


TOY_TASKS = {"length": make_toy_task, "style": make_style_task}


def toy_corpus_texts(seed: int = 0, n_examples: int = 2000, task: str = "length") -> list[str]:
    """Prompts and answers written like the toy task's (with leading spaces), plus every word once,
    to train the toy BPE tokenizer."""
    rng = random.Random(seed)
    texts = [" " + " ".join(NOUNS + ADJECTIVES)]
    for _ in range(n_examples):
        prompt, answers = _toy_example(rng, task)
        texts.extend(" " + text for text in (prompt, *answers.values()))
    return texts


def toy_user_pairs(name: str, n_train: int, n_held_out: int, seed: int) -> tuple[list, list]:
    """A fresh toy-task user (make_toy_task) who prefers the SHORT answer: the minority, so the
    generic embedding, fitted mostly to the long-preferring majority, serves them poorly."""
    fit, held_out = make_toy_task(seed=seed, n_users=1, minority_share=1.0, pairs_per_user=n_train,
                                       n_valid_per_user=n_held_out, n_unseen_users=0)
    rename = lambda ps: [dataclasses.replace(p, user=name, group="short") for p in ps]  # noqa: E731
    return rename(fit), rename(held_out)


# ----------------------------------------------------------------------------------------------------
# A run's answers, sorted into the task's kinds (the demo's table, experiments/task_family.py)
# ----------------------------------------------------------------------------------------------------


def preferred_answers(run_dir: Path, valid_pairs: list, kind_of, quiet: bool = True, max_new_tokens: int = 40) -> dict:
    """Accuracy per group (RUN/eval.json), and the greedy answer to every held-out prompt as its pair's user,
    sorted by kind_of(pair, answer) into a group's kind or "broken": "answers as preferred" is the share of
    known users' answers of their own group's kind; "clean" the share of all answers of some kind."""
    run = runs.load_run(run_dir)
    items, _ = data.tokenize_pairs(valid_pairs, run.tokenizer, 96, 32)
    gens = evaluation.generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items,
                                         max_new_tokens=max_new_tokens,
                                         desc=None if quiet else f"generating ({run_dir.name})")
    for g, item in zip(gens, items):
        g["kind"] = kind_of(valid_pairs[item.index], g["response"]) or "broken"
        g["as_preferred"] = None if g["group"] == "unseen" else g["kind"] == g["group"]

    def as_preferred(answers):  # known users' answers of their own kind
        known = [g["as_preferred"] for g in answers if g["as_preferred"] is not None]
        return {"answers_as_preferred": sum(known) / len(known) if known else None}

    groups = evaluation.answers_by_group(run_dir, gens, as_preferred)
    clean = sum(g["kind"] != "broken" for g in gens)
    return {"groups": groups, "clean_answers": clean / len(gens), "answers": len(gens)}


def toy_curve(run_dir, name: str = "toy_new_user", held_out: int = 40, seed: int = 0, **options) -> dict:
    """adapt.py --curve for a fresh toy-task user who prefers short answers (the minority, for whom e_0 is
    poor): fitted on 1, 4, 16 and 64 of their pairs, scored on `held_out` more."""
    fit_pairs, held_pairs = toy_user_pairs(name, max(adapt.CURVE_SIZES), held_out, seed=1000 + seed)
    return adapt.adapt_curve(run_dir, name, fit_pairs, held_pairs, "toy task, a new user who prefers short answers",
                             seed=seed, **options)


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m examples.toy", description="Write a built-in toy task's train.jsonl and "
                            "valid.jsonl; or, with --curve RUN_DIR, adapt a fresh toy user to a run from 1, 4, 16 and "
                            "64 pairs.")
    p.add_argument("--out", help="output directory (required unless --curve)")
    p.add_argument("--task", choices=list(TOY_TASKS), default="length")
    p.add_argument("--new-user", metavar="NAME", help="instead: 16 pairs (and 40 held out) of one new user who "
                   "prefers short answers, for `adapt.py RUN --user NAME --data OUT/train.jsonl`")
    p.add_argument("--curve", metavar="RUN_DIR", help="held-out accuracy of a fresh toy user (--user, default "
                   "toy_new_user) after 1, 4, 16, 64 pairs, against e_0; writes RUN_DIR/adapt_curve.json")
    p.add_argument("--user", default="toy_new_user", help="the fresh user's name, with --curve")
    held_out = cli.Number(int, 1)
    p.add_argument("--held-out", type=held_out, default=40,
                   help=f"held-out pairs of the toy user, {held_out} (default: %(default)s)")
    adapt.curve_flags(p)
    runs.common_flags(p)
    args = p.parse_args(argv)
    if args.curve:
        try:
            r = toy_curve(args.curve, args.user, args.held_out, seed=args.seed, reference=args.reference,
                          steps=args.steps, lr=args.lr, device=args.device, quiet=args.quiet)
        except (ValueError, FileNotFoundError) as e:
            runs.fail(str(e))
        adapt.print_curve(r, args.curve)
    elif not args.out:
        p.error("--out is required (or --curve RUN_DIR)")
    elif args.new_user:
        data.write_split(args.out, *toy_user_pairs(args.new_user, 16, 40, seed=1000 + args.seed))
    else:
        data.write_split(args.out, *TOY_TASKS[args.task](seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
