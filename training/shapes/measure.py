"""Measure the shipped shapes-world models for docs/shapes.md (every number there comes from this script).

    python training/shapes/measure.py --models src/realign_pipeline/assets/shapes --out docs/shapes_numbers.json \
        --samples docs/images/shapes_samples.png

``--only_generation`` measures only what the pipeline draws and what its text encoder sees (``--pipeline
pipeline-bow`` for the second world; add ``--scene_kind triples`` for a pipeline of the three-object scenes, at 48 px:
single objects, two-object training pairings, and 192 training and 192 held-out three-object prompts, a seeded
sample of each). ``--only_colour_swaps`` re-measures only the BLIP-2 colour-swap preferences (``sees_colour_swaps``, seconds)
and leaves the other numbers in ``--out`` as they are; ``--only_text_encoder`` likewise re-measures only what
the pipeline's text encoder sees of binding (``text_encoder_binding``). ``--judges`` names the folder of the
CLIP and BLIP-2 models that judge the images (default: ``--models``); the second world (``shapes-bow``) ships
only its pipeline and is judged by the first world's models.

Perception: the checker's and the segmenter's accuracy on rendered scenes (32 and 64 px) and on renders
passed through the trained VAE and back. Generation (plain pipeline, no re-alignment): how often the checker
finds the prompted colored shapes, for single objects, for two-object prompts with training pairings and
with held-out pairings. CLIP: how often the true caption beats a color swap. BLIP-2: how often the greedy
caption names the object of a single-object render.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from common import images_to_tensor

from realign_pipeline import RealignDiffPipeline
from realign_pipeline.shapes import triples
from realign_pipeline.shapes.checker import check_prompt, checker_accuracy
from realign_pipeline.shapes.metric import parse_shapes_prompt
from realign_pipeline.shapes.perception import segmenter_accuracy
from realign_pipeline.shapes.triples import held_out_triple_prompts, training_triple_prompts
from realign_pipeline.shapes.world import COLORS, SHAPES, held_out_prompts, render_scene, sample_scene

#: The guidance the UNet was validated with and the shapes presets use.
GUIDANCE = 4.0


def vae_round_trip(vae):
    def transform(image: PIL.Image.Image) -> PIL.Image.Image:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample
        return PIL.Image.fromarray(((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())

    return transform


def generation_scores(pipe, prompts: list[str], seeds: list[int], batch: int = 32, size: int = 32) -> dict:
    rows = []
    jobs = [(p, s) for p in prompts for s in seeds]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        images = pipe([p for p, _ in chunk], height=size, width=size, num_inference_steps=20, guidance_scale=GUIDANCE,
                      generator=[torch.Generator().manual_seed(s) for _, s in chunk]).images
        for (prompt, _), image in zip(chunk, images):
            rows.append(check_prompt(image, parse_shapes_prompt(prompt)))
    out = {"n": len(rows)}
    for key in ("presence", "binding", "binding_fraction", "position"):
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            out[key] = round(float(np.mean(values)), 4)
    return out


def colour_swap(prompt: str) -> str:
    """The prompt with its first two colours exchanged ("a red circle and a blue square" -> blue circle, red
    square; a three-object prompt keeps its third colour)."""
    a, b = [o["color"] for o in parse_shapes_prompt(prompt)][:2]
    return prompt.replace(a, "@").replace(b, a).replace("@", b)


def text_binding(reward, prompts: list[str]) -> dict:
    """Does Eq. 4's E_text see binding? Mean cosine of each held-out prompt with its colour swap (1.0: the
    caption reward cannot tell a wrong binding from a right one) and with another prompt of the list."""
    swaps = [colour_swap(p) for p in prompts]
    emb = reward.text_embeds(prompts + swaps)
    n = len(prompts)
    own, swap = emb[:n], emb[n:]
    cos_swap = (own * swap).sum(-1)
    cos_other = (own * own.roll(1, 0)).sum(-1)
    return {"n": n, "cos_prompt_vs_colour_swap": round(float(cos_swap.mean()), 4),
            "cos_prompt_vs_colour_swap_max": round(float(cos_swap.max()), 4),
            "cos_prompt_vs_other_prompt": round(float(cos_other.mean()), 4)}


def text_encoder_binding(text_encoder, tokenizer, prompts: list[str]) -> dict:
    """What the diffusion model's text encoder sees of binding: cosines between each held-out prompt and its
    colour swap (and, for scale, a prompt of another pairing), in the pooled embedding (the end token's state)
    and in the per-token states the UNet reads,
    at the two shape words (a bag-of-words encoder gives "circle" the same state whatever colour precedes it:
    cosine 1) and averaged over all positions up to the end token."""
    swaps = [colour_swap(p) for p in prompts]
    enc = tokenizer(prompts + swaps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    with torch.no_grad():
        out = text_encoder(enc.input_ids)
    n = len(prompts)
    states = torch.nn.functional.normalize(out.last_hidden_state, dim=-1)
    pooled = torch.nn.functional.normalize(out.pooler_output, dim=-1)
    per_position = (states[:n] * states[n:]).sum(-1)  # (n, positions)
    shape_ids = {tokenizer.convert_tokens_to_ids(f"{shape}</w>") for shape in SHAPES}
    ids = enc.input_ids[:n]
    at_shapes = [per_position[i, [j for j, t in enumerate(ids[i].tolist()) if t in shape_ids]].mean() for i in range(n)]
    eos = tokenizer.eos_token_id
    lengths = [ids[i].tolist().index(eos) + 1 for i in range(n)]
    whole = [per_position[i, :lengths[i]].mean() for i in range(n)]
    other = (pooled[:n] * pooled[:n].roll(n // 2, 0)).sum(-1)  # held-out prompts come grouped by pairing
    return {"n": n,
            "pooled_cos_prompt_vs_colour_swap": round(float((pooled[:n] * pooled[n:]).sum(-1).mean()), 4),
            "pooled_cos_prompt_vs_another_pairing": round(float(other.mean()), 4),
            "token_cos_at_shape_words": round(float(torch.stack(at_shapes).mean()), 4),
            "token_cos_all_positions": round(float(torch.stack(whole).mean()), 4)}


def swap_preferences(reward, itm_path: Path, num_scenes: int = 200) -> dict:
    """How often each BLIP-2 score prefers a two-object render's true caption to its colour swap (0.5: blind
    to binding): the captioner's teacher-forced likelihood (the caption reward's ``likelihood`` objective;
    also its mean for the true and the swapped captions, nats per token), the matcher's ITC similarity and
    its ITM match probability (the BLIP-ITM reward)."""
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    scenes = [s for s in (sample_scene(random.Random(i), num_objects=2) for i in range(num_scenes * 2))
              if s.objects[0].color != s.objects[1].color][:num_scenes]
    true, swaps = [s.caption for s in scenes], [colour_swap(s.caption) for s in scenes]
    pixels = images_to_tensor(np.stack([np.asarray(render_scene(s)) for s in scenes]))
    out = {"n": len(scenes)}
    with torch.no_grad():
        ll_true, ll_swap = reward.prompt_log_likelihood(pixels, true), reward.prompt_log_likelihood(pixels, swaps)
        out["captioner_likelihood"] = float((ll_true > ll_swap).float().mean())
        out["captioner_likelihood_mean_true"] = float(ll_true.mean())
        out["captioner_likelihood_mean_swap"] = float(ll_swap.mean())
        itm, processor = Blip2ForImageTextRetrieval.from_pretrained(itm_path).eval(), Blip2Processor.from_pretrained(itm_path)
        pixel_values = processor(images=[render_scene(s) for s in scenes], return_tensors="pt").pixel_values
        for head, name in ((False, "matcher_itc"), (True, "matcher_itm")):
            scores = []
            for texts in (true, swaps):
                enc = processor.tokenizer(texts, return_tensors="pt", padding=True)
                logits = itm(pixel_values=pixel_values, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                             use_image_text_matching_head=head).logits_per_image
                scores.append(logits.softmax(-1)[:, 1] if head else logits.diagonal())
            out[name] = float((scores[0] > scores[1]).float().mean())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def triple_generation(pipe, singles: list[str], seeds: list[int], sample: int = 192) -> dict:
    """What a pipeline of the three-object scenes draws (plain, 48 px): single objects, two-object training
    pairings, and a seeded sample of training and held-out three-object prompts, each with seeds 0-1."""
    rng = random.Random(7)
    pairs = [triples.sample_scene(rng, num_objects=2).caption for _ in range(sample // 2)]
    training = [r["prompt"] for r in random.Random(0).sample(training_triple_prompts(), sample)]
    held_out = [r["prompt"] for r in random.Random(0).sample(held_out_triple_prompts(), sample)]
    size = triples.RESOLUTION
    return {
        "single_objects": generation_scores(pipe, singles, seeds, size=size),
        "two_objects_training_pairings": generation_scores(pipe, pairs, seeds[:2], size=size),
        "three_objects_training_triples": generation_scores(pipe, training, seeds[:2], size=size),
        "three_objects_held_out_triples": generation_scores(pipe, held_out, seeds[:2], size=size),
        "chance": {"single_shape": 1 / len(SHAPES), "single_colored_shape": 1 / (len(SHAPES) * len(COLORS))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", default=None, help="PNG grid of samples (rows: prompts, columns: seeds)")
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--only_colour_swaps", action="store_true",
                        help="re-measure only sees_colour_swaps (seconds) and keep the rest of --out as it is")
    parser.add_argument("--only_text_encoder", action="store_true",
                        help="re-measure only text_encoder_binding (seconds) and keep the rest of --out as it is")
    parser.add_argument("--pipeline", default="pipeline",
                        help="the pipeline folder under --models (pipeline-bow: the second world)")
    parser.add_argument("--only_generation", action="store_true",
                        help="measure only what the pipeline draws and what its text encoder sees of binding")
    parser.add_argument("--scene_kind", choices=("pairs", "triples"), default="pairs",
                        help="with --only_generation: the world of the pipeline (triples: three-object scenes, 48 px)")
    parser.add_argument("--judges", default=None,
                        help="folder with the judging clip/, blip2-captioner/, blip2-itm/ (default: --models)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = Path(args.models)
    judges = Path(args.judges) if args.judges else models
    start = time.time()
    held_out = [r["prompt"] for r in held_out_prompts()]
    if args.only_text_encoder:
        from transformers import CLIPTextModel, CLIPTokenizer

        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {}
        result["text_encoder_binding"] = text_encoder_binding(
            CLIPTextModel.from_pretrained(models / args.pipeline / "text_encoder").eval(),
            CLIPTokenizer.from_pretrained(models / args.pipeline / "tokenizer"), held_out)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["text_encoder_binding"], indent=2))
        return
    if args.only_colour_swaps:
        from realign_pipeline.rewards import CaptionReward

        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {}
        reward = CaptionReward(captioner=str(judges / "blip2-captioner"), text_encoder=str(judges / "blip2-itm"))
        result["sees_colour_swaps"] = swap_preferences(reward, judges / "blip2-itm")
        result["sees_colour_swaps"]["wall_s"] = round(time.time() - start, 1)  # the top-level wall_s is the full run's
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["sees_colour_swaps"], indent=2))
        return
    pipe = RealignDiffPipeline.from_pretrained(models / args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    result: dict = {"perception": {}, "generation": {}}
    if args.only_generation:
        out = Path(args.out)
        result = json.loads(out.read_text()) if out.exists() else {}
    for name, fn in () if args.only_generation else (("checker", checker_accuracy), ("segmenter", segmenter_accuracy)):
        result["perception"][name] = {
            "rendered_32": fn(num_scenes=args.scenes, size=32, seed=1),
            "rendered_64": fn(num_scenes=args.scenes, size=64, seed=1),
            "vae_round_trip_32": fn(num_scenes=args.scenes, size=32, seed=1, transform=vae_round_trip(pipe.vae)),
        }
    seeds = list(range(args.seeds))
    singles = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    if args.scene_kind == "triples":
        result["generation"] = triple_generation(pipe, singles, seeds)
        result["text_encoder_binding"] = text_encoder_binding(
            pipe.text_encoder.eval(), pipe.tokenizer, [r["prompt"] for r in held_out_triple_prompts()])
        result["generation"]["wall_s"] = round(time.time() - start, 1)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("generation", "text_encoder_binding")}, indent=2))
        return
    rng = random.Random(7)
    held_in = [sample_scene(rng, split="train", num_objects=2).caption for _ in range(len(held_out))]
    result["generation"] = {
        "single_objects": generation_scores(pipe, singles, seeds),
        "two_objects_training_pairings": generation_scores(pipe, held_in, seeds[:2]),
        "two_objects_held_out_pairings": generation_scores(pipe, held_out, seeds[:2]),
        "chance": {"single_shape": 1 / len(SHAPES), "single_colored_shape": 1 / (len(SHAPES) * len(COLORS))},
    }
    result["text_encoder_binding"] = text_encoder_binding(pipe.text_encoder.eval(), pipe.tokenizer, held_out)
    if args.only_generation:
        result["generation"]["wall_s"] = round(time.time() - start, 1)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: result[k] for k in ("generation", "text_encoder_binding")}, indent=2))
        return

    from transformers import CLIPModel, CLIPProcessor

    clip, processor = CLIPModel.from_pretrained(judges / "clip").eval(), CLIPProcessor.from_pretrained(judges / "clip")
    scenes = [sample_scene(random.Random(i), num_objects=2) for i in range(400)]
    swapped = [colour_swap(scene.caption) for scene in scenes]
    wins = 0
    for i in range(0, len(scenes), 100):
        chunk = scenes[i : i + 100]
        inputs = processor(text=[s.caption for s in chunk] + swapped[i : i + 100],
                           images=[render_scene(s) for s in chunk], return_tensors="pt", padding="max_length",
                           max_length=16)
        with torch.no_grad():
            logits = clip(**inputs).logits_per_image
        n = len(chunk)
        wins += int((logits[torch.arange(n), torch.arange(n)] > logits[torch.arange(n), n + torch.arange(n)]).sum())
    result["clip_true_caption_beats_color_swap"] = wins / len(scenes)

    if (judges / "blip2-captioner").exists():
        from realign_pipeline.rewards import CaptionReward

        reward = CaptionReward(captioner=str(judges / "blip2-captioner"), text_encoder=str(judges / "blip2-itm"))
        singles_scenes = [sample_scene(random.Random(i), num_objects=1) for i in range(200)]
        captions = reward.captions([render_scene(s) for s in singles_scenes])
        result["blip2_caption_names_the_object"] = float(np.mean(
            [s.objects[0].phrase in c for s, c in zip(singles_scenes, captions)]))
        result["blip2_caption_examples"] = [[s.caption, c] for s, c in list(zip(singles_scenes, captions))[:5]]
        result["caption_reward_text_binding"] = text_binding(reward, held_out)
        result["sees_colour_swaps"] = swap_preferences(reward, judges / "blip2-itm")

    if args.samples:
        prompts = singles[::3] + held_out[::24]
        images = pipe([p for p in prompts for _ in seeds], height=32, width=32, num_inference_steps=20, guidance_scale=GUIDANCE,
                      generator=[torch.Generator().manual_seed(s) for _ in prompts for s in seeds]).images
        cell = 64
        grid = PIL.Image.new("RGB", (cell * len(seeds) + 330, cell * len(prompts)), (255, 255, 255))
        from PIL import ImageDraw

        draw = ImageDraw.Draw(grid)
        for row, prompt in enumerate(prompts):
            draw.text((4, row * cell + cell // 2 - 6), prompt, fill=(0, 0, 0))
            for col in range(len(seeds)):
                image = images[row * len(seeds) + col].resize((cell, cell), PIL.Image.Resampling.NEAREST)
                grid.paste(image, (330 + col * cell, row * cell))
        Path(args.samples).parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.samples)
    result["wall_s"] = round(time.time() - start, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
