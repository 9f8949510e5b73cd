"""Outputs of per-image scores: JSONL / CSV files, an annotated image grid (PNG) and a sortable HTML page.

Used by ``rewardkit score`` and ``rewardkit demo`` (and available to anyone holding score rows). A *row* is a dict with
``"image"``, ``"prompt"`` and one float (or ``None``) per reward name, as ``rewardkit score`` writes them.
NaN and ``None`` mean "not scored" and are left out of the summary statistics.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["summarize", "write_scores", "write_report", "THUMBNAIL_SIZE"]

THUMBNAIL_SIZE = 160  # px, longest side of a grid / HTML thumbnail
_PAD = 8  # px around cells and text
_LINE = 14  # px per text line with PIL's default font (size 10)
_TITLE_HEIGHT = 28  # px
_MAX_COLUMNS = 8
_BACKGROUND, _CELL, _INK, _MUTED = (255, 255, 255), (238, 238, 238), (20, 20, 20), (90, 90, 90)

_SORT_JS = """
document.querySelectorAll("table.sortable th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], asc = th.dataset.order !== "asc";
  th.dataset.order = asc ? "asc" : "desc";
  const key = r => { const v = r.cells[col].dataset.value ?? r.cells[col].textContent, n = Number(v);
                     return v === "" ? null : (isNaN(n) ? v : n); };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);  // unscored rows last
    const d = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
    return asc ? d : -d; }).forEach(r => body.appendChild(r));
}));
"""
_CSS = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#eee}"
        "table.sortable th{cursor:pointer}td.num{text-align:right;font-family:monospace}")


def _as_float(value: Any) -> float:
    """A score cell as a float; ``None`` (missing) becomes NaN."""
    return math.nan if value is None else float(value)


def summarize(rows: Sequence[dict[str, Any]], reward_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-reward statistics over the finite scores (NaN, inf and ``None`` are left out).

    Args:
        rows: score rows, each holding one value (float or ``None``) per reward name.
        reward_names: the score columns to summarise.

    Returns:
        ``{name: {"mean", "min", "max", "n"}}``; ``n`` counts the finite scores, and mean / min / max are
        NaN when ``n`` is 0.
    """
    summary: dict[str, dict[str, float]] = {}
    for name in reward_names:
        values = [v for v in (_as_float(row.get(name)) for row in rows) if math.isfinite(v)]
        if values:
            summary[name] = {"mean": math.fsum(values) / len(values), "min": min(values), "max": max(values),
                             "n": len(values)}
        else:
            summary[name] = {"mean": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return summary


def write_scores(rows: Sequence[dict[str, Any]], reward_names: Sequence[str], out: Path,
                 key_columns: Sequence[str] = ("image", "prompt")) -> Path:
    """Write rows to ``out`` as JSONL or CSV (by its suffix, ``.jsonl`` / ``.csv``); returns ``out``.

    Columns: ``key_columns`` (``image``, ``prompt``), then one per reward name. NaN / inf scores are written as ``null`` (JSONL)
    or an empty cell (CSV), so that every line is valid JSON.
    """
    clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()} for row in rows]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".jsonl":
        out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in clean), encoding="utf-8")
        return out
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*key_columns, *reward_names])
        writer.writeheader()
        writer.writerows(clean)
    return out


