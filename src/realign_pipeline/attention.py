"""Re-weighting attention modulation (Eq. 8 of the paper) and the diffusers attention processor applying it.

Eq. 8:  ``A' = softmax((Q K^T + S * M) / sqrt(d))`` with
``M = l_t R M_pos (1 - B) - l_t (1 - R) M_neg (1 - B)``, ``M_pos = max(QK^T) - QK^T``, ``M_neg = QK^T - min(QK^T)``.

How we read it (see ``docs/method.md``):

* ``M_pos`` / ``M_neg`` use the row maximum and minimum *per query and per head* of the already scaled scores
  (DenseDiffusion's published code), so the modulation is added after the ``1 / sqrt(d)`` scaling.
* ``R`` pairs a query inside region ``r``'s mask with a key among region ``r``'s phrase tokens; ``S`` carries the
  region's Eq. 6 score ``s_r`` on the columns of its phrase tokens and is zero on every other column. So a
  query inside the mask is pulled toward the phrase, a query outside it (background included) is pushed away
  from the phrase, tokens that no region claims (start, end, padding, "a", "and") are never touched, and
  ``s_r = 0`` switches the region off exactly.
* ``(1 - B)`` is DenseDiffusion's size term ``1 - size_weight * area_r``: small objects are modulated more.
* ``l_t = (t / T) ** timestep_power`` with ``T`` the scheduler's ``num_train_timesteps`` (1000 for SD).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention

from .layout import ResolvedLayout

#: How many float32 scores (images x heads x queries x keys) the self-attention modulation computes at once:
#: 2**23 = 32 MiB. At SD v1.5's 64x64 latents that is 256 of the 4096 queries of 8 heads per block, instead of
#: the whole 512 MiB per image and of the several temporaries of that size Eq. 8 needs.
SELF_ATTENTION_CHUNK_ELEMENTS = 2**23


# --------------------------------------------------------------------------------------------------------------
# Pure math
# --------------------------------------------------------------------------------------------------------------
def timestep_strength(timestep: float, num_train_timesteps: int = 1000, power: float = 5.0) -> float:
    """``l_t = (t / T) ** power`` of Eq. 8 (DenseDiffusion: ``(t / 1000) ** 5``)."""
    fraction = min(max(float(timestep) / float(num_train_timesteps), 0.0), 1.0)
    return fraction**power


def size_factor(areas: torch.Tensor, size_weight: float = 1.0) -> torch.Tensor:
    """``(1 - B)`` of Eq. 8 as DenseDiffusion's area term ``1 - size_weight * area``, never below zero."""
    return (1.0 - size_weight * areas).clamp(min=0.0)


