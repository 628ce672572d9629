"""Evaluate personalized runs: per-user preference accuracy, generations, new users, the learned users.

PAPER.md, "The paper's experiments" (1): the measures are the per-user preference accuracy of the
implicit personalized reward

    r(x, y, u) = beta * (log pi(y | x, u) - log pi_ref(y | x))        (PAPER.md, "P-DPO objective")

(a pair is correct when r(x, y_w, u) > r(x, y_l, u)), and the length of generated responses per user.
Users the run never saw in training are "unseen": the registry gives them row 0, the generic
embedding e_0, exactly as at serving time. A reward-model run (stage prm) is scored by its head
r_phi(x, y, u) instead. Vanilla DPO against P-DPO side by side is the paper's comparison (--baseline).

New users (adapt.py, beyond the paper) and a look at the learned users have their own command, which
imports this file: `python adapt.py --help`.

    python eval.py RUN_DIR --data valid.jsonl [--baseline OTHER_RUN_DIR]
    python eval.py generate RUN_DIR --user ID --prompt TEXT

Scoring (score_pairs, with prlhf.pdpo_step's implicit reward), reference log-probs computed once and
kept on disk under a fingerprint of their inputs (cache.py) and generation
as each user (generate_responses) live here; train.py uses them for its own evaluation. runs.py opens
run directories; report.py lays out the report (markdown, plots). Reading order: intervals and tables;
scoring pairs; reference log-probs; which users a file covers, scoring a run; generation; evaluating runs end to
end; the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import data
import distributed
import model as lm
import prlhf
import report
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
# Which users a data file covers, and scoring a run's pairs (opening a run: runs.py)


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


def score_run(run: runs.Run, reference_model, pairs: list[data.Pair], *, device, batch_size=16,
              desc=None) -> list[dict]:
    """score_pairs on `pairs`: one record per pair with user, group, status, margin, correct.

    margin = r(x, y_w, u) - r(x, y_l, u): the implicit reward above (IPO runs average log-probs per
    token, as they were trained), or the reward head's difference for a prm run.
    """
    records = score_pairs(run.model, run.user_model, runs.tokenize(run, pairs), runs.pair_collate(run, device),
                          run.pdpo, reference=runs.online_reference(reference_model, run.pdpo), head=run.reward_head,
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


def answers_by_group(run_dir: Path, gens: list[dict], extra=lambda answers: {}) -> dict:
    """Write RUN/generations.jsonl; per group of RUN/eval.json (training's held-out scores): accuracy, pairs,
    mean answer tokens, generation quality of that group's answers in `gens`, and extra(those answers)."""
    with open(run_dir / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in gens)
    groups = {}
    for group, s in json.loads((run_dir / "eval.json").read_text())["groups"].items():
        mine = [g for g in gens if g["group"] == group]
        groups[group] = {"accuracy": s["accuracy"], "pairs": s["pairs"],
                         "mean_response_tokens": sum(g["response_tokens"] for g in mine) / max(1, len(mine)),
                         **generation_quality([g["response"] for g in mine]), **extra(mine)}
    return groups


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
    gens = generate_responses(run.model, run.user_model, run.registry, run.tokenizer, runs.tokenize(run, pairs),
                              use_user_text=run.pdpo.use_user_text, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed, desc=desc,
                              **constraints)
    return label(run, gens)


# ----------------------------------------------------------------------------------------------
# Evaluating runs end to end (the default command)


CONSTRAINTS_OFF = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
def evaluate_runs(run_dirs: list[str], data_file, *, out=None, reference: str | None = None,
                  samples_per_user: int = 4, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_p: float | None = None, batch_size: int = 16, seed: int = 0, device: str = "auto",
                  dtype: str | None = None, quiet: bool = False, repetition_penalty: float = 1.0,
                  no_repeat_ngram_size: int = 0, min_new_tokens: int = 0) -> dict:
    """Score and sample every run on the same data; write report.md, results.json, generations.jsonl and
    plots into `out` (default: the first run's directory); print the table and every file written. Returns
    results.json's content.

    `reference` overrides the first run's pi_ref (args.json 'model'); the baseline always uses its own.
    `dtype` (--dtype) None: each run in the precision it trained in (runs.run_dtype).
    """
    paths = [runs.check_run_dir(p) for p in run_dirs]  # mistyped paths fail first, before any model is loaded
    pairs = runs.read_data(data_file)
    out = Path(out) if out else paths[0]
    data.check_out_dir(out)
    constraints = {k: v for k, v in dict(repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens,
                                         no_repeat_ngram_size=no_repeat_ngram_size).items() if v != CONSTRAINTS_OFF[k]}
    generate = dict(pairs=sample_prompts(pairs, samples_per_user, seed), max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed, constraints=constraints)
    results, generations, embeddings, notes = {}, {}, {}, []
    for i, (name, path) in enumerate(zip(report.run_names(paths), paths)):
        results[name], generations[name], embeddings[name], run_notes = evaluate_run(
            name, path, pairs, data_file, generate, reference=reference if i == 0 else None,
            device=runs.pick_device(device), dtype=dtype, quiet=quiet)
        notes += run_notes
    settings = (f"{samples_per_user} prompts per user (seed {seed}), "
                + ("greedy" if temperature == 0 else f"sampled at temperature {temperature}, top-p {top_p}")
                + f", at most {max_new_tokens} new tokens; "
                + (f"constraints that hide degeneration: {constraints}." if constraints else "no generation constraints."))
    for r in results.values():
        r["generation"] = {"samples_per_user": samples_per_user, "max_new_tokens": max_new_tokens,
                           "temperature": temperature, "top_p": top_p, "constraints": constraints}
    plots = None

    def write(tmp: Path):  # all or nothing: a failure (in a plot, say) leaves `out` as it was
        nonlocal plots
        runs.atomic_write_json(results, tmp / "results.json")
        with open(tmp / "generations.jsonl", "w") as f:
            f.writelines(json.dumps(g) + "\n" for gens in generations.values() for g in gens)
        plots = report.write_plots(results, generations, embeddings, report.user_groups(pairs), tmp,
                                   training={name: report.read_training(path) for name, path in zip(results, paths)})
        (tmp / "report.md").write_text(report.report_markdown(results, data_file, pairs, notes, plots, settings))

    out.mkdir(parents=True, exist_ok=True)
    written = runs.replace_files(out, write)
    report.print_summary(results)
    report.print_written([f for f in written if f.suffix != ".png"], None if plots is None else
                         [str(f) for f in written if f.suffix == ".png"])
    return results


def evaluate_run(name, path, pairs, data_file, generate: dict, *, reference, device, dtype, quiet):
    """One run: (its results, its generations, its user embeddings, notes for the report). dtype: --dtype, None
    for the precision the run trained in."""
    dtype, why = runs.run_dtype(path, dtype, device)
    run = runs.open_run(path, runs.DTYPES[dtype], device)
    ref_model = runs.load_reference(path, run, reference, runs.DTYPES[dtype], device)
    notes = [f"note: run {name} scored in {dtype}: {why}"]
    notes += [m for m in [coverage_message(name, run, pairs, data_file)] if m]
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
    results = run_results(run.args["stage"], records, gens)
    known = [it for it in runs.tokenize(run, pairs) if run.registry.row(it.user) != 0]
    results |= {"dtype": dtype, "training": report.training_summary(report.read_training(path)),  # users take hold?
                "attention_to_user": report.attention_to_user(run, known)}
    return (results, [{"run": name, **{k: g[k] for k in keep}} for g in gens],
            report.user_vectors(run.user_model, run.registry), notes)


# ----------------------------------------------------------------------------------------------
# Command line: `eval.py RUN_DIR ...`, `eval.py generate ...`, `eval.py export ...`


def sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int):
    """--max-new-tokens, --temperature, --top-p of eval.py and eval.py generate, each checked where parsed."""
    longest, temperature, top_p = cli.Number(int, 1), cli.Number(float, 0), cli.Number(float, 0, 1, above=True)
    p.add_argument("--max-new-tokens", type=longest, default=max_new_tokens,
                   help=f"longest answer; {longest} (default: %(default)s)")
    p.add_argument("--temperature", type=temperature, default=0.0,
                   help=f"0 = greedy (default); above 0 = sampled, seeded by --seed; {temperature}")
    p.add_argument("--top-p", type=top_p, default=None,
                   help=f"nucleus sampling mass, with --temperature > 0; {top_p} (default: all)")


