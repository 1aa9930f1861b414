"""Environments: classic control for single-task, multi-task (MTRL) and continual (CRL) RL.

- CartPole-v1, MountainCar-v0, Acrobot-v1 from gymnasium 1.x. Each task has its own env, stepped by
  hand, so gymnasium's vector autoreset (which returns the reset observation one step late) never
  enters: when an episode ends we store the true final observation, then reset at once. Truncation
  (the time limit) is kept apart from termination, so the learner bootstraps through time limits.
- Observations are rescaled to [-1, 1] with fixed bounds, as Dopamine's classic-control networks do
  (x - min) / (max - min) * 2 - 1, then zero-padded to the largest observation of the task set.
- Actions: the union action space has as many actions as the largest task; `action_mask` marks each
  task's valid ones, and the learner must never pick a masked one (stepping one raises an error).
- Settings (Willi et al. 2024, arXiv 2406.18420): MTRL steps every task together; CRL trains task 1
  for a stretch, then task 2, ..., over `cycles` rounds, in the order the tasks are given.
- Household text games (the last section): a small, offline, pure-Python stand-in for ALFWorld's text
  interface (Shridhar et al. 2021, arXiv 2010.03768): six task types, ALFWorld's commands and wording,
  admissible commands, reward 10 * won, and a handcoded expert that reads the hidden state.
- ALFWorld itself (the very last section): AlfWorldEnv puts the `alfworld` package's AlfredTWEnv behind
  HouseholdEnv's interface, so the agent trains on either (optional: pip install -r requirements-optional.txt).
"""
import json
import math
import os
import random
import re

import gymnasium as gym
import numpy as np

# Dopamine's fixed observation bounds (dopamine/discrete_domains/gym_lib.py and jax/networks.py), and
# the mean return of a uniformly random policy (1000 episodes, seeds 0-999, measured with gymnasium
# 1.4), which is the zero of the normalised score. The score's one is gymnasium's reward_threshold.
TASKS = {
    "CartPole-v1": dict(low=[-2.4, -5.0, -math.pi / 12, -2 * math.pi], high=[2.4, 5.0, math.pi / 12, 2 * math.pi],
                        random_score=22.2),
    "MountainCar-v0": dict(low=[-1.2, -0.07], high=[0.6, 0.07], random_score=-200.0),
    "Acrobot-v1": dict(low=[-1.0, -1.0, -1.0, -1.0, -5.0, -5.0], high=[1.0, 1.0, 1.0, 1.0, 5.0, 5.0],
                       random_score=-499.1),
}
SETTINGS = ("single", "mtrl", "crl")


def check_env_ids(env_ids):
    for env_id in env_ids:
        if env_id not in TASKS:
            raise ValueError(f"unknown env {env_id!r}; choose from {', '.join(TASKS)}")


BOUNDS = {env_id: (np.asarray(t["low"]), np.asarray(t["high"]) - np.asarray(t["low"])) for env_id, t in TASKS.items()}


def scale_observation(env_id, obs):
    low, span = BOUNDS[env_id]
    return (2.0 * (np.asarray(obs) - low) / span - 1.0).astype(np.float32)


def normalized_score(env_id, episode_return):
    """0 = a random policy, 1 = gymnasium's reward threshold (475, -110, -100)."""
    random_score = TASKS[env_id]["random_score"]
    return (episode_return - random_score) / (gym.spec(env_id).reward_threshold - random_score)


class MultiTaskWrapper(gym.Wrapper):
    """One task of a task set: scaled, zero-padded observations (plus an optional one-hot task id) and
    a union action space whose invalid actions are masked (`action_mask`, also in every info dict)."""

    def __init__(self, env, env_id, task_index, num_tasks, obs_dim, num_actions, scale=True, task_id_in_obs=False):
        super().__init__(env)
        self.env_id, self.task_index, self.num_tasks = env_id, task_index, num_tasks
        self.pad_dim, self.scale, self.task_id_in_obs = obs_dim, scale, task_id_in_obs
        size = obs_dim + (num_tasks if task_id_in_obs else 0)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.action_space = gym.spaces.Discrete(num_actions)
        self.action_mask = np.arange(num_actions) < env.action_space.n

    def observation(self, obs):
        out = np.zeros(self.observation_space.shape, np.float32)
        out[: len(obs)] = scale_observation(self.env_id, obs) if self.scale else obs
        if self.task_id_in_obs:
            out[self.pad_dim + self.task_index] = 1.0
        return out

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self.observation(obs), {**info, "action_mask": self.action_mask, "task_id": self.task_index}

    def step(self, action):
        if not self.action_mask[action]:
            raise ValueError(f"action {action} is masked for {self.env_id}: valid actions are "
                             f"0..{self.env.action_space.n - 1}")
        obs, reward, terminated, truncated, info = self.env.step(int(action))
        return self.observation(obs), reward, terminated, truncated, {**info, "action_mask": self.action_mask,
                                                                      "task_id": self.task_index}


