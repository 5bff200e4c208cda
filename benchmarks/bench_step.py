"""ZOEngine.step vs two plain Hugging Face forwards under torch.no_grad() on the same batch.

The ratio is the engine's overhead over the two forwards a MeZO step cannot avoid (perturbation generation,
the update, the unit-by-unit schedule). Prints a table and writes JSON.

    python benchmarks/bench_step.py                    # CPU: tiny + opt-125m shapes
    python benchmarks/bench_step.py --device cuda      # GPU: opt-125m, opt-1.3b, opt-6.7b shapes in bf16
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench_common import environment, opt_config, print_table, timed, write_json  # noqa: E402
from zo2 import ZOConfig, ZOEngine  # noqa: E402

TINY = dict(hidden_size=64, ffn_size=256, num_heads=4, num_layers=4)
"""'tiny': an OPT-125m-like model (same vocabulary) shrunk to hidden 64, 4 layers."""


def build(shape: str, dtype: torch.dtype, device: str):
    cfg = opt_config("opt-125m", **TINY) if shape == "tiny" else opt_config(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.eval()


def measure(shape: str, batch: int, seq: int, dtype: torch.dtype, device: str, kernels: str, repeat: int) -> dict:
    model = build(shape, dtype, device)
    ids = torch.randint(3, 50272, (batch, seq), device=device)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    @torch.no_grad()
    def two_forwards():
        model(**data).loss.item()
        model(**data).loss.item()

    t_fwd = timed(two_forwards, warmup=1, repeat=repeat)
    cfg = ZOConfig(lr=1e-6, eps=1e-3, offload=False, device=device)
    if "kernels" in ZOConfig.__dataclass_fields__:
        cfg = ZOConfig(lr=1e-6, eps=1e-3, offload=False, device=device, kernels=kernels)
    engine = ZOEngine(model, cfg)
    t_step = timed(lambda: engine.step(data), warmup=1, repeat=repeat)
    params = sum(p.numel() for p in model.parameters())
    del engine, model
    return {"shape": shape, "params_M": params / 1e6, "batch": f"{batch}x{seq}", "dtype": str(dtype).split(".")[-1],
            "kernels": kernels, "two_forwards_ms": t_fwd * 1e3, "step_ms": t_step * 1e3, "ratio": t_step / t_fwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/out/step.json")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    shapes = args.shapes or (["opt-125m", "opt-1.3b", "opt-6.7b"] if gpu else ["tiny", "opt-125m"])
    dtype = torch.bfloat16 if gpu else torch.float32
    batches = [(1, 2048), (8, 256)] if gpu else [(4, 64)]
    rows = []
    for shape in shapes:
        for b, s in batches:
            rows.append(measure(shape, b, s, dtype, args.device, args.kernels, args.repeat))
            print(rows[-1], flush=True)
    print()
    print_table(rows, [("shape", "shape", "s"), ("params_M", "params (M)", ".0f"), ("batch", "batch", "s"),
                       ("dtype", "dtype", "s"), ("two_forwards_ms", "2 fwd (ms)", ".2f"),
                       ("step_ms", "step (ms)", ".2f"), ("ratio", "step / 2 fwd", ".2f")])
    write_json(args.out, {"benchmark": "step", "env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
