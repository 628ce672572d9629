"""Personalized RLHF: user models, personalized log-probabilities, P-DPO and the personalized reward model.

Implements PAPER.md (Li, Zhou, Lipton, Leqi, *Personalized Language Modeling from Personalized Human
Feedback*, arXiv 2402.05133), sections "User model f_P", "Personalized LM", "P-DPO objective (eq. pdpo)"
and "Personalized reward model (P-RM)". References read, not copied: the paper's reference code (user
models, defaults), the DPO authors' `trainers.py` (loss as a pure function of four log-prob tensors,
conservative DPO), TRL's `DPOTrainer` (IPO's per-token normalization).

Equation -> function:
    user registry: identifier -> row, unknown -> row 0 (generic)    UserRegistry
    uniform e_u = e (or nothing)                                    UniformUserModel
    individual e_i = e_0 + o_i (or o_i)                             IndividualUserModel
    cluster e_i = sum_k softmax(w_i)_k c_k                          ClusterUserModel
    [BOS] [e_u] [user text] [prompt] [response]                     embed_with_user_prefix, user_conditioned_hidden
    log pi(y | x, u) = sum_t log p(y_t | BOS, e_u, x, y_<t)         response_logps (policy_logps, reference_logps)
    ... [prompt] [y_w] [y_l] in one row, y_l masked from y_w         shared_prompt_rows, shared_prompt_attention
    per-pair loss of h: DPO, conservative DPO, IPO                  preference_loss
    alpha * l(e_u) + (1 - alpha) * l(e_0)                           mix_terms
    P-DPO, eq. (pdpo): h_u, h_0, the alpha mix                      pdpo_loss
    r(x, y, u) = beta * (log pi(y|x,u) - log pi_ref(y|x))           pdpo_loss (chosen_rewards, ...)
    reward model r_phi(x, y, u) at the last response token         RewardHead, personalized_rewards
    P-RM: -log sigmoid(r(x,y_w,u) - r(x,y_l,u)), mixed by alpha    prm_loss
    vanilla DPO = uniform model without embedding, alpha = 1       PDPOConfig.vanilla, VANILLA_DPO
    beyond the paper: + lambda * NLL + mu * decision term           nll_term, decision_term, pdpo_objective
    one batch of eq. (pdpo), its generic-sampling estimator        pdpo_step (training, scoring, new users)

The choices that change an equation live in PDPOConfig, once: the user model, T_u, alpha, beta, the
family member (`loss`), cDPO's epsilon, IPO's per-token averaging (`average_logps`), whether the user's
text is in the rows (`use_user_text`), generic sampling; and one that changes no number, only the work:
shared-prompt rows (`shared_prompt`).

Reading order: registry, user models (initialization, the three kinds, factory, saving), personalized
log-probabilities (two rows per pair, in one batched forward), shared-prompt rows (the same numbers from one
row per pair), the configuration of an arm, P-DPO, P-RM, then what goes beyond the paper and one batch of
P-DPO with it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

USER_MODEL_KINDS = ("uniform", "individual", "cluster")
USER_INFO_KINDS = ("implicit", "explicit", "both")
LOSS_TYPES = ("dpo", "cdpo", "ipo")


# ----------------------------------------------------------------------------------------------
# User registry: dataset identifiers -> rows of the user model


class UserRegistry:
    """Maps a dataset's user identifiers to user-model rows 1..N; row 0 is the generic user.

    Identifiers are compared as strings (the int 7 and the string "7" are the same user). Any
    identifier not seen in training, and None, maps to row 0, the generic user: never an error,
    because unseen users at evaluation time are exactly who the generic embedding e_0 is for.
    `len(registry)` counts rows, N + 1, so `make_user_model(kind, len(registry) - 1, ...)` fits.
    """

    def __init__(self, users: Iterable):
        self.users = [str(u) for u in users]  # row i + 1 belongs to self.users[i]
        if len(set(self.users)) != len(self.users):
            raise ValueError("UserRegistry: user identifiers must be distinct (use from_users to deduplicate)")
        self._rows = {u: i + 1 for i, u in enumerate(self.users)}

    @classmethod
    def from_users(cls, users: Iterable) -> "UserRegistry":
        """All distinct identifiers, sorted as strings: the same data always gives the same rows."""
        return cls(sorted({str(u) for u in users if u is not None}))

    @property
    def n_users(self) -> int:
        """N, the number of known users (rows 1..N)."""
        return len(self.users)

    def __len__(self) -> int:
        return len(self.users) + 1

    def row(self, user) -> int:
        return 0 if user is None else self._rows.get(str(user), 0)

    def rows(self, users: Iterable) -> torch.Tensor:
        return torch.tensor([self.row(u) for u in users], dtype=torch.long)  # (B,)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"users": self.users}, indent=1))

    @classmethod
    def load(cls, path) -> "UserRegistry":
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("users"), list):
            raise ValueError(f'{path}: expected {{"users": [identifier, ...]}} (row i + 1 = users[i])')
        return cls(obj["users"])


# ----------------------------------------------------------------------------------------------
# User models f_P: (B,) rows -> (B, T_u, d) user embeddings


def init_user_vectors(n: int, hidden_size: int, *, init: str, init_range: float,
                      token_embedding: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """n fresh d-vectors (float32), as the reference code initializes user and cluster embeddings.

    "vocab": copies of the LLM's token-embedding rows for randomly drawn vocabulary tokens, so a user
    embedding starts on the scale of real token embeddings (the reference code's default).
    "uniform": U[-init_range, init_range] (the reference code's fallback, range 0.5).
    """
    if init == "vocab":
        if token_embedding is None:
            raise ValueError('init="vocab" copies rows of the LLM token embedding: pass token_embedding='
                             'model.tok_embeddings.weight, or use init="uniform"')
        if token_embedding.shape[1] != hidden_size:
            raise ValueError(f"token_embedding has width {token_embedding.shape[1]}, but hidden_size is {hidden_size}")
        tokens = torch.randint(token_embedding.shape[0], (n,), generator=generator)  # (n,)
        return token_embedding.detach()[tokens.to(token_embedding.device)].float().cpu()  # (n, d)
    if init == "uniform":
        return (torch.rand(n, hidden_size, generator=generator) * 2 - 1) * init_range  # (n, d)
    raise ValueError(f'init={init!r}: expected "vocab" or "uniform"')


class UniformUserModel(nn.Module):
    """Uniform preference: every user gets the same embedding e (T_u x d), or none when T_u = 0.

    With T_u = 0 and alpha = 1 P-DPO is vanilla DPO (PAPER.md); with T_u > 0 it is one shared soft
    prompt trained with the policy.
    """

    kind = "uniform"

    def __init__(self, n_users: int, n_user_tokens: int, hidden_size: int, initial: torch.Tensor | None = None):
        super().__init__()
        self.n_users, self.n_user_tokens, self.hidden_size = n_users, n_user_tokens, hidden_size
        self.embedding = None
        if n_user_tokens > 0:
            initial = torch.zeros(n_user_tokens * hidden_size) if initial is None else initial
            self.embedding = nn.Parameter(initial.reshape(n_user_tokens, hidden_size))  # (T_u, d)

    def config(self) -> dict:
        return dict(kind=self.kind, n_users=self.n_users, n_user_tokens=self.n_user_tokens,
                    hidden_size=self.hidden_size)

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        B = user_rows.shape[0]
        if self.embedding is None:
            return torch.zeros(B, 0, self.hidden_size, device=user_rows.device)  # (B, 0, d)
        return self.embedding.expand(B, -1, -1)  # (B, T_u, d)


class IndividualUserModel(nn.Module):
    """Individual preference: a table with row 0 = e_0 (generic) and rows 1..N for the known users.

    add_generic_user=True (reference default): row i holds an offset o_i and e_i = e_0 + o_i, so e_0
    learns from everyone and o_i only what is particular to user i. add_generic_user=False: e_i = o_i.
    Row 0 always gives e_0. The table starts as `initial` (zeros if None); make_user_model draws every
    row, offsets included, the same way (as the reference code does), so at step 0 users already
    differ from e_0 and from each other.
    """

    kind = "individual"

    def __init__(self, n_users: int, n_user_tokens: int, hidden_size: int, add_generic_user: bool = True,
                 initial: torch.Tensor | None = None):
        super().__init__()
        self.n_users, self.n_user_tokens, self.hidden_size = n_users, n_user_tokens, hidden_size
        self.add_generic_user = add_generic_user
        shape = (n_users + 1, n_user_tokens, hidden_size)
        initial = torch.zeros(shape) if initial is None else initial.reshape(shape)
        self.embeddings = nn.Parameter(initial)  # (N + 1, T_u, d): e_0, then o_1..o_N

    def config(self) -> dict:
        return dict(kind=self.kind, n_users=self.n_users, n_user_tokens=self.n_user_tokens,
                    hidden_size=self.hidden_size, add_generic_user=self.add_generic_user)

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        own = self.embeddings[user_rows]  # (B, T_u, d): o_i, or e_0 for row 0
        if not self.add_generic_user:
            return own  # e_i = o_i
        generic = self.embeddings[0].expand_as(own)  # (B, T_u, d)
        known = (user_rows != 0)[:, None, None]  # (B, 1, 1)
        return torch.where(known, generic + own, generic)  # e_i = e_0 + o_i; e_0 for row 0


class ClusterUserModel(nn.Module):
    """Cluster-based preference: e_i = sum_k softmax(w_i)_k c_k.

    K cluster embeddings c_k (T_u x d each) and per-user logits w_i in R^K, row 0 for the generic user.
    They start as `initial` and `initial_logits` (zeros if None: every user then mixes the clusters
    equally); make_user_model draws the logits N(0, 1) (the reference code's nn.Embedding default).
    """

    kind = "cluster"

    def __init__(self, n_users: int, n_user_tokens: int, hidden_size: int, n_clusters: int = 5,
                 initial: torch.Tensor | None = None, initial_logits: torch.Tensor | None = None):
        super().__init__()
        self.n_users, self.n_user_tokens, self.hidden_size = n_users, n_user_tokens, hidden_size
        self.n_clusters = n_clusters
        shape = (n_clusters, n_user_tokens, hidden_size)
        initial = torch.zeros(shape) if initial is None else initial.reshape(shape)
        self.cluster_embeddings = nn.Parameter(initial)  # (K, T_u, d): c_1..c_K
        logits = torch.zeros(n_users + 1, n_clusters) if initial_logits is None else initial_logits
        self.user_logits = nn.Parameter(logits)  # (N + 1, K): w_0..w_N

    def config(self) -> dict:
        return dict(kind=self.kind, n_users=self.n_users, n_user_tokens=self.n_user_tokens,
                    hidden_size=self.hidden_size, n_clusters=self.n_clusters)

    def cluster_weights(self, user_rows: torch.Tensor) -> torch.Tensor:
        return self.user_logits[user_rows].softmax(dim=-1)  # (B, K), each row sums to 1

    def forward(self, user_rows: torch.Tensor) -> torch.Tensor:
        weights = self.cluster_weights(user_rows)  # (B, K)
        return torch.einsum("bk,ktd->btd", weights, self.cluster_embeddings)  # (B, T_u, d)


def make_user_model(kind: str, n_users: int, n_user_tokens: int, hidden_size: int, *, n_clusters: int = 5,
                    add_generic_user: bool = True, init: str = "vocab", init_range: float = 0.5,
                    token_embedding: torch.Tensor | None = None, seed: int = 0) -> nn.Module:
    """A user model for N known users (rows 1..N) plus the generic row 0; float32 parameters on CPU.

    n_user_tokens = T_u. T_u = 0 means no implicit embedding at all: every kind is then the empty
    uniform model (explicit user text alone, or vanilla DPO with alpha = 1). Initialization is seeded
    (init_user_vectors); the cluster logits draw from the same generator.
    """
    if kind not in USER_MODEL_KINDS:
        raise ValueError(f"user model kind {kind!r}: expected one of {', '.join(USER_MODEL_KINDS)}")
    if n_user_tokens < 0 or n_users < 0:
        raise ValueError(f"n_user_tokens={n_user_tokens}, n_users={n_users}: both must be >= 0")
    if n_user_tokens == 0:
        return UniformUserModel(n_users, 0, hidden_size)
    generator = torch.Generator().manual_seed(seed)

    def vectors(n):
        return init_user_vectors(n, hidden_size, init=init, init_range=init_range,
                                 token_embedding=token_embedding, generator=generator)

    if kind == "uniform":
        return UniformUserModel(n_users, n_user_tokens, hidden_size, vectors(n_user_tokens))
    if kind == "individual":
        return IndividualUserModel(n_users, n_user_tokens, hidden_size, add_generic_user,
                                   vectors((n_users + 1) * n_user_tokens))
    if n_clusters < 1:
        raise ValueError(f"n_clusters={n_clusters}: the cluster model needs K >= 1")
    initial = vectors(n_clusters * n_user_tokens)
    logits = torch.randn(n_users + 1, n_clusters, generator=generator)  # (N + 1, K)
    return ClusterUserModel(n_users, n_user_tokens, hidden_size, n_clusters, initial, logits)


USER_MODEL_FILES = ("user_model.safetensors", "user_model.json", "users.json")


def save_user_model(directory, user_model: nn.Module, registry: UserRegistry) -> None:
    """Write user_model.safetensors (weights), user_model.json (kind, sizes, flags), users.json (registry)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(registry) - 1 != user_model.n_users:
        raise ValueError(f"registry has {len(registry) - 1} users but the user model {user_model.n_users}")
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in user_model.state_dict().items()}
    save_file(tensors, str(directory / "user_model.safetensors"))
    (directory / "user_model.json").write_text(json.dumps(user_model.config(), indent=1))
    registry.save(directory / "users.json")


def load_user_model(directory) -> tuple[nn.Module, UserRegistry]:
    """Read what save_user_model wrote: (user model on CPU in float32, its registry)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in USER_MODEL_FILES:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; a saved user model has "
                                    f"{', '.join(USER_MODEL_FILES)}")
    file = directory / "user_model.json"
    try:
        cfg = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    kind = cfg.pop("kind", None)
    classes = {c.kind: c for c in (UniformUserModel, IndividualUserModel, ClusterUserModel)}
    if kind not in classes:
        raise ValueError(f"{file}: field 'kind' is {kind!r}; expected one of {', '.join(classes)}")
    try:
        user_model = classes[kind](**cfg)
    except TypeError as e:
        raise ValueError(f"{file}: fields do not fit the {kind} user model ({e})") from None
    try:
        user_model.load_state_dict(load_file(str(directory / "user_model.safetensors")))
    except RuntimeError as e:
        raise ValueError(f"{directory / 'user_model.safetensors'} does not fit {file}: {e}") from None
    registry = UserRegistry.load(directory / "users.json")
    if len(registry) - 1 != user_model.n_users:
        raise ValueError(f"{directory}: users.json lists {len(registry) - 1} users, "
                         f"user_model.json says {user_model.n_users}")
    return user_model, registry


# ----------------------------------------------------------------------------------------------
# Personalized log-probabilities (PAPER.md, "Personalized LM")


def embed_with_user_prefix(model, input_ids: torch.Tensor, user_embeddings: torch.Tensor) -> torch.Tensor:
    """[BOS] [e_u] [user text] [prompt] [response]: the T_u user vectors go right after position 0.

    input_ids (N, T) are rows laid out by data.prefix_ids ([BOS] [user text] [prompt]) plus the
    response, so any user text goes through the LM's own token embedding. user_embeddings (N, T_u, d).
    Returns (N, T_u + T, d).
    """
    token_embeds = model.tok_embeddings(input_ids)  # (N, T, d)
    if user_embeddings.shape[1] == 0:
        return token_embeds
    user_embeddings = user_embeddings.to(token_embeds.dtype)  # user model is float32, the LM may be bf16
    return torch.cat([token_embeds[:, :1], user_embeddings, token_embeds[:, 1:]], dim=1)  # (N, T_u + T, d)


def user_conditioned_hidden(model, user_model, input_ids: torch.Tensor, user_rows: torch.Tensor,
                            segments: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states of [BOS] [e_u] [rest of input_ids], prefix positions dropped: (N, T, d).

    Positions run 0..T_u+T-1 over the whole sequence, prefix included. After dropping the first T_u
    outputs, hidden[:, t] is the state that predicts input_ids[:, t + 1], exactly as without a prefix
    (hidden[:, 0] is the last user vector, or BOS when T_u = 0). No attention mask: padding is on the right.
    With segments (N, T), input_ids are shared-prompt rows, run under shared_prompt_attention.
    """
    user_embeddings = user_model(user_rows)  # (N, T_u, d)
    T_u = user_embeddings.shape[1]
    inputs_embeds = embed_with_user_prefix(model, input_ids, user_embeddings)  # (N, T_u + T, d)
    if segments is None:
        hidden = model(inputs_embeds=inputs_embeds, return_hidden=True)  # (N, T_u + T, d)
    else:
        segments = torch.cat([segments[:, :1], segments.new_full((len(segments), T_u), PREFIX), segments[:, 1:]],
                             dim=1)  # (N, T_u + T): e_u belongs to the prefix
        mask, position_ids = shared_prompt_attention(segments)
        hidden = model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                       return_hidden=True)  # (N, T_u + T, d)
    return hidden[:, T_u:]  # (N, T, d)


def response_logps(lm_head, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
                   average: bool = False, return_token_logps: bool = False):
    """log pi(y | x, u) = sum_t log p(y_t | BOS, e_u, x, y_<t), over response tokens only: (N,).

    hidden (N, T, d), hidden[:, t] predicting input_ids[:, t + 1]; response_mask (N, T) True at response
    tokens (pads and prompt are never scored). The LM head runs only at the positions that predict a
    response token, and the log-softmax is taken in float32 as logit - logsumexp: no (N, T, V) tensor.
    average=True gives the mean over the response tokens instead of the sum (TRL's IPO normalization).
    return_token_logps=True also returns the per-token terms, (N, T - 1), zero where nothing is scored.
    """
    predicts_response = response_mask[:, 1:]  # (N, T - 1): position t predicts token t + 1
    targets = input_ids[:, 1:][predicts_response]  # (n,) response tokens of all rows
    logits = lm_head(hidden[:, :-1][predicts_response]).float()  # (n, V)
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)  # (n,)
    token_logps = token_logps.new_zeros(predicts_response.shape).masked_scatter(predicts_response, token_logps)
    logps = token_logps.sum(dim=-1)  # (N,)
    if average:
        logps = logps / predicts_response.sum(dim=-1).clamp(min=1)
    return (logps, token_logps) if return_token_logps else logps


