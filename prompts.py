"""What the agent reads and what it answers: the prompts of its two action modes, and its answer parsed.

- render_prompt: the score mode's prompt, the same for every model (and the tiny LM's pretraining corpus):
  the task, the recent (action, observation) pairs, the observation, then the cue; the policy scores
  every admissible command after it.
- free_text_prompt, parse_action: the free-text mode of verl-agent's ALFWorld agents (GiGPO,
  arXiv 2505.10978): their prompt, which asks for <think>...</think> and <action>...</action>, and the
  command read from the answer.
"""
import re


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


ALFWORLD_TEMPLATE = (
    "You are an expert agent operating in the ALFRED Embodied Environment. Your task is to: {goal}\n"
    "Prior to this step, you have already taken {steps} step(s). Below are the most recent {shown} observations "
    "and the corresponding actions you took: {history}\n"
    "You are now at step {step} and your current observation is: {observation}\n"
    "Your admissible actions of the current situation are: [{admissible}].\n\n"
    "Now it's your turn to take an action.\n"
    "You should first reason step-by-step about the current situation. This reasoning process MUST be enclosed "
    "within <think> </think> tags.\n"
    "Once you've finished your reasoning, you should choose an admissible action for current step and present "
    "it within <action> </action> tags.")


def free_text_prompt(goal, history, observation, admissible, history_length=2):
    """verl-agent's ALFWorld prompt: the task, the last few (action, observation) pairs, the current
    observation, the admissible actions, think inside <think></think>, answer inside <action></action>."""
    recent = history[-history_length:] if history_length > 0 else []
    shown = " ".join(f"[Action {i + 1}: '{a}', Observation {i + 1}: '{o}']" for i, (a, o) in enumerate(recent))
    return ALFWORLD_TEMPLATE.format(goal=goal, steps=len(history), shown=len(recent), history=shown or "none",
                                    step=len(history) + 1, observation=observation,
                                    admissible=", ".join(f"'{c}'" for c in admissible))


ACTION_PATTERN = re.compile(r"<action>(.*?)</action>", re.DOTALL)


def parse_action(text):
    """The command inside the last <action>...</action>, lower-cased and stripped; None if there is none
    (verl-agent's projection: such an answer is an invalid action)."""
    found = ACTION_PATTERN.findall(text)
    return found[-1].strip().lower() if found else None
