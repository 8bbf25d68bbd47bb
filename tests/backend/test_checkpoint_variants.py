"""Checkpoints as painters have them, on tiny models shaped like the real ones: the SDXL
refiner (folder and single file; PIXELS runs on it, the other methods refuse clearly),
inpainting models (refused at load with the reason), SD 2.x base vs v without a yaml (the
load-time probe and its overrides). Nothing here uses the network."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analogon.core import images as im
from analogon.core.diffusion import encode_prompt, make_scheduler, vae_encode
from analogon.errors import AnalogonError, ModelError
from analogon.methods import get as get_method
from analogon.methods import pixels as px
from analogon.methods.base import Inputs, LayerImage
from analogon.models import LoadOptions, ModelManager, load_bundle
from analogon.models import prediction as pred
from analogon.models.discovery import classify_file, scan
from analogon.models.single_file import checkpoint_keys, save_single_file
from analogon.models.tiny import build_tiny_sd_inpainting, build_tiny_sdxl_refiner

CPU = LoadOptions(device="cpu")


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 5 + y / 7)], -1) * 200 + 25
    out = np.empty((h, w, 4), np.uint8)
    out[..., :3] = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255)
    out[..., 3] = 255
    return out


def pixels_inputs(w: int = 64, h: int = 64) -> Inputs:
    src = photo(w, h)
    m = np.zeros((h, w), np.uint8)
    m[8:56, 8:56] = 255
    edit = np.stack([m, m, m, np.full_like(m, 255)], -1)
    ex = np.zeros((h, w, 4), np.uint8)
    ex[16:48, 16:48] = (230, 30, 40, 255)
    return Inputs({"source": LayerImage(src, "src"), "exemplar": [LayerImage(ex, "ex")],
                   "edit_map": [LayerImage(edit, "map")]})


@pytest.fixture(scope="module")
def refiner_paths(tmp_path_factory):
    """The tiny refiner as a diffusers folder and as one LDM-layout file (no config beside it
    would fit the tiny shapes, so the file carries its config folder as the tests' others do)."""
    root = tmp_path_factory.mktemp("refiner")
    build_tiny_sdxl_refiner().save_pretrained(root / "refiner")
    folder = load_bundle(str(root / "refiner"), CPU)
    path = save_single_file(folder, root / "refiner.safetensors")
    return root / "refiner", path


@pytest.fixture(scope="module")
def refiner(refiner_paths):
    return load_bundle(str(refiner_paths[0]), CPU)


# -- the SDXL refiner ------------------------------------------------------------------------

def test_the_refiner_is_detected_from_its_weights_and_loads_as_folder_and_file(refiner, refiner_paths):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    assert (refiner.family, refiner.variant, refiner.is_refiner) == ("sdxl", "sdxl-refiner", True)
    assert isinstance(refiner.pipe, StableDiffusionXLImg2ImgPipeline) and refiner.text_encoder is None
    keys = checkpoint_keys(refiner_paths[1])
    assert any(k.startswith("conditioner.embedders.0.model.") for k in keys)
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in keys)
    assert classify_file(refiner_paths[1])[:2] == ("sdxl", "sdxl-refiner")
    single = load_bundle(str(refiner_paths[1]), CPU)
    assert (single.variant, single.source, single.text_encoder) == ("sdxl-refiner", "single_file", None)
    for comp in ("unet", "vae", "text_encoder_2"):
        sa, sb = getattr(refiner, comp).state_dict(), getattr(single, comp).state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), comp
    a, b = encode_prompt(refiner, "a red cube", "", (64, 64)), encode_prompt(single, "a red cube", "", (64, 64))
    for x, y in zip(a, b):
        for f, g in zip(x.fields(), y.fields()):
            torch.testing.assert_close(f, g)


