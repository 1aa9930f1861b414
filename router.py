"""Routers: who sends which token to which expert.

Every router here speaks the same language, so one MoE layer (moe_rl.MoELayer) serves them all. A
router looks at a group of tokens x of shape (b, n, d) and returns a `Routing`:

    dispatch_weights (b, n, s)  how much of token n goes into slot s   (slot inputs  = D^T x)
    combine_weights  (b, n, s)  how much of slot s comes back to token n (token output = C y)

where s = num_experts * slots_per_expert and slot j belongs to expert j // slots_per_expert. Letters in
the einsums: b batch (one routing group per sample, so a state's Q-values never depend on the other
states in the batch), n tokens, e experts, s slots, d features.

- TopKRouter: Switch/GShard-style learned top-k gating with expert capacity (slots are capacity places).
- SoftMoERouter: Soft MoE (Puigcerver et al. 2023, arXiv 2308.00951): slots are soft mixtures of tokens.
- TaskRouter: hardcoded routing, task i always goes to expert i (Willi et al. 2024, arXiv 2406.18420).

For the LLM agent, where experts are LoRA adapters (experts.LoRALinear) and a whole step may use one:
- TokenRouter: a learned top-k gate inside each adapted layer, choosing per token (token-level MoE).
- PhaseRouter: PA-MoE's router (arXiv 2602.17038): one expert per environment step, from the
  observation aligned with the goal and the recent history; with its balance, diversity and switch
  losses (phase_balance_loss, diversity_loss, switch_loss).

Auxiliary losses come back in `Routing.aux_loss`, already weighted; the learner adds it to its loss.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    """What a router decided. The loss needs only the weights and aux_loss; the inspection methods
    (slot_used, expert_load, stats) are computed on demand, so training pays nothing for them."""
    dispatch_weights: torch.Tensor   # (b, n, s) token -> slot input weights
    combine_weights: torch.Tensor    # (b, n, s) slot -> token output weights
    slots_per_expert: int
    aux_loss: torch.Tensor           # scalar, weighted sum of the auxiliary losses (0 when all are off)
    router_logits: torch.Tensor = None  # (b, n, e) gate logits of a learned top-k router
    k: int = 1                       # choices per token (top-k)

    @property
    def num_experts(self):
        return self.dispatch_weights.shape[-1] // self.slots_per_expert

    def slot_used(self):
        """(b, s) bool: slots that received a token. Top-k leaves unfilled capacity places empty."""
        return self.dispatch_weights.detach().sum(1) > 0

    def expert_load(self):
        """(e,) share of the output mass each expert carries: the combine weights of its slots summed over
        tokens. For top-k and task routing that is the gate-weighted share of routed tokens."""
        mass = self.combine_weights.detach().reshape(-1, self.num_experts, self.slots_per_expert).sum((0, 2))
        return mass / mass.sum().clamp_min(1e-12)

    @torch.no_grad()
    def stats(self):
        """Unweighted auxiliary losses and the dropped fraction of a top-k router, as floats."""
        if self.router_logits is None:
            return {}
        probs = self.router_logits.softmax(-1)
        chosen = F.one_hot(probs.topk(self.k, dim=-1).indices, self.num_experts).sum(-2)
        kept = self.dispatch_weights.sum()
        return {"balance_loss": balance_loss(probs, chosen).item(), "z_loss": z_loss(self.router_logits).item(),
                "dropped_fraction": 1.0 - kept.item() / (chosen.sum().item())}


def balance_loss(router_probs, chosen_mask):
    """Switch Transformer load-balancing loss (Fedus et al. 2021, Eq. 4): n * sum_e f_e * P_e.

    router_probs (..., e) softmax outputs; chosen_mask (..., e) 1 where the token chose the expert (top-k
    choices, before capacity). f_e: fraction of choices sent to e; P_e: mean router probability of e.
    It equals 1 under uniform routing and reaches n when every token picks the same expert.
    """
    num_experts = router_probs.shape[-1]
    f = chosen_mask.reshape(-1, num_experts).float().mean(0)
    f = f / f.sum().clamp_min(1e-9)  # top-k makes k choices per token; normalise to fractions
    p = router_probs.reshape(-1, num_experts).mean(0)
    return num_experts * (f * p).sum()


def z_loss(logits):
    """Router z-loss (ST-MoE, Zoph et al. 2022, Eq. 5): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class TopKRouter(nn.Module):
    """Learned top-k router with expert capacity, as in Dopamine's MoE agents (arXiv 2402.08609).

    A linear gate without bias, softmax over experts, top-k. Each expert has `capacity` places per
    group: ceil(tokens * capacity_factor / experts); tokens beyond it are dropped (their output from that
    expert is zero) and counted. Places are filled first-come by token index, first choices before
    second choices (GShard). The kept gate probabilities scale the expert outputs (not renormalised, as
    in Dopamine), so the gate's gradient comes through the output. capacity_factor=0 means no capacity.
    """

    def __init__(self, dim, num_experts, k=1, capacity_factor=1.0, balance_loss_weight=0.0, z_loss_weight=0.0):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"top-k needs 1 <= k <= num_experts, got k={k} with num_experts={num_experts}")
        if capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0 (0 = unlimited), got {capacity_factor}")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts, self.k, self.capacity_factor = num_experts, k, capacity_factor
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight

    def capacity(self, num_tokens):
        if self.capacity_factor == 0:
            return num_tokens  # an expert can hold every token: nothing is ever dropped
        return math.ceil(num_tokens * self.capacity_factor / self.num_experts)

    def forward(self, x, task_id=None):
        b, n, _ = x.shape
        e, k, c = self.num_experts, self.k, self.capacity(n)
        logits = self.gate(x)                                            # (b, n, e)
        probs = logits.softmax(-1)
        top_experts = probs.topk(k, dim=-1).indices                      # (b, n, k)
        chosen = F.one_hot(top_experts.transpose(1, 2).reshape(b, k * n), e)  # (b, k*n, e), rank-major order
        # 1-based queue position of each (choice, token) at its expert: first choices queue before
        # second choices, then by token index. Over capacity -> position 0 -> no place (dropped).
        position = chosen.cumsum(1) * chosen
        position = position.masked_fill(position > c, 0)
        place = F.one_hot(position, c + 1)[..., 1:].to(x.dtype)          # (b, k*n, e, c)
        if k > 1:
            place = place.reshape(b, k, n, e, c).sum(1)                  # a token holds <= 1 place per expert
        dispatch = place.reshape(b, n, e * c)
        combine = (place * probs.unsqueeze(-1)).reshape(b, n, e * c)     # gate = router probability
        aux = logits.new_zeros(())
        if self.balance_loss_weight:
            aux = aux + self.balance_loss_weight * balance_loss(probs, chosen.reshape(b, k, n, e).sum(1))
        if self.z_loss_weight:
            aux = aux + self.z_loss_weight * z_loss(logits)
        return Routing(dispatch, combine, c, aux, logits, k)


