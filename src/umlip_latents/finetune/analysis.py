"""Tables and curves of notebook 03: errors, learning curves, features per protocol, per-epoch GFRE."""

from __future__ import annotations

import numpy as np

from . import LABELS, FinetuneResult, evaluate


def error_table(base: str, results: dict[str, FinetuneResult], test: list, device: str = "cpu"):
    """Test energy and force RMSE of the zero-shot base and of each protocol's final model.

    The final model of a run is its best-validation epoch (see :class:`~umlip_latents.finetune.FinetuneResult`).

    Returns
    -------
    pandas.DataFrame
        Index: protocol label; columns ``model``, ``energy RMSE (meV/atom)``,
        ``force RMSE (meV/Å)``, ``epochs`` (trained), ``best epoch``, ``train seconds``.
    """
    import pandas as pd

    rows = []
    models = [("zero-shot", base, None)] + [(p, r.final.key, r) for p, r in results.items()]
    for protocol, key, run in models:
        err = evaluate(key, test, device=device)
        rows.append({"protocol": LABELS[protocol], "model": key, "energy RMSE (meV/atom)": err["energy_rmse"],
                     "force RMSE (meV/Å)": err["force_rmse"], "epochs": 0 if run is None else len(run.epochs),
                     "best epoch": 0 if run is None else run.best_epoch,
                     "train seconds": 0.0 if run is None else run.seconds})
    return pd.DataFrame(rows).set_index("protocol")


def learning_curves(results: dict[str, FinetuneResult]):
    """Per-epoch train and validation errors of every run, in long form.

    Returns
    -------
    pandas.DataFrame
        Columns ``protocol`` (label), ``epoch`` (0: the starting model, validation only),
        ``split`` (``"train"``: running mean over the epoch's batches; ``"valid"``),
        ``loss`` (the trainer's objective), ``energy RMSE (meV/atom)``, ``force RMSE (meV/Å)``
        and ``best`` (the epoch kept as the final model).
    """
    import pandas as pd

    rows = []
    for protocol, run in results.items():
        for rec in run.history:
            for split in ("train", "valid"):
                if rec.get(f"{split}_loss") is None and rec.get(f"{split}_rmse_e_per_atom") is None:
                    continue
                rows.append({"protocol": LABELS[protocol], "epoch": int(rec["epoch"]), "split": split,
                             "loss": rec.get(f"{split}_loss"),
                             "energy RMSE (meV/atom)": rec.get(f"{split}_rmse_e_per_atom"),
                             "force RMSE (meV/Å)": rec.get(f"{split}_rmse_f"),
                             "best": int(rec["epoch"]) == run.best_epoch})
    frame = pd.DataFrame(rows, columns=["protocol", "epoch", "split", "loss", "energy RMSE (meV/atom)",
                                        "force RMSE (meV/Å)", "best"])
    for col in ("loss", "energy RMSE (meV/atom)", "force RMSE (meV/Å)"):
        frame[col] = frame[col].astype(float)
    return frame


