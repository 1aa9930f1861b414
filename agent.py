"""The language model as a policy: PA-MoE's agent, and how it scores a step's commands.

Agent is the frozen base LM (tiny_lm.TinyGPT, or any Hugging Face causal LM through hf_model.HFBase) with
K LoRA experts in its adapted layers (experts.add_lora) and, for phase and trajectory routing, the phase
router (router.PhaseRouter; arXiv 2602.17038). Its policy scores every admissible command by the LM's
log-likelihood of the command after the prompt and takes the softmax over the commands
(Agent.policy_log_probs); all of a step's commands are scored in one sequence packed after the prompt
(pack_continuations), and the logits are read in slices so that no (tokens x vocabulary) tensor is kept
(target_log_probs). What the agent is made of is an AgentConfig (train_agent.py fills one from its flags):

    base, tokenizer = tiny_lm.load_or_pretrain("runs/tiny_lm.pt", tiny_lm.PretrainConfig())  # or hf_model.load_hf_base
    agent = Agent(base, tokenizer, AgentConfig(routing="phase", experts=4))
    optimizer = agent.optimizer(learning_rate=1e-3)
"""
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

from experts import add_lora, lora_layers, lora_parameters, record_routing, route
from hf_model import default_target_modules
from router import PhaseRouter, PhaseRouting, TokenRouter, TokenRouting
from tiny_lm import pad


@dataclass
class AgentConfig:
    """What an Agent is made of; train_agent.py's flags of the same names set each field."""
    routing: str = "phase"           # single (one LoRA), token (a router per adapted layer and token), trajectory
                                     # (one expert per episode) or phase (PA-MoE: one expert per step)
    experts: int = 4                 # K, the LoRA experts (single uses 1)
    token_k: int = 1                 # experts per token with token routing
    rank: int = 8                    # LoRA rank r
    lora_alpha: float = 16.0         # LoRA alpha (scale alpha / r)
    lora_dropout: float = 0.0        # dropout on the adapter input
    target_modules: str = "auto"     # comma-separated names of the linear layers to adapt, or auto (target_modules)
    lora_mlp: bool = False           # with auto, also adapt the MLP projections
    router_hidden: int = 64          # the phase router's LSTM and MLP width
    router_dropout: float = 0.0      # dropout in the phase router's MLP
    action_mode: str = "score"       # score: a softmax over the admissible commands; generate: a free-text answer
    max_new_tokens: int = 256        # longest answer in generate mode (the prompt is cut to leave room for it)


