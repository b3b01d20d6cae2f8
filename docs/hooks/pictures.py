"""mkdocs hook: draw the docs' pictures from distlib's own code at build time.

Each picture is computed by the function it shows — the shard planner, the device-map planner,
the launch plan and the agent, the mesh, the example's training run (its tracker's file), the
big-model benchmark's measurements (docs/data/big_model_forward.json, which it writes) — and
drawn with matplotlib into an SVG that is added to the site as a generated file
(``pictures/NAME.svg``). Nothing is committed: change the
code and the next build draws what it now does. ``python docs/hooks/pictures.py DIR`` writes
the SVGs into DIR, to look at them without building the site.
"""

from __future__ import annotations

import io
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch, Rectangle

# The colours of rank 0, 1, 2, ... and of the devices (colour-blind safe, Okabe-Ito).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#999999")
INK = "#222222"
PAD = "#E3E3E3"

plt.rcParams.update({
    "font.family": "DejaVu Sans", "font.size": 10, "svg.fonttype": "path",
    "svg.hashsalt": "distlib-docs", "figure.dpi": 100,
})


def _box(ax: Any, x: float, y: float, w: float, h: float, text: str, *, face: str,
         edge: str = INK, color: str = "white",
         size: float = 10, weight: str = "normal", round_: bool = True,
         linestyle: str = "-") -> None:
    style = "round,pad=0,rounding_size=0.08" if round_ else "square,pad=0"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=face,
                                edgecolor=edge, linewidth=1.0,
                                linestyle=linestyle))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", color=color,
            fontsize=size, fontweight=weight)


def _canvas(width: float, height: float, xlim: tuple[float, float],
            ylim: tuple[float, float]) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_axis_off()
    fig.subplots_adjust(0.01, 0.01, 0.99, 0.99)
    return fig, ax


# --- (a) how `shard` deals batches to ranks -------------------------------------------------

def draw_shard() -> Any:
    """Ten samples, batch size 2, three ranks: `ShardPlan` with and without `even_batches`."""
    from distlib.data import ShardPlan

    num_samples, batch_size, world_size = 10, 2, 3
    fig, ax = _canvas(9.2, 4.8, (-1.6, 17.2), (0.8, 10.6))
    ax.text(-1.5, 10.1, f"dataset: {num_samples} samples, batch_size={batch_size}, "
            f"{world_size} ranks", fontsize=11, fontweight="bold", va="center")
    first = ShardPlan(num_samples=num_samples, batch_size=batch_size, world_size=world_size)
    owner = {}
    for step in range(first.num_steps):
        info = first.step_info(step)
        for rank, positions in enumerate(first.step_positions(step)):
            row0 = sum(info.rows[:rank])
            for i, sample in enumerate(positions):
                if row0 + i < info.real:
                    owner[sample] = rank
    for sample in range(num_samples):
        _box(ax, 1.3 + sample * 1.05, 8.9, 0.9, 0.7, str(sample),
             face=PALETTE[owner[sample]])
    for column, even in enumerate((True, False)):
        left = 0.0 + column * 8.8
        ax.text(left + 3.6, 7.9, f"even_batches={even}" + ("  (the default)" if even else ""),
                ha="center", fontsize=11, fontweight="bold")
        plans = [ShardPlan(num_samples=num_samples, batch_size=batch_size,
                           world_size=world_size, rank=r, even_batches=even)
                 for r in range(world_size)]
        for step in range(plans[0].num_steps):
            x = left + 0.7 + step * 3.6
            ax.text(x + 1.4, 7.1, f"step {step}", ha="center", fontsize=10)
            info = plans[0].step_info(step)
            for rank, positions in enumerate(plans[0].step_positions(step)):
                y = 5.6 - rank * 1.7
                row0 = sum(info.rows[:rank])
                if not positions:
                    ax.text(x + 1.4, y + 0.35, "no batch", ha="center", va="center",
                            color="#666666", fontstyle="italic")
                for i, sample in enumerate(positions):
                    padding = row0 + i >= info.real
                    _box(ax, x + i * 1.45, y, 1.3, 0.7,
                         f"{sample} (pad)" if padding else str(sample),
                         face=PAD if padding else PALETTE[rank],
                         color=INK if padding else "white",
                         linestyle="--" if padding else "-")
        for rank, plan in enumerate(plans):
            y = 5.6 - rank * 1.7
            ax.text(left + 0.45, y + 0.5, f"rank {rank}", ha="right", va="center",
                    color=PALETTE[rank], fontweight="bold")
            ax.text(left + 0.45, y + 0.1, f"len={len(plan)}", ha="right", va="center",
                    fontsize=8.5, color="#444444")
    ax.text(-1.5, 1.2, "grey, dashed: padding — samples from the start of the pass that "
            "complete the last step; gather_metrics drops them again", fontsize=9,
            color="#444444")
    return fig


