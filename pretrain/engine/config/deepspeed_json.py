"""The DeepSpeed JSON, generated from the typed config (never hand-written)."""

from __future__ import annotations

from typing import Any

from .schema import EngineConfig, grad_accum_steps


def deepspeed_config(cfg: EngineConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict for `cfg` on `world_size` ranks.

    The optimizer is built by the engine and passed to `deepspeed.initialize`, and the learning rate is set
    by the trainer every step, so there is no "optimizer"/"scheduler" section;
    `zero_allow_untested_optimizer` lets ZeRO wrap it (torch's AdamW, subclassed for the step veto).
    """
    t, ds = cfg.train, cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(
            overlap_comm=ds.overlap_comm,
            contiguous_gradients=ds.contiguous_gradients,
            reduce_bucket_size=ds.reduce_bucket_size,
        )
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=False,
        )
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "fp16": {"enabled": ds.fp16, "loss_scale": 0, "initial_scale_power": ds.fp16_initial_scale_power},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # our own logging; silence DeepSpeed's
        "wall_clock_breakdown": False,
    }
