"""Reproduce the docs' comparison tables and plots: run a grid of seeds and configurations, then
tabulate the summaries.

    python reproduce.py preset --jobs 2                     # the DQN settings swept on each task alone, 10 seeds
    python reproduce.py moe --quick --jobs 2                # MoE in MTRL and CRL (Willi et al. 2024), small, 5 seeds
    python reproduce.py moe --jobs 2                        # the whole grid, 10 seeds per cell (many hours; resumable)
    python reproduce.py moe --print-commands > cells.txt    # one command per cell, for a job array
    python reproduce.py moe --table-only                    # the tables, verdicts and plots of the cells done so far
    python reproduce.py agent --quick --jobs 2              # single vs token vs trajectory vs phase, 3 seeds, short
    python reproduce.py agent --jobs 2                      # 5 seeds, 150 iterations (AGENT_FLAGS; hours)
    python reproduce.py agent --table-only --summaries results/agent_comparison.json   # re-print and plot
    python reproduce.py rais --jobs 2                       # token vs sequence vs rais importance sampling
    python reproduce.py rais --stress --jobs 2              # the same with fast-moving routers

The preset study trains each candidate DQN setting of PRESET_CANDIDATES on CartPole-v1, MountainCar-v0 and
Acrobot-v1 alone, 10 seeds batched in one process, at PRESET_FLAGS (one per-task budget, no early stop), and
tabulates per task the final normalised score, how many seeds end at 0.9 or more, and the mean over the
run's evaluations: results/dqn_preset.json. Its winner is train_dqn.py's `--preset study`.

The moe study (Willi, Obando-Ceron et al. 2024, arXiv 2406.18420) trains DQN at `--preset study` on the
same three tasks in MTRL, in CRL, and in CRL with the task order reversed (crl_reverse), for every
placement (dense, Middle, Final, All, Big) and router (Top-k, SoftMoE, hardcoded task routing). Each cell
is one `train_dqn.py --seed S --seeds N` process (N seeds batched), and the cells that decide the paper's
claims run first (MOE_PRIORITY). It reports the mean normalised score with a 95% bootstrap interval over
the seeds per setting and cell, a verdict per claim (MOE_CLAIMS), and plots the scores, the CRL curves with
the task switches marked, and the dormant-neuron fraction: RESULTS_DIR/moe/ (moe_quick/ with --quick) gets
tables.md, summaries.json, scores.png, crl_curves.png and dormant.png. Each finished cell's summary is its
own file, RESULTS_DIR/moe/cells/NAME.json, and a cell whose file holds a finished run of the same
command is not run again: the grid can be completed over several sittings, or one cell per job on a cluster
(--print-commands), and --table-only reports whatever cells are there. --seeds-per-run N splits each cell into
parts of N seeds, one process and one file (NAME_sA-B.json) each, that the tables join into the cell, for a cell
longer than a sitting or a job's time limit. --quick runs a reduced grid at
QUICK_FLAGS.

The agent study (PA-MoE, arXiv 2602.17038) trains train_agent.py with each routing granularity (single,
token, trajectory, phase) for 5 seeds and tabulates success per task type, switches per episode,
utilisation per task type, occupancy and gradient conflict, at AGENT_FLAGS (--quick: AGENT_QUICK_FLAGS).
The rais study runs token routing with each --is-mode at RAIS_FLAGS (more update epochs per batch than
the default, where the routers move most between rollout and update) and tabulates the importance
weights, gradient norms, clipping and router shift logged by every update; --stress runs it at
RAIS_STRESS_FLAGS (fast-moving routers). Extra flags go to every run.

Every run is an ordinary `train_dqn.py` or `train_agent.py` run in its own process (1 thread each, --jobs at
a time), so any row can be re-run alone with the command printed for it (plus --overwrite, as its folder
holds a run). Summaries (the last JSON line of each run) are collected in OUTPUT_DIR/summaries.json as
runs finish. A study that was cut off picks up where it stopped when its command is run again: a run whose
console log (OUTPUT_DIR/NAME.out) holds a finished summary is not run again, and one cut off after a
checkpoint continues from it with the trainer's --resume, exactly as if it had not stopped (docs/dqn.md:
Resuming and checkpoints). The study's results file (results/dqn_preset.json, agent_comparison.json, ...; for
moe its cells/ folder) is its committed record: a run whose finished summary it holds, with the same command,
is not run again either, so a study continues on a machine that kept no runs/ folder, and the entries of
runs outside this call's grid are kept. Remove an entry (or the file) to run it anew.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cli import as_flags
from envs import crl_steps_per_task
from household import HOUSEHOLD_TASK_TYPES
from train_dqn import PRESETS

SHORT = {"pick_and_place": "pick", "look_at_obj_in_light": "look", "pick_clean_then_place": "clean",
         "pick_heat_then_place": "heat", "pick_cool_then_place": "cool", "pick_two_obj_and_place": "pick2"}


MATPLOTLIB = "matplotlib==3.11.2"
# the moe study: Willi et al.'s placements (their Fig. 1) and routers, as train_dqn.py flags
PLACEMENT_NAMES = {"dense": "dense", "middle": "Middle", "final": "Final", "all": "All", "big": "Big"}
ROUTER_NAMES = {"-": "-", "topk": "Top-k", "soft": "SoftMoE", "task": "hardcoded"}
# --quick keeps every placement with SoftMoE, and all three routers at Middle and Big
QUICK_CELLS = {("dense", "-"), ("middle", "topk"), ("middle", "soft"), ("middle", "task"), ("final", "soft"),
               ("all", "soft"), ("big", "topk"), ("big", "soft"), ("big", "task")}
# both sizes train with train_dqn.py's study preset (chosen by `reproduce.py preset`), its values spelt out beside
# its name: a cell run before the preset changed has another command, so it runs again rather than being kept.
# The full size gives each task the 150k env steps of the chosen candidate (MTRL: 450k summed over the three
# tasks, stepped together; CRL: 150k per task in turn)
STUDY_FLAGS = ["--preset", "study", *as_flags(PRESETS["study"])]
QUICK_FLAGS = [*STUDY_FLAGS, "--total-steps", "18000", "--eval-frequency", "3000", "--eval-episodes", "5",
               "--final-eval-episodes", "10"]
MOE_QUICK_SEEDS = [1, 2, 3, 4, 5]
FULL_FLAGS = [*STUDY_FLAGS, "--total-steps", "450000", "--eval-frequency", "15000"]
# the settings of the moe study: crl_reverse is CRL with the task order reversed (Willi et al. find the order matters)
MOE_SETTINGS = ("mtrl", "crl", "crl_reverse")
MOE_TASKS = ["CartPole-v1", "MountainCar-v0", "Acrobot-v1"]
# the cells that decide the paper's claims run first: dense against Big and Middle with SoftMoE and Top-k (every
# claim but hardcoded routing), then hardcoded routing, then the rest of the grid
MOE_PRIORITY = ["dense", "big:soft", "middle:soft", "middle:topk", "big:topk", "middle:task", "big:task"]

# the preset study: candidate DQN settings, each trained on every task alone with 10 seeds batched in one process,
# at one per-task budget and without the early stop, so that "learned and still learned at the end" is measured.
# "zoo" is rl-zoo3's MountainCar-v0 config (lr 4e-3, gamma 0.98, train every 16 steps with 8 gradient steps, target
# every 600, epsilon to 0.07 over 20%, buffer 10k, batch 128) on the project's 128-wide network; the others change
# up to five of its flags (the discount, the learning rate or its linear decay to 0, from the start or held for the
# first half or 70% of the run (anneal0.5, anneal0.7), the exploration fraction, the buffer, the width, the per-task
# budget: 150k steps rather than 100k), or are train_dqn.py's defaults as the moe study used them before
# (--train-frequency 4).
ZOO = ["--learning-rate", "4e-3", "--gamma", "0.98", "--train-frequency", "16", "--gradient-steps", "8",
       "--target-network-frequency", "600", "--end-e", "0.07", "--exploration-fraction", "0.2",
       "--buffer-size", "10000", "--batch-size", "128", "--learning-starts", "1000"]
PRESET_CANDIDATES = {
    "zoo": ZOO,
    "zoo_gamma0.99_anneal": ZOO + ["--gamma", "0.99", "--anneal-lr"],
    "zoo_gamma0.99_anneal_150k": ZOO + ["--gamma", "0.99", "--anneal-lr", "--total-steps", "150000"],
    "zoo_gamma0.99_anneal_150k_explore0.1": ZOO + ["--gamma", "0.99", "--anneal-lr", "--total-steps", "150000",
                                                    "--exploration-fraction", "0.1"],
    "zoo_gamma0.99_buffer100k_explore0.1_anneal": ZOO + ["--gamma", "0.99", "--buffer-size", "100000",
                                                          "--exploration-fraction", "0.1", "--anneal-lr"],
    "zoo_gamma0.99_anneal_150k_lr6e-3": ZOO + ["--gamma", "0.99", "--anneal-lr", "--total-steps", "150000",
                                                "--learning-rate", "6e-3"],
    "zoo_gamma0.99_lr2e-3_buffer50k": ZOO + ["--gamma", "0.99", "--learning-rate", "2e-3", "--buffer-size", "50000"],
    "zoo_gamma0.99": ZOO + ["--gamma", "0.99"],
    "zoo_lr1e-3_buffer50k": ZOO + ["--learning-rate", "1e-3", "--buffer-size", "50000"],
    "zoo_buffer50k": ZOO + ["--buffer-size", "50000"],
    "defaults": ["--train-frequency", "4"],
    "zoo_hidden256": ZOO + ["--hidden", "256"],
    "zoo_gamma0.99_anneal0.5_150k": ZOO + ["--gamma", "0.99", "--anneal-lr", "--anneal-start", "0.5",
                                           "--total-steps", "150000"],
    "zoo_gamma0.99_anneal0.7_150k": ZOO + ["--gamma", "0.99", "--anneal-lr", "--anneal-start", "0.7",
                                           "--total-steps", "150000"],
    "zoo_gamma0.99_buffer100k_anneal0.7_150k": ZOO + ["--gamma", "0.99", "--buffer-size", "100000", "--anneal-lr",
                                                      "--anneal-start", "0.7", "--total-steps", "150000"],
}
# the candidate train_dqn.py's --preset study holds: the one with the most seeds at 0.9 or more on its worst task
PRESET_CHOSEN = "zoo_gamma0.99_anneal0.7_150k"
PRESET_TASKS = ["CartPole-v1", "MountainCar-v0", "Acrobot-v1"]
PRESET_FLAGS = ["--total-steps", "100000", "--no-stop-when-solved", "--eval-frequency", "10000",
                "--eval-episodes", "10", "--final-eval-episodes", "20"]
PRESET_SEEDS = list(range(1, 11))

# the agent study's budget: 150 of train_agent.py's 400 iterations (the paper's 150 iterations, of 64 episodes
# here, not 128; about 15 minutes of the default run alone on 2 cores), before the routings level out: by 400
# iterations every routing's runs had reached 0.83-0.93
AGENT_FLAGS = ["--iterations", "150"]
# the agent study's --quick size: 50 of train_agent.py's 400 iterations, half its held-out episodes, 3 seeds
AGENT_QUICK_FLAGS = ["--iterations", "50", "--eval-every", "10", "--eval-episodes", "60", "--conflict-every", "25"]
AGENT_QUICK_SEEDS = [1, 2, 3]

# the rais study's budget: 4 update epochs per batch (the routers move further between rollout and update
# than at the default 2); 60 iterations with held-out evaluations every 10; minibatches of 16 informative
# episodes (--no-constant-steps), as when its table in docs/agent.md was measured
RAIS_FLAGS = ["--update-epochs", "4", "--iterations", "60", "--eval-every", "10", "--eval-episodes", "60",
              "--conflict-every", "0", "--no-constant-steps"]
# rais --stress: the same, with the routers' learning rate 30 times the experts' (1e-3): the chosen experts'
# router log-probabilities then move 0.058-0.068 per update on average instead of 0.013-0.015 (docs/agent.md),
# the setting where router shift would hurt if it does here
RAIS_STRESS_FLAGS = RAIS_FLAGS + ["--router-learning-rate", "3e-2"]


def agent_command(routing, seed, output_dir, extra, name=None):
    return [sys.executable, "train_agent.py", "--routing", routing, "--seed", str(seed), "--threads", "1",
            "--no-progress", "--output-dir", output_dir, "--run-name", name or f"{routing}_s{seed}", *extra]


def moe_grid(quick=False, only=None):
    """[(placement, router, train_dqn.py flags)] of the moe study: dense, then every router at Middle,
    Final and All, then Big with each router as its gate over whole-network experts. `only` keeps the
    cells named PLACEMENT:ROUTER (or dense) and fails on an unknown name; otherwise quick keeps QUICK_CELLS."""
    cells = [("dense", "-", ["--routing", "dense"])]
    cells += [(p, r, ["--routing", r, "--placement", p]) for p in ("middle", "final", "all") for r in ("topk", "soft", "task")]
    cells += [("big", r, ["--routing", "big", "--big-gate", r]) for r in ("topk", "soft", "task")]
    names = {placement if router == "-" else f"{placement}:{router}": (placement, router) for placement, router, _ in cells}
    if only:
        unknown = [name for name in only if name not in names]
        if unknown:
            raise ValueError(f"unknown cells {unknown}; choose from {', '.join(names)}")
        return [c for c in cells if (c[0], c[1]) in {names[name] for name in only}]
    return [c for c in cells if (c[0], c[1]) in QUICK_CELLS] if quick else cells


def dqn_command(setting, flags, seeds, output_dir, name, extra):
    """One cell: all `seeds` (consecutive) batched in one train_dqn.py process."""
    return [sys.executable, "train_dqn.py", *flags, "--setting", setting, "--seed", str(seeds[0]),
            "--seeds", str(len(seeds)), "--threads", "1", "--no-progress", "--output-dir", output_dir,
            "--run-name", name, *extra]


def dqn_evaluations(run_dir):
    """What the tables and plots need from a train_dqn.py log: the tasks, the CRL task switches (env steps)
    and each seed's evaluations (step, normalised score per task and mean, overall dormant fraction counting
    an expert that received nothing as dormant and leaving it out, and how many experts received nothing;
    None where an older log lacks them)."""
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    config, tasks = lines[0]["config"], lines[0]["tasks"]
    switches = []
    if config["setting"] == "crl":
        stretch = crl_steps_per_task(len(tasks), config["total_steps"], config["cycles"])
        switches = [k * stretch for k in range(1, len(tasks) * config["cycles"])]
    evaluations = [{"seed": r["seed"], "step": r["step"], "final": r["final"], "normalized_score": r["normalized_score"],
                    "mean_normalized_score": r["mean_normalized_score"],
                    "dormant": r.get("dormant_fraction", {}).get("overall"),
                    "dormant_received": r.get("dormant_fraction", {}).get("overall_received"),
                    "empty_experts": sum(share == 0 for load in r["expert_load"].values() for share in load)
                    if "expert_load" in r else None}
                   for r in lines[1:] if "seed" in r]
    return {"tasks": tasks, "task_switches": switches, "evaluations": evaluations}


def bootstrap_ci(values, confidence=0.95, resamples=10_000, seed=0):
    """The mean of `values` (one per seed) and its percentile-bootstrap interval: the seeds are resampled
    with replacement `resamples` times (a fixed RNG seed, so the interval is reproducible) and the
    interval holds the central `confidence` of the resampled means. Returns (mean, low, high)."""
    values = np.asarray(values, np.float64)
    resampled = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(values.mean()), float(low), float(high)


def difference_ci(a, b, confidence=0.95, resamples=10_000, seed=0):
    """mean(a) - mean(b) of two independent groups of seeds, with a percentile-bootstrap interval (each group
    resampled with replacement on its own, a fixed RNG seed). Returns (difference, low, high)."""
    a, b, rng = np.asarray(a, np.float64), np.asarray(b, np.float64), np.random.default_rng(seed)
    resampled = (a[rng.integers(0, len(a), (resamples, len(a)))].mean(1) -
                 b[rng.integers(0, len(b), (resamples, len(b)))].mean(1))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(a.mean() - b.mean()), float(low), float(high)


def curve(cell, key, task=None):
    """(steps, mean over seeds) of an evaluation quantity: mean_normalized_score, a task's normalized_score
    or dormant."""
    by_step = {}
    for e in cell["evaluations"]:
        value = e[key][task] if task else e[key]
        if value is not None:
            by_step.setdefault(e["step"], []).append(value)
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) for s in steps]


def forgetting(cell):
    """CRL: mean over the tasks trained before the last one of (score at the end of the task's last
    stretch - score at the end of the run), per seed; None without task switches."""
    switches, tasks = cell["task_switches"], cell["tasks"]
    if not switches:
        return None
    ends = {tasks[k % len(tasks)]: step for k, step in enumerate(switches)}      # a task's last stretch ends here
    ends.pop(tasks[len(switches) % len(tasks)], None)                           # the last task trained has no drop
    per_seed = []
    for seed in sorted({e["seed"] for e in cell["evaluations"]}):
        mine = {e["step"]: e["normalized_score"] for e in cell["evaluations"] if e["seed"] == seed}
        final = mine[max(mine)]
        drops = [mine[step][task] - final[task] for task, step in ends.items() if step in mine]
        if drops:
            per_seed.append(float(np.mean(drops)))
    return per_seed or None


def moe_table(summaries, setting):
    """One row per cell of `setting`: the final mean normalised score and its average over all evaluations
    (mean over seeds [95% bootstrap interval]), each task's final score, the overall dormant fraction at the
    end, how many experts received nothing then (mean over seeds), CRL forgetting, the minutes the cell took
    (all its seeds together; for a cell run in parts, the parts' minutes summed) and the number of seeds."""
    cells = [s for s in summaries if s["setting"] == setting and s.get("status") == "finished"]
    if not cells:
        return f"(no finished {setting} runs)"
    tasks = cells[0]["tasks"]
    header = ["placement", "router", "final score [95% CI]", "average over training [95% CI]",
              *[t.split("-")[0] for t in tasks], "dormant (final)", "empty experts", "forgetting", "minutes", "seeds"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    interval = lambda values: "{:.3f} [{:.3f}, {:.3f}]".format(*bootstrap_ci(values))
    for cell in cells:
        seeds = sorted({e["seed"] for e in cell["evaluations"]})
        final = [s["mean_normalized_score"] for s in cell["per_seed"]]
        average = [np.mean([e["mean_normalized_score"] for e in cell["evaluations"] if e["seed"] == seed])
                   for seed in seeds]
        dormant = curve(cell, "dormant")[1]
        empty = [e["empty_experts"] for e in cell["evaluations"] if e["final"] and e.get("empty_experts") is not None]
        drops = forgetting(cell)
        rows.append("| " + " | ".join([
            PLACEMENT_NAMES[cell["placement"]], ROUTER_NAMES[cell["router"]], interval(final), interval(average),
            *[f"{np.mean([s['normalized_score'][t] for s in cell['per_seed']]):.3f}" for t in tasks],
            f"{dormant[-1]:.3f}" if dormant else "-", f"{np.mean(empty):.1f}" if empty else "-",
            interval(drops) if drops else "-",
            f"{cell['wall_seconds'] / 60:.1f}", str(len(final))]) + " |")
    return "\n".join(rows)


# The claims of Willi et al. 2024 the moe study tests: (claim, setting, cell A, cell B, what is compared). Each
# is judged on A - B over the seeds (final mean normalised score, or the final dormant fraction of B - A).
MOE_CLAIMS = [
    *[("Big + SoftMoE beats dense in CRL", s, "big:soft", "dense", "score") for s in ("crl", "crl_reverse")],
    *[("SoftMoE beats dense in CRL", s, "middle:soft", "dense", "score") for s in ("crl", "crl_reverse")],
    *[("Big beats dense in MTRL", "mtrl", cell, "dense", "score") for cell in ("big:soft", "big:topk", "big:task")],
    *[("no MoE but Big beats dense in MTRL", "mtrl", cell, "dense", "no gain")
      for cell in ("middle:soft", "middle:topk", "middle:task", "final:soft", "all:soft")],
    *[("SoftMoE beats Top-k under non-stationarity", s, f"{p}:soft", f"{p}:topk", "score")
      for s in ("crl", "crl_reverse", "mtrl") for p in ("middle", "big")],
    # the dormant fraction counting an expert that received nothing as dormant, and (for the routers that can
    # leave one with nothing: top-k, and task routing once a task is out of the buffer) leaving it out
    *[("MoE has fewer dormant neurons than dense", s, cell, "dense", "dormant")
      for s in ("crl", "mtrl") for cell in MOE_PRIORITY[1:]],
    *[("MoE has fewer dormant neurons than dense", s, cell, "dense", "dormant received")
      for s in ("crl", "mtrl") for cell in MOE_PRIORITY[1:] if not cell.endswith(":soft")],
    *[("hardcoded routing beats a learned router", s, f"{p}:task", f"{p}:soft", "score")
      for s in ("crl", "mtrl") for p in ("middle", "big")],
    *[("the task order matters in CRL", "crl", cell, cell, "order") for cell in MOE_PRIORITY],
]


def final_values(cell, what):
    """Per seed: the final mean normalised score, or the overall dormant fraction at the final evaluation,
    counting an expert that received nothing as dormant ('dormant') or leaving it out ('dormant received': the
    same for dense, which has no experts, and missing from logs written before it was recorded)."""
    if what.startswith("dormant"):
        key = "dormant" if what == "dormant" or cell["router"] == "-" else "dormant_received"
        return [e[key] for e in cell["evaluations"] if e["final"] and e.get(key) is not None]
    return [s["mean_normalized_score"] for s in cell["per_seed"]]


def moe_verdicts(summaries):
    """A markdown row per claim of MOE_CLAIMS whose cells have finished: the difference with its 95% bootstrap
    interval and the verdict, 'holds' (the interval is above 0), 'reversed' (below 0) or 'cannot be told apart'
    (it holds 0). For the task order, CRL in the given order minus CRL reversed, where either sign holds; for a
    cell the claim says does not beat dense ('no gain'), 'fails' when the interval is above 0, else 'holds'. The
    last column gives the number of seeds of each side (a cell run in parts may not have all of them yet)."""
    cells = {(s["setting"], cell_name(s["placement"], s["router"])): s for s in summaries if s.get("status") == "finished"}
    rows = ["| claim | setting | comparison | difference [95% CI] | verdict | seeds |", "|---|---|---|---|---|---|"]
    for claim, setting, a, b, what in MOE_CLAIMS:
        other = ("crl_reverse", b) if what == "order" else (setting, b)
        if (setting, a) not in cells or other not in cells:
            continue
        first, second = final_values(cells[(setting, a)], what), final_values(cells[other], what)
        if not first or not second:
            continue
        dormant = what.startswith("dormant")
        difference, low, high = difference_ci(second, first) if dormant else difference_ci(first, second)
        comparison = {"dormant": f"dormant {b} - {a}", "order": f"{a}: crl - crl_reverse",
                      "dormant received": f"dormant {b} - {a}, empty experts left out"}.get(what, f"{a} - {b}")
        verdict = (("fails" if low > 0 else "holds") if what == "no gain" else
                   "cannot be told apart" if low <= 0 <= high else
                   "holds" if what == "order" or low > 0 else "reversed")
        rows.append(f"| {claim} | {setting} | {comparison} | {difference:+.3f} [{low:+.3f}, {high:+.3f}] | {verdict} "
                    f"| {len(first)}, {len(second)} |")
    return "\n".join(rows) if len(rows) > 2 else "(no claim has both its cells finished)"


# PA-MoE's claims the agent study can test (arXiv 2602.17038: phase routing 93.8 vs a single LoRA's 86.1 on
# ALFWorld, and ahead of token and trajectory routing in its ablation), each on overall held-out success and on
# pick-two, the task type the simplicity bias leaves unlearned
AGENT_CLAIMS = [(f"phase routing beats {name}", "phase", other) for other, name in
                [("single", "a single LoRA"), ("token", "token routing"), ("trajectory", "trajectory routing")]]


def agent_verdicts(summaries):
    """A markdown row per claim of AGENT_CLAIMS and measure (overall success, pick-two success) whose routings
    have finished runs: the difference of the means over the seeds with its 95% bootstrap interval (the
    routings' seeds resampled apart), how many shared seeds the first routing won, and the verdict: 'holds' (the
    interval is above 0), 'reversed' (below 0) or 'cannot be told apart'."""
    runs = {}
    for s in summaries:
        if s.get("status") == "finished":
            runs.setdefault(s["routing"], {})[s["seed"]] = s
    measures = {"success": lambda s: s["success"], "pick2": lambda s: s["success_per_task"]["pick_two_obj_and_place"]}
    rows = ["| claim | measure | comparison (seeds) | difference [95% CI] | shared seeds won | verdict |",
            "|---|---|---|---|---|---|"]
    for claim, a, b in AGENT_CLAIMS:
        if a not in runs or b not in runs:
            continue
        for measure, value in measures.items():
            first, second = ([value(s) for s in runs[r].values()] for r in (a, b))
            difference, low, high = difference_ci(first, second)
            shared = sorted(set(runs[a]) & set(runs[b]))
            won = sum(value(runs[a][seed]) > value(runs[b][seed]) for seed in shared)
            verdict = "cannot be told apart" if low <= 0 <= high else "holds" if low > 0 else "reversed"
            rows.append(f"| {claim} | {measure} | {a} - {b} ({len(first)}, {len(second)}) | {difference:+.3f} "
                        f"[{low:+.3f}, {high:+.3f}] | {won}/{len(shared)} | {verdict} |")
    return "\n".join(rows) if len(rows) > 2 else "(no claim has both its routings finished)"


def preset_table(summaries, threshold=0.9):
    """One row per candidate: for each task, the final normalised score (mean over seeds, 95% bootstrap
    interval), how many seeds end at `threshold` or more, and the mean over the run's evaluations (how soon
    it learns and how well it holds); then the fewest seeds at `threshold` over the tasks (the candidate's
    worst task: what the preset is chosen by) and the minutes its runs took."""
    tasks = sorted({s["task"] for s in summaries}, key=PRESET_TASKS.index)
    rows = ["| candidate | " + " | ".join(f"{t.split('-')[0]}: final [95% CI] | >= {threshold} | mean over evals"
                                        for t in tasks) + f" | fewest >= {threshold} | minutes |",
            "|---|" + "---|---|---|" * len(tasks) + "---|---|"]
    for candidate in dict.fromkeys(s["candidate"] for s in summaries):
        cells, minutes, learned = [], 0.0, []
        for task in tasks:
            mine = [s for s in summaries if s["candidate"] == candidate and s["task"] == task and s.get("status") == "finished"]
            if not mine:
                cells.append("- | - | -")
                continue
            final = [p["normalized_score"][task] for p in mine[0]["per_seed"]]
            mean, low, high = bootstrap_ci(final)
            average = np.mean([e["normalized_score"][task] for e in mine[0]["evaluations"]])
            learned.append(sum(f >= threshold for f in final))
            cells.append(f"{mean:.2f} [{low:.2f}, {high:.2f}] | {learned[-1]}/{len(final)} | {average:.2f}")
            minutes += mine[0]["wall_seconds"] / 60
        fewest = f"{min(learned)}" if len(learned) == len(tasks) else "-"
        rows.append(f"| {candidate} | " + " | ".join(cells) + f" | {fewest} | {minutes:.0f} |")
    return "\n".join(rows)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message naming the package) when
    matplotlib is not installed: the plots are optional, the tables are not."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed, so no plots were written (the tables need nothing extra): "
              f"pip install {MATPLOTLIB}", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def cell_style(cell):
    """A line's colour by placement and its dash by router, so 13 cells stay apart."""
    colours = {"dense": "black", "middle": "tab:blue", "final": "tab:orange", "all": "tab:green", "big": "tab:red"}
    dashes = {"-": "-", "topk": ":", "soft": "-", "task": "--"}
    label = PLACEMENT_NAMES[cell["placement"]] + ("" if cell["router"] == "-" else " " + ROUTER_NAMES[cell["router"]])
    return {"color": colours[cell["placement"]], "linestyle": dashes[cell["router"]], "label": label}


def plot_moe(summaries, results_dir):
    """results_dir/scores.png (final score per cell with its 95% interval, one panel per setting),
    crl_curves.png (each task's score over training, task switches dashed) and dormant.png (the overall
    dormant fraction over training, per setting). Returns the paths written."""
    plt = pyplot()
    if plt is None:
        return []
    cells = [s for s in summaries if s.get("status") == "finished"]
    if not cells:
        return []
    settings = [x for x in MOE_SETTINGS if any(c["setting"] == x for c in cells)]
    paths = []
    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.5), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        mine = [c for c in cells if c["setting"] == setting]
        stats = [bootstrap_ci([s["mean_normalized_score"] for s in c["per_seed"]]) for c in mine]
        means = [m for m, _, _ in stats]
        errors = [[m - low for m, low, _ in stats], [high - m for m, _, high in stats]]
        bars = ax.bar(range(len(mine)), means, yerr=errors, capsize=3, color=[cell_style(c)["color"] for c in mine])
        for bar, cell in zip(bars, mine):
            bar.set_hatch({"topk": "//", "task": ".."}.get(cell["router"], ""))
        ax.set_xticks(range(len(mine)), [cell_style(c)["label"] for c in mine], rotation=60, ha="right")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(title=f"{setting.upper()}: final mean normalised score (95% bootstrap CI)", ylabel="normalised score")
    figure.tight_layout()
    paths.append(os.path.join(results_dir, "scores.png"))
    figure.savefig(paths[-1], dpi=110)

    orders = [x for x in ("crl", "crl_reverse") if x in settings]
    if orders:
        figure, axes = plt.subplots(len(orders), 3, figsize=(16.5, 4.2 * len(orders)), squeeze=False, sharey=True)
        for row, setting in zip(axes, orders):
            crl = [c for c in cells if c["setting"] == setting]
            for ax, task in zip(row, crl[0]["tasks"]):
                for cell in crl:
                    ax.plot(*curve(cell, "normalized_score", task), **cell_style(cell))
                for step in crl[0]["task_switches"]:
                    ax.axvline(step, color="grey", linestyle="--", linewidth=1)
                ax.set(title=f"CRL: {task} (order {' -> '.join(t.split('-')[0] for t in crl[0]['tasks'])})",
                       xlabel="env steps", ylabel="normalised score")
            row[-1].legend(fontsize=7)
        figure.tight_layout()
        paths.append(os.path.join(results_dir, "crl_curves.png"))
        figure.savefig(paths[-1], dpi=110)

    figure, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for cell in [c for c in cells if c["setting"] == setting]:
            ax.plot(*curve(cell, "dormant"), **cell_style(cell))
        for step in next(c for c in cells if c["setting"] == setting)["task_switches"]:
            ax.axvline(step, color="grey", linestyle="--", linewidth=1)
        ax.set(title=f"{setting.upper()}: dormant neurons (tau 0.025)", xlabel="env steps", ylabel="fraction dormant")
        ax.legend(fontsize=7)                                  # each panel its own cells (a setting may lack some)
    figure.tight_layout()
    paths.append(os.path.join(results_dir, "dormant.png"))
    figure.savefig(paths[-1], dpi=110)
    plt.close("all")
    return paths