class SoftMoERouter(nn.Module):
    """Soft MoE routing (Puigcerver et al. 2023, Algorithm 1; normalisation of Sec. 2.3).

    Phi (d, e*p) holds one learned vector per slot. Logits L = normalize(X) normalize(Phi) * scale, both
    l2-normalised over d; dispatch D = softmax of L over the tokens (each slot's column sums to 1);
    combine C = softmax of L over all slots (each token's row sums to 1). Nothing is dropped and no
    auxiliary loss is needed. slots_per_expert p = round(tokens * capacity_factor / experts), at least 1,
    as in the reference code. With one token, D is all ones: every slot sees that token, and the layer
    is a softly gated mixture of all experts with gate C (this is what Big uses, see moe_rl.py).
    """

    def __init__(self, dim, num_experts, num_tokens, capacity_factor=1.0, slots_per_expert=None):
        super().__init__()
        p = slots_per_expert or max(1, round(num_tokens * capacity_factor / num_experts))
        self.num_experts, self.slots_per_expert = num_experts, p
        self.phi = nn.Parameter(torch.randn(dim, num_experts * p) / math.sqrt(dim))  # lecun-normal
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, task_id=None):
        return soft_moe_routing(x, self.phi, self.scale, self.slots_per_expert)


def soft_moe_routing(x, phi, scale, slots_per_expert):
    """Soft MoE's routing of tokens x (b, n, d) with slot vectors phi (d, s) and scale (): SoftMoERouter's
    forward. Seed-batched weights phi (S, d, s), scale (S,) (many_seeds.SeedSoftMoERouter) route the batch's
    S seed-major blocks of states each with its own seed's: the same math, a leading axis more."""
    b, n, d = x.shape
    phi = F.normalize(phi, dim=-2, eps=1e-6) * scale[..., None, None]                 # (..., d, s)
    tokens = F.normalize(x, dim=-1, eps=1e-6).reshape(*phi.shape[:-2], -1, d)        # (..., b*n / S, d)
    logits = (tokens @ phi).reshape(b, n, -1)                                         # (b, n, s)
    dispatch = logits.softmax(dim=1)                                 # over tokens n: Eq. 1
    combine = logits.softmax(dim=2)                                  # over slots s: Eq. 3
    return Routing(dispatch, combine, slots_per_expert, logits.new_zeros(()))