TERMS = {"policy": ("policy_chosen_logps", "policy_rejected_logps"),  # e_u: each pair's own user
         "generic": ("generic_chosen_logps", "generic_rejected_logps")}  # e_0: eq. (pdpo)'s generic term


def policy_rows(batch: dict, alpha: float, user_model) -> tuple[torch.Tensor, dict]:
    """Which user embedding each policy row gets: personalized rows (each pair's own user) when alpha > 0,
    then generic rows (row 0, e_0) when alpha < 1; each block is 2B rows, the chosen then the rejected.

    Returns user_rows (n*2B,) and {term: its block}. The uniform model gives every user e_0, so there one
    block serves both terms. Generic rows keep any user text: only the implicit embedding becomes e_0, as
    for an unseen user who describes themselves.
    """
    rows = batch["user_rows"].repeat(2)  # (2B,): the chosen rows, then the rejected rows
    terms = (["policy"] if alpha > 0 else []) + (["generic"] if alpha < 1 else [])
    if isinstance(user_model, UniformUserModel):
        return rows, dict.fromkeys(terms, 0)
    user_rows = torch.cat([rows if term == "policy" else torch.zeros_like(rows) for term in terms])  # (n*2B,)
    return user_rows, {term: block for block, term in enumerate(terms)}


def split_terms(values: torch.Tensor, blocks: dict, names: dict) -> dict:
    """(n*2B, ...) -> {name: (B, ...)}: the chosen and rejected rows of each term's block; None for absent terms."""
    chunks = values.chunk(2 * (max(blocks.values()) + 1))  # [block 0 chosen, block 0 rejected, block 1 chosen, ...]
    out = dict.fromkeys(names["policy"] + names["generic"])
    for term, block in blocks.items():
        out[names[term][0]], out[names[term][1]] = chunks[2 * block], chunks[2 * block + 1]
    return out


