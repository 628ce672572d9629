"""Tests for prlhf.py: losses against hand-computed values, parity with TRL's DPOTrainer, personalized
log-probabilities against a slow row-by-row reference, gradients, user models, and a small end-to-end run.
"""
import copy
import math

import pytest
import torch

import model as lm
import prlhf

BOS, EOS, PAD = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every model here is tiny: one intra-op thread is faster, and far faster on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Small builders


def tiny_model(family="llama", vocab_size=40, hidden_size=32, n_layers=2, seed=0, std=0.2):
    """Our Transformer, with weights N(0, std) so logits are far from uniform and differences show."""
    cfg = lm.ModelConfig(family=family, vocab_size=vocab_size, hidden_size=hidden_size, n_layers=n_layers,
                         n_heads=4, n_kv_heads=2 if family == "llama" else 4, head_dim=hidden_size // 4,
                         intermediate_size=2 * hidden_size, rotary_dim=4 if family == "gptj" else None)
    model = lm.build_model(cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


def pad_rows(rows):
    """rows of (prefix ids, response ids) -> right-padded ids (N, T) and response mask (N, T)."""
    T = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p):len(p) + len(r)] = True
    return ids, mask


def make_batch(pairs):
    """pairs: dicts with row, text, prompt, chosen, rejected (token lists; responses end with EOS).
    Builds the batch layout data.collate_pairs produces, by hand."""
    policy, reference = [], []
    for key in ("chosen", "rejected"):
        for p in pairs:
            policy.append(([BOS] + p.get("text", []) + p["prompt"], p[key]))
            reference.append(([BOS] + p["prompt"], p[key]))
    policy_ids, policy_mask = pad_rows(policy)
    reference_ids, reference_mask = pad_rows(reference)
    return {"user_rows": torch.tensor([p["row"] for p in pairs]), "policy_input_ids": policy_ids,
            "policy_response_mask": policy_mask, "reference_input_ids": reference_ids,
            "reference_response_mask": reference_mask, "users": [str(p["row"]) for p in pairs],
            "groups": [None] * len(pairs), "index": torch.arange(len(pairs))}


PAIRS = [  # different lengths, user text on some rows, an unknown (row 0) user, a one-token response
    dict(row=1, text=[30, 31], prompt=[5, 6, 7], chosen=[10, 11, EOS], rejected=[12, EOS]),
    dict(row=3, text=[], prompt=[8, 9], chosen=[13, 14, 15, 16, EOS], rejected=[17, 18, EOS]),
    dict(row=0, text=[32], prompt=[5], chosen=[EOS], rejected=[19, 20, 21, EOS]),
    dict(row=2, text=[33, 34, 35], prompt=[6, 7, 8, 9], chosen=[22, EOS], rejected=[23, 24, EOS]),
]


def user_models(hidden_size, token_embedding, n_user_tokens=2):
    return {
        "uniform-empty": prlhf.make_user_model("uniform", 3, 0, hidden_size),
        "uniform": prlhf.make_user_model("uniform", 3, n_user_tokens, hidden_size, token_embedding=token_embedding),
        "individual": prlhf.make_user_model("individual", 3, n_user_tokens, hidden_size,
                                            token_embedding=token_embedding, seed=1),
        "individual-no-generic": prlhf.make_user_model("individual", 3, n_user_tokens, hidden_size,
                                                       add_generic_user=False, init="uniform", seed=2),
        "cluster": prlhf.make_user_model("cluster", 3, n_user_tokens, hidden_size, n_clusters=3,
                                         token_embedding=token_embedding, seed=3),
    }


# ----------------------------------------------------------------------------------------------
# Losses against values computed by hand (plain Python math)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


PC, PR = [-3.0, -5.5, -2.0], [-4.0, -5.0, -7.5]  # policy chosen / rejected log-probs with e_u
GC, GR = [-3.5, -6.0, -2.5], [-3.0, -5.2, -6.0]  # the same with e_0
RC, RR = [-3.2, -5.0, -2.2], [-3.9, -5.4, -7.0]  # reference


