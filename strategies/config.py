"""``StrategyConfig``: one point in the strategy space, every field written here with its meaning and choices.

A strategy is a combination along orthogonal axes: data parallelism (none/ddp/fsdp), pipeline and tensor (and
sequence) parallelism on a device mesh, activation checkpointing, compilation and mixed precision. This is
Hydra's ``strategy`` group schema (bench/conf/strategy/*.yaml are its presets, each setting a few fields);
``__post_init__`` checks every field's choices and each technique's own rules (strategies/<name>.py
``validate``), so a bad value stops before any work with one line; ``canonical_name`` is the one string every
result row carries, e.g. ``fsdp+ac(full)+bf16+compile`` or ``fsdp+pp2(1f1b)+tp2+sp``.

Adding a field: write it below with its ``doc`` (and ``choices``), check it in its module's ``validate``, add its
name part in ``canonical_name`` (docs/strategies.md has the whole checklist).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strategies import ac, amp, compile, dp, pp, tp  # their checks and name parts (methods below)
from strategies.ac import MODES as AC_MODES  # the choices: constants, as the field names shadow the modules
from strategies.amp import DTYPES
from strategies.base import StrategyError
from strategies.compile import MODES as COMPILE_MODES
from strategies.dp import MODES as DP_MODES
from strategies.pp import SCHEDULES

__all__ = ["StrategyConfig", "StrategyError"]


def _f(default, doc: str, choices: tuple = ()):
    """A field with its help text (``bench/run.py --help`` and docs/strategies.md show it) and its valid values."""
    return field(default=default, metadata={"doc": doc, "choices": choices})


@dataclass
class StrategyConfig:
    """One point in the strategy space (presets: bench/conf/strategy/*.yaml); each field's ``doc`` says what it
    does."""

    # data parallelism (strategies/dp.py, ddp.py, fsdp.py)
    dp: str = _f("none", "Data parallelism: 'none' (single process), 'ddp' (DistributedDataParallel) or 'fsdp' "
                 "(FSDP2 fully_shard).", DP_MODES)
    reshard_after_forward: bool = _f(True, "FSDP only: free unsharded params after forward (ZeRO-3) or keep them "
                                     "until backward (ZeRO-2-like).")
    dp_replicate: int = _f(1, "FSDP only: HSDP -- the data-parallel ranks as dp_replicate x dp_shard (FSDP2's 2-D "
                           "mesh): parameters sharded within a group of dp / dp_replicate ranks, replicated across "
                           "the dp_replicate groups (across nodes); 1 = plain FSDP over all dp ranks.")
    # pipeline parallelism (strategies/pp.py)
    pp: int = _f(1, "Pipeline-parallel degree (stages across ranks; 1 = off). The data-parallel degree is "
                 "world_size / (tp x pp).")
    pp_schedule: str = _f("1f1b", "Pipeline schedule: 'gpipe', '1f1b' or 'interleaved1f1b' (pp_virtual stages per "
                          "rank).", tuple(SCHEDULES))
    pp_microbatches: int = _f(0, "Pipeline micro-batches per training micro-batch (0 = pp); must divide micro_batch.")
    pp_virtual: int = _f(2, "Stages per rank for pp_schedule=interleaved1f1b.")
    # tensor and sequence parallelism (strategies/tp.py)
    tp: int = _f(1, "Tensor-parallel degree (ranks per tensor-parallel group; 1 = off). The data-parallel degree "
                 "is world_size / tp.")
    sp: bool = _f(False, "With tp >= 2: sequence parallelism (norms on a sequence shard; all-gather + "
                  "reduce-scatter instead of all-reduce).")
    # activation checkpointing (strategies/ac.py)
    ac: str = _f("none", "Activation checkpointing: 'none', 'full' (every block), 'selective' (every ac_every-th "
                 "block) or 'op' (op-level: keep matmul/attention outputs, recompute elementwise ops).", AC_MODES)
    ac_every: int = _f(2, "For ac='selective': checkpoint blocks 0, k, 2k, ... with k = ac_every.")
    # torch.compile (strategies/compile.py)
    compile: bool = _f(False, "torch.compile the model.")
    compile_mode: str = _f("block", "'block' compiles each transformer block (torchtitan's choice), 'model' the "
                           "whole model.", COMPILE_MODES)
    # mixed precision (strategies/amp.py)
    amp: str = _f("fp32", "Compute dtype: 'fp32', 'bf16' or 'fp16' (fp16 adds a GradScaler; GPU only).",
                  tuple(DTYPES))
    tf32: bool = _f(True, "CUDA fp32 runs: allow TF32 tensor-core matmuls (torch.backends.cuda.matmul.allow_tf32).")

    def __post_init__(self) -> None:
        for f in self.__dataclass_fields__.values():
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise StrategyError(f"strategy.{f.name}={value!r} is invalid; valid values: {', '.join(choices)}")
        for check in (pp.validate, tp.validate, ac.validate, compile.validate, dp.validate):
            check(self)

    def validate_for(self, device_type: str, world_size: int) -> None:
        """Checks that depend on where the run happens. Raises StrategyError; warns for slow-but-valid."""
        for check in (pp.validate_for, tp.validate_for, dp.validate_for, amp.validate_for):
            check(self, device_type, world_size)

    def validate_run(self, model_cfg, seq_len: int, micro_batch: int) -> None:
        """Checks against the model's shape and the batch (tp against the heads, pp against the blocks, ...)."""
        for check in (pp.validate_run, tp.validate_run):
            check(self, model_cfg, seq_len, micro_batch)

    @property
    def canonical_name(self) -> str:
        """Each technique's part joined with '+': 'single' | 'ddp' | 'fsdp' | 'fsdp(no-reshard)', then 'pp2(1f1b)',
        'tp2+sp', 'ac(...)', 'bf16'/'fp16', 'compile[(model)]'."""
        parts = (dp.name_part(self), pp.name_part(self), tp.name_part(self), ac.name_part(self),
                 amp.name_part(self), compile.name_part(self))
        return "+".join(p for p in parts if p)

    def compute_dtype_name(self, device_type: str) -> str:
        """The dtype matmuls run in: 'bf16', 'fp16', 'tf32' (CUDA fp32 with TF32 allowed) or 'fp32'."""
        return amp.compute_dtype_name(self, device_type)
