"""The evaluation report of several scored result folders (one per configuration): the paper's Table 1
layout (``table.md`` / ``table.json``), a bar chart per metric, the image grid of Figure 3 (``grid.png``) and
a self-contained ``grid.html``, plus the comparison rows from the literature (:data:`LITERATURE`).

Charts use matplotlib when it is installed (the ``eval`` extra) and plain Pillow bars otherwise, so a report
never fails for want of a plotting library.
"""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps

from .score import read_results

__all__ = [
    "LITERATURE",
    "LOWER_IS_BETTER",
    "METRIC_LABELS",
    "METRIC_ORDER",
    "bar_chart",
    "image_grid",
    "match_images",
    "write_report",
]

#: Column order of the table (metrics not listed here follow, alphabetically).
METRIC_ORDER = (
    "shapes_presence", "shapes_binding", "shapes_binding_fraction", "shapes_position",
    "clip", "negclip", "blip_itm", "blip_itc", "caption_reward", "blip_vqa", "fid", "timings",
)
#: Metrics where a lower value is better.
LOWER_IS_BETTER = frozenset({"fid", "timings"})
METRIC_LABELS = {
    "clip": "CLIP (cos)",
    "negclip": "NegCLIP (cos)",
    "blip_itm": "BLIP-2 ITM",
    "blip_itc": "BLIP-2 ITC",
    "caption_reward": "Caption reward",
    "blip_vqa": "BLIP-VQA",
    "fid": "FID",
    "timings": "Time/image (s)",
    "shapes_presence": "Presence",
    "shapes_binding": "Binding",
    "shapes_binding_fraction": "Binding (fraction)",
    "shapes_position": "Position",
}

#: Published numbers for comparison, from the papers (not measured here): benchmark -> model -> column.
#: T2I-CompBench scores colour/shape/texture with BLIP-VQA, spatial with UniDet, non-spatial with CLIPScore;
#: GenEval's overall score comes from its own detector-based evaluator.
LITERATURE: dict[str, dict[str, Any]] = {
    "t2icompbench": {
        "title": "T2I-CompBench (val)",
        "rows": {"SD v1.5": {"color": 0.3750, "shape": 0.3724, "texture": 0.4159, "spatial": 0.1204,
                             "non-spatial": 0.3088}},
        # our comparable metric per column (None: not computed by this package)
        "ours": {"color": "blip_vqa", "shape": "blip_vqa", "texture": "blip_vqa", "spatial": None,
                 "non-spatial": "clip"},
        "note": "ours: BLIP-VQA is an approximation of the LAVIS-based evaluator; spatial needs UniDet (not "
                "implemented); non-spatial uses the CLIP model named in metrics.json.",
    },
    "geneval": {
        "title": "GenEval",
        "rows": {"SD v1.5": {"overall": 0.43}},
        "ours": {"overall": None},
        "note": "GenEval's score comes from its own object-detector evaluator (run it on the GenEval folder "
                "layout); it is not computed here.",
    },
}


# --- reading ------------------------------------------------------------------------------------------------


