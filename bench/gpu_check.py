"""GPU check in one command: P-DPO training steps in bf16 and fp16, our model against transformers, memory
against the plan, speed. On a CUDA machine in a few minutes; without CUDA it says so and exits 0.

    python bench/gpu_check.py                       # CUDA: TinyLlama-1.1B's config, random weights
    python bench/gpu_check.py --device cpu --tiny   # the same code on a tiny model, seconds (the CI test)

1. training: `--steps` optimizer steps of exact P-DPO (individual user model, T_u = 1, alpha 0.5) with LoRA
   r 8 on train.py's default targets and gradient checkpointing, once under bf16 autocast with a bf16 base,
   once under fp16 autocast with an fp16 base and GradScaler. The step is written here from the library
   pieces train.py is built on (prlhf.pdpo_step, lora.add_lora, torch.autocast, torch.amp.GradScaler,
   torch.optim.AdamW; bench/ never imports train.py) on synthetic pairs collated by data.collate_pairs, every
   row max_length tokens; reference log-probs computed once before the steps, adapters off, as train.py does.
   Passes when every loss is finite and the adapters moved (GradScaler did not skip every step).
2. parity: our forward against transformers' LlamaForCausalLM in bf16 on the same weights (common.hf_twin):
   max and mean |logit difference| relative to the largest |logit|. Passes below --parity-max / --parity-mean.
3. memory: torch.cuda.max_memory_allocated over the bf16 run (model built, steps taken) against
   memory_plan.budget's total for the same config, batch and lengths; the ratio measured / plan.
4. speed: policy tokens per second of the bf16 steps after the first (4B rows of max_length + T_u) and MFU =
   achieved model FLOP/s / peak. Model FLOPs per step, LoRA: 4 N_blocks per token (forward, and the input
   gradients of the frozen linears; no base weight gradients) + 12 L d T per token for attention (forward
   and backward, PaLM's convention) + 4 V d per scored response token (the LM head runs only there);
   checkpointing's recomputation is not counted (that would be hardware FLOPs). Peak: dense bf16/fp16
   tensor-core TFLOP/s by device name (PEAK_TFLOPS), else --peak-tflops.
The report goes to stdout and to bench/results/gpu_check-DATE.txt (--out); its last line is one JSON object.
Exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import common as C
import memory_plan as MP

import data  # the project's modules, at the root (common puts it on sys.path)
import model as lm
import lora
import prlhf

CONFIG_1B = C.ROOT / "bench" / "configs" / "tinyllama-1.1b.json"
# dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; first match wins
PEAK_TFLOPS = {"H100 PCIE": 756.0, "H200": 989.0, "H100": 989.0, "A100": 312.0}
N_USERS = 8
LORA_ALPHA, LORA_DROPOUT, LR, USER_LR, GRAD_CLIP = 16.0, 0.05, 1e-3, 1e-2, 1.0  # train.py's LoRA defaults


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for the dry run with --tiny")
    p.add_argument("--tiny", action="store_true",
                   help="a 2-layer model, short rows and 3 steps: the code path in seconds")
    p.add_argument("--config", default=str(CONFIG_1B), help="a config.json (default: TinyLlama-1.1B's, %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step (B; P-DPO runs 4B rows)")
    p.add_argument("--max-length", type=int, default=512, help="tokens per row: [BOS] prompt response")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per precision")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak, TFLOP/s, for MFU (default: from the device name: "
                        + ", ".join(f"{k} {v:g}" for k, v in PEAK_TFLOPS.items()) + ")")
    p.add_argument("--parity-max", type=float, default=0.05,
                   help="largest max |logit diff| / max |logit| that passes (default: %(default)s)")
    p.add_argument("--parity-mean", type=float, default=0.005,
                   help="largest mean |logit diff| / max |logit| that passes (default: %(default)s)")
    p.add_argument("--out", default=None, help="report file (default: bench/results/gpu_check-DATE.txt)")
    args = p.parse_args(argv)
    if args.tiny:
        args.max_length, args.steps = 32, 3
    return args


def model_config(args) -> lm.ModelConfig:
    if args.tiny:
        return C.llama_config(layers=2, hidden=64, heads=4, kv_heads=2, vocab=256)
    cfg = lm.read_config(args.config)
    return cfg if cfg.pad_token_id is not None else lm.ModelConfig(**{**vars(cfg), "pad_token_id": cfg.eos_token_id})


# ----------------------------------------------------------------------------------------------
# 1. training steps


def synthetic_batch(cfg: lm.ModelConfig, batch: int, max_length: int, device: str, seed: int) -> dict:
    """B pairs of random tokens from B known users, collated as train.py collates: rows of exactly
    max_length tokens ([BOS] + prompt + response, responses ending in EOS)."""
    g = torch.Generator().manual_seed(seed)
    prompt, response = (max_length - 1) // 2, max_length - 1 - (max_length - 1) // 2

    def ids(n):
        return torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()

    eos = [cfg.eos_token_id]
    items = [data.TokenizedPair(f"user_{i % N_USERS + 1}", None, ids(prompt), [], ids(response - 1) + eos,
                                ids(response - 1) + eos, i) for i in range(batch)]
    special = SimpleNamespace(bos_id=cfg.bos_token_id, pad_id=cfg.pad_token_id)  # all collate reads of a tokenizer
    b = data.collate_pairs(items, special, lambda user: int(user.split("_")[1]), use_user_text=False)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def train_steps(cfg: lm.ModelConfig, precision: str, args, device: str) -> dict:
    """--steps P-DPO steps with LoRA and gradient checkpointing; losses, time per step, peak memory."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pcfg = prlhf.PDPOConfig(user_model="individual", n_user_tokens=1, alpha=0.5)  # exact P-DPO, eq. (pdpo)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    model = lm.build_model(cfg, dtype=dtype, device=device)
    lora.add_lora(model, args.lora_r, LORA_ALPHA, LORA_DROPOUT, MP.LORA_TARGETS.split(","))
    model.set_grad_checkpointing(True)
    user_model = pcfg.make_user_model(N_USERS, model.tok_embeddings.weight, seed=0).to(device)
    adapters = [p for p in model.parameters() if p.requires_grad]
    trainables = adapters + list(user_model.parameters())
    optimizer = torch.optim.AdamW([{"params": adapters, "lr": LR}, {"params": list(user_model.parameters()),
                                   "lr": USER_LR}], weight_decay=0.0, fused=device.startswith("cuda") or None)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=dtype)
    batches = [synthetic_batch(cfg, args.batch, args.max_length, device, seed) for seed in range(args.steps)]
    model.eval()
    with torch.no_grad(), lora.lora_disabled(model), autocast:  # pi_ref, precomputed as train.py does
        references = [prlhf.reference_logps(model, b) for b in batches]
    model.train()
    losses, seconds = [], []
    for batch, reference in zip(batches, references):
        def step():
            with autocast:
                loss = prlhf.pdpo_step(model, user_model, batch, lambda b: reference, pcfg)["losses"].mean()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainables, GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        seconds.append(C.timed(step, device))
    moved = any(m.lora_B.abs().sum().item() > 0 for m in lora.lora_modules(model) if isinstance(m, lora.LoRALinear))
    out = {"losses": [round(x, 4) for x in losses], "step_s": seconds, "adapters_moved": moved,
           "ok": all(math.isfinite(x) for x in losses) and moved,
           "peak_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None}
    if precision == "fp16":
        out["loss_scale"] = scaler.get_scale()
    return out


def model_flops_per_step(cfg: lm.ModelConfig, args, n_user_tokens: int = 1) -> float:
    """Model FLOPs of one LoRA P-DPO step (module docstring, 4.): no recomputation, no base weight gradients."""
    params = MP.count_parameters(cfg, 0, 0, 0)
    d, V, L = cfg.hidden_size, cfg.vocab_size, cfg.n_layers
    n_blocks = params.linear - V * d  # the linears of the blocks (the LM head counted apart)
    rows, T_row = 4 * args.batch, args.max_length + n_user_tokens
    response = args.max_length - 1 - (args.max_length - 1) // 2
    return rows * T_row * (4 * n_blocks + 12 * L * d * T_row) + rows * response * 4 * V * d


def peak_tflops(args, device: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = torch.cuda.get_device_name().upper() if device.startswith("cuda") else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------------------------
# 2. parity with transformers, bf16


def parity(cfg: lm.ModelConfig, device: str, seq: int) -> dict:
    ours, hf = C.hf_twin(cfg, torch.bfloat16, device)
    ids = torch.randint(3, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a, b = ours(ids).float(), hf(input_ids=ids).logits.float()  # (1, T, V)
    scale = b.abs().max()
    return {"max_rel": ((a - b).abs().max() / scale).item(), "mean_rel": ((a - b).abs().mean() / scale).item(),
            "max_abs_logit": scale.item()}


# ----------------------------------------------------------------------------------------------
# The report


def check(args) -> dict:
    device = args.device
    cfg = model_config(args)
    params = MP.count_parameters(cfg, args.lora_r, N_USERS, 1)
    print(f"gpu_check: {'tiny llama' if args.tiny else args.config}: {params.total:,} parameters, random weights; "
          f"P-DPO batch {args.batch} (4B = {4 * args.batch} rows x {args.max_length + 1} tokens), LoRA r "
          f"{args.lora_r} + gradient checkpointing, {args.steps} steps; {C.describe_machine(device)}")
    figures, rows = {"device": C.describe_machine(device), "parameters": params.total}, []
    for precision in ("bf16", "fp16"):
        r = train_steps(cfg, precision, args, device)
        figures[precision] = r
        extra = f", loss scale {r['loss_scale']:g}" if precision == "fp16" else ""
        rows.append([f"training, {precision}", "ok" if r["ok"] else "FAIL", f"losses {r['losses'][0]:.3f} -> "
                     f"{r['losses'][-1]:.3f}, adapters moved: {r['adapters_moved']}{extra}"])

    p = parity(cfg, device, min(args.max_length, 256))
    p["ok"] = p["max_rel"] <= args.parity_max and p["mean_rel"] <= args.parity_mean
    figures["parity_bf16"] = p
    rows.append(["ours vs transformers, bf16", "ok" if p["ok"] else "FAIL",
                 f"|logit diff| / max |logit| ({p['max_abs_logit']:.3g}): max {p['max_rel']:.2e} "
                 f"(<= {args.parity_max}), mean {p['mean_rel']:.2e} (<= {args.parity_mean})"])

    plan = MP.budget(cfg, lora_r=args.lora_r, batch=args.batch, max_length=args.max_length, n_user_tokens=1,
                     n_users=N_USERS, grad_checkpointing=True, precision="bf16",
                     response_length=args.max_length - 1 - (args.max_length - 1) // 2)["bytes"]["total"]
    measured = figures["bf16"]["peak_bytes"]
    figures["memory"] = {"measured_bytes": measured, "plan_bytes": plan,
                         "ratio": round(measured / plan, 3) if measured else None}
    rows.append(["peak memory, bf16", "-", f"plan {plan / 2**20:.0f} MiB; " + (
        f"measured {measured / 2**20:.0f} MiB; measured / plan {measured / plan:.2f}" if measured
        else "measured: n/a (max_memory_allocated needs CUDA)")])

    timed = figures["bf16"]["step_s"][1:] or figures["bf16"]["step_s"]  # the first step warms up
    step_s = sum(timed) / len(timed)
    tokens_per_s = 4 * args.batch * (args.max_length + 1) / step_s
    peak = peak_tflops(args, device)
    achieved = model_flops_per_step(cfg, args) / step_s
    mfu = achieved / (peak * 1e12) if peak else None
    figures["speed_bf16"] = {"step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
                             "model_tflops_per_s": round(achieved / 1e12, 3), "peak_tflops": peak,
                             "mfu": round(mfu, 4) if mfu is not None else None}
    rows.append(["speed, bf16", "-", f"{tokens_per_s:,.0f} tokens/s, {achieved / 1e12:.2f} model TFLOP/s; MFU "
                 + (f"{100 * mfu:.1f}% of {peak:g} TFLOP/s" if mfu is not None else "n/a (pass --peak-tflops)")])
    C.print_table(["check", "result", "figures"], rows)
    figures["ok"] = all(figures[k]["ok"] for k in ("bf16", "fp16", "parity_bf16"))
    return figures


class Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy for the report file."""

    def __init__(self, terminal):
        self.terminal, self.copy = terminal, io.StringIO()

    def write(self, s):
        self.terminal.write(s)
        self.copy.write(s)
        return len(s)

    def flush(self):
        self.terminal.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check needs CUDA (torch.cuda.is_available() is False here): nothing was run. "
              "`--device cpu --tiny` runs the same code on a tiny model.")
        return 0
    out = Path(args.out or C.ROOT / "bench" / "results" / f"gpu_check-{datetime.date.today().isoformat()}.txt")
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        print(f"# command: python bench/gpu_check.py {' '.join(sys.argv[1:] if argv is None else argv)}")
        print(f"# date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d (%H:%M UTC)}")
        t0 = time.perf_counter()
        figures = check(args)
        figures["wall_s"] = round(time.perf_counter() - t0, 1)
        print(f"{'all checks passed' if figures['ok'] else 'a check FAILED'} in {figures['wall_s']} s; wrote {out}")
        C.emit_json(figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tee.copy.getvalue())
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