# --- (b) a device map over GPU, CPU and disk ------------------------------------------------

def _tiny_model() -> Any:
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.attn = nn.Linear(width, width)
            self.mlp = nn.Linear(width, 4 * width)
            self.out = nn.Linear(4 * width, width)

    class Tiny(nn.Module):
        def __init__(self, width: int = 32, depth: int = 6, vocab: int = 256) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, vocab)

    return Tiny()


MAX_MEMORY = {0: "120KB", "cpu": "120KB"}


def draw_device_map() -> Any:
    """`infer_device_map` on a tiny model with budgets for one GPU and the CPU."""
    import distlib as dl
    from distlib.big_model.sizes import layout_of, module_sizes, parse_size

    with dl.init_empty_weights():
        model = _tiny_model()
    plan = dl.infer_device_map(model, max_memory=MAX_MEMORY, no_split_module_classes=["Block"])
    sizes = module_sizes(layout_of(model))
    devices = [d for d, _ in plan.usage]
    names = {0: "GPU 0", "cpu": "CPU", "disk": "disk"}
    colour = {d: PALETTE[i] for i, d in enumerate(devices)}
    budget = {d: parse_size(v) for d, v in MAX_MEMORY.items()}
    scale = 7.0 / max(max(budget.values()), *(b for _, b in plan.usage))
    fig, ax = _canvas(9.2, 5.6, (-0.2, 12.4), (-1.3, 9.4))
    ax.text(0, 9.0, "model, in definition order", fontweight="bold", va="center")
    entries = list(plan.as_dict().items())
    for i, (name, device) in enumerate(entries):
        y = 8.0 - i * 0.85
        _box(ax, 0, y, 2.9, 0.7, f"{name}  {sizes[name] / 1000:.1f} KB", face=colour[device],
             size=9)
    ax.text(4.0, 9.0, f"infer_device_map(model, max_memory={MAX_MEMORY},\n"
            "                 no_split_module_classes=['Block'])", fontsize=9, va="center",
            color="#444444", family="DejaVu Sans Mono")
    for column, device in enumerate(devices):
        x = 4.2 + column * 2.8
        y = 0.0
        for name, where in entries:
            if where != device:
                continue
            h = sizes[name] * scale
            _box(ax, x, y, 2.0, h, name if h > 0.3 else "", face=colour[device], size=8,
                 round_=False)
            if h <= 0.3:  # too thin to hold its name: write it beside
                ax.text(x + 2.1, y + h / 2, name, va="center", fontsize=7)
            y += h
        if device in budget:
            ax.add_patch(Rectangle((x - 0.1, 0), 2.2, budget[device] * scale, fill=False,
                                   edgecolor=INK, linestyle="--", linewidth=1.0))
            ax.text(x + 1.0, budget[device] * scale + 0.15,
                    f"budget {budget[device] / 1000:.0f} KB", ha="center", fontsize=8)
            if y < budget[device] * scale - 0.3:
                ax.text(x + 1.0, (y + budget[device] * scale) / 2,
                        "kept free for the\nlargest layer\nstill to place",
                        ha="center", va="center", fontsize=7, color="#555555")
        else:
            ax.text(x + 1.0, y + 0.15, "no limit", ha="center", fontsize=8)
        used = dict(plan.usage)[device]
        ax.text(x + 1.0, -0.5, names.get(device, str(device)), ha="center",
                fontweight="bold", color=colour[device])
        ax.text(x + 1.0, -1.0, f"{used / 1000:.1f} KB placed", ha="center", fontsize=8)
    return fig


