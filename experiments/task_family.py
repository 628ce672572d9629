"""P-DPO over a family of random preference tasks (examples/family.py): does it serve every group, on most members?

    python experiments/task_family.py                                  # tasks 0-5, seed 0
    python experiments/task_family.py --tasks 0,1 --seeds 0,1
    python experiments/task_family.py --tasks issue --pdpo user_init_range=0.5 --tag r05   # a candidate P-DPO setting
    python experiments/task_family.py --tasks 3 --probe                 # + user-embedding diagnostics (norms, grads, attention)
    python experiments/task_family.py --tasks 8,9 --sft max_steps=1600  # another SFT stage (own run directories)
    python experiments/task_family.py --sft-language 0                  # SFT on the training pairs alone (as before)
    python experiments/task_family.py --tasks 0,1 --sft-only            # the SFT model only: its misses, by object

For each member x seed, as examples/demo.py does: a byte-level BPE on the member's corpus, a tiny LLaMA
(model.TINY_LLAMA unless --hidden/--layers/--model), SFT on both responses of the training pairs and of
--sft-language pairs from nobody (Task.language_pairs: every topic answered, every kind alike; what a pretrained
LM would bring, since a from-scratch one cannot name a topic it never saw answered), then vanilla DPO and the
demo's P-DPO arm (individual, alpha 0.5; T_u and the rest from the recipe) from that SFT model, all
`python train.py --recipe tiny`. Per group: held-out accuracy of the implicit reward, answers as preferred
(share of known users' greedy answers of their group's kind) and clean answers (any kind); per run, the SFT
model's own clean answers (what DPO and P-DPO start from). A member x seed is
"eligible" where vanilla DPO leaves a minority group at <= 0.6 accuracy (personalization is needed there), and a
success where P-DPO then reaches >= 0.85 accuracy and >= 0.85 answers as preferred on every known group.
Runs are kept in --workdir (default experiments/results/task_family-runs, git-ignored) and reused: an arm with a new
--tag retrains P-DPO only. Figures go to experiments/results/task_family-<tag>.json; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: shared helpers
import common as C  # noqa: F401  (puts the project root on sys.path)

import data  # noqa: E402
import eval as evaluation  # noqa: E402
import model as lm  # noqa: E402
import prlhf  # noqa: E402
import report  # noqa: E402
import runs  # noqa: E402
from examples import family as F  # noqa: E402
from examples.toy import preferred_answers  # noqa: E402

ISSUE_TASK = "issue"  # --tasks issue: make_task(0, **family.ISSUE_26)
ISSUE_35_TASK = "issue35"  # --tasks issue35: make_bag_task(0, **family.ISSUE_35); --tasks b7: make_bag_task(7)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="0,1,2,3,4,5", help="comma-separated member seeds, 'issue', 'toy-length', 'toy-style'; members "
                   "without a template: 'b0', 'b1', ... (family.make_bag_task), 'issue35'")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--hidden", type=int, default=lm.TINY_LLAMA["hidden_size"], help="model width d")
    p.add_argument("--layers", type=int, default=lm.TINY_LLAMA["n_layers"], help="transformer blocks")
    p.add_argument("--model", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="model.ModelConfig fields over model.TINY_LLAMA (e.g. n_kv_heads=4); own run directories")
    p.add_argument("--pdpo", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="P-DPO TrainConfig fields over the recipe (e.g. user_init_range=0.5)")
    p.add_argument("--sft", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="SFT TrainConfig fields over the recipe (e.g. epochs=15); such runs get their own directories")
    p.add_argument("--sft-language", type=int, default=1000, metavar="N",
                   help="add N of the member's language pairs (Task.language_pairs: every topic, no user's preference) "
                        "to the SFT data; own run directories")
    p.add_argument("--sft-only", action="store_true",
                   help="train and score the SFT model only: its clean answers, and its misses by how often the "
                        "prompt's object is answered in the training pairs (never / 1-2 / 3+)")
    p.add_argument("--tag", default="base", help="name of this P-DPO arm (its run directory and JSON file)")
    p.add_argument("--probe", action="store_true", help="record user-embedding diagnostics during P-DPO")
    p.add_argument("--more-prompts", type=int, default=0, metavar="N",
                   help="also count P-DPO's answers as preferred on N further held-out prompts per known user "
                        "(success_more_prompts; the default 8 leaves a small group with 16-24 answers)")
    p.add_argument("--workdir", default=str(C.ROOT / "experiments" / "results" / "task_family-runs"))
    p.add_argument("--accuracy", type=float, default=0.85)
    p.add_argument("--preferred", type=float, default=0.85)
    p.add_argument("--dpo-fails", type=float, default=0.6, help="eligible: vanilla DPO at or below this on a minority")
    return p.parse_args(argv)


def member(name: str, **overrides) -> F.Task:
    """A member seed, "issue" (issue #26's task), or "toy-length" / "toy-style" (the demo's tasks, family.from_toy).
    overrides go to make_task (e.g. n_valid_per_user); the toys take none."""
    if name.startswith("toy-"):
        if overrides:
            raise ValueError(f"--more-prompts: not for the toy members ({name})")
        return F.from_toy(name[len("toy-"):])
    if name == ISSUE_35_TASK:
        return F.make_bag_task(0, **{**F.ISSUE_35, **overrides})
    if name.startswith("b"):
        return F.make_bag_task(int(name[1:]), **overrides)
    return F.make_task(0, **{**F.ISSUE_26, **overrides}) if name == ISSUE_TASK else F.make_task(int(name), **overrides)


def field_value(text: str):
    """--pdpo FIELD=VALUE: a number, true / false, or text, as train.py's flag --FIELD takes it."""
    key, value = text.split("=", 1)
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


def results(run_dir: Path, task: F.Task) -> dict:
    """As the demo's table: accuracy per group, greedy answers sorted into the member's kinds (task.classify)."""
    r = preferred_answers(run_dir, task.valid, task.kind_of, max_new_tokens=48)
    groups = {g: {k: v[k] for k in ("accuracy", "pairs", "answers_as_preferred", "empty")} for g, v in r["groups"].items()}
    users = json.loads((run_dir / "eval.json").read_text())["users"]
    return {"groups": groups, "users": {u: s["accuracy"] for u, s in users.items()}, "clean_answers": r["clean_answers"]}


def sft_answers(run_dir: Path, task: F.Task) -> dict:
    """The SFT model's greedy answers to the held-out prompts (kept in RUN/clean_answers.json): the share of some
    group's kind (clean_answers; its misses are mostly about another noun than the prompt's), and per group the
    share of empty answers to that group's prompts (empty): what vanilla DPO and P-DPO start from."""
    cache = run_dir / "clean_answers.json"
    if not cache.is_file() or "empty" not in runs.read_json(cache):
        kinds, responses = answer_kinds(run_dir, task, task.valid, with_responses=True)
        empty = {g: [not r.strip() for r, p in zip(responses, task.valid) if p.group == g] for g in task.kinds}
        runs.atomic_write_json({"clean_answers": sum(k is not None for k in kinds) / len(kinds),
                                "empty": {g: sum(e) / len(e) for g, e in empty.items()}}, cache)
    return runs.read_json(cache)


def answer_kinds(run_dir: Path, task: F.Task, pairs: list, with_responses: bool = False) -> list:
    """The run's greedy answer to each pair's prompt, as that pair's user (none for an SFT run, which has no user
    model), sorted into the task's kinds: a group, or None (broken); with_responses: (kinds, the answers)."""
    run = runs.load_run(run_dir)
    items, _ = data.tokenize_pairs(pairs, run.tokenizer, 96, 32)
    gens = evaluation.generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items, max_new_tokens=48)
    kinds, responses = [None] * len(pairs), [""] * len(pairs)
    for g, item in zip(gens, items):
        kinds[item.index] = task.kind_of(pairs[item.index], g["response"])
        responses[item.index] = g["response"]
    return (kinds, responses) if with_responses else kinds


