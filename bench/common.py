"""Shared helpers of the benchmarks: device choice, side-by-side timing, peak memory, output format.

Benchmarks print ratios measured side by side in one run: the machines they run on are shared and
noisy, so an absolute time means little, and two implementations timed minutes apart mean less.
Every benchmark therefore alternates its contenders (A B, then B A, ...) over several repetitions
and reports medians and the ratio of medians. Each script prints a readable table and, as its last
line, one JSON object with its figures (what tests/test_bench.py and the README read).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's modules (model, prlhf, data, train) live at the root
    sys.path.insert(0, str(ROOT))

import model as lm  # noqa: E402
import runs  # noqa: E402


def pick_device(flag: str = "auto") -> str:
    if flag != "auto":
        return flag
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Wall seconds of fn(), with the GPU's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(contenders: dict, reps: int, device: str, warmup: int = 1) -> dict[str, list[float]]:
    """Time each contender `reps` times, interleaved: A B, B A, A B, ... (the order flips every round,
    so a slow spell on a shared machine hits both). One untimed warm-up call each first."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            times[name].append(timed(contenders[name], device))
    return times


def median(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> str:
    """min-max of the repetitions, for the table: how noisy the machine was."""
    return f"{min(xs):.3g}-{max(xs):.3g}"


def print_table(headers: list[str], rows: list[list], title: str | None = None):
    if title:
        print(f"\n{title}")
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def emit_json(figures: dict):
    """The last line of every benchmark: its figures as one JSON object."""
    print(json.dumps(figures, sort_keys=False), flush=True)


def describe_machine(device: str) -> str:
    """The device, and what --precision auto picks on it (runs.pick_precision): timings depend on both."""
    auto = f"--precision auto -> {runs.pick_precision('auto', device)}"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, {auto} (torch {torch.__version__})"
    return (f"CPU ({torch.backends.cpu.get_cpu_capability()}, native bf16: {'yes' if runs.native_bf16(device) else 'no'}; "
            f"{auto}), {torch.get_num_threads()} threads (torch {torch.__version__})")


# ----------------------------------------------------------------------------------------------
# Models


def add_model_args(p, layers: int = 8, hidden: int = 512, heads: int = 8, vocab: int = 32000):
    """The LLaMA-style model size flags every benchmark shares (see llama_config)."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--hidden", type=int, default=hidden, help="d")
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--vocab", type=int, default=vocab)


def add_timing_args(p, reps: int = 3):
    """--reps, --device and --quick, as the timing benchmarks take them."""
    p.add_argument("--reps", type=int, default=reps, help="timed repetitions of each contender")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--quick", action="store_true", help="a tiny model, one repetition (smoke test)")


def llama_config(layers=8, hidden=512, heads=8, kv_heads=None, intermediate=None, vocab=32000,
                 max_positions=2048) -> lm.ModelConfig:
    """A small LLaMA-style config; intermediate defaults to LLaMA's 8/3 * d rounded up to 32 (7B: 11008)."""
    intermediate = intermediate or 32 * -(-int(8 * hidden / 3) // 32)
    return lm.ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden, n_layers=layers, n_heads=heads,
                          n_kv_heads=kv_heads or heads, head_dim=hidden // heads, intermediate_size=intermediate,
                          norm_eps=1e-6, max_position_embeddings=max_positions, bos_token_id=0, eos_token_id=1,
                          pad_token_id=2)


def hf_twin(cfg: lm.ModelConfig, dtype, device, seed: int = 0):
    """Our model and the `transformers` model with the same weights, both in eval mode.

    transformers is told to use SDPA attention (its "sdpa" implementation), the kernel ours calls,
    so the comparison is between implementations of the model, not between attention kernels.
    """
    import transformers

    hf_cfg = dict(cfg.to_hf())
    hf_cfg.pop("architectures", None)
    config_cls = transformers.LlamaConfig if cfg.family == "llama" else transformers.GPTJConfig
    model_cls = transformers.LlamaForCausalLM if cfg.family == "llama" else transformers.GPTJForCausalLM
    config = config_cls(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    config._attn_implementation = "sdpa"
    ours = lm.build_model(cfg, dtype=torch.float32, seed=seed)
    hf = model_cls(config)
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    ours_params = dict(ours.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for hf_name, our_name in lm.hf_key_map(cfg).items():
            hf_params[hf_name].copy_(ours_params[our_name])
    assert hf.config._attn_implementation == "sdpa"
    return ours.to(device=device, dtype=dtype).eval(), hf.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------
# Peak memory of a measurement run in its own process


def rss_mb() -> float:
    """Resident memory of this process now, MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since start (or since reset_peak_rss), MiB: VmHWM, else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: Path, args: list[str], env: dict | None = None, timeout: float = 1800,
               track_memory: bool = True) -> dict:
    """Run `python script args` in a fresh process; return the JSON object on its last line.

    track_memory: glibc keeps freed blocks of up to 32 MiB in its heap by default, so resident memory
    would lag behind what torch has freed; a fixed mmap threshold makes large frees go back to the kernel
    and the resident-memory peak follow the live tensors. It costs time (every large tensor is a fresh
    mmap and its page faults: a small CPU training run took 2x as long), so a benchmark of speed alone turns it off.
    """
    full_env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if track_memory else {}), **(env or {})}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_flags(**fields) -> list[str]:
    """train.py's command line for these TrainConfig fields: --name value, booleans as --x / --no-x."""
    flags = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


def run_train_script(**fields) -> Path:
    """Run train.py as `python train.py FLAGS` would, inside this process, and return its --out.

    Benchmarks measure the training script as people run it, not a library: runpy executes the file
    as __main__ (so this process's optimizer hooks and memory peaks see its work). A failed run exits.
    """
    import runpy

    argv = sys.argv
    sys.argv = [str(ROOT / "train.py"), *train_flags(**fields)]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return Path(fields["out"])


def run_arms(script: Path, arms: list[str], args: list[str], rounds: int = 1,
             track_memory: bool = True) -> dict[str, list[dict]]:
    """Each arm `rounds` times, each run `script --worker ARM args` in a fresh process (run_worker), the
    order reversed every other round (A B C, then C B A) so a slow spell of a shared machine hits all arms."""
    results = {arm: [] for arm in arms}
    for r in range(rounds):
        for arm in (arms if r % 2 == 0 else arms[::-1]):
            results[arm].append(run_worker(script, ["--worker", arm, *args], track_memory=track_memory))
    return results


# ----------------------------------------------------------------------------------------------
# What a training run feeds its policy, and TRL's DPOTrainer as the baseline


def count_policy_tokens(kinds: tuple) -> dict:
    """Count rows x positions of every forward with gradients (the policy's, not a no-grad reference pass)
    through a module of one of these classes, padding included, from the hidden states it returns.

    A global forward hook, so it also sees models built inside a script run by run_train_script. Kinds:
    model.Transformer for ours; the inner model (LlamaModel) for transformers, whose output holds
    last_hidden_state. Returns the dict it keeps adding to: {"tokens": ..., "forwards": ...}.
    """
    seen = {"tokens": 0, "forwards": 0}

    def hook(module, args, output):
        if isinstance(module, kinds) and torch.is_grad_enabled():
            hidden = getattr(output, "last_hidden_state", output)  # (N, T, d), or logits (N, T, V)
            seen["tokens"] += hidden.shape[0] * hidden.shape[1]
            seen["forwards"] += 1

    torch.nn.modules.module.register_module_forward_hook(hook)
    return seen


def run_trl_dpo(base: Path, pairs_file: Path, out: Path, device: str, *, batch_size: int, precision: str, lr: float,
                beta: float, max_length: int, seed: int, warmup_steps: int, max_steps: int = -1,
                epochs: float = 1.0) -> dict:
    """Vanilla DPO with TRL's DPOTrainer on our checkpoint and pairs file, as configured as train.py's run
    (AdamW, cosine schedule with linear warm-up, clipping 1.0, no gradient checkpointing, no truncation).

    TRL's prompts start with the BOS token ours adds, so both sides train on the same token sequences.
    Returns tokens (of its tokenized dataset: 2 |prompt| + |chosen| + |rejected| per pair) and train_s,
    the wall seconds of trainer.train(), which holds its reference forward at every step.
    """
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    import data

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa", dtype="float32")
    rows = [{"prompt": tokenizer.bos_token + p.prompt, "chosen": p.chosen, "rejected": p.rejected}
            for p in data.read_pairs(pairs_file)]
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                       max_steps=max_steps, num_train_epochs=epochs, learning_rate=lr, beta=beta,
                       max_length=max_length, lr_scheduler_type="cosine", warmup_steps=warmup_steps,
                       max_grad_norm=1.0, weight_decay=0.0, gradient_checkpointing=False,
                       bf16=precision == "bf16", use_cpu=device == "cpu", seed=seed,
                       logging_steps=10_000, report_to="none", save_strategy="no", disable_tqdm=True,
                       dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    ds = trainer.train_dataset
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    t0 = time.perf_counter()
    trainer.train()
    return {"tokens": tokens, "train_s": time.perf_counter() - t0}
