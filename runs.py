"""Run directories: what train.py writes, what eval.py, adapt.py, export.py and bench/ read.

A run directory holds everything a trained model is made of, without pickle:

    args.json                  the flags it was trained with (TrainConfig), its base model by absolute path
    model.safetensors, config.json          full fine-tuning: a Hugging Face checkpoint (model.py)
    adapter.safetensors        LoRA: the adapters only; the base is args.json's "model"
    merged/                    with --merge: base + adapters folded into one Hugging Face checkpoint
    user_model.*, users.json   the user model f_P and its registry (prlhf.save_user_model)
    reward_head.safetensors    P-RM runs: r_phi's head
    tokenizer.json, ...        the base's tokenizer
    checkpoint/                for --resume: trainable tensors, AdamW state, RNG, data position
    reference_logps.safetensors  precomputed reference log-probs and their fingerprint (cache.reference_cache)
    metrics.jsonl, eval.json   per-step metrics and the final per-user evaluation

LoRA runs keep their adapters only (lora.py). Reading order: command-line helpers, atomic files and digests,
runs (load, save, their weights' digest), opening a run for a command, checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

import cli
import data
import model as lm
import prlhf
from lora import add_lora, lora_modules, merge_lora

# ----------------------------------------------------------------------------------------------
# Command-line helpers shared by train.py and eval.py


def fail(msg: str):
    """A one-line error for people, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def pick_device(device: str = "auto") -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(device: str) -> bool:
    """Whether bf16 runs natively here: CUDA with bf16, or a CPU with AVX512-BF16 or AMX instructions.
    Other CPUs emulate it: on a 2-core AVX2-only EPYC a bf16 matmul of SmolLM2's shapes (512 x 576 by
    576 x 1536) took 89 ms against 16 ms in fp32, and a LoRA P-DPO step of SmolLM2 155 s against 11-12 s."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's, private: absent is no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_precision(precision: str, device: str) -> str:
    """--precision auto: bf16 autocast where bf16 is native (native_bf16), else fp32; other values as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


# ----------------------------------------------------------------------------------------------
# Atomic files: written under a temporary name, then renamed, so a crash never leaves half a file


PARTIAL = ".prlhf-partial"  # the temporary directory replace_files writes into, inside the directory it fills


def replace_files(directory: Path, write) -> list[Path]:
    """write(tmp) into a temporary directory inside `directory`, then each file it wrote renamed into `directory`,
    in name order; returns their paths there. A failure while writing leaves `directory` as it was."""
    tmp = directory / f"{PARTIAL}.{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [directory / name for name in names]


def atomic_save_tensors(tensors: dict, file: Path, metadata: dict | None = None):
    from safetensors.torch import save_file

    tmp = file.with_name(file.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, file)


def atomic_write_json(obj, file: Path):
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, file)


def read_tensors(file: Path) -> dict:
    """All tensors of a safetensors file; a truncated or corrupt file is a ValueError naming it."""
    from safetensors.torch import load_file

    if not Path(file).is_file():
        raise FileNotFoundError(f"{file}: missing")
    with lm.readable_safetensors(file):
        return load_file(str(file))


