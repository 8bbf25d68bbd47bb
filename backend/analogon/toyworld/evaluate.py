"""How good toy-sd is, measured with the attribute reader on prompts it never saw.

The held-out prompts name a shape/colour pair that no training image shows
(``world.HELD_OUT_PAIRS``); every other word appears in training. Two measurements:

- generation: text-to-image from the held-out caption; the reader's shape and colour (and
  size, texture, background) are compared with the caption's;
- img2img at medium strength: a held-out render, its caption as the prompt, strength 0.5;
  the reader must find the source's attributes again.
"""
from __future__ import annotations

import random
import time
from typing import Any

import numpy as np

from .reader import agreement_all, read
from .world import caption, random_scene, render, world_of

ATTRS = ("shape", "colour", "size", "texture", "background")
# Sampler settings used for the numbers in docs/toyworld.md (and the tests' defaults).
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_STRENGTH = 0.5


# toy128: the share of held-out scenes with two or three objects, as in training.
HELDOUT_TWO = 0.5


def heldout_scenes(n: int, seed: int = 1234, world: str = "toy64") -> list[dict[str, Any]]:
    """``n`` held-out scenes, cycling through every held-out pair (toy128: the pair is the
    first object's; the others are any, as in training, in other colours)."""
    from .world import HELD_OUT_PAIRS, WORLD64, layout_ok, objects

    rng = random.Random(seed)
    layered = world_of(world) is not WORLD64
    scenes: list[dict[str, Any]] = []
    while len(scenes) < n:
        shape, colour = HELD_OUT_PAIRS[len(scenes) % len(HELD_OUT_PAIRS)]
        if not layered:
            s = random_scene(rng, split="any")
            s["shape"], s["colour"] = shape, colour
            scenes.append(s)
            continue
        s = random_scene(rng, split="any", world=world, two=HELDOUT_TWO)
        if any(o["colour"] == colour for o in objects(s)[1:]):
            continue
        s["shape"], s["colour"] = shape, colour
        if layout_ok(s):
            scenes.append(s)
    return scenes


def _to_uint8(images) -> list[np.ndarray]:
    arr = np.asarray(images)
    return [np.clip(np.rint(a * 255), 0, 255).astype(np.uint8) for a in arr]


def generate(pipe, prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch: int = 16) -> list[np.ndarray]:
    """Text-to-image with the pipeline as loaded; one seeded generator per image."""
    import torch

    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + i + j) for j in range(len(chunk))]
        res = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance,
                   generator=gens, output_type="np")
        out += _to_uint8(res.images)
    return out


def img2img(pipe, images: list[np.ndarray], prompts: list[str], seed: int = 0,
            strength: float = DEFAULT_STRENGTH, steps: int = DEFAULT_STEPS,
            guidance: float = DEFAULT_GUIDANCE, batch: int = 16) -> list[np.ndarray]:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    i2i = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    i2i.set_progress_bar_config(disable=True)
    out: list[np.ndarray] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + i + j) for j in range(len(chunk))]
        res = i2i(prompt=chunk, image=[Image.fromarray(a) for a in images[i:i + batch]],
                  strength=strength, num_inference_steps=steps, guidance_scale=guidance,
                  generator=gens, output_type="np")
        out += _to_uint8(res.images)
    return out


def score(images: list[np.ndarray], scenes: list[dict[str, Any]]) -> dict[str, float]:
    """toy64: per scene; toy128: per object (:func:`score_objects`), with the held-out
    (first) object's shape and colour together as ``shape_and_colour``. Each image is read
    once."""
    if scenes and world_of(scenes[0]).name != "toy64":
        agreements = _agreements(images, scenes)
        out = _object_scores(agreements)
        both = [a["objects"][0]["shape"] and a["objects"][0]["colour"] for a in agreements]
        out["shape_and_colour"] = float(np.mean(both)) if both else float("nan")
        return out
    reads = [read(img) for img in images]
    n = max(1, len(scenes))
    out = {k: sum(int(r[k] == s[k]) for r, s in zip(reads, scenes)) / n for k in ATTRS}
    out["shape_and_colour"] = sum(int(r["shape"] == s["shape"] and r["colour"] == s["colour"])
                                  for r, s in zip(reads, scenes)) / n
    return out


