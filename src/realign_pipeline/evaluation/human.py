"""The human study (the paper's Alignment column): a static ranking page and the analysis of its answers.

:func:`write_study_page` writes one self-contained HTML file (images embedded): per prompt, the images of
the configurations in a seeded random order, labelled A, B, C ... only. The shown-position -> configuration
mapping sits in the page's embedded JSON (``<script type="application/json" id="study-data">``), never
displayed. A rater gives each image a rank (1 = best aligned with the prompt) and downloads a JSON file::

    {"rater": "...", "study_id": "...", "rankings": [{"prompt_index": 3, "ranking": ["cfgB", "cfgA", ...]}]}

:func:`alignment_from_rankings` reads such files and gives per configuration the average rank and the share
of first places, with seeded 95% bootstrap confidence intervals (resampling the rankings);
:func:`write_alignment_table` writes them as markdown and JSON.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import match_images

__all__ = ["alignment_from_rankings", "read_rankings", "write_alignment_table", "write_study_page"]

_JS = r"""
const data = JSON.parse(document.getElementById("study-data").textContent);
function collect() {
  const rankings = [], problems = [];
  data.items.forEach((item, i) => {
    const ranks = item.order.map((_, k) => document.getElementById(`r${i}_${k}`).value);
    if (ranks.every(r => r === "")) return;
    const nums = ranks.map(Number);
    if (ranks.some(r => r === "") || new Set(nums).size !== nums.length) { problems.push(i + 1); return; }
    const order = item.order.map((name, k) => [nums[k], name]).sort((a, b) => a[0] - b[0]);
    rankings.push({prompt_index: item.prompt_index, ranking: order.map(p => p[1])});
  });
  return {rankings, problems};
}
function download() {
  const rater = document.getElementById("rater").value.trim();
  if (!rater) { alert("Please enter your name or rater id."); return; }
  const {rankings, problems} = collect();
  if (problems.length) { alert("Give every image of a prompt a different rank. Check prompt(s): " + problems.join(", ")); return; }
  const blob = new Blob([JSON.stringify({rater, study_id: data.study_id, rankings}, null, 1)], {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `ranking_${data.study_id}_${rater.replace(/[^A-Za-z0-9_-]/g, "_")}.json`;
  a.click();
}
"""


def _data_uri(path: Path) -> str:
    kind = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(path.suffix.lower(), "image/png")
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_study_page(
    result_folders: Sequence[str | Path],
    out_path: str | Path,
    num_prompts: int | None = None,
    seed: int = 0,
    title: str = "Which image matches the prompt best?",
) -> Path:
    """Write the ranking page for the prompts the folders share (matched by manifest index; a seeded random
    ``num_prompts`` of them, in index order, or all). The image order per prompt is shuffled with
    ``random.Random(seed)``; the page's embedded data holds ``study_id``, the configuration names and, per
    prompt, ``prompt_index``, ``prompt`` and ``order`` (configuration shown at each position)."""
    names, rows = match_images(result_folders)
    if len(set(names)) != len(names):
        raise ValueError(f"the configurations need distinct names, got {names}")
    if len(names) < 2:
        raise ValueError("a ranking study needs at least two configurations")
    if not rows:
        raise ValueError("the result folders share no prompt index")
    rng = random.Random(seed)
    if num_prompts is not None and num_prompts < len(rows):
        rows = sorted(rng.sample(rows, num_prompts), key=lambda r: r["index"])
    items = []
    for row in rows:
        order = list(range(len(names)))
        rng.shuffle(order)
        items.append({"prompt_index": row["index"], "prompt": row["prompt"], "order": [names[k] for k in order],
                      "files": [row["files"][k] for k in order]})
    key = json.dumps([names, [it["prompt_index"] for it in items], [it["order"] for it in items], seed])
    study_id = hashlib.sha1(key.encode()).hexdigest()[:12]
    data = {"study_id": study_id, "configs": names, "seed": seed,
            "items": [{k: it[k] for k in ("prompt_index", "prompt", "order")} for it in items]}
    letters = [chr(ord("A") + k) if k < 26 else f"#{k + 1}" for k in range(len(names))]
    body = []
    for i, it in enumerate(items):
        cells = []
        for k, file in enumerate(it["files"]):
            options = '<option value="">rank</option>' + "".join(
                f'<option value="{r}">{r}</option>' for r in range(1, len(names) + 1))
            cells.append(f'<figure><img src="{_data_uri(Path(file))}" alt="image {letters[k]}">'
                         f'<figcaption>{letters[k]} <select id="r{i}_{k}">{options}</select></figcaption></figure>')
        body.append(f'<section><h2>{i + 1}. {html.escape(it["prompt"])}</h2><div class="row">{"".join(cells)}</div></section>')
    blob = json.dumps(data).replace("</", "<\\/")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}} .row{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0}} img{{width:256px;height:auto;display:block}} section{{border-bottom:1px solid #ccc;padding:8px 0}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>For each prompt, rank the images by how well they match the prompt: 1 = best. Give every image a different
rank. Prompts left entirely unranked are skipped. When done, enter your name and download your answers.</p>
<p>Rater: <input id="rater"> <button onclick="download()">Download my rankings (JSON)</button></p>
{"".join(body)}
<p><button onclick="download()">Download my rankings (JSON)</button></p>
<script type="application/json" id="study-data">{blob}</script>
<script>{_JS}</script>
</body></html>
"""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


# --- answers ------------------------------------------------------------------------------------------------


def _files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such ranking file or folder: {p}")
    if not files:
        raise ValueError(f"no ranking files (*.json) in {items}")
    return files


def read_rankings(paths: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """Read and validate rating files (a folder of ``*.json``, a file, or a list of them): every file must be
    ``{"rater": str, "study_id": str, "rankings": [{"prompt_index": int, "ranking": [names]}]}``, from one
    study, each ranking a permutation of the same configurations. Errors name the file and the problem."""
    out = []
    configs: set[str] | None = None
    study: tuple[str, Path] | None = None
    for f in _files(paths):
        try:
            doc = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{f}: not a JSON file ({error})") from error
        if not isinstance(doc, dict) or not {"rater", "study_id", "rankings"} <= set(doc):
            raise ValueError(f"{f}: expected an object with 'rater', 'study_id' and 'rankings'")
        if not isinstance(doc["rankings"], list):
            raise ValueError(f"{f}: 'rankings' must be a list")  # noqa: TRY004 (one error type for bad files)
        if study is None:
            study = (str(doc["study_id"]), f)
        elif str(doc["study_id"]) != study[0]:
            raise ValueError(f"{f}: study_id {doc['study_id']!r} differs from {study[0]!r} of {study[1]}")
        seen: set[int] = set()
        for n, r in enumerate(doc["rankings"]):
            where = f"{f}: rankings[{n}]"
            if not isinstance(r, dict) or not isinstance(r.get("prompt_index"), int) or not isinstance(r.get("ranking"), list):
                raise ValueError(f"{where}: expected {{'prompt_index': int, 'ranking': [configuration names]}}")  # noqa: TRY004
            ranking = r["ranking"]
            if not all(isinstance(c, str) for c in ranking) or len(set(ranking)) != len(ranking) or len(ranking) < 2:
                raise ValueError(f"{where}: the ranking must list at least two distinct configuration names, got {ranking}")
            if configs is None:
                configs = set(ranking)
            elif set(ranking) != configs:
                raise ValueError(f"{where}: ranks {sorted(ranking)}, other rankings rank {sorted(configs)}")
            if r["prompt_index"] in seen:
                raise ValueError(f"{where}: prompt_index {r['prompt_index']} is ranked twice by this rater")
            seen.add(r["prompt_index"])
        out.append({"file": str(f), "rater": str(doc["rater"]), "study_id": str(doc["study_id"]),
                    "rankings": doc["rankings"]})
    if configs is None:
        raise ValueError(f"no rankings in {[d['file'] for d in out]}")
    return out


def alignment_from_rankings(
    paths: str | Path | Sequence[str | Path],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Per configuration: ``mean_rank`` (1 = best) and ``first_share`` (share of rankings where it came
    first), each with a percentile bootstrap CI (``*_ci``: ``[low, high]``; ``n_boot`` resamples of the
    rankings with replacement, ``numpy.random.default_rng(seed)``)."""
    docs = read_rankings(paths)
    rankings = [r["ranking"] for d in docs for r in d["rankings"]]
    configs = sorted(rankings[0])
    ranks = np.array([[rk.index(c) + 1 for c in configs] for rk in rankings], dtype=np.float64)  # (R, C)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(ranks), size=(n_boot, len(ranks)))
    boot_mean = ranks[idx].mean(axis=1)  # (B, C)
    boot_first = (ranks[idx] == 1).mean(axis=1)
    q = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    per = {}
    for j, c in enumerate(configs):
        per[c] = {
            "mean_rank": float(ranks[:, j].mean()),
            "mean_rank_ci": [float(v) for v in np.percentile(boot_mean[:, j], q)],
            "first_share": float((ranks[:, j] == 1).mean()),
            "first_share_ci": [float(v) for v in np.percentile(boot_first[:, j], q)],
        }
    return {"configs": per, "num_rankings": len(rankings), "num_raters": len({d["rater"] for d in docs}),
            "num_files": len(docs), "study_id": docs[0]["study_id"], "n_boot": n_boot, "seed": seed,
            "confidence": confidence}


def write_alignment_table(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """``alignment.md`` and ``alignment.json`` of :func:`alignment_from_rankings`' result (best first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pct = round(result["confidence"] * 100)
    lines = [
        "# Human study: alignment", "",
        (f"{result['num_rankings']} rankings by {result['num_raters']} rater(s), study `{result['study_id']}`; "
         f"{pct}% bootstrap CIs ({result['n_boot']} resamples, seed {result['seed']})."), "",
        f"| configuration | average rank ↓ | {pct}% CI | first place ↑ | {pct}% CI |",
        "|---|---:|---|---:|---|",
    ]
    for c, v in sorted(result["configs"].items(), key=lambda kv: kv[1]["mean_rank"]):
        lo, hi = v["mean_rank_ci"]
        flo, fhi = v["first_share_ci"]
        lines.append(f"| {c} | {v['mean_rank']:.2f} | [{lo:.2f}, {hi:.2f}] | {v['first_share']:.1%} | "
                     f"[{flo:.1%}, {fhi:.1%}] |")
    files = {"alignment_md": out / "alignment.md", "alignment_json": out / "alignment.json"}
    files["alignment_md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    files["alignment_json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return files
