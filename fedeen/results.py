"""The run directory: resolved config, per-round history, metrics, checkpoints, model, plots.

Layout::

    <out-dir>/<timestamp>-<strategy>-<dataset>-s<seed>/
        config.json  rounds.jsonl  metrics.json  history.csv  final_model.pt
        checkpoint.pt  checkpoint.prev.pt  exit_accuracy.png  budget_curve.png
        server_kd.png (strategies with server-KD diagnostics)

Every file is replaced whole (``fedeen.checkpoints.atomic_write``), so a run killed at any
moment leaves complete files; ``rounds.jsonl`` is an append-only log, one line per round.
``metrics.json`` is written last and always says how the run ended: ``"status"`` is
``"completed"`` or ``"failed"``, with the ``"cause"`` of a failure.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log

from fedeen.checkpoints import append_line, atomic_write, atomic_write_text, save_checkpoint
from fedeen.config import RunConfig
from fedeen.evaluation import BudgetPoint
from fedeen.rounds import RoundObserver, RoundTimings, ServerState
from models.state import to_tensors

DEFAULT_OUT = "~/fedeen-runs"
COMPLETED, FAILED = "completed", "failed"


def run_dir_for(cfg: RunConfig) -> Path:
    base = Path(os.path.expanduser(cfg.out_dir or DEFAULT_OUT))
    data_name = Path(cfg.dataset).name.removesuffix(".parquet").removesuffix(".npz")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{stamp}-{cfg.strategy}-{cfg.model}-{data_name}-s{cfg.seed}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = base / f"{stamp}-{cfg.strategy}-{cfg.model}-{data_name}-s{cfg.seed}-{suffix}"
    return path


def exit_columns(num_exits: int, prefix: str = "acc-exit-") -> list[str]:
    return [f"{prefix}{j}" for j in range(1, num_exits + 1)]


class RunRecorder(RoundObserver):
    """Writes everything a run leaves behind and logs one line per round."""

    def __init__(self, cfg: RunConfig, num_exits: int, exit_costs: list[float],
                 path: Path | None = None) -> None:
        self.cfg, self.num_exits, self.exit_costs = cfg, num_exits, exit_costs
        self.path = Path(path) if path else run_dir_for(cfg)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rounds: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()
        atomic_write_text(self.path / "config.json", json.dumps(cfg.as_run_config(), indent=2))

    @classmethod
    def resume(cls, cfg: RunConfig, num_exits: int, exit_costs: list[float], path: Path,
               up_to_round: int) -> "RunRecorder":
        """Continue a run directory: its rounds up to the checkpoint are kept (a last line cut
        short by a crash is dropped)."""
        rec = cls(cfg, num_exits, exit_costs, path)
        log_path = path / "rounds.jsonl"
        if log_path.exists():
            rows = []
            for n, line in enumerate(log_path.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log(logging.WARNING, "fedeen: %s line %d is not JSON (cut short by a "
                        "crash?); dropped", log_path, n)
            rec.rounds = [r for r in rows if r["round"] <= up_to_round]
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in rec.rounds))
        return rec

    def round_done(self, server_round: int, central: dict | None, train: dict, evaluate: dict,
                   timings: RoundTimings, server: ServerState) -> None:
        row = {"round": server_round, "central": central or {}, "train": train,
               "federated": evaluate, "timings": timings.as_dict()}
        self.rounds.append(row)
        append_line(self.path / "rounds.jsonl", json.dumps(row))  # nothing is lost on a crash
        accs = [100 * (central or {}).get(c, float("nan")) for c in exit_columns(self.num_exits)]
        extra = "".join(f" | {k} {v:.3g}" for k, v in train.items()
                        if k.startswith(("gen-", "kd-", "server-", "split-")))
        log(logging.INFO,
            "[round %d/%d] %.2fs (clients %.2fs, server %.2fs, eval %.2fs) | exits %s | "
            "mean %.2f ± %.2f | train-loss %.4f | clients ok %d failed %d%s",
            server_round, self.cfg.num_server_rounds, timings.total, timings.clients,
            timings.aggregate + timings.server_step, timings.central_eval,
            " ".join(f"{a:.2f}" for a in accs), np.mean(accs), np.std(accs),
            train.get("train-loss", float("nan")), train.get("clients-ok", 0),
            train.get("clients-failed", 0), extra)
        every = self.cfg.checkpoint_every
        if (every and server_round % every == 0) or server_round == self.cfg.num_server_rounds:
            self.checkpoint(server_round, server)

    def checkpoint(self, server_round: int, server: ServerState) -> None:
        """One file holds what resuming needs: model, server state, round and config (the
        one it replaces is kept as checkpoint.prev.pt)."""
        save_checkpoint(self.path / "checkpoint.pt", server_round, self.cfg.as_run_config(),
                        to_tensors(server.global_state), server.state_dict())

    # ------------------------------------------------------------------ end of run
    def best_round(self) -> dict[str, Any] | None:
        rows = [r for r in self.rounds if "val-acc-mean" in r["central"]]
        return max(rows, key=lambda r: r["central"]["val-acc-mean"]) if rows else None

    def finish(self, final_state: dict[str, np.ndarray] | None, curve: list[BudgetPoint],
               rejected: dict[int, list[str]], initial: dict | None = None,
               final_curve: list[BudgetPoint] | None = None, status: str = COMPLETED,
               cause: str | None = None) -> dict[str, Any]:
        """Write everything, metrics.json last; ``curve`` is the best-validation round's,
        ``final_curve`` the last round's budgeted-inference curve.

        A completed run's files must all be written (an error fails the run). A failed run
        (``status`` FAILED, ``cause`` why) writes what it can: a file that cannot be written
        is logged and skipped, and metrics.json is written whatever happened."""
        cols = exit_columns(self.num_exits)
        outputs = [("final_model.pt", lambda: self._write_model(final_state)),
                   ("history.csv", lambda: self._write_history(cols)),
                   ("the plots", lambda: self._plot(cols, curve))]
        for name, write in outputs:
            if status == COMPLETED:
                write()
                continue
            try:
                write()
            except Exception as err:  # the failure itself may be why; metrics.json matters
                log(logging.WARNING, "fedeen: could not write %s of the failed run: %s: %s",
                    name, type(err).__name__, err)
        final = self.rounds[-1]["central"] if self.rounds else {}
        best = self.best_round()
        steady = [r["timings"]["total"] for r in self.rounds[1:]] or \
                 [r["timings"]["total"] for r in self.rounds]
        summary = {
            "status": status,
            **({"cause": cause} if status == FAILED else {}),
            "run_dir": str(self.path),
            "config": self.cfg.as_run_config(),
            "num_exits": self.num_exits,
            "exit_flops": self.exit_costs,
            "initial": initial or {},
            "final": {"round": len(self.rounds), **{c: final.get(c) for c in cols},
                      "acc-mean": final.get("acc-mean"), "acc-std": final.get("acc-std")},
            "best_val": None if best is None else {
                "round": best["round"], **{c: best["central"].get(c) for c in cols},
                "acc-mean": best["central"].get("acc-mean"),
                "acc-std": best["central"].get("acc-std"),
                "val-acc-mean": best["central"].get("val-acc-mean")},
            "budget_curve": [asdict(p) for p in curve],
            "budget_curve_final": [asdict(p) for p in (final_curve or curve)],
            "wall_seconds": time.perf_counter() - self.t0,
            "steady_round_seconds": float(np.median(steady)) if steady else None,
            "failed_replies": {str(k): v for k, v in rejected.items()},
            "rounds": self.rounds,
        }
        atomic_write_text(self.path / "metrics.json", json.dumps(summary, indent=2))
        return summary

    def _write_model(self, state: dict[str, np.ndarray] | None) -> None:
        if state:  # a run that failed before its model was set up has none
            atomic_write(self.path / "final_model.pt",
                         lambda fh: torch.save(to_tensors(state), fh))

    def _write_history(self, cols: list[str]) -> None:
        timing_keys = list(RoundTimings().as_dict())
        central = [*cols, "acc-mean", "acc-std", "val-acc-mean"]
        central += sorted({k for r in self.rounds for k in r["central"]} - set(central))
        text = io.StringIO(newline="")
        w = csv.writer(text)
        w.writerow(["round", *central, "train-loss", "clients-ok", "clients-failed",
                    *[f"t-{k}" for k in timing_keys]])
        for r in self.rounds:
            c, t = r["central"], r["train"]
            w.writerow([r["round"], *[c.get(k) for k in central], t.get("train-loss"),
                        t.get("clients-ok"), t.get("clients-failed"),
                        *[r["timings"][k] for k in timing_keys]])
        atomic_write_text(self.path / "history.csv", text.getvalue())

    def _plot(self, cols: list[str], curve: list[BudgetPoint]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        fig, ax = plt.subplots(figsize=(6, 4))
        for j, c in enumerate(cols, start=1):
            ax.plot(rounds, [100 * (r["central"].get(c) or 0) for r in self.rounds],
                    marker="o", label=f"exit {j}")
        ax.set(xlabel="round", ylabel="test accuracy (%)",
               title=f"{self.cfg.strategy} on {Path(self.cfg.dataset).name}: per-exit accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.path / "exit_accuracy.png",
                     lambda fh: fig.savefig(fh, format="png", dpi=120))
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        pts = sorted(curve, key=lambda p: p.flops)
        ax.plot([p.flops / 1e6 for p in pts], [100 * p.accuracy for p in pts], marker=".",
                label="dynamic (MSDNet policy)")
        best = self.best_round()
        shown = best["central"] if best else (self.rounds[-1]["central"] if self.rounds else {})
        ax.scatter([c / 1e6 for c in self.exit_costs],
                   [100 * (shown.get(c) or 0) for c in cols], color="k", marker="x",
                   label="single exits", zorder=3)
        ax.set(xlabel="expected MFLOPs per sample", ylabel="test accuracy (%)",
               title=f"budgeted inference (round {best['round'] if best else len(self.rounds)},"
                     " best validation)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.path / "budget_curve.png",
                     lambda fh: fig.savefig(fh, format="png", dpi=120))
        plt.close(fig)
        self._plot_server_kd(plt)

    def _plot_server_kd(self, plt: Any) -> None:
        """server_kd.png for strategies that report server-KD diagnostics (``diag-*`` train
        metrics): generated/real latent RMS ratio per generator, and the KD loss and gradient
        norm on generated latents against real embeddings, over rounds."""
        keys = sorted({k for r in self.rounds for k in r["train"] if k.startswith("diag-")})
        ratios = [k for k in keys if k.startswith("diag-rms-ratio-")]
        kd = [k for k in keys if k.startswith("diag-kd-")]
        if not ratios and not kd:
            return
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        panels = [(ratios, "generated / real latent RMS"),
                  ([k for k in kd if "-loss-" in k], "KD loss"),
                  ([k for k in kd if "-grad-" in k], "KD gradient norm")]
        for ax, (names, label) in zip(axes, panels):
            for k in names:
                pts = [(r["round"], r["train"][k]) for r in self.rounds
                       if k in r["train"] and r["train"][k] > 0]
                if pts:
                    ax.plot(*zip(*pts), marker=".", label=k.removeprefix("diag-"))
            ax.set(xlabel="round", ylabel=label, yscale="log")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        axes[0].axhline(1.0, color="k", lw=0.8)
        fig.suptitle(f"{self.cfg.strategy}: server KD diagnostics")
        fig.tight_layout()
        atomic_write(self.path / "server_kd.png",
                     lambda fh: fig.savefig(fh, format="png", dpi=120))
        plt.close(fig)