def hand_pair_loss(c, r, rc, rr, beta, loss_type, eps):
    logits = (c - rc) - (r - rr)
    if loss_type == "dpo":
        return -log_sigmoid(beta * logits)
    if loss_type == "cdpo":  # the DPO authors' trainers.py: -(1 - eps) logsig(h) - eps logsig(-h)
        return -(1 - eps) * log_sigmoid(beta * logits) - eps * log_sigmoid(-beta * logits)
    return (logits - 1 / (2 * beta)) ** 2  # IPO, logits not multiplied by beta


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])  # 0.25: the mix is not symmetric
@pytest.mark.parametrize("loss_type", ["dpo", "cdpo", "ipo"])
def test_pdpo_loss_by_hand(loss_type, alpha):
    beta, eps = 0.5, (0.2 if loss_type == "cdpo" else 0.0)
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    out = prlhf.pdpo_loss(t(PC) if alpha > 0 else None, t(PR) if alpha > 0 else None, t(RC), t(RR),
                          t(GC) if alpha < 1 else None, t(GR) if alpha < 1 else None,
                          alpha=alpha, beta=beta, loss_type=loss_type, label_smoothing=eps)
    for b in range(3):
        personalized = hand_pair_loss(PC[b], PR[b], RC[b], RR[b], beta, loss_type, eps)
        generic = hand_pair_loss(GC[b], GR[b], RC[b], RR[b], beta, loss_type, eps)
        assert out["losses"][b].item() == pytest.approx(alpha * personalized + (1 - alpha) * generic, abs=1e-12)
        if alpha > 0:
            assert out["chosen_rewards"][b].item() == pytest.approx(beta * (PC[b] - RC[b]), abs=1e-12)
            assert out["rejected_rewards"][b].item() == pytest.approx(beta * (PR[b] - RR[b]), abs=1e-12)
            assert out["accuracies"][b].item() == float(PC[b] - RC[b] > PR[b] - RR[b])
        if alpha < 1:
            assert out["generic_chosen_rewards"][b].item() == pytest.approx(beta * (GC[b] - RC[b]), abs=1e-12)
            assert out["generic_accuracies"][b].item() == float(GC[b] - RC[b] > GR[b] - RR[b])
    assert (out["accuracies"] is None) == (alpha == 0)
    assert (out["generic_accuracies"] is None) == (alpha == 1)
    # the data above has both correct and wrong pairs, so accuracy is a real check
    if alpha > 0:
        assert 0 < out["accuracies"].sum() < 3


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_nll_term_by_hand(alpha):
    """L + lambda * [alpha * (-log pi(y_w|x,e_u) / |y_w|) + (1 - alpha) * (-log pi(y_w|x,e_0) / |y_w|)]."""
    beta, lam, tokens = 0.5, 0.7, [3, 5, 2]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    args = (t(PC) if alpha > 0 else None, t(PR) if alpha > 0 else None, t(RC), t(RR),
            t(GC) if alpha < 1 else None, t(GR) if alpha < 1 else None)
    plain = prlhf.pdpo_objective(*args, alpha=alpha, beta=beta)
    out = prlhf.pdpo_objective(*args, alpha=alpha, beta=beta, nll_weight=lam, chosen_tokens=t(tokens))
    assert plain["nll"] is None
    for b in range(3):
        nll = alpha * (-PC[b] / tokens[b]) + (1 - alpha) * (-GC[b] / tokens[b])
        assert out["nll"][b].item() == pytest.approx(nll, abs=1e-12)
        assert out["losses"][b].item() == pytest.approx(plain["losses"][b].item() + lam * nll, abs=1e-12)
    assert torch.equal(out["chosen_rewards"] if alpha > 0 else out["generic_chosen_rewards"],
                       plain["chosen_rewards"] if alpha > 0 else plain["generic_chosen_rewards"])  # rewards untouched
    with pytest.raises(ValueError, match="chosen_tokens"):
        prlhf.pdpo_objective(*args, alpha=alpha, beta=beta, nll_weight=lam)


def test_pdpo_step_counts_chosen_tokens_for_the_nll_term():
    """pdpo_step's |y_w| is the chosen rows' response tokens; IPO's per-token means need no division."""
    model = tiny_model(vocab_size=12, hidden_size=16, n_layers=1, seed=0)
    batch = make_batch([dict(row=1, prompt=[3, 4], chosen=[7, 8, EOS], rejected=[9, EOS]),
                        dict(row=0, prompt=[5], chosen=[7, EOS], rejected=[10, 9, 9, EOS])])
    user_model = prlhf.make_user_model("individual", 1, 1, 16, token_embedding=model.tok_embeddings.weight)
    reference = lambda b: prlhf.reference_logps(model, b)  # noqa: E731
    for loss in ("dpo", "ipo"):
        cfg = prlhf.PDPOConfig(alpha=1.0, loss=loss, nll_weight=1.0)
        out = prlhf.pdpo_step(model, user_model, batch, reference, cfg)
        logps = prlhf.policy_logps(model, user_model, batch, 1.0, average=cfg.average_logps)["policy_chosen_logps"]
        tokens = torch.tensor([3.0, 2.0]) if loss == "dpo" else torch.ones(2)
        torch.testing.assert_close(out["nll"], (-logps / tokens).detach())


