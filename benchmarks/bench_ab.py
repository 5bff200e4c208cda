"""The engine's step time in two versions of zo2, measured interleaved in one run: this checkout against a git
revision (default ``HEAD~1``), for a refactor that must not change speed.

The revision is checked out into a temporary git worktree; each round runs one child process per version
(alternating which goes first), and each child times ``ZOEngine.step`` on the same model, batch and seeds with
the blocks resident (``offload=false``) and streamed (``offload=true``, every block through the streamer). The
table shows the median over rounds of each version's median step and their ratio (this / base); a ratio within
the rounds' spread is "unchanged". Also checks that both versions computed the same losses (bit for bit).

    python benchmarks/bench_ab.py                          # CPU: tiny and small OPT shapes, vs HEAD~1
    python benchmarks/bench_ab.py --base 2da0ed7 --rounds 5 --shapes small
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

HERE = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": dict(hidden_size=64, ffn_dim=256, num_attention_heads=4, num_hidden_layers=4, vocab_size=512),
    "small": dict(hidden_size=256, ffn_dim=1024, num_attention_heads=4, num_hidden_layers=6, vocab_size=2048),
}


def child(shape: str, batch: int, seq: int, repeat: int) -> dict:
    """Run in a version's checkout: step times and losses with the blocks resident and streamed."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from zo2 import ZOConfig, ZOEngine

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    out = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = OPTForCausalLM(OPTConfig(**SHAPES[shape], max_position_embeddings=seq + 2)).eval()
        ids = torch.randint(3, SHAPES[shape]["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        engine = ZOEngine(model, ZOConfig(lr=1e-4, eps=1e-3, offload=offload, device="cpu"))
        losses, times = [], []
        for _ in range(repeat + 1):
            start = time.perf_counter()
            losses.append(engine.step(data).loss)
            times.append(time.perf_counter() - start)
        out["streamed" if offload else "resident"] = {"ms": statistics.median(times[1:]) * 1e3, "losses": losses}
    return out


def run_child(root: Path, args: argparse.Namespace, shape: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(root / p) for p in ("", "kernels", "launcher")))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", shape, "--batch", str(args.batch), "--seq",
           str(args.seq), "--repeat", str(args.repeat)]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"the child in {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(args: argparse.Namespace, base_root: Path) -> list[dict]:
    rows = []
    for shape in args.shapes:
        samples: dict[tuple[str, str], list[float]] = {}
        losses: dict[str, list] = {}
        for r in range(args.rounds):
            order = [("this", HERE), ("base", base_root)]
            for version, root in order if r % 2 == 0 else order[::-1]:
                result = run_child(root, args, shape)
                for mode, m in result.items():
                    samples.setdefault((version, mode), []).append(m["ms"])
                    losses.setdefault(f"{version}/{mode}", m["losses"])
        for mode in ("resident", "streamed"):
            this, base = samples[("this", mode)], samples[("base", mode)]
            rows.append({"shape": shape, "mode": mode, "this_ms": statistics.median(this),
                         "base_ms": statistics.median(base), "ratio": statistics.median(this) / statistics.median(base),
                         "spread": (max(this + base) - min(this + base)) / statistics.median(base),
                         "same_losses": "yes" if losses[f"this/{mode}"] == losses[f"base/{mode}"] else "NO"})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD~1", help="git revision to compare against")
    parser.add_argument("--shapes", nargs="*", default=["tiny", "small"], choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per child (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="child pairs per shape, alternating the order")
    parser.add_argument("--out", default="benchmarks/out/ab.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq, args.repeat)))
        return
    from bench_common import environment, print_table, write_json

    with tempfile.TemporaryDirectory(prefix="zo2-ab-") as tmp:
        base_root = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", "-q", str(base_root), args.base],
                       check=True)
        try:
            rows = compare(args, base_root)
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(base_root)], check=False)
    print()
    print_table(rows, [("shape", "shape", "s"), ("mode", "mode", "s"), ("base_ms", "base (ms)", ".1f"),
                       ("this_ms", "this (ms)", ".1f"), ("ratio", "this / base", ".3f"),
                       ("spread", "spread", ".3f"), ("same_losses", "same losses", "s")])
    write_json(args.out, {"benchmark": "ab", "base": args.base, "env": environment(), "rows": rows})


if __name__ == "__main__":
    main()
