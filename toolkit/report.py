"""The study report: one self-contained HTML page, its figures, and the summary table.

:func:`write_report` reads ``summary.zarr`` (written by :func:`toolkit.analyse.analyse_study`)
and writes ``report/index.html`` with every figure embedded as a base64 PNG and also
saved next to it as PNG and SVG, plus tables that give every number with its
uncertainty (mean ± std over members or member pairs, and the bootstrap interval).
``index.html`` is written last and atomically: it is the analyse unit's marker.
:func:`summary_table` is the same "entropy versus learnability" table as plain text.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import store
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.plumbing import write_atomic
from toolkit.study import Layout

log = logging.getLogger(__name__)

Figure = Any  # matplotlib.figure.Figure, imported lazily


# --------------------------------------------------------------------------- loading, numbers


def _open_summary(source: Any) -> Any:
    """The summary as an in-memory xarray.Dataset from a study, a folder, a store or a Dataset."""
    import xarray as xr

    if isinstance(source, xr.Dataset):
        return source.compute()
    if isinstance(source, StudyConfig):
        path = Layout(source).summary
    else:
        path = Path(source)
        if path.is_dir() and not (path / "zarr.json").exists():  # a study folder, not the store
            path = Layout.of_folder(path).summary
    if not path.exists():
        raise StoreError(f"{path}: no summary store; run `toolkit analyse STUDY` first")
    return store.open_dataset(path, "summary", chunks={}).compute()


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 10 ** 5 or abs(x) < 10 ** -3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _pm(ds: Any, name: str, **sel: Any) -> str:
    """'mean ± std' of a summary variable (std omitted when undefined)."""
    mean = float(ds[name].sel(**sel))
    std = float(ds[f"{name}_std"].sel(**sel)) if f"{name}_std" in ds else math.nan
    return _fmt(mean) if not np.isfinite(std) else f"{_fmt(mean)} ± {_fmt(std, 2)}"


def _cell(ds: Any, name: str, **sel: Any) -> str:
    """'mean ± std [ci_low, ci_high]' where the summary has them."""
    text = _pm(ds, name, **sel)
    if f"{name}_ci_low" in ds:
        lo, hi = float(ds[f"{name}_ci_low"].sel(**sel)), float(ds[f"{name}_ci_high"].sel(**sel))
        if np.isfinite(lo):
            text += f" [{_fmt(lo)}, {_fmt(hi)}]"
    return text


def _table_p(ds: Any) -> float:
    """The top-p shown in tables: 1.0 (no truncation) when analysed, else the largest."""
    return float(ds.top_p.max())


def _table_k(ds: Any) -> int:
    """The k shown in tables: 10 (the paper's headline) or the nearest analysed."""
    ks = ds.k.values
    return int(ks[np.argmin(np.abs(ks - 10))])


def _entropy_column(ds: Any) -> tuple[np.ndarray, str]:
    """The data-side entropy-rate estimate per run (bits/symbol) and its axis label."""
    return ds.entropy_rate_bits_per_symbol.values, "entropy rate [interval]"


def _rate_interval(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the entropy-rate interval per run; NaN for summaries without one."""
    n = ds.sizes["run"]
    nan = np.full(n, np.nan)
    low = ds.entropy_rate_low.values if "entropy_rate_low" in ds else nan
    high = ds.entropy_rate_high.values if "entropy_rate_high" in ds else nan
    return low, high


def _rate_cell(point: float, low: float, high: float) -> str:
    return f"{_fmt(point)} [{_fmt(low)}, {_fmt(high)}]"


KL_COLUMNS = {"model_to_uniform": ("kl_to_uniform_bits", "KL(P || U) bits"),
              "uniform_to_model": ("kl_uniform_to_model_bits", "KL(U || P) bits")}
"""The two KL directions: summary variable and column title; the headline one comes first."""


def _definitions(ds: Any) -> dict[str, Any]:
    """The summary's resolved definitions (``definitions`` attribute)."""
    return dict(ds.attrs.get("definitions") or {})


def _kl_order(ds: Any) -> list[tuple[str, str]]:
    """(variable, title) of both KL directions, the headline (``kl_headline``) first."""
    head = _definitions(ds).get("kl_headline", "model_to_uniform")
    return [KL_COLUMNS[head], *[v for k, v in KL_COLUMNS.items() if k != head]]


def definitions_note(ds: Any) -> str:
    """One sentence naming the definitions a summary was computed with."""
    d = _definitions(ds)
    if not d:
        return "definitions: not recorded"
    rule_key, nan_key, kl_key = (str(d.get(k)) for k in ("top_p_rule", "js_nan", "kl_headline"))
    rule = {"reach": "smallest prefix whose mass reaches p (float64)",
            "authors": "the authors' float32 code (largest prefix with mass <= p, at least one "
                       "token)"}.get(rule_key, rule_key)
    nan = {"none": "never NaN", "pair_mean": "NaN replaced by the pair's mean over positions"}.get(
        nan_key, nan_key)
    head = KL_COLUMNS.get(kl_key, ("", kl_key))[1].replace(" bits", "")
    return (f"definitions: {d.get('definitions')} (JS top-p truncation: {rule}, {nan}; every std "
            f"with ddof = {d.get('spread_ddof')}; headline KL: {head}; both KL directions are stored)")


def _rows(ds: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the entropy-versus-learnability table (one row per run)."""
    p, k = _table_p(ds), _table_k(ds)
    cond, cond_name = _entropy_column(ds)
    low, high = _rate_interval(ds)
    kls = [kl for kl in _kl_order(ds) if kl[0] in ds]
    header = ["run", "kind", "tokenizer", "members", "|V|", f"{cond_name} bits/symbol",
              "compression bits/symbol", "analytic rate bits/symbol", *[t for _, t in kls],
              "H / log2|V|", "perplexity", "model / counting [/ optimal] bits/token", "learned beyond counting",
              "top-1 accuracy", f"JS distance (p={p:g})", "argmax agreement",
              f"top-{k} overlap", f"local Spearman k={k}", "Procrustes disparity",
              "Fisher share embeddings"]
    rows = []
    for i, run in enumerate(ds.run.values):
        r = {"run": run}
        rows.append([
            str(run), str(ds.kind.values[i]), str(ds.tokenizer.values[i]),
            str(int(ds.n_members.values[i])), str(int(ds.vocab_size.values[i])),
            _rate_cell(cond[i], low[i], high[i]),
            _fmt(float(ds.compression_bits_per_symbol.values[i])),
            _fmt(float(ds.analytic_entropy_rate_bits_per_symbol.values[i])),
            *[_pm(ds, name, **r) for name, _ in kls], _pm(ds, "entropy_fraction", **r),
            _pm(ds, "perplexity", **r), _model_vs_counting(ds, i),
            _pm(ds, "learned_beyond_counting_bits", **r) if "learned_beyond_counting_bits" in ds else "-",
            _pm(ds, "top1_accuracy", **r),
            _pm(ds, "js_distance", top_p=p, **r), _pm(ds, "argmax_agreement", **r),
            _pm(ds, "topk_overlap", k=k, **r), _pm(ds, "local_spearman", k=k, **r),
            _pm(ds, "procrustes_disparity", **r), _pm(ds, "fisher_share", group="embeddings", **r),
        ])
    return header, rows


def _model_vs_counting(ds: Any, i: int) -> str:
    """'model / counting (k=K)' cross-entropies of run i, '-' for summaries without them."""
    if "counting_baseline_bits" not in ds:
        return "-"
    k = ds.counting_baseline_k.values[i]
    optimal = float(ds.optimal_cross_entropy_bits.values[i]) if "optimal_cross_entropy_bits" in ds else math.nan
    return (f"{_fmt(float(ds.model_cross_entropy_bits.values[i]))} / "
            f"{_fmt(float(ds.counting_baseline_bits.values[i]))}"
            + (f" (k={int(k)})" if np.isfinite(k) else "")
            + (f" / {_fmt(optimal)}" if np.isfinite(optimal) else ""))


def summary_table(study_or_summary: StudyConfig | str | Path | Any) -> str:
    """The entropy-versus-learnability table as plain text, one row per run.

    Parameters
    ----------
    study_or_summary
        A :class:`StudyConfig`, a study folder, a ``summary.zarr`` path or the summary
        ``xarray.Dataset``.

    Returns
    -------
    str
        A fixed-width table (mean ± std over members or member pairs); printed at the
        end of ``make demo``.
    """
    ds = _open_summary(study_or_summary)
    header, rows = _rows(ds)
    # Transposed (one column per run): 17 measures side by side do not fit a terminal.
    lines = [[h, *[row[i] for row in rows]] for i, h in enumerate(header)]
    widths = [max(len(line[c]) for line in lines) for c in range(len(lines[0]))]
    out = [f"Entropy versus learnability ({ds.attrs.get('study', '')}; mean ± std over "
           "members or member pairs)", definitions_note(ds)]
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                             for c, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip())
        if n == 0:
            out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    missing = ds.attrs.get("members_missing") or []
    if missing:
        out.append(f"left out (not evaluated): {', '.join(missing)}")
    return "\n".join(out)


# --------------------------------------------------------------------------- figures


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6,
            layout: Any = "constrained") -> tuple[Figure, Any]:
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no global state, Agg by default

    fig = MplFigure(figsize=(width * ncols, height * nrows), layout=layout)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors(ds: Any) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {str(r): cmap(i % 10) for i, r in enumerate(ds.run.values)}


def _band(ax: Any, x: np.ndarray, mean: np.ndarray, std: np.ndarray, label: str, color: Any,
          bounds: tuple[float, float] = (-np.inf, np.inf)) -> None:
    """A line with a ± std band, the band clipped to the measure's range (e.g. [0, 1])."""
    ax.plot(x, mean, marker="o", ms=3, label=label, color=color)
    ok = np.isfinite(std)
    if ok.any():
        lo, hi = np.clip((mean - std)[ok], *bounds), np.clip((mean + std)[ok], *bounds)
        ax.fill_between(x[ok], lo, hi, color=color, alpha=0.2, lw=0)


def fig_js(ds: Any) -> Figure:
    fig, ax = _figure()
    ax = ax[0, 0]
    for run, c in _colors(ds).items():
        r = ds.sel(run=run)
        _band(ax, ds.top_p.values, r.js_distance.values, r.js_distance_std.values, run, c, (0, 1))
    ax.set(xlabel="top-p truncation mass p", ylabel="Jensen-Shannon distance (base 2, 0-1)",
           title="Disagreement between members (± std over pairs)")
    ax.legend(fontsize=8)
    return fig


def fig_rank(ds: Any) -> Figure:
    fig, ax = _figure()
    ax = ax[0, 0]
    for run, c in _colors(ds).items():
        y = ds.rank_curve.sel(run=run).values
        ok = np.isfinite(y) & (y > 0)
        ax.loglog(ds["rank"].values[ok], y[ok], label=run, color=c)
        v = int(ds.vocab_size.sel(run=run))
        if v > 0:
            ax.axhline(1 / v, color=c, ls=":", lw=0.8)
    ax.set(xlabel="rank of the token in the output distribution",
           ylabel="average probability", title="Rank curves (dotted: uniform 1/|V|)")
    ax.legend(fontsize=8)
    return fig


def fig_embeddings(ds: Any) -> Figure:
    fig, axes = _figure(ncols=2, width=5.5)
    fig.suptitle("Static word embeddings: agreement of neighbourhoods between members")
    for ax, name, label in ((axes[0, 0], "topk_overlap", "top-k overlap (Jaccard)"),
                            (axes[0, 1], "local_spearman", "local Spearman rho")):
        for run, c in _colors(ds).items():
            r = ds.sel(run=run)
            _band(ax, ds.k.values, r[name].values, r[f"{name}_std"].values, run, c, (-1, 1))
        ax.set_xscale("log")
        ax.set_xticks(ds.k.values, [str(k) for k in ds.k.values])
        ax.minorticks_off()
        ax.set(xlabel="neighbourhood size k (tokens)", ylabel=label,
               title=f"{label} (± std over pairs)")
        ax.legend(fontsize=8)
    return fig


def _bars(ax: Any, ds: Any, name: str, dim: str | None, labels: list[str] | None = None) -> None:
    """Grouped bars: one group per label along ``dim`` (or one per measure), one bar per run."""
    colors = _colors(ds)
    runs = list(colors)
    cats = labels or ([str(v) for v in ds[dim].values] if dim else [name])
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(cats))
    for i, run in enumerate(runs):
        r = ds.sel(run=run)
        mean = r[name].values if dim else np.array([float(r[name])])
        std = r[f"{name}_std"].values if dim else np.array([float(r[f"{name}_std"])])
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, mean, width,  # NaN: no bar
               yerr=np.where(np.isfinite(std), std, 0), capsize=2, color=colors[run], label=run)
    ax.set_xticks(x, cats, rotation=30 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")


def fig_alignment(ds: Any) -> Figure:
    names = [("procrustes_disparity", "Procrustes disparity"), ("procrustes_cosine", "cosine after Procrustes"),
             ("cka_linear", "linear CKA"), ("cka_rbf", "RBF CKA"),
             ("contextual_cka_linear", "contextual linear CKA")]
    fig, axes = _figure(ncols=len(names), width=2.8, height=3.4)
    for ax, (name, label) in zip(axes[0], names, strict=True):
        _bars(ax, ds, name, None, labels=[""])
        ax.set(ylabel=f"{label} (unitless)", title=label)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Embedding alignment between members (± std over pairs)")
    return fig


def fig_fisher(ds: Any) -> Figure:
    fig, ax = _figure()
    _bars(ax[0, 0], ds, "fisher_share", "group", labels=["embeddings", "transformer layers", "head"])
    ax[0, 0].set(ylabel="share of the Fisher trace (± std over members)",
                 title="Normalised empirical Fisher ('batch', final weights)")
    ax[0, 0].legend(fontsize=8)
    return fig


def fig_fisher_blocks(ds: Any) -> Figure:
    fig, ax = _figure(width=max(5.0, 0.6 * ds.sizes["block"] + 2))
    _bars(ax[0, 0], ds, "fisher_block_share", "block")
    ax[0, 0].set(xlabel="parameter block", ylabel="share of the Fisher trace (± std)",
                 title="Fisher per block ('batch', final weights)")
    ax[0, 0].legend(fontsize=8)
    return fig


def fig_flow(ds: Any) -> Figure | None:
    est = "batch" if "batch" in ds.estimator.values else str(ds.estimator.values[0])
    flow = ds.fisher_flow.sel(estimator=est)
    if not np.isfinite(flow.values).any():
        return None
    fig, axes = _figure(ncols=ds.sizes["group"], width=3.8)
    for ax, group in zip(axes[0], ds.group.values, strict=True):
        for run, c in _colors(ds).items():
            steps = ds.fisher_flow_step.sel(run=run).values
            f = flow.sel(run=run, group=group)
            std = ds.fisher_flow_std.sel(run=run, group=group, estimator=est).values
            ok = np.isfinite(steps) & np.isfinite(f.values)
            # by step: the evaluated checkpoint (stored last) can be from before the last snapshots
            idx = np.flatnonzero(ok)[np.argsort(steps[ok], kind="stable")]
            _band(ax, steps[idx], f.values[idx], std[idx], run, c, (0, 1))
        title = "transformer layers" if group == "transformer" else str(group)
        ax.set(xlabel="training step", ylabel="share of the Fisher trace", title=title)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Fisher flow over training ('{est}' estimator, ± std over members)")
    return fig


def _no_diagonal(ax: Any) -> None:
    ax.text(0.5, 0.5, "no Fisher diagonal stored\n(analysis.fisher_diagonal)", ha="center",
            va="center", transform=ax.transAxes, color="#777")


def fig_fisher_tokens(ds: Any) -> Figure:
    """Per-token Fisher (word-embedding row sums) against frequency and predictability."""
    est = "batch" if "batch" in ds.estimator.values else str(ds.estimator.values[0])
    fig, axes = _figure(ncols=2, width=4.6)
    panels = (("frequency", ds.fisher_token_frequency_bin_count, "token count in the training split",
               "fisher_token_spearman_frequency"),
              ("nll", ds.fisher_token_nll_bin_nll.sel(estimator=est), "mean NLL where the token is the target (nats)",
               "fisher_token_spearman_nll"))
    for ax, (key, xs, xlabel, rho) in zip(axes[0], panels, strict=True):
        y = ds[f"fisher_token_{key}_bin_fisher"].sel(estimator=est)
        std = ds[f"fisher_token_{key}_bin_fisher_std"].sel(estimator=est)
        drawn = False
        for run, c in _colors(ds).items():
            x, m, sd = xs.sel(run=run).values, y.sel(run=run).values, std.sel(run=run).values
            ok = np.isfinite(x) & np.isfinite(m)
            if ok.any():
                r = ds[rho].sel(run=run, estimator=est)
                _band(ax, x[ok], m[ok], sd[ok], f"{run} (Spearman {_fmt(float(r))})", c, (0, np.inf))
                drawn = True
        if key == "frequency" and drawn:
            ax.set_xscale("log")
        if not drawn:
            _no_diagonal(ax)
        else:
            ax.legend(fontsize=7)
        ax.set(xlabel=xlabel, ylabel="token Fisher / mean token Fisher",
               title=f"per-token Fisher vs {'frequency' if key == 'frequency' else 'predictability'}")
    fig.suptitle(f"Fisher of each token's embedding row ('{est}', final weights; equal-count bins, "
                 "± std over members)")
    return fig


def fig_fisher_seeds(ds: Any) -> Figure:
    """Spearman correlation of Fisher diagonals between members, per block."""
    est = "batch" if "batch" in ds.estimator.values else str(ds.estimator.values[0])
    fig, ax = _figure(width=max(5.0, 0.6 * ds.sizes["block"] + 2))
    sel = ds.sel(estimator=est)
    _bars(ax[0, 0], sel, "fisher_seed_spearman", "block")
    if not np.isfinite(sel.fisher_seed_spearman.values).any():
        _no_diagonal(ax[0, 0])
    else:
        ax[0, 0].legend(fontsize=8)
    ax[0, 0].set(xlabel="parameter block", ylabel="Spearman over parameters (± std)",
                 title=f"Fisher diagonals across seeds ('{est}')")
    return fig


def fig_loss(ds: Any) -> Figure | None:
    if "loss_curve" not in ds:
        return None
    runs = list(_colors(ds))
    fig, axes = _figure(ncols=len(runs), width=3.6)
    for ax, run in zip(axes[0], runs, strict=True):
        for seed in ds.member.values:
            y = ds.loss_curve.sel(run=run, member=seed).values
            x = ds.loss_step.sel(run=run, member=seed).values
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.any():
                ax.plot(x[ok], y[ok], lw=1, label=f"seed {seed}")
        ax.set(xlabel="optimizer step", ylabel="training MLM loss (nats)", title=run)
        if ax.get_lines():  # a run without complete members has no curve to label
            ax.legend(fontsize=7)
    fig.suptitle("Loss curves per member")
    return fig


LEARNABILITY: tuple[tuple[str, dict[str, str], str], ...] = (
    ("kl_to_uniform_bits", {}, "KL(P || U) (bits)"),  # replaced by the headline KL direction
    ("entropy_fraction", {}, "output entropy / log2|V|"),
    ("js_distance", {"top_p": "p"}, "JS distance"),
    ("argmax_agreement", {}, "argmax agreement"),
    ("topk_overlap", {"k": "k"}, "top-k overlap"),
    ("fisher_share", {"group": "embeddings"}, "Fisher share of the embeddings"),
    ("learned_beyond_counting_bits", {}, "learned beyond counting (bits/token)"),
)


def fig_entropy(ds: Any) -> Figure:
    cond, _ = _entropy_column(ds)
    low, high = _rate_interval(ds)
    # horizontal bars: the entropy-rate interval (a wide one says the data do not resolve it)
    xerrs = (np.vstack([np.clip(cond - low, 0, None), np.clip(high - cond, 0, None)]), None)
    xs = ((cond, "entropy rate, point and interval\n(bits/symbol)"),
          (ds.compression_bits_per_symbol.values, "compression (bits/symbol)"))
    colors = _colors(ds)
    kl, kl_title = _kl_order(ds)[0]
    panels = [(kl, w, kl_title.replace(" bits", " (bits)")) if n == "kl_to_uniform_bits" and kl in ds
              else (n, w, t) for n, w, t in LEARNABILITY]
    panels = [pnl for pnl in panels if pnl[0] in ds]  # summaries written before a measure existed
    # A fixed grid: constrained layout of 14 panels costs seconds per saved format.
    fig, axes = _figure(ncols=len(panels), nrows=2, width=3.0, height=3.0, layout=None)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.91, wspace=0.5, hspace=0.45)
    for col, (name, where, label) in enumerate(panels):
        sel: dict[str, Any] = {d: (_table_p(ds) if v == "p" else _table_k(ds) if v == "k" else v)
                               for d, v in where.items()}
        y, yerr = ds[name].sel(**sel).values, ds[f"{name}_std"].sel(**sel).values
        suffix = "".join(f" ({d}={v})" for d, v in sel.items() if d != "group")
        for row, (x, xlabel) in enumerate(xs):
            ax = axes[row, col]
            xerr = xerrs[row]
            for i, run in enumerate(colors):
                bar = xerr[:, i:i + 1] if xerr is not None and np.isfinite(xerr[:, i]).all() else None
                ax.errorbar(x[i], y[i], yerr=yerr[i] if np.isfinite(yerr[i]) else None, xerr=bar, fmt="o",
                            color=colors[run], capsize=2)
                if np.isfinite(x[i]) and np.isfinite(y[i]):
                    # labels of points in the right half go to their left, so they stay inside
                    right = x[i] > np.nanmean(x)
                    ax.annotate(run, (x[i], y[i]), fontsize=7, xytext=(-4 if right else 4, 4),
                                textcoords="offset points", ha="right" if right else "left")
            ax.margins(x=0.3, y=0.15)  # room for the run labels
            ax.set(xlabel=xlabel, ylabel=label + suffix)
    fig.suptitle("Entropy versus learnability (one point per run, ± std)")
    return fig


FIGURES: tuple[tuple[str, str, Callable[[Any], Figure | None]], ...] = (
    ("entropy_vs_learnability", "Entropy versus learnability", fig_entropy),
    ("js_distance", "Jensen-Shannon distance versus top-p", fig_js),
    ("rank_curves", "Rank curves", fig_rank),
    ("embedding_neighbourhoods", "Top-k overlap and local Spearman versus k", fig_embeddings),
    ("embedding_alignment", "Procrustes and CKA", fig_alignment),
    ("fisher_share", "Normalised Fisher information", fig_fisher),
    ("fisher_blocks", "Fisher information per block", fig_fisher_blocks),
    ("fisher_flow", "Fisher flow over training", fig_flow),
    ("fisher_tokens", "Per-token Fisher versus frequency and predictability", fig_fisher_tokens),
    ("fisher_seeds", "Agreement of Fisher diagonals across seeds", fig_fisher_seeds),
    ("loss_curves", "Loss curves", fig_loss),
)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #555; font-size: 0.9em; }
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _variable_tables(ds: Any) -> str:
    """Every measure with its uncertainty: rows are labels of the extra dims, columns runs."""
    runs = [str(r) for r in ds.run.values]
    scalar_rows, parts = [], []
    for name in ds.data_vars:
        if name.endswith(("_std", "_ci_low", "_ci_high")) or f"{name}_std" not in ds:
            continue
        var = ds[name]
        desc = var.attrs.get("description", "")
        units = var.attrs.get("units", "")
        extra = [d for d in var.dims if d != "run"]
        if not extra:
            scalar_rows.append([f"{name} [{units}]", *[_cell(ds, name, run=r) for r in runs]])
            continue
        stacked = var.stack(cell=extra) if len(extra) > 1 else var.rename({extra[0]: "cell"})
        rows = []
        for label in stacked.cell.values:
            sel = dict(zip(extra, label if isinstance(label, tuple) else (label,), strict=True))
            if not np.isfinite(var.sel(**sel).values).any():
                continue
            rows.append([", ".join(f"{d}={v}" for d, v in sel.items()),
                         *[_cell(ds, name, run=r, **sel) for r in runs]])
        parts.append(f"<h3>{html.escape(name)} [{html.escape(units)}]</h3>"
                     f"<p class='note'>{html.escape(desc)}</p>" + _html_table(["", *runs], rows))
    scalars = _html_table(["measure [units]", *runs], scalar_rows)
    return ("<h3>Per-run measures</h3><p class='note'>mean ± std over members (per-member "
            "measures) or member pairs (pairwise measures) [bootstrap confidence interval over "
            "positions or tokens, where computed]</p>" + scalars + "".join(parts))


def _profile_table(ds: Any) -> str:
    runs = [str(r) for r in ds.run.values]
    names = ["unigram_entropy_bits", "unigram_entropy_bits_per_symbol", "symbols_per_token",
             "compression_bits_per_symbol", "analytic_entropy_rate_bits_per_symbol"]
    rows = [[f"{n} [{ds[n].attrs.get('units', '')}]", *[_fmt(float(ds[n].sel(run=r))) for r in runs]]
            for n in names]
    low, high = _rate_interval(ds)
    rate = ds.entropy_rate_bits_per_symbol.values
    rows.append(["entropy rate [bits/symbol] [interval]",
                 *[_rate_cell(rate[i], low[i], high[i]) for i in range(len(runs))]])
    for name in ("entropy_rate_heldout_bits_per_symbol", "entropy_rate_ppmd_bits_per_symbol"):
        if name in ds:
            rows.append([f"{ds[name].attrs.get('long_name', name)} [{ds[name].attrs.get('units', '')}]",
                         *[_fmt(float(ds[name].sel(run=r))) for r in runs]])
    if "entropy_rate_method" in ds:
        rows.append(["how the entropy rate was estimated",
                     *[str(ds.entropy_rate_method.sel(run=r).values) for r in runs]])
    for o in ds.order.values:
        rows.append([f"conditional entropy, {int(o)} previous tokens [bits/token] "
                     "(tokens per context)",
                     *[f"{_fmt(float(ds.conditional_entropy_bits.sel(run=r, order=o)))} "
                       f"({_fmt(float(ds.context_coverage.sel(run=r, order=o)))})" for r in runs]])
    return _html_table(["data-side entropy", *runs], rows)


def _save_figure(fig: Figure, folder: Path, name: str) -> str:
    """Save PNG and SVG next to the page; return the PNG as base64 for embedding."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    png = buf.getvalue()
    (folder / f"{name}.png").write_bytes(png)
    fig.savefig(folder / f"{name}.svg", format="svg")
    return base64.b64encode(png).decode("ascii")


def write_report(study: StudyConfig) -> Path:
    """Write the study's HTML report and figures from its ``summary.zarr``.

    Parameters
    ----------
    study
        The study; reads ``Layout(study).summary`` (run ``toolkit analyse`` first).

    Returns
    -------
    Path
        ``Layout(study).report_index``: self-contained (figures embedded
        as base64 PNG); each figure is also saved as ``<name>.png`` and ``<name>.svg``
        in the same folder.

    Raises
    ------
    StoreError
        No summary, or a summary of another schema version.
    """
    layout = Layout(study)
    ds = _open_summary(study)
    out = layout.report_dir
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for i, (name, title, make) in enumerate(FIGURES, 1):
        fig = make(ds)
        if fig is None:
            log.info("figure %s skipped: no data", name)
            continue
        figures.append((name, title, _save_figure(fig, out, name)))
        log.info("figure %d/%d: %s", i, len(FIGURES), out / f"{name}.png")
    header, rows = _rows(ds)
    missing = ds.attrs.get("members_missing") or []
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)} report"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>Entropy versus learnability: study {html.escape(study.name)}</h1>",
        f"<p>{html.escape(study.description)}</p>",
        f"<p class='note'>Members analysed: {html.escape(', '.join(ds.attrs.get('members_analysed', [])))}."
        + (f" <b>Left out (not evaluated): {html.escape(', '.join(missing))}.</b>" if missing else "")
        + f" Bootstrap: {ds.attrs.get('bootstrap')} resamples, confidence {ds.attrs.get('confidence')};"
        f" local Spearman variant: {html.escape(str(ds.attrs.get('spearman_variant')))};"
        f" {html.escape(definitions_note(ds))}.</p>",
        "<h2>Entropy versus learnability</h2><p class='note'>mean ± std over members or member "
        "pairs; data-side entropies from the training tokens.</p>", _html_table(header, rows),
    ]
    for name, title, png in figures:
        parts.append(f"<figure><h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{png}'><figcaption>{name}.png, "
                     f"<a href='{name}.svg'>{name}.svg</a></figcaption></figure>")
    parts += ["<h2>Every measure</h2>", _variable_tables(ds), "<h2>Data-side entropy profile</h2>",
              _profile_table(ds), "</body></html>"]
    # index.html marks the analyse unit complete: write it last, atomically.
    write_atomic(layout.report_index, "\n".join(parts))  # readable by the group, as shared
    log.info("wrote %s (%d figures)", layout.report_index, len(figures))
    return layout.report_index