class TaskSet:
    """The tasks of one run, one env each, stepped one task at a time with same-step autoreset."""

    def __init__(self, env_ids, seed=0, scale=True, task_id_in_obs=False):
        check_env_ids(env_ids)
        self.env_ids, self.num_tasks, self.seed = list(env_ids), len(env_ids), seed
        self.obs_dim = max(gym.spec(e).make().observation_space.shape[0] for e in env_ids)
        self.num_actions = max(gym.spec(e).make().action_space.n for e in env_ids)
        self.scale, self.task_id_in_obs = scale, task_id_in_obs
        self.envs = [self.make(i) for i in range(self.num_tasks)]
        self.action_mask = np.stack([env.action_mask for env in self.envs])     # (tasks, actions)
        self.obs = [env.reset(seed=seed + 10_000 * i)[0] for i, env in enumerate(self.envs)]
        for i, env in enumerate(self.envs):
            env.action_space.seed(seed + 10_000 * i)
        self.episode_returns = [0.0] * self.num_tasks

    @property
    def observation_size(self):
        return self.envs[0].observation_space.shape[0]

    def make(self, task):
        env_id = self.env_ids[task]
        return MultiTaskWrapper(gym.make(env_id), env_id, task, self.num_tasks, self.obs_dim, self.num_actions,
                                self.scale, self.task_id_in_obs)

    def step(self, task, action):
        """Step one task. Returns (obs, reward, next_obs, terminated, finished_return): next_obs is the
        true next observation (the final one when the episode ended, for the replay buffer);
        finished_return is the episode's return when it ended, else None. The env is then reset, so
        self.obs[task] is always the observation to act on."""
        obs = self.obs[task]
        next_obs, reward, terminated, truncated, _ = self.envs[task].step(action)
        self.episode_returns[task] += reward
        finished = None
        if terminated or truncated:
            finished, self.episode_returns[task] = self.episode_returns[task], 0.0
            self.obs[task], _ = self.envs[task].reset()
        else:
            self.obs[task] = next_obs
        return obs, reward, next_obs, terminated, finished

    def state_dict(self):
        """All that carries over from one step to the next, for resuming a run exactly, in plain Python types:
        per task the observation to act on, the running episode return, and its env's physics state, RNG
        (each reset draws the next start state from it) and time-limit count. (The classic-control envs hold
        nothing else that changes; their action spaces are never sampled.)"""
        envs = []
        for env in self.envs:
            inner = env.unwrapped
            envs.append({"state": [float(x) for x in inner.state],
                         "state_is_array": isinstance(inner.state, np.ndarray),
                         "steps_beyond_terminated": getattr(inner, "steps_beyond_terminated", None),
                         "rng": inner.np_random.bit_generator.state,
                         "elapsed_steps": env.get_wrapper_attr("_elapsed_steps")})
        return {"envs": envs, "obs": [o.tolist() for o in self.obs],
                "episode_returns": [float(r) for r in self.episode_returns]}

    def load_state_dict(self, state):
        for env, saved in zip(self.envs, state["envs"]):
            inner = env.unwrapped
            inner.state = np.array(saved["state"]) if saved["state_is_array"] else tuple(saved["state"])
            if hasattr(inner, "steps_beyond_terminated"):
                inner.steps_beyond_terminated = saved["steps_beyond_terminated"]
            inner.np_random.bit_generator.state = saved["rng"]
            env.set_wrapper_attr("_elapsed_steps", saved["elapsed_steps"])
        self.obs = [np.array(o, np.float32) for o in state["obs"]]
        self.episode_returns = list(state["episode_returns"])

    def evaluate(self, task, policy, episodes, seed):
        """Run `episodes` episodes of one task in parallel with policy(obs (N, obs), task) -> actions (N,).
        Fresh envs seeded seed, seed+1, ...; returns the list of episode returns."""
        returns = run_episodes(lambda _: self.make(task), [[seed + j for j in range(episodes)]],
                               lambda obs: policy(obs[0], task)[None])
        return returns[0].tolist()


