"""ALFWorld games generated offline: random rooms and tasks, written as ALFWorld game folders.

ALFWorld (Shridhar et al. 2021, arXiv 2010.03768) plays ALFRED's scenes as text games; `alfworld-download`
fetches 3,553 of them from the internet. This file writes games of the same form offline from what the
`alfworld` wheel ships: the PDDL domain (alfred.pddl) and text grammar (alfred.twl2), ALFRED's object and
receptacle classes with which receptacle holds which object and which object can be heated, cooled, cleaned
or switched on (alfworld.gen.constants), and each task type's goal formula and task sentences
(alfworld.gen.goal_library). A game folder holds what alfworld-download's do: traj_data.json (the task type
and pddl_params, which the handcoded expert reads), initial_state.pddl (the problem) and game.tw-pddl (domain,
grammar with the task sentence, problem, solvable, and the expert's walkthrough), so AlfredTWEnv
(alfworld_env.AlfWorldEnv, train_agent.py --env alfworld) plays them as it plays the real ones.

The rooms are generated, not ALFRED's scenes. A scene is a room type (kitchen, living room, bedroom,
bathroom, numbered as ALFRED numbers its floor plans: 1-30, 201-230, 301-330, 401-430) with receptacles drawn
from the seed; a game puts the task's objects and some other objects in the receptacles that can hold them.
The six task types take turns, each in a room type ALFRED poses it in (alfworld.gen.constants.GOALS_VALID;
heat and cool need a kitchen, a look task a lamp). train and valid_seen use scenes 1-25 of each type
(different games), valid_unseen scenes 26-30, as ALFRED's splits do. Every game is played by the alfworld
package's handcoded expert before it is kept, and kept only if the expert wins it within ALFWorld's 50 steps.

    python alfworld_games.py --out data/alfworld --train 60 --eval 12 --seed 0
    python train_agent.py --env alfworld --alfworld-data data/alfworld
"""
import argparse
import json
import os
import random
import shutil

import numpy as np

TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
# room type -> (first scene number, receptacle type -> (fewest, most) of it)
ROOMS = {
    "Kitchen": (1, {"Cabinet": (2, 6), "CounterTop": (1, 2), "Drawer": (1, 3), "Fridge": (1, 1), "Microwave": (1, 1),
                    "SinkBasin": (1, 1), "StoveBurner": (2, 4), "CoffeeMachine": (1, 1), "Toaster": (0, 1),
                    "GarbageCan": (1, 1), "DiningTable": (0, 1), "Shelf": (0, 2)}),
    "LivingRoom": (201, {"Sofa": (1, 1), "ArmChair": (0, 2), "CoffeeTable": (1, 1), "SideTable": (1, 2),
                         "TVStand": (0, 1), "Drawer": (1, 3), "Cabinet": (0, 2), "Shelf": (0, 3), "GarbageCan": (1, 1),
                         "Dresser": (0, 1)}),
    "Bedroom": (301, {"Bed": (1, 1), "Desk": (0, 1), "SideTable": (1, 2), "Drawer": (2, 4), "Dresser": (0, 1),
                      "Shelf": (0, 3), "GarbageCan": (1, 1), "LaundryHamper": (0, 1), "ArmChair": (0, 1),
                      "Safe": (0, 1)}),
    "Bathroom": (401, {"Toilet": (1, 1), "SinkBasin": (1, 2), "BathtubBasin": (0, 1), "Cabinet": (1, 3),
                       "CounterTop": (1, 1), "Drawer": (0, 2), "GarbageCan": (1, 1), "HandTowelHolder": (0, 1),
                       "TowelHolder": (1, 1), "ToiletPaperHanger": (1, 1), "Shelf": (0, 2)}),
}
SEEN_SCENES, UNSEEN_SCENES = range(1, 26), range(26, 31)          # of each room type's 30
SPLITS = {"train": SEEN_SCENES, "valid_seen": SEEN_SCENES, "valid_unseen": UNSEEN_SCENES}
APPLIANCE = {"pick_clean_then_place_in_recep": "SinkBasin", "pick_heat_then_place_in_recep": "Microwave",
             "pick_cool_then_place_in_recep": "Fridge"}                 # where the task's object is changed
