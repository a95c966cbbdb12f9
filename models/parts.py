"""Where the mesh strategies find a model's parts, by the model's own module names: one table for the family's
model (models/gpt.py) and Hugging Face's (models/hf.py), so strategies/tp.py and its cost terms stay model-agnostic.

``TPLayout`` names, relative to one block, the modules tensor parallelism splits by output (``colwise``) or by
input (``rowwise``), the norms sequence parallelism runs on a sequence shard, and the attention and MLP modules
whose inputs are gathered back to the full sequence; relative to the model, the token embedding, the final norm
and the LM head. ``sp_split`` says where the residual stream is cut along the sequence under SP:

- ``"embedding"``: the embedding's output is reduce-scattered straight into the shard (the family's llama);
- ``"drop"``: learned positions are added to the full sequence first, then the dropout's input is split
  locally (the family's gpt2);
- ``"first_block"``: HF's base models compute positions, RoPE tables and masks from the embedding output's
  length, so it stays whole and the first block's input is split (HF gpt2 and llama).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import GPTConfig


@dataclass(frozen=True)
class TPLayout:
    colwise: tuple[str, ...]   # per block: split along the output features (each rank whole heads / MLP columns)
    rowwise: tuple[str, ...]   # per block: split along the input features (partial outputs summed)
    norms: tuple[str, ...]     # per block: run on a sequence shard under SP
    attn: str                  # per block: the attention module (its input is gathered under SP)
    mlp: str                   # per block: the MLP module
    attn_input: int | str      # how the block passes attention its input: n positional arguments (hidden states
                               # first), or the hidden states by this keyword
    embedding: str             # model: token embedding
    positions: str | None      # model: learned position embedding (gpt2)
    final_norm: str            # model
    head: str | None           # model: LM head module (None: the family's tied head, tok_emb.weight used functionally)
    sp_split: str              # "embedding" | "drop" | "first_block" (module docstring)
    drop: str | None = None    # model: the module whose input is split when sp_split == "drop"
    conv1d: bool = False       # weights stored (in, out) (GPT-2's Conv1D) instead of nn.Linear's (out, in)

    @property
    def column_inputs(self) -> int:
        """Column-parallel modules per block: under plain TP each re-enters the block's replicated input on its
        own, so each one's input gradient is all-reduced separately in backward (HF llama's separate q/k/v: 5)."""
        return len(self.colwise)


NATIVE_GPT2 = TPLayout(colwise=("attn.qkv", "mlp.fc"), rowwise=("attn.proj", "mlp.proj"), norms=("norm1", "norm2"),
                        attn="attn", mlp="mlp", attn_input=2, embedding="tok_emb", positions="pos_emb",
                        final_norm="norm_f", head="lm_head", sp_split="drop", drop="drop")
NATIVE_LLAMA = TPLayout(colwise=("attn.qkv", "mlp.fc", "mlp.gate"), rowwise=("attn.proj", "mlp.proj"),
                         norms=("norm1", "norm2"), attn="attn", mlp="mlp", attn_input=2, embedding="tok_emb",
                         positions=None, final_norm="norm_f", head="lm_head", sp_split="embedding")
HF_GPT2 = TPLayout(colwise=("attn.c_attn", "mlp.c_fc"), rowwise=("attn.c_proj", "mlp.c_proj"), norms=("ln_1", "ln_2"),
                    attn="attn", mlp="mlp", attn_input=1, embedding="hf.transformer.wte",
                    positions="hf.transformer.wpe", final_norm="hf.transformer.ln_f", head="hf.lm_head",
                    sp_split="first_block", conv1d=True)
HF_LLAMA = TPLayout(colwise=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                              "mlp.up_proj"),
                     rowwise=("self_attn.o_proj", "mlp.down_proj"),
                     norms=("input_layernorm", "post_attention_layernorm"),
                     attn="self_attn", mlp="mlp", attn_input="hidden_states", embedding="hf.model.embed_tokens",
                     positions=None, final_norm="hf.model.norm", head="hf.lm_head", sp_split="first_block")


def tp_layout(cfg: GPTConfig) -> TPLayout:
    """The layout of ``cfg``'s model (its ``source`` and ``arch``)."""
    if cfg.source == "hf":
        return HF_GPT2 if cfg.arch == "gpt2" else HF_LLAMA
    return NATIVE_GPT2 if cfg.arch == "gpt2" else NATIVE_LLAMA


def submodule(model, path: str | None):
    """The module at dotted ``path`` of ``model``, or None when the path is None or a part on the way is absent
    (a pipeline stage that does not own it)."""
    if path is None:
        return None
    out = model
    for part in path.split("."):
        out = getattr(out, part, None)
        if out is None:
            return None
    return out
