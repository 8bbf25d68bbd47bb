"""Previews without the VAE (core.previews): the projection is fitted to the model's own VAE, the
preview path never calls the VAE, and cache hits do not encode B."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analogon.core import previews as P
from analogon.core.cache import Cache
from analogon.methods import get as get_method
from analogon.methods.base import Inputs, JobContext, LayerImage
from analogon.models import load_bundle
from analogon.samples import analogy_set, radial_map, scene, texture


@pytest.fixture(scope="module")
def tiny():
    return load_bundle("tiny-sd", None)


class _Counts:
    """Counts the bundle's VAE encode/decode calls while active."""

    def __init__(self, bundle):
        self.vae = bundle.vae
        self.n = {"encode": 0, "decode": 0}

    def __enter__(self):
        for name in self.n:
            orig = getattr(self.vae, name)

            def wrapped(*a, _o=orig, _n=name, **kw):
                self.n[_n] += 1
                return _o(*a, **kw)

            setattr(self.vae, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name in self.n:
            self.vae.__dict__.pop(name, None)


class _LinearVAE(torch.nn.Module):
    """A stand-in VAE whose decode is exactly linear in the latent: nearest-upsampled W·z + b."""

    W = torch.tensor([[0.5, -0.2, 0.1, 0.3], [0.0, 0.4, -0.3, 0.2], [-0.1, 0.1, 0.6, -0.4]])
    b = torch.tensor([0.05, -0.1, 0.2])

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, latent_channels=4,
                                      block_out_channels=[1, 1, 1, 1])
        self.dtype = torch.float32

    def encode(self, x):
        m = torch.nn.functional.avg_pool2d(x, 8)
        z = torch.cat([m, (m[:, :1] * m[:, 1:2])], 1)  # 4 channels, not a linear image of 3
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z))

    def decode(self, z):
        rgb = torch.einsum("oc,bchw->bohw", self.W, z) + self.b.view(1, 3, 1, 1)
        return SimpleNamespace(sample=torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest"))


def test_fit_recovers_an_exactly_linear_decoder():
    vae = _LinearVAE()
    bundle = SimpleNamespace(vae=vae, unet=SimpleNamespace(dtype=torch.float32), device=torch.device("cpu"),
                             native_size=64, vae_scale_factor=8, key="linear")
    p = P.fit(bundle)
    assert torch.allclose(p.weight, vae.W, atol=2e-3)
    assert torch.allclose(p.bias, vae.b, atol=2e-3)
    assert p.error < 0.5 < p.baseline_error  # levels of 0–255


def test_projection_reproduces_the_vae_colours_on_a_trained_vae():
    from analogon.models.toy import toy_available

    if not toy_available("toy-sd-64"):
        pytest.skip("toy-sd-64 is not in this installation")
    bundle = load_bundle("toy-sd-64", None)
    p = P.fit(bundle)
    from analogon.core.diffusion import vae_decode, vae_encode
    from analogon.core.images import to_tensor

    for variant in (3, 5):  # scenes, not the fit's pictures
        img = scene(bundle.native_size, bundle.native_size, variant)
        z = vae_encode(bundle, to_tensor(img))
        dec = torch.nn.functional.avg_pool2d(vae_decode(bundle, z).clamp(-1, 1), bundle.vae_scale_factor)
        proj = p.project(z)
        err = float((proj - dec).abs().mean() * 127.5)
        const = float((dec - dec.mean((2, 3), keepdim=True)).abs().mean() * 127.5)
        assert err < 0.6 * const, (variant, err, const)  # far better than the picture's mean colour
        mean_gap = float((proj.mean((2, 3)) - dec.mean((2, 3))).abs().max() * 127.5)
        assert mean_gap < 32, (variant, mean_gap)  # levels of 0–255, per channel
    rgb = p.rgb(z)
    assert rgb.dtype == np.uint8 and rgb.shape == (bundle.native_size, bundle.native_size, 3)


def test_fit_is_kept_per_vae_and_in_the_cache(tiny, tmp_path):
    cache = Cache(tmp_path)
    P.forget(tiny)
    with _Counts(tiny) as c:
        first = P.previewer(tiny, cache)
        assert c.n["decode"] > 0  # fitted from the model's own decodes
        again = P.previewer(tiny, cache)
    assert again is first
    P.forget(tiny)
    with _Counts(tiny) as c:
        from_disk = P.previewer(tiny, Cache(tmp_path))
    assert c.n == {"encode": 0, "decode": 0}
    assert torch.equal(from_disk.weight, first.weight)


# -- the fit at model load ---------------------------------------------------------------------

def _manager(cache, counts=None):
    """A model manager whose load hook is the server's (core.previews.prepare); ``counts``, a list,
    receives a _Counts on each loaded VAE before the fit starts."""
    from analogon.models import LoadOptions, ModelManager

    def on_load(bundle):
        if counts is not None:
            counts.append(_Counts(bundle).__enter__())
        P.prepare(bundle, cache)

    return ModelManager(1, LoadOptions(device="cpu"), on_load=on_load)


def _pixels_job(bundle, cache):
    inputs = Inputs({"source": LayerImage(scene(64, 64, 1), "src"),
                     "edit_map": [LayerImage(radial_map(64, 64), "m")]})
    got, _ = _job(bundle, "pixels", inputs, {"steps": 16, "strength": 1.0, "crop_to_edit": False}, cache)
    return [step for _, step in got if step is not None]  # the loop's previews (the result's: None)


def test_the_fit_runs_at_load_in_the_background_and_a_job_does_not_wait_for_it(tmp_path, monkeypatch):
    release = threading.Event()
    fit = P.fit

    def held_fit(bundle, *a, **kw):  # a fit that cannot finish until the test says so
        assert threading.current_thread() is not threading.main_thread()
        release.wait(60)
        return fit(bundle, *a, **kw)

    monkeypatch.setattr(P, "fit", held_fit)
    cache = Cache(tmp_path)
    bundle = _manager(cache).get("tiny-sd")  # returns while its fit waits
    state = P.prepare(bundle, cache)  # the one the load started
    assert state.thread is not None and not state.done.is_set() and P.ready(bundle) is None
    assert _pixels_job(bundle, Cache(None)) == []  # ran to the end without waiting: progress, no preview
    release.set()
    assert state.wait(60) and state.source == "fitted" and state.error is None
    assert P.ready(bundle) is not None
    assert len(_pixels_job(bundle, Cache(None))) >= 3  # from then on, previews
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # the fit, on disk


def test_with_models_offloaded_between_devices_the_fit_is_made_at_load_not_beside_a_job(tmp_path):
    bundle = load_bundle("tiny-sd", None)
    bundle.vae._hf_hook = object()  # what accelerate's cpu offload leaves on a module
    state = P.prepare(bundle, Cache(tmp_path))  # no thread that could move the UNet mid-step
    assert state.thread is None and state.done.is_set() and state.source == "fitted"
    assert P.ready(bundle) is not None


def test_a_later_load_reads_the_fit_from_disk_without_a_vae_call(tmp_path):
    cache = Cache(tmp_path)
    counts: list[_Counts] = []
    first = _manager(cache, counts).get("tiny-sd")
    state = P.prepare(first, cache)
    assert state.wait(60) and state.source == "fitted"
    assert counts[0].n["decode"] > 0  # no job ran: the load alone fitted it
    weight = P.ready(first).weight
    P.forget()  # what a new process knows
    second = _manager(Cache(tmp_path), counts).get("tiny-sd")  # a new VAE module, same weights
    assert second.vae is not first.vae
    state2 = P.prepare(second, cache)
    assert state2.wait(60) and state2.source == "disk"
    assert counts[1].n == {"encode": 0, "decode": 0}
    assert torch.equal(P.ready(second).weight, weight)
    for c in counts:
        c.__exit__()


def test_a_fit_on_disk_is_ready_when_the_load_returns(tmp_path):
    """A known VAE's projection is read at load, not in a thread: the first job, even one that
    arrives at once and lasts a moment, has its previews."""
    cache = Cache(tmp_path)
    P.previewer(load_bundle("tiny-sd", None), cache)  # an earlier session fitted it
    P.forget()
    bundle = _manager(Cache(tmp_path)).get("tiny-sd")
    state = P.prepare(bundle, cache)
    assert state.thread is None and state.done.is_set() and state.source == "disk"
    assert P.ready(bundle) is not None
    assert len(_pixels_job(bundle, Cache(None))) >= 3


def test_a_different_vae_gets_its_own_fit(tmp_path):
    cache = Cache(tmp_path)
    a = load_bundle("tiny-sd", None)
    b = load_bundle("tiny-sd", None)
    with torch.no_grad():
        b.vae.decoder.conv_out.bias += 0.25  # another decoder: brighter pictures
    assert P.vae_digest(a) != P.vae_digest(b)
    assert P.vae_digest(a) == P.vae_digest(load_bundle("tiny-sd", None))  # the same weights
    pa = P.previewer(a, cache)
    with _Counts(b) as c:
        pb = P.previewer(b, cache)
    assert c.n["decode"] > 0  # fitted, not read from a's entry
    assert float((pb.bias - pa.bias).mean()) > 0.1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def _saved_tiny(folder):
    b = load_bundle("tiny-sd", None)
    b.pipe.save_pretrained(str(folder))
    return folder


def test_the_digest_of_a_folder_model_is_its_vae_file_hashed_once(tmp_path, monkeypatch):
    import shutil

    one = _saved_tiny(tmp_path / "one")
    two = tmp_path / "two"
    shutil.copytree(one, two)
    with torch.no_grad():  # another model, the same VAE (a fine-tune sharing its VAE)
        from safetensors.torch import load_file, save_file

        unet_file = two / "unet" / "diffusion_pytorch_model.safetensors"
        w = load_file(str(unet_file))
        save_file({k: v + 0.01 for k, v in w.items()}, str(unet_file))
    cache = Cache(tmp_path / "cache")
    a, b = load_bundle(str(one), None), load_bundle(str(two), None)
    assert a.key != b.key
    hashed: list[int] = []
    real = P._hash_files
    monkeypatch.setattr(P, "_hash_files", lambda paths: (hashed.append(len(paths)), real(paths))[1])
    da = P.vae_digest(a, cache)
    assert da.startswith("file:") and da == "file:" + real([one / "vae" / "diffusion_pytorch_model.safetensors"])
    assert P.vae_digest(b, cache) == da and hashed == [1, 1]  # two files with the same bytes
    P.forget()
    assert P.vae_digest(a, cache) == da and hashed == [1, 1]  # remembered on disk: not hashed again
    P.previewer(a, cache)
    P.forget()
    with _Counts(b) as c:  # b's VAE is a's: a's fit serves it
        assert P.prepare(b, cache, background=False).source == "disk"
    assert c.n == {"encode": 0, "decode": 0}


def test_a_second_process_reads_the_fit_from_disk(tmp_path):
    import json
    import subprocess
    import sys

    folder = _saved_tiny(tmp_path / "model")
    script = f"""
import json, sys
from analogon.core import previews as P
from analogon.core.cache import Cache
from analogon.models import LoadOptions, ModelManager
calls = []
cache = Cache({str(tmp_path / "cache")!r})
def on_load(b):
    for name in ("encode", "decode"):
        orig = getattr(b.vae, name)
        setattr(b.vae, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    P.prepare(b, cache)
b = ModelManager(1, LoadOptions(device="cpu"), on_load=on_load).get({str(folder)!r})
s = P.prepare(b, cache)
s.wait(120)
print(json.dumps({{"source": s.source, "calls": len(calls), "error": s.error}}))
"""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                      env=env, timeout=300, check=True).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    assert runs[0]["source"] == "fitted" and runs[0]["calls"] > 0 and runs[0]["error"] is None
    assert runs[1] == {"source": "disk", "calls": 0, "error": None}


