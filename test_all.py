"""Tests: properties of the routers, experts and metrics that could fail, and short end-to-end runs.

    python -m pytest -q test_all.py
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_dqn
from envs import TASKS, MultiTaskWrapper, TaskSet, active_tasks, normalized_score, scale_observation
from experts import ExpertMLP
from moe_rl import BIG_GATES, PLACEMENTS, MoELayer, QNetwork, dormant_fraction, tokenize
from router import SoftMoERouter, TaskRouter, TopKRouter, balance_loss

torch.set_num_threads(1)


def soft_layer(dim=6, experts=4, tokens=8, seed=0):
    torch.manual_seed(seed)
    return MoELayer(SoftMoERouter(dim, experts, tokens), ExpertMLP(experts, [dim, 16, dim]))


# ---------------------------------------------------------------- Soft MoE

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


# ---------------------------------------------------------------- Top-k

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


# ---------------------------------------------------------------- task routing, Big, placements

def test_task_router_sends_every_token_to_its_task_expert():
    torch.manual_seed(0)
    layer = MoELayer(TaskRouter(3, 4), ExpertMLP(3, [5, 7]))
    x, task = torch.randn(6, 4, 5), torch.tensor([0, 1, 2, 2, 1, 0])
    y, _ = layer(x, task)
    for i in range(6):
        torch.testing.assert_close(y[i], layer.experts.expert(int(task[i]))(x[i]), rtol=1e-5, atol=1e-6)


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


# ---------------------------------------------------------------- dormant neurons

def test_dormant_fraction_on_hand_made_activations():
    # 4 neurons: mean |h| = 0, 0.01, 1, 2.99 -> layer mean 1 -> scores 0, 0.01, 1, 2.99
    act = torch.tensor([[0.0, 0.02, 1.0, 2.99], [0.0, 0.0, 1.0, 2.99]])
    assert dormant_fraction([("layer", act, None)], tau=0.0) == {"layer": 0.25, "overall": 0.25}
    assert dormant_fraction([("layer", act, None)], tau=0.025)["layer"] == 0.5
    assert dormant_fraction([("layer", act, None)], tau=1.0)["layer"] == 0.75
    two = dormant_fraction([("a", act, None), ("b", torch.ones(3, 4), None)], tau=0.025)
    assert two == {"a": 0.5, "b": 0.0, "overall": 0.25}


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


# ---------------------------------------------------------------- environments

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


# ---------------------------------------------------------------- the trainer

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
        if architecture[1] != "dense":
            assert record["expert_load"]


def test_crl_run_logs_the_task_it_trains(tmp_path):
    summary, _ = run(tmp_path, "--setting", "crl", "--total-steps", "600", "--eval-frequency", "100",
                     "--tasks", "CartPole-v1,Acrobot-v1")
    active = {r["step"]: r["active_tasks"] for r in read_log(summary)[1:]}
    assert active[100] == ["CartPole-v1"] and active[200] == ["CartPole-v1"]
    assert active[400] == ["Acrobot-v1"] and active[600] == ["Acrobot-v1"]


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
    def solved(network, task_set, action_mask, episodes, seed):
        return {"CartPole-v1": 500.0}, {"CartPole-v1": 1.05}

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