def evaluate_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="eval.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="Subcommands: `eval.py generate --help` (answer as a user), `eval.py export --help` "
                                   "(for transformers + peft). New users: `python adapt.py --help`; the "
                                   "learned users: `python adapt.py users --help`.")
    p.add_argument("run", metavar="RUN_DIR", help="a pdpo or prm run directory written by train.py")
    p.add_argument("--data", required=True, help="preference pairs to evaluate on, JSON Lines (see data.py)")
    p.add_argument("--baseline", default=None, metavar="OTHER_RUN_DIR",
                   help="a second run shown side by side (e.g. vanilla DPO against P-DPO)")
    p.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR)")
    count, positive, rate = cli.Number(int, 0), cli.Number(int, 1), cli.Number(float, 0, above=True)
    p.add_argument("--samples-per-user", type=count, default=4,
                   help=f"prompts per user to generate responses for; 0 = no generation; {count} "
                        f"(default: %(default)s)")
    sampling_flags(p, max_new_tokens=64)
    p.add_argument("--batch-size", type=positive, default=16,
                   help=f"pairs per scoring batch, prompts per generation batch; {positive} (default: %(default)s)")
    hides = "hides degeneration; off by default, and the report says when used"
    p.add_argument("--repetition-penalty", type=rate, default=1.0,
                   help=f"divide the logits of tokens already in the row by this (> 1 penalizes; {hides}); {rate}")
    p.add_argument("--no-repeat-ngram-size", type=count, default=0,
                   help=f"forbid repeating any n-gram of this size (0 = off; {hides}); {count}")
    p.add_argument("--min-new-tokens", type=count, default=0,
                   help=f"forbid EOS before this many new tokens ({hides}); {count}, at most --max-new-tokens")
    runs.dtype_flag(p)
    runs.common_flags(p)
    return p


