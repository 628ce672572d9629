"""Train a personalized LM: supervised fine-tuning, P-DPO (vanilla DPO included) and a personalized reward model.

Our own loop, written top to bottom (no trainer framework), as in nanoGPT's train.py:
mixed precision (bf16 autocast, fp16 with loss scaling on CUDA), gradient checkpointing, gradient
accumulation, AdamW, linear warm-up then cosine decay, gradient clipping, hand-written LoRA, atomic
checkpoints with `--resume`, and a tqdm bar. The objectives themselves live in prlhf.py (PAPER.md
"P-DPO objective", "Personalized reward model"); this file only feeds them batches.

    python train.py                      # the built-in demo: toy task, SFT, vanilla DPO vs P-DPO (CPU, minutes)
    python train.py --stage pdpo --model CKPT --data train.jsonl --valid valid.jsonl --out runs/x
    torchrun --nproc-per-node 8 train.py --parallel fsdp ...   # several GPUs: distributed.py, docs/multigpu.md
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as lm
import prlhf


# ----------------------------------------------------------------------------------------------
# Configuration: one field per command-line flag


@dataclass
class TrainConfig:
    stage: str = field(default="pdpo", metadata=dict(choices=["sft", "pdpo", "prm"],
                       help="sft: next-token loss on responses; pdpo: P-DPO family; prm: personalized reward model"))
    model: str = field(default="", metadata=dict(help="Hugging Face checkpoint directory, or a run directory of ours"))
    data: str = field(default="", metadata=dict(help="training pairs, JSON Lines (see data.py)"))
    valid: str = field(default="", metadata=dict(help="validation pairs, JSON Lines (optional)"))
    out: str = field(default="", metadata=dict(help="run directory to write"))
    # user model, PAPER.md "User model"
    user_model: str = field(default="individual", metadata=dict(choices=["uniform", "individual", "cluster"],
                            help="user model f_P: uniform (vanilla), individual or cluster-based"))
    n_user_tokens: int = field(default=1, metadata=dict(help="T_u, soft tokens per user embedding (0 = none)"))
    n_clusters: int = field(default=5, metadata=dict(help="K, number of cluster embeddings (cluster model)"))
    add_generic_user: bool = field(default=True, metadata=dict(help="individual model: e_i = e_0 + o_i (else o_i)"))
    user_info: str = field(default="implicit", metadata=dict(choices=["implicit", "explicit", "both"],
                           help="implicit: learned e_u; explicit: the user's text; both: [e_u] [user text]"))
    user_init: str = field(default="vocab", metadata=dict(choices=["vocab", "uniform"],
                           help="user embeddings start as random vocabulary rows, or uniform in [-r, r]"))
    user_init_range: float = field(default=0.5, metadata=dict(help="r of --user-init uniform"))
    # objective, PAPER.md eq. (pdpo)
    alpha: float = field(default=0.5, metadata=dict(help="alpha, weight of the personalized term (1 - alpha: generic e_0)"))
    beta: float = field(default=0.5, metadata=dict(help="beta, strength of the KL tie to the reference model"))
    loss: str = field(default="dpo", metadata=dict(choices=["dpo", "cdpo", "ipo"], help="P-*PO family member"))
    label_smoothing: float = field(default=0.1, metadata=dict(help="epsilon of conservative DPO (--loss cdpo)"))
    generic_sampling: bool = field(default=False, metadata=dict(
        help="each pair takes its personalized term with prob. alpha, else its generic term: unbiased, vanilla-DPO cost"))
    sft_on: str = field(default="chosen", metadata=dict(choices=["chosen", "both"],
                        help="sft: learn the chosen responses, or chosen and rejected"))
    # optimisation
    lr: float = field(default=5e-5, metadata=dict(help="peak learning rate"))
    user_lr: float = field(default=0.0, metadata=dict(help="learning rate of the user model (0 = same as --lr)"))
    weight_decay: float = field(default=0.0, metadata=dict(help="AdamW weight decay"))
    warmup_steps: int = field(default=150, metadata=dict(help="linear warm-up steps, then cosine decay to 0"))
    epochs: float = field(default=2.0, metadata=dict(help="passes over the training pairs"))
    max_steps: int = field(default=0, metadata=dict(help="stop after this many optimizer steps (0 = by epochs)"))
    batch_size: int = field(default=2, metadata=dict(help="pairs per micro-batch"))
    grad_accum: int = field(default=8, metadata=dict(help="micro-batches per optimizer step"))
    grad_clip: float = field(default=1.0, metadata=dict(help="clip the gradient norm to this (0 = off)"))
    max_length: int = field(default=1024, metadata=dict(help="max tokens of [BOS] prompt response"))
    max_prompt_length: int = field(default=512, metadata=dict(help="max tokens of user text + prompt"))
    # LoRA (reference-code defaults); the user model is always trained in full
    lora_r: int = field(default=0, metadata=dict(help="LoRA rank (0 = full fine-tuning)"))
    lora_alpha: float = field(default=16.0, metadata=dict(help="LoRA alpha (scale alpha / r)"))
    lora_dropout: float = field(default=0.05, metadata=dict(help="dropout on the LoRA input"))
    lora_targets: str = field(default="wq,wk,wv,wo,w1,w2,w3,tok_embeddings",
                              metadata=dict(help="modules that get adapters (our names, see model.py)"))
    # precision and memory
    precision: str = field(default="fp32", metadata=dict(choices=["fp32", "bf16", "fp16"],
                           help="fp32, bf16 autocast (CPU/CUDA), fp16 autocast with loss scaling (CUDA)"))
    grad_checkpointing: bool = field(default=False, metadata=dict(help="recompute block activations in backward"))
    precompute_reference: bool = field(default=True, metadata=dict(
        help="compute reference log-probs once before training (no reference pass per step)"))
    device: str = field(default="auto", metadata=dict(help="cpu, cuda, or auto"))
    parallel: str = field(default="ddp", metadata=dict(choices=["ddp", "fsdp"], help=(
        "under torchrun (distributed.py): ddp, a full replica per GPU; fsdp, weights, gradients and "
        "AdamW state sharded per transformer block. A single process ignores it")))
    # bookkeeping
    seed: int = field(default=0, metadata=dict(help="seed for data order, initialisation and dropout"))
    eval_every: int = field(default=0, metadata=dict(help="evaluate on --valid every N steps (0 = at the end only)"))
    save_every: int = field(default=0, metadata=dict(help="write a checkpoint every N steps (0 = at the end only)"))
    log_every: int = field(default=1, metadata=dict(help="write metrics.jsonl every N steps"))
    resume: bool = field(default=False, metadata=dict(help="continue the run in --out from its checkpoint"))
    merge: bool = field(default=False, metadata=dict(help="also write merged/: a Hugging Face checkpoint"))
    quiet: bool = field(default=False, metadata=dict(help="no progress bar"))


def parse_args(argv=None) -> TrainConfig:
    """argparse built from TrainConfig: every field is a flag whose help says the paper's symbol."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the docstring as written, and each flag's default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    for f in dataclasses.fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, **meta)
    return TrainConfig(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------------------------
# LoRA: W x + (alpha / r) * B A dropout(x), with A random and B zero so training starts at W


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    @property
    def weight(self):
        return self.base.weight

    def delta_weight(self):
        return self.scale * self.lora_B @ self.lora_A  # (out, in)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


class LoRAEmbedding(nn.Module):
    """Token embedding + (alpha / r) * (B A)^T rows: A (r, vocab) starts at zero, B (d, r) random."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, alpha / r, True
        self.lora_A = nn.Parameter(torch.zeros(r, base.num_embeddings, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.randn(base.embedding_dim, r, device=base.weight.device) / r)

    @property
    def weight(self):
        return self.base.weight

    def delta_weight(self):
        return (self.scale * self.lora_B @ self.lora_A).T  # (vocab, d)

    def forward(self, ids):
        y = self.base(ids)
        if not self.enabled:
            return y
        return y + self.scale * (F.embedding(ids, self.lora_A.T) @ self.lora_B.T).to(y.dtype)


def add_lora(model: lm.Transformer, r: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Freeze the model and wrap every module whose last name is in `targets`; return the wrapped names."""
    model.requires_grad_(False)
    if model.config.tie_word_embeddings:
        # the embedding is also the output head: an adapter on it could not be merged into one tensor
        targets = [t for t in targets if t != "tok_embeddings"]
    wrapped = []
    for name, module in list(model.named_modules()):
        if name.split(".")[-1] not in targets:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(module, nn.Linear):
            new = LoRALinear(module, r, alpha, dropout)
        elif isinstance(module, nn.Embedding):
            new = LoRAEmbedding(module, r, alpha)
        else:
            continue
        setattr(parent, name.split(".")[-1], new)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"--lora-targets {','.join(targets)}: no such modules (see model.py for names)")
    return wrapped


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]


