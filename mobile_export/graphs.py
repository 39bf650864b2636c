"""The exported graphs: the server's own modules behind fixed-shape, tensor-only entry points.

Each component is a thin ``nn.Module`` that calls the very method the pipeline calls, so the
traced graph *is* the server's computation; only the calling convention changes (plain tensors
in, a tuple of tensors out, batch 1, fixed spatial size):

=============  ====================================================  ===========================
component      inputs                                                outputs
=============  ====================================================  ===========================
text_encoder   input_ids (1, L) int32, attention_mask (1, L) int32   tokens (1, L, D), pooled (1, P)
unet           sample (1, C, h, w), timestep (1,) flow time in       velocity (1, C, h, w)
               [0, 1], encoder_hidden_states (1, L, D),
               encoder_attention_mask (1, L) 1.0 real / 0.0 pad,
               pooled_projections (1, P) (when the U-Net has one)
decoder        latents (1, C, h, w): *diffusion* latents, i.e. what  image (1, 3, H, W) in [-1, 1]
               the sampler ends with; the decoder graph applies
               ``z / scaling_factor + shift_factor`` itself
=============  ====================================================  ===========================

:func:`trace_component` traces one of them and then makes the graph static
(:func:`freeze_static_shapes`): every ``aten::size`` of a tensor with a known shape becomes a
constant, ``prim::device`` becomes the constant device, ``new_ones``/``new_zeros`` become
``ones``/``zeros`` of that constant shape, and constant propagation folds whatever now depends on
constants only. That turns shape-derived tensors (the U-Net's 2-D RoPE cos/sin tables, the text
encoder's position ids and mask scaffolding) into precomputed float32 constants, computed by
torch exactly as the server computes them, instead of ops that Core ML would evaluate at run
time in fp16 (and that coremltools 9 mis-types: ``arange(..., dtype=float32)`` becomes int32).

The same static graph is what goes to Core ML and to ONNX (``mobile_export.parity``), and what
the Triton exporter can reuse.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

# Conversion order: the U-Net first, since it is the component most likely to hit an op that
# coremltools cannot convert, and failing early saves the other conversions.
COMPONENTS = ("unet", "decoder", "text_encoder")


class TextEncoderGraph(nn.Module):
    """``MiniLMTextEncoder._forward`` (what ``encode`` runs after tokenizing) on token ids."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        # The server tokenizes to int64; Core ML has no int64 inputs, so the graph takes int32
        # and widens them before the embedding lookup (same values, same computation).
        tokens, pooled = self.text_encoder._forward(input_ids.long(), attention_mask.long())
        return tokens, pooled


class UNetGraph(nn.Module):
    """One U-Net evaluation ``(x_t, t, text) -> velocity``: one Euler step's model call."""

    def __init__(self, unet, has_pooled: bool):
        super().__init__()
        self.unet = unet
        self.has_pooled = has_pooled

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections=None):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            encoder_attention_mask,
            pooled_projections if self.has_pooled else None,
            return_dict=False,
        )[0]