ABILITY = {"pick_clean_then_place_in_recep": "Cleanable", "pick_heat_then_place_in_recep": "Heatable",
           "pick_cool_then_place_in_recep": "Coolable"}
LAMPS = {"DeskLamp": ("Desk", "SideTable", "Dresser"), "FloorLamp": ("SideTable", "Dresser", "ArmChair", "Sofa")}
# the types the domain's actions name (CleanObject needs SinkBasinType ...): declared in every problem
DOMAIN_RTYPES, DOMAIN_OTYPES = ("SinkBasin", "Microwave", "Fridge"), ("Knife", "ButterKnife")


def alfworld_modules():
    try:
        import alfworld
        import alfworld.gen.constants as constants
        import alfworld.gen.goal_library as goals
    except ImportError as error:
        raise ImportError("alfworld_games.py needs the alfworld package: pip install -r requirements-optional.txt") \
            from error
    return os.path.join(os.path.dirname(alfworld.__file__), "data"), constants, goals


def mangle(kind, rng):
    """An ALFRED object id in ALFWorld's mangled form, Apple|+01.23|+00.90|-00.40 -> Apple_bar__plus_01_dot_23...,
    which AlfredDemangler turns into "apple 1". A basin is named after its sink (Sink|...|SinkBasin), which
    the demangler turns into "sinkbasin 1"."""
    coordinate = lambda v: ("_plus_" if v >= 0 else "_minus_") + f"{abs(v):05.2f}".replace(".", "_dot_")
    mangled = "".join("_bar_" + coordinate(v) for v in rng.uniform(-4, 4, 3).round(2))
    return kind[:-len("Basin")] + mangled + "_bar_" + kind if kind.endswith("Basin") else kind + mangled


def scene_receptacles(room, scene, seed):
    """The receptacle types of a scene, one entry per instance: fixed by (seed, room type, scene number)."""
    rng = np.random.default_rng([seed, ROOMS[room][0], scene])
    return [kind for kind, (low, high) in ROOMS[room][1].items() for _ in range(rng.integers(low, high + 1))]


def sample_task(task_type, receptacles, constants, rng):
    """(object class, parent receptacle class or "", lamp class or "") for a task in this room, or None."""
    holds = constants.VAL_RECEPTACLE_OBJECTS
    kinds = set(receptacles)
    movable = set(constants.MOVABLE_RECEPTACLES)
    portable = sorted({o for r in kinds for o in holds.get(r, ()) if "Sliced" not in o})
    if task_type in APPLIANCE:
        if APPLIANCE[task_type] not in kinds:
            return None
        portable = [o for o in portable if o in constants.VAL_ACTION_OBJECTS[ABILITY[task_type]]]
    if task_type == "look_at_obj_in_light":
        lamps = [lamp for lamp, places in LAMPS.items() if kinds & set(places)]
        choices = [(o, "", lamp) for o in portable for lamp in lamps]
    else:
        parents = sorted(kinds - movable - {APPLIANCE.get(task_type)})
        # a parent that can hold the object, and another receptacle where it starts
        choices = [(o, r, "") for o in portable for r in parents if o in holds.get(r, ())
                   and any(o in holds.get(s, ()) for s in kinds - {r})]
    return choices[rng.integers(len(choices))] if choices else None


def place(kind, receptacles, constants, rng, avoid=""):
    """Index of a receptacle (not of type `avoid`) that can hold an object of class `kind`."""
    holds = constants.VAL_RECEPTACLE_OBJECTS
    fits = [i for i, r in enumerate(receptacles) if r != avoid and kind in holds.get(r, ())]
    return int(rng.choice(fits))


