"""MoE networks for value-based RL, assembled from router.py and experts.py, plus the metrics.

References:
- Willi, Obando-Ceron et al. 2024, "Mixture of Experts in a Mixture of RL settings" (arXiv 2406.18420):
  the placements Middle / Final / All / Big and the three routers (Top-k, SoftMoE, hardcoded).
- Obando-Ceron et al. 2024, "Mixtures of Experts Unlock Parameter Scaling for Deep RL" (arXiv 2402.08609):
  the MoE module that replaces the penultimate layer, its tokens and experts.
- Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep RL" (arXiv 2302.12902): tau-dormant neurons.
- PA-MoE (arXiv 2602.17038): the agent metrics at the end of this file (expert switches per episode,
  utilisation, parameter occupancy, gradient conflict). The agent's network is in agent.py.
- RSPO (arXiv 2510.23027): the router shift ratio of router-aware importance sampling (RAIS), last in
  this file; train_agent.py --is-mode rais uses it.

The dense baseline is Dopamine's classic-control network: encoder Dense(H)+ReLU, Dense(H)+ReLU, head.

    dense : obs -> encoder -> Dense(H)+ReLU          -> Dense(A)                      -> Q
    middle: obs -> encoder -> tokens -> MoE -> flatten -> Dense(A)                      -> Q
    final : obs -> encoder -> Dense(H)+ReLU -> tokens -> MoE(experts d -> A), summed    -> Q
    all   : obs -> encoder -> tokens -> MoE -> MoE(experts d -> A), summed              -> Q
    big   : obs -> one MoE whose experts are whole Q-networks (obs -> H -> H -> A)       -> Q

The encoder (the first Dense(H)+ReLU) plays the part of the papers' convolutional torso, which makes
the tokens and is never an MoE, so "All" means every layer after it. This is our reading for flat
states, where the papers (Atari/MinAtar pixels) have no such question.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from experts import ExpertMLP
from router import SoftMoERouter, TaskRouter, TopKRouter

ROUTINGS = ("dense", "topk", "soft", "big", "task")
PLACEMENTS = ("middle", "final", "all")
BIG_GATES = ("soft", "topk", "task")


class MoELayer(nn.Module):
    """One MoE module: route tokens to slots, run each expert on its slots, combine back.

    Works with every router of router.py: slot inputs = D^T x, slot outputs = expert(slot inputs),
    token outputs = C (slot outputs)  (Soft MoE, Eq. 1-3; for Top-k, D and C are the one-hot capacity
    dispatch and gate-weighted combine tensors of GShard/Switch, so the same three lines hold).
    tokens (b, n, d) -> outputs (b, n, d_out), plus the Routing.
    """

    def __init__(self, router, experts):
        super().__init__()
        self.router, self.experts = router, experts

    def forward(self, tokens, task_id=None, hidden=None):
        routing = self.router(tokens, task_id)
        b, n, d = tokens.shape
        e, p = self.experts.num_experts, routing.slots_per_expert
        slot_inputs = routing.dispatch_weights.transpose(1, 2) @ tokens     # einsum("bns,bnd->bsd"): (b, e*p, d)
        slot_inputs = slot_inputs.reshape(b, e, p, d).transpose(0, 1).reshape(e, b * p, d)
        slot_outputs = self.experts(slot_inputs, hidden)                     # (e, b*p, d_out)
        slot_outputs = slot_outputs.reshape(e, b, p, -1).transpose(0, 1).reshape(b, e * p, -1)
        return routing.combine_weights @ slot_outputs, routing              # einsum("bns,bsd->bnd"): (b, n, d_out)


def tokenize(hidden, num_tokens):
    """Split each hidden vector into `num_tokens` tokens: (b, H) -> (b, num_tokens, H / num_tokens).

    A flat classic-control state is one vector, and one token makes Soft MoE degenerate: the dispatch
    softmax over a single token is all ones, every slot sees the same input, and the layer collapses to
    a softly gated mixture of all experts (arXiv 2402.08609; "Don't flatten, tokenize!", arXiv
    2410.01930). Splitting the encoder's features into T tokens is the flat-state analogue of the papers'
    per-conv-position tokens. With num_tokens=1 everything still runs, as that degenerate mixture.
    """
    b, h = hidden.shape
    return hidden.reshape(b, num_tokens, h // num_tokens)


@dataclass
class NetworkOutput:
    """What a Q-network returns beside its Q-values."""
    aux_loss: torch.Tensor                          # sum of the routers' weighted auxiliary losses
    routings: dict = field(default_factory=dict)    # MoE layer name -> Routing
    activations: list = field(default_factory=list)  # (layer name, post-ReLU activations, Routing or None)


def make_router(kind, dim, num_tokens, num_experts, k, capacity_factor, balance_loss_weight, z_loss_weight):
    if kind == "topk":
        return TopKRouter(dim, num_experts, k, capacity_factor, balance_loss_weight, z_loss_weight)
    if kind == "soft":
        return SoftMoERouter(dim, num_experts, num_tokens, capacity_factor=capacity_factor or 1.0)
    if kind == "task":
        return TaskRouter(num_experts, num_tokens)
    raise ValueError(f"unknown router {kind!r}; choose from topk, soft, task")


class QNetwork(nn.Module):
    """Q-network with an MoE at the chosen placement (see the module docstring for the diagrams).

    forward(obs (b, obs_dim), task_id (b,) or None) -> (Q (b, num_actions), NetworkOutput).
    """

    def __init__(self, obs_dim, num_actions, routing="dense", placement="middle", hidden=128,
                 num_experts=4, k=1, num_tokens=8, capacity_factor=1.0, expert_hidden=128,
                 big_gate="soft", balance_loss_weight=0.0, z_loss_weight=0.0):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; choose from {', '.join(ROUTINGS)}")
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}")
        if big_gate not in BIG_GATES:
            raise ValueError(f"unknown big gate {big_gate!r}; choose from {', '.join(BIG_GATES)}")
        if routing not in ("dense", "big") and hidden % num_tokens:
            raise ValueError(f"hidden={hidden} must be divisible by tokens={num_tokens} to split it into tokens")
        self.routing, self.num_tokens = routing, num_tokens
        router = lambda kind, dim, tokens: make_router(kind, dim, tokens, num_experts, k, capacity_factor,
                                                       balance_loss_weight, z_loss_weight)
        if routing == "big":
            # Big: experts are whole Q-networks and the router sees the whole state as its one token.
            # Under the soft gate that is Soft MoE with one token (a softly gated mixture, see tokenize).
            self.big = MoELayer(router(big_gate, obs_dim, 1), ExpertMLP(num_experts, [obs_dim, hidden, hidden, num_actions]))
            return
        self.encoder = nn.Linear(obs_dim, hidden)
        token_dim = hidden // num_tokens
        moe_middle = routing != "dense" and placement in ("middle", "all")
        moe_final = routing != "dense" and placement in ("final", "all")
        # Middle: Dopamine's MoE module, experts Dense(expert_hidden)-ReLU-Dense(token_dim), no ReLU after.
        self.middle = (MoELayer(router(routing, token_dim, num_tokens), ExpertMLP(num_experts, [token_dim, expert_hidden, token_dim]))
                       if moe_middle else nn.Linear(hidden, hidden))
        # Final: experts are linear heads token -> Q, summed over tokens. With identical experts this is
        # exactly a dense head Dense(H, A) split into per-token blocks.
        self.head = (MoELayer(router(routing, token_dim, num_tokens), ExpertMLP(num_experts, [token_dim, num_actions]))
                     if moe_final else nn.Linear(hidden, num_actions))

    def forward(self, obs, task_id=None):
        out = NetworkOutput(aux_loss=obs.new_zeros(()))
        if self.routing == "big":
            hidden = []
            q, routing = self.big(obs.unsqueeze(1), task_id, hidden)          # (b, 1, A)
            self._record_moe(out, "big", routing, hidden)
            return q.squeeze(1), out
        x = torch.relu(self.encoder(obs))                                      # (b, H)
        out.activations.append(("encoder", x, None))
        if isinstance(self.middle, MoELayer):
            hidden = []
            x, routing = self.middle(tokenize(x, self.num_tokens), task_id, hidden)  # (b, T, H/T)
            x = x.flatten(1)                                                   # (b, H)
            self._record_moe(out, "middle", routing, hidden)
        else:
            x = torch.relu(self.middle(x))
            out.activations.append(("middle", x, None))
        if isinstance(self.head, MoELayer):
            q, routing = self.head(tokenize(x, self.num_tokens), task_id)      # (b, T, A)
            q = q.sum(1)
            self._record_moe(out, "final", routing, [])
        else:
            q = self.head(x)
        return q, out

    @staticmethod
    def _record_moe(out, name, routing, hidden):
        out.routings[name] = routing
        out.aux_loss = out.aux_loss + routing.aux_loss
        for i, act in enumerate(hidden):
            out.activations.append((f"{name}.expert_layer{i}", act, routing))


def dormant_fraction(activations, tau=0.0):
    """Fraction of tau-dormant neurons, per layer and overall (Sokar et al. 2023, Def. 3.1).

    Neuron i of a layer scores s_i = E|h_i| / mean_k E|h_k|, the expectation over the rows of a batch;
    it is dormant when s_i <= tau. `activations` holds (name, act, routing): act (m, units) for a dense
    layer (routing None), or (e, m, units) for an expert layer, where neuron (expert, unit) averages only
    over the slots that expert actually received (top-k leaves capacity places empty). An expert that
    received nothing counts as dormant in its layer's fraction and in "overall"; "overall_received" leaves
    such experts' neurons out (and out of their layer's mean |h|), the other way to count them, equal to
    "overall" when every expert received a token. Returns {layer name: fraction, ..., "overall": fraction,
    "overall_received": fraction}.
    """
    result, dormant_total, neuron_total, received_dormant, received_total = {}, 0, 0, 0, 0
    for name, act, routing in activations:
        act = act.detach().abs()
        if routing is None:
            act, mask = act.unsqueeze(0), torch.ones(1, act.shape[0])         # (1, m, units), (1, m)
        else:
            e, p = routing.num_experts, routing.slots_per_expert
            mask = routing.slot_used().reshape(-1, e, p).transpose(0, 1).reshape(e, -1).float()  # (e, b*p)
        mean_abs = (act * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)  # (e, units)
        score = mean_abs.flatten() / mean_abs.mean().clamp_min(1e-12)
        dormant = int((score <= tau).sum())
        result[name] = dormant / score.numel()
        dormant_total, neuron_total = dormant_total + dormant, neuron_total + score.numel()
        received = mean_abs[mask.sum(1) > 0]                                   # experts given a token, rescored
        received_dormant += int((received / received.mean().clamp_min(1e-12) <= tau).sum())
        received_total += received.numel()
    result["overall"] = dormant_total / max(neuron_total, 1)
    result["overall_received"] = received_dormant / max(received_total, 1)
    return result


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


# --- PA-MoE's metrics for LLM agents (arXiv 2602.17038, Sec. 5) --------------------------------------

def count_switches(route):
    """Expert switches along a sequence of expert indices (steps of an episode, or tokens)."""
    return sum(int(a != b) for a, b in zip(route[:-1], route[1:]))


def majority_expert(experts):
    """The expert most of a step's tokens used (ties to the lowest index)."""
    values, counts = torch.as_tensor(experts).flatten().unique(return_counts=True)
    return int(values[counts.argmax()])


