"""export.py against `transformers` + `peft`: a LoRA P-DPO run, exported, answers the same in their hands.

For a tiny LLaMA (individual user model) and a tiny GPT-J (cluster user model): train a few LoRA steps with
train.py, redraw the adapters at std 0.2 (a few steps leave lora_B near its zero start, and a misnamed or
transposed tensor must move the logits visibly), export, then load base + adapter with
PeftModel.from_pretrained and check (1) the logits of [BOS] [e_u] [tokens] against ours, as docs/huggingface.md
builds the input (max abs diff < 1e-4 in float32), and (2) greedy generate(inputs_embeds=...) against
model.generate with the user prefix, for a known user and for e_0.
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import data
from examples import toy as toy_tasks
import eval as evaluation
import export
import model as lm
import prlhf
import runs
import train as T
from tests.hf_models import redraw_parameters_

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
STD = 0.2  # base weights and adapters: large enough that every tensor shows in the logits
SHAPES = {  # tiny, untied, so the token embedding gets an adapter too
    "llama": dict(family="llama", hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64),
    "gptj": dict(family="gptj", hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=8, intermediate_size=64,
                 rotary_dim=4),
}
USER_MODEL = {"llama": "individual", "gptj": "cluster"}


def make_base(d, family):
    """The toy BPE and a random checkpoint of `family` in d/base (our save_pretrained, which transformers reads)."""
    tok = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(0, n_examples=300), 300, out_dir=d / "base")
    cfg = lm.ModelConfig(vocab_size=tok.vocab_size, tie_word_embeddings=False, max_position_embeddings=256,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **SHAPES[family])
    lm.save_pretrained(redraw_parameters_(lm.build_model(cfg), STD), d / "base")
    return d / "base"


def redraw_adapters(run_dir):
    """Replace the trained adapters with N(0, STD) draws, in the run's own file."""
    file = run_dir / "adapter.safetensors"
    gen = torch.Generator().manual_seed(1)
    tensors = {k: STD * torch.randn(v.shape, generator=gen) for k, v in runs.read_tensors(file).items()}
    runs.atomic_save_tensors(tensors, file)


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tmp_path_factory):
    """(family, our run, the run directory, the export directory) after a short LoRA P-DPO run."""
    family, d = request.param, tmp_path_factory.mktemp(request.param)
    base = make_base(d, family)
    train_pairs, _ = toy_tasks.make_toy_task(seed=0, n_users=4, pairs_per_user=4, n_valid_per_user=1, n_unseen_users=1)
    data.write_pairs(d / "train.jsonl", train_pairs)
    run_dir = d / "run"
    T.train(T.TrainConfig(stage="pdpo", model=str(base), data=str(d / "train.jsonl"), out=str(run_dir), quiet=True,
                          batch_size=4, grad_accum=1, lr=1e-2, warmup_steps=0, max_steps=2, max_length=64,
                          max_prompt_length=32, lora_r=4, lora_alpha=8.0, user_model=USER_MODEL[family],
                          n_user_tokens=2, n_clusters=3, alpha=0.5))
    redraw_adapters(run_dir)
    export.export_run(run_dir, d / "export")
    return family, runs.load_run(run_dir), run_dir, d / "export"


@pytest.fixture(scope="module")
def hf(exported):
    """The base read by transformers, with the exported adapter loaded by PEFT (float32, eval mode)."""
    _, _, run_dir, out = exported
    base = transformers.AutoModelForCausalLM.from_pretrained(runs.read_json(run_dir / "args.json")["model"],
                                                             dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, str(out)).eval()


def exported_rows(out):
    from safetensors.torch import load_file

    users = json.loads((out / export.USER_ROWS).read_text())["rows"]
    return load_file(str(out / export.USER_EMBEDDINGS))["user_embeddings"], users  # (N + 1, T_u, d), row -> user


def hf_inputs(model, ids, user_rows):
    """docs/huggingface.md's input: the user's rows (B, T_u, d) right after BOS of ids (B, T), through the
    PEFT model's own (adapted) input embedding."""
    tokens = model.get_input_embeddings()(ids)  # (B, T, d)
    return torch.cat([tokens[:, :1], user_rows.to(tokens.dtype), tokens[:, 1:]], dim=1)  # (B, T_u + T, d)