class Agent(nn.Module):
    """The frozen base LM with its LoRA experts, and the phase router for phase/trajectory routing."""

    def __init__(self, base, tokenizer, config=None):
        super().__init__()
        config = config or AgentConfig()
        self.base, self.tokenizer, self.config, self.routing = base, tokenizer, config, config.routing
        num_experts = 1 if config.routing == "single" else config.experts
        router_factory = (lambda dim: TokenRouter(dim, num_experts, config.token_k)) \
            if config.routing == "token" else None
        add_lora(base, target_modules(base, config.target_modules, config.lora_mlp), num_experts, config.rank,
                 config.lora_alpha, config.lora_dropout, router_factory)
        dim = base.config.dim
        self.router = PhaseRouter(dim, num_experts, config.router_hidden, dropout=config.router_dropout) \
            if config.routing in ("trajectory", "phase") else None
        self.num_experts = num_experts
        self.max_prompt = base.config.max_len - (config.max_new_tokens if config.action_mode == "generate" else 16)
        self._ids, self._encodings, self._encoded_floats = {}, {}, 0

    def train(self, mode=True):
        """Training mode reaches only what trains (the adapters' dropout, the routers): the frozen base's own
        modules, such as a Hugging Face model's dropout, always stay in evaluation mode."""
        super().train(mode)
        self.base.eval()
        for layer in lora_layers(self.base):
            layer.train(mode)
        return self

    def trainable_parameters(self):
        return lora_parameters(self.base) + (list(self.router.parameters()) if self.router else [])

    def optimizer(self, learning_rate, router_learning_rate=0.0):
        """Adam over the experts and the routers, the routers at router_learning_rate if it is set (not 0)."""
        routers = [p for name, p in self.named_parameters() if p.requires_grad and "router" in name]
        ids = {id(p) for p in routers}
        experts = [p for p in self.trainable_parameters() if id(p) not in ids]
        groups = [{"params": experts}] + ([{"params": routers, "lr": router_learning_rate or learning_rate}]
                                          if routers else [])
        return torch.optim.Adam(groups, lr=learning_rate)

    def encode_text(self, text):
        """Token ids of a short text that repeats (a command, an observation), memoised; the memo is bounded."""
        if text not in self._ids:
            if len(self._ids) >= 100_000:
                self._ids.clear()
            self._ids[text] = self.tokenizer.encode(text)
        return self._ids[text]

    @torch.no_grad()
    def frozen_encodings(self, texts):
        """Enc(.) of PA-MoE: the frozen base's final hidden states (no adapter), one (t, d) tensor per text.
        The base never changes, so each text is encoded once; the memo holds at most ENCODING_FLOATS floats
        (when a call would exceed it, it is emptied first, keeping what this call returns)."""
        found = {t: self._encodings[t] for t in texts if t in self._encodings}
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        if missing:
            ids, mask = pad([self.encode_text(t)[-self.max_prompt:] or [self.tokenizer.unk_id] for t in missing],
                            self.tokenizer.pad_id)
            with route(self.base, torch.full((len(missing),), -1)):
                hidden, _ = self.base(ids, mask)
            fresh = {text: h[m.to(h.device)].float() for text, h, m in zip(missing, hidden, mask)}
            size = sum(e.numel() for e in fresh.values())
            if self._encoded_floats + size > ENCODING_FLOATS:
                self._encodings.clear()
                self._encoded_floats = 0
            self._encodings.update(fresh)
            self._encoded_floats += size
            found.update(fresh)
        return [found[t] for t in texts]

    def score(self, prompts, continuations, expert_index, temperature=1.0):
        """sum_i log softmax(logits_i / temperature)[token_i] over the tokens of each continuation of each prompt
        (a step's commands each followed by <eos>, or its one free-text answer).
        prompts: b id lists; continuations: b lists of id lists; expert_index (b,) or None (token routing).
        Identical (prompt, continuations, expert) rows are computed once; the rest are packed
        (pack_continuations: a prompt runs once, and each continuation attends to it and to its own tokens),
        sorted by length and run in chunks of about CHUNK_TOKENS tokens, so that little is padding.
        Returns Scores, on the CPU."""
        experts = [-2] * len(prompts) if expert_index is None else expert_index.tolist()
        keys = [(tuple(p[-self.max_prompt:]), tuple(map(tuple, cs)), x) for p, cs, x in zip(prompts, continuations, experts)]
        unique = list(dict.fromkeys(keys))
        lengths = [len(k[0]) + sum(len(c) - 1 for c in k[1]) for k in unique]      # packed length of each row
        sums = torch.full((len(unique), max(len(cs) for cs in continuations)), -math.inf)
        scored, routes = [], []
        for rows in length_chunks(lengths, CHUNK_TOKENS):
            chunk = [unique[u] for u in rows]
            packed = pack_continuations([list(k[0]) for k in chunk], [list(map(list, k[1])) for k in chunk],
                                        self.tokenizer.pad_id)
            with route(self.base, None if expert_index is None else torch.tensor([k[2] for k in chunk])), \
                    record_routing(self.base) as decided:
                hidden, _ = self.base(packed.ids, packed.mask, packed.positions, packed.allowed)
            predicted = hidden[packed.target_row.to(hidden.device), packed.target_position.to(hidden.device)]
            token_log_probs = target_log_probs(self.base, predicted, packed.target.to(predicted.device), temperature)
            per_continuation = torch.zeros(len(packed.continuation_row), device=predicted.device).index_add(
                0, packed.target_owner.to(predicted.device), token_log_probs).cpu()
            scored.append((torch.tensor(rows), packed, per_continuation))
            if self.routing == "token" and expert_index is None:     # the token routers ran (not the frozen base)
                routes.append(token_routing(self.base, packed, decided))
        for rows, packed, per_continuation in scored:
            sums = sums.index_put((rows[packed.continuation_row], packed.continuation_index), per_continuation)
        where = {key: u for u, key in enumerate(unique)}
        inverse = torch.tensor([where[k] for k in keys])
        return Scores(sums[inverse], inverse, scored, routes)

    def policy_log_probs(self, prompts, actions, expert_index, temperature=1.0):
        """log pi of each step's candidate actions: (b, c) over its admissible commands (score mode: the
        softmax over the commands of the LM's log-likelihood of each, its tokens and <eos>), or (b, 1) of its
        one sampled answer (generate mode, at the sampling temperature). Returns (log-probs, Scores)."""
        if self.config.action_mode == "generate":
            scores = self.score(prompts, actions, expert_index, temperature)
            return scores.log_likelihoods, scores
        eos = self.tokenizer.eos_id
        scores = self.score(prompts, [[cmd + [eos] for cmd in cs] for cs in actions], expert_index)
        return scores.log_likelihoods.log_softmax(-1), scores

    def route_steps(self, inputs, temperature):
        """Run the phase router on a list of stored inputs (obs encoding, goal encoding, pair history).
        The decision comes back on the CPU, with its gradient."""
        obs, obs_mask = stack_padded([x[0] for x in inputs])
        goal, goal_mask = stack_padded([x[1] for x in inputs])
        history, history_mask = stack_padded([x[2] for x in inputs])
        routing = self.router(obs, obs_mask, goal, goal_mask, history, history_mask.sum(1), temperature)
        return PhaseRouting(routing.logits.cpu(), routing.log_probs.cpu())


