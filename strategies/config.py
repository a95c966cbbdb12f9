"""Strategy configuration: which techniques to apply, their canonical name, and validation.

A strategy is a combination along orthogonal axes: data parallelism (none/ddp/fsdp),
activation checkpointing, mixed precision and compilation. ``canonical_name`` gives the
one string every result row carries, e.g. ``fsdp+ac(full)+bf16+compile``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

DP_MODES = ("none", "ddp", "fsdp")
AC_MODES = ("none", "full", "selective", "op")
AMP_DTYPES = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("block", "model")


class StrategyError(ValueError):
    """An invalid strategy or an invalid combination; raised before any training starts."""


@dataclass
class StrategyConfig:
    """One point in the strategy space. Presets live in bench/conf/strategy/*.yaml."""

    dp: str = "none"
    """Data parallelism: 'none' (single process), 'ddp' (DistributedDataParallel) or 'fsdp' (FSDP2 fully_shard)."""
    reshard_after_forward: bool = True
    """FSDP only: free unsharded params after forward (ZeRO-3) or keep them until backward (ZeRO-2-like)."""
    ac: str = "none"
    """Activation checkpointing: 'none', 'full' (every block), 'selective' (every ac_every-th block) or
    'op' (op-level: keep matmul/attention outputs, recompute elementwise ops)."""
    ac_every: int = 2
    """For ac='selective': checkpoint blocks 0, k, 2k, ... with k = ac_every."""
    amp: str = "fp32"
    """Compute dtype: 'fp32', 'bf16' or 'fp16' (fp16 adds a GradScaler; GPU only)."""
    compile: bool = False
    """torch.compile the model."""
    compile_mode: str = "block"
    """'block' compiles each transformer block (torchtitan's choice), 'model' the whole model."""
    tf32: bool = True
    """CUDA fp32 runs: allow TF32 tensor-core matmuls (torch.backends.cuda.matmul.allow_tf32)."""

    def __post_init__(self) -> None:
        for field, valid in (("dp", DP_MODES), ("ac", AC_MODES), ("amp", AMP_DTYPES),
                             ("compile_mode", COMPILE_MODES)):
            value = getattr(self, field)
            if value not in valid:
                raise StrategyError(f"strategy.{field}={value!r} is invalid; valid values: {', '.join(valid)}")
        if self.ac_every < 1:
            raise StrategyError(f"strategy.ac_every={self.ac_every} is invalid; must be >= 1")
        if self.dp == "fsdp" and self.compile and self.compile_mode == "model":
            raise StrategyError("strategy.compile_mode='model' with dp=fsdp is not supported: FSDP2 hooks would sit "
                                "inside the compiled graph; use compile_mode=block (per-block compile, as torchtitan)")
        if self.dp == "fsdp" and self.amp == "fp16":
            raise StrategyError("strategy amp=fp16 with dp=fsdp is not supported (FSDP2 has no sharded gradient "
                                "scaler here); use amp=bf16")

    def validate_for(self, device_type: str, world_size: int) -> None:
        """Checks that depend on where the run happens. Raises StrategyError; warns for slow-but-valid."""
        if self.dp == "none" and world_size > 1:
            raise StrategyError(f"strategy dp='none' (single) runs one process but world_size={world_size}; "
                                "use strategy=ddp or strategy=fsdp, or launch one process")
        if device_type == "cpu" and self.amp == "fp16":
            raise StrategyError("strategy amp=fp16 needs a CUDA device (fp16 autocast + GradScaler); "
                                "on CPU use amp=fp32 or amp=bf16")
        if device_type == "cpu" and self.amp == "bf16":
            warnings.warn("amp=bf16 on a CPU without native bf16 can be ~250x slower than fp32; "
                          "CPU benchmarks should use fp32", stacklevel=2)

    @property
    def canonical_name(self) -> str:
        """'single' | 'ddp' | 'fsdp' | 'fsdp(no-reshard)', then '+ac(...)', '+bf16'/'+fp16', '+compile[(model)]'."""
        parts = ["single" if self.dp == "none" else self.dp]
        if self.dp == "fsdp" and not self.reshard_after_forward:
            parts[0] = "fsdp(no-reshard)"
        if self.ac == "selective":
            parts.append(f"ac(selective/{self.ac_every})")
        elif self.ac != "none":
            parts.append(f"ac({self.ac})")
        if self.amp != "fp32":
            parts.append(self.amp)
        if self.compile:
            parts.append("compile" if self.compile_mode == "block" else "compile(model)")
        return "+".join(parts)

    def compute_dtype_name(self, device_type: str) -> str:
        """The dtype matmuls run in: 'bf16', 'fp16', 'tf32' (CUDA fp32 with TF32 allowed) or 'fp32'."""
        if self.amp != "fp32":
            return self.amp
        return "tf32" if (device_type == "cuda" and self.tf32) else "fp32"
