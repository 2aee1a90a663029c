"""Stage 1 under Lightning's FSDPStrategy: what it trains is sharded, what it keeps frozen is not.

Stage 1 trains 2.6 B parameters at SDXL size (the ReferenceNet, a UNet copy, most of them); under
DDP every GPU holds their float32 weights, gradients and both Adam moments (about 42 GB). Here
`configure_model` (which Lightning runs inside the strategy's `enable_wrap` context) wraps the
trained parts in FSDP units with the strategy's settings: the ReferenceNet, the subject QFormer, and
the new K/V projections of every routed attention layer. The frozen UNet, VAE, text and image
encoders stay plain modules, replicated on every rank (in `frozen_dtype`). The LightningModule then
holds FSDP units, so the strategy does not wrap it whole.

Checkpoints stay AnyStory's tensors only: with the strategy's `state_dict_type: full` Lightning
gathers the full state_dict on rank 0 and `on_save_checkpoint` trims it as under DDP, so
`training.export` and `--ckpt_path` resume read the same file. Under FSDP torch's gradient-norm clip
would see only a rank's shard: `clip_sharded_grad_norm_` reduces the norm over the ranks first."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import wrap

# Every element of a gradient lives on exactly one rank: a sum of squares over the ranks is the norm.
SHARDED_GRADIENTS = (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP)


class FSDPConfigError(ValueError):
    """A strategy setting this stage's FSDP wrapping does not support; the one-line message names the key."""


def prepare_fsdp(strategy: FSDPStrategy, stage: int) -> None:
    """One line naming the key for a configuration this wrapping does not support; then FSDP's
    `use_orig_params` (the optimizer takes the trained parameters themselves, not FSDP's flat ones),
    which the units get from `shard_stage1` and Lightning's optimizer setup reads from the strategy:
    the CLI cannot set it (FSDPStrategy passes it through **kwargs, which jsonargparse does not see)."""
    if stage != 1:
        raise FSDPConfigError("trainer.strategy: FSDPStrategy is offered for stage 1 (2.6 B trained parameters); stage 2 "
                              "trains the routers only: use DDPStrategy")
    if strategy.sharding_strategy not in SHARDED_GRADIENTS:
        raise FSDPConfigError(f"trainer.strategy.init_args.sharding_strategy: {strategy.sharding_strategy.name} is not "
                              f"supported here (one of {', '.join(s.name for s in SHARDED_GRADIENTS)})")
    if strategy._state_dict_type != "full":  # no public getter; a sharded checkpoint is a folder of shards
        raise FSDPConfigError("trainer.strategy.init_args.state_dict_type must be full: checkpoints hold AnyStory's "
                              "tensors whole, in one file that training.export reads")
    strategy.kwargs["use_orig_params"] = True


def shard_stage1(model: nn.Module, device: torch.device) -> None:
    """Wrap the parts stage 1 trains in FSDP units (AnyStoryModel `model`, in place); must run inside
    the strategy's `enable_wrap` context, on a model already on `device` (FSDP moves only what it
    wraps, and Lightning leaves device placement to FSDP). `device` is given to FSDP as a device, not
    Lightning's index, which is None on a CPU, where FSDP then refuses to start."""
    unit = {"use_orig_params": True, "device_id": device}
    # One unit for the whole ReferenceNet: what the denoising UNet takes from it is the bank it returns,
    # banked inside its blocks. FSDP unshards a unit for backward when the gradient reaches the unit's
    # outputs; a block's banked features are not its block's output, so units per block would meet
    # their gradient still sharded.
    model.referencenet = wrap(model.referencenet, **unit)
    model.subject_qformer = wrap(model.subject_qformer, **unit)
    # The processors sit in the frozen UNet (and in model.adapters): wrap their projections, which
    # they call as modules, so the processor objects stay where both registries hold them.
    for processor in model.adapters.values():
        for name in ("to_k", "to_v"):
            if isinstance(getattr(processor, name, None), nn.Module):
                setattr(processor, name, wrap(getattr(processor, name), **unit))


def clip_sharded_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, device: torch.device) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over gradients sharded across the ranks: the total norm is
    reduced over the process group (on `device`, the backend's), then every rank scales its shards
    by the same factor. Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None and p.grad.numel()]
    squares = torch.zeros((), device=device, dtype=torch.float32)
    if grads:
        squares = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)).float()) ** 2
    dist.all_reduce(squares)
    total = squares.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if grads:
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total
