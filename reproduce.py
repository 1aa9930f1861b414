"""Reproduce the README's comparison tables: run a grid of seeds and routings, then tabulate the summaries.

    python reproduce.py agent --seeds 1 2 3 --jobs 2        # single vs token vs trajectory vs phase
    python reproduce.py agent --table-only                 # re-print the table from finished runs
    python reproduce.py rais --seeds 1 2 3 --jobs 2         # token vs sequence vs rais importance sampling

Every run is an ordinary `train_agent.py` run in its own process (1 thread each, --jobs at a time), so
any row can be re-run alone with the command printed for it. Summaries (the last JSON line of each
run) are collected in OUTPUT_DIR/summaries.json and printed as a markdown table: mean over seeds, with
the spread (min..max) for the overall success, then the held-out success curve.

The rais study runs token and phase routing with each --is-mode at RAIS_FLAGS (more update epochs per
batch than the default, where the router moves most between rollout and update) and tabulates the
importance weights, gradient norms, clipping and router shift logged by every update.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from envs import HOUSEHOLD_TASK_TYPES

SHORT = {"pick_and_place": "pick", "look_at_obj_in_light": "look", "pick_clean_then_place": "clean",
         "pick_heat_then_place": "heat", "pick_cool_then_place": "cool", "pick_two_obj_and_place": "pick2"}


# the rais study's budget: 4 update epochs per batch; 20 iterations with held-out evaluations every 5
RAIS_FLAGS = ["--update-epochs", "4", "--iterations", "20", "--eval-every", "5", "--eval-episodes", "60",
              "--conflict-every", "0"]


def agent_command(routing, seed, output_dir, extra, name=None):
    return [sys.executable, "train_agent.py", "--routing", routing, "--seed", str(seed), "--threads", "1",
            "--no-progress", "--output-dir", output_dir, "--run-name", name or f"{routing}_s{seed}", *extra]


def run(command, log_path):
    with open(log_path, "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    lines = [line for line in open(log_path) if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"status": "failed", "log": log_path}


def agent_table(summaries, routings):
    header = ["routing", "success (min..max)", "untrained"] + [SHORT[t] for t in HOUSEHOLD_TASK_TYPES] + \
             ["switches/ep", "step switches/ep", "max expert use", "occupancy pick/look", "grad conflict", "minutes"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for routing in routings:
        runs = [s for s in summaries if s.get("routing") == routing and s.get("status") == "finished"]
        if not runs:
            continue
        mean = lambda f: float(np.mean([f(s) for s in runs]))
        success = [s["success"] for s in runs]
        per_task = [f"{mean(lambda s: s['success_per_task'][t]):.2f}" for t in HOUSEHOLD_TASK_TYPES]
        # the largest share of decisions any one expert got, averaged over task types and seeds
        max_use = mean(lambda s: np.mean([max(u) for u in s["utilisation"].values()]))
        conflict = [s["gradient_conflict"] for s in runs if s["gradient_conflict"] is not None]
        rows.append("| " + " | ".join([
            f"{routing} ({len(runs)} seeds)", f"{np.mean(success):.2f} ({min(success):.2f}..{max(success):.2f})",
            f"{mean(lambda s: s['untrained_success']):.2f}", *per_task,
            f"{mean(lambda s: s['switches_per_episode']):.1f}", f"{mean(lambda s: s['step_switches_per_episode']):.1f}",
            f"{max_use:.2f}", f"{mean(lambda s: s['occupancy']['pick_and_place']):.2f}/"
            f"{mean(lambda s: s['occupancy']['look_at_obj_in_light']):.2f}",
            f"{np.mean(conflict):.3f}" if conflict else "-", f"{mean(lambda s: s['wall_seconds']) / 60:.1f}"]) + " |")
    return "\n".join(rows)


def read_log(summary):
    return [json.loads(line) for line in open(os.path.join(summary["run_dir"], "log.jsonl"))]


def rais_table(summaries, labels):
    """Per routing and importance-sampling mode, over the updates of all seeds: the importance weights'
    variance (mean and largest of the per-minibatch variances), the gradient norm's variance over all
    minibatches (across updates plus within them), the clipped fraction, the router shift and gamma;
    then the held-out success at the end and at its best (a drop from best to end is a collapse)."""
    header = ["routing / IS mode", "final success (min..max)", "best success", "IS weight var (max)", "grad-norm var",
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
            f"{label} ({len(runs)} seeds)", f"{np.mean(final):.3f} ({min(final):.3f}..{max(final):.3f})",
            f"{np.mean(best):.3f}", f"{values('is_weight_var').mean():.4f} ({values('is_weight_var').max():.3f})",
            f"{values('grad_norm').var() + values('grad_norm_var').mean():.3f}",
            f"{values('clip_fraction').mean():.3f}",
            f"{values('router_shift').mean():.4f}" if routed else "-",
            f"{values('gamma_mean').mean():.3f} ({values('gamma_min').min():.3f})" if routed else "-",
            f"{np.mean([s['wall_seconds'] for s in runs]) / 60:.1f}"]) + " |")
    return "\n".join(rows)


def curve_table(summaries, routings):
    """Held-out success at each evaluation, mean over seeds (and min..max), read from the runs' logs."""
    curves = {}
    for s in summaries:
        if s.get("status") != "finished":
            continue
        for record in read_log(s):
            if "eval" in record:
                curves.setdefault(s.get("label", s["routing"]), {}).setdefault(record["iteration"], []).append(
                    (record["eval"]["success"], record["env_steps"], record["wall_seconds"]))
    iterations = sorted({i for c in curves.values() for i in c})
    rows = ["| routing | " + " | ".join(f"iteration {i}" for i in iterations) + " |", "|" + "---|" * (len(iterations) + 1)]
    for routing in routings:
        if routing not in curves:
            continue
        cells = []
        for i in iterations:
            values = [v[0] for v in curves[routing].get(i, [])]
            cells.append(f"{np.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})" if values else "-")
        rows.append(f"| {routing} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["agent", "rais"],
                        help="agent: the routings compared; rais: token vs sequence vs rais importance sampling")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default: %(default)s)")
    parser.add_argument("--routings", nargs="+", help="routings to compare (default: single token trajectory "
                        "phase for agent, token phase for rais)")
    parser.add_argument("--is-modes", nargs="+", default=["token", "sequence", "rais"],
                        help="rais study: importance-sampling modes (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, 1 thread each (default: %(default)s)")
    parser.add_argument("--output-dir", help="where runs go (default: runs/compare_STUDY)")
    parser.add_argument("--table-only", action="store_true", help="only tabulate the runs already in --output-dir")
    options, extra = parser.parse_known_args()   # anything else is passed on to every train_agent.py run
    rais = options.study == "rais"
    options.routings = options.routings or (["token", "phase"] if rais else ["single", "token", "trajectory", "phase"])
    options.output_dir = options.output_dir or f"runs/compare_{options.study}"
    modes = options.is_modes if rais else [None]
    if rais:
        extra = RAIS_FLAGS + extra           # flags given later win
    labels = [f"{r}/{m}" if m else r for r in options.routings for m in modes]
    os.makedirs(options.output_dir, exist_ok=True)
    summary_path = os.path.join(options.output_dir, "summaries.json")
    if options.table_only:
        summaries = json.load(open(summary_path))
    else:
        grid = [(r, m, s) for s in options.seeds for r in options.routings for m in modes]
        names = [f"{r}_{m}_s{s}" if m else f"{r}_s{s}" for r, m, s in grid]
        commands = [agent_command(r, s, options.output_dir, extra + (["--is-mode", m] if m else []), name)
                    for (r, m, s), name in zip(grid, names)]
        for command in commands:
            print(" ".join(command[1:]))
        logs = [os.path.join(options.output_dir, f"{name}.out") for name in names]
        with ThreadPoolExecutor(options.jobs) as pool:
            results = list(pool.map(run, commands, logs))
        summaries = [{**result, "routing": r, "label": f"{r}/{m}" if m else r, "seed": s, "command": " ".join(c[1:])}
                     for (r, m, s), result, c in zip(grid, results, commands)]
        json.dump(summaries, open(summary_path, "w"), indent=1)
    print(rais_table(summaries, labels) if rais else agent_table(summaries, options.routings))
    print()
    print(curve_table(summaries, labels))


if __name__ == "__main__":
    main()