def write_problem(task_type, receptacles, target, parent, lamp, constants, goals, rng):
    """The PDDL problem of one game: the receptacles, the task's objects and 4-9 others, and the goal."""
    ids = [mangle(r, rng) for r in receptacles]
    locations = [f"loc_bar_{i}_bar_{int(rng.integers(-9, 10))}_bar_{int(rng.integers(4))}_bar_30"
                 for i in range(len(receptacles) + 1)]                    # the last one is where the agent starts
    objects = [(target, place(target, receptacles, constants, rng, avoid=parent))
               for _ in range(2 if task_type == "pick_two_obj_and_place" else 1)]
    if lamp:
        places = [i for i, r in enumerate(receptacles) if r in LAMPS[lamp]]
        objects.append((lamp, int(rng.choice(places))))
    others = sorted({o for r in receptacles for o in constants.VAL_RECEPTACLE_OBJECTS.get(r, ())
                     if "Sliced" not in o and o not in (target, lamp)})
    for kind in rng.choice(others, min(len(others), int(rng.integers(4, 10))), replace=False):
        objects.append((str(kind), place(str(kind), receptacles, constants, rng)))
    object_ids = [mangle(kind, rng) for kind, _ in objects]
    abilities = {"Cleanable": "cleanable", "Heatable": "heatable", "Coolable": "coolable", "Sliceable": "sliceable",
                 "Toggleable": "toggleable"}
    otypes = sorted({k for k, _ in objects} | set(DOMAIN_OTYPES))
    rtypes = sorted(set(receptacles) | set(DOMAIN_RTYPES) | ({parent} if parent else set()))
    init = [f"(atLocation agent1 {locations[-1]})"]
    for rid, kind, location in zip(ids, receptacles, locations):
        init += [f"(receptacleType {rid} {kind}Type)", f"(receptacleAtLocation {rid} {location})"]
        init += [f"(openable {rid})"] if kind in constants.OPENABLE_CLASS_LIST else []
    for oid, (kind, where) in zip(object_ids, objects):
        init += [f"(objectType {oid} {kind}Type)", f"(objectAtLocation {oid} {locations[where]})",
                 f"(inReceptacle {oid} {ids[where]})"]
        init += [] if kind in LAMPS else [f"(pickupable {oid})"]
        init += [f"({name} {oid})" for ability, name in abilities.items()
                 if kind in constants.VAL_ACTION_OBJECTS[ability]]
    init += [f"(canContain {r}Type {o}Type)" for r in sorted(set(receptacles)) for o in otypes
             if o in constants.VAL_RECEPTACLE_OBJECTS.get(r, ())]
    goal = goals.gdict[task_type]["pddl"].format(obj=target, recep=parent, toggle=lamp, mrecep="").replace("#", "-")
    declared = (["agent1 - agent"] + [f"{t}Type - otype" for t in otypes] + [f"{t}Type - rtype" for t in rtypes]
                + [f"{o} - object" for o in object_ids] + [f"{r} - receptacle" for r in ids]
                + [f"{l} - location" for l in locations])
    lines = lambda items: "\n        ".join(items)
    return (f"(define (problem plan_generated)\n    (:domain alfred)\n    (:objects\n        {lines(declared)}\n    )\n"
            f"    (:init\n        {lines(init)}\n    )\n{goal}")


def expert_walkthrough(game_file, max_steps=50, seed=0):
    """The commands the alfworld package's handcoded expert plays in a game, if it wins within max_steps
    (ALFWorld's episode limit); None if it does not (alfworld-generate checks that games are solvable so)."""
    import textworld
    from textworld.envs import PddlEnv
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
    random.seed(seed)                        # the expert breaks ties with the random module
    env = AlfredExpert(AlfredInfos(AlfredDemangler(PddlEnv(textworld.EnvInfos(
        admissible_commands=True, won=True, extras=["gamefile"])), shuffle=False)), expert_type="handcoded")
    try:
        env.load(game_file)
        state, commands = env.reset(), []
        while not state["won"] and len(commands) < max_steps:
            commands.append(state["extra.expert_plan"][0])
            state, _, _ = env.step(commands[-1])
    except Exception:                        # the expert gives up (HandCodedAgentFailed, a timeout)
        return None
    finally:
        env.close()
    return commands if state["won"] else None


