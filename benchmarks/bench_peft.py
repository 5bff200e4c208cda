"""Full-parameter ZO vs LoRA-ZO (and prompt tuning): what is perturbed, stored and moved, and the step time.

For each shape and method, resident (offload = false) and streamed (offload = true): parameters in total and
trainable, the bytes of the trainable parameter store (perturbed, updated, written back) and of the frozen store
(base weights, uploaded read-only with their block), the bytes moved per step, the device slots, and the median
step time. Prints a table and writes JSON.

    python benchmarks/bench_peft.py                                  # CPU: the tiny OPT shape
    python benchmarks/bench_peft.py --shapes tiny small --repeat 3
    python benchmarks/bench_peft.py --device cuda --shapes opt-1.3b opt-6.7b --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bench_common import environment, opt_config, print_table, timed, write_json  # noqa: E402
from zo2 import ZOConfig, ZOEngine  # noqa: E402

SHRUNK = {"tiny": dict(hidden_size=64, ffn_size=256, num_heads=4, num_layers=4),
          "small": dict(hidden_size=256, ffn_size=1024, num_heads=4, num_layers=8)}
"""OPT-125m-like shapes (same vocabulary) shrunk for CPU runs; 'tiny' is benchmarks/bench_step.py's."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(shape: str, method: str, dtype: torch.dtype, rank: int, tokens: int):
    cfg = opt_config("opt-125m", **SHRUNK[shape]) if shape in SHRUNK else opt_config(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                            target_modules=["q_proj", "v_proj"]))
    elif method == "prompt":
        model = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    elif method == "prefix":
        model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    return model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(shape: str, method: str, offload: bool, args, dtype: torch.dtype) -> dict:
    model = build(shape, method, dtype, args.rank, args.tokens)
    params = list({id(p): p for p in model.parameters()}.values())
    engine = ZOEngine(model, ZOConfig(lr=1e-6, eps=1e-3, offload=offload, device=args.device))
    trainable = list(engine.params.values())
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    seconds = timed(lambda: engine.step(batch), warmup=1, repeat=args.repeat)
    moved = engine.last_transfer
    streamer = engine.streamer
    frozen = streamer.frozen if streamer is not None else None
    row = {
        "shape": shape, "method": method, "offload": offload, "batch": f"{args.batch}x{args.seq}",
        "params_M": sum(p.numel() for p in params) / 1e6,
        "trainable_M": sum(p.numel() for p in trainable) / 1e6,
        "total_MB": nbytes(params) / 1e6,
        "trainable_MB": nbytes(trainable) / 1e6,
        "store_MB": engine.store.nbytes / 1e6 if engine.store is not None else 0.0,
        "frozen_store_MB": frozen.nbytes / 1e6 if frozen is not None else 0.0,
        "slots_MB": streamer.device_bytes / 1e6 if streamer is not None else 0.0,
        "h2d_MB_per_step": moved.bytes_h2d / 1e6 if moved is not None else 0.0,
        "d2h_MB_per_step": moved.bytes_d2h / 1e6 if moved is not None else 0.0,
        "step_ms": seconds * 1e3,
    }
    row["trainable_pct"] = 100 * row["trainable_M"] / row["params_M"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="*", default=["tiny"])
    parser.add_argument("--methods", nargs="*", default=["full", "lora", "prompt", "prefix"],
                        choices=["full", "lora", "prompt", "prefix"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (on q_proj and v_proj)")
    parser.add_argument("--tokens", type=int, default=16, help="virtual tokens of prompt and prefix tuning")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/out/peft.json")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    rows = []
    for shape in args.shapes:
        for method in args.methods:
            for offload in (False, True):
                rows.append(measure(shape, method, offload, args, dtype))
                print(rows[-1], flush=True)
    print()
    print_table(rows, [("shape", "shape", "s"), ("method", "method", "s"), ("offload", "offload", "d"),
                       ("params_M", "params (M)", ".2f"), ("trainable_M", "trainable (M)", ".4f"),
                       ("trainable_pct", "trainable %", ".2f"), ("store_MB", "store MB", ".3f"),
                       ("frozen_store_MB", "frozen store MB", ".2f"), ("h2d_MB_per_step", "H2D MB/step", ".2f"),
                       ("d2h_MB_per_step", "D2H MB/step", ".3f"), ("step_ms", "step (ms)", ".1f")])
    write_json(args.out, {"benchmark": "peft", "env": environment(), "dtype": str(dtype).split(".")[-1],
                          "rows": rows})


if __name__ == "__main__":
    main()
