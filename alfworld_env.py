"""ALFWorld itself: the `alfworld` package's AlfredTWEnv behind household.HouseholdEnv's interface.

AlfWorldEnv plays ALFWorld's text games (Shridhar et al. 2021, arXiv 2010.03768) with the lists in and
out of HouseholdEnv, so the agent trains on either (optional: pip install -r requirements-optional.txt).
Also here: the config AlfredTWEnv reads, the data folder's layout, and ALFWorld's words (for the tiny
LM's tokenizer).
"""
import json
import os
import re

from household import EVAL_SEED_OFFSET, HOUSEHOLD_TASK_TYPES

ALFWORLD_TASK_TYPES = {1: "pick_and_place_simple", 2: "look_at_obj_in_light", 3: "pick_clean_then_place_in_recep",
                       4: "pick_heat_then_place_in_recep", 5: "pick_cool_then_place_in_recep",
                       6: "pick_two_obj_and_place"}
ALFWORLD_EVAL_SPLITS = ("eval_in_distribution", "eval_out_of_distribution")
# ALFWorld's task types in the household env's names, so the trainer reports the same six columns
ALFWORLD_TO_HOUSEHOLD = dict(zip(ALFWORLD_TASK_TYPES.values(), HOUSEHOLD_TASK_TYPES))
ALFWORLD_MISSING = ("--env alfworld needs the alfworld package: pip install -r requirements-optional.txt "
                    "(it compiles jericho and fast-downward-textworld: gcc and cmake, a few minutes)")


# The words of ALFWorld's text: its grammar (alfred.twl2: feedback and commands), its task sentences
# (alfworld.gen.goal_library) and ALFRED's object and receptacle names (alfworld.gen.constants), as the alfworld
# 0.4.2 wheel ships them (test_all checks this list against the wheel), and the numbers of instances. The tiny
# LM's tokenizer for --env alfworld adds them to the words of its household corpus, so that none is <unk>.
ALFWORLD_WORDS = tuple("""
a about alfred all an and any anything are around arrive at available carrying check clean close closed cold
commands cool current don examine facing find from go heat help hot in into inventory is it location look
looking middle move next normal not nothing object of off on open or pick place put quickly receptacle room s
see sharp slice sliced some something special switch t take task textworld the them then there this three to up
turn two under use using welcome with you your
alarmclock apple armchair baseballbat basketball bathtub bathtubbasin bed blinds book boots bowl box bread
butterknife cabinet candle cart cd cellphone chair cloth coffeemachine coffeetable countertop creditcard cup
curtains desk desklamp diningtable dishsponge drawer dresser egg floorlamp footstool fork fridge garbagecan
glassbottle handtowel handtowelholder houseplant kettle keychain knife ladle laptop laundryhamper
laundryhamperlid lettuce lightswitch microwave mirror mug newspaper ottoman painting paintinghanger pan
papertowel papertowelroll pen pencil peppershaker pillow plate plunger poster pot potato remotecontrol safe
saltshaker scrubbrush shelf showerdoor showerglass sidetable sink sinkbasin soapbar soapbottle sofa spatula
spoon spraybottle statue stoveburner stoveknob teddybear television tennisracket tissuebox toaster toilet
toiletpaper toiletpaperhanger toiletpaperroll tomato towel towelholder tvstand vase watch wateringcan window
winebottle""".split()) + tuple(str(i) for i in range(100))


def alfworld_data_root(path=""):
    """The folder that holds json_2.1.1 (alfworld-download's layout): `path` (default $ALFWORLD_DATA) itself,
    or its parent when `path` is the json_2.1.1 folder. Raises FileNotFoundError saying what it expected."""
    path = os.path.expanduser(path or os.environ.get("ALFWORLD_DATA", ""))
    if path and os.path.isdir(os.path.join(path, "json_2.1.1")):
        return path
    if path and os.path.basename(os.path.normpath(path)) == "json_2.1.1" and os.path.isdir(path):
        return os.path.dirname(os.path.normpath(path))
    raise FileNotFoundError(
        f"no ALFWorld data at {path or '$ALFWORLD_DATA (unset)'!r}: expected a folder holding json_2.1.1/ (with "
        "train/, valid_seen/, valid_unseen/ of game folders), or that json_2.1.1 folder itself. Fetch the games "
        "with `alfworld-download` (into ~/.cache/alfworld; then export ALFWORLD_DATA=~/.cache/alfworld), or "
        "generate games offline with `python alfworld_games.py --out DIR`, and pass --alfworld-data DIR")


def alfworld_task_type_ids(text):
    """'1,3' -> [1, 3]; empty -> all six. A bad id raises ValueError naming it and the valid ones."""
    ids = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not part.isdigit() or int(part) not in ALFWORLD_TASK_TYPES:
            raise ValueError(f"unknown ALFWorld task type {part!r}; valid: " +
                             ", ".join(f"{i} ({n})" for i, n in ALFWORLD_TASK_TYPES.items()))
        ids.append(int(part))
    return ids or list(ALFWORLD_TASK_TYPES)