def policy_hidden(model, user_model, batch: dict, user_rows: torch.Tensor, shared_prompt: bool) -> torch.Tensor:
    """Final hidden states (n*2B, T, d) of the batch's rows, n blocks of them with user_rows (n*2B,):
    user_conditioned_hidden, or the same numbers from one shared-prompt row per pair (shared_prompt_hidden)."""
    input_ids = batch["policy_input_ids"]  # (2B, T)
    if shared_prompt:
        return shared_prompt_hidden(model, user_model, input_ids, batch["policy_response_mask"], user_rows)
    n = user_rows.shape[0] // input_ids.shape[0]
    return user_conditioned_hidden(model, user_model, input_ids.repeat(n, 1), user_rows)  # (n*2B, T, d)


def policy_logps(model, user_model, batch: dict, alpha: float, average: bool = False,
                 shared_prompt: bool = False, return_token_logps: bool = False) -> dict:
    """log pi(y_w | x, u), log pi(y_l | x, u) and, for eq. (pdpo)'s generic term, the same with e_0.

    One forward of 2B or 4B rows (policy_rows). Returns a dict of (B,) tensors policy_chosen_logps,
    policy_rejected_logps (None when alpha == 0) and generic_chosen_logps, generic_rejected_logps (None
    when alpha == 1). For evaluation use alpha=1: unknown users already have row 0. average: the mean over
    response tokens instead of the sum (IPO). shared_prompt: the same numbers from one row per pair.
    return_token_logps: also policy_token_logps and generic_token_logps, (2B, T - 1) each, the chosen
    rows then the rejected rows (for the decision term, beyond the paper).
    """
    user_rows, blocks = policy_rows(batch, alpha, user_model)  # (n*2B,)
    hidden = policy_hidden(model, user_model, batch, user_rows, shared_prompt)  # (n*2B, T, d)
    n = max(blocks.values()) + 1
    input_ids, response_mask = batch["policy_input_ids"].repeat(n, 1), batch["policy_response_mask"].repeat(n, 1)
    logps, token_logps = response_logps(model.output, hidden, input_ids, response_mask, average,
                                        return_token_logps=True)  # (n*2B,), (n*2B, T - 1)
    out = split_terms(logps, blocks, TERMS)
    if return_token_logps:  # per term, its block's (2B, T - 1): the chosen rows, then the rejected rows
        for term in TERMS:
            out[f"{term}_token_logps"] = token_logps.chunk(n)[blocks[term]] if term in blocks else None
    return out


