"""Evaluate personalized runs: per-user preference accuracy, generations, new users, the learned users.

PAPER.md, "The paper's experiments" (1): the measures are the per-user preference accuracy of the
implicit personalized reward

    r(x, y, u) = beta * (log pi(y | x, u) - log pi_ref(y | x))        (PAPER.md, "P-DPO objective")

(a pair is correct when r(x, y_w, u) > r(x, y_l, u)), and the length of generated responses per user.
Users the run never saw in training are "unseen": the registry gives them row 0, the generic
embedding e_0, exactly as at serving time. A reward-model run (stage prm) is scored by its head
r_phi(x, y, u) instead. Vanilla DPO against P-DPO side by side is the paper's comparison (--baseline).

Beyond the paper: `adapt` fits one new row of the user model (LM and other users frozen) from a few
of a new user's pairs, and `--curve` measures how held-out accuracy grows with the number of pairs.

    python eval.py RUN_DIR --data valid.jsonl [--baseline OTHER_RUN_DIR]
    python eval.py adapt RUN_DIR --user NAME --data their_pairs.jsonl
    python eval.py adapt RUN_DIR --curve            # a fresh toy user who prefers short answers
    python eval.py users RUN_DIR

Scoring (score_pairs, with prlhf.pdpo_step's implicit reward), reference log-probs computed once and
kept on disk under a fingerprint of their inputs (reference_cache, reference_fingerprint) and generation
as each user (generate_responses) live here; train.py uses them for its own evaluation. runs.py opens
run directories. Reading order: intervals and tables; scoring pairs; reference log-probs; opening a run
and scoring it; generation; the report (markdown, plots); evaluating runs end to end;
adapting to a new user; inspecting users; the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import data
import distributed
import model as lm
import prlhf
import runs

# ----------------------------------------------------------------------------------------------
# Intervals and tables

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal: a two-sided 95% interval


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a proportion correct / n (95% with the default z).

    It is the set of p with |p_hat - p| <= z * sqrt(p (1 - p) / n), in closed form:
        center = (p_hat + z^2 / 2n) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p_hat (1 - p_hat) / n + z^2 / 4n^2)
    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps a width at 0 or n correct,
    which matters for per-user counts of a few dozen pairs. With no pairs: (0, 1).
    """
    if n == 0:
        return 0.0, 1.0
    p_hat = correct / n
    denominator = 1 + z * z / n
    center = (p_hat + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n))
    # the interval holds p_hat; rounding must not say otherwise (at n of n, center + half can be 1 - 1e-16)
    return max(0.0, min(center - half, p_hat)), min(1.0, max(center + half, p_hat))


def accuracy_table(records: list[dict], key: str) -> dict:
    """{value of `key`: accuracy, ci95 (Wilson), pairs, correct, mean_margin} over score records."""
    table = {}
    for name, s in summarize(records, key).items():
        correct = round(s["accuracy"] * s["pairs"])
        table[name] = {"accuracy": s["accuracy"], "ci95": list(wilson_interval(correct, s["pairs"])),
                       "pairs": s["pairs"], "correct": correct, "mean_margin": s["mean_margin"]}
    return table


def repeats_a_trigram(text: str) -> bool:
    """Whether some word 3-gram occurs twice in `text` ("is is is", "the say about the say about")."""
    words = text.split()
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


def generation_quality(responses: list[str]) -> dict:
    """Degeneration measures over a set of answers: share of empty answers, share with a repeated word
    3-gram, and distinct-2 (distinct word bigrams / all word bigrams, over the whole set; 0 without any)."""
    bigrams = [bigram for r in responses for bigram in zip(r.split(), r.split()[1:])]
    n = max(1, len(responses))
    return {"empty": sum(not r.strip() for r in responses) / n,
            "repeated_3gram": sum(repeats_a_trigram(r) for r in responses) / n,
            "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0}


NO_GENERATIONS = {"mean_response_tokens": None, "response_tokens": None, "empty": None, "repeated_3gram": None,
                  "distinct_2": None}


def generation_table(generations: list[dict], key: str) -> dict:
    """{value of `key`: mean_response_tokens, samples / median / min / max of response_tokens, and the
    generation_quality measures (empty, repeated_3gram, distinct_2)}."""
    by_key = {}
    for g in generations:
        by_key.setdefault(str(g[key]), []).append(g)
    table = {}
    for name, gens in sorted(by_key.items()):
        ls = sorted(g["response_tokens"] for g in gens)
        middle = len(ls) // 2
        median = ls[middle] if len(ls) % 2 else (ls[middle - 1] + ls[middle]) / 2
        table[name] = {"mean_response_tokens": sum(ls) / len(ls),
                       "response_tokens": {"samples": len(ls), "median": median, "min": ls[0], "max": ls[-1]},
                       **generation_quality([g["response"] for g in gens])}
    return table


def run_results(stage: str, records: list[dict], generations: list[dict]) -> dict:
    """One run's numbers: overall, known vs unseen users, per group, per user (accuracy and lengths)."""
    def merged(key):
        acc, gens = accuracy_table(records, key), generation_table(generations, key)
        return {name: {**entry, **gens.get(name, NO_GENERATIONS)} for name, entry in acc.items()}

    out = {"stage": stage, "overall": merged("all")["all"], "status": merged("status"), "groups": {},
           "users": merged("user")}
    if any(r["group"] != "(none)" for r in records):  # only when the data labels groups
        out["groups"] = merged("group")
    for name, entry in out["users"].items():
        entry["known"] = next(r["status"] == "known" for r in records if r["user"] == name)
    return out


# ----------------------------------------------------------------------------------------------
# Scoring pairs: the implicit reward r(x, y, u) of each pair's user (or a reward model's head)

ONE_PROCESS = distributed.SingleProcess("cpu")  # its operations are the identity on any device


@torch.no_grad()
def score_pairs(model, user_model, items, collate, cfg: prlhf.PDPOConfig, *, reference=None, head=None,
                batch_size=16, autocast=contextlib.nullcontext(), desc=None, dist=ONE_PROCESS) -> list[dict]:
    """One record per pair: user, group, reward margin r(x, y_w, u) - r(x, y_l, u), correct (margin > 0).

    The margin is prlhf.pdpo_step's implicit reward with cfg.personalized() (each pair's own user;
    unknown users get row 0 through the registry); `reference(batch)` gives the reference log-probs.
    With `head` the reward model scores the pair instead (prlhf.prm_step). Forwards run through
    dist.wrapped, the DDP/FSDP root under torchrun (distributed.py).
    """
    def margins(batch):
        if head is not None:
            out = prlhf.prm_step(model, head, user_model, batch, alpha=1.0, shared_prompt=cfg.shared_prompt)
        else:
            out = prlhf.pdpo_step(model, user_model, batch, reference, cfg.personalized())
        return out["chosen_rewards"] - out["rejected_rewards"]

    was_training = model.training
    model.eval()
    records = []
    batches = data.make_batches(items, batch_size, shuffle=False, seed=0, epoch=0)
    for idx in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        batch = collate([items[i] for i in idx])
        with autocast:
            margin = dist.wrapped(margins, batch)
        for j, m in enumerate(margin.float().tolist()):
            records.append({"user": batch["users"][j], "group": batch["groups"][j], "margin": m, "correct": m > 0})
    model.train(was_training)
    return records


def summarize(records: list[dict], key: str) -> dict:
    """Accuracy and mean margin per value of `key` ("user" or "group")."""
    out = {}
    for r in records:
        g = out.setdefault(str(r[key]), {"pairs": 0, "correct": 0, "margin": 0.0})
        g["pairs"] += 1
        g["correct"] += r["correct"]
        g["margin"] += r["margin"]
    return {k: {"accuracy": v["correct"] / v["pairs"], "mean_margin": v["margin"] / v["pairs"], "pairs": v["pairs"]}
            for k, v in sorted(out.items())}


# ----------------------------------------------------------------------------------------------
# Reference log-probs: one pass over the data, kept in memory and on disk under a fingerprint

REFERENCE_FILE = "reference_logps.safetensors"  # in the run directory: what --resume reads
REFERENCE_VERSION = 1  # in the fingerprint: raise it when prlhf.reference_logps or the reference rows change


def reference_fingerprint(model_path, tokenizer: data.Tokenizer, data_files, *, max_length: int,
                          max_prompt_length: int, average_logps: bool, weights_dtype, precision: str) -> dict:
    """{"sha256": ..., "inputs": {...}}: what the reference log-probs of a run's pairs depend on.

    In it:
      weights         pi_ref's checkpoint files (runs.weights_digest); with LoRA pi_ref is that same
                      checkpoint with adapters off, so its files are the fingerprint's
      weights_dtype   the dtype the weights are loaded in, and precision, the autocast (bf16, fp16):
                      both change the values
      tokenizer       its vocabulary and rules (tokenizer.json as the backend writes it), BOS/EOS/pad ids
      data            the bytes of each data file (train, valid; "" when absent): prompts, responses, and
                      user texts, which shorten the prompt under max_prompt_length (data.tokenize_pairs)
      max_length, max_prompt_length   truncation
      average_logps   IPO scores the mean log-prob per token, DPO the sum
      version         REFERENCE_VERSION, for changes to the code
    Not in it: the user model and use_user_text (pi_ref never sees u), alpha, beta, the batch size and
    the device (they change the values by float rounding only).
    """
    special = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]
    inputs = {"version": REFERENCE_VERSION, "weights": runs.weights_digest(model_path),
              "weights_dtype": str(weights_dtype), "precision": precision,
              "tokenizer": hashlib.sha256((tokenizer.backend.to_str() + json.dumps(special)).encode()).hexdigest(),
              "data": [runs.file_digest([f]) if f else "" for f in data_files],
              "max_length": max_length, "max_prompt_length": max_prompt_length, "average_logps": average_logps}
    return {"sha256": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), "inputs": inputs}


