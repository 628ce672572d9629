"""PRISM (PAPER.md, experiment 3, v3): real users, their survey answers as user text, and multi-turn
conversations, from PRISM's survey.jsonl and conversations.jsonl (downloaded by you).

    python -m prepare.prism --dir PRISM --out data/prism [--stated-prefs top-rated|shown-first]
"""
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cli
from data import DataError, Pair, json_field, json_type, read_jsonl_records
from prepare import convert_and_write


# The eight rated attributes of survey.jsonl's `stated_prefs` (0-100 sliders, "It is important that an
# AI language model ..."); "other" (always shown last, with free text in other_text) is left out.
PRISM_ATTRIBUTES = (
    "values", "creativity", "fluency", "factuality", "diversity", "safety", "personalisation", "helpfulness",
)
# Survey fields of the user text after the stated preferences, in the reference code's order.
# system_string, the participant's own instruction to a model, is left out, as there.
PRISM_PROFILE = (
    ("self_description", "Self-description"), ("age", "Age"), ("gender", "Gender"), ("education", "Education"),
    ("employment_status", "Employment"), ("marital_status", "Marital status"),
    ("english_proficiency", "English proficiency"),
)
PRISM_EMPTY = "EMPTY STRING"  # how PRISM stores an empty model response
# Llama 3 chat messages, as the reference code writes its PRISM prompts.
_CHAT_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_CHAT_END = "<|eot_id|>\n"


def _prism_stated_prefs(survey: dict, where: str, rule: str) -> list[str]:
    """The three attributes the user text names. "top-rated": the three the user rated highest (ties: the
    one shown first). "shown-first", the reference code's: order_stated_prefs 1-3, in the order shown,
    which the codebook says is a random display order, not a ranking."""
    ratings = json_field(survey, "stated_prefs", "object", where)
    order = json_field(survey, "order_stated_prefs", "object", where)
    for attribute in PRISM_ATTRIBUTES:
        json_field(ratings, attribute, "number", f"{where}: stated_prefs")
        json_field(order, attribute, "integer", f"{where}: order_stated_prefs")
    if rule == "shown-first":
        return sorted((a for a in PRISM_ATTRIBUTES if order[a] <= 3), key=order.get)
    return sorted(PRISM_ATTRIBUTES, key=lambda a: (-ratings[a], order[a]))[:3]


def prism_user_text(survey: dict, where: str, stated_prefs: str = "top-rated") -> str:
    """A fixed English rendering of one survey.jsonl record, one line per field; empty fields are left out:

        User information:
        Stated preferences: factuality, helpfulness, safety
        Self-description: ...
        Age: 25-34 years old
        ... Gender, Education, Employment, Marital status, English proficiency
    """
    preferences = ", ".join(_prism_stated_prefs(survey, where, stated_prefs))
    lines = ["User information:", f"Stated preferences: {preferences}"]
    for name, label in PRISM_PROFILE:
        if survey.get(name) is not None and json_field(survey, name, "string", where).strip():
            lines.append(f"{label}: {survey[name].strip()}")
    return "\n".join(lines) + "\n"


def _read_prism_survey(path: Path, stated_prefs: str) -> dict[str, str]:
    """user_id -> user text, for participants who went on to the conversations."""
    texts = {}
    for lineno, survey in read_jsonl_records(path, "survey records"):
        where = f"{path}:{lineno}"
        user = json_field(survey, "user_id", "string", where)
        if survey.get("num_completed_conversations") != 0:  # 0: survey only, never in conversations.jsonl
            texts[user] = prism_user_text(survey, where, stated_prefs)
    return texts


@dataclass
class _PrismResponse:
    content: str
    score: float
    chosen: bool  # if_chosen: rated highest by the user (ties broken at random by PRISM)


@dataclass
class _PrismTurn:
    user: str | None  # the user's message
    responses: list[_PrismResponse]


def _prism_turns(conversation: dict, where: str) -> list[_PrismTurn]:
    """conversation_history grouped by `turn`, in turn order; each turn needs one user message."""
    turns: dict[int, _PrismTurn] = {}
    for i, message in enumerate(json_field(conversation, "conversation_history", "list", where)):
        at = f"{where}: conversation_history[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected an object with turn, role, content, got a {json_type(message)}")
        turn = turns.setdefault(json_field(message, "turn", "integer", at), _PrismTurn(None, []))
        content, role = json_field(message, "content", "string", at), message.get("role")
        if role == "user":
            turn.user = content
        elif role == "model":
            score, chosen = json_field(message, "score", "number", at), json_field(message, "if_chosen", "boolean", at)
            turn.responses.append(_PrismResponse(content, score, chosen))
        else:
            raise DataError(f"{at}: field 'role' must be 'user' or 'model', got {role!r}")
    for number, turn in turns.items():
        if turn.user is None:
            raise DataError(f"{where}: turn {number} has no message with role 'user'")
    return [turns[t] for t in sorted(turns)]


