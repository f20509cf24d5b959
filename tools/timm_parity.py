#!/usr/bin/env python3
"""Loads a `cim-run export --format timm` file into timm and checks it computes cim's features.

    cim-run probe RUN_DIR --preset probe_cifar10               # caches cim's features (mean pooling)
    cim-run export RUN_DIR --format timm enc.safetensors
    python3 tools/timm_parity.py RUN_DIR enc.safetensors data/cifar10/test.bin

Builds timm's VisionTransformer with the run's sizes (read from RUN_DIR/config.toml), loads the export
with strict=True, runs the first 256 CIFAR-10 test images normalised as cim does, and compares the mean
of the patch tokens with cim's cached probe features of the same images. Needs torch, timm,
safetensors.
"""
import glob
import sys
import tomllib

import numpy as np
import timm
import torch
from safetensors.torch import load_file

run, export, test_bin = sys.argv[1:4]
cfg = tomllib.load(open(f"{run}/config.toml", "rb"))
name = cfg["enhancer"]["name"]
e = cfg["enhancer"][name]
size = cfg["data"]["image_size"]
model = timm.models.vision_transformer.VisionTransformer(
    img_size=size, patch_size=e["patch_size"], embed_dim=e["width"], depth=e["depth"],
    num_heads=e["heads"], mlp_ratio=e["mlp_ratio"], num_classes=0, qkv_bias=True)
missing = model.load_state_dict(load_file(export), strict=True)
model.eval()

raw = np.fromfile(test_bin, dtype=np.uint8).reshape(-1, 3073)[:256]
x = torch.tensor(raw[:, 1:].reshape(-1, 3, 32, 32), dtype=torch.float32) / 255.0
mean = torch.tensor(cfg["data"]["mean"]).view(1, 3, 1, 1)
std = torch.tensor(cfg["data"]["std"]).view(1, 3, 1, 1)
with torch.no_grad():
    tokens = model.forward_features((x - mean) / std)  # (B, 1 + N, D), after the final norm
ours = tokens[:, 1:].mean(1).numpy()

cached = sorted(glob.glob(f"{run}/probe/pretrained-mean-*-test-10000.safetensors"))
cim = load_file(cached[0])["features"][:256].numpy()
diff = np.abs(ours - cim).max()
print(f"timm {model.__class__.__name__} loaded {export} strictly; "
      f"max |timm − cim| over 256 images × {ours.shape[1]} features = {diff:.2e}")
sys.exit(0 if diff < 1e-3 else 1)