@torch.no_grad()
def compute_reference_logps(reference, splits: dict, collate, *, batch_size: int, autocast, dist, quiet) -> dict:
    """{(split, index): (log pi_ref(y_w | x), log pi_ref(y_l | x))} for every pair of every split.

    Under torchrun each rank computes a share (as many batches on every rank: each FSDP forward is
    collective) and the shares are gathered, since any rank may train on any pair.
    """
    table = {}
    for split, items in splits.items():
        batches = dist.shard(data.make_batches(items, batch_size, shuffle=False, seed=0, epoch=0))
        for idx in tqdm(batches, desc=f"reference log-probs ({split})", disable=quiet, leave=False):
            batch = {**collate([items[i] for i in idx]), "split": split}
            with autocast:
                chosen, rejected = dist.wrapped(reference, batch)
            for j, i in enumerate(batch["index"].tolist()):
                table[(split, i)] = (chosen[j].float().cpu(), rejected[j].float().cpu())
    return dict(dist.gather(list(table.items())))


def save_reference_logps(table: dict, splits: dict, fingerprint: dict, file: Path):
    """`file` (safetensors, written atomically): per split its pairs' index, chosen and rejected log-probs."""
    tensors = {}
    for split, items in splits.items():
        pairs = [table[(split, it.index)] for it in items]
        tensors[f"{split}.index"] = torch.tensor([it.index for it in items], dtype=torch.long)  # (N,)
        tensors[f"{split}.chosen"] = torch.stack([p[0] for p in pairs]) if pairs else torch.zeros(0)  # (N,)
        tensors[f"{split}.rejected"] = torch.stack([p[1] for p in pairs]) if pairs else torch.zeros(0)  # (N,)
    file.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_save_tensors(tensors, file, metadata={"sha256": fingerprint["sha256"],
                                                      "inputs": json.dumps(fingerprint["inputs"])})


def load_reference_logps(file: Path, splits: dict, fingerprint: dict) -> dict | None:
    """The table save_reference_logps wrote into `file`, or None: no file, another fingerprint (stale),
    or other pairs. A file that cannot be read is warned about and computed again (None)."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("sha256") != fingerprint["sha256"]:
                return None
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # copies: not views of a file we may replace
        table = {}
        for split, items in splits.items():
            index = tensors[f"{split}.index"].tolist()
            if index != [it.index for it in items]:
                return None
            chosen, rejected = tensors[f"{split}.chosen"], tensors[f"{split}.rejected"]
            table.update({(split, i): (chosen[j], rejected[j]) for j, i in enumerate(index)})
        return table
    except Exception as e:  # a truncated or corrupt file: safetensors' own errors, a missing tensor
        print(f"warning: {file}: unreadable reference log-probs ({type(e).__name__}: {e}); computing them again",
              file=sys.stderr)
        return None


def reference_cache(reference, splits: dict, collate, *, batch_size: int, autocast=contextlib.nullcontext(),
                    dist=ONE_PROCESS, quiet: bool = True, fingerprint: dict | None = None, files=()):
    """Reference log-probs computed once per pair, then looked up: reference(batch) as a cache.

    splits: {name: tokenized items}; a batch says which split it is from in batch["split"] (default
    "train"). pi_ref never changes, so one pass over the data replaces a reference pass per step.
    With a `fingerprint` (reference_fingerprint) the pass is read from the first of `files` that holds
    it, when every rank finds one; otherwise it is computed. Rank 0 writes it into the files that lacked it.
    """
    files, table, missing = [Path(f) for f in files] if fingerprint else [], None, []
    for file in files:
        table = load_reference_logps(file, splits, fingerprint)
        if table is not None:
            if not quiet:
                tqdm.write(f"reference log-probs: read from {file}")
            break
        missing.append(file)
    if not all(dist.gather([table is not None])):  # every rank reads, or every rank computes (collectives)
        table, missing = compute_reference_logps(reference, splits, collate, batch_size=batch_size,
                                                 autocast=autocast, dist=dist, quiet=quiet), files
    if dist.rank == 0:  # the files that lacked them: all of them, or the run's after a hit in the shared folder
        for file in missing:
            save_reference_logps(table, splits, fingerprint, file)

    def cached(batch):
        pairs = [table[(batch.get("split", "train"), i)] for i in batch["index"].tolist()]
        device = batch["index"].device
        return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)

    return cached


# ----------------------------------------------------------------------------------------------
# Opening a run, and scoring its pairs


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_run_dir(path) -> Path:
    path = Path(path)
    if not runs.is_run_dir(path):
        raise FileNotFoundError(f"{path}: not a run directory (no args.json); train one with "
                                f"`python train.py --out DIR`, or run `python train.py` for the demo")
    return path


def open_run(path, dtype, device) -> runs.Run:
    """runs.load_run, refusing what has no preference reward (SFT runs) with a message for people."""
    path = check_run_dir(path)
    stage = json.loads((path / "args.json").read_text()).get("stage")
    if stage not in ("pdpo", "prm"):
        raise ValueError(f"{path}: a {stage} run has no preference reward to evaluate; "
                         f"evaluate a pdpo or prm run (args.json 'stage')")
    return runs.load_run(path, dtype, device)


def load_reference(run_dir, run: runs.Run, override: str | None, dtype, device):
    """pi_ref: the run's starting model (args.json 'model'), used without user embedding (PAPER.md)."""
    if run.reward_head is not None:
        return None  # a reward model scores pairs with its head
    where = override or run.args["model"]
    if not Path(where).exists():
        raise FileNotFoundError(f"{Path(run_dir) / 'args.json'}: reference model 'model' = {where} does not "
                                f"exist from here; pass --reference PATH (the run's starting checkpoint)")
    return runs.load_base(where, dtype, device).eval()


