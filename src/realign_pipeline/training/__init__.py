"""Building blocks of ReFL fine-tuning (``training/train_refl.py``): the step math and the data readers.

:mod:`realign_pipeline.training.refl` holds the method (rollout, gradient step, x0, hinge, ``L_pre``, Eq. 5),
free of accelerate and argparse; :mod:`realign_pipeline.training.draft` the DRaFT modes (the reward's gradient
through the last K denoising steps, the full chain, DRaFT-LV, per-step checkpointing);
:mod:`realign_pipeline.training.data` reads the reward prompts and the image-caption pairs with a resumable
position; :mod:`realign_pipeline.training.lora` the LoRA adapter of ``--use_lora``;
:mod:`realign_pipeline.training.sdxl` holds Stable Diffusion XL's added conditioning (both encoders'
context, the pooled embedding, the time ids) and tells an SDXL checkpoint by its ``model_index.json``.
"""
