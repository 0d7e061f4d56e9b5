"""The whole method: ``realign=True`` (coarse image -> dense caption -> layout -> re-aligned image).

The dense captioner tags the coarse image with CLIP, asks an LLM which tags belong to the prompt (the
rule-based one, or any OpenAI-compatible server: OpenAI, vLLM, Ollama), segments each object with Grounding
DINO + SAM, and the image is generated again from the same noise with that layout.

    python examples/realign_generate.py                                 # SD v1.5 + rule-based LLM, GPU
    python examples/realign_generate.py --llm openai --llm-model gpt-4o # OPENAI_API_KEY from the environment
    python examples/realign_generate.py --llm openai --llm-model llama3.1 --base-url http://localhost:11434/v1
    python examples/realign_generate.py --tiny --out /tmp/x             # tiny RANDOM offline models

Writes ``coarse.png``, ``realigned.png`` and ``layout.json`` (the captioned layout) to ``--out``.
"""

import argparse
import os
import tempfile

import torch

from realign_pipeline import Layout, RealignDiffPipeline
from realign_pipeline.captioner import (
    ClipTagger,
    DenseCaptioner,
    GroundingDinoSamGrounder,
    OpenAIChat,
    RuleBasedLLM,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--tagger", default="openai/clip-vit-large-patch14")
    parser.add_argument("--detector", default="IDEA-Research/grounding-dino-tiny")
    parser.add_argument("--segmenter", default="facebook/sam-vit-base")
    parser.add_argument("--llm", choices=["rule", "openai"], default="rule")
    parser.add_argument("--llm-model", default="gpt-4o", help="with --llm openai: the server's model name")
    parser.add_argument("--base-url", default=None, help="with --llm openai: e.g. http://localhost:8000/v1 (vLLM)")
    parser.add_argument("--prompt", default="a red book and a yellow vase")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/realign_generate")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("REALIGNDIFF_EXAMPLES_TINY") == "1",
                        help="use tiny random offline models (or set REALIGNDIFF_EXAMPLES_TINY=1)")
    args = parser.parse_args(argv)

    tagger_kwargs, grounder_kwargs = {}, {}
    if args.tiny:  # tiny random models saved to folders and loaded through from_pretrained, offline
        from realign_pipeline.testing import tiny_clip, tiny_grounding_dino, tiny_pipeline, tiny_sam

        root = tempfile.mkdtemp(prefix="tiny-models-")
        tiny_pipeline(save_dir=os.path.join(root, "sd"))
        args.model = os.path.join(root, "sd")
        args.tagger = str(tiny_clip(os.path.join(root, "clip")))
        args.detector = tiny_grounding_dino(os.path.join(root, "dino"))
        args.segmenter = tiny_sam(os.path.join(root, "sam"))
        args.steps, args.size, args.device = 3, 32, "cpu"
        # random weights score nothing above the real thresholds: keep every candidate
        tagger_kwargs = {"tag_list": ["book", "vase"], "thresholds": 0.0}
        grounder_kwargs = {"box_threshold": 0.0, "text_threshold": 0.0}

    if args.llm == "openai":
        llm = OpenAIChat(model=args.llm_model, base_url=args.base_url)
    else:
        llm = RuleBasedLLM()

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = RealignDiffPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)
    pipe.dense_captioner = DenseCaptioner(
        ClipTagger(args.tagger, device=args.device, **tagger_kwargs),
        llm,
        GroundingDinoSamGrounder(args.detector, args.segmenter, device=args.device, **grounder_kwargs),
    )

    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = pipe(args.prompt, realign=True, num_inference_steps=args.steps, height=args.size, width=args.size,
               generator=generator)

    os.makedirs(args.out, exist_ok=True)
    out.coarse_images[0].save(os.path.join(args.out, "coarse.png"))
    out.images[0].save(os.path.join(args.out, "realigned.png"))
    captioned = out.layouts[0]  # the layout bound to the prompt: regions (masks, scores, phrases), provenance
    Layout(captioned.regions, source=captioned.source).to_json(os.path.join(args.out, "layout.json"))
    print(f"realigned: {out.realigned[0]}; regions:")
    for region in captioned.regions:
        print(f"  {region.phrase!r}  score={region.score}")
    print(f"wrote coarse.png, realigned.png, layout.json to {args.out}")


if __name__ == "__main__":
    main()
