"""The per-image work cache: keys, memory LRU, safetensors on disk under a size cap."""
from __future__ import annotations

import torch

from analogon.core.cache import Cache


def _t(seed: int, n: int = 256) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(n, generator=g), "ids": torch.arange(4, dtype=torch.int64)}


def test_key_is_stable_and_sensitive():
    a = Cache.key("ddim_inversion", "tiny-sd", image="ab" * 32, steps=10, cfg=1.0)
    b = Cache.key("ddim_inversion", "tiny-sd", cfg=1.0, steps=10, image="ab" * 32)
    assert a == b and len(a) == 64
    assert a != Cache.key("ddim_inversion", "tiny-sd", image="ab" * 32, steps=11, cfg=1.0)
    assert a != Cache.key("ddim_inversion", "other-model", image="ab" * 32, steps=10, cfg=1.0)
    assert a != Cache.key("ddpm_inversion", "tiny-sd", image="ab" * 32, steps=10, cfg=1.0)
    # an int and a float of the same value are different parameters
    assert Cache.key("n", "m", x=1) != Cache.key("n", "m", x=1.0)
    # nested parts are canonical too
    assert Cache.key("n", "m", p={"a": 1, "b": [1, 2]}) == Cache.key("n", "m", p={"b": (1, 2), "a": 1})


def test_round_trip_memory_and_disk(tmp_path):
    c = Cache(tmp_path)
    k = c.key("inv", "tiny-sd", image="00" * 32)
    assert c.get(k) is None and c.misses == 1
    c.put(k, _t(1), {"steps": 4, "prompt": "a cat"})
    got = c.get(k)
    assert c.hits == 1
    assert torch.equal(got["latents"], _t(1)["latents"]) and got["ids"].dtype == torch.int64
    assert (tmp_path / f"{k}.safetensors").exists()
    # a fresh instance reloads from disk, with the metadata
    c2 = Cache(tmp_path)
    tensors, meta = c2.get_entry(k)
    assert torch.equal(tensors["latents"], _t(1)["latents"])
    assert meta == {"steps": 4, "prompt": "a cat"}
    assert c2.hits == 1 and c2.misses == 0


def test_memory_only_cache_keeps_nothing_on_disk(tmp_path):
    c = Cache(None, memory_items=2)
    keys = [c.key("x", "m", i=i) for i in range(3)]
    for i, k in enumerate(keys):
        c.put(k, _t(i))
    assert c.get(keys[0]) is None  # evicted from the 2-item LRU
    assert torch.equal(c.get(keys[2])["latents"], _t(2)["latents"])
    assert c.disk_bytes() == 0 and list(tmp_path.iterdir()) == []


def test_memory_lru_prefers_recently_used(tmp_path):
    c = Cache(None, memory_items=2)
    k0, k1, k2 = (c.key("x", "m", i=i) for i in range(3))
    c.put(k0, _t(0))
    c.put(k1, _t(1))
    assert c.get(k0) is not None  # k0 is now the most recent
    c.put(k2, _t(2))  # evicts k1
    assert c.get(k1) is None and c.get(k0) is not None


def test_disk_cap_evicts_least_recently_used(tmp_path):
    entry_bytes = 256 * 4 + 4 * 8  # payload; safetensors adds a small header
    c = Cache(tmp_path, memory_items=0, disk_cap_bytes=3 * entry_bytes + 3 * 400)
    keys = [c.key("x", "m", i=i) for i in range(4)]
    for i in range(3):
        c.put(keys[i], _t(i))
    assert all((tmp_path / f"{k}.safetensors").exists() for k in keys[:3])
    assert c.get(keys[0]) is not None  # use k0: k1 becomes the oldest used
    c.put(keys[3], _t(3))
    assert c.disk_bytes() <= c.disk_cap_bytes
    assert not (tmp_path / f"{keys[1]}.safetensors").exists()
    for k in (keys[0], keys[2], keys[3]):
        assert (tmp_path / f"{k}.safetensors").exists()
    assert c.get(keys[1]) is None


