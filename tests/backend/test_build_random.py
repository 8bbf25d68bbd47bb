"""`analogon build-random`: a diffusers folder with random weights from a config folder, which
the resolver loads like any other. Full-size folders take minutes and gigabytes, so the tests
build from the embedded tiny models' configs; the project's own configs are checked for shape."""
from __future__ import annotations

import json

import pytest
import torch

from analogon.bench._random_models import FAMILIES, build_random
from analogon.models import load_bundle
from analogon.models.single_file import CONFIG_ROOT, save_config_folder


@pytest.mark.parametrize("spec,name,family", [("tiny-sd", "sd15", "sd1"), ("tiny-sdxl", "sdxl", "sdxl")])
def test_built_folder_loads_through_the_resolver(tmp_path, spec, name, family):
    tiny = load_bundle(spec, None)
    cfg = save_config_folder(tiny.pipe, tmp_path / "cfg")
    out = build_random(name, tmp_path / "model", config_dir=cfg, log=lambda *_: None)
    b = load_bundle(str(out), None)
    assert b.family == family and b.source == "local"
    assert list(b.unet.config.block_out_channels) == list(tiny.unet.config.block_out_channels)
    # random weights: not the tiny model's, but the same shapes, and deterministic per seed
    p_new = dict(b.unet.named_parameters())
    p_old = dict(tiny.unet.named_parameters())
    assert p_new.keys() == p_old.keys()
    assert all(p_new[k].shape == p_old[k].shape for k in p_new)
    again = build_random(name, tmp_path / "again", config_dir=cfg, log=lambda *_: None)
    b2 = load_bundle(str(again), None)
    k = next(iter(p_new))
    assert torch.equal(dict(b2.unet.named_parameters())[k], p_new[k])
    with pytest.raises(FileExistsError):
        build_random(name, out, config_dir=cfg, log=lambda *_: None)


def test_the_project_configs_are_the_full_size_architectures():
    want = {"sd15": (768, [320, 640, 1280, 1280]), "sd21": (1024, [320, 640, 1280, 1280]),
            "sdxl": (2048, [320, 640, 1280])}
    for name, (folder, _family) in FAMILIES.items():
        unet = json.loads((CONFIG_ROOT / folder / "unet" / "config.json").read_text())
        assert (unet["cross_attention_dim"], unet["block_out_channels"]) == want[name]