def plot_agent(summaries, routings, results_dir, name="agent"):
    """results_dir/NAME_success.png (held-out success per task type, mean over seeds) and
    NAME_routing.png (switches per episode, the largest expert share per task type, occupancy per
    task type and gradient conflict), per routing. Returns the paths written."""
    plt = pyplot()
    if plt is None:
        return []
    runs = {r: [s for s in summaries if s.get("routing") == r and s.get("status") == "finished"] for r in routings}
    runs = {r: v for r, v in runs.items() if v}
    width = 0.8 / len(runs)
    # a metric a run has no value for (occupancy with no informative batch) is left out; none at all: no bar
    mean = lambda values: float(np.mean([v for v in values if v is not None] or [np.nan]))
    figure, ax = plt.subplots(figsize=(9, 4))
    for i, (routing, mine) in enumerate(runs.items()):
        x = np.arange(len(HOUSEHOLD_TASK_TYPES)) + (i - (len(runs) - 1) / 2) * width
        ax.bar(x, [mean([s["success_per_task"][t] for s in mine]) for t in HOUSEHOLD_TASK_TYPES], width, label=routing)
    ax.set_xticks(range(len(HOUSEHOLD_TASK_TYPES)), [SHORT[t] for t in HOUSEHOLD_TASK_TYPES])
    ax.set(title="PA-MoE agent: held-out success per task type (mean over seeds)", ylabel="success")
    ax.legend()
    figure.tight_layout()
    paths = [os.path.join(results_dir, f"{name}_success.png")]
    figure.savefig(paths[-1], dpi=110)

    figure, axes = plt.subplots(1, 4, figsize=(18, 4))
    names = list(runs)
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [mean([s["switches_per_episode"] for s in runs[r]]) for r in names], 0.4,
                label="as logged (token: along the tokens)")
    axes[0].bar(x + 0.2, [mean([s["step_switches_per_episode"] for s in runs[r]]) for r in names], 0.4,
                label="per step (majority expert)")
    axes[0].set_xticks(x, names)
    axes[0].set(title="expert switches per episode", yscale="symlog", ylim=(0, 500))
    axes[0].legend()
    for ax, key, title in ((axes[1], "utilisation", "largest expert share per task type"),
                           (axes[2], "occupancy", "occupancy: batches where the type has >50% of the loss")):
        for i, routing in enumerate(names):
            x = np.arange(len(HOUSEHOLD_TASK_TYPES)) + (i - (len(names) - 1) / 2) * width
            value = (lambda s, t: max(s[key][t]) if t in s[key] else None) if key == "utilisation" \
                else (lambda s, t: s[key].get(t))        # a task type the evaluation never drew has none
            ax.bar(x, [mean([value(s, t) for s in runs[routing]]) for t in HOUSEHOLD_TASK_TYPES], width, label=routing)
        ax.set_xticks(range(len(HOUSEHOLD_TASK_TYPES)), [SHORT[t] for t in HOUSEHOLD_TASK_TYPES])
        ax.set(title=title, ylim=(0, 1.25))
    axes[1].legend(fontsize=7, ncol=2)
    conflict = [[s["gradient_conflict"] for s in runs[r] if s["gradient_conflict"] is not None] for r in names]
    axes[3].bar(names, [mean(c) if c else 0.0 for c in conflict])
    axes[3].set(title="gradient conflict (mean max(0, -cos))")
    figure.tight_layout()
    paths.append(os.path.join(results_dir, f"{name}_routing.png"))
    figure.savefig(paths[-1], dpi=110)
    plt.close("all")
    return paths