def write_game(folder, task_type, room, scene, seed, logic):
    """Write one game into `folder` (a new trial folder of its task). Returns the expert's walkthrough, or None
    (and nothing stays written) if the expert cannot win it."""
    data, constants, goals = logic
    rng = np.random.default_rng(seed)
    receptacles = scene_receptacles(room, scene, seed)
    task = sample_task(task_type, receptacles, constants, rng)
    if task is None:
        return None
    target, parent, lamp = task
    problem = write_problem(task_type, receptacles, target, parent, lamp, constants, goals, rng)
    template = goals.gdict[task_type]["templates"][rng.integers(len(goals.gdict[task_type]["templates"]))]
    sentence = template.format(obj=target.lower(), recep=parent.lower(), toggle=lamp.lower(), mrecep="")
    name = f"{task_type}-{target}-None-{parent or lamp}-{ROOMS[room][0] + scene - 1}"
    game = os.path.join(folder, name, f"trial_G{seed:08d}")
    os.makedirs(game)
    params = {"object_target": target, "parent_target": parent, "toggle_target": lamp, "mrecep_target": "",
              "object_sliced": False}
    traj = {"task_type": task_type, "pddl_params": params, "task_id": f"generated_{seed}",
            "scene": {"floor_plan": f"FloorPlan{ROOMS[room][0] + scene - 1}", "scene_num": ROOMS[room][0] + scene - 1,
                      "room_type": room, "random_seed": seed},
            "generated_by": "alfworld_games.py: a generated room, not an ALFRED scene"}
    json.dump(traj, open(os.path.join(game, "traj_data.json"), "w"), indent=1)
    open(os.path.join(game, "initial_state.pddl"), "w").write(problem)
    domain, grammar = (open(os.path.join(data, f)).read() for f in ("alfred.pddl", "alfred.twl2"))
    game_file = os.path.join(game, "game.tw-pddl")
    content = {"pddl_domain": domain, "grammar": grammar.replace("UNKNOWN GOAL", sentence), "pddl_problem": problem,
               "solvable": True}
    json.dump(content, open(game_file, "w"))
    walkthrough = expert_walkthrough(game_file)
    if walkthrough is None:
        shutil.rmtree(game)
        if not os.listdir(os.path.dirname(game)):
            os.rmdir(os.path.dirname(game))
        return None
    json.dump({**content, "walkthrough": walkthrough}, open(game_file, "w"))
    return walkthrough


def generate(out, train=60, evaluation=12, seed=0, progress=True):
    """Write the splits train (`train` games), valid_seen and valid_unseen (`evaluation` games each) under
    out/json_2.1.1 in alfworld-download's layout, with the domain and grammar in out/logic. The task types
    take turns; a game the expert cannot win is drawn again with the next seed. Returns {split: games}."""
    logic = alfworld_modules()
    counts = {"train": train, "valid_seen": evaluation, "valid_unseen": evaluation}
    os.makedirs(os.path.join(out, "logic"), exist_ok=True)
    for name in ("alfred.pddl", "alfred.twl2"):
        shutil.copy(os.path.join(logic[0], name), os.path.join(out, "logic", name))
    written = {}
    for s, (split, count) in enumerate(counts.items()):
        folder = os.path.join(out, "json_2.1.1", split)
        if os.path.exists(folder):
            raise FileExistsError(f"{folder} exists; pass a new --out")
        os.makedirs(folder)
        rng = np.random.default_rng([seed, s])
        written[split], attempt = 0, 0
        while written[split] < count:
            task_type = TASK_TYPES[written[split] % len(TASK_TYPES)]
            room = str(rng.choice(sorted(logic[1].GOALS_VALID[task_type])))
            scene = int(rng.choice(SPLITS[split]))
            game_seed = (seed * 1000 + s) * 1_000_000 + attempt
            attempt += 1
            if write_game(folder, task_type, room, scene, game_seed, logic) is not None:
                written[split] += 1
                if progress:
                    print(f"{split}: {written[split]}/{count} games", end="\r" if written[split] < count else "\n")
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (it gets json_2.1.1/ and logic/, as "
                        "alfworld-download's ~/.cache/alfworld; pass it to train_agent.py --alfworld-data)")
    parser.add_argument("--train", type=int, default=60, help="games in the train split (default: %(default)s)")
    parser.add_argument("--eval", type=int, default=12, help="games in each evaluation split, valid_seen (seen "
                        "scenes) and valid_unseen (scenes train never uses) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and games (default: %(default)s)")
    options = parser.parse_args()
    print(json.dumps(generate(options.out, options.train, options.eval, options.seed)))