@contextlib.contextmanager
def lora_disabled(model):
    """The base model, adapters off: LoRA's reference model costs no second copy of the weights."""
    mods = lora_modules(model)
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


@torch.no_grad()
def merge_lora(model: lm.Transformer) -> lm.Transformer:
    """Fold each adapter into its base weight (W += scale * B A) and unwrap: a plain model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            module.base.weight += module.delta_weight().to(module.base.weight.dtype)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.split(".")[-1], module.base)
    model.tie_weights()
    return model


# ----------------------------------------------------------------------------------------------
# Learning rate: linear warm-up, then cosine decay to zero (the reference code's schedule)


def get_lr(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Run directories: what a trained model is made of, saved without pickle


def atomic_save_tensors(tensors: dict, file: Path, metadata: dict | None = None):
    from safetensors.torch import save_file

    tmp = file.with_name(file.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, file)


def atomic_write_json(obj, file: Path):
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, file)


def is_run_dir(path) -> bool:
    return (Path(path) / "args.json").is_file()


def load_base(path, dtype, device) -> lm.Transformer:
    """An HF checkpoint, or a run of ours: full runs hold an HF checkpoint; LoRA runs name their base."""
    path = Path(path)
    if is_run_dir(path) and (path / "adapter.safetensors").is_file():
        args = json.loads((path / "args.json").read_text())
        model = load_base(args["model"], dtype, device)
        add_lora(model, args["lora_r"], args["lora_alpha"], 0.0, args["lora_targets"].split(","))
        load_tensors_into(model, path / "adapter.safetensors")
        return merge_lora(model)
    return lm.load_pretrained(path, dtype=dtype, device=device)


def load_tensors_into(module: nn.Module, file: Path, prefix: str = ""):
    from safetensors.torch import load_file

    params = dict(module.named_parameters())
    tensors = load_file(str(file))
    missing = [k for k in tensors if k.startswith(prefix) and k[len(prefix):] not in params]
    if missing:
        raise ValueError(f"{file}: tensors {missing[:5]} do not belong to this model")
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith(prefix):
                params[k[len(prefix):]].copy_(v)


@dataclass
class Run:
    """Everything a trained run is: the LM, its user model and registry, a reward head, the tokenizer."""
    model: lm.Transformer
    user_model: nn.Module | None
    registry: "prlhf.UserRegistry | None"
    tokenizer: "data.Tokenizer"
    args: dict
    reward_head: nn.Module | None = None


def load_run(path, dtype=torch.float32, device="cpu") -> Run:
    """Open a run directory written by train.py (eval.py uses this)."""
    path = Path(path)
    if not is_run_dir(path):
        raise FileNotFoundError(f"{path}: not a run directory (no args.json); train one with train.py --out")
    args = json.loads((path / "args.json").read_text())
    model = load_base(path, dtype, device)
    user_model = registry = head = None
    if (path / "user_model.json").is_file():
        user_model, registry = prlhf.load_user_model(path)
        user_model.to(device)
    if (path / "reward_head.safetensors").is_file():
        head = prlhf.RewardHead(model.config.hidden_size).to(device)
        load_tensors_into(head, path / "reward_head.safetensors")
    return Run(model.eval(), user_model, registry, data.load_tokenizer(path), args, head)


def save_run(out: Path, cfg: TrainConfig, model, user_model, registry, reward_head, tokenizer):
    """Final weights: LoRA adapters (the base is named in args.json) or a full HF checkpoint."""
    if lora_modules(model):
        adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        atomic_save_tensors(adapters, out / "adapter.safetensors")
        if cfg.merge:
            merged = merge_lora(copy.deepcopy(model))
            lm.save_pretrained(merged, out / "merged")
            tokenizer.save(out / "merged")
    else:
        lm.save_pretrained(model, out)
        if cfg.merge:  # a full run is already a Hugging Face checkpoint; merged/ is a copy for symmetry
            lm.save_pretrained(model, out / "merged")
            tokenizer.save(out / "merged")
    if user_model is not None:
        prlhf.save_user_model(out, user_model, registry)
    if reward_head is not None:
        atomic_save_tensors(reward_head.state_dict(), out / "reward_head.safetensors")
    tokenizer.save(out)


# ----------------------------------------------------------------------------------------------
# Checkpoints for --resume: trainable tensors, AdamW state, RNG, data position. Written to a fresh
# directory, then swapped in with renames, so a crash never leaves a half-written checkpoint.


def rng_state() -> dict:
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    return rng


def save_checkpoint(out: Path, trainables: dict, opt: dict, scaler, state: dict, rng: dict):
    """trainables: name -> full tensor; opt: optimizer.state_dict(), or the same gathered from FSDP shards."""
    new, cur, old = out / "checkpoint.new", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    atomic_save_tensors(trainables, new / "trainable.safetensors")
    opt_tensors = {f"{i}.{k}": v for i, st in opt["state"].items() for k, v in st.items()}
    opt_tensors.update(rng)
    atomic_save_tensors(opt_tensors, new / "optimizer.safetensors")
    atomic_write_json({**state, "param_groups": opt["param_groups"],
                       "scaler": scaler.state_dict() if scaler is not None else None}, new / "state.json")
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(cur, old)
    os.replace(new, cur)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, trainables: dict, optimizer, scaler, dist=None) -> dict:
    from safetensors.torch import load_file

    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").is_file():
        ckpt = out / "checkpoint.old"  # a crash between the two renames leaves the previous one here
    if not (ckpt / "state.json").is_file():
        raise FileNotFoundError(f"{out}: --resume but no checkpoint/ to resume from")
    saved = load_file(str(ckpt / "trainable.safetensors"))
    if set(saved) != set(trainables):
        raise ValueError(f"{ckpt}: checkpoint tensors do not match this configuration "
                         f"(run with the same arguments as args.json)")
    state = json.loads((ckpt / "state.json").read_text())
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.cpu"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    opt_state = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        opt_state.setdefault(int(i), {})[k] = v
    opt = {"state": opt_state, "param_groups": state.pop("param_groups")}
    if dist is not None and dist.sharded:  # FSDP: each rank keeps its shard of the full tensors
        dist.load_full_state(trainables, optimizer, saved, opt)
    else:
        with torch.no_grad():
            for k, p in trainables.items():
                p.copy_(saved[k])
        optimizer.load_state_dict(opt)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state


# ----------------------------------------------------------------------------------------------
# One micro-batch of each stage: returns the mean loss and metrics


def autocast_ctx(cfg: TrainConfig, device: str):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def sft_loss(model, batch):
    """Next-token cross-entropy on response tokens only (the prompt is context, not a target)."""
    ids, mask = batch["input_ids"], batch["response_mask"]
    logits = model(ids)[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return loss, {"tokens": int(mask.sum())}


def mean_over(cfg, batch) -> int:
    """How many terms a stage's batch loss averages: scored response tokens (SFT) or pairs."""
    if cfg.stage == "sft":
        return int(batch["response_mask"][:, 1:].sum())
    return len(batch["index"])


