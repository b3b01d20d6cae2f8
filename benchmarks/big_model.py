"""Big-model inference, distlib beside Accelerate and transformers, in one run.

    python benchmarks/big_model.py --size-gb 1.7 --json docs/data/big_model_forward.json
    python benchmarks/big_model.py --size-gb 0.4 --shares 0 0.5 0.875  # a quicker run

Cases (each in a fresh subprocess, so peak RSS is its own; the page cache is warm):
  (b) load_checkpoint_and_dispatch to the CPU vs reading the same files with safetensors
      alone: wall time, peak RSS growth vs the checkpoint size;
  (c) the offloaded forward, for several shares of the model on disk: ``max_memory={"cpu":
      (1 - share) x model}`` through distlib's and Accelerate's ``load_checkpoint_and_dispatch``
      and transformers' ``from_pretrained(device_map="auto", max_memory=...)``, each with its
      defaults; the first forward after loading and the later ones (fastest and median of
      ``--passes``; the fastest of ``--rounds`` processes, run round-robin), peak RSS growth (all of it, and the anonymous part: mapped file pages
      are resident too), against the read floor: reading the bytes distlib put on disk from
      the warm page cache into one reused buffer; and distlib as it was before it computed
      from the mapped pages ("distlib-copying": every disk weight read into a buffer first).

``--json`` writes (c) to a file from which docs/hooks/pictures.py draws the plot of
docs/big_models.md; the table printed last is that page's table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import psutil

LAYER_PARAMS = 4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024  # attention + mlp + norms
LIBS = ("distlib", "accelerate", "transformers")
# distlib as before issue 19: every disk weight read into a buffer, none viewed in place
COPYING = "distlib-copying"
TOKENS = 16


def _config(size_gb: float) -> Any:
    import transformers

    fixed = 2 * 32000 * 1024 * 4  # embeddings and lm_head, fp32
    layers = max(1, round((size_gb * 1e9 - fixed) / (LAYER_PARAMS * 4)))
    return transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816,
                                    num_attention_heads=16, num_key_value_heads=16,
                                    num_hidden_layers=layers, vocab_size=32000)


def _empty_model(size_gb: float, lib: str) -> Any:
    import transformers

    if lib == "accelerate":
        from accelerate import init_empty_weights
    else:
        from distlib import init_empty_weights
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(_config(size_gb)).eval()


def write_checkpoint(size_gb: float, folder: str, shard_bytes: int = 250 * 10**6) -> int:
    """Write random weights as sharded safetensors with an index and a config.json."""
    import torch
    from safetensors.torch import save_file

    model = _empty_model(size_gb, "distlib")
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    for name, param in model.named_parameters():
        nbytes = param.numel() * 4
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = param.shape
        sizes[-1] += nbytes
    weight_map = {}
    generator = torch.Generator().manual_seed(0)
    for index, shapes in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes.items()}
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shapes, file))
        del tensors
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, handle)
    _config(size_gb).save_pretrained(folder)
    return sum(sizes)


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process, from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as handle:
        fields = dict(line.split(":", 1) for line in handle.read().splitlines())
    return (int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024)


def _touch(tensors: Any) -> None:
    """Read one element per 4 KiB page of every tensor, so lazily mapped pages are in."""
    for tensor in tensors:
        if not tensor.is_meta and tensor.numel():
            flat = tensor.reshape(-1)
            float(flat[:: max(1, 4096 // flat.element_size())].float().sum())


def _budget(size_gb: float, share: float) -> int:
    """The cpu budget that leaves ``share`` of the model's bytes for the disk."""
    model = _empty_model(size_gb, "distlib")
    total = sum(p.numel() * 4 for p in model.parameters())
    return int(total * 1.25) if share == 0 else int(total * (1 - share))