def sft_misses_by_object(run_dir: Path, task: F.Task) -> dict:
    """The SFT model's held-out answers by how often their prompt's object is answered in the training pairs:
    {"never" / "1-2" / "3+": [prompts, broken answers]}. A from-scratch LM misses what it never saw answered."""
    seen = Counter(task.subject(p) for p in task.train)
    out = {"never": [0, 0], "1-2": [0, 0], "3+": [0, 0]}
    for pair, kind in zip(task.valid, answer_kinds(run_dir, task, task.valid)):
        n = seen[task.subject(pair)]
        bucket = out["never" if n == 0 else "1-2" if n <= 2 else "3+"]
        bucket[0] += 1
        bucket[1] += kind is None
    return out


def more_answers(run_dir: Path, name: str, per_user: int) -> dict:
    """Answers as preferred per known group on per_user further held-out prompts per known user (the member drawn
    with n_valid_per_user=per_user: the same training pairs, other held-out ones): the measurement with less of its
    own noise (a group of 2-3 users has only 16-24 answers at the default 8)."""
    task = member(name, n_valid_per_user=per_user)
    known = [p for p in task.valid if p.group != "unseen"]
    hits = {g: [] for g in task.kinds}
    for pair, kind in zip(known, answer_kinds(run_dir, task, known)):
        hits[pair.group].append(kind == pair.group)
    return {g: sum(h) / len(h) for g, h in hits.items()}


