"""Any Hugging Face causal LM as the frozen base of the PA-MoE agent (train_agent.py --model NAME_OR_PATH).

PA-MoE (arXiv 2602.17038) puts K LoRA experts on a frozen Qwen2.5-1.5B/7B-Instruct. This file loads such a
model with `AutoModelForCausalLM` and makes it speak the interface of the tiny stand-in (tiny_lm.TinyGPT),
so train_agent.Agent, its LoRA expert bank (experts.add_lora) and its routers work on it unchanged:

    HFBase.forward(ids, mask, positions=None, allowed=None) -> final hidden states (n, t, d), key/value cache
    HFBase.logits(hidden) -> (n, t, vocab) float32;   HFBase.config.dim, .max_len
    HFTokenizer.encode(text) -> ids;  .pad_id, .unk_id, .eos_id

and it adds what only a real LLM needs: GPT-2's Conv1D projections turned into nn.Linear (so LoRA can wrap
them), default LoRA targets per architecture, and token-by-token sampling with a KV cache for the
free-text action mode (`sample`, with verl-agent's ALFWorld prompt and <action> parsing).

Needs `pip install -r requirements-optional.txt` (transformers); the rest of the project does not.
"""
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")        # Llama, Qwen2, Mistral, Gemma, Phi-3 ...
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")
GPT2_ATTENTION = ("attn.c_attn", "attn.c_proj")                   # GPT-2 (its MLP also has a c_proj)
GPT2_MLP = ("mlp.c_fc", "mlp.c_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("--model needs the Hugging Face transformers package: "
                          "pip install -r requirements-optional.txt") from error
    return transformers


def default_target_modules(model, mlp=False):
    """LoRA targets for a model: the attention projections (and with `mlp` the MLP's) under the names
    that Llama/Qwen/Mistral-style or GPT-2-style models give them."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "q_proj" in names:
        return list(LLAMA_ATTENTION + (LLAMA_MLP if mlp else ()))
    if "c_attn" in names:
        return list(GPT2_ATTENTION + (GPT2_MLP if mlp else ()))
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise ValueError(f"no default LoRA targets for this architecture; name them with --target-modules "
                     f"(its linear layers are named {linear})")


def conv1d_to_linear(model):
    """Replace GPT-2's transformers Conv1D layers (y = x W + b, W (d_in, d_out)) by equal nn.Linear layers,
    the type experts.add_lora wraps. Returns how many were replaced."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ == "Conv1D":
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out, device=child.weight.device, dtype=child.weight.dtype)
                linear.weight.data.copy_(child.weight.data.T)
                linear.bias.data.copy_(child.bias.data)
                setattr(module, name, linear)
                replaced += 1
    return replaced


@dataclass
class HFConfig:
    dim: int         # hidden size: the phase router's encoder width
    max_len: int     # longest sequence the agent feeds it (prompts are cut from the left to fit)


class HFTokenizer:
    """A Hugging Face tokenizer with the WordTokenizer's interface. No special tokens are added by encode:
    the prompt is plain text (or the model's chat template, for the free-text mode)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else self.eos_id

    def __len__(self):
        return len(self.tokenizer)

    def encode(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, text):
        """The text as one user turn in the model's chat template (instruct models), else unchanged."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text


class HFBase(nn.Module):
    """A frozen AutoModelForCausalLM behind TinyGPT's interface. The trainable LoRA experts are added to it
    afterwards (experts.add_lora replaces its nn.Linear projections in place)."""

    def __init__(self, model, max_len=4096):
        super().__init__()
        self.model = model.requires_grad_(False)
        conv1d_to_linear(model)
        positions = getattr(model.config, "max_position_embeddings", None) or max_len
        self.config = HFConfig(dim=model.config.hidden_size, max_len=min(max_len, positions))
        # the backbone without the LM head (LlamaModel, Qwen2Model, GPT2Model ...): last hidden states, normed
        self.backbone = model.get_submodule(model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()

    @property
    def device(self):
        return self.lm_head.weight.device

    def forward(self, ids, mask, positions=None, allowed=None, past=None, past_mask=None):
        """ids, mask (n, t) (padding on either side). positions (n, t) and allowed (n, t, t) bool: position ids
        and which tokens each token may attend to, as TinyGPT takes them (packed scoring); transformers passes
        such a 4D mask through to the attention as it is. past: the cache an earlier call returned for b
        prefixes with mask past_mask (b, p); rows b*g .. b*g + g - 1 continue prefix b. The cache is repeated
        per continuation and extended in place: use it once (token-by-token sampling). Returns (hidden, cache)."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        attention = mask.long()
        if positions is None:
            positions = mask.long().cumsum(1) - 1
        if allowed is not None:
            eye = torch.eye(ids.shape[1], dtype=torch.bool, device=self.device)          # pads see themselves
            dtype = self.lm_head.weight.dtype
            attention = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(
                ~(allowed.to(self.device) | eye), torch.finfo(dtype).min).unsqueeze(1)   # (n, 1, t, t), additive
        if past is not None:
            repeats = ids.shape[0] // past_mask.shape[0]
            past_mask = past_mask.to(self.device).repeat_interleave(repeats, 0)
            positions = positions + past_mask.sum(1, keepdim=True)
            attention = torch.cat([past_mask, mask], 1).long()
            if repeats > 1:
                past.batch_repeat_interleave(repeats)
        out = self.backbone(input_ids=ids, attention_mask=attention, position_ids=positions.to(self.device).clamp(min=0),
                            past_key_values=past, use_cache=past is not None or allowed is None)
        return out.last_hidden_state, out.past_key_values

    def logits(self, hidden):
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()


def load_hf_base(name_or_path, device="cpu", dtype="float32", trust_remote_code=False, gradient_checkpointing=False,
                 max_len=4096):
    """(HFBase, HFTokenizer) for a Hub name or a local directory written by save_pretrained. The weights
    are frozen; remote code runs only with trust_remote_code (the --trust-remote-code flag)."""
    transformers = import_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype],
                                                              trust_remote_code=trust_remote_code)
    model.to(device).eval()
    if gradient_checkpointing:
        # non-reentrant: the frozen inputs need no grad for the LoRA weights inside to get theirs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return HFBase(model, max_len), HFTokenizer(tokenizer)


# --- the free-text action mode (verl-agent / GiGPO, arXiv 2505.10978) --------------------------------------

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


@torch.no_grad()
def sample(base, tokenizer, prompts, temperature, max_new_tokens, generator, stop="</action>"):
    """Sample a completion for each prompt (id lists) token by token with the KV cache, from
    softmax(logits / temperature), until <eos>, the `stop` text, or max_new_tokens. The caller sets the LoRA
    experts with experts.route. Returns the completions' id lists (ending with <eos> if one was drawn)."""
    from tiny_lm import pad
    n = len(prompts)
    ids, mask = pad(prompts, tokenizer.pad_id, left=True)
    hidden, cache = base(ids, mask)
    completions, done = [[] for _ in range(n)], [False] * n
    for _ in range(max_new_tokens):
        probs = (base.logits(hidden[:, -1]) / temperature).softmax(-1).cpu()
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        for i in range(n):
            if not done[i]:
                completions[i].append(int(tokens[i]))
                done[i] = int(tokens[i]) == tokenizer.eos_id or stop in tokenizer.decode(completions[i][-8:])
        if all(done):
            break
        step = torch.ones(n, 1, dtype=torch.bool)            # finished rows run on (their outputs are unused)
        hidden, cache = base(tokens.unsqueeze(1), step, past=cache, past_mask=mask)
        mask = torch.cat([mask, step], 1)
    return completions