def logged_command(log_path):
    """The command a run's console log names on its first line ("$ ARGS", written by run), or None."""
    if not os.path.exists(log_path):
        return None
    with open(log_path) as log:
        first = log.readline()
    return first[2:].strip() if first.startswith("$ ") else None


def other_command(log_path, command):
    """Whether the console log at log_path names a command other than `command`."""
    logged = logged_command(log_path)
    return logged is not None and logged != " ".join(command[1:])


def finished_summary(log_path, command=None):
    """The summary a run printed last, if its console log holds one of a finished run (of `command`, where the
    log names the command it ran), else None."""
    if not os.path.exists(log_path) or (command is not None and other_command(log_path, command)):
        return None
    lines = [line for line in open(log_path) if line.startswith("{")]
    summary = json.loads(lines[-1]) if lines else None
    return summary if summary and summary.get("status") == "finished" else None


def run(command, log_path, run_dir):
    """Run one training command, its console output to log_path, whose first line names the command. A run that
    already finished there with the same command (a study cut off and started again) is not run again; one cut off
    after a checkpoint continues from it (--resume, its console output appended); one cut off before its first
    checkpoint, or run with another command (other flags after a change of the study), starts again (--overwrite)."""
    done = finished_summary(log_path, command)
    if done is not None:
        return done
    resume = os.path.exists(os.path.join(run_dir, "checkpoint.pt")) and not other_command(log_path, command)
    again = ["--resume"] if resume else ["--overwrite"] if os.path.exists(run_dir) else []
    with open(log_path, "a" if resume else "w") as log:
        if not resume:
            log.write(f"$ {' '.join(command[1:])}\n")
            log.flush()
        subprocess.run(command + again, stdout=log, stderr=subprocess.STDOUT, check=False)
    return finished_summary(log_path) or {"status": "failed", "log": log_path}


