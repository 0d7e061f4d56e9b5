"""The human study (evaluation.human): the ranking page's embedded data, a rater's JSON as the page's script
builds it, validation, and the alignment numbers with bootstrap CIs."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import PIL.Image
import pytest

from realign_pipeline.evaluation.human import (
    alignment_from_rankings,
    write_alignment_table,
    write_study_page,
)

CONFIGS = ["sd15", "realigndiff", "promptist"]
PROMPTS = ["a red book", "a green bench", "a blue car", "a white cat", "a dog </script> on a mat"]


@pytest.fixture()
def folders(tmp_path):
    out = []
    for c, name in enumerate(CONFIGS):
        folder = tmp_path / name
        (folder / "images").mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"name": name}))
        lines = []
        for i, prompt in enumerate(PROMPTS):
            arr = np.random.default_rng(10 * c + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            PIL.Image.fromarray(arr).save(folder / "images" / f"{i:05d}.png")
            lines.append(json.dumps({"index": i, "prompt": prompt, "file": f"images/{i:05d}.png", "config": name}))
        (folder / "manifest.rank0.jsonl").write_text("\n".join(lines) + "\n")
        out.append(folder)
    return out


def embedded(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="study-data">(.*?)</script>', page, re.DOTALL)
    return json.loads(m.group(1))


def rater_json(data: dict, rater: str, ranks_shown: dict[int, list[int]]) -> dict:
    """What the page's download() builds: per item, the shown positions sorted by the ranks chosen."""
    rankings = []
    for i, item in enumerate(data["items"]):
        if i not in ranks_shown:
            continue
        pairs = sorted(zip(ranks_shown[i], item["order"]))
        rankings.append({"prompt_index": item["prompt_index"], "ranking": [name for _, name in pairs]})
    return {"rater": rater, "study_id": data["study_id"], "rankings": rankings}


def test_page_is_self_contained_and_hides_the_mapping(folders, tmp_path):
    path = write_study_page(folders, tmp_path / "study.html", seed=3)
    page = path.read_text()
    data = embedded(page)
    assert data["configs"] == CONFIGS and len(data["items"]) == 5
    assert [it["prompt_index"] for it in data["items"]] == [0, 1, 2, 3, 4]
    assert all(sorted(it["order"]) == sorted(CONFIGS) for it in data["items"])
    assert len({tuple(it["order"]) for it in data["items"]}) > 1  # shuffled per prompt
    # every image is embedded, at the shown position the data says
    for i, it in enumerate(data["items"]):
        positions = [page.index(base64.b64encode((tmp_path / name / "images" / f"{i:05d}.png").read_bytes()).decode())
                     for name in it["order"]]
        assert positions == sorted(positions)
    visible = re.sub(r"<script.*?</script>", "", page, flags=re.DOTALL)
    assert not any(name in visible for name in CONFIGS)  # the mapping is never displayed
    assert "src=\"http" not in page and "download()" in page
    # seeded: the same page again, another seed another order
    assert embedded(write_study_page(folders, tmp_path / "again.html", seed=3).read_text()) == data
    assert embedded(write_study_page(folders, tmp_path / "other.html", seed=4).read_text())["items"] != data["items"]
    sub = embedded(write_study_page(folders, tmp_path / "sub.html", num_prompts=2, seed=3).read_text())
    assert len(sub["items"]) == 2 and sub["study_id"] != data["study_id"]


def test_round_trip_and_confidence_intervals(folders, tmp_path):
    data = embedded(write_study_page(folders, tmp_path / "study.html", seed=1).read_text())
    answers = tmp_path / "answers"
    answers.mkdir()
    # two raters: realigndiff always first, sd15 always last
    truth = {"realigndiff": 1, "promptist": 2, "sd15": 3}
    for rater in ("ann", "bob"):
        ranks = {i: [truth[name] for name in it["order"]] for i, it in enumerate(data["items"])}
        (answers / f"{rater}.json").write_text(json.dumps(rater_json(data, rater, ranks)))
    result = alignment_from_rankings(answers, n_boot=500, seed=0)
    assert result["num_rankings"] == 10 and result["num_raters"] == 2 and result["study_id"] == data["study_id"]
    best = result["configs"]["realigndiff"]
    assert best["first_share"] == 1.0 and best["first_share_ci"] == [1.0, 1.0]
    assert best["mean_rank"] == 1.0 and best["mean_rank_ci"] == [1.0, 1.0]
    assert result["configs"]["sd15"]["mean_rank"] == 3.0 and result["configs"]["sd15"]["first_share"] == 0.0

    # a mixed third rater: promptist first on 2 of 5 prompts -> shares and CIs that contain them
    ranks = {i: [({"promptist": 1, "realigndiff": 2, "sd15": 3} if i < 2 else truth)[n] for n in it["order"]]
             for i, it in enumerate(data["items"])}
    (answers / "cat.json").write_text(json.dumps(rater_json(data, "cat", ranks)))
    result = alignment_from_rankings(answers, n_boot=1000, seed=0)
    r = result["configs"]["realigndiff"]
    assert r["first_share"] == pytest.approx(13 / 15) and r["mean_rank"] == pytest.approx(17 / 15)
    lo, hi = r["first_share_ci"]
    assert 0.5 < lo < 13 / 15 < hi <= 1.0
    assert alignment_from_rankings(answers, n_boot=1000, seed=0) == result  # seeded

    files = write_alignment_table(result, tmp_path / "out")
    md = files["alignment_md"].read_text()
    assert md.index("| realigndiff |") < md.index("| promptist |") < md.index("| sd15 |")
    assert "86.7%" in md and json.loads(files["alignment_json"].read_text()) == result


def test_partial_rankings_and_validation(folders, tmp_path):
    data = embedded(write_study_page(folders, tmp_path / "study.html").read_text())
    ok = rater_json(data, "ann", {0: [1, 2, 3]})  # a rater who ranked one prompt only
    good = tmp_path / "good.json"
    good.write_text(json.dumps(ok))
    assert alignment_from_rankings([good], n_boot=10)["num_rankings"] == 1

    def bad(name, doc, match):
        path = tmp_path / name
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(ValueError, match=match):
            alignment_from_rankings([good, path], n_boot=10)

    bad("broken.json", "{", r"broken\.json: not a JSON")
    bad("keys.json", {"rater": "x"}, r"keys\.json: expected an object")
    bad("dup.json", {**ok, "rankings": [{"prompt_index": 0, "ranking": ["sd15", "sd15", "promptist"]}]},
        r"dup\.json: rankings\[0\].*distinct")
    bad("other.json", {**ok, "rankings": [{"prompt_index": 0, "ranking": ["sd15", "x", "promptist"]}]},
        r"other\.json: rankings\[0\]: ranks")
    bad("study.json", {**ok, "study_id": "nope"}, r"study\.json: study_id 'nope' differs")
    bad("twice.json", {**ok, "rankings": ok["rankings"] * 2}, r"twice\.json: rankings\[1\].*twice")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        alignment_from_rankings([tmp_path / "missing.json"])
