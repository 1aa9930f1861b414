"""Experts: many small networks stored as one batch of weights.

ExpertMLP holds `num_experts` independent MLPs. Layer l keeps its weights as one tensor of shape
(experts, d_in, d_out), and all experts run in a single batched matmul per layer, with no Python loop over
experts (the lucidrains mixture-of-experts style). Letters: e experts, m rows (slots), i in, o out.

- A token expert, as in Dopamine's MoE agents (arXiv 2402.08609): Dense(hidden)-ReLU-Dense(d).
- A full-network expert for Big (Willi et al. 2024): each expert is a whole Q-network, obs -> Q.
- LoRA written from scratch (Hu et al. 2021, arXiv 2106.09685) and a LoRA expert bank: K adapters on
  one frozen linear layer, each sample (or token) using its own expert, for PA-MoE (arXiv 2602.17038).
"""
import contextlib
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F


class ExpertMLP(nn.Module):
    """`num_experts` MLPs with layer sizes `sizes`, ReLU between layers (and after the last if asked).

    forward(x): x (e, m, sizes[0]) -> (e, m, sizes[-1]); row block x[i] goes through expert i.
    Each expert is initialised like its own nn.Linear stack: U(-1/sqrt(d_in), 1/sqrt(d_in)).
    """

    def __init__(self, num_experts, sizes, activate_last=False):
        super().__init__()
        self.num_experts, self.sizes, self.activate_last = num_experts, list(sizes), activate_last
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(d_in)
            self.weights.append(nn.Parameter(torch.empty(num_experts, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_experts, 1, d_out).uniform_(-bound, bound)))

    def forward(self, x, hidden=None):
        """If `hidden` is a list, the post-ReLU activations of every hidden layer are appended to it
        (each (e, m, width)): the dormant-neuron metric reads them."""
        return expert_layers(x, self.weights, self.biases, self.activate_last, hidden)

    def expert(self, i):
        """Expert i as a plain nn.Sequential (same weights, copied): for tests and for reading."""
        layers = []
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            linear = nn.Linear(w.shape[1], w.shape[2])
            linear.weight.data.copy_(w[i].T)
            linear.bias.data.copy_(b[i, 0])
            layers.append(linear)
            if layer < last or self.activate_last:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def expert_layers(x, weights, biases, activate_last=False, hidden=None):
    """ExpertMLP's forward as a function of its weights: x (e, m, d_in) through the layers weights[l]
    (e, d_in, d_out), biases[l] (e, 1, d_out), ReLU between them (and after the last if activate_last).
    many_seeds.SeedExpertMLP runs its S seeds' experts through it as S*e experts."""
    last = len(weights) - 1
    for layer, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b, x, w)                 # einsum("emi,eio->emo", x, w) + b, in one call
        if layer < last or activate_last:
            x = torch.relu(x)
            if hidden is not None:
                hidden.append(x)
    return x


