"""DQN with Mixture-of-Experts Q-networks on classic control: single-task, multi-task and continual.

    python train_dqn.py --routing soft                       # SoftMoE DQN on CartPole-v1
    python train_dqn.py --routing big --setting crl --total-steps 300000
    python train_dqn.py --seed 1 --seeds 5                   # seeds 1..5 at once, in one process
    python train_dqn.py --eval-only --checkpoint runs/NAME/checkpoint.pt

DQN (Mnih et al. 2015), with Double DQN targets by default (van Hasselt et al. 2016; --no-double-dqn for
the original): epsilon-greedy with a linear schedule, uniform replay, a hard-copied target network, Huber
loss, gradient-norm clipping.
The Q-network and its MoE variants are in moe_rl.py, the routers in router.py, the tasks in envs.py.

--seeds N trains N independent agents in one process (many_seeds.py): every parameter carries a
leading seed axis, the N seeds' environments step together, and one optimizer step updates them all.
Seed i (= --seed + i) has the initial weights, environments, exploration and replay sampling of a
single run with that seed; only the clipping is per seed by construction (clip_grad_norm_per_seed).

Writes runs/NAME/log.jsonl (the config, then one line per seed per evaluation, plus with several seeds
one line of mean and 95% interval over the seeds) and runs/NAME/checkpoint.pt (all seeds' weights,
stacked, and all that resuming needs); the last line printed is a JSON summary of the run, per seed and
averaged over the seeds. Rerunning a run's command with --resume continues it from its checkpoint exactly
(docs/dqn.md: Resuming and checkpoints).
"""
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpointing
from cli import arg, parse_dataclass
from envs import (SETTINGS, TASKS, TaskSet, active_tasks, check_env_ids, crl_steps_per_task, normalized_score,
                  run_episodes)
from many_seeds import FrozenSeeds, clip_grad_norm_per_seed, mean_and_ci95, seed_state_dict, stack_networks
from moe_rl import BIG_GATES, PLACEMENTS, ROUTINGS, QNetwork, dormant_fraction, parameter_count


# Named settings of every DQN flag a study shares; `--preset NAME` takes them as the defaults, and flags given
# beside it still win. "study" is the setting of the moe study (reproduce.py moe), chosen by the sweep
# `python reproduce.py preset` (docs/dqn.md: The study preset): rl-zoo3's MountainCar-v0 DQN config on this
# network, with gamma 0.99 and the learning rate held for the first 70% of the run, then decayed linearly to 0
# (per task in CRL).
PRESETS = {
    "none": {},
    "study": dict(learning_rate=4e-3, gamma=0.99, anneal_lr=True, anneal_start=0.7, train_frequency=16,
                  gradient_steps=8, target_network_frequency=600, end_e=0.07, exploration_fraction=0.2,
                  buffer_size=10_000, batch_size=128, learning_starts=1_000),
}


@dataclass
class Args:
    preset: str = arg("none", "named defaults for the flags below (PRESETS in train_dqn.py; flags given beside it "
                      "win): none (the defaults shown) or study (the moe study's DQN setting)", tuple(PRESETS))
    # the network
    routing: str = arg("dense", "router: dense (no MoE), topk, soft (SoftMoE), big (experts are whole "
                       "networks), task (hardcoded: task i -> expert i)", ROUTINGS)
    placement: str = arg("middle", "where the MoE goes for topk/soft/task: middle (penultimate layer), "
                         "final (output layer), all (both)", PLACEMENTS)
    big_gate: str = arg("soft", "gate of --routing big over its whole-network experts", BIG_GATES)
    experts: int = arg(4, "number of experts")
    k: int = arg(1, "experts per token for top-k routing")
    tokens: int = arg(8, "tokens per state: the encoder's hidden vector is split into this many")
    capacity_factor: float = arg(1.0, "expert capacity factor (top-k: overflow dropped, 0 = no limit; soft: slots)")
    hidden: int = arg(128, "width of the dense layers (and of each Big expert)")
    expert_hidden: int = arg(128, "hidden width of each token expert (Dense(expert_hidden)-ReLU-Dense(token))")
    balance_loss_weight: float = arg(0.0, "weight of the Switch load-balancing loss (top-k; 0 = off)")
    z_loss_weight: float = arg(0.0, "weight of the router z-loss (top-k; 0 = off)")
    # the tasks
    setting: str = arg("single", "single task (--env), mtrl (all --tasks together) or crl (--tasks in "
                       "order, one after another)", SETTINGS)
    env: str = arg("CartPole-v1", "the environment of --setting single", tuple(TASKS))
    tasks: str = arg("CartPole-v1,MountainCar-v0,Acrobot-v1", "comma-separated tasks for mtrl/crl; the order "
                     "is the CRL order")
    cycles: int = arg(1, "CRL: how many times to go through the task sequence")
    task_id_in_obs: bool = arg(False, "append a one-hot task id to the observation")
    scale_obs: bool = arg(True, "rescale observations to [-1, 1] with Dopamine's fixed bounds")
    # DQN
    total_steps: int = arg(50_000, "environment steps, summed over tasks")
    learning_rate: float = arg(1e-3, "Adam learning rate")
    adam_eps: float = arg(3.125e-4, "Adam epsilon (Dopamine's value)")
    buffer_size: int = arg(50_000, "replay buffer capacity")
    batch_size: int = arg(128, "minibatch size")
    gamma: float = arg(0.99, "discount factor")
    learning_starts: int = arg(1_000, "environment steps of random play before learning")
    train_frequency: int = arg(2, "environment steps between gradient updates")
    gradient_steps: int = arg(1, "gradient steps at each update, each on a fresh minibatch (rl-zoo3's "
                              "gradient_steps)")
    target_network_frequency: int = arg(500, "environment steps between target-network copies")
    start_e: float = arg(1.0, "initial exploration epsilon")
    end_e: float = arg(0.02, "final exploration epsilon")
    exploration_fraction: float = arg(0.2, "fraction of --total-steps over which epsilon decays linearly (in CRL, "
                                      "of each task's stretch, see --crl-epsilon-restart)")
    crl_epsilon_restart: bool = arg(True, "CRL: restart the epsilon schedule at every task switch, decaying over "
                                    "--exploration-fraction of each task's stretch (--no-crl-epsilon-restart: "
                                    "one decay over the whole run, so later tasks start at --end-e)")
    double_dqn: bool = arg(True, "use Double DQN targets")
    anneal_lr: bool = arg(False, "decay the learning rate linearly to 0 over --total-steps (in CRL with "
                          "--crl-epsilon-restart, over each task's stretch, restarting with epsilon)")
    anneal_start: float = arg(0.0, "with --anneal-lr: hold --learning-rate for this fraction of the run (of each "
                              "CRL stretch), then decay linearly to 0 over the rest")
    max_grad_norm: float = arg(10.0, "gradient-norm clipping (0 = off)")
    # evaluation, logging, checkpoints
    seed: int = arg(1, "random seed (weights, exploration, replay sampling, environments)")
    seeds: int = arg(1, "independent seeds trained together in one process: --seed S --seeds N runs seeds S..S+N-1")
    eval_frequency: int = arg(5_000, "environment steps between greedy evaluations")
    eval_episodes: int = arg(10, "episodes per task in each periodic evaluation")
    final_eval_episodes: int = arg(20, "episodes per task in the final evaluation")
    stop_when_solved: bool = arg(True, "single task: stop once the periodic greedy eval reaches gymnasium's reward "
                                 "threshold (CartPole 475), then run the final evaluation (mtrl/crl always run on)")
    dormant_tau: float = arg(0.025, "threshold tau of the dormant-neuron metric")
    output_dir: str = arg("runs", "where run folders go")
    run_name: str = arg("", "run folder name (default: routing_placement_setting_seed)")
    threads: int = arg(1, "torch CPU threads")
    progress: bool = arg(True, "show a progress bar")
    eval_only: bool = arg(False, "only evaluate --checkpoint, then print the summary")
    checkpoint: str = arg("", "checkpoint to evaluate with --eval-only (to continue a run, rerun it with --resume)")
    resume: bool = arg(False, "continue the run in OUTPUT_DIR/RUN_NAME from its checkpoint, exactly as if it had "
                       "never stopped (same flags; docs/dqn.md: Resuming and checkpoints)")
    overwrite: bool = arg(False, "start the run again even if its folder holds one (its log and checkpoint are "
                          "deleted)")


