"""PMOE policies: the mixture math against hand-worked numbers, two-stage sampling, the
router's frequency regression, gradient routing, and the model head on a tiny Llama."""

from __future__ import annotations

from collections.abc import Iterator
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
NAN = float("nan")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Every tensor here is tiny: a second intra-op thread only adds OpenMP waits, which
    take seconds on a busy CPU. The setting is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the math


def test_mixture_hand_worked_and_normalised() -> None:
    # psi = [0.25, 0.75]; pi_1 = [0.5, 0.5], pi_2 = [0.1, 0.9]
    # mix = 0.25 * [0.5, 0.5] + 0.75 * [0.1, 0.9] = [0.125 + 0.075, 0.125 + 0.675] = [0.2, 0.8]
    elp = torch.tensor([[0.5, 0.5], [0.1, 0.9]]).log()
    mix = mixture_log_probs(elp, torch.tensor([0.25, 0.75]).log())
    assert_close(mix.exp(), torch.tensor([0.2, 0.8]), **TOL)
    assert_close(mix.exp().sum(), torch.tensor(1.0), **TOL)  # 0.2 + 0.8
    g = torch.Generator().manual_seed(0)
    elp = torch.log_softmax(torch.randn(3, 5, 4, 7, generator=g), -1)  # [B, T, K, V]
    router = torch.log_softmax(torch.randn(3, 5, 4, generator=g), -1)  # [B, T, K]
    assert_close(torch.logsumexp(mixture_log_probs(elp, router), -1), torch.zeros(3, 5), **TOL)


def test_two_stage_sampling_matches_the_mixture() -> None:
    elp = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]).log()
    router = torch.tensor([0.6, 0.4]).log()
    # mix = 0.6 * [0.5, 0.3, 0.2] + 0.4 * [0.1, 0.1, 0.8]
    #     = [0.30 + 0.04, 0.18 + 0.04, 0.12 + 0.32] = [0.34, 0.22, 0.44]
    expected = torch.tensor([0.34, 0.22, 0.44], dtype=torch.float64)
    n = 40000
    g = torch.Generator().manual_seed(0)
    actions, experts = two_stage_sample(elp.expand(n, 2, 3), router.expand(n, 2), g)
    counts = torch.bincount(actions, minlength=3).double()
    chi2 = float(((counts - n * expected) ** 2 / (n * expected)).sum())
    # 3 categories -> 2 degrees of freedom; chi2(2) is exponential with mean 2, so its
    # 0.999 quantile is -2 ln(1 - 0.999) = -2 ln(0.001) = 2 * 6.9078 = 13.8155
    assert chi2 < 13.8155
    # the expert draws alone: Bernoulli(0.6), sd of the share sqrt(0.6 * 0.4 / 40000) = 0.00245
    assert abs(float((experts == 0).double().mean()) - 0.6) < 4 * 0.00245
    # each expert's own actions follow that expert: expert 1 puts 0.8 on action 2
    share = float((actions[experts == 1] == 2).double().mean())
    assert abs(share - 0.8) < 0.02


def test_router_regression_converges_to_the_best_expert_frequencies() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])  # how often each expert is best, whatever the state
    router = torch.nn.Linear(4, 3)
    steps = 300
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)  # to 0 at the end
    for _ in range(steps):
        feats = torch.randn(256, 4, generator=g)  # states whose features say nothing of k*
        best = torch.multinomial(p, 256, replacement=True, generator=g)
        loss = router_loss(torch.softmax(router(feats), -1), best, torch.ones(256))
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    with torch.no_grad():
        psi = torch.softmax(router(torch.randn(4096, 4, generator=g)), -1)  # [N, K]
    assert_close(psi.mean(0), p, atol=0.02, rtol=0)
    assert float((psi - p).abs().max()) < 0.1  # and nearly the same in every state


