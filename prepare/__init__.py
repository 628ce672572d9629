"""Dataset preparation: the paper's datasets, from files you downloaded, to our JSON Lines pairs (data.py).

One script per dataset, in the manner of nanoGPT's data/*/prepare.py; each writes OUT/train.jsonl and
OUT/valid.jsonl and prints what it kept and dropped:

    python -m prepare.tldr --comparisons batch*.jsonl --out data/tldr        # PAPER.md experiment 1
    python -m prepare.psoups --dir P-SOUPS/data/rm_training --out data/psoups   # experiment 2
    python -m prepare.prism --dir PRISM --out data/prism                       # experiment 3

Nothing here touches the network. docs/reference_code.md says where we depart from the reference code.
"""
import sys
from pathlib import Path

import data


def convert_and_write(convert, out_dir) -> int:
    """Run convert() -> (train, valid, stats), print the stats and write the split; exit code 0.
    A person's input problem (a missing file, a bad record) is one line on stderr and exit code 2."""
    try:
        data.check_out_dir(Path(out_dir))
        train, valid, stats = convert()
        if stats:
            print(", ".join(f"{k} {v}" for k, v in stats.items()))
        for name, pairs in (("train", train), ("valid", valid)):
            if not pairs:  # a file train.py and eval.py would refuse: say so now, and write neither
                raise data.DataError(f"{out_dir}: nothing written, the {name} split would be empty (counts above)")
        data.write_split(out_dir, train, valid)
        return 0
    except (data.DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