def _format(value: Any) -> str:
    number = _as_float(value)
    return f"{number:.4f}" if math.isfinite(number) else "n/a"


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` cut (with "...") to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _thumbnails(image_paths: Sequence[Path]) -> list[Any]:
    from PIL import ImageOps

    from rewardkit.image_io import load_image

    return [ImageOps.contain(load_image(path), (THUMBNAIL_SIZE, THUMBNAIL_SIZE)) for path in image_paths]


def _grid(rows: Sequence[dict[str, Any]], thumbs: list[Any], reward_names: Sequence[str], title: str) -> Any:
    """The annotated grid: a thumbnail per image with its prompt and scores underneath."""
    from PIL import Image, ImageDraw, ImageFont

    count = len(thumbs)
    columns = max(1, min(count, _MAX_COLUMNS, max(4, math.ceil(math.sqrt(count)))))
    grid_rows = math.ceil(count / columns)
    cell_w = THUMBNAIL_SIZE + 2 * _PAD
    cell_h = THUMBNAIL_SIZE + 2 * _PAD + _LINE * (1 + len(reward_names))
    canvas = Image.new("RGB", (columns * cell_w + _PAD, _TITLE_HEIGHT + grid_rows * cell_h + _PAD), _BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((_PAD, _PAD), _fit(draw, title, font, canvas.width - 2 * _PAD), fill=_INK, font=font)
    for index, (row, thumb) in enumerate(zip(rows, thumbs)):
        left = _PAD + (index % columns) * cell_w
        top = _TITLE_HEIGHT + (index // columns) * cell_h
        draw.rectangle((left, top, left + cell_w - _PAD, top + cell_h - _PAD), fill=_CELL)
        box_left, box_top = left + _PAD // 2, top + _PAD // 2
        canvas.paste(thumb, (box_left + (THUMBNAIL_SIZE - thumb.width) // 2,
                             box_top + (THUMBNAIL_SIZE - thumb.height) // 2))
        text_top = box_top + THUMBNAIL_SIZE + _PAD // 2
        prompt = row.get("prompt") or "(no prompt)"
        draw.text((box_left, text_top), _fit(draw, prompt, font, THUMBNAIL_SIZE), fill=_MUTED, font=font)
        for line, name in enumerate(reward_names, start=1):
            text = _fit(draw, f"{name}: {_format(row.get(name))}", font, THUMBNAIL_SIZE)
            draw.text((box_left, text_top + line * _LINE), text, fill=_INK, font=font)
    return canvas


def _png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _html(rows: Sequence[dict[str, Any]], thumbs: list[Any], image_paths: Sequence[Path],
          reward_names: Sequence[str], title: str) -> str:
    """A self-contained page: summary table plus a sortable table of every image with its scores."""
    esc = html.escape
    stats = summarize(rows, reward_names)
    summary = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f'<td class="num">{_format(s[k])}</td>' for k in ("mean", "min", "max"))
        + f'<td class="num">{s["n"]}</td></tr>' for name, s in stats.items())
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{esc(title)}</h1>\n<h2>Summary</h2>\n"
            '<table><thead><tr><th>reward</th><th>mean</th><th>min</th><th>max</th><th>n</th></tr></thead>'
            f"<tbody>{summary}</tbody></table>\n<h2>Images</h2>\n<p>Click a column header to sort.</p>\n"
            + _image_table(rows, thumbs, image_paths, reward_names)
            + f"\n<script>{_SORT_JS}</script>\n</body></html>\n")


def _image_table(rows: Sequence[dict[str, Any]], thumbs: list[Any], image_paths: Sequence[Path],
                 reward_names: Sequence[str]) -> str:
    """The sortable table of every image (thumbnail, file, prompt, scores); needs ``_SORT_JS`` on the page."""
    esc = html.escape
    header = "".join(f"<th>{esc(h)}</th>" for h in ("#", "image", "file", "prompt", *reward_names))
    body = []
    for index, (row, thumb, path) in enumerate(zip(rows, thumbs, image_paths)):
        cells = [f'<td class="num">{index}</td>',
                 f'<td data-value="{index}"><img src="data:image/png;base64,{_png_base64(thumb)}" alt=""></td>',
                 f"<td>{esc(str(path))}</td>", f"<td>{esc(row.get('prompt') or '')}</td>"]
        for name in reward_names:
            value = _as_float(row.get(name))
            data = repr(value) if math.isfinite(value) else ""
            cells.append(f'<td class="num" data-value="{data}">{_format(value)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable"><thead><tr>{header}</tr></thead><tbody>\n' + "\n".join(body) + "\n</tbody></table>"


def write_report(rows: list[dict], image_paths: list[Path], reward_names: list[str], out_dir: Path,
                 title: str) -> tuple[Path, Path]:
    """Write ``report.png`` (annotated thumbnail grid) and ``report.html`` (sortable table) into ``out_dir``.

    Args:
        rows: one score row per image (``"prompt"`` and one value per reward name), in image order.
        image_paths: the image files, one per row; loaded with ``rewardkit.image_io.load_image``.
        reward_names: the score columns to show, in this order.
        out_dir: folder to write into (created if missing).
        title: heading of both reports.

    Returns:
        ``(png_path, html_path)``.

    Raises:
        ValueError: ``rows`` and ``image_paths`` differ in length, or are empty.
        FileNotFoundError: an image file is missing.
    """
    if len(rows) != len(image_paths):
        raise ValueError(f"write_report got {len(rows)} rows but {len(image_paths)} image paths; give one path per row")
    if not rows:
        raise ValueError("write_report got no rows; score at least one image first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs = _thumbnails(image_paths)
    png_path, html_path = out_dir / "report.png", out_dir / "report.html"
    _grid(rows, thumbs, reward_names, title).save(png_path)
    html_path.write_text(_html(rows, thumbs, image_paths, reward_names, title), encoding="utf-8")
    return png_path, html_path
