"""training.text_table: a saved table of an encoder's embeddings stands in for the encoder."""

import pytest
import torch
import yaml

from snapgen.models.configs import SNAPGEN_TINY, build_unet
from snapgen.text import MiniLMTextEncoder, load_text_encoder, save_text_encoder
from training.inputs import build_text_encoder
from training.text_table import PromptNotInTableError, build_text_table, main

PROMPTS = ["a red circle", "a blue square to the left of a green triangle", "three yellow squares"]


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(layers=[0, 6])


@pytest.fixture(scope="module")
def table(minilm, tmp_path_factory):
    path = build_text_table(minilm, PROMPTS, tmp_path_factory.mktemp("table") / "text.safetensors")
    return build_text_encoder(f"table:{path}")


def test_the_table_gives_the_encoders_embeddings_within_fp16_rounding(minilm, table):
    prompts = [PROMPTS[1], "", PROMPTS[0]]  # "" (the unconditional prompt) is always in the table
    real, looked_up = minilm.encode(prompts), table.encode(prompts)
    assert looked_up.tokens.shape == real.tokens.shape and looked_up.tokens.dtype == torch.float32
    assert torch.equal(looked_up.mask, real.mask)
    m = real.mask
    torch.testing.assert_close(looked_up.tokens[m], real.tokens[m], rtol=1e-3, atol=2e-3)
    assert not looked_up.tokens[~m].any()  # padding is zero; consumers mask it
    torch.testing.assert_close(looked_up.pooled, real.pooled, rtol=1e-3, atol=1e-3)
    assert table.count_tokens(prompts) == minilm.count_tokens(prompts)
    assert (table.token_dim, table.pooled_dim, table.max_length) == (768, 384, minilm.max_length)


def test_a_unet_reads_the_table_as_it_reads_the_encoder(minilm, table):
    torch.manual_seed(0)
    unet = build_unet(dict(SNAPGEN_TINY, cross_attention_dim=768)).eval()
    x, t = torch.randn(3, 4, 16, 16), torch.tensor([0.2, 0.5, 0.9])
    outs = []
    for text in (minilm.encode(PROMPTS), table.encode(PROMPTS)):
        with torch.no_grad():
            outs.append(unet(x, t, text.tokens, text.mask, pooled_projections=text.pooled).sample)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=1e-3)


def test_a_prompt_outside_the_table_is_refused_by_name(table):
    with pytest.raises(PromptNotInTableError, match="'a purple circle' is not in the text table"):
        table.encode(["a red circle", "a purple circle"])


def test_a_model_trained_on_the_table_is_saved_with_the_real_encoder(minilm, table, tmp_path):
    assert table.to_config() == minilm.to_config()
    loaded = load_text_encoder(save_text_encoder(table, tmp_path / "text_encoder"))
    assert isinstance(loaded, MiniLMTextEncoder) and loaded.layers == [0, 6]


def test_the_command_collects_a_configs_captions_and_a_prompt_file(tmp_path, capsys):
    config = {
        "stage": "pretrain", "out_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2,
        "data": {"kind": "shapes", "length": 12, "seed": 3, "resolution": 64},
        "stage_options": {"autoencoder": "unused", "text_encoder": "minilm"},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "extra.txt").write_text("a red circle\n\na green square\n")
    out = tmp_path / "table.safetensors"
    main([str(out), "--encoder", "minilm", "--config", str(tmp_path / "run.yaml"),
          "--prompts", str(tmp_path / "extra.txt")])  # fmt: skip
    from training.shapesbench.dataset import ShapesDataset
    from training.stages.pretrain import SHAPES_PROMPTS

    captions = {ShapesDataset(12, 3).scene(i).caption for i in range(12)}
    table = build_text_encoder(f"table:{out}")  # and the stage's sample prompts, which it checks at start
    assert set(table.row) == captions | set(SHAPES_PROMPTS) | {"a red circle", "a green square", ""}
    assert f"{len(table.row)} prompts" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


def test_the_command_names_a_missing_config_or_a_bad_encoder(tmp_path):
    with pytest.raises(SystemExit, match="nope.yaml not found"):
        main([str(tmp_path / "t.safetensors"), "--encoder", "minilm", "--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(SystemExit, match="text_encoder 'bogus'"):
        main([str(tmp_path / "t.safetensors"), "--encoder", "bogus"])
    assert not list(tmp_path.iterdir())