class DecoderGraph(nn.Module):
    """Diffusion latents -> image in [-1, 1]: ``decoder.decode(decoder.from_diffusion(z))``."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents):
        return self.decoder.decode(self.decoder.from_diffusion(latents))


@dataclass
class IOSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "int32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ComponentGraph:
    """A traced, static component plus everything needed to convert and check it."""

    name: str
    module: nn.Module  # the wrapper (eager), holding the server's module
    traced: torch.jit.ScriptModule
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    example: tuple[torch.Tensor, ...]
    prefix: str  # attribute path of the server's module inside the wrapper ("unet", "decoder.model")
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)  # the server module's, by its keys
    unused: list[str] = field(default_factory=list)  # state-dict keys the graph never reads

    def run_eager(self, *args) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.module(*args)
        return out if isinstance(out, tuple) else (out,)


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.int32: "int32"}[dtype]


def example_inputs(pipeline, component: str, resolution: int) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """Deterministic example inputs (portable noise + a real prompt) and their names."""
    from snapgen.noise import randn_tensor

    f = pipeline.latent_factor
    unet_cfg = pipeline.unet.config
    latent_shape = (unet_cfg.in_channels, resolution // f, resolution // f)
    if component == "text_encoder":
        ids, mask = tokenize(pipeline.text_encoder, "a red circle to the left of a blue square")
        return (ids, mask), ["input_ids", "attention_mask"]
    if component == "unet":
        text = pipeline.text_encoder.encode(["a red circle to the left of a blue square"])
        args = [
            randn_tensor([1], latent_shape),
            torch.full((1,), 0.75),
            text.tokens.float(),
            text.mask.float(),
        ]
        names = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
        if unet_cfg.pooled_projection_dim:
            args.append(text.pooled.float())
            names.append("pooled_projections")
        return tuple(args), names
    if component == "decoder":
        return (randn_tensor([2], latent_shape),), ["latents"]
    raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")


def tokenize(text_encoder, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(input_ids, attention_mask)`` of one prompt, padded like the server pads it."""
    text_encoder.check_lengths([prompt])
    batch = text_encoder.tokenizer(
        [prompt], padding="max_length", max_length=text_encoder.max_length, truncation=False, return_tensors="pt"
    )
    return batch["input_ids"].to(torch.int32), batch["attention_mask"].to(torch.int32)


def wrap(pipeline, component: str) -> tuple[nn.Module, str, nn.Module]:
    """(wrapper module, attribute prefix of the server module inside it, the server module)."""
    if component == "text_encoder":
        encoder = pipeline.text_encoder
        return TextEncoderGraph(encoder).eval(), "text_encoder.model", encoder.model
    if component == "unet":
        has_pooled = bool(pipeline.unet.config.pooled_projection_dim)
        return UNetGraph(pipeline.unet, has_pooled).eval(), "unet", pipeline.unet
    if component == "decoder":
        return DecoderGraph(pipeline.decoder).eval(), "decoder.model", pipeline.decoder.model
    raise ValueError(f"unknown component {component!r}; choose one of {COMPONENTS}")


OUTPUT_NAMES = {
    "text_encoder": ["tokens", "pooled"],
    "unet": ["velocity"],
    "decoder": ["image"],
}


def trace_component(pipeline, component: str, resolution: int) -> ComponentGraph:
    """Trace ``component`` of ``pipeline`` at ``resolution`` px (square), batch 1, static shapes."""
    module, prefix, inner = wrap(pipeline, component)
    example, names = example_inputs(pipeline, component, resolution)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-level shape logic; with fixed shapes that is the point.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False, strict=False)
    freeze_static_shapes(traced.graph)
    with torch.no_grad(), torch.jit.optimized_execution(False):  # no profiling runs: 3x faster here
        eager = module(*example)
        frozen = traced(*example)
    eager = eager if isinstance(eager, tuple) else (eager,)
    frozen = frozen if isinstance(frozen, tuple) else (frozen,)
    for name, a, b in zip(OUTPUT_NAMES[component], eager, frozen, strict=True):
        if not torch.equal(a, b):
            raise RuntimeError(f"the traced {component} graph differs from the module on output {name!r}")
    inputs = [IOSpec(n, tuple(t.shape), _torch_dtype_name(t.dtype)) for n, t in zip(names, example, strict=True)]
    outputs = [
        IOSpec(n, tuple(t.shape), _torch_dtype_name(t.dtype))
        for n, t in zip(OUTPUT_NAMES[component], eager, strict=True)
    ]
    state = {k: v.detach() for k, v in inner.state_dict().items()}
    used = parameters_read(traced.graph, prefix)
    unused = sorted(k for k in state if k not in used)
    return ComponentGraph(
        name=component,
        module=module,
        traced=traced,
        inputs=inputs,
        outputs=outputs,
        example=example,
        prefix=prefix,
        state_dict=state,
        unused=unused,
    )


# ------------------------------------------------------------------------------------------
# Graph surgery
# ------------------------------------------------------------------------------------------


