"""The traced graphs, the conversion error path, palettization and the phone loop (no full bundle)."""

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from mobile_export.cli import export_subcommands
from mobile_export.coreml import (
    UnconvertibleOpError,
    convert_traced,
    dequantize_lut,
    expected_array,
    map_weights,
    palettize_model,
    read_weights,
)
from mobile_export.graphs import IOSpec, tokenize, trace_component
from mobile_export.parity import TorchPredictor
from mobile_export.runner import psnr, run
from mobile_export.verify import PALETTE_MIN_SNR_DB, _snr
from snapgen.model_dir import load_pipeline
from snapgen.noise import randn_tensor


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


def test_traced_unet_is_static_and_still_follows_its_inputs(pipe):
    graph = trace_component(pipe, "unet", 128)
    kinds = {n.kind() for n in graph.traced.graph.nodes()}
    assert not kinds & {"aten::size", "prim::device", "aten::arange"}  # RoPE tables are constants now
    assert [s.name for s in graph.inputs] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "encoder_attention_mask",
        "pooled_projections",
    ]
    assert graph.unused == []  # the U-Net reads every tensor it has
    text = pipe.text_encoder.encode(["two small green triangles"])
    args = (randn_tensor([9], (4, 16, 16)), torch.full((1,), 0.3), text.tokens, text.mask.float(), text.pooled)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        traced = graph.traced(*args)
        server = pipe.unet(args[0], args[1], text.tokens, text.mask, text.pooled).sample
    assert torch.equal(traced, server)  # not baked to the example's timestep, noise or prompt


def test_traced_text_encoder_handles_other_prompts_and_skips_the_pooler(pipe):
    graph = trace_component(pipe, "text_encoder", 128)
    assert graph.unused == ["pooler.dense.bias", "pooler.dense.weight"]
    prompt = "a big yellow star above three tiny purple circles"
    ids, mask = tokenize(pipe.text_encoder, prompt)
    assert ids.dtype == torch.int32 and ids.shape == (1, 32)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        tokens, pooled = graph.traced(ids, mask)
    server = pipe.text_encoder.encode([prompt])
    assert torch.equal(tokens, server.tokens) and torch.equal(pooled, server.pooled)


class Gamma(nn.Module):
    def forward(self, x):
        return torch.lgamma(x.abs() + 1)


def test_an_unconvertible_op_names_the_op_and_the_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), Gamma())).eval()
    example = torch.randn(1, 4)
    traced = torch.jit.trace(model, (example,))
    with pytest.raises(UnconvertibleOpError) as info:
        convert_traced(traced, model, [IOSpec("x", (1, 4), "float32")], ["y"], "toy")
    e = info.value
    assert (e.op, e.module_path, e.module_class) == ("lgamma", "1.1", "Gamma")
    assert "'lgamma'" in str(e) and "'1.1' (Gamma)" in str(e)


def test_unconvertible_op_inside_the_unet_fails_the_export_cleanly(tiny_model, tmp_path, monkeypatch, capsys):
    import torch.nn.functional as F

    import snapgen.models.blocks as blocks
    from snapgen.cli import main

    def forward(self, x):  # the server's Upsample with one op coremltools has no converter for
        return self.conv(F.interpolate(torch.lgamma(x.abs() + 1), scale_factor=2.0, mode="nearest"))

    monkeypatch.setattr(blocks.Upsample, "forward", forward)
    assert main(["export", "coreml", "--model", str(tiny_model), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot convert op 'lgamma' in module 'unet.up_stages.0.resample' (Upsample)" in err
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging directory left behind


def test_palettized_weights_read_back_and_the_rest_stay_bit_identical(pipe):
    graph = trace_component(pipe, "decoder", 128)
    model = convert_traced(graph.traced, graph.module, graph.inputs, ["image"], "decoder", "fp16", 17)
    mapping = map_weights(graph, read_weights(model), "fp16")
    stored = read_weights(palettize_model(model, 6))
    palettized = exact = 0
    for key, entry in mapping.items():
        want = expected_array(graph.state_dict[key], "fp16")
        name = entry["const"]
        if name not in stored:
            name += "_palettized"
            got = stored[name]
            assert got.palettized and got.nbits == 6 and want.size >= 2048
            snr = _snr(want, got.value)  # inf for the zero-initialised pw2 weights
            assert snr >= PALETTE_MIN_SNR_DB[6], (key, snr)
            palettized += 1
        else:
            assert np.array_equal(stored[name].value.reshape(-1).view(np.uint16), want.reshape(-1).view(np.uint16))
            exact += 1
    assert palettized >= 2 and exact >= 20


def test_dequantize_lut_handles_per_tensor_and_per_channel_tables():
    indices = np.array([[0, 1, 2], [3, 0, 1]], dtype=np.uint8)
    per_tensor = np.arange(4, dtype=np.float16).reshape(1, 1, 4, 1) * 10
    assert dequantize_lut(indices, per_tensor).tolist() == [[0, 10, 20], [30, 0, 10]]
    per_row = np.stack([np.arange(4), 100 + np.arange(4)]).astype(np.float32).reshape(2, 1, 4, 1)
    assert dequantize_lut(indices, per_row).tolist() == [[0, 1, 2], [103, 100, 101]]


def test_the_manifest_loop_reproduces_the_server_bit_for_bit(pipe):
    """runner.run (what the app implements) with a predictor that is exactly PyTorch = the server."""
    from mobile_export.bundle import sampler_section

    manifest = {
        "sampler": sampler_section(pipe, 128),
        "latent_shape": [4, 16, 16],
        "components": {
            "unet": {
                "inputs": [
                    {"name": n}
                    for n in (
                        "sample",
                        "timestep",
                        "encoder_hidden_states",
                        "encoder_attention_mask",
                        "pooled_projections",
                    )
                ]
            }
        },
    }

    def tok(prompt):
        ids, mask = tokenize(pipe.text_encoder, prompt)
        return ids.numpy(), mask.numpy()

    predictor = TorchPredictor(pipe, 128)
    phone = run(manifest, predictor, tok, "a red circle", seed=11, steps=3)
    server = pipe("a red circle", seeds=11, steps=3, output_type="np")
    assert np.array_equal(phone.latents, server.latents.numpy())
    # With guidance the server batches [cond; uncond] into one U-Net call, the phone makes two.
    phone = run(manifest, predictor, tok, "a red circle", seed=11, steps=2, guidance_scale=3.0)
    server = pipe("a red circle", seeds=11, steps=2, guidance_scale=3.0, output_type="latent")
    assert psnr(server.latents.numpy(), phone.latents) > 100


def test_export_is_a_parser_other_modules_extend():
    parser = argparse.ArgumentParser(prog="snapgen")
    sub = parser.add_subparsers(dest="command", required=True)
    # Another module (e.g. the Triton exporter) may come first ...
    export_subcommands(sub).add_parser("triton").set_defaults(func="triton")
    from mobile_export.cli import add_commands

    add_commands(sub)
    # ... or after: both find the same table.
    export_subcommands(sub).add_parser("onnx").set_defaults(func="onnx")
    assert parser.parse_args(["export", "triton"]).func == "triton"
    assert parser.parse_args(["export", "onnx"]).func == "onnx"
    args = parser.parse_args(["export", "coreml", "--model", "m", "--out", "o", "--palettize", "6"])
    assert args.palettize == 6 and args.precision == "fp16" and args.resolution is None
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "coreml", "--model", "m", "--out", "o", "--palettize", "5"])