@torch.no_grad()
def reference_logps(model, batch: dict, average: bool = False,
                    shared_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref(y_w | x), log pi_ref(y_l | x), each (B,): [BOS] [prompt] [response], no user information.

    One no-grad pass of 2B rows, or of B rows [BOS] [prompt] [y_w] [y_l] with shared_prompt (the same
    numbers), shared by the personalized and the generic term. The caller picks the
    model: the policy with LoRA adapters disabled, or a frozen copy for full fine-tuning.
    """
    input_ids, response_mask = batch["reference_input_ids"], batch["reference_response_mask"]  # (2B, T')
    if shared_prompt:
        shared_ids, segments, two_row_index = shared_prompt_rows(input_ids, response_mask)  # (B, S), (2B, T')
        mask, position_ids = shared_prompt_attention(segments)
        hidden = model(shared_ids, attention_mask=mask, position_ids=position_ids, return_hidden=True)  # (B, S, d)
        hidden = unshare_hidden(hidden, two_row_index)  # (2B, T', d)
    else:
        hidden = model(input_ids, return_hidden=True)  # (2B, T', d)
    logps = response_logps(model.output, hidden, input_ids, response_mask, average)  # (2B,)
    return tuple(logps.chunk(2))


# ----------------------------------------------------------------------------------------------
# Shared-prompt rows: an optimisation of the two-row path above (PDPOConfig.shared_prompt, on by default).
# y_w and y_l of a pair share [BOS] [e_u] [user text] [prompt], so one row can carry both responses after a
# single copy of the prefix. Same log-probs as two rows, fewer tokens through the LM.

PREFIX, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1  # the segments of a shared row


def shared_prompt_rows(input_ids: torch.Tensor, response_mask: torch.Tensor):
    """Two rows per pair -> one: (2B, T) [prefix] [y_w] and [prefix] [y_l] -> (B, S) [prefix] [y_w] [y_l].

    input_ids, response_mask: the two-row layout of data.collate_pairs (chosen rows 0..B-1, rejected rows
    B..2B-1, right-padded; both rows of a pair begin with the same prefix). Returns
      shared_ids     (B, S)   [prefix] [y_w] [y_l] [pads]; pad positions hold arbitrary ids (never seen, never scored)
      segments       (B, S)   PREFIX, CHOSEN, REJECTED or PADDING at each position (shared_prompt_attention)
      two_row_index  (2B, T)  for each two-row position, the shared position holding the same token (unshare_hidden)
    """
    B, T = input_ids.shape[0] // 2, input_ids.shape[1]
    chosen_mask, rejected_mask = response_mask[:B], response_mask[B:]  # (B, T) each
    n_prefix = (chosen_mask | rejected_mask).int().argmax(-1, keepdim=True)  # (B, 1): the first response token
    n_chosen, n_rejected = chosen_mask.sum(-1, keepdim=True), rejected_mask.sum(-1, keepdim=True)  # (B, 1)
    end_chosen = n_prefix + n_chosen
    end = end_chosen + n_rejected  # (B, 1)
    S = int(end.max())
    j = torch.arange(S, device=input_ids.device)  # (S,)
    segments = torch.where(j < n_prefix, PREFIX, torch.where(j < end_chosen, CHOSEN,
                                                             torch.where(j < end, REJECTED, PADDING)))  # (B, S)
    from_rejected = j >= end_chosen  # (B, S): y_l, and the padding after it
    column = torch.where(from_rejected, j - n_chosen, j).clamp(max=T - 1)  # (B, S): column in the two-row layout
    shared_ids = torch.where(from_rejected, input_ids[B:].gather(1, column), input_ids[:B].gather(1, column))
    t = torch.arange(T, device=input_ids.device)  # (T,)
    two_row_index = torch.cat([t.expand(B, T), torch.where(t < n_prefix, t, t + n_chosen)])  # (2B, T)
    return shared_ids, segments, two_row_index.clamp(max=S - 1)


def shared_prompt_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segments (N, S) -> boolean attention mask (N, 1, S, S) and position ids (N, S) of shared rows.

    Causal, except that y_l does not see y_w, and y_l's positions restart right after the prefix, so
    every token sees exactly what it sees in its own two-row row, at the same position. A pad sees only
    itself (no empty row, so no NaN in SDPA). One pair, prefix of 3, |y_w| = 2, |y_l| = 3, one pad:

                   keys  BOS e_u  x  w1 w2 l1 l2 l3 pad
        queries  BOS      1
                 e_u      1   1
                 x        1   1   1
                 w1       1   1   1   1
                 w2       1   1   1   1  1
                 l1       1   1   1         1
                 l2       1   1   1         1  1
                 l3       1   1   1         1  1  1
                 pad                                1
        positions         0   1   2   3  4  3  4  5  8
    """
    S = segments.shape[1]
    j = torch.arange(S, device=segments.device)  # (S,)
    query, key = segments[:, :, None], segments[:, None, :]  # (N, S, 1), (N, 1, S)
    causal = j[None, :] <= j[:, None]  # (S, S), [query, key]
    real = (query != PADDING) & (key != PADDING)  # (N, S, S)
    allowed = causal & real & ((key == PREFIX) | (key == query))  # (N, S, S)
    allowed = allowed | torch.eye(S, dtype=torch.bool, device=segments.device)
    n_chosen = (segments == CHOSEN).sum(-1, keepdim=True)  # (N, 1)
    position_ids = j - n_chosen * (segments == REJECTED)  # (N, S)
    return allowed[:, None], position_ids  # (N, 1, S, S), (N, S)


def unshare_hidden(hidden: torch.Tensor, two_row_index: torch.Tensor) -> torch.Tensor:
    """Hidden states of n blocks of B shared rows (n*B, S, d) -> the two-row layout's (n*2B, T, d).

    Block b's shared row i serves its rows i (chosen) and B + i (rejected). Prefix states are copied
    into both rows, so hidden[:, t] predicts input_ids[:, t + 1] of the two-row layout again and
    response_logps scores both layouts with the same code.
    """
    two_B, T = two_row_index.shape
    B = two_B // 2
    n = hidden.shape[0] // B
    row = torch.arange(n * two_B, device=hidden.device)  # (n*2B,)
    shared_row = row // two_B * B + row % B  # (n*2B,): block, then pair
    return hidden[shared_row[:, None], two_row_index.repeat(n, 1)]  # (n*2B, T, d)


def shared_prompt_hidden(model, user_model, input_ids: torch.Tensor, response_mask: torch.Tensor,
                         user_rows: torch.Tensor) -> torch.Tensor:
    """user_conditioned_hidden of policy_rows' (n*2B, T) rows, computed from n*B shared-prompt rows.

    input_ids, response_mask: the batch's two rows per pair (2B, T); user_rows (n*2B,) from policy_rows,
    each block's chosen and rejected rows with the same row. Returns (n*2B, T, d), as the two-row forward.
    """
    shared_ids, segments, two_row_index = shared_prompt_rows(input_ids, response_mask)  # (B, S), (B, S), (2B, T)
    B = shared_ids.shape[0]
    n = user_rows.shape[0] // (2 * B)
    pair_rows = user_rows.view(n, 2, B)[:, 0].reshape(n * B)  # (n*B,): one user row per block and pair
    hidden = user_conditioned_hidden(model, user_model, shared_ids.repeat(n, 1), pair_rows,
                                     segments.repeat(n, 1))  # (n*B, S, d)
    return unshare_hidden(hidden, two_row_index)  # (n*2B, T, d)


# ----------------------------------------------------------------------------------------------
# One arm of an experiment: the user model and the objective. train.py's TrainConfig extends it, so
# each field is also a flag (--alpha, --n-user-tokens, ...) with one name, one default, one check.


def option(default, help: str, **kw):
    """A config field that is also a command-line flag: its default and the help argparse shows."""
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class PDPOConfig:
    """The user model f_P and the P-DPO objective (PAPER.md symbols in the help texts)."""

    user_model: str = option("individual", "user model f_P: uniform (vanilla), individual or cluster-based",
                             choices=list(USER_MODEL_KINDS))
    n_user_tokens: int = option(1, "T_u, soft tokens per user embedding (0 = none)")
    n_clusters: int = option(5, "K, number of cluster embeddings (cluster model)")
    add_generic_user: bool = option(True, "individual model: e_i = e_0 + o_i (else o_i)")
    user_info: str = option("implicit", "implicit: learned e_u; explicit: the user's text only (T_u = 0, so "
                            "needs --user-model uniform --alpha 1); both: [e_u] [user text]",
                            choices=list(USER_INFO_KINDS))
    user_init: str = option("vocab", "user embeddings start as random vocabulary rows, or uniform in [-r, r]",
                            choices=["vocab", "uniform"])
    user_init_range: float = option(0.5, "r of --user-init uniform")
    alpha: float = option(0.5, "alpha, weight of the personalized term (1 - alpha: generic e_0)")
    generic_delay: float = option(0.0, "beyond the paper: alpha = 1 for this fraction of training, then --alpha "
                                  "(docs/user_embeddings.md); 0 = the paper's loss from the start")
    beta: float = option(0.5, "beta, strength of the KL tie to the reference model (IPO: tau)")
    loss: str = option("dpo", "P-*PO family member: DPO, conservative DPO, IPO", choices=list(LOSS_TYPES))
    label_smoothing: float = option(0.1, "epsilon of conservative DPO (--loss cdpo only)")
    generic_sampling: bool = option(False, "each pair takes its personalized term with prob. alpha, else its "
                                    "generic term: an unbiased estimate of eq. (pdpo) at vanilla-DPO cost")
    shared_prompt: bool = option(True, "one row per pair, [prompt] [y_w] [y_l] with y_l masked from y_w: the "
                                 "prompt runs once instead of twice (same log-probs as two rows)")
    nll_weight: float = option(0.0, "beyond the paper: lambda, weight of an NLL term on y_w (docs/user_embeddings.md)")
    decision_weight: float = option(0.0, "beyond the paper: mu, weight of a term on the first token where y_w and y_l "
                                    "part (docs/user_embeddings.md)")

    def __post_init__(self):
        if self.user_model not in USER_MODEL_KINDS:
            raise ValueError(f"--user-model {self.user_model}: expected one of {', '.join(USER_MODEL_KINDS)}")
        if self.user_info not in USER_INFO_KINDS:
            raise ValueError(f"--user-info {self.user_info}: expected one of {', '.join(USER_INFO_KINDS)}")
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"--loss {self.loss}: expected one of {', '.join(LOSS_TYPES)}")
        if self.n_user_tokens < 0 or self.n_clusters < 1:
            raise ValueError(f"--n-user-tokens {self.n_user_tokens} --n-clusters {self.n_clusters}: "
                             f"T_u must be >= 0 and K >= 1")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha {self.alpha}: the weight of the personalized term must lie in [0, 1]")
        if not (self.user_init_range > 0 and math.isfinite(self.user_init_range)):
            raise ValueError(f"--user-init-range {self.user_init_range}: r must be a positive number")
        if not 0 <= self.generic_delay < 1:
            raise ValueError(f"--generic-delay {self.generic_delay}: a fraction of training in [0, 1)")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"--beta {self.beta}: must be a positive number")
        if not (self.nll_weight >= 0 and math.isfinite(self.nll_weight)):
            raise ValueError(f"--nll-weight {self.nll_weight}: lambda must be a number >= 0")
        if not (self.decision_weight >= 0 and math.isfinite(self.decision_weight)):
            raise ValueError(f"--decision-weight {self.decision_weight}: mu must be a number >= 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label-smoothing {self.label_smoothing}: must lie in [0, 0.5)")
        if self.user_info == "explicit" and (self.user_model != "uniform" or self.alpha < 1):
            # no implicit embedding: every user model is the empty one, and e_u = e_0 = nothing
            raise ValueError(f"--user-info explicit has no learned user embedding (T_u = 0), so --user-model "
                             f"{self.user_model} and --alpha {self.alpha} would change nothing (both terms of "
                             f"eq. (pdpo) coincide): pass --user-model uniform --alpha 1, or --user-info both")

    @classmethod
    def vanilla(cls, **overrides) -> "PDPOConfig":
        """Vanilla DPO: the uniform user model without embedding and alpha = 1 (PAPER.md)."""
        return cls(**{**VANILLA_DPO, **overrides})

    @property
    def average_logps(self) -> bool:
        """IPO scores the mean log-prob per response token (as TRL and the IPO authors); DPO/cDPO the sum."""
        return self.loss == "ipo"

    @property
    def use_user_text(self) -> bool:
        """Whether the policy's rows carry the user's text: [BOS] [e_u] [user text] [prompt] ..."""
        return self.user_info != "implicit"

    def personalized(self) -> "PDPOConfig":
        """The personalized term alone (alpha = 1): how pairs are scored, and how a new user is fitted."""
        return replace(self, alpha=1.0, generic_sampling=False)

    def make_user_model(self, n_users: int, token_embedding: torch.Tensor | None, seed: int = 0) -> nn.Module:
        """This arm's user model for n_users known users; explicit information alone has T_u = 0."""
        n_tokens = 0 if self.user_info == "explicit" else self.n_user_tokens
        return make_user_model(self.user_model, n_users, n_tokens, token_embedding.shape[1], n_clusters=self.n_clusters,
                               add_generic_user=self.add_generic_user, init=self.user_init,
                               init_range=self.user_init_range, token_embedding=token_embedding, seed=seed)


