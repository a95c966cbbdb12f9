"""Predicted step time from the config and three measured rates: which strategy is fastest, before running it.

    step_s = compute_s + memory_s + exposed_comm_s + bubble_s,   tokens/s = global batch tokens / step_s

per rank (the ranks of a step finish together), with ``Rates``: ``matmul_flops`` (sustained matmul FLOP/s in
the run's dtype: the peak probe, or a datasheet peak the caller scales), ``mem_bw`` (bytes/s of an elementwise
kernel) and ``link_bw`` (all-reduce bus bytes/s of the process group): bench/measure/peak_flops.py and
bench/measure/bandwidth.py measure them; the planner takes them as ``peak_tflops=``, ``mem_gbps=``,
``link_gbps=``.

- **compute_s** = matmul FLOPs of the rank's tokens (models/flops.py, plus checkpointing's recompute) / tp / pp
  / ``matmul_flops``.
- **memory_s** = bytes the non-matmul operators move / ``mem_bw``. Per token and block, elements read +
  written in forward (the family's operators; estimates from the code, not measured): gpt2 ``9 d + 2 h``
  (two LayerNorms, two residual adds, tanh GELU), llama ``34 d + 5 h`` (two Python RMSNorms, RoPE on q and
  k, SwiGLU); Hugging Face's GPT-2 computes GELU in eight Python operators: ``9 d + 16 h``. Backward moves
  twice the forward's; a checkpointed block's forward runs again. The head: ``7 V`` (plain) or ``6 V``
  (fused chunked loss) per token. Element size 4 bytes (2 under autocast). Per parameter on this rank:
  AdamW 28 bytes fused (DDP/single) or 56 foreach (DTensors), DDP's bucket copies 16, FSDP's copy-in/out
  16 per gather, gradient accumulation 12 per extra micro-step.
- with ``Rates.parts`` (bench/measure/parts.py: the model's own block, embeddings + head + loss and their
  matmuls timed at the run's micro-batch -- a pipeline micro-batch under pp, strategies/pp.py
  ``pipeline_micro_batch`` -- and an AdamW step per parameter) compute and the activations' memory-bound
  time are those parts instead (``_from_parts``): per micro-step every block on the busiest rank once (a
  checkpointed block's forward, a third of forward + backward, again), the rest once (with the head the
  strategy runs: the fused chunked loss, or the plain one under tp, pp and compile), split by tp; AdamW per
  parameter of the kind the strategy uses (fused / foreach); the per-parameter copies stay bytes / ``mem_bw``.
  Parts timed *as tensor parallelism splits them* (``Parts.tp``, what the harness measures for a tp run) are not
  split again: their matmuls are compute, their time outside matmuls and collectives memory-bound, and the
  seconds they waited in collectives (a checkpointed block's forward: half its forward + backward's again)
  replace tensor parallelism's bytes / bandwidth as its communication.
- **comm_s** = per collective, bytes (bench/plan/costmodel.py ``predict_comm``) x the algorithm's factor /
  that collective's bus bandwidth (``link_bw_by_kind``: probed per collective, on a CPU host without a spare
  core with the ranks' compute threads busy; else the all-reduce's ``link_bw``): all-reduce ``2 (n - 1) / n``,
  all-gather and reduce-scatter ``(n - 1) / n``, a send 1 (its receive is the same transfer), n the ranks in
  the technique's collectives (its ``group``, bench/plan/terms.py: data parallelism's over the dp ranks, tensor
  parallelism's over the tp group; bench/plan/costmodel.py ``comm_by_technique``). A collective over one rank (DDP
  beside tp on a single data-parallel rank) crosses no link: 0 s.
- **exposed_comm_s**, the overlap rule per strategy, when the rank can overlap at all (a GPU's streams; on a
  CPU only with a spare core for the communication thread, ``overlap=``): DDP hides its all-reduce behind
  backward (2/3 of compute + memory) except the last 25 MB bucket; FSDP hides its gathers and
  reduce-scatters behind compute (prefetch) except one unit's (1 / (L + 1)); tensor-parallel all-reduces
  and pipeline sends are on the critical path (exposed). Without overlap all communication is exposed.
- **bubble_s** = the other pipeline ranks' chunks of fill and drain (``pipeline_bubble``): sum over the ranks
  but the busiest of their forward + backward per micro-step / (m v); with equal ranks (compute + memory) x
  b / (1 - b), b the pipeline's bubble fraction (strategies/pp.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.plan.costmodel import comm_by_technique, cost_context, fused_loss
from models.config import GPTConfig
from models.flops import block_forward_flops_per_token, train_flops_per_token
from strategies import recompute_flops_per_token
from strategies.ac import checkpointed_block_ids
from strategies.config import StrategyConfig
from strategies.mesh import mesh_shape
from strategies.pp import n_microbatches, stage_blocks, virtual_stages

DDP_BUCKET_BYTES = 25 * 2**20
# collective -> factor on its full-tensor bytes, with n the ranks in the collective
_FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
            "reduce_scatter": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0, "send": lambda n: 1.0,
            "recv": lambda n: 1.0}


@dataclass
class Rates:
    """Measured or given rates of one device: FLOP/s, bytes/s (memory), bytes/s (collective bus bandwidth)."""

    matmul_flops: float
    mem_bw: float
    link_bw: float | None = None
    parts: object | None = None  # bench/measure/parts.py ``Parts``: the model's own parts timed at the run's shapes
    link_bw_by_kind: dict | None = None  # bus bytes/s per collective (bench/measure/bandwidth.py); else link_bw


def _bus_bw(rates: Rates, kind: str) -> float:
    """Bus bytes/s of collective ``kind``: its own probe (``link_bw_by_kind``), else the all-reduce's ``link_bw``."""
    return (rates.link_bw_by_kind or {}).get(kind) or rates.link_bw