def read_data(data_file) -> list[data.Pair]:
    if not Path(data_file).is_file():
        raise FileNotFoundError(f"{data_file}: no such data file (expected JSON Lines pairs, see data.py)")
    return data.read_pairs(data_file)


def user_coverage(run: runs.Run, pairs: list[data.Pair]) -> tuple[list[str], list[str]]:
    """(known, unseen) user identifiers of `pairs`, in order of first appearance."""
    users = list(dict.fromkeys(p.user for p in pairs))
    known = [u for u in users if run.registry.row(u) != 0]
    return known, [u for u in users if run.registry.row(u) == 0]


def coverage_message(name: str, run: runs.Run, pairs: list[data.Pair], data_file) -> str | None:
    """A note when some users are unseen (fine: they get e_0), a warning when none is known."""
    known, unseen = user_coverage(run, pairs)
    listed = ", ".join(unseen[:5]) + (", ..." if len(unseen) > 5 else "")
    if not known:
        return (f"warning: none of the {len(unseen)} users in {data_file} is known to run {name} "
                f"({run.registry.n_users} known users, e.g. {', '.join(run.registry.users[:3]) or 'none'}); "
                f"every pair is scored with the generic embedding e_0 - is this the right data file?")
    if unseen:
        return (f"note: {len(unseen)} of {len(known) + len(unseen)} users in {data_file} are unseen by run {name} "
                f"({listed}): they get the generic embedding e_0")
    return None


def pair_collate(run: runs.Run, device, row_of=None):
    """data.collate_pairs with the run's tokenizer, registry (or `row_of`) and user-text setting."""
    row_of = row_of or run.registry.row

    def collate(items):
        b = data.collate_pairs(items, run.tokenizer, row_of, use_user_text=run.pdpo.use_user_text)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    return collate


def online_reference(reference_model, cfg: prlhf.PDPOConfig):
    """reference(batch) -> (log pi_ref(y_w | x), log pi_ref(y_l | x)), each (B,), computed on demand."""
    if reference_model is None:
        return None
    return lambda batch: prlhf.reference_logps(reference_model, batch, average=cfg.average_logps,
                                               shared_prompt=cfg.shared_prompt)


def tokenize(run: runs.Run, pairs: list[data.Pair]) -> list[data.TokenizedPair]:
    items, _ = data.tokenize_pairs(pairs, run.tokenizer, run.args["max_length"], run.args["max_prompt_length"])
    return items


def score_run(run: runs.Run, reference_model, pairs: list[data.Pair], *, device, batch_size=16,
              desc=None) -> list[dict]:
    """score_pairs on `pairs`: one record per pair with user, group, status, margin, correct.

    margin = r(x, y_w, u) - r(x, y_l, u): the implicit reward above (IPO runs average log-probs per
    token, as they were trained), or the reward head's difference for a prm run.
    """
    records = score_pairs(run.model, run.user_model, tokenize(run, pairs), pair_collate(run, device), run.pdpo,
                          reference=online_reference(reference_model, run.pdpo), head=run.reward_head,
                          batch_size=batch_size, desc=desc)
    return label(run, records)


def label(run: runs.Run, rows: list[dict]) -> list[dict]:
    """Add the keys the tables group by: status (known / unseen to the run), group ("(none)" if
    unlabelled), and "all" (one key shared by every row, for the overall line)."""
    for r in rows:
        r["status"] = "known" if run.registry.row(r["user"]) != 0 else "unseen"
        r["group"] = r["group"] if r["group"] is not None else "(none)"
        r["all"] = "all"
    return rows


# ----------------------------------------------------------------------------------------------
# Generation: a seeded sample of prompts per user, batched, with the model's KV cache


@torch.no_grad()
def generate_responses(model, user_model, registry, tokenizer, items, *, use_user_text=False, max_new_tokens=64,
                       temperature=0.0, top_p=None, batch_size=32, seed=0, desc=None, **constraints) -> list[dict]:
    """Generate a response to each item's prompt as its user: [BOS] [e_u] [user text] [prompt] -> response.

    Greedy decoding (temperature 0) answers the same prompt with the same user embedding the same way, so
    each distinct (prompt, e_u) is decoded once: vanilla DPO's users all share e_0, as do unseen users.
    constraints: repetition_penalty, no_repeat_ngram_size, min_new_tokens (model.constrain_logits), off
    unless given."""
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = [data.prefix_ids(tokenizer, it.prompt_ids, it.user_text_ids if use_user_text else []) for it in items]
    prefix = None  # (N, T_u, d)
    if user_model is not None:
        prefix = user_model(registry.rows([it.user for it in items]).to(device)).detach()
    first, source = {}, []  # (prompt, e_u) -> the first item with them; source[i]: the item decoded for i
    for i, ids in enumerate(prompts):
        embedding = b"" if prefix is None else prefix[i].float().cpu().numpy().tobytes()
        source.append(first.setdefault((tuple(ids), embedding) if temperature == 0 else i, i))
    todo, answers = list(first.values()), {}
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = todo[start:start + batch_size]
        new = lm.generate(model, [prompts[i] for i in chunk], max_new_tokens,
                          prefix_embeds=None if prefix is None else prefix[chunk], eos_token_id=tokenizer.eos_id,
                          temperature=temperature, top_p=top_p, generator=generator, **constraints)
        answers.update(zip(chunk, new))
    out = []
    for it, i in zip(items, source):
        ids = answers[i]
        text_ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
        out.append({"user": it.user, "group": it.group, "prompt": tokenizer.decode(it.prompt_ids),
                    "response": tokenizer.decode(text_ids), "response_tokens": len(text_ids)})
    return out