def _read_scored(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no metrics.json: score it first (score_folder)")
    scored = json.loads(path.read_text(encoding="utf-8"))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    name = config.get("name") or scored.get("config") or folder.name
    return {"config": str(name), "prompt_set": scored.get("prompt_set"), "num_images": scored.get("num_images"),
            "metrics": scored.get("metrics", {}), "settings": config, "folder": str(folder)}


def match_images(result_folders: Sequence[str | Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(config names, rows)`` for the prompts all folders share, matched by manifest ``index`` (the first
    image of each index, in file order): each row ``{"index", "prompt", "seed", "files": [Path per config]}``."""
    names, per_folder = [], []
    for folder in map(Path, result_folders):
        config, entries = read_results(folder)
        names.append(str(config["name"]))
        first: dict[int, dict[str, Any]] = {}
        for e in entries:
            first.setdefault(int(e["index"]), {**e, "path": folder / e["file"]})
        per_folder.append(first)
    common = sorted(set.intersection(*(set(f) for f in per_folder))) if per_folder else []
    rows = [
        {"index": i, "prompt": str(per_folder[0][i]["prompt"]), "seed": per_folder[0][i].get("seed"),
         "files": [f[i]["path"] for f in per_folder]}
        for i in common
    ]
    return names, rows


# --- table --------------------------------------------------------------------------------------------------


def _value(entry: dict[str, Any] | None) -> float | None:
    if not entry:
        return None
    v = entry.get("mean", entry.get("value"))
    return float(v) if isinstance(v, (int, float)) and not math.isnan(float(v)) else None


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if metric in ("fid", "timings") else f"{v:.4f}"


def _ci(entry: dict[str, Any] | None) -> tuple[float, float] | None:
    """``(ci_low, ci_high)`` of a metrics.json entry, ``None`` when it has none (FID, older files)."""
    if not entry:
        return None
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if not all(isinstance(v, (int, float)) and not math.isnan(float(v)) for v in (low, high)):
        return None
    return float(low), float(high)


def _cell(metric: str, entry: dict[str, Any] | None) -> str:
    """``mean`` or, with a CI, ``mean [low, high]``."""
    text = _fmt(metric, _value(entry))
    ci = _ci(entry)
    if ci is None or text == "—":
        return text
    return f"{text} [{_fmt(metric, ci[0])}, {_fmt(metric, ci[1])}]"


def _columns(results: list[dict[str, Any]], metrics: Sequence[str] | None) -> list[str]:
    if metrics is not None:
        return [str(m) for m in metrics]
    present = {m for r in results for m in r["metrics"]}
    return [m for m in METRIC_ORDER if m in present] + sorted(present - set(METRIC_ORDER))


def _best(results: list[dict[str, Any]], columns: list[str]) -> dict[str, dict[str, list[str]]]:
    """prompt set -> metric -> the configuration(s) with the best value (ties all listed)."""
    best: dict[str, dict[str, list[str]]] = {}
    for ps in dict.fromkeys(str(r["prompt_set"]) for r in results):
        group = [r for r in results if str(r["prompt_set"]) == ps]
        best[ps] = {}
        for m in columns:
            vals = [(r["config"], _value(r["metrics"].get(m))) for r in group]
            vals = [(c, v) for c, v in vals if v is not None]
            if not vals:
                continue
            target = (min if m in LOWER_IS_BETTER else max)(v for _, v in vals)
            best[ps][m] = [c for c, v in vals if v == target]
    return best


def _literature(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The literature sections whose benchmark is among the results' prompt sets."""
    sections = []
    for bench, lit in LITERATURE.items():
        cols = [c for c in next(iter(lit["rows"].values()))
                if any(_bench_column(r["prompt_set"], bench) == c for r in results)]
        if not cols:
            continue
        ours: dict[str, dict[str, float | None]] = {}
        for r in results:
            col = _bench_column(r["prompt_set"], bench)
            if col in cols:
                metric = lit["ours"].get(col)
                ours.setdefault(r["config"], {})[col] = _value(r["metrics"].get(metric)) if metric else None
        sections.append({"benchmark": bench, "title": lit["title"], "columns": cols,
                         "literature": {k: {c: v[c] for c in cols} for k, v in lit["rows"].items()},
                         "ours": ours, "ours_metric": {c: lit["ours"].get(c) for c in cols}, "note": lit["note"]})
    return sections


def _bench_column(prompt_set: Any, bench: str) -> str | None:
    ps = str(prompt_set or "").lower().replace("_", "-")
    if bench == "geneval":
        return "overall" if ps == "geneval" else None
    if bench == "t2icompbench" and ps.startswith("t2icompbench-"):
        return ps.removeprefix("t2icompbench-")
    return None


def _markdown(results, columns, best, literature) -> str:
    arrow = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in columns}
    lines = ["# Evaluation report", ""]
    for ps, marks in best.items():
        lines += [f"## Prompt set: {ps}", ""]
        lines.append("| configuration | images | " + " | ".join(f"{METRIC_LABELS.get(m, m)} {arrow[m]}" for m in columns) + " |")
        lines.append("|---|---:|" + "---:|" * len(columns))
        for r in (r for r in results if str(r["prompt_set"]) == ps):
            cells = []
            for m in columns:
                text = _fmt(m, _value(r["metrics"].get(m)))
                bold = f"**{text}**" if r["config"] in marks.get(m, []) else text
                cells.append(_cell(m, r["metrics"].get(m)).replace(text, bold, 1))
            lines.append(f"| {r['config']} | {r['num_images']} | " + " | ".join(cells) + " |")
        models = {m: r["metrics"][m].get("model") for r in results if str(r["prompt_set"]) == ps
                  for m in columns if m in r["metrics"] and r["metrics"][m].get("model")}
        lines.append("")
        if models:
            lines += ["Models: " + "; ".join(f"{METRIC_LABELS.get(m, m)}: `{v}`" for m, v in models.items()), ""]
    lines.append("Best value per column in **bold** (within a prompt set; lower is better for FID and time).")
    if any(_ci(r["metrics"].get(m)) for r in results for m in columns):
        levels = sorted({float(r["metrics"][m].get("confidence") or 0.95) for r in results for m in columns
                         if _ci(r["metrics"].get(m))})
        lines.append(f"`mean [low, high]`: the {'/'.join(f'{c:.0%}' for c in levels)} percentile-bootstrap CI of "
                     "the mean (prompts resampled, their seeds kept together).")
    lines.append("")
    for sec in literature:
        lines += [f"## From the literature: {sec['title']}", ""]
        lines.append("| model | source | " + " | ".join(sec["columns"]) + " |")
        lines.append("|---|---|" + "---:|" * len(sec["columns"]))
        for model, vals in sec["literature"].items():
            lines.append(f"| {model} | literature | " + " | ".join(f"{vals[c]:.4f}" for c in sec["columns"]) + " |")
        for config, vals in sec["ours"].items():
            cells = [_fmt("", vals.get(c)) if c in vals else "—" for c in sec["columns"]]
            lines.append(f"| {config} | ours | " + " | ".join(cells) + " |")
        lines += ["", sec["note"], ""]
    return "\n".join(lines)


# --- pictures -----------------------------------------------------------------------------------------------

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font():
    return PIL.ImageFont.load_default()


def _pillow_bars(labels: list[str], values: list[float | None], title: str, path: Path,
                 size: tuple[int, int] = (640, 360)) -> None:
    w, h = size
    im = PIL.Image.new("RGB", size, "white")
    d = PIL.ImageDraw.Draw(im)
    font = _font()
    d.text((10, 8), title, fill="black", font=font)
    left, right, top, bottom = 50, w - 20, 40, h - 60
    finite = [v for v in values if v is not None]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    if hi == lo:
        hi = lo + 1.0

    def y(v: float) -> float:
        return bottom - (v - lo) / (hi - lo) * (bottom - top)

    d.line([(left, top), (left, bottom)], fill="black")
    d.line([(left, y(0.0)), (right, y(0.0))], fill="black")
    d.text((4, top), f"{hi:.3g}", fill="black", font=font)
    d.text((4, bottom - 10), f"{lo:.3g}", fill="black", font=font)
    n = max(len(values), 1)
    slot = (right - left) / n
    for i, (label, v) in enumerate(zip(labels, values)):
        x0, x1 = left + i * slot + slot * 0.15, left + (i + 1) * slot - slot * 0.15
        if v is not None:
            d.rectangle([x0, min(y(v), y(0.0)), x1, max(y(v), y(0.0))], fill=_PALETTE[i % len(_PALETTE)])
            d.text((x0, min(y(v), y(0.0)) - 12), f"{v:.4g}", fill="black", font=font)
        d.text((x0, bottom + 6), textwrap.shorten(label, width=max(int(slot / 6), 4), placeholder="…"),
               fill="black", font=font)
    im.save(path)


def bar_chart(labels: list[str], values: list[float | None], title: str, path: str | Path) -> Path:
    """A bar chart PNG (matplotlib when installed, else Pillow); ``None`` values are left empty."""
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _pillow_bars(labels, values, title, path)
        return path
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    xs = list(range(len(labels)))
    ax.bar(xs, [v if v is not None else 0.0 for v in values],
           color=[tuple(c / 255 for c in _PALETTE[i % len(_PALETTE)]) for i in xs])
    ax.set_xticks(xs, labels, rotation=20, ha="right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def image_grid(names: list[str], rows: list[dict[str, Any]], path: str | Path, cell: int = 192,
               label_width: int = 220, header: int = 32) -> Path:
    """Figure 3: rows = prompts, columns = configurations (each image fitted into ``cell`` x ``cell``)."""
    path = Path(path)
    w, h = label_width + cell * len(names), header + cell * len(rows)
    grid = PIL.Image.new("RGB", (w, h), "white")
    d = PIL.ImageDraw.Draw(grid)
    font = _font()
    for j, name in enumerate(names):
        d.text((label_width + j * cell + 6, 10), textwrap.shorten(name, width=max(cell // 7, 4), placeholder="…"),
               fill="black", font=font)
    for i, row in enumerate(rows):
        y0 = header + i * cell
        text = textwrap.wrap(f"{row['index']}: {row['prompt']}", width=max(label_width // 7, 8))
        d.multiline_text((6, y0 + 6), "\n".join(text[: max(cell // 14, 1)]), fill="black", font=font)
        for j, file in enumerate(row["files"]):
            with PIL.Image.open(file) as im:
                thumb = PIL.ImageOps.contain(im.convert("RGB"), (cell - 4, cell - 4))
            grid.paste(thumb, (label_width + j * cell + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2))
    grid.save(path)
    return path


def _grid_html(names: list[str], rows: list[dict[str, Any]], path: Path) -> Path:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
    out = ["<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>Image grid</title>',
           ("<style>body{font-family:sans-serif} td,th{padding:4px;vertical-align:top} img{max-width:256px}"
            " td.p{max-width:260px}</style></head><body>"),
           "<h1>Image grid</h1><table><tr><th>prompt</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"]
    for row in rows:
        seed = f" (seed {row['seed']})" if row.get("seed") is not None else ""
        cells = []
        for name, file in zip(names, row["files"]):
            data = base64.b64encode(Path(file).read_bytes()).decode("ascii")
            kind = mime.get(Path(file).suffix.lower(), "image/png")
            cells.append(f'<td><img alt="{html.escape(name)}" src="data:{kind};base64,{data}"></td>')
        out.append(f'<tr><td class="p">{row["index"]}: {html.escape(row["prompt"])}{seed}</td>' + "".join(cells) + "</tr>")
    out.append("</table></body></html>")
    path.write_text("\n".join(out), encoding="utf-8")
    return path


# --- the report ---------------------------------------------------------------------------------------------


def write_report(
    result_folders: Sequence[str | Path],
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    grid_rows: int | None = 16,
    cell: int = 192,
) -> dict[str, Path]:
    """Write the report of scored result folders into ``out_dir``; returns ``{kind: path}``: ``table_md``,
    ``table_json``, ``chart_<metric>`` per metric, and ``grid_png`` / ``grid_html`` when the folders share
    prompts (the first ``grid_rows`` shared indices; ``None``: all).

    ``metrics``: the columns (default: every metric found, in :data:`METRIC_ORDER`)."""
    folders = [Path(f) for f in result_folders]
    if not folders:
        raise ValueError("write_report needs at least one result folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [_read_scored(f) for f in folders]
    columns = _columns(results, metrics)
    best = _best(results, columns)
    literature = _literature(results)
    files: dict[str, Path] = {}

    table = {
        "columns": columns,
        "labels": {m: METRIC_LABELS.get(m, m) for m in columns},
        "lower_is_better": [m for m in columns if m in LOWER_IS_BETTER],
        "rows": [{"config": r["config"], "prompt_set": r["prompt_set"], "num_images": r["num_images"],
                  "folder": r["folder"], "values": {m: _value(r["metrics"].get(m)) for m in columns},
                  "ci": {m: (list(c) if (c := _ci(r["metrics"].get(m))) else None) for m in columns},
                  "metrics": {m: r["metrics"][m] for m in columns if m in r["metrics"]}} for r in results],
        "best": best,
        "literature": literature,
    }
    files["table_md"] = out / "table.md"
    files["table_md"].write_text(_markdown(results, columns, best, literature), encoding="utf-8")
    files["table_json"] = out / "table.json"
    files["table_json"].write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")

    several_sets = len(best) > 1
    labels = [f"{r['config']} [{r['prompt_set']}]" if several_sets else r["config"] for r in results]
    for m in columns:
        values = [_value(r["metrics"].get(m)) for r in results]
        files[f"chart_{m}"] = bar_chart(labels, values, f"{METRIC_LABELS.get(m, m)}", out / f"chart_{m}.png")

    try:
        names, rows = match_images(folders)
    except (FileNotFoundError, ValueError) as error:
        warnings.warn(f"no image grid: {error}", stacklevel=2)
        return files
    if grid_rows is not None:
        rows = rows[:grid_rows]
    if rows:
        files["grid_png"] = image_grid(names, rows, out / "grid.png", cell=cell)
        files["grid_html"] = _grid_html(names, rows, out / "grid.html")
    else:
        warnings.warn("no image grid: the folders share no prompt index", stacklevel=2)
    return files
