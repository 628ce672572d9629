"""Reference log-probs computed once, kept in memory and on disk under a fingerprint of their inputs.

pi_ref never changes during training (PAPER.md: the frozen starting model, without user embedding), so
log pi_ref(y_w | x) and log pi_ref(y_l | x) of every pair are computed in one pass before the first step
and looked up by pair index afterwards. They are written into the run directory (REFERENCE_FILE, read again by
--resume) and into a folder shared by runs (train.py --reference-cache), where a later run on the same inputs
(reference_fingerprint) finds them: the P-DPO arm after the vanilla DPO arm from the same SFT model, say.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import data
import distributed
import runs

ONE_PROCESS = distributed.SingleProcess("cpu")  # its operations are the identity on any device


REFERENCE_FILE = "reference_logps.safetensors"  # in the run directory: what --resume reads
REFERENCE_VERSION = 1  # in the fingerprint: raise it when prlhf.reference_logps or the reference rows change


def reference_fingerprint(model_path, tokenizer: data.Tokenizer, data_files, *, max_length: int,
                          max_prompt_length: int, average_logps: bool, weights_dtype, precision: str) -> dict:
    """{"sha256": ..., "inputs": {...}}: what the reference log-probs of a run's pairs depend on.

    In it:
      weights         pi_ref's checkpoint files (runs.weights_digest); with LoRA pi_ref is that same
                      checkpoint with adapters off, so its files are the fingerprint's
      weights_dtype   the dtype the weights are loaded in, and precision, the autocast (bf16, fp16):
                      both change the values
      tokenizer       its vocabulary and rules (tokenizer.json as the backend writes it), BOS/EOS/pad ids
      data            the bytes of each data file (train, valid; "" when absent): prompts, responses, and
                      user texts, which shorten the prompt under max_prompt_length (data.tokenize_pairs)
      max_length, max_prompt_length   truncation
      average_logps   IPO scores the mean log-prob per token, DPO the sum
      version         REFERENCE_VERSION, for changes to the code
    Not in it: the user model and use_user_text (pi_ref never sees u), alpha, beta, the batch size and
    the device (they change the values by float rounding only).
    """
    special = [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]
    inputs = {"version": REFERENCE_VERSION, "weights": runs.weights_digest(model_path),
              "weights_dtype": str(weights_dtype), "precision": precision,
              "tokenizer": hashlib.sha256((tokenizer.backend.to_str() + json.dumps(special)).encode()).hexdigest(),
              "data": [runs.file_digest([f]) if f else "" for f in data_files],
              "max_length": max_length, "max_prompt_length": max_prompt_length, "average_logps": average_logps}
    return {"sha256": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), "inputs": inputs}


@torch.no_grad()
def compute_reference_logps(reference, splits: dict, collate, *, batch_size: int, autocast, dist, quiet) -> dict:
    """{(split, index): (log pi_ref(y_w | x), log pi_ref(y_l | x))} for every pair of every split.

    Under torchrun each rank computes a share (as many batches on every rank: each FSDP forward is
    collective) and the shares are gathered, since any rank may train on any pair.
    """
    table = {}
    for split, items in splits.items():
        batches = dist.shard(data.make_batches(items, batch_size, shuffle=False, seed=0, epoch=0))
        for idx in tqdm(batches, desc=f"reference log-probs ({split})", disable=quiet, leave=False):
            batch = {**collate([items[i] for i in idx]), "split": split}
            with autocast:
                chosen, rejected = dist.wrapped(reference, batch)
            for j, i in enumerate(batch["index"].tolist()):
                table[(split, i)] = (chosen[j].float().cpu(), rejected[j].float().cpu())
    return dict(dist.gather(list(table.items())))


def save_reference_logps(table: dict, splits: dict, fingerprint: dict, file: Path):
    """`file` (safetensors, written atomically): per split its pairs' index, chosen and rejected log-probs."""
    tensors = {}
    for split, items in splits.items():
        pairs = [table[(split, it.index)] for it in items]
        tensors[f"{split}.index"] = torch.tensor([it.index for it in items], dtype=torch.long)  # (N,)
        tensors[f"{split}.chosen"] = torch.stack([p[0] for p in pairs]) if pairs else torch.zeros(0)  # (N,)
        tensors[f"{split}.rejected"] = torch.stack([p[1] for p in pairs]) if pairs else torch.zeros(0)  # (N,)
    file.parent.mkdir(parents=True, exist_ok=True)
    runs.atomic_save_tensors(tensors, file, metadata={"sha256": fingerprint["sha256"],
                                                      "inputs": json.dumps(fingerprint["inputs"])})


def load_reference_logps(file: Path, splits: dict, fingerprint: dict) -> dict | None:
    """The table save_reference_logps wrote into `file`, or None: no file, another fingerprint (stale),
    or other pairs. A file that cannot be read is warned about and computed again (None)."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("sha256") != fingerprint["sha256"]:
                return None
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # copies: not views of a file we may replace
        table = {}
        for split, items in splits.items():
            index = tensors[f"{split}.index"].tolist()
            if index != [it.index for it in items]:
                return None
            chosen, rejected = tensors[f"{split}.chosen"], tensors[f"{split}.rejected"]
            table.update({(split, i): (chosen[j], rejected[j]) for j, i in enumerate(index)})
        return table
    except Exception as e:  # a truncated or corrupt file: safetensors' own errors, a missing tensor
        print(f"warning: {file}: unreadable reference log-probs ({type(e).__name__}: {e}); computing them again",
              file=sys.stderr)
        return None


def reference_cache(reference, splits: dict, collate, *, batch_size: int, autocast=contextlib.nullcontext(),
                    dist=ONE_PROCESS, quiet: bool = True, fingerprint: dict | None = None, files=()):
    """Reference log-probs computed once per pair, then looked up: reference(batch) as a cache.

    splits: {name: tokenized items}; a batch says which split it is from in batch["split"] (default
    "train"). pi_ref never changes, so one pass over the data replaces a reference pass per step.
    With a `fingerprint` (reference_fingerprint) the pass is read from the first of `files` that holds
    it, when every rank finds one; otherwise it is computed. Rank 0 writes it into the files that lacked it.
    """
    files, table, missing = [Path(f) for f in files] if fingerprint else [], None, []
    for file in files:
        table = load_reference_logps(file, splits, fingerprint)
        if table is not None:
            if not quiet:
                tqdm.write(f"reference log-probs: read from {file}")
            break
        missing.append(file)
    if not all(dist.gather([table is not None])):  # every rank reads, or every rank computes (collectives)
        table, missing = compute_reference_logps(reference, splits, collate, batch_size=batch_size,
                                                 autocast=autocast, dist=dist, quiet=quiet), files
    if dist.rank == 0:  # the files that lacked them: all of them, or the run's after a hit in the shared folder
        for file in missing:
            save_reference_logps(table, splits, fingerprint, file)

    def cached(batch):
        pairs = [table[(batch.get("split", "train"), i)] for i in batch["index"].tolist()]
        device = batch["index"].device
        return torch.stack([p[0] for p in pairs]).to(device), torch.stack([p[1] for p in pairs]).to(device)

    return cached
