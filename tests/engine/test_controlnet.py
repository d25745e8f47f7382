"""The metadata ControlNet and ControlNet3D against the reference facts (§5), and the control sampler."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

from engine.models.controlnet import (
    SatControlNet,
    SatControlNet3D,
    conditioning_strides,
)
from engine.models.loading import load_controlnet
from engine.models.unet import SatUNet

from .test_models import SMALL_UNET, reference_sinusoid

F = torch.nn.functional
#: SMALL_UNET without the decoder-only keys a ControlNet does not take
CN = {k: v for k, v in SMALL_UNET.items() if k not in ("sample_size", "out_channels", "up_block_types")}


def md_mlp_sum(state: dict, prefix: str, values: torch.Tensor, dim: int) -> torch.Tensor:
    """Σ_i MLP_i(sinusoid(values[:, i])) written out from the reference facts."""
    total = 0.0
    for i in range(values.shape[1]):
        h = reference_sinusoid(values[:, i], dim)
        h = F.linear(h, state[f"{prefix}metadata_embedding.{i}.linear_1.weight"],
                     state[f"{prefix}metadata_embedding.{i}.linear_1.bias"])
        h = F.linear(F.silu(h), state[f"{prefix}metadata_embedding.{i}.linear_2.weight"],
                     state[f"{prefix}metadata_embedding.{i}.linear_2.bias"])
        total = total + h
    return total


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (zero-initialised outputs would make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return SatUNet(**SMALL_UNET).eval()


def test_conditioning_strides_from_the_config_scale():
    assert conditioning_strides(1) == [2, 2, 2]
    assert conditioning_strides(2) == [2, 2, 1]
    assert conditioning_strides(4) == [2, 1, 1]
    cn = SatControlNet(conditioning_in_channels=10, conditioning_scale=2, **CN)
    strides = [b.stride[0] for b in cn.controlnet_cond_embedding.blocks]
    assert strides == [1, 2, 1, 2, 1, 1]
    assert cn.controlnet_cond_embedding.conv_in.in_channels == 10
    out = cn.controlnet_cond_embedding(torch.rand(1, 10, 32, 32))
    assert out.shape == (1, 32, 8, 8)  # 256 -> 64 at full size: 4x down for scale 2


def test_metadata_controlnet_equals_reference(tmp_path):
    """Ours vs stock diffusers ControlNetModel (same weights) + the metadata sum added by hand."""
    ours = randomise(SatControlNet(conditioning_in_channels=3, conditioning_scale=1, **CN)).eval()
    ours.save_pretrained(tmp_path / "controlnet")
    config = json.loads((tmp_path / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel"
    assert config["conditioning_in_channels"] == 3 and config["conditioning_scale"] == 1
    assert "conditioning_channels" not in config
    reloaded = load_controlnet(tmp_path / "controlnet")
    state = {k: v for k, v in ours.state_dict().items()}

    stock = ControlNetModel(conditioning_channels=3, **CN).eval()
    missing, unexpected = stock.load_state_dict(state, strict=False)
    assert missing == [] and all(k.startswith("metadata_embedding.") for k in unexpected)

    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 16)
    cond = torch.rand(2, 3, 64, 64)
    md = torch.tensor([[712.7, 659.4, 929.4, 76.6, 291.7, 166.7, 871.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    cond_md = torch.rand(2, 7, 3) * 1000  # three frames' metadata: embedded per frame, summed
    t = torch.tensor([10, 900])
    dim = stock.time_embedding.linear_1.in_features
    extra = md_mlp_sum(state, "", md, dim) + sum(md_mlp_sum(state, "", cond_md[:, :, f], dim) for f in range(3))
    hook = stock.time_embedding.register_forward_hook(lambda m, i, o: o + extra)
    with torch.no_grad():
        expected = stock(sample, t, text, cond, return_dict=False)
        hook.remove()
        got = reloaded(sample, t, text, cond, metadata=md, cond_metadata=cond_md, return_dict=False)
        plain = stock(sample, t, text, cond, return_dict=False)
    for a, b in zip(got[0], expected[0]):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(got[1], expected[1], atol=1e-5)
    assert (got[1] - plain[1]).abs().max() > 1e-4  # the metadata path is exercised


def reference_controlnet3d(cn: SatControlNet3D, sample, t, text, cond, md, cond_md):
    """ControlNet3D written from the reference facts with independent pieces.

    3D conditioning embedding by hand (F.conv3d), frames folded into the batch (b t), a stock
    diffusers ControlNetModel for the shared 2D trunk, zero 1x1x1 Conv3d per residual, temporal
    transformers rebuilt with the reference's head split, α clamped to [0, 1], sum over frames.
    """
    state = cn.state_dict()
    b, _, frames = cond.shape[:3]
    x = F.silu(F.conv3d(cond, state["controlnet_cond_embedding.conv_in.weight"],
                        state["controlnet_cond_embedding.conv_in.bias"], padding=1))
    for i in range(3):
        x = F.silu(F.conv3d(x, state[f"controlnet_cond_embedding.blocks.{2 * i}.weight"],
                            state[f"controlnet_cond_embedding.blocks.{2 * i}.bias"], padding=1))
        x = F.silu(F.conv3d(x, state[f"controlnet_cond_embedding.blocks.{2 * i + 1}.weight"],
                            state[f"controlnet_cond_embedding.blocks.{2 * i + 1}.bias"], stride=(1, 2, 2),
                            padding=(0, 1, 1)))
    emb = F.conv3d(x, state["controlnet_cond_embedding.conv_out.weight"],
                   state["controlnet_cond_embedding.conv_out.bias"], padding=1)
    emb = emb.permute(0, 2, 1, 3, 4).reshape(b * frames, emb.shape[1], *emb.shape[3:])

    trunk = ControlNetModel(conditioning_channels=3, **CN).eval()
    trunk.load_state_dict({k: v for k, v in state.items() if k.split(".")[0] in
                           ("conv_in", "time_embedding", "down_blocks", "mid_block")}, strict=False)
    dim = trunk.time_embedding.linear_1.in_features
    target = md_mlp_sum(state, "", md, dim).repeat_interleave(frames, 0)
    per_frame = md_mlp_sum(state, "", cond_md.permute(0, 2, 1).reshape(b * frames, 7), dim)
    hooks = [
        trunk.time_embedding.register_forward_hook(lambda m, i, o: o + target + per_frame),
        trunk.controlnet_cond_embedding.register_forward_hook(lambda m, i, o: emb),
    ]
    # capture the trunk's raw residuals (before its own zero convs)
    raw = []
    for block in trunk.controlnet_down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: raw.append(i[0])))
    mid_raw = []
    hooks.append(trunk.controlnet_mid_block.register_forward_hook(lambda m, i, o: mid_raw.append(i[0])))
    trunk(sample.repeat_interleave(frames, 0), t.repeat_interleave(frames, 0),
          text.repeat_interleave(frames, 0), torch.zeros(b * frames, 3, 8, 8))
    for h in hooks:
        h.remove()

    heads_cfg = SMALL_UNET["attention_head_dim"]
    positions = {0: (8, 64)}
    index = 0
    for i, c in enumerate(SMALL_UNET["block_out_channels"][:-1]):
        index += SMALL_UNET["layers_per_block"] + 1
        positions[index] = (c // heads_cfg[i], heads_cfg[i])  # heads = channels / value
    down = []
    for n, r in enumerate(raw):
        r = r.reshape(b, frames, *r.shape[1:]).permute(0, 2, 1, 3, 4)
        r = F.conv3d(r, state[f"controlnet_down_blocks.{n}.weight"], state[f"controlnet_down_blocks.{n}.bias"])
        if n in positions:
            heads, head_dim = positions[n]
            # the official code passes the model's norm_num_groups to every temporal block after
            # the first; the first keeps TransformerTemporalModel's default 32
            groups = 32 if n == 0 else SMALL_UNET["norm_num_groups"]
            tt = TransformerTemporalModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                          in_channels=r.shape[1], norm_num_groups=groups).eval()
            tt.load_state_dict({k[len(f"temporal_blocks.{n}."):]: v for k, v in state.items()
                                if k.startswith(f"temporal_blocks.{n}.")})
            c, h, w = r.shape[1], r.shape[3], r.shape[4]
            folded = r.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)
            out = tt(folded, num_frames=frames).sample.reshape(b, frames, c, h, w).permute(0, 2, 1, 3, 4)
            alpha = state[f"mixing_attns.{n}"].clamp(0, 1)
            r = alpha * out + (1 - alpha) * r
        down.append(r.sum(dim=2))
    m = mid_raw[0].reshape(b, frames, *mid_raw[0].shape[1:]).permute(0, 2, 1, 3, 4)
    mid = F.conv3d(m, state["controlnet_mid_block.weight"], state["controlnet_mid_block.bias"]).sum(dim=2)
    return down, mid


def test_controlnet3d_equals_reference(tmp_path):
    ours = randomise(SatControlNet3D(conditioning_in_channels=3, **CN), seed=3).eval()
    with torch.no_grad():
        ours.mixing_attns[0].fill_(0.7)
        ours.mixing_attns[2].fill_(1.8)  # clamped to 1
    ours.save_pretrained(tmp_path / "controlnet")
    config = json.loads((tmp_path / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel3D" and config["use_temporal_transformer"]
    reloaded = load_controlnet(tmp_path / "controlnet")
    keys = set(reloaded.state_dict())
    assert {"mixing_attns.0", "mixing_attns.1", "temporal_blocks.0.proj_in.weight", "temporal_blocks.2.proj_in.weight",
            "controlnet_cond_embedding.blocks.5.weight", "controlnet_mid_block.weight"} <= keys
    assert not any(k.startswith("temporal_blocks.1.") for k in keys)  # identity blocks have no weights
    # the head-split trap: index 0 has 8 heads of 64; the downsampler block has channels/value heads
    assert reloaded.temporal_blocks[0].transformer_blocks[0].attn1.heads == 8
    assert reloaded.temporal_blocks[2].transformer_blocks[0].attn1.heads == 32 // 2
    # norm_num_groups (8 here, not SD's 32) reaches the temporal blocks after the first
    assert SMALL_UNET["norm_num_groups"] != 32
    assert reloaded.temporal_blocks[0].norm.num_groups == 32
    assert reloaded.temporal_blocks[2].norm.num_groups == SMALL_UNET["norm_num_groups"]

    b, frames = 2, 3
    sample, text = torch.randn(b, 4, 8, 8), torch.randn(b, 77, 16)
    cond = torch.rand(b, 3, frames, 64, 64)
    md, cond_md = torch.rand(b, 7) * 1000, torch.rand(b, 7, frames) * 1000
    t = torch.tensor([50, 700])
    with torch.no_grad():
        got_down, got_mid = reloaded(sample, t, text, cond, metadata=md, cond_metadata=cond_md, return_dict=False)
        exp_down, exp_mid = reference_controlnet3d(reloaded, sample, t, text, cond, md, cond_md)
    assert len(got_down) == len(exp_down) == 4
    for a, e in zip(got_down, exp_down):
        assert a.shape == e.shape
        assert torch.allclose(a, e, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got_mid, exp_mid, atol=1e-4, rtol=1e-4)
    # frame order matters (temporal kernels), so the comparison above is not order-blind
    with torch.no_grad():
        flipped, _ = reloaded(sample, t, text, cond.flip(2), metadata=md, cond_metadata=cond_md.flip(2),
                              return_dict=False)
    assert (flipped[0] - got_down[0]).abs().max() > 1e-5


@pytest.mark.parametrize("cls", [SatControlNet, SatControlNet3D])
def test_fresh_controlnet_leaves_the_unet_unchanged(unet, cls):
    kwargs = {"conditioning_in_channels": 3}
    cn = cls.from_unet(unet, **kwargs).eval()
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block", "metadata_embedding"):
        a, b = getattr(cn, name).state_dict(), getattr(unet, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    cond = torch.rand(1, 3, 2, 64, 64) if cls is SatControlNet3D else torch.rand(1, 3, 64, 64)
    md = torch.rand(1, 7) * 1000
    with torch.no_grad():
        down, mid = cn(sample, 5, text, cond, metadata=md, return_dict=False)
        base = unet(sample, 5, text, metadata=md).sample
        with_cn = unet(sample, 5, text, metadata=md, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    assert all(r.abs().max() == 0 for r in down) and mid.abs().max() == 0
    assert torch.equal(base, with_cn)


def test_mixing_alpha_is_clamped_with_a_straight_through_gradient():
    cn = randomise(SatControlNet3D(conditioning_in_channels=3, **CN), seed=5)
    sample, text, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16), torch.rand(1, 3, 2, 64, 64)
    with torch.no_grad():
        cn.mixing_attns[0].fill_(-0.5)  # clamps to 0: the temporal block has no effect
        a = cn(sample, 5, text, cond, return_dict=False)[0][0]
        cn.temporal_blocks[0] = torch.nn.Identity()
        b = cn(sample, 5, text, cond, return_dict=False)[0][0]
    assert torch.allclose(a, b, atol=1e-6)
    cn = randomise(SatControlNet3D(conditioning_in_channels=3, **CN), seed=5)
    with torch.no_grad():
        cn.mixing_attns[0].fill_(-0.5)
    cn(sample, 5, text, cond, return_dict=False)[0][0].sum().backward()
    assert cn.mixing_attns[0].grad is not None and cn.mixing_attns[0].grad.abs().item() > 0


def test_guess_mode_scales():
    cn = randomise(SatControlNet(conditioning_in_channels=3, **CN)).eval()
    sample, text, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain, _ = cn(sample, 5, text, cond, return_dict=False)
        guess, _ = cn(sample, 5, text, cond, guess_mode=True, return_dict=False)
    scales = torch.logspace(-1, 0, len(plain) + 1)
    for p, g, s in zip(plain, guess, scales):
        assert torch.allclose(g, p * s, atol=1e-6)
    assert math.isclose(scales[0].item(), 0.1, rel_tol=1e-6)


class ControlRecorder:
    def __init__(self, controlnet):
        self.controlnet, self.calls = controlnet, []

    def __call__(self, sample, t, text, image, **kw):
        self.calls.append({"sample": sample.clone(), "text": text.clone(), "image": image.clone(),
                           "metadata": kw["metadata"].clone(), "cond_metadata": kw["cond_metadata"].clone()})
        return self.controlnet(sample, t, text, image, **kw)

    def __getattr__(self, name):
        return getattr(self.controlnet, name)


@pytest.mark.parametrize("guess_mode", [False, True])
def test_control_pipeline_cfg_halves(tiny_bundle, guess_mode):
    from engine.pipelines.controlnet import Control, DiffusionSatControlNetPipeline

    rec = ControlRecorder(tiny_bundle.controlnets["superres"])
    pipe = DiffusionSatControlNetPipeline.from_bundle(tiny_bundle, controlnet=rec)
    image = torch.rand(1, 10, 32, 32)
    md = [500.0] * 7
    cond_md = torch.tensor([[100.0, 200, 10000, 0, 300, 500, 400]])
    out = pipe("a satellite image", md, height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), control=Control(image, cond_md, 0.8, guess_mode))
    assert out.images.shape == (1, 64, 64, 3)
    call = rec.calls[0]
    if guess_mode:
        # only the conditional half reaches the ControlNet, every input from that half
        assert call["sample"].shape[0] == 1
        assert torch.allclose(call["metadata"][0], torch.tensor(md))
        assert torch.allclose(call["cond_metadata"][0], cond_md[0])
    else:
        assert call["sample"].shape[0] == 2
        assert torch.equal(call["image"][0], call["image"][1])  # the same, un-zeroed control image
        assert torch.equal(call["image"][0], image[0])
        assert torch.equal(call["metadata"][0], torch.zeros(7))
        assert torch.equal(call["cond_metadata"][0], torch.zeros(7))  # zero cond metadata when unconditional
        assert torch.allclose(call["cond_metadata"][1], cond_md[0])


def test_conditioning_changes_the_tiny_output(tiny_bundle):
    from engine.pipelines.controlnet import Control, DiffusionSatControlNetPipeline

    pipe = DiffusionSatControlNetPipeline.from_bundle(tiny_bundle, controlnet=tiny_bundle.controlnets["temporal"])

    def run(frames):
        return pipe("a satellite image", [500.0] * 7, height=64, width=64, num_inference_steps=2,
                    guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                    control=Control(frames, torch.full((1, 7, 2), 300.0))).images

    a = run(torch.zeros(1, 3, 2, 64, 64))
    b = run(torch.ones(1, 3, 2, 64, 64))
    assert abs(a - b).max() > 1e-3
