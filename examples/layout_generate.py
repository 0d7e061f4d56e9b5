"""Generate an image with a hand-written layout (which phrase of the prompt goes where).

    python examples/layout_generate.py                       # SD v1.5 on a GPU (downloads the weights once)
    python examples/layout_generate.py --layout my.json      # your own layout (Layout.to_json format)
    python examples/layout_generate.py --tiny --out /tmp/x   # tiny RANDOM offline model: noise, checks the code path

Writes ``realigned.png``, ``plain.png`` (same seed, no layout) and ``layout.json`` to ``--out``.
"""

import argparse
import os
import tempfile

import torch

from realign_pipeline import Layout, RealignDiffPipeline, Region


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--prompt", default="a red book and a yellow vase")
    parser.add_argument("--layout", help="a layout JSON file; default: the two boxes below")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512, help="height and width in pixels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/layout_generate")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("REALIGNDIFF_EXAMPLES_TINY") == "1",
                        help="use tiny random offline components (or set REALIGNDIFF_EXAMPLES_TINY=1)")
    args = parser.parse_args(argv)

    if args.tiny:  # a tiny random SD-1-style model saved to a folder, loaded like a real one
        from realign_pipeline.testing import tiny_pipeline

        folder = tempfile.mkdtemp(prefix="tiny-sd-")
        tiny_pipeline(save_dir=folder)
        args.model, args.steps, args.size, args.device = folder, 4, 32, "cpu"

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = RealignDiffPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)

    if args.layout:
        layout = Layout.from_json(args.layout)
    else:
        layout = Layout([
            Region("red book", box=[0.05, 0.35, 0.45, 0.95]),  # [x0, y0, x1, y1], fractions of the image
            Region("yellow vase", box=[0.55, 0.15, 0.95, 0.95]),
        ])

    def generate(**kwargs):
        generator = torch.Generator(args.device).manual_seed(args.seed)  # same seed -> same initial noise
        return pipe(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                    generator=generator, **kwargs).images[0]

    os.makedirs(args.out, exist_ok=True)
    generate().save(os.path.join(args.out, "plain.png"))
    generate(layout=layout).save(os.path.join(args.out, "realigned.png"))
    layout.to_json(os.path.join(args.out, "layout.json"))
    print(f"wrote plain.png, realigned.png, layout.json to {args.out}")


if __name__ == "__main__":
    main()
