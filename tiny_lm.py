"""A tiny GPT and a word tokenizer: the stand-in for a pretrained LLM on a 2-core CPU.

PA-MoE (arXiv 2602.17038) puts LoRA experts on a frozen pretrained LLM (Qwen2.5-1.5B-Instruct). Here the
frozen base is a GPT-style causal transformer of a few layers (Radford et al. 2019; nanoGPT's shape),
pretrained by next-token prediction on transcripts of *random* play in the household environment
(envs.HouseholdEnv): it learns the language of the game and which commands exist in which situation,
but not how to solve a task, because a random player never tries to. So everything the agent learns
about solving tasks comes from RL in the LoRA experts. Its likelihood of a command given the prompt is
only roughly uniform over the admissible commands: it overweights the commands that are admissible
everywhere ("look", "inventory"), and the untrained policy wins less often than a uniform random one
(README, Measured).

The attention and MLP projections are named like Llama's (q_proj, k_proj, v_proj, o_proj, up_proj,
down_proj) so that the same LoRA targets work here and on a Hugging Face model. `forward` takes a cached
prefix (`past`, the keys and values of every layer), so many commands are scored against one prompt
without recomputing it (train_agent.py).

    python tiny_lm.py --out runs/tiny_lm.pt          # pretrain and cache (train_agent.py does this itself)
"""
import argparse
import math
import os
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from envs import EVAL_SEED_OFFSET, HouseholdEnv, render_prompt

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


class WordTokenizer:
    """Lower-cased words, numbers and punctuation marks, one token each; unknown words map to <unk>."""

    pattern = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")

    def __init__(self, words):
        self.words = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)

    @classmethod
    def from_texts(cls, texts):
        return cls(sorted({w for text in texts for w in cls.pattern.findall(text.lower())}))

    def __len__(self):
        return len(self.words)

    def encode(self, text):
        return [self.index.get(w, self.unk_id) for w in self.pattern.findall(text.lower())]

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


