"""PMOE policies: the mixture math against hand-worked numbers, two-stage sampling, the
router's frequency regression, gradient routing, and the model head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from algos.pmoe import (
    best_expert_from_q,
    best_only_mixture_log_probs,
    mixture_log_probs,
    q_loss,
    router_loss,
    two_stage_sample,
)

TOL = dict(rtol=1e-5, atol=1e-6)


def test_mixture_hand_worked_and_normalised() -> None:
    # psi = [0.25, 0.75]; pi_1 = [0.5, 0.5], pi_2 = [0.1, 0.9]
    # mix = 0.25 * [0.5, 0.5] + 0.75 * [0.1, 0.9] = [0.125 + 0.075, 0.125 + 0.675] = [0.2, 0.8]
    elp = torch.tensor([[0.5, 0.5], [0.1, 0.9]]).log()
    mix = mixture_log_probs(elp, torch.tensor([0.25, 0.75]).log())
    assert_close(mix.exp(), torch.tensor([0.2, 0.8]), **TOL)
    g = torch.Generator().manual_seed(0)
    elp = torch.log_softmax(torch.randn(3, 5, 4, 7, generator=g), -1)
    router = torch.log_softmax(torch.randn(3, 5, 4, generator=g), -1)
    assert_close(mixture_log_probs(elp, router).exp().sum(-1), torch.ones(3, 5), **TOL)


def test_two_stage_sampling_matches_the_mixture() -> None:
    elp = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]).log()
    router = torch.tensor([0.6, 0.4]).log()
    # mix = 0.6 * [0.5, 0.3, 0.2] + 0.4 * [0.1, 0.1, 0.8] = [0.34, 0.22, 0.44]
    expected = torch.tensor([0.34, 0.22, 0.44])
    n = 40000
    g = torch.Generator().manual_seed(0)
    actions, experts = two_stage_sample(elp.expand(n, 2, 3), router.expand(n, 2), g)
    counts = torch.bincount(actions, minlength=3).double()
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    assert chi2 < 13.82  # the chi-square 0.999 quantile with 2 degrees of freedom
    assert abs(float((experts == 0).double().mean()) - 0.6) < 0.01


def test_router_regression_converges_to_the_best_expert_frequencies() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    router = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    for _ in range(400):
        feats = torch.randn(256, 4, generator=g) * 0.1
        best = torch.multinomial(p, 256, replacement=True, generator=g)
        loss = router_loss(torch.softmax(router(feats), -1), best, torch.ones(256))
        opt.zero_grad()
        loss.backward()
        opt.step()
    psi = torch.softmax(router(torch.zeros(1, 4)), -1)[0]
    assert_close(psi, p, atol=0.02, rtol=0)


def test_best_only_gradient_reaches_only_the_best_expert() -> None:
    elp = torch.log_softmax(torch.randn(2, 3, 4), -1).requires_grad_()
    router = torch.log_softmax(torch.randn(2, 3), -1).requires_grad_()
    best = torch.tensor([2, 0])
    out = best_only_mixture_log_probs(elp, router, best)
    assert_close(out, mixture_log_probs(elp, router), **TOL)  # same value
    out[:, 1].sum().backward()
    for b, k in enumerate(best.tolist()):
        for j in range(3):
            assert (elp.grad[b, j].abs().sum() > 0) == (j == k)
    assert router.grad is None


def test_best_expert_and_q_loss_hand_worked() -> None:
    # expert 0 puts 0.9 on a=0 (Q 1), expert 1 puts 0.9 on a=1 (Q 3):
    # E_0[Q] = 0.9 * 1 + 0.1 * 3 = 1.2; E_1[Q] = 0.1 * 1 + 0.9 * 3 = 2.8 -> k* = 1
    elp = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()
    assert int(best_expert_from_q(elp, torch.tensor([1.0, 3.0]))) == 1
    # Q(s, a) at the taken actions [1, 0]: [3, 5]; targets [2, 5]; mask [1, 1]
    # 0.5 * mean((3 - 2)^2, (5 - 5)^2) = 0.5 * 0.5 = 0.25
    q = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    loss = q_loss(q, torch.tensor([1, 0]), torch.tensor([2.0, 5.0]), torch.ones(2))
    assert_close(loss, torch.tensor(0.25), **TOL)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.modeling import build_model_folder, train_tokenizer
    from orchestrator.tasks import make_task

    tmp = tmp_path_factory.mktemp("pmoe")
    tok = train_tokenizer(make_task("sort", 4).alphabet(), tmp / "tok")
    return build_model_folder("tiny", tok, tmp / "lm", seed=0, max_position_embeddings=32)


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 1, 5, 6, 7], [1, 8, 9, 10, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": mask}


def test_one_expert_is_the_plain_model_bit_for_bit(lm_folder: Path) -> None:
    from orchestrator.modeling import load_causal_lm
    from orchestrator.pmoe_model import PMOECausalLM

    plain = load_causal_lm(lm_folder)
    one = PMOECausalLM(load_causal_lm(lm_folder), 1)
    assert sum(p.numel() for p in one.parameters()) == sum(p.numel() for p in plain.parameters())
    assert torch.equal(one(**batch()).logits, plain(**batch()).logits)


def test_mixture_head_is_normalised_and_router_q_gradients_stay_off_the_trunk(
    lm_folder: Path,
) -> None:
    from orchestrator.pmoe_model import load_pmoe

    model = load_pmoe(lm_folder, 3)
    logits = model(**batch()).logits
    assert_close(torch.logsumexp(logits, -1), torch.zeros(2, 5), **TOL)
    out = model.pmoe_outputs(**batch())
    assert out.expert_log_probs.shape[-2] == 3
    best = best_expert_from_q(out.expert_log_probs.detach(), out.q_values.detach())
    # a router nudged off uniform so its loss has a gradient
    loss = router_loss(out.router_probs, best, torch.ones(2, 5)) + q_loss(
        out.q_values, batch()["input_ids"], torch.ones(2, 5), torch.ones(2, 5)
    )
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("base."):
            assert p.grad is None or not p.grad.any(), name
    assert model.router.weight.grad.abs().sum() > 0 or model.router.bias.grad.abs().sum() > 0
    assert model.q_head.weight.grad.abs().sum() > 0


def test_generate_greedy_is_the_mixture_argmax_and_save_load_round_trips(
    lm_folder: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from orchestrator.pmoe_model import load_pmoe

    model = load_pmoe(lm_folder, 3, seed=1)
    with torch.no_grad():
        model.router.bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
    b = batch()
    out = model.generate(**b, max_new_tokens=4, eos_token_id=2, pad_token_id=0, do_sample=False)
    assert out.shape == (2, 9)
    ids, mask = b["input_ids"], b["attention_mask"]
    for t in range(4):  # the uncached forward's argmax, step by step
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        tok = nxt.argmax(-1)
        done = (out[:, 5 : 5 + t] == 2).any(-1) if t else torch.zeros(2, dtype=torch.bool)
        assert torch.equal(out[:, 5 + t][~done], tok[~done])
        ids = torch.cat([ids, out[:, 5 + t : 6 + t]], 1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    torch.manual_seed(0)
    sampled = model.generate(**b, max_new_tokens=4, eos_token_id=2, pad_token_id=0)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 9
    with pytest.raises(ValueError, match="temperature"):
        model.generate(**b, max_new_tokens=2, eos_token_id=2, pad_token_id=0, temperature=0.7)
    model.save_pretrained(tmp_path / "saved")
    again = load_pmoe(tmp_path / "saved", 3)
    assert torch.equal(again(**b).logits, model(**b).logits)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved") is not None
    with pytest.raises(ValueError, match="num_experts"):
        load_pmoe(tmp_path / "saved", 2)
