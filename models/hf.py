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
Tensor parallelism finds HF's modules through models/parts.py's layout (``prepare_tp`` regroups GPT-2's fused
q/k/v columns per rank); a pipeline stage (``keep_stage``) runs the stage loop ``_stage_forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import GPTConfig
from models.gpt import init_tensors, lm_loss
from models.weights import HF_EXTRA, canonical_name, copy_full_into, hf_config_dict, load_pretrained_into, to_hf


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
    replaces the layer in the list (HF's forward iterates the list, so it runs the replacement). A pipeline
    stage holds its layers in a ``ModuleDict`` keyed by global index instead (``keep_stage``)."""

    def __init__(self, layers: nn.ModuleList | nn.ModuleDict):
        self.layers = layers

    def _key(self, key: str):
        return key if isinstance(self.layers, nn.ModuleDict) else int(key)

    def keys(self) -> list[str]:
        if isinstance(self.layers, nn.ModuleDict):
            return list(self.layers.keys())
        return [str(i) for i in range(len(self.layers))]

    def values(self) -> list[nn.Module]:
        return [self.layers[self._key(k)] for k in self.keys()]

    def items(self) -> list[tuple[str, nn.Module]]:
        return list(zip(self.keys(), self.values()))

    def __getitem__(self, key: str) -> nn.Module:
        return self.layers[self._key(key)]

    def __setitem__(self, key: str, module: nn.Module) -> None:
        self.layers[self._key(key)] = module

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
        self.staged = False   # a pipeline stage (keep_stage): the forward is the stage loop, not HF's base model
        self.qkv_groups = 1   # GPT-2's c_attn columns as this many [q|k|v] groups (prepare_tp); 1 = HF's layout
        self.seq_shards = 1   # under sequence parallelism a stage's hidden-state input is 1/seq_shards of the sequence

    def _apply(self, fn, recurse: bool = True):
        """Every module conversion (``to_empty`` after a meta build, ``.to``) gives each module a new parameter,
        which unties a tied head from the embedding: tie them again (HF's ``tie_weights``), as the family's
        model is tied by construction (its head *is* ``tok_emb.weight``)."""
        out = super()._apply(fn, recurse)
        if self.cfg.tie_embeddings:
            head, emb = self.hf.get_output_embeddings(), self.hf.get_input_embeddings()
            if head is not None and emb is not None and head.weight is not emb.weight:  # a stage may hold neither
                head.weight = emb.weight
        return out

    @property
    def blocks(self) -> BlockView:
        base = self.hf.base_model
        return BlockView(base.h if self.cfg.arch == "gpt2" else base.layers)

    def keep_stage(self, keep: set[str], first: bool, last: bool) -> None:
        """Make this (meta-device) model a pipeline stage (strategies/pp.py ``split_stage``): only the layers
        ``keep`` (in a ``ModuleDict`` keyed by global index, so parameter names and the seeded init stay the whole
        model's), the embeddings if ``first``, the final norm and head if ``last``."""
        base, gpt2 = self.hf.base_model, self.cfg.arch == "gpt2"
        attr = "h" if gpt2 else "layers"
        layers = getattr(base, attr)
        setattr(base, attr, nn.ModuleDict({str(i): layer for i, layer in enumerate(layers) if str(i) in keep}))
        if not first:
            for name in ("wte", "wpe") if gpt2 else ("embed_tokens",):
                setattr(base, name, None)
        if not last:
            setattr(base, "ln_f" if gpt2 else "norm", None)
            self.hf.lm_head = None
        self.staged = True

    def prepare_tp(self, tp: int, sp: bool) -> None:
        """Local facts tensor parallelism needs before it splits the weights (strategies/tp.py): GPT-2's fused
        ``c_attn`` output is cut into q, k, v by ``split_size`` (the full width), so its columns are regrouped as
        ``tp`` groups of [q|k|v] over H/tp heads (``stored_layout``) and each rank splits its own columns by
        d/tp; under SP a later pipeline stage's input is a sequence shard (``seq_shards``)."""
        self.seq_shards = tp if sp else 1
        if self.cfg.arch == "gpt2" and tp > 1:
            self.qkv_groups = tp
            for block in self.blocks.values():
                block.attn.split_size = self.cfg.n_embd // tp

    def stored_layout(self, name: str, full: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """HF's full tensor ``name`` in the layout this model keeps it in (``inverse``: back to HF's). Only GPT-2's
        ``c_attn`` under TP differs: its last dimension [q | k | v] (each H heads) becomes ``qkv_groups`` groups
        [q_g | k_g | v_g] of H/groups heads, so a column split gives each rank its own heads' q, k and v."""
        g = self.qkv_groups
        if g == 1 or not name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            return full
        *lead, n = full.shape
        outer, inner = (g, 3) if inverse else (3, g)
        return full.reshape(*lead, outer, inner, n // (3 * g)).transpose(-3, -2).reshape(*lead, n)

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
            load_pretrained_into(own, self.cfg, "hf", device, stored=self.stored_layout)
        else:
            filled = set()
            for name, full in init_tensors(self.cfg, seed, device):
                for hf_name, t in to_hf(self.cfg, name, full):
                    if hf_name in own:
                        copy_full_into(own[hf_name], self.stored_layout(hf_name, t))
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
        if self.staged:
            return self._stage_forward(idx, targets)
        hidden = self.hf.base_model(input_ids=idx, use_cache=False).last_hidden_state  # (B, T, d), final norm done
        return self.head_loss(hidden, targets)

    def _stage_forward(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """A pipeline stage: HF's base-model forward restricted to the parts this stage holds -- token (+ learned
        position) embeddings if first (input: token ids), else the previous stage's hidden states; the layers,
        called as HF's base model calls them (no mask: SDPA's causal path, as HF's own for unpadded input; Llama's
        RoPE tables from HF's rotary module over the whole sequence); final norm and head if last, else the hidden
        states. Tested against HF's whole-model forward (tests/test_hf.py)."""
        base, gpt2 = self.hf.base_model, self.cfg.arch == "gpt2"
        emb = base.wte if gpt2 else base.embed_tokens
        T = x.shape[1] if emb is not None else x.shape[1] * self.seq_shards
        pos = torch.arange(T, device=x.device).unsqueeze(0)
        h = x
        if emb is not None:
            h = emb(x)
            if gpt2:
                h = base.drop(h + base.wpe(pos))
        kwargs = {"attention_mask": None, "position_ids": pos}
        if not gpt2:
            kwargs["position_embeddings"] = base.rotary_emb(h, position_ids=pos)
        for layer in self.blocks.values():
            h = layer(h, **kwargs)
        norm = base.ln_f if gpt2 else base.norm
        return h if norm is None else self.head_loss(norm(h), targets)

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