@dataclass
class GPTConfig:
    vocab_size: int
    dim: int = 64
    layers: int = 2
    heads: int = 4
    max_len: int = 256


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(config.dim, config.dim) for _ in range(4))

    def forward(self, x, allowed, past=None, past_mask=None):
        """x (n, t, d); allowed (n, 1, t, t) bool: which of these tokens each token may attend to.
        past: (k, v) of a prefix, each (b, h, p, d/h) with n = b * g: rows b*g .. b*g + g - 1 of x all
        continue prefix b (g commands scored against one prompt), which is never copied g times;
        past_mask (b, p) marks its real tokens. Returns the output and this call's (k, v)."""
        n, t, d = x.shape
        h = self.heads
        q, k, v = (proj(x).view(n, t, h, d // h).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if past is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)                  # (n, h, t, d/h)
            return self.o_proj(y.transpose(1, 2).reshape(n, t, d)), (k, v)
        k_past, v_past = past
        b, p, g = k_past.shape[0], k_past.shape[2], n // k_past.shape[0]
        group = lambda z: z.view(b, g, h, t, -1).transpose(1, 2)                            # (b, h, g, t, .)
        scale = (d // h) ** -0.5
        to_past = (group(q).reshape(b, h, g * t, -1) @ k_past.transpose(-1, -2)).view(b, h, g, t, p) * scale
        to_past = to_past.masked_fill(~past_mask[:, None, None, None, :], -math.inf)
        to_self = (group(q) @ group(k).transpose(-1, -2)) * scale                           # (b, h, g, t, t)
        to_self = to_self.masked_fill(~allowed.view(b, g, 1, t, t).transpose(1, 2), -math.inf)
        weights = torch.cat([to_past, to_self], -1).softmax(-1)
        y = (weights[..., :p].reshape(b, h, g * t, p) @ v_past).view(b, h, g, t, -1) + weights[..., p:] @ group(v)
        return self.o_proj(y.permute(0, 2, 3, 1, 4).reshape(n, t, d)), (k, v)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.attn = Attention(config)
        self.mlp = nn.Sequential()
        self.mlp.up_proj = nn.Linear(config.dim, 4 * config.dim)
        self.mlp.act = nn.GELU()
        self.mlp.down_proj = nn.Linear(4 * config.dim, config.dim)

    def forward(self, x, allowed, past=None, past_mask=None):
        a, present = self.attn(self.ln_1(x), allowed, past, past_mask)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class TinyGPT(nn.Module):
    """GPT-2-style pre-norm transformer with learned positions and a tied output embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_len, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.dim)
        self.apply(self._init)

    @staticmethod
    def _init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids, mask, past=None, past_mask=None):
        """ids, mask (n, t): token ids and which are real (padding may sit on either side).
        past: the per-layer (k, v) that an earlier call returned for b prefixes (past_mask (b, p)), where
        n = b * g and rows b*g .. b*g + g - 1 continue prefix b. Returns the final hidden states
        (n, t, d) and the per-layer (k, v) of this call's tokens."""
        n, t = ids.shape
        offset = 0
        if past is not None:
            offset = past_mask.sum(1, keepdim=True).repeat_interleave(n // past_mask.shape[0], 0)
        positions = (offset + mask.long().cumsum(1) - 1).clamp(0, self.config.max_len - 1)
        x = self.wte(ids) + self.wpe(positions)
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        allowed = causal & mask[:, None, :]                                          # (n, t, t)
        allowed = (allowed | torch.eye(t, dtype=torch.bool, device=ids.device)).unsqueeze(1)  # pads see themselves
        presents = []
        for layer, block in enumerate(self.blocks):
            x, present = block(x, allowed, past[layer] if past is not None else None, past_mask)
            presents.append(present)
        return self.ln_f(x), presents

    def logits(self, hidden):
        return hidden @ self.wte.weight.T                                            # (n, t, vocab)


def pad(sequences, pad_id, left=False):
    """Lists of ids -> (n, t) tensor and its bool mask; left padding keeps the ends aligned."""
    width = max(1, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    for row, s in enumerate(sequences):
        if s:
            span = slice(width - len(s), width) if left else slice(0, len(s))
            ids[row, span] = torch.tensor(s)
            mask[row, span] = True
    return ids, mask


def random_play_texts(episodes, seed, max_steps, history_length):
    """(prompt, command) pairs from uniformly random play on training seeds: the pretraining corpus."""
    rng = np.random.default_rng(seed)
    env = HouseholdEnv(max_steps=max_steps)
    pairs = []
    batch = 32
    for start in range(0, episodes, batch):
        seeds = [int(s) for s in rng.integers(0, EVAL_SEED_OFFSET, min(batch, episodes - start))]
        observations, infos = env.reset(seeds)
        histories = [[] for _ in seeds]
        done = [False] * len(seeds)
        while not all(done):
            commands = []
            for i, info in enumerate(infos):
                command = info["admissible_commands"][rng.integers(len(info["admissible_commands"]))]
                commands.append(command)
                if not done[i]:
                    pairs.append((render_prompt(info["goal"], histories[i], observations[i], history_length,
                                                info["admissible_commands"]), command))
            next_observations, _, dones, infos = env.step(commands)
            for i, command in enumerate(commands):
                if not done[i]:
                    histories[i].append((command, next_observations[i]))
            observations, done = next_observations, [d or e for d, e in zip(done, dones)]
    return pairs


@dataclass
class PretrainConfig:
    episodes: int = 600
    steps: int = 2500
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    max_steps: int = 30
    history_length: int = 2
    dim: int = 64
    layers: int = 2
    heads: int = 4


def pretrain(config: PretrainConfig, progress=True):
    """Next-token prediction on random-play transcripts; returns (model, tokenizer, final loss)."""
    torch.manual_seed(config.seed)
    pairs = random_play_texts(config.episodes, config.seed, config.max_steps, config.history_length)
    tokenizer = WordTokenizer.from_texts(text for pair in pairs for text in pair)
    sequences = [[tokenizer.bos_id] + tokenizer.encode(p) + tokenizer.encode(c) + [tokenizer.eos_id] for p, c in pairs]
    max_len = max(256, max(map(len, sequences)) + 8)
    model = TinyGPT(GPTConfig(len(tokenizer), config.dim, config.layers, config.heads, max_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    rng = np.random.default_rng(config.seed)
    bar = tqdm(range(config.steps), desc="pretraining the tiny LM on random play", disable=not progress)
    loss_ema = None
    for _ in bar:
        batch = [sequences[i] for i in rng.integers(len(sequences), size=config.batch_size)]
        ids, mask = pad(batch, tokenizer.pad_id)
        hidden, _ = model(ids[:, :-1], mask[:, :-1])
        loss = F.cross_entropy(model.logits(hidden).flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.3f}")
    return model.eval(), tokenizer, loss_ema


def corpus_sample(config):
    """The first (prompt, command) of the corpus: a cached model whose sample differs was pretrained on
    another version of the environment or prompt, and is pretrained again."""
    return list(random_play_texts(1, config.seed, config.max_steps, config.history_length)[0])


def load_or_pretrain(path, config: PretrainConfig, progress=True):
    """The cached base model at `path` if it was pretrained with this config, else pretrain and cache it."""
    if path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        if saved["pretrain"] == asdict(config) and saved.get("sample") == corpus_sample(config):
            model = TinyGPT(GPTConfig(**saved["gpt"]))
            model.load_state_dict(saved["model"])
            return model.eval(), WordTokenizer(saved["words"])
        print(f"{path} was pretrained with another config; pretraining again")
    start = time.time()
    model, tokenizer, loss = pretrain(config, progress)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"pretrain": asdict(config), "gpt": asdict(model.config), "model": model.state_dict(),
                    "words": tokenizer.words[len(SPECIAL_TOKENS):], "loss": loss, "sample": corpus_sample(config)}, tmp)
        os.replace(tmp, path)
        print(f"pretrained the tiny LM in {time.time() - start:.0f} s (loss {loss:.3f}); cached at {path}")
    return model, tokenizer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny_lm.pt", help="where to cache the model (default: %(default)s)")
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"pretraining {name.replace('_', ' ')} (default: %(default)s)")
    options = vars(parser.parse_args())
    load_or_pretrain(options.pop("out"), PretrainConfig(**options))
