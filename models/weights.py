"""Weights and their names, shared by both implementations of the family (models/gpt.py, models/hf.py) and the
checkpoint converter (models/convert.py): the layouts, the name mapping to Hugging Face's GPT2LMHeadModel /
LlamaForCausalLM, config.json in both directions, and reading a checkpoint into a (possibly sharded) model.
Imports nothing of the models above it (a leaf beside models/config.py).

The documented name mapping (``{i}`` = block index; HF names as in ``model.state_dict()``):

    family                         GPT2LMHeadModel                      LlamaForCausalLM
    tok_emb.weight                 transformer.wte.weight               model.embed_tokens.weight
    pos_emb.weight                 transformer.wpe.weight               --
    blocks.{i}.norm1.*             transformer.h.{i}.ln_1.*             model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.qkv.*          transformer.h.{i}.attn.c_attn.*      model.layers.{i}.self_attn.{q,k,v}_proj.*
    blocks.{i}.attn.proj.*         transformer.h.{i}.attn.c_proj.*      model.layers.{i}.self_attn.o_proj.*
    blocks.{i}.norm2.*             transformer.h.{i}.ln_2.*             model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.fc.*            transformer.h.{i}.mlp.c_fc.*         model.layers.{i}.mlp.up_proj.*
    blocks.{i}.mlp.gate.*          --                                   model.layers.{i}.mlp.gate_proj.*
    blocks.{i}.mlp.proj.*          transformer.h.{i}.mlp.c_proj.*       model.layers.{i}.mlp.down_proj.*
    norm_f.*                       transformer.ln_f.*                   model.norm.weight
    lm_head.weight (untied only)   lm_head.weight                       lm_head.weight

Layouts: GPT-2's ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``'s (out, in); the family's
fused q/k/v rows are head-major (H, 3, hd) (``qkv_to_head_major`` below) while GPT-2's ``c_attn`` columns
are (3, H, hd) and Llama's are three separate (H*hd, d) projections. A tied head has no tensor of its own.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch

from models.config import GPTConfig

HF_EXTRA = "pip install -e '.[hf]' (transformers, safetensors, tokenizers, datasets)"

# (family suffix within a block or the root, GPT-2 name, Llama name); None = no such tensor in that model
_ROOT = [("tok_emb.weight", "transformer.wte.weight", "model.embed_tokens.weight"),
         ("pos_emb.weight", "transformer.wpe.weight", None),
         ("norm_f.weight", "transformer.ln_f.weight", "model.norm.weight"),
         ("norm_f.bias", "transformer.ln_f.bias", None),
         ("lm_head.weight", "lm_head.weight", "lm_head.weight")]
_BLOCK = [("norm1.weight", "ln_1.weight", "input_layernorm.weight"),
          ("norm1.bias", "ln_1.bias", None),
          ("attn.qkv.weight", "attn.c_attn.weight", "self_attn.{}_proj.weight"),
          ("attn.qkv.bias", "attn.c_attn.bias", "self_attn.{}_proj.bias"),
          ("attn.proj.weight", "attn.c_proj.weight", "self_attn.o_proj.weight"),
          ("attn.proj.bias", "attn.c_proj.bias", "self_attn.o_proj.bias"),
          ("norm2.weight", "ln_2.weight", "post_attention_layernorm.weight"),
          ("norm2.bias", "ln_2.bias", None),
          ("mlp.fc.weight", "mlp.c_fc.weight", "mlp.up_proj.weight"),
          ("mlp.fc.bias", "mlp.c_fc.bias", "mlp.up_proj.bias"),
          ("mlp.gate.weight", None, "mlp.gate_proj.weight"),
          ("mlp.gate.bias", None, "mlp.gate_proj.bias"),
          ("mlp.proj.weight", "mlp.c_proj.weight", "mlp.down_proj.weight"),
          ("mlp.proj.bias", "mlp.c_proj.bias", "mlp.down_proj.bias")]
_BLOCK_PREFIX = {"gpt2": "transformer.h.{}.", "llama": "model.layers.{}."}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _hf_names(cfg: GPTConfig, name: str) -> list[str]:
    """The HF tensor name(s) a family parameter ``name`` maps to (three for Llama's q/k/v)."""
    col = 1 if cfg.arch == "gpt2" else 2
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    table, suffix = (_BLOCK, m.group(2)) if m else (_ROOT, name)
    target = next((row[col] for row in table if row[0] == suffix), None)
    if target is None:
        raise KeyError(f"{name!r} has no counterpart in the Hugging Face {cfg.arch} model")
    full = (_BLOCK_PREFIX[cfg.arch].format(m.group(1)) if m else "") + target
    return [full.format(p) for p in "qkv"] if "{}" in full else [full]


def to_hf(cfg: GPTConfig, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A family parameter (full shape) as the HF tensor(s) holding the same numbers."""
    names = _hf_names(cfg, name)
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        if cfg.arch == "gpt2":
            t = qkv_from_head_major(tensor, cfg.n_head)  # (3, H, hd) rows
            return [(names[0], t.t().contiguous() if t.ndim == 2 else t)]
        per_head = tensor.reshape(cfg.n_head, 3, cfg.head_dim, *tensor.shape[1:])  # (H, 3, hd, ...)
        return [(n, per_head[:, j].reshape(cfg.n_embd, *tensor.shape[1:]).contiguous()) for j, n in enumerate(names)]
    if cfg.arch == "gpt2" and names[0].endswith(_CONV1D):
        return [(names[0], tensor.t().contiguous())]
    return [(names[0], tensor)]


def from_hf(cfg: GPTConfig, name: str, hf_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full family parameter ``name`` assembled from an HF state dict (the inverse of ``to_hf``)."""
    names = _hf_names(cfg, name)
    missing = [n for n in names if n not in hf_state]
    if missing:
        raise KeyError(f"the checkpoint has no {missing[0]!r} (needed for the family's {name!r})")
    if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):
        if cfg.arch == "gpt2":
            t = hf_state[names[0]]
            return qkv_to_head_major(t.t() if t.ndim == 2 else t, cfg.n_head).contiguous()
        parts = [hf_state[n].reshape(cfg.n_head, cfg.head_dim, *hf_state[n].shape[1:]) for n in names]
        return torch.stack(parts, dim=1).reshape(3 * cfg.n_embd, *parts[0].shape[2:]).contiguous()
    t = hf_state[names[0]]
    return t.t().contiguous() if cfg.arch == "gpt2" and names[0].endswith(_CONV1D) else t



def qkv_to_head_major(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a fused q/k/v projection from GPT-2's (3, H, hd) order to the model's (H, 3, hd) order.

    The model keeps each head's q, k and v rows together (Megatron-LM's layout) so that tensor parallelism
    can split the fused projection by rows and give every rank whole heads; ``qkv_from_head_major`` is
    the inverse (the documented mapping to and from GPT-2 checkpoints)."""
    rest = w.shape[1:]
    return w.reshape(3, n_head, -1, *rest).transpose(0, 1).reshape(w.shape)


def qkv_from_head_major(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``qkv_to_head_major``: (H, 3, hd) rows back to (3, H, hd)."""
    rest = w.shape[1:]
    return w.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(w.shape)


_WRAPPER_SEGMENTS = {"block", "_checkpoint_wrapped_module", "_orig_mod"}


def canonical_name(name: str) -> str:
    """A parameter's name in the bare model: ``blocks.0.block.attn.qkv.weight`` -> ``blocks.0.attn.qkv.weight``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds: a DTensor's local shard (or replica), any other tensor itself. The one
    home of this rule for the harness, the measurements and the strategies (duck-typed: importing
    torch.distributed.tensor costs 0.6 s that a planner run does not need)."""
    return t.to_local() if hasattr(t, "to_local") else t


def copy_full_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-shape tensor into ``p``, keeping only the local shard when ``p`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        # src_data_rank=None: every rank holds the same full tensor, so slice locally, no comms.
        local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        local_part(p).copy_(local)
    else:
        p.copy_(full)


# ---------------------------------------------------------------------------------------------- configs

def hf_config_dict(cfg: GPTConfig) -> dict:
    """The HF ``config.json`` fields of the model ``cfg`` describes (GPT2Config or LlamaConfig keywords)."""
    common = {"vocab_size": cfg.padded_vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": False,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if cfg.arch == "gpt2":
        return {**common, "model_type": "gpt2", "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                "n_positions": cfg.block_size, "n_inner": cfg.hidden_dim, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.dropout}
    return {**common, "model_type": "llama", "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_head, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
            "attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "attention_dropout": cfg.dropout,
            "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def _unsupported(path, key, value, why) -> ValueError:
    return ValueError(f"model.hf_path={str(path)!r}: config.json {key}={value!r} is not supported: {why}")


def config_from_pretrained(path: str | Path, base: GPTConfig) -> GPTConfig:
    """A ``GPTConfig`` for the checkpoint at ``path`` (its config.json): the shape from the file, the rest
    (source, loss_chunk, dropout) from ``base``; named after the directory. Reads JSON only (no transformers).
    Architectures the family cannot express (grouped-query attention, other activations, scaled RoPE) are
    refused with the key that says so."""
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"model.hf_path={str(path)!r}: no config.json there (a save_pretrained directory "
                                "has config.json and model.safetensors)")
    try:
        c = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{file}: not a readable JSON file: {exc}") from None
    if not isinstance(c, dict):
        raise ValueError(f"{file}: holds a JSON {type(c).__name__}, not an object of settings")
    try:
        return _config_from_json(path, c, base)
    except KeyError as exc:
        raise ValueError(f"{file}: lacks the key {exc.args[0]!r} that a {c.get('model_type')} config has") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{file}: {exc}") from None


def _config_from_json(path: Path, c: dict, base: GPTConfig) -> GPTConfig:
    kind = c.get("model_type")
    keep = dict(source=base.source, loss_chunk=base.loss_chunk, dropout=base.dropout, hf_path=str(path),
                name=path.resolve().name, pad_vocab_to=1)
    if kind == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _unsupported(path, "activation_function", act, "the family's GPT-2 uses the tanh GELU (gelu_new)")
        return GPTConfig(arch="gpt2", n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                         vocab_size=c["vocab_size"], block_size=c.get("n_positions", 1024),
                         mlp_hidden=c.get("n_inner") or 0, bias=True,
                         tie_embeddings=c.get("tie_word_embeddings", True),
                         norm_eps=c.get("layer_norm_epsilon", 1e-5), **keep)
    if kind == "llama":
        heads = c["num_attention_heads"]
        if c.get("num_key_value_heads", heads) != heads:
            raise _unsupported(path, "num_key_value_heads", c["num_key_value_heads"],
                               f"grouped-query attention; the family has one k/v head per query head ({heads})")
        if c.get("hidden_act", "silu") != "silu":
            raise _unsupported(path, "hidden_act", c["hidden_act"], "the family's Llama MLP is SwiGLU (silu)")
        if c.get("head_dim") not in (None, c["hidden_size"] // heads):
            raise _unsupported(path, "head_dim", c["head_dim"], "must be hidden_size / num_attention_heads")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise _unsupported(path, "rope_type", rope.get("rope_type", rope.get("type")), "only default RoPE")
        if c.get("attention_bias", False) != c.get("mlp_bias", False):
            raise _unsupported(path, "attention_bias", c.get("attention_bias"), "must equal mlp_bias")
        return GPTConfig(arch="llama", n_layer=c["num_hidden_layers"], n_head=heads, n_embd=c["hidden_size"],
                         vocab_size=c["vocab_size"], block_size=c.get("max_position_embeddings", 2048),
                         mlp_hidden=c["intermediate_size"], bias=bool(c.get("attention_bias", False)),
                         tie_embeddings=c.get("tie_word_embeddings", False), norm_eps=c.get("rms_norm_eps", 1e-6),
                         rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))), **keep)
    raise _unsupported(path, "model_type", kind, "valid model types are gpt2, llama")


# ---------------------------------------------------------------------------------------------- files

def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory (``model.safetensors`` or its sharded index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return [path / "model.safetensors"]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({path / f for f in weight_map.values()})
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index}: not a safetensors index (a JSON object with a weight_map): {exc!r}") from None


def weights_problem(path: str | Path) -> str | None:
    """Why the checkpoint's weights cannot be read, or None, from the files' headers only (nothing is loaded):
    every weight file exists, starts with its header's length (8 bytes, little-endian), holds that much valid
    JSON, and is long enough for the last tensor the header places in it."""
    try:
        files = weight_files(path)
    except ValueError as exc:
        return str(exc)
    for f in files:
        if not f.is_file():
            return f"model.hf_path={str(path)!r}: no {f.name} there (a save_pretrained directory has its weights)"
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                size = f.stat().st_size
                if n <= 0 or 8 + n > size:
                    return f"{f}: not a safetensors file (header length {n} for a file of {size} bytes)"
                header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
            return f"{f}: not a safetensors file: cannot read its header ({exc!r})"
        if 8 + n + end > size:
            return f"{f}: truncated: its header places tensors up to byte {8 + n + end}, the file has {size}"
    return None


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``save_pretrained`` directory (``model.safetensors`` or its sharded index), on CPU."""
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise ModuleNotFoundError(f"reading model.hf_path needs the [hf] extra: {HF_EXTRA}") from exc
    path = Path(path)
    files = weight_files(path)
    if not all(f.is_file() for f in files):
        raise FileNotFoundError(f"model.hf_path={str(path)!r}: no model.safetensors (or its index) there")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_pretrained_into(own: dict[str, torch.Tensor], cfg: GPTConfig, source: str, device, stored=None) -> None:
    """Copy the checkpoint at ``cfg.hf_path`` into the parameters ``own`` (canonical name -> parameter, full or
    a DTensor shard) of a ``source`` model: HF names as they are, the family's through ``from_hf``; ``stored(name,
    full)``, when given, turns a tensor into the layout the model keeps it in (models/hf.py under TP). Each rank
    reads the file and keeps its shard; a parameter the checkpoint lacks is an error naming it."""
    state = read_safetensors(cfg.hf_path)
    for name, p in own.items():
        if source == "native":
            state[name] = from_hf(cfg, name, state)  # the family's names, assembled from HF's
        if name not in state:
            raise KeyError(f"model.hf_path={cfg.hf_path!r} has no tensor {name!r}")
        full = state[name]
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"model.hf_path={cfg.hf_path!r}: {name} has shape {tuple(full.shape)}, the model "
                             f"{tuple(p.shape)}")
        full = full.to(device=device, dtype=p.dtype)
        copy_full_into(p, stored(name, full) if stored else full)


def save_native(path: str | Path, cfg: GPTConfig, state: dict[str, torch.Tensor]) -> None:
    """A family checkpoint: ``{"config": GPTConfig fields, "model": state dict}`` in one ``torch.save`` file."""
    torch.save({"config": dataclasses.asdict(cfg), "model": {k: v.detach().cpu() for k, v in state.items()}}, path)


def load_native(path: str | Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """A family checkpoint written by ``save_native``; anything else is a ValueError naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (a family checkpoint is one .pt file)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return GPTConfig(**blob["config"]), blob["model"]
    except Exception as exc:  # pickle, zip and key errors alike: the file is not what save_native writes
        raise ValueError(f"{path}: not a family checkpoint (a torch.save of {{'config', 'model'}}): "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
