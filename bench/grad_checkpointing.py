"""Gradient checkpointing: activation memory and step time of a P-DPO training step, with and without.

    python bench/grad_checkpointing.py                    # LLaMA-style 8 layers, d 512; B=1 pair (4 rows) x 256 tokens
    python bench/grad_checkpointing.py --precision bf16 --batch 2 --seq 512
    python bench/grad_checkpointing.py --quick            # seconds: smoke test

The step is what train.py runs per micro-batch for exact P-DPO (alpha 0.5, individual user model, T_u = 1):
prlhf.policy_logps over 4B rows (chosen/rejected x personalized/generic), pdpo_loss, backward. With
checkpointing (model.set_grad_checkpointing, torch.utils.checkpoint per block, non-reentrant) each block
keeps only its input and is recomputed during the backward pass.

Memory, three ways:
  saved     bytes of the distinct tensors autograd keeps from forward to backward
            (torch.autograd.graph.saved_tensors_hooks, parameters excluded), measured in this process;
  peak      the step's peak above what was allocated before it (weights and gradients already there):
            CUDA: torch.cuda.max_memory_allocated; CPU: peak resident memory (VmHWM, reset before the step)
            of a fresh process per setting, so glibc and earlier runs do not blur it;
  estimate  bench/memory_plan.py's estimate of both, for this configuration: its error is printed.
Time: the two settings alternate on one model in this process; medians of --reps steps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import common as C
import memory_plan as MP
import model as lm
import prlhf

SCRIPT = Path(__file__).resolve()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p)
    p.add_argument("--batch", type=int, default=1, help="pairs B (4B rows for exact P-DPO)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (the second half is the response)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--quick", action="store_true", help="a tiny model, one repetition (smoke test)")
    p.add_argument("--peak-worker", choices=["on", "off"], help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.seq, args.reps = 2, 64, 4, 256, 32, 1
    return args


def setup(args, device):
    cfg = C.llama_config(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    model = lm.build_model(cfg, device=device).train()
    user_model = prlhf.make_user_model("individual", 4, 1, cfg.hidden_size, init="uniform").to(device)
    batch = {k: v.to(device) for k, v in MP.synthetic_batch(cfg, args.batch, args.seq).items()}
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:  # as train.py: the forward under autocast, backward outside it
            logps = prlhf.policy_logps(model, user_model, batch, alpha=0.5)
            zero = torch.zeros_like(logps["policy_chosen_logps"])
            loss = prlhf.pdpo_loss(logps["policy_chosen_logps"], logps["policy_rejected_logps"], zero, zero,
                                   logps["generic_chosen_logps"], logps["generic_rejected_logps"],
                                   alpha=0.5, beta=0.1)["losses"].mean()
        loss.backward()

    return cfg, model, user_model, batch, step


def saved_bytes(args, model, step_forward_only) -> float:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = step_forward_only()
    del out
    return float(sum(seen.values()))


def peak_worker(args):
    """One step in this fresh process; print the peak above the memory held before it (MiB)."""
    device = C.pick_device(args.device)
    cfg, model, user_model, batch, step = setup(args, device)
    model.set_grad_checkpointing(args.peak_worker == "on")
    step()  # warm-up: gradients are allocated now and kept (zeroed, not freed) for the measured step
    model.zero_grad(set_to_none=False)
    user_model.zero_grad(set_to_none=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        before = C.rss_mb()
        C.reset_peak_rss()
        step()
        peak = C.peak_rss_mb() - before
    C.emit_json({"peak_mb": peak})


def main(argv=None):
    args = parse_args(argv)
    if args.peak_worker:
        return peak_worker(args)
    device = C.pick_device(args.device)
    cfg, model, user_model, batch, step = setup(args, device)
    print(f"grad_checkpointing: LLaMA-style {args.layers} layers, d {args.hidden}, vocab {args.vocab}; exact P-DPO, "
          f"B={args.batch} -> {4 * args.batch} rows x {args.seq + 1} tokens (T_u = 1); {args.precision}; "
          f"{C.describe_machine(device)}; {args.reps} alternating repetitions")

    def with_checkpointing(on):
        def run():
            model.set_grad_checkpointing(on)
            step()
            model.zero_grad(set_to_none=True)
            user_model.zero_grad(set_to_none=True)
        return run

    times = C.alternate({"off": with_checkpointing(False), "on": with_checkpointing(True)}, args.reps, device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def forward_only():
        with autocast:
            return prlhf.policy_logps(model, user_model, batch, alpha=0.5)

    mode = "bf16" if args.precision == "bf16" else "fp32"
    params = MP.count_parameters(cfg, 0, 4, 1)
    rows, figures = [], {}
    for setting in ("off", "on"):
        model.set_grad_checkpointing(setting == "on")
        saved = saved_bytes(args, model, forward_only)
        peak = C.run_worker(SCRIPT, ["--peak-worker", setting, "--layers", str(args.layers), "--hidden",
                                     str(args.hidden), "--heads", str(args.heads), "--vocab", str(args.vocab),
                                     "--batch", str(args.batch), "--seq", str(args.seq), "--precision",
                                     args.precision, "--device", device])["peak_mb"] * 2**20
        est = MP.activations(cfg, params, mode, rows=4 * args.batch, row_tokens=args.seq + 1,
                             response_tokens=args.seq - args.seq // 2, grad_checkpointing=setting == "on")
        t = C.median(times[setting])
        figures.update({f"ckpt_{setting}_step_s": round(t, 4), f"ckpt_{setting}_saved_mb": round(saved / 2**20, 2),
                        f"ckpt_{setting}_peak_mb": round(peak / 2**20, 2),
                        f"ckpt_{setting}_saved_estimate_error": round(est.saved / saved - 1, 4),
                        f"ckpt_{setting}_peak_estimate_error": round(est.peak / peak - 1, 4)})
        rows.append([setting, f"{t:.3f} ({C.spread(times[setting])})", f"{saved / 2**20:.1f}",
                     f"{est.saved / 2**20:.1f} ({100 * (est.saved / saved - 1):+.0f}%)", f"{peak / 2**20:.1f}",
                     f"{est.peak / 2**20:.1f} ({100 * (est.peak / peak - 1):+.0f}%)"])
    C.print_table(["checkpointing", "step s (min-max)", "saved MiB", "saved, memory_plan", "peak MiB",
                   "peak, memory_plan"], rows)
    figures["step_time_ratio_on_off"] = round(figures["ckpt_on_step_s"] / figures["ckpt_off_step_s"], 3)
    figures["saved_ratio_on_off"] = round(figures["ckpt_on_saved_mb"] / figures["ckpt_off_saved_mb"], 3)
    figures["peak_ratio_on_off"] = round(figures["ckpt_on_peak_mb"] / figures["ckpt_off_peak_mb"], 3)
    print(f"\nwith checkpointing: step time x{figures['step_time_ratio_on_off']:.2f}, saved activations "
          f"x{figures['saved_ratio_on_off']:.2f}, peak x{figures['peak_ratio_on_off']:.2f}")
    figures["config"] = dict(layers=args.layers, hidden=args.hidden, vocab=args.vocab, batch=args.batch, seq=args.seq,
                             precision=args.precision, reps=args.reps, device=device)
    C.emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
