"""PIXELS on the tiny models: the invariants of methods.md §1 and the painter-facing errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import analogon.core.diffusion as diffusion
from analogon import engine
from analogon.core import images as im
from analogon.core.diffusion import make_scheduler, noised, vae_decode, vae_encode
from analogon.errors import InputError, JobCancelled
from analogon.methods import get as get_method
from analogon.methods import pixels as px
from analogon.methods.base import Inputs, LayerImage


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two fighting over a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- helpers ----------------------------------------------------------------------------------

def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Smooth colours plus a little noise: an opaque RGBA 'photo'."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rgb = np.stack([x / max(w, 1), y / max(h, 1), 0.5 + 0.5 * np.sin(x / 5 + y / 7)], -1) * 200 + 25
    rgb += rng.normal(0, 8, rgb.shape)
    out = np.empty((h, w, 4), np.uint8)
    out[..., :3] = np.clip(rgb, 0, 255)
    out[..., 3] = 255
    return out


def grey_map(w: int, h: int, value: float | np.ndarray = 1.0) -> np.ndarray:
    v = np.broadcast_to(np.asarray(value, np.float32), (h, w))
    g = np.clip(np.round(v * 255), 0, 255).astype(np.uint8)
    return np.stack([g, g, g, np.full_like(g, 255)], -1)


def patch(w: int, h: int, x0: int, y0: int, x1: int, y1: int, rgb=(230, 30, 40)) -> np.ndarray:
    """An exemplar on a (w, h) canvas: opaque colour inside the box, transparent elsewhere."""
    out = np.zeros((h, w, 4), np.uint8)
    out[y0:y1, x0:x1, :3] = rgb
    out[y0:y1, x0:x1, 3] = 255
    return out


def inputs(source, exemplars=(), maps=(), masks=()) -> Inputs:
    d = {"source": LayerImage(source, "src")}
    if exemplars:
        d["exemplar"] = [LayerImage(e, f"ex{i}") for i, e in enumerate(exemplars)]
    if maps:
        d["edit_map"] = [LayerImage(m, f"map{i}") for i, m in enumerate(maps)]
    if masks:
        d["mask"] = [LayerImage(m, f"mask{i}") for i, m in enumerate(masks)]
    return Inputs(d)


def params(**kw) -> px.PixelsParams:
    base = {"steps": 4, "strength": 0.75, "scheduler": "ddim"}
    base.update(kw)
    return px.PixelsParams(**base)


class UNetSpy:
    """Records the latents and timesteps fed to the UNet (through core.diffusion.predict_noise)."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.latents: list[torch.Tensor] = []
        self.timesteps: list = []
        real = diffusion.predict_noise

        def spy(bundle, latents, t, *a, **kw):
            if fail:
                raise AssertionError("the UNet ran although the input was refused")
            self.latents.append(latents.detach().clone())
            self.timesteps.append(t)
            return real(bundle, latents, t, *a, **kw)

        monkeypatch.setattr(diffusion, "predict_noise", spy)


class Models:
    def __init__(self, bundle):
        self.bundle = bundle

    def get(self, spec):
        return self.bundle


def run_engine(bundle, cache, images: dict, refs: dict, p: dict, seed: int = 0):
    """Through the engine (placement + finalize), as the server and the CLI run it."""
    source = engine.MemorySource()
    shas = {k: [source.add(a) for a in v] if isinstance(v, list) else source.add(v) for k, v in images.items()}
    job_images = {}
    for k, v in shas.items():
        if isinstance(v, list):
            job_images[k] = [dict(sha=s, **refs[k][i]) if refs.get(k) and refs[k][i] else s for i, s in enumerate(v)]
        else:
            job_images[k] = v
    job = engine.prepare("pixels", p, job_images, "tiny", seed, "tiny", source=source)
    return engine.execute(job, source=source, models=Models(bundle), cache=cache)


