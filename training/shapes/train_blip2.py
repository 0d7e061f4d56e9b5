"""Train the shapes world's BLIP-2 models from scratch: the captioner and the image-text matcher.

    python training/shapes/train_blip2.py --model captioner --output_dir runs/shapes/blip2-captioner
    python training/shapes/train_blip2.py --model itm --output_dir runs/shapes/blip2-itm

``captioner``: a `Blip2ForConditionalGeneration` (ViT + Q-Former + a small OPT) trained with the language
modelling loss on the world's captions; it is the captioner C(x) of the caption reward (Eq. 4).
``itm``: a `Blip2ForImageTextRetrieval` trained with BLIP-2's ITC (contrastive, several captions of one
scene all positive) and ITM (matching head, with color-swapped hard negatives) losses; its Q-Former text
side loads as `Blip2TextModelWithProjection`, the E_text of Eq. 4, and the whole model is the BLIP-ITM
reward and metric. Both keep BLIP-2's architecture at a tiny width; they are trained in one stage
(BLIP-2's two-stage recipe exists to reuse frozen large models, which this world does not have).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from common import Checkpointer, Logger, base_parser, batch, setup
from train_clip import holds, meaning, swapped
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    OPTConfig,
)

from realign_pipeline.shapes.world import CAPTION_FORMS, COLORS, SHAPES
from realign_pipeline.testing import blip2_itm_tokenizer, blip_image_processor, tiny_opt_tokenizer

NUM_QUERY_TOKENS = 8
ITC_TEMPERATURE = 0.07
WORLD_WORDS = sorted({w for form in CAPTION_FORMS.values() for w in form.replace("{", " ").replace("}", " ").split()
                      if w.isalpha() and w not in {"left", "right", "a", "b"}} | {"a", "left", "right"}
                     | set(COLORS) | set(SHAPES))


def _vision_qformer(text_input: bool, vocab_size: int | None = None) -> tuple[dict, dict]:
    vision = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                  "image_size": 32, "patch_size": 4}
    qformer = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "encoder_hidden_size": 64, "cross_attention_frequency": 1, "max_position_embeddings": 32,
                   "use_qformer_text_input": text_input}
    if vocab_size is not None:
        qformer["vocab_size"] = vocab_size
    return vision, qformer


def make_captioner() -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    processor = Blip2Processor(image_processor=blip_image_processor(32), tokenizer=tiny_opt_tokenizer(WORLD_WORDS),
                               num_query_tokens=NUM_QUERY_TOKENS)
    tok = processor.tokenizer
    text = OPTConfig(vocab_size=len(tok), hidden_size=64, word_embed_proj_dim=64, ffn_dim=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision, qformer = _vision_qformer(text_input=False)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                         num_query_tokens=NUM_QUERY_TOKENS, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    model.generation_config.max_new_tokens = 16
    return model, processor


def make_itm() -> tuple[Blip2ForImageTextRetrieval, Blip2Processor]:
    processor = Blip2Processor(image_processor=blip_image_processor(32), tokenizer=blip2_itm_tokenizer())
    vision, qformer = _vision_qformer(text_input=True, vocab_size=len(processor.tokenizer))
    processor.tokenizer.model_max_length = qformer["max_position_embeddings"]  # texts longer than that are cut
    config = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=NUM_QUERY_TOKENS,
                         image_text_hidden_size=64, image_token_index=None)
    return Blip2ForImageTextRetrieval(config), processor


def normalize(pixels: torch.Tensor, processor: Blip2Processor) -> torch.Tensor:
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (pixels * 0.5 + 0.5 - mean) / std


def caption_inputs(model, processor, captions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``<image>`` x Q, BOS, caption, EOS, right-padded: ids, attention mask, labels (caption and EOS only).

    Built by hand because the processor inserts the image tokens only when it is given images."""
    tok = processor.tokenizer
    start = [model.config.image_token_index] * NUM_QUERY_TOKENS + [tok.bos_token_id]
    rows = [start + tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id] for c in captions]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(start) : len(row)] = torch.tensor(row[len(start) :])
    return ids, mask, labels


def captioner_loss(model, processor, pixels, captions) -> tuple[torch.Tensor, dict]:
    ids, mask, labels = caption_inputs(model, processor, captions)
    out = model(pixel_values=normalize(pixels, processor), input_ids=ids, attention_mask=mask, labels=labels)
    return out.loss, {}


