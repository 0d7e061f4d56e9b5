"""Export the EMA UNet of a running (or stopped) `train_unet.py` checkpoint, to look at it mid-training.

    python training/shapes/export_checkpoint.py runs/shapes/unet runs/shapes/unet/final
"""

from __future__ import annotations

import sys

import torch
from train_unet import make_unet


def main() -> None:
    run, target = sys.argv[1], sys.argv[2]
    state = torch.load(f"{run}/checkpoint/state.pt", weights_only=False)
    ema = state["modules"]["ema"]
    unet = make_unet(ema["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    unet.load_state_dict(ema)
    unet.save_pretrained(target)
    print(f"exported the EMA UNet of step {state['step']} to {target}")


if __name__ == "__main__":
    main()