def elementwise_per_token_block(cfg: GPTConfig) -> int:
    """Elements read + written per token by one block's forward outside matmuls (see the module docstring)."""
    d, h = cfg.n_embd, cfg.hidden_dim
    if cfg.arch == "llama":
        return 34 * d + 5 * h
    return 9 * d + (16 * h if cfg.source == "hf" else 2 * h)


def predict_step(cfg: GPTConfig, s: StrategyConfig, world: int, micro_batch: int, seq_len: int,
                 grad_accum: int, rates: Rates, overlap: bool = True) -> dict:
    """Predicted seconds per step by component, ``step_s`` and ``tokens_per_sec`` (global)."""
    shape = mesh_shape(s, world)
    ctx = cost_context(cfg, s, world, micro_batch, seq_len, grad_accum)
    tokens = micro_batch * seq_len * grad_accum  # per data-parallel rank per step
    flops = (train_flops_per_token(cfg, seq_len) + recompute_flops_per_token(cfg, seq_len, s)) * tokens
    compute = flops / shape.tp / shape.pp / rates.matmul_flops

    elem = 2 if s.amp in ("bf16", "fp16") else 4
    per_block_elems = elementwise_per_token_block(cfg)
    recomputed = len(checkpointed_block_ids(cfg.n_layer, s.ac, s.ac_every)) if s.ac in ("full", "selective") else 0
    if s.ac == "op":
        recomputed = cfg.n_layer  # op-level: the elementwise part of every block runs again
    block_elems = per_block_elems * (3 * cfg.n_layer + recomputed) / shape.pp / shape.tp
    head_elems = (6 if fused_loss(cfg, s, shape.tp, shape.pp) else 7) * cfg.padded_vocab_size / shape.tp
    act_bytes = tokens * (block_elems * elem + head_elems * 4)
    P = ctx.P / (ctx.shard_world if ctx.shard_world > 1 else 1)  # parameters this rank updates
    fused_adamw = s.dp != "fsdp" and shape.tp == 1  # plain tensors: fused AdamW; DTensors: foreach
    gathers = (2 if s.reshard_after_forward else 1) * grad_accum if s.dp == "fsdp" else 0
    copy_bytes = P * ((16 if s.dp == "ddp" else 0) + 12 * (grad_accum - 1)) + 16 * ctx.P * gathers
    tp_comm = None  # tensor parallelism's communication, when the parts measured it
    if rates.parts is not None:
        compute, memory, tp_comm = _from_parts(cfg, s, shape, grad_accum, recomputed, rates.parts)
        memory += P * (rates.parts.adamw_fused_s_per_param if fused_adamw else rates.parts.adamw_foreach_s_per_param)
        memory += copy_bytes / rates.mem_bw
    else:
        param_bytes = P * (28 if fused_adamw else 56) + copy_bytes
        memory = (act_bytes + param_bytes) / rates.mem_bw

    by_technique = comm_by_technique(cfg, s, world, grad_accum, micro_batch=micro_batch, seq_len=seq_len,
                                     without=("tp",) if tp_comm is not None else ())
    comm = tp_comm or 0.0
    if by_technique and not rates.link_bw:
        raise ValueError("a multi-rank step needs link_bw (bytes/s of the process group's all-reduce)")
    for group, kinds in by_technique.values():
        for kind, nbytes in kinds.items():
            if kind == "recv":  # a send is also the peer's receive: one transfer, counted once
                continue
            comm += nbytes * _FACTORS[kind](group) / _bus_bw(rates, kind)
    exposed = comm
    if overlap and comm > 0 and shape.tp == 1 and shape.pp == 1:
        work = compute + memory
        if s.dp == "ddp":
            last = min(DDP_BUCKET_BYTES, 4 * ctx.P) * _FACTORS["all_reduce"](shape.dp) / _bus_bw(rates, "all_reduce")
            exposed = max(comm - 2 / 3 * work, min(last, comm))
        elif s.dp == "fsdp":
            exposed = max(comm - work, comm / (cfg.n_layer + 1))
    bubble = 0.0
    if shape.pp > 1:
        if rates.parts is not None:
            per_block, again, head = _parts_units(cfg, s, shape, rates.parts)
        else:
            per_block = (3 * block_forward_flops_per_token(cfg, seq_len) / rates.matmul_flops
                         + 3 * per_block_elems * elem / rates.mem_bw) * tokens / grad_accum / shape.tp
            again = (block_forward_flops_per_token(cfg, seq_len) / rates.matmul_flops
                     + per_block_elems * elem / rates.mem_bw) * tokens / grad_accum / shape.tp
            head = (3 * 2 * cfg.n_embd * cfg.padded_vocab_size / shape.tp / rates.matmul_flops
                    + head_elems * 4 / rates.mem_bw) * tokens / grad_accum  # head_elems: already split by tp
            if s.ac == "op":
                again = per_block_elems * elem / rates.mem_bw * tokens / grad_accum / shape.tp
        bubble = grad_accum * pipeline_bubble(cfg, s, per_block, again * recomputed / cfg.n_layer, head)
    step = compute + memory + exposed + bubble
    global_tokens = tokens * shape.dp
    return {"compute_s": compute, "memory_s": memory, "comm_s": comm, "exposed_comm_s": exposed,
            "bubble_s": bubble, "step_s": step, "tokens_per_sec": global_tokens / step}