def _is_empty(text: str) -> bool:
    return text.strip() in ("", PRISM_EMPTY)


def _prism_choice(turn: _PrismTurn, counts: Counter) -> tuple[_PrismResponse | None, list[_PrismResponse]]:
    """(chosen, rejected responses) of a turn. Chosen = the response with if_chosen (the best scored if
    several have it); rejected = each other response, except ties in score and empty responses."""
    flagged = [r for r in turn.responses if r.chosen]
    if not flagged:
        counts["turns_without_chosen"] += 1
        return None, []
    counts["turns_several_chosen"] += len(flagged) > 1
    chosen = max(flagged, key=lambda r: r.score)  # the first of equals
    rejected = []
    for response in turn.responses:
        if response is chosen:
            continue
        if _is_empty(chosen.content) or _is_empty(response.content):
            counts["skipped_empty"] += 1
        elif response.score == chosen.score:
            counts["skipped_tie"] += 1
        else:
            rejected.append(response)
    return chosen, rejected


def _chat(role: str, content: str) -> str:
    return _CHAT_HEADER.format(role=role) + content + _CHAT_END


def _prism_prompt(earlier: str, user_message: str, budget: int) -> tuple[str, bool]:
    """(prompt, whether it was cut): the conversation so far ending with the assistant header. `earlier`
    (previous user messages and chosen replies) is cut from the LEFT to fit `budget` characters,
    mid-message if need be, as the reference code does; the current user message is always kept whole."""
    current = _chat("user", user_message) + _CHAT_HEADER.format(role="assistant")
    room = max(budget - len(current), 0)
    kept = earlier[max(len(earlier) - room, 0):] if room else ""
    return kept + current, len(kept) < len(earlier)


def _prism_conversation_pairs(conversation: dict, where: str, user: str, user_text: str, budget: int,
                              counts: Counter) -> list[Pair]:
    """The pairs of one conversation, turn by turn; the chosen reply joins the history of later turns."""
    pairs, earlier = [], ""
    for turn in _prism_turns(conversation, where):
        counts["turns"] += 1
        chosen, rejected = _prism_choice(turn, counts)
        prompt, cut = _prism_prompt(earlier, turn.user, budget)
        counts["prompts_cut"] += cut and bool(rejected)
        pairs += [Pair(user, prompt, chosen.content, r.content, user_text=user_text) for r in rejected]
        earlier += _chat("user", turn.user)
        if chosen is not None:
            earlier += _chat("assistant", "" if _is_empty(chosen.content) else chosen.content)
    return pairs


def _prism_split(by_user: dict[str, list[list[Pair]]], seed: int, seen_fraction: float,
                 train_fraction: float) -> tuple[list[Pair], list[Pair], Counter]:
    """The reference code's split, seeded: int(seen_fraction * users) users, shuffled, are seen, and
    int(train_fraction * k) of each one's k conversations, shuffled, go to training, the rest to
    validation. A seen user with one conversation would train on none (int(0.9) = 0), so is unseen,
    as the reference code makes them. Unseen users appear only in validation. Sets group "seen" / "unseen"."""
    rng = random.Random(seed)
    users = sorted(by_user)
    rng.shuffle(users)
    drawn = users[: int(seen_fraction * len(users))]
    seen = {u for u in drawn if len(by_user[u]) > 1}
    train, valid = [], []
    for user in users:
        conversations = list(by_user[user])
        n_train = 0
        if user in seen:
            rng.shuffle(conversations)
            n_train = int(train_fraction * len(conversations))
        for i, pairs in enumerate(conversations):
            for pair in pairs:
                pair.group = "seen" if user in seen else "unseen"
            (train if i < n_train else valid).extend(pairs)
    counts = Counter(users_seen=len(seen), users_unseen=len(users) - len(seen),
                     unseen_with_one_conversation=len(drawn) - len(seen))
    return train, valid, counts


