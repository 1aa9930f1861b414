"""DQN with Mixture-of-Experts Q-networks on classic control: single-task, multi-task and continual.

    python train_dqn.py --routing soft                       # SoftMoE DQN on CartPole-v1
    python train_dqn.py --routing big --setting crl --total-steps 300000
    python train_dqn.py --eval-only --checkpoint runs/NAME/checkpoint.pt

DQN (Mnih et al. 2015) with Double DQN as an option (van Hasselt et al. 2016): epsilon-greedy with a
linear schedule, uniform replay, a hard-copied target network, Huber loss, gradient-norm clipping.
The Q-network and its MoE variants are in moe_rl.py, the routers in router.py, the tasks in envs.py.

Writes runs/NAME/log.jsonl (the config, then one line per evaluation) and runs/NAME/checkpoint.pt;
the last line printed is a JSON summary of the run.
"""
import argparse
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

from envs import SETTINGS, TASKS, TaskSet, active_tasks, check_env_ids, crl_steps_per_task, normalized_score
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
    exploration_fraction: float = arg(0.2, "fraction of --total-steps over which epsilon decays linearly")
    double_dqn: bool = arg(True, "use Double DQN targets")
    anneal_lr: bool = arg(False, "decay the learning rate linearly to 0 over --total-steps")
    max_grad_norm: float = arg(10.0, "gradient-norm clipping (0 = off)")
    # evaluation, logging, checkpoints
    seed: int = arg(1, "random seed (weights, exploration, replay sampling, environments)")
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
                 "eval_episodes", "final_eval_episodes", "threads"):
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
    if not 0 <= args.end_e <= args.start_e <= 1:
        raise ValueError(f"need 0 <= --end-e <= --start-e <= 1, got {args.end_e} and {args.start_e}")
    if args.eval_only and not args.checkpoint:
        raise ValueError("--eval-only needs --checkpoint PATH")


def linear_schedule(start, end, duration, t):
    return max(end, start + (end - start) * t / duration)


class ReplayBuffer:
    """Uniform replay over (obs, action, reward, next_obs, terminated, task) in preallocated arrays."""

    def __init__(self, capacity, obs_size, rng):
        self.obs = np.zeros((capacity, obs_size), np.float32)
        self.next_obs = np.zeros((capacity, obs_size), np.float32)
        self.actions, self.tasks = np.zeros(capacity, np.int64), np.zeros(capacity, np.int64)
        self.rewards, self.terminated = np.zeros(capacity, np.float32), np.zeros(capacity, np.float32)
        self.capacity, self.size, self.index, self.rng = capacity, 0, 0, rng

    def add(self, obs, action, reward, next_obs, terminated, task):
        i = self.index
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i], self.tasks[i] = next_obs, terminated, task
        self.index, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch_size):
        i = self.rng.integers(0, self.size, batch_size)
        return [torch.from_numpy(a[i]) for a in (self.obs, self.actions, self.rewards, self.next_obs,
                                                  self.terminated, self.tasks)]


def make_network(args, task_set):
    return QNetwork(task_set.observation_size, task_set.num_actions, args.routing, args.placement, args.hidden,
                    args.experts, args.k, args.tokens, args.capacity_factor, args.expert_hidden, args.big_gate,
                    args.balance_loss_weight, args.z_loss_weight)


def masked_q(network, obs, tasks, action_mask):
    """Q-values with the actions a task does not have set to -inf, so they are never chosen."""
    q, out = network(obs, tasks)
    return q.masked_fill(~action_mask[tasks], -math.inf), out


def greedy_policy(network, action_mask):
    @torch.no_grad()
    def policy(obs, task):
        tasks = torch.full((len(obs),), task, dtype=torch.long)
        return masked_q(network, torch.from_numpy(obs), tasks, action_mask)[0].argmax(1).numpy()
    return policy


def eval_seed(seed):
    return 1_000_000 + 1000 * seed  # evaluation episodes never reuse training seeds


def evaluate(network, task_set, action_mask, episodes, seed):
    policy = greedy_policy(network, action_mask)
    returns = {env_id: float(np.mean(task_set.evaluate(i, policy, episodes, seed + 1000 * i)))
               for i, env_id in enumerate(task_set.env_ids)}
    scores = {env_id: normalized_score(env_id, r) for env_id, r in returns.items()}
    return returns, scores


