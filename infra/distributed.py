"""
What running on real hardware needs and the method does not: torchrun process groups, DDP or FSDP2
around the model (FSDP2 gathering bfloat16 on CUDA), activation checkpointing, full state dicts
gathered from shards, bfloat16 autocast on CUDA, and output from rank 0 only. What a run needs in
memory is plan.py's. On one process every function here is a no-op or the obvious single-process
answer.
"""

import gc
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from prift import autocast, dist_info  # noqa: F401  the method's own, used by the shell too


def init_from_env():
    """Join the process group when launched by torchrun (it sets RANK); returns the device to run
    on.
    """
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device(
        f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    )


def fsdp_policy(device):
    """FSDP2's precision on CUDA: blocks all-gathered in bfloat16 (half the bytes of float32, and
    what autocast would compute in anyway), gradients reduce-scattered in float32, the sharded
    master weights and AdamW state float32. On the CPU everything stays float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap_distributed(model, ref=None, fsdp=False, recompute=None):
    """Activation checkpointing of every block (recompute; None: on with CUDA, where the paper's
    recipe does not fit a GPU without it, off on the CPU, where memory is not the limit); then DDP,
    or with fsdp, FSDP2 (one unit per transformer block, and the root) for the model, in place, and
    for the frozen reference of --prior inline the same way. Build the optimizer after this."""
    device = next(model.parameters()).device
    # before fully_shard, so that each unit's gathers wrap its recomputation
    for block in model.model.layers:
        block.recompute = device.type == "cuda" if recompute is None else recompute
    if not dist.is_initialized():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        policy = fsdp_policy(device)
        # a LoRA run's reference is the model itself with its adapters off (lora.BaseOf): no module
        for module in [model] + ([ref] if isinstance(ref, torch.nn.Module) else []):
            for block in module.model.layers:
                fully_shard(block, mp_policy=policy)
            # the root (embeddings, final norm, lm_head) stays unsharded after forward, as the loss
            # applies
            # lm_head outside forward; its gradient is reduce-scattered at the end of backward
            fully_shard(module, reshard_after_forward=False, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def all_reduce(tensor, op="sum"):
    """Sum (or max) a tensor over ranks in place; returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    """Leave the process group together, and only once nothing refers to it: FSDP2's modules live in
    reference cycles, and freed only when the interpreter exits, after the group, they aborted a
    rank now and then on the CPU ("terminate called without an active exception", about 1 run in 20
    on a busy machine)."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model):
    """Under FSDP2 every rank takes part in gathering the full state dict; otherwise None (use our
    own).
    """
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return None


def optimizer_state_dict(model, opt):
    """Under FSDP2 every rank takes part in gathering the whole optimizer state (keyed by parameter
    name) onto rank 0's CPU, as opt.state_dict() would give each rank only its own shards; otherwise
    opt.state_dict()."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(
            model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return opt.state_dict()


def load_optimizer_state_dict(model, opt, state):
    """The inverse of optimizer_state_dict: under FSDP2 each rank keeps its shards of the whole
    state. A state keyed by name (saved under FSDP2) also loads into an unsharded model, to resume
    on one process."""
    if is_fsdp(model) or isinstance(state["param_groups"][0]["params"][0], str):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def progress(iterable=None, **kw):
    """A tqdm bar on rank 0 when stderr is a terminal (disable=None), so logs stay clean."""
    return tqdm(iterable, disable=True if dist_info()[0] > 0 else None, **kw)


def log(msg):
    if dist_info()[0] == 0:
        print(msg, flush=True)
