"""Replaying random numbers: the fine pass of ``realign=True`` must draw exactly what the coarse pass drew.

Stochastic samplers (Euler ancestral, DDPM, SDE solvers, DDIM with ``eta > 0``) draw fresh noise at every step
from the call's generator. Re-using a generator the coarse pass has already advanced would give the fine pass
other noise, so its image would differ from the coarse one by sampler noise as well as by the modulation.
"""

from __future__ import annotations

import torch


def _clone(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


class RandomStateReplay:
    """Remember the random state now; :meth:`generator` later gives generators that start from it again.

    Args:
        generator: the call's generator, a list of them (one per image), or None for torch's global generators.
        device: the device the pipeline runs on; with ``generator=None`` its global generator is remembered
            beside the CPU's, since samplers draw their per-step noise there.
    """

    def __init__(self, generator: torch.Generator | list[torch.Generator] | None, device: torch.device | str):
        self._device = torch.device(device)
        if generator is None:
            self._saved = None
            self._cpu_state = torch.get_rng_state()
            self._cuda_state = torch.cuda.get_rng_state(self._device) if self._device.type == "cuda" else None
        elif isinstance(generator, list):
            self._saved = [_clone(g) for g in generator]
        else:
            self._saved = _clone(generator)

    def generator(self) -> torch.Generator | list[torch.Generator] | None:
        """Fresh generator(s) in the remembered state; with None, torch's global state is rewound instead.

        The caller's own generators are never rewound: after a two-pass call they are where one pass left them.
        """
        if self._saved is None:
            torch.set_rng_state(self._cpu_state)
            if self._cuda_state is not None:
                torch.cuda.set_rng_state(self._cuda_state, self._device)
            return None
        if isinstance(self._saved, list):
            return [_clone(g) for g in self._saved]
        return _clone(self._saved)
