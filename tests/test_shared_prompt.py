"""Shared-prompt rows (prlhf.shared_prompt_rows): [prefix] [y_w] [y_l] in one row gives the same log-probs,
losses and gradients as the two-row layout, for LLaMA and GPT-J (partial rotary), with and without a user
prefix, with padding, for every alpha, and in a short train.py run. A wrong mask or wrong positions differ.
"""
import json

import pytest
import torch

import prlhf
import train as T
from tests.helpers import toy_setup
from tests.test_prlhf import PAIRS, make_batch, one_thread, tiny_model, user_models  # noqa: F401 (one_thread: autouse)


def batch_for(user_text: bool):
    """PAIRS: four pairs of unequal prompt and response lengths (padding in every tensor), users 0-3."""
    return make_batch([p if user_text else {**p, "text": []} for p in PAIRS])


def assert_same_logps(two_rows: dict, shared: dict, atol=1e-5):
    assert two_rows.keys() == shared.keys()
    for name, value in two_rows.items():
        if value is None:
            assert shared[name] is None, name
            continue
        assert value.shape == shared[name].shape == (len(PAIRS),), name
        assert torch.isfinite(shared[name]).all(), name
        assert torch.allclose(value, shared[name], atol=atol, rtol=0), (name, (value - shared[name]).abs().max())


def test_layout_of_shared_rows():
    """One pair by hand: prefix [BOS 5 6], y_w [10 EOS], y_l [12 13 EOS]; a second, longer pair pads the first."""
    batch = make_batch([dict(row=1, prompt=[5, 6], chosen=[10, 1], rejected=[12, 13, 1]),
                        dict(row=2, prompt=[7, 8, 9], chosen=[14, 15, 1], rejected=[16, 17, 1])])
    ids, segments, index = prlhf.shared_prompt_rows(batch["policy_input_ids"], batch["policy_response_mask"])
    P, C, R, _ = prlhf.PREFIX, prlhf.CHOSEN, prlhf.REJECTED, prlhf.PADDING
    assert ids[0, :8].tolist() == [0, 5, 6, 10, 1, 12, 13, 1]
    assert ids[1].tolist() == [0, 7, 8, 9, 14, 15, 1, 16, 17, 1]
    assert segments.tolist() == [[P, P, P, C, C, R, R, R, -1, -1], [P, P, P, P, C, C, C, R, R, R]]
    # two-row position -> shared position: chosen rows as they are, rejected rows skip y_w after the prefix
    assert index[0, :5].tolist() == [0, 1, 2, 3, 4] and index[2, :6].tolist() == [0, 1, 2, 5, 6, 7]
    assert index[3].tolist() == [0, 1, 2, 3, 7, 8, 9]


def test_attention_mask_and_positions_are_the_docstring_picture():
    P, C, R, D = prlhf.PREFIX, prlhf.CHOSEN, prlhf.REJECTED, prlhf.PADDING
    mask, positions = prlhf.shared_prompt_attention(torch.tensor([[P, P, P, C, C, R, R, R, D]]))
    expected = ["1........", "11.......", "111......", "1111.....", "11111....",
                "111..1...", "111..11..", "111..111.", "........1"]
    assert mask.shape == (1, 1, 9, 9) and mask.dtype == torch.bool
    assert ["".join("1" if v else "." for v in row) for row in mask[0, 0].tolist()] == expected
    assert positions.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 8]]


@pytest.mark.parametrize("family", ["llama", "gptj"])
@pytest.mark.parametrize("kind", ["uniform-empty", "uniform", "individual", "cluster"])
@pytest.mark.parametrize("user_text", [True, False])
def test_policy_logps_equal_two_rows(family, kind, user_text):
    model = tiny_model(family)
    user_model = user_models(model.config.hidden_size, model.tok_embeddings.weight)[kind]
    batch = batch_for(user_text)
    with torch.no_grad():
        for alpha in (0.0, 0.5, 1.0):
            for average in (False, True):
                two_rows = prlhf.policy_logps(model, user_model, batch, alpha, average=average)
                shared = prlhf.policy_logps(model, user_model, batch, alpha, average=average, shared_prompt=True)
                assert_same_logps(two_rows, shared)


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_reference_logps_equal_two_rows(family):
    model = tiny_model(family)
    batch = batch_for(user_text=True)
    two_rows = prlhf.reference_logps(model, batch)
    shared = prlhf.reference_logps(model, batch, shared_prompt=True)
    for a, b in zip(two_rows, shared):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_rewards_of_the_reward_model_equal_two_rows(family):
    model = tiny_model(family)
    user_model = user_models(model.config.hidden_size, model.tok_embeddings.weight)["individual"]
    head = prlhf.RewardHead(model.config.hidden_size)
    batch = batch_for(user_text=True)
    with torch.no_grad():
        two_rows = prlhf.personalized_rewards(model, head, user_model, batch, alpha=0.5)
        shared = prlhf.personalized_rewards(model, head, user_model, batch, alpha=0.5, shared_prompt=True)
    assert_same_logps(two_rows, shared)


