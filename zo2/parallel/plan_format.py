"""The printed forms of the cost model's answers (:mod:`zo2.parallel.plan`): the ``zo2 plan`` report and the
scaling table, as aligned text with the rates and assumptions they rest on."""

from __future__ import annotations

from zo2.parallel.plan_inputs import DTYPE_BYTES, GB, Rates
from zo2.parallel.plan_results import FOOTER, PlanReport, Prediction

PUBLISHED_DISTZO2 = ("DistZO2 (L. Wang, H. Xie, D. Wang, arXiv:2507.03211, 2025) reports a 3x speed-up over "
                     "single-GPU ZO2 on OPT-175B. That is the paper's published figure, cited here, not "
                     "measured in this repository; its hardware and batch are not the assumptions above.")

PLAN_COLUMNS = [("name", "layout", "s"), ("gpus", "GPUs", "s"), ("dp", "dp", "d"), ("pp", "pp", "d"),
                ("mode", "mode", "s"), ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tok/s", ",.0f"),
                ("speedup", "speed-up", ".2f"), ("compute_ms", "compute", ".1f"), ("pcie_ms", "pcie", ".1f"),
                ("nvlink_ms", "nvlink", ".1f"), ("host_ms", "host", ".1f"), ("nvme_ms", "nvme", ".1f"),
                ("net_ms", "net", ".2f"),
                ("bound", "bound", "s"), ("gpu_gb", "GPU GB", ".1f"), ("host_gb", "host GB/node", ".0f"),
                ("flags", "notes", "s")]

SCALING_COLUMNS = [("model", "model", "s"), ("gpus_per_node", "N", "d"), ("nodes", "M", "d"), ("gpus", "GPUs", "d"),
                   ("zo2_ms", "ZO2 ms", ".0f"), ("zo-ddp", "ddp x", ".2f"), ("zo-ddp+sliced", "ddp+sl x", ".2f"),
                   ("2d", "2d x", ".2f"), ("2d+sliced", "2d+sl x", ".2f"), ("best", "best", "s"),
                   ("step_ms", "step ms", ".1f"), ("tokens_per_s", "tok/s", ",.0f"), ("speedup", "speed-up", ".2f"),
                   ("bound", "bound", "s"), ("gpu_gb", "GPU GB", ".1f"), ("host_gb", "host GB/node", ".0f"),
                   ("notes", "does not fit (GPU/host memory)", "s")]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``rows`` as an aligned text table (first column left-aligned, the rest right-aligned)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else format(r[k], f) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _plan_row(p: Prediction) -> dict:
    b = p.breakdown
    mode = p.mode if p.mode == "resident" else f"{p.resident_blocks} res/{p.streamed_blocks} str"
    if p.nvme_blocks:
        mode = f"{p.resident_blocks} res/{p.streamed_blocks - p.nvme_blocks} host/{p.nvme_blocks} nvme"
    return {"name": p.name, "gpus": f"{p.gpus_per_node}x{p.nodes}", "dp": p.dp, "pp": p.pp, "mode": mode,
            "step_ms": p.step_s * 1e3, "tokens_per_s": p.tokens_per_s, "speedup": p.speedup,
            "compute_ms": b.compute_s * 1e3, "pcie_ms": b.pcie_s * 1e3, "nvlink_ms": b.nvlink_s * 1e3,
            "host_ms": b.host_mem_s * 1e3, "nvme_ms": b.nvme_s * 1e3, "net_ms": b.network_s * 1e3, "bound": p.bound, "gpu_gb": p.gpu_mem_gb,
            "host_gb": p.host_mem_gb, "flags": "; ".join(p.notes)}