def test_corrupt_or_foreign_file_is_a_miss(tmp_path):
    c = Cache(tmp_path, memory_items=0)
    k = c.key("x", "m", i=1)
    c.put(k, _t(1))
    path = tmp_path / f"{k}.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert Cache(tmp_path).get(k) is None
    path.write_bytes(b"not a safetensors file at all")
    assert Cache(tmp_path).get(k) is None
    # a valid file stored under another entry's name is not taken for it
    k2 = c.key("x", "m", i=2)
    c.put(k2, _t(2))
    (tmp_path / f"{k2}.safetensors").rename(path)
    assert Cache(tmp_path).get(k) is None
    # and the cache still works afterwards
    c.put(k, _t(5))
    assert torch.equal(Cache(tmp_path).get(k)["latents"], _t(5)["latents"])


def _data_offset(path) -> int:
    """Where a safetensors file's tensor bytes start (after the 8-byte length and the header)."""
    import struct

    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_changed_tensor_bytes_are_a_miss_removed_and_recomputed(tmp_path, caplog):
    c = Cache(tmp_path, memory_items=0)
    k = c.key("x", "m", i=1)
    c.put(k, _t(1))
    path = tmp_path / f"{k}.safetensors"
    data = bytearray(path.read_bytes())
    start = _data_offset(path)
    data[start + 5] ^= 0x40  # one bit of one float, header untouched: still a valid file
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="analogon.core.cache"):
        assert Cache(tmp_path, memory_items=0).get(k) is None
    assert not path.exists(), "the changed entry is kept"
    assert any("do not match" in r.getMessage() for r in caplog.records)
    c.put(k, _t(1))  # recomputed
    assert torch.equal(Cache(tmp_path).get(k)["latents"], _t(1)["latents"])


def test_nan_bytes_are_a_miss(tmp_path):
    c = Cache(tmp_path, memory_items=0)
    k = c.key("x", "m", i=2)
    c.put(k, _t(2))
    path = tmp_path / f"{k}.safetensors"
    data = bytearray(path.read_bytes())
    start = _data_offset(path)
    data[start:start + 16] = torch.full((4,), float("nan")).numpy().tobytes()
    path.write_bytes(bytes(data))
    assert Cache(tmp_path, memory_items=0).get(k) is None


def test_a_folder_where_an_entry_should_be_is_a_miss_not_a_crash(tmp_path):
    c = Cache(tmp_path, memory_items=0)
    k = c.key("x", "m", i=3)
    (tmp_path / f"{k}.safetensors").mkdir()
    (tmp_path / f"{k}.safetensors" / "inside").write_bytes(b"x")
    assert c.get(k) is None and k not in c
    c.put(k, _t(3))
    assert torch.equal(Cache(tmp_path, memory_items=0).get(k)["latents"], _t(3)["latents"])


def test_leftover_tmp_files_of_dead_writers_are_removed_at_start(tmp_path):
    import os
    import subprocess
    import sys

    c = Cache(tmp_path, memory_items=0)
    k = c.key("x", "m", i=4)
    c.put(k, _t(4))
    # a process that has exited: its pid is free (a killed writer leaves a complete .tmp file)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    complete = (tmp_path / f"{k}.safetensors").read_bytes()
    leftover = tmp_path / f".{c.key('x', 'm', i=5)}.safetensors.{dead}.1234.tmp"
    leftover.write_bytes(complete)
    ours = tmp_path / f".{c.key('x', 'm', i=6)}.safetensors.{os.getpid()}.1234.tmp"
    ours.write_bytes(b"being written by a live process")
    c2 = Cache(tmp_path)
    assert not leftover.exists() and c2.removed_tmp == 1
    assert ours.exists()  # a live writer's file is left alone
    assert torch.equal(c2.get(k)["latents"], _t(4)["latents"])