def run_episodes(make_env, reset_seeds, policy):
    """Episodes run side by side until every one has ended, with one policy call per step for all.

    Episode (i, j) runs in a fresh make_env(i) reset with seed reset_seeds[i][j]: i is a group (one seed
    of a seed-batched network, say) and j an episode of it. policy(obs (N, E, obs_dim)) -> actions
    (N, E); the rows of episodes that have ended hold zeros and their actions are ignored. Returns the
    episode returns, (N, E)."""
    keys = [(i, j) for i in range(len(reset_seeds)) for j in range(len(reset_seeds[i]))]
    envs = {key: make_env(key[0]) for key in keys}
    first = {key: envs[key].reset(seed=int(reset_seeds[key[0]][key[1]]))[0] for key in keys}
    obs = np.zeros((len(reset_seeds), max(j for _, j in keys) + 1, len(first[keys[0]])), np.float32)
    for key, o in first.items():
        obs[key] = o
    returns = np.zeros(obs.shape[:2])
    while keys:
        actions = policy(obs)
        running = []
        for key in keys:
            o, reward, terminated, truncated, _ = envs[key].step(int(actions[key]))
            returns[key] += reward
            obs[key] = 0.0 if terminated or truncated else o
            if not (terminated or truncated):
                running.append(key)
        keys = running
    return returns


def crl_steps_per_task(num_tasks, total_steps, cycles=1):
    return total_steps // (num_tasks * cycles)


