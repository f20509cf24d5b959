#!/usr/bin/env python3
"""Converts OpenAI's DALL-E dVAE pickles (encoder.pkl, decoder.pkl) into one safetensors file that
`tokenizer.dalle_dvae.weights` loads.

    python3 tools/convert_dalle.py encoder.pkl decoder.pkl dvae.safetensors
    cim-run --preset vit_b16_respix --set 'tokenizer.dalle_dvae.weights="dvae.safetensors"'

The pickles are whole `torch.save`d modules of the `dall_e` package (openai/DALL-E); this script
does not need that package: it registers stand-in classes under the same module paths so the
pickles load, then writes every parameter under its state-dict name prefixed with `encoder.` /
`decoder.` (`encoder.blocks.group_1.block_1.res_path.conv_1.w`, …) — the names cim reads.

`--self-test` pickles stand-in modules of a small dVAE through the same path and checks the
round trip (used to test this script without OpenAI's files).
"""
import argparse
import sys
import types

import torch
import torch.nn as nn
from safetensors.torch import save_file


class _Conv2d(nn.Module):
    """dall_e.utils.Conv2d: parameters `w` (out, in, k, k) and `b` (out)."""

    def __init__(self, n_in=1, n_out=1, kw=1, **_):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_out, n_in, kw, kw))
        self.b = nn.Parameter(torch.zeros(n_out))


class _Module(nn.Module):
    """Any other dall_e class: only its registered submodules and parameters matter."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def _install_stand_ins():
    pkg = types.ModuleType("dall_e")
    pkg.__path__ = []
    sys.modules["dall_e"] = pkg
    utils = types.ModuleType("dall_e.utils")
    utils.Conv2d = _Conv2d
    sys.modules["dall_e.utils"] = utils
    for mod, names in [("dall_e.encoder", ["Encoder", "EncoderBlock"]),
                       ("dall_e.decoder", ["Decoder", "DecoderBlock"])]:
        m = types.ModuleType(mod)
        for n in names:
            setattr(m, n, type(n, (_Module,), {"__module__": mod}))
        sys.modules[mod] = m
    _Conv2d.__module__ = "dall_e.utils"
    _Conv2d.__name__ = _Conv2d.__qualname__ = "Conv2d"


def _state(obj):
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        return obj
    raise SystemExit(f"unexpected pickle content: {type(obj)}")


def convert(encoder_pkl, decoder_pkl, out):
    _install_stand_ins()
    tensors = {}
    for prefix, path in [("encoder", encoder_pkl), ("decoder", decoder_pkl)]:
        obj = torch.load(path, map_location="cpu", weights_only=False)
        for k, v in _state(obj).items():
            tensors[f"{prefix}.{k}"] = v.detach().float().contiguous()
    save_file(tensors, out)
    print(f"wrote {out}: {len(tensors)} tensors "
          f"(encoder {sum(k.startswith('encoder.') for k in tensors)}, "
          f"decoder {sum(k.startswith('decoder.') for k in tensors)})")
    return tensors


def _self_test(tmp):
    import os
    from collections import OrderedDict
    _install_stand_ins()
    enc_cls = sys.modules["dall_e.encoder"].Encoder
    blk_cls = sys.modules["dall_e.encoder"].EncoderBlock

    def block(n_in, n_out):
        b = blk_cls()
        b.id_path = _Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        b.res_path = nn.Sequential(OrderedDict([("relu_1", nn.ReLU()), ("conv_1", _Conv2d(n_in, n_out // 4, 3))]))
        return b

    enc = enc_cls()
    enc.blocks = nn.Sequential(OrderedDict([
        ("input", _Conv2d(3, 8, 7)),
        ("group_1", nn.Sequential(OrderedDict([("block_1", block(8, 16)), ("pool", nn.MaxPool2d(2))]))),
        ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _Conv2d(16, 32, 1))]))),
    ]))
    for p in enc.parameters():
        nn.init.normal_(p)
    dec = sys.modules["dall_e.decoder"].Decoder()
    dec.blocks = nn.Sequential(OrderedDict([("input", _Conv2d(32, 4, 1))]))
    e, d, o = (os.path.join(tmp, n) for n in ("encoder.pkl", "decoder.pkl", "dvae.safetensors"))
    torch.save(enc, e)
    torch.save(dec, d)
    t = convert(e, d, o)
    want = {"encoder.blocks.input.w", "encoder.blocks.group_1.block_1.id_path.w",
            "encoder.blocks.group_1.block_1.res_path.conv_1.b", "encoder.blocks.output.conv.w",
            "decoder.blocks.input.b"}
    assert want <= set(t), sorted(t)
    assert torch.equal(t["encoder.blocks.input.w"], enc.blocks.input.w.detach())
    print("self-test ok")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("encoder", nargs="?")
    ap.add_argument("decoder", nargs="?")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    if a.self_test:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            _self_test(tmp)
    elif a.encoder and a.decoder and a.out:
        convert(a.encoder, a.decoder, a.out)
    else:
        ap.error("give ENCODER.pkl DECODER.pkl OUT.safetensors, or --self-test")