def dqn_update(network, target, optimizer, batch, action_mask, args):
    """One gradient step on the Huber TD loss (plus the routers' auxiliary losses).
    Returns (td_loss, aux_loss, mean Q) as floats; a non-finite loss is returned without a step."""
    obs, actions, rewards, next_obs, terminated, tasks = batch
    with torch.no_grad():
        q_next = masked_q(target, next_obs, tasks, action_mask)[0]
        if args.double_dqn:  # the online network picks the action, the target network values it
            best = masked_q(network, next_obs, tasks, action_mask)[0].argmax(1, keepdim=True)
            q_next = q_next.gather(1, best).squeeze(1)
        else:
            q_next = q_next.max(1).values
        td_target = rewards + args.gamma * (1.0 - terminated) * q_next
    q, out = network(obs, tasks)
    td_loss = F.smooth_l1_loss(q.gather(1, actions.unsqueeze(1)).squeeze(1), td_target)
    loss = td_loss + out.aux_loss
    if not torch.isfinite(loss):
        return td_loss.item(), out.aux_loss.item(), math.nan
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(network.parameters(), args.max_grad_norm, foreach=True)
    optimizer.step()
    return td_loss.item(), out.aux_loss.item(), q.mean().item()


def save_checkpoint(path, network, target, optimizer, args, step):
    tmp = path + ".tmp"
    torch.save({"network": network.state_dict(), "target": target.state_dict(), "optimizer": optimizer.state_dict(),
                "args": asdict(args), "step": step}, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save never leaves a broken checkpoint


def evaluate_checkpoint(path, episodes):
    """Greedy evaluation of a saved model on the tasks it was trained on (its own saved config)."""
    start = time.time()
    state = torch.load(path, weights_only=True)
    saved = Args(**state["args"])
    task_set = TaskSet(task_list(saved), seed=saved.seed, scale=saved.scale_obs, task_id_in_obs=saved.task_id_in_obs)
    network = make_network(saved, task_set)
    network.load_state_dict(state["network"])
    returns, scores = evaluate(network, task_set, torch.from_numpy(task_set.action_mask), episodes,
                               eval_seed(saved.seed))
    summary = {"status": "evaluated", "checkpoint": path, "env_steps": state["step"],
               "final_eval_return": returns, "normalized_score": scores,
               "mean_normalized_score": float(np.mean(list(scores.values()))),
               "parameters": parameter_count(network), "wall_seconds": time.time() - start}
    print(json.dumps(summary))
    return summary


def train(args):
    """Train (or, with --eval-only, evaluate) and return the run summary."""
    if args.eval_only:
        return evaluate_checkpoint(args.checkpoint, args.final_eval_episodes)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.time()
    tasks = task_list(args)
    task_set = TaskSet(tasks, seed=args.seed, scale=args.scale_obs, task_id_in_obs=args.task_id_in_obs)
    action_mask = torch.from_numpy(task_set.action_mask)
    network = make_network(args, task_set)
    target = make_network(args, task_set)
    target.load_state_dict(network.state_dict())
    optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    buffer = ReplayBuffer(args.buffer_size, task_set.observation_size, rng)
    run_name = args.run_name or f"{args.routing}_{args.placement if args.routing != 'big' else args.big_gate}_{args.setting}_s{args.seed}"
    run_dir = os.path.join(args.output_dir, run_name)
    os.makedirs(run_dir, exist_ok=True)
    checkpoint_path, log_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "log.jsonl")
    log = open(log_path, "w")
    log.write(json.dumps({"config": asdict(args), "tasks": tasks, "parameters": parameter_count(network)}) + "\n")
    if args.setting == "crl":
        print(f"CRL: {crl_steps_per_task(len(tasks), args.total_steps, args.cycles)} steps per task, "
              f"order {' -> '.join(tasks)}, {args.cycles} cycle(s)", file=sys.stderr)

    recent = {t: [] for t in tasks}          # recent training-episode returns per task
    losses = []                              # (td_loss, aux_loss, q_mean) since the last log line
    step, next_eval, saved_step, updates = 0, args.eval_frequency, None, 0
    solved_at = gym.spec(tasks[0]).reward_threshold if args.stop_when_solved and args.setting == "single" else None
    bar = tqdm(total=args.total_steps, unit="step", disable=not args.progress, dynamic_ncols=True)
    train_start = time.time()

    def log_eval(final=False):
        returns, scores = evaluate(network, task_set, action_mask,
                                   args.final_eval_episodes if final else args.eval_episodes, eval_seed(args.seed))
        record = {"step": step, "final": final, "updates": updates, "active_tasks": [tasks[i] for i in current],
                  "eval_return": returns, "normalized_score": scores,
                  "mean_normalized_score": float(np.mean(list(scores.values()))),
                  "epsilon": epsilon, "train_return": {t: float(np.mean(r)) if r else None for t, r in recent.items()}}
        if losses:
            td, aux, qm = np.mean(losses, axis=0)
            record.update(td_loss=float(td), aux_loss=float(aux), q_mean=float(qm))
            losses.clear()
        if buffer.size:  # dormant neurons and expert load on a fixed-size sample of replayed states
            obs, _, _, _, _, task_ids = buffer.sample(min(1024, buffer.size))
            with torch.no_grad():
                _, out = network(obs, task_ids)
            record["dormant_fraction"] = dormant_fraction(out.activations, args.dormant_tau)
            record["expert_load"] = {name: r.expert_load().tolist() for name, r in out.routings.items()}
            record["router_stats"] = {name: stats for name, r in out.routings.items() if (stats := r.stats())}
        elapsed = time.time() - train_start
        record.update(wall_seconds=elapsed, steps_per_second=step / max(elapsed, 1e-9))
        log.write(json.dumps(record) + "\n")
        log.flush()
        return record

    current, epsilon, record = active_tasks(args.setting, 0, len(tasks), args.total_steps, args.cycles), args.start_e, None
    while step < args.total_steps:
        current = active_tasks(args.setting, step, len(tasks), args.total_steps, args.cycles)
        epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_steps, step)
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - step / args.total_steps)
        explore = rng.random(len(current)) < epsilon
        if not explore.all():  # the Q-network is only needed for the greedy actions
            obs = torch.from_numpy(np.stack([task_set.obs[i] for i in current]))
            with torch.no_grad():
                greedy = masked_q(network, obs, torch.tensor(current), action_mask)[0].argmax(1).numpy()
        for j, i in enumerate(current):
            action = rng.choice(np.flatnonzero(task_set.action_mask[i])) if explore[j] else greedy[j]
            o, reward, next_o, terminated, finished = task_set.step(i, action)
            buffer.add(o, action, reward, next_o, terminated, i)
            if finished is not None:
                recent[tasks[i]] = (recent[tasks[i]] + [finished])[-20:]
            step += 1
            bar.update(1)
            if step >= args.learning_starts and step % args.train_frequency == 0:
                td_loss, aux_loss, q_mean = dqn_update(network, target, optimizer, buffer.sample(args.batch_size),
                                                       action_mask, args)
                if not math.isfinite(td_loss + aux_loss):
                    bar.close()
                    where = f"the last good checkpoint is {checkpoint_path} (step {saved_step})" if saved_step \
                        else "no checkpoint was saved yet"
                    message = f"loss became {td_loss + aux_loss} at step {step}; stopping. {where}"
                    print(message, file=sys.stderr)
                    summary = {"status": "diverged", "message": message, "env_steps": step,
                               "checkpoint": checkpoint_path if saved_step else None}
                    print(json.dumps(summary))
                    log.close()
                    return summary
                updates += 1
                losses.append((td_loss, aux_loss, q_mean))
            if step % args.target_network_frequency == 0:
                target.load_state_dict(network.state_dict())
        if step >= next_eval or step >= args.total_steps:
            next_eval += args.eval_frequency
            record = log_eval(final=step >= args.total_steps)
            save_checkpoint(checkpoint_path, network, target, optimizer, args, step)
            saved_step = step
            short = lambda values: {t.split("-")[0]: None if r is None else round(r, 1) for t, r in values.items()}
            bar.set_postfix(eval=short(record["eval_return"]), train=short(record["train_return"]),
                            sps=round(record["steps_per_second"]))
            if solved_at is not None and record["eval_return"][tasks[0]] >= solved_at and step < args.total_steps:
                record = log_eval(final=True)  # the final evaluation, on the model that solved the task
                save_checkpoint(checkpoint_path, network, target, optimizer, args, step)
                break
    bar.close()
    log.close()
    summary = {"status": "finished", "run_dir": run_dir, "env_steps": step, "updates": updates,
               "stopped_early": step < args.total_steps,
               "final_eval_return": record["eval_return"], "normalized_score": record["normalized_score"],
               "mean_normalized_score": record["mean_normalized_score"],
               "wall_seconds": time.time() - start, "steps_per_second": record["steps_per_second"],
               "parameters": parameter_count(network), "checkpoint": checkpoint_path}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    summary = train(parse_args())
    sys.exit(0 if summary["status"] in ("finished", "evaluated") else 1)
