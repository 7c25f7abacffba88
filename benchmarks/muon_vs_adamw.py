"""python -m benchmarks.muon_vs_adamw: does Muon help here? AdamW against Muon, each over a learning-rate grid.

The tiny config on the default corpus, one process (--parallel.ep 1), every run with the same steps, tokens per step,
schedule, seeds and so data order: only --optim.name and --optim.lr change. Muon's lr is AdamW's (the trainer scales
Muon's update to AdamW's RMS, Moonlight's match_rms_adamw), and the same lr drives the AdamW half of Muon (embeddings,
head, norms, router). The target is the best AdamW run's final val loss; for every run, the first step at which its
val loss reaches it (at an eval point, and linearly interpolated between the two eval points around it), and Muon's
tokens to the target against the best AdamW run's. JSON in benchmarks/results/, the figure in
benchmarks/figures/muon_vs_adamw.png, a markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment, markdown_table, write_results
from benchmarks.pretraining import run, val_curve
from moe_dist.config import CHOICES, load_config

FIGURE = Path(__file__).resolve().parent / "figures" / "muon_vs_adamw.png"
RUNS = RESULTS_DIR / "muon_vs_adamw-runs"
OPTIMIZERS = ("adamw", "muon")


def lr_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def reach(curve: list[tuple[int, float]], target: float) -> tuple[int | None, float | None]:
    """(the first eval step whose val loss is <= target, the step where the straight line between it and the eval
    point before it crosses target); (None, None) when no eval point reaches it."""
    for i, (step, loss) in enumerate(curve):
        if loss > target:
            continue
        if i == 0:
            return step, float(step)
        (s0, l0), (s1, l1) = curve[i - 1], (step, loss)
        return step, s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None, None


def train_grid(args: argparse.Namespace) -> list[dict]:
    """Every (optimizer, lr) run, in turn, from a clean runs dir (the default corpus, _corpus, is kept)."""
    for old in RUNS.glob("*"):
        if old.is_dir() and old.name != "_corpus":
            shutil.rmtree(old)
    common = ["--data.micro_batch", str(args.micro_batch), "--train.steps", str(args.steps),
              "--train.eval_interval", str(args.eval_interval), "--train.eval_steps", str(args.eval_steps),
              "--optim.schedule", args.schedule]
    runs = []
    for name, lrs in zip(OPTIMIZERS, (args.adamw_lrs, args.muon_lrs)):
        for lr in lrs:
            label = f"{name}-lr{lr:g}"
            start = time.perf_counter()
            try:
                curve, failed = val_curve(run(RUNS, label, *common, "--optim.name", name, "--optim.lr", str(lr))), None
            except RuntimeError as e:  # a diverged run (too many non-finite steps) is a result too: the lr is too high
                curve, failed = [], str(e)
            final = curve[-1][1] if curve and not failed else math.nan
            runs.append({"label": label, "optim": name, "lr": lr, "curve": curve, "final_val_loss": final,
                         "failed": failed, "wall_s": round(time.perf_counter() - start, 1)})
            print(f"muon_vs_adamw: {label}: final val loss {final:.4f} in {runs[-1]['wall_s']} s", flush=True)
    return runs


def final_or_inf(r: dict) -> float:
    """A run's final val loss for ranking: a diverged run's nan ranks last."""
    return r["final_val_loss"] if math.isfinite(r["final_val_loss"]) else math.inf


def score(runs: list[dict], tokens_per_step: int) -> dict:
    """The target (the best AdamW run's final val loss), each run's steps to it, and Muon's tokens-to-target ratio
    against that AdamW run's own (the interpolated steps of both)."""
    best = min((r for r in runs if r["optim"] == "adamw"), key=final_or_inf)
    target = best["final_val_loss"]
    for r in runs:
        r["reach_eval_step"], r["reach_step"] = reach(r["curve"], target)
        r["reach_tokens"] = None if r["reach_step"] is None else round(r["reach_step"] * tokens_per_step)
    for r in runs:
        r["tokens_ratio_vs_best_adamw"] = (None if r["reach_step"] is None
                                           else r["reach_step"] / best["reach_step"])
    best_muon = min((r for r in runs if r["optim"] == "muon"), key=final_or_inf)
    return {"target": target, "best_adamw": best["label"], "best_muon": best_muon["label"]}


def plot(runs: list[dict], target: float, tokens_per_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lrs = sorted({r["lr"] for r in runs})
    colors = dict(zip(lrs, plt.get_cmap("viridis")([i / max(len(lrs) - 1, 1) * 0.85 for i in range(len(lrs))])))
    drawn = [r for r in runs if r["curve"]]  # a diverged run has no curve to draw
    for r in drawn:
        steps, losses = zip(*r["curve"])
        ax.plot([s * tokens_per_step / 1e6 for s in steps], losses, "o-" if r["optim"] == "adamw" else "s--",
                markersize=3, color=colors[r["lr"]], label=f"{r['optim']} lr {r['lr']:g}: {r['final_val_loss']:.4f}")
    ax.axhline(target, color="gray", lw=0.8, ls=":", label=f"target: best AdamW final {target:.4f}")
    ax.set(xlabel="tokens (M)", ylabel="validation cross-entropy", title="Muon vs AdamW, tiny config, default corpus")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def summary(result: dict, command: str) -> str:
    """The markdown section: setup, one row per run, the target and Muon's tokens to it."""
    tps, steps = result["tokens_per_step"], result["steps"]

    def cell(value: float | None, fmt: str) -> str:
        return "not reached" if value is None else format(value, fmt)

    rows = [[r["optim"], f"{r['lr']:g}", f"{r['final_val_loss']:.4f}", cell(r["reach_eval_step"], "d"),
             cell(r["reach_step"], ".1f"), cell(r["reach_tokens"], ","), cell(r["tokens_ratio_vs_best_adamw"], ".2f"),
             f"{r['wall_s']:.0f}"] for r in result["runs"]]
    lines = [f"### Muon vs AdamW (`{command}`), one process, tiny config, {result['env']['threads']} thread(s)\n",
             f"{steps} steps x {tps} tokens = {steps * tps:,} tokens per run; schedule {result['schedule']}; "
             f"val loss every {result['eval_interval']} steps over {result['eval_steps']} batches "
             f"({result['eval_steps'] * tps:,} tokens, the same every time)\n",
             markdown_table(["optim", "lr", "final val loss", "first eval step <= target", "interpolated step",
                             "tokens to target", "tokens vs best AdamW", "wall s"], rows), "",
             f"target: the best AdamW final val loss, {result['target']:.4f} ({result['best_adamw']}); best Muon: "
             f"{result['best_muon']}; all six runs {result['wall_s']:.0f} s", f"\nfigure: {result['figure']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.muon_vs_adamw", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--eval-interval", type=int, default=25)
    parser.add_argument("--eval-steps", type=int, default=16, help="val batches per evaluation")
    parser.add_argument("--adamw-lrs", type=lr_list, default=lr_list("1e-3,3e-3,1e-2"))
    # A 60-step look put Muon's best at 1e-2, the top of AdamW's grid (AdamW's best at 3e-3, inside it): Muon's
    # grid is AdamW's shifted up one step so that its best can land inside it.
    parser.add_argument("--muon-lrs", type=lr_list, default=lr_list("3e-3,1e-2,3e-2"))
    parser.add_argument("--schedule", default="cosine", choices=CHOICES["optim.schedule"])
    # One thread: on a shared 2-core machine two threads ran a tiny step up to 10x slower (threads spinning against
    # other work), and unevenly from run to run.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=FIGURE)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokens_per_step = args.micro_batch * load_config("tiny").data.seq_len  # one process
    runs = train_grid(args)
    result = {"steps": args.steps, "tokens_per_step": tokens_per_step, "schedule": args.schedule,
              "eval_interval": args.eval_interval, "eval_steps": args.eval_steps, "micro_batch": args.micro_batch,
              "runs": runs, **score(runs, tokens_per_step), "env": environment(torch.device("cpu")),
              "figure": str(args.out), "wall_s": round(time.perf_counter() - start, 1)}
    plot(runs, result["target"], tokens_per_step, args.out)
    write_results("muon_vs_adamw", result)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.muon_vs_adamw", *given])
    print(summary(result, command))
    return 0 if all(math.isfinite(r["final_val_loss"]) for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