def _job(bundle, method_id, inputs, params, cache=None, listen=True):
    got: list[tuple[np.ndarray, int | None]] = []
    ctx = JobContext(bundle, cache or Cache(None), 0,
                     preview=(lambda rgb, step: got.append((rgb, step))) if listen else None)
    method = get_method(method_id)
    with _Counts(bundle) as c:
        method.run(ctx, inputs, method.Params(**params))
    return got, c.n


def test_appearance_previews_make_no_vae_decode(tiny):
    P.previewer(tiny)  # fitted at load, before the job
    s, a = scene(64, 64, 0), texture(64, 64)
    inputs = Inputs({"structure": LayerImage(s, "s"), "appearance": LayerImage(a, "a")})
    params = {"steps": 12, "skip_steps": 2, "freeu": False, "adain": "whole"}
    got, n = _job(tiny, "appearance", inputs, params)
    assert len(got) >= 3  # a preview every few steps
    assert all(rgb.dtype == np.uint8 and rgb.ndim == 3 for rgb, _ in got)
    assert n["decode"] == 1  # the result only
    _, n_quiet = _job(tiny, "appearance", inputs, params, listen=False)
    assert n_quiet["decode"] == 1


def test_pixels_previews_make_no_vae_decode(tiny):
    P.previewer(tiny)
    inputs = Inputs({"source": LayerImage(scene(64, 64, 1), "src"),
                     "edit_map": [LayerImage(radial_map(64, 64), "m")]})
    got, n = _job(tiny, "pixels", inputs, {"steps": 16, "strength": 1.0, "crop_to_edit": False})
    steps = [s for _, s in got if s is not None]
    assert len(steps) >= 3 and steps == sorted(steps)
    assert n["decode"] == 1 and n["encode"] == 1


