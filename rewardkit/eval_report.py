"""Files of a benchmark evaluation: ``results.json``, ``scores.csv`` and a self-contained ``report.html``.

Written by ``recipes/evaluate.py`` from ``rewardkit.integrations.evaluation.run_evaluation`` results (and
usable with any rows of the same shape). A *row* is a dict with ``index``, ``prompt``, ``seed``, ``path``
and one float per score column; NaN / ``None`` mean "not scored" and are counted, never averaged.

The page reuses ``rewardkit.report`` (the annotated thumbnail grid, the sortable image table, its CSS
and JavaScript) and adds the set metrics, per-score summary statistics, per-score histograms and an
optional training curve, drawn as inline SVG (no plotting dependency; the SVG shapes follow the W3C
SVG 1.1 ``rect`` / ``polyline`` / ``text`` elements).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rewardkit import report as _report
from rewardkit.errors import check_images

__all__ = ["KEY_COLUMNS", "save_png", "summarize_scores", "histogram_svg", "curve_svg", "before_after_svg",
           "summary_text",
           "write_results_json", "write_scores_csv", "write_eval_report", "MAX_REPORT_IMAGES"]

KEY_COLUMNS = ("index", "prompt", "seed", "path")  # the non-score columns of every row, in this order
MAX_REPORT_IMAGES = 64  # thumbnails embedded in report.html; every row is in scores.csv
HISTOGRAM_MAX_BINS = 20
_UINT8_MAX = 255
_SVG_WIDTH, _SVG_HEIGHT, _SVG_MARGIN = 320, 140, 24  # px
_BAR_COLOUR, _LINE_COLOUR = "#4a78b5", "#c0504d"
_BEFORE_COLOUR, _AFTER_COLOUR = "#9e9e9e", "#4a78b5"
_CSS = (".plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}"
        "figcaption{font-size:90%;color:#555}svg text{font:10px sans-serif}")


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one image ``(3, H, W)`` float in ``[0, 1]`` as an 8-bit RGB PNG, ``round(255 x)`` per value.

    The rounding equals the set metrics' ``quantize=True`` step, so statistics of the saved files equal
    statistics of the tensors.
    """
    from PIL import Image

    check_images("save_png", image[None] if isinstance(image, torch.Tensor) else image)
    pixels = (image.detach().float().cpu() * _UINT8_MAX).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path, format="PNG")
    return path


def _finite(rows: Sequence[Mapping[str, Any]], name: str) -> tuple[list[float], int]:
    """``(finite values, count of NaN / inf / None cells)`` of one column."""
    values = [_report._as_float(row.get(name)) for row in rows]
    kept = [v for v in values if math.isfinite(v)]
    return kept, len(values) - len(kept)


