"""Benchmark: how fast each routing trains on CartPole-v1, what one update costs, and the PA-MoE agent's costs.

    python benchmark.py                      # the docs' speed tables (about 30 minutes on 2 CPU cores)
    python benchmark.py --parts costs        # just the per-update costs (about a minute)
    python benchmark.py --parts scaling      # just the multi-seed scaling (train_dqn.py --seeds N, about 8 minutes)
    python benchmark.py --parts agent        # the PA-MoE agent's rollout and update per routing, and the default run
    python benchmark.py --parts memory       # peak memory of a free-text update on Qwen2.5's vocabulary (transformers)
    python benchmark.py --resume             # after a cut-off benchmark: skip the parts results/benchmark.json has

Measured in one run, on one machine, so the numbers compare as ratios:
1. time to a greedy evaluation return of 475 (mean of 10 episodes, checked every 1000 steps) for each
   routing with train_dqn.py's defaults: wall seconds (evaluations included), env steps, steps/s, and
   the final 20-episode evaluation of the model that got there;
2. the cost of one DQN update (Double DQN targets, Huber loss, backward, clipping, Adam) and of one
   action selection, per routing, relative to dense, plus SoftMoE with narrower experts (COST_VARIANTS),
   and where a SoftMoE layer's time goes: the forward and backward of the dense layer, of the SoftMoE
   layer that replaces it, and of its router and experts alone (layer_costs). Timings are interleaved
   across routings and the best of several repeats is kept, which cancels most of the noise of a shared
   machine;
3. many seeds in one process: the wall time of a fixed-length `train_dqn.py --seeds N` run for
   N = 1, 2, 4, 8, 16, relative to N = 1, and the cost of one update of all N seeds, at 1 and at 2 torch
   threads (the other parts use 1);
4. the PA-MoE agent (train_agent.py) per routing granularity (single/token/trajectory/phase): env steps
   per second of a fixed rollout batch, and the seconds of one update (all epochs) on that batch; then the
   default `python train_agent.py` at AGENT_BASELINE and in the working tree (env steps/s, peak memory);
5. the peak memory of one free-text (--action-mode generate) rollout and update on a random Qwen2 with
   Qwen2.5's vocabulary of 151,936 (WIDE_VOCABULARY), at MEMORY_BASELINE and in the working tree.
"""
import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import sys
import time

import numpy as np
import torch

import train_agent
import train_dqn
from envs import TaskSet
from household import HouseholdEnv
from moe_rl import QNetwork

ROUTINGS = {  # name -> train_dqn flags
    "dense": ["--routing", "dense"],
    "topk": ["--routing", "topk"],
    "soft": ["--routing", "soft"],
    "big": ["--routing", "big"],
}
# costs part only: SoftMoE with narrower experts. The default experts (16 -> 128 -> 16 on 8 slots) do twice the
# multiply-adds of the dense layer they replace; 64 hidden units match its multiply-adds, 32 halve them, so the
# rest of the cost is the routing's own ops (normalise, two softmaxes, dispatch, combine, layout).
COST_VARIANTS = {
    "soft-h64": ["--routing", "soft", "--expert-hidden", "64"],
    "soft-h32": ["--routing", "soft", "--expert-hidden", "32"],
}


def time_to_475(name, flags, seed, max_steps):
    args = train_dqn.parse_args([*flags, "--seed", str(seed), "--total-steps", str(max_steps), "--stop-when-solved",
                                 "--eval-frequency", "1000", "--eval-episodes", "10", "--no-progress", "--overwrite",
                                 "--output-dir", "/tmp/moe_rl_benchmark", "--run-name", f"{name}_s{seed}"])
    summary = train_dqn.train(args)
    reached = summary["stopped_early"]
    return {"routing": name, "seed": seed, "reached": reached, "final_return": summary["final_eval_return"]["CartPole-v1"],
            "wall_seconds": summary["wall_seconds"] if reached else None,
            "env_steps": summary["env_steps"] if reached else None, "steps_per_second": summary["steps_per_second"]}