def test_dia_cache_hit_encodes_nothing(tiny):
    P.previewer(tiny)
    s = analogy_set(64)
    from analogon.core.images import as_rgba

    inputs = Inputs({"a": LayerImage(as_rgba(s["a"]), "a"), "a_prime": LayerImage(as_rgba(s["a_prime"]), "a2"),
                     "b": LayerImage(as_rgba(s["b"]), "b")})
    params = {"steps": 4, "token_iterations": 2, "views": 2, "noise_iterations": 1, "noise_evaluations": 2}
    cache = Cache(None)
    got, cold = _job(tiny, "dia", inputs, params, cache)
    assert cold["encode"] >= 1
    got, hit = _job(tiny, "dia", inputs, params, cache)
    assert hit["encode"] == 0  # B's latent is not needed on a hit without an edit map
    assert hit["decode"] == 1  # the result only; the sampling previews are projections
    assert len(got) >= 1


def test_pixels_encodes_source_and_exemplar_once_each(tiny):
    from analogon.core.images import place
    from analogon.samples import exemplar_patch, halo_map

    ex = place(exemplar_patch(24, 24), (64, 64), 20, 20)
    ex2 = place(exemplar_patch(24, 24), (64, 64), 20, 20)  # the same pixels again
    inputs = Inputs({"source": LayerImage(scene(64, 64, 1), "src"),
                     "exemplar": [LayerImage(ex, "e"), LayerImage(ex2, "e2")],
                     "edit_map": [LayerImage(halo_map(ex[..., 3], 6), "m")]})
    sizes: list[int] = []
    orig = tiny.vae.encode
    tiny.vae.encode = lambda x, *a, **kw: (sizes.append(int(x.shape[0])), orig(x, *a, **kw))[1]
    try:
        _job(tiny, "pixels", inputs, {"steps": 4, "strength": 0.75, "crop_to_edit": False}, listen=False)
    finally:
        tiny.vae.__dict__.pop("encode", None)
    assert sizes == [1, 1]  # the source and the exemplar, each once (its copy is not re-encoded)