def pdpo_batch_loss(cfg, model, user_model, batch, reference):
    """P-DPO for one batch: one policy forward, reference log-probs from the cache or a no-grad pass."""
    average = cfg.loss == "ipo"
    alpha = cfg.alpha
    if cfg.generic_sampling and 0 < cfg.alpha < 1:
        # each pair keeps its personalized term with prob. alpha, else its generic term (user row 0);
        # E[loss] = alpha * personalized + (1 - alpha) * generic = eq. (pdpo), at vanilla-DPO cost
        keep = torch.rand(batch["user_rows"].shape, generator=None) < cfg.alpha
        batch = {**batch, "user_rows": batch["user_rows"] * keep.to(batch["user_rows"].device)}
        alpha = 1.0
    policy = prlhf.policy_logps(model, user_model, batch, alpha, average=average)
    ref_chosen, ref_rejected = reference(batch)
    out = prlhf.pdpo_loss(policy["policy_chosen_logps"], policy["policy_rejected_logps"], ref_chosen, ref_rejected,
                          policy.get("generic_chosen_logps"), policy.get("generic_rejected_logps"),
                          alpha=alpha, beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing)
    term = "" if alpha > 0 else "generic_"  # alpha = 0 trains e_0 alone: report its term
    margin = (out[f"{term}chosen_rewards"] - out[f"{term}rejected_rewards"]).mean()
    return out["losses"].mean(), {"accuracy": out[f"{term}accuracies"].mean().item(), "margin": margin.item()}


