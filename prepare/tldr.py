"""Reddit TL;DR with conflicting length preferences (PAPER.md, experiment 1), from OpenAI's
summarize_from_feedback comparison files (`batch*.jsonl`, downloaded by you).

Known users are the most active workers; each prefers the longer or the shorter of two summaries of
one post (with probability p_long, seeded), so the same kind of pair gets opposite labels from different
users, as in the paper and its reference code.

    python -m prepare.tldr --comparisons batch*.jsonl --out data/tldr [--valid FILES] [--n-users 10]
"""
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import cli
from data import DataError, Pair, json_field, json_type, read_jsonl_records
from prepare import convert_and_write


def _is_supervised(policy: str) -> bool:
    """Summaries sampled from the supervised (SFT) policies, not from PPO ones or the CNN/DM models."""
    return "sup" in policy and "ppo" not in policy and "cnn" not in policy


def _tldr_prompt(info: dict) -> str:
    lines = []
    if info.get("subreddit"):  # absent for CNN/DM articles
        lines.append(f"SUBREDDIT: r/{info['subreddit']}")
    if info.get("title"):
        lines.append(f"TITLE: {info['title']}")
    post = info.get("post") or info.get("article") or ""
    lines.append(f"POST: {post.strip()}")
    lines.append("TL;DR:")
    return "\n".join(lines)


@dataclass
class _Comparison:
    worker: str
    prompt: str
    longer: str
    shorter: str


def _tldr_comparison(record: dict, where: str) -> _Comparison | str:
    """Parse one comparison record; return the reason as a string if it is skipped."""
    info, worker = json_field(record, "info", "object", where), json_field(record, "worker", "string", where)
    for name in ("subreddit", "title", "post", "article"):
        if info.get(name) is not None and not isinstance(info[name], str):
            raise DataError(f"{where}: info: field {name!r} must be a string or null, got {json_type(info[name])}")
    summaries = record.get("summaries")
    if not (
        isinstance(summaries, list)
        and len(summaries) == 2
        and all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries)
    ):
        raise DataError(f"{where}: field 'summaries' must be a list of two objects with 'text' and 'policy'")
    if not all(_is_supervised(str(s.get("policy", ""))) for s in summaries):
        return "not_supervised"
    a, b = (s["text"].strip() for s in summaries)
    if len(a) == len(b):
        return "equal_length"
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return _Comparison(worker, _tldr_prompt(info), longer, shorter)


def _tldr_split(record: dict, default: str) -> str:
    """'train', 'valid' or 'other' (e.g. 'test') from the record's 'split' field, if it has one."""
    split = record.get("split")
    if split is None:
        return default
    return "train" if split == "train" else "valid" if str(split).startswith("valid") else "other"


def _tldr_pair(c: _Comparison, group: str, prefers: str) -> Pair:
    # The reference code prepends a space to the summary, so it reads "TL;DR: text".
    chosen, rejected = (c.longer, c.shorter) if prefers == "long" else (c.shorter, c.longer)
    return Pair(user=c.worker, prompt=c.prompt, chosen=" " + chosen, rejected=" " + rejected, group=group)


# Why a record is not used, as the converter's messages say it.
_TLDR_SKIP_REASONS = {
    "not_supervised": "not both from supervised policies (e.g. PPO vs supervised, or CNN/DM models)",
    "equal_length": "summaries of equal length",
}
_TLDR_ROLES = {"train": "training", "valid": "validation", "other": "of another split (e.g. test)"}


@dataclass
class _TldrFiles:
    """What a set of comparison files held: usable comparisons per role ("train", "valid"), how many
    records went to each role ("train", "valid", "other"), and per role the skipped ones by reason."""

    comparisons: dict
    roles: Counter
    skipped: dict


def _read_tldr_comparisons(paths: Sequence, default: str, use_split_field: bool) -> _TldrFiles:
    """Read comparison files whose records are `default` ("train" or "valid") data, or go where their
    `split` field says."""
    files = _TldrFiles({"train": [], "valid": []}, Counter(), {"train": Counter(), "valid": Counter()})
    for path in paths:
        for lineno, record in read_jsonl_records(path, "comparison records"):
            role = _tldr_split(record, default) if use_split_field else default
            parsed = _tldr_comparison(record, f"{path}:{lineno}")
            files.roles[role] += 1
            if role == "other":
                continue
            if isinstance(parsed, str):
                files.skipped[role][parsed] += 1
            else:
                files.comparisons[role].append(parsed)
    return files


def _no_comparisons_error(role: str, paths: Sequence, files: _TldrFiles, by_split: bool, hint: str) -> DataError:
    """Why there is nothing for `role`: where the records of `paths` went, why those of `role` were skipped."""
    word = _TLDR_ROLES[role]
    total = sum(files.roles.values())
    text = f"no {word} comparisons in {', '.join(map(str, paths))}: {total} record{'s' * (total != 1)}"
    if total:
        text += ", " + ", ".join(f"{n} {_TLDR_ROLES[r]}" for r, n in sorted(files.roles.items()) if n)
        text += " by their 'split' field" if by_split else ""
    if files.skipped[role]:
        reasons = ", ".join(f"{n} {_TLDR_SKIP_REASONS[r]}" for r, n in sorted(files.skipped[role].items()))
        text += f"; every {word} record was skipped: {reasons}"
    return DataError(f"{text}; {hint}")


def _tldr_preferences(workers: Sequence[str], p_long: float, rng: random.Random) -> dict[str, str]:
    """In the given order, each worker prefers "long" with probability p_long, else "short"."""
    return {worker: "long" if rng.random() < p_long else "short" for worker in workers}