def sample_prompts(pairs: list[data.Pair], per_user: int, seed: int) -> list[data.Pair]:
    """Up to `per_user` pairs of each user, drawn with a seeded RNG: every run compared gets the same."""
    rng = random.Random(seed)
    by_user = {}
    for p in pairs:
        by_user.setdefault(p.user, []).append(p)
    return [p for user in sorted(by_user) for p in rng.sample(by_user[user], min(per_user, len(by_user[user])))]


def generate_for_run(run: runs.Run, pairs: list[data.Pair], *, max_new_tokens, temperature, top_p, batch_size,
                     seed, constraints: dict, desc=None) -> list[dict]:
    """generate_responses as each pair's user: greedy when temperature == 0, else sampled (seeded)."""
    gens = generate_responses(run.model, run.user_model, run.registry, run.tokenizer, tokenize(run, pairs),
                              use_user_text=run.pdpo.use_user_text, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed, desc=desc,
                              **constraints)
    return label(run, gens)


# ----------------------------------------------------------------------------------------------
# The report: report.md, results.json, generations.jsonl and plots


def run_names(paths: list[Path]) -> list[str]:
    """Runs are named by their directory; two runs with the same name get their parent's name too."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    return names


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    lo, hi = entry["ci95"]
    return f"{entry['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"


def length_cell(entry: dict | None) -> str:
    if entry is None or entry.get("response_tokens") is None:
        return "-"
    t = entry["response_tokens"]
    return f"{entry['mean_response_tokens']:.1f} ({t['median']:g}; {t['min']}-{t['max']})"


def quality_cell(entry: dict | None) -> str:
    if entry is None or entry.get("empty") is None:
        return "-"
    return f"{entry['empty']:.0%} / {entry['repeated_3gram']:.0%} / {entry['distinct_2']:.2f}"


def side_by_side(results: dict, section: str, first_columns, cell) -> str:
    """One row per name in `section` (union over runs), one column per run."""
    names = sorted({n for r in results.values() for n in r[section]})
    header = [c for c, _ in first_columns] + list(results)
    rows = [[f(n) for _, f in first_columns] + [cell(r[section].get(n)) for r in results.values()] for n in names]
    return markdown_table(header, rows)


def user_groups(pairs: list[data.Pair]) -> dict[str, str]:
    """Each user's most common group label in the data ("(none)" if unlabelled)."""
    labels = {}
    for p in pairs:
        labels.setdefault(p.user, Counter())[p.group or "(none)"] += 1
    return {u: c.most_common(1)[0][0] for u, c in labels.items()}


def report_markdown(results: dict, data_file, pairs: list[data.Pair], notes: list[str], plots: list[str] | None,
                    settings: str) -> str:
    groups = user_groups(pairs)
    out = [f"# Evaluation: {' vs '.join(results)}", "",
           f"Data: `{data_file}`, {len(pairs)} pairs from {len(groups)} users.", "",
           "Accuracy: share of pairs with r(x, y_w, u) > r(x, y_l, u), where r is the implicit personalized "
           "reward beta * (log pi(y|x,u) - log pi_ref(y|x)) of a pdpo run, or the reward head of a prm run. "
           "Brackets: 95% Wilson score interval. Unseen users (not in the run's training data) get the generic "
           "embedding e_0.", ""]
    out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out += accuracy_section(results, groups) + length_section(results, groups, settings) + plots_section(plots)
    return "\n".join(out) + "\n"


def accuracy_section(results: dict, groups: dict) -> list[str]:
    first = next(iter(results.values()))
    pairs_of = lambda section: lambda n: first[section][n]["pairs"] if n in first[section] else "-"  # noqa: E731
    out = ["## Preference accuracy", "",
           side_by_side(results, "status", [("users", str), ("pairs", pairs_of("status"))], accuracy_cell), ""]
    if first["groups"]:
        out += ["### By group", "",
                side_by_side(results, "groups", [("group", str), ("pairs", pairs_of("groups"))], accuracy_cell), ""]
    statuses = sorted(first["status"])
    margins = [[name, f"{r['overall']['mean_margin']:.3f}"]
               + [f"{r['status'][s]['mean_margin']:.3f}" if s in r["status"] else "-" for s in statuses]
               for name, r in results.items()]
    return out + ["### By user", "",
                  side_by_side(results, "users", [("user", str), ("group", lambda n: groups.get(n, "-")),
                                                  ("pairs", pairs_of("users"))], accuracy_cell), "",
                  "Mean reward margin r(x, y_w, u) - r(x, y_l, u):", "",
                  markdown_table(["run", "all"] + statuses, margins), ""]


def length_section(results: dict, groups: dict, settings: str) -> list[str]:
    out = ["## Generated response length (tokens)", ""]
    if all(r["overall"]["response_tokens"] is None for r in results.values()):
        return out + ["No generations.", ""]
    by_group = bool(next(iter(results.values()))["groups"])
    section, first = ("groups", "group") if by_group else ("status", "users")
    return out + [settings, "", "Cells: mean (median; min-max) over the sampled prompts.", "",
                  side_by_side(results, section, [(first, str)], length_cell), "",
                  side_by_side(results, "users", [("user", str), ("group", lambda n: groups.get(n, "-"))],
                               length_cell), "",
                  "### Generation quality", "",
                  "Cells: empty answers / answers with a repeated word 3-gram / distinct-2 (distinct word "
                  "bigrams over all bigrams of the group's answers).", "",
                  side_by_side(results, section, [(first, str)], quality_cell), "",
                  side_by_side(results, "users", [("user", str), ("group", lambda n: groups.get(n, "-"))],
                               quality_cell), ""]


def plots_section(plots: list[str] | None) -> list[str]:
    if plots is None:
        return ["## Plots", "", "Plots skipped: matplotlib is not installed (`pip install matplotlib`)."]
    return ["## Plots", ""] + ([f"![{Path(p).stem}]({Path(p).name})" for p in plots] or ["Nothing to draw."])


def user_vectors(user_model, registry) -> tuple[list[str], torch.Tensor] | None:
    """Names and e_u of every row (generic row 0 first): (N + 1, T_u * d); None when users cannot differ."""
    if user_model is None or isinstance(user_model, prlhf.UniformUserModel) or user_model.n_user_tokens == 0:
        return None
    with torch.no_grad():
        rows = torch.arange(len(registry), device=next(user_model.parameters()).device)  # (N + 1,)
        vectors = user_model(rows).flatten(1).float().cpu()  # (N + 1, T_u, d) -> (N + 1, T_u * d)
    return ["<generic e_0>"] + registry.users, vectors


