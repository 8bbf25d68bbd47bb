"""`analogon train-toy`: trains a toy-world model from a seed and writes it as a diffusers folder.

``--world toy128`` (the default) trains ``toy-sd`` on 128x128 scenes; ``--world toy64``
trains the first, 64x64 world's ``toy-sd-64``. Stages (each resumes from its checkpoint in ``--work``; ``--stages`` picks a subset):

data    render a pool of training scenes (held-out shape/colour pairs never appear)
vae     AutoencoderKL, L1 + MSE (object pixels weighted 5x) + L1 of the image gradients
        (toy128: fine lines and textures) + a small KL term; half-size crops on the
        8-pixel texture grid, every fourth step whole images
clip    CLIPModel, symmetric contrastive loss on (render, full caption); captions that are
        equal in a batch count as positives of each other
unet    UNet2DConditionModel, epsilon prediction on Stable Diffusion's schedule, frozen text
        tower of the CLIP as text encoder, short captions and 10 % empty captions (for
        classifier-free guidance), a little offset noise, Min-SNR-5 loss weights, EMA weights
decoder the VAE decoder alone, encoder frozen, on whole images (the latent space the UNet
        learned stays exactly the same, so this can run beside the unet stage)
export  StableDiffusionPipeline.save_pretrained (fp16 safetensors), plus the full CLIP in
        ``clip/`` and the image tower in ``image_encoder/``

Every stage logs to ``<work>/train.log`` with wall time. Training is deterministic for a
given seed, thread count and device. ``--snapshots DIR`` also writes each stage's weights
there in fp16 (``<stage>.fp16.safetensors``) every ``--snapshot-every`` steps and when it
finishes: small enough to keep in a repository, and what a stage starts from when its work
folder is gone (weights exactly, the optimiser's state afresh).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("data", "vae", "clip", "words", "unet", "decoder", "export")

# Each world's step counts: what its shipped model was trained with (toy64) or is planned
# for (toy128, measured in docs/toyworld.md); explicit options override them.
DEFAULTS = {
    "toy64": dict(pool=6000, vae_steps=1878, vae_batch=16, clip_steps=957, unet_steps=6203,
                  unet_batch=64, decoder_steps=1616, decoder_batch=8, vae_edge=0.0, two=0.0,
                  decoder_object_weight=5.0, words_steps=0),
    "toy128": dict(pool=10000, vae_steps=9000, vae_batch=12, clip_steps=2000, unet_steps=6000,
                   unet_batch=64, decoder_steps=3000, decoder_batch=6, vae_edge=0.5, two=0.5,
                   decoder_object_weight=1.0, words_steps=300),
}


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _lr(step: int, base: float, warmup: int) -> float:
    """Linear warm-up, then constant: a run cut short by its time limit is the same run as
    one given that many steps (the EMA weights do the annealing)."""
    return base * min(1.0, (step + 1) / warmup)


def _step_rngs(seed: int, stage: int, step: int):
    """Randomness of one training step, from (seed, stage, step) alone: a run resumed from a
    checkpoint draws the same batches as one that never stopped."""
    import torch

    rng = np.random.default_rng([seed, stage, step])
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(1 << 62)))
    return rng, gen


STOP_FILE = "STOP"  # create <work>/STOP to end the running stage at the next step, saved


def _out_of_time(t0: float, minutes: float, work: Path | None = None) -> bool:
    if work is not None and (work / STOP_FILE).exists():
        return True
    return minutes > 0 and time.time() - t0 > minutes * 60


def _save_ckpt(path: Path, obj: dict) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _snapshot_path(args, name: str) -> Path | None:
    return Path(args.snapshots) / f"{name}.fp16.safetensors" if args.snapshots else None


def _write_snapshot(args, name: str, modules: dict, step: int) -> None:
    """The stage's weights in fp16 (``<module>.<param>`` keys) with its step count."""
    import torch
    from safetensors.torch import save_file

    path = _snapshot_path(args, name)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{key}.{k}": v.detach().to(torch.float16 if v.is_floating_point() else v.dtype)
               .contiguous().cpu()
               for key, m in modules.items() for k, v in m.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "stage": name,
                                           "world": args.world, "seed": str(args.seed)})
    os.replace(tmp, path)


