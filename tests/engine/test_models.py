"""SatUNet: reference equivalence, the official checkpoint layout, plain SD UNets, bad weights."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from engine.errors import ModelLoadError, ModelNotFound
from engine.models.loading import load_model, load_unet
from engine.models.registry import find_unet_folder
from engine.models.tiny import build_tiny
from engine.models.unet import SatUNet
from engine.models.weights import read_state_dict

# An SD-2.1-shaped UNet in miniature: every block type the real one has, with the reference's
# configuration flags (linear projection, flip_sin_to_cos, freq_shift 0).
SMALL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[32, 64],
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    norm_num_groups=8,
    flip_sin_to_cos=True,
    freq_shift=0,
)


def reference_sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The timestep projection written out from the reference facts (cos first, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = values.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()


def reference_forward(stock: UNet2DConditionModel, md_weights: dict, sample, t, text, metadata):
    """A stock diffusers UNet plus the reference's metadata path, added by hand.

    Each field i: sinusoid(320-style projection) -> linear_1 -> SiLU -> linear_2, summed over the
    7 fields and added to the output of ``time_embedding`` (before the block activations).
    """
    dim = stock.time_embedding.linear_1.in_features
    extra = 0.0
    for i in range(metadata.shape[1]):
        h = reference_sinusoid(metadata[:, i], dim)
        h = torch.nn.functional.linear(h, md_weights[f"metadata_embedding.{i}.linear_1.weight"],
                                       md_weights[f"metadata_embedding.{i}.linear_1.bias"])
        h = torch.nn.functional.silu(h)
        h = torch.nn.functional.linear(h, md_weights[f"metadata_embedding.{i}.linear_2.weight"],
                                       md_weights[f"metadata_embedding.{i}.linear_2.bias"])
        extra = extra + h
    handle = stock.time_embedding.register_forward_hook(lambda m, inp, out: out + extra)
    try:
        return stock(sample, t, encoder_hidden_states=text).sample
    finally:
        handle.remove()


def write_official_unet(folder, model: torch.nn.Module, config: dict, *, fmt: str = "bin"):
    """Save as the released checkpoints are: config.json (_class_name SatUNet, 0.17 keys) + a .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "SatUNet", "_diffusers_version": "0.17.0.dev0", **config,
           "use_metadata": True, "num_metadata": 7}
    (folder / "config.json").write_text(json.dumps(cfg))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "bin":
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))


def test_equivalent_to_reference_architecture(tmp_path):
    torch.manual_seed(0)
    ours = SatUNet(**SMALL_UNET)
    write_official_unet(tmp_path / "unet", ours, SMALL_UNET)
    state = torch.load(tmp_path / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    # The reference's key names, and nothing else beyond the stock UNet's keys.
    md_keys = sorted(k for k in state if k.startswith("metadata_embedding."))
    assert md_keys == sorted(
        f"metadata_embedding.{i}.{layer}.{p}" for i in range(7) for layer in ("linear_1", "linear_2")
        for p in ("weight", "bias")
    )
    assert state["metadata_embedding.3.linear_1.weight"].shape == (128, 32)  # proj dim -> 4 x channels
    stock = UNet2DConditionModel(**SMALL_UNET)
    missing, unexpected = stock.load_state_dict(state, strict=False)
    assert missing == [] and sorted(unexpected) == md_keys

    reloaded = load_unet(tmp_path / "unet")
    sample = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, 16)
    t = torch.tensor([999, 17])
    metadata = torch.tensor([[712.7, 659.4, 929.4, 76.6, 291.7, 166.7, 871.0],
                             [0.0, 1000.0, 10000.0, 0.0, 500.0, 83.3, 32.3]])
    with torch.no_grad():
        expected = reference_forward(stock, state, sample, t, text, metadata)
        got = reloaded(sample, t, text, metadata=metadata).sample
        plain = stock(sample, t, encoder_hidden_states=text).sample
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    # ...and the metadata path matters, so the comparison above could have failed.
    assert (got - plain).abs().max() > 1e-3


def test_metadata_changes_the_output():
    torch.manual_seed(1)
    unet = SatUNet(**SMALL_UNET).eval()
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    with torch.no_grad():
        a = unet(sample, 500, text, metadata=torch.tensor([[500.0] * 7])).sample
        b = unet(sample, 500, text, metadata=torch.tensor([[500.0] * 6 + [900.0]])).sample
        none = unet(sample, 500, text).sample
        zeros = unet(sample, 500, text, metadata=torch.zeros(1, 7)).sample
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(none, zeros)  # unknown metadata is zeros, as training's dropout


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_folder_round_trip(tmp_path, fmt, tiny_bundle):
    root = tmp_path / "DiffusionSat"
    shutil.copytree(_export_components(tmp_path, tiny_bundle), root)
    unet_cfg = {k: v for k, v in dict(tiny_bundle.unet.config).items() if not k.startswith("_")}
    write_official_unet(root / "checkpoint-150000" / "unet", tiny_bundle.unet, unet_cfg, fmt=fmt)
    write_official_unet(root / "checkpoint-100000" / "unet", SatUNet(**SMALL_UNET), SMALL_UNET)
    assert find_unet_folder(root) == root / "checkpoint-150000" / "unet"  # highest N, non-EMA
    loaded = load_model(str(root))
    ref = tiny_bundle.unet.state_dict()
    got = loaded.unet.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # Saving in our layout gives the same file set the official folders have.
    loaded.unet.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["_class_name"] == "SatUNet"
    assert read_state_dict(tmp_path / "resaved").keys() == ref.keys()


