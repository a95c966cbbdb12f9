"""Hugging Face transformers' GPT-2 and Llama behind the family's interface (``model.source=hf``).

``build_hf(cfg)`` builds ``GPT2LMHeadModel`` (arch gpt2) or ``LlamaForCausalLM`` (arch llama) from a config made
offline from the ``GPTConfig`` (models/convert.py ``hf_config_dict``), or from ``model.hf_path``'s config.json,
and wraps it in ``HFCausalLM``: the adapter that tells the strategies where the model's parts are, so they
stay model-agnostic --

- ``cfg``: the ``GPTConfig`` (the FLOP and parameter accounting of models/flops.py applies unchanged);
- ``blocks``: the decoder layers as the family's block mapping (keys "0", "1", ...; assigning a key replaces
  the layer inside HF's ``ModuleList``, which is how checkpointing wraps a layer), for FSDP, AC and compile;
- ``head_loss``: HF's LM head and the loss (compiled separately by per-block compile);
- ``init_weights(seed)``: the family's seeded tensors mapped to HF's names and layouts (models/convert.py), so
  ``model=X model.source=hf`` starts from exactly the weights ``model=X`` starts from; or the checkpoint.

The forward is HF's own base model (``transformer`` / ``model``: embeddings, layers, final norm) with SDPA
attention and no KV cache, then HF's ``lm_head``; the loss is the family's fp32 mean cross-entropy on the
(B, T, V) logits -- what ``GPT2LMHeadModel(labels=...)`` computes, with the targets already shifted. HF's head
always materialises the logits (the family's fused, chunked loss, models/loss.py, is not used).
Tensor and pipeline parallelism are the family's only (strategies/tp.py, pp.py refuse ``source=hf``).
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import GPTConfig
from models.convert import HF_EXTRA, hf_config_dict, load_pretrained_into, to_hf
from models.gpt import canonical_name, copy_full_into, init_tensors, lm_loss


def require_transformers():
    """The ``transformers`` module, or one error that names the extra to install."""
    try:
        import transformers
    except ImportError as exc:
        raise ModuleNotFoundError(f"model.source=hf needs the optional Hugging Face extra: {HF_EXTRA}") from exc
    return transformers


def hf_config(cfg: GPTConfig):
    """The transformers config: the checkpoint's own (``cfg.hf_path``, with ``model.dropout`` in place of its
    dropout probabilities: GPT-2 checkpoints carry 0.1, benchmarks run 0) or one made from ``cfg``; SDPA
    attention, no KV cache (training)."""
    tf = require_transformers()
    if cfg.hf_path:
        config = tf.AutoConfig.from_pretrained(cfg.hf_path)
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):  # model.dropout, not the file's
            if hasattr(config, key):
                setattr(config, key, cfg.dropout)
    else:
        fields = hf_config_dict(cfg)
        kind = fields.pop("model_type")
        config = (tf.GPT2Config if kind == "gpt2" else tf.LlamaConfig)(**fields)
    config.use_cache = False
    config._attn_implementation = "sdpa"
    return config


class BlockView:
    """HF's decoder-layer ``ModuleList`` seen as the family's ``blocks`` mapping: keys "0".."L-1"; setting a key
    replaces the layer in the list (HF's forward iterates the list, so it runs the replacement)."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers

    def keys(self) -> list[str]:
        return [str(i) for i in range(len(self.layers))]

    def values(self) -> list[nn.Module]:
        return list(self.layers)

    def items(self) -> list[tuple[str, nn.Module]]:
        return list(zip(self.keys(), self.values()))

    def __getitem__(self, key: str) -> nn.Module:
        return self.layers[int(key)]

    def __setitem__(self, key: str, module: nn.Module) -> None:
        self.layers[int(key)] = module

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.keys())


class HFCausalLM(nn.Module):
    """A transformers causal LM (``.hf``) with the family's interface: ``forward(idx, targets)`` -> loss (or
    logits without targets), ``blocks``, ``head_loss``, ``init_weights(seed)`` and ``cfg``."""

    def __init__(self, cfg: GPTConfig, hf_model: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.hf = hf_model

    def _apply(self, fn, recurse: bool = True):
        """Every module conversion (``to_empty`` after a meta build, ``.to``) gives each module a new parameter,
        which unties a tied head from the embedding: tie them again (HF's ``tie_weights``), as the family's
        model is tied by construction (its head *is* ``tok_emb.weight``)."""
        out = super()._apply(fn, recurse)
        if self.cfg.tie_embeddings:
            head, emb = self.hf.get_output_embeddings(), self.hf.get_input_embeddings()
            if head.weight is not emb.weight:
                head.weight = emb.weight
        return out

    @property
    def blocks(self) -> BlockView:
        base = self.hf.base_model
        return BlockView(base.h if self.cfg.arch == "gpt2" else base.layers)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """The family's seeded init mapped into HF's parameters (or the checkpoint at ``cfg.hf_path``), shard by
        shard under FSDP; then the buffers HF computes at construction (Llama's RoPE frequencies), which a
        meta-device build leaves empty."""
        device = next(self.parameters()).device
        if device.type == "meta":
            raise RuntimeError("init_weights: materialise the model first (model.to_empty(device=...))")
        own = {canonical_name(name).removeprefix("hf."): p for name, p in self.named_parameters()}
        if self.cfg.hf_path:
            load_pretrained_into(own, self.cfg, "hf", device)
        else:
            filled = set()
            for name, full in init_tensors(self.cfg, seed, device):
                for hf_name, t in to_hf(self.cfg, name, full):
                    if hf_name in own:
                        copy_full_into(own[hf_name], t)
                        filled.add(hf_name)
            if filled != set(own):
                raise RuntimeError(f"no family tensor maps to HF's {sorted(set(own) - filled)}")
        for module in self.hf.modules():
            if hasattr(module, "inv_freq"):  # rotary embedding: recompute its frequency buffers on the device
                with torch.device(device):
                    fresh = type(module)(module.config)
                for name, buf in fresh.named_buffers(recurse=False):
                    getattr(module, name).copy_(buf)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's context "
                             f"block_size={self.cfg.block_size}")
        hidden = self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state  # (B, T, d), final norm done
        return self.head_loss(hidden, targets)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """HF's LM head; with targets the fp32 mean next-token cross-entropy (models/gpt.py ``lm_loss``)."""
        logits = self.hf.lm_head(x)  # (B, T, V)
        return logits if targets is None else lm_loss(logits, targets)


def build_hf(cfg: GPTConfig, device: str | torch.device = "meta") -> HFCausalLM:
    """The HF model for ``cfg`` on ``device`` (meta by default: no memory), parameters in fp32 whatever the
    checkpoint's dtype (mixed precision is a strategy)."""
    tf = require_transformers()
    config = hf_config(cfg)
    cls = tf.GPT2LMHeadModel if cfg.arch == "gpt2" else tf.LlamaForCausalLM
    with torch.device(device):
        model = cls(config)
    model.float()
    model.train()
    return HFCausalLM(cfg, model)
