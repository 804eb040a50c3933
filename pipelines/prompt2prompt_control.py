"""Prompt2Prompt attention control for BIVDiff's frame-wise video-editing stage.

Prompt2Prompt (Hertz et al., 2022) edits an image by generating a *source* and an *edited* prompt side by side from
the same noise and, for part of the denoising, forcing the edited branch to use the source branch's attention maps.
BIVDiff runs it on every frame independently (the original made one pipeline call per frame). This module does the
attention part for diffusers' stock ``StableDiffusionPipeline`` run on many frames at once.

Batch layout (the contract with the pipeline)
---------------------------------------------
``prompt = [source, edit] * num_frames`` and ``latents`` = each frame's noise repeated for its (source, edit) pair,
so the latent batch is ``[src_0, edit_0, src_1, edit_1, ...]`` (frame-major pairs). With classifier-free guidance the
UNet sees ``[uncond half, cond half]``, each half in that pair layout. The controller touches only the conditional
half, pair by pair: frame ``f``'s edit branch only ever reads frame ``f``'s source branch. ``num_images_per_prompt``
must be 1.

Usage::

    controller = make_controller(pipe.tokenizer, source_prompt, edit_prompt, "refine", num_inference_steps,
                                 local_blend_words=("car", "car"),
                                 do_classifier_free_guidance=guidance_scale > 1)
    with attention_control(pipe.unet, controller):          # or register_attention_control + set_attn_processor
        for chunk in frame_chunks:
            controller.reset()
            out = pipe([source_prompt, edit_prompt] * len(chunk), latents=chunk.repeat_interleave(2, 0),
                       num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       callback_on_step_end=controller.callback_on_step_end)

The step counter advances only in ``step_callback`` (called by ``callback_on_step_end``); forgetting the callback
leaves the controller at step 0 and it warns once.

Resolution independence
-----------------------
The original hard-coded SD-1.5 at 512 px: self-attention replaced only in layers with at most 16x16 queries, and
local-blend maps reshaped to 16x16. Here both are expressed relative to the latent size: a layer qualifies when its
query count is at most ``fraction * latent_h * latent_w`` (default ``1/16``, i.e. layers downsampled 4x or more from
the latent, which is exactly 16x16 at 512 px). Each layer's downsampling factor is read from the UNet's block
structure by :func:`register_attention_control`.

This file is loaded as a sibling module of a diffusers community pipeline, so it uses absolute imports only and
defines no ``DiffusionPipeline``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionLayer",
    "P2PAttnProcessor",
    "register_attention_control",
    "attention_control",
    "AttentionControl",
    "AttentionEdit",
    "AttentionReplace",
    "AttentionRefine",
    "AttentionReweight",
    "LocalBlend",
    "make_controller",
    "check_prompt2prompt_inputs",
    "token_ids",
    "word_token_indices",
    "global_alignment",
    "replacement_mapper",
    "refinement_mapper",
    "EDIT_TYPES",
]

EDIT_TYPES = ("replace", "refine", "reweight")
DEFAULT_QUERY_FRACTION = 1.0 / 16.0  # reproduces the original's "<= 16x16 queries" for a 64x64 (512 px) latent
_PLACES = ("down", "mid", "up")

StepBounds = Union[float, Tuple[float, float]]
# A fraction, a pair, or per word of the edited prompt (key "default_" for every other token), as the original.
CrossReplaceSteps = Union[StepBounds, Dict[str, StepBounds]]
BlendWords = Union[str, Sequence[Union[str, Sequence[str]]]]


# ----------------------------------------------------------------------------------------------------------------
# Tokens, words and alignment
# ----------------------------------------------------------------------------------------------------------------


def _max_length(tokenizer) -> int:
    return int(tokenizer.model_max_length)


def token_ids(tokenizer, prompt: str) -> List[int]:
    """Token ids of ``prompt`` as the text encoder sees them: BOS ... EOS, truncated to the model length, unpadded."""
    return list(tokenizer(prompt, truncation=True, max_length=_max_length(tokenizer)).input_ids)


def _word_end_marker(tokenizer) -> Optional[str]:
    # CLIP's BPE marks the last token of every word with "</w>"; use it to match whole words only.
    probe = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False).input_ids)
    return "</w>" if probe and probe[-1].endswith("</w>") else None


def word_token_indices(tokenizer, prompt: str, word: str) -> List[int]:
    """Positions (in the encoded prompt, BOS = 0) of every token of every whole-word occurrence of ``word``.

    ``word`` may span several words ("red car"); matching follows the tokenizer (case, punctuation), so "car" is found
    in "A red Car." but not in "scar". Returns ``[]`` when the word does not occur.
    """
    target = list(tokenizer(word, add_special_tokens=False).input_ids)
    if not word.strip() or not target:
        return []
    ids = token_ids(tokenizer, prompt)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    marker = _word_end_marker(tokenizer)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    out: List[int] = []
    n = len(target)
    for start in range(len(ids) - n + 1):
        if ids[start : start + n] != target or any(i in special for i in ids[start : start + n]):
            continue
        if marker is not None and start > 0 and ids[start - 1] not in special:
            if not tokens[start - 1].endswith(marker):
                continue  # inside a longer word
        out.extend(range(start, start + n))
    return sorted(set(out))


def global_alignment(
    x: Sequence, y: Sequence, match: float = 1.0, mismatch: float = -1.0, gap: float = 0.0
) -> List[Tuple[Optional[int], Optional[int]]]:
    """Needleman-Wunsch global alignment of two sequences.

    Returns the alignment columns from first to last as ``(i, j)`` index pairs, ``None`` marking a gap. The default
    scores (match 1, mismatch -1, gap 0; those of the Prompt2Prompt paper's code) make the aligned pairs a longest
    common subsequence. Among equally good alignments, the trace-back (from the end) takes a match whenever it is
    optimal, so an insertion is placed before a repeated token rather than after it ("a cat" -> "a black cat" aligns
    the "c" of "cat", not the one of "black").
    """
    n, m = len(x), len(y)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * gap
    for j in range(1, m + 1):
        score[0][j] = j * gap
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            pair = match if x[i - 1] == y[j - 1] else mismatch
            score[i][j] = max(score[i - 1][j - 1] + pair, score[i - 1][j] + gap, score[i][j - 1] + gap)
    columns: List[Tuple[Optional[int], Optional[int]]] = []
    i, j = n, m
    while i > 0 or j > 0:
        if i > 0 and j > 0:
            pair = match if x[i - 1] == y[j - 1] else mismatch
            if score[i][j] == score[i - 1][j - 1] + pair:
                columns.append((i - 1, j - 1))
                i, j = i - 1, j - 1
                continue
        if j > 0 and (i == 0 or score[i][j] == score[i][j - 1] + gap):
            columns.append((None, j - 1))
            j -= 1
        else:
            columns.append((i - 1, None))
            i -= 1
    columns.reverse()
    return columns


def replacement_mapper(tokenizer, source_prompt: str, prompt: str) -> torch.Tensor:
    """Token mapper ``M`` (L x L, L = tokenizer length) of a replace edit: ``edit[.., j] = sum_i src[.., i] M[i, j]``.

    Replace needs prompts of equal token count; the mapper is then position to position (the identity), which is
    what the original word mapper reduces to when swapped words have equal token counts.
    """
    n_src, n_edit = len(token_ids(tokenizer, source_prompt)), len(token_ids(tokenizer, prompt))
    if n_src != n_edit:
        raise ValueError(_replace_length_message(source_prompt, prompt, n_src, n_edit))
    return torch.eye(_max_length(tokenizer))


def refinement_mapper(tokenizer, source_prompt: str, prompt: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather index and mixing weights for a refine edit, from a global alignment of the two token sequences.

    Returns ``(mapper, alphas)``, both of length L (the tokenizer length): edit token ``j`` takes the source map of
    token ``mapper[j]`` with weight ``alphas[j]`` (1 where the token is aligned to an identical source token, 0 for
    new tokens, which keep their own maps). Positions after the edited prompt map to the same positions of the
    source, as in the original (for a shorter edited prompt, some of them are real source tokens).
    """
    x, y = token_ids(tokenizer, source_prompt), token_ids(tokenizer, prompt)
    length = _max_length(tokenizer)
    mapper = torch.zeros(length, dtype=torch.long)
    alphas = torch.zeros(length)
    for i, j in global_alignment(x, y):
        if i is not None and j is not None and x[i] == y[j]:
            mapper[j] = i
            alphas[j] = 1.0
    mapper[len(y) :] = torch.arange(len(y), length)
    alphas[len(y) :] = 1.0
    return mapper, alphas


# ----------------------------------------------------------------------------------------------------------------
# Validation (used by the pipeline's check_inputs, before any model runs)
# ----------------------------------------------------------------------------------------------------------------


def _replace_length_message(source_prompt: str, prompt: str, n_src: int, n_edit: int) -> str:
    return (
        f"edit_type='replace' (and 'reweight') needs the source and edited prompts to have the same number of "
        f"tokens, but the source prompt {source_prompt!r} has {n_src} and the edited prompt {prompt!r} has "
        f"{n_edit}. Use edit_type='refine' for prompts of different lengths."
    )


def _step_bounds(value: StepBounds, name: str) -> Tuple[float, float]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1] or a (start, end) pair, got {value!r}.")
    if isinstance(value, (int, float)):
        bounds = (0.0, float(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        bounds = (float(value[0]), float(value[1]))
    else:
        raise ValueError(f"{name} must be a fraction of the steps in [0, 1] or a (start, end) pair, got {value!r}.")
    if not 0.0 <= bounds[0] <= bounds[1] <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= start <= end <= 1 (fractions of the steps), got {value!r}.")
    return bounds


def _step_range(value: StepBounds, num_steps: int, name: str) -> Tuple[int, int]:
    start, end = _step_bounds(value, name)
    # floor, as the original (int(0.4 * 50) = 20), with a tolerance for fractions such as 0.29 * 100.
    return int(math.floor(start * num_steps + 1e-6)), int(math.floor(end * num_steps + 1e-6))


def _cross_replace_bounds(value: CrossReplaceSteps) -> Dict[str, Tuple[float, float]]:
    """`cross_replace_steps` as {word: (start, end)}, "default_" for every token no word key names."""
    if not isinstance(value, dict):
        return {"default_": _step_bounds(value, "cross_replace_steps")}
    bounds = {"default_": (0.0, 1.0)}
    for word, steps in value.items():
        if not isinstance(word, str):
            raise ValueError(f"cross_replace_steps keys must be words of the edited prompt, got {word!r}.")
        bounds[word] = _step_bounds(steps, f"cross_replace_steps[{word!r}]")
    return bounds


def cross_replace_alphas(tokenizer, prompt: str, value: CrossReplaceSteps, num_steps: int) -> torch.Tensor:
    """(num_steps + 1, tokens) table, 1 where the edited prompt's token takes the edit at that step.

    As the original: a window (start, end) is on at steps int(start * (N + 1)) <= i < int(end * (N + 1)) (over
    N + 1 rows), "default_" fills every column, then each word's own window overwrites that word's tokens.
    """
    alphas = torch.zeros(num_steps + 1, _max_length(tokenizer))
    for word, (start, end) in _cross_replace_bounds(value).items():
        rows = slice(int(start * (num_steps + 1)), int(end * (num_steps + 1)))
        columns = slice(None) if word == "default_" else word_token_indices(tokenizer, prompt, word)
        alphas[:, columns] = 0.0
        alphas[rows, columns] = 1.0
    return alphas


def equalizer(tokenizer, prompt: str, reweight: Optional[Dict[str, float]]) -> Optional[torch.Tensor]:
    """(tokens,) scale of each edited token's cross-attention: each `reweight` word's strength, 1 elsewhere."""
    if not reweight:
        return None
    scale = torch.ones(_max_length(tokenizer))
    for word, strength in reweight.items():
        scale[word_token_indices(tokenizer, prompt, word)] = float(strength)
    return scale


def _blend_words_per_prompt(words: BlendWords) -> Tuple[List[str], List[str]]:
    """Normalise local-blend words to (source words, edit words).

    - ``"car"``: the same word for both prompts;
    - a pair, as in the original: ``("car", "bicycle")`` or ``(["red", "car"], ["bicycle"])`` = (source, edit);
    - any other list of strings (``["car"]``, ``["red", "car", "road"]``): the same list for both prompts.
    A two-item list of strings is read as (source, edit); for two words in both prompts pass ``[[a, b], [a, b]]``.
    """
    if isinstance(words, str):
        return [words], [words]
    if not isinstance(words, (list, tuple)) or len(words) == 0:
        raise ValueError(f"local_blend_words must be a word, a (source, edit) pair or a list of words, got {words!r}.")
    if len(words) == 2:
        src, edit = words
        src_list = [src] if isinstance(src, str) else list(src)
        edit_list = [edit] if isinstance(edit, str) else list(edit)
    elif all(isinstance(w, str) for w in words):
        src_list, edit_list = list(words), list(words)
    else:
        raise ValueError(f"local_blend_words must be a word, a (source, edit) pair or a list of words, got {words!r}.")
    for w in src_list + edit_list:
        if not isinstance(w, str):
            raise ValueError(f"local_blend_words must contain strings, got {w!r} in {words!r}.")
    return src_list, edit_list


def check_prompt2prompt_inputs(
    tokenizer,
    source_prompt: str,
    prompt: str,
    edit_type: str,
    local_blend_words: Optional[BlendWords] = None,
    cross_replace_steps: CrossReplaceSteps = 0.4,
    self_replace_steps: StepBounds = 0.4,
    local_blend_threshold: float = 0.3,
    reweight: Optional[Dict[str, float]] = None,
) -> None:
    """Raise a ``ValueError`` naming the bad input and the fix; call before any model runs."""
    for name, value in (("source_prompt", source_prompt), ("prompt", prompt)):
        if not isinstance(value, str):
            raise ValueError(f"Prompt2Prompt needs {name} to be one string (the same for every frame), got {value!r}.")
    if not isinstance(edit_type, str) or edit_type not in EDIT_TYPES:
        raise ValueError(
            f"Unknown Prompt2Prompt edit_type {edit_type!r}: use 'replace' (prompts with the same number of tokens, "
            f"e.g. one word swapped), 'refine' (prompts of different lengths, e.g. words added) or 'reweight' (the "
            f"source's maps by position, scaled by `reweight`)."
        )
    if edit_type == "reweight" and not reweight:
        raise ValueError("edit_type='reweight' needs `reweight`, a dict {word of the edited prompt: strength}.")
    strengths = reweight.items() if isinstance(reweight, dict) else [(None, None)]
    if reweight is not None and not all(isinstance(k, str) and type(v) in (int, float) for k, v in strengths):
        raise ValueError(f"`reweight` must be a dict {{word of the edited prompt: strength}}, got {reweight!r}.")
    words = [w for w in _cross_replace_bounds(cross_replace_steps) if w != "default_"] + list(reweight or {})
    for word in words:
        if not word_token_indices(tokenizer, prompt, word):
            raise ValueError(
                f"{word!r} (a key of `cross_replace_steps` or `reweight`) is not a word of the edited prompt "
                f"{prompt!r}."
            )
    _step_bounds(self_replace_steps, "self_replace_steps")
    if edit_type in ("replace", "reweight"):
        n_src, n_edit = len(token_ids(tokenizer, source_prompt)), len(token_ids(tokenizer, prompt))
        if n_src != n_edit:
            raise ValueError(_replace_length_message(source_prompt, prompt, n_src, n_edit))
    if local_blend_words is not None:
        if not 0.0 <= float(local_blend_threshold) <= 1.0:
            raise ValueError(f"local_blend_threshold must be in [0, 1], got {local_blend_threshold!r}.")
        src_words, edit_words = _blend_words_per_prompt(local_blend_words)
        for which, text, words in (("source", source_prompt, src_words), ("edited", prompt, edit_words)):
            for word in words:
                if not word_token_indices(tokenizer, text, word):
                    raise ValueError(
                        f"local_blend_words: {word!r} is not a word of the {which} prompt {text!r}; give words that "
                        f"appear in it (source words first, edited words second)."
                    )


# ----------------------------------------------------------------------------------------------------------------
# Attention processor
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayer:
    """Where an attention layer sits: processor ``name``, ``place`` ("down", "mid", "up" or "other") and
    ``downsample``, its spatial downsampling relative to the latent (1, 2, 4, ...; ``None`` if unknown)."""

    name: str
    place: str
    downsample: Optional[int]

    def query_fraction(self) -> Optional[float]:
        """Query count of this layer as a fraction of ``latent_h * latent_w``."""
        return None if self.downsample is None else 1.0 / float(self.downsample * self.downsample)

    def within(self, fraction: float) -> bool:
        """True when the layer's query count is at most ``fraction * latent_h * latent_w``."""
        q = self.query_fraction()
        return q is not None and q <= fraction * (1.0 + 1e-9)


def _unet_layers(unet) -> Dict[str, AttentionLayer]:
    if not (hasattr(unet, "down_blocks") and hasattr(unet, "up_blocks") and hasattr(unet, "attn_processors")):
        raise TypeError(
            f"register_attention_control needs a diffusers UNet2DConditionModel-like model, got {type(unet).__name__}."
        )
    down: List[int] = []
    factor = 1
    for block in unet.down_blocks:
        down.append(factor)
        if getattr(block, "downsamplers", None):
            factor *= 2
    mid = factor
    up: List[int] = []
    for block in unet.up_blocks:
        up.append(factor)
        if getattr(block, "upsamplers", None):
            factor = max(factor // 2, 1)
    layers = {}
    for name in unet.attn_processors:
        parts = name.split(".")
        place, ds = "other", None
        if parts[0] == "down_blocks":
            place, ds = "down", down[int(parts[1])]
        elif parts[0] == "mid_block":
            place, ds = "mid", mid
        elif parts[0] == "up_blocks":
            place, ds = "up", up[int(parts[1])]
        layers[name] = AttentionLayer(name=name, place=place, downsample=ds)
    return layers


class P2PAttnProcessor:
    """Attention processor that hands attention probabilities to a Prompt2Prompt controller.

    Where the controller acts (``controller.needs_probs``), the probabilities are computed explicitly like diffusers'
    ``AttnProcessor`` (``attn.get_attention_scores``: baddbmm + softmax), passed through the controller and applied to
    the values. Elsewhere (e.g. full-resolution self-attention, which the edit never touches) it uses PyTorch's fused
    ``scaled_dot_product_attention`` so the large maps are never materialised; ``sdpa_when_idle=False`` forces the
    explicit path everywhere. With a controller that changes nothing the output equals the stock processors'.
    """

    def __init__(self, controller: "AttentionControl", layer: AttentionLayer, sdpa_when_idle: bool = True):
        self.controller = controller
        self.layer = layer
        self.sdpa_when_idle = sdpa_when_idle

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not is_cross:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        active = self.controller.needs_probs(self.layer, is_cross)
        if active or not self.sdpa_when_idle:
            probs = attn.get_attention_scores(query, key, attention_mask)
            if active:
                probs = self.controller(probs, is_cross, self.layer, attn.heads)
            hidden_states = torch.bmm(probs, value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=attn.scale
            )
        hidden_states = attn.batch_to_head_dim(hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def register_attention_control(unet, controller: "AttentionControl", sdpa_when_idle: bool = True) -> dict:
    """Install a :class:`P2PAttnProcessor` bound to ``controller`` on every attention layer of ``unet``.

    Each layer knows whether it is in the down, mid or up blocks and its downsampling factor; self- and
    cross-attention are told apart at call time (cross-attention receives ``encoder_hidden_states``). Returns the
    previous processors; restore them with ``unet.set_attn_processor(previous)`` (or use :func:`attention_control`).
    """
    previous = dict(unet.attn_processors)
    layers = _unet_layers(unet)
    unet.set_attn_processor(
        {name: P2PAttnProcessor(controller, layers[name], sdpa_when_idle=sdpa_when_idle) for name in previous}
    )
    return previous


@contextlib.contextmanager
def attention_control(unet, controller: "AttentionControl", sdpa_when_idle: bool = True):
    """Context manager: the controller's processors inside the block, the previous ones restored after it."""
    previous = register_attention_control(unet, controller, sdpa_when_idle=sdpa_when_idle)
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(previous))


# ----------------------------------------------------------------------------------------------------------------
# Local blend
# ----------------------------------------------------------------------------------------------------------------


def _map_hw(queries: int, height: int, width: int, downsample: Optional[int]) -> Tuple[int, int]:
    """Spatial size of a layer's attention map, from its query count and the latent size."""
    factors = ([downsample] if downsample else []) + [2**k for k in range(8)]
    for d in factors:
        for h, w in ((math.ceil(height / d), math.ceil(width / d)), (height // d, width // d)):
            if h * w == queries:
                return h, w
    raise ValueError(f"cannot place {queries} attention queries on a {height}x{width} latent")


class LocalBlend:
    """Keep the edit local: only latent pixels that attend to the blend words may differ from the source branch.

    After every denoising step, per frame: the blend words' cross-attention maps (conditional half; source words in
    the source prompt, edited words in the edited prompt; head- and layer-averaged, summed over the steps so far as
    in the original) are taken from the down and up cross-attention layers whose query count is at most
    ``query_fraction * latent_h * latent_w`` (default 1/16: the 16x16 layers at 512 px, as the original; if the UNet
    has no layer that small, its lowest-resolution down/up cross-attention layers). Each prompt's map is 3x3
    max-pooled at the map's own resolution (the original's dilation), resized to the latent size (nearest),
    normalised by its maximum and thresholded; the two prompts' masks are united, and
    ``x_edit = x_src + mask * (x_edit - x_src)``. The last mask is kept in ``last_mask`` (frames, 1, h, w).

    ``words``: a word for both prompts, a (source, edit) pair (each a word or a list of words) as in the original,
    or a list of words used for both prompts. A controller binds it to its tokenizer and prompts.
    """

    def __init__(self, words: BlendWords, threshold: float = 0.3, query_fraction: float = DEFAULT_QUERY_FRACTION):
        self.source_words, self.edit_words = _blend_words_per_prompt(words)
        self.threshold = float(threshold)
        self.query_fraction = float(query_fraction)
        self.word_alphas: Optional[torch.Tensor] = None  # (2, L): token weights for the source and edited prompt
        self.reset()

    def bind(self, tokenizer, source_prompt: str, prompt: str) -> "LocalBlend":
        alphas = torch.zeros(2, _max_length(tokenizer))
        for row, (which, text, words) in enumerate(
            (("source", source_prompt, self.source_words), ("edited", prompt, self.edit_words))
        ):
            for word in words:
                idx = word_token_indices(tokenizer, text, word)
                if not idx:
                    raise ValueError(f"local_blend_words: {word!r} is not a word of the {which} prompt {text!r}.")
                alphas[row, idx] = 1.0
        self.word_alphas = alphas
        return self

    def reset(self) -> None:
        self._sums: Dict[str, torch.Tensor] = {}
        self._layers: Dict[str, AttentionLayer] = {}
        self.last_mask: Optional[torch.Tensor] = None

    @staticmethod
    def uses(layer: AttentionLayer) -> bool:
        return layer.place in ("down", "up")

    def accumulate(self, layer: AttentionLayer, pair_maps: torch.Tensor) -> None:
        """Add one layer's head-averaged maps ``(frames, 2, queries, tokens)`` of the current step."""
        if self.word_alphas is None:
            raise RuntimeError("LocalBlend is not bound to prompts; pass it to a controller (which binds it).")
        alphas = self.word_alphas.to(device=pair_maps.device, dtype=torch.float32)
        word_maps = torch.einsum("fpqk,pk->fpq", pair_maps.float(), alphas)
        total = self._sums.get(layer.name)
        if total is not None and total.shape != word_maps.shape:
            raise RuntimeError(
                "LocalBlend saw a different number of frames within one run; call controller.reset() between chunks."
            )
        self._sums[layer.name] = word_maps if total is None else total + word_maps
        self._layers[layer.name] = layer

    def _selected(self) -> List[str]:
        chosen = [n for n, layer in self._layers.items() if layer.within(self.query_fraction)]
        if chosen or not self._layers:
            return chosen
        smallest = min(self._sums[n].shape[-1] for n in self._layers)
        return [n for n in self._layers if self._sums[n].shape[-1] == smallest]

    def mask(self, height: int, width: int) -> Optional[torch.Tensor]:
        """Binary mask (frames, 1, height, width) from the maps accumulated so far, or None before any."""
        names = self._selected()
        if not names:
            return None
        maps = []
        for n in names:
            s = self._sums[n]
            h, w = _map_hw(s.shape[-1], height, width, self._layers[n].downsample)
            maps.append(s.reshape(s.shape[0] * 2, 1, h, w))
        size = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=tuple(size), mode="nearest") for m in maps]
        avg = torch.stack(maps).mean(0)
        avg = F.max_pool2d(avg, kernel_size=3, stride=1, padding=1)
        avg = F.interpolate(avg, size=(height, width), mode="nearest")
        avg = avg / avg.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(avg.dtype).tiny)
        per_prompt = avg.gt(self.threshold).reshape(-1, 2, 1, height, width)
        return (per_prompt[:, 0] | per_prompt[:, 1]).float()

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        mask = self.mask(latents.shape[-2], latents.shape[-1])
        if mask is None:
            return latents
        frames = mask.shape[0]
        if latents.shape[0] != 2 * frames:
            raise ValueError(
                f"LocalBlend expects latents of {2 * frames} = 2 x {frames} frames in (source, edit) pairs, "
                f"got batch {latents.shape[0]}."
            )
        self.last_mask = mask
        pairs = latents.reshape(frames, 2, *latents.shape[1:])
        src, edit = pairs[:, 0], pairs[:, 1]
        mask = mask.to(device=latents.device, dtype=latents.dtype)
        edit = src + mask * (edit - src)
        return torch.stack([src, edit], dim=1).reshape(latents.shape)


# ----------------------------------------------------------------------------------------------------------------
# Controllers
# ----------------------------------------------------------------------------------------------------------------


class AttentionControl:
    """Base controller: sees the conditional (source, edit) pairs, changes nothing.

    ``store_maps=True`` keeps the head-averaged cross-attention maps of the conditional half per step and layer:
    ``attention_maps[step][layer_name]`` is (frames, 2, queries, tokens) as used (after any edit) and
    ``raw_attention_maps[step][layer_name]`` the same before the edit (float32, on the CPU). Off by default so
    memory stays flat.
    """

    def __init__(
        self, num_inference_steps: int, *, do_classifier_free_guidance: bool = True, store_maps: bool = False
    ):
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps!r}.")
        self.num_inference_steps = int(num_inference_steps)
        self.do_classifier_free_guidance = bool(do_classifier_free_guidance)
        self.store_maps = bool(store_maps)
        self.local_blend: Optional[LocalBlend] = None
        self._warned_no_callback = False
        self.reset()

    # -- state ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Clear the step counter and all per-run state (call before each chunk of frames)."""
        self.cur_step = 0
        self.num_frames: Optional[int] = None
        self.attention_maps: List[Dict[str, torch.Tensor]] = []
        self.raw_attention_maps: List[Dict[str, torch.Tensor]] = []
        self._seen: set = set()
        if self.local_blend is not None:
            self.local_blend.reset()

    def step_callback(self, latents: torch.Tensor) -> torch.Tensor:
        """Call after each scheduler step with latents (2 x frames, C, h, w) in pair layout; returns them, blended
        when a LocalBlend is set, and advances the step counter."""
        if self.num_frames is not None and latents.shape[0] != 2 * self.num_frames:
            raise ValueError(
                f"Prompt2Prompt controller split the UNet batch into {self.num_frames} (source, edit) pairs but the "
                f"latents hold {latents.shape[0]} = 2 x {latents.shape[0] / 2:g} frames: its "
                f"do_classifier_free_guidance={self.do_classifier_free_guidance} does not match the pipeline call "
                f"(guidance_scale > 1 means True)."
            )
        if self.local_blend is not None:
            latents = self.local_blend(latents)
        self.cur_step += 1
        self._seen.clear()
        return latents

    def callback_on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Ready-made ``callback_on_step_end`` for diffusers pipelines (needs "latents" in the tensor inputs)."""
        if "latents" not in callback_kwargs:
            raise ValueError('callback_on_step_end_tensor_inputs must include "latents" for Prompt2Prompt.')
        return {"latents": self.step_callback(callback_kwargs["latents"])}

    # -- what the controller acts on --------------------------------------------------------------------------------
    def _in(self, bounds: Tuple[int, int]) -> bool:
        return bounds[0] <= self.cur_step < bounds[1]

    def _edits_cross(self) -> bool:
        return False

    def _edits_self(self, layer: AttentionLayer) -> bool:
        return False

    def _edit_cross(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        return edit

    def needs_probs(self, layer: AttentionLayer, is_cross: bool) -> bool:
        """Whether the processor must compute explicit probabilities for this layer at the current step."""
        if layer.name in self._seen and not self._warned_no_callback:
            self._warned_no_callback = True
            warnings.warn(
                "Prompt2Prompt controller: the UNet ran again without step_callback(); pass "
                "callback_on_step_end=controller.callback_on_step_end so edits follow the denoising steps.",
                stacklevel=2,
            )
        self._seen.add(layer.name)
        if layer.place not in _PLACES:
            return False
        if is_cross:
            blend = self.local_blend is not None and self.local_blend.uses(layer)
            return self.store_maps or blend or self._edits_cross()
        return self._edits_self(layer)

    # -- the edit -----------------------------------------------------------------------------------------------------
    def _pairs(self, probs: torch.Tensor, heads: int) -> Tuple[int, torch.Tensor]:
        total = probs.shape[0] // heads
        if self.do_classifier_free_guidance:
            if total % 2:
                raise ValueError(
                    f"Prompt2Prompt controller expects a classifier-free-guidance batch [uncond, cond], got an odd "
                    f"batch of {total}; create the controller with do_classifier_free_guidance=False without CFG."
                )
            start = total // 2
        else:
            start = 0
        cond = total - start
        if cond % 2:
            raise ValueError(
                f"Prompt2Prompt controller expects (source, edit) pairs per frame, got a conditional batch of {cond}; "
                f"use prompt=[source, edit] * num_frames and num_images_per_prompt=1."
            )
        frames = cond // 2
        if self.num_frames is None:
            self.num_frames = frames
        elif frames != self.num_frames:
            raise ValueError(
                f"Prompt2Prompt controller saw {self.num_frames} frames, now {frames}; call controller.reset() "
                f"before each chunk of frames."
            )
        cond_probs = probs[start * heads :].reshape(frames, 2, heads, *probs.shape[1:])
        return start * heads, cond_probs

    def __call__(self, probs: torch.Tensor, is_cross: bool, layer: AttentionLayer, heads: int) -> torch.Tensor:
        """Edit attention probabilities (batch x heads, queries, keys) of one layer; returns the probabilities."""
        offset, pairs = self._pairs(probs, heads)
        src, edit = pairs[:, 0], pairs[:, 1]
        changed = False
        if is_cross:
            if self._edits_cross():
                edit = self._edit_cross(src, edit)
                changed = True
        elif self._edits_self(layer):
            edit = src
            changed = True
        used = torch.stack([src, edit], dim=1) if changed else pairs
        if is_cross:
            if self.store_maps or self.local_blend is not None:
                mean_used = used.mean(dim=2)
            if self.store_maps:
                while len(self.attention_maps) <= self.cur_step:
                    self.attention_maps.append({})
                    self.raw_attention_maps.append({})
                self.attention_maps[self.cur_step][layer.name] = mean_used.detach().float().cpu()
                self.raw_attention_maps[self.cur_step][layer.name] = pairs.mean(dim=2).detach().float().cpu()
            if self.local_blend is not None and self.local_blend.uses(layer):
                self.local_blend.accumulate(layer, mean_used.detach())
        if not changed:
            return probs
        return torch.cat([probs[:offset], used.reshape(-1, *probs.shape[1:])], dim=0)


class AttentionEdit(AttentionControl):
    """Shared Prompt2Prompt edit logic, as the original: the edit's cross-attention becomes the edit type's maps
    (scaled per token by ``reweight``) where ``cross_replace_alphas`` is on and stays its own elsewhere; self-attention
    of the edit is replaced by the source's during ``self_replace_steps`` in layers with query count at most
    ``self_replace_query_fraction * latent_h * latent_w`` (default 1/16 = the original's 16x16 layers at 512 px)."""

    def __init__(
        self,
        tokenizer,
        source_prompt: str,
        prompt: str,
        num_inference_steps: int,
        cross_replace_steps: CrossReplaceSteps = 0.4,
        self_replace_steps: StepBounds = 0.4,
        local_blend: Optional[LocalBlend] = None,
        *,
        reweight: Optional[Dict[str, float]] = None,
        self_replace_query_fraction: float = DEFAULT_QUERY_FRACTION,
        do_classifier_free_guidance: bool = True,
        store_maps: bool = False,
    ):
        super().__init__(
            num_inference_steps, do_classifier_free_guidance=do_classifier_free_guidance, store_maps=store_maps
        )
        self.source_prompt, self.prompt = source_prompt, prompt
        self.cross_alphas = cross_replace_alphas(tokenizer, prompt, cross_replace_steps, self.num_inference_steps)
        start, end = _cross_replace_bounds(cross_replace_steps)["default_"]
        n = self.num_inference_steps + 1
        self.cross_replace_range = (int(start * n), int(end * n))
        self.equalizer = equalizer(tokenizer, prompt, reweight)
        self.self_replace_range = _step_range(self_replace_steps, self.num_inference_steps, "self_replace_steps")
        self.self_replace_query_fraction = float(self_replace_query_fraction)
        self.num_tokens = _max_length(tokenizer)
        if local_blend is not None:
            local_blend.bind(tokenizer, source_prompt, prompt)
            local_blend.reset()
        self.local_blend = local_blend
        self._cache: Dict[Tuple, torch.Tensor] = {}
        self._build_mapping(tokenizer)

    def _build_mapping(self, tokenizer) -> None:
        raise NotImplementedError

    def _on(self, tensor: torch.Tensor, like: torch.Tensor, key: str) -> torch.Tensor:
        dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
        k = (key, like.device, dtype)
        if k not in self._cache:
            self._cache[k] = tensor.to(device=like.device, dtype=dtype)
        return self._cache[k]

    def _check_tokens(self, attn: torch.Tensor) -> None:
        if attn.shape[-1] != self.num_tokens:
            raise ValueError(
                f"cross-attention has {attn.shape[-1]} text tokens but the controller's tokenizer has "
                f"{self.num_tokens}; build the controller with the pipeline's own tokenizer."
            )

    def _edits_cross(self) -> bool:
        return self.cur_step < len(self.cross_alphas) and bool(self.cross_alphas[self.cur_step].any())

    def _edits_self(self, layer: AttentionLayer) -> bool:
        return self._in(self.self_replace_range) and layer.within(self.self_replace_query_fraction)

    def _edit_cross(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        self._check_tokens(src)
        replaced = self._replace_cross(src, edit)
        if self.equalizer is not None:
            replaced = replaced * self._on(self.equalizer, src, "equalizer")
        alphas = self._on(self.cross_alphas[self.cur_step], src, f"alphas{self.cur_step}")
        if bool((alphas == 1).all()):
            return replaced
        return replaced * alphas + edit * (1 - alphas)

    def _replace_cross(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AttentionReplace(AttentionEdit):
    """Word swap (prompts with the same token count): during ``cross_replace_steps`` the edited prompt's
    cross-attention maps are the source's, remapped through the token mapper (``replacement_mapper``)."""

    def _build_mapping(self, tokenizer) -> None:
        self.mapper = replacement_mapper(tokenizer, self.source_prompt, self.prompt)

    def _replace_cross(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        return torch.einsum("fhqi,ij->fhqj", src, self._on(self.mapper, src, "mapper"))


class AttentionRefine(AttentionEdit):
    """Prompt refinement (prompts of different lengths): during ``cross_replace_steps`` each edited token aligned to
    an identical source token takes that token's source map; new tokens keep their own
    (``alpha * src[mapper] + (1 - alpha) * edit``, see ``refinement_mapper``)."""

    def _build_mapping(self, tokenizer) -> None:
        self.mapper, self.alphas = refinement_mapper(tokenizer, self.source_prompt, self.prompt)

    def _replace_cross(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        gathered = src.index_select(-1, self._on(self.mapper, src, "mapper"))
        alphas = self._on(self.alphas, src, "alphas")
        return gathered * alphas + edit * (1 - alphas)


class AttentionReweight(AttentionEdit):
    """Reweighting, as the original's: the edit takes the source's cross-attention maps by token position, each
    column scaled by its ``reweight`` strength (no renormalisation). With identical prompts and strength 1 it is no
    edit; ``reweight`` also scales the maps of "replace" and "refine" edits."""

    def _build_mapping(self, tokenizer) -> None:
        pass

    def _replace_cross(self, src: torch.Tensor, edit: torch.Tensor) -> torch.Tensor:
        return src


def make_controller(
    tokenizer,
    source_prompt: str,
    prompt: str,
    edit_type: str,
    num_inference_steps: int,
    cross_replace_steps: CrossReplaceSteps = 0.4,
    self_replace_steps: StepBounds = 0.4,
    local_blend_words: Optional[BlendWords] = None,
    local_blend_threshold: float = 0.3,
    *,
    reweight: Optional[Dict[str, float]] = None,
    self_replace_query_fraction: float = DEFAULT_QUERY_FRACTION,
    local_blend_query_fraction: float = DEFAULT_QUERY_FRACTION,
    do_classifier_free_guidance: bool = True,
    store_maps: bool = False,
) -> AttentionEdit:
    """Build the controller for one (source, edited) prompt pair, validating the inputs first.

    ``edit_type``: "replace" (same token count), "refine" or "reweight" (same token count; needs ``reweight``).
    ``cross_replace_steps``: a fraction of the steps from the start, a (start, end) pair of fractions, or a dict of
    such per word of the edited prompt ("default_" for the other tokens); ``self_replace_steps``: a fraction or a
    pair. ``reweight``: {word of the edited prompt: strength} scaling its cross-attention. ``local_blend_words``: see
    :class:`LocalBlend`. ``do_classifier_free_guidance`` must match the pipeline call (``guidance_scale > 1``).
    """
    check_prompt2prompt_inputs(
        tokenizer,
        source_prompt,
        prompt,
        edit_type,
        local_blend_words=local_blend_words,
        cross_replace_steps=cross_replace_steps,
        self_replace_steps=self_replace_steps,
        local_blend_threshold=local_blend_threshold,
        reweight=reweight,
    )
    blend = None
    if local_blend_words is not None:
        blend = LocalBlend(local_blend_words, local_blend_threshold, query_fraction=local_blend_query_fraction)
    cls = {"replace": AttentionReplace, "refine": AttentionRefine, "reweight": AttentionReweight}[edit_type]
    return cls(
        tokenizer,
        source_prompt,
        prompt,
        num_inference_steps,
        cross_replace_steps,
        self_replace_steps,
        blend,
        reweight=reweight,
        self_replace_query_fraction=self_replace_query_fraction,
        do_classifier_free_guidance=do_classifier_free_guidance,
        store_maps=store_maps,
    )