class LoRALinear(nn.Module):
    """A frozen nn.Linear with a bank of K LoRA adapters (K = 1 is plain LoRA). LoRA, Eq. 3:

        h = W x + b + (alpha / r) * sum_k g_k * B_k A_k dropout(x)

    A_k (r, d_in) is Kaiming-uniform and B_k (d_out, r) zero, so at initialisation h = W x + b exactly.
    The gates g (..., K) say which expert each sample or token uses:
      - `expert_index` (N,) set by `route(model, index)`: sample n uses expert index[n] (one-hot gates;
        -1 = no adapter, the frozen base);
      - a token router (`router`, any module x -> (gates, routing info)): per-token gates, and what it
        decided goes to the caller that asked for it with `record_routing(model)`;
      - neither, with K = 1: the one adapter.
    All K low-rank branches are computed in two matmuls (x @ [A_1..A_K] then [B_1..B_K]) and masked by
    the gates: no loop over samples or experts, and an expert a sample does not use gets exactly zero
    gradient from it (its branch is multiplied by 0).
    """

    def __init__(self, base: nn.Linear, num_experts=1, rank=8, alpha=16.0, dropout=0.0, router=None):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.num_experts, self.rank, self.scaling = num_experts, rank, alpha / rank
        d_out, d_in = base.weight.shape
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, d_in))
        for a in self.lora_A.data:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))      # what nn.Linear (and PEFT, minLoRA) use
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, rank))
        self.dropout = nn.Dropout(dropout)
        self.router = router                 # token routing: a module x -> (gates (..., K), info)
        self.expert_index = None             # (N,) long, set by route(); -1 = frozen base only
        self.record = None                   # record_routing's dict, while a caller records: layer -> routing
        self.merged_expert = None

    def delta_weight(self, expert):
        return self.scaling * self.lora_B[expert] @ self.lora_A[expert]          # (d_out, d_in)

    def gates(self, x):
        if self.expert_index is not None:
            index = self.expert_index.to(x.device)
            if x.dim() == 2 and x.shape[0] != index.shape[0] and x.shape[0] % index.shape[0] == 0:
                index = index.repeat_interleave(x.shape[0] // index.shape[0])    # OPT's MLP: (N * t, d) rows
            gates = F.one_hot(index.clamp(min=0), self.num_experts).to(x.dtype) * (index >= 0).unsqueeze(-1)
            return gates.view(gates.shape[0], *([1] * (x.dim() - 2)), self.num_experts)   # (N, 1.., K)
        if self.router is not None:
            gates, routing = self.router(x)
            if self.record is not None:
                self.record[self] = routing
            return gates
        if self.num_experts == 1:
            return None
        raise RuntimeError("LoRALinear with several experts needs an expert index (route()) or a token router")

    def forward(self, x):                                           # x (N, ..., d_in)
        out = self.base(x)
        if self.merged_expert is not None:
            return out                                              # the adapter is inside W already
        gates = self.gates(x)
        x = x.to(self.lora_A.dtype)                                 # a bfloat16 base keeps float32 adapters
        low = self.dropout(x) @ self.lora_A.flatten(0, 1).T        # (N, ..., K*r): all K branches at once
        if gates is not None:
            low = (low.unflatten(-1, (self.num_experts, self.rank)) * gates.unsqueeze(-1)).flatten(-2)
        return out + (self.scaling * low @ self.lora_B.transpose(1, 2).flatten(0, 1)).to(out.dtype)   # (K*r, d_out)

    @torch.no_grad()
    def merge(self, expert=0):
        """Fold expert `expert` into the frozen weight (W + alpha/r B A) for inference with one expert."""
        if self.merged_expert is None:
            self.base.weight += self.delta_weight(expert).to(self.base.weight.dtype)
            self.merged_expert = expert

    @torch.no_grad()
    def unmerge(self):
        if self.merged_expert is not None:
            self.base.weight -= self.delta_weight(self.merged_expert).to(self.base.weight.dtype)
            self.merged_expert = None


def add_lora(model, target_modules, num_experts=1, rank=8, alpha=16.0, dropout=0.0, router_factory=None):
    """Freeze `model` and replace every nn.Linear whose dotted name ends with one of `target_modules`
    (e.g. ("q_proj", "k_proj", "v_proj", "o_proj") for Llama/Qwen/Mistral, ("attn.c_attn", "attn.c_proj") for
    GPT-2) by a LoRALinear on the layer's device. router_factory(d_in) -> token router, for token routing.
    A name that matches no nn.Linear is an error that lists the names there are. Returns the wrapped names."""
    model.requires_grad_(False)
    targets = tuple(target_modules)
    matches = [(module, child_name, child, f"{name}.{child_name}" if name else child_name)
               for name, module in model.named_modules() for child_name, child in module.named_children()]
    matches = [m for m in matches if isinstance(m[2], nn.Linear) and any(m[3] == t or m[3].endswith("." + t)
                                                                         for t in targets)]
    # every name must match: a misspelt one would silently leave its layers without adapters
    unmatched = [t for t in targets if not any(full == t or full.endswith("." + t) for *_, full in matches)]
    if unmatched:
        other = [n for n, m in model.named_modules() if not isinstance(m, nn.Linear)
                 and any(n == t or n.endswith("." + t) for t in unmatched)]
        hint = f" ({other[0]} is a {type(model.get_submodule(other[0])).__name__}, not an nn.Linear)" if other else ""
        raise ValueError(f"no nn.Linear named {unmatched} in the model{hint}; its linear layers are named "
                         f"{linear_layer_names(model)}")
    for module, child_name, child, _ in matches:
        router = router_factory(child.in_features) if router_factory else None
        layer = LoRALinear(child, num_experts, rank, alpha, dropout, router)
        setattr(module, child_name, layer.to(child.weight.device))
    return [full for *_, full in matches]


def linear_layer_names(model):
    """The distinct nn.Linear names of a model as add_lora takes them: relative to their numbered layer
    (self_attn.q_proj, mlp.c_proj) or whole (lm_head)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            short = re.split(r"(?:^|\.)\d+\.", name)[-1]
            if short not in names:
                names.append(short)
    return names


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model):
    """The trainable parameters: adapters and token routers (everything else is frozen)."""
    return [p for m in lora_layers(model) for p in m.parameters() if p.requires_grad]


@contextlib.contextmanager
def record_routing(model):
    """What the token routers decide while the model runs in this block: yields a dict, filled as the
    layers run, from each LoRALinear with a token router to the routing info of its latest forward.
    (An adapted layer sits inside a model whose forward returns only hidden states, so its decision comes
    back this way rather than up the return path.) Nothing stays on the layers after the block."""
    layers, record = lora_layers(model), {}
    for layer in layers:
        layer.record = record
    try:
        yield record
    finally:
        for layer in layers:
            layer.record = None


@contextlib.contextmanager
def route(model, expert_index):
    """Run the model with sample n on expert expert_index[n] (-1: the frozen base, no adapter).
    `expert_index` None leaves the layers to their token routers (or their single adapter)."""
    layers = lora_layers(model)
    for layer in layers:
        layer.expert_index = expert_index
    try:
        yield
    finally:
        for layer in layers:
            layer.expert_index = None