def test_difference_cache_hit_encodes_nothing(tiny):
    from analogon.core.images import as_rgba

    s = analogy_set(64)
    inputs = Inputs({"a": LayerImage(as_rgba(s["a"]), "da"), "a_prime": LayerImage(as_rgba(s["a_prime"]), "dap"),
                     "b": LayerImage(as_rgba(s["b"]), "db")})
    params = {"caption_a": "a red square", "caption_a_prime": "a blue square", "caption_b": "a circle",
              "captioner": "user_only", "n_tokens": 2, "train_steps": 2, "steps": 8, "strength": 0.75,
              "guidance": 3.0}  # B starts from its (cached) DDIM inversion: the default
    cache = Cache(None)
    _, cold = _job(tiny, "difference", inputs, params, cache)
    assert cold["encode"] >= 1
    got, hit = _job(tiny, "difference", inputs, params, cache)
    assert hit["encode"] == 0 and hit["decode"] == 1
    assert len(got) >= 2  # previews while sampling, then the result's


def _square_map(w, h, box):
    m = np.zeros((h, w, 4), np.uint8)
    m[..., 3] = 255
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1, :3] = 255
    return m


def test_a_preview_is_the_result_to_be_transparent_where_the_map_keeps(tiny):
    """PIXELS crops to the map's white square: each preview still covers the whole target
    (its aspect), shows the model's picture inside the square and is transparent (alpha
    exactly 0) wherever the map keeps, with its margin."""
    P.previewer(tiny)
    w, h, box = 96, 64, (40, 16, 72, 48)
    inputs = Inputs({"source": LayerImage(scene(w, h, 1), "src"),
                     "edit_map": [LayerImage(_square_map(w, h, box), "m")]})
    got, _ = _job(tiny, "pixels", inputs, {"steps": 16, "strength": 1.0})
    assert got
    for rgba, _ in got:
        assert rgba.shape == (h, w, 4)  # the whole target, at most 256 px
        alpha = rgba[..., 3]
        keep = np.ones((h, w), bool)
        x0, y0, x1, y1 = box
        keep[y0 + P.KEEP_MARGIN:y1 - P.KEEP_MARGIN, x0 + P.KEEP_MARGIN:x1 - P.KEEP_MARGIN] = False
        assert (alpha[keep] == 0).all()
        assert (alpha[~keep] == 255).all()


