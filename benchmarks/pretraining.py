"""python -m benchmarks.pretraining: the pre-training recipe on the default corpus, as val-loss curves and shares.

(a) A dense model trained N steps, upcycled into the tiny MoE (4 copies of its MLP, each split into 2 experts of
half its hidden size: 8 experts of 192, top-2, exactly the tiny config) and trained M more, against that MoE from
scratch for N + M steps; both at the same tokens per step. (b) Warmup-stable-decay against cosine over N + M steps,
and a WSD cool-down branched from the middle of the stable phase. (c) A two-source mixture (the default corpus and
this repository's own Python source, 0.7 / 0.3): each source's measured share of the tokens. One process, the tiny
config. JSON in benchmarks/results/, the figure in benchmarks/figures/pretraining.png, a markdown summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.common import RESULTS_DIR, write_results
from moe_dist import export, train
from moe_dist.data.corpus import default_corpus
from moe_dist.data.prep import prepare

REPO = Path(__file__).resolve().parent.parent
FIGURE = Path(__file__).resolve().parent / "figures" / "pretraining.png"


def run(runs: Path, name: str, *args: str) -> list[dict]:
    """Train runs/<name> in this process; returns its metrics.jsonl records."""
    argv = ["--metrics.runs_dir", str(runs), "--train.name", name, "--metrics.log_interval", "5",
            "--parallel.ep", "1", *args]
    code = train.main(argv)
    if code != 0:
        raise RuntimeError(f"pretraining: train {' '.join(argv)} exited {code}")
    return [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]


def val_curve(records: list[dict], step_offset: int = 0) -> list[tuple[int, float]]:
    return [(r["step"] + step_offset, r["val_loss"]) for r in records if r["kind"] == "eval"]


def plot(curves: dict[str, dict[str, list[tuple[int, float]]]], shares: list[dict], tokens_per_step: int,
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (title, lines) in zip(axes, curves.items()):
        for label, points in lines.items():
            steps, losses = zip(*points)
            ax.plot([s * tokens_per_step / 1e6 for s in steps], losses, "o-", markersize=3, label=label)
        ax.set(xlabel="tokens (M)", ylabel="validation cross-entropy", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[2]
    for name in shares[0]["shares"]:
        ax.plot([s["step"] for s in shares], [s["off_by_windows"][name] for s in shares], "o-", markersize=3,
                label=f"{name} (weight {shares[0]['weights'][name]:.2f}): share {shares[-1]['shares'][name]:.4f}")
    for bound in (-1, 1):
        ax.axhline(bound, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="step", ylabel="windows taken - weight x all windows", ylim=(-1.5, 1.5),
           title="(c) two-source mixture: each source against its share")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretraining", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="N = M: dense steps, then upcycled steps")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=FIGURE)
    args = parser.parse_args(argv)
    n, total = args.steps, 2 * args.steps
    runs = RESULTS_DIR / "pretraining-runs"
    for old in runs.glob("*"):  # the runs of a previous time; the default corpus (_corpus) is kept
        if old.is_dir() and old.name != "_corpus":
            shutil.rmtree(old)
        elif old.is_file():
            old.unlink()
    common = ["--data.micro_batch", str(args.micro_batch), "--train.eval_interval", str(max(total // 12, 1)),
              "--train.eval_steps", "4"]
    tokens_per_step = args.micro_batch * 128  # one process, tiny's data.seq_len

    # (a) Dense -> upcycled against the same MoE from scratch (also (b)'s cosine run).
    dense = run(runs, "dense", *common, "--moe.num_experts", "0", "--train.steps", str(n),
                "--optim.schedule", "constant")
    export.main([str(runs / "dense"), "--out", str(runs / "dense-export")])
    # The same corpus (the export carries its tokenizer), read in another order than the dense run's.
    corpus = default_corpus(runs / "_corpus", 4096)
    upcycled = run(runs, "upcycled", *common, "--train.init_from", str(runs / "dense-export"),
                   "--moe.num_experts", "8", "--train.steps", str(total - n), "--data.path", str(corpus),
                   "--data.seed", "1")
    scratch = run(runs, "scratch", *common, "--train.steps", str(total))

    # (b) WSD over the same steps, and a cool-down branched from the middle of its stable phase.
    wsd = run(runs, "wsd", *common, "--train.steps", str(total), "--optim.schedule", "wsd",
              "--optim.decay_fraction", "0.2", "--checkpoint.interval", str(n // 2), "--checkpoint.keep_last", "4")
    # Stable from warmup to step 1.6 n: branched at n with as many decay steps as the full run's (0.4 n).
    branch_at, cool = n, 2 * total // 10
    cooled = run(runs, "wsd-cooldown", *common, "--train.branch_from", str(runs / "wsd" / "checkpoints" /
                                                                            f"step-{branch_at}"),
                 "--train.steps", str(branch_at + cool), "--optim.schedule", "wsd", "--optim.decay_steps", str(cool))

    # (c) Two sources, 0.7 / 0.3, sharing the default corpus's tokenizer.
    sources = runs / "code.jsonl"
    sources.write_text("".join(json.dumps({"text": path.read_text()}) + "\n"
                               for folder in ("moe_dist", "tests") for path in sorted((REPO / folder).rglob("*.py"))))
    code = prepare([sources], runs / "code", 4096, corpus / "tokenizer.json", workers=1, val_fraction=0.1)
    mixture = run(runs, "mixture", *common, "--data.mixture", f"{corpus}=0.7,{code}=0.3",
                  "--train.steps", str(n // 2), "--metrics.log_interval", "1")
    shares = []
    for r in (r for r in mixture if r["kind"] == "train"):  # every step
        taken = {key[7:]: value for key, value in r.items() if key.startswith("tokens/")}
        weights = dict(zip(taken, (0.7, 0.3)))
        windows = sum(taken.values()) / 128  # each source's windows, against its weight's share of them all
        shares.append({"step": r["step"], "tokens": taken, "weights": weights,
                       "shares": {k: v / sum(taken.values()) for k, v in taken.items()},
                       "off_by_windows": {k: v / 128 - weights[k] * windows for k, v in taken.items()}})
    repeats = [r for r in mixture if r["kind"] == "data"]

    curves = {
        "(a) dense -> upcycled MoE vs MoE from scratch": {
            "dense (tiny, MoE layers dense)": val_curve(dense),
            # At its step 0 the upcycled model is the dense one (the identity tests/test_upcycle.py proves).
            f"upcycled at step {n}": val_curve(dense)[-1:] + val_curve(upcycled, n),
            "MoE from scratch": val_curve(scratch)},
        "(b) WSD vs cosine, and a branched cool-down": {
            "cosine": val_curve(scratch), "WSD (decay: last 20%)": val_curve(wsd),
            f"WSD cool-down branched at step {branch_at}": val_curve(cooled)},
    }
    plot(curves, shares, tokens_per_step, args.out)
    result = {"steps": {"dense": n, "upcycled": total - n, "scratch": total, "branch_at": branch_at,
                        "cooldown": cool}, "tokens_per_step": tokens_per_step, "curves": curves, "shares": shares,
              "repeats": repeats}
    write_results("pretraining", result)
    print(f"### Pre-training recipe (`benchmarks/pretraining.py --steps {n}`), one process, tiny config, "
          f"{tokens_per_step} tokens/step\n")
    for title, lines in curves.items():
        steps = sorted({s for points in lines.values() for s, _ in points})
        print(f"{title}\n\n| run | " + " | ".join(f"step {s}" for s in steps) + " |")
        print("|---" * (len(steps) + 1) + "|")
        for label, points in lines.items():
            at = dict(points)
            print(f"| {label} | " + " | ".join(f"{at[s]:.4f}" if s in at else "" for s in steps) + " |")
        print()
    print("| step | " + " | ".join(f"{k} share (weight)" for k in shares[0]["shares"]) +
          " | worst \\|windows - weight x all windows\\| |\n" + "|---" * (len(shares[0]["shares"]) + 2) + "|")
    for s in shares[max(len(shares) // 10, 1) - 1::max(len(shares) // 10, 1)]:
        print(f"| {s['step']} | " + " | ".join(f"{v:.4f} ({s['weights'][k]})" for k, v in s["shares"].items()) +
              f" | {max(map(abs, s['off_by_windows'].values())):.3f} |")
    worst = max(abs(v) for s in shares for v in s["off_by_windows"].values())
    print(f"\nworst over all {len(shares)} steps: {worst:.3f} windows")
    print(f"\nrepeats: {[(r['step'], k) for r in repeats for k in r if k.startswith('epoch/')]}")
    print(f"\nfigure: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
