"""A tiny GPT and a word tokenizer: the stand-in for a pretrained LLM on a 2-core CPU.

PA-MoE (arXiv 2602.17038) puts LoRA experts on a frozen pretrained LLM (Qwen2.5-1.5B-Instruct). Here the
frozen base is a GPT-style causal transformer of a few layers (Radford et al. 2019; nanoGPT's shape),
pretrained by next-token prediction on transcripts of play in the household environment
(household.HouseholdEnv). A pretrained LLM brings the language, the commands and some common sense to the
game; the stand-in gets the same kind of prior from the player it learns from, who reads only the
task's words and the admissible commands (play_weights): commands that name the task's object,
receptacle or the appliance its transform needs are more likely, nothing else is known (no hidden state,
no plan, no evaluation seed). With task_bias 1 the play is uniformly random. What the agent learns about
solving tasks beyond that prior comes from RL in the LoRA experts (docs/agent.md).

The attention and MLP projections are named like Llama's (q_proj, k_proj, v_proj, o_proj, up_proj,
down_proj) so that the same LoRA targets work here and on a Hugging Face model. `forward` takes position ids
and an attention mask, so that all of a step's commands are scored in one sequence packed after its prompt
(agent.pack_continuations).

    python tiny_lm.py --out runs/tiny_lm.pt          # pretrain and cache (train_agent.py does this itself)
"""
import argparse
import os
import re
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from alfworld_env import ALFWORLD_WORDS
from household import EVAL_SEED_OFFSET, HouseholdEnv
from prompts import render_prompt

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


class WordTokenizer:
    """Lower-cased words, numbers and punctuation marks, one token each; unknown words map to <unk>."""

    pattern = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")

    def __init__(self, words):
        self.words = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)

    @classmethod
    def from_texts(cls, texts, extra_words=()):
        """The words of `texts`, sorted, then the extra words they lack (each its own token, never <unk>)."""
        words = sorted({w for text in texts for w in cls.pattern.findall(text.lower())})
        known = set(words)
        return cls(words + [w for w in dict.fromkeys(extra_words) if w not in known])

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
    mlp_ratio: int = 4          # MLP width / dim


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(config.dim, config.dim) for _ in range(4))

    def forward(self, x, allowed):
        """x (n, t, d); allowed (n, 1, t, t) bool: which of these tokens each token may attend to."""
        n, t, d = x.shape
        h = self.heads
        q, k, v = (proj(x).view(n, t, h, d // h).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)                      # (n, h, t, d/h)
        return self.o_proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(config.dim), nn.LayerNorm(config.dim)
        self.attn = Attention(config)
        self.mlp = nn.Sequential()
        self.mlp.up_proj = nn.Linear(config.dim, config.mlp_ratio * config.dim)
        self.mlp.act = nn.GELU()
        self.mlp.down_proj = nn.Linear(config.mlp_ratio * config.dim, config.dim)

    def forward(self, x, allowed):
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


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

    def forward(self, ids, mask, positions=None, allowed=None):
        """ids, mask (n, t): token ids and which are real (padding may sit on either side).
        positions (n, t): position ids (default: the count of real tokens before each); allowed (n, t, t) bool:
        which tokens each token may attend to (default: the real tokens up to itself). Packed scoring
        (agent.pack_continuations) passes both. Returns the final hidden states (n, t, d) and None
        (the place where a Hugging Face base returns its cache)."""
        n, t = ids.shape
        if positions is None:
            positions = mask.long().cumsum(1) - 1
        if allowed is None:
            allowed = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril() & mask[:, None, :]
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=ids.device)         # pads see themselves
        x = self.wte(ids) + self.wpe(positions.clamp(0, self.config.max_len - 1))
        for block in self.blocks:
            x = block(x, allowed.unsqueeze(1))
        return self.ln_f(x), None

    def logits(self, hidden):
        return hidden @ self.wte.weight.T                                            # (n, t, vocab)


def pad(sequences, pad_id, left=False):
    """Lists of ids -> (n, t) tensor and its bool mask; left padding keeps the ends aligned."""
    width = max(1, max(len(s) for s in sequences))
    fill = [[pad_id] * (width - len(s)) for s in sequences]
    ids = torch.tensor([f + list(s) if left else list(s) + f for s, f in zip(sequences, fill)], dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences])
    columns = torch.arange(width)
    mask = columns >= width - lengths[:, None] if left else columns < lengths[:, None]
    return ids, mask


# What a pretrained LLM knows before it plays: which words of a task matter, and which appliance does what.
STOP_WORDS = frozenset({"put", "a", "some", "in", "on", "the", "and", "it", "them", "two", "find", "under", "with",
                        "at", "look", "examine"})
COMMON_SENSE = {"hot": ("heat", "microwave"), "heat": ("heat", "microwave"), "cool": ("cool", "fridge"),
                "clean": ("clean", "sinkbasin"), "look": ("use",), "examine": ("use",)}
WORD = re.compile(r"[a-z]+")