def read_json(file: Path):
    try:
        return json.loads(Path(file).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None


def file_digest(files) -> str:
    """sha256 over the bytes of `files`, one after another, read in 16 MiB chunks (a 7B checkpoint: ~30 s)."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Runs: open what train.py wrote, and write it


def is_run_dir(path) -> bool:
    return (Path(path) / "args.json").is_file()


def load_tensors_into(module: nn.Module, file: Path, prefix: str = ""):
    params = dict(module.named_parameters())
    tensors = read_tensors(file)
    missing = [k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in params]
    if missing:
        raise ValueError(f"{file}: tensors {missing[:5]} do not belong to this model")
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith(prefix):
                params[k[len(prefix):]].copy_(v)


def load_base(path, dtype, device) -> lm.Transformer:
    """An HF checkpoint, or a run of ours: full runs hold an HF checkpoint; LoRA runs name their base."""
    path = Path(path)
    if is_run_dir(path) and (path / "adapter.safetensors").is_file():
        args = read_json(path / "args.json")
        model = load_base(args["model"], dtype, device)
        add_lora(model, args["lora_r"], args["lora_alpha"], 0.0, args["lora_targets"].split(","))
        load_tensors_into(model, path / "adapter.safetensors")
        return merge_lora(model)
    return lm.load_pretrained(path, dtype=dtype, device=device)


def weights_digest(path) -> str:
    """sha256 of what load_base(path) builds its weights from: config.json and the safetensors files of a
    Hugging Face checkpoint, or, for a LoRA run of ours, its adapters, their r / alpha / targets and the
    digest of its base. Checkpoint/, metrics and the rest of a run directory are not weights."""
    path = Path(path)
    if is_run_dir(path) and (path / "adapter.safetensors").is_file():
        args = read_json(path / "args.json")
        lora = [args["lora_r"], args["lora_alpha"], args["lora_targets"], weights_digest(args["model"]),
                file_digest([path / "adapter.safetensors"])]
        return hashlib.sha256(json.dumps(lora).encode()).hexdigest()
    return file_digest([path / "config.json", *sorted(set(lm.checkpoint_files(path).values()))])


@dataclass
class Run:
    """Everything a trained run is: the LM, its user model and registry, a reward head, the tokenizer."""
    model: lm.Transformer
    user_model: nn.Module | None
    registry: prlhf.UserRegistry | None
    tokenizer: data.Tokenizer
    args: dict
    reward_head: nn.Module | None = None

    @property
    def pdpo(self) -> prlhf.PDPOConfig:
        return pdpo_config(self.args)


def pdpo_config(args: dict) -> prlhf.PDPOConfig:
    """The user model and objective a run was trained with (the PDPOConfig fields of its args.json)."""
    return prlhf.PDPOConfig(**{f.name: args[f.name] for f in fields(prlhf.PDPOConfig) if f.name in args})


def load_run(path, dtype=torch.float32, device="cpu") -> Run:
    """Open a run directory written by train.py."""
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path}: not a run directory (no args.json); train one with train.py --out")
    args = read_json(path / "args.json")
    missing = [name for name in prlhf.USER_MODEL_FILES if not (path / name).is_file()]
    if args.get("stage") in ("pdpo", "prm") and missing:
        raise FileNotFoundError(f"{path / missing[0]}: missing; a {args['stage']} run keeps its users in "
                                f"{', '.join(prlhf.USER_MODEL_FILES)} (copy them back, or train the run again)")
    model = load_base(path, dtype, device)
    user_model = registry = head = None
    if (path / "user_model.json").is_file():
        user_model, registry = prlhf.load_user_model(path)
        user_model.to(device)
    if (path / "reward_head.safetensors").is_file():
        head = prlhf.RewardHead(model.config.hidden_size).to(device)
        load_tensors_into(head, path / "reward_head.safetensors")
    return Run(model.eval(), user_model, registry, data.load_tokenizer(path), args, head)


def save_run(out: Path, model, user_model, registry, reward_head, tokenizer, merge: bool = False):
    """Final weights: LoRA adapters (the base is named in args.json) or a full HF checkpoint."""
    if lora_modules(model):
        adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        atomic_save_tensors(adapters, out / "adapter.safetensors")
        if merge:
            lm.save_pretrained(merge_lora(copy.deepcopy(model)), out / "merged")
    else:
        lm.save_pretrained(model, out)
        if merge:  # a full run is already a Hugging Face checkpoint; merged/ is a copy for symmetry
            lm.save_pretrained(model, out / "merged")
    if merge:
        tokenizer.save(out / "merged")
    if user_model is not None:
        prlhf.save_user_model(out, user_model, registry)
    if reward_head is not None:
        atomic_save_tensors(reward_head.state_dict(), out / "reward_head.safetensors")
    tokenizer.save(out)


# ----------------------------------------------------------------------------------------------
# Opening a run for eval.py, adapt.py and export.py: its weights, its reference pi_ref, its pairs, its flags


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_run_dir(path) -> Path:
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path}: not a run directory (no args.json); train one with "
                                f"`python train.py --out DIR`, or run `python train.py` for the demo")
    return path


def open_run(path, dtype, device) -> Run:
    """load_run, refusing what has no preference reward (SFT runs) with a message for people."""
    path = check_run_dir(path)
    stage = read_json(path / "args.json").get("stage")
    if stage not in ("pdpo", "prm"):
        raise ValueError(f"{path}: a {stage} run has no preference reward to evaluate; "
                         f"evaluate a pdpo or prm run (args.json 'stage')")
    return load_run(path, dtype, device)


def load_reference(run_dir, run: Run, override: str | None, dtype, device):
    """pi_ref: the run's starting model (args.json 'model'), used without user embedding (PAPER.md)."""
    if run.reward_head is not None:
        return None  # a reward model scores pairs with its head
    where = override or run.args["model"]
    if not Path(where).exists():
        raise FileNotFoundError(f"{Path(run_dir) / 'args.json'}: reference model 'model' = {where} does not "
                                f"exist from here; pass --reference PATH (the run's starting checkpoint)")
    return load_base(where, dtype, device).eval()


def read_data(data_file) -> list[data.Pair]:
    if not Path(data_file).is_file():
        raise FileNotFoundError(f"{data_file}: no such data file (expected JSON Lines pairs, see data.py)")
    return data.read_pairs(data_file)


def pair_collate(run: Run, device, row_of=None):
    """data.collate_pairs with the run's tokenizer, registry (or `row_of`) and user-text setting."""
    row_of = row_of or run.registry.row

    def collate(items):
        b = data.collate_pairs(items, run.tokenizer, row_of, use_user_text=run.pdpo.use_user_text)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    return collate


def online_reference(reference_model, cfg: prlhf.PDPOConfig):
    """reference(batch) -> (log pi_ref(y_w | x), log pi_ref(y_l | x)), each (B,), computed on demand."""
    if reference_model is None:
        return None
    return lambda batch: prlhf.reference_logps(reference_model, batch, average=cfg.average_logps,
                                               shared_prompt=cfg.shared_prompt)


def tokenize(run: Run, pairs: list[data.Pair]) -> list[data.TokenizedPair]:
    items, _ = data.tokenize_pairs(pairs, run.tokenizer, run.args["max_length"], run.args["max_prompt_length"])
    return items


def common_flags(p: argparse.ArgumentParser):
    p.add_argument("--reference", default=None,
                   help="pi_ref, the run's starting model (default: 'model' in the run's args.json)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    seed = cli.Number(int, 0)
    p.add_argument("--seed", type=seed, default=0, help=f"seed of prompt choice, sampling, data order; {seed} "
                   f"(default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def dtype_flag(p: argparse.ArgumentParser):
    p.add_argument("--dtype", choices=[*DTYPES, "auto"], default=None,
                   help="dtype of the loaded weights (default: the precision the run trained in, args.json "
                        "'precision', where this device runs it natively, else fp32); auto: bf16 on CUDA and on "
                        "CPUs with native bf16, else fp32")


def run_dtype(run_dir, choice: str | None, device: str) -> tuple[str, str]:
    """--dtype for one run: (fp32 / bf16 / fp16, why). None: the precision the run trained in (args.json
    'precision'), so that its scores are the ones training reported; bf16 only where native, fp16 only on CUDA."""
    if choice is not None:
        return pick_precision(choice, device), f"--dtype {choice}"
    trained = read_json(Path(run_dir) / "args.json").get("precision", "fp32")  # older runs: fp32, the default
    native = {"bf16": native_bf16(device), "fp16": device.startswith("cuda")}.get(trained, True)
    if trained in DTYPES and native:
        return trained, "the precision it trained in (args.json 'precision'; --dtype to choose)"
    return "fp32", f"it trained in {trained}, not native on {device} (--dtype to choose)"


# ----------------------------------------------------------------------------------------------
# Checkpoints for --resume: trainable tensors, AdamW state, RNG, data position. Written to a fresh
# directory, then swapped in with renames, so a crash never leaves a half-written checkpoint.


def rng_state() -> dict:
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    return rng


@contextlib.contextmanager
def stopping_cleanly(out: Path, bar, sharded: bool, save_checkpoint):
    """Around the training loop: Ctrl-C writes checkpoint/ at the last step boundary (save_checkpoint(), which
    returns that step) and exits 130 saying how to --resume; a non-finite loss (FloatingPointError) stops with
    the last good checkpoint kept. Under FSDP, Ctrl-C keeps the last --save-every checkpoint (gathering shards
    needs every rank)."""
    try:
        yield
    except KeyboardInterrupt:
        bar.close()
        if sharded:
            fail(f"interrupted: the last --save-every checkpoint in {out}/checkpoint is kept")
        step = save_checkpoint()
        print(f"\ninterrupted: checkpoint saved at step {step} in {out}/checkpoint; continue with --resume",
              file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:
        bar.close()
        fail(f"{e}; stopped; the last good checkpoint in {out}/checkpoint is kept")


def save_checkpoint(out: Path, trainables: dict, opt: dict, scaler, state: dict, rng: dict):
    """trainables: name -> full tensor; opt: optimizer.state_dict(), or the same gathered from FSDP shards."""
    new, cur, old = out / "checkpoint.new", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    atomic_save_tensors(trainables, new / "trainable.safetensors")
    opt_tensors = {f"{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()}
    opt_tensors.update(rng)
    atomic_save_tensors(opt_tensors, new / "optimizer.safetensors")
    atomic_write_json({**state, "param_groups": opt["param_groups"], "scaler": scaler.state_dict()},
                      new / "state.json")
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(cur, old)
    os.replace(new, cur)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, trainables: dict, optimizer, scaler, dist) -> dict:
    """Restore what save_checkpoint wrote into the trainables, optimizer, scaler and RNG; return the
    data position. `dist` puts full tensors into this process's parameters (or FSDP shards)."""
    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").is_file():
        ckpt = out / "checkpoint.old"  # a crash between the two renames leaves the previous one here
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{out}: --resume but no checkpoint/ to resume from")
    saved, state = read_tensors(ckpt / "trainable.safetensors"), read_json(ckpt / "state.json")
    tensors = read_tensors(ckpt / "optimizer.safetensors")
    if set(saved) != set(trainables):
        raise ValueError(f"{ckpt}: checkpoint tensors do not match this configuration "
                         f"(run with the same arguments as args.json)")
    if not isinstance(state, dict) or "param_groups" not in state or "rng.cpu" not in tensors:
        raise ValueError(f"{ckpt}: incomplete checkpoint (state.json or optimizer.safetensors lacks its fields)")
    torch.set_rng_state(tensors.pop("rng.cpu"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    opt_state = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = v
    dist.load_full_state(trainables, optimizer, saved, {"state": opt_state, "param_groups": state.pop("param_groups")})
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state