def expert_utilisation(experts, task_types, num_experts):
    """{task type: fraction of its routing decisions that went to each expert}. experts: one expert index
    per decision (a step, or a token); task_types: the task type of each decision."""
    counts = {}
    for expert, task_type in zip(experts, task_types):
        counts.setdefault(task_type, [0] * num_experts)[int(expert)] += 1
    return {t: [c / sum(row) for c in row] for t, row in sorted(counts.items())}


def loss_shares(per_step_loss, task_types):
    """{task type: its share of the batch loss}, the loss measured as sum |per-step loss term|."""
    magnitude = per_step_loss.detach().abs()
    total = float(magnitude.sum())
    shares = {}
    for i, task_type in enumerate(task_types):
        shares[task_type] = shares.get(task_type, 0.0) + float(magnitude[i])
    return {t: s / total if total > 0 else 0.0 for t, s in sorted(shares.items())}


def parameter_occupancy(batch_shares, task_types):
    """PA-MoE's occupancy: for each task type, the fraction of training batches in which it contributes
    more than 50% of the batch loss. batch_shares: one loss_shares() dict per batch."""
    if not batch_shares:
        return {t: 0.0 for t in task_types}
    return {t: sum(s.get(t, 0.0) > 0.5 for s in batch_shares) / len(batch_shares) for t in task_types}