BRANCH_PAIRS = [  # where y_w and y_l first part: the 2nd response token, the 1st, the EOS against a word, never
    dict(row=1, text=[30], prompt=[5, 6, 7], chosen=[10, 11, 12, EOS], rejected=[10, 13, 12, EOS], t_star=1),
    dict(row=3, prompt=[8, 9], chosen=[14, EOS], rejected=[15, 16, 17, EOS], t_star=0),
    dict(row=0, prompt=[5], chosen=[18, 19, EOS], rejected=[18, 19, 20, 21, EOS], t_star=2),
    dict(row=2, prompt=[6, 7], chosen=[22, EOS], rejected=[22, EOS], t_star=None),
]


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_decision_margins_by_hand(shared_prompt):
    """m = log p(y_w[t*] | ..., e) - log p(y_l[t*] | ..., e) at the first response position where the two differ,
    read off the full log-softmax of y_w's own row (slow_sequence's layout); +inf where they never differ."""
    model = tiny_model("llama")
    user_model = user_models(32, model.tok_embeddings.weight)["individual"]
    batch = make_batch(BRANCH_PAIRS)
    with torch.no_grad():
        out = prlhf.decision_margins_by_term(prlhf.policy_logps(model, user_model, batch, alpha=0.5, shared_prompt=shared_prompt, return_token_logps=True), batch)
    for b, pair in enumerate(BRANCH_PAIRS):
        for name, row in (("policy_decision_margins", pair["row"]), ("generic_decision_margins", 0)):
            if pair["t_star"] is None:
                assert out[name][b].item() == math.inf
                continue
            ids = torch.tensor([BOS] + pair.get("text", []) + pair["prompt"] + pair["chosen"])
            e_u = slow_user_embedding(user_model, row)
            with torch.no_grad():
                x = torch.cat([model.tok_embeddings(ids[:1]), e_u, model.tok_embeddings(ids[1:])])[None]
                logp = torch.log_softmax(model.output(model(inputs_embeds=x, return_hidden=True)[0]).double(), -1)
            at = len(ids) - len(pair["chosen"]) + pair["t_star"]  # the token y_w[t*] in ids
            position = e_u.shape[0] + at - 1  # the position that predicts it
            want = logp[position, pair["chosen"][pair["t_star"]]] - logp[position, pair["rejected"][pair["t_star"]]]
            assert out[name][b].item() == pytest.approx(want.item(), abs=1e-4), (b, name)
    assert out["policy_decision_margins"][0] != out["generic_decision_margins"][0]  # e_u and e_0 differ
    without = prlhf.policy_logps(model, user_model, batch, alpha=0.5, shared_prompt=shared_prompt)
    assert "policy_decision_margins" not in without


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
def test_decision_term_by_hand(alpha):
    """L + mu * [alpha * (-log sigmoid(m_u)) + (1 - alpha) * (-log sigmoid(m_0))]; m = +inf adds nothing."""
    beta, mu = 0.5, 0.7
    m_u, m_0 = [0.3, -1.2, math.inf], [-0.4, 2.0, math.inf]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    args = (t(PC) if alpha > 0 else None, t(PR) if alpha > 0 else None, t(RC), t(RR),
            t(GC) if alpha < 1 else None, t(GR) if alpha < 1 else None)
    plain = prlhf.pdpo_objective(*args, alpha=alpha, beta=beta)
    out = prlhf.pdpo_objective(*args, alpha=alpha, beta=beta, decision_weight=mu,
                          policy_decision_margins=t(m_u) if alpha > 0 else None,
                          generic_decision_margins=t(m_0) if alpha < 1 else None)
    assert plain["decision"] is None
    for b in range(3):
        term = alpha * -log_sigmoid(m_u[b]) + (1 - alpha) * -log_sigmoid(m_0[b]) if b < 2 else 0.0
        assert out["decision"][b].item() == pytest.approx(term, abs=1e-12)
        assert out["losses"][b].item() == pytest.approx(plain["losses"][b].item() + mu * term, abs=1e-12)
    with pytest.raises(ValueError, match="decision margins"):
        prlhf.pdpo_objective(*args, alpha=alpha, beta=beta, decision_weight=mu)


def test_decision_term_gradients_are_finite_with_a_pair_that_never_parts():
    model = tiny_model("llama").train()
    user_model = user_models(32, model.tok_embeddings.weight)["individual"]
    batch = make_batch(BRANCH_PAIRS)  # the last pair's responses are the same: m = +inf
    cfg = prlhf.PDPOConfig(alpha=0.5, decision_weight=1.0)
    out = prlhf.pdpo_step(model, user_model, batch, lambda b: prlhf.reference_logps(model, b), cfg)
    assert out["decision"][-1].item() == 0.0 and (out["decision"][:-1] > 0).all()
    out["losses"].mean().backward()
    grads = [p.grad for p in [*model.parameters(), *user_model.parameters()] if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_decision_weight_must_be_a_number_at_least_zero():
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="--decision-weight"):
            prlhf.PDPOConfig(decision_weight=bad)