def test_refiner_conditioning_has_one_encoder_five_ids_and_encoded_negatives(refiner):
    cond, uncond = encode_prompt(refiner, "a red cube", "", (48, 80), aesthetic=7.0, negative_aesthetic=1.5)
    assert cond.hidden.shape[-1] == refiner.text_encoder_2.config.hidden_size  # bigG only
    assert cond.time_ids.tolist() == [[48.0, 80.0, 0.0, 0.0, 7.0]]
    assert uncond.time_ids.tolist() == [[48.0, 80.0, 0.0, 0.0, 1.5]]
    # the refiner's config has force_zeros_for_empty_prompt=False: the empty negative is text
    assert not refiner.pipe.config.force_zeros_for_empty_prompt
    assert uncond.hidden.abs().sum() > 0 and uncond.pooled.abs().sum() > 0
    # defaults: diffusers' 6.0 / 2.5
    c, u = encode_prompt(refiner, "x")
    assert (c.time_ids[0, 4].item(), u.time_ids[0, 4].item()) == (6.0, 2.5)


def test_pixels_on_the_refiner_is_diffusers_refiner_img2img(refiner, make_ctx):
    """PIXELS with no map and no exemplar is img2img: exactly diffusers' refiner pipeline
    (5 time ids with the aesthetic scores, one text encoder), not a shape crash."""
    src = photo(64, 64, seed=3)
    p = px.PixelsParams(steps=4, strength=0.75, scheduler="euler", prompt="snow", guidance=5.0,
                        aesthetic_score=7.0, negative_aesthetic_score=2.0)
    ours = px.denoise(make_ctx(refiner, seed=5),
                      px.plan_job(refiner, Inputs({"source": LayerImage(src, "s")}), p), p)
    pipe = type(refiner.pipe).from_pipe(refiner.pipe, scheduler=make_scheduler(refiner, "euler", 4))
    pipe.set_progress_bar_config(disable=True)

    def ref(aesthetic):
        return pipe(prompt="snow", image=vae_encode(refiner, im.to_tensor(src)), strength=0.75,
                    num_inference_steps=4, guidance_scale=5.0, aesthetic_score=aesthetic,
                    negative_aesthetic_score=2.0, generator=torch.Generator().manual_seed(5),
                    output_type="latent").images

    r = ref(7.0)
    assert (ours - r).abs().max().item() <= 1e-5
    assert (ref(3.0) - r).abs().max().item() > 1e-3  # the score reaches the UNet


@pytest.mark.parametrize("which", [0, 1], ids=["folder", "single_file"])
def test_a_pixels_edit_runs_on_the_refiner(refiner_paths, make_ctx, which):
    bundle = load_bundle(str(refiner_paths[which]), CPU)
    res = get_method("pixels").run(make_ctx(bundle), pixels_inputs(),
                                   px.PixelsParams(steps=4, strength=0.75, scheduler="ddim", prompt="a lake"))
    out = res.images[0].rgba
    src = pixels_inputs().get("source").rgba
    assert out.shape == src.shape
    assert np.array_equal(out[:8], src[:8])  # black map: kept exactly
    assert not np.array_equal(out[16:48, 16:48], src[16:48, 16:48])


@pytest.mark.parametrize("method", ["appearance", "dia", "difference"])
def test_other_methods_refuse_the_refiner_naming_what_to_use(refiner, make_ctx, method):
    m = get_method(method)
    with pytest.raises(AnalogonError) as e:
        m.run(make_ctx(refiner), Inputs({}), m.Params())  # refused before reading any input
    assert e.value.code == "unsupported_model"
    assert "SDXL base" in e.value.message and "PIXELS" in e.value.message
    assert e.value.detail["methods"] == ["pixels"]


def test_the_refiner_is_listed_for_pixels_only(refiner, refiner_paths):
    found = {c.id: c for c in scan([refiner_paths[0].parent], None, include_usual=False)}
    assert set(found) == {str(p) for p in refiner_paths}, found  # the folder and the file
    for entry in found.values():
        assert entry.variant == "sdxl-refiner" and entry.methods == ["pixels"]
        assert "PIXELS only" in entry.note
    manager = ModelManager(1, CPU)
    manager._models[refiner.spec] = refiner
    [entry] = [e for e in manager.available([], ["pixels", "dia"]) if e["id"] == refiner.spec]
    assert entry["variant"] == "sdxl-refiner" and entry["methods"] == ["pixels"]


# -- inpainting ----------------------------------------------------------------------------

