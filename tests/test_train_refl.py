"""training/train_refl.py on tiny models, offline (32x32, T=4, gradient step in [2, 4))."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from realign_pipeline.testing import BrightnessReward, image_text_pairs
from realign_pipeline.training.data import DataError, load_pairs, load_prompts
from realign_pipeline.training.refl import (
    draw_grad_step,
    hinge_reward_loss,
    predict_x0,
    refl_latents,
    refl_step_loss,
)

ROOT = Path(__file__).resolve().parents[1]


def _load_script(path: Path) -> ModuleType:
    """A script that is not part of the package (``training/``, ``benchmarks/``), imported from its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_refl = _load_script(ROOT / "training" / "train_refl.py")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_sd_dir):
    root = tmp_path_factory.mktemp("refl")
    (root / "tiny-sd").symlink_to(tiny_sd_dir, target_is_directory=True)  # the session's folder, only read
    (root / "pairs").mkdir()
    (root / "pairs" / "broken.png").write_bytes(b"not a png")
    bad_rows = [
        {"file_name": "missing.png", "text": "gone"},
        {"file_name": "broken.png", "text": "unreadable"},
        {"file_name": "0.png", "text": "  "},
    ]
    image_text_pairs(root / "pairs", 4, extra_rows=bad_rows)
    (root / "prompts.txt").write_text("a red cube\na blue ball on a table\n\ntwo cats\n")
    return root


def _tiny_run_argv(assets, out, batch_size: int) -> list[str]:
    """Flags every test run shares: the tiny model and data, the test reward, 32 px, T = 4, gradient in [2, 4)."""
    return [
        "--pretrained_model_name_or_path", str(assets / "tiny-sd"),
        "--output_dir", str(out),
        "--train_data_dir", str(assets / "pairs"),
        "--prompts_file", str(assets / "prompts.txt"),
        "--reward_class", "realign_pipeline.testing.training:BrightnessReward",
        "--resolution", "32",
        "--center_crop",
        "--train_batch_size", str(batch_size),
        "--num_inference_steps", "4",
        "--grad_step_range", "2", "4",
    ]


def _args(assets, out, *extra):
    return train_refl.parse_args(
        [
            *_tiny_run_argv(assets, out, batch_size=2),
            "--learning_rate",
            "1e-3",
            "--seed",
            "0",
            "--report_to",
            "none",
            "--checkpointing_steps",
            "1000",
            "--reward_margin",
            "1.0",
            "--reward_weight",
            "1.0",
            *extra,
        ]
    )


def _unet_images(pipe):
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    return pipe(
        "a red cube", num_inference_steps=2, height=32, width=32, generator=g, output_type="np"
    ).images


# ----------------------------------------------------------------------------------------------- step math
def test_unet_receives_scheduler_timestep_not_index():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    seen = []

    class FakeUNet:
        def __call__(self, x, t, encoder_hidden_states):
            seen.append((int(t), torch.is_grad_enabled()))
            return type("O", (), {"sample": x * 0.1})()

    x = torch.randn(1, 4, 8, 8, requires_grad=False)
    out = refl_latents(
        FakeUNet(), scheduler, x, torch.zeros(1, 3, 8), num_inference_steps=4, grad_step=2
    )
    ts = [int(t) for t in scheduler.timesteps]
    assert ts[2] != 2 and out.timestep == ts[2] and out.grad_step == 2
    assert seen == [(ts[0], False), (ts[1], False), (ts[2], True)]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_predict_x0_matches_scheduler(kind):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(num_train_timesteps=1000, prediction_type=kind, clip_sample=False)
    s.set_timesteps(10)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = s.timesteps[3]
    expected = s.step(out, t, x).pred_original_sample
    torch.testing.assert_close(predict_x0(s, out, t, x), expected, rtol=1e-5, atol=1e-5)