class TaskRouter(nn.Module):
    """Hardcoded task routing (Willi et al. 2024): every token of task i goes to expert i, weight 1.
    Routing is per sample, so expert i needs a place for each of the n tokens: slots_per_expert = n."""

    def __init__(self, num_experts, num_tokens):
        super().__init__()
        self.num_experts, self.num_tokens = num_experts, num_tokens

    def forward(self, x, task_id=None):
        if task_id is None:
            raise ValueError("task routing needs the task id of every sample")
        if int(task_id.max()) >= self.num_experts:
            raise ValueError(f"task id {int(task_id.max())} has no expert: task routing needs "
                             f"num_experts >= number of tasks, got {self.num_experts} experts")
        b, n, _ = x.shape
        expert = F.one_hot(task_id.long(), self.num_experts).to(x.dtype)  # (b, e)
        place = torch.eye(n, dtype=x.dtype, device=x.device)              # token t -> place t
        dispatch = torch.einsum("be,nc->bnec", expert, place).reshape(b, n, self.num_experts * n)
        return Routing(dispatch, dispatch, n, x.new_zeros(()))


@dataclass
class TokenRouting:
    """What a TokenRouter decided for a batch of tokens (..., e): kept for logging, switch counts, and
    for router-aware importance sampling, which compares old and new router log-probabilities."""
    log_probs: torch.Tensor          # (..., e) log softmax of the gate
    chosen: torch.Tensor             # (..., k) expert indices

    def balance_loss(self):
        probs = self.log_probs.exp()
        return balance_loss(probs, F.one_hot(self.chosen, probs.shape[-1]).sum(-2))


class TokenRouter(nn.Module):
    """Token-level routing among LoRA experts: a bias-free linear gate, softmax, top-k, and the kept
    probabilities as gates (Switch Transformer, Fedus et al. 2021: the gate value scales the expert's
    output, which is how the router gets its gradient from the task loss).
    forward(x (..., d)) -> gates (..., e), TokenRouting."""

    def __init__(self, dim, num_experts, k=1):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"top-k needs 1 <= k <= num_experts, got k={k} with num_experts={num_experts}")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)   # uniform routing at the start (ties broken by index)
        self.k = k

    def forward(self, x):
        log_probs = self.gate(x.to(self.gate.weight.dtype)).log_softmax(-1)
        chosen = log_probs.topk(self.k, dim=-1).indices
        gates = torch.zeros_like(log_probs).scatter(-1, chosen, log_probs.gather(-1, chosen).exp())
        return gates, TokenRouting(log_probs, chosen)


@dataclass
class PhaseRouting:
    logits: torch.Tensor             # (b, e), already divided by the temperature
    log_probs: torch.Tensor          # (b, e)

    @property
    def probs(self):
        return self.log_probs.exp()

    def choose(self, greedy, generator=None):
        """PA-MoE: sample the expert while training, argmax at inference."""
        if greedy:
            return self.logits.argmax(-1)
        return torch.multinomial(self.probs, 1, generator=generator).squeeze(-1)