def gradient_conflict(gradients):
    """Mean over pairs of task types of max(0, -cos(g_i, g_j)): how strongly the per-task-type gradients of
    the trainable parameters point against each other (0: no pair conflicts; 1: exactly opposed).
    gradients: {task type: flat gradient}. Counting only the negative part is our reading of the paper's
    "mean negative cosine similarity"."""
    names = [n for n, g in gradients.items() if g is not None and float(g.norm()) > 0]
    values = [max(0.0, -float(torch.nn.functional.cosine_similarity(gradients[a], gradients[b], dim=0)))
              for i, a in enumerate(names) for b in names[i + 1:]]
    return sum(values) / len(values) if values else 0.0


# --- RAIS: router-aware importance sampling (RSPO, Zhang et al., arXiv 2510.23027) -------------------------

def router_shift_ratio(new_log_probs, old_log_probs, chosen, gamma_min=0.0):
    """The router shift ratio of one token (or one decision), for any router:
        shift = mean over routing layers and over the experts the OLD router chose of
                |log r_new(e) - log r_old(e)|,      gamma = max(exp(-shift), gamma_min).
    new_log_probs, old_log_probs: (..., layers, experts), every expert's router log-probability now and at
    rollout time; chosen: (..., layers, k) long, the experts the old router picked. A token router has
    one layer per adapted projection and its top-k; a phase router is one layer with k = 1, its decision
    shared by all the step's tokens. Returns (gamma (...), shift (...)), both without gradient: gamma
    only rescales an importance weight (the paper: letting gradient through it collapses training)."""
    with torch.no_grad():
        shift = (new_log_probs.gather(-1, chosen) - old_log_probs.gather(-1, chosen)).abs().mean((-1, -2))
        return torch.exp(-shift).clamp(min=gamma_min), shift
