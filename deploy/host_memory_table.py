"""Print the host-memory table of deploy/OPERATIONS.md from zo2's preset shapes.

Per node, the parameter store of a job holds the streamed blocks in the storage dtype: at most
params × bytes per element (embeddings and head stay on the GPU, so this is an upper bound), and zo2 refuses to
build a store unless HOST_MARGIN_BYTES (2 GiB) stay free beside it. With several processes per node and
``optim.sliced_transfers`` (the default) the node holds ONE shared store; otherwise each process holds its own.
The last column is the full CPU build each process makes with ``model.stream_load = "never"`` (and for models
under 4 GB with "auto"); larger models are streamed into the store and never built in full (OPERATIONS.md).

    python deploy/host_memory_table.py
"""

from __future__ import annotations

from zo2.config.presets import get_preset, human_count, parameter_count, preset_names
from zo2.offload.store import HOST_MARGIN_BYTES

DTYPE_BYTES = {"bf16 / fp16": 2, "fp32": 4}


def rows() -> list[tuple[str, int]]:
    """(preset, parameters) of every OPT and Llama preset."""
    return [(name, parameter_count(get_preset(name).model)) for name in preset_names()
            if name.startswith(("opt-", "llama-"))]


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes < 10e9 else f"{nbytes / 1e9:,.0f} GB"


def table() -> str:
    """The markdown table: parameters, store + margin per node for each storage dtype."""
    head = (["preset", "parameters"] + [f"store + margin per node, {d}" for d in DTYPE_BYTES]
            + ['full CPU build per process, `stream_load = "never"` (bf16)'])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, n in rows():
        cells = [_gb(n * size + HOST_MARGIN_BYTES) for size in DTYPE_BYTES.values()] + [_gb(n * 2)]
        lines.append(f"| `{name}` | {human_count(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