# --- (c) the launcher's process tree --------------------------------------------------------

def draw_process_tree() -> Any:
    """Two machines, two ranks each: the launcher, torch's elastic agent, the ranks."""
    import dataclasses

    from distlib.launcher import _agent
    from distlib.launcher._environ import child_environ
    from distlib.launcher.plan import plan_launch

    plan = plan_launch(num_processes=4, num_machines=2, main_address="10.0.0.1",
                       main_port=29500, cpu=True)
    per_node = plan.nproc_per_node or 1
    fig, ax = _canvas(9.2, 6.2, (-0.3, 12.3), (-1.9, 8.4))
    for machine in range(plan.max_machines):
        mine = dataclasses.replace(plan, machine_rank=machine)
        left = machine * 6.2
        ax.add_patch(FancyBboxPatch((left, 0.0), 5.8, 8.2, boxstyle="round,pad=0,"
                                    "rounding_size=0.15", facecolor="#F4F4F4",
                                    edgecolor="#999999"))
        where = mine.main_address if machine == 0 else "another host"
        ax.text(left + 0.2, 7.8, f"machine {mine.machine_rank} ({where})",
                fontweight="bold", va="center")
        _box(ax, left + 0.5, 6.1, 4.8, 1.1,
             f"distlib launch --num-machines {mine.max_machines} --machine-rank "
             f"{mine.machine_rank}\nplans, checks the port, prints the report",
             face="#444444", size=8.5)
        _box(ax, left + 0.5, 3.7, 4.8, 1.3,
             f"python -m {_agent.__name__}\ntorch's elastic agent: starts, watches,\n"
             "restarts and stops the ranks", face="#777777", size=8.5)
        ax.annotate("", (left + 2.9, 5.0), (left + 2.9, 6.1),
                    arrowprops={"arrowstyle": "-|>", "color": INK})
        for local in range(per_node):
            rank = mine.machine_rank * per_node + local
            x = left + 0.5 + local * 2.5
            _box(ax, x, 0.6, 2.3, 1.6, f"rank {rank}\nlocal_rank {local}\nyour script",
                 face=PALETTE[rank], size=9)
            ax.annotate("", (x + 1.15, 2.2), (left + 2.9, 3.7),
                        arrowprops={"arrowstyle": "-|>", "color": INK})
    ax.annotate("", (6.7, 4.35), (5.3, 4.35),
                arrowprops={"arrowstyle": "<|-|>", "color": PALETTE[5], "linestyle": "--"})
    ax.text(6.0, 5.25, f"rendezvous\n{plan.main_address}:{plan.main_port}", ha="center",
            fontsize=8, color=PALETTE[5])
    variables = sorted(k for k in child_environ({}, plan) if k.startswith("DISTLIB_"))
    ax.text(0, -0.8, "each rank gets torch's RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, "
            "MASTER_PORT", fontsize=8.5, color="#444444")
    ax.text(0, -1.5, "and the launcher's " + ", ".join(variables) + " (read by detect())",
            fontsize=8.5, color="#444444")
    return fig


# --- (d) the N-D mesh -----------------------------------------------------------------------