# Vanilla DPO: the uniform user model without embedding, alpha = 1. The decision term stays off: for users who
# disagree it pulls the same tokens both ways (docs/experiments/toy.md, 2026-12-07).
VANILLA_DPO = dict(user_model="uniform", n_user_tokens=0, alpha=1.0, decision_weight=0.0)


# ----------------------------------------------------------------------------------------------
# P-DPO, eq. (pdpo), and the P-*PO family


def preference_loss(logits: torch.Tensor, *, beta: float, loss_type: str = "dpo",
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss from the log-ratio difference (B,) -> (B,).

    logits = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)),   h = beta * logits
      dpo:   -log sigmoid(h)                                              (DPO paper, eq. 7)
      cdpo:  -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)              (conservative DPO, eps = label_smoothing,
                                                                           the DPO authors' reference code)
      ipo:   (logits - 1 / (2 beta))^2                                    (IPO paper, eq. 17; beta is its tau)
    label_smoothing is read by "cdpo" only.
    """
    match loss_type:
        case "dpo":
            return -F.logsigmoid(beta * logits)
        case "cdpo":
            eps = label_smoothing
            return -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
        case "ipo":
            return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def mix_terms(personalized: torch.Tensor | None, generic: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Per pair: alpha * l(e_u) + (1 - alpha) * l(e_0), the expectation of eq. (pdpo).

    A term whose weight is zero is dropped (and may be None): alpha = 1 is the personalized loss alone.
    """
    if alpha == 1:
        return personalized
    if alpha == 0:
        return generic
    return alpha * personalized + (1 - alpha) * generic


def check_alpha_terms(alpha: float, personalized, generic, what: str) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha}: the weight of the personalized term must lie in [0, 1]")
    if alpha > 0 and personalized is None:
        raise ValueError(f"alpha={alpha} > 0 needs the personalized {what}")
    if alpha < 1 and generic is None:
        raise ValueError(f"alpha={alpha} < 1 mixes in the generic term (eq. pdpo): pass the generic {what} "
                         f"(computed by the same call with the same alpha)")


