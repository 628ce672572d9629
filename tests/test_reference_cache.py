"""Reference log-probs on disk: reused by --resume and by a second run on the same inputs, recomputed when any
input of the fingerprint changes, written atomically by rank 0 only, and a corrupt file is computed again."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import distributed
import cache as refcache
import prlhf
import train as T
from tests.helpers import toy_setup, train_interrupted_at
from examples import toy as toy_tasks


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_setup(tmp_path_factory.mktemp("toy"), pairs_per_user=8, n_valid_per_user=2, n_unseen_users=1)


def config(toy, out, cache, **kw):
    base = dict(stage="pdpo", model=str(toy / "base"), data=str(toy / "train.jsonl"), valid=str(toy / "valid.jsonl"),
                out=str(out), quiet=True, batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=1, max_steps=4, beta=0.1,
                max_length=96, max_prompt_length=32, reference_cache=str(cache))
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture
def reference_passes(monkeypatch):
    """How many batches went through prlhf.reference_logps (the reference model's forward)."""
    calls = {"n": 0}
    real = prlhf.reference_logps

    def counted(*args, **kw):
        calls["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(prlhf, "reference_logps", counted)
    return calls


def trained(run):
    return load_file(str(Path(run) / "checkpoint" / "trainable.safetensors"))


def assert_same_tensors(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_second_run_on_the_same_inputs_reads_the_shared_cache(toy, tmp_path, reference_passes):
    cache = tmp_path / "cache"
    T.train(config(toy, tmp_path / "dpo", cache, **prlhf.VANILLA_DPO))
    first = reference_passes["n"]
    assert first > 0
    (shared,) = cache.glob("*.safetensors")  # one file, named by the fingerprint
    assert (tmp_path / "dpo" / refcache.REFERENCE_FILE).is_file()
    assert load_file(str(shared)).keys() == {"train.index", "train.chosen", "train.rejected", "valid.index",
                                             "valid.chosen", "valid.rejected"}
    # the P-DPO arm from the same model and data: another user model, the same reference
    T.train(config(toy, tmp_path / "pdpo", cache, user_model="individual", alpha=0.5))
    assert reference_passes["n"] == first
    assert_same_tensors(load_file(str(tmp_path / "pdpo" / refcache.REFERENCE_FILE)), load_file(str(shared)))  # for --resume
    # ... and it trains exactly as with log-probs computed afresh
    T.train(config(toy, tmp_path / "pdpo-fresh", "off", user_model="individual", alpha=0.5))
    assert reference_passes["n"] > first
    assert_same_tensors(trained(tmp_path / "pdpo"), trained(tmp_path / "pdpo-fresh"))
    assert not Path("off").exists()  # "off" is no folder
    # a changed input (here the length limit) is another fingerprint: computed, and a second file
    n = reference_passes["n"]
    T.train(config(toy, tmp_path / "shorter", cache, max_length=80))
    assert reference_passes["n"] > n and len(list(cache.glob("*.safetensors"))) == 2


def test_resume_does_no_second_reference_pass(toy, tmp_path, monkeypatch, reference_passes):
    kw = dict(max_steps=6, save_every=1)
    T.train(config(toy, tmp_path / "straight", "off", **kw))
    assert train_interrupted_at(3, config(toy, tmp_path / "resumed", "off", **kw), monkeypatch) == 130
    before = reference_passes["n"]
    T.train(config(toy, tmp_path / "resumed", "off", resume=True, **kw))
    assert reference_passes["n"] == before  # read from the run directory
    assert_same_tensors(trained(tmp_path / "straight"), trained(tmp_path / "resumed"))


def test_a_corrupt_cache_file_is_warned_about_and_computed_again(toy, tmp_path, capsys, reference_passes):
    out = tmp_path / "run"
    T.train(config(toy, out, "off", max_steps=1))
    file = out / refcache.REFERENCE_FILE
    good = {k: v.clone() for k, v in load_file(str(file)).items()}
    file.write_bytes(file.read_bytes()[:100])  # cut short
    n = reference_passes["n"]
    T.train(config(toy, out, "off", max_steps=1))
    assert reference_passes["n"] > n
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(file) in warning[0] and "computing them again" in warning[0], warning
    assert_same_tensors(load_file(str(file)), good)  # written again, whole
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# The fingerprint: each input changes it; copies of the same bytes elsewhere do not


def fingerprint(toy, **kw):
    args = dict(model_path=toy / "base", tokenizer=data.load_tokenizer(toy / "base"),
                data_files=[toy / "train.jsonl", toy / "valid.jsonl"], max_length=96, max_prompt_length=32,
                average_logps=False, weights_dtype=torch.float32, precision="fp32")
    args.update(kw)
    return refcache.reference_fingerprint(**args)["sha256"]


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def changed_weights(toy, tmp_path):
    base = copy_of(toy / "base", tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return {"model_path": base}


def changed_tokenizer(toy, tmp_path):
    other = data.train_bpe_tokenizer(toy_tasks.toy_corpus_texts(0, n_examples=300), 320, out_dir=tmp_path / "tok")
    return {"tokenizer": other}


def changed_data(toy, tmp_path):
    lines = (toy / "train.jsonl").read_text().splitlines()
    pair = json.loads(lines[0])
    pair["chosen"] += " indeed"
    (tmp_path / "train.jsonl").write_text("\n".join([json.dumps(pair), *lines[1:]]) + "\n")
    return {"data_files": [tmp_path / "train.jsonl", toy / "valid.jsonl"]}


CHANGES = {
    "weights": changed_weights,
    "tokenizer": changed_tokenizer,
    "train data": changed_data,
    "no valid data": lambda toy, tmp_path: {"data_files": [toy / "train.jsonl", ""]},
    "max_length": lambda toy, tmp_path: {"max_length": 80},
    "max_prompt_length": lambda toy, tmp_path: {"max_prompt_length": 24},
    "averaging (IPO)": lambda toy, tmp_path: {"average_logps": True},
    "weights dtype": lambda toy, tmp_path: {"weights_dtype": torch.bfloat16},
    "autocast": lambda toy, tmp_path: {"precision": "bf16"},
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_input_changes_the_fingerprint(toy, tmp_path, change):
    assert fingerprint(toy, **CHANGES[change](toy, tmp_path)) != fingerprint(toy)


def test_the_same_bytes_elsewhere_give_the_same_fingerprint(toy, tmp_path):
    base = copy_of(toy / "base", tmp_path / "base")
    shutil.copy(toy / "train.jsonl", tmp_path / "pairs.jsonl")
    same = fingerprint(toy, model_path=base, tokenizer=data.load_tokenizer(base),
                       data_files=[tmp_path / "pairs.jsonl", toy / "valid.jsonl"])
    assert same == fingerprint(toy)


def test_a_lora_run_as_model_is_fingerprinted_by_its_adapters_and_base(toy, tmp_path):
    import runs

    run = tmp_path / "lora-sft"
    run.mkdir()
    args = {"model": str(toy / "base"), "lora_r": 4, "lora_alpha": 8.0, "lora_targets": "wq,wv"}
    (run / "args.json").write_text(json.dumps(args))
    save_file({"lora_A": torch.ones(2, 3)}, str(run / "adapter.safetensors"))
    digest = runs.weights_digest(run)
    assert digest != runs.weights_digest(toy / "base")
    save_file({"lora_A": torch.zeros(2, 3)}, str(run / "adapter.safetensors"))
    assert runs.weights_digest(run) != digest
    (run / "args.json").write_text(json.dumps({**args, "lora_alpha": 16.0}))
    assert runs.weights_digest(run) != digest


# ----------------------------------------------------------------------------------------------
# cache.reference_cache itself: only rank 0 writes; a stale file (another fingerprint) is not read


class Items:
    """Stand-ins for tokenized pairs: reference_cache needs each item's .index and .length."""

    def __init__(self, n):
        self.items = [data.TokenizedPair("u", None, [3], [], [4, 1], [5, 1], i) for i in range(n)]

    @staticmethod
    def collate(items):
        return {"index": torch.tensor([it.index for it in items])}

    @staticmethod
    def reference(batch):
        i = batch["index"].float()
        return -i, -2 * i  # (B,), (B,)


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_writes(tmp_path, rank):
    toy = Items(5)
    fp = {"sha256": "ab" * 32, "inputs": {}}
    files = [tmp_path / "run" / refcache.REFERENCE_FILE, tmp_path / "shared" / f"{fp['sha256']}.safetensors"]
    cached = refcache.reference_cache(toy.reference, {"train": toy.items}, toy.collate, batch_size=2,
                               dist=distributed.SingleProcess("cpu", rank=rank), fingerprint=fp, files=files)
    chosen, rejected = cached({"index": torch.tensor([4, 1])})
    assert chosen.tolist() == [-4.0, -1.0] and rejected.tolist() == [-8.0, -2.0]
    assert [f.is_file() for f in files] == [rank == 0] * 2


def test_a_stale_file_is_not_read(tmp_path):
    toy = Items(3)
    file = tmp_path / refcache.REFERENCE_FILE
    refcache.reference_cache(toy.reference, {"train": toy.items}, toy.collate, batch_size=2,
                      fingerprint={"sha256": "old", "inputs": {}}, files=[file])
    calls = []

    def other_reference(batch):
        calls.append(batch["index"].tolist())
        return torch.zeros(len(batch["index"])), torch.ones(len(batch["index"]))

    cached = refcache.reference_cache(other_reference, {"train": toy.items}, toy.collate, batch_size=2,
                               fingerprint={"sha256": "new", "inputs": {}}, files=[file])
    assert calls and cached({"index": torch.tensor([2])})[1].tolist() == [1.0]
    assert load_file(str(file))["train.chosen"].tolist() == [0.0, 0.0, 0.0]  # written again