def test_label_smoothing_is_cdpo_only():
    x = [torch.tensor(v) for v in (PC, PR, RC, RR)]
    dpo = prlhf.pdpo_loss(*x, alpha=1.0, beta=0.3)["losses"]
    torch.testing.assert_close(prlhf.pdpo_loss(*x, alpha=1.0, beta=0.3, loss_type="cdpo")["losses"], dpo)
    torch.testing.assert_close(prlhf.pdpo_loss(*x, alpha=1.0, beta=0.3, label_smoothing=0.1)["losses"], dpo)
    cdpo = prlhf.pdpo_loss(*x, alpha=1.0, beta=0.3, loss_type="cdpo", label_smoothing=0.1)["losses"]
    assert not torch.allclose(cdpo, dpo)
    with pytest.raises(ValueError, match="generic"):
        prlhf.pdpo_loss(*x, alpha=0.5, beta=0.3)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])  # 0.25: the mix is not symmetric
def test_prm_loss_by_hand(alpha):
    rc, rr, gc, gr = [1.5, -0.5, 0.2], [0.5, 0.3, 0.9], [0.1, 0.4, -1.0], [0.2, -0.6, -2.0]
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    out = prlhf.prm_loss(t(rc) if alpha > 0 else None, t(rr) if alpha > 0 else None,
                         t(gc) if alpha < 1 else None, t(gr) if alpha < 1 else None, alpha=alpha)
    for b in range(3):
        want = -alpha * log_sigmoid(rc[b] - rr[b]) - (1 - alpha) * log_sigmoid(gc[b] - gr[b])
        assert out["losses"][b].item() == pytest.approx(want, abs=1e-12)
    if alpha > 0:
        assert out["accuracies"].tolist() == [1.0, 0.0, 0.0]
    if alpha < 1:
        assert out["generic_accuracies"].tolist() == [0.0, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------
# Parity with TRL's DPOTrainer (uniform user model without embedding, alpha = 1 = vanilla DPO)


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """A word-level tokenizer, a tiny LlamaForCausalLM policy (seed 1) and reference (seed 0)."""
    pytest.importorskip("trl")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tests.hf_models import tiny_llama

    words = "the cat sat on a mat dog ran far fast slow long short answer please write story about sun moon".split()
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    root = tmp_path_factory.mktemp("trl")
    tiny_llama(root / "policy", vocab_size=97, seed=1)
    tiny_llama(root / "reference", vocab_size=97, seed=0)
    data = dict(prompt=["write a story about the cat", "please answer", "the sun"],
                chosen=[" the cat sat on a mat", " long answer", " sun moon moon"],
                rejected=[" dog ran", " short answer please write a story", " far"])
    return tokenizer, root, data


def trl_loss_and_batch(trl_setup, loss_type, beta):
    """TRL's loss for one batch of all pairs, its logged metrics, and the collated batch it scored."""
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer, root, data = trl_setup
    policy = transformers.LlamaForCausalLM.from_pretrained(root / "policy", dtype=torch.float32)
    reference = transformers.LlamaForCausalLM.from_pretrained(root / "reference", dtype=torch.float32)
    args = DPOConfig(output_dir=str(root / f"out-{loss_type}"), loss_type=loss_type, beta=beta, bf16=False,
                     gradient_checkpointing=False, report_to="none", use_cpu=True, max_length=None,
                     per_device_train_batch_size=len(data["prompt"]), disable_dropout=True)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_dict(data),
                         processing_class=tokenizer)
    dataset = trainer.train_dataset
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return loss.item(), metrics, batch


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renaming gradient_checkpointing
@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_vanilla_dpo_and_ipo_match_trl(trl_setup, loss_type):
    beta = 0.1
    trl_loss, metrics, trl_batch = trl_loss_and_batch(trl_setup, {"dpo": "sigmoid", "ipo": "ipo"}[loss_type], beta)
    _, root, _ = trl_setup
    # exactly the token ids TRL scored: [BOS] [prompt] [response] [EOS], right-padded, completion mask
    ids, mask = trl_batch["input_ids"], trl_batch["completion_mask"].bool()
    assert (ids[:, 0] == BOS).all() and mask.any(dim=1).all()
    B = ids.shape[0] // 2
    batch = {"user_rows": torch.zeros(B, dtype=torch.long), "policy_input_ids": ids, "policy_response_mask": mask,
             "reference_input_ids": ids, "reference_response_mask": mask}
    policy, reference = lm.load_pretrained(root / "policy"), lm.load_pretrained(root / "reference")
    cfg = prlhf.PDPOConfig.vanilla(beta=beta, loss=loss_type)
    user_model = prlhf.make_user_model(cfg.user_model, 0, cfg.n_user_tokens, policy.config.hidden_size)
    with torch.no_grad():
        p = prlhf.policy_logps(policy, user_model, batch, cfg.alpha, average=cfg.average_logps)
        ref_chosen, ref_rejected = prlhf.reference_logps(reference, batch, average=cfg.average_logps)
    out = prlhf.pdpo_loss(p["policy_chosen_logps"], p["policy_rejected_logps"], ref_chosen, ref_rejected,
                          alpha=cfg.alpha, beta=cfg.beta, loss_type=cfg.loss)
    ours = out["losses"].mean().item()
    print(f"\n{loss_type}: ours {ours:.8f}  TRL {trl_loss:.8f}  |diff| {abs(ours - trl_loss):.2e}")
    assert abs(ours - trl_loss) < 1e-5
    assert abs(trl_loss - math.log(2)) > 1e-2  # policy != reference, so the loss is not the trivial log 2
    if loss_type == "dpo":  # TRL logs the summed log-probs and beta * log-ratios
        assert p["policy_chosen_logps"].mean().item() == pytest.approx(metrics["logps/chosen"], abs=1e-5)
        assert p["policy_rejected_logps"].mean().item() == pytest.approx(metrics["logps/rejected"], abs=1e-5)
        assert out["chosen_rewards"].mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)
        assert out["rejected_rewards"].mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-6)
        assert out["accuracies"].mean().item() == pytest.approx(metrics["rewards/accuracies"])


