"""The P-SOUPS experiment over seeds: does P-DPO on SmolLM2-135M-Instruct serve every profile, every time?

    python experiments/psoups_seeds.py --seeds 0,1,2,3,4                       # profiles, ~30 min a seed on 2 cores
    python experiments/psoups_seeds.py --seeds 0,1,2 --users composite

Each seed is examples/psoups.py's experiment in WORKDIR/seed-S (a seed whose results.json exists is read, not
run again); all seeds share one cache of sampled answers (--answers, by default the main command's), so the
seed draws the split of the prompts, which user judges each training pair, initialisation and data order.
The targets (issue 36): P-DPO's held-out accuracy >= 0.8 on every profile; vanilla DPO <= 0.5 on each
minority pole (P1B, P2B, P3B); P-DPO's answers win against vanilla DPO's on each profile's own dimension
(>= 0.6 per profile, >= 0.7 averaged; a tie counts half); no arm more empty answers or repeated 3-grams than
the instruct model. Composite users: P-DPO's win rate against vanilla DPO >= 0.6 averaged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import psoups  # noqa: E402

MINORITY = ("P1B", "P2B", "P3B")


def check(r: dict, users: str) -> dict:
    """The issue's targets for one run."""
    wins = [w["dpo"][p] for u, w in r["win_rates"].items() for p in r["users"][u]]
    def share(arm, k):  # over all of the arm's answers (every user answers every held-out question)
        return sum(x[k] for x in r["answers"][arm].values()) / len(r["answers"][arm])
    clean = all(share(a, k) <= share("instruct", k) for a in r["answers"] for k in ("empty", "repeated_3gram"))
    if users == "composite":
        return {"win_vs_dpo_mean_0.6": sum(wins) / len(wins) >= 0.6, "no_arm_worse_than_instruct": clean}
    groups = r["pdpo"]["groups"]
    return {"pdpo_accuracy_0.8": all(g["accuracy"] >= 0.8 for g in groups.values()),
            "dpo_minority_0.5": all(r["dpo"]["groups"][p]["accuracy"] <= 0.5 for p in MINORITY),
            "win_vs_dpo_0.6_each": min(wins) >= 0.6, "win_vs_dpo_0.7_mean": sum(wins) / len(wins) >= 0.7,
            "no_arm_worse_than_instruct": clean}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--users", default="profiles", choices=["profiles", "composite"])
    p.add_argument("--workdir", default="runs/psoups-seeds", help="where the runs go (seed-S each)")
    p.add_argument("--answers", default="", help="sampled answers' cache (default: runs/psoups/answers-PRECISION.json)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = p.parse_args(argv)
    results, checks = {}, {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = Path(args.workdir) / f"seed-{seed}"
        file = out / args.users / "results.json"
        if file.is_file():
            results[seed] = psoups.runs.read_json(file)
        else:
            precision = psoups.runs.pick_precision(args.precision, "cpu")
            results[seed] = psoups.psoups_demo(out=str(out), seed=seed, quiet=True, precision=precision,
                                               users=args.users,
                                               answers=args.answers or f"runs/psoups/answers-{precision}.json")
        checks[seed] = check(results[seed], args.users)
    print(f"\n{args.users} users, P-DPO (vanilla DPO) held-out accuracy and P-DPO's win rate against vanilla DPO / "
          f"prompting / the instruct model, per pole")
    for seed, r in results.items():
        for user, poles in r["users"].items():
            w = r["win_rates"][user]
            group = poles[0] if args.users == "profiles" else user[2:]
            print(f"seed {seed} {r['precision']} {user:<16} acc {r['pdpo']['groups'][group]['accuracy']:.3f} "
                  f"({r['dpo']['groups'][group]['accuracy']:.3f})  " + "  ".join(
                      f"{p} {w['dpo'][p]:.2f} / {w['prompting'][p]:.2f} / {w['instruct'][p]:.2f}" for p in poles))
        print(f"seed {seed}: {r['seconds']['total']:.0f} s (training included if it ran in that call); " + ", ".join(
            f"{k} {'yes' if v else 'NO'}" for k, v in checks[seed].items()))
    met = {k: sum(c[k] for c in checks.values()) for k in next(iter(checks.values()))}
    print("targets met on seeds: " + ", ".join(f"{k} {n} of {len(checks)}" for k, n in met.items()))
    return results, checks


if __name__ == "__main__":
    main()