def _plan(size_gb: float, share: float) -> dict[str, Any]:
    """The device map every tool gets for ``share`` (planned once, by distlib's planner).

    Accelerate's planner, given the same small cpu budget, reserves room for the largest
    layer and sends everything to disk, where its loader then fails; one explicit map puts
    the same bytes on disk for all three tools, and gives the floor those bytes.
    """
    from distlib import infer_device_map

    model = _empty_model(size_gb, "distlib")
    plan = infer_device_map(model, {"cpu": _budget(size_gb, share)}, ["LlamaDecoderLayer"])
    return plan.as_dict()


def _disk_bytes(model: Any, device_map: dict[str, Any]) -> tuple[int, int]:
    """(all bytes mapped to disk, the largest module on disk: what one hook brings in)."""
    def on_disk(name: str) -> bool:
        return any(device == "disk" and (not key or name == key or name.startswith(key + "."))
                   for key, device in device_map.items())

    modules = [sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
               for name, m in model.named_modules() if on_disk(name)]
    return sum(modules), max(modules, default=0)


def load_case(lib: str, size_gb: float, folder: str) -> dict[str, Any]:
    """(b): load everything to the CPU (or read the files with safetensors: ``lib="floor"``)."""
    if lib == "floor":
        from safetensors.torch import load_file

        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        base, start = _rss(), time.perf_counter()
        state = {}
        for file in files:
            state.update(load_file(os.path.join(folder, file)))
        seconds = time.perf_counter() - start
        _touch(state.values())
        return {"seconds": seconds, "seconds_with_touch": time.perf_counter() - start,
                "peak_growth": _peak() - base}
    model = _empty_model(size_gb, lib)
    base, start = _rss(), time.perf_counter()
    if lib == "accelerate":
        from accelerate import load_checkpoint_and_dispatch as accelerate_load

        accelerate_load(model, folder, device_map={"": "cpu"})
    else:
        from distlib import load_checkpoint_and_dispatch

        load_checkpoint_and_dispatch(model, folder, {"": "cpu"}, quiet=True)
    seconds = time.perf_counter() - start
    _touch(model.state_dict().values())
    return {"seconds": seconds, "seconds_with_touch": time.perf_counter() - start,
            "peak_growth": _peak() - base}


def _load_offloaded(lib: str, size_gb: float, folder: str, share: float,
                    offload: str) -> Any:
    """Load with the cpu budget of ``share``: distlib plans from it, the others get its map."""
    if lib == "transformers":
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map=_plan(size_gb, share), offload_folder=offload).eval()
    if lib == "accelerate":
        from accelerate import load_checkpoint_and_dispatch as accelerate_load

        return accelerate_load(_empty_model(size_gb, lib), folder,
                               device_map=_plan(size_gb, share), offload_folder=offload)
    from distlib import load_checkpoint_and_dispatch

    if lib == COPYING:
        from distlib.big_model import hooks

        hooks.is_viewable = lambda src: False
    return load_checkpoint_and_dispatch(_empty_model(size_gb, "distlib"), folder, "auto",
                                        max_memory={"cpu": _budget(size_gb, share)},
                                        no_split_module_classes=["LlamaDecoderLayer"],
                                        offload_folder=offload, quiet=True)


def _sampled_peak(model: Any, ids: Any) -> tuple[int, int]:
    """Peak (anonymous, total) RSS over one forward, polled by a thread (every tool alike:
    Accelerate's hooks replace ``forward``, so module hooks would miss its peak)."""
    import threading

    peak, done = [0, 0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            anon, file = _status()
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], anon + file)
            done.wait(0.0005)

    thread = threading.Thread(target=poll, name="rss-poll")
    thread.start()
    try:
        model(ids)
    finally:
        done.set()
        thread.join()
    return peak[0], peak[1]