def log_ratio(logps, reference_logps):
    """log pi(y|x,e) - log pi_ref(y|x) per pair, (B,); None for an absent term."""
    return None if logps is None else logps - reference_logps


def pdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              generic_chosen_logps=None, generic_rejected_logps=None, *, alpha: float, beta: float,
              loss_type: str = "dpo", label_smoothing: float = 0.0) -> dict:
    """P-DPO, eq. (pdpo), per pair (all inputs (B,)):

        h_u = beta * [ (log pi(y_w|x,e_u) - log pi_ref(y_w|x)) - (log pi(y_l|x,e_u) - log pi_ref(y_l|x)) ]
        h_0 = the same with the generic embedding e_0
        L   = -[ alpha * log sigmoid(h_u) + (1 - alpha) * log sigmoid(h_0) ]

    loss_type "cdpo" / "ipo" replace -log sigmoid(h) by preference_loss's other members. A term whose weight
    is zero may be None. Returns (B,) tensors: losses; detached, the implicit rewards r(x, y, u) =
    beta * (log pi(y|x,u) - log pi_ref(y|x)) chosen_rewards, rejected_rewards, accuracies, and e_0's
    generic_chosen_rewards, generic_rejected_rewards, generic_accuracies (None for a term not given).
    """
    check_alpha_terms(alpha, policy_chosen_logps, generic_chosen_logps, "log-probs")
    u_w, u_l = log_ratio(policy_chosen_logps, reference_chosen_logps), log_ratio(policy_rejected_logps,
                                                                                 reference_rejected_logps)  # e_u
    g_w, g_l = log_ratio(generic_chosen_logps, reference_chosen_logps), log_ratio(generic_rejected_logps,
                                                                                  reference_rejected_logps)  # e_0

    def l(chosen, rejected):  # l(h), h = beta * (chosen - rejected log-ratio); -log sigmoid(h) for DPO
        return None if chosen is None else preference_loss(chosen - rejected, beta=beta, loss_type=loss_type,
                                                           label_smoothing=label_smoothing)

    losses = mix_terms(l(u_w, u_l), l(g_w, g_l), alpha)  # alpha * l(h_u) + (1 - alpha) * l(h_0)
    r_w, r_l, r0_w, r0_l = (None if x is None else beta * x.detach() for x in (u_w, u_l, g_w, g_l))  # r(x,y,e)
    return {"losses": losses, "chosen_rewards": r_w, "rejected_rewards": r_l, "accuracies": accuracy(r_w, r_l),
            "generic_chosen_rewards": r0_w, "generic_rejected_rewards": r0_l, "generic_accuracies": accuracy(r0_w, r0_l)}