def parse_evaluate_args(argv) -> argparse.Namespace:
    p = evaluate_parser()
    args = p.parse_args(argv)
    if args.min_new_tokens > args.max_new_tokens:  # EOS forbidden for longer than the answer may be
        p.error(f"argument --min-new-tokens: got {args.min_new_tokens}, expected at most --max-new-tokens "
                f"({args.max_new_tokens})")
    return args


# ----------------------------------------------------------------------------------------------
# Answering as a user: `eval.py generate RUN --user ID --prompt TEXT` (what a personalized LM is for)


def chat_prompt(run_dir: Path, tokenizer: data.Tokenizer, prompt: str) -> str:
    """`prompt` as the one user turn of the run's chat template (chat_template.jinja, or tokenizer_config.json's
    "chat_template"), ending where the assistant answers. Rendered as Hugging Face renders it (jinja2, which
    comes with torch). A BOS the template writes is the row's BOS (data.prefix_ids adds no second one)."""
    template = (run_dir / "chat_template.jinja").read_text() if (run_dir / "chat_template.jinja").is_file() else None
    if template is None and (run_dir / "tokenizer_config.json").is_file():
        template = runs.read_json(run_dir / "tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise ValueError(f"{run_dir}: --chat, but the run's tokenizer has no chat template "
                         f"(chat_template.jinja, or 'chat_template' in tokenizer_config.json)")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"{run_dir}: the chat template refuses the prompt: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    special = lambda i: tokenizer.backend.id_to_token(i)  # noqa: E731
    return env.from_string(template).render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            bos_token=special(tokenizer.bos_id), eos_token=special(tokenizer.eos_id))


def answer_as_users(run: runs.Run, run_dir: Path, users: list[str], prompt: str, *, user_text: str = "",
                    chat: bool = False, **sampling) -> list[dict]:
    """One answer to `prompt` per user, side by side: [BOS] [e_u] [user text] [prompt] -> answer.

    A user the run never saw gets row 0, the generic embedding e_0, as at serving time. sampling:
    max_new_tokens, temperature (0 = greedy), top_p, seed (eval.generate_responses)."""
    if user_text and not run.pdpo.use_user_text:
        raise ValueError(f"{run_dir}: --user-text, but this run was trained without user text (--user-info "
                         f"implicit): it never learned to read one")
    text = chat_prompt(run_dir, run.tokenizer, prompt) if chat else prompt
    prompt_ids, user_text_ids = run.tokenizer.encode(text), run.tokenizer.encode(user_text) if user_text else []
    items = [data.TokenizedPair(user, None, prompt_ids, user_text_ids, [], [], i) for i, user in enumerate(users)]
    gens = generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items,
                              use_user_text=bool(user_text), **sampling)
    return [{"user": u, "known": run.registry.row(u) != 0, "answer": g["response"].strip()} for u, g in zip(users, gens)]