def _load_stage(args, name: str, modules: dict) -> int | None:
    """Load a stage's trained weights into ``modules`` from its checkpoint in the work folder,
    else from its snapshot; its step count, or None when it has neither."""
    import torch

    path = args.work / f"{name}.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu")
        for key, m in modules.items():
            m.load_state_dict(state[key])
        return int(state["step"])
    return _read_snapshot(args, name, modules)


def _read_snapshot(args, name: str, modules: dict) -> int | None:
    """Load a snapshot's weights into ``modules``; its step, or None when there is none."""
    from safetensors import safe_open

    path = _snapshot_path(args, name)
    if path is None or not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if meta.get("world") != args.world or meta.get("seed") != str(args.seed):
            return None
        for key, m in modules.items():
            state = m.state_dict()
            m.load_state_dict({k: f.get_tensor(f"{key}.{k}").to(v.dtype)
                               for k, v in state.items()})
    return int(meta["step"])


class _Loop:
    """What every training stage does around its steps: resume from ``<work>/<name>.pt``, the
    warm-up learning rate, a log line every 50 steps, a checkpoint every few minutes and at
    the end, the time limit and the STOP file.

        loop = _Loop("vae", args, log, {"model": vae}, opt, args.vae_steps, args.vae_lr, 50,
                     args.vae_minutes)
        if not loop.resume():
            return
        for step in loop:
            ...
            loop.report(step, f"loss {avg:.4f}")
    """

    def __init__(self, name: str, args, log: Log, modules: dict, opt, steps: int, lr: float,
                 warmup: int, minutes: float, on_save=None):
        self.name, self.args, self.log = name, args, log
        self.leg = args.snapshot_every  # also snapshot every this many steps (0: at the end)
        self.modules, self.opt = modules, opt
        self.steps, self.lr, self.warmup, self.minutes = steps, lr, warmup, minutes
        self.on_save = on_save
        self.path = args.work / f"{name}.pt"
        self.start = 0
        self.t0 = time.time()

    def resume(self) -> bool:
        """Load the checkpoint if there is one; False when the stage has already finished."""
        import torch

        if not self.path.exists():
            step = _read_snapshot(self.args, self.name, self.modules)
            if step is None:
                return True
            self.start = step
            if step >= self.steps:
                self.log(f"{self.name}: done ({step} steps, from its snapshot)")
                return False
            self.log(f"{self.name}: resuming at step {step} from its fp16 snapshot "
                     "(optimiser state afresh)")
            return True
        state = torch.load(self.path, map_location="cpu")
        for key, module in self.modules.items():
            module.load_state_dict(state[key])
        self.opt.load_state_dict(state["opt"])
        self.start = state["step"]
        if self.start >= self.steps:
            self.log(f"{self.name}: done ({self.start} steps)")
            return False
        self.log(f"{self.name}: resuming at step {self.start}")
        return True

    def __iter__(self):
        self.t0 = last_save = time.time()
        step = self.start
        for step in range(self.start, self.steps):
            for g in self.opt.param_groups:
                g["lr"] = _lr(step, self.lr, self.warmup)
            yield step
            stop = _out_of_time(self.t0, self.minutes, self.args.work)
            if step + 1 == self.steps or (self.leg and (step + 1) % self.leg == 0):
                _write_snapshot(self.args, self.name, self.modules, step + 1)
                self.log(f"{self.name}: snapshot at step {step + 1}")
            if (stop or time.time() - last_save > self.args.checkpoint_minutes * 60
                    or step + 1 == self.steps):
                _save_ckpt(self.path, {**{k: m.state_dict() for k, m in self.modules.items()},
                                       "opt": self.opt.state_dict(), "step": step + 1,
                                       "done": stop})
                last_save = time.time()
                if self.on_save is not None:
                    self.on_save()
            if stop:
                self.log(f"{self.name}: time limit reached at step {step + 1}")
                break
        self.log(f"{self.name}: {step + 1 - self.start} steps in {time.time() - self.t0:.0f}s")

    def report(self, step: int, text: str) -> None:
        if (step + 1) % 50 == 0:
            per = (time.time() - self.t0) / (step + 1 - self.start)
            self.log(f"{self.name} {step + 1}/{self.steps} {text} ({per:.2f}s/step)")


