"""The household text game: a small, offline, pure-Python stand-in for ALFWorld's text interface.

ALFWorld (Shridhar et al. 2021, arXiv 2010.03768) in miniature: six task types, ALFWorld's commands and
wording, admissible commands, reward 10 * won, and a handcoded expert that reads the hidden state.

A room of numbered receptacles ("cabinet 1", "countertop 1", ...) holding numbered objects; closed
containers must be opened before their contents can be seen, taken or added to. The agent reads
ALFWorld's sentences and answers with ALFWorld's commands ("go to R", "open R", "take O from R",
"move O to R", "heat O with microwave 1", "use desklamp 1", ...); info["admissible_commands"] lists
the commands that do something, and any other command answers "Nothing happens.". Rooms are drawn
from the seed with random.Random, so a seed always gives the same game, and the task type is
seed % 6: train seeds lie below EVAL_SEED_OFFSET, held-out evaluation seeds at or above it.

HouseholdEnv plays a batch of games with the list interface that alfworld_env.AlfWorldEnv also has, so
the agent (train_agent.py) trains on either.
"""
import random

import numpy as np

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
