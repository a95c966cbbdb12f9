"""The model family: shapes, causality, init, exact counts, FLOPs vs FlopCounterMode, learning."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import (
    PRESETS,
    GPTConfig,
    build_model,
    count_params,
    forward_flops_per_token,
    get_config,
    non_embedding_param_count,
    param_count,
    train_flops_per_token,
)
from models.gpt import param_shapes
from models.loss import fused_lm_loss
from strategies.ac import recompute_flops_per_token

pytestmark = pytest.mark.unit

ARCH_TINY = ["tiny", "llama-tiny"]


def make(name: str, seed: int = 0, **kw):
    model = build_model(get_config(name, **kw), "cpu")
    model.init_weights(seed)
    return model


# Published GPT-2 sizes (tied embeddings, biases, vocab 50257, context 1024).
PUBLISHED = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_gpt2_param_counts_are_published_counts(name):
    model = build_model(PRESETS[name], "meta")
    assert count_params(model) == PUBLISHED[name]
    assert param_count(PRESETS[name]) == PUBLISHED[name]
    assert all(p.is_meta for p in model.parameters())


def test_padded_vocab_counted_as_padded():
    cfg = get_config("gpt2-small", pad_vocab_to=64)
    assert cfg.padded_vocab_size == 50304
    assert count_params(build_model(cfg, "meta")) == PUBLISHED["gpt2-small"] + (50304 - 50257) * 768


@pytest.mark.parametrize("name", list(PRESETS))
def test_analytic_counts_match_built_model(name):
    """Every preset, tied or not, its vocabulary as is or padded to a multiple of 64 (as tensor parallelism needs):
    the formulas and the cost model's parameter count equal the built model's parameters."""
    from bench.plan.costmodel import cost_context
    from strategies import StrategyConfig

    for tie in (True, False):
        for pad in (1, 64):
            cfg = get_config(name, tie_embeddings=tie, pad_vocab_to=pad)
            model = build_model(cfg, "meta")
            assert count_params(model) == param_count(cfg) == cost_context(cfg, StrategyConfig(), 1, 1, 16).P
            emb = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("tok_emb", "pos_emb")))
            assert non_embedding_param_count(cfg) == count_params(model) - emb
            rows = {n: p.shape[0] for n, p in model.named_parameters() if n in ("tok_emb.weight", "lm_head.weight")}
            assert set(rows.values()) == {cfg.padded_vocab_size} and len(rows) == (1 if tie else 2)
            assert cfg.padded_vocab_size == -(-cfg.vocab_size // pad) * pad  # the next multiple, computed here
            # the planner's shapes from the config alone: the built model's names, order and shapes
            assert param_shapes(cfg) == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    for bias in (True, False):  # the knob every preset leaves at its family's default
        cfg = get_config(name, bias=bias)
        assert param_shapes(cfg) == [(n, tuple(p.shape)) for n, p in build_model(cfg, "meta").named_parameters()]


def test_llama_125m_size_and_knobs():
    cfg = PRESETS["llama-125m"]
    assert 120e6 < param_count(cfg) < 130e6
    model = build_model(cfg, "meta")
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert model.pos_emb is None and cfg.hidden_dim == 2048
    untied = build_model(get_config("llama-125m", tie_embeddings=False), "meta")
    assert untied.lm_head is not None and untied.head_weight is not untied.tok_emb.weight


@pytest.mark.parametrize("name", ARCH_TINY)
def test_shapes_and_loss(name):
    model = make(name)
    idx = torch.randint(0, 256, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, model.cfg.padded_vocab_size)
    loss = model(idx, torch.randint(0, 256, (3, 17)))
    assert loss.shape == () and loss.dtype == torch.float32
    # Untrained GPT-2 init predicts ~uniformly: loss ~ ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3


@pytest.mark.parametrize("name", ARCH_TINY)
def test_causality(name):
    model = make(name).eval()
    idx = torch.randint(0, 256, (2, 32))
    base = model(idx)
    t = 20
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 256
    out = model(changed)
    torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
    assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("name", ARCH_TINY)
def test_init_is_deterministic_and_gpt2_scaled(name):
    a, b, c = make(name, seed=1), make(name, seed=1), make(name, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    L = a.cfg.n_layer
    resid_std = torch.cat([sa[f"blocks.{i}.mlp.proj.weight"].flatten() for i in range(L)]).std().item()
    plain_std = torch.cat([sa[f"blocks.{i}.mlp.fc.weight"].flatten() for i in range(L)]).std().item()
    assert resid_std == pytest.approx(0.02 / (2 * L) ** 0.5, rel=0.05)
    assert plain_std == pytest.approx(0.02, rel=0.05)


def test_meta_build_then_materialise_matches_direct_build():
    direct = make("llama-tiny", seed=3)
    meta = build_model(get_config("llama-tiny"), "meta")
    meta.to_empty(device="cpu")
    meta.init_weights(3)
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(meta(idx), direct(idx), rtol=0, atol=0)


@pytest.mark.parametrize("name", ARCH_TINY)
def test_state_dict_round_trip(name, tmp_path):
    model = make(name, seed=5).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = make(name, seed=6).eval()
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    idx = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(other(idx), model(idx), rtol=0, atol=0)


def counted_train_flops(model, batch: int, seq_len: int) -> int:
    idx = torch.randint(0, 256, (batch, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "name,kw,seq_len",
    [
        ("tiny", {}, 64),
        ("tiny", {"tie_embeddings": False}, 200),
        ("llama-tiny", {}, 32),
        ("llama-tiny", {"n_layer": 3, "n_head": 2, "mlp_hidden": 96, "vocab_size": 300, "pad_vocab_to": 64}, 128),
        ("tiny", {"n_layer": 1, "n_embd": 96, "n_head": 3, "vocab_size": 1000}, 256),
        ("tiny", {"loss_chunk": 48}, 64),  # the fused, chunked loss: the same matmuls, FLOPs unchanged
        ("llama-tiny", {"loss_chunk": 40, "tie_embeddings": False}, 32),
    ],
)
def test_flops_match_flop_counter(name, kw, seq_len):
    model = make(name, **kw)
    batch = 2
    counted = counted_train_flops(model, batch, seq_len)
    expected = train_flops_per_token(model.cfg, seq_len) * batch * seq_len
    assert counted == pytest.approx(expected, rel=0.01)
    # 6N + 12LdT form: N = matmul weights (2-D params except embeddings tables' lookup-only roles).
    cfg = model.cfg
    lookup_only = ("pos_emb",) if cfg.tie_embeddings else ("pos_emb", "tok_emb")
    n_mm = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith(lookup_only))
    assert train_flops_per_token(cfg, seq_len) == 6 * n_mm + 12 * cfg.n_layer * cfg.n_embd * seq_len


def test_recompute_flops_count_what_checkpointing_reruns():
    from torch.utils.checkpoint import checkpoint

    cfg = get_config("tiny")
    model = make("tiny")
    blocks = list(model.blocks.values())

    class Ckpt(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x, rope=None):
            return checkpoint(self.block, x, rope, use_reentrant=False)

    plain = counted_train_flops(model, 2, 64)
    for i in range(0, cfg.n_layer, 2):
        model.blocks[str(i)] = Ckpt(blocks[i])
    ckpt = counted_train_flops(model, 2, 64)
    assert ckpt - plain == recompute_flops_per_token(cfg, 64, "selective", 2) * 2 * 64
    blocks_fwd = forward_flops_per_token(cfg, 64) - 2 * cfg.n_embd * cfg.padded_vocab_size
    mlp_down = 2 * cfg.n_embd * cfg.hidden_dim
    assert recompute_flops_per_token(cfg, 64, "full") == blocks_fwd - cfg.n_layer * mlp_down


@pytest.mark.parametrize("name", ARCH_TINY)
def test_training_reduces_loss_on_learnable_sequence(name):
    torch.manual_seed(0)
    model = make(name)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.randint(0, 256, (8,))
    seq = pattern.repeat(9)[:65]  # periodic: predictable after one period
    x, y = seq[:-1].unsqueeze(0).repeat(4, 1), seq[1:].unsqueeze(0).repeat(4, 1)
    first = model(x, y).item()
    for _ in range(40):
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    last = model(x, y).item()
    assert last < 0.3 * first


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"n_embd": 130}, "n_embd"),
        ({"n_layer": 0}, "n_layer"),
        ({"arch": "mamba"}, "arch"),
        ({"dropout": 1.5}, "dropout"),
        ({"loss_chunk": -1}, "loss_chunk"),
    ],
)
def test_impossible_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **kw)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="gpt2-small.*llama-mini|valid names"):
        get_config("gpt5")


def test_sequence_longer_than_context_is_rejected():
    model = make("tiny")
    with pytest.raises(ValueError, match="block_size=256"):
        model(torch.zeros(1, 257, dtype=torch.long))


@pytest.mark.e2e
def test_cli_json_lists_family():
    out = subprocess.run([sys.executable, "-m", "models", "format=json"], capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert set(rows) == set(PRESETS)
    small = rows["gpt2-small"]
    assert small["params"] == 124439808 and small["seq_len"] == 1024
    assert small["flops_per_token"] == train_flops_per_token(PRESETS["gpt2-small"], 1024)
    assert {"name", "params", "non_embedding_params", "flops_per_token", "seq_len"} <= set(small)


def test_config_is_a_plain_dataclass():
    assert dataclasses.is_dataclass(GPTConfig)


@pytest.mark.parametrize("name,kw", [("tiny", {}), ("llama-tiny", {"tie_embeddings": False})])
def test_fused_chunked_loss_equals_the_plain_path(name, kw):
    """models/loss.py against F.cross_entropy over the full logits, fp32: the loss, every parameter's
    gradient and the head input's, with a chunk that does not divide the tokens and two ignored targets;
    and the evaluation (no-grad) loss."""
    idx = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    targets = idx.roll(-1, 1)
    targets[0, 3] = targets[2, 17] = -100
    out = {}
    for chunk in (0, 48):
        model = make(name, loss_chunk=chunk, **kw)
        h = model.embed(idx)
        h.retain_grad()
        x = h
        rope = (model.rope_cos, model.rope_sin) if model.cfg.arch == "llama" else None
        for block in model.blocks.values():
            x = block(x, rope)
        loss = model.head_loss(x, targets)
        (loss * 3).backward()  # an incoming gradient other than 1 (as grad accumulation and pipelines give)
        with torch.no_grad():
            eval_loss = model(idx, targets)
        out[chunk] = (loss.item(), eval_loss.item(), h.grad.clone(),
                      {n: p.grad.clone() for n, p in model.named_parameters()})
    (l0, e0, h0, g0), (l1, e1, h1, g1) = out[0], out[48]
    assert l1 == pytest.approx(l0, abs=1e-5) and e1 == pytest.approx(e0, abs=1e-5) and e0 == pytest.approx(l0)
    assert torch.allclose(h1, h0, atol=1e-6, rtol=1e-4)
    for n in g0:
        assert torch.allclose(g1[n], g0[n], atol=1e-6, rtol=1e-4), n
    assert l0 > 4  # a real loss (random init over 256 tokens: ~ln 256), not a vacuous zero


def test_fused_loss_under_autocast_matches_the_plain_path():
    """bf16 autocast: logits and matmuls in bf16, softmax and loss in fp32, as the plain path computes them."""
    torch.manual_seed(0)
    x = torch.randn(100, 64, requires_grad=True)
    w = (torch.randn(500, 64) * 0.1).requires_grad_()
    t = torch.randint(0, 500, (100,))
    grads = {}
    for fused in (False, True):
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_lm_loss(x, w, t, 32) if fused else torch.nn.functional.cross_entropy(
                torch.nn.functional.linear(x, w).float(), t)
        loss.backward()
        grads[fused] = (loss.item(), x.grad.clone(), w.grad.clone())
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-3)
    for a, b in zip(grads[True][1:], grads[False][1:]):
        assert a.dtype == torch.float32 and (a - b).abs().max() <= 2e-2 * b.abs().max()