def draw_mesh() -> Any:
    """`Mesh(dp_replicate=2, dp_shard=2, tp=2)` on 8 ranks: each rank's coordinates."""
    from distlib.topology import Mesh

    mesh = Mesh(dp_replicate=2, dp_shard=2, tp=2).resolve(8)
    sizes = mesh.sizes
    fig, ax = _canvas(9.2, 5.0, (-1.6, 12.2), (-2.3, 5.6))
    ax.text(-1.5, 5.2, f"{mesh}: {mesh.world_size} ranks, colour = the batch a rank reads "
            f"(its data-parallel rank, of {mesh.dp_size})", fontweight="bold", fontsize=9.5,
            va="center")
    for rank in range(mesh.world_size):
        c = mesh.coordinates(rank)
        x = c["dp_replicate"] * 5.9 + c["tp"] * 2.5 + c["cp"] * 0.2
        y = 2.4 - c["dp_shard"] * 1.9
        batch = mesh.dp_rank(rank)
        _box(ax, x, y, 2.3, 1.6, f"rank {rank}\n\nbatch {batch}", face=PALETTE[batch],
             size=9.5)
        ax.text(x + 1.15, y + 0.8, "(" + ", ".join(map(str, c.values())) + ")", ha="center",
                va="center", fontsize=7.5, color="white")
    for replica in range(sizes["dp_replicate"]):
        ax.text(replica * 5.9 + 2.4, 4.5, f"dp_replicate={replica}: a whole copy of the "
                "model", ha="center", fontsize=8.5)
        for tp in range(sizes["tp"]):
            ax.text(replica * 5.9 + tp * 2.5 + 1.15, 4.1, f"tp={tp}", ha="center",
                    fontsize=8.5)
        for shard in range(sizes["dp_shard"]):
            if replica == 0:
                ax.text(-0.15, 3.2 - shard * 1.9, f"dp_shard={shard}", ha="right",
                        va="center", fontsize=8.5)
    ax.text(-1.5, -1.9, "(a, b, c, d): Mesh.coordinates(rank) — " + ", ".join(sizes),
            fontsize=8.5, color="#444444")
    groups = {axis: mesh.groups([axis]) for axis in ("tp", "dp_shard", "dp_replicate")}
    lines = [f"{axis} groups: " + "  ".join(str(g) for g in gs) for axis, gs in groups.items()]
    what = {"tp": "same batch, each holds a slice of every weight",
            "dp_shard": "FSDP shards one replica over these",
            "dp_replicate": "gradients are averaged across replicas"}
    for i, (axis, line) in enumerate(zip(groups, lines, strict=True)):
        ax.text(-1.5, -0.5 - i * 0.45, f"{line}   ({what[axis]})", fontsize=8.5,
                color="#444444")
    return fig


# --- (e) the example's loss curve, from its tracker's own file ------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[2]
CURVE_STEPS = 100


def draw_loss_curve() -> Any:
    """examples/train.py for CURVE_STEPS steps in one process; its metrics.jsonl, drawn."""
    import json
    import math
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, str(ROOT / "examples" / "train.py"), "--steps",
                        str(CURVE_STEPS), "--log-every", "1", "--run-dir", folder],
                       cwd=folder, env=environ, check=True, capture_output=True, timeout=600)
        path = pathlib.Path(folder) / "train" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    losses = [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]
    text = (ROOT / "examples" / "data" / "public_domain.txt").read_text(encoding="utf-8")
    fig, ax = plt.subplots(figsize=(9.2, 4.2))
    fig.subplots_adjust(0.08, 0.13, 0.9, 0.88)
    steps, loss, lr = zip(*losses, strict=True)
    ax.plot(steps, loss, color=PALETTE[0], linewidth=1.6, label="loss (rank mean)")
    guess = math.log(len(set(text)))
    ax.axhline(guess, color="#999999", linestyle=":", linewidth=1.0)
    ax.text(steps[-1], guess, f"uniform guess ln({len(set(text))}) = {guess:.2f}", ha="right",
            va="bottom", fontsize=8.5, color="#666666")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss", color=PALETTE[0])
    ax.set_ylim(0, guess * 1.15)
    twin = ax.twinx()
    twin.plot(steps, lr, color=PALETTE[1], linestyle="--", linewidth=1.2)
    twin.set_ylabel("learning rate (OneCycle)", color=PALETTE[1])
    twin.set_ylim(0, max(lr) * 1.15)
    for side in (ax, twin):
        side.spines["top"].set_visible(False)
    ax.set_title(f"python examples/train.py --steps {CURVE_STEPS} --log-every 1 (one process): "
                 f"the loss and lr its \"jsonl\" tracker wrote ({len(losses)} rows)",
                 fontsize=9.5, loc="left")
    return fig