def generate_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(prog="eval.py generate", description=(
        "Answer a prompt as one or more users of a run, side by side. Unknown users get the generic embedding "
        "e_0, with a warning naming the closest known users (--strict: refused). Without --prompt, prompts are "
        "read from standard input, one per line, until end of file; none at all is an error."))
    p.add_argument("run", metavar="RUN_DIR", help="a pdpo run directory written by train.py")
    p.add_argument("--user", action="append", required=True, help="a user identifier; repeat for several")
    p.add_argument("--strict", action="store_true", help="refuse a user the run does not know (default: answer "
                   "them with e_0, and say so on standard error)")
    p.add_argument("--prompt", default=None, help="the prompt (default: read prompts from standard input)")
    p.add_argument("--user-text", default="", help="the user's description, for runs trained with --user-info "
                   "explicit or both: [BOS] [e_u] [user text] [prompt]")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    sampling_flags(p, max_new_tokens=128)
    seed = cli.Number(int, 0)
    p.add_argument("--seed", type=seed, default=0, help=f"seed of sampling; {seed} (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    runs.dtype_flag(p)
    return p


def unknown_user_message(run_dir: Path, registry: prlhf.UserRegistry, user: str) -> str:
    """Why `user` gets e_0, and the known identifiers closest to it (a typo: user_1 for user_01)."""
    closest = difflib.get_close_matches(user, registry.users, n=3, cutoff=0.0)
    return (f"{user!r} is not a user of {run_dir}: answered with the generic embedding e_0; closest known "
            f"users: {', '.join(closest) or 'none (the run has no users)'}")


def read_prompts(given: str | None):
    """--prompt, or the non-blank lines of standard input (on a terminal, after a line saying how to end)."""
    if given is not None:
        if not given.strip():
            raise ValueError("--prompt is empty: give the text to answer (or leave --prompt out to read "
                             "standard input)")
        yield given
        return
    if sys.stdin is None:
        return
    if sys.stdin.isatty():
        print("reading prompts from standard input, one per line; end with Ctrl-D", file=sys.stderr)
    yield from (line.rstrip("\n") for line in sys.stdin if line.strip())


def run_generate(args):
    device = runs.pick_device(args.device)
    run_dir = runs.check_run_dir(args.run)
    run = runs.open_run(run_dir, runs.DTYPES[runs.run_dtype(run_dir, args.dtype, device)[0]], device)
    for user in args.user:
        if run.registry.row(user) == 0:
            if args.strict:
                raise ValueError(unknown_user_message(run_dir, run.registry, user).replace(
                    "answered with the generic embedding e_0", "refused (--strict)"))
            print(f"warning: {unknown_user_message(run_dir, run.registry, user)}", file=sys.stderr)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    answered = 0
    for prompt in read_prompts(args.prompt):
        for a in answer_as_users(run, run_dir, args.user, prompt, user_text=args.user_text, chat=args.chat, **sampling):
            print(f"[{a['user']}{'' if a['known'] else ', unseen: e_0'}] {a['answer']}", flush=True)
        answered += 1
    if not answered:
        raise ValueError("no prompt to answer: give --prompt TEXT, or prompts on standard input, one per line "
                         "(standard input held none)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in ("adapt", "users", "generate", "export") else "evaluate"
    try:
        if command == "generate":
            run_generate(generate_parser().parse_args(argv[1:]))
        elif command == "export":  # adapters and user embeddings for Hugging Face tools: export.py
            import export
            export.main(argv[1:])
        elif command in ("adapt", "users"):  # adapt.py imports this file, not the other way round
            runs.fail(f"`eval.py {command}` is now `python adapt.py{' users' if command == 'users' else ''} "
                      f"{' '.join(argv[1:])}`".rstrip() + " (see python adapt.py --help)")
        else:
            args = parse_evaluate_args(argv)
            run_dirs = [args.run] + ([args.baseline] if args.baseline else [])
            evaluate_runs(run_dirs, args.data, out=args.out, reference=args.reference,
                          samples_per_user=args.samples_per_user, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                          seed=args.seed, device=args.device, dtype=args.dtype, quiet=args.quiet,
                          repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
                          no_repeat_ngram_size=args.no_repeat_ngram_size)
    except (data.DataError, ValueError, FileNotFoundError) as e:
        runs.fail(str(e))


if __name__ == "__main__":
    main()
