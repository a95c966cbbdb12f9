"""Hugging Face models under the same harness (models/hf.py, models/convert.py, bench/harness/data.py).

- Same seed, same weights: ``model=X model.source=hf`` holds exactly the tensors ``model=X`` holds (through the
  documented name mapping), gives the same logits (within 1e-5, fp32) and the same loss trajectory (RTOL 1e-5,
  as tests/test_parity.py), for GPT2LMHeadModel (Conv1D, tied head) and LlamaForCausalLM (RoPE, RMSNorm,
  SwiGLU), tied and untied, with biases.
- The data-parallel strategies on HF models, on 2 real gloo ranks: after one SGD step the gradients (gathered,
  mapped to the family's names) equal the *family's* single-process ones; compile per block keeps the losses.
- The accounting: parameter counts and FlopCounterMode's FLOPs equal models/flops.py's for the HF models.
- Checkpoints: ``python -m models.convert`` both ways (transformers' own ``from_pretrained`` reads what it
  writes); a fine-tuning run from a directory this test saved (tiny GPT-2 + a BPE tokenizer trained here with
  the ``tokenizers`` library) writes an ok row with a falling loss on real text (the README).
- The data formats: nanoGPT's train.bin, saved HF datasets (input_ids or text column), text through the
  checkpoint's tokenizer.

Needs the ``[hf]`` extra; without it the file is skipped, except under CI, where it fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest

from tests.helpers import HF_ABSENT, HF_MISSING, HF_SKIP_ALLOWED  # noqa: E402

if HF_MISSING:  # skipped only when asked (N00BGPT_ALLOW_NO_HF=1), never without a word
    if HF_SKIP_ALLOWED:
        pytest.skip(HF_ABSENT, allow_module_level=True)
    raise ImportError(f"{HF_ABSENT}, or set N00BGPT_ALLOW_NO_HF=1 to run the suite without the HF tests")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench.harness.config import ConfigError, RunConfig  # noqa: E402
from bench.harness.data import build_data, data_problem, load_tokens  # noqa: E402
from models import build_model, count_params, get_config, param_count, train_flops_per_token  # noqa: E402
from models.config import GPTConfig  # noqa: E402
from models.convert import hf_to_native_state, native_to_hf_state  # noqa: E402
from models.weights import load_native, save_native  # noqa: E402
from strategies import StrategyConfig  # noqa: E402
from tests.helpers import ROOT, run_cli  # noqa: E402
from tests.helpers.training import BF16_RTOL, GRAD_RTOL, RTOL, assert_same, losses_of, run_case, run_cfg  # noqa: E402

pytestmark = pytest.mark.dist

CASES = [("tiny", {}), ("tiny", {"tie_embeddings": False, "mlp_hidden": 384}), ("llama-tiny", {}),
         ("llama-tiny", {"tie_embeddings": False, "bias": True, "rope_theta": 500000.0})]


def _pair(preset: str, overrides: dict, seed: int = 7):
    """The family's model and the HF one, each built as the harness builds them (meta, then materialised and
    initialised from the seed)."""
    out = []
    for source in ("native", "hf"):
        m = build_model(get_config(preset, source=source, **overrides), "meta")
        m.to_empty(device="cpu")
        m.init_weights(seed)
        out.append(m)
    return out


def _hf_state(model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("hf."): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset,overrides", CASES)
def test_same_seed_same_weights_same_logits(preset, overrides):
    native, hf = _pair(preset, overrides)
    cfg = native.cfg
    hf_state = _hf_state(hf)
    expected = native_to_hf_state(cfg, dict(native.named_parameters()))
    assert set(expected) == {k for k in hf_state if "rotary" not in k}
    for name, t in expected.items():
        assert torch.equal(hf_state[name], t), name
    back = hf_to_native_state(cfg, hf_state)  # and the way back: the family's exact tensors
    for name, p in native.named_parameters():
        assert torch.equal(back[name], p), name
    if cfg.tie_embeddings:  # still one tensor after materialisation
        assert hf.hf.lm_head.weight is hf.hf.get_input_embeddings().weight
    assert count_params(hf) == count_params(native) == param_count(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = native(idx), hf(idx)
    assert a.shape == b.shape == (2, 48, cfg.padded_vocab_size)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_same_loss_trajectory_as_the_family(preset, corpus):
    """10 AdamW steps through the harness on text: the HF model's losses are the family's (fp32)."""
    ref = losses_of(run_cfg({}, 2, 2, model=preset, data=corpus))
    got = losses_of(run_cfg({}, 2, 2, model=f"{preset}:hf", data=corpus))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=RTOL, atol=0)
    assert ref[-1] < 0.8 * ref[0]


def test_bf16_autocast_and_compile_keep_the_family_losses(corpus):
    """bf16 autocast: HF against the family, both under autocast, within the bf16 bound; compile per block
    (HF's decoder layers and its head) against the family's fp32 losses within RTOL."""
    kw = dict(data=corpus, steps=3, seq_len=16)
    ref = losses_of(run_cfg({"amp": "bf16"}, 1, 2, model="tiny", **kw))
    got = losses_of(run_cfg({"amp": "bf16"}, 1, 2, model="tiny:hf", **kw))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=BF16_RTOL, atol=0)
    ref = losses_of(run_cfg({}, 2, 2, model="tiny", **kw))
    got = losses_of(run_cfg({"compile": True}, 2, 2, model="tiny:hf", **kw))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=RTOL, atol=0)


# (strategy fields, model, micro_batch, grad_accum) per rank on 2 ranks: 4 sequences per step.
DP_CASES = {
    "ddp": ({"dp": "ddp"}, "tiny:hf", 2, 1),
    "fsdp_ac_full": ({"dp": "fsdp", "ac": "full"}, "tiny:hf", 1, 2),
    "fsdp_ac_op_llama": ({"dp": "fsdp", "ac": "op"}, "llama-tiny:hf", 2, 1),
    "ddp_ac_selective_llama": ({"dp": "ddp", "ac": "selective", "ac_every": 2}, "llama-tiny:hf", 2, 1),
}


def _dp_worker(rank: int, world_size: int, corpus: str) -> dict:
    return {name: run_case(rank, world_size, fields, mb, ga, "sgd", 1, corpus, model)
            for name, (fields, model, mb, ga) in DP_CASES.items()}


def _as_family(model: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from tests.helpers.training import model_cfg

    return hf_to_native_state(model_cfg(model), {k.removeprefix("hf."): v for k, v in tensors.items()})


def test_data_parallel_strategies_on_hf_match_the_familys_gradients(ranks, corpus):
    refs = {m: run_case(0, 1, {}, 2, 2, "sgd", 1, corpus, m) for m in ("tiny", "llama-tiny")}
    per_rank = ranks(_dp_worker, corpus)
    for name, (_, model, _, _) in DP_CASES.items():
        ref = refs[model.split(":")[0]]
        for rank in range(2):
            out = per_rank[rank][name]
            assert_same(_as_family(model, out["grads"]), ref["grads"], f"{name} rank {rank} SGD gradients", GRAD_RTOL)
            assert_same(_as_family(model, out["params"]), ref["params"], f"{name} rank {rank} params after SGD")


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_flops_and_params_of_hf_models_match_the_accounting(preset):
    cfg = get_config(preset, source="hf")
    model = build_model(cfg, "meta")
    model.to_empty(device="cpu")
    model.init_weights(0)
    assert count_params(model) == param_count(cfg)
    B, T = 2, 64
    idx = torch.randint(0, 256, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    assert counter.get_total_flops() == train_flops_per_token(cfg, T) * B * T


@pytest.mark.parametrize("preset,overrides", [CASES[1], CASES[3]])
def test_convert_both_ways_and_transformers_reads_it(tmp_path, preset, overrides):
    from transformers import AutoModelForCausalLM

    from models.convert import main

    native, _ = _pair(preset, overrides, seed=3)
    cfg = native.cfg
    save_native(tmp_path / "family.pt", cfg, dict(native.named_parameters()))
    main(["to=hf", f"src={tmp_path / 'family.pt'}", f"dst={tmp_path / 'hfdir'}"])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hfdir", attn_implementation="sdpa").eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=idx).logits, native(idx), rtol=1e-5, atol=1e-5)
    main(["to=native", f"src={tmp_path / 'hfdir'}", f"dst={tmp_path / 'back.pt'}"])
    cfg2, state = load_native(tmp_path / "back.pt")
    for field in ("arch", "n_layer", "n_head", "n_embd", "vocab_size", "block_size", "hidden_dim", "use_bias",
                  "tie_embeddings", "norm_eps", "rope_theta"):
        assert getattr(cfg2, field) == getattr(cfg, field), field
    assert set(state) == {n for n, _ in native.named_parameters()}
    for name, p in native.named_parameters():
        assert torch.equal(state[name], p), name


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    from models.convert import main

    for argv, expect in ((["to=onnx", "src=a", "dst=b"], "to='onnx'; valid: hf, native"),
                         (["to=native", f"src={tmp_path}", "dst=b.pt"], "no config.json there")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------- checkpoints

README_TEXT = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A save_pretrained directory: a tiny GPT-2 (random init) and a byte-level BPE tokenizer trained here
    on the README (512 tokens, <|endoftext|> as the end-of-text token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("ckpt") / "tiny-gpt2-readme"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([README_TEXT], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=tok.get_vocab_size(), n_positions=128,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(out)
    return out


@pytest.mark.e2e
def test_fine_tuning_from_a_local_checkpoint_writes_an_ok_row(checkpoint, tmp_path):
    """README's command: the checkpoint's shape, weights and tokenizer; a falling loss on real text."""
    res = run_cli(["model.source=hf", f"model.hf_path={checkpoint}", f"data={ROOT / 'README.md'}", "steps=15",
                   "warmup=0", "micro_batch=4", "seq_len=64", "lr=3e-3", "measure_comm=false",
                   f"results_dir={tmp_path}"])
    assert res.returncode == 0, res.stderr[-3000:]
    from reports.load import load, load_steps

    row = load(tmp_path).iloc[-1]
    assert (row.status, row.model, row.model_source, row.arch) == ("ok", "tiny-gpt2-readme", "hf", "gpt2")
    config = json.loads((checkpoint / "config.json").read_text())
    n = config["n_layer"] * (12 * 64 * 64 + 13 * 64) + (config["vocab_size"] + 128) * 64 + 2 * 64
    assert row.params == n
    assert row.config["model"]["hf_path"] == str(checkpoint)
    losses = load_steps(tmp_path, row.run_id).loss.tolist()
    assert len(losses) == 15 and losses[-1] < 0.9 * losses[0], losses  # measured 6.26 -> 5.49


def test_checkpoint_loads_into_either_implementation(checkpoint, tmp_path):
    """``model.hf_path`` with source=native converts the checkpoint into the family's model: the same losses
    as HF's on the checkpoint's tokens (ids above 255: its tokenizer, not bytes)."""
    def cfg(source):
        return RunConfig(model=GPTConfig(source=source, hf_path=str(checkpoint)), strategy=StrategyConfig(),
                         steps=4, warmup=0, micro_batch=2, seq_len=64, log_every=0, lr=1e-3,
                         data=str(ROOT / "README.md"), measure_comm=False, results_dir=str(tmp_path))
    hf_cfg = cfg("hf")
    assert hf_cfg.model.name == "tiny-gpt2-readme" and hf_cfg.model.vocab_size == 512
    assert hf_cfg.model.n_embd == 64 and hf_cfg.model.block_size == 128
    tokens, how = load_tokens(hf_cfg.data, str(checkpoint))
    assert "tokenizer.json" in how and int(tokens.max()) > 255
    torch.testing.assert_close(torch.tensor(losses_of(cfg("native"))), torch.tensor(losses_of(hf_cfg)),
                               rtol=RTOL, atol=0)


# ---------------------------------------------------------------------------------------------- data

def test_nanogpt_train_bin_windows(tmp_path):
    ids = (np.arange(5000) * 7 % 311).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    (tmp_path / "val.bin").write_bytes(b"")
    data = build_data(str(tmp_path), 400, 3, 16, 0, torch.device("cpu"), 2)
    assert data.mapped  # memory-mapped, gathered on the host
    starts = set()
    for step in range(3):
        for index in range(2):
            x, y = data.batch(step, index)
            assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
            for row_x, row_y in zip(x.numpy(), y.numpy()):
                match = [s for s in range(0, len(ids) - 16, 16) if (ids[s:s + 16] == row_x).all()]
                assert len(match) == 1 and (row_y == ids[match[0] + 1:match[0] + 17]).all()
                starts.add(match[0])
    assert len(starts) == 18  # distinct windows of the window grid
    assert "token id 310" in data_problem(str(tmp_path / "train.bin"), 16, 3, 300)


def test_saved_hf_datasets(tmp_path, checkpoint):
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]] * 3, "x": [0] * 6}).save_to_disk(tmp_path / "ids")
    tokens, how = load_tokens(str(tmp_path / "ids"))
    assert tokens.tolist() == [1, 2, 3, 4, 5] * 3 and how == "hf-dataset input_ids"
    docs = ["the quick brown fox", "pack my box"] * 2
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(tmp_path / "text")
    tokens, _ = load_tokens(str(tmp_path / "text"))  # no tokenizer: bytes
    assert bytes(tokens.tolist()) == "".join(docs).encode()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    tokens, _ = load_tokens(str(tmp_path / "text"), str(checkpoint))
    assert tokens.tolist() == [i for d in docs for i in tok.encode(d).ids + [eos]]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(tmp_path / "v")
    assert "splits ['validation'], none named 'train'" in data_problem(str(tmp_path / "v"), 4, 1, 512)
    datasets.Dataset.from_dict({"foo": docs}).save_to_disk(tmp_path / "foo")
    assert "columns ['foo']; need 'input_ids' or 'text'" in data_problem(str(tmp_path / "foo"), 4, 1, 512)


def test_text_through_the_checkpoints_tokenizer(tmp_path, checkpoint):
    from tokenizers import Tokenizer

    (tmp_path / "a.txt").write_text("hello world, hello tokens")
    tokens, how = load_tokens(str(tmp_path / "a.txt"), str(checkpoint))
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    assert tokens.tolist() == tok.encode("hello world, hello tokens").ids + [tok.token_to_id("<|endoftext|>")]
    assert how.startswith("text, tokens from") and how.endswith("tokenizer.json")


# ---------------------------------------------------------------------------------------------- mesh pieces
# (the TP/SP/PP parity runs on real gloo ranks are in tests/test_mesh.py, beside the family's)

@pytest.mark.parametrize("preset", ["tiny:untied", "llama-tiny:untied"])
def test_pipeline_stages_chained_give_hfs_whole_model_logits(preset):
    """HF's stage loop (models/hf.py ``_stage_forward``: no mask, RoPE over the whole sequence) through 2 and 3
    stages gives the logits of HF's own whole-model forward; stages keep global layer names."""
    from strategies.pp import split_stage
    from tests.helpers.training import model_cfg

    cfg = model_cfg(preset + ":hf")
    whole = build_model(cfg, "meta")
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    parts = []
    for m in (whole, *[split_stage(whole, i, n) for n in (2, 3) for i in range(n)]):
        m.to_empty(device="cpu")
        m.init_weights(5)
        parts.append(m)
    ref = parts[0](idx)
    for stages in (parts[1:3], parts[3:6]):
        x = idx
        for stage in stages:
            x = stage(x)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)
    names = [n for n, _ in parts[3].named_parameters()] + [n for n, _ in parts[5].named_parameters()]
    assert any(".0." in n for n in names) and any(f".{cfg.n_layer - 1}." in n for n in names)
    assert not any(f".{cfg.n_layer // 2}." in n for n in [n for n, _ in parts[3].named_parameters()])