def pca_2d(x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Coordinates (n, 2) on the top two principal components of x (n, D), and their shares of variance."""
    centered = x - x.mean(dim=0)  # (n, D)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)  # vh (min(n, D), D)
    k = min(2, vh.shape[0])
    coords = centered @ vh[:k].T  # (n, k)
    if k < 2:
        coords = torch.cat([coords, torch.zeros(x.shape[0], 2 - k)], dim=1)  # (n, 2)
    variance = s ** 2
    shares = (variance[:2] / variance.sum().clamp(min=1e-12)).tolist()
    return coords, shares + [0.0] * (2 - len(shares))


def import_pyplot():
    """matplotlib.pyplot writing files only (no window), or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_plots(results: dict, generations: dict, embeddings: dict, groups: dict, out: Path) -> list[str] | None:
    """accuracy_per_user.png, response_lengths.png, user_embeddings.png (those with something to draw);
    None without matplotlib."""
    plt = import_pyplot()
    if plt is None:
        return None
    figures = {"accuracy_per_user": plot_accuracy_per_user(plt, results, groups),
               "response_lengths": plot_response_lengths(plt, results, generations),
               "user_embeddings": plot_user_embeddings(plt, embeddings, groups)}
    return [save_figure(plt, fig, out / f"{name}.png") for name, fig in figures.items() if fig is not None]


def error_bars(values: list[float], intervals: list) -> list[list[float]]:
    """matplotlib's yerr (below, above) from intervals around the values; never negative."""
    return [[max(0.0, v - lo) for v, (lo, _) in zip(values, intervals)],
            [max(0.0, hi - v) for v, (_, hi) in zip(values, intervals)]]


def plot_accuracy_per_user(plt, results: dict, groups: dict):
    """One bar per user and run, Wilson intervals as error bars, users ordered by group."""
    users = sorted({u for r in results.values() for u in r["users"]}, key=lambda u: (groups.get(u, ""), u))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(users) * len(results)), 4))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        xs = [j + i * width for j, u in enumerate(users) if u in r["users"]]
        entries = [r["users"][u] for u in users if u in r["users"]]
        acc = [e["accuracy"] for e in entries]
        ax.bar(xs, acc, width, yerr=error_bars(acc, [e["ci95"] for e in entries]), capsize=2, label=name)
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(users))],
                  [f"{u}\n{groups.get(u, '')}" for u in users], rotation=60, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("preference accuracy (95% Wilson)")
    ax.legend()
    return fig