def update_setup(flags, seeds, task_set, buffer_rows=10_000):
    """A seed-batched network, target, optimizer and a filled replay buffer for `seeds` seeds."""
    args = train_dqn.parse_args([*flags, "--seeds", str(seeds)])
    network = train_dqn.make_seed_networks(args, task_set, train_dqn.seed_list(args))
    target = copy.deepcopy(network)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    rng = np.random.default_rng(0)
    buffer = train_dqn.ReplayBuffer(buffer_rows, task_set.observation_size, [np.random.default_rng(s) for s in range(seeds)])
    for _ in range(buffer_rows):
        buffer.add(rng.uniform(-1, 1, (seeds, 4)), rng.integers(2, size=seeds), 1.0, rng.uniform(-1, 1, (seeds, 4)),
                   rng.random(seeds) < 0.02, 0)
    return network, target, optimizer, args, buffer


def update_costs(setups, repeats=5, updates=100):
    """Milliseconds per DQN update (all seeds at once) and per action selection (one state per seed), best
    of `repeats`, interleaved across `setups` {name: (flags, seeds)}."""
    task_set = TaskSet(["CartPole-v1"])
    mask = torch.from_numpy(task_set.action_mask)
    built = {name: update_setup(flags, seeds, task_set) for name, (flags, seeds) in setups.items()}
    best = {name: [np.inf, np.inf] for name in setups}
    for _ in range(repeats):
        for name, (network, target, optimizer, args, buffer) in built.items():
            batches = [buffer.sample(128) for _ in range(updates)]
            seeds = args.seeds
            obs, task = torch.from_numpy(np.repeat(task_set.obs[0][None], seeds, 0)), torch.zeros(seeds, dtype=torch.long)
            start = time.perf_counter()
            for batch in batches:
                train_dqn.dqn_update(network, target, optimizer, batch, mask, args)
            best[name][0] = min(best[name][0], (time.perf_counter() - start) / updates * 1e3)
            start = time.perf_counter()
            with torch.no_grad():
                for _ in range(updates):
                    train_dqn.masked_q(network, obs, task, mask)[0].argmax(1)
            best[name][1] = min(best[name][1], (time.perf_counter() - start) / updates * 1e3)
    return {name: {"seeds": built[name][3].seeds, "update_ms": u, "act_ms": a,
                   "parameters_per_seed": sum(p[0].numel() for p in built[name][0].parameters())}
            for name, (u, a) in best.items()}


def layer_costs(repeats=5, calls=200):
    """Where a SoftMoE update's extra time goes: microseconds of one forward + backward, batch 128, of the dense
    penultimate layer (Linear(128, 128) + ReLU), of the SoftMoE layer that replaces it (plain QNetwork
    defaults: 8 tokens of 16, 4 experts x 2 slots, experts 16 -> 128 -> 16), and of that layer's router
    (normalise, logits, two softmaxes) and experts (on the 8 slots) alone. What is left of the layer is the
    dispatch and combine. Interleaved, best of `repeats`."""
    dense, moe = QNetwork(4, 2, "dense").middle, QNetwork(4, 2, "soft").middle
    tokens = torch.rand(128, 8, 16, requires_grad=True)
    slots = torch.rand(moe.experts.num_experts, 128 * moe.router.slots_per_expert, 16, requires_grad=True)

    def router():
        routing = moe.router(tokens)
        return torch.cat([routing.dispatch_weights, routing.combine_weights])

    parts = {"dense layer": lambda: torch.relu(dense(tokens.view(128, 128))),
             "soft layer": lambda: moe(tokens)[0], "router": router, "experts": lambda: moe.experts(slots)}
    # backward from a dense random gradient, as a real loss gives (the gradient of .sum() is a stride-0
    # expand, which sends torch's bmm down a slow per-matrix path)
    grads = {name: torch.randn_like(part()) for name, part in parts.items()}
    best = {name: np.inf for name in parts}
    for _ in range(repeats):
        for name, part in parts.items():
            start = time.perf_counter()
            for _ in range(calls):
                part().backward(grads[name])
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    best["dispatch + combine"] = best["soft layer"] - best["router"] - best["experts"]
    return {name: {"microseconds": us, "x_dense_layer": us / best["dense layer"]} for name, us in best.items()}