def prism_to_pairs(
    prism_dir: str | os.PathLike,
    *,
    stated_prefs: str = "top-rated",
    max_prompt_chars: int = 1500,
    seed: int = 0,
    seen_fraction: float = 0.9,
    train_fraction: float = 0.9,
) -> tuple[list[Pair], list[Pair], dict]:
    """PRISM (HannahRoseKirk/prism-alignment) from `prism_dir/survey.jsonl` and `conversations.jsonl`,
    built as the reference code builds its PRISM task, with the departures stated here.

    - user = user_id; user_text = prism_user_text of the user's survey (stated preferences by
      `stated_prefs`: "top-rated", or the reference code's "shown-first"; see _prism_stated_prefs).
    - One pair per turn and rejected response: chosen = the response with if_chosen, rejected = each
      other response of the turn (up to 3 at turn 0, 1 later). Ties in score and responses stored as
      "EMPTY STRING" are skipped (the reference code keeps both) and counted.
    - Prompt: earlier user messages and chosen replies, then the current user message, in Llama 3
      chat format ending with "<|start_header_id|>assistant<|end_header_id|>\\n\\n", cut from the left
      so that user text + prompt fit `max_prompt_chars` (see _prism_prompt): implicit, explicit and
      both runs then see the same prompts. The reference code's 1500 characters are about 500 tokens.
    - Split by _prism_split; conversations without any pair are dropped first (counted).
    Returns train, valid (pairs with group "seen" / "unseen") and counts.
    """
    if stated_prefs not in ("top-rated", "shown-first"):
        raise ValueError(f"stated_prefs={stated_prefs!r}: expected 'top-rated' or 'shown-first'")
    directory = Path(prism_dir)
    for name in ("survey.jsonl", "conversations.jsonl"):
        if not (directory / name).exists():  # a directory of that name: read_jsonl_records says so
            raise DataError(
                f"{directory / name}: file not found (expected PRISM's survey.jsonl and conversations.jsonl)"
            )
    texts = _read_prism_survey(directory / "survey.jsonl", stated_prefs)
    counts, by_user = Counter(), {}
    path = directory / "conversations.jsonl"
    for lineno, conversation in read_jsonl_records(path, "conversations"):
        where = f"{path}:{lineno}"
        user = json_field(conversation, "user_id", "string", where)
        if user not in texts:
            raise DataError(f"{where}: user_id {user!r} has no survey in {directory / 'survey.jsonl'} "
                            f"(or one with num_completed_conversations 0)")
        budget = max_prompt_chars - len(texts[user])
        pairs = _prism_conversation_pairs(conversation, where, user, texts[user], budget, counts)
        counts["conversations"] += 1
        if pairs:
            by_user.setdefault(user, []).append(pairs)
        else:
            counts["conversations_without_pairs"] += 1
    if not by_user:
        raise DataError(f"{path}: no usable pairs in {counts['conversations']} conversations "
                        f"({counts['skipped_tie']} ties, {counts['skipped_empty']} empty responses skipped)")
    train, valid, split_counts = _prism_split(by_user, seed, seen_fraction, train_fraction)
    counts.update(split_counts)
    stats = {"train": len(train), "valid": len(valid),
             "valid_unseen": sum(p.group == "unseen" for p in valid)}
    names = ("users_seen", "users_unseen", "unseen_with_one_conversation", "conversations",
             "conversations_without_pairs", "turns", "turns_without_chosen", "turns_several_chosen",
             "skipped_tie", "skipped_empty", "prompts_cut")
    return train, valid, {**stats, **{name: counts[name] for name in names}}



def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m prepare.prism",
                            description="PRISM survey.jsonl + conversations.jsonl -> pairs with user text")
    p.add_argument("--dir", required=True, help="folder with PRISM's survey.jsonl and conversations.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--stated-prefs", choices=["top-rated", "shown-first"], default="top-rated", help=(
        "which three stated_prefs attributes the user text names: top-rated (default), the three the user "
        "rated highest; shown-first, the reference code's, the three shown first (order_stated_prefs 1-3, "
        "a random display order per PRISM's codebook, not a ranking)"))
    max_prompt_chars, seed = cli.Number(int, 1), cli.Number(int, 0)
    p.add_argument("--max-prompt-chars", type=max_prompt_chars, default=1500, help=(
        "characters of user text + prompt (the reference code's 1500, about 500 tokens); earlier turns are cut "
        f"from the left, the current user message is kept whole; {max_prompt_chars} (default: %(default)s)"))
    p.add_argument("--seed", type=seed, default=0,
                   help=f"seed of the user and conversation split; {seed} (default: %(default)s)")
    args = p.parse_args(argv)
    return convert_and_write(lambda: prism_to_pairs(args.dir, stated_prefs=args.stated_prefs,
                                                    max_prompt_chars=args.max_prompt_chars, seed=args.seed), args.out)


if __name__ == "__main__":
    sys.exit(main())
