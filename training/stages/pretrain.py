"""Stage ``pretrain``: rectified-flow training of the SnapGen U-Net on frozen-autoencoder latents.

For clean latents ``x0`` (``(E(x) - shift) * scale``), noise ``eps`` and flow time
``t = shift_t(sigmoid(m + s n))``, n ~ N(0, 1) (logit-normal, optionally shifted), the denoiser
``v`` minimises the rectified-flow loss ``|v(x_t, t, c) - (eps - x0)|^2`` at
``x_t = (1 - t) x0 + t eps`` (``snapgen/flow.py``; loss in ``training/losses.py``).

Conditioning ``c`` is text (the frozen text encoder's tokens, mask and pooled vector) or a
learned class embedding (the paper's ImageNet stage; ``data.classes`` lists the classes).
With probability ``cfg_dropout`` a caption becomes "" (a class the "no class" entry), which
is what classifier-free guidance samples against. Progressive resolution is the config's
``data.resolution_schedule``; the U-Net is resolution-agnostic (convolutions and 2-D RoPE).

:class:`FlowStage` is everything but the network, shared with the SD3 ``teacher`` stage.
The product is a complete model directory (``snapgen.model_dir.save_model``, loadable by
``load_pipeline``) whose U-Net is the EMA copy; a class-conditional run writes the U-Net and
its class embedding instead (the start of a text-conditional run's ``init_from``).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import save_file
from torch import nn

from snapgen.flow import interpolate, sample_logit_normal, shift_time
from snapgen.generation import generate
from snapgen.model_dir import save_component, save_model, write_atomically
from snapgen.models.autoencoder import ENCODER_CLASSES, load_decoder, load_latent_model
from snapgen.models.configs import build_unet, unet_config
from snapgen.models.unet import SnapGenUNet
from snapgen.request import ResolvedRequest, expand_seeds
from snapgen.sampling import SamplerConfig
from snapgen.text import TextEmbeddings

from .. import distributed
from ..config import ConfigError
from ..ema import EMA
from ..inputs import ClassEmbedding, FlowInputs, check_model_dir, latent_model_dir
from ..logger import save_grid
from ..losses import flow_matching_loss
from .base import Batch, Stage, StageOptions

SHAPES_PROMPTS = [
    "a red circle",
    "a blue square and a green triangle",
    "three yellow circles",
    "a white square to the left of a red triangle",
    "a purple circle above a green square",
    "two blue triangles",
    "a green circle below a yellow triangle",
    "a red square to the right of a blue circle",
]


class FlowOptions(StageOptions):
    autoencoder: str  # frozen encoder: a SmallAutoencoder or AutoencoderKL directory
    decoder: str | None = None  # decoder for samples and the exported model; default: the autoencoder
    text_encoder: str = "minilm"  # "minilm" or a directory written by snapgen.text.save_text_encoder
    conditioning: Literal["text", "class"] = "text"
    class_tokens: int = Field(1, gt=0)  # learned tokens per class
    cfg_dropout: float = Field(0.1, ge=0, le=1)
    logit_mean: float = 0.0  # logit-normal timesteps: t = sigmoid(logit_mean + logit_std * n)
    logit_std: float = Field(1.0, gt=0)
    train_shift: float = Field(1.0, gt=0)  # shift_time applied to the drawn t (1: none)
    cache: Literal["auto", "on", "off"] = "auto"  # precompute latents + caption embeddings
    cache_max_gb: float = Field(2.0, gt=0)
    # The exported sampler defaults, and what the sample grids use.
    default_steps: int = Field(28, gt=0)
    guidance_scale: float = Field(3.0, ge=0)
    sample_shift: float = Field(1.0, gt=0)
    sample_steps: int = Field(20, gt=0)
    sample_prompts: list[str] = Field(default_factory=lambda: list(SHAPES_PROMPTS))
    sample_seed: int = 0


class FlowStage(Stage):
    """Rectified flow on latents for any velocity network; subclasses build and call the network."""

    def __init__(self, config, options: FlowOptions, device):
        super().__init__(config, options, device)
        if options.conditioning == "class" and not config.data.classes:
            raise ConfigError("conditioning: class needs data.classes (the list of class captions)")
        self.inputs = FlowInputs(
            options.autoencoder,
            options.text_encoder if options.conditioning == "text" else None,
            device,
            options.cache,
            options.cache_max_gb,
        )
        self.decoder_path = latent_model_dir(options.decoder or options.autoencoder, "decoder")
        self._decoder = None
        self.final_latent_size = config.data.resolutions()[-1] // self.inputs.factor
        modules: dict[str, nn.Module] = {"net": self.build_network()}
        if options.conditioning == "class":
            token_dim, pooled_dim = self.context_dims(modules["net"])
            modules["classes"] = ClassEmbedding(len(config.data.classes), token_dim, pooled_dim, options.class_tokens)
        self.model = nn.ModuleDict(modules).to(device)
        self.ema = EMA(self.model, config.ema) if config.ema else None

    # -- what a subclass provides ------------------------------------------------------------
    @abstractmethod
    def build_network(self) -> nn.Module:
        """The velocity network, in fp32 on the CPU."""

    @abstractmethod
    def velocity(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        """``eps - x0`` predicted at ``x_t``, flow time ``t`` in [0, 1]."""

    @abstractmethod
    def context_dims(self, net: nn.Module) -> tuple[int, int | None]:
        """(token width, pooled width or None) the network reads."""

    @abstractmethod
    def network_channels(self, net: nn.Module) -> tuple[int, int]:
        """(input, output) latent channels."""

    def check_network(self, latent_size: int) -> None:
        """Raise ValueError if the network cannot run at ``latent_size``."""

    # -- the stage ------------------------------------------------------------------------------
    def trainable_modules(self):
        return {"model": self.model}

    def state_modules(self):
        return {"ema": self.ema.module} if self.ema else {}

    def check_compatible(self) -> None:
        o, net = self.options, self.model["net"]
        problems = []
        c_in, c_out = self.network_channels(net)
        if c_in != self.inputs.latent_channels or c_out != self.inputs.latent_channels:
            problems.append(
                f"the network reads {c_in} and predicts {c_out} latent channels, "
                f"the autoencoder has {self.inputs.latent_channels}"
            )
        token_dim, pooled_dim = self.context_dims(net)
        if o.conditioning == "text":
            enc = self.inputs.text_encoder
            if token_dim != enc.token_dim:
                problems.append(f"the network's text width is {token_dim}, the text encoder gives {enc.token_dim}")
            if pooled_dim is not None and pooled_dim != enc.pooled_dim:
                problems.append(f"the network's pooled width is {pooled_dim}, the text encoder gives {enc.pooled_dim}")
            try:
                enc.check_lengths(o.sample_prompts)
            except ValueError as e:
                problems.append(f"sample_prompts: {e}")
        elif unknown := [p for p in o.sample_prompts if p not in self.config.data.classes]:
            problems.append(f"sample_prompts must be class names from data.classes; unknown: {unknown}")
        for resolution in self.config.data.resolutions():
            if resolution % self.inputs.factor:
                problems.append(f"resolution {resolution} is not a multiple of the autoencoder's factor")
                continue
            try:
                self.check_network(resolution // self.inputs.factor)
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError(f"stage {self.name}: " + "; ".join(problems))

    def prepare_dataset(self, dataset, resolution: int):
        self.resolution = resolution
        cache_file = None
        if self.config.latent_cache_dir:
            identity = {"data": self.config.data.model_dump(mode="json", exclude={"resolution_schedule"}),
                        "resolution": resolution}
            cache_file = self.inputs.cache_path(Path(self.config.latent_cache_dir), identity)
        return self.inputs.prepare(dataset, resolution, self.config.num_workers, progress=distributed.is_main(),
                                   cache_file=cache_file)

    def condition(self, model: nn.ModuleDict, batch: Batch, drop: float) -> TextEmbeddings:
        if "classes" in model:
            return model["classes"](self.inputs.labels(batch, model["classes"].num_classes, drop))
        return self.inputs.text(batch, drop)

    def noised_latents(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x0, noise, t, x_t) for a batch: logit-normal t, optionally shifted, on the straight path."""
        o = self.options
        x0 = self.inputs.latents(batch)
        t = sample_logit_normal(x0.shape[0], o.logit_mean, o.logit_std, device=x0.device)
        if o.train_shift != 1.0:
            t = shift_time(t, o.train_shift)
        noise = torch.randn_like(x0)
        return x0, noise, t, interpolate(x0, noise, t)

    def loss(self, name: str, batch: Batch, step: int):
        o = self.options
        x0, noise, t, x_t = self.noised_latents(batch)
        text = self.condition(self.model, batch, o.cfg_dropout)
        v = self.velocity(self.model["net"], x_t, t, text)
        loss = flow_matching_loss(v, x0, noise).mean()
        return loss, {"loss": loss.item()}

    def on_step_end(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step)

    def final_model(self) -> nn.ModuleDict:
        return self.ema.module if self.ema is not None else self.model

    def sampler_config(self) -> SamplerConfig:
        o = self.options
        return SamplerConfig(default_steps=o.default_steps, guidance_scale=o.guidance_scale, shift=o.sample_shift)

    def sample(self, prompts: list[str], steps: int, guidance: float, resolution: int, seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] from the EMA model, made by the library's generation recipe (seed + i for image i)."""
        if self._decoder is None:
            self._decoder = load_decoder(self.decoder_path).to(self.device)
        request = ResolvedRequest(
            prompts=tuple(prompts),
            negative_prompts=("",) * len(prompts),
            seeds=expand_seeds(seed, len(prompts)),
            steps=steps,
            guidance_scale=guidance,
            height=resolution,
            width=resolution,
        )
        return generate(_SampleStages(self, self.final_model().eval()), request).pixels

    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        o = self.options
        images = self.sample(o.sample_prompts, o.sample_steps, o.guidance_scale, self.resolution, o.sample_seed)
        save_grid(images, out_dir / "samples" / f"step_{step:08d}.png", columns=min(len(images), 4))
        (out_dir / "samples" / "prompts.txt").write_text("\n".join(o.sample_prompts) + "\n")
        return {}