class PhaseRouter(nn.Module):
    """PA-MoE's phase router (arXiv 2602.17038, Sec. 3.2). Inputs are the frozen base model's token
    encodings, so the router sees the language model's view of the state without changing it:

        o_align = pool(CrossAttention(query = Enc(o_t), key = value = Enc(goal)))
        h_enc   = LSTM(e_{t-L+1}, ..., e_t)      e_i: the pooled encoding of (action_{i-1}, observation_i)
        p_t     = softmax(MLP([o_align; h_enc]) / tau),   MLP = Linear-LayerNorm-ReLU-Dropout-Linear

    The expert is sampled from p_t in training and is argmax p_t at inference (PhaseRouting.choose).
    Shapes: b steps, t obs tokens, g goal tokens, l history length, d encoder width.
    """

    def __init__(self, dim, num_experts, hidden=64, heads=4, dropout=0.1):
        super().__init__()
        self.cross_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.history = nn.LSTM(dim, hidden, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim + hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_experts))
        self.num_experts = num_experts

    def forward(self, obs_tokens, obs_mask, goal_tokens, goal_mask, history, history_lengths, temperature=1.0):
        """obs_tokens (b, t, d), obs_mask (b, t) bool; goal_tokens (b, g, d), goal_mask (b, g);
        history (b, l, d) right-padded pair encodings, oldest first; history_lengths (b,) >= 1."""
        aligned, _ = self.cross_attention(obs_tokens, goal_tokens, goal_tokens, key_padding_mask=~goal_mask,
                                          need_weights=False)                       # (b, t, d)
        weights = obs_mask.unsqueeze(-1).to(aligned.dtype)
        o_align = (aligned * weights).sum(1) / weights.sum(1).clamp_min(1)          # (b, d)
        packed = nn.utils.rnn.pack_padded_sequence(history, history_lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h_n, _) = self.history(packed)                                          # h_n (1, b, hidden)
        logits = self.mlp(torch.cat([o_align, h_n[-1]], -1)) / temperature
        return PhaseRouting(logits, logits.log_softmax(-1))


def phase_balance_loss(probs):
    """PA-MoE L_bal / lambda_bal: sum_k (mean over the batch of p_k - 1/K)^2."""
    return (probs.mean(0) - 1.0 / probs.shape[-1]).pow(2).sum()


def diversity_loss(probs, expert_log_policies, command_mask, kl_margin=0.1):
    """PA-MoE L_div / lambda_div: mean over expert pairs i < j of (tau_div - KL(pi_i || pi_j)) * p_i p_j,
    only where KL < tau_div (a hinge), averaged over steps. It pushes apart the action distributions of
    experts that the router mixes on the same state. Reading the paper's E[p_i p_j] per step (the
    product of the two probabilities on that state) is our choice; the paper leaves it open.
    probs (b, e); expert_log_policies (b, e, c) log pi_k(command | state); command_mask (b, c)."""
    num_experts = probs.shape[-1]
    pi = expert_log_policies.exp()
    terms = []
    for i in range(num_experts):
        for j in range(i + 1, num_experts):
            diff = (expert_log_policies[:, i] - expert_log_policies[:, j]).masked_fill(~command_mask, 0)
            kl = (pi[:, i] * diff).sum(-1)                                           # (b,)
            terms.append(((kl_margin - kl).clamp_min(0) * probs[:, i] * probs[:, j]).mean())
    return torch.stack(terms).mean() if terms else probs.new_zeros(())


def switch_loss(probs, chosen, episode):
    """PA-MoE L_switch / lambda_s: per episode (1/(T-1)) sum_t 1[z_t != z_{t+1}], averaged over episodes.
    The count has no gradient, so the backward pass uses the soft surrogate 1 - sum_k p_t^k p_{t+1}^k
    (straight-through: the value is the hard count, the gradient the surrogate's).
    probs (n, e), chosen (n,), episode (n,): steps of each episode contiguous and in order."""
    same = episode[1:] == episode[:-1]
    hard = (chosen[1:] != chosen[:-1]).to(probs.dtype)
    soft = 1.0 - (probs[1:] * probs[:-1]).sum(-1)
    per_pair = (hard + soft - soft.detach()) * same
    pairs = torch.zeros(int(episode.max()) + 1, dtype=probs.dtype).index_add(0, episode[1:], same.to(probs.dtype))
    totals = torch.zeros_like(pairs).index_add(0, episode[1:], per_pair)
    has_pairs = pairs > 0
    if not has_pairs.any():
        return probs.new_zeros(()) + 0 * probs.sum()
    return (totals[has_pairs] / pairs[has_pairs]).mean()
