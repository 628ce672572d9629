"""The built-in demo (`python train.py`) reproduces the paper's finding on the toy task."""
import json

import train as T


def test_demo_reproduces_the_papers_finding(tmp_path):
    results = T.demo(seed=0, out=str(tmp_path / "demo"), quiet=True)
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == results
    dpo, pdpo = results["dpo"]["groups"], results["pdpo"]["groups"]
    assert set(dpo) == set(pdpo) == {"long", "short", "unseen"}
    # P-DPO serves both the majority and the minority; vanilla DPO serves the majority only
    assert pdpo["long"]["accuracy"] >= 0.9 and pdpo["short"]["accuracy"] >= 0.9
    assert dpo["long"]["accuracy"] >= 0.7 and dpo["short"]["accuracy"] <= 0.5
    # ... and personalizes what it generates
    assert pdpo["long"]["mean_response_tokens"] >= 1.5 * pdpo["short"]["mean_response_tokens"]
    for name in ("sft", "dpo", "pdpo"):
        assert (tmp_path / "demo" / name / "args.json").is_file()
    assert (tmp_path / "demo" / "data" / "train.jsonl").is_file()
