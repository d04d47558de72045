"""The distributed engine under the trainer: Hugging Face `accelerate`.

One process (CPU or one GPU), several processes with DDP (gloo on CPU, NCCL on GPUs) or FSDP
(GPUs only; parameters, gradients and optimizer state sharded), bf16 mixed precision. Launch
several processes with `accelerate launch -m vas_vllm.cli train ...`, `torchrun`, or
`vas-vllm train --num-processes N` (launch.py).

How an optimizer batch is spread over W processes: the trainer cuts it into K micro-batches of
batch_size samples (K = grad_accum * W, fewer at an epoch's end). Process r takes micro-batches
r, r + W, r + 2W, ... and weights each one's mean loss by W / K, so that DDP's average of the
processes' gradients is the mean over all K micro-batches: the gradient one process would get
from the same K micro-batches. Processes with fewer micro-batches add zero-weighted copies, so
that every process runs the same number of forwards (FSDP's forwards are collective).

Checkpoints hold the full (unsharded) trainable weights and optimizer state, gathered with
torch.distributed.checkpoint's state-dict API, so one format serves 1 process, DDP and FSDP.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from value_models.training.train_config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

T = TypeVar("T")


AUX_HEAD = "vas_aux_head"  # attribute of PositionValues' training-only head; never saved


class PositionValues(torch.nn.Module):
    """The value model as one module whose forward is the score head at every position, so
    that DDP / FSDP wrap (and synchronise) the forward the trainer actually runs.

    net: an HF LlamaForSequenceClassification, or a peft model around one. aux_head: an optional
    training-only Linear(D, 1) on the same hidden states (TrainConfig.aux_prefix_weight).
    forward(input_ids [B, L]) -> values [B, L] float32 (or [B, L, O] for a head of O outputs),
    or (values, aux [B, L]) with an auxiliary head.
    """

    def __init__(self, net: torch.nn.Module, aux_head: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.net = net
        if aux_head is not None:
            setattr(self, AUX_HEAD, aux_head)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        values, hidden = _values_and_hidden(self.net, input_ids)
        aux = getattr(self, AUX_HEAD, None)
        return values if aux is None else (values, aux(hidden).squeeze(-1).float())


def _values_and_hidden(net: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    hidden = base.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, D]
    out = base.score(hidden).float()                                            # [B, L, O]
    return (out.squeeze(-1) if out.shape[-1] == 1 else out), hidden


def score_positions(net: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The score head at every position of an HF value model (or a peft model around one):
    input_ids [B, L] -> [B, L] float32, or [B, L, O] for a head of O > 1 outputs. Not the
    pooled seq-cls output (it pools at the last non-pad token, and pad == eos here)."""
    return _values_and_hidden(net, input_ids)[0]


def position_outputs(model: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(position values [B, L(, O)], the auxiliary head at every position [B, L] or None) of the
    model being trained (a PositionValues, possibly wrapped by DDP / FSDP)."""
    out = model(input_ids)
    return out if isinstance(out, tuple) else (out, None)


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast on the model's device when cfg.precision is bf16 (else a no-op)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def in_distributed_launch() -> bool:
    """True inside a process started by torchrun / `accelerate launch` / launch.py."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The Accelerator for cfg: device, mixed precision, DDP or FSDP (see the module doc)."""
    from accelerate import Accelerator, DistributedType
    from accelerate.utils import DistributedDataParallelKwargs

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    plugin = None
    if cfg.distributed == "fsdp":
        if not cuda:
            raise ValueError("distributed fsdp shards the model over GPUs; on CPU use ddp")
        plugin = _fsdp_plugin()
    # accelerate keeps its settings in process-wide singletons; each training run sets its own
    # (a second run in one process may use another precision or device).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=not in_distributed_launch())
    GradientState._reset_state()
    acc = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        fsdp_plugin=plugin,
        # Llama's only buffers are the constant RoPE frequencies: broadcasting them before every
        # forward would make each forward a collective for nothing.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("DeepSpeed is not supported: the trainer accumulates micro-batches itself "
                         "(targets from V_old before any update); shard with --distributed fsdp")
    if cfg.num_processes > 1 and acc.num_processes != cfg.num_processes:
        raise ValueError(f"num_processes {cfg.num_processes} but the launcher started "
                         f"{acc.num_processes}; under accelerate launch / torchrun leave it at 1")
    return acc


def prepare(acc: Accelerator, model: torch.nn.Module, opt: torch.optim.Optimizer
            ) -> tuple[torch.nn.Module, Any]:
    """acc.prepare(model, opt): device placement, autocast, the DDP / FSDP wrapper."""
    import warnings

    with warnings.catch_warnings():
        # torch >= 2.13 renames DDP's broadcast_buffers, which accelerate still passes
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
        return acc.prepare(model, opt)


def _fsdp_plugin() -> Any:
    """FSDP2, one unit per decoder layer, full state dicts; mixed requires_grad (LoRA) is fine
    in FSDP2 since it shards parameter by parameter."""
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)


def shard(items: list[T], rank: int, world: int) -> list[tuple[T, bool]]:
    """Process `rank`'s share of `items` (items[rank::world]) as (item, real) pairs, padded
    with (items[0], False) to ceil(len / world), so that every process gets as many."""
    if not items:
        raise ValueError("shard: expected at least one item, found none")
    n = -(-len(items) // world)
    mine = [(x, True) for x in items[rank::world]]
    return mine + [(items[0], False)] * (n - len(mine))


def sum_over_processes(acc: Accelerator | None, value: float) -> float:
    """The sum of `value` over every process (itself with one process)."""
    if acc is None or acc.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=acc.device)
    return float(acc.reduce(t, reduction="sum")[0])


def gather_objects(acc: Accelerator | None, obj: T) -> list[T]:
    """Every process's `obj`, in rank order (picklable objects; tensors come back on the CPU)."""
    if acc is None or acc.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * acc.num_processes
    dist.all_gather_object(out, obj)
    return out


def _optimizer(opt: Any) -> torch.optim.Optimizer:
    while hasattr(opt, "optimizer"):  # accelerate's AcceleratedOptimizer
        opt = opt.optimizer
    return opt


def trainable_state(model: torch.nn.Module, opt: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, optimizer state), full (unsharded) and on the CPU, keyed by the
    unwrapped names. Collective under FSDP: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optim = get_state_dict(model, _optimizer(opt), options=options)
    return {k: v.detach().clone() for k, v in weights.items()}, optim


def load_trainable_state(model: torch.nn.Module, opt: Any, weights: dict[str, torch.Tensor],
                         optim: dict) -> None:
    """Inverse of trainable_state: every process passes the full state it read from disk."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, _optimizer(opt), model_state_dict=weights, optim_state_dict=optim,
                   options=StateDictOptions(full_state_dict=True, strict=False))
