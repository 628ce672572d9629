"""A family of toy preference tasks: random members, so a claim about P-DPO is checked on many tasks, not one.

Every member is written like the demo's toy tasks (examples/toy.py: make_toy_task, make_style_task): a prompt asks
about a topic ("Tell me about the kettle."), and each answer kind is a template "The {x} is {a}, ..." whose
placeholders are the topic x, an adjective a, or a word drawn from a named word set. Each user group prefers one
kind; a pair's rejected answer is another kind. What tells the kinds apart is drawn per member, per contrast:

- length: the short kind keeps the first words of the long kind's body;
- scattered style: marker words of the kind's style ("indeed", "thus", ...) at every gap-th word of the body,
  among neutral words, across the whole response (kind "plain": neutral words only);
- position marker: one word at one position (the demo's style task is this with three markers);
- topic words: the body's words come from the kind's topic set (food, animals, weather, music).

    task = make_task(3)                      # a random member, deterministic in its seed
    task.train, task.valid                   # data.Pair lists; valid: known users' held-out pairs, unseen users'
    task.classify("kettle", answer)          # the group whose kind the answer is, or None (a broken answer)
    task.corpus_texts()                      # texts for the BPE tokenizer
    task.language_pairs(1000)                # pairs from nobody, every topic and kind: SFT data beside task.train

`from_toy("length")` and `from_toy("style")` are the demo's two tasks as members. `make_task(0, **ISSUE_26)` is
the task of issue #26 (50/30/20%: two opposite scattered styles, and "shorter").

Members without a template (`make_bag_task(seed)`, issue #35): an answer is a few unordered words, some from the
kind's topic or style set among filler words, of a random length, ending in the kind's ending ("." / "?" / "!", or a
last marker word), so the preferred and the rejected answer part at their first word, and a preference can be
decided at the very end. `Task.kind_of(pair, answer)` sorts an answer of either family into a group.
"""
from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass, field

from data import Pair
from examples.toy import ADJECTIVES, NOUNS, PROMPTS, STYLE_SHARES, TOY_KINDS, assign_shares

# ----------------------------------------------------------------------------------------------
# Word pools: disjoint from each other and from the topics and adjectives of the toy tasks

NEUTRAL = """and so then still also just quite very rather often here there now again much more some many
each other well soon once yet even only both such""".split()
MARKERS = """indeed like alas hence verily dude thus wow lo behold totally nay yea hark gosh yikes forsooth
okay basically literally thereby moreover""".split()
TOPICS = {"food": "soup cake rice pasta pie tea".split(), "animals": "cat dog horse goat owl fox".split(),
          "weather": "rain snow wind fog storm sun".split(), "music": "drum flute song tune harp bell".split()}
AXES = ("length", "scattered", "position", "topic")
ISSUE_26 = dict(shares=[0.5, 0.3, 0.2], axes=["scattered", "length"],
                combos=[{"scattered": "A", "length": "long"}, {"scattered": "B", "length": "long"},
                        {"scattered": "plain", "length": "short"}],
                n_users=20, pairs_per_user=48)


# ----------------------------------------------------------------------------------------------
# A member: answer templates per group, the word sets they draw from, users and their shares


