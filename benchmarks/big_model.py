"""Big-model inference, distlib beside Accelerate and transformers, in one run.

    python benchmarks/big_model.py --size-gb 1.7 --json docs/data/big_model_forward.json
    python benchmarks/big_model.py --size-gb 0.4 --shares 0 0.5 0.875  # a quicker run

Cases (the page cache is warm):
  (b) load_checkpoint_and_dispatch to the CPU vs reading the same files with safetensors
      alone: wall time, peak RSS growth vs the checkpoint size (each in a fresh process);
  (c) the offloaded forward, for several shares of the model on disk, one process per share:
      one device map, planned by distlib from ``max_memory={"cpu": (1 - share) x model}``,
      given to distlib's and Accelerate's ``load_checkpoint_and_dispatch`` and transformers'
      ``from_pretrained(device_map=...)``, each otherwise with its defaults, and to distlib
      as it was before it computed from the mapped pages ("distlib-copying": every disk
      weight read into a buffer first), and the same model all in RAM (distlib, nothing
      offloaded: the compute alone, in the same run). Each tool is loaded and its first forward timed;
      then ``--passes`` later forwards of every tool, interleaved with the read floor
      (reading the bytes on disk from the warm page cache into one reused buffer) in a
      rotating order, so that other work on the machine hits them all alike; then the RSS
      growth over one forward, polled by a thread (all of it, and the anonymous part: mapped
      file pages are resident too).

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
# the same model with nothing offloaded (distlib, {"": "cpu"}): the compute alone, same run
RESIDENT = "all-in-ram"
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

    if lib == RESIDENT:
        return load_checkpoint_and_dispatch(_empty_model(size_gb, "distlib"), folder,
                                            {"": "cpu"}, quiet=True)
    return load_checkpoint_and_dispatch(_empty_model(size_gb, "distlib"), folder, "auto",
                                        max_memory={"cpu": _budget(size_gb, share)},
                                        no_split_module_classes=["LlamaDecoderLayer"],
                                        offload_folder=offload, quiet=True)


def _polled_growth(run: Any) -> tuple[int, int]:
    """RSS growth (anonymous, total) over ``run()`` above the RSS before it, polled by a
    thread every half millisecond (every tool alike: Accelerate's hooks replace
    ``forward``, so module hooks would miss its peak)."""
    import threading

    before = _status()
    peak, done = list(before), threading.Event()

    def poll() -> None:
        while not done.is_set():
            anon, file = _status()
            peak[0], peak[1] = max(peak[0], anon), max(peak[1], anon + file)
            done.wait(0.0005)

    thread = threading.Thread(target=poll, name="rss-poll")
    thread.start()
    try:
        run()
    finally:
        done.set()
        thread.join()
    return peak[0] - before[0], peak[1] - sum(before)


class _Copying:
    """distlib as before issue 19, while entered: no disk weight is viewed in place."""

    def __enter__(self) -> None:
        from distlib.big_model import hooks

        self.hooks, self.saved = hooks, hooks.is_viewable
        hooks.is_viewable = lambda src: False

    def __exit__(self, *_: Any) -> None:
        self.hooks.is_viewable = self.saved


def _reader(size_gb: float, folder: str, share: float) -> tuple[Any, int]:
    """The read floor as a callable: the bytes distlib puts on disk, read into one buffer."""
    import torch

    from distlib.big_model.device_map import DeviceMap
    from distlib.big_model.files import checkpoint_files, read_safetensors_header

    plan = DeviceMap.of(_plan(size_gb, share))
    on_disk = [s for f in checkpoint_files(folder) for n, s in read_safetensors_header(f).items()
               if plan.device_of(n) == "disk"]
    view = memoryview(torch.empty(max(s.nbytes for s in on_disk), dtype=torch.uint8).numpy())

    def read() -> None:
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

    return read, sum(s.nbytes for s in on_disk)


def _warm_up() -> None:
    """One forward of a one-layer model of the same widths: torch's one-time costs, paid."""
    import torch
    import transformers

    config = _config(0.0)
    config.num_hidden_layers, config.vocab_size = 1, 1000
    with torch.no_grad():
        transformers.AutoModelForCausalLM.from_config(config).eval()(torch.zeros(1, TOKENS,
                                                                                  dtype=torch.long))