# ----------------------------------------------------------------------------------------------
# Personalized log-probabilities against a slow, row-by-row reference


def slow_user_embedding(user_model, row):
    """e_u for one row, straight from the parameters and PAPER.md's definitions: (T_u, d)."""
    if isinstance(user_model, prlhf.UniformUserModel):
        return torch.zeros(0, user_model.hidden_size) if user_model.embedding is None else user_model.embedding
    if isinstance(user_model, prlhf.IndividualUserModel):
        table = user_model.embeddings
        if user_model.add_generic_user and row != 0:
            return table[0] + table[row]
        return table[row]
    weights = torch.softmax(user_model.user_logits[row], dim=0)
    return sum(weights[k] * user_model.cluster_embeddings[k] for k in range(user_model.n_clusters))


def slow_sequence(model, user_model, ids, mask, row):
    """One unpadded sequence: explicit [BOS] [e_u] [rest] embeddings, full logits, log_softmax in float64.
    Returns (sum of response-token log-probs, hidden state at the last response token)."""
    length = int(mask.nonzero().max()) + 1  # drop the right padding
    ids, mask = ids[:length], mask[:length]
    e_u = slow_user_embedding(user_model, row)
    T_u = e_u.shape[0]
    emb = model.tok_embeddings(ids)
    x = torch.cat([emb[:1], e_u, emb[1:]])[None]  # (1, T_u + length, d)
    hidden = model(inputs_embeds=x, return_hidden=True)[0]
    logp = torch.log_softmax(model.output(hidden).double(), dim=-1)
    total = 0.0
    for t in range(1, length):
        if mask[t]:  # token t sits at position T_u + t and is predicted by position T_u + t - 1
            total = total + logp[T_u + t - 1, ids[t]]
    return total, hidden[T_u + length - 1]


@pytest.mark.parametrize("family", ["llama", "gptj"])
@pytest.mark.parametrize("kind", ["uniform-empty", "uniform", "individual", "individual-no-generic", "cluster"])
def test_policy_logps_match_slow_reference(kind, family):
    model = tiny_model(family)
    user_model = user_models(32, model.tok_embeddings.weight)[kind]
    batch = make_batch(PAIRS)
    B = len(PAIRS)
    for average in (False, True):
        with torch.no_grad():
            p = prlhf.policy_logps(model, user_model, batch, alpha=0.5, average=average)
            ref_chosen, ref_rejected = prlhf.reference_logps(model, batch, average=average)
        for b, pair in enumerate(PAIRS):
            for key, half in (("chosen", 0), ("rejected", 1)):
                i = half * B + b
                n = len(pair[key])
                ids, mask = batch["policy_input_ids"][i], batch["policy_response_mask"][i]
                with torch.no_grad():
                    want = slow_sequence(model, user_model, ids, mask, pair["row"])[0] / (n if average else 1)
                    want_generic = slow_sequence(model, user_model, ids, mask, 0)[0] / (n if average else 1)
                    want_ref = slow_sequence(model, prlhf.make_user_model("uniform", 0, 0, 32),
                                             batch["reference_input_ids"][i], batch["reference_response_mask"][i],
                                             0)[0] / (n if average else 1)
                assert p[f"policy_{key}_logps"][b].item() == pytest.approx(want.item(), abs=2e-5)
                assert p[f"generic_{key}_logps"][b].item() == pytest.approx(want_generic.item(), abs=2e-5)
                assert (ref_chosen, ref_rejected)[half][b].item() == pytest.approx(want_ref.item(), abs=2e-5)