def wrong_attention(segments, *, rejected_sees_chosen=False, positions_restart=True):
    mask, positions = REAL_ATTENTION(segments)
    if rejected_sees_chosen:  # plain causal attention between real tokens
        S = segments.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        mask = (causal & (segments[:, None, :] != prlhf.PADDING))[:, None] | mask
    if not positions_restart:
        positions = torch.arange(segments.shape[1]).expand_as(segments)
    return mask, positions


REAL_ATTENTION = prlhf.shared_prompt_attention


@pytest.mark.parametrize("wrong", [dict(rejected_sees_chosen=True), dict(positions_restart=False)])
def test_a_wrong_mask_or_wrong_positions_change_the_rejected_logps(monkeypatch, wrong):
    """The equality above is not automatic: y_l seeing y_w, or y_l's positions counting on after y_w, differ."""
    model = tiny_model("llama")
    user_model = user_models(model.config.hidden_size, model.tok_embeddings.weight)["individual"]
    batch = batch_for(user_text=True)
    with torch.no_grad():
        two_rows = prlhf.policy_logps(model, user_model, batch, 1.0)
        monkeypatch.setattr(prlhf, "shared_prompt_attention", lambda s: wrong_attention(s, **wrong))
        shared = prlhf.policy_logps(model, user_model, batch, 1.0, shared_prompt=True)
    assert torch.allclose(two_rows["policy_chosen_logps"], shared["policy_chosen_logps"], atol=1e-5)
    assert (two_rows["policy_rejected_logps"] - shared["policy_rejected_logps"]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gptj"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_pdpo_step_loss_and_gradients_equal_two_rows(family, grad_checkpointing):
    model = tiny_model(family).train()
    model.set_grad_checkpointing(grad_checkpointing)
    reference = tiny_model(family, seed=1)
    user_model = user_models(model.config.hidden_size, model.tok_embeddings.weight)["individual"]
    batch = batch_for(user_text=True)
    results = []
    for shared_prompt in (False, True):
        cfg = prlhf.PDPOConfig(alpha=0.5, beta=0.5, nll_weight=0.3, decision_weight=0.4,
                               shared_prompt=shared_prompt)

        def ref(b):
            return prlhf.reference_logps(reference, b, shared_prompt=shared_prompt)

        model.zero_grad(), user_model.zero_grad()
        loss = prlhf.pdpo_step(model, user_model, batch, ref, cfg)["losses"].mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *user_model.named_parameters()]}
        results.append((loss.detach(), grads))
    (loss_two_rows, grads_two_rows), (loss_shared, grads_shared) = results
    assert torch.allclose(loss_two_rows, loss_shared, atol=1e-6), (loss_two_rows, loss_shared)
    assert grads_two_rows.keys() == grads_shared.keys()
    for name, grad in grads_two_rows.items():
        assert grad.abs().max() > 0, name  # every parameter takes part
        assert torch.allclose(grad, grads_shared[name], atol=1e-5, rtol=1e-4), (name, (grad - grads_shared[name]).abs().max())


def test_a_ready_4d_mask_needs_position_ids():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_setup(tmp_path_factory.mktemp("toy"), pairs_per_user=8, n_valid_per_user=2, n_unseen_users=1)


def test_train_runs_with_and_without_shared_prompt_give_the_same_losses(toy, tmp_path):
    """train.py's flags end to end: policy rows, the precomputed reference, validation scoring."""
    losses, margins = {}, {}
    for flag in ("--shared-prompt", "--no-shared-prompt"):
        out = tmp_path / flag
        cfg = T.parse_args(["--model", str(toy / "base"), "--data", str(toy / "train.jsonl"), "--out", str(out),
                            "--valid", str(toy / "valid.jsonl"), "--quiet", "--batch-size", "4", "--max-steps", "4",
                            "--lr", "3e-3", "--alpha", "0.5", "--beta", "0.1", "--max-length", "96",
                            "--max-prompt-length", "32", flag])
        assert cfg.shared_prompt == (flag == "--shared-prompt")
        summary = T.train(cfg)
        losses[flag] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        margins[flag] = [user["mean_margin"] for user in summary["users"].values()]
    assert len(losses["--shared-prompt"]) == 4 and len(margins["--shared-prompt"]) == 5  # 4 known users, 1 unseen
    assert losses["--shared-prompt"] == pytest.approx(losses["--no-shared-prompt"], abs=1e-5)
    assert margins["--shared-prompt"] == pytest.approx(margins["--no-shared-prompt"], abs=1e-5)