def test_hinge_and_eq5():
    obj = torch.tensor([0.5, 2.0])
    assert hinge_reward_loss(obj, 1.0, 1e-3).item() == pytest.approx(1e-3 * 0.25)
    assert refl_step_loss(torch.tensor(1.0), torch.tensor(2.0), 0.5).item() == 2.0
    assert refl_step_loss(torch.tensor(1.0), torch.tensor(2.0), 0.0).item() == 1.0
    g = torch.Generator().manual_seed(0)
    draws = {draw_grad_step((30, 50), 50, g) for _ in range(400)}
    assert min(draws) == 30 and max(draws) == 49


# ------------------------------------------------------------------------------------------------- errors
def test_missing_column_or_dataset_is_clear_error_before_model_load(assets, tmp_path):
    # the model path does not exist: an error about the data proves no model was loaded first
    base = [
        "--pretrained_model_name_or_path",
        str(tmp_path / "no-model"),
        "--output_dir",
        str(tmp_path / "o"),
        "--prompts_file",
        str(assets / "prompts.txt"),
    ]
    with pytest.raises(DataError, match="--caption_column 'caption'"):
        train_refl.main(
            train_refl.parse_args(
                base + ["--train_data_dir", str(assets / "pairs"), "--caption_column", "caption"]
            )
        )
    with pytest.raises(DataError, match="--image_column 'img'"):
        train_refl.main(
            train_refl.parse_args(base + ["--train_data_dir", str(assets / "pairs"), "--image_column", "img"])
        )
    with pytest.raises(DataError, match="does not exist"):
        train_refl.main(train_refl.parse_args(base + ["--train_data_dir", str(tmp_path / "nope")]))
    with pytest.raises(SystemExit):  # L_pre on (default) without pairs: argparse error
        train_refl.parse_args(base)
    with pytest.raises(SystemExit, match="bitsandbytes|GPU"):
        train_refl.main(
            train_refl.parse_args(base + ["--train_data_dir", str(assets / "pairs"), "--use_8bit_adam"])
        )