def forward_case(lib: str, size_gb: float, folder: str, share: float,
                 passes: int) -> dict[str, Any]:
    """(c): load with a cpu budget, then time the first and the later forwards."""
    import torch

    budget, plan = _budget(size_gb, share), _plan(size_gb, share)
    anon0, file0 = _status()
    base = _rss()
    with tempfile.TemporaryDirectory(prefix="offload-") as offload:
        start = time.perf_counter()
        model = _load_offloaded(lib, size_gb, folder, share, offload)
        loaded = time.perf_counter() - start
        device_map = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
        if lib in ("distlib", COPYING) and device_map != plan:
            raise RuntimeError(f"distlib planned {device_map}, not the map the others get")
        ids = torch.randint(0, 32000, (1, TOKENS), generator=torch.Generator().manual_seed(0))
        times = []
        with torch.no_grad():
            for _ in range(passes + 1):
                start = time.perf_counter()
                logits = model(ids).logits
                times.append(time.perf_counter() - start)
            anon, total = _sampled_peak(model, ids)
        disk, largest = _disk_bytes(model, device_map)
        return {"load_s": loaded, "first_s": times[0], "later_min_s": min(times[1:]),
                "later_median_s": statistics.median(times[1:]), "budget": budget,
                "disk_bytes": disk, "largest_disk_module": largest,
                "disk_entries": sum(1 for d in device_map.values() if d == "disk"),
                "peak_growth": _peak() - base, "forward_peak_anon": anon - anon0,
                "forward_peak_total": total - anon0 - file0,
                "logits_sum": float(logits.double().sum())}


