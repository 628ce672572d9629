"""Data for Personalized RLHF: from text files to padded tensors.

Implements the "Data" and "Personalized LM" sections of PAPER.md (Li, Zhou, Lipton, Leqi,
*Personalized Language Modeling from Personalized Human Feedback*, arXiv 2402.05133):
personalized preference tuples (u, x, y_w, y_l) and the sequence layouts

    policy:     [BOS] [user text, if any] [prompt] [response] [EOS]   (prlhf.py inserts e_u after BOS)
    reference:  [BOS] [prompt] [response] [EOS]                       (never sees user information)

In reading order:
  1. Tokenizer      load_tokenizer, train_bpe_tokenizer (a thin wrapper over the `tokenizers` library)
  2. Pairs          one JSON object per line: {"user", "prompt", "chosen", "rejected"[, "user_text", "group"]}
  3. Tokenization   tokenize_pairs, with the truncation policy stated in its docstring
  4. Batching       make_batches: length-bucketed, seeded, shardable
  5. Collate        collate_pairs (P-DPO / P-RM) and collate_sft (supervised fine-tuning)
  6. Converters     the paper's TL;DR "conflicting length preferences" task, P-SOUPS and PRISM, from local files
  7. Toy task       a synthetic 70/30 length-preference task that needs no download; instructions for a
                    real chat model (train.py --example smollm2)
  8. Command line   python data.py {check,toy,tldr,psoups,prism} ...

Only `tokenizers`, `numpy` and `torch` are used; nothing here touches the network.
"""

import argparse
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers


class DataError(ValueError):
    """A problem with an input file, stated in one line: `FILE:LINE: what is wrong and what would work`."""


# ----------------------------------------------------------------------------------------------------
# 1. Tokenizer
# ----------------------------------------------------------------------------------------------------