def parse_args(argv=None):
    return parse_dataclass(Args, argv, __doc__, validate, PRESETS)


def task_list(args):
    return [args.env] if args.setting == "single" else [t.strip() for t in args.tasks.split(",") if t.strip()]


def validate(args, given=()):
    """Every bad value or impossible combination, as a ValueError naming the valid values; runs before anything
    loads. `given`: the fields set on the command line (for --eval-only, which takes its config from the
    checkpoint)."""
    for name in ("experts", "k", "tokens", "hidden", "expert_hidden", "cycles", "total_steps", "batch_size",
                 "buffer_size", "train_frequency", "gradient_steps", "target_network_frequency", "eval_frequency",
                 "eval_episodes", "final_eval_episodes", "threads", "seeds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be at least 0 (numpy and gymnasium take no negative seeds), got {args.seed}")
    for name in ("learning_rate", "adam_eps", "max_grad_norm", "capacity_factor"):
        if getattr(args, name) < 0 or (name == "learning_rate" and args.learning_rate == 0):
            bound = "positive" if name == "learning_rate" else "at least 0"
            meaning = " (top-k: 0 = no capacity limit)" if name == "capacity_factor" else ""
            raise ValueError(f"--{name.replace('_', '-')} must be {bound}{meaning}, got {getattr(args, name)}")
    validate_network(args, task_list(args))
    if not 0 < args.exploration_fraction <= 1:
        raise ValueError(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    if not 0 <= args.anneal_start < 1:
        raise ValueError(f"--anneal-start must be in [0, 1), got {args.anneal_start}")
    if not 0 <= args.end_e <= args.start_e <= 1:
        raise ValueError(f"need 0 <= --end-e <= --start-e <= 1, got {args.end_e} and {args.start_e}")
    checkpointing.check_checkpoint_flags(args, given, "train_dqn.py", DQN_EVAL_FLAGS)


def validate_network(args, tasks):
    """The tasks and the network's shape."""
    if not tasks:
        raise ValueError(f"--tasks is empty; give comma-separated env ids from {', '.join(TASKS)}")
    check_env_ids(tasks)
    if args.setting == "crl" and len(tasks) < 2:
        raise ValueError(f"--setting crl trains tasks one after another and needs at least 2 --tasks (from "
                         f"{', '.join(TASKS)}), got {len(tasks)}: {', '.join(tasks)}")
    uses_topk = args.routing == "topk" or (args.routing == "big" and args.big_gate == "topk")
    if uses_topk and args.k > args.experts:
        raise ValueError(f"--k {args.k} is larger than --experts {args.experts}: top-k needs k <= experts "
                         f"(1 to {args.experts})")
    uses_task = args.routing == "task" or (args.routing == "big" and args.big_gate == "task")
    if uses_task and args.experts < len(tasks):
        raise ValueError(f"task routing needs one expert per task: --experts {args.experts} < {len(tasks)} tasks")
    if args.routing not in ("dense", "big") and args.hidden % args.tokens:
        divisors = [str(d) for d in range(1, args.hidden + 1) if args.hidden % d == 0]
        raise ValueError(f"--hidden {args.hidden} is not divisible by --tokens {args.tokens}: --tokens must be one "
                         f"of {', '.join(divisors)}")
    if args.setting == "crl" and args.total_steps < len(tasks) * args.cycles:
        raise ValueError(f"--total-steps {args.total_steps} is too short for {len(tasks)} tasks x {args.cycles} cycles")


# flags that --eval-only reads itself; every other flag given with it must agree with the checkpoint's config
DQN_EVAL_FLAGS = ("eval_only", "checkpoint", "final_eval_episodes", "progress", "threads", "output_dir", "run_name")


def linear_schedule(start, end, duration, t):
    return max(end, start + (end - start) * t / duration)


def epsilon_at(args, step, num_tasks):
    """Exploration epsilon at env step `step`: one linear decay over --exploration-fraction of the run, or
    in CRL (with --crl-epsilon-restart) one per task visit, over that fraction of the visit, so that each
    new task is explored from --start-e as the first one was. The papers ran PPO, so this is our choice."""
    if args.setting == "crl" and args.crl_epsilon_restart:
        stretch = crl_steps_per_task(num_tasks, args.total_steps, args.cycles)
        visit = min(step // stretch, num_tasks * args.cycles - 1)   # the last visit takes the remainder
        return linear_schedule(args.start_e, args.end_e, args.exploration_fraction * stretch, step - visit * stretch)
    return linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_steps, step)


def learning_rate_at(args, step, num_tasks):
    """The learning rate at env step `step`: --learning-rate, or with --anneal-lr a linear decay to 0 over the
    run, or in CRL (with --crl-epsilon-restart) over each task visit, restarting with epsilon, so that a later
    task is not learned at a fraction of the first one's rate. --anneal-start holds the full rate for that
    fraction of the run (or visit) before the decay."""
    if not args.anneal_lr:
        return args.learning_rate
    start, length = 0, args.total_steps
    if args.setting == "crl" and args.crl_epsilon_restart:
        stretch, visits = crl_steps_per_task(num_tasks, args.total_steps, args.cycles), num_tasks * args.cycles
        visit = min(step // stretch, visits - 1)                    # the last visit takes the remainder
        start, length = visit * stretch, (args.total_steps - visit * stretch if visit == visits - 1 else stretch)
    progress = (step - start) / length
    return args.learning_rate * min(1.0, (1.0 - progress) / (1.0 - args.anneal_start))


class ReplayBuffer:
    """Uniform replay over (obs, action, reward, next_obs, terminated, task) in preallocated arrays, one
    buffer per seed (the leading axis of every array); seed i samples with its own generator rngs[i]."""

    def __init__(self, capacity, obs_size, rngs):
        seeds = len(rngs)
        self.obs = np.zeros((seeds, capacity, obs_size), np.float32)
        self.next_obs = np.zeros((seeds, capacity, obs_size), np.float32)
        self.actions, self.tasks = np.zeros((seeds, capacity), np.int64), np.zeros((seeds, capacity), np.int64)
        self.rewards, self.terminated = np.zeros((seeds, capacity), np.float32), np.zeros((seeds, capacity), np.float32)
        self.capacity, self.size, self.index, self.rngs = capacity, 0, 0, rngs

    def add(self, obs, action, reward, next_obs, terminated, task):
        """One transition per seed: obs (seeds, obs_size), action (seeds,), ..."""
        i = self.index
        self.obs[:, i], self.actions[:, i], self.rewards[:, i] = obs, action, reward
        self.next_obs[:, i], self.terminated[:, i], self.tasks[:, i] = next_obs, terminated, task
        self.index, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch_size):
        """A minibatch for every seed: tensors (seeds, batch_size, ...)."""
        i = np.stack([rng.integers(0, self.size, batch_size) for rng in self.rngs])
        rows = (np.arange(len(self.rngs))[:, None] * self.capacity + i).ravel()     # into (seeds * capacity, ...)
        return [torch.from_numpy(np.take(a.reshape(-1, *a.shape[2:]), rows, axis=0).reshape(*i.shape, *a.shape[2:]))
                for a in (self.obs, self.actions, self.rewards, self.next_obs, self.terminated, self.tasks)]

    ARRAYS = ("obs", "next_obs", "actions", "tasks", "rewards", "terminated")

    def state_dict(self):
        """The filled rows of every array (as tensors), the write position and the samplers' RNG states."""
        return {"size": self.size, "index": self.index, "rngs": [rng.bit_generator.state for rng in self.rngs],
                **{name: torch.from_numpy(getattr(self, name)[:, :self.size].copy()) for name in self.ARRAYS}}

    def load_state_dict(self, state):
        self.size, self.index = state["size"], state["index"]
        for name in self.ARRAYS:
            getattr(self, name)[:, :self.size] = state[name].numpy()
        for rng, saved in zip(self.rngs, state["rngs"]):
            rng.bit_generator.state = saved

    def sample_seed(self, seed, batch_size):
        """A minibatch of one seed's buffer, drawn with that seed's generator: (obs, task)."""
        i = self.rngs[seed].integers(0, self.size, batch_size)
        return torch.from_numpy(self.obs[seed, i]), torch.from_numpy(self.tasks[seed, i])


def make_network(args, task_set):
    return QNetwork(task_set.observation_size, task_set.num_actions, args.routing, args.placement, args.hidden,
                    args.experts, args.k, args.tokens, args.capacity_factor, args.expert_hidden, args.big_gate,
                    args.balance_loss_weight, args.z_loss_weight)


def make_seed_networks(args, task_set, seeds):
    """The seed-batched Q-network of `seeds`: seed s starts from exactly the weights of a single run with
    --seed s (torch.manual_seed(s), then the network is built)."""
    networks = []
    for seed in seeds:
        torch.manual_seed(seed)
        networks.append(make_network(args, task_set))
    return stack_networks(networks)


def seed_list(args):
    return [args.seed + i for i in range(args.seeds)]


def masked_q(network, obs, tasks, action_mask):
    """Q-values with the actions a task does not have set to -inf, so they are never chosen."""
    q, out = network(obs, tasks)
    return q.masked_fill(~action_mask[tasks], -math.inf), out


def nonfinite_seeds(q, num_seeds):
    """(seeds,) bool: seeds whose Q-values (seed-major rows) hold a NaN or +inf, which argmax would act on
    (masked actions are -inf by design). One reduction in the usual case that all are finite."""
    if bool(q.max() < math.inf):     # False for a NaN as for +inf
        return np.zeros(num_seeds, bool)
    return ~(q.reshape(num_seeds, -1) < math.inf).all(1).numpy()


def eval_seed(seed):
    return 1_000_000 + 1000 * seed  # evaluation episodes never reuse training seeds


def evaluate(network, task_sets, action_mask, episodes, which):
    """Greedy evaluation of seeds `which` of a seed-batched network (task_sets[i] is seed i's): per task,
    `episodes` episodes of each of those seeds, all stepped side by side with one forward pass of the
    network per step. Seed i's episodes of task t are reset with seeds eval_seed(seed_i) + 1000 t + j,
    so a seed gets the same episodes in a batched run as alone. Returns {i: (returns, scores)}, each
    {task: value}: the mean episode return and its normalised score, both NaN where a seed's Q-values were
    not finite at some step (its greedy actions then mean nothing: the trainer stops that seed)."""
    num_seeds, env_ids, which = len(task_sets), task_sets[0].env_ids, [int(i) for i in which]
    returns = {i: {} for i in which}
    for t, env_id in enumerate(env_ids if which else []):
        tasks = torch.full((num_seeds * episodes,), t, dtype=torch.long)
        nonfinite = np.zeros(num_seeds, bool)

        @torch.no_grad()
        def policy(obs):                             # obs (len(which), episodes, obs_dim)
            rows = np.zeros((num_seeds, *obs.shape[1:]), np.float32)   # seeds not evaluated: zero rows
            rows[which] = obs
            q = masked_q(network, torch.from_numpy(rows).flatten(0, 1), tasks, action_mask)[0]
            nonfinite[:] |= nonfinite_seeds(q, num_seeds)
            return q.argmax(1).view(num_seeds, episodes).numpy()[which]

        reset_seeds = [[eval_seed(task_sets[i].seed) + 1000 * t + j for j in range(episodes)] for i in which]
        episode_returns = run_episodes(lambda n: task_sets[which[n]].make(t), reset_seeds, policy)
        for n, i in enumerate(which):
            returns[i][env_id] = math.nan if nonfinite[i] else float(episode_returns[n].mean())
    return {i: (r, {env_id: normalized_score(env_id, v) for env_id, v in r.items()}) for i, r in returns.items()}


def dqn_update(network, target, optimizer, batch, action_mask, args, training=None):
    """One gradient step on the Huber TD loss (plus the routers' auxiliary losses) of every seed at once.

    network/target are seed-batched (many_seeds.py) and batch holds (seeds, batch, ...) tensors. The loss
    is the sum of the seeds' own losses, so each seed gets its own gradient; each is clipped by its own
    norm. `training` (seeds,) bool leaves out seeds that have stopped. Returns (seeds, 3) numpy: td_loss,
    aux_loss, mean Q per seed. If a training seed's loss is not finite, no step is taken at all."""
    obs, actions, rewards, next_obs, terminated, tasks = batch
    seeds, size = actions.shape
    obs, next_obs, tasks = obs.flatten(0, 1), next_obs.flatten(0, 1), tasks.flatten()      # (seeds*batch, ...)
    with torch.no_grad():
        q_next = masked_q(target, next_obs, tasks, action_mask)[0]
        if args.double_dqn:  # the online network picks the action, the target network values it
            best = masked_q(network, next_obs, tasks, action_mask)[0].argmax(1, keepdim=True)
            q_next = q_next.gather(1, best).squeeze(1)
        else:
            q_next = q_next.max(1).values
        td_target = rewards + args.gamma * (1.0 - terminated) * q_next.view(seeds, size)
    q, out = network(obs, tasks)
    q_taken = q.gather(1, actions.flatten().unsqueeze(1)).view(seeds, size)
    td_loss = F.smooth_l1_loss(q_taken, td_target, reduction="none").mean(1)                # (seeds,)
    aux_loss = out.aux_loss.expand(seeds)
    loss = td_loss + aux_loss
    stats = torch.stack([td_loss, aux_loss, q.detach().view(seeds, -1).mean(1)], 1).detach().numpy()
    training = np.ones(seeds, bool) if training is None else training
    if not np.isfinite(stats[training, :2]).all() or not training.any():
        return stats
    optimizer.zero_grad(set_to_none=True)
    loss[torch.from_numpy(training)].sum().backward()
    if args.max_grad_norm > 0:
        clip_grad_norm_per_seed(network.parameters(), args.max_grad_norm, seeds)
    optimizer.step()
    return stats


def save_checkpoint(path, network, target, optimizer, args, step, seeds, resume):
    """All seeds in one file: the networks' state dicts stacked on a leading seed axis, the optimizer's, the
    config, and `resume`, all else that continuing the run needs (train_in's resume_record)."""
    checkpointing.save({"trainer": "train_dqn.py", "network": network.state_dict(), "target": target.state_dict(),
                        "optimizer": optimizer.state_dict(), "args": asdict(args), "step": step, "seeds": seeds,
                        "resume": resume}, path)


MOMENTS = ("exp_avg", "exp_avg_sq")   # Adam's per-weight state (its step count is one scalar for all seeds)


def snapshot(network, target, optimizer):
    """Copies of every seed's weights, target weights and Adam moments: what a diverging seed goes back to."""
    return {"network": copy.deepcopy(network.state_dict()), "target": copy.deepcopy(target.state_dict()),
            "moments": [{k: v.clone() for k, v in optimizer.state[p].items() if k in MOMENTS}
                        for p in network.parameters()]}


@torch.no_grad()
def roll_back(i, last_good, network, target, optimizer):
    """Seed i's weights, target weights and Adam moments back to those of the snapshot `last_good`."""
    for module, saved in ((network, last_good["network"]), (target, last_good["target"])):
        for name, value in module.state_dict().items():     # views of the parameters
            value[i] = saved[name][i]
    for p, moments in zip(network.parameters(), last_good["moments"]):
        for name in MOMENTS:
            if name in optimizer.state[p]:
                optimizer.state[p][name][i] = moments[name][i] if name in moments else 0.0


def finite_seeds(network, target, optimizer, num_seeds):
    """(seeds,) bool: whether each seed's weights, target weights and Adam moments are all finite."""
    tensors = [*network.parameters(), *target.parameters(),
               *(v for p in network.parameters() for k, v in optimizer.state[p].items() if k in MOMENTS)]
    return np.logical_and.reduce([torch.isfinite(t.detach().reshape(num_seeds, -1)).all(1).numpy() for t in tensors])


def over_seeds(results):
    """Mean over seeds of each seed's eval_return / normalized_score ({task: value}) and
    mean_normalized_score, with the half-widths of their 95% intervals (None for one seed)."""
    summary, interval = {}, {}
    for key in ("final_eval_return", "eval_return", "normalized_score"):
        if key in results[0]:
            pairs = {t: mean_and_ci95([r[key][t] for r in results]) for t in results[0][key]}
            summary[key], interval[key] = {t: m for t, (m, _) in pairs.items()}, {t: h for t, (_, h) in pairs.items()}
    summary["mean_normalized_score"], interval["mean_normalized_score"] = mean_and_ci95(
        [r["mean_normalized_score"] for r in results])
    return summary, interval


def evaluate_checkpoint(path, episodes):
    """Greedy evaluation of a saved model (every seed of it) on the tasks it was trained on (its own
    saved config)."""
    start = time.time()
    state = checkpointing.load(path, "train_dqn.py")
    saved = Args(**{k: v for k, v in state["args"].items() if k in Args.__dataclass_fields__})
    seeds = state.get("seeds", [saved.seed])
    weights = state["network"] if "seeds" in state else {k: v.unsqueeze(0) for k, v in state["network"].items()}
    task_sets = [TaskSet(task_list(saved), seed=seed, scale=saved.scale_obs, task_id_in_obs=saved.task_id_in_obs)
                 for seed in seeds]
    network = make_seed_networks(saved, task_sets[0], seeds)
    network.load_state_dict(weights)
    results = evaluate(network, task_sets, torch.from_numpy(task_sets[0].action_mask), episodes, list(range(len(seeds))))
    per_seed = [{"seed": seed, "final_eval_return": results[i][0], "normalized_score": results[i][1],
                 "mean_normalized_score": float(np.mean(list(results[i][1].values())))} for i, seed in enumerate(seeds)]
    mean, interval = over_seeds(per_seed)
    summary = {"status": "evaluated", "checkpoint": path, "env_steps": state["step"], **mean, "ci95": interval,
               "seeds": seeds, "per_seed": per_seed, "parameters": parameter_count(make_network(saved, task_sets[0])),
               "wall_seconds": time.time() - start}
    print(json.dumps(summary))
    return summary


def run_name(args):
    seeds = seed_list(args)
    seed_name = f"s{args.seed}" if len(seeds) == 1 else f"s{seeds[0]}-{seeds[-1]}"
    where = args.placement if args.routing != "big" else args.big_gate
    return args.run_name or f"{args.routing}_{where}_{args.setting}_{seed_name}"


# flags that may differ between a run and its --resume (they change no result, or only the thread count's rounding)
RUN_CONTROL = ("threads", "progress", "output_dir", "run_name", "eval_only", "checkpoint", "resume", "overwrite")


def train(args):
    """Train (or, with --eval-only, evaluate) and return the run summary. The run folder is claimed first (a
    folder in use, or holding a run without --resume or --overwrite, is a RunError before anything loads)."""
    if args.eval_only:
        return evaluate_checkpoint(args.checkpoint, args.final_eval_episodes)
    run_dir = os.path.join(args.output_dir, run_name(args))
    with checkpointing.claim(run_dir, args.resume, args.overwrite):
        return train_in(args, run_dir)


@dataclass
class Run:
    """A run in progress: what train_in builds once, and the loop's bookkeeping, which a checkpoint saves and
    --resume puts back (restore_run)."""
    args: Args
    tasks: list
    seeds: list
    rngs: list                 # seed i's exploration and replay sampling
    task_sets: list            # seed i's environments
    network: torch.nn.Module   # seed-batched (many_seeds.py)
    target: torch.nn.Module
    plain: torch.nn.Module     # one seed's network, for evaluation and metrics
    optimizer: torch.optim.Optimizer
    frozen: FrozenSeeds
    buffer: ReplayBuffer
    log: object
    checkpoint_path: str
    start: float               # time.time() at the start of the run (earlier on a resume: its time so far)
    train_start: float = 0.0
    step: int = 0
    next_eval: int = 0
    saved_step: int = None     # the step of the last checkpoint
    last_good: dict = None     # what a diverging seed is rolled back to (snapshot)
    current: list = None       # the tasks trained at this step
    epsilon: float = 0.0

    def __post_init__(self):
        num_seeds = len(self.seeds)
        self.action_mask = torch.from_numpy(self.task_sets[0].action_mask)
        self.recent = [{t: [] for t in self.tasks} for _ in self.seeds]   # recent training-episode returns
        self.losses = [[] for _ in self.seeds]          # (td_loss, aux_loss, q_mean) per seed since its last log line
        self.training = np.ones(num_seeds, bool)        # seeds still training
        self.outcome = [None] * num_seeds               # per seed, once stopped: (status, step, wall seconds, message)
        self.latest = [None] * num_seeds                # each seed's latest evaluation record
        self.first_loss = [None] * num_seeds            # each seed's first TD loss, against which explosions are told
        self.updates = np.zeros(num_seeds, int)
        self.next_eval = self.args.eval_frequency


def train_in(args, run_dir):
    """Train in the claimed folder run_dir, from scratch or (--resume) from its checkpoint. All --seeds seeds
    train in lockstep; a seed that solves its task (or diverges: a non-finite loss, Q-value or weight) stops
    there, with its weights frozen, and the run ends when every seed has stopped or at --total-steps."""
    torch.set_num_threads(args.threads)
    run, saved = start_run(args, run_dir)
    tasks = run.tasks
    solved_at = gym.spec(tasks[0]).reward_threshold if args.stop_when_solved and args.setting == "single" else None
    bar = tqdm(total=args.total_steps, initial=run.step, unit="step", disable=not args.progress, dynamic_ncols=True)
    run.train_start = time.time() - (saved["resume"]["train_seconds"] if saved else 0.0)
    run.current = active_tasks(args.setting, run.step, len(tasks), args.total_steps, args.cycles)
    run.epsilon = args.start_e
    while run.step < args.total_steps and run.training.any():
        run.current = active_tasks(args.setting, run.step, len(tasks), args.total_steps, args.cycles)
        run.epsilon = epsilon_at(args, run.step, len(tasks))
        if args.anneal_lr:
            run.optimizer.param_groups[0]["lr"] = learning_rate_at(args, run.step, len(tasks))
        step_tasks(run, bar)
        if not run.training.any():
            break
        if run.step >= run.next_eval or run.step >= args.total_steps:
            if not evaluate_and_save(run, solved_at, bar):
                break                # every seed diverged here: the checkpoint on disk stays the last good one
    bar.close()
    run.log.close()
    return run_summary(args, run_dir, run.seeds, run.outcome, run.latest, run.updates, run.step, run.start,
                       run.train_start, parameter_count(run.plain), run.checkpoint_path if run.saved_step else None)


def start_run(args, run_dir):
    """The Run of train_in: networks, optimizer, replay and environments built (in the order that gives
    seed s the weights of a single run with --seed s), the log opened, and on --resume the checkpoint put
    back. Returns (run, the checkpoint resumed from or None)."""
    checkpoint_path = os.path.join(run_dir, checkpointing.CHECKPOINT)
    saved = checkpointing.resume_state(checkpoint_path, "train_dqn.py", asdict(args), RUN_CONTROL) if args.resume \
        else None
    start = time.time() - (saved["resume"]["wall_seconds"] if saved else 0.0)
    seeds = seed_list(args)
    rngs = [np.random.default_rng(seed) for seed in seeds]
    tasks = task_list(args)
    task_sets = [TaskSet(tasks, seed=seed, scale=args.scale_obs, task_id_in_obs=args.task_id_in_obs) for seed in seeds]
    network = make_seed_networks(args, task_sets[0], seeds)
    target = copy.deepcopy(network)
    plain = make_network(args, task_sets[0])
    optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    buffer = ReplayBuffer(args.buffer_size, task_sets[0].observation_size, rngs)
    log = checkpointing.open_log(os.path.join(run_dir, checkpointing.LOG), saved["resume"]["log_bytes"] if saved
                                 else None)
    run = Run(args, tasks, seeds, rngs, task_sets, network, target, plain, optimizer, FrozenSeeds(network.parameters()),
              buffer, log, checkpoint_path, start)
    if not saved:
        log.write(json.dumps({"config": asdict(args), "tasks": tasks, "seeds": seeds,
                              "parameters": parameter_count(plain)}) + "\n")
    if args.setting == "crl":
        print(f"CRL: {crl_steps_per_task(len(tasks), args.total_steps, args.cycles)} steps per task, "
              f"order {' -> '.join(tasks)}, {args.cycles} cycle(s)", file=sys.stderr)
    if saved:
        restore_run(saved, run)
        for i in np.flatnonzero(~run.training):
            run.frozen.freeze(i)
    run.last_good = snapshot(network, target, optimizer)
    return run, saved


def step_tasks(run, bar):
    """One environment step of each active task for every seed (epsilon-greedy), each followed, when due, by a
    gradient step and a target-network copy."""
    args, num_seeds = run.args, len(run.seeds)
    explore = np.stack([rng.random(len(run.current)) < run.epsilon for rng in run.rngs])     # (seeds, tasks)
    greedy = None
    if not explore.all():  # the Q-network is only needed for the greedy actions
        obs = torch.from_numpy(np.stack([task_set.obs[t] for task_set in run.task_sets for t in run.current]))
        with torch.no_grad():
            q = masked_q(run.network, obs, torch.tensor(run.current * num_seeds), run.action_mask)[0]
        for i in np.flatnonzero(run.training & nonfinite_seeds(q, num_seeds)):
            diverge(run, i, f"Q-values became non-finite at step {run.step}")
        greedy = q.argmax(1).view(num_seeds, len(run.current)).numpy()
    for j, t in enumerate(run.current):
        valid = np.flatnonzero(run.task_sets[0].action_mask[t])
        actions = [run.rngs[i].choice(valid) if explore[i, j] else greedy[i, j] for i in range(num_seeds)]
        transitions = [task_set.step(t, a) for task_set, a in zip(run.task_sets, actions)]
        o, reward, next_o, terminated, finished = zip(*transitions)
        run.buffer.add(np.stack(o), actions, reward, np.stack(next_o), terminated, t)
        for i, episode_return in enumerate(finished):
            if episode_return is not None:
                run.recent[i][run.tasks[t]] = (run.recent[i][run.tasks[t]] + [episode_return])[-20:]
        run.step += 1
        bar.update(1)
        if run.step >= args.learning_starts and run.step % args.train_frequency == 0:
            for _ in range(args.gradient_steps):
                learn(run)
        if run.step % args.target_network_frequency == 0:
            run.target.load_state_dict(run.network.state_dict())


def learn(run):
    """One gradient step for the seeds still training on one replayed minibatch each; a seed whose loss is not
    finite stops, and the others redo the step without it."""
    batch = run.buffer.sample(run.args.batch_size)
    while run.training.any():
        stats = dqn_update(run.network, run.target, run.optimizer, batch, run.action_mask, run.args, run.training)
        bad = run.training & ~np.isfinite(stats[:, :2].sum(1))
        if not bad.any():
            break
        for i in np.flatnonzero(bad):
            diverge(run, i, f"loss became {stats[i, 0] + stats[i, 1]} at step {run.step}")
    run.frozen.restore()
    for i in np.flatnonzero(run.training):
        run.losses[i].append(stats[i])
    run.updates += run.training


def evaluate_and_save(run, solved_at, bar):
    """The periodic evaluation, the stop of the seeds that solved their task (then their final evaluation), the
    line over the seeds and the checkpoint. Returns False when every seed has diverged, with nothing saved."""
    args, step = run.args, run.step
    run.next_eval += args.eval_frequency
    final = step >= args.total_steps
    for i in np.flatnonzero(run.training & ~finite_seeds(run.network, run.target, run.optimizer, len(run.seeds))):
        diverge(run, i, f"the weights became non-finite by step {step}")
    log_eval(run, np.flatnonzero(run.training), final=final)
    if not run.training.any():
        return False
    if final:
        for i in np.flatnonzero(run.training):
            run.outcome[i] = ("finished", step, time.time() - run.start, None)
    elif solved_at is not None:
        solved = [i for i in np.flatnonzero(run.training) if run.latest[i]["eval_return"][run.tasks[0]] >= solved_at]
        log_eval(run, solved, final=True)  # the final evaluation, on the model that solved the task
        for i in solved:
            stop_seed(run, i, "finished")
    log_over_seeds(run)
    save_checkpoint(run.checkpoint_path, run.network, run.target, run.optimizer, args, step, run.seeds,
                    resume_record(run))
    run.saved_step = step
    run.last_good = snapshot(run.network, run.target, run.optimizer)
    short = lambda values: {t.split("-")[0]: None if r is None else round(r, 1) for t, r in values.items()}
    shown = [record for record in run.latest if record is not None]
    bar.set_postfix(eval=short(over_seeds(shown)[0]["eval_return"]), sps=round(shown[0]["steps_per_second"]),
                    training=int(run.training.sum()))
    return True


def seed_network(run, i):
    """Seed i's weights in the plain network."""
    run.plain.load_state_dict(seed_state_dict(run.network.state_dict(), i))
    return run.plain


def log_eval(run, which, final=False):
    """Evaluate seeds `which` and write one log line each (the single-run record, plus its seed). A seed
    whose Q-values were not finite in the evaluation diverges instead."""
    args, step = run.args, run.step
    elapsed = time.time() - run.train_start
    results = evaluate(run.network, run.task_sets, run.action_mask,
                       args.final_eval_episodes if final else args.eval_episodes, which)
    for i in which:
        net = seed_network(run, i)
        returns, scores = results[i]
        if not all(math.isfinite(r) for r in returns.values()):
            diverge(run, i, f"Q-values became non-finite in the evaluation at step {step}")
            continue
        record = {"seed": run.seeds[i], "step": step, "final": final, "updates": int(run.updates[i]),
                  "active_tasks": [run.tasks[t] for t in run.current], "eval_return": returns,
                  "normalized_score": scores, "mean_normalized_score": float(np.mean(list(scores.values()))),
                  "epsilon": run.epsilon,
                  "train_return": {t: float(np.mean(r)) if r else None for t, r in run.recent[i].items()}}
        if run.losses[i]:
            record.update(loss_record(run, i))
        if run.buffer.size:  # dormant neurons and expert load on a fixed-size sample of replayed states
            obs, task_ids = run.buffer.sample_seed(i, min(1024, run.buffer.size))
            with torch.no_grad():
                _, out = net(obs, task_ids)
            record["dormant_fraction"] = dormant_fraction(out.activations, args.dormant_tau)
            record["expert_load"] = {name: r.expert_load().tolist() for name, r in out.routings.items()}
            record["router_stats"] = {name: stats for name, r in out.routings.items() if (stats := r.stats())}
        record.update(wall_seconds=elapsed, steps_per_second=step / max(elapsed, 1e-9))
        run.log.write(json.dumps(record) + "\n")
        run.latest[i] = record
    run.log.flush()


def loss_record(run, i):
    """Seed i's mean losses since its last log line (then cleared), with a warning when the TD loss has
    exploded against its first."""
    td, aux, qm = np.mean(run.losses[i], axis=0)
    record = dict(td_loss=float(td), aux_loss=float(aux), q_mean=float(qm))
    run.first_loss[i] = float(run.losses[i][0][0]) if run.first_loss[i] is None else run.first_loss[i]
    if checkpointing.exploded(td, run.first_loss[i]):
        record["warning"] = (f"td_loss {td:.3g} is over {checkpointing.EXPLOSION:g} times the first "
                             f"update's {run.first_loss[i]:.3g}: the run may be diverging")
        print(f"warning: seed {run.seeds[i]} at step {run.step}: {record['warning']}", file=sys.stderr)
    run.losses[i].clear()
    return record


def log_over_seeds(run):
    """With several seeds: one line of mean and 95% interval over every seed's latest evaluation (a seed
    that has stopped counts with its last one)."""
    evaluated = [record for record in run.latest if record is not None]
    if len(run.seeds) > 1 and evaluated:
        mean, interval = over_seeds(evaluated)
        elapsed = time.time() - run.train_start
        run.log.write(json.dumps({"over_seeds": run.seeds, "step": run.step, **mean, "ci95": interval,
                                  "seeds_training": int(run.training.sum()), "wall_seconds": elapsed,
                                  "steps_per_second": run.step / max(elapsed, 1e-9)}) + "\n")
        run.log.flush()


def stop_seed(run, i, status, message=None):
    run.training[i] = False
    run.frozen.freeze(i)
    run.outcome[i] = (status, run.step, time.time() - run.start, message)


def diverge(run, i, reason):
    """Seed i stops as diverged, rolled back to its weights of the last checkpoint (or its initial ones), so
    that every checkpoint stays finite."""
    num_seeds = len(run.seeds)
    where = "no checkpoint was saved yet"
    if run.saved_step:
        where = f"the last good checkpoint is {run.checkpoint_path} (step {run.saved_step})"
        where += "; this seed keeps its weights of then in later ones" if num_seeds > 1 else ""
    message = f"{reason}; stopping{'' if num_seeds == 1 else f' seed {run.seeds[i]}'}. {where}"
    print(message, file=sys.stderr)
    roll_back(i, run.last_good, run.network, run.target, run.optimizer)
    stop_seed(run, i, "diverged", message)


def resume_record(run):
    """All else that continuing exactly from here needs (docs/dqn.md: Resuming and checkpoints)."""
    return {"step": run.step, "next_eval": run.next_eval, "updates": run.updates.tolist(),
            "training": run.training.tolist(),
            "records": json.dumps({"outcome": run.outcome, "latest": run.latest, "recent": run.recent,
                                   "first_loss": run.first_loss}),
            "losses": [torch.from_numpy(np.array(l, np.float32).reshape(-1, 3)) for l in run.losses],
            "replay": run.buffer.state_dict(), "task_sets": [task_set.state_dict() for task_set in run.task_sets],
            "rng": checkpointing.rng_state(), "log_bytes": checkpointing.log_size(run.log),
            "wall_seconds": time.time() - run.start, "train_seconds": time.time() - run.train_start}


def restore_run(saved, run):
    """Put a resumed run's checkpoint back: the weights, the optimizer, the replay buffer and its samplers (which
    are also the exploration RNGs), the environments, the global RNGs, and the loop's bookkeeping."""
    resume = saved["resume"]
    run.network.load_state_dict(saved["network"])
    run.target.load_state_dict(saved["target"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.buffer.load_state_dict(resume["replay"])
    for task_set, state in zip(run.task_sets, resume["task_sets"]):
        task_set.load_state_dict(state)
    checkpointing.set_rng_state(resume["rng"])
    records = json.loads(resume["records"])
    run.outcome[:], run.latest[:], run.recent[:] = records["outcome"], records["latest"], records["recent"]
    run.first_loss[:] = records["first_loss"]
    run.losses[:] = [list(l.numpy()) for l in resume["losses"]]
    run.training[:], run.updates[:] = resume["training"], resume["updates"]
    run.step, run.next_eval, run.saved_step = resume["step"], resume["next_eval"], saved["step"]


def run_summary(args, run_dir, seeds, outcome, latest, updates, step, start, train_start, parameters, checkpoint):
    """The run's summary, per seed and over the seeds, printed as the last line and returned."""
    per_seed = []
    for i, seed in enumerate(seeds):
        status, stopped_step, wall, message = outcome[i] or ("finished", step, time.time() - start, None)
        record = latest[i]
        result = {"seed": seed, "status": status, "env_steps": stopped_step, "updates": int(updates[i]),
                  "stopped_early": stopped_step < args.total_steps, "wall_seconds": wall}
        if message:
            result["message"] = message
        if record is not None:
            result.update(final_eval_return=record["eval_return"], normalized_score=record["normalized_score"],
                          mean_normalized_score=record["mean_normalized_score"])
        per_seed.append(result)
    diverged = [r for r in per_seed if r["status"] == "diverged"]
    elapsed = time.time() - train_start
    summary = {"status": "diverged" if diverged else "finished", "run_dir": run_dir,
               "env_steps": max(r["env_steps"] for r in per_seed), "updates": int(updates.max()),
               "stopped_early": all(r["stopped_early"] for r in per_seed)}
    if diverged:
        summary["message"] = " | ".join(r["message"] for r in diverged)
    evaluated = [r for r in per_seed if "final_eval_return" in r]
    if evaluated:
        mean, interval = over_seeds(evaluated)
        summary.update(mean, ci95=interval)
    summary.update(wall_seconds=time.time() - start, steps_per_second=step / max(elapsed, 1e-9),
                   parameters=parameters, checkpoint=checkpoint, seeds=seeds, per_seed=per_seed)
    print(json.dumps(summary))
    return summary


def main(argv=None):
    """python train_dqn.py: exit 0 if every seed finished (or --eval-only evaluated), 1 if a seed diverged, 2 on
    a usage error (checkpointing.run_command_line)."""
    return checkpointing.run_command_line(parse_args, train, argv)


if __name__ == "__main__":
    sys.exit(main())