def test_inpainting_models_are_refused_at_load_with_the_reason(tmp_path, tiny_sd):
    pipe = build_tiny_sd_inpainting()
    pipe.save_pretrained(tmp_path / "inpaint")
    with pytest.raises(ModelError) as e:
        load_bundle(str(tmp_path / "inpaint"), CPU)
    assert e.value.code == "inpainting_model" and "9 input channels" in e.value.message
    assert "PIXELS" in e.value.message and "base model" in e.value.message
    # the same weights as one file: refused from the header, before any conversion
    from analogon.models import ModelBundle

    fake = ModelBundle("x", "sd1", pipe, torch.device("cpu"), torch.float32, "embedded", "x")
    path = save_single_file(fake, tmp_path / "inpaint.safetensors")
    assert classify_file(path)[:2] == ("sd1", "sd1-inpainting")
    with pytest.raises(ModelError) as e:
        load_bundle(str(path), CPU)
    assert e.value.code == "inpainting_model"
    [entry] = scan([tmp_path], ["pixels", "dia"], include_usual=False)[:1]
    assert entry.methods == [] and "inpainting" in entry.note


# -- SD 2.x: base or v -----------------------------------------------------------------------

class StubUNet(torch.nn.Module):
    """Behaves at the last timestep like an ideal model of one parameterisation: ``eps``
    returns (about) its input, ``v`` returns √ᾱ·x − √(1−ᾱ)·x̂₀ with x̂₀ a fixed 'clean image'
    that barely depends on the input."""

    def __init__(self, kind: str, alpha_bar: float = 0.0047):
        super().__init__()
        self.kind, self.a = kind, alpha_bar
        self.config = type("C", (), {"in_channels": 4, "sample_size": 8})()

    def forward(self, x, t, encoder_hidden_states=None):
        g = torch.Generator().manual_seed(1)
        clean = torch.randn(x.shape[1:], generator=g) * 0.8 + 0.3
        if self.kind == "eps":
            out = 0.97 * x + 0.05 * clean  # an imperfect epsilon model with a bias
        else:
            x0 = clean + math.sqrt(self.a) * x  # E[x0|x_T] moves a little with x_T
            out = math.sqrt(self.a) * x - math.sqrt(1 - self.a) * x0
        return type("O", (), {"sample": out})()


@pytest.mark.parametrize("kind,expected", [("eps", "epsilon"), ("v", "v_prediction")])
def test_the_probe_tells_eps_from_v(kind, expected):
    hidden = torch.zeros(1, 77, 8)
    slope = pred.probe_slope(StubUNet(kind), hidden, 999, latent=8)
    assert pred.decide_from_slope(slope) == expected
    assert (slope > 0.9) if kind == "eps" else (abs(slope) < 0.1)


def test_the_probe_on_a_trained_epsilon_model_says_epsilon():
    """toy-sd-64 is a trained epsilon model: its slope at the last timestep is near 1."""
    from analogon.models.toy import toy_available

    if not toy_available("toy-sd-64"):
        pytest.skip("toy-sd-64 weights not installed")
    toy = load_bundle("toy-sd-64", CPU)
    r = pred.probe(toy)
    assert r["type"] == "epsilon" and r["decisive"] and r["slope"] > 0.7


@pytest.fixture
def sd2_file(tiny_sd, tmp_path):
    """An SD-2-layout single file whose config folder does not state the prediction type."""
    import json

    path = save_single_file(tiny_sd, tmp_path / "sd2.safetensors", family="sd2")
    sched = tmp_path / "sd2.config" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg.pop("prediction_type", None)
    sched.write_text(json.dumps(cfg))
    return path


