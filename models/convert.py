"""Checkpoints between the family's model (models/gpt.py) and Hugging Face's GPT2LMHeadModel / LlamaForCausalLM.

    python -m models.convert to=hf src=family.pt dst=hf_dir        # a family checkpoint -> save_pretrained dir
    python -m models.convert to=native src=hf_dir dst=family.pt    # and back

``to=hf`` turns a family checkpoint (``.pt``: its config and state dict) into a ``save_pretrained`` directory;
``to=native`` the other way. The harness reads a directory directly (``model.hf_path=DIR``, either source). The
name mapping and the layouts are documented in models/weights.py, which both implementations share.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.cli import fail, opt, parse
from models.config import GPTConfig
from models.gpt import GPT
from models.hf import build_hf
from models.weights import (
    _hf_names,
    config_from_pretrained,
    from_hf,
    load_native,
    read_safetensors,
    save_native,
    to_hf,
)


def native_names(cfg: GPTConfig) -> list[str]:
    """The family model's parameter names (meta build, no memory)."""
    with torch.device("meta"):
        return [n for n, _ in GPT(dataclasses.replace(cfg, source="native", hf_path="")).named_parameters()]


def native_to_hf_state(cfg: GPTConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name in native_names(cfg):
        out.update(to_hf(cfg, name, state[name]))
    if cfg.tie_embeddings:  # HF's state dict lists the tied head under its own name too
        out["lm_head.weight"] = out[_hf_names(cfg, "tok_emb.weight")[0]]
    return out


def hf_to_native_state(cfg: GPTConfig, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: from_hf(cfg, name, hf_state) for name in native_names(cfg)}


def save_hf(path: str | Path, cfg: GPTConfig, state: dict[str, torch.Tensor]) -> None:
    """A family state dict as a Hugging Face ``save_pretrained`` directory (written by transformers itself)."""
    model = build_hf(dataclasses.replace(cfg, source="hf", hf_path=""), "cpu").hf
    missing, unexpected = model.load_state_dict(native_to_hf_state(cfg, state), strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(str(path))


@dataclass
class ConvertArgs:
    src: str = opt("", "a family checkpoint (.pt) for to=hf; a save_pretrained directory for to=native")
    dst: str = opt("", "where to write: a directory for to=hf, a .pt file for to=native")
    to: str = opt("hf", "hf | native")

    def __post_init__(self) -> None:
        if self.to not in ("hf", "native"):
            raise ValueError(f"to={self.to!r}; valid: hf, native")
        for key in ("src", "dst"):
            if not getattr(self, key):
                raise ValueError(f"{key}= is required")
        src, dst = Path(self.src), Path(self.dst)
        if self.to == "hf" and not src.is_file():
            raise ValueError(f"src={self.src!r}: no such file (to=hf reads a family checkpoint, one .pt file)")
        if self.to == "native" and not src.is_dir():
            raise ValueError(f"src={self.src!r}: no such folder (to=native reads a save_pretrained folder)")
        if self.to == "hf" and dst.exists() and not dst.is_dir():
            raise ValueError(f"dst={self.dst!r} exists and is not a folder (to=hf writes a save_pretrained folder)")
        if self.to == "native" and dst.is_dir():
            raise ValueError(f"dst={self.dst!r} is a folder (to=native writes one .pt file)")
        parent = dst.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"dst={self.dst!r}: cannot write under {parent}")


def convert(args: ConvertArgs) -> str:
    if args.to == "hf":
        cfg, state = load_native(args.src)
        save_hf(args.dst, cfg, state)
        return f"wrote {args.dst} (Hugging Face {cfg.arch}, {len(state)} family tensors)"
    cfg = config_from_pretrained(args.src, GPTConfig())
    state = hf_to_native_state(cfg, read_safetensors(args.src))
    save_native(args.dst, dataclasses.replace(cfg, hf_path=""), state)
    return f"wrote {args.dst} (family {cfg.arch}, {len(state)} tensors)"


def main(argv: list[str] | None = None) -> None:
    args = parse(ConvertArgs, argv, "python -m models.convert", __doc__)
    try:
        print(convert(args))
    except (OSError, ValueError, KeyError, RuntimeError, ModuleNotFoundError) as exc:
        fail("python -m models.convert", str(exc).strip("'\""))


if __name__ == "__main__":
    main()
