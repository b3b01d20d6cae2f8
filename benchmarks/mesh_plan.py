"""How long the mesh planner takes for a 70B Llama config (target: well under a second).

    python benchmarks/mesh_plan.py [--runs 20]

Plans the config under several meshes (the config's tensors are counted from the JSON alone,
no model is built) and prints the median and worst time of each, with the per-rank bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

from distlib.topology import Mesh
from distlib.training.plan import plan_parallelism

LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672,
             "vocab_size": 128256}
MESHES = (Mesh(dp_shard=1), Mesh(dp_shard=64), Mesh(dp_shard=8, tp=8),
          Mesh(dp_replicate=4, dp_shard=8, cp=2, tp=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    print(f"{'mesh':<40} {'median ms':>10} {'max ms':>8} {'GiB per rank':>13}")
    for mesh in MESHES:
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            plan = plan_parallelism(LLAMA_70B, mesh, precision="bf16", seq_len=8192)
            times.append(time.perf_counter() - start)
        print(f"{mesh!s:<40} {1e3 * statistics.median(times):>10.1f} "
              f"{1e3 * max(times):>8.1f} {plan.rank_bytes / 2**30:>13.2f}")
    print(f"({plan.num_parameters:,} parameters)")


if __name__ == "__main__":
    main()