@dataclass
class Task:
    """One preference task. kinds: group -> answer template; shares: group -> share of users (in order);
    word_sets: name -> words for a placeholder {name}; describe: group -> what the group wants."""

    kinds: dict[str, str]
    shares: dict[str, float]
    word_sets: dict[str, list[str]] = field(default_factory=dict)
    describe: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    n_users: int = 10
    pairs_per_user: int = 60
    n_valid_per_user: int = 20
    n_unseen_users: int = 4
    train: list[Pair] = field(default_factory=list)
    valid: list[Pair] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)  # known user -> group
    _patterns: dict = field(default_factory=dict, repr=False, compare=False)  # topic -> group -> regex

    @staticmethod
    def slots(template: str) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]

    def answers(self, rng: random.Random) -> tuple[str, dict[str, str]]:
        """(prompt, {group: answer}) about a random topic; the j-th set-drawn word of every kind uses the same
        draw, so the kinds share their neutral words and differ only where their attributes differ. Draws
        x, a and the prompt as examples.toy._toy_example does, so a member without word sets gives the toy's pairs."""
        x, a = rng.choice(NOUNS), rng.choice(ADJECTIVES)
        prompt = rng.choice(PROMPTS).format(x=x)
        n = max([sum(s in self.word_sets for s in self.slots(t)) for t in self.kinds.values()] + [0])
        draws = [rng.randrange(1 << 30) for _ in range(n)]
        marker_draw = rng.randrange(1 << 30) if n else 0
        out = {}
        for group, template in self.kinds.items():
            words, j, text = {"x": x, "a": a}, 0, ""
            for literal, name, _, _ in string.Formatter().parse(template):
                text += literal
                if name in self.word_sets:  # an inserted marker takes no draw: the words after it stay aligned
                    draw = marker_draw if name.startswith("marker") else draws[j]
                    text += self.word_sets[name][draw % len(self.word_sets[name])]
                    j += not name.startswith("marker")
                elif name:
                    text += words[name]
            out[group] = text
        return prompt, out

    def pattern(self, template: str, topic: str) -> re.Pattern:
        """The template as a regex for answers about `topic`: any adjective (the same at each {a}), any word of
        each set."""
        regex, seen_a = "", False
        for literal, name, _, _ in string.Formatter().parse(template):
            regex += re.escape(literal)
            if name == "x":
                regex += re.escape(topic)
            elif name == "a":
                regex += "(?P=a)" if seen_a else "(?P<a>" + "|".join(ADJECTIVES) + ")"
                seen_a = True
            elif name:
                regex += "(?:" + "|".join(map(re.escape, self.word_sets[name])) + ")"
        return re.compile(regex)

    def classify(self, topic: str, response: str) -> str | None:
        """The group whose kind `response` is (about `topic`), or None: empty, cut, repeated or mixed words."""
        patterns = self._patterns.setdefault(topic, {g: self.pattern(t, topic) for g, t in self.kinds.items()})
        found = [g for g, p in patterns.items() if p.fullmatch(response.strip())]
        return found[0] if len(found) == 1 else None

    @staticmethod
    def topic(answer: str) -> str:
        """The x of an answer "The {x} is ..."."""
        match = re.match(r"\s*The (\w+) is", answer)
        if match is None:
            raise ValueError(f"{answer!r}: not an answer of this family")
        return match[1]

    def pairs(self, rng: random.Random, users: dict[str, str], n_per_user: int, group: str | None) -> list[Pair]:
        """As examples.toy._toy_pairs: per user, pairs with the preferred kind chosen, another kind rejected."""
        out = []
        for user, prefers in users.items():
            for _ in range(n_per_user):
                prompt, answers = self.answers(rng)
                others = [g for g in answers if g != prefers]
                rejected = others[0] if len(others) == 1 else rng.choice(others)
                out.append(Pair(user, " " + prompt, " " + answers[prefers], " " + answers[rejected],
                                group=group or prefers))
        return out

    def make_pairs(self) -> "Task":
        """Fill train and valid (as examples.toy.make_style_task: exact shares; unseen users in the same shares)."""
        rng = random.Random(self.seed)
        known = assign_shares([f"user_{i:02d}" for i in range(1, self.n_users + 1)], self.shares, rng)
        unseen = assign_shares([f"new_{i:02d}" for i in range(1, self.n_unseen_users + 1)], self.shares, rng)
        self.users = known
        self.train = self.pairs(rng, known, self.pairs_per_user, None)
        self.valid = self.pairs(rng, known, self.n_valid_per_user, None)
        self.valid += self.pairs(rng, unseen, self.n_valid_per_user, "unseen")
        return self

    def language_pairs(self, n: int) -> list[Pair]:
        """n pairs from nobody ("anyone"): a prompt about a random topic, two different kinds at random. What a
        pretrained LM would bring: the member's language with every topic, no preference (both responses are
        learned by an SFT on both). A from-scratch LM names no topic it never saw answered (docs/user_embeddings.md)."""
        rng = random.Random(self.seed + 2)
        out = []
        for _ in range(n):
            prompt, answers = self.answers(rng)
            first, second = rng.sample(sorted(answers), 2)
            out.append(Pair("anyone", " " + prompt, " " + answers[first], " " + answers[second], group="language"))
        return out

    def corpus_texts(self, n_examples: int = 2000) -> list[str]:
        """Prompts and every kind's answers (leading spaces, as in the pairs), plus every word once."""
        rng = random.Random(self.seed + 1)
        texts = [" " + " ".join(NOUNS + ADJECTIVES + sorted({w for ws in self.word_sets.values() for w in ws}))]
        for _ in range(n_examples):
            prompt, answers = self.answers(rng)
            texts.extend(" " + text for text in (prompt, *answers.values()))
        return texts

    def kind_of(self, pair: Pair, response: str) -> str | None:
        """The group whose kind `response` to pair's prompt is, or None (broken)."""
        return self.classify(self.topic(pair.chosen), response)

    @staticmethod
    def subject(pair: Pair) -> str:
        """The object x the prompt asks about ("Tell me about the {x}.")."""
        return re.search(r"the (\w+)", pair.prompt)[1]

    def summary(self) -> str:
        return ", ".join(f"{g} {self.shares[g]:.0%} ({self.describe.get(g, self.kinds[g])})" for g in self.kinds)


