"""AdamW with GPT-style weight-decay groups, and a warmup + cosine learning-rate schedule.

Weight decay follows GPT-2/nanoGPT practice: only the weight matrices of linear maps decay (and
the input/recurrent matrices of GRU/LSTM cells, which are linear maps too).
Biases, normalisation gains (LayerNorm, T5's RMSNorm ``T5LayerNorm``) and embeddings do not:
decaying a gain pulls it towards 0 rather than towards the identity, and decaying an embedding
row penalises rare tokens that receive few gradient updates.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

try:  # HF GPT-2 stores its projections as Conv1D (a transposed Linear), not nn.Linear.
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    _DECAY_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, _HFConv1D)
except ImportError:  # transformers is optional for this module
    _DECAY_MODULES = (nn.Linear,)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decay group and a no-decay group for AdamW.

    Decay: ``weight`` of ``nn.Linear`` / HF ``Conv1D`` modules with ``ndim >= 2``, and the
    ``weight_ih_l*`` / ``weight_hh_l*`` matrices of ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN``.
    No decay: everything else (biases, norm weights, embeddings, unknown parameters).
    A parameter shared by an embedding and a linear layer (GPT-2's tied ``lm_head.weight``, T5's
    tied ``shared``/``lm_head``) is an embedding and goes to no-decay, whatever the module order.
    Each parameter appears exactly once. Frozen parameters (``requires_grad=False``) are left out.

    Returns ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``
    in ``model.named_parameters()`` order, leaving out an empty group (DeepSpeed rejects those).
    No ``param_names`` key: DeepSpeed's ZeRO rewrites ``params`` and would leave names misaligned.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    # Pass 1: every parameter owned by an embedding, so a tied lm_head is recognised as one.
    embedding_ids = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, _DECAY_MODULES)
        for name, p in m.named_parameters(recurse=False)
        # ZeRO-3 leaves a 1-D placeholder in the module; ds_shape is the weight's true shape.
        if name == "weight" and len(getattr(p, "ds_shape", p.shape)) >= 2 and id(p) not in embedding_ids
    }
    decay_ids |= {  # recurrent cells keep their matrices as weight_ih_l0, weight_hh_l0_reverse, ...
        id(p)
        for m in model.modules()
        if isinstance(m, nn.RNNBase)
        for name, p in m.named_parameters(recurse=False)
        if name.startswith(("weight_ih", "weight_hh")) and id(p) not in embedding_ids
    }
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    # parameters() yields each tied tensor once: that is the dedupe.
    for p in model.parameters():
        if p.requires_grad:
            (decay if id(p) in decay_ids else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _fused_supported(model: nn.Module) -> bool:
    """Whether torch has a fused AdamW kernel for the device of the model's parameters."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return False
    devices = {p.device.type for p in params}
    return (
        len(devices) == 1
        and devices.pop() in _get_fused_kernels_supported_devices()
        and all(p.is_floating_point() for p in params)
    )


def build_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
    cpu_offload: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`.

    ``fused=None`` picks the fused kernel whenever torch has one for the parameters' device
    (CUDA, and CPU in recent torch, where it measured ~10% faster than the per-tensor loop).
    Call this after the model is on its final device (Lightning: in ``configure_optimizers``).

    Clipping trap: Lightning's mixed-precision plugin (``"16-mixed"`` and ``"bf16-mixed"``) refuses
    ``Trainer(gradient_clip_val=...)`` with a fused optimizer (RuntimeError), because a fused
    step may unscale gradients itself. With ``bf16-mixed`` there is no scaler, so clip inside an
    overridden ``LightningModule.configure_gradient_clipping`` with
    ``torch.nn.utils.clip_grad_norm_``. With ``16-mixed`` (GradScaler) Lightning leaves the
    gradients of a fused optimizer scaled when that hook runs: ``common.gradient_clipping``
    unscales them first (tested on CPU with the same plugin and a fused AdamW).

    ``cpu_offload=True`` (DeepSpeed ZeRO with ``offload_optimizer``) returns DeepSpeed's
    ``DeepSpeedCPUAdam`` in AdamW mode over the same groups: the optimizer step then runs on the
    CPU copies of the weights, where torch's AdamW would be slow and DeepSpeed refuses it.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimise")
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=True)
    if fused is None:
        fused = _fused_supported(model)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def _check_schedule(warmup_steps: int, max_steps: int, min_lr_ratio: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if max_steps <= warmup_steps:
        raise ValueError(f"max_steps ({max_steps}) must be > warmup_steps ({warmup_steps})")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    - ``step < warmup_steps``: ``(step + 1) / (warmup_steps + 1)``, so step 0 trains at
      ``1 / (warmup_steps + 1)`` of the peak (never exactly 0: a zero-LR step is wasted compute).
    - ``step == warmup_steps``: 1.0.
    - ``warmup_steps <= step <= max_steps``: ``min + (1 - min) * 0.5 * (1 + cos(pi * t))`` with
      ``t = (step - warmup_steps) / (max_steps - warmup_steps)``; equals ``min_lr_ratio`` at ``max_steps``.
    - ``step > max_steps``: constant ``min_lr_ratio``.
    """
    _check_schedule(warmup_steps, max_steps, min_lr_ratio)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= max_steps:
        return min_lr_ratio
    t = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`warmup_cosine`; step it once per optimizer step.

    The lambda is a ``functools.partial`` of a module-level function, not a closure, so the
    scheduler itself pickles (DDP spawn, deepcopy) and its ``state_dict`` holds only plain
    numbers (loadable with ``torch.load(weights_only=True)``). The schedule's arguments are
    not in the state dict: rebuild the scheduler from the config, then ``load_state_dict``.
    """
    _check_schedule(warmup_steps, max_steps, min_lr_ratio)
    fn = functools.partial(
        warmup_cosine, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