def forward_case(size_gb: float, folder: str, share: float, passes: int) -> dict[str, Any]:
    """(c) in one process: load each tool and time its first forward, then the later forwards
    of all of them interleaved (the order rotating), so a busy spell hits every tool alike."""
    import contextlib

    import torch

    _warm_up()
    ids = torch.randint(0, 32000, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    plan = _plan(size_gb, share)
    tools = [*LIBS, COPYING, RESIDENT] if share else list(LIBS)
    out: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="offload-") as offload, torch.no_grad():
        for lib in tools:
            scope = _Copying if lib == COPYING else contextlib.nullcontext
            start = time.perf_counter()
            try:
                with scope():
                    model = _load_offloaded(lib, size_gb, folder, share,
                                            os.path.join(offload, lib))
                    loaded = time.perf_counter() - start
                    start = time.perf_counter()
                    logits = model(ids).logits
                    first = time.perf_counter() - start
            except Exception as exc:  # a tool that cannot run this map: say so in the table
                out[lib] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                continue
            device_map = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
            if lib in ("distlib", COPYING) and device_map != plan:
                raise RuntimeError(f"distlib planned {device_map}, not the map the others get")
            disk, largest = _disk_bytes(model, device_map) if lib != RESIDENT else (0, 0)
            out[lib] = {"load_s": loaded, "first_s": first, "later": [], "disk_bytes": disk,
                        "largest_disk_module": largest, "logits_sum": float(logits.double().sum())}
            runs[lib] = (scope, lambda model=model: model(ids))
        if share:
            read, nbytes = _reader(size_gb, folder, share)
            read()  # warm
            out["floor"] = {"later": [], "bytes": nbytes}
            runs["floor"] = (contextlib.nullcontext, read)
        names = list(runs)
        for index in range(passes):
            for lib in names[index % len(names):] + names[:index % len(names)]:
                scope, run = runs[lib]
                with scope():
                    start = time.perf_counter()
                    run()
                    out[lib]["later"].append(time.perf_counter() - start)
        for lib in (t for t in tools if t in runs):
            scope, run = runs[lib]
            with scope():
                out[lib]["forward_growth_anon"], out[lib]["forward_growth_total"] = \
                    _polled_growth(run)
    for got in (g for g in out.values() if "later" in g):
        got["later_min_s"], got["later_median_s"] = min(got["later"]), statistics.median(
            got["later"])
    out.setdefault("floor", {"later_min_s": 0.0, "later_median_s": 0.0, "bytes": 0})
    return {"budget": _budget(size_gb, share), **out}


def _subprocess(*args: str) -> dict[str, Any]:
    """Run one case in a fresh process; its last stdout line is its JSON result."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=False, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-3:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _ratio(a: Any, b: Any) -> float | None:
    return round(a / b, 2) if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def _cell(got: dict[str, Any] | None) -> str:
    if got is None:
        return "—"
    if "error" in got:
        return "fails"
    return f"{got['first_s']:.3f} / {got['later_median_s']:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The docs tables: seconds per forward (first / later, median) with the ratios; then
    the RSS growth over a forward, against the largest module on disk."""
    lines = ["| on disk | distlib first / later | Accelerate | transformers | distlib, copying "
             "| read floor | all in RAM | distlib ÷ best peer | ÷ floor | ÷ all in RAM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in (r for r in rows if "error" not in r):
        floor = row["floor"]
        peers = [row[lib].get("later_median_s") for lib in LIBS[1:]]
        best = min((p for p in peers if isinstance(p, float)), default=None)
        ours = row["distlib"].get("later_median_s")
        vs_floor = _ratio(ours, floor["later_median_s"])
        ram = row.get(RESIDENT, {}).get("later_median_s")
        lines.append(f"| {row['share']:.1%} ({floor['bytes'] / 1e9:.2f} GB) | "
                     + " | ".join(_cell(row.get(lib)) for lib in (*LIBS, COPYING))
                     + f" | {floor['later_median_s']:.3f} | "
                     + (f"{ram:.3f}" if ram is not None else "—")
                     + f" | {_ratio(ours, best)} | {vs_floor if vs_floor is not None else '—'}"
                     f" | {_ratio(ours, ram) or '—'} |")
    lines += ["", "| on disk | largest module on disk | distlib: total (anonymous) | "
              "Accelerate | transformers |", "| --- | --- | --- | --- | --- |"]
    for row in (r for r in rows if "error" not in r):
        cells = ["fails" if "error" in row[lib] else
                 f"{row[lib]['forward_growth_total'] / 1e6:,.0f} "
                 f"({row[lib]['forward_growth_anon'] / 1e6:,.0f}) MB" for lib in LIBS]
        largest = row["distlib"].get("largest_disk_module", 0) / 1e6
        lines.append(f"| {row['share']:.1%} | {largest:,.0f} MB | " + " | ".join(cells) + " |")
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
    parser.add_argument("--passes", type=int, default=8,
                        help="later forwards of each tool timed in (c)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of (b) (fastest kept)")
    parser.add_argument("--json", default=None, help="write (c) and the machine here")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lib", default="distlib", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(not 0 <= s < 1 for s in args.shares) or min(args.passes, args.repeat) < 1:
        parser.error("--shares must be in [0, 1); --passes and --repeat at least 1")
    if args.case:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        result = (load_case(args.lib, args.size_gb, args.folder) if args.case == "load" else
                  forward_case(args.size_gb, args.folder, args.share, args.passes))
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
        row = {"share": share, **_subprocess("--case", "forward", *common, "--share", str(share),
                                             "--passes", str(args.passes))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        shown = [f"--size-gb {args.size_gb:g}", f"--passes {args.passes}", "--shares " + " ".join(f"{s:g}" for s in args.shares)]
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