def accuracy(chosen_rewards, rejected_rewards):
    """Per pair 1.0 where r(x, y_w, u) > r(x, y_l, u), else 0.0 (ties count as wrong); None if absent."""
    return None if chosen_rewards is None else (chosen_rewards > rejected_rewards).float().detach()


# ----------------------------------------------------------------------------------------------
# Personalized reward model (P-RM)


class RewardHead(nn.Module):
    """r_phi(x, y, u): a linear map d -> 1 of the final hidden state at the last response token (EOS)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """hidden (N, T, d) aligned with the input ids, response_mask (N, T) -> rewards (N,) in float32."""
        positions = torch.arange(response_mask.shape[1], device=response_mask.device)  # (T,)
        last = (positions * response_mask).amax(dim=-1)  # (N,): the last response token, before right padding
        last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (N, d)
        return self.score(last_hidden.to(self.score.weight.dtype)).squeeze(-1).float()  # (N,)


REWARD_NAMES = {"policy": ("chosen_rewards", "rejected_rewards"),
                "generic": ("generic_chosen_rewards", "generic_rejected_rewards")}


def personalized_rewards(model, head: RewardHead, user_model, batch: dict, alpha: float,
                         shared_prompt: bool = False) -> dict:
    """r(x, y_w, u), r(x, y_l, u) and, for the generic term, the same with e_0, each (B,).

    One forward of 2B or 4B rows (or shared-prompt rows), like policy_logps. Keys chosen_rewards,
    rejected_rewards (None when alpha == 0), generic_chosen_rewards, generic_rejected_rewards (None when alpha == 1).
    """
    user_rows, blocks = policy_rows(batch, alpha, user_model)  # (n*2B,)
    hidden = policy_hidden(model, user_model, batch, user_rows, shared_prompt)  # (n*2B, T, d)
    response_mask = batch["policy_response_mask"].repeat(max(blocks.values()) + 1, 1)  # (n*2B, T)
    return split_terms(head(hidden, response_mask), blocks, REWARD_NAMES)


def prm_loss(chosen_rewards, rejected_rewards, generic_chosen_rewards=None, generic_rejected_rewards=None, *,
             alpha: float) -> dict:
    """P-RM: personalized Bradley-Terry, per pair (inputs (B,)):

        L = -[ alpha * log sigmoid(r(x,y_w,u) - r(x,y_l,u)) + (1 - alpha) * log sigmoid(r(x,y_w,0) - r(x,y_l,0)) ]

    Returns losses (B,), accuracies (r(x,y_w,u) > r(x,y_l,u)), generic_accuracies (None if absent) and,
    detached, the personalized chosen_rewards and rejected_rewards.
    """
    check_alpha_terms(alpha, chosen_rewards, generic_chosen_rewards, "rewards")

    def bradley_terry(chosen, rejected):
        return None if chosen is None else -F.logsigmoid(chosen - rejected)

    return {"losses": mix_terms(bradley_terry(chosen_rewards, rejected_rewards),
                                bradley_terry(generic_chosen_rewards, generic_rejected_rewards), alpha),
            "chosen_rewards": None if chosen_rewards is None else chosen_rewards.detach(),
            "rejected_rewards": None if rejected_rewards is None else rejected_rewards.detach(),
            "accuracies": accuracy(chosen_rewards, rejected_rewards),
            "generic_accuracies": accuracy(generic_chosen_rewards, generic_rejected_rewards)}


def prm_step(model, head: RewardHead, user_model, batch: dict, alpha: float, shared_prompt: bool = False) -> dict:
    """P-RM on one batch: rewards of 2B or 4B rows in one forward, then prm_loss (alpha = 1 to score)."""
    return prm_loss(**personalized_rewards(model, head, user_model, batch, alpha, shared_prompt), alpha=alpha)


# ----------------------------------------------------------------------------------------------
# Beyond the paper: two terms that keep the greedy answers on the side the rewards rank higher, off by
# default (lambda = mu = 0 is eq. (pdpo) exactly). Why, and what they changed: docs/user_embeddings.md.


def nll_term(policy_chosen_logps, generic_chosen_logps, chosen_tokens, alpha: float) -> torch.Tensor:
    """alpha * (-log pi(y_w|x,e_u) / |y_w|) + (1 - alpha) * (-log pi(y_w|x,e_0) / |y_w|), per pair (B,).

    DPO only asks y_w to gain on y_l, and both can lose likelihood together ("likelihood displacement"), which a
    free user embedding does readily; keeping y_w likely is the usual remedy (RPO, Pang et al. 2024; TRL's "sft"
    loss term). chosen_tokens = |y_w| (ones when the log-probs are already per-token means, as for IPO).
    """
    def per_token_nll(chosen_logps):
        return None if chosen_logps is None else -chosen_logps / chosen_tokens

    return mix_terms(per_token_nll(policy_chosen_logps), per_token_nll(generic_chosen_logps), alpha)


def decision_margins(token_logps: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per pair, the policy's own choice where y_w and y_l first part: (B,).

        t* = the first response position where y_w and y_l hold different tokens
        m  = log p(y_w[t*] | x, e, y_<t*) - log p(y_l[t*] | x, e, y_<t*)

    Both responses have the same context up to t*, so m > 0 where greedy decoding, having followed the shared
    words, takes y_w's branch. token_logps (2B, T - 1) (policy_logps' per-token terms), input_ids and
    response_mask (2B, T): chosen rows, then rejected rows. A pair whose responses never differ at a position
    both score gets m = +inf: no term, no gradient.
    """
    ids_w, ids_l = input_ids[:, 1:].chunk(2)  # (B, T - 1) each: the token each position predicts
    scored_w, scored_l = response_mask[:, 1:].chunk(2)
    parts = scored_w & scored_l & (ids_w != ids_l)  # (B, T - 1)
    t_star = parts.int().argmax(dim=-1, keepdim=True)  # (B, 1): the first True (0 where there is none)
    logps_w, logps_l = token_logps.chunk(2)
    margins = (logps_w.gather(-1, t_star) - logps_l.gather(-1, t_star)).squeeze(-1)  # (B,)
    return torch.where(parts.any(dim=-1), margins, torch.full_like(margins, math.inf))


