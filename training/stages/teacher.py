"""Stage ``teacher``: a diffusers ``SD3Transformer2DModel`` (MMDiT) trained with rectified flow.

The paper distils from SD3.5-Large, an MMDiT, into its U-Net. Here the same class, small, is
trained on the same latents and text as the student (everything but the network is the
``pretrain`` stage's :class:`FlowStage`), so the distillation stays cross-architecture.
``load:`` starts from a saved SD3 transformer instead (e.g. SD3.5's ``transformer/`` folder
for the real recipe; ``max_steps`` can then be as small as 1 to just re-export it).

SD3's conventions, which the teacher adapter (``training/teacher.py``) uses too: the time
input is ``1000 t`` (SD3's sigma is our t, same straight path and velocity); text tokens go
through its ``context_embedder`` (``joint_attention_dim`` = the text encoder's token width),
the pooled vector through its pooled projection, and padding is not masked (SD3 never masks).

Product: ``OUT/teacher/`` with ``transformer/`` (EMA weights, ``save_pretrained``),
``text_encoder/``, ``scheduler/`` and ``teacher.json``; ``training.teacher.load_teacher`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from snapgen.model_dir import write_atomically
from snapgen.text import save_text_encoder

from ..config import ConfigError
from ..inputs import check_model_dir
from .pretrain import FlowOptions, FlowStage

# A ~4 M-parameter MMDiT for 16x16x4 latents; the text widths are filled in from the encoder.
SMALL_SD3 = dict(patch_size=2, num_layers=6, attention_head_dim=32, num_attention_heads=6, pos_embed_max_size=32,
                 qk_norm="rms_norm")


class TeacherOptions(FlowOptions):
    # SD3Transformer2DModel keyword arguments over SMALL_SD3; in/out channels, sample_size, text
    # widths and caption_projection_dim are derived (autoencoder, resolution, text encoder) unless given.
    transformer: dict[str, Any] = Field(default_factory=dict)
    load: str | None = None  # a saved SD3Transformer2DModel (or a directory with transformer/)


class TeacherStage(FlowStage):
    name = "teacher"
    Options = TeacherOptions

    def build_network(self):
        from diffusers import SD3Transformer2DModel

        o = self.options
        if o.conditioning != "text":
            raise ConfigError("the teacher stage is text-conditional (SD3 reads text tokens and a pooled vector)")
        if o.load:
            root = Path(o.load)
            folder = root / "transformer" if (root / "transformer" / "config.json").is_file() else root
            check_model_dir(str(folder), "load")
            if o.transformer:
                raise ConfigError("load takes the transformer config from that directory; drop transformer")
            return SD3Transformer2DModel.from_pretrained(folder, use_safetensors=True)
        text = self.inputs.text_encoder
        config = dict(SMALL_SD3, in_channels=self.inputs.latent_channels, out_channels=self.inputs.latent_channels,
                      sample_size=self.final_latent_size, joint_attention_dim=text.token_dim,
                      pooled_projection_dim=text.pooled_dim)
        config.update(o.transformer)
        # The joint attention mixes text and image tokens at the transformer's inner width.
        config.setdefault("caption_projection_dim", config["num_attention_heads"] * config["attention_head_dim"])
        if config["pooled_projection_dim"] is None:
            raise ConfigError("an SD3 teacher needs a pooled text vector; this text encoder has none")
        try:
            return SD3Transformer2DModel(**config)
        except TypeError as e:
            raise ConfigError(f"stage_options.transformer: {e}") from None

    def velocity(self, net, x_t, t, text):
        return net(
            hidden_states=x_t,
            timestep=t * 1000.0,
            encoder_hidden_states=text.tokens,
            pooled_projections=text.pooled,
            return_dict=False,
        )[0]

    def context_dims(self, net):
        return int(net.config.joint_attention_dim), int(net.config.pooled_projection_dim)

    def network_channels(self, net):
        return int(net.config.in_channels), int(net.config.out_channels or net.config.in_channels)

    def check_network(self, latent_size: int) -> None:
        cfg = self.model["net"].config
        if latent_size % cfg.patch_size:
            raise ValueError(f"latent size {latent_size} is not a multiple of the patch size {cfg.patch_size}")
        if cfg.pos_embed_max_size and latent_size // cfg.patch_size > cfg.pos_embed_max_size:
            raise ValueError(
                f"latent size {latent_size} needs {latent_size // cfg.patch_size} patches per side, "
                f"more than pos_embed_max_size={cfg.pos_embed_max_size}"
            )

    def export(self, out_dir: Path) -> Path:
        net = self.final_model()["net"].float()

        def fill(tmp: Path) -> None:
            net.save_pretrained(tmp / "transformer", safe_serialization=True)
            save_text_encoder(self.inputs.text_encoder, tmp / "text_encoder")
            self.sampler_config().save(tmp / "scheduler")
            info = {
                "autoencoder": str(Path(self.options.autoencoder).resolve()),
                "decoder": str(self.decoder_path.resolve()),
                "resolution": self.config.data.resolutions()[-1],
                "latent_size": self.final_latent_size,
                "trained_latent_sizes": [r // self.inputs.factor for r in self.config.data.resolutions()],
                "latent_channels": self.inputs.latent_channels,
                "timestep_scale": 1000.0,
            }
            (tmp / "teacher.json").write_text(json.dumps(info, indent=2) + "\n")

        return write_atomically(out_dir / "teacher", fill)
