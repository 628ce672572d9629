"""Export a LoRA run for Hugging Face tools: PEFT adapters, and every user's embedding e_u.

    python export.py RUN OUT

OUT then holds what plain `transformers` + `peft` need to answer as any user (docs/huggingface.md):

    adapter_config.json, adapter_model.safetensors   the LoRA adapters in PEFT's format, for the base model
                                                     named in RUN/args.json: PeftModel.from_pretrained(base, OUT)
    user_embeddings.safetensors                      "user_embeddings" (N + 1, T_u, d): row 0 is e_0, the generic user
    user_embeddings.json                             row -> user identifier (row 0: null), T_u, d, the layout
    tokenizer.json, tokenizer_config.json, ...       the run's tokenizer

A full fine-tuning run is itself a Hugging Face checkpoint (AutoModelForCausalLM.from_pretrained(RUN)): OUT gets
its user embeddings and tokenizer, no adapters.

OUT appears complete or not at all: everything is read and checked first, written into a temporary directory
beside OUT, then renamed. OUT may be new, empty or a previous export (replaced only on success); a directory
holding other files is refused.

The user rows are the soft prompt of PAPER.md, "Personalized LM": [BOS] [e_u] [user text] [prompt] [response].

References (read, not copied): PEFT's LoRA layers and their saved form (huggingface/peft, `tuners/lora/layer.py`:
Linear keeps lora_A (r, in) and lora_B (out, r), Embedding keeps lora_embedding_A (r, vocab) and
lora_embedding_B (d, r), both scaled by lora_alpha / r without use_rslora; `utils/save_and_load.py`: keys are the
module's name under "base_model.model." with the adapter name dropped). Our LoRA (lora.py) stores the same
shapes with the same scale, so the export renames tensors and transposes none.

Reading order: names, adapters, user embeddings, the run, the command line.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import torch

import cli
import data
import model as lm
import prlhf
import runs

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
USER_EMBEDDINGS, USER_ROWS = "user_embeddings.safetensors", "user_embeddings.json"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the transformers model)


# ----------------------------------------------------------------------------------------------
# Names: our modules -> Hugging Face modules, from the one mapping model.hf_key_map writes out


def hf_module_names(cfg: lm.ModelConfig) -> dict[str, str]:
    """Our module name -> the Hugging Face module name, for every module with a weight:
    "layers.0.attention.wq" -> "model.layers.0.self_attn.q_proj" (LLaMA), "transformer.h.0.attn.q_proj" (GPT-J)."""
    return {ours.removesuffix(".weight"): hf.removesuffix(".weight")
            for hf, ours in lm.hf_key_map(cfg).items() if ours.endswith(".weight")}


def peft_key(hf_module: str, tensor: str, embedding: bool) -> str:
    """PEFT's saved name of one adapter tensor: lora_A / lora_B of a Linear are nn.Linear weights
    ("...q_proj.lora_A.weight"); an Embedding's are bare parameters ("...embed_tokens.lora_embedding_A")."""
    if embedding:
        return f"{PEFT_PREFIX}{hf_module}.{tensor.replace('lora_', 'lora_embedding_')}"
    return f"{PEFT_PREFIX}{hf_module}.{tensor}.weight"


# ----------------------------------------------------------------------------------------------
# Adapters: runs.save_run's adapter.safetensors -> PEFT's adapter_model.safetensors and adapter_config.json


def peft_adapters(adapters: dict, cfg: lm.ModelConfig, source: Path) -> tuple[dict, list[str]]:
    """Rename our adapter tensors ("layers.0.attention.wq.lora_A") to PEFT's; also return the target
    modules, the last parts of the Hugging Face names (PEFT wraps every module whose name ends so, as
    add_lora wraps every module whose last name is a target)."""
    names = hf_module_names(cfg)
    tensors, targets = {}, set()
    for key, tensor in adapters.items():
        module, which = key.rsplit(".", 1)  # "layers.0.attention.wq", "lora_A"
        if module not in names or which not in ("lora_A", "lora_B"):
            raise ValueError(f"{source}: tensor {key!r} is not an adapter of a {cfg.family} module "
                             f"(expected <module>.lora_A / .lora_B, module as in model.hf_key_map)")
        # tok_embeddings is the only nn.Embedding of model.Transformer
        tensors[peft_key(names[module], which, module == "tok_embeddings")] = tensor
        targets.add(names[module].rsplit(".", 1)[-1])
    return tensors, sorted(targets)