@pytest.mark.parametrize("kind", ["uniform", "individual", "cluster"])
def test_personalized_rewards_match_slow_reference(kind):
    model = tiny_model()
    user_model = user_models(32, model.tok_embeddings.weight)[kind]
    head = prlhf.RewardHead(32)
    batch = make_batch(PAIRS)
    B = len(PAIRS)
    with torch.no_grad():
        r = prlhf.personalized_rewards(model, head, user_model, batch, alpha=0.5)
        for b, pair in enumerate(PAIRS):
            for key, half in (("chosen", 0), ("rejected", 1)):
                ids, mask = batch["policy_input_ids"][half * B + b], batch["policy_response_mask"][half * B + b]
                last_hidden = slow_sequence(model, user_model, ids, mask, pair["row"])[1]
                generic_hidden = slow_sequence(model, user_model, ids, mask, 0)[1]
                want = head.score.weight[0] @ last_hidden + head.score.bias[0]
                want_generic = head.score.weight[0] @ generic_hidden + head.score.bias[0]
                assert r[f"{key}_rewards"][b].item() == pytest.approx(want.item(), abs=1e-5)
                assert r[f"generic_{key}_rewards"][b].item() == pytest.approx(want_generic.item(), abs=1e-5)


@pytest.mark.parametrize("kind, alpha, rows", [
    ("individual", 0.5, 16), ("individual", 1.0, 8), ("individual", 0.0, 8),
    ("uniform", 0.5, 8), ("uniform-empty", 1.0, 8), ("cluster", 0.3, 16)])
def test_one_policy_forward_of_2B_or_4B_rows(kind, alpha, rows):
    model = tiny_model()
    user_model = user_models(32, model.tok_embeddings.weight)[kind]
    calls = []
    model.register_forward_hook(lambda module, args, kwargs_out: calls.append(kwargs_out.shape[0]))
    p = prlhf.policy_logps(model, user_model, make_batch(PAIRS), alpha)
    assert calls == [rows]  # B = 4 pairs: one call, 2B or 4B rows
    assert (p["policy_chosen_logps"] is None) == (alpha == 0)
    assert (p["generic_chosen_logps"] is None) == (alpha == 1)
    if kind == "uniform" and 0 < alpha < 1:  # every user is e_0: the generic term is the same rows
        assert p["generic_chosen_logps"] is p["policy_chosen_logps"]


def test_embed_with_user_prefix_layout():
    model = tiny_model()
    ids = torch.tensor([[BOS, 5, 6, 7], [BOS, 8, 9, PAD]])
    e_u = torch.randn(2, 3, 32)
    x = prlhf.embed_with_user_prefix(model, ids, e_u)
    assert x.shape == (2, 3 + 4, 32)
    emb = model.tok_embeddings(ids)
    torch.testing.assert_close(x[:, 0], emb[:, 0])  # [BOS]
    torch.testing.assert_close(x[:, 1:4], e_u)  # [e_u]
    torch.testing.assert_close(x[:, 4:], emb[:, 1:])  # [user text] [prompt] [response]


def test_explicit_user_text_changes_logps():
    """Implicit only, explicit only (no embedding) and both: user text tokens change the result."""
    model = tiny_model()
    with_text = make_batch([PAIRS[0]])
    without_text = make_batch([{**PAIRS[0], "text": []}])
    for kind in ("uniform-empty", "individual"):
        user_model = user_models(32, model.tok_embeddings.weight)[kind]
        with torch.no_grad():
            a = prlhf.policy_logps(model, user_model, with_text, 1.0)["policy_chosen_logps"]
            b = prlhf.policy_logps(model, user_model, without_text, 1.0)["policy_chosen_logps"]
        assert (a - b).abs().item() > 1e-3
    # the reference never sees the user text
    with torch.no_grad():
        torch.testing.assert_close(prlhf.reference_logps(model, with_text), prlhf.reference_logps(model, without_text))


def test_bf16_model_with_float32_user_model():
    model = tiny_model().to(torch.bfloat16)
    user_model = user_models(32, model.tok_embeddings.weight)["individual"]
    p = prlhf.policy_logps(model, user_model, make_batch(PAIRS), 0.5)
    assert p["policy_chosen_logps"].dtype == torch.float32 and user_model.embeddings.dtype == torch.float32
    p["policy_chosen_logps"].sum().backward()
    assert user_model.embeddings.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Gradients, unknown users, cluster weights


