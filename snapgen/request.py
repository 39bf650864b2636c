"""The generation contract: what a caller asks for, checked once against what a model offers.

Every front door (``snapgen generate``, :class:`~snapgen.pipeline.SnapGenPipeline`, the HTTP API, the
worker) translates its own dialect into a :class:`GenerationRequest`; :meth:`GenerationRequest.resolve`
checks it against the model's :class:`ModelCard` and returns a :class:`ResolvedRequest` with every
default filled in and one prompt, negative prompt and seed per image. That is the only place where
defaults are chosen and limits enforced, so every front door gives the same answer at every edge.
Torch-free: an API process imports it without loading a model.

The seed rule. Images are numbered ``0 .. N-1``, prompt-major (copy ``k`` of prompt ``p`` is image
``p * n + k``). One seed ``S`` gives image ``i`` the seed ``S + i``, so ``S + N - 1`` must not pass
:data:`MAX_SEED` (nothing wraps around); a sequence gives one seed per image. Each seed picks the
portable noise of its image (``snapgen.noise``), which is what makes an image reproducible anywhere.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

MAX_SEED = 2**32 - 1  # seeds are uint32: what the portable noise generator's key holds
OUTPUT_FORMATS = ("png", "jpeg", "webp")


class InvalidRequestError(ValueError):
    """Bad user input; ``field`` names the argument, and the message says what is allowed."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def expand_seeds(seed: int, count: int) -> tuple[int, ...]:
    """The seed rule: image ``i`` of ``count`` gets ``seed + i``."""
    _check_seed(seed)
    if seed + count - 1 > MAX_SEED:
        raise InvalidRequestError(
            "seed",
            f"{seed} + {count} images passes the largest seed {MAX_SEED} (image i uses seed + i); "
            f"allowed: an integer from 0 to {MAX_SEED - count + 1} for {count} images",
        )
    return tuple(seed + i for i in range(count))


def random_seed(count: int = 1) -> int:
    """A seed drawn at random, low enough that ``count`` images fit below :data:`MAX_SEED`."""
    return secrets.randbelow(MAX_SEED + 2 - max(1, count))


