"""Load a ReFL LoRA (trained with ``training/train_refl.py --use_lora``) into ``RealignDiffPipeline``.

    python examples/load_refl_lora.py --lora refl-lora                # a folder written by train_refl.py
    python examples/load_refl_lora.py --lora some-user/some-refl-lora # a Hub id
    python examples/load_refl_lora.py --tiny --out /tmp/x             # tiny RANDOM model and a random LoRA, offline

``load_lora_weights`` is diffusers' own (the pipeline is a ``StableDiffusionPipeline``), so the LoRA
works with and without a layout. Writes ``base.png`` and ``lora.png`` (same seed) to ``--out``.
"""

import argparse
import os
import tempfile

import torch

from realign_pipeline import RealignDiffPipeline


def make_tiny_lora(model_dir: str, lora_dir: str) -> None:
    """A random LoRA on the tiny UNet, saved like train_refl.py saves one (only for --tiny)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = RealignDiffPipeline.from_pretrained(model_dir)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # peft starts lora_B at zero, which would make the adapter a no-op
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    RealignDiffPipeline.save_lora_weights(lora_dir, unet_lora_layers=get_peft_model_state_dict(pipe.unet))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--lora", default="refl-lora", help="a folder or a Hub id with the LoRA weights")
    parser.add_argument("--prompt", default="a red book and a yellow vase")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/load_refl_lora")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("REALIGNDIFF_EXAMPLES_TINY") == "1",
                        help="use a tiny random offline model and LoRA (or set REALIGNDIFF_EXAMPLES_TINY=1)")
    args = parser.parse_args(argv)

    if args.tiny:
        from realign_pipeline.testing import tiny_pipeline

        root = tempfile.mkdtemp(prefix="tiny-lora-")
        args.model, args.lora = os.path.join(root, "sd"), os.path.join(root, "lora")
        tiny_pipeline(save_dir=args.model)
        make_tiny_lora(args.model, args.lora)
        args.steps, args.size, args.device = 4, 32, "cpu"

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = RealignDiffPipeline.from_pretrained(args.model, dtype=dtype).to(args.device)

    def generate():
        generator = torch.Generator(args.device).manual_seed(args.seed)
        return pipe(args.prompt, num_inference_steps=args.steps, height=args.size, width=args.size,
                    generator=generator).images[0]

    os.makedirs(args.out, exist_ok=True)
    generate().save(os.path.join(args.out, "base.png"))
    pipe.load_lora_weights(args.lora)  # a folder or a Hub id; adapter_name=..., pipe.fuse_lora() as in diffusers
    generate().save(os.path.join(args.out, "lora.png"))
    print(f"loaded LoRA {args.lora}; wrote base.png, lora.png to {args.out}")


if __name__ == "__main__":
    main()
