"""`realigndiff evaluate run` (`evaluation.run.run_evaluation`): generate, score and report in one command, on a
tiny random Stable Diffusion saved to a folder and a tiny random CLIP, offline."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realign_pipeline.cli import main

PROMPTS = ["a red cube", "a blue ball and a green cone", "two yellow cats"]
SEEDS = (42, 43)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_realign_sd_dir, tiny_clip_dir):
    root = tmp_path_factory.mktemp("run")
    sd, clip = tiny_realign_sd_dir, tiny_clip_dir
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    for name, guidance in (("tiny-a", 7.5), ("tiny-b", 2.0)):
        config = {"name": name, "model": str(sd), "steps": 2, "guidance": guidance, "dtype": "float32"}
        (root / f"{name}.json").write_text(json.dumps(config))
    return root, clip


def _argv(root: Path, clip: Path, out: Path) -> list[str]:
    return ["run", "--config-file", str(root / "tiny-a.json"), str(root / "tiny-b.json"),
            "--prompts", str(root / "prompts.txt"), "--seeds", *map(str, SEEDS), "--metrics", "clip,timings",
            "--model-path", f"clip={clip}", "--device", "cpu", "--out", str(out), "-q"]


@pytest.fixture(scope="module")
def first_run(setup):
    """``realigndiff evaluate run ...`` through the console script's ``main`` in this process (an interpreter
    start-up cost more than the run; the entry point in a fresh process is test_cli.py's
    test_demo_as_a_user_runs_it): its output folder and what it printed."""
    root, clip = setup
    out = root / "out"
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = main(["evaluate", *_argv(root, clip, out)])
    assert code == 0, errors.getvalue()[-3000:]
    return out, printed.getvalue()


def test_layout_of_the_run_folder(first_run):
    out, _ = first_run
    for name in ("tiny-a", "tiny-b"):
        for seed in SEEDS:
            folder = out / name / f"seed{seed}"
            rows = [json.loads(line) for line in (folder / "manifest.rank0.jsonl").read_text().splitlines()]
            assert [r["seed"] for r in rows] == [seed + i for i in range(len(PROMPTS))]
            assert [r["prompt"] for r in rows] == PROMPTS
            assert json.loads((folder / "metrics.json").read_text())["num_images"] == len(PROMPTS)
    for seed in SEEDS:  # the two configurations differ (guidance), the seeds differ
        a = np.asarray(Image.open(out / "tiny-a" / f"seed{seed}" / "images/00000.png"))
        b = np.asarray(Image.open(out / "tiny-b" / f"seed{seed}" / "images/00000.png"))
        assert not np.array_equal(a, b)
    assert (out / "report" / "grid.png").is_file() and (out / "run.json").is_file()


def test_report_has_one_row_per_config_over_all_seeds(first_run):
    out, stdout = first_run
    table = json.loads((out / "report" / "table.json").read_text())
    assert [row["config"] for row in table["rows"]] == ["tiny-a", "tiny-b"]
    assert [row["num_images"] for row in table["rows"]] == [len(PROMPTS) * len(SEEDS)] * 2
    assert table["columns"] == ["clip", "timings"]
    markdown = (out / "report" / "table.md").read_text()
    assert sum(line.startswith("| tiny-a |") for line in markdown.splitlines()) == 2  # Table 1 + seed spread
    assert "## Spread over seeds (42, 43)" in markdown
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("realigndiff evaluate run: 2 configuration(s) x 2 seed(s) x 3 prompt(s): generated 12")
    assert str(out / "report" / "table.md") in last and all(f"{s} " in last for s in ("generate", "score", "report"))


def test_combined_metrics_pool_every_image_of_every_seed(first_run, setup):
    """The combined mean/std equal CLIP scored directly on the 6 images; per-seed means are the seed folders'."""
    from realign_pipeline.evaluation.metrics import ClipScore

    out, _ = first_run
    _, clip = setup
    combined = json.loads((out / "tiny-b" / "metrics.json").read_text())
    assert combined["num_images"] == 6 and combined["seeds"] == list(SEEDS)
    entry = combined["metrics"]["clip"]
    import PIL.Image

    meter = ClipScore.from_pretrained(str(clip), device="cpu")
    for seed in SEEDS:
        images = [PIL.Image.open(out / "tiny-b" / f"seed{seed}" / f"images/{i:05d}.png").convert("RGB")
                  for i in range(len(PROMPTS))]
        meter.update(images, PROMPTS)
    direct = meter.compute()
    assert entry["n"] == 6
    assert entry["mean"] == pytest.approx(direct["mean"], abs=1e-5)
    assert entry["std"] == pytest.approx(direct["std"], abs=1e-5)
    per_seed = [json.loads((out / "tiny-b" / f"seed{s}" / "metrics.json").read_text())["metrics"]["clip"]["mean"]
                for s in SEEDS]
    assert entry["seeds"] == {str(s): pytest.approx(v) for s, v in zip(SEEDS, per_seed)}
    assert entry["seed_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
    assert combined["metrics"]["timings"]["n"] == 6
    seed_entry = json.loads((out / "tiny-b" / "seed42" / "metrics.json").read_text())["metrics"]["clip"]
    # a bootstrap CI over the pooled prompts, not one seed's
    assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
    assert (entry["ci_low"], entry["ci_high"]) != (seed_entry["ci_low"], seed_entry["ci_high"])


def test_rerun_skips_generation_and_scoring(first_run, setup, capsys):
    """Through `python -m realign_pipeline.evaluation run` (in-process): no file of the first run changes."""
    from realign_pipeline.evaluation.__main__ import main as module_main

    out, _ = first_run
    root, clip = setup
    files = sorted(p for p in out.rglob("*") if p.is_file() and "report" not in p.parts and p.name != "run.json"
                   and p.parent.name.startswith("seed"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    assert module_main(_argv(root, clip, out)) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    text = capsys.readouterr().out
    assert "generated 0 image(s), skipped 12 already written" in text


def test_run_resumes_a_cut_manifest_line_then_scores(first_run, setup, tmp_path):
    """A run killed while appending a manifest line: the rerun makes that image again, scores and combines."""
    from realign_pipeline.evaluation.run import run_evaluation

    out, _ = first_run
    root, _ = setup
    seed_folder = tmp_path / "out" / "tiny-a" / "seed42"
    shutil.copytree(out / "tiny-a" / "seed42", seed_folder)  # the first run's folder stays as it is
    manifest = seed_folder / "manifest.rank0.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    with pytest.warns(UserWarning, match="cut short") as caught:
        result = run_evaluation([root / "tiny-a.json"], root / "prompts.txt", tmp_path / "out", ["timings"],
                                seeds=[42], device="cpu", progress=False)
    assert sum("cut short" in str(w.message) for w in caught) == 1  # when the run checks what is written
    assert result["generated"] == 1 and result["skipped"] == 2
    assert [json.loads(line)["index"] for line in manifest.read_text().splitlines()] == [0, 1, 2]
    assert json.loads((seed_folder / "metrics.json").read_text())["metrics"]["timings"]["n"] == 3
    assert json.loads((tmp_path / "out" / "tiny-a" / "metrics.json").read_text())["num_images"] == 3


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_unknown_config_and_metric_are_one_line_errors(setup, tmp_path, capsys):
    root, _ = setup
    base = ["evaluate", "run", "--prompts", str(root / "prompts.txt"), "--out", str(tmp_path / "out")]
    err = _error([*base, "--configs", "sd15,nope"], capsys)
    assert err.startswith("realigndiff evaluate: error: unknown configuration 'nope'; presets: sd15")
    err = _error([*base, "--config-file", str(root / "tiny-a.json"), "--metrics", "clip,bleu"], capsys)
    assert "unknown metric(s) ['bleu']; the names are: clip, negclip" in err
    err = _error([*base, "--configs", "refl"], capsys)
    assert "needs a ReFL checkpoint" in err
    err = _error([*base, "--configs", "sd15", "--lora", "ours=/x"], capsys)
    assert "--lora ours=/x: no configuration named 'ours'" in err
    err = _error([*base, "--config-file", str(root / "tiny-a.json"), str(root / "tiny-a.json")], capsys)
    assert "two configurations are named 'tiny-a'" in err
    err = _error([*base, "--configs", "sd15", "--metrics", "fid"], capsys)
    assert "needs real images" in err
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are checked


def test_configs_and_metrics_lists_and_checkpoint_flags():
    from realign_pipeline.cli import build_parser

    args = build_parser().parse_args(["evaluate", "run", "--configs", "sd15,realign", "refl", "--prompts", "cc500",
                                      "--metrics", "clip", "blip_itm,timings", "--lora", "refl=outputs/l",
                                      "--out", "o"])
    assert [n for g in args.configs for n in g] == ["sd15", "realign", "refl"]
    assert [n for g in args.metrics for n in g] == ["clip", "blip_itm", "timings"]
    assert args.lora == [("refl", "outputs/l")] and args.seeds == [42]


def test_module_entry_point_keeps_generate_as_default(capsys):
    from realign_pipeline.evaluation.__main__ import main as module_main

    with pytest.raises(SystemExit):
        module_main(["--help"])
    assert "--images-per-prompt" in capsys.readouterr().out  # evaluate generate's help
    with pytest.raises(SystemExit):
        module_main(["run", "--help"])
    assert "--config-file" in capsys.readouterr().out