def plot_learning_curves(results: dict[str, FinetuneResult], width: float = 8.0):
    """Validation (solid) and train (dashed) energy and force RMSE per epoch, one colour per protocol.

    The epoch kept as the final model is ringed; epoch 0 is the starting model. Returns the figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    curves = learning_curves(results)
    fig, axes = plt.subplots(1, 2, figsize=(width, 3.8))
    columns = ("energy RMSE (meV/atom)", "force RMSE (meV/Å)")
    for i, (label, grp) in enumerate(curves.groupby("protocol", sort=False)):
        color = f"C{i}"
        for ax, col in zip(axes, columns):
            valid, train = grp[grp.split == "valid"], grp[grp.split == "train"]
            if train[col].notna().any():
                ax.plot(train.epoch, train[col], ls="--", lw=1, color=color)
            ax.plot(valid.epoch, valid[col], marker=".", ms=4, color=color, label=label)
            best = valid[valid.best]
            ax.plot(best.epoch, best[col], marker="o", ms=8, mfc="none", color=color, ls="none")
    plain = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "1235" else "")
    for ax, col in zip(axes, columns):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("epoch", fontsize=10)
        ax.set_ylabel(col, fontsize=10)
        ax.tick_params(which="both", labelsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].plot([], [], ls="-", marker=".", color="0.4", label="validation")
    axes[0].plot([], [], ls="--", lw=1, color="0.4", label="train (running mean)")
    axes[0].plot([], [], marker="o", ms=8, mfc="none", ls="none", color="0.4", label="final model (best validation)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return fig


def convergence_summary(results: dict[str, FinetuneResult]) -> list[str]:
    """One sentence per run: where it stopped and why, and whether validation had plateaued.

    A run *reached its validation plateau* when patience ran out before the epoch cap, or
    when its last ``patience`` epochs (the last third of them without patience) brought no
    lower validation loss. Otherwise it was still improving at the cap, and the sentence
    says by how much those last epochs lowered the validation loss.
    """
    out = []
    for protocol, run in results.items():
        cap, patience = run.settings.get("epochs"), run.settings.get("patience")
        frame = run.history_frame()
        valid = frame["valid_loss"]
        e_best = frame.loc[run.best_epoch, "valid_rmse_e_per_atom"]
        f_best = frame.loc[run.best_epoch, "valid_rmse_f"]
        head = (f"{LABELS[protocol]}: lowest validation loss at epoch {run.best_epoch} "
                f"({e_best:.0f} meV/atom, {f_best:.0f} meV/Å on the validation structures)")
        trained = len(run.epochs)
        window = patience or max(1, trained // 3)
        if run.stopped_early:
            out.append(f"{head}; stopped at epoch {trained} after {_epochs(patience)} without improvement: "
                       f"it reached its validation plateau within the cap of {cap} epochs.")
        elif run.best_epoch <= trained - window:
            out.append(f"{head}; no lower validation loss in its last {_epochs(trained - run.best_epoch)} up to the "
                       f"cap of {cap}: it reached its validation plateau.")
        else:
            before = valid.loc[1:trained - window].min() if trained > window else valid.loc[0]
            gain = (before - valid.loc[1:].min()) / before if np.isfinite(before) and before > 0 else float("nan")
            out.append(f"{head}; still improving at the cap of {cap} epochs (its last {_epochs(window)} lowered the "
                       f"validation loss by {gain:.0%}): it did not reach its validation plateau within the budget.")
    return out


def _epochs(n: int) -> str:
    """``"1 epoch"``, ``"3 epochs"``."""
    return f"{n} epoch{'' if n == 1 else 's'}"


def protocol_features(models: dict[str, str], structures: list, label: str, layer: str = "last",
                      device: str = "auto") -> dict:
    """Aligned features of ``models`` (name -> registry key) on ``structures``, via the store.

    Structures a model cannot featurise (an element a bespoke model never saw) are dropped for
    every model, so the FeatureSets hold the same atoms in the same order.
    """
    from ..features import align
    from ..store import get_features

    out = {name: get_features(label, key, layer, structures=structures, device=device, on_unsupported="skip")
           for name, key in models.items()}
    return align(out)


def curve_epochs(run: FinetuneResult, max_points: int | None = 8) -> list[int]:
    """Epochs ``1..run.best_epoch`` to show in :func:`epoch_curves`: all, or ``max_points`` spread evenly.

    The first and the best (final) epoch are always among them.
    """
    epochs = list(range(1, run.best_epoch + 1))
    if max_points is None or len(epochs) <= max_points:
        return epochs
    picks = np.unique(np.round(np.linspace(1, run.best_epoch, max(max_points, 2))).astype(int))
    return [int(e) for e in picks]


def epoch_curves(base: str, results: dict[str, FinetuneResult], structures: list, label: str,
                 layer: str = "last", test_size=0.5, seed: int = 0, device: str = "auto",
                 max_points: int | None = 8):
    """GFRE(epoch -> final) and GFRE(base -> epoch) along each protocol's path to its final model.

    The final model is the best-validation epoch; the epochs shown are those of
    :func:`curve_epochs` (up to ``max_points`` of ``1..best``; later epochs were trained and
    discarded). ``GFRE(epoch -> final)`` falls to 0 at the final epoch by construction (that
    point is set to 0, not fitted: a regularised fit of a matrix onto itself leaves a residual,
    up to a few per cent for the ill-conditioned features of a barely trained model); how fast
    it gets there shows when the features settle. ``GFRE(base -> epoch)`` shows how far
    training moves the features away from what the base spans.

    Returns
    -------
    pandas.DataFrame
        Columns ``protocol``, ``epoch``, ``gfre epoch→final``, ``gfre base→epoch``.
    """
    import pandas as pd

    from ..metrics import gfre, split_indices

    rows = []
    for protocol, run in results.items():
        shown = [run.epochs[e - 1] for e in curve_epochs(run, max_points)]
        names = {"base": base} | {f"e{s.derived['epoch']}": s.key for s in shown}
        feats = protocol_features(names, structures, label, layer, device)
        base_x = feats["base"].values
        final = feats[f"e{run.final.derived['epoch']}"].values
        train, test = split_indices(len(base_x), test_size=test_size, seed=seed)
        for spec in shown:
            x = feats[f"e{spec.derived['epoch']}"].values
            to_final = 0.0 if spec == run.final else gfre(x, final, train, test, device=device)
            rows.append({"protocol": LABELS[protocol], "epoch": spec.derived["epoch"], "gfre epoch→final": to_final,
                         "gfre base→epoch": gfre(base_x, x, train, test, device=device)})
    return pd.DataFrame(rows)


def allowed_elements(keys: list[str], device: str = "cpu") -> set[int]:
    """Elements every model of ``keys`` can featurise (intersection of their embeddings)."""
    from ..extract import load_adapter

    allowed = None
    for key in keys:
        z = set(load_adapter(key, device=device).supported_elements)
        allowed = z if allowed is None else allowed & z
    return allowed or set()


def within(structures: list, elements: set[int]) -> list:
    """The structures made only of ``elements``."""
    return [a for a in structures if set(int(z) for z in np.unique(a.numbers)) <= elements]
