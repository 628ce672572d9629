"""The built-in demo (`python train.py`) reproduces the paper's finding on the toy tasks, and answers well."""
import json

import pytest

import train as T
from examples import demo


def test_demo_reproduces_the_papers_finding(tmp_path):
    results = demo.demo(seed=0, out=str(tmp_path / "demo"), quiet=True)
    assert json.loads((tmp_path / "demo" / "results.json").read_text()) == results
    dpo, pdpo = results["dpo"]["groups"], results["pdpo"]["groups"]
    assert set(dpo) == set(pdpo) == {"long", "short", "unseen"}
    # P-DPO serves both the majority and the minority; vanilla DPO serves the majority only
    assert pdpo["long"]["accuracy"] >= 0.95 and pdpo["short"]["accuracy"] >= 0.95
    assert dpo["long"]["accuracy"] >= 0.7 and dpo["short"]["accuracy"] <= 0.5
    # ... and personalizes what it generates: each user's greedy answer is exactly of their preferred kind
    assert pdpo["long"]["mean_response_tokens"] >= 1.5 * pdpo["short"]["mean_response_tokens"]
    assert pdpo["long"]["answers_as_preferred"] >= 0.9 and pdpo["short"]["answers_as_preferred"] >= 0.9
    assert results["pdpo"]["clean_answers"] >= 0.95 and results["pdpo"]["answers"] == 280
    assert dpo["short"]["answers_as_preferred"] >= 0.9 and dpo["long"]["answers_as_preferred"] <= 0.1  # all short
    gens = [json.loads(line) for line in (tmp_path / "demo" / "pdpo" / "generations.jsonl").read_text().splitlines()]
    assert {g["kind"] for g in gens} <= {"long", "short", "broken"} and len(gens) == 280
    for name in ("sft", "dpo", "pdpo"):
        args = json.loads((tmp_path / "demo" / name / "args.json").read_text())
        assert args["recipe"] == "tiny" and args["nll_weight"] == (1.0 if name != "sft" else 0.0)
    assert (tmp_path / "demo" / "data" / "train.jsonl").is_file()


def test_the_tiny_recipe_serves_three_style_groups(tmp_path):
    """The second toy task (50/30/20% want three styles) with the same recipe: not tuned to the first."""
    results = demo.demo(seed=0, out=str(tmp_path / "style"), quiet=True, task="style")
    dpo, pdpo = results["dpo"]["groups"], results["pdpo"]["groups"]
    assert set(pdpo) == {"formal", "casual", "poetic", "unseen"}
    for group in ("formal", "casual", "poetic"):
        assert pdpo[group]["accuracy"] >= 0.85, group
        assert pdpo[group]["answers_as_preferred"] >= 0.9, group
    assert results["pdpo"]["clean_answers"] >= 0.95
    assert dpo["poetic"]["accuracy"] <= 0.5 and dpo["formal"]["accuracy"] >= 0.9  # the majority's style for all


@pytest.mark.parametrize("argv, expected", [
    (["--recipe", "tiny"], dict(beta=2.0, lr=7e-4, epochs=2.5, nll_weight=1.0, user_init="uniform")),
    (["--recipe", "tiny", "--lr", "0.02", "--nll-weight", "0"], dict(beta=2.0, lr=0.02, nll_weight=0.0)),
    (["--recipe", "tiny", "--stage", "sft"], dict(lr=3e-3, epochs=10.0, batch_size=16, nll_weight=0.0)),
    ([], dict(beta=0.5, lr=5e-5, nll_weight=0.0, user_init="vocab")),  # the paper's defaults stay the defaults
])
def test_recipe_values_and_explicit_flags_override_them(argv, expected):
    cfg = T.parse_args(["--model", "m", "--data", "d", "--out", "o", *argv])
    assert {k: getattr(cfg, k) for k in expected} == expected
    built = T.TrainConfig.from_recipe(**{f: getattr(cfg, f) for f in ("recipe", "stage", "lr", "nll_weight")})
    assert (built.lr, built.nll_weight, built.beta) == (cfg.lr, cfg.nll_weight, cfg.beta)
