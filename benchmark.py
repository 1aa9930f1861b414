"""Benchmark: how fast each routing trains on CartPole-v1, and what one update costs.

    python benchmark.py                      # the README's table (about 10 minutes on 2 CPU cores)
    python benchmark.py --costs-only         # just the per-update costs (about a minute)

Measured in one run, on one machine, so the numbers compare as ratios:
1. time to a greedy evaluation return of 475 (mean of 10 episodes, checked every 1000 steps) for each
   routing with train_dqn.py's defaults: wall seconds (evaluations included), env steps, steps/s, and
   the final 20-episode evaluation of the model that got there;
2. the cost of one DQN update (Double DQN targets, Huber loss, backward, clipping, Adam) and of one
   action selection, per routing, relative to dense. Timings are interleaved across routings and the
   best of several repeats is kept, which cancels most of the noise of a shared machine.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

import train_dqn
from envs import TaskSet

ROUTINGS = {  # name -> train_dqn flags
    "dense": ["--routing", "dense"],
    "topk": ["--routing", "topk"],
    "soft": ["--routing", "soft"],
    "big": ["--routing", "big"],
}


def time_to_475(name, flags, seed, max_steps):
    args = train_dqn.parse_args([*flags, "--seed", str(seed), "--total-steps", str(max_steps), "--stop-when-solved",
                                 "--eval-frequency", "1000", "--eval-episodes", "10", "--no-progress",
                                 "--output-dir", "/tmp/moe_rl_benchmark", "--run-name", f"{name}_s{seed}"])
    summary = train_dqn.train(args)
    reached = summary["stopped_early"]
    return {"routing": name, "seed": seed, "reached": reached, "final_return": summary["final_eval_return"]["CartPole-v1"],
            "wall_seconds": summary["wall_seconds"] if reached else None,
            "env_steps": summary["env_steps"] if reached else None, "steps_per_second": summary["steps_per_second"]}


def update_costs(repeats=5, updates=100):
    """Milliseconds per DQN update and per single-state action selection, best of `repeats`."""
    task_set = TaskSet(["CartPole-v1"])
    mask = torch.from_numpy(task_set.action_mask)
    rng = np.random.default_rng(0)
    buffer = train_dqn.ReplayBuffer(10_000, task_set.observation_size, rng)
    for _ in range(10_000):
        buffer.add(rng.uniform(-1, 1, 4), rng.integers(2), 1.0, rng.uniform(-1, 1, 4), rng.random() < 0.02, 0)
    setups = {}
    for name, flags in ROUTINGS.items():
        args = train_dqn.parse_args(flags)
        torch.manual_seed(0)
        network, target = train_dqn.make_network(args, task_set), train_dqn.make_network(args, task_set)
        optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
        setups[name] = (network, target, optimizer, args)
    batches = [buffer.sample(128) for _ in range(updates)]
    obs, task = torch.from_numpy(task_set.obs[0][None]), torch.zeros(1, dtype=torch.long)
    best = {name: [np.inf, np.inf] for name in ROUTINGS}
    for _ in range(repeats):
        for name, (network, target, optimizer, args) in setups.items():
            start = time.perf_counter()
            for batch in batches:
                train_dqn.dqn_update(network, target, optimizer, batch, mask, args)
            best[name][0] = min(best[name][0], (time.perf_counter() - start) / updates * 1e3)
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(updates):
                    train_dqn.masked_q(network, obs, task, mask)[0].argmax(1)
            best[name][1] = min(best[name][1], (time.perf_counter() - start) / updates * 1e3)
    dense_update, dense_act = best["dense"]
    return {name: {"update_ms": u, "update_vs_dense": u / dense_update, "act_ms": a, "act_vs_dense": a / dense_act,
                   "parameters": sum(p.numel() for p in setups[name][0].parameters())}
            for name, (u, a) in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the time-to-475 runs")
    parser.add_argument("--max-steps", type=int, default=50_000, help="give up on 475 after this many env steps")
    parser.add_argument("--out", default="results/benchmark.json", help="where the JSON results go")
    parser.add_argument("--costs-only", action="store_true", help="measure only the update and action costs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    costs = update_costs()
    print("\nCost of one update (batch 128) and one action selection, CartPole-v1, 1 thread:")
    print(f"{'routing':8} {'params':>7} {'update ms':>10} {'x dense':>8} {'act ms':>8} {'x dense':>8}")
    for name, c in costs.items():
        print(f"{name:8} {c['parameters']:>7} {c['update_ms']:>10.3f} {c['update_vs_dense']:>8.2f} "
              f"{c['act_ms']:>8.3f} {c['act_vs_dense']:>8.2f}")

    if args.costs_only:
        return
    runs = [time_to_475(name, flags, seed, args.max_steps) for name, flags in ROUTINGS.items() for seed in args.seeds]
    print(f"\nTime to a greedy eval return of 475 on CartPole-v1 (seeds {args.seeds}, train_dqn.py defaults):")
    print(f"{'routing':8} {'reached':>8} {'median s':>9} {'max s':>7} {'median steps':>13} {'steps/s':>8}")
    table = {}
    for name in ROUTINGS:
        mine = [r for r in runs if r["routing"] == name]
        hit = [r for r in mine if r["reached"]]
        row = {"reached": f"{len(hit)}/{len(mine)}",
               "median_seconds": float(np.median([r["wall_seconds"] for r in hit])) if hit else None,
               "max_seconds": max(r["wall_seconds"] for r in hit) if hit else None,
               "median_steps": float(np.median([r["env_steps"] for r in hit])) if hit else None,
               "steps_per_second": float(np.mean([r["steps_per_second"] for r in mine]))}
        table[name] = row
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"
        print(f"{name:8} {row['reached']:>8} {fmt(row['median_seconds'], '9.1f')} {fmt(row['max_seconds'], '7.1f')} "
              f"{fmt(row['median_steps'], '13.0f')} {row['steps_per_second']:>8.0f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"update_costs": costs, "time_to_475": table, "runs": runs,
                   "machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