def cross_attention_modulation_weights(
    token_map: torch.Tensor,
    masks: torch.Tensor,
    region_scores: torch.Tensor,
    areas: torch.Tensor,
    size_weight: float = 1.0,
    suppress_unclaimed_tokens: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two weight maps of Eq. 8 for cross-attention, ``S R (1 - B)`` and ``S (1 - R) (1 - B)``.

    Args:
        token_map: ``R`` over keys, (num_regions, num_keys): 1 on each region's phrase tokens.
        masks: (num_regions, num_queries) coverage of each region on the attention grid, in [0, 1].
        region_scores: ``s`` of Eq. 6, (num_regions,).
        areas: fraction of the image each region covers, (num_regions,).
        size_weight: weight of the area in the size term ``1 - size_weight * area``.
        suppress_unclaimed_tokens: also push down, at every query inside a region and with that region's
            weight, the keys no region claims (start, end, padding, "a", "and"), as DenseDiffusion does.

    Returns:
        ``(positive, negative)``, each (num_queries, num_keys): summed over regions,
        ``positive = sum_r s_r (1 - w a_r) m_r[q] R_r[k]`` and ``negative = sum_r s_r (1 - w a_r) (1 - m_r[q]) R_r[k]``,
        plus, with `suppress_unclaimed_tokens`, ``sum_r s_r (1 - w a_r) m_r[q]`` on every unclaimed key. Either way
        a layout whose scores are all 0 gives zero maps.
    """
    weight = region_scores * size_factor(areas, size_weight)  # (N,)
    positive = (masks * weight[:, None]).T @ token_map
    negative = ((1.0 - masks) * weight[:, None]).T @ token_map
    if suppress_unclaimed_tokens:
        # In a causal text encoder the end and padding tokens carry the whole prompt, every object in it; left
        # alone they keep most of a region's attention (docs/shapes.md, "Why layout control stops short").
        unclaimed = (token_map.sum(0) == 0).to(negative)
        negative = negative + (masks * weight[:, None]).sum(0)[:, None] * unclaimed[None, :]
    return positive, negative


def self_attention_modulation_rows(
    masks: torch.Tensor,
    region_scores: torch.Tensor,
    areas: torch.Tensor,
    size_weight: float = 1.0,
    queries: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive map of :func:`self_attention_modulation_weights` and its row sums, for the rows of `queries`
    (all of them by default): ``(positive, row_sums)`` of shapes (rows, num_queries) and (rows,), with
    ``row_sums[q] = sum_r s_r (1 - w a_r) m_r[q] = positive[q] + negative[q]`` for every key.

    The maps have rank at most ``num_regions`` (``positive = W^T M`` with ``W = s (1 - w a) M``), so any block of
    rows is cheap to build from the (num_regions, num_queries) masks: at 64x64 latents the full maps are
    4096 x 4096, and the processor never builds more than a block of them.
    """
    weighted = masks * (region_scores * size_factor(areas, size_weight))[:, None]  # (N, Q)
    if queries is not None:
        weighted = weighted[:, queries]
    return weighted.T @ masks, weighted.sum(0)


def self_attention_modulation_weights(
    masks: torch.Tensor,
    region_scores: torch.Tensor,
    areas: torch.Tensor,
    size_weight: float = 1.0,
    queries: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DenseDiffusion's self-attention counterpart of Eq. 8: pixels of a region attend to their own region.

    Returns ``(positive, negative)``, each (num_queries, num_queries), or only the rows of `queries`:
    ``positive = sum_r s_r (1 - w a_r) m_r[q] m_r[k]``, ``negative = sum_r s_r (1 - w a_r) m_r[q] (1 - m_r[k])``.
    Queries outside every region are left alone.
    """
    positive, row_sums = self_attention_modulation_rows(masks, region_scores, areas, size_weight, queries)
    return positive, row_sums[:, None] - positive


def modulate_scores(
    scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, gain: float
) -> torch.Tensor:
    """Eq. 8 applied to scaled attention scores: ``scores + gain * (P * M_pos - N * M_neg)``.

    ``M_pos = max - scores`` and ``M_neg = scores - min``, with max and min taken per query row (and per head,
    for scores of shape (batch, heads, queries, keys)). `positive` and `negative` are the ``S R (1 - B)`` and
    ``S (1 - R) (1 - B)`` maps, broadcastable to `scores`; `gain` is ``strength * l_t``.
    A gain of 0 or all-zero weights return `scores` unchanged.
    """
    if gain == 0:
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    row_min = scores.amin(dim=-1, keepdim=True)
    return scores + gain * (positive * (row_max - scores) - negative * (scores - row_min))


def modulate_columns_(
    scores: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, gain: float, columns: torch.Tensor
) -> torch.Tensor:
    """:func:`modulate_scores` written in place into the key `columns` that carry weight, and returned.

    `positive` and `negative` hold only those columns (shape (..., Q, len(columns))). Every other column has
    zero weight, so it is left as is; the row max and min are still taken over all keys. In a cross-attention
    layer the phrase tokens are a few of 77 keys, so this touches a few percent of the scores.
    """
    if gain == 0:
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    row_min = scores.amin(dim=-1, keepdim=True)
    claimed = scores.index_select(-1, columns)
    claimed = claimed + gain * (positive * (row_max - claimed) - negative * (claimed - row_min))
    return scores.index_copy_(-1, columns, claimed)


def modulate_scores_by_rows_(
    scores: torch.Tensor, positive: torch.Tensor, row_sums: torch.Tensor, gain: float
) -> torch.Tensor:
    """:func:`modulate_scores` written in place into `scores`, for weights whose positive and negative maps add up
    to one value per query (``negative = row_sums - positive``, as the self-attention weights do), and returned.

    Then ``scores + g (P (max - s) - N (s - min)) = s (1 - g r) + g r min + g (max - min) P``: three in-place
    passes over the scores and no temporary of their size, where the direct form takes about eight passes and
    several temporaries (on a CPU, a 64x64 self-attention layer spends more on those than on its matmuls).
    `positive` is broadcastable to `scores`, `row_sums` to ``scores[..., :1]``.
    """
    if gain == 0:
        return scores
    # amax and amin apart: torch.aminmax is several times slower over the last dimension on the CPU
    row_max = scores.amax(dim=-1, keepdim=True)
    row_min = scores.amin(dim=-1, keepdim=True)
    pulled = gain * row_sums
    scores.mul_(1.0 - pulled).add_(pulled * row_min)
    return scores.addcmul_(positive, (row_max - row_min).mul_(gain))


def reweighted_attention_scores(
    scores: torch.Tensor,
    token_map: torch.Tensor,
    masks: torch.Tensor,
    region_scores: torch.Tensor,
    areas: torch.Tensor,
    strength: float = 1.0,
    l_t: float = 1.0,
    size_weight: float = 1.0,
) -> torch.Tensor:
    """Eq. 8 end to end for one image: ``Q K^T / sqrt(d) + S * M`` from a layout's ``R``, masks and scores.

    `scores` are scaled scores of shape (..., num_queries, num_keys); the other arguments are as in
    :func:`cross_attention_modulation_weights`. Take the softmax of the result to get ``A'``.
    """
    positive, negative = cross_attention_modulation_weights(token_map, masks, region_scores, areas, size_weight)
    return modulate_scores(scores, positive.to(scores), negative.to(scores), strength * l_t)


# --------------------------------------------------------------------------------------------------------------
# Per-call state shared by the processors
# --------------------------------------------------------------------------------------------------------------
def attention_grid_sizes(latent_height: int, latent_width: int, levels: int = 8) -> dict[int, tuple[int, int]]:
    """Map number of queries -> (height, width) for each UNet level (stride-2 convs: ``ceil(n / 2)``)."""
    sizes: dict[int, tuple[int, int]] = {}
    height, width = latent_height, latent_width
    for _ in range(levels):
        sizes.setdefault(height * width, (height, width))
        height, width = (height + 1) // 2, (width + 1) // 2
    return sizes


def layouts_modulate(layouts: Sequence[ResolvedLayout | None] | None) -> bool:
    """Whether any region of any layout has a positive Eq. 6 score (only those change attention)."""
    return layouts is not None and any(
        layout is not None and any(region.score > 0 for region in layout.regions) for layout in layouts
    )


@dataclass
class RealignAttentionState:
    """Everything the processors need for one pipeline call, set explicitly by the pipeline at every step.

    The pipeline creates one state per call, passes it to every :class:`RealignAttnProcessor`, and calls
    :meth:`set_step` before each UNet evaluation; nothing counts calls.
    """

    latent_height: int
    latent_width: int
    num_images: int
    do_classifier_free_guidance: bool
    sequence_length: int
    layouts: Sequence[ResolvedLayout | None] | None = None
    cross_attention_strength: float = 1.0
    self_attention_strength: float = 0.0
    size_weight: float = 1.0
    timestep_power: float = 5.0
    modulation_fraction: float = 0.3
    suppress_unclaimed_tokens: bool = False
    modulated_downsampling: tuple[int, ...] | None = None
    record_attention_maps: bool = False
    step_index: int = 0
    l_t: float = 0.0
    modulating: bool = False
    _grid: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)
    _downsampling: dict[int, int] = field(default_factory=dict, repr=False)
    _cross_cache: dict = field(default_factory=dict, repr=False)
    _self_cache: dict = field(default_factory=dict, repr=False)
    _map_sum: torch.Tensor | None = field(default=None, repr=False)
    _map_count: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self._grid = attention_grid_sizes(self.latent_height, self.latent_width)
        self._downsampling = {num_queries: 2**level for level, num_queries in enumerate(self._grid)}
        if self.layouts is not None and len(self.layouts) != self.num_images:
            raise ValueError(f"{len(self.layouts)} layouts for {self.num_images} images.")

    @property
    def has_layout(self) -> bool:
        """Whether some region can modulate: ``s = 0`` switches a region off exactly, so the attention of a
        layout whose scores are all 0 stays on the fast path, as without a layout."""
        return layouts_modulate(self.layouts)

    def set_step(self, step_index: int, timestep: float, num_steps: int, num_train_timesteps: int = 1000) -> None:
        """Called by the pipeline before each UNet call: modulate during the first `modulation_fraction` of steps."""
        self.step_index = step_index
        self.l_t = timestep_strength(timestep, num_train_timesteps, self.timestep_power)
        self.modulating = self.has_layout and step_index < self.modulation_fraction * num_steps

    def modulates_grid(self, num_queries: int) -> bool:
        """Whether the attention grid of `num_queries` queries is one that `modulated_downsampling` names (all
        grids when it is None)."""
        if self.modulated_downsampling is None:
            return True
        self.grid_size(num_queries)  # a clear error for a grid of no UNet level
        return self._downsampling[num_queries] in self.modulated_downsampling

    def grid_size(self, num_queries: int) -> tuple[int, int]:
        try:
            return self._grid[num_queries]
        except KeyError:
            raise RuntimeError(
                f"an attention layer has {num_queries} queries, which matches no UNet level of a "
                f"{self.latent_height}x{self.latent_width} latent; is the state built for this call's latents?"
            ) from None

    def _per_image_cross_weights(self, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack each image's cross-attention maps into (num_images, 1, Q, K); zeros without a layout."""
        height, width = self.grid_size(num_queries)
        num_keys = self.sequence_length
        positives, negatives = [], []
        for layout in self.layouts:
            if layout is None or not len(layout):
                pos = neg = torch.zeros(num_queries, num_keys)
            else:
                pos, neg = cross_attention_modulation_weights(
                    layout.token_map(num_keys), layout.masks_at(height, width), layout.scores(), layout.areas(),
                    self.size_weight, self.suppress_unclaimed_tokens,
                )
            positives.append(pos)
            negatives.append(neg)
        return torch.stack(positives)[:, None], torch.stack(negatives)[:, None]

    def cross_weights(
        self, num_queries: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 8's positive and negative maps on the key columns that carry weight, built once per resolution.

        Returns ``(positive, negative, columns)``: (num_images, 1, Q, C) maps and the C key indices that some
        region of some image claims.
        """
        key = (num_queries, device)
        if key not in self._cross_cache:
            pos, neg = self._per_image_cross_weights(num_queries)
            columns = torch.nonzero((pos + neg).sum(dim=(0, 1, 2))).flatten()
            self._cross_cache[key] = (pos[..., columns].to(device), neg[..., columns].to(device), columns.to(device))
        return self._cross_cache[key]

    def self_weights(
        self, num_queries: int, device: torch.device, queries: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention modulation weights for the rows of `queries` (all of them by default):
        ``(positive, row_sums)`` of shapes (num_images, 1, rows, Q) and (num_images, 1, rows, 1), as
        :func:`self_attention_modulation_rows` gives them (``negative = row_sums - positive``).

        Only each image's (num_regions, Q) masks, scores and areas are kept, once per resolution; the rows are
        built on demand, since the full (Q, Q) maps cost 2 x 64 MiB per image at 64x64 latents and 2 x 324 MiB
        at 96x96.
        """
        key = (num_queries, device)
        if key not in self._self_cache:
            height, width = self.grid_size(num_queries)
            self._self_cache[key] = [
                None
                if layout is None or not len(layout)
                else (layout.masks_at(height, width).to(device), layout.scores().to(device), layout.areas().to(device))
                for layout in self.layouts
            ]
        num_rows = len(range(num_queries)[queries]) if queries is not None else num_queries
        positives, row_sums = [], []
        for factors in self._self_cache[key]:
            if factors is None:
                positive, sums = torch.zeros(num_rows, num_queries, device=device), torch.zeros(num_rows, device=device)
            else:
                positive, sums = self_attention_modulation_rows(*factors, self.size_weight, queries=queries)
            positives.append(positive)
            row_sums.append(sums)
        return torch.stack(positives)[:, None], torch.stack(row_sums)[:, None, :, None]

    def record(self, probs: torch.Tensor) -> None:
        """Add (num_images, heads, Q, K) cross-attention probabilities, averaged over heads, at latent size."""
        height, width = self.grid_size(probs.shape[-2])
        maps = probs.float().mean(dim=1).transpose(1, 2).reshape(probs.shape[0], -1, height, width)
        if (height, width) != (self.latent_height, self.latent_width):
            maps = F.interpolate(maps, size=(self.latent_height, self.latent_width), mode="bilinear", align_corners=False)
        self._map_sum = maps if self._map_sum is None else self._map_sum + maps
        self._map_count += 1

    def token_attention_maps(self) -> torch.Tensor | None:
        """(num_images, num_keys, latent_height, latent_width): mean over heads, layers and steps."""
        if self._map_sum is None:
            return None
        return self._map_sum / self._map_count


# --------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------
class RealignAttnProcessor:
    r"""Attention processor applying Eq. 8 re-weighting modulation and recording cross-attention maps.

    It does what diffusers' ``AttnProcessor2_0`` does (spatial and group norms, cross norm, ``attn.scale``,
    residual connection, output rescaling, attention masks) and uses scaled-dot-product attention unless the
    current step modulates or records. Then only the conditional half of the classifier-free-guidance batch (the
    whole batch when guidance is off) goes through explicit float32 scores; the unconditional half stays on SDPA.
    Self-attention scores are built a block of queries at a time (:data:`SELF_ATTENTION_CHUNK_ELEMENTS`), so the
    (queries x queries) scores and Eq. 8 maps of a 64x64 latent are never held whole.

    With an IP-Adapter (`ip_adapter`, the layer's ``IPAdapterAttnProcessor2_0``), Eq. 8 applies to the text keys
    only and the image-prompt attention is added as that processor computes it; see
    :class:`RealignIPAdapterAttnProcessor`.
    """

    def __init__(self, state: RealignAttentionState, ip_adapter: torch.nn.Module | None = None):
        self.state = state
        self.ip_adapter = ip_adapter

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]] | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: torch.Tensor | list[torch.Tensor | None] | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        state = self.state
        ip_hidden_states = None
        if isinstance(encoder_hidden_states, tuple):
            # a UNet with an IP-Adapter passes (text states, [image-prompt states per adapter])
            if self.ip_adapter is None:
                raise ValueError(
                    "RealignAttnProcessor got image-prompt states (an IP-Adapter's) on a layer without IP-Adapter "
                    "weights; install the processors with realign_attention_processors after loading the adapter."
                )
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        strength = state.cross_attention_strength if is_cross else state.self_attention_strength
        modulate = state.modulating and strength != 0 and state.l_t != 0 and state.modulates_grid(query.shape[-2])
        record = is_cross and state.record_attention_maps
        if modulate or record:
            hidden_states = self._explicit_attention(
                attn, query, key, value, attention_mask, is_cross, strength if modulate else 0.0, record
            )
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if ip_hidden_states is not None:
            hidden_states = add_ip_adapter_attention(
                hidden_states, query, ip_hidden_states, self.ip_adapter, attn.heads, ip_adapter_masks
            )
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _explicit_attention(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        is_cross: bool,
        strength: float,
        record: bool,
    ) -> torch.Tensor:
        state = self.state
        batch_size = query.shape[0]
        expected = state.num_images * (2 if state.do_classifier_free_guidance else 1)
        if batch_size != expected:
            raise RuntimeError(
                f"RealignAttnProcessor expected a batch of {expected} (num_images={state.num_images}, "
                f"guidance={'on' if state.do_classifier_free_guidance else 'off'}), got {batch_size}."
            )
        split = batch_size - state.num_images  # the conditional half comes last
        outputs = []
        if split:
            uncond_mask = None if attention_mask is None else attention_mask[:split]
            outputs.append(
                F.scaled_dot_product_attention(
                    query[:split], key[:split], value[:split], attn_mask=uncond_mask, scale=attn.scale
                )
            )
        mask = None if attention_mask is None else attention_mask[split:]
        if strength and not is_cross:
            outputs.append(
                self._modulated_self_attention(
                    query[split:].float() * attn.scale, key[split:].float(), value[split:], mask, strength * state.l_t
                )
            )
            return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        scores = torch.matmul(query[split:].float() * attn.scale, key[split:].float().transpose(-1, -2))
        if strength:
            positive, negative, columns = state.cross_weights(scores.shape[-2], scores.device)
            scores = modulate_columns_(scores, positive, negative, strength * state.l_t, columns)
        if mask is not None:
            scores = _apply_attention_mask(scores, mask)
        probs = scores.softmax(dim=-1)
        if record:
            state.record(probs)
        outputs.append(torch.matmul(probs.to(value.dtype), value[split:]))
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def _modulated_self_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        gain: float,
    ) -> torch.Tensor:
        """Eq. 8 on self-attention, one block of queries at a time.

        `query` is already scaled and in float32. Each block's scores, its rows of the positive map (built from
        the masks, see :meth:`RealignAttentionState.self_weights`) and its softmax live only while that block is
        computed, and the modulation is done in place (:func:`modulate_scores_by_rows_`): the row max and min of
        Eq. 8 are per query, so blocks of queries are independent and the result is the unchunked one.
        """
        num_images, heads, num_queries, _ = query.shape
        num_keys = key.shape[-2]
        block = max(1, SELF_ATTENTION_CHUNK_ELEMENTS // (num_images * heads * num_keys))
        key_t = key.transpose(-1, -2)
        out = value.new_empty(num_images, heads, num_queries, value.shape[-1])
        for start in range(0, num_queries, block):
            rows = slice(start, min(start + block, num_queries))
            scores = torch.matmul(query[:, :, rows], key_t)
            positive, row_sums = self.state.self_weights(num_queries, scores.device, rows)
            scores = modulate_scores_by_rows_(scores, positive, row_sums, gain)
            del positive
            if mask is not None:
                scores = _apply_attention_mask(scores, mask[..., rows, :] if mask.shape[-2] > 1 else mask)
            out[:, :, rows] = torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)
        return out


