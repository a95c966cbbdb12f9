"""Each strategy tested by what it does (not that it ran)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.harness.config import ConfigError
from bench.harness.dist import resolve_backend, resolve_device
from models import build_model, get_config
from strategies import StrategyConfig, StrategyError, apply_ac, apply_strategies, get_autocast, unwrap
from strategies.ac import CheckpointWrapper, recompute_flops_per_token

pytestmark = pytest.mark.unit


def fresh(name="tiny", seed=0):
    model = build_model(get_config(name), "meta")
    return apply_strategies(model, StrategyConfig(), torch.device("cpu"), seed)


def saved_bytes_and_flops(model, idx):
    """Bytes autograd saves for backward in forward, and forward+backward FLOPs (math SDPA)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(idx, idx)
        loss.backward()
    return total[0], fc.get_total_flops()


@pytest.mark.parametrize("mode", ["full", "op"])
def test_checkpointing_trades_flops_for_saved_activations(mode):
    idx = torch.randint(0, 256, (2, 128))
    plain = fresh()
    ckpt = apply_ac(fresh(), mode)
    assert all(isinstance(b, CheckpointWrapper) for b in ckpt.blocks.values())
    bytes_plain, flops_plain = saved_bytes_and_flops(plain, idx)
    bytes_ckpt, flops_ckpt = saved_bytes_and_flops(ckpt, idx)
    assert bytes_ckpt < 0.7 * bytes_plain if mode == "full" else bytes_ckpt < bytes_plain
    extra = recompute_flops_per_token(plain.cfg, 128, mode) * idx.numel()
    assert flops_ckpt - flops_plain == extra
    assert (extra > 0) == (mode == "full")
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_selective_wraps_every_kth_block():
    model = apply_ac(fresh(), "selective", every=3)
    assert [isinstance(b, CheckpointWrapper) for b in model.blocks.values()] == [True, False, False, True]


def test_autocast_runs_matmuls_in_bf16_and_keeps_fp32_params():
    model = fresh()
    seen = []
    model.blocks["0"].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with get_autocast("bf16", "none", "cpu"):
        loss = model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8)))
    assert seen == [torch.bfloat16] and loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(get_autocast("bf16", "fsdp", "cpu"), type(get_autocast("fp32", "none", "cpu")))  # no stacking


def _fsdp_worker(rank, world, amp):
    model = build_model(get_config("tiny"), "meta")
    model = apply_strategies(model, StrategyConfig(dp="fsdp", amp=amp), torch.device("cpu"), 0)
    from torch.distributed.tensor import DTensor, Shard

    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params.values())
    qkv = params["blocks.0.attn.qkv.weight"]
    local_rows = qkv.to_local().shape[0]
    seen = []
    model.blocks["0"].attn.qkv.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    model(torch.randint(0, 256, (1, 8)), torch.randint(0, 256, (1, 8))).backward()
    full = qkv.full_tensor()
    return {"local_rows": local_rows, "global_rows": qkv.shape[0], "dtypes": seen, "full": full,
            "grad_is_dtensor": isinstance(qkv.grad, DTensor), "grad_dtype": qkv.grad.dtype}


@pytest.mark.dist
def test_fsdp_shards_parameters_and_applies_mixed_precision_policy(ranks):
    out = ranks(_fsdp_worker, "fp32")
    assert [o["local_rows"] for o in out] == [192, 192] and out[0]["global_rows"] == 384
    torch.testing.assert_close(out[0]["full"], fresh().blocks["0"].attn.qkv.weight.detach())  # same init as single
    out16 = ranks(_fsdp_worker, "bf16")
    assert out16[0]["dtypes"] == [(torch.bfloat16, torch.bfloat16)]  # unsharded params cast for compute
    assert out16[0]["grad_dtype"] == torch.float32 and out16[0]["grad_is_dtensor"]  # sharded fp32 grads


def _ddp_worker(rank, world):
    model = build_model(get_config("tiny"), "meta")
    model = apply_strategies(model, StrategyConfig(dp="ddp"), torch.device("cpu"), 0)
    g = torch.Generator().manual_seed(7)
    batch = torch.randint(0, 256, (4, 16), generator=g)
    mine = batch[2 * rank: 2 * rank + 2]
    model(mine, mine).backward()
    return {n: p.grad for n, p in unwrap(model).named_parameters()}


@pytest.mark.dist
def test_ddp_gradients_equal_single_process_on_concatenated_batch(ranks):
    out = ranks(_ddp_worker)
    ref = fresh()
    batch = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(7))
    ref(batch, batch).backward()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(out[0][n], p.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out[1][n], p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.dist
def test_compiled_block_matches_eager():
    eager = fresh(seed=4)
    compiled = fresh(seed=4)
    compiled.blocks["0"].compile()
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(compiled(idx, idx), eager(idx, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fields,name",
    [
        ({}, "single"),
        ({"dp": "fsdp", "ac": "full", "amp": "bf16", "compile": True}, "fsdp+ac(full)+bf16+compile"),
        ({"dp": "fsdp", "reshard_after_forward": False}, "fsdp(no-reshard)"),
        ({"dp": "ddp", "ac": "selective", "ac_every": 3, "compile": True, "compile_mode": "model"},
         "ddp+ac(selective/3)+compile(model)"),
        ({"amp": "fp16"}, "single+fp16"),
    ],
)
def test_canonical_names(fields, name):
    assert StrategyConfig(**fields).canonical_name == name


def test_invalid_combinations_are_refused_before_training():
    with pytest.raises(StrategyError, match="fp16 with dp=fsdp"):
        StrategyConfig(dp="fsdp", amp="fp16")
    with pytest.raises(StrategyError, match="valid values: none, full, selective, op"):
        StrategyConfig(ac="sometimes")
    with pytest.raises(StrategyError, match="world_size=2"):
        StrategyConfig().validate_for("cpu", 2)
    with pytest.raises(StrategyError, match="needs a CUDA device"):
        StrategyConfig(amp="fp16").validate_for("cpu", 1)
    StrategyConfig(amp="fp16").validate_for("cuda", 1)
    assert StrategyConfig().compute_dtype_name("cuda") == "tf32"
    assert StrategyConfig(tf32=False).compute_dtype_name("cuda") == "fp32"
    assert StrategyConfig().compute_dtype_name("cpu") == "fp32"


def test_backend_and_device_selection(monkeypatch):
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(ConfigError, match="nccl"):
        resolve_backend("nccl", torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("auto", 3) == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="LOCAL_RANK=5"):
        resolve_device("cuda", 5)
    assert resolve_device("cpu", 1) == torch.device("cpu")


def test_applying_twice_in_one_process_gives_the_same_model():
    a, b = fresh(seed=9), fresh(seed=9)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not dist.is_initialized()


@pytest.mark.parametrize("ac", ["full", "selective", "op"])
def test_wrapped_blocks_get_the_bare_models_initial_weights(ac):
    """init_weights draws in the whole model's order by bare parameter names; a checkpoint wrapper's extra path
    segment must not hide a parameter from it (it would stay uninitialised memory)."""
    from models.weights import canonical_name as _canonical

    bare = fresh()
    wrapped = apply_strategies(build_model(get_config("tiny"), "meta"), StrategyConfig(ac=ac), torch.device("cpu"), 0)
    names = {_canonical(n): p for n, p in wrapped.named_parameters()}
    assert any(n != _canonical(n) for n, _ in wrapped.named_parameters())  # the wrapper does rename
    assert names.keys() == dict(bare.named_parameters()).keys()
    for name, p in bare.named_parameters():
        assert torch.equal(names[name], p), name
