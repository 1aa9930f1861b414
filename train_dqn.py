"""DQN with Mixture-of-Experts Q-networks on classic control: single-task, multi-task and continual.

    python train_dqn.py --routing soft                       # SoftMoE DQN on CartPole-v1
    python train_dqn.py --routing big --setting crl --total-steps 300000
    python train_dqn.py --seed 1 --seeds 5                   # seeds 1..5 at once, in one process
    python train_dqn.py --eval-only --checkpoint runs/NAME/checkpoint.pt

DQN (Mnih et al. 2015) with Double DQN as an option (van Hasselt et al. 2016): epsilon-greedy with a
linear schedule, uniform replay, a hard-copied target network, Huber loss, gradient-norm clipping.
The Q-network and its MoE variants are in moe_rl.py, the routers in router.py, the tasks in envs.py.

--seeds N trains N independent agents in one process (many_seeds.py): every parameter carries a
leading seed axis, the N seeds' environments step together, and one optimizer step updates them all.
Seed i (= --seed + i) has the initial weights, environments, exploration and replay sampling of a
single run with that seed; only the clipping is per seed by construction (clip_grad_norm_per_seed).

Writes runs/NAME/log.jsonl (the config, then one line per seed per evaluation, plus with several seeds
one line of mean and 95% interval over the seeds) and runs/NAME/checkpoint.pt (all seeds' weights,
stacked); the last line printed is a JSON summary of the run, per seed and averaged over the seeds.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from envs import (SETTINGS, TASKS, TaskSet, active_tasks, check_env_ids, crl_steps_per_task, normalized_score,
                  run_episodes)
from many_seeds import FrozenSeeds, clip_grad_norm_per_seed, mean_and_ci95, seed_state_dict, stack_networks
from moe_rl import BIG_GATES, PLACEMENTS, ROUTINGS, QNetwork, dormant_fraction, parameter_count


def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
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
    target_network_frequency: int = arg(500, "environment steps between target-network copies")
    start_e: float = arg(1.0, "initial exploration epsilon")
    end_e: float = arg(0.02, "final exploration epsilon")
    exploration_fraction: float = arg(0.2, "fraction of --total-steps over which epsilon decays linearly (in CRL, "
                                      "of each task's stretch, see --crl-epsilon-restart)")
    crl_epsilon_restart: bool = arg(True, "CRL: restart the epsilon schedule at every task switch, decaying over "
                                    "--exploration-fraction of each task's stretch (--no-crl-epsilon-restart: "
                                    "one decay over the whole run, so later tasks start at --end-e)")
    double_dqn: bool = arg(True, "use Double DQN targets")
    anneal_lr: bool = arg(False, "decay the learning rate linearly to 0 over --total-steps")
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
    checkpoint: str = arg("", "checkpoint to evaluate with --eval-only")


def parse_dataclass(cls, argv, description, validate):
    """An argparse CLI from a dataclass: one flag per field, its help from the field's metadata; bools get
    --flag/--no-flag. `validate(args)` raising ValueError becomes a usage error naming the bad value."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.type, default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"] + " (default: %(default)s)")
    args = cls(**vars(parser.parse_args(argv)))
    try:
        validate(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_args(argv=None):
    return parse_dataclass(Args, argv, __doc__, validate)


def task_list(args):
    return [args.env] if args.setting == "single" else [t.strip() for t in args.tasks.split(",") if t.strip()]


def validate(args):
    for name in ("experts", "k", "tokens", "hidden", "expert_hidden", "cycles", "total_steps", "batch_size",
                 "buffer_size", "train_frequency", "target_network_frequency", "eval_frequency",
                 "eval_episodes", "final_eval_episodes", "threads", "seeds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    tasks = task_list(args)
    check_env_ids(tasks)
    uses_topk = args.routing == "topk" or (args.routing == "big" and args.big_gate == "topk")
    if uses_topk and args.k > args.experts:
        raise ValueError(f"--k {args.k} is larger than --experts {args.experts}: top-k needs k <= experts")
    uses_task = args.routing == "task" or (args.routing == "big" and args.big_gate == "task")
    if uses_task and args.experts < len(tasks):
        raise ValueError(f"task routing needs one expert per task: --experts {args.experts} < {len(tasks)} tasks")
    if args.routing not in ("dense", "big") and args.hidden % args.tokens:
        raise ValueError(f"--hidden {args.hidden} is not divisible by --tokens {args.tokens}")
    if args.setting == "crl" and args.total_steps < len(tasks) * args.cycles:
        raise ValueError(f"--total-steps {args.total_steps} is too short for {len(tasks)} tasks x {args.cycles} cycles")
    if not 0 < args.exploration_fraction <= 1:
        raise ValueError(f"--exploration-fraction must be in (0, 1], got {args.exploration_fraction}")
    if not 0 <= args.end_e <= args.start_e <= 1:
        raise ValueError(f"need 0 <= --end-e <= --start-e <= 1, got {args.end_e} and {args.start_e}")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH")


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


def eval_seed(seed):
    return 1_000_000 + 1000 * seed  # evaluation episodes never reuse training seeds


def evaluate(network, task_sets, action_mask, episodes, which):
    """Greedy evaluation of seeds `which` of a seed-batched network (task_sets[i] is seed i's): per task,
    `episodes` episodes of each of those seeds, all stepped side by side with one forward pass of the
    network per step. Seed i's episodes of task t are reset with seeds eval_seed(seed_i) + 1000 t + j,
    so a seed gets the same episodes in a batched run as alone. Returns {i: (returns, scores)}, each
    {task: value}: the mean episode return and its normalised score."""
    num_seeds, env_ids, which = len(task_sets), task_sets[0].env_ids, [int(i) for i in which]
    returns = {i: {} for i in which}
    for t, env_id in enumerate(env_ids if which else []):
        tasks = torch.full((num_seeds * episodes,), t, dtype=torch.long)

        @torch.no_grad()
        def policy(obs):                             # obs (len(which), episodes, obs_dim)
            rows = np.zeros((num_seeds, *obs.shape[1:]), np.float32)   # seeds not evaluated: zero rows
            rows[which] = obs
            q = masked_q(network, torch.from_numpy(rows).flatten(0, 1), tasks, action_mask)[0]
            return q.argmax(1).view(num_seeds, episodes).numpy()[which]

        reset_seeds = [[eval_seed(task_sets[i].seed) + 1000 * t + j for j in range(episodes)] for i in which]
        episode_returns = run_episodes(lambda n: task_sets[which[n]].make(t), reset_seeds, policy)
        for n, i in enumerate(which):
            returns[i][env_id] = float(episode_returns[n].mean())
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


def save_checkpoint(path, network, target, optimizer, args, step, seeds):
    """All seeds in one file: the networks' state dicts stacked on a leading seed axis."""
    tmp = path + ".tmp"
    torch.save({"network": network.state_dict(), "target": target.state_dict(), "optimizer": optimizer.state_dict(),
                "args": asdict(args), "step": step, "seeds": seeds}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a broken checkpoint


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
    state = torch.load(path, weights_only=True)
    saved = Args(**state["args"])
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


def train(args):
    """Train (or, with --eval-only, evaluate) and return the run summary. All --seeds seeds train in
    lockstep; a seed that solves its task (or whose loss is not finite) stops there, with its weights
    frozen, and the run ends when every seed has stopped or at --total-steps."""
    if args.eval_only:
        return evaluate_checkpoint(args.checkpoint, args.final_eval_episodes)
    torch.set_num_threads(args.threads)
    start = time.time()
    seeds = seed_list(args)
    num_seeds = len(seeds)
    rngs = [np.random.default_rng(seed) for seed in seeds]     # seed i's exploration and replay sampling
    tasks = task_list(args)
    task_sets = [TaskSet(tasks, seed=seed, scale=args.scale_obs, task_id_in_obs=args.task_id_in_obs) for seed in seeds]
    action_mask = torch.from_numpy(task_sets[0].action_mask)
    network = make_seed_networks(args, task_sets[0], seeds)
    target = copy.deepcopy(network)
    plain = make_network(args, task_sets[0])                   # one seed's network, for evaluation and metrics
    optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    frozen = FrozenSeeds(network.parameters())
    buffer = ReplayBuffer(args.buffer_size, task_sets[0].observation_size, rngs)
    seed_name = f"s{args.seed}" if num_seeds == 1 else f"s{seeds[0]}-{seeds[-1]}"
    run_name = args.run_name or f"{args.routing}_{args.placement if args.routing != 'big' else args.big_gate}_{args.setting}_{seed_name}"
    run_dir = os.path.join(args.output_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    checkpoint_path, log_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "log.jsonl")
    log = open(log_path, "w")
    log.write(json.dumps({"config": asdict(args), "tasks": tasks, "seeds": seeds,
                          "parameters": parameter_count(plain)}) + "\n")
    if args.setting == "crl":
        print(f"CRL: {crl_steps_per_task(len(tasks), args.total_steps, args.cycles)} steps per task, "
              f"order {' -> '.join(tasks)}, {args.cycles} cycle(s)", file=sys.stderr)

    recent = [{t: [] for t in tasks} for _ in seeds]   # recent training-episode returns per seed and task
    losses = [[] for _ in seeds]                       # (td_loss, aux_loss, q_mean) per seed since its last log line
    training = np.ones(num_seeds, bool)                # seeds still training
    outcome = [None] * num_seeds                       # per seed, once stopped: (status, step, wall seconds, message)
    latest = [None] * num_seeds                        # each seed's latest evaluation record
    updates = np.zeros(num_seeds, int)
    step, next_eval, saved_step = 0, args.eval_frequency, None
    solved_at = gym.spec(tasks[0]).reward_threshold if args.stop_when_solved and args.setting == "single" else None
    bar = tqdm(total=args.total_steps, unit="step", disable=not args.progress, dynamic_ncols=True)
    train_start = time.time()

    def seed_network(i):
        plain.load_state_dict(seed_state_dict(network.state_dict(), i))
        return plain

    def log_eval(which, final=False):
        """Evaluate seeds `which` and write one log line each (the single-run record, plus its seed)."""
        elapsed = time.time() - train_start
        results = evaluate(network, task_sets, action_mask, args.final_eval_episodes if final else args.eval_episodes,
                           which)
        for i in which:
            net = seed_network(i)
            returns, scores = results[i]
            record = {"seed": seeds[i], "step": step, "final": final, "updates": int(updates[i]),
                      "active_tasks": [tasks[t] for t in current], "eval_return": returns, "normalized_score": scores,
                      "mean_normalized_score": float(np.mean(list(scores.values()))), "epsilon": epsilon,
                      "train_return": {t: float(np.mean(r)) if r else None for t, r in recent[i].items()}}
            if losses[i]:
                td, aux, qm = np.mean(losses[i], axis=0)
                record.update(td_loss=float(td), aux_loss=float(aux), q_mean=float(qm))
                losses[i].clear()
            if buffer.size:  # dormant neurons and expert load on a fixed-size sample of replayed states
                obs, task_ids = buffer.sample_seed(i, min(1024, buffer.size))
                with torch.no_grad():
                    _, out = net(obs, task_ids)
                record["dormant_fraction"] = dormant_fraction(out.activations, args.dormant_tau)
                record["expert_load"] = {name: r.expert_load().tolist() for name, r in out.routings.items()}
                record["router_stats"] = {name: stats for name, r in out.routings.items() if (stats := r.stats())}
            record.update(wall_seconds=elapsed, steps_per_second=step / max(elapsed, 1e-9))
            log.write(json.dumps(record) + "\n")
            latest[i] = record
        log.flush()

    def log_over_seeds():
        """With several seeds: one line of mean and 95% interval over every seed's latest evaluation (a seed
        that has stopped counts with its last one)."""
        if num_seeds > 1:
            mean, interval = over_seeds(latest)
            elapsed = time.time() - train_start
            log.write(json.dumps({"over_seeds": seeds, "step": step, **mean, "ci95": interval,
                                  "seeds_training": int(training.sum()), "wall_seconds": elapsed,
                                  "steps_per_second": step / max(elapsed, 1e-9)}) + "\n")
            log.flush()

    def stop(i, status, message=None):
        training[i] = False
        frozen.freeze(i)
        outcome[i] = (status, step, time.time() - start, message)

    current = active_tasks(args.setting, 0, len(tasks), args.total_steps, args.cycles)
    epsilon = args.start_e
    seed_rows = np.arange(num_seeds)
    while step < args.total_steps and training.any():
        current = active_tasks(args.setting, step, len(tasks), args.total_steps, args.cycles)
        epsilon = epsilon_at(args, step, len(tasks))
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - step / args.total_steps)
        explore = np.stack([rng.random(len(current)) < epsilon for rng in rngs])     # (seeds, tasks)
        if not explore.all():  # the Q-network is only needed for the greedy actions
            obs = torch.from_numpy(np.stack([task_set.obs[t] for task_set in task_sets for t in current]))
            with torch.no_grad():
                greedy = masked_q(network, obs, torch.tensor(current * num_seeds), action_mask)[0].argmax(1)
            greedy = greedy.view(num_seeds, len(current)).numpy()
        for j, t in enumerate(current):
            valid = np.flatnonzero(task_sets[0].action_mask[t])
            actions = [rngs[i].choice(valid) if explore[i, j] else greedy[i, j] for i in seed_rows]
            transitions = [task_set.step(t, a) for task_set, a in zip(task_sets, actions)]
            o, reward, next_o, terminated, finished = zip(*transitions)
            buffer.add(np.stack(o), actions, reward, np.stack(next_o), terminated, t)
            for i, episode_return in enumerate(finished):
                if episode_return is not None:
                    recent[i][tasks[t]] = (recent[i][tasks[t]] + [episode_return])[-20:]
            step += 1
            bar.update(1)
            if step >= args.learning_starts and step % args.train_frequency == 0:
                batch = buffer.sample(args.batch_size)
                while training.any():
                    stats = dqn_update(network, target, optimizer, batch, action_mask, args, training)
                    bad = training & ~np.isfinite(stats[:, :2].sum(1))
                    if not bad.any():
                        break
                    for i in np.flatnonzero(bad):  # that seed stops; the others redo the step without it
                        where = f"the last good checkpoint is {checkpoint_path} (step {saved_step})" if saved_step \
                            else "no checkpoint was saved yet"
                        message = (f"loss became {stats[i, 0] + stats[i, 1]} at step {step}; stopping"
                                   f"{'' if num_seeds == 1 else f' seed {seeds[i]}'}. {where}")
                        print(message, file=sys.stderr)
                        stop(i, "diverged", message)
                frozen.restore()
                for i in np.flatnonzero(training):
                    losses[i].append(stats[i])
                updates += training
            if step % args.target_network_frequency == 0:
                target.load_state_dict(network.state_dict())
        if not training.any():
            break
        if step >= next_eval or step >= args.total_steps:
            next_eval += args.eval_frequency
            final = step >= args.total_steps
            log_eval(np.flatnonzero(training), final=final)
            if final:
                for i in np.flatnonzero(training):
                    outcome[i] = ("finished", step, time.time() - start, None)
            elif solved_at is not None:
                solved = [i for i in np.flatnonzero(training) if latest[i]["eval_return"][tasks[0]] >= solved_at]
                log_eval(solved, final=True)  # the final evaluation, on the model that solved the task
                for i in solved:
                    stop(i, "finished")
            log_over_seeds()
            save_checkpoint(checkpoint_path, network, target, optimizer, args, step, seeds)
            saved_step = step
            short = lambda values: {t.split("-")[0]: None if r is None else round(r, 1) for t, r in values.items()}
            shown = [latest[i] for i in range(num_seeds) if latest[i] is not None]
            bar.set_postfix(eval=short(over_seeds(shown)[0]["eval_return"]), sps=round(shown[0]["steps_per_second"]),
                            training=int(training.sum()))
    bar.close()
    log.close()

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
                   parameters=parameter_count(plain), checkpoint=checkpoint_path if saved_step else None,
                   seeds=seeds, per_seed=per_seed)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    summary = train(parse_args())
    sys.exit(0 if summary["status"] in ("finished", "evaluated") else 1)