def prm_batch_loss(cfg, model, user_model, head, batch):
    r = prlhf.personalized_rewards(model, head, user_model, batch, cfg.alpha)
    out = prlhf.prm_loss(r["chosen_rewards"], r["rejected_rewards"], r.get("generic_chosen_rewards"),
                         r.get("generic_rejected_rewards"), alpha=cfg.alpha)
    accuracies = out["accuracies"] if cfg.alpha > 0 else out["generic_accuracies"]
    return out["losses"].mean(), {"accuracy": accuracies.float().mean().item()}


# ----------------------------------------------------------------------------------------------
# Evaluation: per-pair correctness of the implicit personalized reward (or the reward head)


@torch.no_grad()
def score_pairs(model, user_model, items, collate, *, beta=0.5, reference=None, head=None,
                batch_size=16, autocast=contextlib.nullcontext(), desc=None, average=False,
                wrapper=None) -> list[dict]:
    """One record per pair: user, group, reward margin r(x, y_w, u) - r(x, y_l, u), correct (margin > 0).

    Unknown users get the generic row 0 through the registry. `reference(batch)` gives reference
    log-probs for the DPO reward; with `head` the reward model's head scores the pair instead.
    `wrapper`: the DDP/FSDP root (distributed.py), through whose forward the scoring must run.
    """
    def margins(batch):
        if head is not None:
            r = prlhf.personalized_rewards(model, head, user_model, batch, 1.0)
            return r["chosen_rewards"] - r["rejected_rewards"]
        p = prlhf.policy_logps(model, user_model, batch, 1.0, average=average)
        ref_c, ref_r = reference(batch)
        return beta * ((p["policy_chosen_logps"] - ref_c) - (p["policy_rejected_logps"] - ref_r))

    was_training = model.training
    model.eval()
    records = []
    batches = data.make_batches(items, batch_size, shuffle=False, seed=0, epoch=0)
    for idx in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        batch = collate([items[i] for i in idx])
        with autocast:
            margin = margins(batch) if wrapper is None else wrapper(margins, batch)
        for j, m in enumerate(margin.float().tolist()):
            records.append({"user": batch["users"][j], "group": batch["groups"][j], "margin": m, "correct": m > 0})
    model.train(was_training)
    return records


def summarize(records: list[dict], key: str) -> dict:
    """Accuracy and mean margin per value of `key` ("user" or "group")."""
    out = {}
    for r in records:
        g = out.setdefault(str(r[key]), {"pairs": 0, "correct": 0, "margin": 0.0})
        g["pairs"] += 1
        g["correct"] += r["correct"]
        g["margin"] += r["margin"]
    return {k: {"accuracy": v["correct"] / v["pairs"], "mean_margin": v["margin"] / v["pairs"], "pairs": v["pairs"]}
            for k, v in sorted(out.items())}