def _replace(graph, node, value) -> None:
    const = graph.insertConstant(value)
    const.node().moveBefore(node)
    node.output().replaceAllUsesWith(const)
    node.destroy()


def freeze_static_shapes(graph: torch._C.Graph) -> None:
    """Make a traced graph's shape logic constant (see the module docstring). In place."""
    torch._C._jit_pass_inline(graph)
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes()):
            kind = node.kind()
            if kind == "aten::size":
                sizes = node.inputsAt(0).type().sizes()
                if sizes is None:
                    continue
                if node.inputsSize() == 2:
                    dim = node.inputsAt(1).toIValue()
                    if dim is None:
                        continue
                    _replace(graph, node, int(sizes[dim]))
                else:
                    _replace(graph, node, [int(s) for s in sizes])
                changed = True
            elif kind == "prim::device":
                device = node.inputsAt(0).type().device()
                if device is None:
                    continue
                _replace(graph, node, device)
                changed = True
            elif kind in ("aten::new_ones", "aten::new_zeros"):
                changed |= _rewrite_new_filled(graph, node)
        torch._C._jit_pass_constant_propagation(graph)
        torch._C._jit_pass_dce(graph)
    _split_tensor_list_constants(graph)


def _split_tensor_list_constants(graph) -> None:
    """A folded ``Tensor?[]`` constant (e.g. the indices of ``aten::index``) -> one constant per
    tensor plus ``prim::ListConstruct``: converters (coremltools 9) only take tensor constants."""
    for node in list(graph.nodes()):
        if node.kind() != "prim::Constant":
            continue
        out = node.output()
        value = out.toIValue() if out.type().kind() == "ListType" else None
        if not isinstance(value, list) or not any(isinstance(v, torch.Tensor) for v in value):
            continue
        items = []
        for v in value:
            c = graph.insertConstant(v)
            c.node().moveBefore(node)
            items.append(c)
        lst = graph.create("prim::ListConstruct", items)
        lst.output().setType(out.type())
        lst.insertBefore(node)
        out.replaceAllUsesWith(lst.output())
        node.destroy()


def _rewrite_new_filled(graph, node) -> bool:
    """``x.new_ones(size)`` -> a constant tensor when the size is constant."""
    size = node.inputsAt(1).toIValue()
    if size is None:
        return False
    dtype = node.inputsAt(2).toIValue()
    ttype = node.inputsAt(0).type()
    scalar = dtype if dtype is not None else ttype.dtype()
    if scalar is None:
        return False
    if isinstance(scalar, int):  # a ScalarType enum value in the graph
        scalar = _SCALAR_TYPES[scalar]
    fill = torch.ones if node.kind() == "aten::new_ones" else torch.zeros
    _replace(graph, node, fill(size, dtype=scalar))
    return True


_SCALAR_TYPES = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    11: torch.bool,
    15: torch.bfloat16,
}


def parameters_read(graph: torch._C.Graph, prefix: str) -> set[str]:
    """State-dict keys (relative to ``prefix``) that the inlined graph reads via ``prim::GetAttr``."""
    paths: dict = {}
    used: set[str] = set()
    for node in graph.nodes():
        if node.kind() != "prim::GetAttr":
            continue
        parent = paths.get(node.inputsAt(0).unique(), "")
        path = f"{parent}.{node.s('name')}" if parent else node.s("name")
        paths[node.output().unique()] = path
        if node.output().type().kind() == "TensorType" and node.output().uses():
            used.add(path)
    start = prefix + "."
    return {p[len(start) :] for p in used if p.startswith(start)}


def module_at(root: nn.Module, scope: str) -> tuple[str, str]:
    """Map a TorchScript scope (``__module.unet/__module.unet.down_stages.0``) to (path, class)."""
    last = scope.split("/")[-1] if scope else ""
    path = last.removeprefix("__module.").removeprefix("__module")
    modules = dict(root.named_modules())
    while path and path not in modules:
        path = path.rsplit(".", 1)[0] if "." in path else ""
    module = modules.get(path, root)
    return path or "<root>", type(module).__name__