def _check_seed(seed: Any) -> None:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidRequestError("seed", f"got {seed!r}; allowed: an integer from 0 to {MAX_SEED}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelCard:
    """What a model declares about generating with it: the limits and defaults a request resolves against.

    Read from a model directory's JSON files (:meth:`from_model_dir`, no weights loaded), or sent by a
    worker to the API as :meth:`to_dict` (``GET /v1/models`` shows it).
    """

    id: str
    sizes: tuple[tuple[int, int], ...]  # (height, width) pairs; the first is the default
    default_steps: int
    max_steps: int
    guidance_scale: float
    distilled_steps: tuple[int, ...] = ()
    max_prompt_tokens: int | None = None
    latent_factor: int = 8

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple((int(h), int(w)) for h, w in self.sizes))
        object.__setattr__(self, "distilled_steps", tuple(sorted(int(s) for s in self.distilled_steps)))
        if not self.sizes:
            raise ValueError("a model card needs at least one size")

    @property
    def default_size(self) -> tuple[int, int]:
        return self.sizes[0]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["sizes"] = [list(s) for s in self.sizes]
        data["distilled_steps"] = list(self.distilled_steps)
        data["default_size"] = list(self.default_size)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """From :meth:`to_dict`'s output; keys that are not card fields (a worker's device, ...) are ignored."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @classmethod
    def from_model_dir(cls, directory: str | Path, id: str | None = None) -> ModelCard:
        """Read from the directory's JSON files alone (no weights, no torch): ``snapgen.model_dir.read_model_card``."""
        from .model_dir import read_model_card

        return read_model_card(directory, id)


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for; unset fields take the model's defaults when resolved.

    ``prompt`` is one prompt or a sequence; ``n`` images are made of each. ``negative_prompt`` is one
    for all prompts or one per prompt; it is what guidance (``guidance_scale != 1``) steers away from.
    ``seed`` is one seed (image ``i`` uses ``seed + i``), one per image, or None (drawn at random by
    :meth:`with_seed`, which a server calls before queueing, so the seed is recorded and returned).
    ``strength`` asks for image-to-image: how far towards noise the input image is taken before
    sampling back (1 ignores it, near 0 keeps it); the image itself travels beside the request.
    Fields that need no model are checked here, on construction; the rest in :meth:`resolve`.
    """

    prompt: str | tuple[str, ...]
    negative_prompt: str | tuple[str, ...] | None = None
    n: int = 1
    seed: int | tuple[int, ...] | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    output_format: str = "png"
    strength: float | None = None

    def __post_init__(self):
        for name in ("prompt", "negative_prompt", "seed"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        prompts = self.prompts
        if not prompts:
            raise InvalidRequestError("prompt", "give at least one prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise InvalidRequestError("prompt", f"{which} is empty; write what the image should show")
        negatives = self.negative_prompt
        if isinstance(negatives, tuple):
            if len(negatives) != len(prompts):
                raise InvalidRequestError(
                    "negative_prompt", f"got {len(negatives)} negative prompts for {len(prompts)} prompts; "
                    "give one for all or one per prompt"
                )  # fmt: skip
            if not all(isinstance(p, str) for p in negatives):
                raise InvalidRequestError("negative_prompt", "allowed: a string or one string per prompt")
        elif negatives is not None and not isinstance(negatives, str):
            raise InvalidRequestError("negative_prompt", f"got {negatives!r}; allowed: a string")
        if not _is_int(self.n) or self.n < 1:
            raise InvalidRequestError("n", f"got {self.n!r}; allowed: an integer >= 1 (images per prompt)")
        count = self.images
        if isinstance(self.seed, tuple):
            if len(self.seed) != count:
                raise InvalidRequestError("seed", f"got {len(self.seed)} seeds for {count} images; "
                                          "give one seed (image i uses seed + i) or one per image")  # fmt: skip
            for seed in self.seed:
                _check_seed(seed)
        elif self.seed is not None:
            expand_seeds(self.seed, count)
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise InvalidRequestError("steps", f"got {self.steps!r}; allowed: an integer >= 1, at most the model's "
                                      "max_steps")  # fmt: skip
        if self.guidance_scale is not None:
            g = self.guidance_scale
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise InvalidRequestError("guidance_scale", f"got {g!r}; allowed: a finite number >= 0")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise InvalidRequestError(name, f"got {value!r}; allowed: a positive integer, one of the model's sizes")
        if self.output_format not in OUTPUT_FORMATS:
            raise InvalidRequestError(
                "output_format", f"got {self.output_format!r}; allowed: {', '.join(OUTPUT_FORMATS)}"
            )
        if self.strength is not None:
            s = self.strength
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 1:
                raise InvalidRequestError("strength", f"got {s!r}; allowed: a number from 0 to 1")

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    @property
    def images(self) -> int:
        return len(self.prompts) * self.n

    def with_seed(self) -> GenerationRequest:
        """This request with a seed: its own, or one drawn at random for all its images."""
        return self if self.seed is not None else replace(self, seed=random_seed(self.images))

    def with_defaults(self, card: ModelCard) -> GenerationRequest:
        """This request checked against ``card``, with the card's defaults written in (what a server records)."""
        resolved = self.resolve(card)
        return replace(self, steps=resolved.steps, guidance_scale=resolved.guidance_scale, height=resolved.height,
                       width=resolved.width)  # fmt: skip

    def resolve(
        self, card: ModelCard, count_tokens: Callable[[list[str]], list[int]] | None = None
    ) -> ResolvedRequest:
        """Defaults from ``card``, every limit checked, one prompt and seed per image.

        ``count_tokens`` (the model's tokenizer, where one is at hand) checks prompt lengths too.
        """
        steps = card.default_steps if self.steps is None else self.steps
        if not 1 <= steps <= card.max_steps:
            raise InvalidRequestError("steps", f"got {steps}; allowed: an integer from 1 to {card.max_steps}")
        guidance = card.guidance_scale if self.guidance_scale is None else float(self.guidance_scale)
        height = card.default_size[0] if self.height is None else self.height
        width = card.default_size[1] if self.width is None else self.width
        for name, value in (("height", height), ("width", width)):
            if value % card.latent_factor:
                raise InvalidRequestError(name, f"got {value}; it must be a multiple of {card.latent_factor}, "
                                          "and one of the model's sizes")  # fmt: skip
        if (height, width) not in card.sizes:
            allowed = ", ".join(f"{w}x{h}" for h, w in card.sizes)
            field_name = "height" if self.height is not None and self.width is None else (
                "width" if self.width is not None and self.height is None else "size")  # fmt: skip
            raise InvalidRequestError(
                field_name, f"{width}x{height} (width x height) is not a size this model makes; allowed: {allowed}"
            )
        negatives = self.negative_prompt if self.negative_prompt is not None else ""
        negatives = (negatives,) * len(self.prompts) if isinstance(negatives, str) else negatives
        if count_tokens is not None and card.max_prompt_tokens is not None:
            for name, texts in (("prompt", self.prompts), ("negative_prompt", negatives)):
                for i, count in enumerate(count_tokens(list(texts))):
                    if count > card.max_prompt_tokens:
                        which = name.replace("_", " ") + ("" if len(texts) == 1 else f" {i}")
                        raise InvalidRequestError(name, f"the {which} has {count} tokens; this model reads at "
                                                  f"most {card.max_prompt_tokens}")  # fmt: skip
        prompts = tuple(p for p in self.prompts for _ in range(self.n))
        negatives = tuple(p for p in negatives for _ in range(self.n))
        if self.seed is None:
            seeds = expand_seeds(random_seed(len(prompts)), len(prompts))
        elif isinstance(self.seed, tuple):
            seeds = self.seed
        else:
            seeds = expand_seeds(self.seed, len(prompts))
        return ResolvedRequest(
            prompts=prompts,
            negative_prompts=negatives,
            seeds=seeds,
            steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            output_format=self.output_format,
            strength=None if self.strength is None else float(self.strength),
        )

    # -- serialisation (a queue stores the request as this JSON) ----------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationRequest:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(unknown[0], f"unknown field; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> GenerationRequest:
        return cls.from_dict(json.loads(text))


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ResolvedRequest:
    """A request a model can run: one prompt, negative prompt and seed per image, nothing left unset."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # "" where none was given
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    height: int
    width: int
    output_format: str = "png"
    strength: float | None = None  # image-to-image (see GenerationRequest)

    @property
    def images(self) -> int:
        return len(self.prompts)

    @property
    def negative_prompt_unused(self) -> bool:
        """A negative prompt was given, but at guidance 1 the unconditional pass it feeds is skipped."""
        return self.guidance_scale == 1.0 and any(self.negative_prompts)

    @property
    def batch_key(self) -> tuple[int, int, int, float, float | None]:
        """Requests with equal keys can run as one batch."""
        return (self.height, self.width, self.steps, self.guidance_scale, self.strength)

    @classmethod
    def concat(cls, requests: Sequence[ResolvedRequest]) -> ResolvedRequest:
        """One batch of several requests that share a :attr:`batch_key`."""
        first = requests[0]
        if any(r.batch_key != first.batch_key for r in requests):
            raise ValueError("only requests with the same size, steps, guidance and strength can share a batch")
        return replace(
            first,
            prompts=tuple(p for r in requests for p in r.prompts),
            negative_prompts=tuple(p for r in requests for p in r.negative_prompts),
            seeds=tuple(s for r in requests for s in r.seeds),
        )

    def chunks(self, size: int) -> Iterator[ResolvedRequest]:
        """Consecutive batches of at most ``size`` images, seeds kept."""
        for start in range(0, self.images, size):
            end = start + size
            yield replace(
                self,
                prompts=self.prompts[start:end],
                negative_prompts=self.negative_prompts[start:end],
                seeds=self.seeds[start:end],
            )