def adapter_config(args: dict, targets: list[str]) -> dict:
    """adapter_config.json: plain LoRA, scale lora_alpha / r (use_rslora off), as lora.LoRALinear computes.
    lora_dropout is what training used; PEFT, like us, drops nothing in eval mode."""
    return dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(args["model"]),
                r=args["lora_r"], lora_alpha=args["lora_alpha"], lora_dropout=args["lora_dropout"],
                target_modules=targets, bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False,
                init_lora_weights=True, modules_to_save=None, layers_to_transform=None, layers_pattern=None,
                rank_pattern={}, alpha_pattern={}, inference_mode=True, revision=None)


def adapter_files(run_dir: Path, args: dict) -> tuple[dict, dict, list[str]]:
    """PEFT's adapter tensors and adapter_config.json of a run, read and checked; and the target modules."""
    base = Path(args["model"])
    if runs.is_run_dir(base) and (base / "adapter.safetensors").is_file():
        raise ValueError(f"{run_dir}: its base {base} is itself a LoRA run, but a PEFT adapter sits on a Hugging "
                         f"Face checkpoint: train on {base}/merged instead (train.py --merge writes it)")
    try:
        cfg = lm.read_config(base)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir}/args.json: its base model {base} is not here (no config.json); "
                                f"the adapters only make sense on it") from None
    adapters = runs.read_tensors(run_dir / "adapter.safetensors")
    tensors, targets = peft_adapters(adapters, cfg, run_dir / "adapter.safetensors")
    return tensors, adapter_config(args, targets), targets


# ----------------------------------------------------------------------------------------------
# User embeddings: every row through the user model's own forward, so each kind's formula stays in prlhf


@torch.no_grad()
def user_embeddings(user_model, registry: prlhf.UserRegistry) -> torch.Tensor:
    """e_u of every row, generic row 0 first: (N + 1, T_u, d) in float32 (uniform e, e_0 + o_i, sum_k w c_k)."""
    return user_model(torch.arange(len(registry))).float()  # (N + 1, T_u, d)


def user_files(run_dir: Path, args: dict) -> tuple[torch.Tensor, dict]:
    """The rows (N + 1, T_u, d) and user_embeddings.json of a run's user model."""
    user_model, registry = prlhf.load_user_model(run_dir)
    rows = user_embeddings(user_model, registry)  # (N + 1, T_u, d)
    use_text = runs.pdpo_config(args).use_user_text
    return rows, dict(
        rows=[None, *registry.users],  # rows[i]: the user of row i; row 0 (null) is e_0, for every unknown user
        n_user_tokens=rows.shape[1], hidden_size=rows.shape[2], user_model=user_model.kind, use_user_text=use_text,
        layout="[BOS] [user_embeddings[row]] " + ("[user text] " if use_text else "") + "[prompt] [response]",
    )


# ----------------------------------------------------------------------------------------------
# The run


ARGS_FIELDS = {"model": ("a string", str), "lora_r": ("an integer >= 1", int),
               "lora_alpha": ("a number", (int, float)), "lora_dropout": ("a number", (int, float))}


def read_args(run_dir: Path, lora: bool = True) -> dict:
    """RUN/args.json, with the fields export uses checked (a full run's: none)."""
    file = run_dir / "args.json"
    args = data.read_json(file)  # a byte-order mark and CRLF accepted, as in every file people may edit
    if not isinstance(args, dict):
        raise ValueError(f"{file}: expected a JSON object of train.py's flags, got a {data.json_type(args)}")
    for name, (what, kind) in ARGS_FIELDS.items() if lora else ():
        value = args.get(name)
        if isinstance(value, bool) or not isinstance(value, kind) or (name == "lora_r" and value < 1):
            got = repr(value) if name in args else "nothing (the field is missing)"
            raise ValueError(f"{file}: field {name!r} must be {what}, got {got}")
    return args


def check_user_model(run_dir: Path, args: dict) -> bool:
    """Whether the run has a user model to export; a P-DPO or P-RM run without all its files is an error."""
    missing = [name for name in prlhf.USER_MODEL_FILES if not (run_dir / name).is_file()]
    if missing and (args.get("stage") in ("pdpo", "prm") or len(missing) < len(prlhf.USER_MODEL_FILES)):
        raise FileNotFoundError(f"{run_dir / missing[0]}: missing; the run's users are kept in "
                                f"{', '.join(prlhf.USER_MODEL_FILES)} (copy them back, or train the run again)")
    return not missing


# Every name export writes: OUT may be a previous export (only these files), which a successful export replaces.
EXPORT_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, USER_EMBEDDINGS, USER_ROWS, "tokenizer.json", *data.TOKENIZER_FILES}