def _from_parts(cfg: GPTConfig, s: StrategyConfig, shape, grad_accum: int, recomputed: int, parts) -> tuple:
    """(compute_s, activation memory-bound s, tensor parallelism's communication s or None) from the model's own
    parts timed at ``pipeline_micro_batch``: per micro-step (per pipeline micro-batch, m times, under pp), the rank's
    blocks (the busiest pipeline rank's: ceil(L / stages) per stage) each cost the block's matmul and other time,
    split by tp (unless timed split, ``_tp_div``); a checkpointed block's forward (a third of forward +
    backward) runs again -- its matmuls and its other ops under ``full``/``selective``, the other ops only under
    ``op``; the rest (embeddings, head, loss) once on the rank that holds the head. Parts timed split also give
    the seconds spent in their collectives: per block (again half of them for a recomputed forward) and rest."""
    v = virtual_stages(s)
    blocks = -(-cfg.n_layer // (shape.pp * v)) * v  # on the busiest pipeline rank
    again = recomputed * blocks / cfg.n_layer
    div = _tp_div(shape, parts)
    block_mm, block_other = _split(parts.block_s, parts.block_matmul_s, parts.block_comm_s, div)
    rest_s, rest_mm_s, rest_comm_s = _rest(cfg, s, shape, parts)
    rest_mm, rest_other = _split(rest_s, rest_mm_s, rest_comm_s, div)
    runs = grad_accum * (n_microbatches(s) if shape.pp > 1 else 1)  # parts per pipeline micro-batch under pp
    compute = runs * (block_mm * (blocks + (0 if s.ac == "op" else again) / 3) + rest_mm)
    memory = runs * (block_other * (blocks + again / 3) + rest_other)
    comm = None
    if parts.tp > 1:
        comm = runs * (parts.block_comm_s * (blocks + (0 if s.ac == "op" else again) / 2) + rest_comm_s)
    return compute, memory, comm


def _split(part_s: float, matmul_s: float, comm_s: float, div: int) -> tuple[float, float]:
    """(matmul s, other s) of a timed part, each divided ``div`` ways: other is the part's time outside its
    matmuls and its collectives (the memory-bound operators), never below 0."""
    return matmul_s / div, max(part_s - matmul_s - comm_s, 0.0) / div


def _tp_div(shape, parts) -> int:
    """How many ways the timed parts still split: tp for whole parts, 1 for parts timed as the run's tensor
    parallelism splits them (bench/measure/parts.py ``Sharding``)."""
    if parts.tp == 1:
        return shape.tp
    if parts.tp != shape.tp:
        raise ValueError(f"parts timed on tp={parts.tp} ranks cannot predict a tp={shape.tp} step")
    return 1


def _rest(cfg: GPTConfig, s: StrategyConfig, shape, parts) -> tuple[float, float, float]:
    """(rest, its matmuls, its collectives) in seconds per micro-step: the head the strategy runs -- the fused
    chunked loss, or the plain one (logits, then the loss) under tp, pp and compile, when the parts measured it
    (tensor-parallel parts: always the plain vocabulary-parallel one)."""
    if parts.rest_plain_s is not None and not fused_loss(cfg, s, shape.tp, shape.pp):
        return parts.rest_plain_s, parts.rest_plain_matmul_s, 0.0
    return parts.rest_s, parts.rest_matmul_s, parts.rest_comm_s


def _parts_units(cfg: GPTConfig, s: StrategyConfig, shape, parts) -> tuple[float, float, float]:
    """(one block's forward + backward, a checkpointed block's extra forward, the rest) in seconds per micro-step
    from the timed parts, split by tp (as ``_from_parts`` composes them)."""
    m = n_microbatches(s) if shape.pp > 1 else 1  # parts per pipeline micro-batch under pp
    div = _tp_div(shape, parts)
    block = m * parts.block_s / div  # with its collectives, when timed split
    other = m * _split(parts.block_s, parts.block_matmul_s, parts.block_comm_s, div)[1]
    again = (other if s.ac == "op" else block) / 3
    return block, again, m * _rest(cfg, s, shape, parts)[0] / div


def pipeline_bubble(cfg: GPTConfig, s: StrategyConfig, per_block: float, again_per_block: float,
                    head: float) -> float:
    """Seconds per micro-step the busiest pipeline rank waits in the schedule's fill and drain: the other ranks'
    forward + backward of one pipeline micro-batch chunk each, ``sum_{r != busiest} a_r / (m v)``, with ``a_r``
    rank r's work per micro-step (its blocks x ``per_block`` + ``again_per_block``, the rest ``head`` -- embeddings,
    head and loss -- on the rank holding the last stage), m pipeline micro-batches, v stages per rank. With equal
    ranks this is the textbook ``b / (1 - b)`` of the busy time (b = (p - 1) / (v m + p - 1), Narayanan et al.
    2021); with a heavy last stage (a 50k-class head) the fill and drain are the lighter ranks' chunks, not the
    busiest one's: on mini with pp=2 the textbook rule made the bubble 0.97 s where the run measured ~0.5 s."""
    p, v, m = s.pp, virtual_stages(s), n_microbatches(s)
    stages = stage_blocks(cfg.n_layer, p * v)
    work = [sum(len(stages[c]) for c in range(r, p * v, p)) * (per_block + again_per_block) for r in range(p)]
    work[(p * v - 1) % p] += head
    busiest = max(range(p), key=lambda r: work[r])
    return sum(w for r, w in enumerate(work) if r != busiest) / (m * v)


def can_overlap(device_type: str, local_ranks: int, threads: int, cores: int) -> bool:
    """Whether communication can run beside compute: on a GPU (streams) always; on a CPU only when the host has
    a core left for the communication threads beyond ``local_ranks`` x ``threads`` compute threads."""
    return device_type == "cuda" or cores > local_ranks * threads