def test_sd2_without_yaml_is_probed_at_load_and_overrides_win(sd2_file, monkeypatch):
    calls = []
    real = pred.probe

    def spy(bundle):
        calls.append(bundle.spec)
        return real(bundle)

    monkeypatch.setattr(pred, "probe", spy)
    b = load_bundle(str(sd2_file), CPU)
    assert calls == [str(sd2_file)]
    assert b.prediction["decided_by"] == "probe" and "slope" in b.prediction["probe"]
    assert b.scheduler.config.prediction_type == b.prediction["type"]
    assert b.variant == ("sd2-base" if b.prediction["type"] == "epsilon" else "sd2-v")
    assert b.describe()["prediction"]["decided_by"] == "probe"
    # the user's per-model override wins, without a probe
    for value, kind in (("v", "v_prediction"), ("eps", "epsilon")):
        o = load_bundle(str(sd2_file), LoadOptions(device="cpu", predictions={str(sd2_file): value}))
        assert (o.prediction["type"], o.prediction["decided_by"]) == (kind, "override")
        assert o.scheduler.config.prediction_type == kind
    assert len(calls) == 1
    # the file's own modelspec metadata wins over the probe
    from safetensors.torch import load_file, save_file

    meta = sd2_file.with_name("meta.safetensors")
    save_file(load_file(str(sd2_file)), str(meta), metadata={"modelspec.architecture": "stable-diffusion-v2-512-base"})
    sd2_file.with_name("sd2.config").rename(meta.with_name("meta.config"))
    m = load_bundle(str(meta), CPU)
    assert (m.prediction["type"], m.prediction["decided_by"], m.variant) == ("epsilon", "metadata", "sd2-base")
    meta.with_name("meta.config").rename(sd2_file.with_name("sd2.config"))
    assert len(calls) == 1
    # a yaml beside the file wins over the probe
    sd2_file.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    y = load_bundle(str(sd2_file), CPU)
    assert (y.prediction["type"], y.prediction["decided_by"], y.variant) == ("v_prediction", "yaml", "sd2-v")
    assert len(calls) == 1


def test_the_decision_sets_the_native_size_with_the_shipped_config(sd2_file):
    """With the shipped SD 2.1 config (a real file without its own config) base is 512, v 768."""
    b = load_bundle(str(sd2_file), LoadOptions(device="cpu", predictions={"*": "eps"}))
    b.prediction["default_config"] = True
    pred.apply(b, "epsilon", "probe")
    assert (b.native_size, b.variant) == (512, "sd2-base")
    pred.apply(b, "v_prediction", "probe")
    assert (b.native_size, b.variant, b.scheduler.config.prediction_type) == (768, "sd2-v", "v_prediction")


def test_the_prediction_option_reaches_the_loader_from_serve_and_run(capsys):
    from analogon import cli

    args, _ = cli._base_parser().parse_known_args(
        ["serve", "--prediction", "/m/a=b.safetensors=eps", "--prediction", "v"])
    assert cli._predictions(args) == {"/m/a=b.safetensors": "epsilon", "*": "v_prediction"}
    settings = cli._settings_from_args(args, cli._memory(args))
    assert settings.predictions == {"/m/a=b.safetensors": "epsilon", "*": "v_prediction"}
    run = cli.method_parser(get_method("pixels")).parse_args(["--prediction", "base", "-o", "x.png"])
    assert cli._make_models(run).options.predictions == {"*": "epsilon"}
    with pytest.raises(SystemExit):
        cli._base_parser().parse_known_args(["serve", "--prediction", "x"])
    assert "use eps or v" in capsys.readouterr().err


# -- SDXL: the unconditional side follows force_zeros_for_empty_prompt ------------------------

def test_the_sdxl_unconditional_follows_force_zeros_for_empty_prompt(tiny_sdxl, refiner):
    assert tiny_sdxl.pipe.config.force_zeros_for_empty_prompt
    _, u = encode_prompt(tiny_sdxl, "a red cube", "")
    assert u.hidden.abs().max() == 0 and u.pooled.abs().max() == 0
    _, n = encode_prompt(tiny_sdxl, "a red cube", "blur")  # a real negative prompt is encoded
    assert n.hidden.abs().max() > 0
    cfg = tiny_sdxl.pipe.config.force_zeros_for_empty_prompt
    tiny_sdxl.pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:  # the model's config decides, not the family
        _, u2 = encode_prompt(tiny_sdxl, "a red cube", "")
        assert u2.hidden.abs().max() > 0 and u2.pooled.abs().max() > 0
    finally:
        tiny_sdxl.pipe.register_to_config(force_zeros_for_empty_prompt=cfg)
    _, ur = encode_prompt(refiner, "a red cube", "")  # the refiner's config: False
    assert ur.hidden.abs().max() > 0