def test_router_loss_hand_worked_and_padding_stays_out() -> None:
    # position 0: psi = [0.25, 0.75], k* = 1: mean((0.25 - 0)^2, (0.75 - 1)^2) = 0.0625
    # position 1: psi = [0.5, 0.5], k* = 0: mean((0.5 - 1)^2, (0.5 - 0)^2) = 0.25
    # position 2: padding (NaN probabilities, an out-of-range k*): left out
    # masked mean = (0.0625 + 0.25) / 2 = 0.15625
    psi = torch.tensor([[0.25, 0.75], [0.5, 0.5], [NAN, NAN]], requires_grad=True)
    loss = router_loss(psi, torch.tensor([1, 0, -1]), torch.tensor([1.0, 1.0, 0.0]))
    assert_close(loss, torch.tensor(0.15625), **TOL)
    loss.backward()
    # d/dpsi = 2 (psi - onehot) / K / positions: row 0 = 2 * [0.25, -0.25] / 2 / 2
    assert_close(psi.grad, torch.tensor([[0.125, -0.125], [-0.25, 0.25], [0.0, 0.0]]), **TOL)
    assert float(router_loss(psi.detach(), torch.tensor([0, 0, 0]), torch.zeros(3))) == 0.0


def test_best_expert_and_q_loss_hand_worked() -> None:
    # expert 0 puts 0.9 on a=0 (Q 1), expert 1 puts 0.9 on a=1 (Q 3):
    # E_0[Q] = 0.9 * 1 + 0.1 * 3 = 1.2; E_1[Q] = 0.1 * 1 + 0.9 * 3 = 2.8 -> k* = 1
    elp = torch.tensor([[0.9, 0.1], [0.1, 0.9]]).log()
    assert int(best_expert_from_q(elp, torch.tensor([1.0, 3.0]))) == 1
    # Q(s, a) at the taken actions [1, 0]: [3, 5]; targets [2, 5]; the third position is
    # padding (NaN Q, NaN target, an out-of-range action) and stays out:
    # 0.5 * mean((3 - 2)^2, (5 - 5)^2) = 0.5 * (1 + 0) / 2 = 0.25
    q = torch.tensor([[1.0, 3.0], [5.0, 0.0], [NAN, NAN]], requires_grad=True)
    targets = torch.tensor([2.0, 5.0, NAN])
    loss = q_loss(q, torch.tensor([1, 0, 99]), targets, torch.tensor([1, 1, 0]))
    assert_close(loss, torch.tensor(0.25), **TOL)
    loss.backward()
    # d/dQ(s0, a=1) = 0.5 * 2 * (3 - 2) / 2 = 0.5; every other entry 0
    assert_close(q.grad, torch.tensor([[0.0, 0.5], [0.0, 0.0], [0.0, 0.0]]), **TOL)


def test_best_only_gradient_reaches_only_the_best_expert() -> None:
    g = torch.Generator().manual_seed(0)
    elp = torch.log_softmax(torch.randn(2, 3, 4, generator=g), -1).requires_grad_()
    router = torch.log_softmax(torch.randn(2, 3, generator=g), -1).requires_grad_()
    best = torch.tensor([2, 0])
    out = best_only_mixture_log_probs(elp, router, best)
    assert torch.equal(out, mixture_log_probs(elp, router))  # the same value
    out[:, 1].sum().backward()
    for b, k in enumerate(best.tolist()):
        for j in range(3):
            assert bool(elp.grad[b, j].abs().sum() > 0) == (j == k), (b, j)
    assert router.grad is None
    # on the best expert the gradient is the full mixture's:
    # d log pi_mix(a) / d log pi_k(a) = psi_k pi_k(a) / pi_mix(a)
    full = elp.detach().clone().requires_grad_()
    mixture_log_probs(full, router.detach())[:, 1].sum().backward()
    for b, k in enumerate(best.tolist()):
        assert_close(elp.grad[b, k], full.grad[b, k], **TOL)


# ---------------------------------------------------------------- the model head


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orchestrator.data.tasks import make_task
    from orchestrator.models.hf import build_model_folder, train_tokenizer

    tmp = tmp_path_factory.mktemp("pmoe")
    tok = train_tokenizer(make_task("sort", 4).alphabet(), tmp / "tok")
    return build_model_folder("tiny", tok, tmp / "lm", seed=0, max_position_embeddings=32)