def agent_table(summaries, routings):
    """One row per routing over its seeds: held-out success overall (mean, 95% bootstrap interval, min..max)
    and per task type (mean and interval), switches, expert use, occupancy, gradient conflict (mean over the
    measurements that had a pair of task types with a gradient, and how many pairs there were)."""
    header = ["routing", "success [95% CI] (min..max)", "untrained"] + [SHORT[t] for t in HOUSEHOLD_TASK_TYPES] + \
             ["switches/ep", "step switches/ep", "max expert use", "occupancy pick/look", "grad conflict (pairs)",
              "minutes"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    interval = lambda values: "{:.2f} [{:.2f}, {:.2f}]".format(*bootstrap_ci(values))
    for routing in routings:
        runs = [s for s in summaries if s.get("routing") == routing and s.get("status") == "finished"]
        if not runs:
            continue
        mean = lambda f: float(np.mean([f(s) for s in runs]))
        success = [s["success"] for s in runs]
        per_task = [interval([s["success_per_task"][t] for s in runs]) for t in HOUSEHOLD_TASK_TYPES]
        # the largest share of decisions any one expert got, averaged over task types and seeds
        max_use = mean(lambda s: np.mean([max(u) for u in s["utilisation"].values()]))
        conflict = [s["gradient_conflict"] for s in runs if s["gradient_conflict"] is not None]
        pairs = sum(s.get("gradient_conflict_pairs", 0) for s in runs)
        rows.append("| " + " | ".join([
            f"{routing} ({len(runs)} seeds)", f"{interval(success)} ({min(success):.2f}..{max(success):.2f})",
            f"{mean(lambda s: s['untrained_success']):.2f}", *per_task,
            f"{mean(lambda s: s['switches_per_episode']):.1f}", f"{mean(lambda s: s['step_switches_per_episode']):.1f}",
            f"{max_use:.2f}", f"{mean(lambda s: s['occupancy']['pick_and_place']):.2f}/"
            f"{mean(lambda s: s['occupancy']['look_at_obj_in_light']):.2f}",
            (f"{np.mean(conflict):.3f} ({pairs})" if conflict else f"no signal ({pairs})"),
            f"{mean(lambda s: s['wall_seconds']) / 60:.1f}"]) + " |")
    return "\n".join(rows)


def read_log(summary):
    return [json.loads(line) for line in open(os.path.join(summary["run_dir"], "log.jsonl"))]


def rais_table(summaries, labels):
    """Per routing and importance-sampling mode, over the updates of all seeds: the importance weights'
    variance (mean and largest of the per-minibatch variances), the gradient norm's variance over all
    minibatches (across updates plus within them), the clipped fraction, the router shift and gamma;
    then the held-out success at the end (mean, 95% bootstrap interval over seeds, min..max) and at its best
    (a drop from best to end is a collapse)."""
    header = ["routing / IS mode", "final success [95% CI] (min..max)", "best success", "IS weight var (max)", "grad-norm var",
              "clip fraction", "router shift", "gamma mean (min)", "minutes"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        runs = [s for s in summaries if s.get("label") == label and s.get("status") == "finished"]
        if not runs:
            continue
        logs = [read_log(s) for s in runs]
        updates = [r for log in logs for r in log if r.get("informative_episodes")]
        values = lambda key: np.array([u[key] for u in updates if u.get(key) is not None])
        best = [max(r["eval"]["success"] for r in log if "eval" in r) for log in logs]
        final = [s["success"] for s in runs]
        routed = "router_shift" in updates[0]
        rows.append("| " + " | ".join([
            f"{label} ({len(runs)} seeds)", "{:.3f} [{:.3f}, {:.3f}]".format(*bootstrap_ci(final)) +
            f" ({min(final):.3f}..{max(final):.3f})",
            f"{np.mean(best):.3f}", f"{values('is_weight_var').mean():.4f} ({values('is_weight_var').max():.3f})",
            f"{values('grad_norm').var() + values('grad_norm_var').mean():.3f}",
            f"{values('clip_fraction').mean():.3f}",
            f"{values('router_shift').mean():.4f}" if routed else "-",
            f"{values('gamma_mean').mean():.3f} ({values('gamma_min').min():.3f})" if routed else "-",
            f"{np.mean([s['wall_seconds'] for s in runs]) / 60:.1f}"]) + " |")
    return "\n".join(rows)


def eval_curve(summary):
    """A finished run's held-out success at each evaluation, [[iteration, success, env steps, wall seconds], ...],
    from its log (kept in the study's summaries, so that the curve outlives the run's folder)."""
    return [[r["iteration"], r["eval"]["success"], r["env_steps"], r["wall_seconds"]] for r in read_log(summary)
            if "eval" in r]


def has_log(summary):
    return os.path.exists(os.path.join(summary.get("run_dir", ""), "log.jsonl"))


def has_curve(summary):
    return "curve" in summary or has_log(summary)


def curve_table(summaries, routings):
    """Held-out success at each evaluation, mean over the seeds whose curve is known (stored in the summary or in
    the run's log) and min..max."""
    curves, seeds = {}, {}
    for s in summaries:
        if s.get("status") != "finished" or not has_curve(s):
            continue
        label = s.get("label", s["routing"])
        seeds.setdefault(label, []).append(s["seed"])
        for iteration, success, *_ in s["curve"] if "curve" in s else eval_curve(s):
            curves.setdefault(label, {}).setdefault(iteration, []).append(success)
    iterations = sorted({i for c in curves.values() for i in c})
    rows = ["| routing (seeds) | " + " | ".join(f"iteration {i}" for i in iterations) + " |",
            "|" + "---|" * (len(iterations) + 1)]
    for routing in routings:
        if routing not in curves:
            continue
        cells = [f"{np.mean(v):.3f} ({min(v):.3f}..{max(v):.3f})" if (v := curves[routing].get(i)) else "-"
                 for i in iterations]
        rows.append(f"| {routing} ({' '.join(map(str, sorted(seeds[routing])))}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_grid(commands, names, options, record, summary_paths, stored=lambda i: None, kept=()):
    """Run `commands` (named `names`) --jobs at a time, each resumed or skipped as `run` decides, or taken as
    stored(i) where that returns a summary. As each ends, record(i, result) makes its summary and every file in
    summary_paths is rewritten with `kept` and the summaries so far, so a study cut off keeps every run it
    finished and its rerun skips them."""
    for command in commands:
        print(" ".join(command[1:]))
    summaries, lock, start = [None] * len(commands), threading.Lock(), time.time()

    def run_one(i):
        summary = stored(i)
        if summary is None:
            result = run(commands[i], os.path.join(options.output_dir, f"{names[i]}.out"),
                         os.path.join(options.output_dir, names[i]))
            summary = {**record(i, result), "command": " ".join(commands[i][1:])}
        with lock:
            summaries[i] = summary
            for path in summary_paths:
                write_json(path, [*kept, *(x for x in summaries if x is not None)])

    with ThreadPoolExecutor(options.jobs) as pool:
        list(pool.map(run_one, range(len(commands))))
    print(f"the {len(commands)} runs took {(time.time() - start) / 60:.1f} minutes of wall time with --jobs {options.jobs}")
    return summaries


def load_json(path, default=None):
    return json.load(open(path)) if os.path.exists(path) else default


def from_results_file(path, commands):
    """What a study's results file (its committed summaries) holds for `commands`: stored(i), the finished summary
    of commands[i] there, which is not run again (so a study continues over sittings on machines that kept no
    runs/ folder; remove the entry, or the file, to run it anew), and the entries of other commands, kept."""
    old = load_json(path, [])
    wanted = {" ".join(command[1:]) for command in commands}
    finished = {s.get("command"): s for s in old if s.get("status") == "finished"}
    if found := len(wanted & set(finished)):
        print(f"{found} of the {len(commands)} runs finished before, as {path} holds (not run again; to run them "
              f"anew, give another --results-dir)")
    return (lambda i: finished.get(" ".join(commands[i][1:]))), [s for s in old if s.get("command") not in wanted]


def with_evaluations(result):
    return {**result, **(dqn_evaluations(result["run_dir"]) if result.get("status") == "finished" else {})}


def cell_name(placement, router):
    return placement if router == "-" else f"{placement}:{router}"


def moe_cells(options):
    """[(setting, placement, router, train_dqn.py flags, run name)] of the moe study, the cells of MOE_PRIORITY
    first, each in every setting of --settings."""
    cells = moe_grid(options.quick, options.cells)
    first = lambda c: MOE_PRIORITY.index(cell_name(*c[:2])) if cell_name(*c[:2]) in MOE_PRIORITY else len(MOE_PRIORITY)
    return [(setting, placement, router, flags + (["--tasks", ",".join(reversed(MOE_TASKS))] if setting == "crl_reverse" else []),
             f"{setting}_{placement}" + ("" if router == "-" else f"_{router}"))
            for placement, router, flags in sorted(cells, key=first) for setting in options.settings]


def seed_groups(options):
    """The seeds in consecutive groups of --seeds-per-run, each group one train_dqn.py process (all of them in one
    when it is not given)."""
    size = options.seeds_per_run or len(options.seeds)
    return [options.seeds[i:i + size] for i in range(0, len(options.seeds), size)]


def moe_runs(options):
    """[(setting, placement, router, flags, run name, seeds)]: each cell of moe_cells once per seed group. A run of
    the study's default seeds (1..10; 1..5 with --quick) is named after its cell (cells/NAME.json); one of other
    seeds, a part of a cell, is NAME_sA-B (seeds A to B), whether --seeds-per-run or --seeds made it, so each part
    has its own summary file and stored_cells joins the parts of a cell."""
    default = MOE_QUICK_SEEDS if options.quick else PRESET_SEEDS
    return [(*cell[:4], cell[4] if seeds == default else f"{cell[4]}_s{seeds[0]}-{seeds[-1]}", seeds)
            for cell in moe_cells(options) for seeds in seed_groups(options)]


def moe_dir(options):
    """Where the moe study writes: RESULTS_DIR/moe (moe_quick with --quick) holds summaries.json, tables.md and
    the plots, and cells/ one summary file per finished cell."""
    return os.path.join(options.results_dir, "moe_quick" if options.quick else "moe")


def stored_cells(folder):
    """Every cell in `folder`, in the grid's order (setting, then placement, then router): its summary file, or
    the parts of a cell run in seed groups joined into one (join_parts)."""
    order = [cell_name(p, r) for p, r, _ in moe_grid()]
    files = [json.load(open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))
             if name.endswith(".json")] if os.path.isdir(folder) else []
    cells = {}
    for summary in files:
        cells.setdefault((summary["setting"], summary["placement"], summary["router"]), []).append(summary)
    summaries = [join_parts(parts) for parts in cells.values()]
    return sorted(summaries, key=lambda s: (MOE_SETTINGS.index(s["setting"]), order.index(cell_name(s["placement"], s["router"]))))


def without_seeds(command):
    """A train_dqn.py command line without its --seed, --seeds and --run-name: what the parts of a cell share."""
    words = command.split()
    return " ".join(w for i, w in enumerate(words) if w not in ("--seed", "--seeds", "--run-name")
                    and (i == 0 or words[i - 1] not in ("--seed", "--seeds", "--run-name")))


def join_parts(parts):
    """One cell's summary out of its parts (runs of the same command on other seeds): the seeds' records and
    evaluations of every part, the final scores averaged over all the seeds, and the wall time summed (the
    cell's process time). Parts of another command (the study's flags changed between them) are not joined:
    those of the command with the most seeds are kept; a seed in two parts is taken from the larger."""
    if len(parts) == 1:
        return parts[0]
    commands = {}
    for part in parts:
        commands.setdefault(without_seeds(part["command"]), []).append(part)
    kept = max(commands.values(), key=lambda group: sum(len(p["seeds"]) for p in group))
    if len(commands) > 1:
        print(f"warning: {len(parts) - len(kept)} part(s) of the {kept[0]['setting']} "
              f"{cell_name(kept[0]['placement'], kept[0]['router'])} cell ran another command; left out of it",
              file=sys.stderr)
    joined, seeds = [], set()
    for part in sorted(kept, key=lambda p: (-len(p["seeds"]), p["seeds"][0])):
        if part["status"] == "finished" and not seeds & set(part["seeds"]):
            joined.append(part)
            seeds |= set(part["seeds"])
    joined.sort(key=lambda p: p["seeds"][0])
    if len(joined) == 1:
        return joined[0]
    per_seed = [record for part in joined for record in part["per_seed"]]
    tasks = joined[0]["tasks"]
    mean = lambda key, task: float(np.mean([r[key][task] for r in per_seed]))
    first = {k: v for k, v in joined[0].items() if k not in ("ci95", "checkpoint", "steps_per_second")}
    return {**first, "seeds": sorted(seeds), "per_seed": per_seed, "parts": len(joined),
            "evaluations": [e for part in joined for e in part["evaluations"]],
            "mean_normalized_score": float(np.mean([r["mean_normalized_score"] for r in per_seed])),
            "normalized_score": {t: mean("normalized_score", t) for t in tasks},
            "final_eval_return": {t: mean("final_eval_return", t) for t in tasks},
            "wall_seconds": sum(p["wall_seconds"] for p in joined), "run_dir": [p["run_dir"] for p in joined],
            "command": [p["command"] for p in joined]}


def write_json(path, value):
    """Write through a temporary file of this process and thread, so that a reader (or a second study writing
    the same file, as the cells of a job array do) never sees half a file."""
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(temporary, path)


def run_moe(options, extra, summary_paths):
    """The moe study: every (setting, cell) as one train_dqn.py process with all seeds batched (or one per group
    of --seeds-per-run seeds, a part of the cell). Each finished run's summary goes to
    moe_dir(options)/cells/NAME.json, and a run whose file holds a finished run of the same command is not run
    again, so the grid can be completed over several sittings (or one run per job on a cluster, see
    --print-commands); the study's summaries are then every cell there, its parts joined (stored_cells)."""
    size = QUICK_FLAGS if options.quick else FULL_FLAGS
    grid = moe_runs(options)
    commands = [dqn_command("crl" if setting == "crl_reverse" else setting, flags, seeds, options.output_dir,
                            name, size + extra) for setting, _, _, flags, name, seeds in grid]
    folder = os.path.join(moe_dir(options), "cells")
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{name}.json") for *_, name, _ in grid]

    def stored(i):
        summary = json.load(open(paths[i])) if os.path.exists(paths[i]) else None
        same = summary and summary["status"] == "finished" and summary["command"] == " ".join(commands[i][1:])
        return summary if same else None

    def record(i, result):
        setting, placement, router, *_ = grid[i]
        summary = {**with_evaluations(result), "setting": setting, "placement": placement, "router": router,
                   "command": " ".join(commands[i][1:])}
        if summary["status"] == "finished":
            write_json(paths[i], summary)
        return summary

    run_grid(commands, [run[4] for run in grid], options, record, summary_paths[:1], stored)
    summaries = stored_cells(folder)
    for path in summary_paths[1:]:
        write_json(path, summaries)
    return summaries


def preset_runs(options, extra):
    """[(candidate, task, run name, command)] of the preset study: every candidate on every task alone."""
    grid = [(candidate, task, f"{candidate}_{task.split('-')[0]}") for candidate in options.candidates
            for task in PRESET_TASKS]
    return [(candidate, task, name, dqn_command("single", PRESET_FLAGS + PRESET_CANDIDATES[candidate] + ["--env", task],
                                                options.seeds, options.output_dir, name, extra))
            for candidate, task, name in grid]


def preset_record(run, result):
    candidate, task, _, command = run
    return {**with_evaluations(result), "candidate": candidate, "task": task, "command": " ".join(command[1:])}


def run_preset(options, extra, summary_paths):
    """The preset study: every candidate of PRESET_CANDIDATES on every task alone, 10 seeds in one process."""
    runs = preset_runs(options, extra)
    commands = [r[3] for r in runs]
    stored, kept = from_results_file(options.results_file, commands)
    return run_grid(commands, [r[2] for r in runs], options, lambda i, result: preset_record(runs[i], result),
                    summary_paths, stored, kept)


def finished_presets(options, extra):
    """The preset study's runs that have finished in --output-dir, whatever flags the study command that ran
    them added (the command a run's console log names is its summary's)."""
    summaries = []
    for run in preset_runs(options, extra):
        log = os.path.join(options.output_dir, f"{run[2]}.out")
        summary = finished_summary(log)
        if summary is not None:
            logged = logged_command(log)
            command = ["python", *logged.split()] if logged else run[3]
            summaries.append(preset_record((*run[:3], command), {**summary, "run_dir": os.path.join(options.output_dir, run[2])}))
    return summaries


def run_agent_study(options, extra, modes, summary_paths):
    """The agent or rais study's grid: seeds x routings x IS modes, one train_agent.py process each."""
    grid = [(r, m, s) for s in options.seeds for r in options.routings for m in modes]
    names = [f"{r}_{m}_s{s}" if m else f"{r}_s{s}" for r, m, s in grid]
    commands = [agent_command(r, s, options.output_dir, extra + (["--is-mode", m] if m else []), name)
                for (r, m, s), name in zip(grid, names)]
    record = lambda i, result: {**result, "routing": grid[i][0], "seed": grid[i][2],
                                "label": f"{grid[i][0]}/{grid[i][1]}" if grid[i][1] else grid[i][0],
                                **({"curve": eval_curve(result)} if has_log(result) else {})}
    stored, kept = from_results_file(options.results_file, commands)
    return run_grid(commands, names, options, record, summary_paths, stored, kept)


def report(options, summaries, labels):
    """Print a study's tables and write its plots (and, for moe, its tables) under --results-dir."""
    os.makedirs(options.results_dir, exist_ok=True)
    if options.study == "moe":
        folder = moe_dir(options)
        os.makedirs(folder, exist_ok=True)
        settings = [s for s in MOE_SETTINGS if any(c["setting"] == s for c in summaries)]
        minutes = sum(c.get("wall_seconds", 0) for c in summaries) / 60
        tables = "\n\n".join(f"{setting.upper()}\n\n{moe_table(summaries, setting)}" for setting in settings)
        tables += (f"\n\nVerdicts (95% bootstrap intervals over the seeds)\n\n{moe_verdicts(summaries)}\n\n"
                   f"{len(summaries)} cells, {minutes:.0f} minutes of process time (one core each)")
        print(tables)
        with open(os.path.join(folder, "tables.md"), "w") as f:
            f.write(tables + "\n")
        paths = plot_moe(summaries, folder)
    elif options.study == "preset":
        print(preset_table(summaries))
        paths = []
    else:
        print(rais_table(summaries, labels) if options.study == "rais" else agent_table(summaries, options.routings))
        print()
        if options.study == "agent":
            print(agent_verdicts(summaries))
            print()
        if any(has_curve(s) for s in summaries if s.get("status") == "finished"):
            print(curve_table(summaries, labels))
        else:
            print("(the held-out success curve needs the runs' logs or curves stored in their summaries)")
        paths = [] if options.study == "rais" else plot_agent(summaries, options.routings, options.results_dir,
                                                              "agent_quick" if options.quick else "agent")
    for path in paths:
        print(f"wrote {path}")


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["moe", "preset", "agent", "rais"],
                        help="moe: MoE placements and routers in MTRL and CRL (DQN); preset: the sweep of DQN settings "
                        "on each task alone that chose train_dqn.py's study preset; agent: the PA-MoE routings "
                        "compared; rais: token vs sequence vs rais importance sampling")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 1..10 for moe and preset, consecutive "
                        "as they run batched in one process, 1..5 for moe --quick; 1 2 3 4 5 for agent and rais, "
                        "1 2 3 for agent --quick)")
    parser.add_argument("--routings", nargs="+", help="routings to compare (default: single token trajectory "
                        "phase for agent, token for rais)")
    parser.add_argument("--is-modes", nargs="+", default=["token", "sequence", "rais"],
                        help="rais study: importance-sampling modes (default: %(default)s)")
    parser.add_argument("--candidates", nargs="+", default=list(PRESET_CANDIDATES), choices=list(PRESET_CANDIDATES),
                        help="preset study: the candidate settings (default: all, in this order: %(default)s)")
    parser.add_argument("--settings", nargs="+", choices=MOE_SETTINGS, help="moe study: the settings; crl_reverse is "
                        "CRL with the tasks in reverse order (default: all three, mtrl crl with --quick)")
    parser.add_argument("--quick", action="store_true", help="the small size, under 30 minutes on 2 cores with --jobs 2: "
                        "moe: the reduced grid (QUICK_CELLS, unless --cells) at QUICK_FLAGS, without it every cell at "
                        "FULL_FLAGS; agent: AGENT_QUICK_FLAGS, without it AGENT_FLAGS; rais: no effect")
    parser.add_argument("--stress", action="store_true", help="rais study: at RAIS_STRESS_FLAGS (the routers' "
                        "learning rate 30x the experts'), into runs/compare_rais_stress and rais_stress.json")
    parser.add_argument("--cells", nargs="+", help="moe study: only these cells, named dense or PLACEMENT:ROUTER "
                        "(e.g. dense middle:soft big:task; placements middle final all big, routers topk soft task)")
    parser.add_argument("--print-commands", action="store_true", help="moe study: print one command per (setting, "
                        "cell), each running that cell alone (for a job array or any launcher), then exit")
    parser.add_argument("--seeds-per-run", type=int, help="moe study: run each cell's seeds in consecutive groups of "
                        "this many, one process (and one summary file, a part of the cell) each, joined into the cell "
                        "in the tables; so a cell longer than a sitting, or than one core, is split over several "
                        "(default: all of them in one process)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, 1 thread each (default: %(default)s)")
    parser.add_argument("--output-dir", help="where runs go (default: runs/compare_STUDY, runs/compare_STUDY_quick with --quick)")
    parser.add_argument("--results-dir", default="results",
                        help="where the plots, tables and summaries go: the moe study's in moe/ (moe_quick/ with "
                        "--quick): summaries.json, tables.md, the plots and cells/, one file per finished cell; the "
                        "preset study's in dqn_preset.json; the agent study's in agent_comparison.json (agent_quick.json "
                        "with --quick) and the rais study's in rais_comparison.json (rais_stress.json with --stress), beside their plots (default: %(default)s)")
    parser.add_argument("--table-only", action="store_true", help="only tabulate (and plot) the runs already done: "
                        "moe: the cell files under --results-dir; preset: the results file and the finished runs in "
                        "--output-dir (added to it); the others: OUTPUT_DIR/summaries.json, else the results file")
    parser.add_argument("--summaries", help="with --table-only: read the summaries from this file (default: "
                        "OUTPUT_DIR/summaries.json, else the study's results file, e.g. results/agent_comparison.json)")
    options, extra = parser.parse_known_args(argv)   # anything else is passed on to every train_dqn.py / train_agent.py run
    return checked_options(parser, options, extra)


