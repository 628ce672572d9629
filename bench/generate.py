"""Greedy generation: our KV cache against recomputing every step, and against transformers' `generate`.

    python bench/generate.py                  # 8 layers, d 512, vocab 32000; batch 1 and 4; 32-token prompt, 64 new
    python bench/generate.py --quick          # seconds: smoke test

Same weights for all three (bench/common.py hf_twin; transformers with SDPA attention):
  ours, KV cache      model.generate: one prefill forward, then one token per step against the cached keys and
                      values (a boolean mask over the cache, for left padding)
  ours, no cache      the same model called on the whole sequence at every step (prefix + new tokens so far),
                      LM head on the last position only: what generation costs without a cache
  transformers        LlamaForCausalLM.generate(do_sample=False), its own dynamic KV cache
Each produces exactly --new-tokens tokens per row (no EOS stop; transformers gets min_new_tokens), and the
three greedy outputs are compared token for token (fp32). Tokens/s = batch x new tokens / wall time of
the whole call (prefill included). Contenders alternate; medians of --reps repetitions.
"""
from __future__ import annotations

import argparse

import torch

import common as C
import model as lm


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_model_args(p)
    p.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--quick", action="store_true", help="a tiny model, few tokens, one repetition (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.heads, args.vocab, args.batches = 2, 64, 4, 256, "2"
        args.prompt, args.new_tokens, args.reps = 8, 8, 1
    return args


@torch.no_grad()
def generate_without_cache(model: lm.Transformer, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding that re-runs the whole sequence every step (B, T) -> (B, new_tokens)."""
    out = []
    for _ in range(new_tokens):
        hidden = model(ids, return_hidden=True)[:, -1]  # (B, d): only the last position predicts
        token = model.output(hidden).argmax(-1, keepdim=True)  # (B, 1)
        out.append(token)
        ids = torch.cat([ids, token], dim=1)  # (B, T + 1)
    return torch.cat(out, dim=1)


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.device)
    cfg = C.llama_config(layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    ours, hf = C.hf_twin(cfg, torch.float32, device)
    print(f"generate: LLaMA-style {args.layers} layers, d {args.hidden}, vocab {args.vocab}, fp32; prompt "
          f"{args.prompt} tokens, {args.new_tokens} new tokens, greedy; {C.describe_machine(device)}; "
          f"{args.reps} alternating repetitions")
    figures, rows = {}, []
    for batch in [int(b) for b in args.batches.split(",")]:
        torch.manual_seed(batch)
        ids = torch.randint(3, args.vocab, (batch, args.prompt), device=device)
        ids[:, 0] = cfg.bos_token_id
        outputs = {}

        def cached():
            outputs["cache"] = torch.tensor(lm.generate(ours, ids.tolist(), args.new_tokens), device=device)

        def uncached():
            outputs["no_cache"] = generate_without_cache(ours, ids, args.new_tokens)

        def transformers_generate():
            with torch.no_grad():
                full = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=cfg.pad_token_id)
            outputs["transformers"] = full[:, args.prompt:]

        times = C.alternate({"ours_kv_cache": cached, "ours_no_cache": uncached, "transformers": transformers_generate},
                            args.reps, device)
        same = all(torch.equal(outputs["cache"], outputs[k]) for k in ("no_cache", "transformers"))
        tps = {k: batch * args.new_tokens / C.median(v) for k, v in times.items()}
        for k, v in tps.items():
            figures[f"b{batch}_{k}_tokens_per_s"] = round(v, 2)
        figures[f"b{batch}_kv_cache_speedup"] = round(tps["ours_kv_cache"] / tps["ours_no_cache"], 3)
        figures[f"b{batch}_ours_vs_transformers"] = round(tps["ours_kv_cache"] / tps["transformers"], 3)
        figures[f"b{batch}_same_tokens"] = same
        rows.append([batch, f"{tps['ours_kv_cache']:.1f}", f"{tps['ours_no_cache']:.1f}", f"{tps['transformers']:.1f}",
                     f"{figures[f'b{batch}_kv_cache_speedup']:.2f}", f"{figures[f'b{batch}_ours_vs_transformers']:.2f}",
                     "yes" if same else "NO"])
    C.print_table(["batch", "ours KV cache tok/s", "ours no cache tok/s", "transformers tok/s",
                   "cache speed-up", "ours / transformers", "same greedy tokens"], rows)
    figures["config"] = dict(layers=args.layers, hidden=args.hidden, vocab=args.vocab, prompt=args.prompt,
                             new_tokens=args.new_tokens, reps=args.reps, device=device)
    C.emit_json(figures)
    return figures


if __name__ == "__main__":
    main()