# -- equivalence with plain img2img ------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_white_map_without_exemplar_is_diffusers_img2img(tiny_sd, make_ctx, scheduler):
    """With the map white everywhere nothing is ever reset: the loop must be exactly the stock
    img2img pipeline on the same components, seed, steps and strength (same timesteps, same
    initial noise, same step noise for the stochastic Euler-a)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    src = photo(64, 64)
    steps, strength, seed = 5, 0.6, 11
    p = params(steps=steps, strength=strength, scheduler=scheduler, prompt="a red fox", guidance=7.5)
    ctx = make_ctx(tiny_sd, seed=seed)
    ours = px.denoise(ctx, px.plan_job(tiny_sd, inputs(src, maps=[grey_map(64, 64, 1.0)]), p), p)
    no_map = px.denoise(make_ctx(tiny_sd, seed=seed), px.plan_job(tiny_sd, inputs(src), p), p)

    z0 = vae_encode(tiny_sd, im.to_tensor(src))  # the pipeline takes latents as its image
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd.pipe, scheduler=make_scheduler(tiny_sd, scheduler, steps))
    pipe.set_progress_bar_config(disable=True)

    def reference(strength):
        return pipe(prompt="a red fox", image=z0, strength=strength, num_inference_steps=steps,
                    guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images

    ref = reference(strength)
    tol = 1e-5
    assert (ours - ref).abs().max().item() <= tol
    assert torch.equal(ours, no_map)
    # the tolerance is far below what a wrong start step or a wrong seed would give
    assert (reference(0.8) - ref).abs().max().item() > 1000 * tol
    other = px.denoise(make_ctx(tiny_sd, seed=seed + 1), px.plan_job(tiny_sd, inputs(src), p), p)
    assert (other - ref).abs().max().item() > 1000 * tol


def test_white_map_matches_sdxl_img2img_too(tiny_sdxl, make_ctx):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    src = photo(64, 64, seed=3)
    p = params(steps=4, strength=0.75, scheduler="euler", prompt="snow", guidance=5.0)
    ours = px.denoise(make_ctx(tiny_sdxl, seed=5), px.plan_job(tiny_sdxl, inputs(src), p), p)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(tiny_sdxl.pipe, scheduler=make_scheduler(tiny_sdxl, "euler", 4))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="snow", image=vae_encode(tiny_sdxl, im.to_tensor(src)), strength=0.75,
               num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(5),
               output_type="latent").images
    assert (ours - ref).abs().max().item() <= 1e-5


# -- the black map ------------------------------------------------------------------------------

def test_black_map_gives_the_source_back(tiny_sd, make_ctx, cache, monkeypatch):
    src = photo(64, 64)
    black = grey_map(64, 64, 0.0)
    p = params()
    # the loop itself: the latent is the source's latent exactly, i.e. the VAE round trip
    z = px.denoise(make_ctx(tiny_sd), px.plan_job(tiny_sd, inputs(src, maps=[black]), p), p)
    z_src = vae_encode(tiny_sd, im.to_tensor(src))
    assert torch.equal(z, z_src)
    assert torch.equal(vae_decode(tiny_sd, z), vae_decode(tiny_sd, z_src))
    # the method and the engine: the source's own bytes, and no UNet call at all
    UNetSpy(monkeypatch, fail=True)
    res = get_method("pixels").run(make_ctx(tiny_sd), inputs(src, exemplars=[patch(64, 64, 8, 8, 30, 30)], maps=[black]), p)
    assert np.array_equal(res.images[0].rgba, src)
    out = run_engine(tiny_sd, cache, {"source": src, "edit_map": [black]}, {}, p.model_dump())
    assert np.array_equal(out.images[0].rgba, src)


def test_latent_under_black_map_is_the_noised_source_at_every_step(tiny_sd, make_ctx, monkeypatch):
    """Left half white, right half black: at every step the latent fed to the UNet equals
    √ᾱ_t·z_src + √(1−ᾱ_t)·ε on the black side, with ONE ε for the whole loop (the source's noise,
    drawn from the job's seed as diffusers' img2img draws it); the white side really is pasted
    and denoised (it leaves that trajectory), and the final latent is z_src on the black side."""
    w = h = 64
    m = np.zeros((h, w), np.float32)
    m[:, :32] = 1.0
    src = photo(w, h, seed=2)
    ex = patch(w, h, 4, 4, 28, 60)
    p = params(steps=10, strength=0.8, crop_to_edit=False)
    plan = px.plan_job(tiny_sd, inputs(src, exemplars=[ex], maps=[grey_map(w, h, m)]), p)
    spy = UNetSpy(monkeypatch)
    z = px.denoise(make_ctx(tiny_sd, seed=7), plan, p)
    assert len(spy.latents) == 8
    z_src = vae_encode(tiny_sd, im.to_tensor(src))
    eps = torch.randn(z_src.shape, generator=torch.Generator().manual_seed(7))
    change = plan.passes[0].change[0, 0]
    black = change == 0
    pasted = plan.passes[0].exemplars[0].region[0, 0]
    assert black.sum() >= 16 and pasted.sum() >= 4 and not (black & pasted).any()
    ab = make_scheduler(tiny_sd, "ddim", 10).alphas_cumprod
    off_trajectory = []
    for x, t in zip(spy.latents, spy.timesteps):
        a = ab[int(t)]
        expected = a.sqrt() * z_src + (1 - a).sqrt() * eps
        assert torch.allclose(x[..., black], expected[..., black], atol=1e-5)
        off_trajectory.append((x[..., pasted] - expected[..., pasted]).abs().max().item())
    assert min(off_trajectory) > 0.1  # the exemplar was pasted there, then denoised freely
    assert torch.equal(z[..., black], z_src[..., black])


# -- surgery -----------------------------------------------------------------------------------

def test_two_exemplars_in_disjoint_regions_do_not_touch_each_other(tiny_sd, make_ctx, monkeypatch):
    w = h = 64
    src = photo(w, h, seed=4)
    a = patch(w, h, 0, 0, 24, 64, rgb=(240, 20, 20))
    b = patch(w, h, 40, 0, 64, 64, rgb=(20, 20, 240))
    b2 = patch(w, h, 40, 0, 64, 64, rgb=(20, 240, 20))
    white = grey_map(w, h, 1.0)
    p = params(steps=4, strength=0.75, crop_to_edit=False)

    def step0(exs):
        spy = UNetSpy(monkeypatch)
        plan = px.plan_job(tiny_sd, inputs(src, exemplars=exs, maps=[white]), p)
        px.denoise(make_ctx(tiny_sd), plan, p)
        monkeypatch.undo()
        return spy.latents[0], [e.region[0, 0] for e in plan.passes[0].exemplars]

    s_ab, (ra, rb) = step0([a, b])
    s_ab2, _ = step0([a, b2])
    s_a, _ = step0([a])
    assert ra.any() and rb.any() and not (ra & rb).any()
    # A's region depends on A only; B's region on B only
    assert torch.equal(s_ab[..., ra], s_ab2[..., ra])
    assert torch.equal(s_ab[..., ra], s_a[..., ra])
    assert (s_ab[..., rb] - s_ab2[..., rb]).abs().max() > 0.05
    # and the source between them is the source's own noised latent, whatever the exemplars
    rest = ~(ra | rb)
    assert torch.equal(s_ab[..., rest], s_a[..., rest])


def test_per_exemplar_maps_and_a_shared_map(tiny_sd):
    w = h = 64
    src = photo(w, h)
    a = patch(w, h, 0, 0, 24, 24)
    b = patch(w, h, 40, 40, 64, 64)
    ma = np.zeros((h, w), np.float32); ma[:32, :32] = 1
    mb = np.zeros((h, w), np.float32); mb[32:, 32:] = 1
    p = params(crop_to_edit=False)
    plan = px.plan_job(tiny_sd, inputs(src, [a, b], [grey_map(w, h, ma), grey_map(w, h, mb)]), p)
    change = plan.passes[0].change[0, 0]
    assert change[0, 0] == 1 and change[-1, -1] == 1 and change[0, -1] == 0 and change[-1, 0] == 0
    assert np.array_equal(plan.change, np.maximum(ma, mb))
    # exemplar A under B's map only is not used: refused, not silently dropped
    with pytest.raises(InputError) as e:
        px.plan_job(tiny_sd, inputs(src, [a, b], [grey_map(w, h, mb), grey_map(w, h, ma)]), p)
    assert e.value.code == "exemplar_outside_edit" and "exemplar 1" in e.value.message


def test_paste_threshold_controls_where_the_exemplar_goes(tiny_sd):
    w = h = 64
    src = photo(w, h)
    ex = patch(w, h, 0, 0, 64, 64)
    m = np.zeros((h, w), np.float32)
    m[:, :32] = 1.0
    m[:, 32:48] = 0.5
    plan_full = px.plan_job(tiny_sd, inputs(src, [ex], [grey_map(w, h, m)]), params(crop_to_edit=False))
    plan_half = px.plan_job(tiny_sd, inputs(src, [ex], [grey_map(w, h, m)]),
                            params(crop_to_edit=False, paste_threshold=0.5))
    full = plan_full.passes[0].exemplars[0].region[0, 0]
    half = plan_half.passes[0].exemplars[0].region[0, 0]
    assert full[:, :4].all() and not full[:, 4:].any()
    assert half[:, :6].all() and not half[:, 6:].any()


def test_grey_pasted_pixels_are_held_at_the_noised_exemplar_until_their_start(tiny_sd, make_ctx, monkeypatch):
    """paste_threshold 0.5 under a 50 % grey map: for the first half of the steps the pasted
    pixels are reset to the exemplar noised with its own fixed noise (not to the source)."""
    w = h = 64
    src = photo(w, h, seed=5)
    ex = patch(w, h, 0, 0, 32, 64, rgb=(250, 240, 10))
    p = params(steps=10, strength=1.0, paste_threshold=0.5, crop_to_edit=False)
    plan = px.plan_job(tiny_sd, inputs(src, [ex], [grey_map(w, h, 0.5)]), p)
    spy = UNetSpy(monkeypatch)
    px.denoise(make_ctx(tiny_sd, seed=3), plan, p)
    pasted = plan.passes[0].exemplars[0].region[0, 0]
    assert pasted[:, :3].all() and not pasted[:, 5:].any()
    z_ex = vae_encode(tiny_sd, im.to_tensor(plan.passes[0].exemplars[0].rgb))
    eps_ex = torch.randn(z_ex.shape, generator=torch.Generator().manual_seed(3 + 1))
    ab = make_scheduler(tiny_sd, "ddim", 10).alphas_cumprod
    held = []
    for x, t in zip(spy.latents, spy.timesteps):
        a = ab[int(t)]
        expected = a.sqrt() * z_ex + (1 - a).sqrt() * eps_ex
        held.append(torch.allclose(x[..., pasted], expected[..., pasted], atol=1e-5))
    # keep = 0.5 > θ_i = i/10 for i = 0..4: held; from step 5 on: denoised
    assert held == [True] * 5 + [False] * 5


# -- sizes, placement, cropping --------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(61, 37), (45, 97), (64, 64)])
def test_non_square_and_odd_sizes(tiny_sd, make_ctx, w, h):
    src = photo(w, h, seed=w)
    m = np.zeros((h, w), np.float32)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1.0
    ex = patch(w, h, w // 4, h // 4, w // 2, h // 2)
    res = get_method("pixels").run(make_ctx(tiny_sd), inputs(src, [ex], [grey_map(w, h, m)]), params())
    out = res.images[0].rgba
    assert out.shape == src.shape
    assert np.array_equal(out[m == 0], src[m == 0])
    assert not np.array_equal(out[m > 0], src[m > 0])
    ww, wh = res.info["working_size"]
    assert ww % 8 == 0 and wh % 8 == 0 and max(ww, wh) == tiny_sd.native_size


def test_exemplar_partly_off_the_canvas_through_the_engine(tiny_sd, cache):
    w, h = 64, 48
    src = photo(w, h)
    ex = patch(30, 30, 0, 0, 30, 30, rgb=(250, 250, 0))
    m = np.zeros((h, w), np.float32)
    m[24:, :20] = 1.0
    res = run_engine(tiny_sd, cache, {"source": src, "exemplar": [ex], "edit_map": [grey_map(w, h, m)]},
                     {"exemplar": [{"x": -12, "y": 30, "scale": 1.0}]}, params().model_dump())
    out = res.images[0].rgba
    assert out.shape == src.shape
    assert np.array_equal(out[m == 0], src[m == 0])
    assert res.info["exemplars"] == 1
    # entirely off the canvas: a clear error, no compute
    with pytest.raises(InputError) as e:
        run_engine(tiny_sd, cache, {"source": src, "exemplar": [ex], "edit_map": [grey_map(w, h, m)]},
                   {"exemplar": [{"x": 70, "y": 0, "scale": 1.0}]}, params().model_dump())
    assert e.value.code == "empty_image" and "off the canvas" in e.value.message


def test_small_edit_on_a_large_image_is_cropped_and_worked_at_native_size(tiny_sd, make_ctx, monkeypatch):
    w, h = 256, 160
    src = photo(w, h, seed=9)
    m = np.zeros((h, w), np.float32)
    m[100:120, 180:210] = 1.0
    spy = UNetSpy(monkeypatch)
    res = get_method("pixels").run(make_ctx(tiny_sd), inputs(src, maps=[grey_map(w, h, m)]), params())
    x0, y0, x1, y1 = res.info["box"]
    assert x0 <= 180 and y0 <= 100 and x1 >= 210 and y1 >= 120
    assert (x1 - x0) < w and (y1 - y0) < h
    assert spy.latents[0].shape[-1] * 8 == max(res.info["working_size"][0], 8)
    out = res.images[0].rgba
    assert np.array_equal(out[m == 0], src[m == 0])
    assert not np.array_equal(out[m > 0], src[m > 0])


# -- modes, progress, cancel, cache --------------------------------------------------------------

def test_iterative_mode_runs_one_pass_per_exemplar(tiny_sd, make_ctx, monkeypatch):
    w = h = 64
    src = photo(w, h)
    exs = [patch(w, h, 0, 0, 24, 24), patch(w, h, 40, 40, 64, 64)]
    ctx = make_ctx(tiny_sd)
    spy = UNetSpy(monkeypatch)
    res = get_method("pixels").run(ctx, inputs(src, exs), params(mode="iterative"))
    assert res.info["passes"] == 2 and res.info["steps_run"] == 3
    assert len(spy.latents) == 6
    steps = [e for e in ctx.events if e[0] == "progress" and e[1] == "denoise"]
    assert [e[2] for e in steps] == [1, 2, 3, 4, 5, 6] and {e[3] for e in steps} == {6}
    # single pass: one loop for both
    spy2 = UNetSpy(monkeypatch)
    get_method("pixels").run(make_ctx(tiny_sd), inputs(src, exs), params(mode="single_pass"))
    assert len(spy2.latents) == 3


def test_cancel_stops_the_run(tiny_sd, make_ctx, monkeypatch):
    spy = UNetSpy(monkeypatch)
    ctx = make_ctx(tiny_sd, cancel_after=3)  # encode, step 1, step 2, then cancelled
    with pytest.raises(JobCancelled):
        get_method("pixels").run(ctx, inputs(photo(64, 64)), params(steps=20, strength=1.0))
    assert len(spy.latents) < 5


def test_latents_are_cached_and_reused(tiny_sd, make_ctx, cache):
    src = photo(64, 64)
    ex = patch(64, 64, 8, 8, 40, 40)
    m = grey_map(64, 64, 1.0)
    a = get_method("pixels").run(make_ctx(tiny_sd), inputs(src, [ex], [m]), params())
    hits = cache.hits
    b = get_method("pixels").run(make_ctx(tiny_sd), inputs(src, [ex], [m]), params())
    assert cache.hits >= hits + 2  # the source and the exemplar
    assert np.array_equal(a.images[0].rgba, b.images[0].rgba)


def test_tiny_sdxl_runs_with_exemplars_and_maps(tiny_sdxl, make_ctx):
    w, h = 72, 40
    src = photo(w, h)
    m = np.zeros((h, w), np.float32)
    m[5:35, 10:60] = 1.0
    exs = [patch(w, h, 12, 8, 30, 30), patch(w, h, 40, 8, 58, 30, rgb=(10, 200, 10))]
    res = get_method("pixels").run(make_ctx(tiny_sdxl), inputs(src, exs, [grey_map(w, h, m)]),
                                   params(prompt="a lake", negative_prompt="blur"))
    out = res.images[0].rgba
    assert out.shape == src.shape and np.array_equal(out[m == 0], src[m == 0])


# -- refusals, before any compute ----------------------------------------------------------------

def test_bad_inputs_are_refused_with_clear_messages(tiny_sd, make_ctx, monkeypatch):
    UNetSpy(monkeypatch, fail=True)
    run = get_method("pixels").run
    src = photo(64, 48)
    ok_map = grey_map(64, 48, 1.0)

    def refused(code, inp, p=None):
        with pytest.raises(InputError) as e:
            run(make_ctx(tiny_sd), inp, p or params())
        assert e.value.code == code, e.value.message
        return e.value.message

    msg = refused("size_mismatch", inputs(src, maps=[grey_map(32, 32, 1.0)]))
    assert "32×32" in msg and "64×48" in msg and "edit map" in msg
    msg = refused("size_mismatch", inputs(src, exemplars=[patch(50, 50, 0, 0, 10, 10)], maps=[ok_map]))
    assert "exemplar" in msg
    msg = refused("empty_image", inputs(src, exemplars=[np.zeros((48, 64, 4), np.uint8)], maps=[ok_map]))
    assert "transparent" in msg
    refused("empty_image", inputs(np.zeros((48, 64, 4), np.uint8)))
    three = [patch(64, 48, 0, 0, 10, 10)] * 3
    msg = refused("map_count", inputs(src, exemplars=three, maps=[ok_map, ok_map]))
    assert "3 exemplars" in msg and "2 edit maps" in msg
    grey = grey_map(64, 48, 0.5)
    msg = refused("exemplar_outside_edit", inputs(src, exemplars=[patch(64, 48, 0, 0, 20, 20)], maps=[grey]))
    assert "paste threshold" in msg
    msg = refused("no_steps", inputs(src), params(steps=4, strength=0.2))
    assert "strength" in msg


def test_wrong_size_map_through_the_engine_is_refused(tiny_sd, cache, monkeypatch):
    UNetSpy(monkeypatch, fail=True)
    with pytest.raises(InputError) as e:
        run_engine(tiny_sd, cache, {"source": photo(64, 64), "edit_map": [grey_map(40, 64, 1.0)]}, {},
                   params().model_dump())
    assert e.value.code == "size_mismatch"


# -- the method as the panel and the CLI see it ------------------------------------------------------

def test_params_schema_and_roles_describe_the_method():
    m = get_method("pixels")
    d = m.describe()
    assert d["target_role"] == "source"
    roles = {r["name"]: r for r in d["roles"]}
    assert list(roles) == ["source", "exemplar", "edit_map", "mask"]
    assert roles["exemplar"]["multiple"] and not roles["exemplar"]["required"]
    assert roles["edit_map"]["multiple"] and roles["edit_map"]["kind"] == "map"
    props = d["params"]["properties"]
    for name, prop in props.items():
        assert "default" in prop and prop.get("description"), name
    assert props["threshold"]["enum"] == ["linear", "quadratic", "cubic", "log", "sigmoid"]
    assert props["mode"]["enum"] == ["single_pass", "iterative"]
    assert props["strength"]["minimum"] == 0 and props["strength"]["maximum"] == 1
    assert set(props["scheduler"]["enum"]) == set(diffusion.SCHEDULER_NAMES)
    with pytest.raises(Exception):
        px.PixelsParams(threshold="exponential")


# -- core.surgery ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m"])
def test_noised_composite_equals_the_composite_of_noised_images(tiny_sd, scheduler):
    from analogon.core.surgery import Paste, SurgicalLatents, surgery

    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 5, 7)
    src, e_src = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    pastes = []
    for k in range(2):
        region = torch.zeros(1, 1, 5, 7, dtype=torch.bool)
        region[..., k * 3: k * 3 + 3, 1 + k: 4 + k] = True
        pastes.append(Paste(torch.randn(shape, generator=g), torch.randn(shape, generator=g), region))
    sched = make_scheduler(tiny_sd, scheduler, 10)
    surg = SurgicalLatents(sched, src, e_src, pastes)
    for t in sched.timesteps[3:]:
        by_image = surgery(noised(sched, src, e_src, t),
                           [(noised(sched, p.latent, p.noise, t), p.region) for p in pastes])
        assert torch.equal(surg.at(t), by_image)
    assert torch.equal(surg.clean()[..., 0, 1], pastes[0].latent[..., 0, 1])
    assert torch.equal(surg.clean()[..., 4, 0], src[..., 4, 0])


def test_context_box_grows_clips_and_keeps_the_edit():
    from analogon.core.surgery import bbox, context_box

    m = np.zeros((160, 256), np.float32)
    m[100:120, 180:210] = 0.3
    b = bbox(m)
    assert b == (180, 100, 210, 120)
    box = context_box(b, (256, 160), margin=0.5, min_side=64)
    x0, y0, x1, y1 = box
    assert x0 <= 180 and y0 <= 100 and x1 >= 210 and y1 >= 120
    assert 0 <= x0 and 0 <= y0 and x1 <= 256 and y1 <= 160
    assert x1 - x0 >= 64 and y1 - y0 >= 64
    # at a corner the box slides inside the image instead of shrinking
    assert context_box((0, 0, 4, 4), (256, 160), 0.5, min_side=64) == (0, 0, 64, 64)
    # a long thin stroke gets enough height for the model to see context (at most 4:1)
    x0, y0, x1, y1 = context_box((10, 80, 250, 82), (256, 160), 0.0, min_side=8)
    assert (x1 - x0) / (y1 - y0) <= 4.0 + 1e-6
    # an image no larger than the native size is processed whole
    assert context_box((10, 10, 20, 20), (60, 40), 0.5, min_side=64) == (0, 0, 60, 40)
    assert bbox(np.zeros((4, 4))) is None


def test_v_prediction_models_match_img2img_too(tiny_sd, make_ctx):
    """SD 2.x-style v-prediction: the scheduler's prediction_type is honoured as diffusers does."""
    import dataclasses

    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    v_sched = DDIMScheduler.from_config(tiny_sd.scheduler.config, prediction_type="v_prediction")
    bundle = dataclasses.replace(tiny_sd, pipe=StableDiffusionPipeline.from_pipe(tiny_sd.pipe, scheduler=v_sched),
                                 family="sd2", key=tiny_sd.key + "-v")
    src = photo(64, 64, seed=8)
    p = params(steps=4, strength=0.75, scheduler="ddim", prompt="x")
    ours = px.denoise(make_ctx(bundle, seed=2), px.plan_job(bundle, inputs(src), p), p)
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(bundle.pipe, scheduler=make_scheduler(bundle, "ddim", 4))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="x", image=vae_encode(bundle, im.to_tensor(src)), strength=0.75, num_inference_steps=4,
               generator=torch.Generator().manual_seed(2), output_type="latent").images
    eps_pipe = StableDiffusionImg2ImgPipeline.from_pipe(tiny_sd.pipe, scheduler=make_scheduler(tiny_sd, "ddim", 4))
    eps_pipe.set_progress_bar_config(disable=True)
    eps_ref = eps_pipe(prompt="x", image=vae_encode(bundle, im.to_tensor(src)), strength=0.75, num_inference_steps=4,
                       generator=torch.Generator().manual_seed(2), output_type="latent").images
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ref - eps_ref).abs().max().item() > 1e-2  # v-prediction really is a different model
