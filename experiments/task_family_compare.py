"""Side by side: P-DPO arms of experiments/task_family.py (their JSON files in experiments/results), per member x seed.

    python experiments/task_family_compare.py base warmup60 userlr1e-2const

Per run and arm: S(uccess) or F(ailure), the lowest known group's held-out accuracy, the lowest group's answers
as preferred, and the clean answers; per arm the success count and the means of the two minima.
"""
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def minima(r):
    groups = [s for g, s in r["pdpo"]["groups"].items() if g != "unseen"]
    return min(s["accuracy"] for s in groups), min(s["answers_as_preferred"] for s in groups)


def main(tags):
    arms = {t: {(r["task"], r["seed"]): r for r in json.loads((RESULTS / f"task_family-{t}.json").read_text())["runs"]}
            for t in tags}
    print("task seed | " + " | ".join(f"{t}: min acc / min as preferred / clean" for t in tags))
    for key in arms[tags[0]]:
        cells = []
        for t in tags:
            r = arms[t].get(key)
            if r is None:
                cells.append("-")
                continue
            acc, pref = minima(r)
            cells.append(f"{'S' if r['success'] else 'F'} {acc:.2f} / {pref:.2f} / {r['pdpo']['clean_answers']:.2f}")
        print(*key, "|", " | ".join(cells))
    for t, runs in arms.items():
        m = [minima(r) for r in runs.values()]
        print(f"{t}: success {sum(r['success'] and r['eligible'] for r in runs.values())} of "
              f"{sum(r['eligible'] for r in runs.values())} eligible; mean lowest-group accuracy "
              f"{sum(a for a, _ in m) / len(m):.3f}, answers as preferred {sum(p for _, p in m) / len(m):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
