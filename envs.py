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


def scale_observation(env_id, obs):
    low, high = np.asarray(TASKS[env_id]["low"]), np.asarray(TASKS[env_id]["high"])
    return (2.0 * (np.asarray(obs) - low) / (high - low) - 1.0).astype(np.float32)


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
        obs = scale_observation(self.env_id, obs) if self.scale else np.asarray(obs, np.float32)
        out = np.zeros(self.observation_space.shape, np.float32)
        out[: obs.shape[0]] = obs
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

    def evaluate(self, task, policy, episodes, seed):
        """Run `episodes` episodes of one task in parallel with policy(obs (N, obs), task) -> actions (N,).
        Fresh envs seeded seed, seed+1, ...; returns the list of episode returns."""
        envs = [self.make(task) for _ in range(episodes)]
        obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
        returns, running = np.zeros(episodes), list(range(episodes))
        while running:
            actions = policy(np.stack([obs[i] for i in running]), task)
            still = []
            for i, action in zip(running, actions):
                obs[i], reward, terminated, truncated, _ = envs[i].step(int(action))
                returns[i] += reward
                if not (terminated or truncated):
                    still.append(i)
            running = still
        return returns.tolist()


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
