"""Memory presets: chosen from the device's memory, overridden by explicit settings, passed
from the command line to the loaded models and the high-resolution pass; the server reports
the device and its memory; running out of memory names the docker's setting."""
from __future__ import annotations

import json

import httpx
import pytest

from analogon import memory
from analogon.memory import GB, auto_preset, resolve


@pytest.mark.parametrize("info,preset", [
    ({"device": "cpu", "vram_bytes": None}, "cpu"),
    ({"device": "cuda", "vram_bytes": 4 * GB}, "low"),
    ({"device": "cuda", "vram_bytes": 6 * GB}, "low"),
    ({"device": "cuda", "vram_bytes": 8 * GB}, "medium"),
    ({"device": "cuda", "vram_bytes": 12 * GB}, "medium"),
    ({"device": "cuda", "vram_bytes": 24 * GB}, "high"),
    ({"device": "mps", "vram_bytes": 8 * GB}, "low"),  # shared memory: two thirds count
    ({"device": "mps", "vram_bytes": 32 * GB}, "high"),
])
def test_automatic_preset_from_the_device_memory(info, preset):
    assert auto_preset(info) == preset


def test_resolve_takes_the_preset_and_explicit_values_win():
    small = {"device": "cuda", "vram_bytes": 6 * GB}
    m = resolve("auto", small)
    assert (m.preset, m.dtype, m.cpu_offload, m.vae_tiling, m.max_pixels) == ("low", "float16", True, True, 1024**2)
    m = resolve("auto", small, cpu_offload=False, max_pixels=640 * 640, device="cuda:1")
    assert (m.preset, m.device, m.cpu_offload, m.vae_tiling, m.max_pixels) == ("low", "cuda:1", False, True, 640 * 640)
    big = resolve("high", {"device": "cuda", "vram_bytes": 24 * GB})
    assert (big.cpu_offload, big.vae_tiling, big.max_pixels) == (False, False, 2048**2)
    # a GPU preset where there is no GPU: float32 and no offload, not float16 on the CPU
    m = resolve("medium", {"device": "cpu", "vram_bytes": None})
    assert (m.dtype, m.cpu_offload, m.vae_tiling) == ("float32", False, True)
    # no preset: only what was given
    m = resolve(None, vae_tiling=True)
    assert (m.preset, m.device, m.dtype, m.cpu_offload, m.vae_tiling, m.max_pixels) == ("none", None, None, False, True, None)
    with pytest.raises(ValueError):
        resolve("huge", small)


def test_system_info_here():
    info = memory.system_info()
    assert info["device"] in ("cpu", "cuda", "mps") and info["ram_bytes"] > 2**28
    assert (info["vram_bytes"] is None) == (info["device"] == "cpu")


def test_serve_passes_the_preset_to_the_server(monkeypatch):
    import analogon.server as server
    from analogon import cli

    seen = {}
    monkeypatch.setattr(server, "serve", lambda settings, log_level="info": seen.setdefault("s", settings) and 0)
    monkeypatch.setattr(memory, "system_info", lambda: {"device": "cuda", "vram_bytes": 10 * GB, "ram_bytes": GB})
    assert cli.main(["serve", "--memory-preset", "auto", "--no-vae-tiling", "--max-pixels", "500000",
                     "--port", "0", "--models-dir", "/m1", "--models-dir", "/m 2"]) == 0
    s = seen["s"]
    assert (s.memory_preset, s.dtype, s.cpu_offload, s.vae_tiling, s.max_working_pixels) == \
        ("medium", "float16", False, False, 500000)
    assert [str(d) for d in s.model_dirs] == ["/m1", "/m 2"]
    seen.clear()
    assert cli.main(["serve", "--port", "0"]) == 0  # no preset: the loader's defaults, as before
    assert (seen["s"].memory_preset, seen["s"].cpu_offload, seen["s"].max_working_pixels) == ("none", False, None)


def test_max_working_pixels_caps_the_high_resolution_pass():
    from analogon.core.hires import HiresSettings, refine_size

    s = HiresSettings(mode="on")
    free = refine_size((4000, 3000), (512, 384), 512, s)
    capped = refine_size((4000, 3000), (512, 384), 512, s, cap=1024 * 1024)
    assert free[0] * free[1] > 1024 * 1024 >= capped[0] * capped[1] > 0.9 * 1024 * 1024


def test_the_loaded_model_carries_the_cap():
    from analogon.models import LoadOptions, load_bundle

    b = load_bundle("tiny-sd", LoadOptions(device="cpu", max_working_pixels=300 * 300))
    assert b.info["max_working_pixels"] == 300 * 300