class PretrainOptions(FlowOptions):
    unet: str | dict[str, Any] = "snapgen-shapes"  # a named config (snapgen.models.configs) or a full dict
    unet_overrides: dict[str, Any] = Field(default_factory=dict)
    # Start from a saved U-Net: a model directory, a class-conditional pretrain's product, or a
    # unet/ folder. Its config then replaces unet/unet_overrides (progressive fine-tuning).
    init_from: str | None = None


class PretrainStage(FlowStage):
    name = "pretrain"
    Options = PretrainOptions

    def build_network(self) -> nn.Module:
        o = self.options
        if o.init_from:
            root = Path(o.init_from)
            folder = root / "unet" if (root / "unet" / "config.json").is_file() else root
            check_model_dir(str(folder), "init_from")
            if o.unet_overrides or "unet" in o.model_fields_set:
                raise ConfigError("init_from takes the U-Net config from that directory; drop unet/unet_overrides")
            return SnapGenUNet.from_pretrained(folder, use_safetensors=True)
        try:
            config = unet_config(o.unet) if isinstance(o.unet, str) else dict(o.unet)
        except ValueError as e:
            raise ConfigError(f"stage_options.unet: {e}") from None
        # sample_size is metadata (the native latent size a model directory advertises).
        config.update(o.unet_overrides, sample_size=self.final_latent_size)
        try:
            return build_unet(config)
        except TypeError as e:
            raise ConfigError(f"stage_options.unet: {e}") from None

    def velocity(self, net, x_t, t, text):
        return net(x_t, t, text.tokens, text.mask, text.pooled).sample

    def context_dims(self, net):
        return int(net.config.cross_attention_dim), net.config.pooled_projection_dim

    def network_channels(self, net):
        return int(net.config.in_channels), int(net.config.out_channels)

    def check_network(self, latent_size: int) -> None:
        multiple = 2 ** (len(self.model["net"].config.block_out_channels) - 1)
        if latent_size % multiple:
            raise ValueError(f"latent size {latent_size} is not a multiple of {multiple} (the U-Net's downsampling)")

    def export(self, out_dir: Path) -> Path:
        model = self.final_model()
        unet = model["net"].float()
        if "classes" in model:
            def fill(tmp: Path) -> None:
                save_component(unet, tmp / "unet")
                tensors = {k: v.detach().cpu().contiguous() for k, v in model["classes"].state_dict().items()}
                save_file(tensors, tmp / "class_embedding.safetensors")
                (tmp / "classes.json").write_text(json.dumps(self.config.data.classes, indent=1) + "\n")

            return write_atomically(out_dir / "model", fill)
        resolutions = [self.config.data.resolutions()[-1], *self.config.data.resolutions()[:-1]]
        # Unless the decoder is the autoencoder itself, the encoder travels with the model.
        encoder = self.inputs.autoencoder_dir
        same_dir = self.decoder_path.resolve() == encoder.resolve()
        return save_model(
            out_dir / "model",
            unet,
            load_latent_model(self.decoder_path),
            self.inputs.text_encoder,
            self.sampler_config(),
            resolutions=[(r, r) for r in resolutions],
            overwrite=True,
            autoencoder=None if same_dir else load_latent_model(encoder, ENCODER_CLASSES, "encoder"),
        )


class _SampleStages:
    """A pretraining stage's model as the three stages of ``snapgen.generation``, for its sample grids.

    A class-conditioned model reads the class embedding of each prompt; the empty prompt (the
    unconditional side of guidance) is its null class.
    """

    def __init__(self, stage: FlowStage, model: nn.ModuleDict):
        self.stage, self.model = stage, model
        self.sampler = stage.sampler_config()
        self.latent_channels = stage.inputs.latent_channels
        self.latent_factor = stage.inputs.factor
        self.device, self.dtype = stage.device, torch.float32

    def encode_text(self, prompts: list[str]) -> TextEmbeddings:
        if "classes" not in self.model:
            return self.stage.inputs.encode_prompts(prompts)
        classes = self.model["classes"]
        index = {name: i for i, name in enumerate(self.stage.config.data.classes)}
        labels = [classes.num_classes if p == "" else index[p] for p in prompts]
        return classes(torch.tensor(labels, device=self.device))

    def unet_velocity(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        return self.stage.velocity(self.model["net"], x, t, text)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        decoder = self.stage._decoder
        return decoder.decode(decoder.from_diffusion(latents))