def batch() -> dict[str, torch.Tensor]:
    """Two left-padded prompts: ids, mask [2, 5]."""
    ids = torch.tensor([[0, 1, 5, 6, 7], [1, 8, 9, 10, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    return {"input_ids": ids, "attention_mask": mask}


def test_one_expert_is_the_plain_model_bit_for_bit(lm_folder: Path, tmp_path: Path) -> None:
    from orchestrator.models.hf import load_causal_lm
    from orchestrator.models.pmoe import load_pmoe

    plain = load_causal_lm(lm_folder)
    one = load_pmoe(lm_folder, 1)
    assert [n for n, _ in one.named_parameters()] == [
        "base." + n for n, _ in plain.named_parameters()
    ]
    assert one.config is one.base.config
    b = batch()
    pos = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(
        one(**b, position_ids=pos, use_cache=False).logits,
        plain(**b, position_ids=pos, use_cache=False).logits,
    )
    out = one.pmoe_outputs(**b, position_ids=pos)
    plain_lp = torch.log_softmax(plain(**b, position_ids=pos).logits, -1)
    assert torch.equal(out.expert_log_probs[:, :, 0], plain_lp)
    assert torch.equal(out.router_probs, torch.ones(2, 5, 1)) and out.q_values is None
    for sample in (False, True):
        kw = dict(max_new_tokens=4, eos_token_id=2, pad_token_id=0, do_sample=sample)
        torch.manual_seed(0)
        mine = one.generate(**b, **kw)
        torch.manual_seed(0)
        assert torch.equal(mine, plain.generate(**b, **kw))
    one.save_pretrained(tmp_path / "one")
    assert not (tmp_path / "one" / "pmoe.json").exists()


def test_fresh_head_is_deterministic_close_to_the_lm_and_normalised(lm_folder: Path) -> None:
    from orchestrator.models.pmoe import load_pmoe

    rng = torch.get_rng_state()
    model = load_pmoe(lm_folder, 3, rank=4, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the head's init leaves the global RNG
    again, other = load_pmoe(lm_folder, 3, rank=4, seed=1), load_pmoe(lm_folder, 3, rank=4)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    assert not torch.equal(model.expert_a, other.expert_a)
    v = model.config.vocab_size
    assert model.expert_a.shape == (2, 4, 128)  # A_k [R, H] for experts 1, 2
    assert model.expert_b.shape == (2, v, 4)  # B_k [V, R]
    b = batch()
    out = model.pmoe_outputs(**b)
    elp = out.expert_log_probs  # [B, L, K, V]
    assert elp.shape == (2, 5, 3, v)
    assert torch.equal(elp[:, :, 0], torch.log_softmax(model.base(**b).logits, -1))  # expert 0
    gap = (elp[:, :, 1:] - elp[:, :, :1]).abs().amax()
    assert 0 < gap < 1e-2  # not tied, but close to the LM at the start
    assert_close(out.router_probs, torch.full((2, 5, 3), 1 / 3), **TOL)  # uniform psi
    assert torch.equal(out.q_values, torch.zeros(2, 5, v))
    with torch.no_grad():
        model.router.bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
    logits = model(**b).logits
    assert_close(torch.logsumexp(logits, -1), torch.zeros(2, 5), **TOL)
    assert_close(torch.log_softmax(logits, -1), logits, **TOL)
    out = model.pmoe_outputs(**b)
    assert_close(logits, mixture_log_probs(out.expert_log_probs, out.log_router), **TOL)


def test_router_and_q_losses_never_reach_the_trunk(lm_folder: Path) -> None:
    from orchestrator.models.pmoe import load_pmoe

    model = load_pmoe(lm_folder, 3).train()
    b = batch()
    out = model.pmoe_outputs(**b)
    q_guess = torch.randn(out.q_values.shape, generator=torch.Generator().manual_seed(0))
    best = best_expert_from_q(out.expert_log_probs.detach(), q_guess)  # [B, L]
    mask = b["attention_mask"]
    targets = torch.ones(2, 5)  # Q starts at 0, so (0 - 1)^2 has a gradient
    r_loss = router_loss(out.router_probs, best, mask)
    (r_loss + q_loss(out.q_values, b["input_ids"], targets, mask)).backward()
    for name, p in model.named_parameters():
        if name.startswith("base.") or name.startswith("expert_"):
            assert p.grad is None or not p.grad.any(), name
    for p in (model.router.weight, model.router.bias, model.q_head.weight, model.q_head.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # control: a loss on the mixture does reach the trunk, so the check above is not vacuous
    model.zero_grad()
    out = model.pmoe_outputs(**b)
    mixture_log_probs(out.expert_log_probs, out.log_router)[..., 4].sum().backward()
    assert model.base.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def stepwise_argmax(model: torch.nn.Module, b: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """Reference greedy decoding: the full forward (no cache) at every step. [B, P + steps]"""
    ids, mask = b["input_ids"], b["attention_mask"]
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        tok = logits[:, -1].argmax(-1)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def cut_at_eos(ids: torch.Tensor, prompt_len: int, eos: int, pad: int) -> torch.Tensor:
    """Reference for eos handling: pad after each row's first generated eos, then drop the
    columns after the last row's first eos (the early stop)."""
    rows, stop = [], prompt_len
    for row in ids.tolist():
        gen = row[prompt_len:]
        end = gen.index(eos) + 1 if eos in gen else len(gen)
        rows.append(row[:prompt_len] + gen[:end] + [pad] * (len(gen) - end))
        stop = max(stop, prompt_len + end)
    return torch.tensor(rows)[:, :stop]


def test_generate_greedy_sampled_and_eos(lm_folder: Path) -> None:
    from orchestrator.models.pmoe import load_pmoe

    model = load_pmoe(lm_folder, 3, seed=1)
    with torch.no_grad():  # a router off uniform, experts apart, so the mixture matters
        model.router.bias.copy_(torch.tensor([0.5, -0.2, 0.1]))
        model.expert_b.mul_(300.0)
    b, v, steps = batch(), model.config.vocab_size, 6
    never = v  # an eos id no step can produce: every row runs all the steps
    kw = dict(max_new_tokens=steps, eos_token_id=never, pad_token_id=0)
    greedy = model.generate(**b, **kw, do_sample=False)
    assert torch.equal(greedy, stepwise_argmax(model, b, steps))
    assert torch.equal(model.generate(**b, **kw, do_sample=False, use_cache=False), greedy)
    torch.manual_seed(0)
    sampled = model.generate(**b, **kw)
    assert sampled.shape == (2, 5 + steps) and torch.equal(sampled[:, :5], b["input_ids"])
    assert int(sampled.min()) >= 0 and int(sampled.max()) < v
    # with an eos that does occur: the same tokens up to it, pad after, early stop
    for free, sample in ((greedy, False), (sampled, True)):
        eos = int(free[0, 6])  # row 0's second generated token
        torch.manual_seed(0)
        out = model.generate(**b, **{**kw, "eos_token_id": eos}, do_sample=sample)
        assert torch.equal(out, cut_at_eos(free, 5, eos, pad=0)), (sample, eos)
    for bad in (dict(temperature=0.7), dict(top_p=0.9), dict(top_k=5)):
        with pytest.raises(ValueError, match="temperature=1.0"):
            model.generate(**b, **kw, **bad)


def test_save_load_round_trip_and_mismatched_experts(lm_folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from orchestrator.models.pmoe import load_pmoe

    model = load_pmoe(lm_folder, 3, rank=4, seed=2)
    with torch.no_grad():
        model.router.weight.normal_(0.0, 0.1)
        model.q_head.bias.fill_(0.5)
        model.base.lm_head.weight.mul_(1.5)  # a trained LM, not the folder's
    b = batch()
    model.save_pretrained(tmp_path / "saved")
    again = load_pmoe(tmp_path / "saved", 3, rank=4, seed=7)  # the seed of a fresh head is moot
    assert torch.equal(again(**b).logits, model(**b).logits)
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert torch.equal(lm(**b).logits, model.base(**b).logits)
    # an explicit state dict (as gathered under ZeRO-3) is what gets written
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["router.bias"] = torch.tensor([1.0, 2.0, 3.0])
    model.save_pretrained(tmp_path / "explicit", state_dict=sd)
    assert torch.equal(load_pmoe(tmp_path / "explicit", 3, rank=4).router.bias, sd["router.bias"])
    with pytest.raises(ValueError, match=r"num_experts=3.*num_experts=2"):
        load_pmoe(tmp_path / "saved", 2, rank=4)
    with pytest.raises(ValueError, match="expert_rank=4"):
        load_pmoe(tmp_path / "saved", 3, rank=8)
