"""Many seeds in one process: N independent Q-networks run as one network whose parameters carry a
leading seed axis.

Every parameterised layer of moe_rl.QNetwork is swapped for a seed-batched twin holding the N seeds'
weights stacked on a new first axis, and the QNetwork's own forward runs unchanged on a batch that
concatenates the N seeds' inputs, seed-major: rows [i*b, (i+1)*b) belong to seed i. Layers without
parameters (tokenize, the dispatch and combine of MoELayer, TaskRouter, the softmaxes) act on each state
separately, so they need no seed axis at all; the parameterised ones apply seed i's weights to seed
i's rows with one batched matmul (bmm) over the seed axis. Letters: S seeds, m rows per seed, e experts.

    nn.Linear      weight (out, in)           -> SeedLinear        weight (S, out, in)
    ExpertMLP      weights[l] (e, in, out)    -> SeedExpertMLP     weights[l] (S, e, in, out)
    SoftMoERouter  phi (d, slots), scale ()   -> SeedSoftMoERouter phi (S, d, slots), scale (S,)
    TopKRouter     gate nn.Linear             -> SeedTopKRouter    gate SeedLinear, auxiliary losses per seed

SeedExpertMLP and SeedSoftMoERouter run the plain layers' own math (experts.expert_layers and
router.soft_moe_routing, the forwards of ExpertMLP and SoftMoERouter) on the stacked weights, so a run of one
seed trains through the code of experts.py and router.py.

A seed-batched network's state dict is the N single networks' state dicts stacked name by name
(`stack_state_dicts`), so seed i's weights are `seed_state_dict(state, i)` and load into a plain QNetwork.
Its forward returns Q-values (S*b, A) and `aux_loss` (S,) (or a 0-d zero when there is no router loss);
the inspection outputs (routings, activations) mix seeds, so metrics run on a plain copy of one seed.

The gradients of sum_i loss_i are each seed's own gradients, and Adam is elementwise, so one Adam over
the stacked parameters is N independent Adams. Clipping by the global gradient norm is not elementwise:
`clip_grad_norm_per_seed` clips each seed's slice by that seed's own norm.
"""
import copy
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from experts import ExpertMLP, expert_layers
from router import SoftMoERouter, TopKRouter, balance_loss, z_loss


class SeedLinear(nn.Module):
    """S independent nn.Linear layers. x (S*m, ..., in), seed-major -> (S*m, ..., out)."""

    def __init__(self, in_features, out_features, num_seeds, bias=True):
        super().__init__()
        self.num_seeds = num_seeds
        self.weight = nn.Parameter(torch.empty(num_seeds, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_seeds, out_features)) if bias else None

    def forward(self, x):
        rows = x.reshape(self.num_seeds, -1, x.shape[-1])                       # (S, m, in)
        weight = self.weight.transpose(1, 2)                                     # (S, in, out)
        y = torch.bmm(rows, weight) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), rows, weight)
        return y.reshape(*x.shape[:-1], -1)                                      # einsum("smi,sio->smo") + b


class SeedExpertMLP(nn.Module):
    """S copies of an ExpertMLP, run as one ExpertMLP of S*e experts (seed-major).

    forward(x (e, S*m, d_in)) -> (e, S*m, d_out), the layout MoELayer uses, with each expert's rows
    seed-major. Hidden activations are not recorded (metrics run on a plain copy of one seed)."""

    def __init__(self, experts, num_seeds):
        super().__init__()
        self.num_experts, self.sizes, self.activate_last = experts.num_experts, experts.sizes, experts.activate_last
        self.num_seeds = num_seeds
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(num_seeds, *w.shape)) for w in experts.weights])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(num_seeds, *b.shape)) for b in experts.biases])

    def forward(self, x, hidden=None):
        s, e = self.num_seeds, self.num_experts
        m = x.shape[1] // s
        x = x.reshape(e, s, m, -1).transpose(0, 1).reshape(s * e, m, -1)        # (S*e, m, d_in)
        x = expert_layers(x, [w.flatten(0, 1) for w in self.weights], [b.flatten(0, 1) for b in self.biases],
                          self.activate_last)                                    # expert x = (s, e)
        return x.reshape(s, e, m, -1).transpose(0, 1).reshape(e, s * m, -1)


class SeedSoftMoERouter(SoftMoERouter):
    """S SoftMoERouters: SoftMoERouter's own forward (router.soft_moe_routing) over stacked weights, seed
    i's slot parameters Phi_i and scale_i applied to seed i's states. x (S*b, n, d) -> Routing over
    (S*b, n, slots)."""

    def __init__(self, router, num_seeds):
        nn.Module.__init__(self)           # not SoftMoERouter.__init__: it would draw Phi from the RNG
        self.num_experts, self.slots_per_expert, self.num_seeds = router.num_experts, router.slots_per_expert, num_seeds
        self.phi = nn.Parameter(torch.empty(num_seeds, *router.phi.shape))
        self.scale = nn.Parameter(torch.empty(num_seeds))


