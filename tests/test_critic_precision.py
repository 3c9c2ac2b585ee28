"""The critic's reward is the float32 product of the final hidden state with the two lm_head rows,
not the bf16 full-vocabulary logits (which are quantised to 0.125 at |z| in [16, 32))."""
import copy

import pytest
import torch

from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.critic.critic import log_odds_from_hidden
from vlm3d_guidance.tiny.qwen import build_tiny_qwen

PROMPT = "a red chair with four legs"


def _stock_forward(critic, x):
    """The stock transformers forward on the critic's own inputs; returns (hidden [D] fed to
    lm_head, full-vocabulary logits [V] of the last position), both in the model's dtype."""
    from vlm3d_guidance.critic.vision import grid_hw, image_inputs

    seen = {}
    handle = critic.model.lm_head.register_forward_hook(lambda m, i, o: seen.update(h=i[0][0, -1]))
    try:
        text = critic.queries[0].fill(PROMPT)
        ids, mm = critic._prompt(text, x.shape[0], grid_hw(x.shape[2], x.shape[3], critic.vision))
        pv, grid = image_inputs(x, critic.vision, dtype=critic.dtype)
        with torch.no_grad():
            out = critic.model(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=grid,
                               mm_token_type_ids=mm, pixel_values=pv, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["h"], out.logits[0, -1]


def _reference(critic, h):
    """float64 (W[yes] - W[no]) . h from the stock hidden state."""
    w = critic.model.lm_head.weight.double()
    return float((w[critic.yes_id] - w[critic.no_id]) @ h.double())


@pytest.fixture(scope="module")
def bf16_critic(tiny_root):
    return VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=tiny_root), dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_bf16_reward_is_the_float32_product_of_hidden_and_rows(tiny_root, family):
    critic = VLMCritic.from_pretrained(build_tiny_qwen(family, root=tiny_root), dtype=torch.bfloat16)
    side = 64 if family == "qwen3_vl" else 56
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    r = critic.reward(x, PROMPT)
    assert r.dtype == torch.float32
    h, _ = _stock_forward(critic, x)
    assert abs(float(r) - _reference(critic, h)) < 1e-6


def test_a_change_of_1e_3_is_resolved_at_large_logits(bf16_critic):
    """Yes and No rows that are large (|z| ~ 20) and differ in one entry by d: r = d * h_j ~ 1e-3.
    The bf16 logits cannot see it (their step there is 0.125); the critic's reward must."""
    critic = copy.copy(bf16_critic)
    critic.model = copy.deepcopy(bf16_critic.model)
    x = torch.rand(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    h, _ = _stock_forward(critic, x)
    w = critic.model.lm_head.weight
    with torch.no_grad():
        j, k = (int(i) for i in h.float().abs().topk(2).indices)
        rows = torch.zeros(2, w.shape[1])
        rows[:, j] = 20.0 / float(h[j])  # z_yes ~ z_no ~ 20: the same large entry in both rows
        rows[1, k] = -1e-3 / float(h[k])  # and one small difference elsewhere: r ~ 1e-3
        w[critic.yes_id], w[critic.no_id] = rows.to(w.dtype)
    expected = _reference(critic, h)
    assert 0.5e-3 < abs(expected) < 2e-3  # the rows really differ by ~1e-3 in r
    h2, logits = _stock_forward(critic, x)
    z = logits.float()
    assert abs(float(z[critic.yes_id])) > 16  # bf16 resolution there: 0.125
    stock = float(z[critic.yes_id] - z[critic.no_id])
    assert stock % 0.125 == 0 and abs(stock - expected) > 4e-4  # the stock logits lose it
    r = float(critic.reward(x, PROMPT))
    assert abs(r - expected) < 1e-6


def test_log_odds_from_hidden_with_bias_and_gradient():
    lin = torch.nn.Linear(8, 5, bias=True).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    r = log_odds_from_hidden(h, lin, 3, 1)
    ref = (lin.weight.double()[3] - lin.weight.double()[1]) @ h.detach().double() + lin.bias.double()[3] - lin.bias.double()[1]
    assert r.dtype == torch.float32 and abs(float(r.detach()) - float(ref)) < 1e-6
    r.backward()
    assert torch.allclose(h.grad.float(), (lin.weight[3].float() - lin.weight[1].float()).to(torch.bfloat16).float())