CHUNK_TOKENS = 16384     # padded tokens per forward pass of Agent.score
ENCODING_FLOATS = 2 ** 25  # most floats Agent.frozen_encodings keeps (128 MB)
LOGIT_FLOATS = 2 ** 24   # most (targets x vocab) logits that exist at once: 64 MB of float32


def target_log_probs(base, hidden, targets, temperature=1.0):
    """log softmax(logits / temperature)[target] for each row of hidden (n, d), in slices of rows whose logits
    stay within LOGIT_FLOATS: (n x vocab) float32 logits are never materialised (151,936 entries a token for
    Qwen2.5). Under autograd each slice is checkpointed: the backward pass recomputes its logits instead of
    keeping them, so an update holds only the (n, d) hidden states."""
    def piece(h, t):
        logits = base.logits(h) / temperature
        return logits.log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    rows = max(1, LOGIT_FLOATS // base.config.vocab_size)
    keep = torch.is_grad_enabled() and hidden.requires_grad
    pieces = [torch.utils.checkpoint.checkpoint(piece, hidden[i:i + rows], targets[i:i + rows], use_reentrant=False)
              if keep else piece(hidden[i:i + rows], targets[i:i + rows]) for i in range(0, len(hidden), rows)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0)


def length_chunks(lengths, budget):
    """Indices sorted by length, cut into runs whose padded size (count x longest) stays within budget (a
    row longer than the budget runs alone)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * lengths[order[stop]] <= budget:
            stop += 1
        yield order[start:stop]
        start = stop


@dataclass
class Packed:
    """Rows of (prompt, continuation inputs...) for pack_continuations. n rows of width t; targets are the
    scored tokens: row, the position whose output predicts the token, the token, the continuation it
    belongs to (an index into continuation_row / continuation_index, the continuation's row and its
    index among that row's continuations)."""
    ids: torch.Tensor                 # (n, t)
    mask: torch.Tensor                # (n, t) bool
    positions: torch.Tensor           # (n, t)
    allowed: torch.Tensor             # (n, t, t) bool
    target_row: torch.Tensor          # (targets,)
    target_position: torch.Tensor     # (targets,)
    target: torch.Tensor              # (targets,)
    target_owner: torch.Tensor        # (targets,)
    continuation_row: torch.Tensor    # (continuations,)
    continuation_index: torch.Tensor  # (continuations,)
    first_continuation: list          # row -> index of its first continuation
    continuation_start: list          # continuation -> index of its first target (and the total at the end)


def pack_continuations(prompts, continuations, pad_id):
    """Pack each prompt and all its continuations into one sequence, so that one forward pass scores them all:
    the prompt, then each continuation's tokens but its last (its inputs). A continuation attends to the
    prompt and to its own earlier tokens, never to another continuation, and its positions restart where
    the prompt ends: every continuation sees exactly what it would see alone after the prompt. Its first
    token is predicted from the prompt's last position, each other token from the token before it.
    prompts: n non-empty id lists; continuations: n lists of non-empty id lists."""
    prompt_length = np.array([len(p) for p in prompts])
    count = np.array([len(cs) for cs in continuations])                      # continuations per row
    length = np.array([len(c) for cs in continuations for c in cs])           # (C,) tokens per continuation
    row_of = np.repeat(np.arange(len(prompts)), count)                        # (C,)
    first = np.concatenate([[0], np.cumsum(count)])                           # row -> its first continuation
    inputs = length - 1
    # column where each continuation's inputs start: after its prompt and the earlier continuations' inputs
    earlier = np.cumsum(inputs) - inputs                                      # inputs of all earlier continuations
    start = prompt_length[row_of] + earlier - earlier[first[row_of]]
    width = int((prompt_length + np.bincount(row_of, inputs, len(prompts))).max())
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    segment = np.full((len(prompts), width), -1, dtype=np.int16)          # 0 prompt, j + 1 continuation j, -1 pad
    position = np.zeros((len(prompts), width), dtype=np.int64)
    prompt_row = np.repeat(np.arange(len(prompts)), prompt_length)
    prompt_column = np.arange(prompt_length.sum()) - np.repeat(np.cumsum(prompt_length) - prompt_length, prompt_length)
    ids[prompt_row, prompt_column] = np.fromiter(itertools.chain.from_iterable(prompts), np.int64, prompt_length.sum())
    segment[prompt_row, prompt_column] = 0
    position[prompt_row, prompt_column] = prompt_column
    tokens = np.fromiter(itertools.chain.from_iterable(c for cs in continuations for c in cs), np.int64, length.sum())
    owner = np.repeat(np.arange(len(length)), length)                         # (targets,) its continuation
    offset = np.arange(len(tokens)) - np.repeat(np.cumsum(length) - length, length)   # index within it
    is_input = offset < length[owner] - 1
    column = start[owner] + offset                                            # where an input token sits
    ids[row_of[owner][is_input], column[is_input]] = tokens[is_input]
    segment[row_of[owner][is_input], column[is_input]] = (np.arange(len(length)) - first[row_of])[owner][is_input] + 1
    position[row_of[owner][is_input], column[is_input]] = (prompt_length[row_of[owner]] + offset)[is_input]
    predictor = np.where(offset == 0, prompt_length[row_of[owner]] - 1, column - 1)
    # a query attends to the prompt's keys and to its own continuation's, causally (numpy: far faster here)
    key = np.where(segment < 0, -2, segment)                                  # a padding key matches no query
    allowed = ((key[:, None, :] == segment[:, :, None]) | (key == 0)[:, None, :]) & np.tri(width, dtype=bool)
    ids, position, allowed = torch.from_numpy(ids), torch.from_numpy(position), torch.from_numpy(allowed)
    mask = torch.from_numpy(segment >= 0)
    as_tensor = lambda values: torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    return Packed(ids, mask, position, allowed, as_tensor(row_of[owner]), as_tensor(predictor), torch.from_numpy(tokens),
                  as_tensor(owner), as_tensor(row_of), as_tensor(np.arange(len(length)) - first[row_of]),
                  first[:-1].tolist(), np.concatenate([[0], np.cumsum(length)]).tolist())


@dataclass
class Scores:
    """What Agent.score computed: the (b, c) log-likelihoods (-inf where a step has fewer continuations) and,
    for token routing, what every token router decided at the positions that scored each continuation."""
    log_likelihoods: torch.Tensor
    inverse: torch.Tensor             # (b,) step -> the unique row that computed it
    chunks: list                      # (unique rows, Packed, per-continuation sums) per forward pass
    token_routes: list                # per chunk: token_routing's (chosen, log-probs, TokenRoutings); empty
                                      # when an expert index was given (the token routers did not run)

    def __post_init__(self):
        self.location = {int(u): (c, r) for c, (rows, _, _) in enumerate(self.chunks) for r, u in enumerate(rows)}

    def routes(self, step, continuation):
        """Token routing of one continuation's scored tokens: chosen experts (layers, tokens, k) and router
        log-probs (layers, tokens, e), on the CPU."""
        chunk, row = self.location[int(self.inverse[step])]
        packed, (chosen, log_probs, _) = self.chunks[chunk][1], self.token_routes[chunk]
        owner = packed.first_continuation[row] + continuation
        tokens = slice(packed.continuation_start[owner], packed.continuation_start[owner + 1])
        return chosen[:, tokens], log_probs[:, tokens]

    def balance_loss(self):
        """The token routers' balance loss over every real token of these forward passes, mean over layers."""
        per_layer = [TokenRouting(torch.cat([chunk[2][layer].log_probs for chunk in self.token_routes]),
                                  torch.cat([chunk[2][layer].chosen for chunk in self.token_routes]))
                     for layer in range(len(self.token_routes[0][2]))]
        return torch.stack([routing.balance_loss() for routing in per_layer]).mean()


def token_routing(model, packed, decided):
    """What every token router of the model decided in a forward pass over `packed` (decided: what
    experts.record_routing recorded in it): chosen experts (layers, targets, k) and log-probs (layers,
    targets, e) at each scored token's predicting position, on the CPU, and per layer the TokenRouting of all
    real tokens (for the balance loss)."""
    routings = [decided[layer] for layer in lora_layers(model)]
    at = lambda x: x[packed.target_row.to(x.device), packed.target_position.to(x.device)]
    chosen = torch.stack([at(r.chosen) for r in routings]).cpu()
    log_probs = torch.stack([at(r.log_probs) for r in routings]).cpu()
    real = [TokenRouting(r.log_probs[packed.mask.to(r.log_probs.device)], r.chosen[packed.mask.to(r.chosen.device)])
            for r in routings]
    return chosen, log_probs, real


def stack_padded(tensors):
    """List of (t_i, d) -> (n, max t, d) right-padded, and the (n, max t) mask."""
    width = max(t.shape[0] for t in tensors)
    out = tensors[0].new_zeros(len(tensors), width, tensors[0].shape[1])
    mask = torch.zeros(len(tensors), width, dtype=torch.bool, device=out.device)
    for i, t in enumerate(tensors):
        out[i, :len(t)], mask[i, :len(t)] = t, True
    return out, mask


def target_modules(base, names="auto", mlp=False):
    """The LoRA targets: the comma-separated names (--target-modules), or for auto the attention projections
    (and with mlp, --lora-mlp, the MLP's) under the architecture's names."""
    if names != "auto":
        return [t.strip() for t in names.split(",") if t.strip()]
    return default_target_modules(base, mlp)
