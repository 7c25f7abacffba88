"""python -m moe_dist.plot runs/<name> [--out DIR]: PNGs of the loss curves and of each MoE layer's expert load.

Reads runs/<name>/metrics.jsonl; writes loss.png and expert_load_layer<i>.png (into runs/<name>/plots by
default). Needs matplotlib: pip install -e '.[plot]'.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moe_dist.cli import OneLineParser, error_line


class PlotError(RuntimeError):
    """Nothing to plot; one line naming the file."""


def read_records(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records, eval records) by step; a step that a restarted run logged again keeps its last record."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"plot: {path}: no such file (is {run_dir} a run directory?)")
    train, evals = {}, {}
    complete = path.read_text().split("\n")[:-1]  # a line the trainer is still writing is left out
    for lineno, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"plot: {path}:{lineno}: not valid JSON ({e.msg})") from None
        {"train": train, "eval": evals}.get(record.get("kind"), {})[record.get("step")] = record
    if not train:
        raise PlotError(f"plot: {path}: no training records")
    return dict(sorted(train.items())), dict(sorted(evals.items()))


def plot_loss(plt, train: dict[int, dict], evals: dict[int, dict], run_name: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    logged = [(step, r["loss"]) for step, r in train.items() if r.get("loss") is not None]  # skipped: null
    ax.plot(*zip(*logged), label="train")
    if evals:
        ax.plot(list(evals), [r["val_loss"] for r in evals.values()], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy", title=f"loss: {run_name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_expert_load(plt, train: dict[int, dict], layer: str, path: Path) -> None:
    """Heatmap: experts x logged steps, each cell the expert's share of the layer's routed tokens."""
    steps = [step for step, r in train.items() if layer in r.get("expert_load", {})]
    shares = []
    for step in steps:
        counts = train[step]["expert_load"][layer]
        total = sum(counts) or 1
        shares.append([c / total for c in counts])
    columns = list(zip(*shares))  # [experts][steps]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(columns) + 2))
    image = ax.imshow(columns, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set(xlabel="step", ylabel="expert", title=f"expert load, layer {layer} (1/E = {1 / len(columns):.3f})")
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    fig.colorbar(image, ax=ax, label="share of routed tokens")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_run(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write the PNGs; returns their paths."""
    train, evals = read_records(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plot: needs matplotlib (pip install -e '.[plot]')") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "loss.png"]
    plot_loss(plt, train, evals, run_dir.resolve().name, written[0])
    layers = sorted({layer for r in train.values() for layer in r.get("expert_load", {})}, key=int)
    for layer in layers:
        written.append(out_dir / f"expert_load_layer{layer}.png")
        plot_expert_load(plt, train, layer, written[-1])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m moe_dist.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="runs/<name>")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: <run_dir>/plots)")
    args = parser.parse_args(argv)
    try:
        written = plot_run(args.run_dir, args.out or args.run_dir / "plots")
    except (PlotError, OSError) as e:
        print(error_line("plot", e), file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