def test_gpt2_fused_qkv_is_regrouped_per_tensor_parallel_rank():
    """Under TP, HF GPT-2's c_attn columns [q | k | v] are kept as tp groups [q_r | k_r | v_r], so rank r's
    contiguous column shard holds exactly its heads' q, k and v; ``inverse`` restores HF's layout."""
    cfg = get_config("tiny", source="hf")
    model = build_model(cfg, "meta")
    model.prepare_tp(2, sp=False)
    d = cfg.n_embd
    w = torch.randn(d, 3 * d)
    stored = model.stored_layout("hf.transformer.h.0.attn.c_attn.weight", w)
    q, k, v = w.split(d, dim=1)
    for r in range(2):
        cols = slice(r * d // 2, (r + 1) * d // 2)
        torch.testing.assert_close(stored[:, r * 3 * d // 2:(r + 1) * 3 * d // 2],
                                   torch.cat([q[:, cols], k[:, cols], v[:, cols]], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(model.stored_layout("x.attn.c_attn.weight", stored, inverse=True), w, rtol=0, atol=0)
    b = torch.arange(3 * d, dtype=torch.float32)
    assert torch.equal(model.stored_layout("x.attn.c_attn.bias", model.stored_layout("x.attn.c_attn.bias", b),
                                           inverse=True), b)
    assert torch.equal(model.stored_layout("x.attn.c_proj.weight", w[:, :d]), w[:, :d])  # only c_attn moves
    assert all(block.attn.split_size == d // 2 for block in model.blocks.values())


# ---------------------------------------------------------------------------------------------- refusals

def test_missing_extra_and_unsupported_checkpoints_are_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name))
    with pytest.raises(ConfigError, match=r"needs transformers: the optional Hugging Face extra, pip install -e "
                                          r"'\.\[hf\]'"):
        RunConfig(model=get_config("tiny", source="hf"), strategy=StrategyConfig())
    monkeypatch.setitem(sys.modules, "transformers", None)
    from models.hf import require_transformers

    with pytest.raises(ModuleNotFoundError, match=r"\[hf\]"):
        require_transformers()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                                      "hidden_size": 64, "intermediate_size": 128,
                                                      "vocab_size": 256}))
    with pytest.raises(ConfigError, match="num_key_value_heads=2 is not supported: grouped-query attention"):
        RunConfig(model=GPTConfig(hf_path=str(tmp_path)), strategy=StrategyConfig())