class _Records(logging.Handler):
    """Keeps every record it is handed (diffusers' loggers do not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# ------------------------------------------------------------------------------------------ end to end
def test_lora_run_writes_loadable_weights_that_change_output(assets, tmp_path):
    from realign_pipeline import RealignDiffPipeline

    out = tmp_path / "lora"
    records = _Records()
    logging.getLogger("diffusers").addHandler(records)
    try:
        stats = train_refl.main(
            _args(assets, out, "--use_lora", "--rank", "4", "--max_train_steps", "3", "--validation_prompts", "a red cube")
        )
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert stats["global_step"] == 3 and stats["skipped_nonfinite"] == 0
    # no diffusers warning about casting a model to the dtype it already has
    assert not [r for r in records.records if "should be kept in float32" in r.getMessage()]
    assert all(np.isfinite(r["loss"]) and r["loss_pre"] > 0 for r in stats["losses"])
    curve = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [1, 2, 3]
    assert [r["objective"] for r in curve] == [r["objective"] for r in stats["losses"]]
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(assets / "tiny-sd", subfolder="scheduler")
    sched.set_timesteps(4)
    allowed = {int(sched.timesteps[2]), int(sched.timesteps[3])}  # values, not the indices 2 and 3
    assert all(
        r["grad_timestep"] in allowed and r["grad_timestep"] == int(sched.timesteps[r["grad_step_index"]])
        for r in stats["losses"]
    )
    # 3 steps x 2 rows = 6 good rows from 4 good + 3 bad: the bad ones were met and counted
    assert stats["skipped_rows"] >= 3
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "reward_weight | 1.0" in card and "validation/step3_0_0.png" in card
    assert (out / "validation" / "step3_0_0.png").is_file()

    pipe = RealignDiffPipeline.from_pretrained(
        assets / "tiny-sd", safety_checker=None, requires_safety_checker=False
    )
    before = _unet_images(pipe)
    pipe.load_lora_weights(out)
    after = _unet_images(pipe)
    assert np.abs(after - before).max() > 1e-4


def test_full_finetune_writes_loadable_pipeline(assets, tmp_path):
    from realign_pipeline import RealignDiffPipeline

    out = tmp_path / "full"
    stats = train_refl.main(
        _args(
            assets,
            out,
            "--max_train_steps",
            "2",
            "--use_ema",
            "--ema_decay",
            "0.5",
            "--gradient_checkpointing",
            "--vae_gradient_checkpointing",
        )
    )
    assert stats["global_step"] == 2
    assert all(np.isfinite(r["loss"]) for r in stats["losses"])
    base = RealignDiffPipeline.from_pretrained(
        assets / "tiny-sd", safety_checker=None, requires_safety_checker=False
    )
    tuned = RealignDiffPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert isinstance(tuned, RealignDiffPipeline)
    assert np.abs(_unet_images(tuned) - _unet_images(base)).max() > 1e-4
    assert "full UNet fine-tuning + EMA" in (out / "README.md").read_text()


def test_resume_after_kill_matches_uninterrupted_run(assets, tmp_path):
    from safetensors.torch import load_file

    extra = [
        "--use_lora",
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "2",
        "--lr_scheduler",
        "linear",
        "--checkpoints_total_limit",
        "2",
    ]
    ref = train_refl.main(_args(assets, tmp_path / "ref", *extra))

    class Killed(Exception):
        pass

    def kill(step):
        if step == 5:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train_refl.main(_args(assets, out, *extra), step_callback=kill)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "train_state.json").read_text())
    assert state["global_step"] == 4 and state["data"]["0"]["prompts"]["offset"] > 0

    resumed = train_refl.main(_args(assets, out, *extra, "--resume_from_checkpoint", "latest"))
    assert resumed["global_step"] == 6 and len(resumed["losses"]) == 2
    assert [r["lr"] for r in resumed["losses"]] == pytest.approx([r["lr"] for r in ref["losses"][4:]])
    assert [r["loss"] for r in resumed["losses"]] == pytest.approx(
        [r["loss"] for r in ref["losses"][4:]], rel=1e-4
    )
    a, b = (
        load_file(tmp_path / "ref" / "pytorch_lora_weights.safetensors"),
        load_file(out / "pytorch_lora_weights.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_nonfinite_loss_skips_step_and_is_counted(assets, tmp_path, monkeypatch, caplog):
    out = tmp_path / "nan"
    reward = BrightnessReward(nan_on_call=2)
    stats = train_refl.main(
        _args(assets, out, "--use_lora", "--max_train_steps", "3", "--pretrain_loss_weight", "0"),
        reward=reward,
    )
    assert stats["global_step"] == 3 and stats["skipped_nonfinite"] == 1
    assert [r["skipped_nonfinite"] for r in stats["losses"]] == [0, 1, 1]
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(out / "pytorch_lora_weights.safetensors").values())
    assert "L_pre is off" in caplog.text


def test_push_to_hub_uses_stubbed_api(assets, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "me/refl-lora"

    monkeypatch.setattr(
        huggingface_hub, "create_repo", lambda **kw: calls.setdefault("create", kw) and Repo()
    )
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    out = tmp_path / "hub"
    stats = train_refl.main(
        _args(
            assets,
            out,
            "--use_lora",
            "--max_train_steps",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "me/refl-lora",
        )
    )
    assert calls["create"]["repo_id"] == "me/refl-lora"
    assert calls["upload"]["repo_id"] == "me/refl-lora" and calls["upload"]["folder_path"] == str(out)
    assert stats["hub_repo_id"] == "me/refl-lora"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_process_accelerate_launch(assets, tmp_path):
    out = tmp_path / "ddp"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),  # not the default 29500, which another run on the machine may hold
        str(ROOT / "training" / "train_refl.py"),
        *_tiny_run_argv(assets, out, batch_size=1),
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--use_lora",
        "--seed",
        "0",
        "--report_to",
        "none",
    ]
    # its own process group: on a timeout the launcher and both ranks are ended, not only the launcher
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"accelerate launch timed out after 240 s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    state = json.loads((out / "checkpoint-2" / "train_state.json").read_text())
    assert set(state["data"]) == {"0", "1"}
    assert json.loads((out / "train_stats.json").read_text())["effective_batch"] == 2


def test_clip_reward_through_load_reward(assets, tiny_clip_dir, tmp_path):
    """--reward clip --reward_model_path <tiny CLIP folder>: the script's own reward path, no test reward."""
    args = _args(assets, tmp_path / "clip-run", "--use_lora", "--max_train_steps", "1")
    args.reward_class, args.reward, args.reward_model_path = None, "clip", str(tiny_clip_dir)
    stats = train_refl.main(args)
    assert stats["global_step"] == 1 and np.isfinite(stats["losses"][0]["objective"])
    assert -1.0 <= stats["losses"][0]["objective"] <= 1.0


