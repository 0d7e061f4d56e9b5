"""transformers' Pillow image processors for the names diffusers imports, when torchvision is not installed.

diffusers' Stable Diffusion pipeline and IP-Adapter loader import ``CLIPImageProcessor`` and
``SiglipImageProcessor`` from transformers when they are imported. In transformers 5 those names mean the
torchvision backend; without torchvision (the base install leaves it out) transformers hands out the Pillow
classes (``CLIPImageProcessorPil``, ``SiglipImageProcessorPil``) instead and warns on every run that it did.
:func:`use_pil_image_processors` binds the names to the Pillow classes before diffusers asks for them: the
same classes, chosen on purpose, so nothing warns. With torchvision installed it changes nothing.

Importing this module does it; the package imports it before anything that imports diffusers.
"""

from __future__ import annotations

import importlib.util

__all__ = ["PIL_IMAGE_PROCESSORS", "use_pil_image_processors"]

#: The transformers names diffusers imports, and the Pillow class each falls back to without torchvision.
PIL_IMAGE_PROCESSORS = {
    "CLIPImageProcessor": "CLIPImageProcessorPil",
    "SiglipImageProcessor": "SiglipImageProcessorPil",
}


def use_pil_image_processors() -> None:
    """Bind the names of :data:`PIL_IMAGE_PROCESSORS` to their Pillow classes in ``transformers`` when
    torchvision is missing and a name is not resolved yet; call before diffusers' pipelines are imported."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    # Import the Pillow classes first: loading transformers' processing code replaces the module object in
    # ``sys.modules["transformers"]``, and the names must go on the one later imports see.
    classes = {}
    for pil_name in PIL_IMAGE_PROCESSORS.values():
        try:
            classes[pil_name] = getattr(importlib.import_module("transformers"), pil_name)
        except (AttributeError, ImportError):  # another transformers: leave its own resolution alone
            return
    import transformers

    for name, pil_name in PIL_IMAGE_PROCESSORS.items():
        if name not in vars(transformers):
            setattr(transformers, name, classes[pil_name])


use_pil_image_processors()