def tldr_to_pairs(
    comparison_paths: Sequence[str | os.PathLike],
    *,
    valid_paths: Sequence[str | os.PathLike] = (),
    n_users: int = 10,
    p_long: float = 0.7,
    seed: int = 0,
    unseen_majority: bool = False,
) -> tuple[list[Pair], list[Pair], dict]:
    """The paper's "conflicting length preferences" task from `openai/summarize_from_feedback`
    comparison files (JSON Lines; records with info, summaries, worker, and optionally split).

    - Only comparisons where both summaries come from supervised policies are kept (as the reference
      code filters). Summaries of equal length in characters are skipped and counted
      (stats["skipped_equal_length"]); the reference code keeps them with the first summary chosen.
      The human's own `choice` is not used.
    - Train/valid: records of `valid_paths` are validation data and those of `comparison_paths`
      training data; without `valid_paths`, each record's `split` decides ("train" / "valid1",
      "valid2"; other splits are skipped; a record without one counts as training data).
    - Known users: the `n_users` workers with most kept training comparisons (ties by worker id).
      In sorted worker order, a seeded RNG makes each prefer the LONGER summary with probability
      `p_long`, else the SHORTER; group = "long" / "short". Chosen = the preferred summary.
    - Validation: known workers keep their id and preference. Every other worker keeps their id
      as `user` (the registry maps them to the generic user 0). As in the reference code, each gets
      their own preference from the same RNG (continued after the known workers, in sorted order),
      recorded in the group: "unseen-long" / "unseen-short". With `unseen_majority`, all of them are
      labelled with the majority preference instead (longer when p_long >= 0.5), group "unseen":
      what one policy for everyone should produce.
    - Prompt: "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:" (lines without a
      value left out); responses are the stripped summaries with one leading space (" " + text).
    """
    by_split = not valid_paths
    train_files = _read_tldr_comparisons(comparison_paths, "train", use_split_field=by_split)
    valid_files = train_files
    if valid_paths:
        valid_files = _read_tldr_comparisons(valid_paths, "valid", use_split_field=False)
    comparisons = {"train": train_files.comparisons["train"], "valid": valid_files.comparisons["valid"]}
    if not comparisons["train"]:
        hint = "pass training files (records with split 'train', or none) with --comparisons"
        raise _no_comparisons_error("train", comparison_paths, train_files, by_split, hint)
    if not comparisons["valid"]:
        hint = "pass --valid FILE..., or files whose records have split 'valid1' or 'valid2'"
        raise _no_comparisons_error("valid", valid_paths or comparison_paths, valid_files, by_split, hint)

    counts = Counter(c.worker for c in comparisons["train"])
    known = sorted(sorted(counts, key=lambda w: (-counts[w], w))[:n_users])
    rng = random.Random(seed)
    prefers = _tldr_preferences(known, p_long, rng)
    unseen = sorted({c.worker for c in comparisons["valid"]} - set(prefers))
    majority = "long" if p_long >= 0.5 else "short"
    if unseen_majority:
        unseen_prefers = dict.fromkeys(unseen, majority)
    else:
        unseen_prefers = _tldr_preferences(unseen, p_long, rng)

    def label(c: _Comparison) -> Pair:
        if c.worker in prefers:
            return _tldr_pair(c, group=prefers[c.worker], prefers=prefers[c.worker])
        preference = unseen_prefers[c.worker]
        return _tldr_pair(c, group="unseen" if unseen_majority else f"unseen-{preference}", prefers=preference)

    train = [label(c) for c in comparisons["train"] if c.worker in prefers]
    valid = [label(c) for c in comparisons["valid"]]
    all_skipped = train_files.skipped["train"] + valid_files.skipped["valid"]
    all_skipped["other_split"] = train_files.roles["other"]
    stats = {
        "train": len(train),
        "valid": len(valid),
        "known_users": len(known),
        "long_users": sum(p == "long" for p in prefers.values()),
        "unseen_users": len(unseen),
        "unseen_long_users": sum(p == "long" for p in unseen_prefers.values()),
        "unused_train_comparisons": len(comparisons["train"]) - len(train),
        **{f"skipped_{r}": all_skipped[r] for r in ("not_supervised", "equal_length", "other_split")},
    }
    return train, valid, stats



def main(argv: Sequence[str] | None = None) -> int:
    p = cli.ArgumentParser(prog="python -m prepare.tldr",
                            description="summarize_from_feedback comparisons -> conflicting length preferences")
    p.add_argument("--comparisons", nargs="+", required=True, help="comparison JSON Lines files (training)")
    p.add_argument("--valid", nargs="*", default=[], help="validation files; default: each record's 'split'")
    p.add_argument("--out", required=True, help="output directory")
    n_users, p_long, seed = cli.Number(int, 1), cli.Number(float, 0, 1), cli.Number(int, 0)
    p.add_argument("--n-users", type=n_users, default=10,
                   help=f"known users = top workers by count (paper: 10, 40); {n_users} (default: %(default)s)")
    p.add_argument("--p-long", type=p_long, default=0.7,
                   help=f"chance a known user prefers longer summaries; {p_long} (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=0, help=f"seed of the preferences; {seed} (default: %(default)s)")
    p.add_argument("--unseen-majority", action="store_true", help=(
        "label every unseen validation worker with the majority preference (group 'unseen'); default, as the "
        "reference code: each their own random preference with --p-long (groups 'unseen-long', 'unseen-short')"))
    args = p.parse_args(argv)
    return convert_and_write(lambda: tldr_to_pairs(args.comparisons, valid_paths=args.valid, n_users=args.n_users,
                                                   p_long=args.p_long, seed=args.seed,
                                                   unseen_majority=args.unseen_majority), args.out)


if __name__ == "__main__":
    sys.exit(main())