# ----------------------------------------------------------------------------------------------
# The training loop


def pick_device(cfg: TrainConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def train(cfg: TrainConfig) -> dict:
    """Run one stage; return the final evaluation summary (empty without --valid)."""
    device = pick_device(cfg)
    out = Path(cfg.out)
    dist = None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # started by torchrun: one process per GPU
        import distributed

        dist = distributed.setup(device, cfg.parallel)
        device = dist.device
    rank0 = dist is None or dist.rank == 0  # the process that writes files and shows progress
    if cfg.precision == "fp16" and not device.startswith("cuda"):
        fail("--precision fp16 needs CUDA (loss scaling); use bf16 on CPU")
    if dist is not None and dist.sharded and cfg.precision == "fp16":
        fail("--parallel fsdp: use --precision bf16 (no loss scale to agree on across shards)")
    if dist is not None and dist.sharded and not cfg.lora_r and not cfg.precompute_reference:
        fail("--parallel fsdp with full fine-tuning needs --precompute-reference "
             "(a frozen full copy of the model on every GPU would undo the sharding)")
    # 1. data first: a bad file fails in seconds, before a 7B model is loaded
    train_pairs = data.read_pairs(cfg.data)
    valid_pairs = data.read_pairs(cfg.valid) if cfg.valid else []
    if cfg.resume and not (out / "args.json").is_file():
        fail(f"{out}: --resume but no args.json there")
    out.mkdir(parents=True, exist_ok=True)
    # the starting model by absolute path: eval.py and LoRA runs find their base from anywhere
    if rank0:
        atomic_write_json({**dataclasses.asdict(cfg), "model": str(Path(cfg.model).resolve())}, out / "args.json")
    else:  # one progress bar and log, from rank 0
        cfg = dataclasses.replace(cfg, quiet=True)
    torch.manual_seed(cfg.seed)

    # 2. tokenizer and data
    tokenizer = data.load_tokenizer(cfg.model)
    train_items, stats = data.tokenize_pairs(train_pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    valid_items, vstats = data.tokenize_pairs(valid_pairs, tokenizer, cfg.max_length, cfg.max_prompt_length)
    log = (lambda s: None) if cfg.quiet else (lambda s: tqdm.write(s))
    log(f"train: {data.format_stats(stats)}" + (f" | valid: {data.format_stats(vstats)}" if valid_pairs else ""))
    if cfg.stage == "sft":
        train_items = sft_examples(train_items, cfg.sft_on)
        valid_items = sft_examples(valid_items, "chosen")

    # 3. models: LM (full or LoRA), user model, reward head
    lora = cfg.lora_r > 0
    base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32) if lora else torch.float32
    # FSDP: the full model stays on the CPU; fully_shard moves each block's shard to the GPU
    model_device = "cpu" if dist is not None and dist.sharded else device
    model = load_base(cfg.model, base_dtype, model_device)
    if lora:
        add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","))
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    user_model = registry = head = None
    if cfg.stage != "sft":
        registry = prlhf.UserRegistry.from_users(p.user for p in train_pairs)
        n_tokens = cfg.n_user_tokens if cfg.user_info != "explicit" else 0
        user_model = prlhf.make_user_model(
            cfg.user_model, len(registry) - 1, n_tokens, model.config.hidden_size, n_clusters=cfg.n_clusters,
            add_generic_user=cfg.add_generic_user, init=cfg.user_init, init_range=cfg.user_init_range,
            token_embedding=model.tok_embeddings.weight, seed=cfg.seed).to(model_device)
    if cfg.stage == "prm":
        head = prlhf.RewardHead(model.config.hidden_size).to(model_device)
    use_text = cfg.user_info != "implicit"

    def collate(items):
        if cfg.stage == "sft":
            b = data.collate_sft(items, tokenizer)
        else:
            b = data.collate_pairs(items, tokenizer, registry.row, use_user_text=use_text)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    if dist is not None:  # DDP or FSDP2 around the LM, user model and head: forwards go through dist.wrapped
        dist.wrap(model, user_model, head)
    autocast = autocast_ctx(cfg, device)
    reference = make_reference(cfg, model, train_items, valid_items, collate, autocast, out, dist) \
        if cfg.stage == "pdpo" else None

    # 4. optimizer: the user model may learn at its own rate
    trainables = {f"model.{k}": p for k, p in model.named_parameters() if p.requires_grad}
    groups = [{"params": list(trainables.values()), "lr": cfg.lr}]
    for prefix, module, lr in (("user", user_model, cfg.user_lr or cfg.lr), ("head", head, cfg.lr)):
        if module is not None:
            params = dict(module.named_parameters())
            trainables.update({f"{prefix}.{k}": p for k, p in params.items()})
            groups.append({"params": list(params.values()), "lr": lr})
    for g in groups:
        g["peak_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  fused=device.startswith("cuda") or None)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    global_batch = cfg.batch_size * (dist.world_size if dist else 1)  # items per micro-batch, all ranks
    steps_per_epoch = max(1, math.ceil(len(train_items) / global_batch) // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    state = {"step": 0, "epoch": 0, "batch": 0}
    if cfg.resume:
        state = load_checkpoint(out, trainables, optimizer, scaler, dist)
        log(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
    elif rank0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    def checkpoint(at=None):  # at: (state, rng) of the last step boundary
        st, rng = at or (state, rng_state())
        if dist is not None and dist.sharded:  # every rank sends its shards, rank 0 gets full tensors
            tensors, opt = dist.full_state(trainables, optimizer)
        else:
            tensors, opt = trainables, optimizer.state_dict()
        if rank0:
            save_checkpoint(out, tensors, opt, scaler, dict(st), rng)

    def batch_loss(batch):  # the stage's mean loss over one micro-batch, and its metrics
        if cfg.stage == "sft":
            return sft_loss(model, batch)
        if cfg.stage == "pdpo":
            return pdpo_batch_loss(cfg, model, user_model, batch, reference)
        return prm_batch_loss(cfg, model, user_model, head, batch)

    model.train()
    if user_model is not None:
        user_model.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=cfg.quiet, desc=f"{cfg.stage} {out.name}",
               dynamic_ncols=True)
    metrics_file = open(out / "metrics.jsonl" if rank0 else os.devnull, "a")
    batches = data.make_batches(train_items, global_batch, shuffle=True, seed=cfg.seed, epoch=state["epoch"])
    boundary = None
    try:
        while state["step"] < total_steps:
            # weights change only at optimizer.step(): an interruption before it resumes from here
            boundary = (dict(state), rng_state())
            t0, tokens, logs = time.perf_counter(), 0, []
            for g in optimizer.param_groups:
                g["lr"] = get_lr(state["step"], total_steps, cfg.warmup_steps, g["peak_lr"])
            for micro in range(cfg.grad_accum):
                if state["batch"] >= len(batches):  # next epoch, new order
                    state["epoch"], state["batch"] = state["epoch"] + 1, 0
                    batches = data.make_batches(train_items, global_batch, shuffle=True, seed=cfg.seed,
                                                epoch=state["epoch"])
                idx = batches[state["batch"]]
                if dist is not None:  # this rank's part of the global batch
                    idx, real = dist.part_of(idx)
                    dist.sync_gradients(micro == cfg.grad_accum - 1)
                batch = collate([train_items[i] for i in idx])
                state["batch"] += 1
                with autocast:
                    loss, m = batch_loss(batch) if dist is None else dist.wrapped(batch_loss, batch)
                if dist is not None:  # this rank's mean -> its share of the global batch's mean
                    w = dist.share(mean_over(cfg, batch) if real else 0)
                    loss, m = loss * w, {k: v * w for k, v in m.items() if k != "tokens"}
                elif not torch.isfinite(loss):  # (distributed: on the global loss below, on every rank at once)
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {state['step']}")
                loss = loss / cfg.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                tokens += sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids"))
                logs.append({"loss": loss.item() * cfg.grad_accum, **m})
            if dist is not None:  # global batch means, the same on every rank
                logs, tokens = dist.average(logs), dist.total(tokens)
                if not all(math.isfinite(l["loss"]) for l in logs):
                    raise FloatingPointError(f"non-finite loss at step {state['step']}")
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(trainables.values()), cfg.grad_clip)
            (scaler.step(optimizer), scaler.update()) if scaler else optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            row = {"step": state["step"], "epoch": state["epoch"], "lr": optimizer.param_groups[0]["lr"],
                   **{k: sum(l[k] for l in logs) / len(logs) for k in logs[0] if k != "tokens"},
                   "tokens_per_s": tokens / (time.perf_counter() - t0)}
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "accuracy", "lr", "tokens_per_s") if k in row})
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and valid_items and cfg.stage != "sft":
                row["eval"] = evaluate(cfg, model, user_model, head, valid_items, collate, reference, autocast, dist)
            if state["step"] % cfg.log_every == 0 or "eval" in row:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if dist is not None and dist.sharded:  # gathering shards needs every rank, and they stopped anywhere
            fail(f"interrupted: the last --save-every checkpoint in {out}/checkpoint is kept")
        checkpoint(boundary)
        print(f"\ninterrupted: checkpoint saved at step {state['step']} in {out}/checkpoint; "
              f"continue with --resume", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:
        bar.close()
        fail(f"{e}; stopped; the last good checkpoint in {out}/checkpoint is kept")
    finally:
        metrics_file.close()
    bar.close()
    checkpoint()
    if dist is None:
        save_run(out, cfg, model, user_model, registry, head, tokenizer)
    else:  # full weights: DDP's replica, or FSDP's shards gathered onto rank 0 (every rank takes part)
        full = dist.full_modules()
        if rank0:
            save_run(out, cfg, full[0], full[1], registry, full[2], tokenizer)
    summary = {}
    if valid_items and cfg.stage != "sft":
        summary = evaluate(cfg, model, user_model, head, valid_items, collate, reference, autocast, dist)
        if rank0:
            atomic_write_json(summary, out / "eval.json")
    return summary


def sft_examples(items, which: str):
    """SFT data: (prompt, response) from the chosen responses, or from both sides of every pair."""
    if which == "both":
        return data.sft_examples_from_pairs(items)
    return [data.SFTExample(it.prompt_ids, it.chosen_ids) for it in items]


def make_reference(cfg, model, train_items, valid_items, collate, autocast, out, dist=None):
    """reference(batch) -> (reference_chosen_logps, reference_rejected_logps).

    The reference is the starting model without user embedding (PAPER.md). With LoRA it is the same
    weights with adapters off; for full fine-tuning, log-probs are computed once before training
    (policy == reference at step 0), or a frozen copy is kept when --no-precompute-reference.
    """
    average = cfg.loss == "ipo"
    if lora_modules(model):
        reference_model = lambda: lora_disabled(model)  # noqa: E731
    elif cfg.precompute_reference:  # used only below, before the first step changes the model
        reference_model = lambda: contextlib.nullcontext(model)  # noqa: E731
    else:
        frozen = copy.deepcopy(model).requires_grad_(False)
        reference_model = lambda: contextlib.nullcontext(frozen)  # noqa: E731

    def online(batch):
        with torch.no_grad(), reference_model() as ref:
            was = ref.training
            ref.eval()
            logps = prlhf.reference_logps(ref, batch, average=average)
            ref.train(was)
            return logps

    if not cfg.precompute_reference:
        return online
    cache = {}
    for split, items in (("train", train_items), ("valid", valid_items)):
        batches = data.make_batches(items, max(cfg.batch_size, 8), shuffle=False, seed=0, epoch=0)
        if dist is not None:  # a share per rank, as many on every rank (each FSDP forward is collective)
            batches = dist.shard(batches)
        for idx in tqdm(batches, desc=f"reference log-probs ({split})", disable=cfg.quiet, leave=False):
            batch = collate([items[i] for i in idx])
            with torch.no_grad(), autocast:
                c, r = online(batch) if dist is None else dist.wrapped(online, batch)
            for j, i in enumerate(batch["index"].tolist()):
                cache[(split, i)] = (c[j].float(), r[j].float())
    if dist is not None:  # any rank may train on any pair
        cache = dict(dist.gather([(k, (c.cpu(), r.cpu())) for k, (c, r) in cache.items()]))

    def cached(batch):
        split = batch.get("split", "train")
        pairs = [cache[(split, i)] for i in batch["index"].tolist()]
        return (torch.stack([p[0] for p in pairs]).to(batch["index"].device),
                torch.stack([p[1] for p in pairs]).to(batch["index"].device))

    return cached


PADDING = "<padding>"  # group of the copies that give every rank as many pairs to evaluate


def evaluate(cfg, model, user_model, head, valid_items, collate, reference, autocast, dist=None) -> dict:
    def valid_collate(items):
        return {**collate(items), "split": "valid"}

    items = valid_items
    if dist is not None:  # a share per rank, padded to as many on every rank with marked copies
        items = dist.shard(valid_items, pad=dataclasses.replace(valid_items[0], group=PADDING))
    records = score_pairs(model, user_model, items, valid_collate, beta=cfg.beta, reference=reference,
                          head=head, autocast=autocast, average=cfg.loss == "ipo",
                          desc=None if cfg.quiet else "evaluating", wrapper=dist.wrapped if dist else None)
    if dist is not None:  # per-user metrics over every rank's pairs
        records = [r for r in dist.gather(records) if r["group"] != PADDING]
    return {"groups": summarize(records, "group"), "users": summarize(records, "user")}


# ----------------------------------------------------------------------------------------------
# Generation per user, and the built-in demo (`python train.py` with no arguments)


@torch.no_grad()
def generate_responses(model, user_model, registry, tokenizer, items, *, use_user_text=False, max_new_tokens=64,
                       temperature=0.0, top_p=None, batch_size=32, seed=0, desc=None) -> list[dict]:
    """Generate a response to each item's prompt as its user: [BOS] [e_u] [user text] [prompt] -> response."""
    generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=desc is None, leave=False):
        chunk = items[start:start + batch_size]
        prompts = [[tokenizer.bos_id] + (it.user_text_ids if use_user_text else []) + it.prompt_ids for it in chunk]
        prefix = None
        if user_model is not None:
            rows = registry.rows([it.user for it in chunk]).to(model.tok_embeddings.weight.device)
            prefix = user_model(rows)  # (B, T_u, d)
        new = lm.generate(model, prompts, max_new_tokens, prefix_embeds=prefix, eos_token_id=tokenizer.eos_id,
                          temperature=temperature, top_p=top_p, generator=generator)
        for it, ids in zip(chunk, new):
            text_ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
            out.append({"user": it.user, "group": it.group, "prompt": tokenizer.decode(it.prompt_ids),
                        "response": tokenizer.decode(text_ids), "response_tokens": len(text_ids)})
    return out