# --- (f) time per offloaded forward against the share on disk, from the benchmark's JSON -----

FORWARD_DATA = ROOT / "docs" / "data" / "big_model_forward.json"
FORWARD_LINES = (("distlib", "distlib", PALETTE[0], "-"), ("accelerate", "Accelerate", PALETTE[1], "-"),
                 ("transformers", "transformers", PALETTE[2], "-"),
                 ("distlib-copying", "distlib, copying (before)", PALETTE[4], "-."),
                 ("all-in-ram", "all in RAM (nothing offloaded)", PALETTE[5], ":"),
                 ("floor", "read floor (disk bytes, warm)", "#666666", ":"))


def draw_big_model_forward() -> Any:
    """benchmarks/big_model.py's forwards (docs/data/big_model_forward.json), drawn."""
    import json

    body = json.loads(FORWARD_DATA.read_text(encoding="utf-8"))
    rows = [r for r in body["forward"] if "error" not in r]
    fig, ax = plt.subplots(figsize=(9.2, 5.2))
    fig.subplots_adjust(0.08, 0.1, 0.98, 0.72)
    for lib, label, colour, style in FORWARD_LINES:
        points = [(100 * r["share"], r[lib]) for r in rows if "error" not in r.get(lib, {"error": 0})]
        if lib == "floor":
            ax.plot([x for x, _ in points], [v["later_median_s"] for _, v in points], color=colour,
                    linestyle=style, linewidth=1.6, marker="s", markersize=4, label=label)
            continue
        ax.plot([x for x, _ in points], [v["later_median_s"] for _, v in points], color=colour,
                linestyle=style, linewidth=1.8, marker="o", markersize=5,
                label=f"{label}: later forwards" if style == "-" else label)
        if style != "-":
            continue
        ax.plot([x for x, _ in points], [v["first_s"] for _, v in points], color=colour,
                linestyle="--", linewidth=1.0, marker="x", markersize=5, label="first forward")
    ax.set_xlabel("share of the model's bytes on disk (%)")
    ax.set_ylabel(f"seconds per forward ({body['tokens']} tokens)")
    ax.set_ylim(bottom=0)
    ax.set_xticks([100 * r["share"] for r in rows],
                  [f"{100 * r['share']:g}%" for r in rows])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(fontsize=8, ncol=3, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    machine = body["machine"]
    fig.suptitle(f"{body['command']}\na {body['checkpoint_bytes'] / 1e9:.2f} GB fp32 Llama, "
                 f"{body['layers']} layers, {machine['cpus']} cores, torch {machine['torch']}"
                 " (medians of the later forwards)", fontsize=8.5, x=0.08, ha="left", y=0.99)
    return fig


PICTURES: dict[str, Callable[[], Any]] = {
    "shard": draw_shard,
    "device_map": draw_device_map,
    "process_tree": draw_process_tree,
    "mesh": draw_mesh,
    "loss_curve": draw_loss_curve,
    "big_model_forward": draw_big_model_forward,
}


def render(name: str) -> str:
    """The SVG text of one picture."""
    fig = PICTURES[name]()
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None})
    plt.close(fig)
    return out.getvalue()


def on_files(files: Any, config: Any) -> Any:
    """Add ``pictures/NAME.svg`` for every picture, drawn now (mkdocs' files event)."""
    from mkdocs.structure.files import File

    for name in PICTURES:
        files.append(File.generated(config, f"pictures/{name}.svg", content=render(name)))
    return files


if __name__ == "__main__":
    folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    folder.mkdir(parents=True, exist_ok=True)
    for picture in PICTURES:
        (folder / f"{picture}.svg").write_text(render(picture), encoding="utf-8")
