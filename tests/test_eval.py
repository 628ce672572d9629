"""eval.py: intervals and tables on hand-made cases, the report with and without matplotlib, reward-model
runs, adapting to a new user on the toy task, inspecting users, and messages for people."""
import hashlib
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import eval as E
import model as lm
import prlhf
import train as T
from tests.helpers import toy_setup
import adapt as A
import runs as R
from examples import toy as toy_tasks
import report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny LLaMA-style base fine-tuned on both answers of a small toy task (SFT, as train.py's demo does),
    and four short runs trained from that SFT model: P-DPO (individual, T_u = 4), vanilla DPO, P-DPO with the
    cluster model (K = 2), and a P-RM."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and steady on a busy machine
    d = toy_setup(tmp_path_factory.mktemp("eval"), pairs_per_user=16, n_valid_per_user=4, n_unseen_users=2)
    shapes = dict(quiet=True, batch_size=8, grad_accum=1, warmup_steps=2, max_length=64, max_prompt_length=16)
    # The answers share their opening and part at stop-or-go-on: from a random base, a few P-DPO steps teach
    # the LM the length preference but leave e_u far from e_0 (user_lr 0.1), so a new row cannot reach a
    # short-preferring user in a few adaptation steps. SFT on both answers first, as the demo does.
    T.train(T.TrainConfig(stage="sft", model=str(d / "base"), data=str(d / "train.jsonl"), out=str(d / "sft"),
                          sft_on="both", lr=3e-3, max_steps=30, **shapes))
    common = dict(stage="pdpo", model=str(d / "sft"), data=str(d / "train.jsonl"), valid=str(d / "valid.jsonl"),
                  lr=3e-3, user_lr=0.1, beta=0.1, n_user_tokens=4, max_steps=4, **shapes)
    # P-DPO as in the demo: beta 2, the LM at 5e-4, user rows from near zero (uniform, r = 0.05) at 3e-3.
    # 40 steps: the LM listens to e_u (known users, the short-preferring one too: 1.0), and e_0 still leans long.
    arms = {"pdpo": dict(beta=2.0, lr=5e-4, user_lr=3e-3, user_init="uniform", user_init_range=0.05, max_steps=40),
            "dpo": dict(user_model="uniform", n_user_tokens=0, alpha=1.0, max_steps=8),
            "cluster": dict(user_model="cluster", n_clusters=2),
            "prm": dict(stage="prm")}
    for name, kw in arms.items():
        T.train(T.TrainConfig(**{**common, "out": str(d / name), **kw}))
    yield d
    torch.set_num_threads(previous_threads)


def write(path, pairs):
    data.write_pairs(path, pairs)
    return path


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Intervals and tables: hand-made cases with known answers


def test_wilson_interval_known_values():
    # 8 of 10: the textbook example (Newcombe 1998, method 3): 0.4902 to 0.9433
    lo, hi = E.wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert E.wilson_interval(0, 10) == pytest.approx((0.0, 1.96 ** 2 / (10 + 1.96 ** 2)), abs=1e-4)  # 0.2775
    assert E.wilson_interval(10, 10) == pytest.approx((10 / (10 + 1.96 ** 2), 1.0), abs=1e-4)
    assert E.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("correct,n", [(1, 3), (7, 20), (50, 100), (199, 200)])
def test_wilson_interval_inverts_the_score_test(correct, n):
    """The interval's ends are where |p_hat - p| = z sqrt(p (1 - p) / n): found here by bisection."""
    p_hat, z = correct / n, 1.959963984540054

    def outside(p):
        return abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)

    def root(a, b):  # outside(a) > 0 >= outside(b), or the reverse
        for _ in range(100):
            m = (a + b) / 2
            a, b = (m, b) if (outside(m) > 0) == (outside(a) > 0) else (a, m)
        return (a + b) / 2

    lo, hi = E.wilson_interval(correct, n)
    assert lo == pytest.approx(root(1e-15, p_hat), abs=1e-9)
    assert hi == pytest.approx(root(1 - 1e-15, p_hat), abs=1e-9)