def from_toy(name: str, seed: int = 0) -> Task:
    """The demo's toy tasks as members: "length" (70% long, 30% short) and "style" (50/30/20%). The style task
    gives exactly examples.toy.make_style_task's pairs; the length task the same answers, with its users drawn by
    assign_shares instead of examples.toy._assign_preferences (same shares, other users in each group)."""
    shares = {"long": 0.7, "short": 0.3} if name == "length" else dict(STYLE_SHARES)
    return Task(kinds=dict(TOY_KINDS[name]), shares=shares, seed=seed).make_pairs()


# ----------------------------------------------------------------------------------------------
# Random members


def _draw_shares(rng: random.Random, n_groups: int) -> list[float]:
    """Shares, largest first; the smallest in [0.15, 0.30] (at most 1 / n_groups), the others random above it."""
    smallest = rng.uniform(0.15, min(0.30, 1 / n_groups))
    weights = [rng.random() for _ in range(n_groups - 1)]
    rest = 1 - n_groups * smallest  # what is left after every group has the smallest share
    shares = [smallest + rest * w / sum(weights) for w in weights] + [smallest]
    return sorted(shares, reverse=True)


AXIS_VALUES = {"length": ["long", "short"], "scattered": ["A", "B", "C", "plain"],
               "position": ["P1", "P2", "P3", "none"], "topic": list(TOPICS)}


def _draw_combos(rng: random.Random, axes: list[str], n_groups: int) -> list[dict]:
    everything = [{}]
    for axis in axes:
        everything = [{**c, axis: v} for c in everything for v in AXIS_VALUES[axis]]
    return rng.sample(everything, n_groups)


def _template(combo: dict, body_length: int, short_length: int, gap: int, position: int) -> tuple[str, str]:
    """(template, description) of one kind: "The {x} is {a}, " then the body of set-drawn words, then "."."""
    n = short_length if combo.get("length") == "short" else body_length
    body = [combo.get("topic", "neutral")] * n
    style = combo.get("scattered", "plain")
    if style != "plain":
        body = [f"style{style}" if i % gap == gap - 1 else w for i, w in enumerate(body)]
    if combo.get("position", "none") != "none":
        body.insert(min(position, len(body)), f"marker{combo['position']}")
    text = "The {x} is {a}, " + " ".join("{" + w + "}" for w in body) + "."
    return text, " ".join(f"{axis} {value}" for axis, value in combo.items())