def _export_components(tmp_path, bundle):
    from engine.models.loading import save_bundle

    folder = save_bundle(bundle, tmp_path / "components")
    shutil.rmtree(folder / "unet")
    return folder


def test_plain_sd_unet_loads_with_and_without_metadata(tmp_path):
    torch.manual_seed(2)
    stock = UNet2DConditionModel(**SMALL_UNET)
    stock.save_pretrained(tmp_path / "sd_unet")
    assert json.loads((tmp_path / "sd_unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"

    baseline = load_unet(tmp_path / "sd_unet")
    assert baseline.metadata_embedding is None and not baseline.config.use_metadata
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    with torch.no_grad():
        assert torch.allclose(baseline(sample, 3, text).sample, stock(sample, 3, encoder_hidden_states=text).sample,
                              atol=1e-6, rtol=0)

    # Metadata MLPs added to an SD UNet are initialised explicitly: no NaN, no uninitialised memory
    # (diffusers >= 0.33 skips init in from_pretrained), the usual nn.Linear scale.
    with_md = load_unet(tmp_path / "sd_unet", use_metadata=True)
    for name, p in with_md.metadata_embedding.named_parameters():
        assert torch.isfinite(p).all(), name
        assert 0 < p.abs().max() <= 1.0 / math.sqrt(p.shape[-1] if p.ndim == 2 else 1) + 1e-6 or p.ndim == 1
    assert with_md.metadata_embedding[0].linear_1.weight.std() > 0
    # the SD weights themselves are untouched
    assert torch.equal(with_md.conv_in.weight, stock.conv_in.weight)


def test_satunet_loaded_without_metadata_drops_the_mlps(tmp_path):
    unet = SatUNet(**SMALL_UNET)
    write_official_unet(tmp_path / "u", unet, SMALL_UNET)
    assert load_unet(tmp_path / "u", use_metadata=False).metadata_embedding is None


def test_corrupt_and_missing_weights_give_clear_errors(tmp_path, tiny_folder):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    weights = bad / "checkpoint-0" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(str(bad))
    weights.unlink()
    with pytest.raises(ModelNotFound, match="no weights"):
        load_model(str(bad))
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    # An incomplete root without --base names what is missing and how to supply it.
    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(ModelNotFound, match="lacks vae.*--base"):
        load_model(str(partial))
    loaded = load_model(str(partial), base=str(tiny_folder))
    assert loaded.vae is not None


def test_mismatched_weights_are_refused(tmp_path):
    unet = SatUNet(**SMALL_UNET)
    cfg = dict(SMALL_UNET, block_out_channels=[32, 32])
    write_official_unet(tmp_path / "u", unet, cfg)
    with pytest.raises(ModelLoadError, match="do not match its config.json"):
        load_unet(tmp_path / "u")


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny()
    after = torch.rand(1)
    b = build_tiny()
    assert torch.equal(before, after)
    assert torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert a.native_resolution == 256


def test_a_diffusers_0_17_era_config_loads(tmp_path):
    """The released configs carry keys of diffusers 0.17 (some gone or renamed since): all load."""
    cfg_017 = {
        "_class_name": "SatUNet", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
        "addition_embed_type": None, "addition_embed_type_num_heads": 64, "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64], "center_input_sample": False, "class_embed_type": None,
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 16,
        "cross_attention_norm": None, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": 4, "layers_per_block": 1, "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": 8, "num_class_embeds": None, "num_metadata": 7, "only_cross_attention": False,
        "out_channels": 4, "projection_class_embeddings_input_dim": None, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 8,
        "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "upcast_attention": False,
        "use_linear_projection": True, "use_metadata": True,
    }
    torch.manual_seed(4)
    model = SatUNet(**SMALL_UNET)
    folder = tmp_path / "checkpoint-150000" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg_017))
    torch.save(model.state_dict(), folder / "diffusion_pytorch_model.bin")
    loaded = load_unet(folder)
    sample, text, md = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16), torch.rand(1, 7) * 1000
    with torch.no_grad():
        assert torch.allclose(loaded(sample, 9, text, metadata=md).sample, model(sample, 9, text, metadata=md).sample,
                              atol=1e-6)