def test_a_model_config_records_the_source():
    cfg = dataclasses.replace(get_config("mini"), source="hf")
    assert cfg.source == "hf"
    with pytest.raises(ValueError, match="source='jax' is invalid: valid values are native, hf"):
        get_config("mini", source="jax")


def test_reports_put_both_implementations_side_by_side():
    """The committed CPU rows (results/hf-vs-native: mini and llama-mini x ddp, fsdp+ac, both sources, 2 gloo
    ranks): one row per (model, strategy) pair whose numbers and ratios are the raw rows' medians, and a
    figure with both implementations' bars."""
    from reports.build import build, to_markdown
    from reports.load import load

    df = load(ROOT / "results" / "hf-vs-native")
    rep = build(df)
    ok = df[df.status == "ok"]
    expected = {}
    for (model, strategy), g in ok.groupby(["model", "strategy"]):
        by = {src: g[g.model_source == src] for src in ("native", "hf")}
        if all(len(v) for v in by.values()):
            expected[(model, strategy)] = {src: (v.tokens_per_sec.median(), v.peak_mem_bytes.median() / 2**30,
                                                 v.mfu.median()) for src, v in by.items()}
    assert len(expected) == 4 and len(rep.pairs) == 4
    for r in rep.pairs.itertuples():
        want = expected[(r.model, r.strategy)]
        assert (r.tokens_per_sec_family, r.peak_mem_gib_family, r.mfu_family) == pytest.approx(want["native"])
        assert (r.tokens_per_sec_hf, r.peak_mem_gib_hf, r.mfu_hf) == pytest.approx(want["hf"])
        assert r.tokens_ratio == pytest.approx(want["hf"][0] / want["native"][0])
        assert r.mem_ratio == pytest.approx(want["hf"][1] / want["native"][1])
    fig = rep.figures["implementations"]
    tput, mem = fig.axes[:2]
    for ax, cols in ((tput, ("tokens_per_sec_family", "tokens_per_sec_hf")),
                     (mem, ("peak_mem_gib_family", "peak_mem_gib_hf"))):
        assert len(ax.containers) == 2
        for container, col in zip(ax.containers, cols):  # bars bottom-up: the first pair on top
            assert [b.get_width() for b in container] == pytest.approx(list(rep.pairs[col][::-1]))
    assert [t.get_text() for t in tput.get_legend().get_texts()] == ["family (models/gpt.py)",
                                                                      "Hugging Face transformers"]
    md = to_markdown(rep)
    assert "## The family's model and Hugging Face's, same setup and strategy" in md
    assert "fsdp+ac(full) [HF]" in md  # the per-setup tables name the HF rows