# ----------------------------------------------------------------------------------------------
# Do the users take hold? (--probe): what train.py logs in metrics.jsonl, and where the LM looks


def probe(run_dir: Path, task: F.Task) -> dict:
    """Per-group training accuracy by fifth of training and the norms (report.training_summary), and the
    attention from response positions to the user positions (report.attention_to_user), known users' pairs."""
    run = runs.load_run(run_dir)
    items, _ = data.tokenize_pairs([p for p in task.valid if p.group != "unseen"], run.tokenizer, 96, 32)
    return {**report.training_summary(report.read_training(run_dir)),
            "attention_to_user": report.attention_to_user(run, items)}


# ----------------------------------------------------------------------------------------------
# One member x seed: SFT and DPO once (reused by every --tag), P-DPO per tag


def run_one(name: str, seed: int, args, pdpo_fields: dict, sft_fields: dict) -> dict:
    task = member(name)
    sft_tag = "".join(f"-{k}{v}" for k, v in sft_fields.items())  # e.g. -epochs15.0
    model_fields = dict(field_value(f) for f in args.model)
    model_tag = "".join(f"-{k}{v}" for k, v in model_fields.items())
    model_tag += f"-lang{args.sft_language}" if args.sft_language else ""  # SFT data: also N language pairs
    root = Path(args.workdir) / f"task{name}-seed{seed}-d{args.hidden}l{args.layers}{model_tag}{sft_tag}"
    data_dir, base = root / "data", root / "base"
    data.write_pairs(data_dir / "train.jsonl", task.train)
    data.write_pairs(data_dir / "valid.jsonl", task.valid)
    data.write_pairs(data_dir / "sft.jsonl", task.train + task.language_pairs(args.sft_language))
    times = {}
    if not (base / "config.json").is_file():
        tokenizer = data.train_bpe_tokenizer(task.corpus_texts(), 768, out_dir=base)
        cfg = lm.ModelConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                             eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                             **{**lm.TINY_LLAMA, "hidden_size": args.hidden, "n_layers": args.layers,
                                "head_dim": args.hidden // lm.TINY_LLAMA["n_heads"],
                                "intermediate_size": 2 * args.hidden, **model_fields})
        lm.save_pretrained(lm.build_model(cfg, seed=seed), base)
    common = dict(data=str(data_dir / "train.jsonl"), seed=seed, quiet=True, max_length=96, max_prompt_length=32,
                  recipe="tiny")
    preference = dict(stage="pdpo", model=str(root / "sft"), valid=str(data_dir / "valid.jsonl"), **common)
    sft = {**common, "data": str(data_dir / "sft.jsonl")}  # the training pairs and the language pairs
    arms = {"sft": dict(stage="sft", model=str(base), sft_on="both", **sft, **sft_fields),
            "dpo": dict(**prlhf.VANILLA_DPO, **preference),
            f"pdpo-{args.tag}": {**dict(user_model="individual", alpha=0.5, **preference),  # the demo's arm
                                 **pdpo_fields}}  # --pdpo may override T_u and alpha too
    if args.sft_only:
        arms = {"sft": arms["sft"]}
    for arm, fields in arms.items():
        done = root / arm / ("eval.json" if arm != "sft" else "config.json")
        if done.is_file():
            continue
        t0 = time.perf_counter()
        C.run_train_script(out=str(root / arm), **fields)  # python train.py --recipe tiny ...
        times[arm] = round(time.perf_counter() - t0, 1)
    out = {"task": name, "seed": seed, "summary": task.summary(), "times": times}
    if args.sft_only:  # one pass of greedy answers gives both figures
        misses = sft_misses_by_object(root / "sft", task)
        clean = 1 - sum(m for _, m in misses.values()) / sum(n for n, _ in misses.values())
        return {**out, "sft_clean_answers": clean, "sft_misses_by_object": misses}
    sft = sft_answers(root / "sft", task)
    out = {**out, "sft_clean_answers": sft["clean_answers"], "sft_empty": sft["empty"],
           "dpo": results(root / "dpo", task), "pdpo": results(root / f"pdpo-{args.tag}", task)}
    if args.probe:
        out["probe"] = probe(root / f"pdpo-{args.tag}", task)
    if args.more_prompts:
        out["pdpo"]["more_answers_as_preferred"] = more_answers(root / f"pdpo-{args.tag}", name, args.more_prompts)
    return out


