"""benchmarks/bench_sdxl.py at tiny size on the CPU (the GPU run's code path), and benchmarks/sdxl_random.py's
SDXL base architecture counted on the meta device (no memory, no weights)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _load_script(path: Path) -> ModuleType:
    sys.path.insert(0, str(path.parent))  # the benchmarks import each other by file name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sdxl_tiny_times_memory_and_attention_shares(tmp_path, capsys):
    bench = _load_script(ROOT / "benchmarks" / "bench_sdxl.py")
    out = tmp_path / "bench.json"
    assert bench.main(["--steps", "2", "--warmup", "1", "--repeats", "1", "--height", "32", "--width", "48",
                       "--output-type", "latent", "--json", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    rows = {row["config"]: row for row in result["results"]}
    assert set(rows) == {"plain", "layout", "naive"} and rows["plain"]["ratio_vs_plain"] == 1.0
    assert rows["plain"]["explicit_attention_calls"] == 0
    # the tiny UNet's 8 cross-attention layers (2 down, 2 mid, 4 up; none at the top level): 30% of 2 steps
    # modulates the first step, 100% both
    assert rows["layout"]["explicit_attention_calls"] == 8 and rows["naive"]["explicit_attention_calls"] == 16
    shares = result["shares"]
    assert len(shares) == 3 * 2 * 2  # configurations x (all steps, first step) x regions
    assert all(s["finite"] and 0 <= s["share"] <= 1 and s["map_size"] == [16, 24] for s in shares)
    first = {(s["config"], s["phrase"]): s["share"] for s in shares if s["steps"] == "first step"}
    assert all(first[("layout", phrase)] > first[("plain", phrase)] for phrase in ("red book", "yellow vase"))
    assert "share of each phrase's cross-attention inside its box" in capsys.readouterr().out


def test_sdxl_random_has_sdxl_base_shapes():
    sdxl_random = _load_script(ROOT / "benchmarks" / "sdxl_random.py")
    components = sdxl_random.sdxl_components("meta")
    assert sdxl_random.parameter_counts(components) == {
        "unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
    }  # fmt: skip
    unet = components["unet"]
    cross = [name for name, module in unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert len(cross) == 70 and not any(name.startswith(("down_blocks.0", "up_blocks.2")) for name in cross)
    assert unet.config.sample_size * 2 ** (len(components["vae"].config.block_out_channels) - 1) == 1024
    assert math.isclose(components["vae"].config.scaling_factor, 0.13025)
