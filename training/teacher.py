"""The teacher behind one small interface: velocity, last-layer features, and chosen layers' maps.

    TeacherAdapter.forward(x_t, t, text, return_layers=()) -> TeacherOutput(velocity, features, layers)

``t`` is our flow time in [0, 1] (``x_t = (1 - t) x0 + t eps``, see ``snapgen/flow.py``) and
``velocity`` is ``eps - x0`` in the same convention, whatever the teacher's own conventions are.
``features`` is the teacher's last-layer feature map and ``layers[i]`` the output of block ``i``,
all as ``(B, C, h, w)`` maps, so output KD, feature KD and the LADD discriminator heads read
every teacher alike.

Two teachers:

* :class:`SD3TeacherAdapter` wraps a diffusers ``SD3Transformer2DModel`` (the paper's
  SD3.5-Large / Large-Turbo from a local path, or the small MMDiT trained here). SD3's
  scheduler works in sigmas with ``timestep = 1000 * sigma`` and the same straight path and
  velocity, so only the time is rescaled. Its text input is the per-token embedding through
  ``context_embedder`` (no mask: SD3 never masks its padding) plus the pooled vector. Block
  outputs are image tokens ``(B, N, C)``; they are unpatchified to the ``(H/p, W/p)`` grid.
* :class:`UNetTeacherAdapter` wraps a ``SnapGenUNet`` (a bigger U-Net can teach a smaller one);
  its "blocks" are its spatial transformers in forward order, which already produce maps.

Block outputs are caught with forward hooks registered for one call only, so the wrapped model
is never modified and gradients still flow through the maps (LADD's generator needs them).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from snapgen.models.unet import SnapGenUNet
from snapgen.text import TextEmbeddings

# Subfolders a teacher may sit in: a diffusers SD3 pipeline keeps it in transformer/, a snapgen
# model directory in unet/.
_SUBFOLDERS = ("", "transformer", "unet")


@dataclass
class TeacherOutput:
    velocity: torch.Tensor  # (B, C_latent, H, W), eps - x0
    features: torch.Tensor  # (B, C_feat, h, w), last layer
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # requested index -> (B, C, h, w)


class TeacherAdapter(nn.Module, ABC):
    """A frozen teacher. Subclasses wrap one model class and fill in the attributes below.

    Attributes:
        latent_channels: channels of the latents it reads and the velocity it returns.
        sample_size: the latent height/width it was trained at last.
        trained_sizes: every latent size it was trained at (a progressive teacher's several);
            ``load_teacher`` reads them from a teacher stage's ``teacher.json``; default
            ``(sample_size,)``.
        feature_channels: channels of ``TeacherOutput.features``.
        num_layers: how many blocks ``return_layers`` can index (negative indices count from the end).
        token_dim, pooled_dim: widths of the text embeddings it expects (pooled None if unused).
    """

    latent_channels: int
    sample_size: int
    feature_channels: int
    num_layers: int
    token_dim: int
    pooled_dim: int | None

    def __init__(self, model: nn.Module):
        super().__init__()
        # A teacher never trains: eval mode for dropout, no parameter grads; gradients may
        # still flow through it to its input.
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # A parent's .train() must not put the frozen teacher into training mode.
        return super().train(False)

    _trained_sizes: tuple[int, ...] = ()

    @property
    def trained_sizes(self) -> tuple[int, ...]:
        return self._trained_sizes or (self.sample_size,)

    @trained_sizes.setter
    def trained_sizes(self, sizes) -> None:
        self._trained_sizes = tuple(int(s) for s in sizes)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @abstractmethod
    def blocks(self) -> Sequence[nn.Module]:
        """The modules ``return_layers`` indexes, in forward order (the last one's map is ``features``
        unless ``_run`` returns the model's own)."""

    @abstractmethod
    def _run(
        self, x_t: torch.Tensor, t: torch.Tensor, text: TextEmbeddings
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(velocity, last-layer features or None to take the last block's map); hooks catch the rest."""

    @abstractmethod
    def _to_map(self, block_output, x_t: torch.Tensor) -> torch.Tensor:
        """A block's raw output -> (B, C, h, w)."""

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor | float,
        text: TextEmbeddings,
        return_layers: Sequence[int] = (),
    ) -> TeacherOutput:
        blocks = self.blocks()
        wanted = {int(i): self._layer_index(i) for i in return_layers}
        last = len(blocks) - 1
        caught: dict[int, torch.Tensor] = {}

        def catch(index):
            def hook(_module, _args, output):
                caught[index] = self._to_map(output, x_t)

            return hook

        handles = [blocks[i].register_forward_hook(catch(i)) for i in sorted({*wanted.values(), last})]
        try:
            t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32)
            t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
            velocity, features = self._run(x_t.to(self.dtype), t, text.to(device=x_t.device, dtype=self.dtype))
        finally:
            for handle in handles:
                handle.remove()
        layers = {key: caught[index] for key, index in wanted.items()}
        features = caught[last] if features is None else features
        return TeacherOutput(velocity=velocity.to(x_t.dtype), features=features, layers=layers)

    def _layer_index(self, index: int) -> int:
        if not -self.num_layers <= index < self.num_layers:
            raise ValueError(f"layer {index} out of range: this teacher has {self.num_layers} blocks")
        return index % self.num_layers

    def layer_channels(self, index: int) -> int:
        """Channels of ``layers[index]`` (the LADD heads are built from these)."""
        return self.feature_channels


class SD3TeacherAdapter(TeacherAdapter):
    """A diffusers ``SD3Transformer2DModel`` (MMDiT) as a teacher."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        self.patch_size = int(cfg.patch_size)
        self.latent_channels = int(cfg.in_channels)
        self.sample_size = int(cfg.sample_size)
        self.feature_channels = int(cfg.num_attention_heads * cfg.attention_head_dim)
        self.num_layers = int(cfg.num_layers)
        self.token_dim = int(cfg.joint_attention_dim)
        self.pooled_dim = int(cfg.pooled_projection_dim)
        if int(cfg.out_channels or cfg.in_channels) != self.latent_channels:
            raise ValueError("an SD3 teacher must predict as many channels as it reads")

    def blocks(self) -> Sequence[nn.Module]:
        return self.model.transformer_blocks

    def _run(self, x_t, t, text):
        if text.pooled is None:
            raise ValueError("an SD3 teacher needs a pooled text embedding; this text encoder has none")
        velocity = self.model(
            hidden_states=x_t,
            encoder_hidden_states=text.tokens,
            pooled_projections=text.pooled,
            timestep=t * 1000.0,  # SD3 timesteps are 1000 * sigma, and sigma is our t
            return_dict=False,
        )[0]
        return velocity, None  # features: the last block's image tokens

    def _to_map(self, block_output, x_t):
        # A JointTransformerBlock returns (text tokens, image tokens); the last block's text part is None.
        tokens = block_output[1]
        h, w = x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size
        # PatchEmbed flattens the (h, w) grid row-major, so tokens reshape straight back.
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)


class UNetTeacherAdapter(TeacherAdapter):
    """A ``SnapGenUNet`` as a teacher; its blocks are the spatial transformers in forward order."""

    def __init__(self, model: SnapGenUNet):
        super().__init__(model)
        cfg = model.config
        self.latent_channels = int(cfg.in_channels)
        self.sample_size = int(cfg.sample_size)
        self.feature_channels = int(cfg.block_out_channels[0])
        self.token_dim = int(cfg.cross_attention_dim)
        self.pooled_dim = int(cfg.pooled_projection_dim) if cfg.pooled_projection_dim else None
        down = [tr for stage in model.down_stages if stage.transformers for tr in stage.transformers]
        mid = [model.mid_transformer] if model.mid_transformer is not None else []
        up = [tr for stage in model.up_stages if stage.transformers for tr in stage.transformers]
        self._blocks = [*down, *mid, *up]
        if not self._blocks:
            raise ValueError("a U-Net teacher needs at least one transformer block to expose layers")
        self.num_layers = len(self._blocks)
        if int(cfg.out_channels) != self.latent_channels:
            raise ValueError("a U-Net teacher must predict as many channels as it reads")

    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    def _run(self, x_t, t, text):
        out = self.model(x_t, t, text.tokens, text.mask, text.pooled, return_features=True)
        # Its last-layer features are the last decoder map (what a U-Net student matches too),
        # which comes after the last transformer.
        return out.sample, out.features

    def _to_map(self, block_output, x_t):
        return block_output

    def layer_channels(self, index: int) -> int:
        return int(self._blocks[self._layer_index(index)].proj_out.out_features)


def load_teacher(path: str | Path, torch_dtype: torch.dtype | None = None) -> TeacherAdapter:
    """Load a frozen teacher from a local directory (safetensors only, never the network).

    ``path`` is a saved ``SD3Transformer2DModel`` or ``SnapGenUNet`` (``config.json`` +
    safetensors), or a diffusers SD3 pipeline / snapgen model directory holding one in
    ``transformer/`` or ``unet/``.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"teacher directory not found: {root}")
    for sub in _SUBFOLDERS:
        config = root / sub / "config.json"
        if config.is_file():
            class_name = json.loads(config.read_text()).get("_class_name")
            if class_name in ("SD3Transformer2DModel", "SnapGenUNet"):
                break
    else:
        raise ValueError(
            f"{root} holds no teacher: expected config.json of an SD3Transformer2DModel or SnapGenUNet "
            f"in {', '.join(repr(s or '.') for s in _SUBFOLDERS)}"
        )
    folder = root / sub
    if class_name == "SD3Transformer2DModel":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(folder, use_safetensors=True, torch_dtype=torch_dtype)
        teacher = SD3TeacherAdapter(model)
    else:
        teacher = UNetTeacherAdapter(SnapGenUNet.from_pretrained(folder, use_safetensors=True, torch_dtype=torch_dtype))
    sizes = trained_latent_sizes(root)
    if sizes:
        teacher.trained_sizes = sizes
    return teacher


def trained_latent_sizes(root: Path) -> list[int] | None:
    """The latent sizes a teacher directory was trained at: a teacher stage's ``teacher.json``
    says so; a snapgen model directory's ``model_index.json`` lists its training resolutions
    (a progressive run exports every size it trained at)."""
    info = root / "teacher.json"
    if info.is_file():
        return json.loads(info.read_text()).get("trained_latent_sizes")
    index = root / "model_index.json"
    if index.is_file():
        meta = json.loads(index.read_text())
        if meta.get("resolutions") and meta.get("latent_factor"):
            return sorted({int(h) // int(meta["latent_factor"]) for h, _ in meta["resolutions"]})
    return None


def check_teacher_compatible(
    teacher: TeacherAdapter,
    latent_channels: int,
    latent_size: int,
    token_dim: int,
    pooled_dim: int | None,
) -> None:
    """Raise ValueError, before any training, if ``teacher`` cannot teach this student.

    The student reads ``latent_channels``-channel latents of ``latent_size`` x ``latent_size``
    and text of width ``token_dim`` (pooled ``pooled_dim``), as fed to the teacher. The latent
    size must be one the teacher was trained at (``trained_sizes``): an SD3 teacher would run at other
    sizes (it crops its position table) but its targets there are off its training
    distribution, which distillation would then copy.
    """
    name = type(teacher.model).__name__
    problems = []
    if teacher.latent_channels != latent_channels:
        problems.append(f"latent channels: teacher {teacher.latent_channels}, student {latent_channels}")
    if latent_size not in teacher.trained_sizes:
        sizes = " and ".join(str(s) for s in teacher.trained_sizes)
        problems.append(f"latent size: teacher trained at {sizes}, student at {latent_size}")
    patch = getattr(teacher, "patch_size", 1)
    if latent_size % patch:
        problems.append(f"latent size {latent_size} is not a multiple of the teacher's patch size {patch}")
    if teacher.token_dim != token_dim:
        problems.append(f"text token width: teacher expects {teacher.token_dim}, text encoder gives {token_dim}")
    if teacher.pooled_dim is not None and teacher.pooled_dim != pooled_dim:
        problems.append(f"pooled text width: teacher expects {teacher.pooled_dim}, text encoder gives {pooled_dim}")
    if problems:
        raise ValueError(f"the {name} teacher does not match the student: " + "; ".join(problems))


class TeacherAsUNet(nn.Module):
    """A teacher behind the U-Net call signature, so ``SnapGenPipeline`` can sample from it.

    Evaluation is the one place a teacher is sampled like a product model (ShapesBench compares
    the teacher at 28 steps with the students); the pipeline reads ``config.sample_size`` and
    ``config.in_channels`` and calls ``unet(x, t, tokens, mask, pooled).sample``.
    """

    def __init__(self, teacher: TeacherAdapter):
        super().__init__()
        self.teacher = teacher
        self.config = SimpleNamespace(sample_size=teacher.sample_size, in_channels=teacher.latent_channels)

    def forward(self, x_t, t, tokens, mask, pooled):
        text = TextEmbeddings(tokens=tokens, mask=mask, pooled=pooled)
        return SimpleNamespace(sample=self.teacher(x_t, t, text).velocity)


def load_teacher_pipeline(directory: str | Path, device: str | torch.device = "cpu"):
    """A teacher stage's product (``transformer/``, ``text_encoder/``, ``scheduler/``, ``teacher.json``)
    as a ``SnapGenPipeline`` over the decoder it was trained with."""
    from snapgen.models.autoencoder import load_decoder
    from snapgen.pipeline import SnapGenPipeline
    from snapgen.sampling import SamplerConfig
    from snapgen.text import load_text_encoder

    directory = Path(directory)
    info = json.loads((directory / "teacher.json").read_text())
    resolution = int(info["resolution"])
    pipeline = SnapGenPipeline(
        TeacherAsUNet(load_teacher(directory)),
        load_decoder(info["decoder"]),
        load_text_encoder(directory / "text_encoder"),
        SamplerConfig.load(directory / "scheduler"),
        latent_factor=resolution // int(info["latent_size"]),
        resolutions=[(resolution, resolution)],
    )
    pipeline.model_dir = directory.resolve()
    return pipeline.to(device=device)