def check(r: dict, task: F.Task, args) -> dict:
    dpo, pdpo = r["dpo"]["groups"], r["pdpo"]["groups"]
    largest = max(task.shares, key=task.shares.get)
    minorities = [g for g in task.kinds if g != largest]
    eligible = any(dpo[g]["accuracy"] <= args.dpo_fails for g in minorities)
    ok = all(pdpo[g]["accuracy"] >= args.accuracy and (pdpo[g]["answers_as_preferred"] or 0) >= args.preferred
             for g in task.kinds)
    # no empty answers where the SFT model answered every prompt of the group (issue #35)
    no_empty = all(pdpo[g]["empty"] <= 0.01 for g in task.kinds if r.get("sft_empty", {}).get(g, 0) == 0)
    verdict = {"eligible": eligible, "success": ok, "no_empty": no_empty}
    more = r["pdpo"].get("more_answers_as_preferred")
    if more is not None:  # --more-prompts: the same test, answers counted on the further prompts
        verdict["success_more_prompts"] = all(pdpo[g]["accuracy"] >= args.accuracy and more[g] >= args.preferred
                                              for g in task.kinds)
    return verdict


def sft_summary(records: list, seconds: float) -> dict:
    clean = [r["sft_clean_answers"] for r in records]
    by_object = {k: [sum(r["sft_misses_by_object"][k][i] for r in records) for i in (0, 1)]
                 for k in ("never", "1-2", "3+")}
    figures = {"runs": len(records), "sft_clean_mean": round(sum(clean) / len(clean), 3), "sft_clean_min": min(clean),
               "below_0.9": sum(c < 0.9 for c in clean), "by_object": by_object}
    print(f"SFT answers clean: mean {figures['sft_clean_mean']:.3f}, min {min(clean):.3f}, below 0.9 in "
          f"{figures['below_0.9']} of {len(records)} runs; missed by object " +
          ", ".join(f"{k}: {m} of {n}" for k, (n, m) in by_object.items()) + f"; {seconds:.0f} s")
    C.emit_json(figures)
    return figures


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    pdpo_fields = dict(field_value(f) for f in args.pdpo)
    sft_fields = dict(field_value(f) for f in args.sft)
    rows, records = [], []
    t0 = time.perf_counter()
    for name in args.tasks.split(","):
        task = member(name)
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run_one(name, seed, args, pdpo_fields, sft_fields)
            if args.sft_only:
                records.append(r)
                print(f"task {name} seed {seed}: {task.n_users} users x {task.pairs_per_user} pairs; SFT answers "
                      f"clean {r['sft_clean_answers']:.3f}; [prompts, missed] by object {r['sft_misses_by_object']}",
                      flush=True)
                continue
            r.update(check(r, task, args))
            records.append(r)
            print(f"task {name} seed {seed}: {r['summary']}; {task.n_users} users x {task.pairs_per_user} pairs; "
                  f"{'eligible' if r['eligible'] else 'not eligible'}, {'SUCCESS' if r['success'] else 'failure'}; "
                  f"SFT answers clean {r['sft_clean_answers']:.3f}; {r['times']}", flush=True)
            for g in task.kinds:
                d, p = r["dpo"]["groups"][g], r["pdpo"]["groups"][g]
                rows.append([name, seed, g, f"{task.shares[g]:.2f}", f"{d['accuracy']:.3f}", f"{p['accuracy']:.3f}",
                             f"{d['answers_as_preferred']:.3f}", f"{p['answers_as_preferred']:.3f}",
                             f"{r['dpo']['clean_answers']:.3f}", f"{r['pdpo']['clean_answers']:.3f}",
                             f"{r['sft_empty'][g]:.2f}", f"{d['empty']:.2f}", f"{p['empty']:.2f}"])
            if "probe" in r:
                print("  probe:", json.dumps(r["probe"]), flush=True)
    if args.sft_only:
        return sft_summary(records, time.perf_counter() - t0)
    C.print_table(["task", "seed", "group", "share", "acc DPO", "acc P-DPO", "as pref DPO", "as pref P-DPO",
                   "clean DPO", "clean P-DPO", "empty SFT", "empty DPO", "empty P-DPO"], rows, title=f"P-DPO arm {args.tag} {pdpo_fields or '(recipe tiny)'}")
    eligible = [r for r in records if r["eligible"]]
    successes = [r for r in eligible if r["success"]]
    print(f"success: {len(successes)} of {len(eligible)} eligible member x seed runs ({len(records)} in all); "
          f"failures: {[(r['task'], r['seed']) for r in eligible if not r['success']]}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"no empty answers (<= 1% per group the SFT model answers non-empty): {sum(r['no_empty'] for r in eligible)} "
          f"of {len(eligible)} eligible; failures: {[(r['task'], r['seed']) for r in eligible if not r['no_empty']]}")
    if args.more_prompts:
        print(f"on {args.more_prompts} further prompts per known user: success "
              f"{sum(r['success_more_prompts'] for r in eligible)} of {len(eligible)}; failures: "
              f"{[(r['task'], r['seed']) for r in eligible if not r['success_more_prompts']]}")
    figures = {"tag": args.tag, "pdpo_fields": pdpo_fields, "sft_fields": sft_fields, "hidden": args.hidden,
               "layers": args.layers, "model_fields": args.model, "sft_language": args.sft_language,
               "eligible": len(eligible), "successes": len(successes), "runs": records}
    out = C.ROOT / "experiments" / "results" / f"task_family-{args.tag}.json"
    existing = json.loads(out.read_text())["runs"] if out.is_file() else []
    keep = [r for r in existing if (r["task"], r["seed"]) not in {(x["task"], x["seed"]) for x in records}]
    merged = keep + records  # this tag's runs of earlier invocations too
    out.write_text(json.dumps({**figures, "eligible": sum(r["eligible"] for r in merged),
                               "successes": sum(r["eligible"] and r["success"] for r in merged),
                               "runs": merged}, indent=1) + "\n")
    C.emit_json({k: v for k, v in figures.items() if k != "runs"})
    return figures


if __name__ == "__main__":
    main()
