"""Several processes (torchrun): data parallelism over the trainable parameters of train_agent.py.

Every rank plays its own rollouts and computes its own gradients; all_reduce_gradients averages them
before each optimizer step, so the ranks' weights stay equal (parameter_digest tells). The rest keeps the
ranks in step: equal_share gives each the same number of optimizer steps, and finite_on_every_rank and
on_any_rank make all ranks stop together. On one process each answers for that process alone.
"""
import datetime
import hashlib
import os

import torch
import torch.distributed

import checkpointing


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(device):
    """(rank, world size): under torchrun (WORLD_SIZE > 1) join the process group, NCCL on GPUs (device: this
    rank's, cuda:LOCAL_RANK) and gloo on the CPU; otherwise (0, 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    if not distributed():
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        # the other ranks wait while rank 0 evaluates, which can take long with a large model
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(hours=3))
    return torch.distributed.get_rank(), world_size


def close_distributed():
    """Leave the process group once every rank is done (under torchrun; nothing otherwise): a rank that exits
    with its group alive can abort in gloo's teardown ("terminate called without an active exception")."""
    if distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def collective_device():
    """Where tensors for a collective must live: the rank's GPU for NCCL, the CPU for gloo."""
    nccl = distributed() and torch.distributed.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def finite_on_every_rank(loss):
    """Whether the loss is finite here and, under torchrun, on every rank (so all ranks stop together)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1).to(collective_device())
    if distributed():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def all_reduce_gradients(parameters):
    """Average the trainable parameters' gradients over the ranks in one flat all-reduce: what
    DistributedDataParallel does, written out, because only the small LoRA experts and routers train
    (the frozen model needs no wrapper) and a rank's step count is set by equal_share."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for p, g in zip(parameters, flat.split([p.numel() for p in parameters])):
        p.grad = g.view_as(p)


def equal_share(kept, total):
    """Episodes a rank's update keeps. Alone: the informative ones. Under torchrun every rank must take the
    same number of optimizer steps, so each keeps as many as the rank with the most, topped up with its
    zero-advantage episodes (no policy gradient; they only enter the auxiliary losses)."""
    if not distributed():
        return kept
    count = torch.tensor([len(kept)], device=collective_device())
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    rest = [i for i in range(total) if i not in set(kept)]
    return sorted(kept + rest[:int(count) - len(kept)])


def parameter_digest(parameters):
    """sha1 of the trainable parameters' bytes: equal on every rank while they stay in sync."""
    digest = hashlib.sha1()
    for p in parameters:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def on_any_rank(flag):
    """Whether `flag` holds on this rank or, under torchrun, on any rank: so that all ranks stop together."""
    if not distributed():
        return bool(flag)
    value = torch.tensor([float(bool(flag))], device=collective_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value)


def rank_rng_states(rng, generator):
    """Every rank's RNG states (its numpy Generator, its torch Generator, the global RNGs), gathered for rank 0's
    checkpoint: a collective under torchrun, so every rank calls it at every checkpoint."""
    mine = {"numpy": rng.bit_generator.state, "torch": generator.get_state(), "global": checkpointing.rng_state()}
    if not distributed():
        return [mine]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, mine)
    return states
