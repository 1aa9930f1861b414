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

The agent's text environments need no gymnasium and have files of their own: household.py (the household
game, an offline stand-in for ALFWorld) and alfworld_env.py (ALFWorld itself behind the same interface).
"""
import math

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