def plot_response_lengths(plt, results: dict, generations: dict):
    """Box plots of generated lengths per user group (known / unseen without group labels), one per run."""
    if not any(generations.values()):
        return None
    key = "group" if next(iter(results.values()))["groups"] else "status"
    names = sorted({g[key] for gens in generations.values() for g in gens})
    step = len(generations) + 1  # a gap between groups
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(names) * len(generations)), 4))
    for i, (run, gens) in enumerate(generations.items()):
        series = [[g["response_tokens"] for g in gens if g[key] == n] or [0] for n in names]
        boxes = ax.boxplot(series, positions=[j * step + i for j in range(len(names))], widths=0.8,
                           patch_artist=True)
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{i}")
        ax.plot([], [], color=f"C{i}", lw=6, label=run)  # a legend entry for the run's colour
    ax.set_xticks([j * step + (len(generations) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("generated response tokens")
    ax.legend()
    return fig


def plot_user_embeddings(plt, embeddings: dict, groups: dict):
    """The learned e_u on their top two principal components, coloured by the user's group in the data."""
    drawable = {run: e for run, e in embeddings.items() if e is not None and e[1].shape[0] >= 2}
    if not drawable:
        return None
    fig, axes = plt.subplots(1, len(drawable), figsize=(5 * len(drawable), 4.5), squeeze=False)
    for ax, (run, (names, vectors)) in zip(axes[0], drawable.items()):
        coords, shares = pca_2d(vectors)
        labels = ["generic"] + [groups.get(u, "not in data") for u in names[1:]]
        for k, label in enumerate(sorted(set(labels))):
            idx = [i for i, l in enumerate(labels) if l == label]
            ax.scatter(coords[idx, 0], coords[idx, 1], color=f"C{k}", label=label,
                       marker="*" if label == "generic" else "o", s=120 if label == "generic" else 30)
        for (px, py), n in zip(coords.tolist(), names):
            ax.annotate(n, (px, py), fontsize=6)
        ax.set_title(f"{run}: user embeddings (PCA)")
        ax.set_xlabel(f"PC1 ({shares[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({shares[1]:.0%})")
        ax.legend(fontsize=7)
    return fig


def save_figure(plt, fig, file: Path) -> str:
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return str(file)


# ----------------------------------------------------------------------------------------------
# Evaluating runs end to end (the default command)


CONSTRAINTS_OFF = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)


def evaluate_runs(run_dirs: list[str], data_file, *, out=None, reference: str | None = None,
                  samples_per_user: int = 4, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float | None = None, batch_size: int = 16, seed: int = 0, device: str = "auto",
                  dtype: str = "fp32", quiet: bool = False, repetition_penalty: float = 1.0,
                  no_repeat_ngram_size: int = 0, min_new_tokens: int = 0) -> dict:
    """Score and sample every run on the same data; write report.md, results.json, generations.jsonl and
    plots into `out` (default: the first run's directory). Returns results.json's content.

    `reference` overrides the first run's pi_ref (args.json 'model'); the baseline always uses its own.
    """
    paths = [check_run_dir(p) for p in run_dirs]  # mistyped paths fail first, before any model is loaded
    pairs = read_data(data_file)
    out = Path(out) if out else paths[0]
    out.mkdir(parents=True, exist_ok=True)
    constraints = {k: v for k, v in dict(repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                                         no_repeat_ngram_size=no_repeat_ngram_size).items() if v != CONSTRAINTS_OFF[k]}
    generate = dict(pairs=sample_prompts(pairs, samples_per_user, seed), max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed, constraints=constraints)
    results, generations, embeddings, notes = {}, {}, {}, []
    for i, (name, path) in enumerate(zip(run_names(paths), paths)):
        results[name], generations[name], embeddings[name], run_notes = evaluate_run(
            name, path, pairs, data_file, generate, reference=reference if i == 0 else None,
            device=runs.pick_device(device), dtype=DTYPES[dtype], quiet=quiet)
        notes += run_notes
    settings = (f"{samples_per_user} prompts per user (seed {seed}), "
                + ("greedy" if temperature == 0 else f"sampled at temperature {temperature}, top-p {top_p}")
                + f", at most {max_new_tokens} new tokens; "
                + (f"constraints that hide degeneration: {constraints}." if constraints else "no generation constraints."))
    for r in results.values():
        r["generation"] = {"samples_per_user": samples_per_user, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "top_p": top_p, "constraints": constraints}
    runs.atomic_write_json(results, out / "results.json")
    with open(out / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(g) + "\n" for gens in generations.values() for g in gens)
    plots = write_plots(results, generations, embeddings, user_groups(pairs), out)
    (out / "report.md").write_text(report_markdown(results, data_file, pairs, notes, plots, settings))
    return results


def evaluate_run(name, path, pairs, data_file, generate: dict, *, reference, device, dtype, quiet):
    """One run: (its results, its generations, its user embeddings, notes for the report)."""
    run = open_run(path, dtype, device)
    ref_model = load_reference(path, run, reference, dtype, device)
    notes = [m for m in [coverage_message(name, run, pairs, data_file)] if m]
    for m in notes:
        print(m, file=sys.stderr)
    records = score_run(run, ref_model, pairs, device=device, batch_size=generate["batch_size"],
                        desc=None if quiet else f"scoring {name}")
    gens = []
    if run.reward_head is not None:  # a reward model's LM is not a policy
        notes.append(f"run {name} is a reward model (prm): accuracy is from its head r_phi(x, y, u); no generations")
    elif generate["pairs"]:
        gens = generate_for_run(run, **generate, desc=None if quiet else f"generating {name}")
    keep = ("user", "group", "status", "prompt", "response", "response_tokens")
    return (run_results(run.args["stage"], records, gens), [{"run": name, **{k: g[k] for k in keep}} for g in gens],
            user_vectors(run.user_model, run.registry), notes)


def print_summary(results: dict, out: Path):
    first = next(iter(results.values()))
    section = "groups" if first["groups"] else "status"
    print(f"\n{'run':<14}{'group' if section == 'groups' else 'users':<12}{'pairs':>6}{'accuracy':>10}"
          f"{'95% Wilson':>16}{'resp. tokens':>14}{'empty':>7}{'rep-3g':>8}{'dist-2':>8}")
    for name, r in results.items():
        for g, e in r[section].items():
            lo, hi = e["ci95"]
            gen = ["-"] * 4 if e["mean_response_tokens"] is None else [
                f"{e['mean_response_tokens']:.1f}", f"{e['empty']:.0%}", f"{e['repeated_3gram']:.0%}",
                f"{e['distinct_2']:.2f}"]
            print(f"{name:<14}{g:<12}{e['pairs']:>6}{e['accuracy']:>10.3f}{f'[{lo:.2f}, {hi:.2f}]':>16}"
                  f"{gen[0]:>14}{gen[1]:>7}{gen[2]:>8}{gen[3]:>8}")
    print(f"\nwrote {out}/report.md, results.json, generations.jsonl")


# ----------------------------------------------------------------------------------------------
# New users from a few examples (beyond the paper): fit one new row of the user model


def add_user(user_model, registry: prlhf.UserRegistry, name: str):
    """A copy of the user model and registry with one more row, N + 1, for `name`, starting at e_0.

    The new user was unseen until now, so e_0 is what they were served; fitting starts there.
    Individual model with e_i = e_0 + o_i: o_new = 0 (with e_i = o_i: o_new = e_0). Cluster model:
    w_new = w_0, so softmax(w_new) mixes the clusters as the generic user does. Existing rows keep
    their numbers (the new name is appended to the registry, not sorted in).
    """
    if user_model is None or isinstance(user_model, prlhf.UniformUserModel):
        raise ValueError("this run's user model is uniform (vanilla DPO): every user shares one embedding, "
                         "so there is no per-user row to fit")
    if registry.row(name) != 0:
        raise ValueError(f"user {name!r} is already known to this run (row {registry.row(name)}); "
                         f"pick a new name")
    new_registry = prlhf.UserRegistry(registry.users + [str(name)])
    n, tokens, d = user_model.n_users, user_model.n_user_tokens, user_model.hidden_size
    if isinstance(user_model, prlhf.IndividualUserModel):
        table = user_model.embeddings.detach().cpu()  # (N + 1, T_u, d)
        new_row = torch.zeros_like(table[:1]) if user_model.add_generic_user else table[:1].clone()  # (1, T_u, d)
        new = prlhf.IndividualUserModel(n + 1, tokens, d, user_model.add_generic_user,
                                        torch.cat([table, new_row]))  # (N + 2, T_u, d)
    else:
        logits = user_model.user_logits.detach().cpu()  # (N + 1, K)
        new = prlhf.ClusterUserModel(n + 1, tokens, d, user_model.n_clusters,
                                     user_model.cluster_embeddings.detach().cpu(),
                                     torch.cat([logits, logits[:1]]))  # (N + 2, K)
    return new.to(next(user_model.parameters()).device), new_registry


def row_parameter(user_model) -> torch.nn.Parameter:
    """The table whose rows are per-user: o_i (individual) or w_i (cluster)."""
    return user_model.embeddings if isinstance(user_model, prlhf.IndividualUserModel) else user_model.user_logits


def cached_reference(reference, items, collate, batch_size: int = 16):
    """Reference log-probs computed once for `items` (they never change while a row is fitted)."""
    if reference is None:
        return None
    return reference_cache(reference, {"train": items}, collate, batch_size=batch_size)


def new_user_loss(run: runs.Run, user_model, batch, reference) -> torch.Tensor:
    """The run's own objective with alpha = 1 (only the new user's term): P-DPO, or P-RM for a prm run."""
    if run.reward_head is not None:
        return prlhf.prm_step(run.model, run.reward_head, user_model, batch, alpha=1.0,
                              shared_prompt=run.pdpo.shared_prompt)["losses"].mean()
    return prlhf.pdpo_step(run.model, user_model, batch, reference, run.pdpo.personalized())["losses"].mean()


def fit_user_row(run: runs.Run, user_model, row: int, items, collate, reference, *, steps: int, lr: float,
                 batch_size: int = 8, seed: int = 0, desc=None) -> list[float]:
    """Adam on row `row` alone; the LM, the clusters and every other row stay frozen. Returns the losses.

    A gradient hook zeroes every other row's gradient; Adam (no weight decay) then leaves those rows
    bit-for-bit unchanged.
    """
    run.model.requires_grad_(False)
    user_model.requires_grad_(False)
    table = row_parameter(user_model)
    table.requires_grad_(True)
    mask = torch.zeros_like(table)
    mask[row] = 1
    hook = table.register_hook(lambda grad: grad * mask)
    optimizer = torch.optim.Adam([table], lr=lr)
    losses, epoch, batches = [], 0, []
    for _ in tqdm(range(steps), desc=desc, disable=desc is None, leave=False):
        if not batches:  # a new pass over the user's pairs, in a new order
            batches = data.make_batches(items, batch_size, shuffle=True, seed=seed, epoch=epoch)
            epoch += 1
        loss = new_user_loss(run, user_model, collate([items[i] for i in batches.pop()]), reference)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    hook.remove()
    table.requires_grad_(False)
    return losses


def row_accuracy(run: runs.Run, user_model, row: int, items, device, reference, batch_size=16) -> dict:
    """Accuracy of every pair in `items` scored as user row `row` (0 = the generic embedding e_0)."""
    records = score_pairs(run.model, user_model, items, pair_collate(run, device, lambda _: row), run.pdpo,
                          reference=reference, head=run.reward_head, batch_size=batch_size)
    return accuracy_table([{**r, "all": "all"} for r in records], "all")["all"]


def user_pairs(pairs: list[data.Pair], name: str, data_file) -> list[data.Pair]:
    mine = [p for p in pairs if p.user == str(name)]
    if not mine:
        users = ", ".join(list(dict.fromkeys(p.user for p in pairs))[:5])
        raise data.DataError(f"{data_file}: no pairs with \"user\": {json.dumps(str(name))} (users there: {users})")
    return mine


def toy_user_pairs(name: str, n_train: int, n_held_out: int, seed: int) -> tuple[list, list]:
    """A fresh toy-task user (data.make_toy_task) who prefers the SHORT answer: the minority, so the
    generic embedding, fitted mostly to the long-preferring majority, serves them poorly."""
    fit, held_out = data.make_toy_task(seed=seed, n_users=1, minority_share=1.0, pairs_per_user=n_train,
                                       n_valid_per_user=n_held_out, n_unseen_users=0)
    rename = lambda ps: [dataclasses.replace(p, user=name, group="short") for p in ps]  # noqa: E731
    return rename(fit), rename(held_out)


CURVE_SIZES = (1, 4, 16, 64)


def adaptation_curve(run: runs.Run, reference_model, fit_pairs, held_out_pairs, name: str, *, device,
                     sizes=CURVE_SIZES, steps: int = 32, lr: float = 0.05, seed: int = 0, quiet=False) -> list[dict]:
    """Held-out accuracy for the new user after fitting their row on the first k pairs, for each k.

    k = 0 is the generic embedding e_0 (where every fit starts). Each k starts afresh from e_0 with
    the same number of steps, so the points differ only in how much of the user's data they saw.
    """
    user_model, registry = add_user(run.user_model, run.registry, name)
    row = registry.row(name)
    collate = pair_collate(run, device, registry.row)
    fit_items, held_items = tokenize(run, fit_pairs), tokenize(run, held_out_pairs)
    online = online_reference(reference_model, run.pdpo)
    fit_reference = cached_reference(online, fit_items, collate, 16)
    held_reference = cached_reference(online, held_items, collate, 16)
    curve = [{"fit_pairs": 0, **row_accuracy(run, user_model, 0, held_items, device, held_reference)}]
    for k in [k for k in sizes if k <= len(fit_items)]:
        fitted = copy.deepcopy(user_model)
        fit_user_row(run, fitted, row, fit_items[:k], collate, fit_reference, steps=steps, lr=lr, seed=seed,
                     desc=None if quiet else f"fitting on {k} pairs")
        curve.append({"fit_pairs": k, **row_accuracy(run, fitted, row, held_items, device, held_reference)})
    return curve


def adapt_user(run_dir, name: str, data_file, *, reference: str | None = None, steps: int = 32, lr: float = 0.05,
               batch_size: int = 8, seed: int = 0, device: str = "auto", quiet: bool = False) -> dict:
    """`eval.py adapt`: fit a new user's row on all their pairs in `data_file` and save it into the run.

    Saving rewrites user_model.safetensors, user_model.json and users.json; the LM is untouched.
    Returns the row, the losses' ends, and accuracy on those (training) pairs for e_0 and the new row.
    """
    device = runs.pick_device(device)
    pairs = user_pairs(read_data(data_file), name, data_file)
    run = open_run(run_dir, torch.float32, device)
    reference_model = load_reference(run_dir, run, reference, torch.float32, device)
    user_model, registry = add_user(run.user_model, run.registry, name)
    row, collate, items = registry.row(name), pair_collate(run, device, registry.row), tokenize(run, pairs)
    reference_fn = cached_reference(online_reference(reference_model, run.pdpo), items, collate)
    before = row_accuracy(run, user_model, 0, items, device, reference_fn)
    losses = fit_user_row(run, user_model, row, items, collate, reference_fn, steps=steps, lr=lr,
                          batch_size=batch_size, seed=seed, desc=None if quiet else f"fitting {name}")
    after = row_accuracy(run, user_model, row, items, device, reference_fn)
    prlhf.save_user_model(run_dir, user_model, registry)
    return {"user": name, "row": row, "pairs": len(items), "steps": steps, "first_loss": losses[0],
            "last_loss": losses[-1], "generic": before, "adapted": after}


def adapt_curve(run_dir, name: str, data_file=None, *, reference: str | None = None, steps: int = 32,
                lr: float = 0.05, held_out: int = 40, seed: int = 0, device: str = "auto", quiet: bool = False) -> dict:
    """`eval.py adapt --curve`: adaptation_curve on the user's pairs in `data_file` (the last quarter held
    out), or on a fresh toy user who prefers short answers. Saves nothing into the user model; writes
    adapt_curve.json (and adapt_curve.png) into the run."""
    device = runs.pick_device(device)
    if data_file:
        pairs = user_pairs(read_data(data_file), name, data_file)
        n_held = max(1, len(pairs) // 4)
        fit_pairs, held_pairs = pairs[:-n_held], pairs[-n_held:]
    else:
        fit_pairs, held_pairs = toy_user_pairs(name, max(CURVE_SIZES), held_out, seed=1000 + seed)
    run = open_run(run_dir, torch.float32, device)
    reference_model = load_reference(run_dir, run, reference, torch.float32, device)
    points = adaptation_curve(run, reference_model, fit_pairs, held_pairs, name, device=device, steps=steps, lr=lr,
                              seed=seed, quiet=quiet)
    result = {"user": name, "data": str(data_file or "toy task, a new user who prefers short answers"),
              "steps": steps, "lr": lr, "held_out_pairs": len(held_pairs), "curve": points}
    runs.atomic_write_json(result, Path(run_dir) / "adapt_curve.json")
    plot_curve(points, name, Path(run_dir) / "adapt_curve.png")
    return result


def plot_curve(points: list[dict], name: str, file: Path) -> bool:
    """adapt_curve.png: held-out accuracy against pairs fitted on (log axis); False without matplotlib."""
    plt = import_pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [max(p["fit_pairs"], 0.5) for p in points]  # k = 0 (generic e_0) drawn at 0.5 on the log axis
    acc = [p["accuracy"] for p in points]
    ax.errorbar(xs, acc, yerr=error_bars(acc, [p["ci95"] for p in points]), marker="o", capsize=3)
    ax.set_xscale("log")
    ax.set_xticks(xs, ["e_0"] + [str(p["fit_pairs"]) for p in points[1:]])
    ax.set_xlabel("pairs the new user's row was fitted on")
    ax.set_ylabel("held-out accuracy (95% Wilson)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"adapting to {name}")
    save_figure(plt, fig, file)
    return True


# ----------------------------------------------------------------------------------------------
# Inspecting users: the registry, cluster weights, nearest neighbours among user embeddings


def describe_users(run_dir, neighbours: int = 3) -> str:
    """The registry, each user's cluster weights softmax(w_i) (cluster model), and the nearest users by
    cosine similarity of e_u (generic row 0 included). Reads only the user model, not the LM."""
    run_dir = check_run_dir(run_dir)
    if not (run_dir / "user_model.json").is_file():
        raise FileNotFoundError(f"{run_dir}: no user model (user_model.json); an SFT run has none")
    user_model, registry = prlhf.load_user_model(run_dir)
    cfg = user_model.config()
    lines = [f"{run_dir}: {cfg['kind']} user model, T_u = {cfg['n_user_tokens']}, d = {cfg['hidden_size']}"
             + (f", K = {cfg['n_clusters']} clusters" if cfg["kind"] == "cluster" else "")
             + f"; {registry.n_users} known users + the generic row 0"]
    names = ["<generic e_0>"] + registry.users
    named = user_vectors(user_model, registry)
    similarity = None
    if named is not None:
        unit = torch.nn.functional.normalize(named[1], dim=1)  # (N + 1, T_u * d)
        similarity = (unit @ unit.T).fill_diagonal_(-float("inf"))  # (N + 1, N + 1), self excluded
    weights = user_model.cluster_weights(torch.arange(len(registry))) if cfg["kind"] == "cluster" else None
    header = f"{'row':>4}  {'user':<16}"
    if weights is not None:
        header += "  " + " ".join(f"{'c_' + str(k + 1):>6}" for k in range(weights.shape[1]))
    if similarity is not None:
        header += "  nearest (cosine of e_u)"
    lines.append(header)
    for i, name in enumerate(names):
        line = f"{i:>4}  {name:<16}"
        if weights is not None:
            line += "  " + " ".join(f"{w:>6.3f}" for w in weights[i].tolist())
        if similarity is not None and len(names) > 1:
            top = similarity[i].topk(min(neighbours, len(names) - 1))
            line += "  " + ", ".join(f"{names[j]} {s:.3f}" for s, j in zip(top.values.tolist(), top.indices.tolist()))
        lines.append(line)
    if named is None:
        lines.append("every user gets the same embedding (uniform user model, or T_u = 0): no neighbours")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line: `eval.py RUN_DIR ...`, `eval.py adapt RUN_DIR ...`, `eval.py users RUN_DIR`


def common_flags(p: argparse.ArgumentParser):
    p.add_argument("--reference", default=None,
                   help="pi_ref, the run's starting model (default: 'model' in the run's args.json)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt choice, sampling, data order (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def evaluate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Subcommands: `eval.py adapt --help`, `eval.py users --help`.")
    p.add_argument("run", metavar="RUN_DIR", help="a pdpo or prm run directory written by train.py")
    p.add_argument("--data", required=True, help="preference pairs to evaluate on, JSON Lines (see data.py)")
    p.add_argument("--baseline", default=None, metavar="OTHER_RUN_DIR",
                   help="a second run shown side by side (e.g. vanilla DPO against P-DPO)")
    p.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR)")
    p.add_argument("--samples-per-user", type=int, default=4,
                   help="prompts per user to generate responses for; 0 = no generation (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest response (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); above 0 = sampled, seeded by --seed")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, with --temperature > 0")
    p.add_argument("--batch-size", type=int, default=16,
                   help="pairs per scoring batch, prompts per generation batch (default: %(default)s)")
    hides = "hides degeneration; off by default, and the report says when used"
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help=f"divide the logits of tokens already in the row by this (> 1 penalizes; {hides})")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0,
                   help=f"forbid repeating any n-gram of this size (0 = off; {hides})")
    p.add_argument("--min-new-tokens", type=int, default=0, help=f"forbid EOS before this many new tokens ({hides})")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the loaded weights")
    common_flags(p)
    return p


ADAPT_HELP = """Fit a new user's row of the user model f_P from their pairs and save it into the run,
so the user is then served like a known one. The LM, e_0 and the other users stay frozen. The row
starts at the generic embedding e_0 (individual model: o_new = 0; cluster model: w_new = w_0), which
is what the user got while unseen. With --curve: held-out accuracy after fitting on 1, 4, 16 and 64
pairs, against e_0; nothing is saved into the user model (adapt_curve.json goes into the run)."""


def adapt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py adapt", description=ADAPT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR", help="a pdpo or prm run with an individual or cluster user model")
    p.add_argument("--user", default=None, help="the new user's identifier (--curve without --data: toy_new_user)")
    p.add_argument("--data", default=None, help="JSON Lines pairs; the lines whose 'user' is --user are used")
    p.add_argument("--curve", action="store_true",
                   help="held-out accuracy against pairs seen; without --data, a fresh toy user who prefers short "
                        "answers (the minority, for whom e_0 is poor)")
    p.add_argument("--steps", type=int, default=32, help="Adam steps per fit (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of the new row (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: %(default)s)")
    p.add_argument("--held-out", type=int, default=40, help="held-out pairs of the toy user (default: %(default)s)")
    common_flags(p)
    return p