def summarize_scores(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{name: {"mean", "std", "min", "max", "n", "nan"}}`` over the finite scores of each column.

    ``std`` is the sample standard deviation (``n - 1``), NaN below 2 finite scores; ``nan`` counts the
    rows that were not scored (NaN, inf or ``None``). Mean / min / max / n come from ``report.summarize``.
    """
    summary = _report.summarize(rows, names)
    for name in names:
        values, missing = _finite(rows, name)
        mean = summary[name]["mean"]
        variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else math.nan
        summary[name].update(std=math.sqrt(variance), nan=missing)
    return summary


def _json_safe(value: Any) -> Any:
    """NaN / inf -> ``None`` (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results_json(path: str | Path, *, rows: Sequence[Mapping[str, Any]], score_names: Sequence[str],
                       set_metrics: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any] | None = None,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"config", "num_images", "summary", "set_metrics", **extra}`` as strict JSON (NaN -> null)."""
    payload = {"config": dict(config or {}), "num_images": len(rows), "summary": summarize_scores(rows, score_names),
               "set_metrics": {k: dict(v) for k, v in set_metrics.items()}, **dict(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False, default=str) + "\n", encoding="utf-8")
    return path


def write_scores_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], score_names: Sequence[str]) -> Path:
    """One CSV row per image: ``index, prompt, seed, path`` then every score (empty cell = not scored)."""
    return _report.write_scores([dict(row) for row in rows], score_names, Path(path), key_columns=KEY_COLUMNS)


def histogram_svg(values: Sequence[float], name: str, max_bins: int = HISTOGRAM_MAX_BINS) -> str:
    """An inline SVG histogram of the finite ``values`` (``min(max_bins, ceil(sqrt(n)))`` equal bins)."""
    finite = [v for v in values if math.isfinite(v)]
    esc = html.escape
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" height="{_SVG_HEIGHT}" role="img">'
    if not finite:
        return head + f'<text x="{_SVG_MARGIN}" y="{_SVG_HEIGHT // 2}">{esc(name)}: no finite scores</text></svg>'
    low, high = min(finite), max(finite)
    bins = max(1, min(max_bins, math.ceil(math.sqrt(len(finite))))) if high > low else 1  # one value: one bin
    width = (high - low) / bins or 1.0
    counts = [0] * bins
    for value in finite:
        counts[min(int((value - low) / width), bins - 1)] += 1
    plot_w, plot_h = _SVG_WIDTH - 2 * _SVG_MARGIN, _SVG_HEIGHT - 2 * _SVG_MARGIN
    bar_w, top = plot_w / bins, max(counts)
    bars = "".join(
        f'<rect x="{_SVG_MARGIN + i * bar_w:.1f}" y="{_SVG_MARGIN + plot_h * (1 - c / top):.1f}" '
        f'width="{max(bar_w - 1, 1):.1f}" height="{plot_h * c / top:.1f}" fill="{_BAR_COLOUR}"><title>{c}</title></rect>'
        for i, c in enumerate(counts))
    labels = (f'<text x="{_SVG_MARGIN}" y="{_SVG_HEIGHT - 6}">{low:.4g}</text>'
              f'<text x="{_SVG_WIDTH - _SVG_MARGIN}" y="{_SVG_HEIGHT - 6}" text-anchor="end">{high:.4g}</text>'
              f'<text x="{_SVG_MARGIN}" y="14">{esc(name)} (n={len(finite)}, max count {top})</text>')
    return head + bars + labels + "</svg>"


def curve_svg(history: Sequence[Mapping[str, Any]], key: str, step_key: str = "step") -> str:
    """An inline SVG line of ``key`` against ``step_key`` over the history rows that hold a finite value."""
    points = [(float(r[step_key]), _report._as_float(r.get(key))) for r in history if step_key in r]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" height="{_SVG_HEIGHT}" role="img">'
    if not points:
        return head + f'<text x="{_SVG_MARGIN}" y="{_SVG_HEIGHT // 2}">{html.escape(key)}: no values</text></svg>'
    (s_lo, s_hi), (v_lo, v_hi) = [(min(a), max(a)) for a in zip(*points)]
    plot_w, plot_h = _SVG_WIDTH - 2 * _SVG_MARGIN, _SVG_HEIGHT - 2 * _SVG_MARGIN
    xy = " ".join(f"{_SVG_MARGIN + plot_w * (s - s_lo) / ((s_hi - s_lo) or 1):.1f},"
                  f"{_SVG_MARGIN + plot_h * (1 - (v - v_lo) / ((v_hi - v_lo) or 1)):.1f}" for s, v in points)
    labels = (f'<text x="{_SVG_MARGIN}" y="14">{html.escape(key)}: {v_lo:.4g} .. {v_hi:.4g}</text>'
              f'<text x="{_SVG_MARGIN}" y="{_SVG_HEIGHT - 6}">step {s_lo:g}</text>'
              f'<text x="{_SVG_WIDTH - _SVG_MARGIN}" y="{_SVG_HEIGHT - 6}" text-anchor="end">{s_hi:g}</text>')
    return head + f'<polyline fill="none" stroke="{_LINE_COLOUR}" stroke-width="2" points="{xy}"/>' + labels + "</svg>"


def before_after_svg(name: str, before: float, after: float) -> str:
    """An inline SVG of two bars, ``before`` and ``after`` (e.g. a mean score before and after training).

    The bars start at the smaller value minus half the gap (so a small change stays visible) and the
    axis floor is printed; a non-finite value is drawn as "n/a".
    """
    head = f'<svg xmlns="http://www.w3.org/2000/svg" width="{_SVG_WIDTH}" height="{_SVG_HEIGHT}" role="img">'
    title = f'<text x="{_SVG_MARGIN}" y="14">{html.escape(name)}: before -> after</text>'
    values = [float(before), float(after)]
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return head + title + f'<text x="{_SVG_MARGIN}" y="{_SVG_HEIGHT // 2}">n/a</text></svg>'
    low, high = min(finite), max(finite)
    floor = low - max(high - low, abs(high) * 1e-3, 1e-12) / 2  # bars of unequal, non-zero height
    plot_w, plot_h = _SVG_WIDTH - 2 * _SVG_MARGIN, _SVG_HEIGHT - 2 * _SVG_MARGIN - 12
    bar_w = plot_w / 4
    shapes = []
    for i, (label, value, colour) in enumerate((("before", values[0], _BEFORE_COLOUR),
                                                 ("after", values[1], _AFTER_COLOUR))):
        x = _SVG_MARGIN + plot_w * (0.125 + 0.5 * i)
        if not math.isfinite(value):
            shapes.append(f'<text x="{x:.1f}" y="{_SVG_HEIGHT // 2}">{label}: n/a</text>')
            continue
        height = plot_h * (value - floor) / ((high - floor) or 1.0)
        top = _SVG_MARGIN + 12 + plot_h - height
        shapes.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{bar_w:.1f}" height="{height:.1f}" fill="{colour}">'
                      f"<title>{value:.6g}</title></rect>"
                      f'<text x="{x:.1f}" y="{top - 2:.1f}">{value:.4f}</text>'
                      f'<text x="{x:.1f}" y="{_SVG_HEIGHT - 6}">{label}</text>')
    axis = f'<text x="{_SVG_WIDTH - _SVG_MARGIN}" y="{_SVG_HEIGHT - 6}" text-anchor="end">floor {floor:.4g}</text>'
    return head + title + "".join(shapes) + axis + "</svg>"


def _before_after_section(before_after: Mapping[str, tuple[float, float]] | None) -> str:
    if not before_after:
        return ""
    rows = "".join(f"<tr><td>{html.escape(name)}</td>{_cell(b)}{_cell(a)}{_cell(float(a) - float(b))}</tr>"
                   for name, (b, a) in before_after.items())
    table = (f'<table class="sortable"><thead><tr><th>score</th><th>before</th><th>after</th><th>change</th></tr>'
             f"</thead><tbody>{rows}</tbody></table>")
    plots = "".join(f"<figure>{before_after_svg(name, b, a)}</figure>" for name, (b, a) in before_after.items())
    return (f"<h2>Before vs after training</h2>\n<p>Mean scores on the same prompts and seeds, before the first "
            f"training step and after the last.</p>\n{table}\n<div class=\"plots\">{plots}</div>\n")


def _cell(value: Any) -> str:
    number = _report._as_float(value)
    data = repr(number) if math.isfinite(number) else ""
    return f'<td class="num" data-value="{data}">{_report._format(value)}</td>'


def _summary_table(summary: Mapping[str, Mapping[str, float]]) -> str:
    header = "".join(f"<th>{h}</th>" for h in ("score", "mean", "std", "min", "max", "n", "not scored"))
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(_cell(s[k]) for k in ("mean", "std", "min", "max"))
                   + f'<td class="num">{s["n"]}</td><td class="num">{s["nan"]}</td></tr>' for name, s in summary.items())
    return f'<table class="sortable"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


def _set_metric_table(set_metrics: Mapping[str, Mapping[str, Any]]) -> str:
    if not set_metrics:
        return "<p>No set metrics.</p>"
    header = "".join(f"<th>{h}</th>" for h in ("metric", "value", "std", "n", "n reference", "preset", "extractor"))
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>{_cell(m.get('value'))}{_cell(m.get('std'))}"
        f'<td class="num">{m.get("n")}</td><td class="num">{m.get("n_reference")}</td>'
        f"<td>{html.escape(str(m.get('preset')))}</td><td>{html.escape(str(m.get('extractor')))}</td></tr>"
        for name, m in set_metrics.items())
    return f'<table class="sortable"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>'


def _image_sections(rows: Sequence[Mapping[str, Any]], names: Sequence[str], title: str, max_images: int) -> str:
    """The annotated grid (one PNG) and the sortable image table of the first ``max_images`` saved images."""
    shown = [row for row in rows if row.get("path")][:max_images]
    if not shown:
        return "<h2>Images</h2>\n<p>No images were saved.</p>\n"
    paths = [Path(row["path"]) for row in shown]
    thumbs = _report._thumbnails(paths)
    grid = _report._png_base64(_report._grid(shown, thumbs, names, title))
    note = f"<p>Showing {len(shown)} of {len(rows)} images; every row is in scores.csv.</p>\n"
    return (f'<h2>Image grid</h2>\n{note}<img class="grid" src="data:image/png;base64,{grid}" alt="image grid">\n'
            f"<h2>Images</h2>\n<p>Click a column header to sort.</p>\n"
            + _report._image_table(shown, thumbs, paths, names) + "\n")


def _html(rows: Sequence[Mapping[str, Any]], names: Sequence[str], set_metrics: Mapping[str, Mapping[str, Any]],
          history: Sequence[Mapping[str, Any]] | None, title: str, max_images: int,
          before_after: Mapping[str, tuple[float, float]] | None = None) -> str:
    esc = html.escape
    histograms = "".join(f"<figure>{histogram_svg(_finite(rows, n)[0], n)}</figure>" for n in names)
    curve = ""
    if history:
        keys = sorted({k for r in history for k in r if k != "step"})
        curve = "<h2>Training curve</h2>\n<div class=\"plots\">" + "".join(
            f"<figure>{curve_svg(history, k)}</figure>" for k in keys) + "</div>\n"
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_report._CSS}{_CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n"
            f"<p>{len(rows)} images.</p>\n{_before_after_section(before_after)}"
            f"<h2>Set metrics</h2>\n{_set_metric_table(set_metrics)}\n"
            f"<h2>Summary</h2>\n{_summary_table(summarize_scores(rows, names))}\n"
            f'<h2>Histograms</h2>\n<div class="plots">{histograms}</div>\n{curve}'
            + _image_sections(rows, names, title, max_images)
            + f"<script>{_report._SORT_JS}</script>\n</body></html>\n")


def summary_text(rows: Sequence[Mapping[str, Any]], score_names: Sequence[str],
                 set_metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table of the summary and the set metrics (what the recipe prints)."""
    lines = [f"{'score':<24}{'mean':>12}{'std':>12}{'min':>12}{'max':>12}{'n':>6}{'nan':>6}"]
    for name, s in summarize_scores(rows, score_names).items():
        lines.append(f"{name:<24}" + "".join(f"{_report._format(s[k]):>12}" for k in ("mean", "std", "min", "max"))
                     + f"{s['n']:>6}{s['nan']:>6}")
    for name, m in set_metrics.items():
        std = f" +- {m['std']:.4f}" if m.get("std") is not None else ""
        lines.append(f"{name:<24}{_report._format(m['value']):>12}{std}  (n={m['n']}, reference n={m['n_reference']}, "
                     f"preset={m['preset']})")
    return "\n".join(lines)


def write_eval_report(out_dir: str | Path, rows: Sequence[Mapping[str, Any]], score_names: Sequence[str],
                      set_metrics: Mapping[str, Mapping[str, Any]] | None = None, *,
                      config: Mapping[str, Any] | None = None, history: Sequence[Mapping[str, Any]] | None = None,
                      title: str = "rewardkit evaluation", max_images: int = MAX_REPORT_IMAGES,
                      extra: Mapping[str, Any] | None = None,
                      before_after: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Path]:
    """Write ``results.json``, ``scores.csv`` and ``report.html`` into ``out_dir``.

    Args:
        out_dir: folder (created if missing).
        rows: one row per image (see module docstring); images are read from ``row["path"]`` for the page.
        score_names: the score columns, in display order.
        set_metrics: ``{name: {"value", "std", "n", "n_reference", "preset", "extractor"}}``.
        config: the run's configuration, stored in ``results.json``.
        history: optional training-log rows ``{"step": int, key: float, ...}``, drawn as curves.
        title: page heading.
        max_images: thumbnails embedded in the page.
        extra: more top-level ``results.json`` entries.
        before_after: optional ``{score: (before, after)}`` means (e.g. before and after training, on the same
            prompts and seeds), shown first as a table and a pair of bars per score.

    Returns:
        ``{"results": path, "scores": path, "report": path}``.

    Raises:
        ValueError: no rows, or a row without a score column.
    """
    if not rows:
        raise ValueError("write_eval_report got no rows; evaluate at least one image first")
    missing = sorted({name for row in rows for name in score_names if name not in row})
    if missing:
        raise ValueError(f"write_eval_report: rows lack score columns {missing}; give every row every column "
                         "(NaN for an image that could not be scored)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_metrics = dict(set_metrics or {})
    paths = {"results": write_results_json(out / "results.json", rows=rows, score_names=score_names,
                                           set_metrics=set_metrics, config=config, extra=extra),
             "scores": write_scores_csv(out / "scores.csv", rows, score_names),
             "report": out / "report.html"}
    paths["report"].write_text(_html(rows, score_names, set_metrics, history, title, max_images, before_after),
                               encoding="utf-8")
    return paths
