"""Our model.py against Hugging Face `transformers` on the same weights and inputs: forward and forward+backward.

    python bench/model_vs_hf.py                          # 8 layers, d 512, seq 512, batch 4; fp32 and bf16
    python bench/model_vs_hf.py --dtypes fp32 --reps 5
    python bench/model_vs_hf.py --quick                  # a few seconds, for the smoke test

Both models are LLaMA-style (LlamaForCausalLM on their side), built from one ModelConfig and holding the
same tensors (copied through model.hf_key_map). transformers is set to its "sdpa" attention and, like ours,
reaches scaled_dot_product_attention's causal path with no mask tensor (no padding here); checked below
by comparing the logits. "bf16" means the weights themselves are bf16 (no autocast), as for inference.
Forward: logits (B, T, V) under no_grad. Forward+backward: the same next-token cross-entropy on both
(logits taken to fp32), then backward into every parameter. The two implementations alternate
(A B, B A, ...) and the table shows medians; ratio = ours / transformers (below 1: ours is faster).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import common as C

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p)
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each implementation")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--quick", action="store_true", help="a tiny model and one repetition (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.seq, args.batch, args.reps = 2, 64, 4, 256, 32, 2, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.device)
    cfg = C.llama_config(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    print(f"model_vs_hf: LLaMA-style, {args.layers} layers, d {args.hidden}, {args.heads} heads, "
          f"intermediate {cfg.intermediate_size}, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; "
          f"{C.describe_machine(device)}; {args.reps} alternating repetitions; transformers attention: sdpa")
    torch.manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=device)
    figures, rows = {}, []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        ours, hf = C.hf_twin(cfg, dtype, device)
        with torch.no_grad():
            diff = (ours(ids[:1, :64]).float() - hf(input_ids=ids[:1, :64]).logits.float()).abs().max().item()

        def forward(m, is_hf):
            def run():
                with torch.no_grad():
                    return m(input_ids=ids).logits if is_hf else m(ids)
            return run

        def forward_backward(m, is_hf):
            def run():
                logits = m(input_ids=ids).logits if is_hf else m(ids)  # (B, T, V)
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                loss.backward()
                m.zero_grad(set_to_none=True)
            return run

        for what, make in (("forward", forward), ("forward_backward", forward_backward)):
            times = C.alternate({"ours": make(ours, False), "transformers": make(hf, True)}, args.reps, device)
            ratio = C.median(times["ours"]) / C.median(times["transformers"])
            figures[f"{what}_{name}_ours_s"] = round(C.median(times["ours"]), 4)
            figures[f"{what}_{name}_hf_s"] = round(C.median(times["transformers"]), 4)
            figures[f"{what}_{name}_ratio"] = round(ratio, 3)
            rows.append([what, name, f"{C.median(times['ours']):.3f} ({C.spread(times['ours'])})",
                         f"{C.median(times['transformers']):.3f} ({C.spread(times['transformers'])})",
                         f"{ratio:.2f}", f"{diff:.1e}"])
        del ours, hf
    C.print_table(["pass", "dtype", "ours s (min-max)", "transformers s (min-max)", "ours / transformers",
                   "max |logit diff|"], rows)
    figures["max_ratio"] = max(v for k, v in figures.items() if k.endswith("_ratio"))
    figures["config"] = dict(layers=args.layers, hidden=args.hidden, vocab=args.vocab, seq=args.seq,
                             batch=args.batch, reps=args.reps, device=device)
    C.emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