def test_dataset_name_local_folder(assets, tmp_path):
    """--dataset_name through `datasets` (an imagefolder on disk, offline); a bad column is a clear error."""
    import datasets  # noqa: F401  (a dev dependency: the test must run, not skip)
    data = tmp_path / "hf"
    data.mkdir()
    rows = []
    for k in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * k, dtype=np.uint8)).save(data / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "text": f"grey {k}" if k else ""})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = _args(assets, tmp_path / "hf-run", "--use_lora", "--max_train_steps", "2")
    args.train_data_dir, args.dataset_name = None, str(data)
    stats = train_refl.main(args)
    assert stats["global_step"] == 2 and stats["skipped_rows"] >= 1  # the empty caption
    args.caption_column = "caption"
    with pytest.raises(DataError, match="--caption_column 'caption' not in dataset"):
        train_refl.main(args)


def test_bench_refl_smoke(tmp_path):
    bench_refl = _load_script(ROOT / "benchmarks" / "bench_refl.py")
    result = bench_refl.main(["--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    assert set(result["configs"]) == {"lora", "full"}
    lora, full = result["configs"]["lora"], result["configs"]["full"]
    assert 0 < lora["trainable_params"] < full["trainable_params"]
    assert lora["drawn_grad_steps"] == full["drawn_grad_steps"]
    assert json.loads((tmp_path / "b.json").read_text())["shape"] == "tiny"


def test_full_finetune_with_ema_resumes(assets, tmp_path):
    out = tmp_path / "full-resume"
    extra = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--use_ema", "--ema_decay", "0.5"]
    first = train_refl.main(_args(assets, out, *extra))
    assert first["global_step"] == 2
    assert (out / "checkpoint-2" / "unet" / "config.json").is_file()
    assert (out / "checkpoint-2" / "unet_ema" / "config.json").is_file()
    args = _args(assets, out, *extra, "--resume_from_checkpoint", "latest")
    args.max_train_steps = 3
    resumed = train_refl.main(args)
    assert resumed["global_step"] == 3 and len(resumed["losses"]) == 1
    assert np.isfinite(resumed["losses"][0]["loss"])


def test_prompts_dataset_through_datasets(assets, tmp_path):
    import datasets  # noqa: F401  (a dev dependency: the test must run, not skip)
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "\n".join(json.dumps({"caption": c}) for c in ["a green frog", "", "a small house"])
    )
    args = _args(assets, tmp_path / "pd", "--use_lora", "--max_train_steps", "1")
    args.prompts_file, args.prompts_dataset, args.prompts_column = None, str(folder), "caption"
    assert load_prompts(args, load_pairs(args)) == ["a green frog", "a small house"]
    assert train_refl.main(args)["global_step"] == 1
    args.prompts_column = "text"
    with pytest.raises(DataError, match="--prompts_column 'text'"):
        train_refl.main(args)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_accumulation_guided_rollout_and_precision(assets, tmp_path, precision):
    stats = train_refl.main(
        _args(
            assets,
            tmp_path / precision,
            "--use_lora",
            "--max_train_steps",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--rollout_guidance_scale",
            "3.0",
            "--mixed_precision",
            precision,
        )
    )
    assert stats["global_step"] == 2 and stats["micro_step"] == 4 and stats["effective_batch"] == 4
    assert all(np.isfinite(r["loss"]) for r in stats["losses"])
