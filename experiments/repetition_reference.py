"""How often does text of a given length repeat a word 3-gram? The real-model example's fluency figure set
against human writing of the same lengths.

    python experiments/repetition_reference.py --runs runs/smollm2-2ep/seed-* --tldr ../shared/real_data/tldr

The real-model issue asks for under 10% of answers with a repeated word 3-gram (eval.repeats_a_trigram: some
3 words, split on white space, occur twice in the same answer). How strict is that at 20-60 words? For each run
of `train.py --example smollm2`, this prints the share for
- P-DPO's greedy answers to the known users' held-out pairs, per group (pdpo/generations.jsonl);
- the answers sampled for its pairs, training and held-out (data/samples.json: "short", "long"; written with
  token 3-gram blocking), and the instruct model's own greedy answers to the held-out prompts ("base");
and, next to each set, the same share for human text of the same lengths: every Reddit post in the TL;DR
comparison files (the distinct posts), cut to its first n words for each answer of n words in turn (posts
shorter than n are left out for that answer). The opening of a post is not an answer to a question, so this
is a yardstick for the metric at a length, not a target.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: shared helpers
import common as C

import eval as evaluation  # noqa: E402  (common puts the project on sys.path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run folders of train.py --example smollm2")
    p.add_argument("--tldr", required=True, help="folder (or file) of TL;DR comparison records (*.jsonl)")
    return p.parse_args(argv)


def human_texts(path: Path) -> list[list[str]]:
    """The distinct posts (or articles) of the TL;DR comparison records, each as its list of words."""
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        raise SystemExit(f"{path}: no *.jsonl TL;DR comparison files")
    texts = {}
    for f in files:
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                info = json.loads(line)["info"]
                text = info.get("post") or info["article"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"{f}:{lineno}: not a TL;DR comparison record with info.post or info.article ({e})")
            texts.setdefault(text, text.split())
    return list(texts.values())


def repeat_share(answers: list[str]) -> float:
    return evaluation.generation_quality(answers)["repeated_3gram"]


def human_share(answers: list[str], texts: list[list[str]]) -> float:
    """Over the answers: the share of human texts whose first n words (n = the answer's words) repeat a
    3-gram; an answer's weight is 1, whatever number of texts are long enough for it."""
    shares = []
    for a in answers:
        n = len(a.split())
        cuts = [" ".join(words[:n]) for words in texts if len(words) >= n]
        if cuts:
            shares.append(repeat_share(cuts))
    return sum(shares) / len(shares) if shares else float("nan")


def answer_sets(run: Path) -> dict[str, list[str]]:
    """The answers of one run whose repetition we compare: P-DPO per known group, training answers, base."""
    for needed in (run / "pdpo" / "generations.jsonl", run / "data" / "samples.json"):
        if not needed.is_file():
            raise SystemExit(f"{needed}: missing; --runs takes run folders of train.py --example smollm2")
    gens = [json.loads(line) for line in open(run / "pdpo" / "generations.jsonl")]
    samples = json.loads((run / "data" / "samples.json").read_text())["samples"]
    return {"pdpo long users": [g["response"] for g in gens if g["group"] == "long"],
            "pdpo short users": [g["response"] for g in gens if g["group"] == "short"],
            "trained on: long": [s["long"] for s in samples],
            "trained on: short": [s["short"] for s in samples],
            "base (instruct model)": [s["base"] for s in samples if "base" in s]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    texts = human_texts(Path(args.tldr))
    rows, figures = [], {"human_texts": len(texts), "runs": {}}
    for run in map(Path, args.runs):
        figures["runs"][run.name] = {}
        for name, answers in answer_sets(run).items():
            mean_words = sum(len(a.split()) for a in answers) / max(1, len(answers))
            model, human = repeat_share(answers), human_share(answers, texts)
            figures["runs"][run.name][name] = {"answers": len(answers), "mean_words": mean_words,
                                               "repeated_3gram": model, "human_same_lengths": human}
            rows.append([run.name, name, len(answers), f"{mean_words:.1f}", f"{model:.2f}", f"{human:.2f}"])
    C.print_table(["run", "answers", "n", "mean words", "repeated 3-gram", "human text, same lengths"], rows,
                  title=f"Share of texts with a repeated word 3-gram ({len(texts)} distinct human posts)")
    C.emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
