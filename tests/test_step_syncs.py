"""Host reads of device values in a guided step: one per step from our guidance and geometry code.

On a GPU every read of a tensor's value on the host (``float(t)``, ``bool(t)``, ``.item()``,
``.tolist()``: aten ``_local_scalar_dense``) waits for the device. The test runs the CPU through the
GPU's branches (torch marching cubes, no CPU-only shortcuts) and counts those reads per guided step,
attributing each to the innermost frame of our package that caused it.
"""

import collections
import importlib
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.geometry import device as geo_device
from vlm3d_guidance.guidance import step as step_module

mc = importlib.import_module("vlm3d_guidance.geometry.marching_cubes")  # the module, not the function
from vlm3d_guidance.tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline

from test_pipeline import CALL, FAST, _image

READS = {"aten._local_scalar_dense.default"}
SHAPES = {"aten.nonzero.default", "aten._unique2.default", "aten.repeat_interleave.Tensor"}


class _Count(TorchDispatchMode):
    """Counts value reads and data-dependent-shape ops, keyed by our innermost module."""

    def __init__(self):
        super().__init__()
        self.reads = collections.Counter()
        self.shapes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in READS or name in SHAPES:
            ours = [f.filename for f in traceback.extract_stack() if "/vlm3d_guidance/" in f.filename]
            where = ours[-1].split("vlm3d_guidance/")[-1] if ours else "other"
            (self.reads if name in READS else self.shapes)[where] += 1
        return func(*args, **(kwargs or {}))


def _ours(counter):
    return sum(v for k, v in counter.items() if k.startswith(("guidance/", "geometry/", "pipeline.py")))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    critic = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=root), device="cpu", dtype=torch.float32)
    return critic, root


@pytest.mark.parametrize("c2f", [False, True])
def test_one_device_read_per_guided_step(setup, monkeypatch, c2f):
    critic, root = setup
    monkeypatch.setattr(geo_device, "host_reads_are_free", lambda device: False)  # the GPU's branches
    monkeypatch.setattr(mc, "CPU_BACKEND", "torch")  # topology on the field's device, as on a GPU
    cfg = GuidanceConfig(**{**FAST, "grid_resolution": 32, "lam": 0.05, "coarse_to_fine": c2f})
    pipe = GuidedHunyuanPipeline(load_tiny_hunyuan_pipeline("standard", root=root), critic, cfg)
    steps = 4
    explicit = []
    real = step_module.read_host
    monkeypatch.setattr(step_module, "read_host", lambda t: explicit.append(t.numel()) or real(t))
    with _Count() as count:
        out = pipe(image=_image(0), prompt="a red box", generator=torch.manual_seed(0), output_type="latent",
                   return_dict=True, **{**CALL, "num_inference_steps": steps})
    guided = sum(r.guided for r in out.trace)
    assert guided == steps - 1
    ours = _ours(count.reads) + len(explicit)
    if not c2f:
        assert ours == guided, count.reads  # exactly one: reward, gradient check, norm and zero share together
    else:
        tracked = sum(d["mode"] == "tracked" for r in out.trace for d in r.decoding if d)
        assert tracked >= 1, [r.decoding for r in out.trace]
        assert out.trace[0].decoding[0]["reason"] == "first step"
        # plus one per tracked step: the band check (did the surface leave it?)
        assert ours == guided + tracked, count.reads
    assert explicit == [4] * guided  # reward, "gradient finite", its norm, its share of zeros
    print(f"\nc2f={c2f}: value reads per guided step, by module: "
          f"{ {k: v / guided for k, v in sorted(count.reads.items())} }; data-dependent shapes: "
          f"{ {k: v / guided for k, v in sorted(count.shapes.items())} }")


def test_stage_timing_synchronises_only_when_profiling(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    cuda = torch.device("cuda")
    seconds = {}
    with step_module.timed(seconds, "decode", cuda, profile=False):
        pass
    assert calls == [] and seconds == {}
    with step_module.timed(seconds, "decode", cuda, profile=True):
        pass
    assert len(calls) == 2 and seconds["decode"] >= 0
    with step_module.timed(seconds, "render", torch.device("cpu"), profile=False):
        pass
    assert len(calls) == 2 and "render" in seconds  # the CPU is timed without synchronising