OBJECT_ATTRS = ("shape", "colour", "size", "texture")


def _agreements(images: list[np.ndarray], scenes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each image read in its scene's world and paired with the scene (reader.agreement_all)."""
    return [agreement_all(read(img, world_of(s)), s, OBJECT_ATTRS)
            for img, s in zip(images, scenes)]


def _object_scores(agreements: list[dict[str, Any]]) -> dict[str, float]:
    obj = {k: [o[k] for a in agreements for o in a["objects"]] for k in OBJECT_ATTRS}
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in obj.items()}
    out.update({k: float(np.mean([a[k] for a in agreements])) if agreements else float("nan")
                for k in ("background", "backdrop", "count")})
    out["objects"] = len(obj["shape"])
    return out


def score_objects(images: list[np.ndarray], scenes: list[dict[str, Any]]) -> dict[str, float]:
    """Per-object accuracy (every object of every scene counts once) of each object
    attribute, plus background, backdrop and the object count per scene; for any world."""
    return _object_scores(_agreements(images, scenes))


def vae_round_trip(vae, scenes: list[dict[str, Any]], batch: int = 8) -> list[np.ndarray]:
    """Each scene's render encoded (distribution mean) and decoded by ``vae``: what any
    method can show at best."""
    import torch

    out: list[np.ndarray] = []
    for i in range(0, len(scenes), batch):
        x = np.stack([render(s) for s in scenes[i:i + batch]])
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        t = t.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            rec = vae.decode(vae.encode(t).latent_dist.mean).sample
        rec = rec.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1)
        out += list(rec.cpu().numpy())
    return out


def model_world_of(pipe) -> str:
    """The world a loaded toy pipeline draws, told by its VAE's sample size as for a folder
    (:func:`analogon.models.toy.sample_size_world`)."""
    from ..models.toy import sample_size_world

    return sample_size_world(pipe.vae.config.sample_size)


def measure(pipe, n: int = 60, seed: int = 0, steps: int = DEFAULT_STEPS,
            guidance: float = DEFAULT_GUIDANCE, strength: float = DEFAULT_STRENGTH,
            train_prompts: bool = True) -> dict[str, Any]:
    """The quality table of the model: held-out generation and img2img (and, for
    comparison, generation on training combinations)."""
    world = model_world_of(pipe)
    scenes = heldout_scenes(n, seed=1234 + seed, world=world)
    prompts = [caption(s) for s in scenes]
    t = time.time()
    gen = generate(pipe, prompts, seed=seed, steps=steps, guidance=guidance)
    t_gen = time.time() - t
    sources = [render(s) for s in scenes]
    t = time.time()
    i2i = img2img(pipe, sources, prompts, seed=seed, strength=strength, steps=steps,
                  guidance=guidance)
    t_i2i = time.time() - t
    out: dict[str, Any] = {
        "world": world, "n": n, "steps": steps, "guidance": guidance, "strength": strength,
        "generation_heldout": score(gen, scenes),
        "img2img_heldout": score(i2i, scenes),
        "seconds": {"generation": round(t_gen, 1), "img2img": round(t_i2i, 1)},
    }
    if train_prompts:
        rng = random.Random(99 + seed)
        tr = [random_scene(rng, split="train", world=world,
                           two=0.0 if world == "toy64" else HELDOUT_TWO) for _ in range(n)]
        out["generation_train"] = score(
            generate(pipe, [caption(s) for s in tr], seed=seed, steps=steps, guidance=guidance),
            tr)
    return out


def format_table(m: dict[str, Any]) -> str:
    rows = [k for k in ("generation_heldout", "img2img_heldout", "generation_train") if k in m]
    cols = ("shape", "colour", "shape_and_colour", "size", "texture", "background")
    if m.get("world", "toy64") != "toy64":
        cols += ("backdrop", "count")
    head = f"toy-sd, {m.get('world', 'toy64')} (n={m['n']})"
    lines = [f"{head:24s}" + "".join(f"{c:>17s}" for c in cols)]
    for r in rows:
        lines.append(f"{r:24s}" + "".join(f"{m[r][c]:>17.2f}" for c in cols))
    return "\n".join(lines)