def seed_scaling(routing_flags, seed_counts, steps, repeats):
    """Wall seconds of one train_dqn.py run of `steps` env steps with --seeds N, for each N, without
    stopping when solved; one evaluation (10 episodes per seed) at the end. Runs are interleaved over N
    and the best of `repeats` is kept."""
    best = {n: np.inf for n in seed_counts}
    for _ in range(repeats):
        for n in seed_counts:
            args = train_dqn.parse_args([*routing_flags, "--seeds", str(n), "--total-steps", str(steps),
                                         "--no-stop-when-solved", "--eval-frequency", str(steps),
                                         "--final-eval-episodes", "10", "--no-progress", "--overwrite",
                                         "--output-dir", "/tmp/moe_rl_benchmark", "--run-name", f"scaling_{n}"])
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):   # the runs' JSON summaries
                train_dqn.train(args)
            best[n] = min(best[n], time.perf_counter() - start)
    return {n: {"wall_seconds": s, "vs_1_seed": s / best[seed_counts[0]], "per_seed_vs_1_seed": s / best[seed_counts[0]] / n}
            for n, s in best.items()}


def agent_costs(routings, tasks=4, group_size=4, repeats=3, flags=()):
    """The PA-MoE agent's costs per routing, with train_agent.py's defaults otherwise: env steps per second
    of one training rollout of `tasks` x `group_size` episodes (fixed task seeds), and the seconds of one
    update (--update-epochs passes) on that batch. The advantages are drawn at random so that every
    episode is in the update (the trainer leaves out episodes whose advantages are all zero, so its real
    updates cost this or less). Interleaved across routings; the best of `repeats` is kept. `flags`: more
    train_agent.py flags (the CLI passes --base-cache)."""
    built = {}
    for routing in routings:
        args = train_agent.parse_args(["--routing", routing, "--threads", "1", "--no-progress",
                                       "--tasks-per-batch", str(tasks), "--group-size", str(group_size), *flags])
        base, tokenizer = train_agent.load_base(args)
        torch.manual_seed(0)
        agent = train_agent.Agent(base, tokenizer, train_agent.agent_config(args))
        optimizer = agent.optimizer(args.learning_rate, args.router_learning_rate)
        built[routing] = (args, agent, optimizer)
    seeds = [s for s in range(tasks) for _ in range(group_size)]      # every task type among the first six
    groups = [g for g in range(tasks) for _ in range(group_size)]
    best = {routing: {"steps_per_second": 0.0, "update_seconds": np.inf} for routing in routings}
    for repeat in range(repeats):
        for routing, (args, agent, optimizer) in built.items():
            generator = torch.Generator().manual_seed(repeat)
            temperature = args.router_temperature_start
            start = time.perf_counter()
            episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), seeds, groups, args, temperature,
                                           True, generator)
            rollout_seconds = time.perf_counter() - start
            steps = sum(len(e.actions) for e in episodes)
            rng = np.random.default_rng(repeat)
            advantages = [rng.standard_normal(len(e.actions)) for e in episodes]
            start = time.perf_counter()
            train_agent.update(agent, optimizer, episodes, advantages, args, temperature, rng)
            update_seconds = time.perf_counter() - start
            b = best[routing]
            if steps / rollout_seconds > b["steps_per_second"]:
                b.update(steps=steps, rollout_seconds=rollout_seconds, steps_per_second=steps / rollout_seconds)
            b["update_seconds"] = min(b["update_seconds"], update_seconds)
    for routing, (args, agent, _) in built.items():
        best[routing].update(episodes=tasks * group_size, update_epochs=args.update_epochs,
                             trainable_parameters=sum(p.numel() for p in agent.trainable_parameters()))
    return best


# The agent's default run before its scoring was packed, its ratios made exact and its defaults changed
# (docs/agent.md: Speed): the commit that --parts agent compares the working tree with.
AGENT_BASELINE = "75b30d3"
# run a trainer as a script and report its peak resident memory on the last line of stderr
PEAK_MEMORY = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\n"
               "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "finally:\n    print('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
               "file=sys.stderr)")


