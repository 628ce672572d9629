"""Train a personalized LM: supervised fine-tuning, P-DPO (vanilla DPO included) and a personalized reward model.

Our own loop, written top to bottom (no trainer framework), as in nanoGPT's train.py:
mixed precision (bf16 autocast, fp16 with loss scaling on CUDA), gradient checkpointing, gradient
accumulation, AdamW, linear warm-up then cosine decay, gradient clipping, LoRA (lora.py), atomic
checkpoints with `--resume`, and a tqdm bar. The objectives live in prlhf.py (PAPER.md "P-DPO
objective", "Personalized reward model"), scoring and generation in eval.py, run directories in
runs.py; this file feeds them batches.

    python train.py                      # the built-in demo: toy task, SFT, vanilla DPO vs P-DPO (CPU, minutes)
    python train.py --stage pdpo --model CKPT --data train.jsonl --valid valid.jsonl --out runs/x
    torchrun --nproc-per-node 8 train.py --parallel fsdp ...   # several GPUs: distributed.py, docs/multigpu.md

Reading order: the configuration (flags), the learning rate, one micro-batch of each stage, the
reference model and evaluation, setting a run up, the training loop, the command line (which also starts
the built-in examples of examples/).
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

import cache
import data
import distributed
import eval as evaluation
import lora
import model as lm
import prlhf
import report
import runs
from prlhf import option

# ----------------------------------------------------------------------------------------------
# Configuration: one field per command-line flag. The user model and objective come from
# prlhf.PDPOConfig (--user-model, --alpha, --beta, --loss, ...), checked before anything is loaded.


EXAMPLES = ("toy", "toy-style", "smollm2", "psoups")  # --example: examples/toy.py, smollm2.py, psoups.py

# Named recipes: flag values for a kind of run, per stage; flags given explicitly override them. The paper's
# values stay the defaults. "tiny" is for tiny models trained from scratch (the toy tasks): a higher beta, user
# embeddings near zero (a random vocabulary row reads as a word of the prompt to such a model), and the three
# terms beyond the paper; chosen on a family of random tasks, not on the demo (docs/user_embeddings.md).
RECIPES = {"tiny": {
    "sft": dict(lr=3e-3, warmup_steps=10, max_steps=800, batch_size=16, grad_accum=1),
    "pdpo": dict(beta=2.0, lr=7e-4, user_lr=3e-3, warmup_steps=10, epochs=5.0, batch_size=8, grad_accum=1,
                 user_init="uniform", user_init_range=0.05, nll_weight=2.0, n_user_tokens=4, generic_delay=0.8,
                 decision_weight=1.0),
}}
RECIPES["tiny"]["prm"] = {k: v for k, v in RECIPES["tiny"]["pdpo"].items()
                          if k not in ("beta", "nll_weight", "generic_delay", "decision_weight")}


def recipe_help() -> str:
    return "; ".join(f"{name}: " + ", ".join(f"{stage} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
                                             for stage, values in stages.items())
                     for name, stages in RECIPES.items())


# The range of each numeric flag of TrainConfig: (low, high or None, low itself refused). PDPOConfig checks its own.
FLAG_RANGES = {"lr": (0, None, True), "user_lr": (0, None, False), "weight_decay": (0, None, False),
               "warmup_steps": (0, None, False), "epochs": (0, None, True), "max_steps": (0, None, False),
               "batch_size": (1, None, False), "grad_accum": (1, None, False), "grad_clip": (0, None, False),
               "max_length": (2, None, False), "max_prompt_length": (1, None, False), "lora_r": (0, None, False),
               "lora_alpha": (0, None, True), "lora_dropout": (0, 1, False), "seed": (0, None, False),
               "eval_every": (0, None, False), "save_every": (0, None, False), "log_every": (1, None, False)}


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
    precision: str = option("fp32", "fp32, bf16 autocast (CPU/CUDA), fp16 autocast with loss scaling (CUDA); auto: "
                            "bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), fp32 elsewhere (runs.py)",
                            choices=["fp32", "bf16", "fp16", "auto"])
    grad_checkpointing: bool = option(False, "recompute block activations in backward")
    precompute_reference: bool = option(True, "compute reference log-probs once before training (no reference pass per step), "
                                        "kept in the run directory for --resume")
    reference_cache: str = option("auto", "folder where runs share precomputed reference log-probs, one file per "
                                  "fingerprint of their inputs (cache.reference_fingerprint); auto: "
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
                          "(convert it once with tools/smollm2.py; --model overrides where it is); psoups, the paper's second "
                          "experiment (users who want different styles) on SmolLM2; with --seed, --out, --quiet, "
                          "--precision (default: fp32 for the toy tasks, auto for smollm2 and psoups)",
                          choices=["none", *EXAMPLES])

    @classmethod
    def from_recipe(cls, **fields) -> "TrainConfig":
        """A config from --recipe's values for its stage, overridden by `fields` (as parse_args does)."""
        recipe = RECIPES.get(fields.get("recipe", "none"), {})
        return cls(**{**recipe.get(fields.get("stage", "pdpo"), {}), **fields})

    def __post_init__(self):
        super().__post_init__()
        for name, choices in (("stage", ("sft", "pdpo", "prm")), ("precision", ("fp32", "bf16", "fp16", "auto")),
                              ("sft_on", ("chosen", "both")), ("parallel", distributed.PARALLEL)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected one of {', '.join(choices)}")
        for name, (low, high, above) in FLAG_RANGES.items():  # every numeric flag, where it is parsed
            value = getattr(self, name)
            if not (math.isfinite(value) and (value > low if above else value >= low) and (high is None or value <= high)):
                bound = f"{'>' if above else '>='} {low}" + ("" if high is None else f" and <= {high}")
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be a number {bound}")
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
# Schedules: the learning rate, linear warm-up then cosine decay to zero (the reference code's); alpha


def get_lr(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def get_alpha(step: int, total_steps: int, generic_delay: float, alpha: float) -> float:
    """alpha of eq. (pdpo) at this step: 1 (the personalized term alone) for the first generic_delay of training,
    then alpha (--generic-delay, beyond the paper: docs/user_embeddings.md)."""
    return 1.0 if step / total_steps < generic_delay else alpha


# ----------------------------------------------------------------------------------------------
# One micro-batch of each stage: returns the mean loss and metrics


def autocast_ctx(cfg: TrainConfig, device: str):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def sft_loss(t, batch, alpha=None):
    """Next-token cross-entropy on response tokens only (the prompt is context, not a target)."""
    ids, mask = batch["input_ids"], batch["response_mask"]
    logits = t.model(ids)[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return loss, {}


def pdpo_batch_loss(t, batch, alpha: float):
    """P-DPO for one batch (prlhf.pdpo_step) at this step's alpha: its mean loss, accuracy and reward margin, and
    each pair's (user, group, ranked right by the personalized term), for the per-user accuracy in metrics.jsonl."""
    out = prlhf.pdpo_step(t.model, t.user_model, batch, t.reference, dataclasses.replace(t.cfg, alpha=alpha))
    term = "" if out["accuracies"] is not None else "generic_"  # alpha = 0 trains e_0 alone: report its term
    margin = (out[f"{term}chosen_rewards"] - out[f"{term}rejected_rewards"]).mean()
    metrics = {"accuracy": out[f"{term}accuracies"].mean().item(), "margin": margin.item(), "alpha": alpha}
    for extra in ("nll", "decision"):  # the terms beyond the paper, when their weight is above 0
        if out[extra] is not None:
            metrics[extra] = out[extra].mean().item()
    metrics["pairs"] = list(zip(batch["users"], batch["groups"], out[f"{term}accuracies"].tolist()))
    return out["losses"].mean(), metrics


def prm_batch_loss(t, batch, alpha: float):
    out = prlhf.prm_step(t.model, t.head, t.user_model, batch, alpha, shared_prompt=t.cfg.shared_prompt)
    accuracies = out["accuracies"] if alpha > 0 else out["generic_accuracies"]
    return out["losses"].mean(), {"accuracy": accuracies.float().mean().item()}


BATCH_LOSS = {"sft": sft_loss, "pdpo": pdpo_batch_loss, "prm": prm_batch_loss}  # (t, batch, alpha) -> loss, metrics


def mean_over(cfg, batch) -> int:
    """How many terms a stage's batch loss averages: scored response tokens (SFT) or pairs."""
    if cfg.stage == "sft":
        return int(batch["response_mask"][:, 1:].sum())
    return len(batch["index"])


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
    where a later run with the same inputs (cache.reference_fingerprint) finds them: the P-DPO arm after
    the vanilla DPO arm from the same SFT model and data, say.
    """
    if lora.lora_modules(model):
        reference_model = lambda: lora.lora_disabled(model)  # noqa: E731
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
    fingerprint = cache.reference_fingerprint(
        cfg.model, tokenizer, [cfg.data, cfg.valid], max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        average_logps=cfg.average_logps, weights_dtype=model.tok_embeddings.weight.dtype, precision=cfg.precision)
    shared = reference_cache_dir(cfg.reference_cache)
    files = [Path(cfg.out) / cache.REFERENCE_FILE]
    if shared is not None:
        files.append(shared / f"{fingerprint['sha256']}.safetensors")
    return cache.reference_cache(online, {"train": train_items, "valid": valid_items}, collate,
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
    total_steps: int
    global_batch: int
    timing: dict
    scaler: torch.amp.GradScaler | None = None  # set by `train`, next to the loop
    state: dict | None = None  # step, epoch, batch: where the loop is (or resumed)
    batches: list | None = None  # this epoch's global batches, as item indices (next_batch)
    boundary: tuple | None = None  # (state, RNG) at the last step boundary: what Ctrl-C saves
    bar: object = None  # the progress bar and metrics.jsonl (log_step)
    metrics_file: object = None
    start: float = 0.0


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
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise FileExistsError(f"--out {cfg.out}: a file is there; the run needs a directory (a new or a run's one)")
    if cfg.resume and not (Path(cfg.out) / "args.json").is_file():
        raise FileNotFoundError(f"{cfg.out}: --resume but no args.json there")


def load_models(cfg: TrainConfig, train_pairs, device: str):
    """The LM (full, or frozen with LoRA adapters), the user model f_P and registry, a reward head."""
    adapters = cfg.lora_r > 0
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    base_dtype = half if adapters else torch.float32  # LoRA: the frozen base in the half precision
    model = runs.load_base(cfg.model, base_dtype, device)
    if adapters:
        lora.add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets.split(","))
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
    """Processes, data, models, reference, optimizer and schedule, in that order."""
    t0 = time.perf_counter()
    dist = distributed.setup(runs.pick_device(cfg.device), cfg.parallel)  # torchrun's processes, or this one
    device, out = dist.device, Path(cfg.out)
    if cfg.precision == "auto":  # decided once, here; args.json keeps the outcome
        cfg = dataclasses.replace(cfg, precision=runs.pick_precision("auto", device))
        if not cfg.quiet:
            tqdm.write(f"--precision auto: {cfg.precision} on {device}")
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

    # 4. optimizer and schedule
    trainables, optimizer = make_optimizer(cfg, model, user_model, head, device)
    global_batch = cfg.batch_size * dist.world_size  # items per micro-batch, all ranks
    steps_per_epoch = max(1, math.ceil(len(train_items) / global_batch) // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    return Training(cfg, dist, out, tokenizer, train_items, valid_items, model, user_model, registry, head, collate,
                    autocast, reference, trainables, optimizer, total_steps, global_batch, timing)


def start_or_resume(t: Training) -> dict:
    """Where the loop starts: step 0 with a fresh metrics.jsonl, or --resume's checkpoint (weights,
    AdamW and loss-scaler state, data position, RNG)."""
    if t.cfg.resume:
        state = runs.load_checkpoint(t.out, t.trainables, t.optimizer, t.scaler, t.dist)
        if not t.cfg.quiet:
            tqdm.write(f"resumed at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
        return state
    if t.dist.rank == 0 and (t.out / "metrics.jsonl").exists():
        (t.out / "metrics.jsonl").unlink()
    return {"step": 0, "epoch": 0, "batch": 0}


def write_resume_checkpoint(t: Training, at=None) -> int:
    """Write checkpoint/ for --resume; at: (state, rng) of the last step boundary (default: now). Its step."""
    state, rng = at or (t.state, runs.rng_state())
    tensors, opt = t.dist.full_state(t.trainables, t.optimizer)  # FSDP: every rank sends shards to rank 0
    if t.dist.rank == 0:
        runs.save_checkpoint(t.out, tensors, opt, t.scaler, dict(state), rng)
    return state["step"]


def save(t: Training, train_s: float):
    """The final run directory (runs.save_run), written by rank 0 from full weights (FSDP: gathered)."""
    model, user_model, head = t.dist.full_modules()  # every rank takes part
    if t.dist.rank == 0:
        runs.save_run(t.out, model, user_model, t.registry, head, t.tokenizer, merge=t.cfg.merge)
        runs.atomic_write_json({**t.timing, "train_s": train_s}, t.out / "timing.json")


def finish(t: Training, train_s: float) -> dict:
    """The final run directory (save), its evaluation on --valid (eval.json, the summary returned), and a line
    listing what the run directory holds."""
    save(t, train_s)
    summary = evaluate(t) if t.valid_items and t.cfg.stage != "sft" else {}
    if summary and t.dist.rank == 0:
        runs.atomic_write_json(summary, t.out / "eval.json")
    if not t.cfg.quiet:
        tqdm.write(f"wrote {t.out}: " + ", ".join(sorted(p.name + "/" * p.is_dir() for p in t.out.iterdir())))
    return summary


# ----------------------------------------------------------------------------------------------
# The training loop


def next_batch(t: Training) -> list[int]:
    """The item indices of the next global batch; past an epoch's last, the next epoch in a new order."""
    state = t.state
    if state["batch"] >= len(t.batches):
        state["epoch"], state["batch"] = state["epoch"] + 1, 0
        t.batches = data.make_batches(t.train_items, t.global_batch, shuffle=True, seed=t.cfg.seed, epoch=state["epoch"])
    state["batch"] += 1
    return t.batches[state["batch"] - 1]


def log_step(t: Training, logs: list[dict], tokens: int, seconds: float, norms: dict, pairs: list):
    """After an optimizer step: the bar, and every --log-every steps a line of metrics.jsonl (global batch means,
    user-model norms, per-user and per-group training accuracy; with --eval-every, the evaluation)."""
    cfg, step = t.cfg, t.state["step"]
    row = {"step": step, "epoch": t.state["epoch"], "lr": t.optimizer.param_groups[0]["lr"],
           **{k: sum(r[k] for r in logs) / len(logs) for k in logs[0]},
           "tokens_per_s": tokens / seconds, "elapsed_s": time.perf_counter() - t.start, **norms}
    if pairs:  # per-user and per-group training accuracy of the personalized term
        row |= {"user_accuracy": report.accuracy_by(pairs, 0), "group_accuracy": report.accuracy_by(pairs, 1)}
    t.bar.update(1)
    t.bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "accuracy", "lr", "tokens_per_s") if k in row})
    if cfg.eval_every and step % cfg.eval_every == 0 and t.valid_items and cfg.stage != "sft":
        row["eval"] = evaluate(t)
    if step % cfg.log_every == 0 or "eval" in row:
        t.metrics_file.write(json.dumps(row) + "\n")
        t.metrics_file.flush()