DEMO = dict(seed=0, out="runs/demo", n_users=10, pairs_per_user=60, vocab_size=768,
            model=dict(family="llama", hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                       intermediate_size=128, tie_word_embeddings=False, max_position_embeddings=256))


def demo(seed: int = DEMO["seed"], out: str = DEMO["out"], quiet: bool = False) -> dict:
    """The paper's first experiment in miniature, on a CPU: conflicting length preferences.

    70% of known users prefer long answers, 30% short (data.make_toy_task). A tiny LLaMA-style model
    is fine-tuned on both kinds of answer (SFT), then trained from that SFT model with vanilla DPO
    (uniform user model without embedding, alpha = 1) and with P-DPO (individual user model,
    alpha = 0.5). Both are evaluated on held-out pairs of known and unseen users.
    """
    t0 = time.perf_counter()
    # tiny matrices: one thread beats two, and does not collapse when another process wants a core
    torch.set_num_threads(1)
    out = Path(out)
    data_dir, base = out / "data", out / "base"
    train_pairs, valid_pairs = data.make_toy_task(seed=seed, n_users=DEMO["n_users"],
                                                  pairs_per_user=DEMO["pairs_per_user"])
    data.write_pairs(data_dir / "train.jsonl", train_pairs)
    data.write_pairs(data_dir / "valid.jsonl", valid_pairs)
    tokenizer = data.train_bpe_tokenizer(data.toy_corpus_texts(seed), DEMO["vocab_size"], out_dir=base)
    cfg = lm.ModelConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **DEMO["model"])
    lm.save_pretrained(lm.build_model(cfg, seed=seed), base)
    common = dict(data=str(data_dir / "train.jsonl"), seed=seed, quiet=quiet, max_length=96, max_prompt_length=32)
    print(f"demo: {len(train_pairs)} training pairs from {DEMO['n_users']} users (70% prefer long, 30% short); "
          f"tiny LLaMA with {sum(p.numel() for p in lm.build_model(cfg).parameters()):,} parameters")
    train(TrainConfig(stage="sft", model=str(base), out=str(out / "sft"), sft_on="both", lr=3e-3,
                      warmup_steps=10, epochs=10, batch_size=16, grad_accum=1, **common))
    # beta = 2 and two epochs: past that, DPO's margins keep growing by making *both* answers unlikely,
    # and a tiny model's text degrades. User embeddings start near zero (uniform, r = 0.05): a random
    # vocabulary row would be read by this model as a word of the prompt.
    dpo = dict(stage="pdpo", model=str(out / "sft"), valid=str(data_dir / "valid.jsonl"), beta=2.0, lr=5e-4,
               user_lr=3e-3, warmup_steps=10, epochs=2, batch_size=8, grad_accum=1, **common)
    train(TrainConfig(out=str(out / "dpo"), user_model="uniform", n_user_tokens=0, alpha=1.0, **dpo))
    train(TrainConfig(out=str(out / "pdpo"), user_model="individual", n_user_tokens=1, alpha=0.5,
                      user_init="uniform", user_init_range=0.05, **dpo))
    results = {}
    for method in ("dpo", "pdpo"):
        run = load_run(out / method)
        items, _ = data.tokenize_pairs(valid_pairs, run.tokenizer, 96, 32)
        summary = json.loads((out / method / "eval.json").read_text())["groups"]
        gens = generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items[::4],
                                  max_new_tokens=40, desc=None if quiet else f"generating ({method})")
        results[method] = {"groups": {}}
        for group, s in summary.items():
            lengths = [g["response_tokens"] for g in gens if g["group"] == group]
            results[method]["groups"][group] = {"accuracy": s["accuracy"], "pairs": s["pairs"],
                                                "mean_response_tokens": sum(lengths) / max(1, len(lengths))}
        with open(out / method / "generations.jsonl", "w") as f:
            f.writelines(json.dumps(g) + "\n" for g in gens)
    atomic_write_json(results, out / "results.json")
    print_demo_table(results)
    for method in ("dpo", "pdpo"):  # a few answers to read, one per group
        gens = [json.loads(line) for line in open(out / method / "generations.jsonl")]
        for group in ("long", "short", "unseen"):
            g = next(g for g in gens if g["group"] == group)
            print(f"{method:<5} {g['user']} ({group}): {g['prompt'].strip()} ->{g['response']}")
    print(f"wrote {out}/results.json and runs sft, dpo, pdpo in {time.perf_counter() - t0:.0f} s")
    return results


def print_demo_table(results: dict):
    print(f"\n{'method':<8}{'group':<10}{'pairs':>6}{'accuracy':>10}{'response tokens':>17}")
    for method, r in results.items():
        for group, s in r["groups"].items():
            print(f"{method:<8}{group:<10}{s['pairs']:>6}{s['accuracy']:>10.3f}{s['mean_response_tokens']:>17.1f}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # the built-in example
        return demo()
    cfg = parse_args(argv)
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            fail(f"--{name} is required (or run `python train.py` with no arguments for the demo)")
    try:
        train(cfg)
    except (data.DataError, ValueError, FileNotFoundError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
