"""Strategy configuration, built from the techniques: every module of this package that defines
``TECHNIQUE`` (strategies/base.py) contributes its fields, checks and canonical-name part.

A strategy is a combination along orthogonal axes -- data parallelism (none/ddp/fsdp), activation
checkpointing, mixed precision, compilation, and whatever module is added next. ``StrategyConfig`` is a
real dataclass (Hydra's ``strategy`` group schema, bench/conf/strategy/*.yaml its presets) whose
``__post_init__`` checks every field's choices and runs every technique's ``validate``;
``canonical_name`` gives the one string every result row carries, e.g. ``fsdp+ac(full)+bf16+compile``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from strategies.base import StrategyError, Technique

__all__ = ["TECHNIQUES", "StrategyConfig", "StrategyError"]

_NOT_TECHNIQUES = {"base", "config"}


def discover() -> list[Technique]:
    """The ``TECHNIQUE`` of every module in this package, in apply order."""
    import strategies

    found = []
    for info in pkgutil.iter_modules(strategies.__path__):
        if info.name in _NOT_TECHNIQUES or info.name.startswith("_"):
            continue
        technique = getattr(importlib.import_module(f"strategies.{info.name}"), "TECHNIQUE", None)
        if technique is not None:
            found.append(technique)
    names = [f.name for t in found for f in t.fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RuntimeError(f"strategy fields declared by two techniques: {dupes}")
    return sorted(found, key=lambda t: t.order)


TECHNIQUES: list[Technique] = discover()
_FIELDS = [f for t in TECHNIQUES for f in t.fields]


def _post_init(self) -> None:
    for f in _FIELDS:
        value = getattr(self, f.name)
        if f.choices and value not in f.choices:
            raise StrategyError(f"strategy.{f.name}={value!r} is invalid; valid values: {', '.join(f.choices)}")
    for t in TECHNIQUES:
        t.validate(self)


def _validate_for(self, device_type: str, world_size: int) -> None:
    """Checks that depend on where the run happens. Raises StrategyError; warns for slow-but-valid."""
    for t in TECHNIQUES:
        t.validate_for(self, device_type, world_size)


def _validate_run(self, model_cfg, seq_len: int, micro_batch: int) -> None:
    """Checks against the model's shape and the batch (tp against the heads, pp against the blocks, ...)."""
    for t in TECHNIQUES:
        t.validate_run(self, model_cfg, seq_len, micro_batch)


def _canonical_name(self) -> str:
    """Each technique's part in name order, joined with '+': 'single' | 'ddp' | 'fsdp' | 'fsdp(no-reshard)',
    then '+ac(...)', '+bf16'/'+fp16', '+compile[(model)]', ..."""
    parts = (t.name_part(self) for t in sorted(TECHNIQUES, key=lambda t: t.name_order))
    return "+".join(p for p in parts if p)


def _compute_dtype_name(self, device_type: str) -> str:
    from strategies.amp import compute_dtype_name

    return compute_dtype_name(self, device_type)


StrategyConfig = dataclasses.make_dataclass(
    "StrategyConfig",
    [(f.name, f.type, dataclasses.field(default=f.default, metadata={"doc": f.doc, "choices": f.choices}))
     for f in _FIELDS],
    namespace={"__post_init__": _post_init, "validate_for": _validate_for, "validate_run": _validate_run,
               "canonical_name": property(_canonical_name), "compute_dtype_name": _compute_dtype_name},
)
StrategyConfig.__module__ = __name__
StrategyConfig.__doc__ = ("One point in the strategy space (presets: bench/conf/strategy/*.yaml). Fields:\n"
                          + "\n".join(f"- {f.name} ({f.type.__name__}, default {f.default!r}): {f.doc}"
                                      for f in _FIELDS))
