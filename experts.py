"""Experts: many small networks stored as one batch of weights.

ExpertMLP holds `num_experts` independent MLPs. Layer l keeps its weights as one tensor of shape
(experts, d_in, d_out), and all experts run in a single batched matmul per layer, with no Python loop over
experts (the lucidrains mixture-of-experts style). Letters: e experts, m rows (slots), i in, o out.

- A token expert, as in Dopamine's MoE agents (arXiv 2402.08609): Dense(hidden)-ReLU-Dense(d).
- A full-network expert for Big (Willi et al. 2024): each expert is a whole Q-network, obs -> Q.
(LoRA experts for the LLM agent will live here too.)
"""
import math

import torch
import torch.nn as nn


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
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)                 # einsum("emi,eio->emo", x, w) + b, in one call
            if layer < last or self.activate_last:
                x = torch.relu(x)
                if hidden is not None:
                    hidden.append(x)
        return x

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