def train(cfg: TrainConfig) -> dict:
    """Run one stage; return the final evaluation summary (empty without --valid)."""
    t = setup(cfg)
    cfg, dist, optimizer = t.cfg, t.dist, t.optimizer
    t.model.set_grad_checkpointing(cfg.grad_checkpointing)  # recompute each block's activations in backward
    # t.autocast: bf16/fp16 around each forward; fp16 also scales the loss so small gradients do not flush to zero
    t.scaler = scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
    t.state = state = start_or_resume(t)
    t.batches = data.make_batches(t.train_items, t.global_batch, shuffle=True, seed=cfg.seed, epoch=state["epoch"])
    t.bar = tqdm(total=t.total_steps, initial=state["step"], disable=cfg.quiet, desc=f"{cfg.stage} {t.out.name}",
                 dynamic_ncols=True)
    t.model.train()
    t.start = time.perf_counter()
    with open(t.out / "metrics.jsonl" if dist.rank == 0 else os.devnull, "a") as t.metrics_file, \
            runs.stopping_cleanly(t.out, t.bar, dist.sharded, lambda: write_resume_checkpoint(t, t.boundary)):
        while state["step"] < t.total_steps:
            t.boundary = (dict(state), runs.rng_state())  # weights change only at optimizer.step(): resume from here
            t0, tokens, logs, pairs = time.perf_counter(), 0, [], []
            alpha = get_alpha(state["step"], t.total_steps, cfg.generic_delay, cfg.alpha)
            for g in optimizer.param_groups:
                g["lr"] = get_lr(state["step"], t.total_steps, cfg.warmup_steps, g["peak_lr"])
            for micro in range(cfg.grad_accum):
                idx, real = dist.part_of(next_batch(t))  # this rank's part of the global batch
                dist.sync_gradients(micro == cfg.grad_accum - 1)
                batch = t.collate([t.train_items[i] for i in idx])
                with t.autocast:
                    loss, metrics = dist.wrapped(BATCH_LOSS[cfg.stage], t, batch, alpha)
                pairs += metrics.pop("pairs", []) if real else []  # this rank's pairs (rank 0 logs its own)
                # share weighs this rank's mean so that the ranks' averaged gradients are the global batch's mean
                # (1 in a single process); / grad_accum makes the micro-batches of a step add up to their mean
                share = dist.share(mean_over(cfg, batch) if real else 0)
                scaler.scale(loss * share / cfg.grad_accum).backward()
                tokens += sum(int(v.numel()) for k, v in batch.items() if k.endswith("input_ids"))
                logs.append({"loss": loss.item() * share, **{k: v * share for k, v in metrics.items()}})
            logs, tokens = dist.average(logs), dist.total(tokens)  # global batch means, the same on every rank
            if not all(math.isfinite(row["loss"]) for row in logs):
                raise FloatingPointError(f"non-finite loss at step {state['step']}")
            scaler.unscale_(optimizer)
            norms = {} if dist.sharded else report.user_model_norms(t.user_model)  # FSDP: the table is sharded
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(t.trainables.values()), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            log_step(t, logs, tokens, time.perf_counter() - t0, norms, pairs)
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                write_resume_checkpoint(t)
    t.bar.close()
    write_resume_checkpoint(t)
    return finish(t, time.perf_counter() - t.start)


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    if not argv or cfg.example != "none":  # a built-in example: the one place the core starts code in examples/
        import examples
        given = any(a.split("=")[0] == "--precision" for a in argv)  # else the example's own default
        return examples.run("toy" if not argv else cfg.example, out=cfg.out, seed=cfg.seed, quiet=cfg.quiet,
                            model=cfg.model, precision=cfg.precision if given else None)
    for name in ("model", "data", "out"):
        if not getattr(cfg, name):
            runs.fail(f"--{name} is required (or run `python train.py` with no arguments for the demo)")
    try:
        train(cfg)
    except (data.DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        runs.fail(str(e))


if __name__ == "__main__":
    main()