def default_run_speed(revision, iterations, repeats=1, workdir="/tmp/moe_rl_benchmark_agent"):
    """The default `python train_agent.py` at git `revision` and in the working tree, each for `iterations`
    iterations (evaluating at the start and the end, as the default run does every 10), interleaved,
    best of `repeats`: env steps per second of the training loop (its summary's, which leaves out the
    base model's pretraining) and peak resident memory. Each version pretrains and caches its own default
    base in its own folder. Needs git and the revision in this clone's history."""
    import subprocess
    versions = {"before": checkout(revision, workdir), "after": os.path.dirname(os.path.abspath(__file__))}
    results = {name: {"env_steps_per_second": 0.0} for name in versions}
    for repeat in range(repeats):
        for name, folder in versions.items():
            output = os.path.join(workdir, f"runs_{name}")
            shutil.rmtree(os.path.join(output, f"r{repeat}"), ignore_errors=True)   # a timing run starts afresh
            command = [sys.executable, "-c", PEAK_MEMORY, "train_agent.py", "--iterations", str(iterations),
                       "--eval-every", str(iterations), "--no-progress", "--output-dir", output, "--run-name",
                       f"r{repeat}", "--base-cache", os.path.join(workdir, f"tiny_lm_{name}.pt")]
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{name} ({folder}) failed: {done.stderr[-2000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            peak = float(done.stderr.strip().splitlines()[-1].split()[-1])
            if summary["env_steps_per_second"] > results[name]["env_steps_per_second"]:
                results[name] = {key: summary[key] for key in ("env_steps_per_second", "env_steps", "success")}
                results[name]["peak_rss_mb"] = peak
    results["speedup"] = results["after"]["env_steps_per_second"] / results["before"]["env_steps_per_second"]
    return {"revision": revision, "iterations": iterations, **results}


# The commit before Agent.score sliced its log-softmax (docs/real_llms.md: Memory): --parts memory compares with it.
MEMORY_BASELINE = "c238fc7"
WIDE_VOCABULARY = 151_936   # Qwen2.5's
# one generate-mode rollout and update (random advantages, so every episode is in it), then the peak resident memory
MEMORY_CHILD = """import resource, sys, numpy as np, torch
sys.path.insert(0, '.')
import train_agent
try:
    from household import HouseholdEnv
except ImportError:          # a revision from before household.py
    from envs import HouseholdEnv
args = train_agent.parse_args(sys.argv[1:])
torch.set_num_threads(1)
base, tokenizer = train_agent.load_base(args)
torch.manual_seed(0)
if hasattr(train_agent, "agent_config"):
    agent = train_agent.Agent(base, tokenizer, train_agent.agent_config(args))
    optimizer = agent.optimizer(args.learning_rate, args.router_learning_rate)
else:                        # a revision from before agent.AgentConfig: Agent reads the trainer's Args
    agent = train_agent.Agent(base, tokenizer, args)
    optimizer = agent.optimizer(args)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
seeds = [s for s in range(args.tasks_per_batch) for _ in range(args.group_size)]
groups = [g for g in range(args.tasks_per_batch) for _ in range(args.group_size)]
episodes = train_agent.rollout(agent, HouseholdEnv(args.max_steps), seeds, groups, args, 1.0, True,
                               torch.Generator().manual_seed(0))
rollout = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rng = np.random.default_rng(0)
train_agent.update(agent, optimizer, episodes, [rng.standard_normal(len(e.actions)) for e in episodes], args, 1.0, rng)
tokens = sum(len(c[0]) for e in episodes for c in e.commands)
print(loaded, rollout, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, tokens)
"""


def wide_vocabulary_model(path):
    """A random 2-layer Qwen2 (width 64) with Qwen2.5's vocabulary, so that nearly all of an update's memory is
    its (tokens x vocab) logits, and a small byte-level BPE tokenizer of household prompts, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from prompts import render_prompt
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    observations, infos = HouseholdEnv().reset(list(range(12)))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([render_prompt(i["goal"], [], o, 2, i["admissible_commands"])
                             for o, i in zip(observations, infos)] + ["<think> </think> <action> </action>"],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=WIDE_VOCABULARY, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=4096, tie_word_embeddings=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 bos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    return path


def checkout(revision, workdir):
    """The files of git `revision` in workdir/revision (extracted once with git archive); needs git and the
    revision in this clone's history."""
    import subprocess
    folder = os.path.join(workdir, revision)
    if not os.path.exists(os.path.join(folder, "train_agent.py")):
        os.makedirs(folder, exist_ok=True)
        archive = subprocess.run(["git", "archive", revision], capture_output=True, check=True,
                                 cwd=os.path.dirname(os.path.abspath(__file__))).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return folder


def update_memory(revision, new_tokens, workdir="/tmp/moe_rl_benchmark_memory"):
    """Peak resident memory (MB) of one generate-mode rollout of 2 x 2 episodes of 5 steps, each answer
    `new_tokens` long (a random model never closes its <action> tag), and one update on it, at git `revision`
    and in the working tree, each in a fresh process: after loading, after the rollout, after the update."""
    import subprocess
    model = wide_vocabulary_model(os.path.join(workdir, "qwen2_wide_vocabulary"))
    versions = {"before": checkout(revision, workdir), "after": os.path.dirname(os.path.abspath(__file__))}
    results = {"revision": revision, "vocabulary": WIDE_VOCABULARY}
    for tokens in new_tokens:
        for name, folder in versions.items():
            command = [sys.executable, "-c", MEMORY_CHILD, "--model", model, "--action-mode", "generate",
                       "--max-new-tokens", str(tokens), "--tasks-per-batch", "2", "--group-size", "2",
                       "--max-steps", "5", "--no-progress"]
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{name} ({folder}) failed: {done.stderr[-2000:]}")
            loaded, rollout, peak, answer_tokens = map(float, done.stdout.strip().splitlines()[-1].split())
            results.setdefault(str(tokens), {})[name] = {"loaded_mb": loaded, "rollout_peak_mb": rollout,
                                                        "peak_mb": peak, "answer_tokens": int(answer_tokens)}
    return results


def measure_costs(args, results):
    """Part costs: one DQN update and one action selection per routing, and a SoftMoE layer's parts."""
    costs = update_costs({name: (flags, 1) for name, flags in {**ROUTINGS, **COST_VARIANTS}.items()})
    dense_update, dense_act = costs["dense"]["update_ms"], costs["dense"]["act_ms"]
    print("\nCost of one update (batch 128) and one action selection, CartPole-v1, 1 thread:")
    print(f"{'routing':9} {'params':>7} {'update ms':>10} {'x dense':>8} {'act ms':>8} {'x dense':>8}")
    for name, c in costs.items():
        c.update(update_vs_dense=c["update_ms"] / dense_update, act_vs_dense=c["act_ms"] / dense_act)
        print(f"{name:9} {c['parameters_per_seed']:>7} {c['update_ms']:>10.3f} {c['update_vs_dense']:>8.2f} "
              f"{c['act_ms']:>8.3f} {c['act_vs_dense']:>8.2f}")
    results["update_costs"] = costs
    layers = layer_costs()
    print("\nForward + backward of the penultimate layer and of the SoftMoE layer's parts, batch 128, 1 thread:")
    for name, c in layers.items():
        print(f"{name:19} {c['microseconds']:>7.0f} us {c['x_dense_layer']:>6.2f} x dense layer")
    results["layer_costs"] = layers


def measure_scaling(args, results):
    """Part scaling: many seeds in one process, at each thread count."""
    results["seed_scaling"] = {}
    for name in args.scaling_routings:
        for threads in args.scaling_threads:
            counts = args.scaling_seeds
            torch.set_num_threads(threads)
            updates = update_costs({n: (ROUTINGS[name], n) for n in counts}, repeats=3, updates=50)
            runs = seed_scaling([*ROUTINGS[name], "--threads", str(threads)], counts, args.scaling_steps,
                                args.scaling_repeats)
            torch.set_num_threads(1)
            print(f"\nMany seeds in one process, {name}: {args.scaling_steps} env steps per seed, one update per "
                  f"2 steps, {threads} thread(s) (best of {args.scaling_repeats}, interleaved):")
            print(f"{'seeds':>5} {'wall s':>7} {'x 1 seed':>9} {'per seed':>9} {'update ms':>10} {'x 1 seed':>9}")
            for n in counts:
                runs[n].update(update_ms=updates[n]["update_ms"],
                               update_vs_1_seed=updates[n]["update_ms"] / updates[counts[0]]["update_ms"])
                r = runs[n]
                print(f"{n:>5} {r['wall_seconds']:>7.1f} {r['vs_1_seed']:>9.2f} {r['per_seed_vs_1_seed']:>9.2f} "
                      f"{r['update_ms']:>10.2f} {r['update_vs_1_seed']:>9.2f}")
            results["seed_scaling"][f"{name}, {threads} thread(s)"] = {"steps": args.scaling_steps,
                                                                     "threads": threads, "by_seeds": runs}


def measure_475(args, results):
    """Part 475: wall time to a greedy evaluation return of 475 on CartPole-v1, per routing."""
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
    results.update(time_to_475=table, runs=runs)


def measure_agent(args, results):
    """Part agent: the agent's rollout and update per routing, then the default run before and now."""
    costs = agent_costs(args.agent_routings, args.agent_tasks, args.agent_group_size, args.agent_repeats,
                        ["--base-cache", args.base_cache])
    first = next(iter(costs.values()))
    print(f"\nPA-MoE agent, one rollout of {first['episodes']} episodes and one update ({first['update_epochs']} "
          f"epochs) on it, 1 thread (best of {args.agent_repeats}, interleaved):")
    reference = args.agent_routings[0]
    print(f"{'routing':10} {'trainable':>9} {'steps':>6} {'steps/s':>8} {'update s':>9} {'x ' + reference:>12}")
    for name, c in costs.items():
        c["update_vs_first"] = c["update_seconds"] / costs[reference]["update_seconds"]
        print(f"{name:10} {c['trainable_parameters']:>9} {c['steps']:>6} {c['steps_per_second']:>8.1f} "
              f"{c['update_seconds']:>9.2f} {c['update_vs_first']:>12.2f}")
    results["agent_costs"] = costs
    if args.agent_baseline:
        speed = default_run_speed(args.agent_baseline, args.agent_iterations)
        print(f"\nThe default `python train_agent.py`, {args.agent_iterations} iterations, 2 threads, at "
              f"{args.agent_baseline} and now:")
        print(f"{'version':8} {'env steps/s':>12} {'env steps':>10} {'peak RSS MB':>12}")
        for name in ("before", "after"):
            r = speed[name]
            print(f"{name:8} {r['env_steps_per_second']:>12.1f} {r['env_steps']:>10} {r['peak_rss_mb']:>12.0f}")
        print(f"speedup: {speed['speedup']:.1f}x")
        results["agent_default_run"] = speed


def measure_memory(args, results):
    """Part memory: peak memory of a free-text update on a wide vocabulary, before and now."""
    memory = update_memory(args.memory_baseline, args.memory_new_tokens)
    print(f"\nPeak resident memory (MB) of one free-text rollout (2 x 2 episodes of 5 steps) and one update, a "
          f"random Qwen2 with a vocabulary of {WIDE_VOCABULARY:,}, at {args.memory_baseline} and now:")
    print(f"{'new tokens':>10} {'answer tokens':>14} {'version':8} {'loaded':>7} {'rollout':>8} {'update':>7}")
    for tokens in args.memory_new_tokens:
        for name in ("before", "after"):
            r = memory[str(tokens)][name]
            print(f"{tokens:>10} {r['answer_tokens']:>14} {name:8} {r['loaded_mb']:>7.0f} "
                  f"{r['rollout_peak_mb']:>8.0f} {r['peak_mb']:>7.0f}")
    results["update_memory"] = memory


def parse_options():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["costs", "scaling", "475", "agent"],
                        choices=["costs", "scaling", "475", "agent", "memory"],
                        help="what to measure: update costs per routing, multi-seed scaling, time to 475, the "
                        "PA-MoE agent's rollout and update per routing, peak memory of a free-text update on a "
                        "wide vocabulary (memory: needs transformers; not in the default parts)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of the time-to-475 runs")
    parser.add_argument("--max-steps", type=int, default=50_000, help="give up on 475 after this many env steps")
    parser.add_argument("--scaling-seeds", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                        help="--seeds values of the scaling runs (the first is the reference)")
    parser.add_argument("--scaling-routings", nargs="+", default=["dense"], choices=list(ROUTINGS),
                        help="routings whose multi-seed scaling is measured")
    parser.add_argument("--scaling-steps", type=int, default=5000, help="env steps of each scaling run")
    parser.add_argument("--scaling-repeats", type=int, default=3, help="repeats of each scaling run (best kept)")
    parser.add_argument("--scaling-threads", type=int, nargs="+", default=[1, 2],
                        help="torch threads of the scaling runs: one scaling curve per value")
    parser.add_argument("--agent-routings", nargs="+", default=list(train_agent.ROUTINGS), choices=train_agent.ROUTINGS,
                        help="agent part: the routings measured")
    parser.add_argument("--agent-tasks", type=int, default=4, help="agent part: task seeds in the rollout batch")
    parser.add_argument("--agent-group-size", type=int, default=4, help="agent part: rollouts per task seed")
    parser.add_argument("--agent-repeats", type=int, default=3, help="agent part: repeats (best kept)")
    parser.add_argument("--base-cache", default="runs/tiny_lm.pt",
                        help="agent part: the cached tiny LM (pretrained there on first use)")
    parser.add_argument("--agent-baseline", default=AGENT_BASELINE,
                        help="agent part: the git revision whose default run the working tree's is compared with "
                        "('' skips the comparison)")
    parser.add_argument("--agent-iterations", type=int, default=20,
                        help="agent part: iterations of each default run in the comparison")
    parser.add_argument("--memory-baseline", default=MEMORY_BASELINE,
                        help="memory part: the git revision the working tree is compared with")
    parser.add_argument("--memory-new-tokens", type=int, nargs="+", default=[64, 256],
                        help="memory part: --max-new-tokens of each measurement")
    parser.add_argument("--out", default="results/benchmark.json",
                        help="the JSON results, written after each part; parts not measured in this run keep their "
                        "figures from the file")
    parser.add_argument("--resume", action="store_true",
                        help="skip the parts that --out already holds from this same command (a benchmark cut off "
                        "and run again); a part is always measured whole, in one go")
    args = parser.parse_args()
    for name in ("max_steps", "scaling_steps", "scaling_repeats", "agent_tasks", "agent_group_size", "agent_repeats",
                 "agent_iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.scaling_seeds) < 1:
        parser.error(f"--scaling-seeds must all be at least 1, got {args.scaling_seeds}")
    if min(args.scaling_threads) < 1:
        parser.error(f"--scaling-threads must all be at least 1, got {args.scaling_threads}")
    return args


def main():
    """Measure the parts asked for (skipping, with --resume, those --out holds from this same command), writing
    --out after each."""
    args = parse_options()
    torch.set_num_threads(1)
    command = "python benchmark.py " + " ".join(a for a in sys.argv[1:] if a != "--resume")
    previous = json.load(open(args.out)) if os.path.exists(args.out) else {}
    done = [part for part in args.parts if args.resume and previous.get("commands", {}).get(part) == command
            and all(key in previous for key in PART_RESULTS[part])]
    if done:
        print(f"--resume: {args.out} holds the parts {', '.join(done)} of this command already; measuring the rest")
    todo = [part for part in args.parts if part not in done]
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": 1,
                           "scaling_threads": args.scaling_threads}, "commands": {}}

    for part, measure in MEASURES.items():
        if part in todo:
            measure(args, results)
            results["commands"][part] = command
            write_results(args.out, results)   # after each part: a cut-off benchmark keeps its finished parts
    if todo:
        print(f"\nwrote {args.out}")


# each part's measurement, in the order they run
MEASURES = {"costs": measure_costs, "scaling": measure_scaling, "475": measure_475, "agent": measure_agent,
            "memory": measure_memory}
# what each part writes to --out
PART_RESULTS = {"costs": ("update_costs", "layer_costs"), "scaling": ("seed_scaling",), "475": ("time_to_475", "runs"),
                "agent": ("agent_costs",), "memory": ("update_memory",)}


def write_results(path, results):
    """Merge `results` into the JSON file at `path`: the parts not measured this time keep their earlier figures."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    previous = json.load(open(path)) if os.path.exists(path) else {}
    merged = {**previous, **results, "commands": {**previous.get("commands", {}), **results["commands"]}}
    with open(f"{path}.{os.getpid()}.tmp", "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(f"{path}.{os.getpid()}.tmp", path)


if __name__ == "__main__":
    main()