def format_report(report: PlanReport) -> str:
    """The ``zo2 plan`` output: header, table, skipped layouts, rates and the assumptions footer."""
    s, w = report.model, report.workload
    head = (f"{s.name}: {s.params / 1e9:.1f} B parameters, {s.layers} blocks of {s.block_params / 1e6:.0f} M "
            f"({s.block_params * DTYPE_BYTES[w.dtype] / GB:.2f} GB {w.dtype}); {w.tokens} tokens per step "
            f"({w.batch} x {w.seq}), {w.direction} directions, prefetch {w.prefetch}, offload {w.offload}"
            + (", one matrix at a time" if w.granularity == "matrix" else "")
            + (f", written back every {w.writeback_every} steps" if w.writeback_every > 1 else "")
            + (f", {w.optimizer} ({w.state_bytes} bytes of state per weight)" if w.state_bytes else "") + "; "
            f"{report.gpus_per_node} GPU(s) per node x {report.nodes} node(s)")
    rows = [report.baseline] + report.rows
    lines = [head, _tiers_line(report), "", format_table([_plan_row(p) for p in rows], PLAN_COLUMNS)]
    for name, reason in report.skipped:
        lines.append(f"  {name}: not applicable: {reason}")
    lines += ["", "Columns compute/pcie/nvlink/host/nvme/net: busy ms per step of each resource (they overlap); "
                  "bound: the resource on most of the critical path; speed-up: over single-GPU ZO2 at the same global batch.",
              f"Rates: {_rates_line(report.rates)}", "", FOOTER]
    return "\n".join(lines)


def _tiers_line(report: PlanReport) -> str:
    """Where single-GPU ZO2's streamed blocks live and what each tier moves per step (as the start-of-run plan)."""
    w, p = report.workload, report.baseline
    block = report.model.block_params * DTYPE_BYTES[w.dtype] / GB
    state = report.model.block_params * w.state_bytes / GB  # a stateful optimizer's, moved both ways every step
    budget = w.host_budget_gb if w.host_budget_gb is not None else report.rates.host_capacity_gb
    host = p.streamed_blocks - p.nvme_blocks
    line = (f"tiers (zo2, 1 GPU): {p.resident_blocks} blocks on the device, {host} in pinned host memory "
            f"({p.host_mem_gb:.1f} GB of a {budget:.0f} GB host budget), {p.nvme_blocks} on NVMe"
            + ("" if w.nvme else " (no --nvme)") + f"; per step {p.streamed_blocks * (block + state):.1f} GB "
            f"host→device, {p.streamed_blocks * (block / w.writeback_every + state):.1f} GB device→host")
    if p.nvme_blocks:
        line += f", {p.nvme_read_gb:.1f} GB NVMe→host, {p.nvme_written_gb:.1f} GB host→NVMe"
    return line


def _rates_line(r: Rates) -> str:
    return (f"{r.source}. H2D {r.h2d_gbs:.1f}, D2H {r.d2h_gbs:.1f}, both {r.bidir_gbs:.0f} GB/s; matmul "
            f"{r.matmul_tflops:.0f} TFLOP/s x {r.matmul_efficiency:.3f}, forward floor {r.fwd_floor_ms:.2f} ms; "
            f"copy {r.copy_tbs:.2f} TB/s; NVLink {r.nvlink_gbs:.0f} GB/s; network {r.network_gbps:.0f} Gb/s; "
            f"host DRAM {r.host_mem_gbs:.0f} GB/s; NVMe read {r.nvme_read_gbs:.1f}, write {r.nvme_write_gbs:.1f} GB/s; GPU {r.gpu_mem_gb:.0f} GB; exposed uploads {r.exposed_uploads:g}")


def format_scaling(rows: list[dict], rates: Rates, tokens: int, seq: int) -> str:
    """The scaling table with its header and the published DistZO2 figure beside it."""
    lines = [f"Scaling: global batch {tokens} tokens ({tokens // seq} x {seq}) per step; speed-ups over "
             "single-GPU ZO2 at the same batch ('x' columns: each strategy, 2d = pertp on 2 GPUs; best: the fastest "
             "layout that fits; bound: the resource on most of its critical path).", "",
             format_table(rows, SCALING_COLUMNS), "", f"Published: {PUBLISHED_DISTZO2}",
             f"Rates: {_rates_line(rates)}", "", FOOTER]
    return "\n".join(lines)
