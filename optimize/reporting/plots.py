"""The report's figures, drawn once each with matplotlib's Agg canvas and returned as PNG bytes: the same bytes
go into report.html (as data: URIs), into `plots/*.png` of the run directory and onto the MLflow run.

matplotlib (and numpy) are named through optimize.lazy and imported when the first figure is drawn, so importing
this module costs nothing (a report whose plots are reused draws none and imports no matplotlib). Figures are
small (dpi 72, a few inches) and closed after drawing: the report must add under 2 s to a run."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optimize.lazy import lazy

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
else:
    np = lazy("numpy")

mpl_agg = lazy("matplotlib.backends.backend_agg")
mpl_figure = lazy("matplotlib.figure")
mpl_ticker = lazy("matplotlib.ticker")

DPI = 72
BASELINE_COLOUR = "#7f7f7f"
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
# A latency curve is drawn through at most this many quantiles: enough for the eye, cheap for Agg.
CURVE_POINTS = 400
# The percentiles metrics.json keeps for each shape, as (quantile, key): what a curve falls back to.
RECORDED_PERCENTILES = ((0.0, "min_ms"), (0.5, "p50_ms"), (0.9, "p90_ms"), (0.95, "p95_ms"), (0.99, "p99_ms"))


@dataclass(frozen=True)
class Plot:
    """One rendered figure: `name` is its file stem under `plots/`."""

    name: str
    title: str
    png: bytes


@dataclass(frozen=True)
class Latency:
    """One model's latencies at one shape: every timed iteration (`samples_ms`, from distributions.npz) when
    known, and always the percentiles metrics.json recorded (`recorded`: quantile → ms)."""

    label: str
    recorded: dict[float, float]
    samples_ms: np.ndarray | None = None

    @classmethod
    def from_shape(cls, label: str, shape: dict[str, Any], samples_ms: np.ndarray | None = None) -> Latency:
        """From a `shapes` entry of metrics.json (p50_ms, p99_ms, ...) and optional per-iteration samples."""
        recorded = {q: float(shape[k]) for q, k in RECORDED_PERCENTILES if shape.get(k) is not None}
        if shape.get("max_ms") is not None:
            recorded[1.0] = float(shape["max_ms"])
        return cls(label, recorded, samples_ms)

    def p(self, q: float) -> float | None:
        """The q-quantile in ms: as recorded in metrics.json, else from the samples."""
        if q in self.recorded:
            return self.recorded[q]
        if self.samples_ms is not None and len(self.samples_ms):
            return float(np.quantile(self.samples_ms, q))
        return None


@dataclass(frozen=True)
class TradeoffPoint:
    """A model on the speed-up vs accuracy plane."""

    label: str
    cosine_min: float
    p50_speedup: float
    group: str  # the colour: the variant (trials share their variant's colour)
    kind: str = "variant"  # "variant", "baseline", "trial" or "chosen-trial"


@dataclass
class _Palette:
    """A stable colour per variant name, in the order they are first asked for."""

    assigned: dict[str, str] = field(default_factory=dict)

    def __call__(self, name: str) -> str:
        if name == "fp32":
            return BASELINE_COLOUR
        if name not in self.assigned:
            self.assigned[name] = COLOURS[len(self.assigned) % len(COLOURS)]
        return self.assigned[name]


def palette(variants: Sequence[str]) -> _Palette:
    """Colours for `variants` (fp32 grey), the same in every figure of a report."""
    pal = _Palette()
    for v in variants:
        pal(v)
    return pal


def _figure(width_in: float, height_in: float) -> Figure:
    fig = mpl_figure.Figure(figsize=(width_in, height_in), dpi=DPI)
    mpl_agg.FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" chunk: the bytes depend on the figure only, not on the matplotlib build.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    fig.clear()
    return buf.getvalue()


def _style(ax: Axes) -> None:
    ax.grid(True, color="#e6e6e6", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


def _log_x(ax: Axes) -> None:
    """A log x axis labelled at 1, 2 and 5 of each decade in plain numbers (matplotlib's default labels every
    minor tick of a short range as 2×10^-1 …, which overlap)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(mpl_ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(mpl_ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(mpl_ticker.NullFormatter())


def _curve(lat: Latency) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ms, cumulative share, from samples?) for a latency CDF."""
    if lat.samples_ms is not None and len(lat.samples_ms):
        qs = np.linspace(0.0, 1.0, min(CURVE_POINTS, len(lat.samples_ms)))
        return np.quantile(lat.samples_ms, qs), qs, True
    qs = np.array(sorted(lat.recorded))
    return np.array([lat.recorded[q] for q in qs]), qs, False


def _grid(panels: int, max_cols: int, width: tuple[float, float], height: tuple[float, float]) -> tuple[Any, Any]:
    """A figure with room for `panels` panels, at most `max_cols` a row: each panel `width[0]` × `height[0]`
    inches, plus `width[1]` / `height[1]` for the figure's margins. Returns the figure and its 2-D axes."""
    cols = min(max_cols, max(1, panels))
    rows = max(1, -(-panels // cols))
    fig = _figure(width[0] * cols + width[1], height[0] * rows + height[1])
    return fig, fig.subplots(rows, cols, squeeze=False)


def latency(target: str, shapes: dict[str, Sequence[Latency]], colour: _Palette) -> Plot:
    """Latency CDFs on one target: a panel per shape with every model on it (the FP32 baseline in grey), p50
    (circle) and p99 (triangle) marked on each curve. Curves come from every timed iteration where known, else
    through the recorded percentiles (min, p50, p90, p95, p99, max; dashed)."""
    fig, axes = _grid(len(shapes), 3, (4.2, 0.4), (2.7, 0.7))
    for i, ax in enumerate(axes.flat):
        if i >= len(shapes):
            ax.set_visible(False)
            continue
        shape, models = list(shapes.items())[i]
        _style(ax)
        lows, highs = [], []
        for lat in models:
            xs, ys, full = _curve(lat)
            col = colour(lat.label)
            style = {"drawstyle": "steps-post"} if full else {"linestyle": "--"}
            ax.plot(xs, ys, color=col, linewidth=1.4, label=lat.label, **style)
            for q, marker in ((0.5, "o"), (0.99, "^")):
                v = lat.p(q)
                if v is not None:
                    ax.plot([v], [q], marker=marker, markersize=6, color=col, linestyle="none")
            if len(xs):
                lows.append(float(xs.min()))
                highs.append(float(xs.max()))
        if lows and min(lows) > 0 and max(highs) / min(lows) > 8:
            _log_x(ax)
        else:
            ax.xaxis.set_major_locator(_max_n(5))
        ax.set_ylim(0, 1.03)
        ax.set_yticks([0, 0.5, 0.99], ["0", "p50", "p99"])
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("latency (ms)", fontsize=8)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right", frameon=False)
    fig.suptitle(f"Latency on {target}: share of runs at or under x (○ p50, △ p99)", fontsize=10)
    _layout(fig)
    return Plot(f"latency-{target}", f"Latency on {target}", _png(fig))


def _max_n(n: int) -> Any:
    return mpl_ticker.MaxNLocator(nbins=n)


ACCURACY_KINDS = {
    "cosine": "cosine similarity to FP32 (per sample)",
    "abs_error": "max |variant − FP32| (per sample)",
}


def accuracy(target: str, outputs: dict[str, dict[str, dict[str, np.ndarray]]], colour: _Palette) -> Plot:
    """Per-sample accuracy against the FP32 reference on one target: a panel per (output, kind) with one
    histogram per variant. `outputs[output][kind][variant]` is the per-sample array, kind "cosine" or
    "abs_error"."""
    panels = [(o, k) for o, by_kind in outputs.items() for k in ACCURACY_KINDS if by_kind.get(k)]
    fig, axes = _grid(len(panels), 2, (4.6, 0.3), (2.5, 0.5))
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        output, kind = panels[i]
        series = outputs[output][kind]
        _style(ax)
        finite = [np.asarray(a, dtype=np.float64) for a in series.values()]
        finite = [a[np.isfinite(a)] for a in finite]
        lo = min((float(a.min()) for a in finite if a.size), default=0.0)
        hi = max((float(a.max()) for a in finite if a.size), default=1.0)
        if kind == "cosine":
            hi = max(hi, 1.0)
        if hi <= lo:
            lo, hi = lo - 1e-9, hi + 1e-9
        bins = np.linspace(lo, hi, 41)
        for (variant, _), values in zip(series.items(), finite, strict=True):
            if values.size:
                ax.hist(values, bins=bins, histtype="step", linewidth=1.4, color=colour(variant), label=variant)
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.set_title(f"{output}: {kind.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel(ACCURACY_KINDS[kind], fontsize=8)
        ax.set_ylabel("samples", fontsize=8)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"Accuracy vs FP32 on {target}", fontsize=10)
    _layout(fig)
    return Plot(f"accuracy-{target}", f"Accuracy on {target}", _png(fig))


def size_memory(
    sizes_mb: dict[str, float], memory: dict[str, dict[str, float]], colour: _Palette, variant_of: dict[str, str]
) -> Plot:
    """Bars: the ONNX file size of each model (MB), and each memory figure recorded (MB) per model and
    target. `memory[label][key]` where `variant_of[label]` names the model (for its colour)."""
    keys = [k for k in MEMORY_KEYS if any(k in m for m in memory.values())]
    cols = 2 if keys else 1
    fig = _figure(4.4 * cols + 0.3, 3.0)
    axes = fig.subplots(1, cols, squeeze=False)[0]
    ax = axes[0]
    _style(ax)
    names = list(sizes_mb)
    bars = ax.bar(names, [sizes_mb[n] for n in names], color=[colour(n) for n in names])
    ax.bar_label(bars, labels=[f"{sizes_mb[n]:.3g}" for n in names], fontsize=7)
    ax.set_ylabel("MB", fontsize=8)
    ax.set_title("ONNX size", fontsize=9)
    ax.tick_params(axis="x", labelrotation=20)
    if keys:
        ax = axes[1]
        _style(ax)
        labels = list(memory)
        width = 0.8 / len(labels)
        x = np.arange(len(keys))
        for i, label in enumerate(labels):
            values = [memory[label].get(k, 0.0) for k in keys]
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, color=colour(variant_of[label]), label=label)
        ax.set_xticks(x, [MEMORY_KEYS[k] for k in keys])
        ax.set_ylabel("MB", fontsize=8)
        ax.set_title("Memory", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    _layout(fig, title=False)
    return Plot("size-memory", "Size and memory", _png(fig))


MEMORY_KEYS = {
    "rss_peak_mb": "peak RSS",
    "rss_session_mb": "session RSS",
    "gpu_peak_mb": "GPU peak",
    "gpu_session_mb": "GPU session",
    "engine_device_memory_mb": "engine device",
}


def tradeoff(points: Sequence[TradeoffPoint], colour: _Palette) -> Plot:
    """Speed-up (p50, worst shape) against accuracy (cosine min, worst output) for each variant and target,
    FP32 at (1, 1), and the INT8 fallback trials (on the tuning data) joined in trial order, the kept one
    ringed."""
    fig = _figure(5.6, 3.6)
    ax = fig.subplots()
    _style(ax)
    ax.axhline(1.0, color=BASELINE_COLOUR, linewidth=0.8, linestyle="--")
    trials: dict[str, list[TradeoffPoint]] = {}
    for p in points:
        if p.kind in ("trial", "chosen-trial"):
            trials.setdefault(p.group, []).append(p)
    for group, ps in trials.items():
        ax.plot(
            [p.cosine_min for p in ps], [p.p50_speedup for p in ps], color=colour(group), alpha=0.45,
            linewidth=1.0, marker="x", markersize=5, label=f"{group} fallback trials (tuning data)",
        )  # fmt: skip
        for p in ps:
            if p.kind == "chosen-trial":
                ax.scatter([p.cosine_min], [p.p50_speedup], s=120, facecolors="none", edgecolors=colour(group))
    for p in points:
        if p.kind in ("variant", "baseline"):
            marker = "s" if p.kind == "baseline" else "o"
            ax.scatter([p.cosine_min], [p.p50_speedup], s=40, marker=marker, color=colour(p.group), zorder=3)
            ax.annotate(p.label, (p.cosine_min, p.p50_speedup), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel("cosine min vs FP32 (higher is more accurate)", fontsize=8)
    ax.set_ylabel("p50 speed-up vs FP32 (×)", fontsize=8)
    ax.set_title("Speed-up vs accuracy", fontsize=10)
    if trials:
        ax.legend(fontsize=7, frameon=False, loc="best")
    _layout(fig, title=False)
    return Plot("tradeoff", "Speed-up vs accuracy", _png(fig))


def serving(
    target: str, steps: dict[str, Sequence[dict[str, Any]]], slo_p99_ms: float | None, colour: _Palette
) -> Plot:
    """The load tests on one target: p99 (solid, triangles) and p50 (dashed) latency against the offered load,
    one line per model, the SLO's p99 budget as a dotted line; steps that broke the SLO drawn hollow. Right:
    the error rate per step. `steps[model]` are the steps metrics.json keeps (rps, p50_ms, p99_ms, error_rate,
    within_slo)."""
    fig = _figure(9.4, 3.2)
    lat_ax, err_ax = fig.subplots(1, 2)
    for ax in (lat_ax, err_ax):
        _style(ax)
    for model, rows in steps.items():
        rows = sorted((r for r in rows if r.get("rps") is not None), key=lambda r: r["rps"])
        col = colour(model)
        rps = [r["rps"] for r in rows]
        p99 = [r.get("p99_ms") for r in rows]
        lat_ax.plot(rps, [r.get("p50_ms") for r in rows], color=col, linewidth=1.0, linestyle="--")
        lat_ax.plot(rps, p99, color=col, linewidth=1.4, label=model)
        for r, v in zip(rows, p99, strict=True):
            if v is not None:
                face = col if r.get("within_slo") else "none"
                lat_ax.plot(
                    [r["rps"]], [v], marker="^", markersize=6, color=col, markerfacecolor=face, linestyle="none"
                )
        err_ax.plot(rps, [r.get("error_rate") for r in rows], color=col, linewidth=1.4, marker="o", markersize=4)
    if slo_p99_ms is not None:
        lat_ax.axhline(
            slo_p99_ms, color=BASELINE_COLOUR, linewidth=0.9, linestyle=":", label=f"SLO p99 {slo_p99_ms:g} ms"
        )
    lat_ax.set_xlabel("offered load (requests/s)", fontsize=8)
    lat_ax.set_ylabel("latency (ms)", fontsize=8)
    lat_ax.set_title("p99 (solid; hollow: over the SLO) and p50 (dashed)", fontsize=9)
    lat_ax.legend(fontsize=7, frameon=False, loc="upper left")
    err_ax.set_xlabel("offered load (requests/s)", fontsize=8)
    err_ax.set_ylabel("error rate", fontsize=8)
    err_ax.set_title("errors (any non-200, timeouts)", fontsize=9)
    fig.suptitle(f"Latency vs load on {target}, served on 127.0.0.1", fontsize=10)
    _layout(fig)
    return Plot(f"serving-{target}", f"Serving on {target}", _png(fig))


def _layout(fig: Figure, title: bool = True) -> None:
    """Margins in inches, turned into the figure fractions subplots_adjust takes (a layout engine costs more)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(
        left=0.7 / w, right=1 - 0.15 / w, bottom=0.55 / h, top=1 - (0.6 if title else 0.35) / h, hspace=0.6, wspace=0.3
    )