def checked_options(parser, options, extra):
    """The parsed options checked (a bad value is parser.error) and completed with each study's defaults, and
    the flags every run gets: the study's budget, then those given on the command line (which win)."""
    if options.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {options.jobs}")
    if options.summaries and not os.path.isfile(options.summaries):
        parser.error(f"--summaries {options.summaries}: no such file")
    dqn = options.study in ("moe", "preset")
    options.seeds = options.seeds or (AGENT_QUICK_SEEDS if options.quick and options.study == "agent" else
                                      list(range(1, 6)) if options.quick or not dqn else PRESET_SEEDS)
    if dqn and options.seeds != list(range(options.seeds[0], options.seeds[0] + len(options.seeds))):
        parser.error(f"the {options.study} study runs its seeds batched in one process (--seed S --seeds N), so --seeds "
                     f"must be consecutive, got {options.seeds}")
    if options.seeds_per_run is not None and not 1 <= options.seeds_per_run <= len(options.seeds):
        parser.error(f"--seeds-per-run must be between 1 and the number of seeds ({len(options.seeds)}), got "
                     f"{options.seeds_per_run}")
    if options.seeds_per_run is not None and options.study != "moe":
        parser.error(f"--seeds-per-run is an option of the moe study, not of {options.study}")
    if options.cells:
        try:
            moe_grid(only=options.cells)
        except ValueError as error:
            parser.error(str(error))
    options.settings = options.settings or (["mtrl", "crl"] if options.quick else list(MOE_SETTINGS))
    options.routings = options.routings or (["token"] if options.study == "rais" else ["single", "token", "trajectory", "phase"])
    if options.stress and options.study != "rais":
        parser.error(f"--stress is an option of the rais study, not of {options.study}")
    suffix = "_quick" if options.quick and options.study != "rais" else "_stress" if options.stress else ""
    options.output_dir = options.output_dir or f"runs/compare_{options.study}{suffix}"
    if options.study == "rais":
        extra = (RAIS_STRESS_FLAGS if options.stress else RAIS_FLAGS) + extra           # flags given later win
    elif options.study == "agent":
        extra = (AGENT_QUICK_FLAGS if options.quick else AGENT_FLAGS) + extra
    return options, extra