class SeedTopKRouter(TopKRouter):
    """S TopKRouters: TopKRouter's routing with a seed-batched gate, and its auxiliary losses computed
    per seed (the Switch balance loss of the seeds' pooled tokens is not the sum of their own).
    Routing.aux_loss is (S,)."""

    def __init__(self, router, num_seeds):
        nn.Module.__init__(self)           # not TopKRouter.__init__: it would draw a gate from the RNG
        self.num_experts, self.k, self.capacity_factor = router.num_experts, router.k, router.capacity_factor
        self.balance_loss_weight = self.z_loss_weight = 0.0          # TopKRouter.forward adds none ...
        self.seed_balance_loss_weight, self.seed_z_loss_weight = router.balance_loss_weight, router.z_loss_weight
        self.num_seeds = num_seeds
        self.gate = SeedLinear(router.gate.in_features, router.num_experts, num_seeds, bias=False)

    def forward(self, x, task_id=None):
        routing = super().forward(x, task_id)
        s = self.num_seeds
        aux = x.new_zeros(s)                                             # ... they are added here, per seed
        if self.seed_balance_loss_weight or self.seed_z_loss_weight:
            logits = routing.router_logits.reshape(s, -1, self.num_experts)       # (S, b*n/S, e)
            probs = logits.softmax(-1)
            chosen = F.one_hot(probs.topk(self.k, dim=-1).indices, self.num_experts).sum(-2)
            if self.seed_balance_loss_weight:
                aux = aux + self.seed_balance_loss_weight * torch.stack([balance_loss(probs[i], chosen[i]) for i in range(s)])
            if self.seed_z_loss_weight:
                aux = aux + self.seed_z_loss_weight * torch.stack([z_loss(logits[i]) for i in range(s)])
        routing.aux_loss = aux
        return routing


def seed_batched(network, num_seeds):
    """A copy of `network` (a QNetwork) in which every parameterised layer holds `num_seeds` seeds'
    weights (uninitialised: load a stacked state dict into it)."""
    def convert(module):
        if isinstance(module, nn.Linear):
            return SeedLinear(module.in_features, module.out_features, num_seeds, module.bias is not None)
        if isinstance(module, ExpertMLP):
            return SeedExpertMLP(module, num_seeds)
        if isinstance(module, SoftMoERouter):
            return SeedSoftMoERouter(module, num_seeds)
        if isinstance(module, TopKRouter):
            return SeedTopKRouter(module, num_seeds)
        for name, child in list(module.named_children()):
            setattr(module, name, convert(child))
        if any(True for _ in module.parameters(recurse=False)):
            raise TypeError(f"{type(module).__name__} has parameters of its own and no seed-batched version")
        return module

    batched = convert(copy.deepcopy(network))
    batched.num_seeds = num_seeds
    return batched


def stack_state_dicts(state_dicts):
    """N state dicts with the same names -> one whose tensors carry a leading seed axis."""
    return {name: torch.stack([sd[name] for sd in state_dicts]) for name in state_dicts[0]}


def seed_state_dict(state_dict, i):
    """Seed i's plain state dict out of a stacked one."""
    return {name: tensor[i] for name, tensor in state_dict.items()}


def stack_networks(networks):
    """One seed-batched network whose seed i is networks[i] (same weights, bit for bit)."""
    batched = seed_batched(networks[0], len(networks))
    batched.load_state_dict(stack_state_dicts([n.state_dict() for n in networks]))
    return batched


@torch.no_grad()
def clip_grad_norm_per_seed(parameters, max_norm, num_seeds):
    """torch.nn.utils.clip_grad_norm_ for each seed on its own: seed i's gradients (every parameter's
    slice i) are scaled by min(1, max_norm / (||g_i|| + 1e-6)), ||g_i|| the norm over all of seed i's
    gradients. Returns the (S,) norms before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    if num_seeds == 1:   # torch's own foreach clipping: the same result in fewer ops
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True).view(1)
    grads = [p.grad for p in parameters]
    norms = torch.stack([g.reshape(num_seeds, -1).norm(dim=1) for g in grads]).norm(dim=0)   # (S,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.dim() - 1)))
    return norms


class FrozenSeeds:
    """Keeps the weights of the seeds that have stopped (solved, or a non-finite loss) fixed while the
    others train on: one optimizer steps every seed, then `restore` writes the stopped seeds' weights
    back. (Adam moves a weight even at zero gradient, through its moments, so masking is not enough.)"""

    def __init__(self, parameters):
        self.parameters, self.saved, self.seeds = list(parameters), None, []

    def freeze(self, i):
        if self.saved is None:
            self.saved = [p.detach().clone() for p in self.parameters]
        for p, saved in zip(self.parameters, self.saved):
            saved[i] = p.detach()[i]
        self.seeds.append(i)

    @torch.no_grad()
    def restore(self):
        if self.seeds:
            index = torch.tensor(self.seeds)
            for p, saved in zip(self.parameters, self.saved):
                p[index] = saved[index]


# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_and_ci95(values):
    """Mean over seeds and the half-width of its 95% confidence interval (Student's t; None for one seed)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 2:
        return float(values.mean()), None
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(n))