def floor_case(size_gb: float, folder: str, share: float, passes: int) -> dict[str, Any]:
    """The read floor: the bytes distlib puts on disk, read warm into one reused buffer."""
    import torch

    from distlib.big_model.device_map import DeviceMap
    from distlib.big_model.files import checkpoint_files, read_safetensors_header

    plan = DeviceMap.of(_plan(size_gb, share))
    sources = {n: s for f in checkpoint_files(folder) for n, s in
               read_safetensors_header(f).items()}
    on_disk = [s for n, s in sources.items() if plan.device_of(n) == "disk"]
    if not on_disk:
        return {"seconds": 0.0, "bytes": 0}
    buffer = torch.empty(max(s.nbytes for s in on_disk), dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    times = []
    for _ in range(passes + 1):
        start = time.perf_counter()
        handles: dict[str, Any] = {}
        for src in on_disk:
            if src.file not in handles:
                handles[src.file] = open(src.file, "rb", buffering=0)  # noqa: SIM115
            handles[src.file].seek(src.offset)
            done = 0
            while done < src.nbytes:
                done += handles[src.file].readinto(view[done:src.nbytes])
        for handle in handles.values():
            handle.close()
        times.append(time.perf_counter() - start)
    total = sum(s.nbytes for s in on_disk)
    return {"seconds": min(times[1:]), "median_s": statistics.median(times[1:]), "bytes": total}


def _subprocess(*args: str) -> dict[str, Any]:
    """Run one case in a fresh process; its last stdout line is its JSON result."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=False, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-3:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the fastest later forwards (read), its first forward the fastest seen."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    key = "later_min_s" if "later_min_s" in good[0] else "seconds"
    best = dict(min(good, key=lambda r: r[key]))
    if "first_s" in best:
        best["first_s"] = min(r["first_s"] for r in good)
    best["runs"] = len(good)
    return best


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The docs tables: seconds per forward (first / later, fastest) with the ratios; then
    the peak RSS growth over a forward, against the cpu budget plus the largest disk module."""
    lines = ["| on disk | distlib first / later | Accelerate | transformers | distlib, copying "
             "| read floor | distlib ÷ best peer (later) | distlib ÷ floor (later) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = ["—" if lib not in row else "error" if "error" in row[lib] else
                 f"{row[lib]['first_s']:.3f} / {row[lib]['later_min_s']:.3f}"
                 for lib in (*LIBS, COPYING)]
        floor = row["floor"]
        peers = [row[lib].get("later_min_s") for lib in LIBS[1:]]
        best = min((p for p in peers if isinstance(p, float)), default=None)
        ours = row["distlib"].get("later_min_s")
        vs_floor = _ratio(ours, floor.get("seconds"))
        lines.append(f"| {row['share']:.1%} ({floor.get('bytes', 0) / 1e9:.2f} GB) | "
                     + " | ".join(cells) + f" | {floor.get('seconds', 0):.3f} | "
                     f"{_ratio(ours, best)} | {vs_floor if vs_floor is not None else '—'} |")
    lines += ["", "| on disk | cpu budget + largest disk module | distlib total (anonymous) | "
              "Accelerate | transformers |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        ours = row["distlib"]
        cells = ["error" if "error" in row[lib] else
                 f"{row[lib]['forward_peak_total'] / 1e6:,.0f} "
                 f"({row[lib]['forward_peak_anon'] / 1e6:,.0f}) MB" for lib in LIBS]
        bound = (ours.get("budget", 0) + ours.get("largest_disk_module", 0)) / 1e6
        lines.append(f"| {row['share']:.1%} | {bound:,.0f} MB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "load_average": os.getloadavg(), "date": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="minutes")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.7)
    parser.add_argument("--folder", default=None, help="reuse/write the checkpoint here")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.875],
                        help="shares of the model's bytes on disk in (c)")
    parser.add_argument("--passes", type=int, default=5, help="later forwards timed in (c)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="fresh processes per tool and share in (c) (fastest kept)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of (b) (fastest kept)")
    parser.add_argument("--json", default=None, help="write (c) and the machine here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lib", default="distlib", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(not 0 <= s < 1 for s in args.shares) or min(args.passes, args.repeat, args.rounds) < 1:
        parser.error("--shares must be in [0, 1); --passes, --repeat and --rounds at least 1")
    if args.case:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        result = (load_case(args.lib, args.size_gb, args.folder) if args.case == "load" else
                  floor_case(args.size_gb, args.folder, args.share, args.passes)
                  if args.lib == "floor" else
                  forward_case(args.lib, args.size_gb, args.folder, args.share, args.passes))
        print(json.dumps(result))
        return 0
    folder = args.folder or tempfile.mkdtemp(prefix="distlib-bench-")
    if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        os.makedirs(folder, exist_ok=True)
        write_checkpoint(args.size_gb, folder)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    layers = _config(args.size_gb).num_hidden_layers
    print(f"checkpoint: {folder} ({size / 1e9:.2f} GB, {layers} layers)", flush=True)
    common = ["--size-gb", str(args.size_gb), "--folder", folder]
    _subprocess("--case", "load", "--lib", "floor", *common)  # warm the page cache
    loads = {lib: min((_subprocess("--case", "load", "--lib", lib, *common)
                       for _ in range(args.repeat)), key=lambda r: r.get("seconds", 1e9))
             for lib in ("floor", "distlib", "accelerate")}
    print(json.dumps({"load": loads}, indent=1), flush=True)
    rows = []
    for share in args.shares:
        extra = [*common, "--share", str(share), "--passes", str(args.passes)]
        runs: dict[str, list[dict[str, Any]]] = {lib: [] for lib in (*LIBS, COPYING, "floor")}
        if share == 0:  # nothing on disk: distlib copies nothing, the floor reads nothing
            runs.pop(COPYING)
            runs["floor"].append({"seconds": 0.0, "bytes": 0})
        for _ in range(args.rounds):  # round-robin, so a busy spell hits every tool alike
            for lib, got in runs.items():
                if lib != "floor" or share:
                    got.append(_subprocess("--case", "forward", "--lib", lib, *extra))
        row: dict[str, Any] = {"share": share, **{lib: _fastest(got) for lib, got in
                                                  runs.items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        shown = [f"--size-gb {args.size_gb:g}", f"--passes {args.passes}",
                 f"--rounds {args.rounds}", "--shares " + " ".join(f"{s:g}" for s in args.shares)]
        body = {"command": "python benchmarks/big_model.py " + " ".join(shown),
                "checkpoint_bytes": size, "layers": layers, "tokens": TOKENS,
                "machine": _machine(), "load": loads, "forward": rows}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(body, handle, indent=1)
            handle.write("\n")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