def make_task(seed: int, **overrides) -> Task:
    """A random member, deterministic in (seed, overrides). Overrides (drawn when not given): n_groups (2-4),
    shares (largest first), axes (which attributes tell the kinds apart, 1-2 of AXES), combos (one dict
    axis -> value per group), body_length, short_length, gap (of the scattered markers), position (of the
    one marker), n_neutral (neutral words in the vocabulary), n_markers (per scattered style), n_users,
    pairs_per_user, n_valid_per_user, n_unseen_users."""
    rng = random.Random(seed)

    def pick(name, draw):
        return overrides[name] if name in overrides else draw()

    unknown = set(overrides) - {"n_groups", "shares", "axes", "combos", "body_length", "short_length", "gap",
                                "position", "n_neutral", "n_markers", "n_users", "pairs_per_user",
                                "n_valid_per_user", "n_unseen_users"}
    if unknown:
        raise ValueError(f"make_task: unknown overrides {sorted(unknown)}")
    shares = pick("shares", lambda: _draw_shares(rng, pick("n_groups", lambda: rng.choice([2, 3, 4]))))
    n_groups = len(shares)

    def draw_axes():
        while True:
            axes = rng.sample(AXES, rng.choice([1, 2]))
            if math.prod(len(AXIS_VALUES[a]) for a in axes) >= n_groups:
                return axes

    axes = pick("axes", draw_axes)
    combos = pick("combos", lambda: _draw_combos(rng, axes, n_groups))
    body_length = pick("body_length", lambda: rng.randint(6, 10))
    gap = pick("gap", lambda: rng.choice([2, 3]))
    short_length = pick("short_length", lambda: rng.randint(gap, body_length // 2))  # holds a scattered marker
    position = pick("position", lambda: rng.randint(0, short_length))
    n_neutral = pick("n_neutral", lambda: rng.randint(4, len(NEUTRAL)))
    n_markers = pick("n_markers", lambda: rng.randint(1, 3))
    markers = rng.sample(MARKERS, 3 * n_markers + 3)
    word_sets = {"neutral": rng.sample(NEUTRAL, n_neutral), **TOPICS,
                 **{f"style{s}": markers[i * n_markers:(i + 1) * n_markers] for i, s in enumerate("ABC")},
                 **{f"marker{p}": [markers[3 * n_markers + i]] for i, p in enumerate(["P1", "P2", "P3"])}}
    kinds, describe = {}, {}
    for combo in combos:
        template, text = _template(combo, body_length, short_length, gap, position)
        name = "-".join(str(v) for v in combo.values())
        kinds[name], describe[name] = template, text
    if len(set(kinds.values())) < len(kinds):
        raise ValueError(f"make_task({seed}): two groups want the same answers ({combos})")
    used = {s for t in kinds.values() for s in Task.slots(t)}
    smallest = min(shares)
    n_users = pick("n_users", lambda: rng.randint(max(10, math.ceil(2.5 / smallest)), 20))
    task = Task(kinds=kinds, shares=dict(zip(kinds, shares)), seed=seed, describe=describe,
                word_sets={k: v for k, v in word_sets.items() if k in used}, n_users=n_users,
                pairs_per_user=pick("pairs_per_user", lambda: max(32, rng.choice([24, 32, 48]))),  # 24: too few to SFT
                n_valid_per_user=pick("n_valid_per_user", lambda: 8),
                n_unseen_users=pick("n_unseen_users", lambda: 4))
    return task.make_pairs()


# ----------------------------------------------------------------------------------------------
# Members without a template (issue #35): unordered words, random lengths, markers at the end

BAG_AXES = {"words": [*TOPICS, "any"], "end": ["stop", "question", "exclaim", "endword"], "style": ["A", "B", "plain"],
            "size": ["short", "long"]}
ENDINGS = {"stop": ".", "question": "?", "exclaim": "!"}  # "endword": the member's end marker word, then "."
SIZES = {"short": (3, 6), "long": (8, 13)}  # words before the ending, when drawn
ACCEPTED = {"short": (1, 6), "long": (8, 20), None: (1, 20)}  # when judged: greedy answers of unordered words are
# shorter than the drawn ones (the likeliest few words, then the ending): a kind without a size axis takes any length
ISSUE_35 = dict(shares=[0.55, 0.30, 0.15], axes=["words", "end"],  # issue #35's task 2: animals, food, "?" last
                combos=[{"words": "animals", "end": "stop"}, {"words": "food", "end": "stop"},
                        {"words": "any", "end": "question"}], n_users=20, pairs_per_user=48)


@dataclass
class BagTask(Task):
    """A member whose kinds are combos {axis: value} (BAG_AXES) instead of templates. An answer of a kind: n words
    (its size's range, or every size's when the member has no size axis), 1-3 of them from its topic set ("any": one
    topic at random), 1-2 markers of its style, the rest distinct filler words, in random order; then its ending
    (".", "?", "!", or the end marker word and "."; ENDINGS). Kinds are told apart by the answer's words, not by where they
    stand: classify accepts an answer of in-vocabulary words whose features (BagTask.features) fit exactly one kind."""

    combos: dict[str, dict] = field(default_factory=dict)  # group -> {axis: value}

    def answers(self, rng: random.Random) -> tuple[str, dict[str, str]]:
        x = rng.choice(NOUNS)
        prompt = rng.choice(PROMPTS).format(x=x)
        out = {}
        for group, combo in self.combos.items():
            for _ in range(100):  # "any" may land on another group's topic: draw again until only this kind fits
                text = self.draw_answer(rng, combo)
                if self.classify(None, text) == group:
                    break
            else:
                raise ValueError(f"bag member {self.seed}: kind {group} ({combo}) cannot be told from the others")
            out[group] = text
        return prompt, out

    def draw_answer(self, rng: random.Random, combo: dict) -> str:
        lo, hi = SIZES[combo["size"]] if "size" in combo else (SIZES["short"][0], SIZES["long"][1])
        n = rng.randint(lo, hi)
        topic = combo.get("words")
        words = []
        if topic is not None:
            topic = rng.choice(list(TOPICS)) if topic == "any" else topic
            words += rng.sample(self.word_sets[topic], rng.randint(1, min(3, n - 1)))
        if combo.get("style", "plain") != "plain":
            words += rng.sample(self.word_sets[f"style{combo['style']}"], min(rng.randint(1, 2), n - len(words)))
        words += rng.sample(self.word_sets["neutral"], n - len(words))
        rng.shuffle(words)
        end = combo.get("end", "stop")
        return " ".join(words) + (f" {self.word_sets['end'][0]}." if end == "endword" else ENDINGS[end])

    def features(self, response: str) -> dict | None:
        """{axis: value} of an answer, or None when it is broken (empty, unknown words, no ending). A word may repeat, as
        a template member's set words may ("cake cake pie"): greedy decoding of unordered words often does."""
        text = response.strip()
        if len(text) < 2 or text[-1] not in ".?!" or text[-2] == " ":
            return None
        words = text[:-1].split()
        known = {w for ws in self.word_sets.values() for w in ws}
        if not words or not set(words) <= known:
            return None
        end = {v: k for k, v in ENDINGS.items()}[text[-1]]
        if end == "stop" and words[-1] in self.word_sets["end"]:
            end, words = "endword", words[:-1]
        elif set(words) & set(self.word_sets["end"]):
            return None  # the end marker anywhere but last
        topics = [t for t in TOPICS if set(words) & set(self.word_sets[t])]
        styles = [s for s in "AB" if set(words) & set(self.word_sets[f"style{s}"])]
        return {"words": topics[0] if len(topics) == 1 else "none" if not topics else "mixed", "end": end,
                "style": styles[0] if len(styles) == 1 else "plain" if not styles else "mixed", "n": len(words)}

    def fits(self, f: dict, combo: dict) -> bool:
        lo, hi = ACCEPTED[combo.get("size")]
        if not lo <= f["n"] <= hi or f["end"] != combo.get("end", "stop"):
            return False
        if combo.get("style", "plain") != f["style"]:
            return False
        words = combo.get("words")
        return f["words"] == "none" if words is None else f["words"] in TOPICS if words == "any" else f["words"] == words

    def classify(self, topic, response: str) -> str | None:
        """The group whose kind `response` is, or None (broken, or fitting no kind or several). topic: unused."""
        f = self.features(response)
        found = [g for g, combo in self.combos.items() if f is not None and self.fits(f, combo)]
        return found[0] if len(found) == 1 else None

    def kind_of(self, pair: Pair, response: str) -> str | None:
        return self.classify(None, response)

    def summary(self) -> str:
        return ", ".join(f"{g} {self.shares[g]:.0%}" for g in self.combos)


def make_bag_task(seed: int, **overrides) -> BagTask:
    """A random member without a template, deterministic in (seed, overrides). Overrides (drawn when not given):
    shares (largest first; 2-3 groups), axes (1-3 of BAG_AXES: several at once make pairs that differ in several
    places), combos (group -> {axis: value}), n_neutral, n_users, pairs_per_user, n_valid_per_user, n_unseen_users."""
    rng = random.Random(10_000 + seed)  # a stream of its own: make_task(seed) stays as it was
    unknown = set(overrides) - {"shares", "axes", "combos", "n_neutral", "n_users", "pairs_per_user",
                                "n_valid_per_user", "n_unseen_users"}
    if unknown:
        raise ValueError(f"make_bag_task: unknown overrides {sorted(unknown)}")

    def pick(name, draw):
        return overrides[name] if name in overrides else draw()

    shares = pick("shares", lambda: _draw_shares(rng, rng.choice([2, 3])))
    axes = pick("axes", lambda: rng.sample(sorted(BAG_AXES), rng.choice([1, 2, 2, 3])))
    combos = pick("combos", lambda: _draw_bag_combos(rng, axes, len(shares)))
    markers = rng.sample(MARKERS, 5)
    word_sets = {"neutral": rng.sample(NEUTRAL, pick("n_neutral", lambda: rng.randint(14, len(NEUTRAL)))), **TOPICS,
                 "styleA": markers[0:2], "styleB": markers[2:4], "end": markers[4:5]}
    names = ["-".join(str(v) for v in c.values()) for c in combos]
    smallest = min(shares)
    task = BagTask(kinds={n: n for n in names}, shares=dict(zip(names, shares)), seed=seed, word_sets=word_sets,
                   describe={n: " ".join(f"{a} {v}" for a, v in c.items()) for n, c in zip(names, combos)},
                   combos=dict(zip(names, combos)),
                   n_users=pick("n_users", lambda: rng.randint(max(10, math.ceil(2.5 / smallest)), 20)),
                   pairs_per_user=pick("pairs_per_user", lambda: rng.choice([32, 48])),
                   n_valid_per_user=pick("n_valid_per_user", lambda: 8),
                   n_unseen_users=pick("n_unseen_users", lambda: 4))
    return task.make_pairs()


def _draw_bag_combos(rng: random.Random, axes: list[str], n_groups: int) -> list[dict]:
    """n_groups distinct combos over `axes`; "words: any" only beside an axis where it differs from every other."""
    while True:
        combos = _draw_combos_from(rng, {a: BAG_AXES[a] for a in axes}, n_groups)
        if all(c.get("words") != "any" or all(any(c[a] != d[a] for a in axes if a != "words") for d in combos if d is not c)
               for c in combos):
            return combos


def _draw_combos_from(rng: random.Random, values: dict[str, list], n_groups: int) -> list[dict]:
    everything = [{}]
    for axis, vs in values.items():
        everything = [{**c, axis: v} for c in everything for v in vs]
    return rng.sample(everything, n_groups)

