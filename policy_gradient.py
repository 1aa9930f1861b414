"""Policy-gradient pieces of the agent trainer: group-relative advantages and the clipped objectives.

- GRPO (Shao et al. 2024): each episode's return normalised within its group of rollouts of one task.
- GiGPO (arXiv 2505.10978 Sec. 4): plus a step advantage, the discounted step return normalised within
  its anchor-state group (the group's steps with the same observation).
- The importance-sampling modes of train_agent.py --is-mode:
  token    PPO / GRPO: one ratio per decision, clipped (Schulman et al. 2017);
  sequence GSPO (arXiv 2507.18071): the sequence's length-normalised ratio, clipped once;
  rais     RSPO's router-aware importance sampling (arXiv 2510.23027): each decision's ratio times the
           router shift ratio gamma (moe_rl.router_shift_ratio), clipped per decision, then the
           geometric mean over the sequence as in GMPO (arXiv 2507.20673).
"""
import numpy as np
import torch

IS_MODES = ("token", "sequence", "rais")


# --- advantages -----------------------------------------------------------------------------------------

def group_normalize(values, groups, use_std, eps=1e-6):
    """(x - mean of x's group) / (std of the group, or 1): the group-relative baseline of GRPO/GiGPO."""
    values = np.asarray(values, np.float64)
    out = np.zeros_like(values)
    keys = list(groups)
    for key in set(keys):
        members = np.array([i for i, k in enumerate(keys) if k == key])
        centred = values[members] - values[members].mean()
        out[members] = centred / (values[members].std() + eps) if use_std else centred
    return out


def discounted_returns(rewards, gamma):
    """R_t = sum_{k >= t} gamma^(k - t) r_k for one episode."""
    out, running = np.zeros(len(rewards)), 0.0
    for t in reversed(range(len(rewards))):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def compute_advantages(episodes, algo, gamma, omega, use_std):
    """One advantage per step of every episode (a list of arrays).
    GRPO: A = A_E, the episode return normalised within its group (same task seed).
    GiGPO: A = A_E + omega * A_S, where A_S normalises the discounted step return within its anchor-state
    group: the steps of the same task group whose observation is identical (GiGPO Eq. 5-8)."""
    returns = [sum(e.rewards) for e in episodes]
    episode_adv = group_normalize(returns, [e.group for e in episodes], use_std)
    advantages = [np.full(len(e.rewards), a) for e, a in zip(episodes, episode_adv)]
    if algo == "gigpo":
        step_returns = [discounted_returns(e.rewards, gamma) for e in episodes]
        flat = np.concatenate(step_returns)
        anchors = [(e.group, obs) for e in episodes for obs in e.observations]
        step_adv = group_normalize(flat, anchors, use_std)
        offset = 0
        for i, e in enumerate(episodes):
            advantages[i] = advantages[i] + omega * step_adv[offset:offset + len(e.rewards)]
            offset += len(e.rewards)
    return advantages


# --- clipped objectives -----------------------------------------------------------------------------------

def clipped_surrogate(log_prob, old_log_prob, advantage, clip):
    """PPO's clipped objective per decision, as a loss: -min(r A, clip(r, 1-eps, 1+eps) A)."""
    ratio = (log_prob - old_log_prob).exp()
    loss = -torch.min(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    return loss, ratio


def per_episode_mean(values, episode):
    """Mean of per-step values within each episode: (n,) values, (n,) episode index 0..E-1 -> (E,)."""
    count = torch.bincount(episode).to(values.dtype)
    return torch.zeros_like(count).index_add(0, episode, values) / count


def policy_objective(log_ratio, advantage, episode, mode, clip, log_gamma=None):
    """The clipped policy loss of --is-mode from each step's log(pi / pi_old), advantage and episode index.
    token:    r_t = pi / pi_old; -min(r A, clip(r, 1-eps, 1+eps) A), averaged over steps (PPO / GRPO).
    sequence: GSPO: s_i = exp(mean over episode i of log r_t), clipped to [1-eps, 1+eps]; averaged over
              each episode's steps, then over episodes.
    rais:     RSPO: w_t = gamma_t r_t; log w_t clipped to (-eps, eps) on the side the advantage pushes it;
              G_i = exp(mean over episode i of the clipped log w_t), loss -A G_i (GMPO's geometric mean),
              averaged like sequence. log_gamma None (or 0) is GMPO itself.
    GiGPO gives each step its own advantage, so the two episode-level modes take the "-token" form of
    GSPO (Sec. 4.3): step t's term has the episode's ratio as its value, the step's own log-prob gradient
    and the step's advantage. With one advantage per episode it is exactly GSPO's / GMPO's objective.
    Returns (loss, per-step loss terms, importance weights before clipping, clipped mask)."""
    if mode == "token":
        ratio = log_ratio.exp()
        terms = -torch.min(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
        return terms.mean(), terms, ratio.detach(), (ratio - 1).abs() > clip
    if mode == "sequence":
        log_s = per_episode_mean(log_ratio, episode)[episode]
        s = (log_s.detach() + log_ratio - log_ratio.detach()).exp()     # value s_i, gradient of log r_t
        terms = -torch.min(s * advantage, s.clamp(1 - clip, 1 + clip) * advantage)
        return per_episode_mean(terms, episode).mean(), terms, s.detach(), (s - 1).abs() > clip
    if mode == "rais":
        log_w = log_ratio if log_gamma is None else log_ratio + log_gamma
        sign = torch.where(advantage >= 0, 1.0, -1.0)
        clipped_log_w = sign * torch.min(sign * log_w, sign * log_w.clamp(-clip, clip))
        log_g = per_episode_mean(clipped_log_w, episode)[episode]
        terms = -advantage * (log_g.detach() + clipped_log_w - clipped_log_w.detach()).exp()
        return per_episode_mean(terms, episode).mean(), terms, log_w.exp().detach(), log_w.abs() > clip
    raise ValueError(f"unknown importance-sampling mode {mode!r}; valid: {', '.join(IS_MODES)}")