class RealignIPAdapterAttnProcessor(RealignAttnProcessor, torch.nn.Module):
    r""":class:`RealignAttnProcessor` for a cross-attention layer that carries IP-Adapter weights.

    Eq. 8 modulates the attention to the text keys only (the phrase tokens live there); the image-prompt attention
    is added unchanged, as diffusers' ``IPAdapterAttnProcessor2_0`` computes it, with the adapter's own
    ``to_k_ip``/``to_v_ip``, its scale (``set_ip_adapter_scale``) and its ``ip_adapter_masks``. The original
    processor is kept as the submodule ``ip_adapter``, so while this processor is installed the adapter's weights
    stay registered under the layer and follow ``unet.to(...)`` and offload hooks.
    """

    def __init__(self, state: RealignAttentionState, ip_adapter: torch.nn.Module):
        torch.nn.Module.__init__(self)
        RealignAttnProcessor.__init__(self, state, ip_adapter)


def is_ip_adapter_processor(processor) -> bool:
    """Whether a diffusers attention processor carries IP-Adapter weights (``to_k_ip``/``to_v_ip``)."""
    return hasattr(processor, "to_k_ip") and hasattr(processor, "to_v_ip") and hasattr(processor, "scale")


def add_ip_adapter_attention(
    hidden_states: torch.Tensor,
    query: torch.Tensor,
    ip_hidden_states: list[torch.Tensor],
    ip_adapter: torch.nn.Module,
    heads: int,
    ip_adapter_masks: torch.Tensor | list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Add the image-prompt attention of an IP-Adapter to the text attention output, as diffusers'
    ``IPAdapterAttnProcessor2_0`` does: ``hidden_states + scale * SDPA(query, to_k_ip(ip), to_v_ip(ip))`` per
    adapter, in order, skipping adapters whose scale is 0, with the optional per-image masks.

    `hidden_states` is the text attention output (batch, queries, heads * head_dim), `query` the layer's
    (batch, heads, queries, head_dim) query; `ip_adapter` holds ``to_k_ip``, ``to_v_ip`` and ``scale``.
    """
    batch_size = query.shape[0]
    head_dim = query.shape[-1]
    scales = ip_adapter.scale
    if ip_adapter_masks is not None:
        if not isinstance(ip_adapter_masks, list):
            # diffusers also accepts one tensor of shape (num_adapters, 1, height, width)
            ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
        if not len(ip_adapter_masks) == len(scales) == len(ip_hidden_states):
            raise ValueError(
                f"Length of ip_adapter_masks array ({len(ip_adapter_masks)}) must match length of self.scale array "
                f"({len(scales)}) and number of ip_hidden_states ({len(ip_hidden_states)})"
            )
        for index, (mask, scale, ip_state) in enumerate(zip(ip_adapter_masks, scales, ip_hidden_states)):
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
                raise ValueError(
                    "Each element of the ip_adapter_masks array should be a tensor with shape "
                    "[1, num_images_for_ip_adapter, height, width]. Please use `IPAdapterMaskProcessor` to "
                    "preprocess your mask"
                )
            if mask.shape[1] != ip_state.shape[1]:
                raise ValueError(
                    f"Number of masks ({mask.shape[1]}) does not match number of ip images ({ip_state.shape[1]}) "
                    f"at index {index}"
                )
            if isinstance(scale, list) and len(scale) != mask.shape[1]:
                raise ValueError(
                    f"Number of masks ({mask.shape[1]}) does not match number of scales ({len(scale)}) at index {index}"
                )
    else:
        ip_adapter_masks = [None] * len(scales)

    def image_attention(states: torch.Tensor, to_k_ip: torch.nn.Module, to_v_ip: torch.nn.Module) -> torch.Tensor:
        ip_key = to_k_ip(states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        ip_value = to_v_ip(states).view(batch_size, -1, heads, head_dim).transpose(1, 2)
        # no `scale=` and no attention mask: what IPAdapterAttnProcessor2_0 calls, so the branch is bitwise its own
        out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)

    for states, scale, to_k_ip, to_v_ip, mask in zip(
        ip_hidden_states, scales, ip_adapter.to_k_ip, ip_adapter.to_v_ip, ip_adapter_masks
    ):
        if all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0:
            continue
        if mask is None:
            hidden_states = hidden_states + scale * image_attention(states, to_k_ip, to_v_ip)
            continue
        if not isinstance(scale, list):
            scale = [scale] * mask.shape[1]
        for i in range(mask.shape[1]):
            branch = image_attention(states[:, i, :, :], to_k_ip, to_v_ip)
            mask_downsample = IPAdapterMaskProcessor.downsample(
                mask[:, i, :, :], batch_size, branch.shape[1], branch.shape[2]
            ).to(dtype=query.dtype, device=query.device)
            hidden_states = hidden_states + scale[i] * (branch * mask_downsample)
    return hidden_states


def _apply_attention_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boolean masks keep the ``True`` keys; float masks are added to the scores (SDPA's convention)."""
    return scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()


@contextmanager
def realign_attention_processors(unet, state: RealignAttentionState) -> Iterator[None]:
    """Install :class:`RealignAttnProcessor` on the UNet's cross-attention layers (and self-attention layers when
    self-attention modulation is on) for the duration of the block; restore the original processors afterwards,
    also when the block raises.

    A cross-attention layer whose processor carries IP-Adapter weights gets its own
    :class:`RealignIPAdapterAttnProcessor` wrapping that processor, so the image prompt keeps working.
    """
    original = unet.attn_processors
    processor = RealignAttnProcessor(state)
    use_self = state.has_layout and state.self_attention_strength != 0
    replaced = {}
    for name, proc in original.items():
        if name.endswith("attn2.processor"):
            replaced[name] = RealignIPAdapterAttnProcessor(state, proc) if is_ip_adapter_processor(proc) else processor
        elif use_self and name.endswith("attn1.processor"):
            replaced[name] = processor
        else:
            replaced[name] = proc
    unet.set_attn_processor(replaced)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given