def active_tasks(setting, step, num_tasks, total_steps, cycles=1):
    """Tasks trained at env step `step`: all of them in single/MTRL; in CRL the current one only.
    CRL visits the tasks in order, cycles times, each for total_steps // (tasks * cycles) steps."""
    if setting != "crl":
        return list(range(num_tasks))
    stretch = crl_steps_per_task(num_tasks, total_steps, cycles)
    visit = min(step // stretch, num_tasks * cycles - 1)
    return [visit % num_tasks]


# ---------------------------------------------------------------- Household text environment (ALFWorld-like)
# A room of numbered receptacles ("cabinet 1", "countertop 1", ...) holding numbered objects; closed
# containers must be opened before their contents can be seen, taken or added to. The agent reads
# ALFWorld's sentences and answers with ALFWorld's commands ("go to R", "open R", "take O from R",
# "move O to R", "heat O with microwave 1", "use desklamp 1", ...); info["admissible_commands"] lists
# the commands that do something, and any other command answers "Nothing happens.". Rooms are drawn
# from the seed with random.Random, so a seed always gives the same game, and the task type is
# seed % 6: train seeds lie below EVAL_SEED_OFFSET, held-out evaluation seeds at or above it.

HOUSEHOLD_TASK_TYPES = ("pick_and_place", "look_at_obj_in_light", "pick_clean_then_place",
                        "pick_heat_then_place", "pick_cool_then_place", "pick_two_obj_and_place")
EVAL_SEED_OFFSET = 1_000_000

OPENABLE = frozenset({"cabinet", "drawer", "fridge", "microwave", "safe"})
FOOD = ("apple", "bread", "potato", "tomato", "egg", "lettuce")
TABLEWARE = ("mug", "cup", "plate", "bowl", "pan")
SMALL_OBJECTS = ("book", "cd", "pen", "pencil", "keychain", "creditcard", "cellphone", "remotecontrol",
                 "watch", "alarmclock", "statue", "vase")
# Which object types each transform applies to, and the appliance that does it.
TRANSFORMS = {"heat": ("microwave", frozenset(FOOD + ("mug", "cup"))),
              "cool": ("fridge", frozenset(FOOD + ("mug", "cup"))),
              "clean": ("sinkbasin", frozenset(FOOD + TABLEWARE))}
TASK_TRANSFORM = {"pick_clean_then_place": "clean", "pick_heat_then_place": "heat", "pick_cool_then_place": "cool"}
LAMP_HOLDERS = ("desk", "sidetable", "dresser")
# Per room kind: the receptacle pool (a type repeated k times can appear up to k times), the receptacle
# types a goal may name, the object types a goal may name, and clutter objects that are never goals.
ROOMS = {
    "kitchen": dict(receptacles=("cabinet", "cabinet", "cabinet", "drawer", "drawer", "countertop", "countertop",
                                 "diningtable", "shelf", "garbagecan", "fridge", "microwave", "sinkbasin"),
                    targets=("countertop", "cabinet", "diningtable", "shelf", "drawer", "fridge", "microwave"),
                    objects=FOOD + TABLEWARE, clutter=("knife", "spoon", "fork", "saltshaker", "dishsponge")),
    "bedroom": dict(receptacles=("drawer", "drawer", "drawer", "shelf", "shelf", "cabinet", "sidetable", "desk",
                                 "dresser", "safe", "bed", "sofa", "armchair", "coffeetable", "garbagecan"),
                    targets=("shelf", "dresser", "sidetable", "desk", "drawer", "cabinet", "safe", "bed", "sofa",
                             "coffeetable"),
                    objects=SMALL_OBJECTS, clutter=("pillow", "laptop", "box", "candle")),
}
GOAL_TEMPLATES = {
    "pick_and_place": ("put some {obj} on {recep}.", "put a {obj} in {recep}."),
    "look_at_obj_in_light": ("look at {obj} under the {lamp}.", "examine the {obj} with the {lamp}."),
    "pick_clean_then_place": ("put a clean {obj} in {recep}.", "clean some {obj} and put it in {recep}."),
    "pick_heat_then_place": ("put a hot {obj} in {recep}.", "heat some {obj} and put it in {recep}."),
    "pick_cool_then_place": ("put a cool {obj} in {recep}.", "cool some {obj} and put it in {recep}."),
    "pick_two_obj_and_place": ("put two {obj} in {recep}.", "find two {obj} and put them in {recep}."),
}
# Room size, tuned so that a uniformly random policy over admissible commands sometimes wins within 30
# steps, which gives RL a signal (measured on 600 seeds per type: pick 9.5%, look 12.7%, clean/heat/cool
# about 1.2%, pick_two about 0.2%). Inclusive ranges: receptacle instances, clutter objects, and goal-type
# objects beyond the ones the task needs.
ROOM_SIZE = (4, 6)
CLUTTER_OBJECTS = (1, 2)
EXTRA_GOAL_OBJECTS = (1, 2)


def check_household_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"household seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def household_task_type(seed):
    """The task type a seed gives: seeds cycle through the six types."""
    return HOUSEHOLD_TASK_TYPES[check_household_seed(seed) % len(HOUSEHOLD_TASK_TYPES)]


def eval_seeds(num):
    """Held-out evaluation seeds; any 6 consecutive ones cover every task type once."""
    return [EVAL_SEED_OFFSET + i for i in range(num)]


def listing(names):
    """ALFWorld's list: 'a apple 1', 'a apple 1, and a mug 2', 'a apple 1, a mug 2, and a pan 1'."""
    items = [f"a {name}" for name in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def kind_of(name):
    """'cabinet 2' -> 'cabinet'."""
    return name.rsplit(" ", 1)[0]


class HouseholdGame:
    """One game: a random room drawn from `seed`, the task type given by the seed (or forced).

    Hidden state: where each object is (`where`, `contents`), which containers are open, what the agent
    holds and which objects were cleaned / heated / cooled. The room is fixed at construction; reset()
    restores its first state, so a game can be replayed."""

    def __init__(self, seed, max_steps=30, task_type=None):
        self.seed = check_household_seed(seed)
        if task_type is None:
            task_type = household_task_type(self.seed)
        if task_type not in HOUSEHOLD_TASK_TYPES:
            raise ValueError(f"unknown household task type {task_type!r}; "
                             f"choose from {', '.join(HOUSEHOLD_TASK_TYPES)}")
        self.task_type, self.max_steps = task_type, max_steps
        self.transform = TASK_TRANSFORM.get(task_type)
        self.build_room(random.Random(f"{self.seed}:{task_type}"))
        self.reset()

    def build_room(self, rng):
        task = self.task_type
        kind = ("kitchen" if self.transform else "bedroom" if task == "look_at_obj_in_light"
                else rng.choice(("kitchen", "bedroom")))
        room = ROOMS[kind]
        goal_objects = room["objects"]
        if self.transform:
            goal_objects = [o for o in goal_objects if o in TRANSFORMS[self.transform][1]]
        self.goal_object = rng.choice(goal_objects)
        # Required receptacle types: the goal's target (twice where the room has two of its kind, as
        # ALFWorld rooms often do), the task's appliance or, for the plain tasks, a receptacle of another
        # type so the object can start away from the target; for the light task, the lamp's holder.
        pool = list(room["receptacles"])
        self.lamp, self.goal_receptacle = None, None
        if task == "look_at_obj_in_light":
            required = [rng.choice(LAMP_HOLDERS)]
        else:
            appliance = TRANSFORMS[self.transform][0] if self.transform else None
            self.goal_receptacle = rng.choice([r for r in room["targets"] if r != appliance])
            other = appliance or rng.choice([r for r in pool if r != self.goal_receptacle])
            required = [self.goal_receptacle, other]
            if pool.count(self.goal_receptacle) >= 2:
                required.append(self.goal_receptacle)
        for r in required:
            pool.remove(r)
        size = rng.randint(*ROOM_SIZE)
        types = required + rng.sample(pool, size - len(required))
        counts, names = {}, []
        for t in types:
            counts[t] = counts.get(t, 0) + 1
            names.append(f"{t} {counts[t]}")
        self.receptacles = sorted(names)
        # Objects: goal-type objects (one or two more than the task needs) away from any target, plus
        # clutter of other types anywhere; closed containers start closed, so some objects must be searched for.
        contents = {r: [] for r in self.receptacles}
        holders = [r for r in self.receptacles if kind_of(r) in LAMP_HOLDERS]
        if holders:     # a bedroom always has a lamp when it has a desk, side table or dresser
            self.lamp, self.lamp_place = rng.choice(("desklamp", "floorlamp")) + " 1", holders[0]
            contents[self.lamp_place].append(self.lamp)
        starts = [r for r in self.receptacles if kind_of(r) != self.goal_receptacle]
        number = 2 if task == "pick_two_obj_and_place" else 1
        number += rng.randint(*EXTRA_GOAL_OBJECTS)
        placed = [(f"{self.goal_object} {i + 1}", rng.choice(starts)) for i in range(number)]
        others = [o for o in room["objects"] + room["clutter"] if o != self.goal_object]
        placed += [(f"{t} 1", rng.choice(self.receptacles)) for t in rng.sample(others, rng.randint(*CLUTTER_OBJECTS))]
        rng.shuffle(placed)
        for obj, r in placed:
            contents[r].append(obj)
        self.initial_contents = contents
        fill = dict(obj=self.goal_object, recep=self.goal_receptacle, lamp=self.lamp and kind_of(self.lamp))
        self.goal = rng.choice(GOAL_TEMPLATES[task]).format(**fill)

    # ------------------------------------------------------------ state and text
    def reset(self):
        self.contents = {r: list(objs) for r, objs in self.initial_contents.items()}
        self.where = {o: r for r, objs in self.contents.items() for o in objs}
        self.is_open = {r: False for r in self.receptacles if kind_of(r) in OPENABLE}
        self.location, self.holding = None, None        # None: the middle of the room
        self.done_to = {"heat": set(), "cool": set(), "clean": set()}
        self.steps, self.won, self.done = 0, False, False
        self.actions = self.admissible_actions()
        obs = self.room_description()
        self.last = (obs, 0.0, False, self.info(True))
        return obs, self.last[3]

    def info(self, valid_action):
        return {"goal": self.goal, "admissible_commands": sorted(self.actions), "won": self.won,
                "task_type": self.task_type, "valid_action": valid_action, "seed": self.seed}

    def room_description(self):
        return f"You are in the middle of a room. Looking quickly around you, you see {listing(self.receptacles)}."

    def view(self, receptacle):
        """What one sees at a receptacle, in ALFWorld's words."""
        things = listing(self.contents[receptacle]) if self.contents[receptacle] else "nothing"
        if receptacle not in self.is_open:
            return f"On the {receptacle}, you see {things}."
        if not self.is_open[receptacle]:
            return f"The {receptacle} is closed."
        return f"The {receptacle} is open. In it, you see {things}."

    def admissible_actions(self):
        """{command: (verb, argument)} for every command that does something in the current state."""
        here, held = self.location, self.holding
        actions = {f"go to {r}": ("go", r) for r in self.receptacles if r != here}
        actions["look"], actions["inventory"] = ("look", None), ("inventory", None)
        if here is None:
            return actions
        actions[f"examine {here}"] = ("examine", here)
        reachable = self.is_open.get(here, True)
        if here in self.is_open:
            verb = "close" if reachable else "open"
            actions[f"{verb} {here}"] = (verb, here)
        if reachable and held is None:
            for obj in self.contents[here]:
                if obj != self.lamp:
                    actions[f"take {obj} from {here}"] = ("take", obj)
        elif reachable:
            actions[f"move {held} to {here}"] = ("move", held)
        if held is not None:
            for verb, (appliance, applies_to) in TRANSFORMS.items():
                if kind_of(here) == appliance and kind_of(held) in applies_to:
                    actions[f"{verb} {held} with {here}"] = (verb, held)
        if self.lamp is not None and self.lamp_place == here:
            actions[f"use {self.lamp}"] = ("use", self.lamp)
        return actions

    def step(self, command):
        """(observation, reward, done, info). A done game is not stepped again: it answers its last
        observation, reward 0 and done."""
        if self.done:
            return self.last[0], 0.0, True, self.last[3]
        self.steps += 1
        action = self.actions.get(" ".join(str(command).lower().split()))
        if action is None:
            obs, reward = "Nothing happens.", 0.0
        else:
            obs = self.apply(*action)
            self.actions = self.admissible_actions()
            reward = 0.0
            if not self.won and action[0] in ("move", "use") and self.task_won(action[0]):
                self.won, reward = True, 10.0          # ALFWorld's score: 10 * won
        self.done = self.won or self.steps >= self.max_steps
        self.last = (obs, reward, self.done, self.info(action is not None))
        return self.last

    def apply(self, verb, arg):
        here = self.location
        if verb == "go":
            self.location = arg
            return f"You arrive at {arg}. {self.view(arg)}"
        if verb == "open":
            self.is_open[arg] = True
            return f"You open the {arg}. {self.view(arg)}"
        if verb == "close":
            self.is_open[arg] = False
            return f"You close the {arg}."
        if verb == "take":
            self.contents[here].remove(arg)
            self.where[arg], self.holding = None, arg
            return f"You pick up the {arg} from the {here}."
        if verb == "move":
            self.contents[here].append(arg)
            self.where[arg], self.holding = here, None
            return f"You move the {arg} to the {here}."
        if verb in self.done_to:
            self.done_to[verb].add(arg)
            return f"You {verb} the {arg} using the {here}."
        if verb == "use":
            return f"You turn on the {arg}."
        if verb == "examine":
            return self.view(arg)
        if verb == "inventory":
            return f"You are carrying: a {self.holding}." if self.holding else "You are not carrying anything."
        if here is None:       # look
            return self.room_description()
        return f"You are facing the {here}. Next to it, you see nothing."

    def is_goal_object(self, obj):
        """A goal-type object that has had the task's transform (if any)."""
        return kind_of(obj) == self.goal_object and (self.transform is None or obj in self.done_to[self.transform])

    def task_won(self, verb):
        if self.task_type == "look_at_obj_in_light":
            return verb == "use" and self.holding is not None and kind_of(self.holding) == self.goal_object
        need = 2 if self.task_type == "pick_two_obj_and_place" else 1
        return any(sum(map(self.is_goal_object, self.contents[r])) >= need
                   for r in self.receptacles if kind_of(r) == self.goal_receptacle)

    # ------------------------------------------------------------ handcoded expert
    def expert_command(self):
        """The next command of a planner that reads the hidden state; always admissible, and it solves
        every task type from any state (putting down what it should not hold first)."""
        if self.done:
            return "look"
        held = self.holding
        if self.task_type == "look_at_obj_in_light":
            if held is not None and kind_of(held) == self.goal_object:
                return f"use {self.lamp}" if self.location == self.lamp_place else f"go to {self.lamp_place}"
            if held is not None:
                return self.expert_put_down()
            return self.expert_fetch(min(o for o in self.where if kind_of(o) == self.goal_object))
        # The target instance: the one already holding the most goal objects, closed ones last.
        targets = [r for r in self.receptacles if kind_of(r) == self.goal_receptacle]
        target = max(targets, key=lambda r: (sum(kind_of(o) == self.goal_object for o in self.contents[r]),
                                             self.is_open.get(r, True)))
        if held is not None and kind_of(held) == self.goal_object:
            if self.transform and held not in self.done_to[self.transform]:
                appliance = next(r for r in self.receptacles if kind_of(r) == TRANSFORMS[self.transform][0])
                if self.location != appliance:
                    return f"go to {appliance}"
                return f"{self.transform} {held} with {appliance}"
            return self.expert_go_and_open(target) or f"move {held} to {target}"
        if held is not None:
            return self.expert_put_down()
        two = self.task_type == "pick_two_obj_and_place"     # then leave the one already in the target
        candidates = sorted(o for o, r in self.where.items()
                            if kind_of(o) == self.goal_object and not (two and r == target))
        return self.expert_fetch(candidates[0])

    def expert_go_and_open(self, receptacle):
        if self.location != receptacle:
            return f"go to {receptacle}"
        if not self.is_open.get(receptacle, True):
            return f"open {receptacle}"
        return None

    def expert_fetch(self, obj):
        receptacle = self.where[obj]
        return self.expert_go_and_open(receptacle) or f"take {obj} from {receptacle}"

    def expert_put_down(self):
        here = self.location or self.receptacles[0]
        return self.expert_go_and_open(here) or f"move {self.holding} to {here}"


class HouseholdEnv:
    """A batch of games with the interface AlfredTWEnv has after init_env(batch_size=B): lists in, lists
    out. A game that is done is not stepped again (last observation, reward 0.0, done True, last info)."""

    def __init__(self, max_steps=30):
        self.max_steps, self.games = max_steps, []

    def reset(self, seeds, task_types=None):
        task_types = [None] * len(seeds) if task_types is None else list(task_types)
        if len(task_types) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds but {len(task_types)} task types")
        self.games = [HouseholdGame(s, self.max_steps, t) for s, t in zip(seeds, task_types)]
        return [g.last[0] for g in self.games], [g.last[3] for g in self.games]

    def step(self, commands):
        if len(commands) != len(self.games):
            raise ValueError(f"got {len(commands)} commands for {len(self.games)} games")
        observations, rewards, dones, infos = zip(*(g.step(c) for g, c in zip(self.games, commands)))
        return list(observations), list(rewards), list(dones), list(infos)

    def expert_commands(self):
        return [g.expert_command() for g in self.games]


def render_prompt(goal, history, observation, history_length=2, admissible=None):
    """The agent's view as text, the same for every model: the task, the last `history_length` (action,
    observation it produced) pairs, the current observation, the admissible commands (as verl-agent's
    ALFWorld prompt lists them), then the cue. Pass the whole history; the current observation is
    normally the last pair's and is then not repeated."""
    recent = history[-history_length:] if history_length > 0 else []
    lines = [f"Your task is to: {goal}"]
    for action, result in recent:
        lines += [f"> {action}", result]
    if not recent or recent[-1][1] != observation:
        lines.append(observation)
    if admissible:
        lines.append("Admissible actions: " + ", ".join(admissible) + ".")
    lines.append("Your next action:")
    return "\n".join(lines)


# ---------------------------------------------------------------- ALFWorld (the alfworld package's AlfredTWEnv)

ALFWORLD_TASK_TYPES = {1: "pick_and_place_simple", 2: "look_at_obj_in_light", 3: "pick_clean_then_place_in_recep",
                       4: "pick_heat_then_place_in_recep", 5: "pick_cool_then_place_in_recep",
                       6: "pick_two_obj_and_place"}
ALFWORLD_EVAL_SPLITS = ("eval_in_distribution", "eval_out_of_distribution")
# ALFWorld's task types in the household env's names, so the trainer reports the same six columns; the
# column names of GiGPO's ALFWorld table (arXiv 2505.10978, Table 1) in the same order, then All
ALFWORLD_TO_HOUSEHOLD = dict(zip(ALFWORLD_TASK_TYPES.values(), HOUSEHOLD_TASK_TYPES))
GIGPO_COLUMNS = ("Pick", "Look", "Clean", "Heat", "Cool", "Pick2")
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


def gigpo_table(success_per_task, success):
    """Success per ALFWorld task type in GiGPO's columns (Pick, Look, Clean, Heat, Cool, Pick2) and All."""
    return {**{c: success_per_task.get(t) for c, t in zip(GIGPO_COLUMNS, HOUSEHOLD_TASK_TYPES)}, "All": success}


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