def alfworld_config(data_path, task_type_ids, max_steps=50):
    """The config dict AlfredTWEnv reads, built here rather than with alfworld's load_config (which parses
    sys.argv). The splits are alfworld-download's layout under data_path."""
    split = lambda name: os.path.join(data_path, "json_2.1.1", name)
    return {"dataset": {"data_path": split("train"), "eval_id_data_path": split("valid_seen"),
                        "eval_ood_data_path": split("valid_unseen"), "num_train_games": -1, "num_eval_games": -1},
            "env": {"type": "AlfredTWEnv", "domain_randomization": False, "task_types": list(task_type_ids),
                    "expert_type": "handcoded", "goal_desc_human_anns_prob": 0.0},
            "logic": {"domain": os.path.join(data_path, "logic", "alfred.pddl"),
                      "grammar": os.path.join(data_path, "logic", "alfred.twl2")},
            "general": {"training_method": "dqn"},
            "rl": {"training": {"max_nb_steps_per_episode": max_steps}}}


class AlfWorldEnv:
    """ALFWorld's text games (AlfredTWEnv) with HouseholdEnv's interface; data_path is the folder that holds
    json_2.1.1 or that folder itself (alfworld_data_root). reset(seeds) plays game
    (seed mod 1,000,000) mod (number of games) of the split, in path order (so a GRPO group of equal seeds
    plays one game G times, and the evaluation seeds play the split's first games);
    step(commands) -> observations, rewards, dones, infos (lists). Reward 10 on the winning step (verl-agent
    and GiGPO: 10 * won), done at a win or after max_steps. Infos carry HouseholdEnv's keys: goal,
    admissible_commands, won, task_type (the household name of the ALFWorld type), valid_action (the
    command was admissible), seed, and the gamefile. "help" is dropped from the admissible commands, as
    verl-agent does. Observations lose the welcome banner, and the goal line goes to info["goal"]."""

    def __init__(self, data_path="", split="train", task_type_ids=None, max_steps=50):
        try:
            from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv
        except ImportError as error:
            raise ImportError(ALFWORLD_MISSING) from error
        data_path = alfworld_data_root(data_path)
        config = alfworld_config(data_path, task_type_ids or list(ALFWORLD_TASK_TYPES), max_steps)
        self.alfred = AlfredTWEnv(config, train_eval=split)
        self.game_files = sorted(self.alfred.game_files)
        if not self.game_files:
            raise FileNotFoundError(f"no solvable {split} games of task types {task_type_ids} under {data_path}")
        self.max_steps, self.batch_envs, self.env = max_steps, {}, None

    def task_type(self, gamefile):
        with open(os.path.join(os.path.dirname(gamefile), "traj_data.json")) as f:
            return ALFWORLD_TO_HOUSEHOLD[json.load(f)["task_type"]]

    def reset(self, seeds, task_types=None):
        if task_types is not None:
            raise ValueError("AlfWorldEnv picks games by seed; filter task types with its task_type_ids")
        files = [self.game_files[s % EVAL_SEED_OFFSET % len(self.game_files)] for s in seeds]   # eval seeds: games 0, 1, ...
        if len(seeds) not in self.batch_envs:              # textworld runs each game of a batch in a process
            self.alfred.game_files = files
            self.batch_envs[len(seeds)] = self.alfred.init_env(batch_size=len(seeds))
        self.env = self.batch_envs[len(seeds)]
        self.env.batch_env.load(files)                     # these games, in this order (not textworld's cycle)
        observations, infos = self.env.batch_env.reset()
        self.seeds, self.steps, self.won = list(seeds), 0, [False] * len(seeds)
        self.goals = [re.search(r"Your task is to: (.*)", o).group(1).strip() for o in observations]
        self.types = [self.task_type(f) for f in files]
        self.infos = [self._info(infos, i, True) for i in range(len(seeds))]
        return [self._observation(o) for o in observations], self.infos

    def step(self, commands):
        if len(commands) != len(self.seeds):
            raise ValueError(f"got {len(commands)} commands for {len(self.seeds)} games")
        valid = [c in info["admissible_commands"] for c, info in zip(commands, self.infos)]
        observations, _, dones, infos = self.env.batch_env.step(list(commands))
        self.steps += 1
        rewards, infos_out = [], []
        for i in range(len(commands)):
            info = self._info(infos, i, valid[i])
            rewards.append(10.0 if info["won"] and not self.won[i] else 0.0)
            self.won[i] = info["won"]
            infos_out.append(info)
        self.infos = infos_out
        dones = [bool(d) or w or self.steps >= self.max_steps for d, w in zip(dones, self.won)]
        return [self._observation(o) for o in observations], rewards, dones, infos_out

    def _info(self, infos, i, valid):
        return {"goal": self.goals[i], "admissible_commands": [c for c in infos["admissible_commands"][i] if c != "help"],
                "won": bool(infos["won"][i]), "task_type": self.types[i], "valid_action": valid,
                "seed": self.seeds[i], "gamefile": infos["extra.gamefile"][i]}

    @staticmethod
    def _observation(text):
        text = text.replace("-= Welcome to TextWorld, ALFRED! =-", "")
        return re.sub(r"\s*Your task is to: .*", "", text).strip()

    def close(self):
        for env in self.batch_envs.values():
            env.close()
        self.batch_envs = {}