def decision_margins_by_term(policy: dict, batch: dict) -> dict:
    """policy_decision_margins (e_u) and generic_decision_margins (e_0), (B,) each, from
    policy_logps(..., return_token_logps=True); None for an absent term."""
    ids, mask = batch["policy_input_ids"], batch["policy_response_mask"]  # (2B, T)
    return {f"{term}_decision_margins": None if policy[f"{term}_token_logps"] is None
            else decision_margins(policy[f"{term}_token_logps"], ids, mask) for term in TERMS}


def decision_term(policy_decision_margins, generic_decision_margins, alpha: float) -> torch.Tensor:
    """alpha * -log sigmoid(m_u) + (1 - alpha) * -log sigmoid(m_0), per pair (B,).

    The rewards compare log-ratios to the reference, so a pair can be ranked right while the policy, decoding
    greedily, still prefers y_l's token where the two part; this asks that it prefer y_w's. m = +inf adds 0.
    """
    def branch_loss(margins):
        return None if margins is None else -F.logsigmoid(margins)

    return mix_terms(branch_loss(policy_decision_margins), branch_loss(generic_decision_margins), alpha)


def pdpo_objective(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                   generic_chosen_logps=None, generic_rejected_logps=None, *, alpha: float, beta: float,
                   loss_type: str = "dpo", label_smoothing: float = 0.0, nll_weight: float = 0.0,
                   chosen_tokens: torch.Tensor | None = None, decision_weight: float = 0.0,
                   policy_decision_margins=None, generic_decision_margins=None) -> dict:
    """What training minimizes: pdpo_loss + lambda * nll_term + mu * decision_term (lambda = nll_weight,
    mu = decision_weight; both 0 by default, which is eq. (pdpo) alone).

    Returns pdpo_loss's dict, with losses including the two terms, and nll, decision: their values per pair,
    detached (None when their weight is 0).
    """
    if nll_weight > 0 and chosen_tokens is None:
        raise ValueError("nll_weight > 0 needs chosen_tokens, the number of response tokens of each y_w")
    if decision_weight > 0:
        check_alpha_terms(alpha, policy_decision_margins, generic_decision_margins, "decision margins")
    out = pdpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                    generic_chosen_logps, generic_rejected_logps, alpha=alpha, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing)
    losses, nll, decision = out["losses"], None, None
    if nll_weight > 0:
        nll = nll_term(policy_chosen_logps, generic_chosen_logps, chosen_tokens, alpha)
        losses = losses + nll_weight * nll
    if decision_weight > 0:
        decision = decision_term(policy_decision_margins, generic_decision_margins, alpha)
        losses = losses + decision_weight * decision
    return {**out, "losses": losses, "nll": None if nll is None else nll.detach(),
            "decision": None if decision is None else decision.detach()}


# ----------------------------------------------------------------------------------------------
# One batch of P-DPO: what training, scoring and new-user fitting call


def pdpo_step(model, user_model, batch: dict, reference, cfg: PDPOConfig) -> dict:
    """Eq. (pdpo) on one batch: policy log-probs (one forward), reference log-probs, then pdpo_objective
    (pdpo_loss, plus cfg's terms beyond the paper when their weights are above 0).

    reference(batch) -> (reference_chosen_logps, reference_rejected_logps), each (B,): a cache or a
    no-grad pass. Training calls this with its config; scoring and new-user fitting with
    cfg.personalized() (alpha = 1: each pair's own user). Returns pdpo_objective's dict.

    Generic sampling, an estimator of eq. (pdpo) (cfg.generic_sampling, 0 < alpha < 1): each pair keeps
    its personalized term with probability alpha, else takes its generic term (user row 0), so
    E[loss] = alpha * l(e_u) + (1 - alpha) * l(e_0) from 2B rows instead of 4B.
    """
    alpha = cfg.alpha
    if cfg.generic_sampling and 0 < alpha < 1:
        keep = torch.rand(batch["user_rows"].shape) < alpha  # (B,)
        batch = {**batch, "user_rows": batch["user_rows"] * keep.to(batch["user_rows"].device)}
        alpha = 1.0
    decisions = cfg.decision_weight > 0
    policy = policy_logps(model, user_model, batch, alpha, average=cfg.average_logps, shared_prompt=cfg.shared_prompt,
                          return_token_logps=decisions)
    margins = decision_margins_by_term(policy, batch) if decisions else {}
    reference_chosen_logps, reference_rejected_logps = reference(batch)
    B = batch["user_rows"].shape[0]
    chosen_tokens = batch["policy_response_mask"][:B].sum(-1)  # (B,): |y_w|, the chosen rows come first
    return pdpo_objective(*(policy[name] for name in TERMS["policy"]), reference_chosen_logps, reference_rejected_logps,
                          *(policy[name] for name in TERMS["generic"]), alpha=alpha, beta=cfg.beta,
                          loss_type=cfg.loss, label_smoothing=cfg.label_smoothing, nll_weight=cfg.nll_weight,
                          chosen_tokens=torch.ones_like(chosen_tokens) if cfg.average_logps else chosen_tokens,
                          decision_weight=cfg.decision_weight, **margins)