@dataclass
class Tokenizer:
    """Text <-> token ids. `encode` adds no special tokens: BOS and EOS are placed by this module."""

    backend: BackendTokenizer
    bos_id: int
    eos_id: int
    pad_id: int
    source: Path | None = None  # the checkpoint directory it was loaded from, whose other files `save` keeps

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json and the base checkpoint's other tokenizer files; `load_tokenizer` and
        Hugging Face `AutoTokenizer.from_pretrained(directory)` both reopen them.

        A tokenizer loaded from a checkpoint keeps every file of TOKENIZER_FILES its directory has (the
        chat template, special tokens, generation defaults) byte for byte. One trained here, or from a
        checkpoint without tokenizer_config.json, gets a tokenizer_config.json naming BOS, EOS and pad.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        if self.source is not None and Path(self.source).resolve() == directory.resolve():
            return  # saved over its own checkpoint: the other files are already there
        kept = [name for name in TOKENIZER_FILES if self.source is not None and (Path(self.source) / name).is_file()]
        for name in kept:
            _write_atomically(directory / name, (Path(self.source) / name).read_text(encoding="utf-8"))
        if "tokenizer_config.json" in kept:
            return
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.backend.id_to_token(self.bos_id),
            "eos_token": self.backend.id_to_token(self.eos_id),
            "pad_token": self.backend.id_to_token(self.pad_id),
            # Hugging Face would otherwise "clean up" spaces on decode and disagree with `decode` above.
            "clean_up_tokenization_spaces": False,
        }
        _write_atomically(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")


# Files of a Hugging Face checkpoint that describe its tokenizer and how it is prompted, besides tokenizer.json.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "generation_config.json")


def _read_json_if_present(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _special_token_id(directory: Path, backend: BackendTokenizer, name: str) -> int | None:
    """Id of special token `name` ("bos", "eos" or "pad"), looked up in the order Hugging Face
    checkpoints state it: token strings first, then numeric ids. None if no file names it."""
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        value = _read_json_if_present(directory / filename).get(f"{name}_token")
        if isinstance(value, dict):  # e.g. {"content": "<s>", "lstrip": false, ...}
            value = value.get("content")
        if isinstance(value, str):
            token_id = backend.token_to_id(value)
            if token_id is None:
                raise DataError(
                    f"{directory / filename}: {name}_token {value!r} is not in tokenizer.json's vocabulary"
                )
            return token_id
    for filename in ("config.json", "generation_config.json"):
        value = _read_json_if_present(directory / filename).get(f"{name}_token_id")
        if isinstance(value, list):  # e.g. Llama 3: "eos_token_id": [128001, 128009]
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return None


def load_tokenizer(checkpoint_dir: str | os.PathLike) -> Tokenizer:
    """Load `checkpoint_dir/tokenizer.json` and its special-token ids.

    BOS, EOS and pad are read from tokenizer_config.json (`bos_token`, ... as a string or a
    {"content": ...} dict), else special_tokens_map.json, else the `*_token_id` fields of
    config.json or generation_config.json (a list means its first id).
    Pad falls back to EOS (padding is never scored, so any id works); BOS falls back to EOS too,
    as in GPT-2 and Qwen, whose sequences start with their end-of-text token.
    """
    directory = Path(checkpoint_dir)
    path = directory / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: prlhf reads the fast-tokenizer file tokenizer.json. If the checkpoint has "
            f"only a sentencepiece model, write one once with transformers: "
            f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
        )
    backend = BackendTokenizer.from_file(str(path))
    eos_id = _special_token_id(directory, backend, "eos")
    if eos_id is None:
        raise DataError(
            f"{directory}: no end-of-sequence token found; give eos_token in tokenizer_config.json "
            f"or eos_token_id in config.json"
        )
    bos_id = _special_token_id(directory, backend, "bos")
    pad_id = _special_token_id(directory, backend, "pad")
    return Tokenizer(
        backend=backend,
        bos_id=eos_id if bos_id is None else bos_id,
        eos_id=eos_id,
        pad_id=eos_id if pad_id is None else pad_id,
        source=directory,
    )


def train_bpe_tokenizer(
    texts: Sequence[str], vocab_size: int, out_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """Train a small byte-level BPE tokenizer (GPT-2 style) on `texts`; deterministic for given texts.

    Special tokens get ids 0, 1, 2: `<s>` (BOS), `</s>` (EOS), `<pad>`. All 256 byte symbols are in
    the vocabulary, so any text can be encoded, and `vocab_size` must exceed 259.
    Saved to `out_dir` when given.
    """
    specials = ["<s>", "</s>", "<pad>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size <= len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for merges: a byte-level BPE needs more than "
            f"{len(alphabet) + len(specials)} (256 bytes + 3 special tokens)"
        )
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = Tokenizer(backend=backend, bos_id=0, eos_id=1, pad_id=2)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# 2. Preference pairs as JSON Lines
# ----------------------------------------------------------------------------------------------------

PAIR_FIELDS = ("user", "prompt", "chosen", "rejected")
OPTIONAL_PAIR_FIELDS = ("user_text", "group")


@dataclass
class Pair:
    """User `user` preferred `chosen` (y_w) over `rejected` (y_l) for `prompt` (x).

    `user_text` is explicit information about the user (optional); `group` is a label for reports only.
    """

    user: str
    prompt: str
    chosen: str
    rejected: str
    user_text: str | None = None
    group: str | None = None


def _read_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise DataError at the first bad line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    f"save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                    f"each line must hold one complete JSON object"
                ) from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object {{...}}, got a {_json_type(value)}")
            yield lineno, value


def _json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _pair_from_object(obj: dict, where: str) -> Pair:
    for field in PAIR_FIELDS:
        if field not in obj:
            raise DataError(f"{where}: missing field {field!r} (every line needs {', '.join(PAIR_FIELDS)})")
    user = obj["user"]
    # bool is a subclass of int in Python, but `true` is surely not a user id.
    if isinstance(user, bool) or not isinstance(user, (str, int)):
        raise DataError(f"{where}: field 'user' must be a string or an integer, got {_json_type(user)}")
    for field in PAIR_FIELDS[1:]:
        if not isinstance(obj[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {_json_type(obj[field])}")
    for field in OPTIONAL_PAIR_FIELDS:
        if obj.get(field) is not None and not isinstance(obj[field], str):
            raise DataError(
                f"{where}: field {field!r} must be a string or null, got {_json_type(obj[field])}"
            )
    return Pair(
        user=str(user),
        prompt=obj["prompt"],
        chosen=obj["chosen"],
        rejected=obj["rejected"],
        user_text=obj.get("user_text"),
        group=obj.get("group"),
    )


def read_pairs(path: str | os.PathLike) -> list[Pair]:
    """Read and validate a JSON Lines file of preference pairs (blank lines are skipped).

    Raises DataError("FILE:LINE: ...") on the first malformed line, and for a file without pairs.
    Integer user ids become strings. Fields other than those of `Pair` are ignored.
    """
    pairs = [_pair_from_object(obj, f"{path}:{lineno}") for lineno, obj in _read_jsonl_objects(path)]
    if not pairs:
        raise DataError(f"{path}: no pairs found (the file is empty or has only blank lines)")
    return pairs


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and os.replace, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_pairs(path: str | os.PathLike, pairs: Sequence[Pair]) -> None:
    """Write pairs as JSON Lines (atomically); optional fields that are None are left out."""
    lines = []
    for pair in pairs:
        obj = {"user": pair.user, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
        for field in OPTIONAL_PAIR_FIELDS:
            if getattr(pair, field) is not None:
                obj[field] = getattr(pair, field)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    _write_atomically(Path(path), "".join(lines))


def describe_pairs(pairs: Sequence[Pair]) -> str:
    """One line of counts, e.g. `600 pairs, 10 users, 2 groups (long 420, short 180)`."""
    users = {p.user for p in pairs}
    groups = Counter(p.group for p in pairs if p.group is not None)
    text = f"{len(pairs)} pairs, {len(users)} users, {len(groups)} groups"
    if groups:
        text += " (" + ", ".join(f"{g} {n}" for g, n in sorted(groups.items())) + ")"
    return text


# ----------------------------------------------------------------------------------------------------
# 3. Tokenization
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenizedPair:
    """A pair as token ids. Responses end with EOS unless truncation cut them (see `tokenize_pairs`)."""

    user: str
    group: str | None
    prompt_ids: list[int]  # no BOS: collate adds it
    user_text_ids: list[int]  # empty when the pair has no user text
    chosen_ids: list[int]
    rejected_ids: list[int]
    index: int  # position in the list given to tokenize_pairs

    @property
    def length(self) -> int:
        """Tokens in this pair's longest row (the policy row with user text), used for batching."""
        longest = max(len(self.chosen_ids), len(self.rejected_ids))
        return 1 + len(self.user_text_ids) + len(self.prompt_ids) + longest


def tokenize_pairs(
    pairs: Sequence[Pair], tokenizer: Tokenizer, max_length: int = 1024, max_prompt_length: int = 512
) -> tuple[list[TokenizedPair], dict]:
    """Tokenize pairs, skip those with chosen == rejected (no preference to learn), and truncate.

    Truncation, so that no row is longer than `max_length` tokens (the T_u soft tokens of the user
    embedding come on top):
      1. The prompt part, user text followed by prompt, is kept from its START and cut to
         `max_prompt_length` tokens (user text first, so a long user text leaves less prompt).
      2. Each response (text + EOS) is cut at its END to fit 1 (BOS) + prompt part + response <= max_length.
         A cut response loses its EOS: it was not finished, and the model must not learn to stop there.
    Returns the kept pairs and stats: pairs, skipped_identical, truncated (pairs with any cut),
    users, longest (tokens), max_length, max_prompt_length.
    """
    if max_prompt_length >= max_length - 1:
        raise ValueError(
            f"max_prompt_length ({max_prompt_length}) must be below max_length - 1 ({max_length - 1}), "
            f"or no response token would fit"
        )
    items, skipped_identical, truncated = [], 0, 0
    for index, pair in enumerate(pairs):
        if pair.chosen == pair.rejected:
            skipped_identical += 1
            continue
        user_text_ids = tokenizer.encode(pair.user_text) if pair.user_text else []
        prompt_ids = tokenizer.encode(pair.prompt)
        chosen_ids = tokenizer.encode(pair.chosen) + [tokenizer.eos_id]
        rejected_ids = tokenizer.encode(pair.rejected) + [tokenizer.eos_id]
        full = (len(user_text_ids), len(prompt_ids), len(chosen_ids), len(rejected_ids))

        user_text_ids = user_text_ids[:max_prompt_length]
        prompt_ids = prompt_ids[: max_prompt_length - len(user_text_ids)]
        response_budget = max_length - 1 - len(user_text_ids) - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:response_budget], rejected_ids[:response_budget]
        if (len(user_text_ids), len(prompt_ids), len(chosen_ids), len(rejected_ids)) != full:
            truncated += 1
        items.append(
            TokenizedPair(pair.user, pair.group, prompt_ids, user_text_ids, chosen_ids, rejected_ids, index)
        )
    stats = {
        "pairs": len(items),
        "skipped_identical": skipped_identical,
        "truncated": truncated,
        "users": len({item.user for item in items}),
        "longest": max((item.length for item in items), default=0),
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
    }
    return items, stats


def format_stats(stats: dict) -> str:
    """One printable line for the stats of `tokenize_pairs`."""
    return (
        f"{stats['pairs']} pairs from {stats['users']} users, longest {stats['longest']} tokens; "
        f"skipped {stats['skipped_identical']} with chosen == rejected; "
        f"truncated {stats['truncated']} to max_length {stats['max_length']} "
        f"(prompt {stats['max_prompt_length']})"
    )


# ----------------------------------------------------------------------------------------------------
# 4. Batching
# ----------------------------------------------------------------------------------------------------


def make_batches(
    items: Sequence,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    num_shards: int = 1,
    shard: int = 0,
) -> list[list[int]]:
    """Group item indices into batches of similar length, so little compute goes to padding.

    Each item needs a `.length` (TokenizedPair and SFTExample have one). With `shuffle`, the items
    are permuted, sorted by length within windows of 50 * batch_size, cut into batches, and the
    batch order is permuted again: batches stay random across the epoch but homogeneous inside.
    The permutations depend only on (seed, epoch). Without `shuffle`, items are simply sorted by
    length (for evaluation). All batches are full except at most one.

    Shard `shard` of `num_shards` (data parallel) gets every num_shards-th batch, so across shards
    every item is seen exactly once per epoch; shards' batch counts may differ by one.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, num_shards={num_shards}), got {shard}")
    lengths = [item.length for item in items]
    if shuffle:
        rng = np.random.default_rng([seed, epoch])  # a (seed, epoch) pair never collides with another
        order = rng.permutation(len(items)).tolist()
        window = 50 * batch_size
        # A stable sort keeps the random order among equal lengths.
        windows = [order[w : w + window] for w in range(0, len(order), window)]
        order = [i for chunk in windows for i in sorted(chunk, key=lengths.__getitem__)]
    else:
        order = sorted(range(len(items)), key=lengths.__getitem__)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches[shard::num_shards]


# ----------------------------------------------------------------------------------------------------
# 5. Collate: token ids -> padded tensors
# ----------------------------------------------------------------------------------------------------


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (prefix, response) rows into input ids and a mask that is True on response tokens.

    Right padding under causal attention needs no attention mask: real tokens never attend to the
    pads after them, and pads are never scored.
    """
    T = max(len(prefix) + len(response) for prefix, response in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for row, (prefix, response) in enumerate(rows):
        end = len(prefix) + len(response)
        input_ids[row, :end] = torch.tensor(prefix + response, dtype=torch.long)
        response_mask[row, len(prefix) : end] = True
    return input_ids, response_mask


def prefix_ids(tokenizer: Tokenizer, prompt_ids: list[int], user_text_ids: Sequence[int] = ()) -> list[int]:
    """The token part of every row before the response: [BOS] [user text] [prompt].

    The one place the layout is written: collate (policy, reference and SFT rows) and generation use it.
    The policy's full layout, PAPER.md "Personalized LM", is [BOS] [e_u] [user text] [prompt] [response]:
    prlhf.embed_with_user_prefix puts the T_u user vectors right after position 0, the BOS. The reference
    model gets no user information: user_text_ids empty, and no e_u.

    A prompt that already begins with BOS gets no second one: its BOS is the row's position 0, so e_u and
    the user text come right after it. That is the case of chat prompts whose template opens with the
    BOS token (SmolLM2's BOS is <|im_start|>), and of GPT-2/GPT-J prompts written with <|endoftext|>
    (their BOS = EOS).
    """
    if prompt_ids[:1] == [tokenizer.bos_id]:
        prompt_ids = prompt_ids[1:]
    return [tokenizer.bos_id, *user_text_ids, *prompt_ids]


def collate_pairs(
    items: Sequence[TokenizedPair], tokenizer: Tokenizer, row_of: Callable[[str], int], use_user_text: bool
) -> dict:
    """Batch B pairs for P-DPO / P-RM (bos and pad ids come from `tokenizer`).

    Returns
      user_rows                (B,)   LongTensor, row_of(user): the user model's row, 0 = generic user
      policy_input_ids         (2B, T) rows 0..B-1 chosen, B..2B-1 rejected (one forward for both);
                               each row [BOS] + user text (if use_user_text) + prompt + response, right-padded
      policy_response_mask     (2B, T) True exactly on response tokens (EOS included)
      reference_input_ids      (2B, T') the same without user text: the reference model never sees u
      reference_response_mask  (2B, T')
      users, groups            lists of B strings (groups may hold None)
      index                    (B,)   LongTensor, each pair's position in the tokenized list
    """
    policy_rows, reference_rows = [], []
    for responses in ("chosen_ids", "rejected_ids"):  # chosen rows first, then rejected
        for item in items:
            user_text = item.user_text_ids if use_user_text else []
            policy_rows.append((prefix_ids(tokenizer, item.prompt_ids, user_text), getattr(item, responses)))
            reference_rows.append((prefix_ids(tokenizer, item.prompt_ids), getattr(item, responses)))
    policy_input_ids, policy_response_mask = _pad(policy_rows, tokenizer.pad_id)  # (2B, T)
    reference_input_ids, reference_response_mask = _pad(reference_rows, tokenizer.pad_id)  # (2B, T')
    return {
        "user_rows": torch.tensor([row_of(item.user) for item in items], dtype=torch.long),
        "policy_input_ids": policy_input_ids,
        "policy_response_mask": policy_response_mask,
        "reference_input_ids": reference_input_ids,
        "reference_response_mask": reference_response_mask,
        "users": [item.user for item in items],
        "groups": [item.group for item in items],
        "index": torch.tensor([item.index for item in items], dtype=torch.long),
    }


@dataclass
class SFTExample:
    """A (prompt, response) example for supervised fine-tuning; response_ids end with EOS."""

    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def length(self) -> int:
        return 1 + len(self.prompt_ids) + len(self.response_ids)


def sft_examples_from_pairs(items: Sequence[TokenizedPair]) -> list[SFTExample]:
    """Both responses of every pair, each distinct (prompt, response) once, without user information.

    The SFT model becomes the reference model pi_ref, which should give both kinds of answer
    (e.g. long and short) a fair probability, so it learns from both sides of every pair.
    """
    seen, examples = set(), []
    for item in items:
        for response in (item.chosen_ids, item.rejected_ids):
            key = (tuple(item.prompt_ids), tuple(response))
            if key not in seen:
                seen.add(key)
                examples.append(SFTExample(item.prompt_ids, response))
    return examples


def collate_sft(items: Sequence[SFTExample], tokenizer: Tokenizer) -> dict:
    """Batch B examples as [BOS] + prompt + response(+EOS), right-padded:
    input_ids (B, T) LongTensor and response_mask (B, T), True on response tokens (the ones scored)."""
    rows = [(prefix_ids(tokenizer, item.prompt_ids), item.response_ids) for item in items]
    input_ids, response_mask = _pad(rows, tokenizer.pad_id)  # (B, T)
    return {"input_ids": input_ids, "response_mask": response_mask}


# ----------------------------------------------------------------------------------------------------
# 6a. Converter: Reddit TL;DR with conflicting length preferences (paper experiment 1)
# ----------------------------------------------------------------------------------------------------


def _is_supervised(policy: str) -> bool:
    """Summaries sampled from the supervised (SFT) policies, not from PPO ones or the CNN/DM models."""
    return "sup" in policy and "ppo" not in policy and "cnn" not in policy


def _tldr_prompt(info: dict) -> str:
    lines = []
    if info.get("subreddit"):  # absent for CNN/DM articles
        lines.append(f"SUBREDDIT: r/{info['subreddit']}")
    if info.get("title"):
        lines.append(f"TITLE: {info['title']}")
    post = info.get("post") or info.get("article") or ""
    lines.append(f"POST: {post.strip()}")
    lines.append("TL;DR:")
    return "\n".join(lines)


@dataclass
class _Comparison:
    worker: str
    prompt: str
    longer: str
    shorter: str


def _tldr_comparison(record: dict, where: str) -> _Comparison | str:
    """Parse one comparison record; return the reason as a string if it is skipped."""
    summaries, worker, info = record.get("summaries"), record.get("worker"), record.get("info")
    if not isinstance(info, dict):
        raise DataError(f"{where}: field 'info' must be an object with 'post' (or 'article') and 'title'")
    if not isinstance(worker, str):
        raise DataError(f"{where}: field 'worker' must be a string (annotator id), got {_json_type(worker)}")
    if not (
        isinstance(summaries, list)
        and len(summaries) == 2
        and all(isinstance(s, dict) and isinstance(s.get("text"), str) for s in summaries)
    ):
        raise DataError(f"{where}: field 'summaries' must be a list of two objects with 'text' and 'policy'")
    if not all(_is_supervised(str(s.get("policy", ""))) for s in summaries):
        return "not_supervised"
    a, b = (s["text"].strip() for s in summaries)
    if len(a) == len(b):
        return "equal_length"
    longer, shorter = (a, b) if len(a) > len(b) else (b, a)
    return _Comparison(worker, _tldr_prompt(info), longer, shorter)


def _tldr_split(record: dict, default: str) -> str:
    """'train', 'valid' or 'other' (e.g. 'test') from the record's 'split' field, if it has one."""
    split = record.get("split")
    if split is None:
        return default
    return "train" if split == "train" else "valid" if str(split).startswith("valid") else "other"


def _tldr_pair(c: _Comparison, group: str, prefers: str) -> Pair:
    # The reference code prepends a space to the summary, so it reads "TL;DR: text".
    chosen, rejected = (c.longer, c.shorter) if prefers == "long" else (c.shorter, c.longer)
    return Pair(user=c.worker, prompt=c.prompt, chosen=" " + chosen, rejected=" " + rejected, group=group)


# Why a record is not used, as the converter's messages say it.
_TLDR_SKIP_REASONS = {
    "not_supervised": "not both from supervised policies (e.g. PPO vs supervised, or CNN/DM models)",
    "equal_length": "summaries of equal length",
}
_TLDR_ROLES = {"train": "training", "valid": "validation", "other": "of another split (e.g. test)"}


@dataclass
class _TldrFiles:
    """What a set of comparison files held: usable comparisons per role ("train", "valid"), how many
    records went to each role ("train", "valid", "other"), and per role the skipped ones by reason."""

    comparisons: dict
    roles: Counter
    skipped: dict


def _read_tldr_comparisons(paths: Sequence, default: str, use_split_field: bool) -> _TldrFiles:
    """Read comparison files whose records are `default` ("train" or "valid") data, or go where their
    `split` field says."""
    files = _TldrFiles({"train": [], "valid": []}, Counter(), {"train": Counter(), "valid": Counter()})
    for path in paths:
        for lineno, record in _read_jsonl_objects(path):
            role = _tldr_split(record, default) if use_split_field else default
            parsed = _tldr_comparison(record, f"{path}:{lineno}")
            files.roles[role] += 1
            if role == "other":
                continue
            if isinstance(parsed, str):
                files.skipped[role][parsed] += 1
            else:
                files.comparisons[role].append(parsed)
    return files


def _no_comparisons_error(role: str, paths: Sequence, files: _TldrFiles, by_split: bool, hint: str) -> DataError:
    """Why there is nothing for `role`: where the records of `paths` went, why those of `role` were skipped."""
    word = _TLDR_ROLES[role]
    total = sum(files.roles.values())
    text = f"no {word} comparisons in {', '.join(map(str, paths))}: {total} record{'s' * (total != 1)}"
    if total:
        text += ", " + ", ".join(f"{n} {_TLDR_ROLES[r]}" for r, n in sorted(files.roles.items()) if n)
        text += " by their 'split' field" if by_split else ""
    if files.skipped[role]:
        reasons = ", ".join(f"{n} {_TLDR_SKIP_REASONS[r]}" for r, n in sorted(files.skipped[role].items()))
        text += f"; every {word} record was skipped: {reasons}"
    return DataError(f"{text}; {hint}")


def _tldr_preferences(workers: Sequence[str], p_long: float, rng: random.Random) -> dict[str, str]:
    """In the given order, each worker prefers "long" with probability p_long, else "short"."""
    return {worker: "long" if rng.random() < p_long else "short" for worker in workers}


def tldr_to_pairs(
    comparison_paths: Sequence[str | os.PathLike],
    *,
    valid_paths: Sequence[str | os.PathLike] = (),
    n_users: int = 10,
    p_long: float = 0.7,
    seed: int = 0,
    unseen_majority: bool = False,
) -> tuple[list[Pair], list[Pair], dict]:
    """The paper's "conflicting length preferences" task from `openai/summarize_from_feedback`
    comparison files (JSON Lines; records with info, summaries, worker, and optionally split).

    - Only comparisons where both summaries come from supervised policies are kept (as the reference
      code filters). Summaries of equal length in characters are skipped and counted
      (stats["skipped_equal_length"]); the reference code keeps them with the first summary chosen.
      The human's own `choice` is not used.
    - Train/valid: records of `valid_paths` are validation data and those of `comparison_paths`
      training data; without `valid_paths`, each record's `split` decides ("train" / "valid1",
      "valid2"; other splits are skipped; a record without one counts as training data).
    - Known users: the `n_users` workers with most kept training comparisons (ties by worker id).
      In sorted worker order, a seeded RNG makes each prefer the LONGER summary with probability
      `p_long`, else the SHORTER; group = "long" / "short". Chosen = the preferred summary.
    - Validation: known workers keep their id and preference. Every other worker keeps their id
      as `user` (the registry maps them to the generic user 0). As in the reference code, each gets
      their own preference from the same RNG (continued after the known workers, in sorted order),
      recorded in the group: "unseen-long" / "unseen-short". With `unseen_majority`, all of them are
      labelled with the majority preference instead (longer when p_long >= 0.5), group "unseen":
      what one policy for everyone should produce.
    - Prompt: "SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:" (lines without a
      value left out); responses are the stripped summaries with one leading space (" " + text).
    """
    by_split = not valid_paths
    train_files = _read_tldr_comparisons(comparison_paths, "train", use_split_field=by_split)
    valid_files = train_files
    if valid_paths:
        valid_files = _read_tldr_comparisons(valid_paths, "valid", use_split_field=False)
    comparisons = {"train": train_files.comparisons["train"], "valid": valid_files.comparisons["valid"]}
    if not comparisons["train"]:
        hint = "pass training files (records with split 'train', or none) with --comparisons"
        raise _no_comparisons_error("train", comparison_paths, train_files, by_split, hint)
    if not comparisons["valid"]:
        hint = "pass --valid FILE..., or files whose records have split 'valid1' or 'valid2'"
        raise _no_comparisons_error("valid", valid_paths or comparison_paths, valid_files, by_split, hint)

    counts = Counter(c.worker for c in comparisons["train"])
    known = sorted(sorted(counts, key=lambda w: (-counts[w], w))[:n_users])
    rng = random.Random(seed)
    prefers = _tldr_preferences(known, p_long, rng)
    unseen = sorted({c.worker for c in comparisons["valid"]} - set(prefers))
    majority = "long" if p_long >= 0.5 else "short"
    if unseen_majority:
        unseen_prefers = dict.fromkeys(unseen, majority)
    else:
        unseen_prefers = _tldr_preferences(unseen, p_long, rng)

    def label(c: _Comparison) -> Pair:
        if c.worker in prefers:
            return _tldr_pair(c, group=prefers[c.worker], prefers=prefers[c.worker])
        preference = unseen_prefers[c.worker]
        return _tldr_pair(c, group="unseen" if unseen_majority else f"unseen-{preference}", prefers=preference)

    train = [label(c) for c in comparisons["train"] if c.worker in prefers]
    valid = [label(c) for c in comparisons["valid"]]
    all_skipped = train_files.skipped["train"] + valid_files.skipped["valid"]
    all_skipped["other_split"] = train_files.roles["other"]
    stats = {
        "train": len(train),
        "valid": len(valid),
        "known_users": len(known),
        "long_users": sum(p == "long" for p in prefers.values()),
        "unseen_users": len(unseen),
        "unseen_long_users": sum(p == "long" for p in unseen_prefers.values()),
        "unused_train_comparisons": len(comparisons["train"]) - len(train),
        **{f"skipped_{r}": all_skipped[r] for r in ("not_supervised", "equal_length", "other_split")},
    }
    return train, valid, stats


# ----------------------------------------------------------------------------------------------------
# 6b. Converter: Personalized Soups (paper experiment 2)
# ----------------------------------------------------------------------------------------------------

# The preference instruction appended to each P-SOUPS question, per user (profile); the released
# data and code spell P2A/P2B both with and without a comma.
PSOUPS_PREFERENCES = {
    "P1A": ("Generate a response that can be easily understood by an elementary school student.",),
    "P1B": ("Generate a response that only a PhD Student in that specific field could understand.",),
    "P2A": (
        "Generate a response that is concise and to the point, without being verbose.",
        "Generate a response that is concise and to the point without being verbose.",
    ),
    "P2B": (
        "Generate a response that is very informative, without missing any background information.",
        "Generate a response that is very informative without missing any background information.",
    ),
    "P3A": ("Generate a response that is friendly, witty, funny, and humorous, like a close friend.",),
    "P3B": ("Generate a response in an unfriendly manner.",),
}


def _remove_preference(user_input: str, user: str) -> tuple[str, bool]:
    """The question without its preference sentence; True if the known sentence was not found and
    the last sentence was dropped instead (when there is more than one)."""
    text = user_input.strip()
    for sentence in PSOUPS_PREFERENCES[user]:
        if sentence in text:
            return text.replace(sentence, "", 1).strip(), False
    boundaries = list(re.finditer(r"(?<=[.!?])\s+(?=\S)", text))
    return (text[: boundaries[-1].start()] if boundaries else text), True


def _read_psoups_records(path: Path) -> list[dict]:
    """A JSON list of records, or JSON Lines (both appear in copies of the data)."""
    if not path.exists():
        raise DataError(f"{path}: file not found (expected P1A.json .. P3B.json of P-SOUPS data/rm_training)")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got a {_json_type(records)}")
        where = [f"{path}: record {i}" for i in range(len(records))]
    else:
        numbered = list(_read_jsonl_objects(path))
        records, where = [r for _, r in numbered], [f"{path}:{n}" for n, _ in numbered]
    for record, place in zip(records, where):
        for field in ("user_input", "completion_a", "completion_b"):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(
                    f"{place}: needs string fields user_input, completion_a (preferred), completion_b"
                )
    return records


def psoups_to_pairs(
    rm_training_dir: str | os.PathLike, *, seed: int = 0, valid_fraction: float = 0.1
) -> tuple[list[Pair], list[Pair], dict]:
    """Personalized Soups comparisons from `rm_training_dir/{P1A,...,P3B}.json` (records with
    user_input, completion_a = preferred, completion_b).

    Users are the six profiles P1A..P3B (group = the same name). The preference sentence is removed
    from each question (known sentences in PSOUPS_PREFERENCES; otherwise the last sentence, counted
    in stats["fallback_removals"]), so the preference must be learned from feedback. Prompt format
    of Tulu: "<|user|>\\n{question}\\n<|assistant|>\\n". Duplicates (same user, prompt, chosen,
    rejected) are removed. The split is seeded and by question: `valid_fraction` of the distinct
    questions, with all their pairs, go to validation, so no validation question is seen in training.
    """
    pairs, fallbacks, duplicates, seen = [], 0, 0, set()
    for user in PSOUPS_PREFERENCES:
        for record in _read_psoups_records(Path(rm_training_dir) / f"{user}.json"):
            question, fell_back = _remove_preference(record["user_input"], user)
            fallbacks += fell_back
            pair = Pair(
                user=user,
                prompt=f"<|user|>\n{question}\n<|assistant|>\n",
                chosen=record["completion_a"].strip(),
                rejected=record["completion_b"].strip(),
                group=user,
            )
            key = (pair.user, pair.prompt, pair.chosen, pair.rejected)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            pairs.append(pair)

    questions = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(questions)
    valid_questions = set(questions[: round(valid_fraction * len(questions))])
    train = [p for p in pairs if p.prompt not in valid_questions]
    valid = [p for p in pairs if p.prompt in valid_questions]
    stats = {
        "train": len(train),
        "valid": len(valid),
        "questions": len(questions),
        "valid_questions": len(valid_questions),
        "duplicates_removed": duplicates,
        "fallback_removals": fallbacks,
    }
    return train, valid, stats


# ----------------------------------------------------------------------------------------------------
# 6c. Converter: PRISM (paper experiment 3, v3): real users, their survey, multi-turn conversations
# ----------------------------------------------------------------------------------------------------

# The eight rated attributes of survey.jsonl's `stated_prefs` (0-100 sliders, "It is important that an
# AI language model ..."); "other" (always shown last, with free text in other_text) is left out.
PRISM_ATTRIBUTES = (
    "values", "creativity", "fluency", "factuality", "diversity", "safety", "personalisation", "helpfulness",
)
# Survey fields of the user text after the stated preferences, in the reference code's order.
# system_string, the participant's own instruction to a model, is left out, as there.
PRISM_PROFILE = (
    ("self_description", "Self-description"), ("age", "Age"), ("gender", "Gender"), ("education", "Education"),
    ("employment_status", "Employment"), ("marital_status", "Marital status"),
    ("english_proficiency", "English proficiency"),
)
PRISM_EMPTY = "EMPTY STRING"  # how PRISM stores an empty model response
# Llama 3 chat messages, as the reference code writes its PRISM prompts.
_CHAT_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_CHAT_END = "<|eot_id|>\n"

_JSON_KINDS = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}


def _field(obj: dict, name: str, kind: str, where: str):
    """obj[name] if it is a JSON value of `kind` (a key of _JSON_KINDS), else a DataError naming `where`."""
    value = obj.get(name)
    if not _JSON_KINDS[kind](value):
        got = _json_type(value) if name in obj else "nothing (the field is missing)"
        raise DataError(f"{where}: field {name!r} must be a{'n' * (kind[0] in 'aeiou')} {kind}, got {got}")
    return value


def _prism_stated_prefs(survey: dict, where: str, rule: str) -> list[str]:
    """The three attributes the user text names. "top-rated": the three the user rated highest (ties: the
    one shown first). "shown-first", the reference code's: order_stated_prefs 1-3, in the order shown,
    which the codebook says is a random display order, not a ranking."""
    ratings = _field(survey, "stated_prefs", "object", where)
    order = _field(survey, "order_stated_prefs", "object", where)
    for attribute in PRISM_ATTRIBUTES:
        _field(ratings, attribute, "number", f"{where}: stated_prefs")
        _field(order, attribute, "integer", f"{where}: order_stated_prefs")
    if rule == "shown-first":
        return sorted((a for a in PRISM_ATTRIBUTES if order[a] <= 3), key=order.get)
    return sorted(PRISM_ATTRIBUTES, key=lambda a: (-ratings[a], order[a]))[:3]


def prism_user_text(survey: dict, where: str, stated_prefs: str = "top-rated") -> str:
    """A fixed English rendering of one survey.jsonl record, one line per field; empty fields are left out:

        User information:
        Stated preferences: factuality, helpfulness, safety
        Self-description: ...
        Age: 25-34 years old
        ... Gender, Education, Employment, Marital status, English proficiency
    """
    preferences = ", ".join(_prism_stated_prefs(survey, where, stated_prefs))
    lines = ["User information:", f"Stated preferences: {preferences}"]
    for name, label in PRISM_PROFILE:
        if survey.get(name) is not None and _field(survey, name, "string", where).strip():
            lines.append(f"{label}: {survey[name].strip()}")
    return "\n".join(lines) + "\n"


def _read_prism_survey(path: Path, stated_prefs: str) -> dict[str, str]:
    """user_id -> user text, for participants who went on to the conversations."""
    texts = {}
    for lineno, survey in _read_jsonl_objects(path):
        where = f"{path}:{lineno}"
        user = _field(survey, "user_id", "string", where)
        if survey.get("num_completed_conversations") != 0:  # 0: survey only, never in conversations.jsonl
            texts[user] = prism_user_text(survey, where, stated_prefs)
    return texts


@dataclass
class _PrismResponse:
    content: str
    score: float
    chosen: bool  # if_chosen: rated highest by the user (ties broken at random by PRISM)


@dataclass
class _PrismTurn:
    user: str | None  # the user's message
    responses: list[_PrismResponse]


def _prism_turns(conversation: dict, where: str) -> list[_PrismTurn]:
    """conversation_history grouped by `turn`, in turn order; each turn needs one user message."""
    turns: dict[int, _PrismTurn] = {}
    for i, message in enumerate(_field(conversation, "conversation_history", "list", where)):
        at = f"{where}: conversation_history[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at}: expected an object with turn, role, content, got a {_json_type(message)}")
        turn = turns.setdefault(_field(message, "turn", "integer", at), _PrismTurn(None, []))
        content, role = _field(message, "content", "string", at), message.get("role")
        if role == "user":
            turn.user = content
        elif role == "model":
            score, chosen = _field(message, "score", "number", at), _field(message, "if_chosen", "boolean", at)
            turn.responses.append(_PrismResponse(content, score, chosen))
        else:
            raise DataError(f"{at}: field 'role' must be 'user' or 'model', got {role!r}")
    for number, turn in turns.items():
        if turn.user is None:
            raise DataError(f"{where}: turn {number} has no message with role 'user'")
    return [turns[t] for t in sorted(turns)]


def _is_empty(text: str) -> bool:
    return text.strip() in ("", PRISM_EMPTY)


def _prism_choice(turn: _PrismTurn, counts: Counter) -> tuple[_PrismResponse | None, list[_PrismResponse]]:
    """(chosen, rejected responses) of a turn. Chosen = the response with if_chosen (the best scored if
    several have it); rejected = each other response, except ties in score and empty responses."""
    flagged = [r for r in turn.responses if r.chosen]
    if not flagged:
        counts["turns_without_chosen"] += 1
        return None, []
    counts["turns_several_chosen"] += len(flagged) > 1
    chosen = max(flagged, key=lambda r: r.score)  # the first of equals
    rejected = []
    for response in turn.responses:
        if response is chosen:
            continue
        if _is_empty(chosen.content) or _is_empty(response.content):
            counts["skipped_empty"] += 1
        elif response.score == chosen.score:
            counts["skipped_tie"] += 1
        else:
            rejected.append(response)
    return chosen, rejected


def _chat(role: str, content: str) -> str:
    return _CHAT_HEADER.format(role=role) + content + _CHAT_END


def _prism_prompt(earlier: str, user_message: str, budget: int) -> tuple[str, bool]:
    """(prompt, whether it was cut): the conversation so far ending with the assistant header. `earlier`
    (previous user messages and chosen replies) is cut from the LEFT to fit `budget` characters,
    mid-message if need be, as the reference code does; the current user message is always kept whole."""
    current = _chat("user", user_message) + _CHAT_HEADER.format(role="assistant")
    room = max(budget - len(current), 0)
    kept = earlier[max(len(earlier) - room, 0):] if room else ""
    return kept + current, len(kept) < len(earlier)


def _prism_conversation_pairs(conversation: dict, where: str, user: str, user_text: str, budget: int,
                              counts: Counter) -> list[Pair]:
    """The pairs of one conversation, turn by turn; the chosen reply joins the history of later turns."""
    pairs, earlier = [], ""
    for turn in _prism_turns(conversation, where):
        counts["turns"] += 1
        chosen, rejected = _prism_choice(turn, counts)
        prompt, cut = _prism_prompt(earlier, turn.user, budget)
        counts["prompts_cut"] += cut and bool(rejected)
        pairs += [Pair(user, prompt, chosen.content, r.content, user_text=user_text) for r in rejected]
        earlier += _chat("user", turn.user)
        if chosen is not None:
            earlier += _chat("assistant", "" if _is_empty(chosen.content) else chosen.content)
    return pairs


def _prism_split(by_user: dict[str, list[list[Pair]]], seed: int, seen_fraction: float,
                 train_fraction: float) -> tuple[list[Pair], list[Pair], Counter]:
    """The reference code's split, seeded: int(seen_fraction * users) users, shuffled, are seen, and
    int(train_fraction * k) of each one's k conversations, shuffled, go to training, the rest to
    validation. A seen user with one conversation would train on none (int(0.9) = 0), so is unseen,
    as the reference code makes them. Unseen users appear only in validation. Sets group "seen" / "unseen"."""
    rng = random.Random(seed)
    users = sorted(by_user)
    rng.shuffle(users)
    drawn = users[: int(seen_fraction * len(users))]
    seen = {u for u in drawn if len(by_user[u]) > 1}
    train, valid = [], []
    for user in users:
        conversations = list(by_user[user])
        n_train = 0
        if user in seen:
            rng.shuffle(conversations)
            n_train = int(train_fraction * len(conversations))
        for i, pairs in enumerate(conversations):
            for pair in pairs:
                pair.group = "seen" if user in seen else "unseen"
            (train if i < n_train else valid).extend(pairs)
    counts = Counter(users_seen=len(seen), users_unseen=len(users) - len(seen),
                     unseen_with_one_conversation=len(drawn) - len(seen))
    return train, valid, counts


def prism_to_pairs(
    prism_dir: str | os.PathLike,
    *,
    stated_prefs: str = "top-rated",
    max_prompt_chars: int = 1500,
    seed: int = 0,
    seen_fraction: float = 0.9,
    train_fraction: float = 0.9,
) -> tuple[list[Pair], list[Pair], dict]:
    """PRISM (HannahRoseKirk/prism-alignment) from `prism_dir/survey.jsonl` and `conversations.jsonl`,
    built as the reference code builds its PRISM task, with the departures stated here.

    - user = user_id; user_text = prism_user_text of the user's survey (stated preferences by
      `stated_prefs`: "top-rated", or the reference code's "shown-first"; see _prism_stated_prefs).
    - One pair per turn and rejected response: chosen = the response with if_chosen, rejected = each
      other response of the turn (up to 3 at turn 0, 1 later). Ties in score and responses stored as
      "EMPTY STRING" are skipped (the reference code keeps both) and counted.
    - Prompt: earlier user messages and chosen replies, then the current user message, in Llama 3
      chat format ending with "<|start_header_id|>assistant<|end_header_id|>\\n\\n", cut from the left
      so that user text + prompt fit `max_prompt_chars` (see _prism_prompt): implicit, explicit and
      both runs then see the same prompts. The reference code's 1500 characters are about 500 tokens.
    - Split by _prism_split; conversations without any pair are dropped first (counted).
    Returns train, valid (pairs with group "seen" / "unseen") and counts.
    """
    if stated_prefs not in ("top-rated", "shown-first"):
        raise ValueError(f"stated_prefs={stated_prefs!r}: expected 'top-rated' or 'shown-first'")
    directory = Path(prism_dir)
    for name in ("survey.jsonl", "conversations.jsonl"):
        if not (directory / name).is_file():
            raise DataError(
                f"{directory / name}: file not found (expected PRISM's survey.jsonl and conversations.jsonl)"
            )
    texts = _read_prism_survey(directory / "survey.jsonl", stated_prefs)
    counts, by_user = Counter(), {}
    path = directory / "conversations.jsonl"
    for lineno, conversation in _read_jsonl_objects(path):
        where = f"{path}:{lineno}"
        user = _field(conversation, "user_id", "string", where)
        if user not in texts:
            raise DataError(f"{where}: user_id {user!r} has no survey in {directory / 'survey.jsonl'} "
                            f"(or one with num_completed_conversations 0)")
        budget = max_prompt_chars - len(texts[user])
        pairs = _prism_conversation_pairs(conversation, where, user, texts[user], budget, counts)
        counts["conversations"] += 1
        if pairs:
            by_user.setdefault(user, []).append(pairs)
        else:
            counts["conversations_without_pairs"] += 1
    if not by_user:
        raise DataError(f"{path}: no usable pairs in {counts['conversations']} conversations "
                        f"({counts['skipped_tie']} ties, {counts['skipped_empty']} empty responses skipped)")
    train, valid, split_counts = _prism_split(by_user, seed, seen_fraction, train_fraction)
    counts.update(split_counts)
    stats = {"train": len(train), "valid": len(valid),
             "valid_unseen": sum(p.group == "unseen" for p in valid)}
    names = ("users_seen", "users_unseen", "unseen_with_one_conversation", "conversations",
             "conversations_without_pairs", "turns", "turns_without_chosen", "turns_several_chosen",
             "skipped_tie", "skipped_empty", "prompts_cut")
    return train, valid, {**stats, **{name: counts[name] for name in names}}


# ----------------------------------------------------------------------------------------------------
# 7. Built-in toy task: conflicting length preferences without any download
# ----------------------------------------------------------------------------------------------------

_NOUNS = """apple river stone cloud garden bread forest candle mountain window ocean bridge lantern pencil
rabbit violin desert castle meadow harbor island market needle orchard piano planet pocket rocket saddle
shadow tunnel valley wagon kitten ladder mirror basket blanket button cabin camera canyon carpet cherry
compass cookie cotton dragon engine feather fountain glacier guitar hammer helmet honey insect jacket
jungle kettle lemon magnet marble melon muffin museum napkin noodle orange paddle parrot pebble pepper
pillow pirate puzzle quilt radio ribbon robot salad scooter spider spoon statue sugar teapot ticket
tomato towel tractor trumpet turtle umbrella village walnut whistle wizard zebra""".split()
_ADJECTIVES = """bright calm quiet gentle heavy ancient modern tiny huge warm cold soft rough smooth sharp
golden green purple noisy silent happy clever brave lazy busy famous simple strange useful lovely shiny
dusty sweet bitter fresh humble proud rare wild tidy fancy plain spicy sleepy curious""".split()

_PROMPTS = (
    "Tell me about the {x}.",
    "What is the {x} like?",
    "Describe the {x}.",
    "Say something about the {x}.",
)
# Both answers open alike, "The {x} is {a}.", then part at one decision: stop (EOS), or go on with
# "There is much more ...", deterministically, so a length preference is learned at that decision.
# (Opening the answers with different words that occur nowhere else, say "Briefly," / "Well,", fails
# on a tiny model: SFT never tells those two embeddings apart, and DPO lowers both together.)
_SHORT = "The {x} is {a}."  # 4 words
_LONG = "The {x} is {a}. There is much more to say about the {x} today."  # 14 words


# The second toy task: one answer in three styles, told apart by one style word in its middle, all as
# long as each other: a preference that is not about length. (With a second style word at the end, the
# demo's P-DPO often answered "indeed ... forever": DPO can win a pair's margin at the second word by
# making the rejected answer's own continuation unlikely, which leaves the first decision unlearned.)
_STYLES = {
    "formal": "The {x} is {a}, indeed, and the {x} remains {a}.",
    "casual": "The {x} is {a}, like, and the {x} remains {a}.",
    "poetic": "The {x} is {a}, alas, and the {x} remains {a}.",
}
TOY_KINDS = {"length": {"short": _SHORT, "long": _LONG}, "style": _STYLES}  # task -> answer kind -> template


def _toy_example(rng: random.Random, task: str = "length") -> tuple[str, dict[str, str]]:
    """(prompt, {answer kind: response}) about a random topic."""
    x, a = rng.choice(_NOUNS), rng.choice(_ADJECTIVES)
    prompt = rng.choice(_PROMPTS).format(x=x)
    return prompt, {kind: template.format(x=x, a=a) for kind, template in TOY_KINDS[task].items()}


def toy_answer_kind(task: str, topic: str, response: str) -> str | None:
    """Which kind of `task`'s answers `response` is, about `topic` (the x of "The {x} is ..."), with any
    of the task's adjectives; None for anything else (a broken answer: empty, cut, repeated words)."""
    for kind, template in TOY_KINDS[task].items():
        pattern = re.escape(template).replace(re.escape("{x}"), re.escape(topic))
        pattern = pattern.replace(re.escape("{a}"), r"(?P<a>\w+)", 1).replace(re.escape("{a}"), r"(?P=a)")
        match = re.fullmatch(pattern, response.strip())
        if match and match["a"] in _ADJECTIVES:
            return kind
    return None


def toy_topic(answer: str) -> str:
    """The x of a toy answer "The {x} is ..."."""
    match = re.match(r"\s*The (\w+) is", answer)
    if match is None:
        raise ValueError(f"{answer!r}: not an answer of the toy tasks")
    return match[1]


def _toy_pairs(rng: random.Random, users: dict[str, str], n_per_user: int, group: str | None,
               task: str = "length") -> list[Pair]:
    """`n_per_user` pairs per user, chosen by the user's preference (rejected: another kind, drawn
    when there are several); group=None labels each pair with the preferred kind."""
    pairs = []
    for user, prefers in users.items():
        for _ in range(n_per_user):
            prompt, answers = _toy_example(rng, task)
            others = [kind for kind in answers if kind != prefers]
            rejected = others[0] if len(others) == 1 else rng.choice(others)
            pairs.append(Pair(user, " " + prompt, " " + answers[prefers], " " + answers[rejected],
                              group=group or prefers))
    return pairs


def _assign_preferences(names: list[str], minority_share: float, rng: random.Random) -> dict[str, str]:
    """Exactly round(minority_share * len(names)) users, chosen at random, prefer short answers."""
    minority = set(rng.sample(names, round(minority_share * len(names))))
    return {name: "short" if name in minority else "long" for name in names}


def make_toy_task(
    seed: int = 0,
    n_users: int = 10,
    minority_share: float = 0.3,
    pairs_per_user: int = 60,
    n_valid_per_user: int = 20,
    n_unseen_users: int = 4,
) -> tuple[list[Pair], list[Pair]]:
    """A synthetic version of the paper's conflicting length preferences, deterministic in `seed`.

    Prompts ask about a topic ("Tell me about the kettle."); each pair holds a SHORT answer
    ("The kettle is warm.", 4 words) and a LONG one ("The kettle is warm. There is much more ...", 14 words).
    Known users user_01.. are split
    exactly: round(minority_share * n_users) prefer short (group "short", the minority), the rest
    long (group "long"). Validation holds `n_valid_per_user` new pairs per known user, plus as many
    for each of `n_unseen_users` users new_01.. (never in training, group "unseen"), split between
    long and short in the same proportion as the known users.
    Texts start with a space so a byte-level BPE sees every word in its " word" form. With a BPE of
    vocab_size 768 trained on `toy_corpus_texts`, the longest row is about 40 tokens (400: about 67).
    """
    rng = random.Random(seed)
    known = _assign_preferences([f"user_{i:02d}" for i in range(1, n_users + 1)], minority_share, rng)
    unseen = _assign_preferences([f"new_{i:02d}" for i in range(1, n_unseen_users + 1)], minority_share, rng)
    train = _toy_pairs(rng, known, pairs_per_user, group=None)
    valid = _toy_pairs(rng, known, n_valid_per_user, group=None)
    valid += _toy_pairs(rng, unseen, n_valid_per_user, group="unseen")
    return train, valid


def _assign_shares(names: list[str], shares: dict[str, float], rng: random.Random) -> dict[str, str]:
    """Users in random order, then round(share * n) of them per kind in the order given (the last
    kind takes the rest)."""
    order, out, start = rng.sample(names, len(names)), {}, 0
    for i, (kind, share) in enumerate(shares.items()):
        stop = len(names) if i == len(shares) - 1 else start + round(share * len(names))
        out.update({name: kind for name in order[start:stop]})
        start = stop
    return dict(sorted(out.items()))


STYLE_SHARES = {"formal": 0.5, "casual": 0.3, "poetic": 0.2}


def make_style_task(
    seed: int = 0,
    n_users: int = 10,
    shares: dict[str, float] = STYLE_SHARES,
    pairs_per_user: int = 60,
    n_valid_per_user: int = 20,
    n_unseen_users: int = 4,
) -> tuple[list[Pair], list[Pair]]:
    """A second toy task, three groups of unequal size that want one answer in different styles.

    "The kettle is warm, indeed, and the kettle remains warm." (formal, 50% of users), "..., like, ..."
    (casual, 30%), "..., alas, ..." (poetic, 20%): every answer has 10 words, and the style word comes
    after the opening. Each pair's rejected answer is one of the two other
    styles. Known users user_01.. get exact shares (groups = their style); validation as make_toy_task,
    with unseen users new_01.. (group "unseen") in the same proportions.
    """
    rng = random.Random(seed)
    known = _assign_shares([f"user_{i:02d}" for i in range(1, n_users + 1)], shares, rng)
    unseen = _assign_shares([f"new_{i:02d}" for i in range(1, n_unseen_users + 1)], shares, rng)
    train = _toy_pairs(rng, known, pairs_per_user, group=None, task="style")
    valid = _toy_pairs(rng, known, n_valid_per_user, group=None, task="style")
    valid += _toy_pairs(rng, unseen, n_valid_per_user, group="unseen", task="style")
    return train, valid


TOY_TASKS = {"length": make_toy_task, "style": make_style_task}


def toy_corpus_texts(seed: int = 0, n_examples: int = 2000, task: str = "length") -> list[str]:
    """Prompts and answers written like the toy task's (with leading spaces), plus every word once,
    to train the toy BPE tokenizer."""
    rng = random.Random(seed)
    texts = [" " + " ".join(_NOUNS + _ADJECTIVES)]
    for _ in range(n_examples):
        prompt, answers = _toy_example(rng, task)
        texts.extend(" " + text for text in (prompt, *answers.values()))
    return texts


# ----------------------------------------------------------------------------------------------------
# 7b. Built-in instructions for a real chat model (train.py --example smollm2): written here, no download
# ----------------------------------------------------------------------------------------------------

_SUBJECTS = ["the moon", "rain", "coffee", "bicycles", "libraries", "volcanoes", "honey bees", "the ocean",
             "bread", "winter", "trains", "chess", "gardening", "the piano", "deserts", "owls", "recycling",
             "maps", "tea", "mountains", "clocks", "football", "penguins", "electricity", "soap", "rivers",
             "cheese", "the internet", "snow", "birthdays", "museums", "candles", "friendship", "bridges",
             "rainbows", "cats", "dogs", "apples", "the sun", "umbrellas", "books", "forests", "music", "kites"]
_INSTRUCTIONS = ["Tell me about {}.", "What is interesting about {}?", "Describe {}.", "Why do people like {}?",
                 "Give me a fact about {}.", "How would you explain {} to a child?", "What should I know about {}?",
                 "Write a few words about {}."]
# Hidden from the preference data: appended to the question only when sampling, so that each prompt gets
# one short and one long answer written by the model itself (like the paper's SFT summaries of one post).
LENGTH_HINTS = {"short": " Answer in one short sentence.", "long": " Answer in detail, in a few sentences."}
_SENTENCE_END = re.compile(r"[A-Za-z)\"'%][.!?](?=\s|$)")  # "word." ends a sentence; "1." of a list does not


def whole_sentences(text: str) -> str:
    """`text` up to its last complete sentence ("" if it has none): an answer cut by a token limit ends
    where a sentence ends, not mid-word, so the preferred long answers teach stopping, not breaking off."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


def make_instructions(n: int, seed: int = 0) -> list[str]:
    """n distinct instructions from templates x subjects (352 in all), in a seeded order."""
    pool = [t.format(s) for t in _INSTRUCTIONS for s in _SUBJECTS]
    if n > len(pool):
        raise ValueError(f"asked for {n} instructions; the templates make {len(pool)}")
    return random.Random(seed).sample(pool, n)


def chatml(question: str, system: str = "You are a helpful assistant.") -> str:
    """A one-turn ChatML prompt, SmolLM2's (and Qwen's) chat template, ending where the assistant answers:

        <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n
    """
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def length_preference_pairs(samples: list[dict], users: dict[str, str], seed: int = 0, judges: int = 1,
                            balanced: bool = False, group_prefix: str = "") -> list[Pair]:
    """Pairs of the paper's experiment 1 from sampled answers: each user prefers their group's length.

    samples: {"question", "prompt", "short", "long"}; users: name -> "long" or "short". Each sample is judged
    by `judges` distinct users drawn at random (seeded), so groups keep their share of the pairs and users of
    both groups often judge the same prompt in opposite ways: a model cannot fit the pairs from the prompt
    alone, only from who asks. balanced=True takes one user of each group instead, in turn (held-out pairs
    on which both groups are measured). The preferred answer is the user's kind, the other one is rejected;
    the pair's group is group_prefix + kind (e.g. "unseen-long").
    """
    rng = random.Random(seed)
    names = sorted(users)
    by_group = {g: [u for u in names if users[u] == g] for g in ("long", "short")}
    pairs = []
    for turn, sample in enumerate(samples):
        if balanced:
            chosen_users = [by_group[g][turn % len(by_group[g])] for g in ("long", "short") if by_group[g]]
        else:
            chosen_users = rng.sample(names, judges)
        for user in chosen_users:
            kind = users[user]
            other = "short" if kind == "long" else "long"
            pairs.append(Pair(user=user, prompt=sample["prompt"], chosen=sample[kind], rejected=sample[other],
                              group=group_prefix + kind))
    return pairs


# ----------------------------------------------------------------------------------------------------
# 8. Command line
# ----------------------------------------------------------------------------------------------------


def _write_split(out_dir: str, train: list[Pair], valid: list[Pair]) -> None:
    for name, pairs in (("train", train), ("valid", valid)):
        path = Path(out_dir) / f"{name}.jsonl"
        write_pairs(path, pairs)
        print(f"wrote {path}: {describe_pairs(pairs)}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Personalized preference data: check, convert, toy task.")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a JSON Lines file of pairs and print counts")
    check.add_argument("file")

    toy = sub.add_parser("toy", help="write the built-in toy task (train.jsonl, valid.jsonl)")
    toy.add_argument("--out", required=True, help="output directory")
    toy.add_argument("--seed", type=int, default=0)

    tldr = sub.add_parser("tldr", help="summarize_from_feedback comparisons -> conflicting length preferences")
    tldr.add_argument("--comparisons", nargs="+", required=True, help="comparison JSON Lines files (training)")
    tldr.add_argument("--valid", nargs="*", default=[], help="validation files; default: each record's 'split'")
    tldr.add_argument("--out", required=True, help="output directory")
    tldr.add_argument("--n-users", type=int, default=10, help="known users = top workers by count (paper: 10, 40)")
    tldr.add_argument("--p-long", type=float, default=0.7, help="chance a known user prefers longer summaries")
    tldr.add_argument("--seed", type=int, default=0)
    tldr.add_argument("--unseen-majority", action="store_true", help=(
        "label every unseen validation worker with the majority preference (group 'unseen'); default, as the "
        "reference code: each their own random preference with --p-long (groups 'unseen-long', 'unseen-short')"))

    psoups = sub.add_parser("psoups", help="Personalized Soups rm_training/P1A.json..P3B.json -> pairs")
    psoups.add_argument("--dir", required=True, help="the P-SOUPS data/rm_training directory")
    psoups.add_argument("--out", required=True, help="output directory")
    psoups.add_argument("--seed", type=int, default=0)

    prism = sub.add_parser("prism", help="PRISM survey.jsonl + conversations.jsonl -> pairs with user text")
    prism.add_argument("--dir", required=True, help="folder with PRISM's survey.jsonl and conversations.jsonl")
    prism.add_argument("--out", required=True, help="output directory")
    prism.add_argument("--stated-prefs", choices=["top-rated", "shown-first"], default="top-rated", help=(
        "which three stated_prefs attributes the user text names: top-rated (default), the three the user "
        "rated highest; shown-first, the reference code's, the three shown first (order_stated_prefs 1-3, "
        "a random display order per PRISM's codebook, not a ranking)"))
    prism.add_argument("--max-prompt-chars", type=int, default=1500, help=(
        "characters of user text + prompt (the reference code's 1500, about 500 tokens); earlier turns are cut "
        "from the left, the current user message is kept whole"))
    prism.add_argument("--seed", type=int, default=0, help="seed of the user and conversation split")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "check":
            print(f"{args.file}: {describe_pairs(read_pairs(args.file))}")
            return 0
        stats = {}
        if args.command == "toy":
            train, valid = make_toy_task(seed=args.seed)
        elif args.command == "tldr":
            train, valid, stats = tldr_to_pairs(
                args.comparisons, valid_paths=args.valid, n_users=args.n_users, p_long=args.p_long,
                seed=args.seed, unseen_majority=args.unseen_majority,
            )
        elif args.command == "psoups":
            train, valid, stats = psoups_to_pairs(args.dir, seed=args.seed)
        else:
            train, valid, stats = prism_to_pairs(
                args.dir, stated_prefs=args.stated_prefs, max_prompt_chars=args.max_prompt_chars, seed=args.seed
            )
        if stats:
            print(", ".join(f"{k} {v}" for k, v in stats.items()))
        _write_split(args.out, train, valid)
        return 0
    except (DataError, OSError) as e:  # a person's input problem: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