def test_gradients_reach_user_model_and_policy_not_reference():
    policy = tiny_model()
    reference = copy.deepcopy(policy)  # left trainable on purpose: reference_logps itself must not track grads
    for kind in ("individual", "cluster"):
        user_model = user_models(32, policy.tok_embeddings.weight)[kind]
        batch = make_batch(PAIRS)
        policy.zero_grad()
        p = prlhf.policy_logps(policy, user_model, batch, 0.5)
        ref_chosen, ref_rejected = prlhf.reference_logps(reference, batch)
        assert not ref_chosen.requires_grad
        out = prlhf.pdpo_loss(p["policy_chosen_logps"], p["policy_rejected_logps"], ref_chosen, ref_rejected,
                              p["generic_chosen_logps"], p["generic_rejected_logps"], alpha=0.5, beta=0.5)
        out["losses"].mean().backward()
        for name, param in list(user_model.named_parameters()) + list(policy.named_parameters()):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert all(param.grad is None for param in reference.parameters())
        if kind == "individual":  # rows of the users in the batch (0, 1, 2, 3) all learn
            assert (user_model.embeddings.grad.flatten(1).abs().sum(1) > 0).all()


def test_unknown_user_gets_the_generic_embedding():
    registry = prlhf.UserRegistry.from_users(["alice", "bob"])
    assert registry.row("stranger") == 0 and registry.row(None) == 0
    model = tiny_model()
    for kind in ("individual", "individual-no-generic", "cluster", "uniform"):
        user_model = user_models(32, model.tok_embeddings.weight)[kind]
        rows = registry.rows(["stranger", "alice", "bob", "carol"])
        e = user_model(rows)
        torch.testing.assert_close(e[0], slow_user_embedding(user_model, 0))
        torch.testing.assert_close(e[3], e[0])
        if kind != "uniform":
            assert not torch.allclose(e[1], e[0]) and not torch.allclose(e[1], e[2])
    # an unknown user's personalized log-probs are the generic ones
    user_model = user_models(32, model.tok_embeddings.weight)["individual"]
    with torch.no_grad():
        p = prlhf.policy_logps(model, user_model, make_batch([PAIRS[2]]), 0.5)
    torch.testing.assert_close(p["policy_chosen_logps"], p["generic_chosen_logps"])


def test_cluster_weights_sum_to_one():
    user_model = prlhf.make_user_model("cluster", 6, 2, 16, n_clusters=4, init="uniform", seed=5)
    weights = user_model.cluster_weights(torch.arange(7))
    assert weights.shape == (7, 4) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))
    e = user_model(torch.arange(7))  # (7, T_u, d): a convex combination of the c_k
    torch.testing.assert_close(e, torch.einsum("bk,ktd->btd", weights, user_model.cluster_embeddings))


# ----------------------------------------------------------------------------------------------
# Initialization, registry, save/load


def test_initialization():
    table = torch.randn(50, 16)
    a = prlhf.make_user_model("individual", 4, 3, 16, token_embedding=table, seed=7)
    b = prlhf.make_user_model("individual", 4, 3, 16, token_embedding=table, seed=7)
    c = prlhf.make_user_model("individual", 4, 3, 16, token_embedding=table, seed=8)
    torch.testing.assert_close(a.embeddings, b.embeddings)  # seeded
    assert not torch.equal(a.embeddings, c.embeddings)
    for vector in a.embeddings.detach().reshape(-1, 16):  # every row, offsets included, is a vocabulary row
        assert (table == vector).all(dim=1).any()
    u = prlhf.make_user_model("cluster", 4, 2, 16, n_clusters=3, init="uniform", init_range=0.1, seed=0)
    assert u.cluster_embeddings.abs().max() <= 0.1 and u.cluster_embeddings.abs().max() > 0.05
    assert u.user_logits.shape == (5, 3)
    assert not any(prlhf.make_user_model("individual", 4, 0, 16).parameters())  # T_u = 0: no embedding
    with pytest.raises(ValueError, match="token_embedding"):
        prlhf.make_user_model("individual", 4, 1, 16)
    with pytest.raises(ValueError, match="kind"):
        prlhf.make_user_model("per-user", 4, 1, 16, init="uniform")


def test_registry():
    registry = prlhf.UserRegistry.from_users(["w2", 7, "w1", "w2", None, "7"])
    assert registry.users == ["7", "w1", "w2"] and len(registry) == 4 and registry.n_users == 3
    assert registry.row(7) == registry.row("7") == 1 and registry.row("w2") == 3
    assert registry.rows(["w1", "nobody", 7]).tolist() == [2, 0, 1]


def test_saved_json_files_with_a_byte_order_mark_and_crlf_still_load(tmp_path):
    """users.json and user_model.json edited by hand on Windows (a UTF-8 BOM, CRLF) load as before."""
    user_model = user_models(16, torch.randn(30, 16), n_user_tokens=2)["individual"]
    prlhf.save_user_model(tmp_path, user_model, prlhf.UserRegistry.from_users(["a", "b", "c"]))
    for name in ("users.json", "user_model.json"):
        text = (tmp_path / name).read_text()
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    loaded, registry = prlhf.load_user_model(tmp_path)
    assert registry.users == ["a", "b", "c"] and torch.equal(loaded.embeddings, user_model.embeddings)


