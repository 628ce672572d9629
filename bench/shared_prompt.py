"""Shared-prompt rows (--shared-prompt) against two rows per pair: step time of P-DPO and of the reference pass.

    python bench/shared_prompt.py                              # LLaMA-style 6 layers, d 384 (13.7M); 8 pairs, prompt 200, responses 20
    python bench/shared_prompt.py --prompt 20 --response 200   # the unfavourable case: little prompt to share
    python bench/shared_prompt.py --quick                      # seconds: smoke test

Two rows per pair run [prefix] [y_w] and [prefix] [y_l]; a shared row runs [prefix] [y_w] [y_l] once, under
prlhf.shared_prompt_attention's mask (same log-probs, checked here too). Timed: prlhf.pdpo_step + backward
for exact P-DPO (alpha 0.5, individual user model, T_u = 1: 4B rows or 2B shared rows) and for alpha 1 (2B or
B), and the no-grad reference pass. Batches come from data.collate_pairs; prompt and response lengths vary
by a few tokens between pairs, so every layout is padded. Medians of --reps alternating repetitions.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

import common as C
import data
import model as lm
import prlhf


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p, layers=6, hidden=384, heads=6, vocab=8000)
    p.add_argument("--batch", type=int, default=8, help="pairs B")
    p.add_argument("--prompt", type=int, default=200, help="prompt tokens (about; BOS excluded)")
    p.add_argument("--response", type=int, default=20, help="tokens of each response (about; EOS included)")
    C.add_timing_args(p, reps=5)
    args = p.parse_args(argv)
    if args.quick:  # a tiny model, still padded everywhere
        args.layers, args.hidden, args.heads, args.vocab, args.prompt, args.response, args.reps = 2, 64, 4, 256, 24, 6, 1
    return args


def synthetic_pairs(args) -> dict:
    """B pairs of random tokens with lengths that differ a little, collated as train.py collates them."""
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, args.vocab, (max(n, 1),), generator=g).tolist()

    items = [data.TokenizedPair(user=str(i % 4), group=None, prompt_ids=tokens(args.prompt - 2 * (i % 3)),
                                user_text_ids=[], chosen_ids=tokens(args.response - 1 - i % 4) + [1],
                                rejected_ids=tokens(args.response - 1 + i % 3 - 1) + [1], index=i)
             for i in range(args.batch)]
    return data.collate_pairs(items, SimpleNamespace(bos_id=0, pad_id=2), lambda user: int(user) + 1,
                              use_user_text=False)


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.device)
    cfg = C.llama_config(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    model = lm.build_model(cfg, device=device).train()
    user_model = prlhf.make_user_model("individual", 4, 1, cfg.hidden_size, init="uniform").to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in synthetic_pairs(args).items()}
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"shared_prompt: LLaMA-style {args.layers} layers, d {args.hidden}, vocab {args.vocab} ({n_params:.1f}M); "
          f"{args.batch} pairs, prompt ~{args.prompt}, responses ~{args.response}; fp32; {C.describe_machine(device)}; "
          f"{args.reps} alternating repetitions")

    def reference(shared_prompt):
        return lambda b: prlhf.reference_logps(model, b, shared_prompt=shared_prompt)

    def step(alpha, shared_prompt):
        def run():
            pcfg = prlhf.PDPOConfig(alpha=alpha, shared_prompt=shared_prompt)
            prlhf.pdpo_step(model, user_model, batch, reference(shared_prompt), pcfg)["losses"].mean().backward()
            model.zero_grad(set_to_none=True)
            user_model.zero_grad(set_to_none=True)
        return run

    def reference_pass(shared_prompt):
        def run():
            with torch.no_grad():
                reference(shared_prompt)(batch)
        return run

    with torch.no_grad():
        same = [torch.allclose(a, b, atol=1e-4) for a, b in zip(reference(False)(batch), reference(True)(batch))]
    rows, figures = [], {"same_reference_logps": all(same)}
    for key, name, make in [("exact_pdpo", "exact P-DPO step (alpha 0.5)", lambda s: step(0.5, s)),
                            ("alpha_1", "P-DPO step, alpha 1", lambda s: step(1.0, s)),
                            ("reference", "reference pass (no grad)", reference_pass)]:
        times = C.alternate({"two rows": make(False), "shared": make(True)}, args.reps, device)
        two_rows, shared = C.median(times["two rows"]), C.median(times["shared"])
        rows.append([name, f"{two_rows * 1e3:.0f} ({C.spread(times['two rows'])})",
                     f"{shared * 1e3:.0f} ({C.spread(times['shared'])})", f"{two_rows / shared:.2f}"])
        figures[f"{key}_speedup"] = two_rows / shared
    C.print_table(["what", "two rows ms (spread s)", "shared ms (spread s)", "speed-up"], rows)
    C.emit_json(figures)


if __name__ == "__main__":
    main()