def users_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py users", description="The user registry, each user's cluster weights "
                                "softmax(w_i) (cluster model), and each user's nearest neighbours by cosine "
                                "similarity of their embeddings e_u (generic row 0 included).")
    p.add_argument("run", metavar="RUN_DIR", help="a run with a user model")
    p.add_argument("--neighbours", type=int, default=3, help="neighbours listed per user (default: %(default)s)")
    return p


def run_adapt(args):
    options = dict(reference=args.reference, steps=args.steps, lr=args.lr, seed=args.seed, device=args.device,
                   quiet=args.quiet)
    if args.curve:
        name = args.user or "toy_new_user"
        r = adapt_curve(args.run, name, args.data, held_out=args.held_out, **options)
        print(f"held-out accuracy of {name} ({r['held_out_pairs']} pairs; {r['data']}), "
              f"{r['steps']} steps per fit, 95% Wilson:")
        for p in r["curve"]:
            label = "generic e_0" if p["fit_pairs"] == 0 else f"{p['fit_pairs']} pairs"
            print(f"  {label:<12} {p['accuracy']:.3f} [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}]")
        print(f"wrote {Path(args.run) / 'adapt_curve.json'}")
        return
    if not args.user or not args.data:
        runs.fail("adapt needs --user NAME and --data FILE with their pairs (or --curve)")
    r = adapt_user(args.run, args.user, args.data, batch_size=args.batch_size, **options)
    g, a = r["generic"], r["adapted"]
    print(f"user {args.user}: row {r['row']}, fitted on {r['pairs']} pairs in {r['steps']} steps "
          f"(loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}); accuracy on these pairs (not held out): "
          f"generic e_0 {g['accuracy']:.3f} -> fitted {a['accuracy']:.3f}")
    print(f"saved into {args.run} (user_model.safetensors, users.json); {args.user} is now a known user")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("adapt", "users") else "evaluate"
    try:
        if command == "users":
            args = users_parser().parse_args(argv[1:])
            print(describe_users(args.run, args.neighbours))
        elif command == "adapt":
            run_adapt(adapt_parser().parse_args(argv[1:]))
        else:
            args = evaluate_parser().parse_args(argv)
            run_dirs = [args.run] + ([args.baseline] if args.baseline else [])
            results = evaluate_runs(run_dirs, args.data, out=args.out, reference=args.reference,
                                    samples_per_user=args.samples_per_user, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                                    seed=args.seed, device=args.device, dtype=args.dtype, quiet=args.quiet,
                                    repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
                                    no_repeat_ngram_size=args.no_repeat_ngram_size)
            print_summary(results, Path(args.out or args.run))
    except (data.DataError, ValueError, FileNotFoundError) as e:
        runs.fail(str(e))


if __name__ == "__main__":
    main()