def test_preview_frame_places_the_picture_in_its_box_and_scales_the_map():
    change = np.zeros((600, 900), np.float32)
    change[100:500, 300:900] = 0.5  # grey: half the change
    frame = P.PreviewFrame((900, 600), change, box=(300, 0, 900, 600))
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 200
    out = frame.compose(red)
    assert out.shape == (171, 256, 4)  # long side 256
    assert (out[:, :85, 3] == 0).all() and (out[:, :85, :3] == 0).all()  # left of the box
    assert (out[40:130, 100:250, 3] == 128).all()  # the grey band: half
    assert (out[40:130, 100:250, 0] == 200).all()
    assert (out[:26, :, 3] == 0).all()  # above the band: kept
    whole = P.PreviewFrame((64, 64), None).compose(red)
    assert (whole[..., 3] == 255).all() and whole.shape == (64, 64, 4)


def test_the_server_fits_previews_when_it_loads_a_model(tmp_path):
    from analogon.server.app import Settings, create_app

    app = create_app(Settings(state_dir=tmp_path / "state", cache_dir=tmp_path / "cache",
                              scan_usual_places=False))
    bundle = app.state.models.get("tiny-sd")  # what the worker does for a job's model
    deadline = time.monotonic() + 60
    while P.ready(bundle) is None and time.monotonic() < deadline:  # nobody asks for it
        time.sleep(0.02)
    assert P.ready(bundle) is not None
    assert P.prepare(bundle, app.state.cache).source == "fitted"  # the one the load started
    assert any((tmp_path / "cache").glob("*.safetensors"))
    app.state.store.close()
