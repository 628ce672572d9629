"""The demo's two toy tasks over seeds: does P-DPO with --recipe tiny answer each user as they prefer, every time?

    python experiments/toy_seeds.py                          # the length task, seeds 0-4, then the style task, seeds 0-2
    python experiments/toy_seeds.py --tasks style --seeds 0  # one run

Each run is `python train.py --example toy|toy-style --seed S` (SFT, vanilla DPO and P-DPO with --recipe tiny,
then greedy answers to every held-out prompt). Per run and method: accuracy per group (held-out pairs
ranked by the implicit reward), "answers as preferred" per group (share of known users' greedy answers that are
exactly an answer of their preferred kind), and the share of clean answers (exactly one of the task's answers,
for known and unseen users). The targets: P-DPO accuracy and answers as preferred per known group, clean
answers, and vanilla DPO failing a minority (its accuracy on the smallest group).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: shared helpers
import common as C

EXAMPLES = {"length": "toy", "style": "toy-style"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="length,style", help="comma-separated: length, style")
    p.add_argument("--seeds", default="", help="comma-separated seeds (default: 0-4 for length, 0-2 for style)")
    p.add_argument("--workdir", default="", help="where runs go (default: a temp dir)")
    p.add_argument("--accuracy", type=float, default=0.95, help="P-DPO accuracy target per known group")
    p.add_argument("--preferred", type=float, default=0.90, help="P-DPO answers-as-preferred target per known group")
    p.add_argument("--clean", type=float, default=0.95, help="P-DPO clean-answer target")
    return p.parse_args(argv)


def run(task: str, seed: int, root: Path) -> dict:
    t0 = time.perf_counter()
    out = C.run_train_script(example=EXAMPLES[task], seed=seed, out=str(root / f"{task}-{seed}"), quiet=True)
    return {**json.loads((out / "results.json").read_text()), "seconds": time.perf_counter() - t0}


def check(r: dict, args) -> dict:
    """The targets, per run: P-DPO serves every known group, vanilla DPO fails its smallest group."""
    known = {g: s for g, s in r["pdpo"]["groups"].items() if g != "unseen"}
    smallest = min(known, key=lambda g: known[g]["pairs"])
    return {"pdpo_accuracy": all(s["accuracy"] >= args.accuracy for s in known.values()),
            "pdpo_as_preferred": all(s["answers_as_preferred"] >= args.preferred for s in known.values()),
            "pdpo_clean": r["pdpo"]["clean_answers"] >= args.clean,
            "dpo_fails_minority": r["dpo"]["groups"][smallest]["accuracy"] <= 0.5}


def main(argv=None):
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="toy_seeds-") if not args.workdir else None
    root = Path(args.workdir or tmp.name)
    figures = {}
    for task in args.tasks.split(","):
        seeds = [int(s) for s in (args.seeds or ("0,1,2,3,4" if task == "length" else "0,1,2")).split(",")]
        rows, results = [], {}
        for seed in seeds:
            r = results[seed] = run(task, seed, root)
            groups = [g for g in r["pdpo"]["groups"] if g != "unseen"]
            for method in ("dpo", "pdpo"):
                m = r[method]
                rows.append([seed, method] + [f"{m['groups'][g]['accuracy']:.3f}" for g in groups]
                            + [f"{m['groups'][g]['answers_as_preferred']:.3f}" for g in groups]
                            + [f"{m['groups'][g]['mean_response_tokens']:.1f}" for g in groups]
                            + [f"{m['clean_answers']:.3f} of {m['answers']}", f"{r['seconds']:.0f}" if method == "pdpo" else ""])
        C.print_table(["seed", "method"] + [f"acc {g}" for g in groups] + [f"as preferred {g}" for g in groups]
                      + [f"tokens {g}" for g in groups] + ["clean answers", "wall s"], rows, title=f"task {task}")
        checks = {seed: check(r, args) for seed, r in results.items()}
        for seed, c in checks.items():
            print(f"  seed {seed}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in c.items()))
        figures[task] = {"seeds": seeds, "all_met": all(all(c.values()) for c in checks.values()), "checks": checks,
                         "results": results}
    C.emit_json({task: {k: v for k, v in f.items() if k != "results"} for task, f in figures.items()})
    if tmp:
        tmp.cleanup()
    return figures


if __name__ == "__main__":
    main()
