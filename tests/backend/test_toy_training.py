"""`analogon train-toy` at toy scale: every stage runs, a stage cut short and resumed from its
checkpoint ends with the same weights as one that never stopped, and the export loads through
the normal model resolver."""
from __future__ import annotations

import json
import shutil

import torch

from analogon.toyworld import train

SMALL = ["--pool", "24", "--threads", "1", "--device", "cpu", "--seed", "3",
         "--vae-steps", "2", "--vae-batch", "4", "--clip-steps", "2", "--clip-batch", "4",
         "--unet-batch", "4", "--decoder-steps", "2", "--decoder-batch", "4"]


def _args(work, out, stages, unet_steps):
    return ["--work", str(work), "--out", str(out), "--stages", stages,
            "--unet-steps", str(unet_steps), *SMALL]


def test_train_toy_resumes_exactly_and_exports_a_loadable_model(tmp_path):
    """On the measuring world (toy128, the default)."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "toy"
    assert train.main(_args(a, out, "data,vae,clip,unet", 2)) == 0
    # b shares a's data, VAE and CLIP, and trains the UNet 4 steps without stopping
    b.mkdir()
    for name in ("pool.npz", "pool.json", "vae.pt", "clip.pt", "latents.pt"):
        shutil.copy(a / name, b / name)
    assert train.main(_args(b, tmp_path / "unused", "unet", 4)) == 0
    # a resumes at step 2
    assert train.main(_args(a, out, "unet,decoder,export", 4)) == 0
    assert "unet: resuming at step 2" in (a / "train.log").read_text()

    sa, sb = (torch.load(w / "unet.pt", map_location="cpu") for w in (a, b))
    assert sa["step"] == sb["step"] == 4
    for key in ("model", "ema"):
        for name, t in sa[key].items():
            assert torch.equal(t, sb[key][name]), f"{key}.{name} differs after resuming"

    # a finished stage is not run again
    assert train.main(_args(a, out, "unet", 4)) == 0
    assert "unet: done (4 steps)" in (a / "train.log").read_text()

    info = json.loads((out / "toyworld.json").read_text())
    assert (info["unet_steps"], info["vae_steps"], info["decoder_steps"]) == (4, 2, 2)
    from analogon.models import LoadOptions, load_bundle

    bundle = load_bundle(str(out), LoadOptions(device="cpu"))
    assert bundle.native_size == 128
    assert info["world"] == "toy128" and info["image_size"] == 128


def test_a_stage_resumes_from_its_fp16_snapshot_when_the_work_folder_is_gone(tmp_path):
    """Snapshots are what the repository keeps: a new work folder starts from them."""
    work, snaps, out = tmp_path / "w", tmp_path / "snaps", tmp_path / "toy"
    common = ["--snapshots", str(snaps), "--snapshot-every", "1"]
    assert train.main(_args(work, out, "data,vae,clip,unet", 2) + common) == 0
    assert {p.name for p in snaps.iterdir()} == {"vae.fp16.safetensors",
                                                  "clip.fp16.safetensors",
                                                  "unet.fp16.safetensors"}
    first = torch.load(work / "unet.pt", map_location="cpu")
    # The work folder loses every checkpoint; only the rendered pool is left.
    for name in ("vae.pt", "clip.pt", "unet.pt"):
        (work / name).unlink()
    assert train.main(_args(work, out, "vae,clip,unet", 3) + common) == 0
    log = (work / "train.log").read_text()
    assert "vae: done (2 steps, from its snapshot)" in log
    assert "unet: resuming at step 2 from its fp16 snapshot" in log
    again = torch.load(work / "unet.pt", map_location="cpu")
    assert again["step"] == 3
    # The snapshot carried the weights (to fp16 precision): one more step moves them little.
    name, t = next(iter(first["ema"].items()))
    assert torch.allclose(again["ema"][name], t, atol=0.05)
    assert train.main(_args(work, out, "export", 3) + common) == 0
    info = json.loads((out / "toyworld.json").read_text())
    assert (info["vae_steps"], info["clip_steps"], info["unet_steps"]) == (2, 2, 3)


def test_word_positions_point_at_each_objects_attribute_words():
    import random

    from analogon.toyworld import world
    from analogon.toyworld.vocab import build_tokenizer

    tok = build_tokenizer()
    scene = world.random_scene(random.Random(4), world="toy128", count=3)
    ids = tok(world.caption(scene)).input_ids
    for o, pos in zip(world.objects(scene), train.word_positions(scene), strict=True):
        for k, i in pos.items():
            assert tok.convert_ids_to_tokens(ids[i]) == o[k] + "</w>", (k, i)


def test_the_words_stage_changes_the_text_tower_the_unet_reads_and_nothing_else(tmp_path):
    work, out = tmp_path / "w", tmp_path / "toy"
    extra = ["--words-steps", "3", "--words-batch", "8"]
    assert train.main(_args(work, out, "data,vae,clip,words,unet,export", 1) + extra) == 0
    log = (work / "train.log").read_text()
    assert "stage words" in log
    args = train.parse_args(_args(work, out, "export", 1) + extra)
    before = train._load_clip(args, words=False)
    after = train._load_clip(args)
    text = [not torch.equal(p, q) for p, q in zip(before.text_model.parameters(),
                                                  after.text_model.parameters())]
    assert any(text)
    for p, q in zip(before.vision_model.parameters(), after.vision_model.parameters()):
        assert torch.equal(p, q)
    info = json.loads((out / "toyworld.json").read_text())
    assert info["words_steps"] == 3 and "--words-steps 3" in info["reproduce"]
    from analogon.models import LoadOptions, load_bundle

    te = load_bundle(str(out), LoadOptions(device="cpu")).pipe.text_encoder
    w = after.text_model.embeddings.token_embedding.weight
    assert torch.allclose(te.get_input_embeddings().weight.float(),
                          w.half().float())
    # without the stage (toy64's plan), the clip stage's text tower is the one used
    none = train.parse_args(_args(work, out, "export", 1) + ["--words-steps", "0"])
    assert torch.equal(train._load_clip(none).text_model.embeddings.token_embedding.weight,
                       before.text_model.embeddings.token_embedding.weight)
    # a STOP file ends the run before the next stage starts
    (work / train.STOP_FILE).touch()
    assert train.main(_args(work, out, "decoder,export", 1) + extra) == 0
    assert "stopping before stage decoder" in (work / "train.log").read_text()
    assert not (work / "decoder.pt").exists()
