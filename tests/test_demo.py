"""The built-in demo (`python train.py`) reproduces the paper's finding on the toy tasks, and answers well."""
import json

import pytest

import data
import eval as evaluation
import train as T
from examples import demo, toy


@pytest.fixture(scope="module")
def length_demo(tmp_path_factory):
    """The demo on the length task, seed 0: its directory and results."""
    tmp_path = tmp_path_factory.mktemp("length")
    return tmp_path, demo.demo(seed=0, out=str(tmp_path / "demo"), quiet=True)


def test_demo_reproduces_the_papers_finding(length_demo):
    tmp_path, results = length_demo
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
    # vanilla DPO answers everyone alike, so it cannot answer both groups as they prefer
    assert min(dpo["short"]["answers_as_preferred"], dpo["long"]["answers_as_preferred"]) <= 0.6
    gens = [json.loads(line) for line in (tmp_path / "demo" / "pdpo" / "generations.jsonl").read_text().splitlines()]
    assert {g["kind"] for g in gens} <= {"long", "short", "broken"} and len(gens) == 280
    for name in ("sft", "dpo", "pdpo"):
        args = json.loads((tmp_path / "demo" / name / "args.json").read_text())
        assert args["recipe"] == "tiny" and args["nll_weight"] == (2.0 if name != "sft" else 0.0)
        assert args["decision_weight"] == (1.0 if name == "pdpo" else 0.0)  # vanilla DPO: prlhf.VANILLA_DPO
    assert (tmp_path / "demo" / "data" / "train.jsonl").is_file()


def test_generate_answers_each_user_as_they_prefer(length_demo, capsys):
    """`python eval.py generate runs/demo/pdpo --user user_01 --user user_02 --prompt "Tell me about the kettle."`:
    one answer per user, side by side, each of the kind that user prefers (README's quick tour)."""
    tmp_path, _ = length_demo
    run = tmp_path / "demo" / "pdpo"
    prefers = {p.user: p.group for p in data.read_pairs(tmp_path / "demo" / "data" / "train.jsonl")}
    users = [next(u for u in sorted(prefers) if prefers[u] == kind) for kind in ("short", "long")]
    evaluation.main(["generate", str(run), *(a for u in users for a in ("--user", u)), "--prompt",
                     "Tell me about the kettle.", "--dtype", "fp32"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[0] for line in lines] == [f"[{u}" for u in users]
    kinds = [toy.toy_answer_kind("length", "kettle", line.split("] ", 1)[1]) for line in lines]
    assert kinds == ["short", "long"], lines


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
    (["--recipe", "tiny"], dict(beta=2.0, lr=7e-4, epochs=5.0, nll_weight=2.0, user_init="uniform", n_user_tokens=4,
                                generic_delay=0.8, decision_weight=1.0)),
    (["--recipe", "tiny", "--lr", "0.02", "--nll-weight", "0"], dict(beta=2.0, lr=0.02, nll_weight=0.0)),
    (["--recipe", "tiny", "--stage", "sft"], dict(lr=3e-3, max_steps=800, batch_size=16, nll_weight=0.0,
                                                        decision_weight=0.0)),
    ([], dict(beta=0.5, lr=5e-5, nll_weight=0.0, user_init="vocab", decision_weight=0.0)),  # the paper's defaults stay the defaults
])
def test_recipe_values_and_explicit_flags_override_them(argv, expected):
    cfg = T.parse_args(["--model", "m", "--data", "d", "--out", "o", *argv])
    assert {k: getattr(cfg, k) for k in expected} == expected
    built = T.TrainConfig.from_recipe(**{f: getattr(cfg, f) for f in ("recipe", "stage", "lr", "nll_weight")})
    assert (built.lr, built.nll_weight, built.beta) == (cfg.lr, cfg.nll_weight, cfg.beta)