def task_words(goal):
    """The words of a task a reader would look for: its object and receptacle (or lamp), and what common
    sense adds (a hot thing is heated in a microwave, a cool one in a fridge, a clean one at the sink,
    looking under a lamp means using it)."""
    words = WORD.findall(goal.lower())
    return {w for w in words if w not in STOP_WORDS} | {x for w in words for x in COMMON_SENSE.get(w, ())}


def play_weights(goal, commands, task_bias):
    """The pretraining player's preference over the admissible commands: task_bias ** (number of task words
    a command names). task_bias 1 is uniformly random play."""
    words = task_words(goal)
    return np.array([task_bias ** len(words & set(WORD.findall(c))) for c in commands], dtype=np.float64)


def random_play_texts(episodes, seed, max_steps, history_length, list_commands=False, task_bias=1.0):
    """(prompt, command) pairs of play on training seeds: the pretraining corpus. The player reads only
    the task's words and the admissible commands (never the room's hidden state, a plan, or an evaluation
    seed): each command is drawn with probability proportional to play_weights, so with task_bias 1 play
    is uniformly random. list_commands: the prompts list the admissible commands."""
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
                admissible = info["admissible_commands"]
                if task_bias == 1.0:
                    command = admissible[rng.integers(len(admissible))]
                else:
                    weights = play_weights(info["goal"], admissible, task_bias)
                    command = admissible[rng.choice(len(admissible), p=weights / weights.sum())]
                commands.append(command)
                if not done[i]:
                    pairs.append((render_prompt(info["goal"], histories[i], observations[i], history_length,
                                                admissible if list_commands else None), command))
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
    list_commands: bool = False
    task_bias: float = 2.0
    vocabulary: str = "household"   # alfworld: the corpus's words and ALFWorld's (alfworld_env.ALFWORLD_WORDS)
    dim: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4


def pretrain(config: PretrainConfig, progress=True):
    """Next-token prediction on random-play transcripts; returns (model, tokenizer, final loss)."""
    torch.manual_seed(config.seed)
    pairs = random_play_texts(config.episodes, config.seed, config.max_steps, config.history_length,
                              config.list_commands, config.task_bias)
    tokenizer = WordTokenizer.from_texts((text for pair in pairs for text in pair), VOCABULARIES[config.vocabulary])
    sequences = [[tokenizer.bos_id] + tokenizer.encode(p) + tokenizer.encode(c) + [tokenizer.eos_id] for p, c in pairs]
    max_len = max(256, max(map(len, sequences)) + 8)
    model = TinyGPT(GPTConfig(len(tokenizer), config.dim, config.layers, config.heads, max_len, config.mlp_ratio))
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
    return list(random_play_texts(1, config.seed, config.max_steps, config.history_length, config.list_commands,
                                  config.task_bias)[0])


VOCABULARIES = {"household": (), "alfworld": ALFWORLD_WORDS}   # words added to those of the corpus


def vocabulary_path(path, vocabulary):
    """Each vocabulary keeps its own cache (runs/tiny_lm.pt, runs/tiny_lm_alfworld.pt): switching between the
    household env and ALFWorld never pretrains again."""
    if not path or vocabulary == "household":
        return path
    root, extension = os.path.splitext(path)
    return f"{root}_{vocabulary}{extension}"


def load_or_pretrain(path, config: PretrainConfig, progress=True):
    """The cached base model at `path` (for another vocabulary, next to it: vocabulary_path) if it was pretrained
    with this config, else pretrain and cache it."""
    if config.vocabulary not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {config.vocabulary!r}; one of {sorted(VOCABULARIES)}")
    path = vocabulary_path(path, config.vocabulary)
    if path and os.path.exists(path):
        saved = torch.load(path, weights_only=True)
        # a cache written before vocabularies existed holds the household one
        if {"vocabulary": "household", **saved["pretrain"]} == asdict(config) and \
                saved.get("sample") == corpus_sample(config):
            model = TinyGPT(GPTConfig(**saved["gpt"]))
            model.load_state_dict(saved["model"])
            return model.eval(), WordTokenizer(saved["words"])
        print(f"{path} was pretrained with another config; pretraining again")
    start = time.time()
    model, tokenizer, loss = pretrain(config, progress)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"   # this process's own: two runs pretraining at once never share one
        torch.save({"pretrain": asdict(config), "gpt": asdict(model.config), "model": model.state_dict(),
                    "words": tokenizer.words[len(SPECIAL_TOKENS):], "loss": loss, "sample": corpus_sample(config)}, tmp)
        os.replace(tmp, path)
        print(f"pretrained the tiny LM in {time.time() - start:.0f} s (loss {loss:.3f}); cached at {path}")
    return model, tokenizer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny_lm.pt", help="where to cache the model (default: %(default)s)")
    for name, value in asdict(PretrainConfig()).items():
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(value, bool) else dict(type=type(value))
        parser.add_argument("--" + name.replace("_", "-"), **kind, default=value,
                            help=f"pretraining {name.replace('_', ' ')} (default: %(default)s)")
    options = vars(parser.parse_args())
    load_or_pretrain(options.pop("out"), PretrainConfig(**options))