def record(user, group, margin, status="known"):
    return {"user": user, "group": group, "margin": margin, "correct": margin > 0, "status": status, "all": "all"}


def test_wilson_interval_holds_a_perfect_or_zero_score():
    """At n of n, center + half used to round to 1 - 1e-16 (n = 10, 13, 25, ...): a negative error bar."""
    for n in range(1, 400):
        assert E.wilson_interval(n, n)[1] >= 1.0 and E.wilson_interval(0, n)[0] <= 0.0, n
        lo, hi = E.wilson_interval(n // 3, n)
        assert lo <= (n // 3) / n <= hi, n


def test_a_perfect_group_gets_its_plot(tmp_path):
    """The crash this guards against: `'yerr' must not contain negative values` for a group at 1.0."""
    pytest.importorskip("matplotlib")
    records = [{"user": "u1", "group": "perfect", "margin": 1.0, "correct": True, "status": "known", "all": "all"}
               for _ in range(10)]
    records += [{"user": "u2", "group": "half", "margin": (-1) ** i, "correct": i % 2 == 0, "status": "known",
                 "all": "all"} for i in range(8)]
    results = {"run": E.run_results("pdpo", records, [])}
    assert results["run"]["groups"]["perfect"]["accuracy"] == 1.0
    assert report.write_plots(results, {"run": []}, {"run": None}, {"u1": "perfect", "u2": "half"}, tmp_path)
    assert (tmp_path / "accuracy_per_user.png").stat().st_size > 1000
    assert A.plot_curve([{"fit_pairs": 0, "accuracy": 1.0, "ci95": list(E.wilson_interval(10, 10))}], "u",
                        tmp_path / "curve.png")


def test_generation_quality_by_hand():
    answers = [" The kettle is warm.", "", " is is is is", " the say about the say about the"]
    q = E.generation_quality(answers)
    assert q["empty"] == 1 / 4 and q["repeated_3gram"] == 2 / 4  # "is is is" twice; "the say about" twice
    bigrams = [("The", "kettle"), ("kettle", "is"), ("is", "warm."), ("is", "is"), ("is", "is"), ("is", "is"),
               ("the", "say"), ("say", "about"), ("about", "the"), ("the", "say"), ("say", "about"), ("about", "the")]
    assert q["distinct_2"] == pytest.approx(len(set(bigrams)) / len(bigrams))  # 7 / 12
    assert E.generation_quality([])["distinct_2"] == 0.0 and not E.repeats_a_trigram("a b c a b d")


def test_tables_on_hand_made_records():
    records = [record("a", "long", 1.0), record("a", "long", -2.0), record("a", "long", 3.0), record("a", "long", 0.0),
               record("b", "short", 0.5), record("b", "short", 0.5),
               record("z", "unseen", -1.0, "unseen")]
    gens = [{"user": "a", "group": "long", "status": "known", "all": "all", "response_tokens": n,
             "response": " word" * n} for n in (10, 2, 6)] \
        + [{"user": "b", "group": "short", "status": "known", "all": "all", "response_tokens": n,
            "response": " word" * n} for n in (3, 5)]
    r = E.run_results("pdpo", records, gens)
    a = r["users"]["a"]
    assert (a["accuracy"], a["pairs"], a["correct"], a["mean_margin"]) == (0.5, 4, 2, 0.5)  # a tie is wrong
    assert a["ci95"] == list(E.wilson_interval(2, 4))
    assert (a["mean_response_tokens"], a["response_tokens"]) == (6.0, {"samples": 3, "median": 6, "min": 2, "max": 10})
    assert r["users"]["b"]["response_tokens"]["median"] == 4.0  # even count: mean of the middle two
    assert r["users"]["z"]["known"] is False and a["known"] is True
    assert r["users"]["z"]["mean_response_tokens"] is None  # no generations for z
    assert r["status"]["known"]["pairs"] == 6 and r["status"]["known"]["correct"] == 4
    assert r["groups"]["short"]["accuracy"] == 1.0
    assert r["overall"]["accuracy"] == pytest.approx(4 / 7)
    unlabelled = [{**x, "group": "(none)"} for x in records]
    assert E.run_results("pdpo", unlabelled, [])["groups"] == {}  # no group table without labels


# ----------------------------------------------------------------------------------------------
# Scoring a run


def test_swapped_pairs_and_unseen_users_score_as_they_must(runs):
    """Swapping y_w and y_l negates every margin; an unseen user gets exactly e_0's margins, and a known
    short-preferring user (the minority, whom e_0 serves worst) gets their own."""
    valid = data.read_pairs(runs / "valid.jsonl")
    user = next(p.user for p in valid if p.group == "short")
    known = [p for p in valid if p.user == user]
    swapped = [data.Pair(p.user, p.prompt, p.rejected, p.chosen, group=p.group) for p in known]
    stranger = [data.Pair("stranger", p.prompt, p.chosen, p.rejected) for p in known]
    run = R.open_run(runs / "pdpo", torch.float32, "cpu")
    reference = R.load_reference(runs / "pdpo", run, None, torch.float32, "cpu")
    score = lambda pairs: E.score_run(run, reference, pairs, device="cpu")  # noqa: E731
    original, flipped, unseen = score(known), score(swapped), score(stranger)
    # shared-prompt rows put the other response second after swapping: equal up to float32 rounding
    assert [r["margin"] for r in flipped] == pytest.approx([-r["margin"] for r in original], abs=1e-5, rel=1e-5)
    assert {r["status"] for r in original} == {"known"} and {r["status"] for r in unseen} == {"unseen"}
    generic = A.row_accuracy(run, run.user_model, 0, R.tokenize(run, known), "cpu",
                             R.online_reference(reference, run.pdpo))
    assert generic["mean_margin"] == pytest.approx(sum(r["margin"] for r in unseen) / len(unseen), abs=1e-5)
    assert abs(generic["mean_margin"] - sum(r["margin"] for r in original) / len(original)) > 1e-3  # e_u != e_0


def test_report_with_baseline_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    results = E.evaluate_runs([runs / "pdpo", runs / "dpo"], runs / "valid.jsonl", out=out, samples_per_user=2,
                              max_new_tokens=6, quiet=True)
    assert list(results) == ["pdpo", "dpo"]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for name in ("pdpo", "dpo"):  # train.py evaluated the same pairs at the end of training: same numbers
        trained = json.loads((runs / name / "eval.json").read_text())
        for section in ("groups", "users"):
            for key, entry in trained[section].items():
                ours = results[name][section][key]
                assert (ours["accuracy"], ours["pairs"]) == (entry["accuracy"], entry["pairs"]), (name, key)
                assert ours["mean_margin"] == pytest.approx(entry["mean_margin"], abs=1e-4)
        for entry in results[name]["groups"].values():
            assert set(entry) >= {"accuracy", "ci95", "pairs", "mean_response_tokens", "empty", "repeated_3gram",
                                  "distinct_2"}
            assert 0 < entry["mean_response_tokens"] <= 6
        assert results[name]["generation"]["constraints"] == {}  # none unless asked for
    assert set(results["pdpo"]["groups"]) == {"long", "short", "unseen"}
    assert results["pdpo"]["users"]["new_01"]["known"] is False
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 * 6 * 2  # runs x users x prompts per user
    assert [g["prompt"] for g in gens if g["run"] == "pdpo"] == [g["prompt"] for g in gens if g["run"] == "dpo"]
    report = (out / "report.md").read_text()
    assert "| group | pairs | pdpo | dpo |" in report and "Wilson" in report
    assert "### Generation quality" in report and "no generation constraints" in report
    assert "unseen by run pdpo (new_01, new_02)" in report
    for png in ("accuracy_per_user.png", "response_lengths.png", "user_embeddings.png"):
        assert (out / png).stat().st_size > 1000 and f"]({png})" in report


def test_report_without_matplotlib(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "plain"
    E.evaluate_runs([runs / "pdpo"], runs / "valid.jsonl", out=out, samples_per_user=1, max_new_tokens=3, quiet=True)
    assert "Plots skipped: matplotlib is not installed" in (out / "report.md").read_text()
    assert (out / "results.json").is_file() and not list(out.glob("*.png"))


def test_reward_model_run_scored_by_its_head(runs, tmp_path):
    results = E.evaluate_runs([runs / "prm"], runs / "valid.jsonl", out=tmp_path, quiet=True)
    trained = json.loads((runs / "prm" / "eval.json").read_text())
    assert results["prm"]["stage"] == "prm"
    for group, entry in trained["groups"].items():
        assert results["prm"]["groups"][group]["accuracy"] == entry["accuracy"]
        assert results["prm"]["groups"][group]["mean_response_tokens"] is None  # a reward model does not generate
    assert "reward model (prm)" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("name", ["pdpo", "dpo"])
def test_greedy_generation_decodes_each_prompt_and_embedding_once(runs, name, monkeypatch):
    """Items that share a prompt and a user embedding (two strangers: both e_0; every user of vanilla DPO)
    get the answer each would get alone, and only the distinct ones are decoded."""
    run = R.open_run(runs / name, torch.float32, "cpu")
    valid = data.read_pairs(runs / "valid.jsonl")
    known = next(p.user for p in valid if p.group == "short")
    prompts = list(dict.fromkeys(p.prompt for p in valid))[:3]
    pairs = [data.Pair(user, prompt, " a", " b") for prompt in prompts for user in (known, "stranger", "other", known)]
    items = R.tokenize(run, pairs)
    decoded = []
    generate = E.lm.generate
    monkeypatch.setattr(E.lm, "generate", lambda model, prompts, *a, **kw: decoded.extend(prompts) or generate(
        model, prompts, *a, **kw))
    gen = lambda chunk: E.generate_responses(run.model, run.user_model, run.registry, run.tokenizer, chunk,  # noqa: E731
                                             max_new_tokens=6)
    together = gen(items)
    assert len(decoded) == (2 if name == "pdpo" else 1) * len(prompts)  # known's e_u and e_0; vanilla: e_0 only
    alone = [g for item in items for g in gen([item])]
    assert [g["response"] for g in together] == [g["response"] for g in alone]
    assert [g["user"] for g in together] == [p.user for p in pairs]


# ----------------------------------------------------------------------------------------------
# New users from a few examples


def test_adaptation_beats_the_generic_embedding_on_held_out_pairs(runs):
    """A fresh toy user who prefers the minority's short answers: e_0 serves them badly, their own row well."""
    run = R.open_run(runs / "pdpo", torch.float32, "cpu")
    reference = R.load_reference(runs / "pdpo", run, None, torch.float32, "cpu")
    fit, held_out = toy_tasks.toy_user_pairs("newcomer", 16, 40, seed=1000)
    curve = A.adaptation_curve(run, reference, fit, held_out, "newcomer", device="cpu", sizes=(4, 16), steps=16,
                               quiet=True)
    assert [p["fit_pairs"] for p in curve] == [0, 4, 16] and {p["pairs"] for p in curve} == {40}
    generic, adapted = curve[0]["accuracy"], curve[-1]["accuracy"]
    assert generic < 0.5, curve  # the generic embedding leans to the long-preferring majority
    assert adapted > generic + 0.3 and curve[-1]["ci95"][0] > curve[0]["ci95"][1], curve


def test_adapt_saves_a_new_row_and_serves_the_user_as_known(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "pdpo", run_dir, ignore=shutil.ignore_patterns("checkpoint"))
    before, weights = prlhf.load_user_model(run_dir), sha(run_dir / "model.safetensors")
    fit, held_out = toy_tasks.toy_user_pairs("newcomer", 16, 12, seed=2000)
    A.main([str(run_dir), "--user", "newcomer", "--data", str(write(tmp_path / "fit.jsonl", fit)),
            "--steps", "16", "--quiet"])
    assert "newcomer is now a known user" in capsys.readouterr().out
    user_model, registry = prlhf.load_user_model(run_dir)
    assert registry.users == before[1].users + ["newcomer"]  # appended: known users keep their rows
    assert torch.equal(user_model.embeddings[:-1], before[0].embeddings)  # e_0 and other users frozen
    assert sha(run_dir / "model.safetensors") == weights  # the LM too
    results = E.evaluate_runs([run_dir], write(tmp_path / "held.jsonl", held_out), out=tmp_path / "r",
                              samples_per_user=0, quiet=True)
    assert results["run"]["users"]["newcomer"]["known"] is True
    assert results["run"]["users"]["newcomer"]["accuracy"] >= 0.75


def test_adapt_curve_command_saves_nothing_into_the_user_model(runs, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(runs / "pdpo", run_dir, ignore=shutil.ignore_patterns("checkpoint"))
    users = sha(run_dir / "users.json"), sha(run_dir / "user_model.safetensors")
    toy_tasks.main(["--curve", str(run_dir), "--steps", "8", "--held-out", "8", "--quiet"])
    out = capsys.readouterr().out
    for label in ("generic e_0", "1 pairs", "4 pairs", "16 pairs", "64 pairs"):
        assert label in out, label
    curve = json.loads((run_dir / "adapt_curve.json").read_text())
    assert [p["fit_pairs"] for p in curve["curve"]] == [0, 1, 4, 16, 64] and curve["held_out_pairs"] == 8
    assert (run_dir / "adapt_curve.png").is_file()
    assert (sha(run_dir / "users.json"), sha(run_dir / "user_model.safetensors")) == users


@pytest.mark.parametrize("kind", ["pdpo", "cluster"])
def test_new_row_starts_at_e0_and_only_it_moves(runs, kind):
    run = R.open_run(runs / kind, torch.float32, "cpu")
    reference = R.load_reference(runs / kind, run, None, torch.float32, "cpu")
    user_model, registry = A.add_user(run.user_model, run.registry, "newcomer")
    row = registry.row("newcomer")
    assert row == len(run.registry)  # appended after the known users
    with torch.no_grad():
        e = user_model(torch.tensor([0, row]))  # (2, T_u, d)
        assert torch.equal(e[0], e[1])  # o_new = 0 (individual) or w_new = w_0 (cluster): e_new = e_0
    start = {k: v.detach().clone() for k, v in user_model.state_dict().items()}
    fit, _ = toy_tasks.toy_user_pairs("newcomer", 8, 1, seed=3000)
    collate = R.pair_collate(run, "cpu", registry.row)
    A.fit_user_row(run, user_model, row, R.tokenize(run, fit), collate, R.online_reference(reference, run.pdpo),
                   steps=4, lr=0.1)
    table = "user_logits" if kind == "cluster" else "embeddings"
    for name, value in user_model.state_dict().items():
        if name != table:
            assert torch.equal(value, start[name]), name  # the cluster embeddings c_k stay frozen
    assert torch.equal(A.row_parameter(user_model)[:row], start[table][:row])  # e_0 and the known users too
    assert not torch.equal(A.row_parameter(user_model)[row], start[table][row])


def test_adapt_refuses_what_it_cannot_do(runs, capsys):
    run = R.open_run(runs / "dpo", torch.float32, "cpu")
    with pytest.raises(ValueError, match="uniform"):
        A.add_user(run.user_model, run.registry, "x")
    run = R.open_run(runs / "pdpo", torch.float32, "cpu")
    with pytest.raises(ValueError, match="already known"):
        A.add_user(run.user_model, run.registry, "user_01")
    with pytest.raises(SystemExit) as exit_info:
        A.main([str(runs / "pdpo"), "--user", "ghost", "--data", str(runs / "valid.jsonl")])
    assert exit_info.value.code == 2
    assert 'no pairs with "user": "ghost"' in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Inspecting users


def test_users_lists_cluster_weights_and_nearest_neighbours(runs, capsys):
    A.main(["users", str(runs / "cluster")])
    lines = capsys.readouterr().out.splitlines()
    assert "cluster user model" in lines[0] and "K = 2" in lines[0]
    user_model, registry = prlhf.load_user_model(runs / "cluster")
    expected = user_model.user_logits.softmax(-1)
    for i, name in enumerate(["<generic e_0>"] + registry.users):
        row, user, rest = lines[2 + i][:4], lines[2 + i][6:22].strip(), lines[2 + i][22:].split()
        assert (int(row), user) == (i, name)
        assert [float(w) for w in rest[:2]] == pytest.approx(expected[i].tolist(), abs=1e-3)

    A.main(["users", str(runs / "pdpo"), "--neighbours", "1"])
    lines = capsys.readouterr().out.splitlines()
    user_model, registry = prlhf.load_user_model(runs / "pdpo")
    names = ["<generic e_0>"] + registry.users
    with torch.no_grad():
        e = user_model(torch.arange(len(names))).flatten(1)  # (N + 1, T_u * d)
    for i in range(len(names)):
        cos = torch.nn.functional.cosine_similarity(e[i:i + 1], e, dim=1)
        cos[i] = -2
        j = int(cos.argmax())
        assert lines[2 + i][24:].rsplit(" ", 1) == [names[j], f"{cos[j].item():.3f}"]


# ----------------------------------------------------------------------------------------------
# Messages for people


def run_cli(*args):
    return subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_unknown_run_directory_is_one_line_and_exit_2(tmp_path):
    r = run_cli(tmp_path / "no-such-run", "--data", tmp_path / "x.jsonl")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'no-such-run'}: not a run directory (no args.json); "
                                             f"train one with `python train.py --out DIR`, or run `python train.py` "
                                             f"for the demo"]


def test_a_run_without_preference_reward_is_refused(tmp_path, capsys):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "args.json").write_text(json.dumps({"stage": "sft"}))
    (tmp_path / "d.jsonl").write_text('{"user": "a", "prompt": "p", "chosen": "c", "rejected": "r"}\n')
    with pytest.raises(SystemExit) as exit_info:
        E.main([str(tmp_path / "sft"), "--data", str(tmp_path / "d.jsonl")])
    assert exit_info.value.code == 2
    assert "a sft run has no preference reward to evaluate" in capsys.readouterr().err


def test_bad_data_file_names_file_and_line(runs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"user": "a", "prompt": "p", "chosen": "c", "rejected": "r"}\n{"user": "a"}\n')
    with pytest.raises(SystemExit) as exit_info:
        E.main([str(runs / "pdpo"), "--data", str(bad)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {bad}:2: missing field 'prompt'")


def test_data_with_no_known_user_warns_and_still_evaluates(runs, tmp_path, capsys):
    strangers = [data.Pair("stranger_a", " Describe the apple.", " The apple is red.",
                           " The apple is red, and there is much more to say about the apple today."),
                 data.Pair("stranger_b", " Describe the river.", " The river is calm.",
                           " The river is calm, and people often talk about the river and its history.")]
    E.main([str(runs / "pdpo"), "--data", str(write(tmp_path / "s.jsonl", strangers)), "--out", str(tmp_path / "o"),
            "--samples-per-user", "1", "--max-new-tokens", "3", "--quiet"])
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "none of the 2 users" in warnings[0] and "generic embedding e_0" in warnings[0]
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(results["pdpo"]["status"]) == {"unseen"} and "wrote" in captured.out


def test_help_names_the_paper_symbols(capsys):
    for main, argv, texts in ((E.main, ["--help"], ("RUN_DIR", "--data", "--baseline", "e_0", "r(x, y, u)", "adapt", "users")),
                              (A.main, ["--help"], ("--user", "--curve", "e_0", "f_P")),
                              (A.main, ["users", "--help"], ("softmax(w_i)", "cosine"))):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for text in texts:
            assert text in out, (argv, text)


def test_generation_constraints_are_reported_and_change_the_answers(runs, tmp_path):
    plain = E.evaluate_runs([runs / "pdpo"], runs / "valid.jsonl", out=tmp_path / "plain", samples_per_user=1,
                            max_new_tokens=8, quiet=True)
    forced = E.evaluate_runs([runs / "pdpo"], runs / "valid.jsonl", out=tmp_path / "forced", samples_per_user=1,
                             max_new_tokens=8, quiet=True, min_new_tokens=8, no_repeat_ngram_size=2)
    assert forced["pdpo"]["generation"]["constraints"] == {"min_new_tokens": 8, "no_repeat_ngram_size": 2}
    assert "constraints that hide degeneration" in (tmp_path / "forced" / "report.md").read_text()
    assert forced["pdpo"]["overall"]["mean_response_tokens"] == 8  # no EOS before 8 new tokens
    assert plain["pdpo"]["overall"]["mean_response_tokens"] < 8


# ----------------------------------------------------------------------------------------------
# Answering as a user: eval.py generate


def test_generate_answers_side_by_side_and_tells_an_unknown_user(runs, capsys):
    run = runs / "pdpo"
    E.main(["generate", str(run), "--user", "user_01", "--user", "stranger", "--prompt", " Describe the apple.",
            "--max-new-tokens", "12", "--dtype", "fp32"])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("] ", 1)[0] for line in lines] == ["[user_01", "[stranger, unseen: e_0"]
    warning = (f"warning: 'stranger' is not a user of {run}: answered with the generic embedding e_0; "
               f"closest known users: ")
    assert captured.err.strip().startswith(warning) and len(captured.err.strip().splitlines()) == 1
    opened = R.open_run(run, torch.float32, "cpu")
    pairs = [data.Pair(u, " Describe the apple.", "a", "b") for u in ("user_01", "stranger")]
    expected = E.generate_responses(opened.model, opened.user_model, opened.registry, opened.tokenizer,
                                    R.tokenize(opened, pairs), max_new_tokens=12)
    assert [line.split("] ", 1)[1] for line in lines] == [g["response"].strip() for g in expected]


def test_generate_reads_prompts_from_standard_input_until_eof(runs, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(" Describe the apple.\n\n Tell me about the river.\n"))
    E.main(["generate", str(runs / "pdpo"), "--user", "user_01", "--user", "user_02", "--max-new-tokens", "6",
            "--dtype", "fp32"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[0] for line in lines] == ["[user_01", "[user_02"] * 2  # the blank line is skipped


def test_chat_prompt_renders_the_template_with_one_bos(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "pdpo", run, ignore=shutil.ignore_patterns("checkpoint"))
    (run / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                                             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = data.load_tokenizer(run)
    text = E.chat_prompt(run, tok, "Describe the apple.")
    assert text == "<s><user>Describe the apple.<assistant>"
    assert data.prefix_ids(tok, tok.encode(text)).count(tok.bos_id) == 1  # the template's BOS is the row's BOS
    with pytest.raises(ValueError, match="no chat template"):
        E.chat_prompt(runs / "pdpo", tok, "Describe the apple.")


@pytest.mark.parametrize("flag, message", [(["--user-text", "I like it short."], "trained without user text"),
                                           (["--chat"], "has no chat template")])
def test_generate_refuses_what_the_run_cannot_do(runs, capsys, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        E.main(["generate", str(runs / "pdpo"), "--user", "user_01", "--prompt", "x", *flag])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and message in err, err


# ----------------------------------------------------------------------------------------------
# Damaged runs and checkpoints: one line naming the file, exit code 2, nothing written so far lost


def damaged_copy(runs, tmp_path, drop=()):
    run = tmp_path / "run"
    shutil.copytree(runs / "pdpo", run, ignore=shutil.ignore_patterns("checkpoint", *drop))
    return run


def one_line_error(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and err.startswith("error: "), err
    return err


def test_a_run_without_its_user_model_is_one_line(runs, tmp_path, capsys):
    run = damaged_copy(runs, tmp_path, drop=prlhf.USER_MODEL_FILES)
    err = one_line_error(capsys, E.main, [str(run), "--data", str(runs / "valid.jsonl")])
    assert str(run / "user_model.safetensors") in err and "missing" in err


def test_a_run_whose_args_json_is_not_json_is_one_line(runs, tmp_path, capsys):
    run = damaged_copy(runs, tmp_path)
    (run / "args.json").write_text("{'stage': 'pdpo'}")
    err = one_line_error(capsys, E.main, [str(run), "--data", str(runs / "valid.jsonl")])
    assert f"{run / 'args.json'}:1: not valid JSON" in err


def test_a_truncated_tokenizer_is_one_line(runs, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(runs / "base", model)
    text = (model / "tokenizer.json").read_text()
    (model / "tokenizer.json").write_text(text[:len(text) // 2])
    err = one_line_error(capsys, T.main, ["--model", str(model), "--data", str(runs / "train.jsonl"),
                                          "--out", str(tmp_path / "out"), "--quiet"])
    assert f"{model / 'tokenizer.json'}: not a readable tokenizer.json" in err


def test_out_that_is_a_file_is_one_line_and_the_file_is_kept(runs, tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("my notes")
    err = one_line_error(capsys, T.main, ["--model", str(runs / "base"), "--data", str(runs / "train.jsonl"),
                                          "--out", str(taken), "--quiet"])
    assert f"--out {taken}: a file is there" in err and taken.read_text() == "my notes"


# ----------------------------------------------------------------------------------------------
# Do the users take hold? The diagnostics in metrics.jsonl and in the report


def test_metrics_carry_per_user_accuracy_and_user_model_norms(runs):
    rows = [json.loads(line) for line in (runs / "pdpo" / "metrics.jsonl").read_text().splitlines()]
    users = {p.user for p in data.read_pairs(runs / "train.jsonl")}
    assert all(set(r["user_accuracy"]) <= users and set(r["group_accuracy"]) <= {"long", "short"} for r in rows)
    assert all(0 <= a <= 1 for r in rows for a in [*r["user_accuracy"].values(), *r["group_accuracy"].values()])
    assert {"e0_norm", "offset_norm", "grad_embeddings_row0", "grad_embeddings_users"} <= set(rows[0])
    user_model, registry = prlhf.load_user_model(runs / "pdpo")
    e = user_model(torch.arange(len(registry))).flatten(1)
    assert rows[-1]["e0_norm"] != rows[0]["e0_norm"]
    assert abs(rows[-1]["offset_norm"] - (e[1:] - e[0]).norm(dim=1).mean().item()) < 0.05  # one optimizer step apart


def test_attention_weights_are_the_ones_sdpa_applies(runs):
    run = R.open_run(runs / "pdpo", torch.float32, "cpu")
    attention = run.model.layers[0].attention
    x = torch.randn(2, 7, run.model.config.hidden_size)
    cos, sin = lm.rope_cos_sin(torch.arange(7)[None].expand(2, 7), lm.rope_inv_freq(run.model.config), x.dtype)
    w = report.attention_weights(attention, x, cos, sin)  # (B, nh, T, T)
    cfg = run.model.config
    v = attention.wv(x).view(2, 7, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)  # (B, nh, T, hs)
    ours = attention.wo((w @ v).transpose(1, 2).reshape(2, 7, -1))
    assert torch.allclose(ours, attention(x, cos, sin, None, None), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(2, cfg.n_heads, 7)) and (w.triu(1) == 0).all()


def test_the_report_says_whether_the_users_take_hold(runs, tmp_path):
    results = E.evaluate_runs([runs / "pdpo", runs / "dpo"], runs / "valid.jsonl", out=tmp_path, samples_per_user=0,
                              quiet=True)
    training = results["pdpo"]["training"]
    assert set(training["group_accuracy_by_fifth"]) == {"long", "short"}
    assert len(training["norms_first_last"]["offset_norm"]) == 2
    layers = results["pdpo"]["attention_to_user"]
    assert len(layers) == 2 and all(0 < a < 1 for a in layers)
    assert results["dpo"]["attention_to_user"] is None  # vanilla DPO has no user embedding
    md = (tmp_path / "report.md").read_text()
    assert "## Do the users take hold?" in md and "| pdpo | short |" in md
