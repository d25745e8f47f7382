"""The four released DiffusionSat checkpoints, in miniature: official-shaped configs, official layouts.

The configs are Stable Diffusion 2.1's (which every release copied unchanged): the UNet keeps
``sample_size`` 96, ``attention_head_dim`` [5, 10, 20, 20], ``use_linear_projection`` and
``cross_attention_dim`` 1024; the v-prediction DDIM scheduler; the VAE and the OpenCLIP ViT-H text
encoder. Only the widths and depths are shrunk so that a CPU runs them in a second (channels,
layers, the text encoder's depth and vocabulary to the tiny tokenizer's). Weights are random.

Folders are laid out as each zip unpacks (``write_release(..., installed_by="zip")``, the folder
names of the official README) or as ``diffusionsat download`` installs them (``"download"``: the
release's name and its ``diffusionsat.json``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

#: stabilityai/stable-diffusion-2-1 unet/config.json as DiffusionSat saved it (SatUNet, diffusers
#: 0.17), block_out_channels and layers_per_block shrunk.
SD21_UNET = {
    "_class_name": "SatUNet", "_diffusers_version": "0.17.0.dev0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [32, 64, 64, 64],
    "center_input_sample": False, "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 1, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None, "num_metadata": 7,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default", "sample_size": 96, "time_cond_proj_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True, "use_metadata": True,
}
#: SD 2.1's vae/config.json, channels and depth shrunk (sample_size 768 kept).
SD21_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.10.0.dev0", "act_fn": "silu",
    "block_out_channels": [32, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 1, "norm_num_groups": 32, "out_channels": 3, "sample_size": 768,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
#: SD 2.1's text_encoder/config.json (OpenCLIP ViT-H/14, hidden 1024), depth, MLP width and
#: vocabulary shrunk to the tiny tokenizer's.
SD21_TEXT = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 1099, "dropout": 0.0,
    "eos_token_id": 1100, "hidden_act": "gelu", "hidden_size": 1024, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 256, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 16,
    "num_hidden_layers": 1, "pad_token_id": 33, "projection_dim": 512, "torch_dtype": "float32",
    "vocab_size": 1101,
}
#: SD 2.1's scheduler/scheduler_config.json, unchanged (v-prediction DDIM).
SD21_DDIM = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
#: A PNDM v-prediction config as older SD 2.x folders carry it (steps_offset 0: pre-normalisation).
OLD_PNDM = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 0,
    "trained_betas": None,
}

ZIP_FOLDERS = {
    "diffusionsat-512": "finetune_sd21_sn-satlas-fmow_snr5_md7norm_bs64",
    "diffusionsat-256": "finetune_sd21_256_sn-satlas-fmow_snr5_md7norm_bs64",
    "controlnet-superres": "controlnet_sd21_md7norm_fmow_condres256",
    "controlnet-texas": "controlnet3d-mixattn_sd21_md7norm_texas",
}
UNET_CHECKPOINTS = {"diffusionsat-512": ("checkpoint-100000", "checkpoint-150000"),
                    "diffusionsat-256": ("checkpoint-150000",)}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_official(model: torch.nn.Module, folder: Path, config: dict) -> None:
    """config.json as given + diffusion_pytorch_model.bin (a pickled state dict, as diffusers 0.17 saved)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config)
    torch.save(model.state_dict(), folder / "diffusion_pytorch_model.bin")


def build_parts(dest: Path) -> Path:
    """Every component once (random weights, seeded): ``dest/{vae,text_encoder,tokenizer,scheduler,
    unet,controlnet-superres,controlnet-texas}``; the layouts hard-link these files."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.controlnet import SatControlNet, SatControlNet3D
    from engine.models.configs import resource_path
    from engine.models.unet import SatUNet, init_metadata_embedding

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(15)
        unet = SatUNet.from_config(SD21_UNET)
        init_metadata_embedding(unet.metadata_embedding)
        _save_official(unet, dest / "unet", SD21_UNET)
        vae = AutoencoderKL.from_config(SD21_VAE)
        vae.save_pretrained(dest / "vae")
        _write_json(dest / "vae" / "config.json", SD21_VAE)
        text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in SD21_TEXT.items()
                                               if k not in ("architectures", "model_type", "torch_dtype")}))
        text.save_pretrained(dest / "text_encoder")
        _write_json(dest / "text_encoder" / "config.json", SD21_TEXT)
        shutil.copytree(resource_path("tiny", "tokenizer"), dest / "tokenizer")
        _write_json(dest / "scheduler" / "scheduler_config.json", SD21_DDIM)
        sr = SatControlNet.from_unet(unet, conditioning_in_channels=10, conditioning_scale=2)
        _save_official(sr, dest / "controlnet-superres", official_controlnet_config(sr))
        texas = SatControlNet3D.from_unet(unet, conditioning_in_channels=3)
        _save_official(texas, dest / "controlnet-texas", official_controlnet_config(texas))
    return dest


def official_controlnet_config(controlnet) -> dict:
    """The config the official code writes: its class name, no keys of ours, diffusers 0.17."""
    config = json.loads(controlnet.to_json_string())
    for key in ("first_temporal_heads", "first_temporal_head_dim", "conditioning_channels"):
        config.pop(key, None)
    config["_diffusers_version"] = "0.17.0.dev0"
    return config


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


def write_release(parts: Path, models: Path, name: str, installed_by: str = "zip") -> Path:
    """Lay release ``name`` out under ``models`` as its zip unpacks or as ``download`` installs it."""
    from engine.models import releases

    root = models / (ZIP_FOLDERS[name] if installed_by == "zip" else name)
    root.mkdir(parents=True)
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        _link_tree(parts / component, root / component)
    _write_json(root / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.17.0.dev0",
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    for checkpoint in UNET_CHECKPOINTS.get(name, ()):
        _link_tree(parts / "unet", root / checkpoint / "unet")
    if name.startswith("controlnet-"):
        _link_tree(parts / name, root / "controlnet")
    if installed_by == "download":
        releases.write_record(root, releases.download_record(releases.release(name)))
    return root
