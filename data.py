"""Data for Personalized RLHF: from text files to padded tensors.

Implements the "Data" and "Personalized LM" sections of PAPER.md (Li, Zhou, Lipton, Leqi,
*Personalized Language Modeling from Personalized Human Feedback*, arXiv 2402.05133):
personalized preference tuples (u, x, y_w, y_l) and the sequence layouts

    policy:     [BOS] [user text, if any] [prompt] [response] [EOS]   (prlhf.py inserts e_u after BOS)
    reference:  [BOS] [prompt] [response] [EOS]                       (never sees user information)

In reading order:
  0. Files          read_text, read_json; they and the JSON Lines readers accept a UTF-8 byte-order mark and CRLF
  1. Tokenizer      load_tokenizer, train_bpe_tokenizer (a thin wrapper over the `tokenizers` library)
  2. Pairs          one JSON object per line: {"user", "prompt", "chosen", "rejected"[, "user_text", "group"]}
  3. Tokenization   tokenize_pairs, with the truncation policy stated in its docstring
  4. Batching       make_batches: length-bucketed, seeded, shardable
  5. Collate        collate_pairs (P-DPO / P-RM) and collate_sft (supervised fine-tuning)
  6. Command line   python data.py check FILE (its parser: cli.py)

The paper's datasets are converted by prepare/ (python -m prepare.tldr, .psoups, .prism); the built-in toy
tasks and the SmolLM2 experiment live in examples/.
Only `tokenizers`, `numpy` and `torch` are used; nothing here touches the network.
"""

import codecs
import contextlib
import json
import os
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

import cli


class DataError(ValueError):
    """A problem with an input file, stated in one line: `FILE:LINE: what is wrong and what would work`."""


# Files as people save them: a UTF-8 byte-order mark (written by several Windows editors and spreadsheet
# exports) and CRLF line ends are accepted everywhere; what is really wrong is one line naming file and line.


def _unreadable(path, e: OSError) -> DataError:
    reasons = {FileNotFoundError: "file not found", IsADirectoryError: "is a directory, expected a file"}
    return DataError(f"{path}: {reasons.get(type(e)) or f'cannot be read ({e.strerror or e})'}")