def cell_commands(options, extra):
    """One command per (setting, cell) of the moe study, or per part of it with --seeds-per-run, each running that
    cell (or part) alone through this script, so that its summary lands in the cell folder like any other."""
    shared = ["--jobs", "1", "--output-dir", options.output_dir, "--results-dir", options.results_dir,
              *(["--quick"] if options.quick else []), *extra]
    return [" ".join(["python", "reproduce.py", "moe", "--settings", setting, "--cells", cell_name(placement, router),
                      "--seeds", *map(str, seeds), *shared]) for setting, placement, router, _, _, seeds in moe_runs(options)]


def main():
    options, extra = parse_options()
    if options.print_commands:
        print("\n".join(cell_commands(options, extra)))
        return
    modes = options.is_modes if options.study == "rais" else [None]
    labels = [f"{r}/{m}" if m else r for r in options.routings for m in modes]
    summary_path = os.path.join(options.output_dir, "summaries.json")
    results_file = options.results_file = {"moe": os.path.join(moe_dir(options), "summaries.json"),
                    "preset": os.path.join(options.results_dir, "dqn_preset.json"),
                    "agent": os.path.join(options.results_dir, "agent_quick.json" if options.quick else "agent_comparison.json"),
                    "rais": os.path.join(options.results_dir, "rais_stress.json" if options.stress else
                                         "rais_comparison.json")}[options.study]
    if options.table_only:
        summaries = (load_json(options.summaries) if options.summaries else
                     stored_cells(os.path.join(moe_dir(options), "cells")) if options.study == "moe" else
                     load_json(summary_path) or load_json(results_file))
        if options.study == "preset" and not options.summaries:
            finished = finished_presets(options, extra)      # the runs in --output-dir, added to the results file's
            commands = {s["command"] for s in finished}
            summaries = [s for s in load_json(results_file, []) if s.get("command") not in commands] + finished
            if finished:
                os.makedirs(options.results_dir, exist_ok=True)
                write_json(results_file, summaries)
        if not summaries:
            sys.exit(f"no finished runs in {options.summaries}" if options.summaries else
                     f"no finished runs in {summary_path} or {results_file}: run the study first")
    else:
        os.makedirs(options.output_dir, exist_ok=True)
        os.makedirs(options.results_dir, exist_ok=True)
        paths = [summary_path] + ([results_file] if results_file else [])
        study = {"moe": run_moe, "preset": run_preset}.get(options.study)
        summaries = study(options, extra, paths) if study else run_agent_study(options, extra, modes, paths)
    report(options, summaries, labels)


if __name__ == "__main__":
    main()