def check_out(out: Path) -> None:
    """OUT must be new, an empty directory or a previous export, in a writable directory (it is renamed there)."""
    data.check_out_dir(out)
    data.check_out_dir(out.absolute().parent)
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES or not p.is_file())
    if others:
        raise FileExistsError(f"{out}: holds {others[0]!r}, which export does not write: give a new or empty "
                              f"directory, or a previous export (replaced when this one succeeds)")


def replace_directory(out: Path, write) -> None:
    """write(tmp) into a new directory beside `out`, then rename it to `out` (a previous `out` is removed only
    then); on any failure `out` is as it was and the temporary directory and any parents made for it are gone."""
    out = Path(os.path.abspath(out))  # "." and ".." spelled out, so that out.name is a name
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.parent / f".{out.name}.{os.getpid()}.{suffix}" for suffix in ("tmp", "old"))
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def export_run(run_dir, out_dir) -> list[str]:
    """Export a LoRA run of train.py to out_dir for transformers + peft; return notes for the user.

    All or nothing: the run, its base, its user model and OUT are read and checked before the first write, the
    files are written into a temporary directory beside OUT and renamed to OUT at the end (see check_out).
    A ValueError or OSError (one line, naming the file) for what cannot be exported."""
    run_dir, out = Path(run_dir), Path(out_dir)
    if not runs.is_run_dir(run_dir):
        raise FileNotFoundError(f"{run_dir}: not a run directory (no args.json); train one with train.py --out")
    lora = (run_dir / "adapter.safetensors").is_file()  # else save_run wrote config.json + model.safetensors
    args = read_args(run_dir, lora)
    if not lora and not check_user_model(run_dir, args):
        raise ValueError(f"{run_dir}: a full fine-tuning run without users (no adapter.safetensors, no user model) "
                         f"is already a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json): "
                         f"nothing to export")
    check_out(out)
    adapters, config, targets = adapter_files(run_dir, args) if lora else (None, None, None)
    tokenizer = data.load_tokenizer(run_dir)
    rows, rows_json = user_files(run_dir, args) if check_user_model(run_dir, args) else (None, None)

    def write(directory: Path):
        if lora:
            runs.atomic_save_tensors(adapters, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            runs.atomic_write_json(config, directory / ADAPTER_CONFIG)
        if rows is not None:
            runs.atomic_save_tensors({"user_embeddings": rows}, directory / USER_EMBEDDINGS, metadata={"format": "pt"})
            runs.atomic_write_json(rows_json, directory / USER_ROWS)
        tokenizer.save(directory)

    replace_directory(out, write)
    notes = [f"{out}/{ADAPTER_WEIGHTS}: LoRA r {args['lora_r']} on {', '.join(targets)} of {args['model']}" if lora
             else f"{run_dir} is a full fine-tuning run: the model is {run_dir} itself (a Hugging Face checkpoint)"]
    if rows is None:
        notes.append(f"{run_dir} has no user model (an SFT run): adapters only"
                     + (f"; {run_dir}/merged is the same model as one checkpoint" if (run_dir / "merged").is_dir() else ""))
    else:
        notes.append(f"{out}/{USER_EMBEDDINGS}: {rows.shape[0]} rows (row 0 = e_0, the generic user) "
                     f"of T_u = {rows.shape[1]} vectors of d = {rows.shape[2]}")
    if (run_dir / "reward_head.safetensors").is_file():
        notes.append(f"{run_dir}/reward_head.safetensors (r_phi's head of a P-RM run) has no PEFT form: not exported")
    return notes


def main(argv=None):
    p = cli.ArgumentParser(prog="export.py", description="Export a LoRA run for transformers + peft: "
                            "adapters in PEFT's format and the users' embeddings e_u (docs/huggingface.md). "
                            "All or nothing: everything is checked before the first write, and OUT appears only "
                            "when complete.")
    p.add_argument("run", help="run directory written by train.py: with --lora-r > 0 (adapters and users), or a "
                   "full fine-tuning run with users (users only: the run itself is the Hugging Face checkpoint)")
    p.add_argument("out", help="directory to write adapter_config.json, adapter_model.safetensors, "
                   "user_embeddings.* and the tokenizer into: a new or empty directory, or a previous export, "
                   "which is replaced only when this export succeeds; a directory holding other files is refused")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        notes = export_run(args.run, args.out)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        runs.fail(str(e))
    print("\n".join(notes))


if __name__ == "__main__":
    main()