@pytest.mark.parametrize("kind", ["uniform-empty", "uniform", "individual", "individual-no-generic", "cluster"])
def test_save_load_round_trip(tmp_path, kind):
    user_model = user_models(16, torch.randn(30, 16), n_user_tokens=3)[kind]
    registry = prlhf.UserRegistry.from_users(["a", "b", "c"])
    prlhf.save_user_model(tmp_path, user_model, registry)
    loaded, loaded_registry = prlhf.load_user_model(tmp_path)
    assert type(loaded) is type(user_model) and loaded.config() == user_model.config()
    assert loaded_registry.users == registry.users
    rows = torch.tensor([0, 1, 2, 3, 1])
    torch.testing.assert_close(loaded(rows), user_model(rows), rtol=0, atol=0)
    (tmp_path / "user_model.json").write_text('{"kind": "per-user"}')
    with pytest.raises(ValueError, match="user_model.json"):
        prlhf.load_user_model(tmp_path)


def test_vanilla_configuration():
    cfg = prlhf.PDPOConfig.vanilla(beta=0.1)
    assert (cfg.user_model, cfg.n_user_tokens, cfg.alpha, cfg.beta) == ("uniform", 0, 1.0, 0.1)
    assert not cfg.average_logps and prlhf.PDPOConfig(loss="ipo").average_logps
    with pytest.raises(ValueError, match="alpha"):
        prlhf.PDPOConfig(alpha=1.5)


# ----------------------------------------------------------------------------------------------
# End to end: conflicting users. P-DPO serves both; vanilla DPO can only serve the majority.


def conflicting_pairs():
    """Two prompts; for each, user 1 prefers A over B three times, user 2 prefers B over A once."""
    pairs = []
    for prompt, a, b in (([3, 4], [7, 8, EOS], [9, 10, EOS]), ([5, 6], [7, 7, EOS], [10, 9, EOS])):
        pairs += [dict(row=1, prompt=prompt, chosen=a, rejected=b)] * 3
        pairs += [dict(row=2, prompt=prompt, chosen=b, rejected=a)]
    return pairs


def train_pdpo(cfg: prlhf.PDPOConfig, steps=150, seed=0):
    """Train policy and user model from the same start on conflicting_pairs(); return the accuracy of
    the implicit personalized reward overall, for user 1 (the majority) and for user 2."""
    torch.manual_seed(seed)
    policy = tiny_model(vocab_size=12, hidden_size=32, n_layers=1, seed=seed, std=0.1)
    reference = copy.deepcopy(policy).requires_grad_(False)
    user_model = prlhf.make_user_model(cfg.user_model, 2, cfg.n_user_tokens, 32, n_clusters=cfg.n_clusters,
                                       add_generic_user=cfg.add_generic_user,
                                       token_embedding=policy.tok_embeddings.weight, seed=seed)
    batch = make_batch(conflicting_pairs())
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(user_model.parameters()), lr=1e-2)
    ref_chosen, ref_rejected = prlhf.reference_logps(reference, batch)
    for _ in range(steps):
        p = prlhf.policy_logps(policy, user_model, batch, cfg.alpha)
        out = prlhf.pdpo_loss(p["policy_chosen_logps"], p["policy_rejected_logps"], ref_chosen, ref_rejected,
                              p["generic_chosen_logps"], p["generic_rejected_logps"], alpha=cfg.alpha, beta=cfg.beta)
        optimizer.zero_grad()
        out["losses"].mean().backward()
        optimizer.step()
    with torch.no_grad():  # evaluate as each user (alpha = 1: the personalized reward only)
        p = prlhf.policy_logps(policy, user_model, batch, 1.0)
        out = prlhf.pdpo_loss(p["policy_chosen_logps"], p["policy_rejected_logps"], ref_chosen, ref_rejected,
                              alpha=1.0, beta=cfg.beta)
    rows, accuracies = batch["user_rows"], out["accuracies"]
    return accuracies.mean().item(), accuracies[rows == 1].mean().item(), accuracies[rows == 2].mean().item()


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_pdpo_serves_conflicting_users(kind):
    cfg = prlhf.PDPOConfig(user_model=kind, n_user_tokens=1, n_clusters=2, alpha=0.5)
    assert train_pdpo(cfg) == (1.0, 1.0, 1.0)


def test_vanilla_dpo_serves_only_the_majority():
    overall, majority, minority = train_pdpo(prlhf.PDPOConfig.vanilla())
    assert overall <= 0.75 + 1e-6  # one policy for everyone: at best the majority share
    assert majority == 1.0 and minority == 0.0
