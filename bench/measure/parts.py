"""Forward + backward time of the run's own model parts at the run's shapes (``probe_parts=true``).

A device's generic rates (the square-matmul peak, a streaming add's bandwidth) mispredict a real model's
operators on a CPU: measured on this class of host (mini, 2 gloo ranks, 1 thread each), the head's thin GEMMs
(1024 x 256 x 50304) ran at 52-55 GFLOP/s against a 73 GFLOP/s probe, and the cross-entropy over 50,304 classes
took ~0.5 s per micro-batch where its bytes at streaming bandwidth say 0.07 s. This probe times the parts the
step is made of, on every local rank at once (the timed steps' conditions: same threads, the neighbouring ranks
computing too), after the timed window so it cannot disturb it:

- ``block_s``: one block's forward + backward on a (micro_batch, seq_len, d) input -- the model built with one
  layer and cut to it as a pipeline stage is (``keep_stage``), so the family's and HF's blocks alike;
- ``block_matmul_s``: the GEMMs of that block (q/k/v, output projection, MLP; forward and the two backward
  GEMMs each) plus causal SDPA forward + backward, alone at the same shapes;
- ``rest_s``: the parts outside the blocks -- token (+ position) embedding, final norm, head and loss --
  forward + backward (the one-layer model cut to a stage holding no block);
- ``rest_matmul_s``: the head's three GEMMs alone (in the fused loss's chunks when the model uses it);
- ``rest_plain_s``, ``rest_plain_matmul_s`` (when the model's own loss is the fused chunked one): the same with
  the plain head -- the whole logits, then the loss -- which tensor and pipeline parallelism and compile run;
- ``adamw_s_per_param``: one AdamW step per parameter, fused (plain tensors) and foreach (DTensors), over the
  one-layer model's parameters.

Under tensor parallelism (``shard``: the harness hands in how the run's strategy splits a part -- measurement
does not import strategies) the parts are timed *as the run shards them*: the one-layer block and rest
parallelised on the run's tp mesh, forward and backward in ``loss_parallel``, the matmul probes at the local
shapes (column-parallel outputs, row-parallel inputs, heads and vocabulary / tp), AdamW foreach over the
DTensor parameters (per local element). Such a part's time then holds what tensor parallelism adds besides
its matmuls -- DTensor's dispatch and redistributions, the vocabulary-parallel loss's ops, the norms and
residuals it does not split -- and its collectives: ``block_comm_s`` / ``rest_comm_s``, the seconds the rank
spent inside them (bench/measure/comm.py ``CommClock``, a separate timing after the plain ones), are kept apart,
so that the step model's exposed communication is the measured wait and its memory-bound time the rest. On
mini with tp=2 the unsplit parts / 2 predicted the 16 tensor-parallel strategies a median 25 % too fast;
timed split, 7.1 % (docs/journal.md).

The matmuls run in the run's compute dtype (``dtype``: strategies/amp.py ``compute_dtype_name``): under bf16 or
fp16 the parts' forward runs in autocast, as the harness runs it, and the matmul probes' tensors are 16-bit; on
a GPU 'tf32' and 'fp32' allow TF32 matmuls or not. Every figure is the median of ``repeats`` timings after one
untimed warm-up, seconds per micro-batch (per parameter for AdamW), the slowest rank's (max: the ranks of a
step finish together). bench/plan/steptime.py turns them into per-strategy step times (``Parts``). The parts
depend on the strategy only through its compute dtype, micro-batch and tensor-parallel split, so ``get_parts``
caches them like the matmul peak (host,
device, threads, ranks on the host, torch, model shape, micro-batch, sequence, dtype, tensor-parallel split;
``N00BGPT_PEAK_CACHE=0`` measures afresh): every run of a tuning sweep then predicts from the same measurement,
and ``torchrun --nproc_per_node=N -m bench.tune.parts model=... micro_batch=... seq_len=... dtype=... tp=...``
measures them first (python -m bench.tune does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.measure.comm import CommClock
from bench.measure.probe import Trial, get_or_probe, probe_key
from models import build_model
from models.config import GPTConfig
from models.weights import local_part

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # autocast's 16-bit matmul dtypes


@dataclasses.dataclass
class Sharding:
    """How the run's strategy splits the parts (module docstring), handed in by an entry point (the harness):
    ``tp`` ranks (``sp``: sequence parallel), ``apply(module)`` parallelises a meta-device part in place
    (strategies/tp.py ``apply_tp`` on the run's tp mesh), ``step_ctx()`` the context forward and backward run
    in (``loss_parallel``)."""

    tp: int
    sp: bool
    apply: Callable
    step_ctx: Callable = contextlib.nullcontext


@dataclasses.dataclass
class Parts:
    block_s: float
    block_matmul_s: float
    rest_s: float
    rest_matmul_s: float
    adamw_fused_s_per_param: float | None = None  # None: not measured (tensor-parallel parts are DTensors)
    adamw_foreach_s_per_param: float | None = None
    # the rest with the plain head (logits, then the loss), as tp, pp and compile run it, when the model's own
    # path is the fused chunked loss; None: not measured (the model's path is the plain one: use rest_s)
    rest_plain_s: float | None = None
    rest_plain_matmul_s: float | None = None
    # tensor-parallel parts (``Sharding``): timed on ``tp`` ranks as the run splits them; of block_s and rest_s,
    # the seconds spent in their collectives
    tp: int = 1
    sp: bool = False
    block_comm_s: float = 0.0
    rest_comm_s: float = 0.0


def _median_time(fn, repeats: int, barrier) -> float:
    fn()  # warm-up: allocator, lazily built kernels
    times = []
    for _ in range(repeats):
        barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _part(cfg: GPTConfig, device: torch.device, with_block: bool, shard: Sharding | None) -> torch.nn.Module:
    m = build_model(cfg, "meta")
    m.keep_stage({"0"} if with_block else set(), first=not with_block, last=not with_block)
    if shard is not None:
        shard.apply(m)
    m.to_empty(device=device)
    m.init_weights(0)
    return m


def _step(module: torch.nn.Module, args: tuple, grad: torch.Tensor | None, sync, forward_ctx,
          step_ctx=contextlib.nullcontext):
    """Forward (in ``forward_ctx()``) + backward of ``module(*args)`` (with ``grad`` as the output's gradient, or
    a scalar loss), both in ``step_ctx()``."""
    def run():
        with step_ctx():
            with forward_ctx():
                out = module(*args)
            out.backward(grad)
        sync()
    return run


def _gemm_shapes(cfg: GPTConfig, tp: int = 1) -> list[tuple[int, int]]:
    """(in, out) features of one block's matrices on one of ``tp`` tensor-parallel ranks: column-parallel (q/k/v,
    MLP up and gate) outputs and row-parallel (output projection, MLP down) inputs split."""
    d, h = cfg.n_embd, cfg.hidden_dim
    mlp = [(d, h // tp), (d, h // tp), (h // tp, d)] if cfg.arch == "llama" else [(d, h // tp), (h // tp, d)]
    return [(d, 3 * d // tp), (d // tp, d), *mlp]


def _gemms(rows: int, shapes: list[tuple[int, int]], device, repeat: int = 1, dtype=torch.float32):
    """A function running, ``repeat`` times, forward + both backward GEMMs of each (in, out) at ``rows`` rows."""
    g = torch.Generator(device=device).manual_seed(0)
    mats = [tuple(torch.randn(*shape, device=device, generator=g).to(dtype) for shape in ((rows, i), (o, i), (rows, o)))
            for i, o in shapes]

    def run():
        for _ in range(repeat):
            for x, w, gy in mats:
                torch.mm(x, w.t())
                torch.mm(gy, w)
                torch.mm(gy.t(), x)
    return run


def _precision(device: torch.device, dtype: str):
    """The matmul precision of a run whose compute dtype (strategies/amp.py ``compute_dtype_name``) is ``dtype``:
    (context for the model parts' forward, element dtype of the matmul probes' tensors, context for the whole
    probe). 16-bit: autocast, as the harness runs forward + loss (under FSDP its mixed-precision policy casts
    the parameters instead: the same 16-bit matmuls); 'tf32' / 'fp32' on CUDA: TF32 matmuls allowed or not,
    restored afterwards."""
    if dtype in ("bf16", "fp16"):
        half = DTYPES[dtype]
        return (lambda: torch.autocast(device.type, dtype=half)), half, contextlib.nullcontext()
    if dtype not in ("fp32", "tf32"):
        raise ValueError(f"parts dtype={dtype!r} is not one of fp32, tf32, bf16, fp16")
    if device.type != "cuda":
        return contextlib.nullcontext, torch.float32, contextlib.nullcontext()
    return contextlib.nullcontext, torch.float32, _tf32(dtype == "tf32")


@contextlib.contextmanager
def _tf32(allow: bool):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def workloads(cfg: GPTConfig, micro_batch: int, seq_len: int, device: torch.device, dtype: str = "fp32",
              shard: Sharding | None = None) -> dict:
    """The functions ``probe_parts`` times, by part: ``block``, ``block_matmul``, ``rest``, ``rest_matmul`` (each
    one forward + backward at ``micro_batch`` x ``seq_len``, matmuls in ``dtype``: ``_precision``) and
    ``adamw_fused`` / ``adamw_foreach`` (one step over the ``rest`` model's fp32 parameters, whose count on
    this rank is ``n_params``); ``precision``: the context every timing runs in. With ``shard`` the parts and
    the matmul probes are one tensor-parallel rank's (module docstring; ``adamw_foreach`` only)."""
    forward_ctx, mm_dtype, precision = _precision(device, dtype)
    one = dataclasses.replace(cfg, n_layer=1, hf_path=None, dropout=0.0)
    tp = shard.tp if shard else 1
    step_ctx = shard.step_ctx if shard else contextlib.nullcontext
    B, T, d, H = micro_batch, seq_len, cfg.n_embd, cfg.n_head
    T_resid = T // tp if shard and shard.sp else T  # a block's input and output: a sequence shard under sp
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=gen)
    x = torch.randn(B, T_resid, d, device=device, generator=gen, requires_grad=True)
    gy = torch.randn(B, T_resid, d, device=device, generator=gen)
    q, k, v = (torch.randn(B, H // tp, T, d // H, device=device, generator=gen, dtype=mm_dtype, requires_grad=True)
               for _ in range(3))
    go = torch.randn(B, H // tp, T, d // H, device=device, generator=gen, dtype=mm_dtype)
    gemm = _gemms(B * T, _gemm_shapes(cfg, tp), device, dtype=mm_dtype)

    def block_matmul():
        gemm()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(go)
        sync()

    fused = own_head_fused(cfg, shard)
    chunk = min(cfg.loss_chunk, B * T) if fused else B * T
    V = cfg.padded_vocab_size // tp
    head = _gemms(chunk, [(d, V)], device, repeat=math.ceil(B * T / chunk), dtype=mm_dtype)
    rest = _part(one, device, False, shard)
    plain = {}
    if fused:  # the plain head as well: tp (loss_parallel), pp (the schedule's loss) and compile run it
        rest_plain = _part(dataclasses.replace(one, loss_chunk=0), device, False, None)
        head_plain = _gemms(B * T, [(d, V)], device, dtype=mm_dtype)
        plain = {"rest_plain": _step(rest_plain, (idx, targets), None, sync, forward_ctx),
                 "rest_plain_matmul": lambda: (head_plain(), sync())}
    params = list(rest.parameters())
    for p in params:
        p.grad = torch.zeros_like(p)
    kinds = ("foreach",) if shard else ("fused", "foreach")  # tp's DTensor parameters: foreach (steptime.py)
    by_type: dict = {}  # a foreach step cannot mix DTensors and the plain tensors tp leaves whole (norms)
    for p in params:
        by_type.setdefault(type(p), []).append(p)
    opts = {kind: torch.optim.AdamW([{"params": g} for g in by_type.values()], lr=1e-4,
                                    fused=kind == "fused" or None, foreach=kind == "foreach" or None)
            for kind in kinds}
    local = [local_part(p) for p in params]
    return {"block": _step(_part(one, device, True, shard), (x,), gy, sync, forward_ctx, step_ctx),
            "block_matmul": block_matmul, "rest": _step(rest, (idx, targets), None, sync, forward_ctx, step_ctx),
            "rest_matmul": lambda: (head(), sync()), **plain,
            **{f"adamw_{kind}": (lambda o=o: (o.step(), sync())) for kind, o in opts.items()},
            "n_params": sum(p.numel() for p in local), "precision": precision, "sync": sync}


PLAIN = ("rest_plain", "rest_plain_matmul")


def own_head_fused(cfg: GPTConfig, shard: Sharding | None = None) -> bool:
    """Whether the model's own head is the fused chunked loss (then the plain one is timed too); a
    tensor-parallel part's head is always the plain vocabulary-parallel one."""
    return bool(cfg.loss_chunk) and cfg.source == "native" and shard is None


def measured_fields(cfg: GPTConfig, shard: Sharding | None = None) -> list[str]:
    """The ``Parts`` fields ``probe_parts`` measures for ``cfg`` (and ``shard``)."""
    skip = {"tp", "sp"}
    if not own_head_fused(cfg, shard):
        skip |= {f"{n}_s" for n in PLAIN}
    skip |= {"adamw_fused_s_per_param"} if shard else {"block_comm_s", "rest_comm_s"}
    return [f.name for f in dataclasses.fields(Parts) if f.name not in skip]


def probe_parts(cfg: GPTConfig, micro_batch: int, seq_len: int, device: torch.device, repeats: int = 3,
                barrier=lambda: None, dtype: str = "fp32", shard: Sharding | None = None) -> Parts:
    """Time the parts (module docstring) of ``cfg``'s model at ``micro_batch`` x ``seq_len`` on ``device``, matmuls
    in ``dtype`` (fp32, tf32, bf16, fp16: the run's compute dtype), split as ``shard`` says (None: whole); each
    timing starts with ``barrier()`` (the harness passes a process-group barrier, so the local ranks probe
    together -- under tensor parallelism they must: the parts' collectives span the tp group)."""
    w = workloads(cfg, micro_batch, seq_len, device, dtype, shard)
    names = ["block", "block_matmul", "rest", "rest_matmul", "adamw_fused", "adamw_foreach", *PLAIN]
    with w["precision"]:
        t = {name: _median_time(w[name], repeats, barrier) for name in names if name in w}
        if shard is not None:  # the same parts again, timing only their collectives (CommClock's dispatch
            for name in ("block", "rest"):  # mode slows every op: never in the timings above)
                t[f"{name}_comm"] = _median_comm(w[name], repeats, barrier, w["sync"])
    out = {f"{name}_s": v for name, v in t.items() if not name.startswith("adamw")}
    out.update({f"{name}_s_per_param": v / w["n_params"] for name, v in t.items() if name.startswith("adamw")})
    return Parts(**out, **({"tp": shard.tp, "sp": shard.sp} if shard else {}))


def _median_comm(fn, repeats: int, barrier, sync) -> float:
    """The median over ``repeats`` runs of ``fn`` of the seconds spent in its collectives (``CommClock``)."""
    seconds = []
    for _ in range(repeats):
        barrier()
        with CommClock(sync) as clock:
            fn()
        seconds.append(clock.seconds)
    return statistics.median(seconds)


def _key(cfg: GPTConfig, micro_batch: int, seq_len: int, device: torch.device, local_ranks: int, dtype: str,
         shard: Sharding | None) -> str:
    shape = hashlib.sha1(repr(dataclasses.replace(cfg, name="", hf_path=None)).encode()).hexdigest()[:12]
    split = f"tp={shard.tp}" + ("+sp" if shard.sp else "") if shard else "tp=1"
    return probe_key("parts", device, f"ranks={local_ranks}", f"model={shape}", f"mb={micro_batch}", f"seq={seq_len}",
                     f"dtype={dtype}", split)


def get_parts(cfg: GPTConfig, micro_batch: int, seq_len: int, device: torch.device, local_ranks: int,
              gather=lambda obj: [obj], barrier=lambda: None, is_main: bool = True,
              fresh: bool = False, dtype: str = "fp32", shard: Sharding | None = None) -> tuple[Parts, str]:
    """The parts with matmuls in ``dtype``, split as ``shard`` says (cached, or -- with ``fresh``, or none cached
    on some rank -- measured on every rank now, the slowest rank's kept and cached unless other work took more
    than ``neighbours_max()`` of a host while they were timed, bench/measure/contention.py) and where they came
    from.
    ``gather(obj)`` returns every rank's ``obj`` (a collective: every rank calls it); only ``is_main`` writes
    the cache."""
    fields = measured_fields(cfg, shard)
    split = {"tp": shard.tp, "sp": shard.sp} if shard else {}

    def measure() -> Trial:
        return Trial(dataclasses.asdict(probe_parts(cfg, micro_batch, seq_len, device, barrier=barrier, dtype=dtype,
                                                    shard=shard)))

    out, source = get_or_probe("parts", _key(cfg, micro_batch, seq_len, device, local_ranks, dtype, shard), measure,
                               fields, fresh=fresh, gather=gather, writer=is_main)
    return Parts(**out.values, **split), source