def itm_loss(model, processor, pixels, scenes, rng, swap_share: float = 0.7,
             itc_swaps: bool = False) -> tuple[torch.Tensor, dict]:
    pixel_values = normalize(pixels, processor)
    texts = [s.caption for s in scenes]
    # With itc_swaps, ITC also sees each two-object scene's colour-swapped caption as an extra text (an attempt
    # to make E_text of Eq. 4 see binding; measured in docs/shapes.md: it did not).
    swaps = [swapped(s, rng) for s in scenes if len(s.objects) == 2] if itc_swaps else []
    enc = processor.tokenizer(texts + [w.caption for w in swaps], return_tensors="pt", padding=True)
    out = model(pixel_values=pixel_values, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                use_image_text_matching_head=False)
    # transformers returns the raw cosine (max over queries); BLIP-2's ITC divides it by a temperature (0.07)
    logits = out.logits_per_image / ITC_TEMPERATURE
    match = torch.tensor([[holds(meaning(t), s) for t in [*scenes, *swaps]] for s in scenes], dtype=torch.bool)
    i2t = logits.log_softmax(1).masked_fill(~match, float("-inf")).logsumexp(1).mean()
    n = len(scenes)  # text-to-image over the true captions only (a swap may describe no image of the batch)
    t2i = logits[:, :n].t().log_softmax(1).masked_fill(~match[:, :n].t(), float("-inf")).logsumexp(1).mean()
    itc = -(i2t + t2i) / 2
    # ITM: each image with its caption (1) and with a color-swapped or another scene's caption (0)
    negatives = [swapped(s, rng).caption if len(s.objects) == 2 and rng.random() < swap_share
                 else scenes[(i + 1) % len(scenes)].caption for i, s in enumerate(scenes)]
    labels = torch.tensor([1] * len(scenes) + [int(holds(meaning(scenes[(i + 1) % len(scenes)]), s)
                           and n == scenes[(i + 1) % len(scenes)].caption) for i, (s, n) in enumerate(zip(scenes, negatives))])
    enc2 = processor.tokenizer(texts + negatives, return_tensors="pt", padding=True)
    itm_logits = model(pixel_values=torch.cat([pixel_values, pixel_values]), input_ids=enc2.input_ids,
                       attention_mask=enc2.attention_mask, use_image_text_matching_head=True).logits_per_image
    itm = F.cross_entropy(itm_logits, labels)
    acc = (itm_logits.argmax(1) == labels).float().mean().item()
    return itc + itm, {"itc": itc.item(), "itm": itm.item(), "itm_acc": acc}


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--model", choices=("captioner", "itm"), required=True)
    parser.add_argument("--lr_warmup_steps", type=int, default=200)
    parser.add_argument("--itm_swap_share", type=float, default=0.7,
                        help="share of two-object scenes whose ITM negative is their colour swap (else another caption)")
    parser.add_argument("--itc_swaps", action="store_true",
                        help="colour-swapped captions as extra ITC negatives too (not used for the shipped matcher)")
    parser.add_argument("--init_from", default=None,
                        help="start from this saved model (a previous run's final/) instead of random weights")
    args = parser.parse_args()
    out = setup(args)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, processor = make_captioner() if args.model == "captioner" else make_itm()
    if args.init_from:  # continue from a finished model (e.g. to add a loss term); the processor is the same
        model = type(model).from_pretrained(args.init_from)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    ckpt = Checkpointer(out, {"model": model}, optimizer)
    step, _ = ckpt.load(rng)
    logger = Logger(out)
    print(f"{args.model} parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    model.train()
    while step < args.max_train_steps:
        pixels, captions, scenes = batch(rng, args)
        if args.model == "captioner":
            loss, extra = captioner_loss(model, processor, pixels, captions)
        else:
            loss, extra = itm_loss(model, processor, pixels, scenes, rng, args.itm_swap_share, args.itc_swaps)
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / args.lr_warmup_steps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.log_steps == 0:
            logger.log(step, loss=loss.item(), **extra)
        if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
            ckpt.save(step, rng)
    model.eval()
    if args.model == "captioner":
        pixels, captions, _ = batch(rng, args)
        n = min(8, len(captions))
        start = caption_inputs(model, processor, [""] * n)[0][:, : NUM_QUERY_TOKENS + 1]
        ids = model.generate(pixel_values=normalize(pixels[:n], processor), input_ids=start,
                             attention_mask=torch.ones_like(start), max_new_tokens=16)
        for c, g in zip(captions[:n], processor.batch_decode(ids, skip_special_tokens=True)):
            print(f"caption {c!r} -> generated {g.strip()!r}", flush=True)
    model.save_pretrained(out / "final")
    processor.save_pretrained(out / "final")
    print(f"saved {out / 'final'}", flush=True)


if __name__ == "__main__":
    main()