# -- data ---------------------------------------------------------------------------------

def stage_data(args, log: Log) -> None:
    from .world import caption, random_scene, render

    path = args.work / "pool.npz"
    if path.exists():
        log(f"data: {path} exists")
        return
    from .world import visible_masks

    rng = random.Random(args.seed)
    t = time.time()
    scenes = [random_scene(rng, split="train", world=args.world, two=args.two)
              for _ in range(args.pool)]
    images = np.stack([render(s) for s in scenes])
    # Where the objects are (the loss weights them more than the background).
    masks = np.stack([np.any(visible_masks(s), axis=0) for s in scenes])
    np.savez(path, images=images, objects=np.packbits(masks, axis=-1))
    (args.work / "pool.json").write_text(json.dumps(scenes))
    log(f"data: {len(scenes)} scenes rendered in {time.time() - t:.1f}s; e.g. {caption(scenes[0])!r}")


def _load_pool(args):
    images = np.load(args.work / "pool.npz")["images"]
    scenes = json.loads((args.work / "pool.json").read_text())
    return images, scenes


def _load_object_masks(args) -> np.ndarray:
    """(N, H, W) bool: where the pool's objects are."""
    data = np.load(args.work / "pool.npz")
    side = data["images"].shape[1]
    if "objects" in data:
        return np.unpackbits(data["objects"], axis=-1, count=side).astype(bool)
    # A pool from before the masks were stored: far from the background colour.
    _, scenes = _load_pool(args)
    bg = (_background_rgb(scenes) + 1.0) * 127.5
    return np.abs(data["images"].astype(np.float32) - bg[:, None, None]).sum(-1) > 12.75


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _background_rgb(scenes) -> np.ndarray:
    """(N, 3) background colours of the pool in [-1, 1]."""
    from .world import BACKGROUNDS

    return np.array([BACKGROUNDS[s["background"]] for s in scenes], np.float32) / 127.5 - 1.0


def _object_weight(masks: np.ndarray, weight: float, device):
    """Per-pixel loss weights (B,1,H,W) from object masks (B,H,W): objects count ``weight``
    times as much as the background, which otherwise dominates the loss and the object's hue
    is learned last."""
    import torch

    fg = torch.from_numpy(np.ascontiguousarray(masks)).to(device).unsqueeze(1).float()
    return 1.0 + (weight - 1.0) * fg


def _edge_l1(rec, x, w):
    """Weighted L1 of the horizontal and vertical differences: fine lines and textures
    count, not only their average colour."""
    dx = ((rec[..., :, 1:] - rec[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])).abs()
    dy = ((rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])).abs()
    return ((dx * w[..., :, 1:]).sum() + (dy * w[..., 1:, :]).sum()) / (w.sum() * 6)


# -- VAE ----------------------------------------------------------------------------------

