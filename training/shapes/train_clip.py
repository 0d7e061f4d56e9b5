"""Train the shapes world's small CLIP (`CLIPModel`) contrastively, with the real CLIP tokenizer.

    python training/shapes/train_clip.py --output_dir runs/shapes/clip

Its text tower becomes the diffusion model's frozen text encoder (as Stable Diffusion uses OpenAI CLIP's),
and the whole model is the world's CLIP-style reward and CLIP score. Each batch adds, for every two-object
caption, a NegCLIP-style hard negative with the two colors swapped; captions that describe an image
(same colored objects, and the same sides when the caption names them) all count as its positives.

``--no-swap_negatives`` trains without those hard negatives, as OpenAI's CLIP was trained: its text
embeddings then see little of which color goes with which shape, the bag-of-words behaviour behind Stable
Diffusion's binding errors (the second shapes world, ``shapes-bow``). The swapped captions are still scored,
without gradient, so the log's ``swap_acc`` measures what the model learned of binding either way.
"""

from __future__ import annotations

import argparse
import random

import torch
from common import Checkpointer, Logger, base_parser, batch, setup
from transformers import CLIPConfig, CLIPModel

from realign_pipeline.shapes.world import Scene, ShapeObject, caption_scene
from realign_pipeline.testing import clip_tokenizer

MAX_LENGTH = 16
# OpenAI CLIP's normalisation, so the saved CLIPImageProcessor feeds the model what it was trained on.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_tokenizer():
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = MAX_LENGTH
    return tokenizer


def make_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] pixels -> CLIP input."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels * 0.5 + 0.5 - mean) / std


def make_clip() -> CLIPModel:
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "max_position_embeddings": MAX_LENGTH, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "image_size": 32, "patch_size": 4, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4,
        },
        projection_dim=64,
    )
    return CLIPModel(config)


def meaning(scene: Scene) -> tuple:
    """What a caption asserts: its set of colored objects, plus the left object when it names sides."""
    objects = frozenset((o.color, o.shape) for o in scene.objects)
    if scene.form in ("left", "right"):
        left = min(scene.objects, key=lambda o: o.cx)
        return (objects, (left.color, left.shape))
    return (objects, None)


def holds(meaning_: tuple, scene: Scene) -> bool:
    objects, left = meaning_
    if frozenset((o.color, o.shape) for o in scene.objects) != objects:
        return False
    if left is None:
        return True
    actual = min(scene.objects, key=lambda o: o.cx)
    return (actual.color, actual.shape) == left


def swapped(scene: Scene, rng: random.Random) -> Scene:
    a, b = scene.objects
    objects = (
        ShapeObject(b.color, a.shape, a.cx, a.cy, a.size),
        ShapeObject(a.color, b.shape, b.cx, b.cy, b.size),
    )
    return Scene(objects, caption_scene(objects, scene.form, swap=rng.random() < 0.5), scene.form)


@torch.no_grad()
def swap_accuracy(model: CLIPModel, tokenizer, pixels: torch.Tensor, scenes: list[Scene], negatives: list[Scene]) -> float:
    """Share of two-object images whose true caption scores above the same caption with its colors swapped."""
    two = [i for i, s in enumerate(scenes) if len(s.objects) == 2]
    if not two:
        return float("nan")
    texts = [scenes[i].caption for i in two] + [n.caption for n in negatives]
    tokens = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    logits = model(input_ids=tokens.input_ids, pixel_values=normalize(pixels[two]), return_loss=False).logits_per_image
    index = torch.arange(len(two))
    return (logits[index, index] > logits[index, len(two) + index]).float().mean().item()


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument(
        "--swap_negatives", action=argparse.BooleanOptionalAction, default=True,
        help="add each two-object caption with its colors swapped as a hard negative (NegCLIP); "
        "--no-swap_negatives trains as OpenAI's CLIP was trained",
    )
    args = parser.parse_args()
    out = setup(args)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = make_clip()
    tokenizer = make_tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    ckpt = Checkpointer(out, {"clip": model}, optimizer)
    step, _ = ckpt.load(rng)
    logger = Logger(out)
    while step < args.max_train_steps:
        pixels, _, scenes = batch(rng, args)
        negatives = [swapped(s, rng) for s in scenes if len(s.objects) == 2]
        text_scenes = scenes + negatives if args.swap_negatives else scenes
        tokens = tokenizer([s.caption for s in text_scenes], padding="max_length", max_length=MAX_LENGTH,
                           truncation=True, return_tensors="pt")
        output = model(input_ids=tokens.input_ids, pixel_values=normalize(pixels), return_loss=False)
        logits = output.logits_per_image  # (B images, T texts)
        match = torch.tensor([[holds(meaning(t), s) for t in text_scenes] for s in scenes], dtype=torch.bool)
        log_p_i2t = logits.log_softmax(dim=1).masked_fill(~match, float("-inf")).logsumexp(dim=1)
        logits_t2i = logits[:, : len(scenes)].t()
        log_p_t2i = logits_t2i.log_softmax(dim=1).masked_fill(~match[:, : len(scenes)].t(), float("-inf"))
        loss = -(log_p_i2t.mean() + log_p_t2i.logsumexp(dim=1).mean()) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.log_steps == 0:
            logger.log(step, loss=loss.item(), swap_acc=swap_accuracy(model, tokenizer, pixels, scenes, negatives))
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            ckpt.save(step, rng)
    model.save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    make_image_processor().save_pretrained(out / "final")
    print(f"saved {out / 'final'}", flush=True)


if __name__ == "__main__":
    main()
