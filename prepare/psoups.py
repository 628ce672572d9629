"""Personalized Soups (PAPER.md, experiment 2), from P-SOUPS' data/rm_training/P1A.json .. P3B.json
(downloaded by you): six users, each the preference instruction that wrote their comparisons; the
instruction is removed from the prompt, so only the user's identity tells the preferences apart.

    python -m prepare.psoups --dir P-SOUPS/data/rm_training --out data/psoups
"""
import os
import random
import re
import sys
from pathlib import Path
from typing import Sequence

import cli
import data
from data import DataError, Pair, json_type, read_jsonl_records
from prepare import convert_and_write


# The preference instruction appended to each P-SOUPS question, per user (profile); the released
# data and code spell P2A/P2B both with and without a comma.
PSOUPS_PREFERENCES = {
    "P1A": ("Generate a response that can be easily understood by an elementary school student.",),
    "P1B": ("Generate a response that only a PhD Student in that specific field could understand.",),
    "P2A": (
        "Generate a response that is concise and to the point, without being verbose.",
        "Generate a response that is concise and to the point without being verbose.",
    ),
    "P2B": (
        "Generate a response that is very informative, without missing any background information.",
        "Generate a response that is very informative without missing any background information.",
    ),
    "P3A": ("Generate a response that is friendly, witty, funny, and humorous, like a close friend.",),
    "P3B": ("Generate a response in an unfriendly manner.",),
}


def _remove_preference(user_input: str, user: str) -> tuple[str, bool]:
    """The question without its preference sentence; True if the known sentence was not found and
    the last sentence was dropped instead (when there is more than one)."""
    text = user_input.strip()
    for sentence in PSOUPS_PREFERENCES[user]:
        if sentence in text:
            return text.replace(sentence, "", 1).strip(), False
    boundaries = list(re.finditer(r"(?<=[.!?])\s+(?=\S)", text))
    return (text[: boundaries[-1].start()] if boundaries else text), True


def _read_psoups_records(path: Path) -> list[dict]:
    """A JSON list of records, or JSON Lines (both appear in copies of the data)."""
    if not path.exists():
        raise DataError(f"{path}: file not found (expected P1A.json .. P3B.json of P-SOUPS data/rm_training)")
    if data.read_text(path).lstrip().startswith("["):
        records = data.read_json(path)
        if not isinstance(records, list) or not records:
            got = "an empty list" if isinstance(records, list) else f"a {json_type(records)}"
            raise DataError(f"{path}: expected a JSON list of records, got {got}")
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        numbered = read_jsonl_records(path, "records")
        records, where = [r for _, r in numbered], [f"{path}:{n}" for n, _ in numbered]
    for record, place in zip(records, where):
        for field in ("user_input", "completion_a", "completion_b"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(
                    f"{place}: needs string fields user_input, completion_a (preferred), completion_b"
                )
    return records


def psoups_to_pairs(
    rm_training_dir: str | os.PathLike, *, seed: int = 0, valid_fraction: float = 0.1
) -> tuple[list[Pair], list[Pair], dict]:
    """Personalized Soups comparisons from `rm_training_dir/{P1A,...,P3B}.json` (records with
    user_input, completion_a = preferred, completion_b).

    Users are the six profiles P1A..P3B (group = the same name). The preference sentence is removed
    from each question (known sentences in PSOUPS_PREFERENCES; otherwise the last sentence, counted
    in stats["fallback_removals"]), so the preference must be learned from feedback. Prompt format
    of Tulu: "<|user|>\\n{question}\\n<|assistant|>\\n". Duplicates (same user, prompt, chosen,
    rejected) are removed. The split is seeded and by question: `valid_fraction` of the distinct
    questions, with all their pairs, go to validation, so no validation question is seen in training.
    """
    pairs, fallbacks, duplicates, seen = [], 0, 0, set()
    for user in PSOUPS_PREFERENCES:
        for record in _read_psoups_records(Path(rm_training_dir) / f"{user}.json"):
            question, fell_back = _remove_preference(record["user_input"], user)
            fallbacks += fell_back
            pair = Pair(
                user=user,
                prompt=f"<|user|>\n{question}\n<|assistant|>\n",
                chosen=record["completion_a"].strip(),
                rejected=record["completion_b"].strip(),
                group=user,
            )
            key = (pair.user, pair.prompt, pair.chosen, pair.rejected)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            pairs.append(pair)

    questions = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(questions)
    valid_questions = set(questions[: round(valid_fraction * len(questions))])
    train = [p for p in pairs if p.prompt not in valid_questions]
    valid = [p for p in pairs if p.prompt in valid_questions]
    stats = {
        "train": len(train),
        "valid": len(valid),
        "questions": len(questions),
        "valid_questions": len(valid_questions),
        "duplicates_removed": duplicates,
        "fallback_removals": fallbacks,
    }
    return train, valid, stats



def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m prepare.psoups",
                            description="Personalized Soups rm_training/P1A.json..P3B.json -> pairs")
    p.add_argument("--dir", required=True, help="the P-SOUPS data/rm_training directory")
    p.add_argument("--out", required=True, help="output directory")
    seed = cli.Number(int, 0)
    p.add_argument("--seed", type=seed, default=0, help=f"seed of the split by question; {seed} (default: %(default)s)")
    args = p.parse_args(argv)
    return convert_and_write(lambda: psoups_to_pairs(args.dir, seed=args.seed), args.out)


if __name__ == "__main__":
    sys.exit(main())