def stage_vae(args, log: Log) -> None:
    import torch

    from .models import build_vae

    images, _ = _load_pool(args)
    masks = _load_object_masks(args)
    side = images.shape[1]
    crop = side // 2
    torch.manual_seed(args.seed + 1)
    vae = build_vae(args.world).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    loop = _Loop("vae", args, log, {"model": vae}, opt, args.vae_steps, args.vae_lr, 50,
                 args.vae_minutes)
    if not loop.resume():
        return
    avg = None
    vae.train()
    for step in loop:
        rng, gen = _step_rngs(args.seed, 1, step)
        if step % 4 != 3:
            idx = rng.integers(0, len(images), args.vae_batch)
            # Half-size crops at multiples of 8: the texture grid stays aligned with latent
            # cells.
            oy, ox = rng.integers(0, (side - crop) // 8 + 1, 2) * 8
            batch = images[idx, oy:oy + crop, ox:ox + crop]
            mbatch = masks[idx, oy:oy + crop, ox:ox + crop]
        else:
            # Every fourth step whole images, so that the mid-block attention sees whole
            # latents.
            idx = rng.integers(0, len(images), max(4, args.vae_batch // 4))
            batch, mbatch = images[idx], masks[idx]
        x = _to_tensor(batch).to(args.device)
        w = _object_weight(mbatch, args.object_weight, args.device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(args.device)
        rec = vae.decode(z).sample
        l1 = ((rec - x).abs() * w).sum() / (w.sum() * 3)
        mse = ((rec - x).pow(2) * w).sum() / (w.sum() * 3)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = l1 + mse + args.vae_kl * kl
        if args.vae_edge:
            loss = loss + args.vae_edge * _edge_l1(rec, x, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        cur = np.array([l1.item(), mse.item(), kl.item()])
        avg = cur if avg is None else 0.95 * avg + 0.05 * cur
        loop.report(step, f"l1 {avg[0]:.4f} mse {avg[1]:.5f} kl {avg[2]:.3f}")


def _load_vae(args):
    from .models import build_vae

    vae = build_vae(args.world)
    if _load_stage(args, "vae", {"model": vae}) is None:
        raise SystemExit("train-toy: the vae stage has not run (no vae.pt, no snapshot)")
    return vae.to(args.device).eval().requires_grad_(False)


# -- CLIP ---------------------------------------------------------------------------------

def stage_clip(args, log: Log) -> None:
    import torch
    import torch.nn.functional as F

    from .models import build_clip, images_to_clip_pixels
    from .vocab import build_tokenizer
    from .world import caption

    images, scenes = _load_pool(args)
    caps = [caption(s) for s in scenes]
    tok = build_tokenizer()
    # Padded to the longest caption, not to 77: the text tower is causal, so the features at
    # the end-of-text token (the pooled output) are the same, at a fraction of the cost.
    ids_all = tok(caps, padding="longest", return_tensors="pt").input_ids
    torch.manual_seed(args.seed + 2)
    clip = build_clip(args.world).to(args.device)
    opt = torch.optim.AdamW(clip.parameters(), lr=args.clip_lr, weight_decay=0.01)
    loop = _Loop("clip", args, log, {"model": clip}, opt, args.clip_steps, args.clip_lr, 50,
                 args.clip_minutes)
    if not loop.resume():
        return
    avg = None
    clip.train()
    for step in loop:
        rng, _ = _step_rngs(args.seed, 2, step)
        idx = rng.integers(0, len(images), args.clip_batch)
        x = _to_tensor(images[idx]).add(1).div(2).to(args.device)
        ids = ids_all[idx].to(args.device)
        out = clip(input_ids=ids, pixel_values=images_to_clip_pixels(x, args.world))
        logits = out.logits_per_image
        same = torch.tensor([[caps[i] == caps[j] for j in idx] for i in idx], dtype=torch.float32,
                            device=args.device)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        acc = (same.gather(1, logits.argmax(1, keepdim=True)).mean()).item()
        cur = np.array([loss.item(), acc])
        avg = cur if avg is None else 0.95 * avg + 0.05 * cur
        loop.report(step, f"loss {avg[0]:.3f} batch-acc {avg[1]:.3f}")


def _load_clip(args, words: bool = True):
    """The trained CLIP: after the words stage where it has run (and ``words``), else the
    clip stage's."""
    from .models import build_clip

    clip = build_clip(args.world)
    if words and args.words_steps and _load_stage(args, "words", _words_modules(args, clip)):
        return clip.to(args.device).eval().requires_grad_(False)
    if _load_stage(args, "clip", {"model": clip}) is None:
        raise SystemExit("train-toy: the clip stage has not run (no clip.pt, no snapshot)")
    return clip.to(args.device).eval().requires_grad_(False)


# -- words: the text tower's per-word states ----------------------------------------------
#
# Contrastive training shapes only the pooled (end-of-text) feature. The per-word states,
# which the UNet's cross-attention reads, came out dominated by the colour: the state of
# "circle" in "a small purple plain circle" (a pair no training caption has) was nearest to
# "square" after "purple" (cosine 0.978), and the UNet drew a purple square. This stage
# fine-tunes the text tower so that each attribute word's state names its own object's
# attribute (a linear probe per attribute, trained with it), while the pooled feature stays
# where CLIP put it (cosine distance to the clip stage's, weighted 10).

WORD_ORDER = ("size", "colour", "texture", "shape")  # an object's words, as caption() says them


def _word_values(world: str) -> dict[str, tuple[str, ...]]:
    from .world import world_of

    return world_of(world).object_attributes


def _words_modules(args, clip) -> dict:
    """The words stage's modules: the CLIP and its per-attribute probes."""
    import torch

    hidden = clip.config.text_config.hidden_size
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(hidden, len(v))
                                 for k, v in _word_values(args.world).items()})
    return {"model": clip, "heads": heads}


def word_positions(scene) -> list[dict[str, int]]:
    """Per object (back to front), the token index of each attribute word in the scene's
    full caption (index 0 is the start-of-text token; each word is one token)."""
    from .world import objects

    out, pos = [], 1
    for o in objects(scene):
        pos += 1  # "a"
        out.append({})
        for k in WORD_ORDER:
            out[-1][k] = pos
            pos += 1
        pos += 1  # "and" / "on"
    return out


def stage_words(args, log: Log) -> None:
    import copy

    import torch
    import torch.nn.functional as F

    from .vocab import build_tokenizer
    from .world import caption, objects

    if not args.words_steps:
        return
    _, scenes = _load_pool(args)
    clip = _load_clip(args, words=False).requires_grad_(True).train()
    modules = _words_modules(args, clip)
    heads, values = modules["heads"].to(args.device), _word_values(args.world)
    ref = copy.deepcopy(clip).eval().requires_grad_(False)
    tok = build_tokenizer()
    torch.manual_seed(args.seed + 5)
    opt = torch.optim.AdamW(list(clip.text_model.parameters()) + list(heads.parameters()),
                            lr=args.words_lr, weight_decay=0.01)
    loop = _Loop("words", args, log, modules, opt, args.words_steps, args.words_lr, 20, 0)
    if not loop.resume():
        return
    avg = None
    for step in loop:
        rng, _ = _step_rngs(args.seed, 5, step)
        batch = [scenes[i] for i in rng.integers(0, len(scenes), args.words_batch)]
        ids = tok([caption(s) for s in batch], padding="longest",
                  return_tensors="pt").input_ids.to(args.device)
        out = clip.text_model(input_ids=ids)
        pooled = F.normalize(clip.text_projection(out.pooler_output), dim=-1)
        with torch.no_grad():
            r = ref.text_model(input_ids=ids)
            pooled_ref = F.normalize(ref.text_projection(r.pooler_output), dim=-1)
        keep = (1 - (pooled * pooled_ref).sum(-1)).mean()
        probe = 0.0
        for k in WORD_ORDER:
            rows, cols, labels = [], [], []
            for b, s in enumerate(batch):
                for o, pos in zip(objects(s), word_positions(s)):
                    rows.append(b)
                    cols.append(pos[k])
                    labels.append(values[k].index(o[k]))
            states = out.last_hidden_state[torch.tensor(rows), torch.tensor(cols)]
            probe = probe + F.cross_entropy(heads[k](states),
                                            torch.tensor(labels, device=args.device))
        loss = probe + 10.0 * keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cur = np.array([float(probe), keep.item()])
        avg = cur if avg is None else 0.9 * avg + 0.1 * cur
        loop.report(step, f"probe {avg[0]:.3f} pooled-drift {avg[1]:.4f}")


def _text_encoder_from_clip(clip):
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    return te.eval()


def _image_encoder_from_clip(clip):
    from transformers import CLIPVisionModelWithProjection

    ie = CLIPVisionModelWithProjection(clip.config.vision_config)
    ie.vision_model.load_state_dict(clip.vision_model.state_dict())
    ie.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return ie.eval()


# -- UNet ---------------------------------------------------------------------------------

def _encode_pool(args, log: Log):
    import torch

    path = args.work / "latents.pt"
    if path.exists():
        return torch.load(path)
    vae = _load_vae(args)
    images, _ = _load_pool(args)
    means, stds = [], []
    t = time.time()
    with torch.no_grad():
        for i in range(0, len(images), 256):
            post = vae.encode(_to_tensor(images[i:i + 256]).to(args.device)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    sample_std = float(torch.sqrt(mean.var() + std.pow(2).mean()))
    data = {"mean": mean, "std": std, "scaling_factor": 1.0 / sample_std}
    torch.save(data, path)
    log(f"unet: encoded {len(mean)} latents in {time.time() - t:.0f}s; latent std "
        f"{sample_std:.3f} -> scaling_factor {1.0 / sample_std:.4f}")
    return data


def train_caption(scene, rng: random.Random) -> str:
    """A training caption: usually the full one, sometimes shorter, sometimes empty."""
    from .world import caption

    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.35:
        names = ["size", "colour", "texture", "background", "shape"]
        k = rng.randint(1, 3)
        return caption(scene, omit=set(rng.sample(names, k)))
    return caption(scene)


def stage_unet(args, log: Log) -> None:
    import torch

    from .models import build_scheduler, build_unet
    from .vocab import build_tokenizer

    lat = _encode_pool(args, log)
    sf = lat["scaling_factor"]
    _, scenes = _load_pool(args)
    clip = _load_clip(args)
    te = _text_encoder_from_clip(clip).to(args.device).requires_grad_(False)
    del clip
    tok = build_tokenizer()
    sched = build_scheduler()
    acp = sched.alphas_cumprod.to(args.device)
    torch.manual_seed(args.seed + 3)
    unet = build_unet(args.world).to(args.device)
    ema = build_unet(args.world).to(args.device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    loop = _Loop("unet", args, log, {"model": unet, "ema": ema}, opt, args.unet_steps,
                 args.unet_lr, 100, args.unet_minutes,
                 on_save=(lambda: stage_export(args, log, quiet=True))
                 if args.export_every_checkpoint else None)
    if not loop.resume():
        return
    mean, std = lat["mean"], lat["std"]
    avg = None
    unet.train()
    for step in loop:
        rng, gen = _step_rngs(args.seed, 3, step)
        crng = random.Random(int(rng.integers(1 << 62)))
        idx = rng.integers(0, len(mean), args.unet_batch)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf
        z0 = z0.to(args.device)
        caps = [train_caption(scenes[i], crng) for i in idx]
        with torch.no_grad():
            ids = tok(caps, padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids.to(args.device)
            cond = te(ids)[0]
        noise = torch.randn(z0.shape, generator=gen)
        noise = noise + args.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1,
                                                        generator=gen)
        noise = noise.to(args.device)
        t = torch.randint(0, 1000, (z0.shape[0],), generator=gen).to(args.device)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, cond).sample
        # Min-SNR-5 weighting (epsilon prediction): converges several times faster.
        snr = a.flatten() / (1 - a.flatten())
        w = snr.clamp(max=args.min_snr) / snr
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        loop.report(step, f"loss {avg:.4f}")


# -- decoder fine-tuning ------------------------------------------------------------------

def stage_decoder(args, log: Log) -> None:
    import torch

    images, _ = _load_pool(args)
    masks = _load_object_masks(args)
    vae = _load_vae(args)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    loop = _Loop("decoder", args, log, {"model": vae}, opt, args.decoder_steps, args.decoder_lr,
                 20, args.decoder_minutes)
    if not loop.resume():
        return
    vae.decoder.train()
    avg = None
    for step in loop:
        rng, gen = _step_rngs(args.seed, 4, step)
        idx = rng.integers(0, len(images), args.decoder_batch)
        x = _to_tensor(images[idx]).to(args.device)
        # Objects and background alike by default (toy128): the VAE stage weighted objects
        # five times, and left the backdrop's fine lines for this stage.
        w = _object_weight(masks[idx], args.decoder_object_weight, args.device)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(args.device)
        rec = vae.decode(z).sample
        l1 = ((rec - x).abs() * w).sum() / (w.sum() * 3)
        loss = l1 + ((rec - x).pow(2) * w).sum() / (w.sum() * 3)
        if args.vae_edge:
            loss = loss + args.vae_edge * _edge_l1(rec, x, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = l1.item() if avg is None else 0.95 * avg + 0.05 * l1.item()
        loop.report(step, f"l1 {avg:.4f}")


# -- export -------------------------------------------------------------------------------

def stage_export(args, log: Log, quiet: bool = False) -> Path:
    import torch
    from diffusers import StableDiffusionPipeline

    from .models import (build_clip, build_feature_extractor, build_scheduler, build_unet,
                         build_vae, sizes)
    from .vocab import build_tokenizer

    out = Path(args.out)
    lat = _encode_pool(args, log)
    vae = _load_vae(args).cpu()
    decoder_steps = _load_stage(args, "decoder", {"model": vae}) or 0
    vae.register_to_config(scaling_factor=float(lat["scaling_factor"]))
    clip = _load_clip(args).cpu()
    unet, trained = build_unet(args.world), build_unet(args.world)
    unet_steps = _load_stage(args, "unet", {"model": trained, "ema": unet})
    if unet_steps is None:
        raise SystemExit("train-toy: the unet stage has not run (no unet.pt, no snapshot)")
    del trained
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=_text_encoder_from_clip(clip), tokenizer=build_tokenizer(),
        unet=unet.eval(), scheduler=build_scheduler(), safety_checker=None,
        feature_extractor=build_feature_extractor(args.world), image_encoder=_image_encoder_from_clip(clip),
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    clip.to(torch.float16).save_pretrained(tmp / "clip", safe_serialization=True)
    info = {
        "seed": args.seed, "unet_steps": unet_steps,
        "vae_steps": _load_stage(args, "vae", {"model": build_vae(args.world)}),
        "clip_steps": _load_stage(args, "clip", {"model": build_clip(args.world)}),
        "words_steps": (_load_stage(args, "words", _words_modules(args, build_clip(args.world)))
                        or 0) if args.words_steps else 0,
        "decoder_steps": decoder_steps,
        "pool": args.pool, "image_size": sizes(args.world).image, "world": args.world,
        "held_out_pairs": [list(p) for p in __import__(
            "analogon.toyworld.world", fromlist=["HELD_OUT_PAIRS"]).HELD_OUT_PAIRS],
        "command": "analogon train-toy " + " ".join(args.argv),
    }
    info["reproduce"] = (
        f"analogon train-toy --world {args.world} --seed {args.seed} --pool {args.pool} "
        f"--vae-steps {info['vae_steps']} --clip-steps {info['clip_steps']} "
        f"--words-steps {info['words_steps']} "
        f"--unet-steps {info['unet_steps']} --decoder-steps {decoder_steps}")
    (tmp / "toyworld.json").write_text(json.dumps(info, indent=2))
    # Swap in place of the old folder's contents.
    import shutil

    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    for p in tmp.iterdir():
        os.replace(p, out / p.name)
    tmp.rmdir()
    if not quiet:
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        log(f"export: {out} ({size / 1e6:.1f} MB, unet step {unet_steps})")
    return out


# -- main ---------------------------------------------------------------------------------

def _default_out(world: str) -> Path:
    from ..models.toy import model_dir

    return model_dir(world)


def parse_args(argv):
    from .world import WORLDS

    ap = argparse.ArgumentParser(
        prog="analogon train-toy",
        description="Train a toy-world model (VAE, CLIP, UNet) from a seed and save it as a "
                    "diffusers folder. Step counts default to the world's plan "
                    "(docs/toyworld.md).")
    ap.add_argument("--world", default="toy128", choices=tuple(WORLDS),
                    help="toy128: 128x128 scenes, the model toy-sd; toy64: the first world's "
                         "64x64 scenes, toy-sd-64")
    ap.add_argument("--work", type=Path, default=Path("toy-sd-work"),
                    help="folder for the rendered pool, checkpoints and the log")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write the diffusers folder (default: the world's shipped "
                         "model)")
    ap.add_argument("--snapshots", type=Path, default=None,
                    help="also write each stage's weights here in fp16 (see --snapshot-every)")
    ap.add_argument("--snapshot-every", type=int, default=1000,
                    help="write a stage's snapshot every this many steps, and when it ends")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default=",".join(STAGES),
                    help="comma-separated subset of " + ",".join(STAGES))
    ap.add_argument("--pool", type=int, default=None, help="training scenes rendered")
    ap.add_argument("--two", type=float, default=None,
                    help="share of training scenes with more than one object")
    ap.add_argument("--vae-steps", type=int, default=None)
    ap.add_argument("--vae-batch", type=int, default=None)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-minutes", type=float, default=0, help="time limit (0: none)")
    ap.add_argument("--vae-kl", type=float, default=1e-5)
    ap.add_argument("--vae-edge", type=float, default=None,
                    help="weight of the image-gradient L1 (VAE, decoder)")
    ap.add_argument("--object-weight", type=float, default=5.0,
                    help="loss weight of object pixels relative to background (VAE, decoder)")
    ap.add_argument("--decoder-object-weight", type=float, default=None,
                    help="the decoder stage's object weight (default: the world's)")
    ap.add_argument("--clip-steps", type=int, default=None)
    ap.add_argument("--clip-batch", type=int, default=128)
    ap.add_argument("--clip-lr", type=float, default=1e-3)
    ap.add_argument("--clip-minutes", type=float, default=0, help="time limit (0: none)")
    ap.add_argument("--words-steps", type=int, default=None,
                    help="text-tower fine-tune so that each word's state names its attribute "
                         "(0: none)")
    ap.add_argument("--words-batch", type=int, default=128)
    ap.add_argument("--words-lr", type=float, default=3e-4)
    ap.add_argument("--unet-steps", type=int, default=None)
    ap.add_argument("--unet-batch", type=int, default=None)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--unet-minutes", type=float, default=0, help="time limit (0: none)")
    ap.add_argument("--decoder-steps", type=int, default=None)
    ap.add_argument("--decoder-batch", type=int, default=None)
    ap.add_argument("--decoder-lr", type=float, default=3e-4)
    ap.add_argument("--decoder-minutes", type=float, default=0, help="time limit (0: none)")
    ap.add_argument("--min-snr", type=float, default=5.0, help="Min-SNR loss weighting gamma")
    ap.add_argument("--offset-noise", type=float, default=0.05)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    ap.add_argument("--checkpoint-minutes", type=float, default=3.0)
    ap.add_argument("--export-every-checkpoint", action="store_true",
                    help="also rewrite the diffusers folder at every UNet checkpoint")
    args = ap.parse_args(argv)
    for key, value in DEFAULTS[args.world].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.argv = list(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(max(1, args.threads))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        args.out = _default_out(args.world)
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "train.log")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"Unknown stage(s): {', '.join(unknown)}. Stages are: {', '.join(STAGES)}.",
              file=sys.stderr)
        return 2
    log(f"train-toy: world {args.world}, seed {args.seed}, device {args.device}, threads {args.threads}, "
        f"stages {','.join(stages)}")
    t0 = time.time()
    for s in STAGES:
        if s in stages:
            if (args.work / STOP_FILE).exists():
                log(f"train-toy: {args.work / STOP_FILE} exists; stopping before stage {s}")
                break
            ts = time.time()
            globals()[f"stage_{s}"](args, log)
            log(f"stage {s}: {time.time() - ts:.0f}s")
    log(f"train-toy: finished in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
