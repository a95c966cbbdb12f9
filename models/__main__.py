"""List the model family: ``python -m models`` (table) or ``python -m models format=json``.

Counts come from the config and are checked against a model built on the meta
device, so even gpt2-xl is listed without allocating its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from models.build import build_model
from models.cli import opt, parse  # the one CLI style (a leaf module)
from models.config import PRESETS
from models.flops import adamw_fp32_state_bytes, non_embedding_param_count, param_count, train_flops_per_token
from models.gpt import count_params


def family_rows() -> list[dict]:
    rows = []
    for name, cfg in PRESETS.items():
        n = count_params(build_model(cfg, "meta"))  # meta: shapes only, no memory
        assert n == param_count(cfg), f"{name}: built {n} != analytic {param_count(cfg)}"
        rows.append({
            "name": name,
            "arch": cfg.arch,
            "params": n,
            "non_embedding_params": non_embedding_param_count(cfg),
            "flops_per_token": train_flops_per_token(cfg, cfg.block_size),
            "seq_len": cfg.block_size,
            "vocab": cfg.padded_vocab_size,
            "train_state_bytes_fp32_adamw": adamw_fp32_state_bytes(cfg),
        })
    return rows


@dataclass
class FamilyArgs:
    format: str = opt("table", "table | json")

    def __post_init__(self) -> None:
        if self.format not in ("table", "json"):
            raise ValueError(f"format={self.format!r}; valid: table, json")


def main(argv: list[str] | None = None) -> None:
    args = parse(FamilyArgs, argv, "python -m models", __doc__)
    rows = family_rows()
    if args.format == "json":
        print(json.dumps(rows, indent=1))
        return
    head = (f"{'name':<12} {'arch':<6} {'params':>14} {'non-emb params':>15} {'train GFLOP/tok':>16} "
            f"{'seq':>5} {'vocab':>6} {'fp32+AdamW GiB':>15}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<12} {r['arch']:<6} {r['params']:>14,} {r['non_embedding_params']:>15,} "
              f"{r['flops_per_token'] / 1e9:>16.3f} {r['seq_len']:>5} {r['vocab']:>6} "
              f"{r['train_state_bytes_fp32_adamw'] / 2**30:>15.2f}")
    print("train GFLOP/tok = 3 x forward matmul FLOPs per token at the model's context length (models/flops.py).")


if __name__ == "__main__":
    main()
