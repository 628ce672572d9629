"""bench/: every benchmark runs in its --quick mode and ends with its JSON line; the memory plan's numbers are sane.

Benchmarks are not tests: nothing here times anything. These checks only keep the scripts runnable, and the
memory estimator honest against what autograd really saves.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "experiments"))  # the research sweeps (toy_seeds, repetition_reference)

import memory_plan as MP  # noqa: E402

import model as lm  # noqa: E402

GIB = 2**30


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The memory plan


def gptj_budget(**kw):
    args = dict(lora_r=8, batch=2, max_length=1024, n_user_tokens=1, n_users=10, grad_checkpointing=False)
    args.update(kw)
    return MP.budget(lm.read_config(BENCH / "configs" / "gpt-j-6b.json"), **args)


def test_shipped_configs_have_the_published_parameter_counts():
    gptj = MP.count_parameters(lm.read_config(BENCH / "configs" / "gpt-j-6b.json"), 0, 0, 0)
    llama = MP.count_parameters(lm.read_config(BENCH / "configs" / "llama-7b.json"), 0, 0, 0)
    assert llama.total == 6_738_415_616  # LLaMA-7B
    assert gptj.total == 6_050_882_784  # GPTJForCausalLM of transformers, same config (its model card: 6,053,381,344)


def test_budget_follows_train_py_conventions():
    full, lora = gptj_budget(lora_r=0), gptj_budget()
    P = full["params"].total
    assert full["bytes"]["weights"] == 4 * P + 4 * full["params"].user  # fp32 master weights
    assert full["bytes"]["AdamW m, v (fp32)"] == 8 * full["trainable"]
    assert full["bytes"]["reference model"] == 0  # precomputed reference log-probs
    assert gptj_budget(lora_r=0, precompute_reference=False)["bytes"]["reference model"] == 4 * P
    assert 2 * P < lora["bytes"]["weights"] < 2.02 * P  # bf16 base + small fp32 adapters
    assert 0.002 < lora["trainable"] / P < 0.004  # r = 8 on every projection and the embedding
    assert lora["bytes"]["reference model"] == 0  # adapters off


def test_activations_scale_with_rows_and_checkpointing_saves_most():
    b2, b4 = gptj_budget(), gptj_budget(batch=4)
    saved = "activations, saved"
    assert b4["bytes"][saved] == pytest.approx(2 * b2["bytes"][saved], rel=0.01)
    dpo = gptj_budget(objective="dpo")
    assert dpo["rows"] * 2 == b2["rows"] == 8  # P-DPO: chosen/rejected x personalized/generic
    ckpt = gptj_budget(grad_checkpointing=True)
    assert ckpt["bytes"][saved] < 0.1 * b2["bytes"][saved]
    assert 10 * GIB < ckpt["bytes"]["total"] < 40 * GIB < b2["bytes"]["total"] < 80 * GIB


@pytest.mark.parametrize("mode", ["fp32", "bf16", "lora", "lora without dropout"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_saved_activation_estimate_matches_autograd(mode, ckpt):
    """The per-layer, per-token accounting against the tensors autograd really keeps (hooks)."""
    for family, extra in (("llama", {}), ("gptj", {"rotary_dim": 8})):
        cfg = lm.ModelConfig(family=family, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8,
                             intermediate_size=96, vocab_size=300, **extra)
        shape = dict(batch=2, seq=24, n_user_tokens=2, grad_checkpointing=ckpt)
        if mode.startswith("lora"):
            shape["lora_dropout"] = 0.0 if "without" in mode else 0.05
            mode = "lora"
        measured, _ = MP.measure_saved_bytes(cfg, mode, **shape)
        assert MP.estimate_saved(cfg, mode, **shape) == pytest.approx(measured, rel=0.03), (family, mode, ckpt)


def test_memory_plan_command_line(capsys):
    figures = MP.main(["--model", str(BENCH / "configs" / "llama-7b.json"), "--grad-checkpointing"])
    assert last_json(capsys) == json.loads(json.dumps(figures))
    assert figures["parameters"] == 6_738_415_616
    assert "A100 40GB" in figures["LoRA r=8 + ckpt fits"]


# ----------------------------------------------------------------------------------------------
# Each benchmark in its quick mode: runs, prints a table, ends with its JSON figures


def test_model_vs_hf_quick(capsys):
    import model_vs_hf

    model_vs_hf.main(["--quick"])
    figures = last_json(capsys)
    assert {"forward_fp32_ratio", "forward_backward_fp32_ratio", "forward_bf16_ratio",
            "forward_backward_bf16_ratio"} <= set(figures)


def test_generate_quick(capsys):
    import generate

    generate.main(["--quick"])
    figures = last_json(capsys)
    assert figures["b2_same_tokens"] is True  # KV cache, no cache and transformers agree token for token
    assert figures["b2_kv_cache_speedup"] > 0


def test_grad_checkpointing_quick(capsys):
    import grad_checkpointing

    grad_checkpointing.main(["--quick"])
    figures = last_json(capsys)
    assert figures["saved_ratio_on_off"] < 1
    assert abs(figures["ckpt_off_saved_estimate_error"]) < 0.05


def test_shared_prompt_quick(capsys):
    import shared_prompt

    shared_prompt.main(["--quick"])
    figures = last_json(capsys)
    assert figures["same_reference_logps"] is True
    assert figures["exact_pdpo_speedup"] > 0 and figures["reference_speedup"] > 0


def test_profile_step_quick(capsys):
    import profile_step

    profile_step.main(["--quick"])
    assert last_json(capsys)["wall_s"] > 0


def test_generic_sampling_quick(capsys):
    import generic_sampling

    generic_sampling.main(["--quick"])
    figures = last_json(capsys)
    assert {"long_exact_mean", "long_sampled_mean", "sampled_time_ratio"} <= set(figures)


def test_pdpo_vs_trl_quick(capsys):
    """Ours and TRL train on the same token sequences (the count is compared), in fresh processes."""
    import pdpo_vs_trl

    pdpo_vs_trl.main(["--quick", "--arms", "ours_dpo,trl_dpo"])
    figures = last_json(capsys)
    assert figures["tokens_ours"] == figures["tokens_trl"]
    assert figures["ours_dpo_pairs_per_s"] > 0 and figures["trl_dpo_pairs_per_s"] > 0
    assert figures["ours_dpo_peak_mb"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the check itself runs")
def test_gpu_check_without_cuda_says_so_and_exits_0():
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "needs CUDA" in r.stdout and "--device cpu --tiny" in r.stdout


def test_gpu_check_dry_run_on_cpu(capsys, tmp_path):
    """The GPU check's own code (training steps in bf16 and fp16 with GradScaler, parity, plan, speed) on a
    tiny model on the CPU: what the CUDA run does, in seconds."""
    import gpu_check

    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "report.txt")]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["ok"] and figures["bf16"]["adapters_moved"] and figures["fp16"]["adapters_moved"]
    assert len(figures["fp16"]["losses"]) == 3 and figures["fp16"]["loss_scale"] > 0
    assert figures["parity_bf16"]["max_rel"] < 0.05 and figures["memory"]["plan_bytes"] > 0
    assert figures["speed_bf16"]["tokens_per_s"] > 0 and figures["speed_bf16"]["mfu"] is None  # no peak known
    assert (tmp_path / "report.txt").read_text() == out  # the report file holds what was printed
    with pytest.raises(SystemExit):
        gpu_check.main(["--help"])
    assert "MFU" in capsys.readouterr().out


def test_gpu_check_model_flops_by_hand():
    """LoRA P-DPO step of a 2-layer llama (d 64, q 64, kv 32, h 192, V 256), B 2, rows of 32 + T_u tokens:
    linears per layer 64*64*2 + 64*32*2 + 64*192*3 = 49,152; 8 rows x 33 tokens x (4 * 2 * 49,152 + 12 * 2 * 64 * 33)
    + 8 rows x 16 response tokens x 4 * 256 * 64."""
    import gpu_check

    args = gpu_check.parse_args(["--device", "cpu", "--tiny", "--peak-tflops", "2"])
    assert gpu_check.model_flops_per_step(gpu_check.model_config(args), args) == 125_579_264
    assert gpu_check.peak_tflops(args, "cpu") == 2


def test_cuda_is_chosen_when_present():
    import common

    assert common.pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert common.pick_device("cpu") == "cpu"


def test_toy_seeds_one_run(capsys, tmp_path):
    import toy_seeds

    figures = toy_seeds.main(["--tasks", "length", "--seeds", "0", "--workdir", str(tmp_path)])
    assert last_json(capsys)["length"]["seeds"] == [0]
    assert set(figures["length"]["checks"][0]) == {"pdpo_accuracy", "pdpo_as_preferred", "pdpo_clean",
                                                   "dpo_fails_minority"}


def test_repetition_reference_matches_lengths(capsys, tmp_path):
    """Human text is cut to each answer's length: a post that repeats a 3-gram only after word 6 counts for a
    6-word answer (its first 6 words) only if the repeat lies inside them."""
    import repetition_reference

    run = tmp_path / "seed-0"
    (run / "pdpo").mkdir(parents=True)
    (run / "data").mkdir()
    gens = [{"group": "long", "response": "a b c a b c"},         # 6 words, repeats "a b c"
            {"group": "long", "response": "one two three four"},  # 4 words, no repeat
            {"group": "short", "response": "x y z"},
            {"group": "unseen-long", "response": "p q r p q r"}]  # not a known user: left out
    (run / "pdpo" / "generations.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gens))
    samples = [{"long": "l m n l m n o", "short": "s t", "base": "b c d"}, {"long": "u v w", "short": "s"}]
    (run / "data" / "samples.json").write_text(json.dumps({"samples": samples}))
    tldr = tmp_path / "tldr.jsonl"
    posts = ["w1 w2 w3 w1 w2 w3 w4",   # repeats within its first 6 words
             "k1 k2 k3 k4 k5 k1 k2 k3",  # repeats only from word 8 on
             "tiny post"]               # 2 words: too short for any answer here but "s t" and "s"
    tldr.write_text("".join(json.dumps({"info": {"post": p}}) + "\n" for p in posts + posts[:1]))

    figures = repetition_reference.main(["--runs", str(run), "--tldr", str(tldr)])
    assert last_json(capsys) == json.loads(json.dumps(figures))
    assert figures["human_texts"] == 3  # the duplicate post is read once
    r = figures["runs"]["seed-0"]
    assert r["pdpo long users"]["answers"] == 2 and r["pdpo long users"]["repeated_3gram"] == 0.5
    # 6 words: posts 1 (repeats) and 2 (not yet) -> 1/2; 4 words: neither repeats -> 0; mean 0.25
    assert r["pdpo long users"]["human_same_lengths"] == pytest.approx(0.25)
    assert r["trained on: long"]["repeated_3gram"] == 0.5 and r["trained on: long"]["mean_words"] == 5.0
    # 7 words: 1/2 (post 2 repeats from its 8th word); 3 words: 0/2 -> 0.25
    assert r["trained on: long"]["human_same_lengths"] == pytest.approx(0.25)
    assert r["base (instruct model)"]["answers"] == 1 and r["pdpo short users"]["repeated_3gram"] == 0.0


def test_repetition_reference_names_a_bad_record(tmp_path):
    import repetition_reference

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"info": {"post": "fine"}}) + "\n" + json.dumps({"summaries": []}) + "\n")
    with pytest.raises(SystemExit, match=f"{bad}:2: not a TL;DR comparison record"):
        repetition_reference.human_texts(bad)


def test_bench_and_eval_never_import_train():
    """One-way house: train.py imports the library; eval.py, bench/ and experiments/ never import train.py (they run it)."""
    import re

    files = [BENCH.parent / "eval.py", *sorted(BENCH.glob("*.py")), *sorted((BENCH.parent / "experiments").glob("*.py"))]
    offenders = [f"{f.name}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
                 if re.match(r"\s*(import train\b|from train import)", line)]
    assert not offenders, offenders


def test_tldr_shaped_tiny_counts_policy_tokens_by_hand(capsys, tmp_path):
    """4 pairs, prompts of 8 tokens, responses of 4 + EOS, batch 2, no padding. Per pair and term the policy
    sees, two rows: 2 (1 + 8 + 5) = 28 (TRL, whose prompt starts with our BOS, and vanilla DPO), 2 (1 + T_u
    + 8 + 5) = 30 (P-DPO, T_u = 1; two terms, 60 per pair); one shared row: 1 + 8 + 5 + 5 = 19 (DPO), 20
    (P-DPO), each the floor 1 + T_u + |x| + |y_w| + |y_l|."""
    import tldr_shaped

    out = tmp_path / "tldr.json"
    tldr_shaped.main(["--tiny", "--prompt-spread", "0", "--response-spread", "0", "--json-out", str(out)])
    printed = capsys.readouterr().out
    figures = json.loads(printed.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == figures
    expected = {"trl_dpo": (28, 19), "dpo_two_row": (28, 19), "pdpo_two_row": (30, 20), "dpo_shared": (19, 19),
                "pdpo_shared": (20, 20)}
    rows = ([c.strip() for c in line.strip(" |").split("|")] for line in printed.splitlines() if line.startswith("| "))
    table = {cells[0]: cells for cells in rows}
    for arm, (per_term, floor) in expected.items():
        f = figures[arm]
        assert (f["policy_tokens_per_pair_term"], f["floor_per_pair_term"]) == (per_term, floor), arm
        assert f["policy_tokens_per_pair"] == per_term * f["terms"] and f["pairs_per_s"] > 0
        row = table[arm]  # arm, pairs/s, time, reference, tokens / pair, terms, per term, floor, per term / floor
        assert row[4:8] == [f"{per_term * f['terms']:.1f}", str(f["terms"]), f"{per_term:.1f}", f"{floor:.1f}"], row
    assert figures["same_tokens_as_trl"]
    assert {"dpo_two_row_vs_trl_throughput", "pdpo_vs_dpo_time_two_row"} <= set(figures["ratios"])