def _decode(raw: bytes, path, lineno: int) -> str:
    """UTF-8 bytes from line `lineno` of `path` on, without a leading byte-order mark."""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = lineno + raw.count(b"\n", 0, e.start), e.start - raw.rfind(b"\n", 0, e.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                        f"save the file as UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file (a byte-order mark dropped); DataError if missing, a directory or not UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise _unreadable(path, e) from None
    return _decode(raw, path, 1)


def read_json(path: str | os.PathLike):
    """The JSON value a file holds (read_text's rules); DataError naming file:line where it is not JSON."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty file, expected JSON")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}: column {e.colno})") from None


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
            _write_atomically((directory / name, (Path(self.source) / name).read_text(encoding="utf-8")))
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
        _write_atomically((directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n"))


# Files of a Hugging Face checkpoint that describe its tokenizer and how it is prompted, besides tokenizer.json.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "generation_config.json")


def _read_json_if_present(path: Path) -> dict:
    if not path.exists():
        return {}
    value = read_json(path)
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
    text = read_text(path)  # not from_file: it refuses a UTF-8 byte-order mark
    try:
        backend = BackendTokenizer.from_str(text)
    except Exception as e:  # the tokenizers library's own errors: truncated or not a tokenizer at all
        raise DataError(f"{path}: not a readable tokenizer.json ({e})") from None
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


def read_jsonl_objects(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; raise DataError at the first bad line.
    Lines may end in LF or CRLF, and start with a byte-order mark (files joined with `cat` keep theirs)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _unreadable(path, e) from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}: column {e.colno}); "
                    f"each line must hold one complete JSON object"
                ) from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object {{...}}, got a {json_type(value)}")
            yield lineno, value


def read_jsonl_records(path: str | os.PathLike, what: str) -> list[tuple[int, dict]]:
    """read_jsonl_objects as a list; DataError for a file without any (`what` names them: "pairs")."""
    records = list(read_jsonl_objects(path))
    if not records:
        raise DataError(f"{path}: no {what} found (the file is empty or has only blank lines)")
    return records


def json_type(value) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


_JSON_KINDS = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}


def json_field(obj: dict, name: str, kind: str, where: str):
    """obj[name] if it is a JSON value of `kind` (a key of _JSON_KINDS), else a DataError naming `where`."""
    value = obj.get(name)
    if not _JSON_KINDS[kind](value):
        got = json_type(value) if name in obj else "nothing (the field is missing)"
        raise DataError(f"{where}: field {name!r} must be a{'n' * (kind[0] in 'aeiou')} {kind}, got {got}")
    return value


def _pair_from_object(obj: dict, where: str) -> Pair:
    for field in PAIR_FIELDS:
        if field not in obj:
            raise DataError(f"{where}: missing field {field!r} (every line needs {', '.join(PAIR_FIELDS)})")
    user = obj["user"]
    # bool is a subclass of int in Python, but `true` is surely not a user id.
    if isinstance(user, bool) or not isinstance(user, (str, int)):
        raise DataError(f"{where}: field 'user' must be a string or an integer, got {json_type(user)}")
    for field in PAIR_FIELDS[1:]:
        if not isinstance(obj[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {json_type(obj[field])}")
    for field in OPTIONAL_PAIR_FIELDS:
        if obj.get(field) is not None and not isinstance(obj[field], str):
            raise DataError(
                f"{where}: field {field!r} must be a string or null, got {json_type(obj[field])}"
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
    return [_pair_from_object(obj, f"{path}:{lineno}") for lineno, obj in read_jsonl_records(path, "pairs")]


def _write_atomically(*files: tuple[Path, str]) -> None:
    """Write (path, text) files via temporary files and os.replace, renamed only once all are written, so a
    failure or crash never leaves a half-written file (nor, short of one between the renames, half a set)."""
    staged = []
    try:
        for path, text in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append(tmp)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        for tmp, (path, _) in zip(staged, files):
            os.replace(tmp, path)
    except BaseException:
        for tmp in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def pairs_text(pairs: Sequence[Pair]) -> str:
    """Pairs as JSON Lines; optional fields that are None are left out."""
    lines = []
    for pair in pairs:
        obj = {"user": pair.user, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}
        for field in OPTIONAL_PAIR_FIELDS:
            if getattr(pair, field) is not None:
                obj[field] = getattr(pair, field)
        lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
    return "".join(lines)


def write_pairs(path: str | os.PathLike, pairs: Sequence[Pair]) -> None:
    """Write pairs as JSON Lines (atomically, see pairs_text)."""
    _write_atomically((Path(path), pairs_text(pairs)))


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
# 6. Command line: check a file (the converters live in prepare/, the toy tasks in examples/)
# ----------------------------------------------------------------------------------------------------


def check_out_dir(out: Path) -> None:
    """DataError unless `out` is a directory, or can be made one: its nearest existing parent is a writable
    directory. Commands check their output place before any work, so a typo costs nothing."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory; give a directory to write into")
    place = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    if not place.is_dir() or not os.access(place, os.W_OK | os.X_OK):
        raise DataError(f"{out}: cannot be written, {place} is not a writable directory")


def write_split(out_dir, train: list[Pair], valid: list[Pair]) -> None:
    """OUT/train.jsonl and OUT/valid.jsonl, both or neither, each with a line saying what it holds."""
    split = {Path(out_dir) / f"{name}.jsonl": pairs for name, pairs in (("train", train), ("valid", valid))}
    _write_atomically(*((path, pairs_text(pairs)) for path, pairs in split.items()))
    for path, pairs in split.items():
        print(f"wrote {path}: {describe_pairs(pairs)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="data.py", description="Check a JSON Lines file of personalized preference pairs. "
                                     "Converters for the paper's datasets: python -m prepare.{tldr,psoups,prism}; "
                                     "the toy tasks: python -m examples.toy.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="validate a JSON Lines file of pairs and print counts").add_argument("file")
    args = parser.parse_args(argv)
    try:
        print(f"{args.file}: {describe_pairs(read_pairs(args.file))}")
        return 0
    except (DataError, OSError) as e:  # a person's input problem: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
