"""The real-model experiment over seeds: does P-DPO on SmolLM2-135M-Instruct serve both groups, every time?

    python experiments/smollm2_seeds.py --seeds 0,1,2 --workdir runs/smollm2-seeds   # ~18-20 min a seed on 2 cores

Each run is `python train.py --example smollm2 --seed S --out WORKDIR/seed-S` (answers sampled from the model,
vanilla DPO and P-DPO with LoRA, greedy answers to every held-out pair); a seed whose results.json is already
in --workdir is read, not run again. The seed draws the prompts, their split and which users judge each one.
The targets (the real-model issue): P-DPO accuracy >= 0.8 on both known groups, vanilla DPO below 0.5 on the
minority (short), P-DPO's greedy answers for long-preferring users >= 1.5x as long as for short-preferring
ones, no empty answers and under 10% with a repeated word 3-gram (P-DPO, known users), under 20 minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/common.py: shared helpers
import common as C


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--workdir", default="runs/smollm2-seeds", help="where the runs go (seed-S each)")
    p.add_argument("--precision", default="", help="passed to the example (default: its own, auto)")
    return p.parse_args(argv)


def check(r: dict) -> dict:
    """The issue's targets for one run."""
    pdpo, dpo = r["pdpo"]["groups"], r["dpo"]["groups"]
    known = [pdpo["long"], pdpo["short"]]
    return {"pdpo_accuracy_0.8": all(g["accuracy"] >= 0.8 for g in known),
            "dpo_minority_below_0.5": dpo["short"]["accuracy"] < 0.5,
            "length_ratio_1.5": r["pdpo"]["length_ratio"] >= 1.5,
            "no_empty": all(g["empty"] == 0 for g in known),
            "repeated_3gram_below_0.1": all(g["repeated_3gram"] < 0.1 for g in known),
            "under_20_min": sum(r["seconds"].values()) < 1200}


def main(argv=None):
    args = parse_args(argv)
    results, rows = {}, []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.workdir) / f"seed-{seed}"
        if not (out / "results.json").is_file():
            C.run_train_script(example="smollm2", seed=seed, out=str(out), quiet=True,
                               **({"precision": args.precision} if args.precision else {}))
        r = results[seed] = json.loads((out / "results.json").read_text())
        for method in ("dpo", "pdpo"):
            g = r[method]["groups"]
            rows.append([seed, method, *(f"{g[k]['accuracy']:.3f}" for k in ("long", "short", "unseen-long")),
                         f"{g['long']['mean_response_tokens']:.1f} / {g['short']['mean_response_tokens']:.1f}",
                         f"{r[method]['length_ratio']:.2f}",
                         f"{g['long']['repeated_3gram']:.2f} / {g['short']['repeated_3gram']:.2f}",
                         f"{r['base']['groups']['held-out']['repeated_3gram']:.2f}" if method == "dpo" else "",
                         f"{sum(r['seconds'].values()):.0f}" if method == "pdpo" else ""])
    print(f"{C.describe_machine('cpu')}; the runs' precision: "
          + ", ".join(f"seed {seed} {r.get('precision', '?')}" for seed, r in results.items()))
    C.print_table(["seed", "method", "acc long", "acc short", "acc unseen-long", "tokens long / short users",
                   "ratio", "repeated 3-gram long / short", "base repeated 3-gram", "wall s"], rows)
    checks = {seed: check(r) for seed, r in results.items()}
    for seed, c in checks.items():
        print(f"  seed {seed}: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in c.items()))
    C.emit_json({"seeds": list(results), "checks": checks})
    return results, checks


if __name__ == "__main__":
    main()