def test_adapter_files_have_peft_names(exported):
    family, _, _, out = exported
    config = json.loads((out / export.ADAPTER_CONFIG).read_text())
    expected = {"llama": ["down_proj", "embed_tokens", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                "gptj": ["fc_in", "fc_out", "k_proj", "out_proj", "q_proj", "v_proj", "wte"]}[family]
    assert config["target_modules"] == expected
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    from safetensors import safe_open

    with safe_open(str(out / export.ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    layer, embedding = {"llama": ("model.layers.1.mlp.gate_proj", "model.embed_tokens"),
                        "gptj": ("transformer.h.1.mlp.fc_in", "transformer.wte")}[family]
    assert f"base_model.model.{layer}.lora_B.weight" in keys
    assert f"base_model.model.{embedding}.lora_embedding_A" in keys


def test_peft_logits_equal_ours(exported, hf):
    _, run, _, out = exported
    rows, users = exported_rows(out)
    assert users[0] is None and users[1:] == run.registry.users
    user_rows = torch.tensor([0, 1, 2, len(users) - 1])  # e_0 and known users
    ids = torch.randint(3, run.model.config.vocab_size, (4, 11), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = run.tokenizer.bos_id
    with torch.no_grad():
        ours = run.model(inputs_embeds=prlhf.embed_with_user_prefix(run.model, ids, run.user_model(user_rows)))
        theirs = hf(inputs_embeds=hf_inputs(hf, ids, rows[user_rows])).logits
        with hf.disable_adapter():
            base = hf(inputs_embeds=hf_inputs(hf, ids, rows[user_rows])).logits
    assert ours.abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert (theirs - base).abs().max() > 0.1, "the adapters do not move the logits: nothing is compared"
    assert (ours[0] - ours[1]).abs().max() > 0.1, "e_0 and a known user give the same logits"
    assert (theirs - ours).abs().max() < TOL, (theirs - ours).abs().max()


def test_hf_generate_as_a_user_equals_ours(exported, hf):
    _, run, _, out = exported
    rows, users = exported_rows(out)
    tok = run.tokenizer
    prompt = data.prefix_ids(tok, tok.encode("Tell me about the kettle."))  # [BOS] [prompt]
    for row in (0, users.index(run.registry.users[0])):  # e_0, then a known user
        ours = lm.generate(run.model, [prompt], 12, prefix_embeds=run.user_model(torch.tensor([row])).detach(),
                           eos_token_id=tok.eos_id)[0]
        x = hf_inputs(hf, torch.tensor([prompt]), rows[row][None]).detach()  # (1, 1 + T_u + T - 1, d)
        with torch.no_grad():
            theirs = hf.generate(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                                 pad_token_id=tok.pad_id)[0].tolist()
        assert len(ours) >= 3, ours
        assert theirs == ours, (row, theirs, ours)


def test_the_page_answers_as_eval_does(exported):
    """docs/huggingface.md's code, run as written on this export, gives eval.generate_responses's answers."""
    _, run, run_dir, out = exported
    page = (Path(__file__).resolve().parents[1] / "docs" / "huggingface.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    code = re.sub(r"BASE, OUT = .*\n", f"BASE, OUT = {str(run.args['model'])!r}, {str(out)!r}\n", code)
    code = re.sub(r"print\(answer\(.*\n", "", code)
    page_ns = {}
    exec(code, page_ns)
    pairs = [data.Pair(user=u, prompt="Tell me about the kettle.", chosen="a", rejected="b")
             for u in (run.registry.users[0], "someone unseen")]
    ours = evaluation.generate_responses(run.model, run.user_model, run.registry, run.tokenizer,
                                         runs.tokenize(run, pairs), max_new_tokens=12)
    for pair, mine in zip(pairs, ours):
        assert mine["response_tokens"] >= 3, mine
        assert page_ns["answer"](pair.user, pair.prompt, max_new_tokens=12) == mine["response"], pair.user
    # ... and `python eval.py generate RUN --user ... --prompt ...` prints the same answers (a known user, e_0)
    cli = evaluation.answer_as_users(run, run_dir, [p.user for p in pairs], pairs[0].prompt, max_new_tokens=12)
    assert [a["known"] for a in cli] == [True, False]
    assert [a["answer"] for a in cli] == [page_ns["answer"](p.user, p.prompt, max_new_tokens=12).strip() for p in pairs]


def sft_like(run_dir, directory):
    """A copy of run_dir as an SFT run: stage "sft", no user model."""
    shutil.copytree(run_dir, directory, ignore=shutil.ignore_patterns(*prlhf.USER_MODEL_FILES, "checkpoint"))
    runs.atomic_write_json({**runs.read_json(directory / "args.json"), "stage": "sft"}, directory / "args.json")
    return directory


def test_without_user_model_exports_adapters_only(exported, tmp_path):
    _, _, run_dir, _ = exported
    notes = export.export_run(sft_like(run_dir, tmp_path / "run"), tmp_path / "out")
    assert (tmp_path / "out" / export.ADAPTER_WEIGHTS).is_file()
    assert not (tmp_path / "out" / export.USER_EMBEDDINGS).exists()
    assert any("no user model" in n for n in notes)


def files_under(root):
    """Every path under root -> its bytes (None for a directory): what must not change when a command fails."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(Path(root).rglob("*"))}


def run_copy(run_dir, directory):
    shutil.copytree(run_dir, directory, ignore=shutil.ignore_patterns("checkpoint"))
    return directory


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("missing", prlhf.USER_MODEL_FILES + ("all",))
def test_a_pdpo_run_without_its_user_model_is_refused_before_any_write(exported, tmp_path, capsys, missing):
    _, _, run_dir, _ = exported
    run = run_copy(run_dir, tmp_path / "run")
    for name in prlhf.USER_MODEL_FILES if missing == "all" else [missing]:
        (run / name).unlink()
    before = files_under(tmp_path)
    err = one_line_error([run, tmp_path / "deep" / "out"], capsys)
    assert ": missing; the run's users are kept in user_model.safetensors" in err
    assert files_under(tmp_path) == before  # neither OUT nor its parent "deep" was made


@pytest.mark.parametrize("out_state", ["absent", "empty", "previous export", "missing parents"])
def test_a_failure_half_way_leaves_run_and_out_byte_identical(exported, tmp_path, monkeypatch, out_state):
    """The adapters are written, then writing adapter_config.json fails: nothing of it shows."""
    _, _, run_dir, _ = exported
    run = run_copy(run_dir, tmp_path / "run")
    out = tmp_path / ("a/b/out" if out_state == "missing parents" else "out")
    if out_state == "empty":
        out.mkdir()
    if out_state == "previous export":
        export.export_run(sft_like(run_dir, tmp_path / "sft"), out)
    before = files_under(tmp_path)
    written = []

    def save_then_fail(obj, file):
        written.append((file, (file.parent / export.ADAPTER_WEIGHTS).is_file()))
        raise OSError("disk full")

    monkeypatch.setattr(runs, "atomic_write_json", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export.export_run(run, out)
    (file, adapters_written), = written
    assert file.name == export.ADAPTER_CONFIG and file.parent.parent == out.parent and file.parent != out
    assert adapters_written  # the adapters were written before the failure ...
    assert files_under(tmp_path) == before  # ... and nothing of them is left


def test_a_previous_export_is_replaced_only_on_success(exported, tmp_path):
    _, _, run_dir, first = exported
    out = tmp_path / "out"
    shutil.copytree(first, out)  # a P-DPO export, with user embeddings
    export.export_run(sft_like(run_dir, tmp_path / "sft"), out)  # then an SFT run's, without
    assert (out / export.ADAPTER_WEIGHTS).is_file() and not (out / export.USER_EMBEDDINGS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sft"]  # no temporary directory left


@pytest.mark.parametrize("out_kind", ["a file", "a directory with other files", "below a file"])
def test_an_out_export_must_not_overwrite_is_a_one_line_error(exported, tmp_path, capsys, out_kind):
    _, _, run_dir, _ = exported
    out = tmp_path / "out"
    if out_kind == "a file":
        out.write_text("notes\n")
    elif out_kind == "a directory with other files":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
        (out / export.ADAPTER_CONFIG).write_text("{}")
    else:
        out.write_text("notes\n")
        out = out / "sub"
    before = files_under(tmp_path)
    err = one_line_error([run_dir, out], capsys)
    expected = {"a file": f"{out}: exists and is not a directory",
                "a directory with other files": f"{out}: holds 'notes.txt', which export does not write",
                "below a file": f"{out}: cannot be written, {out.parent} is not a writable directory"}[out_kind]
    assert expected in err
    assert files_under(tmp_path) == before


def test_full_run_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    runs.atomic_write_json({"model": "base", "lora_r": 0}, tmp_path / "full" / "args.json")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "full"), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "full fine-tuning run" in err and "Hugging Face checkpoint" in err


@pytest.mark.parametrize("base", ["a LoRA run", "missing"])
def test_a_base_peft_cannot_load_is_a_one_line_error(exported, tmp_path, capsys, base):
    _, _, run_dir, _ = exported
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoint"))
    args = runs.read_json(run / "args.json")
    runs.atomic_write_json({**args, "model": str(run_dir) if base == "a LoRA run" else str(tmp_path / "gone")},
                           run / "args.json")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(run), str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ("itself a LoRA run" if base == "a LoRA run" else "is not here") in err, err