def test_v1_system_and_the_out_of_memory_message(tmp_path):
    from analogon import methods
    from analogon.server import ServerThread, Settings
    from test_engine_methods import EchoMethod

    class OOM(EchoMethod):
        id = "test-oom"

        def generate(self, ctx, inputs, params):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    m = methods.register(OOM())
    try:
        settings = Settings(port=0, state_dir=tmp_path, cache_dir="", device="cpu", vae_tiling=True,
                            max_working_pixels=777, memory_preset="cpu", scan_usual_places=False)
        with ServerThread(settings) as srv, httpx.Client(
                base_url=srv.url, headers={"Authorization": f"Bearer {srv.token}"}, timeout=30) as c:
            sysinfo = c.get("/v1/system").json()
            assert sysinfo["device"] == "cpu" and sysinfo["ram_bytes"] > 0
            assert sysinfo["memory"]["system_total_bytes"] > 0 and sysinfo["auto_preset"] == "cpu"
            assert sysinfo["settings"] == {"preset": "cpu", "device": "cpu", "dtype": None, "cpu_offload": False,
                                           "vae_tiling": True, "max_pixels": 777}
            assert set(sysinfo["presets"]) == {"cpu", "low", "medium", "high"}
            from test_server import upload, image

            src = upload(c, image(16, 16))
            job = c.post("/v1/jobs", json={"method": "test-oom", "model": "tiny-sd", "images": {"source": src}}).json()
            kinds = []
            with c.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        kinds.append(json.loads(line[6:]))
            err = kinds[-1]
            assert err["code"] == "out_of_memory"
            assert "Memory" in err["message"] and "memory preset" in err["message"]
    finally:
        methods.unregister(m.id)


def _estimate(family="sdxl", weights=True, w=1024, h=1024, method="pixels"):
    from analogon.server import memory

    return memory.Estimate(method, family, w, h, 1, w * h * 64,
                           memory.MODEL_WORK_BYTES[family],
                           memory.WEIGHT_BYTES[family] if weights else 0, "sd_xl_base_1.0")


def test_a_model_too_large_for_the_machine_is_named_not_the_region():
    from analogon.errors import AnalogonError
    from analogon.server.memory import GiB, Budget

    cpu = Budget("cpu", None, host_bytes=16 * GiB)  # fp32 on the CPU: SDXL needs 23 GiB
    with pytest.raises(AnalogonError) as e:
        cpu.check(_estimate(w=64, h=64))
    msg = e.value.message
    assert e.value.detail["cause"] == "model" and "“sd_xl_base_1.0”" in msg
    assert "SDXL" in msg and "weights included" in msg and "smaller model" in msg
    assert "smaller region" not in msg
    # An SD 1.x model fits the same machine at a small size.
    cpu.check(_estimate("sd1", w=64, h=64))
    # The same model already loaded: its weights are no longer counted.
    Budget("cpu", None, host_bytes=11 * GiB).check(_estimate(weights=False, w=64, h=64))


def test_a_region_too_large_asks_for_a_smaller_region():
    from analogon.errors import AnalogonError
    from analogon.server.memory import GiB, Budget

    cpu = Budget("cpu", None, host_bytes=8 * GiB)
    with pytest.raises(AnalogonError) as e:
        cpu.check(_estimate("sd1", w=8192, h=8192))
    assert e.value.detail["cause"] == "region" and "smaller region" in e.value.message
    assert "8192×8192" in e.value.message


def test_fits_tells_which_families_can_run_here():
    from analogon.server.memory import GiB, Budget

    cpu = Budget("cpu", None, host_bytes=16 * GiB)
    assert cpu.fits("sd1", "pixels") and cpu.fits("sd2-v", "dia")
    assert not cpu.fits("sdxl", "pixels") and not cpu.fits("sdxl-inpainting")
    assert Budget("cpu", None, host_bytes=64 * GiB).fits("sdxl", "pixels")


def test_recommended_checkpoint_follows_what_fits():
    from analogon.models import discovery

    def ck(name, family):
        return discovery.Checkpoint(id=name, name=name, family=family, variant=family, label=family,
                                    size_bytes=1, source="file", location="configured",
                                    methods=["pixels", "appearance", "dia", "difference"])

    found = [ck("xl", "sdxl"), ck("one-five", "sd1")]
    assert discovery.recommended_for("pixels", found).name == "xl"  # the paper's family
    small = discovery.recommended_for("pixels", found, lambda f: not f.startswith("sdxl"))
    assert small.name == "one-five"
    # Nothing fits: still the paper's order, the refusal will say why.
    assert discovery.recommended_for("pixels", found, lambda f: False).name == "xl"
