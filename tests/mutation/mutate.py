"""Mutation check: does the test suite catch broken wiring? Each mutation below is a deliberate, realistic
breakage of measurement, strategy, cost-model, table or gate code. One at a time, it is applied to a
temporary copy of this tree and the tests that guard it are run; every mutation must make them fail.

    python -m tests.mutation.mutate                      # all (about 30 minutes on 2 cores); exit 1 if any survives
    python -m tests.mutation.mutate only=ddp_never_syncs,fsdp_sums_grad_accum
    python -m tests.mutation.mutate check=true           # only check that every mutation still applies

Writes ``mutation.md`` (a table: mutation, guarding tests, caught or SURVIVED, seconds) into ``out``.
Not collected by pytest (no ``test_`` prefix): it runs the suite, it is not part of it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from models.cli import fail, opt, parse  # noqa: E402
from reports.build import markdown_table  # noqa: E402
from tests.helpers import copy_tree  # noqa: E402


class Mutation(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: list[str]
    what: str


GRADS = "tests/test_grads.py"
WIRING = "tests/test_row_wiring.py"
MESH = "tests/test_mesh.py"
MUTATIONS = [
    # measurement
    Mutation("step_time_min_over_ranks", "bench/measure/metrics.py", "return [max(ts) for ts in zip(*per_rank)]",
             "return [min(ts) for ts in zip(*per_rank)]", ["tests/test_metrics.py", WIRING],
             "a synchronous step's time taken from the fastest rank"),
    Mutation("step_time_rank0_only", "bench/measure/metrics.py", "return [max(ts) for ts in zip(*per_rank)]",
             "return list(per_rank[0])", ["tests/test_metrics.py", WIRING], "rank 0's own step times in the row"),
    Mutation("throughput_by_slowest_step", "bench/measure/metrics.py",
             "tps = len(step_times_s) * global_batch_tokens / total",
             "tps = global_batch_tokens / max(step_times_s)", ["tests/test_metrics.py"],
             "tokens/s from one step instead of the elapsed time"),
    Mutation("per_device_not_divided", "bench/measure/metrics.py", '"tokens_per_sec_per_device": tps / world_size',
             '"tokens_per_sec_per_device": tps', ["tests/test_metrics.py"], "per-device throughput = global"),
    Mutation("mfu_doubled", "bench/measure/metrics.py",
             "return flops_per_token * tokens_per_sec_per_device / peak_flops",
             "return 2 * flops_per_token * tokens_per_sec_per_device / peak_flops", ["tests/test_run_e2e.py"],
             "MFU counting forward+backward twice"),
    Mutation("timer_measures_from_first_start", "bench/measure/metrics.py",
             "return [e - s for s, e in zip(self._starts, self._ends)]",
             "return [e - self._starts[0] for e in self._ends]", ["tests/test_metrics.py", "tests/test_run_e2e.py"],
             "step durations measured from the first step's start (timestamps, not elapsed)"),
    Mutation("peak_memory_rank0", "reports/record.py", '"bytes", "max", "allocator peak',
             '"bytes", "rank0", "allocator peak', [WIRING], "one rank's peak memory in the row"),
    Mutation("cpu_util_best_rank", "reports/record.py", 'col("telemetry", "fraction", "min", "process CPU time',
             'col("telemetry", "fraction", "max", "process CPU time', ["tests/test_metrics.py"],
             "contention taken from the least starved rank"),
    Mutation("measured_comm_is_the_prediction", "bench/plan/annotate.py",
             '"pred_comm_bytes_per_step": comm["total"],',
             '"pred_comm_bytes_per_step": comm["total"], "comm_bytes_per_step": comm["total"],', [WIRING],
             "the predicted communication written into the measured column"),
    Mutation("implausible_above_two", "reports/record.py", "if v is not None and v == v and v > 1:",
             "if v is not None and v == v and v > 2:", ["tests/test_record.py", "tests/test_regress.py"],
             "MFU 1.5 reported as ok"),
    # strategies and the loop
    Mutation("grad_accum_sums", "bench/harness/loop.py", "scaled = loss / ga", "scaled = loss", [GRADS],
             "micro-batch losses summed instead of averaged"),
    Mutation("every_rank_reads_the_same_data", "bench/harness/loop.py",
             'return dp_coordinate(b.mesh) if b.batch["dp_size"] > 1 else 0', "return 0", [GRADS],
             "data-parallel ranks reading the same shard"),
    Mutation("ddp_never_syncs", "strategies/__init__.py", 'if cfg.dp == "ddp" and not is_last_micro_step:',
             'if cfg.dp == "ddp":', [GRADS], "DDP gradients never all-reduced"),
    Mutation("fsdp_sums_gradients", "strategies/fsdp.py", "    if dist.get_backend() == \"gloo\":\n"
             "        _use_sum_then_divide(model)", "    for m in model.modules():\n"
             "        if hasattr(m, 'set_gradient_divide_factor'):\n            m.set_gradient_divide_factor(1.0)",
             [GRADS], "FSDP summing gradients over ranks instead of averaging (pytorch/pytorch#162338)"),
    Mutation("selective_ac_wrong_blocks", "strategies/ac.py", "return list(range(0, n_layer, every))",
             "return list(range(1, n_layer, every))", ["tests/test_models.py", "tests/test_strategies.py"],
             "selective checkpointing of other blocks than the cost model and HFU assume"),
    Mutation("recompute_without_early_stop", "strategies/ac.py",
             "return n * (block_forward_flops_per_token(cfg, seq_len) - 2 * cfg.n_embd * cfg.hidden_dim)",
             "return n * block_forward_flops_per_token(cfg, seq_len)", ["tests/test_models.py"],
             "HFU counting the MLP down projection as recomputed"),
    Mutation("batch_ignores_dp", "bench/harness/config.py", "per_step = self.micro_batch * dp_size",
             "per_step = self.micro_batch", [GRADS], "global_batch ignoring the data-parallel size"),
    # the cost model
    Mutation("no_autocast_weight_copies", "bench/plan/terms.py", 'parts["autocast_weights"] = 2 * (ctx.n_mm - head)',
             'parts["autocast_weights"] = 0', ["tests/test_costmodel.py"], "autocast's 16-bit weight copies dropped"),
    Mutation("no_recomputed_block", "bench/plan/terms.py",
             'recomputed = block - resid if ck else 0', 'recomputed = 0', ["tests/test_costmodel.py"],
             "the block recomputed in backward left out of the checkpointed peak"),
    Mutation("fused_head_no_weight_grad", "bench/plan/costmodel.py",
             "saved = tokens * (norm * act + d * act + 8) + 4 * V * d",
             "saved = tokens * (norm * act + d * act + 8)", ["tests/test_costmodel.py"],
             "the fused loss's stored weight gradient (V x d fp32) left out of the head term"),
    Mutation("fused_loss_ignores_incoming_grad", "models/loss.py",
             "gx = grad_x * grad_out.to(grad_x.dtype) if grad_x is not None else None",
             "gx = grad_x if grad_x is not None else None", [GRADS, "tests/test_models.py"],
             "the fused loss's input gradient not scaled by the incoming gradient (grad accumulation, pipelines)"),
    Mutation("recompute_counts_input", "bench/plan/terms.py", "recomputed = block - resid if ck else 0",
             "recomputed = block if ck else 0", ["tests/test_costmodel.py"],
             "the recomputed block counting its input, which the checkpoint already holds, a second time"),
    Mutation("reduce_scatter_half", "bench/plan/terms.py",
             'return {"all_gather": gather, "reduce_scatter": 4 * padded}',
             'return {"all_gather": gather, "reduce_scatter": 2 * padded}', ["tests/test_costmodel.py"],
             "FSDP gradients predicted as reduced in 16 bits"),
    Mutation("ddp_grads_free", "bench/plan/terms.py", 'parts["grads"] = 4 * ctx.P  # bucket views, alive all run',
             'parts["grads"] = 0', ["tests/test_costmodel.py"], "DDP's gradient buckets left out"),
    # tables
    Mutation("torn_line_not_ended", "bench/harness/table.py",
             'if size and os.pread(fd, 1, size - 1) != b"\\n":', "if False:", ["tests/test_results.py"],
             "a new row glued to a torn last line"),
    Mutation("aggregate_mean", "reports/aggregate.py", "rec[col] = ok[col].median() if len(ok)",
             "rec[col] = ok[col].mean() if len(ok)", ["tests/test_reports.py"], "repeats averaged, not medians"),
    Mutation("compare_direction_flipped", "reports/compare.py",
             'return "better" if d * sign > 0 else ("worse" if d * sign < 0 else "same")',
             'return "better" if d * sign < 0 else ("worse" if d * sign > 0 else "same")', ["tests/test_reports.py"],
             "a slowdown shown as better"),
    # gates and exit codes
    Mutation("gate_loss_one_direction", "bench/gate/regress.py",
             '"FAIL" if abs(delta) / 100 > rule["max_rel_diff"] else "PASS"',
             '"FAIL" if delta / 100 > rule["max_rel_diff"] else "PASS"', ["tests/test_regress.py"],
             "a lower loss passing the committed-numbers gate"),
    Mutation("sprt_error_rates_swapped", "bench/gate/ab.py", "math.log((1 - b) / a) / (w * d)",
             "math.log((1 - a) / b) / (w * d)",
             ["tests/test_ab_gate.py::test_the_sequential_rule_keeps_its_design_error_rates_on_any_host"],
             "the A/B gate's sequential test with its two error rates swapped (5x the false alarms)"),
    Mutation("round_sd_fixed", "bench/gate/ab.py", "return median(step_ratios), round_sd(median_se(step_ratios), th)",
             "return median(step_ratios), 0.018",
             ["tests/test_ab_gate.py::test_rounds_weigh_by_their_own_spread",
              "tests/test_ab_gate.py::test_the_sequential_rule_keeps_its_design_error_rates_on_any_host"],
             "the A/B gate's rounds all taken as 1.8 % wide, whatever their steps say"),
    Mutation("rounds_unweighted", "bench/gate/ab.py",
             "return math.exp(sum(math.log(r) / s**2 for r, s in obs) / w), w",
             "return math.exp(sum(math.log(r) for r, s in obs) / len(obs)), w",
             ["tests/test_ab_gate.py::test_rounds_weigh_by_their_own_spread"],
             "the A/B gate's rounds averaged alike, a noisy round weighing as much as a clean one"),
    Mutation("study_residuals_nominal", "bench/gate/study.py",
             "out[load] += [((x - mid) * math.sqrt(len(rs) / (len(rs) - 1)) + base, se) for x, se in rs]",
             "out[load] += [(x - math.log1p(slow / 100), se) for x, se in rs]",
             ["tests/test_ab_gate.py::test_the_study_summary_counts_centres_and_implied_rates"],
             "the study's pooled rates take the nominal slowdown out of a slowed round, counting the injection's "
             "excess as noise"),
    Mutation("tokens_compared_across_machines", "bench/gate/regress.py",
             'same_machine = r.hosts_baseline == r.hosts_candidate and "," not in r.hosts_baseline',
             "same_machine = True", ["tests/test_regress.py"], "raw tokens/s compared between two hosts"),
    Mutation("invalid_config_exit_1", "bench/run.py", "    os._exit(2)", "    os._exit(1)",
             ["tests/test_exit_codes.py::test_every_invalid_configuration_exits_2_with_one_line_and_no_row"],
             "an invalid configuration reported as a failed run"),
    Mutation("peak_probe_half_flops", "bench/measure/peak_flops.py", "    flops = 2.0 * n**3", "    flops = 1.0 * n**3",
             ["tests/test_metrics.py::test_cpu_probe_is_measured_then_cached"],
             "the peak probe counting one FLOP per multiply-add (every MFU doubled)"),
    Mutation("peak_probe_mean", "bench/measure/peak_flops.py", "best = max(rates)", "best = sum(rates) / len(rates)",
             ["tests/test_metrics.py"], "the peak probe averaging contended trials in"),
    # the mesh
    Mutation("dp_coordinate_is_the_global_rank", "strategies/mesh.py", '    return mesh["dp"].get_local_rank()',
             "    return dist.get_rank()",
             [f"{MESH}::test_mesh_strategies_match_single"], "tensor-parallel ranks reading different data"),
    Mutation("hsdp_without_replicas", "strategies/mesh.py", 'return mesh["dp_replicate", "dp_shard"] if',
             'return mesh["dp_shard"] if', [f"{MESH}::test_mesh_strategies_match_single"],
             "HSDP's replicas never averaging their gradients (FSDP over the shard group only)"),
    Mutation("pipeline_grads_divided_again", "strategies/pp.py", "scale = loss_scale / n_microbatches(s)",
             "scale = loss_scale", [f"{MESH}::test_mesh_strategies_match_single"],
             "the pipeline's micro-batch gradients summed, not averaged"),
    Mutation("pipeline_loss_over_all_ranks", "bench/harness/loop.py",
             "info.world_size // cfg.strategy.pp)", "info.world_size)",
             [f"{MESH}::test_mesh_strategies_match_single"], "the pipeline's loss averaged with the zeros of "
             "ranks that hold none"),
    Mutation("sp_norm_grads_left_partial", "bench/harness/loop.py", "            finalize_grads(b.model)\n",
             "            pass\n", [f"{MESH}::test_mesh_strategies_match_single"],
             "sequence-parallel norm gradients reduced by every optimizer op instead of once"),
    Mutation("tp_comm_without_the_loss", "bench/plan/terms.py", "loss = 3 * n * 4 if head else 0", "loss = 0",
             [f"{MESH}::test_mesh_strategies_match_single"],
             "loss_parallel's all-reduces left out of the prediction"),
    Mutation("a_zero_is_no_reading", "bench/measure/combine.py",
             "values = [r[column] for r in per_rank if r.get(column) is not None]",
             "values = [r[column] for r in per_rank if r.get(column)]", ["tests/test_metrics.py"],
             "a rank's reading of 0 left out of the cross-rank rule (an idle rank's cpu_util, 0 J)"),
    # held-out evaluation and the run to a target
    Mutation("eval_mean_over_every_rank", "bench/harness/evaluate.py", "total = total / holders",
             "total = total / dist.get_world_size()",
             ["tests/test_eval.py::test_every_strategy_evaluates_the_same_held_out_loss"],
             "a pipeline's held-out loss averaged with the zeros of ranks that hold none"),
    Mutation("held_out_window_trained_on", "bench/harness/data.py", "windows = (torch.arange(train, n_all) if held",
             "windows = (torch.arange(train - 1, n_all - 1) if held",
             ["tests/test_data.py::test_held_out_windows_are_never_trained_on"],
             "the held-out set overlapping the last training window"),
    Mutation("time_to_target_counts_eval", "bench/harness/loop.py", '"time_to_target_s": train_s,',
             '"time_to_target_s": self.evals[-1]["wall_s"],',
             ["tests/test_eval.py::test_a_loose_target_is_reached_and_timed"],
             "time to target counting the evaluations and the time between steps"),
    Mutation("synthetic_rows_repeat", "bench/harness/data.py",
             "gen.manual_seed(batch_seed(self.seed, self.first_step + step, index * self.B + b))\n            rows.",
             "gen.manual_seed(batch_seed(self.seed, self.first_step + step, index))\n            rows.",
             ["tests/test_data.py"],
             "every sequence of a synthetic micro-batch the same (parity cannot see it: the reference shares it)"),
    Mutation("row_in_two_writes", "bench/harness/table.py", "        written = os.write(fd, data)\n",
             "        written = os.write(fd, data[:8]) + os.write(fd, data[8:])\n", ["tests/test_results.py"],
             "a row written in two pieces (a crash or an unlocked writer between them tears it)"),
    Mutation("ab_counters_first_pair_only", "bench/gate/ab.py", "for b, n in vals if b != n)",
             "for b, n in vals[:1] if b != n)",
             ["tests/test_ab_gate.py::test_the_counters_look_at_every_candidate_run"],
             "the A/B gate's counters (the loss among them) compared in the first pair only"),
    # the step-time model as a sum where its terms differ
    Mutation("step_adds_all_communication", "bench/plan/steptime.py", "step = compute + memory + exposed + bubble",
             "step = compute + memory + comm + bubble", ["tests/test_steptime.py"],
             "the step pays every collective, not the part the overlap leaves exposed"),
    Mutation("pipeline_compute_not_split", "bench/plan/steptime.py",
             "compute = flops / shape.tp / shape.pp / rates.matmul_flops",
             "compute = flops / shape.tp / rates.matmul_flops",
             ["tests/test_steptime.py"], "each pipeline rank predicted to compute the whole model"),
    # one run, one row; every check before any work (issue 30); the suspect path forced (issue 31)
    Mutation("suspect_never_marked", "bench/harness/loop.py", 'status, out["suspect_reason"] = "suspect", reason',
             'out["suspect_reason"] = reason', ["tests/test_run_e2e.py::test_an_impossible_mfu_is_suspect_with_exit_3_"
                                              "never_ok"], "an MFU above 1 reported as ok"),
    Mutation("suspect_exits_0", "bench/run.py", '"suspect": 3, "not_reached": 4}.get(status, 1))',
             '"suspect": 0, "not_reached": 4}.get(status, 1))',
             ["tests/test_run_e2e.py::test_an_impossible_mfu_is_suspect_with_exit_3_never_ok"],
             "a run whose number cannot be true exits 0"),
    Mutation("duplicate_id_appended", "bench/harness/table.py", 'if _has_id(fd, size, row["run_id"]):', "if False:",
             ["tests/test_results.py"], "the table's one-row-per-id check skipped under the lock"),
    Mutation("claim_not_exclusive", "bench/harness/table.py", "        folder.mkdir()\n",
             "        folder.mkdir(exist_ok=True)\n", ["tests/test_results.py"], "two runs may claim one id"),
    Mutation("write_check_asks_instead_of_doing", "bench/harness/table.py",
             "problem = _probe(target, name_len + 24)", "problem = None", ["tests/test_results.py"],
             "the folders' writability and the names' length not tried before the run"),
    Mutation("ranks_outlive_their_launcher", "bench/run.py", "    die_with_parent()  # a killed",
             "    pass  # a killed", ["tests/test_cluster.py::test_a_killed_torchrun_takes_its_ranks_with_it_and_"
                                    "leaves_one_error_row"], "a killed torchrun leaves its ranks training"),
    Mutation("text_plotted_as_a_number", "reports/load.py", "                row[c] = None\n", "",
             ["tests/test_results.py"], "a text value in a numeric column kept (warned about, then plotted)"),
    Mutation("tuner_checks_after_its_probes", "bench/tune/__main__.py",
             'problem = precheck(run_args(args, fits[0], "tune:check"))', "problem = None",
             ["tests/test_tool_inputs.py"], "the tuner's runs' values checked only when the runs start"),
    Mutation("pp_kept_logits_not_split_by_tp", "bench/plan/terms.py",
             'else 2) // ctx.tp', 'else 2)',
             ["tests/test_costmodel.py::test_predicted_peak_matches_cpu_runs"],
             "the pipeline's kept logits counted whole on a tensor-parallel rank"),
    Mutation("token_windows_repeat_across_steps", "bench/harness/data.py",
             "first = (step * self.n_micro + index) * self.B", "first = (step + index) * self.B",
             ["tests/test_data.py"], "a corpus's windows read again by the next step (references share the flaw)"),
]


@dataclass
class MutateArgs:
    only: list[str] = opt([], "mutation names to run (default: all)")
    check: bool = opt(False, "only check that every mutation's text is found exactly once")
    out: str = opt("mutation_out", "folder for mutation.md (git-ignored; the dated results go to docs/journal.md)")
    timeout: int = opt(600, "seconds per mutation's test run")


def main(argv=None) -> int:
    args = parse(MutateArgs, argv, "python -m tests.mutation.mutate", __doc__)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
    if unknown:
        fail("python -m tests.mutation.mutate", f"unknown mutations {unknown}; valid: "
             + ", ".join(m.name for m in MUTATIONS))
    for m in chosen:
        n = (ROOT / m.path).read_text().count(m.old)
        if n != 1:
            fail("python -m tests.mutation.mutate", f"{m.name}: its text occurs {n} times in {m.path} (must be 1)")
    if args.check:
        print(f"{len(chosen)} mutations apply")
        return 0
    rows, survived = [], []
    with tempfile.TemporaryDirectory(prefix="n00bgpt-mutation-") as tmp:
        tree = Path(tmp) / "repo"
        copy_tree(tree, with_results=("baselines",))
        for m in chosen:
            target = tree / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            t0 = time.perf_counter()
            try:
                res = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                                     cwd=tree, capture_output=True, text=True, timeout=args.timeout)
                caught, how = res.returncode != 0, (res.stdout.strip().splitlines() or ["?"])[-1]
            except subprocess.TimeoutExpired:
                caught, how = False, f"tests timed out after {args.timeout}s"
            finally:
                target.write_text(original)
            seconds = time.perf_counter() - t0
            rows.append([m.name, m.what, " ".join(m.tests), "caught" if caught else "SURVIVED", how[:80],
                         f"{seconds:.0f}"])
            survived += [] if caught else [m.name]
            print(f"[mutation] {m.name}: {'caught' if caught else 'SURVIVED'} ({seconds:.0f}s) {how[:100]}",
                  flush=True)
    text = (f"# Mutation check: {len(chosen) - len(survived)}/{len(chosen)} caught\n\n"
            + markdown_table(["mutation", "breakage", "tests", "verdict", "pytest said", "s"], rows) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.md").write_text(text)
    print(text)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
