"""Hunyuan3D 2.1 (hy3dshape's real classes) and 2mini (hy3dgen's) on tiny models: loading, routing,
bit-identity with the stock call, the MoE DiT's gradient, the field sign and level.

hy3dshape is not on any index: these tests import the unchanged copy in ``<shared>/third_party/
hy3dshape``, where ``<shared>`` is ``$VLM3D_SHARED`` or ``../shared`` beside the repository (CI always
has it). Without it the 2.1 tests skip and say so; the 2mini ones still run.
"""
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.geometry import decode_surface
from vlm3d_guidance.guidance import StepRecord
from vlm3d_guidance.model_routing import config_package, hunyuan_pipeline_class, model_package
from vlm3d_guidance.pipeline import _dit_train_mode
from vlm3d_guidance.render import orbit_cameras
from vlm3d_guidance.tiny import build_tiny_hunyuan, build_tiny_qwen, load_tiny_hunyuan_pipeline
from images import square_image as _image

SHARED = Path(os.environ.get("VLM3D_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
HY3DSHAPE = SHARED / "third_party" / "hy3dshape"
CALL = dict(num_inference_steps=6, octree_resolution=24, enable_pbar=False)
pytestmark = pytest.mark.filterwarnings("ignore:.*sdp_kernel.*:FutureWarning")  # inside hy3dshape
FAST = dict(num_views=2, render_size=56, grid_resolution=20, backend="torch")


@pytest.fixture(scope="module")
def hy3dshape():
    """hy3dshape importable from the shared copy (skip, naming where it was looked for, if absent)."""
    if not (HY3DSHAPE / "hy3dshape" / "__init__.py").is_file():
        pytest.skip(f"hy3dshape (Hunyuan3D 2.1) not found at {HY3DSHAPE}: CI has ../shared beside the clone; "
                    "elsewhere set VLM3D_SHARED=/path/to/shared")
    if str(HY3DSHAPE) not in sys.path:
        sys.path.insert(0, str(HY3DSHAPE))
    import hy3dshape as package  # a failure here (e.g. timm missing) is an error, not a skip

    return package


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hunyuan21")


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    return VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=tmp_path_factory.mktemp("qwen")),
                                     device="cpu", dtype=torch.float32)


def _load21(root, dtype=torch.float32):
    from vlm3d_guidance.tiny import load_tiny_hunyuan21_pipeline

    return load_tiny_hunyuan21_pipeline(root=root, dtype=dtype)


def _cli_checks():
    """The CLI's ``check_models`` and ``UsageError`` (``vlm3d_guidance.cli.models`` once the CLI is a package)."""
    try:
        from vlm3d_guidance.cli.models import UsageError, check_models
    except ImportError:
        from vlm3d_guidance.cli import UsageError, check_models
    return check_models, UsageError


def _published_config():
    """The DiT / VAE / conditioner part of hy3dshape's published 2.1 training config (4096 latents)."""
    path = HY3DSHAPE / "configs" / "hunyuandit-finetuning-flowmatching-dinog518-bf16-lr1e5-4096.yaml"
    params = yaml.safe_load(path.read_text())["model"]["params"]
    return dict(model=params["denoiser_cfg"], vae=params["first_stage_config"], conditioner=params["cond_stage_config"],
                image_processor=params["image_processor_cfg"], pipeline=params["pipeline_cfg"])


# ----------------------------------------------------------------------------- the tiny 2.1 model

# hyper-parameters that are sizes (tiny here); every other published parameter must be equal
_SIZES = {"model": {"input_size", "in_channels", "hidden_size", "context_dim", "depth", "num_heads", "text_len",
                    "num_moe_layers", "num_experts"},
          "vae": {"num_latents", "embed_dim", "num_freqs", "heads", "width", "num_encoder_layers",
                  "num_decoder_layers", "pc_size"},
          "dino": {"hidden_size", "image_size", "num_attention_heads", "num_hidden_layers"}}


def test_tiny_21_has_the_published_structure_and_loads_through_hy3dshape(hy3dshape, root):
    from hy3dshape.models.denoisers.moe_layers import MoEBlock
    from hy3dshape.pipelines import Hunyuan3DDiTFlowMatchingPipeline

    from vlm3d_guidance.tiny import build_tiny_hunyuan21

    tiny = build_tiny_hunyuan21(root=root)
    assert sorted(p.name for p in tiny.folder.iterdir()) == [".complete", "config.yaml", "model.fp16.ckpt"]
    ours, published = yaml.safe_load((tiny.folder / "config.yaml").read_text()), _published_config()
    for part in ("model", "vae", "conditioner", "image_processor", "pipeline"):
        assert ours[part]["target"] == published[part]["target"], part
    for part in ("model", "vae"):
        assert set(ours[part]["params"]) == set(published[part]["params"]), part
        for key, value in published[part]["params"].items():
            if key in _SIZES[part]:
                assert ours[part]["params"][key] <= value, (part, key)
            else:
                assert ours[part]["params"][key] == value, (part, key)
    enc, pub_enc = (c["params"]["main_image_encoder"] for c in (ours["conditioner"], published["conditioner"]))
    assert enc["type"] == pub_enc["type"] == "DinoImageEncoder"
    assert enc["kwargs"]["use_cls_token"] is pub_enc["kwargs"]["use_cls_token"] is True
    assert set(enc["kwargs"]["config"]) == set(pub_enc["kwargs"]["config"])
    for key, value in pub_enc["kwargs"]["config"].items():
        mine = enc["kwargs"]["config"][key]
        assert (mine <= value) if key in _SIZES["dino"] else (mine == value), key
    assert ours["scheduler"]["target"] == "hy3dshape.schedulers.FlowMatchEulerDiscreteScheduler"

    with torch.random.fork_rng(devices=[]):
        pipe = _load21(root)
    assert type(pipe) is Hunyuan3DDiTFlowMatchingPipeline
    assert type(pipe.model).__name__ == "HunYuanDiTPlain" and type(pipe.model).__module__.startswith("hy3dshape.")
    moe = [m for m in pipe.model.modules() if isinstance(m, MoEBlock)]
    assert len(moe) == 2 and all(len(m.experts) == 4 and m.moe_top_k == 2 for m in moe)
    assert sum(b.skip_linear is not None for b in pipe.model.blocks) == 1  # the U-Net skip of layer 2
    assert pipe.model.training  # hy3dshape's loader leaves the DiT in train mode
    assert type(pipe.vae).__module__ == "hy3dshape.models.autoencoders.model" and hasattr(pipe.vae, "encoder")
    assert pipe.vae.scale_factor == 1.0039506158752403 and pipe.vae.latent_shape == (32, 8)
    assert type(pipe.scheduler).__module__ == "hy3dshape.schedulers"
    assert type(pipe.conditioner.main_image_encoder.model).__name__ == "Dinov2Model"
    meshes = pipe(image=_image(0), generator=torch.manual_seed(0), **CALL)
    assert len(meshes) == 1 and meshes[0].is_watertight and 0.05 < meshes[0].volume < 0.5 * 2.02 ** 3
    # the same seed writes the same weights
    again = build_tiny_hunyuan21(root=root / "again")
    a, b = (torch.load(t.folder / "model.fp16.ckpt", weights_only=True) for t in (tiny, again))
    assert a.keys() == b.keys() == {"model", "vae", "conditioner"}
    assert all(torch.equal(a[p][k], b[p][k]) and a[p][k].dtype == torch.float16 for p in a for k in a[p])


# ----------------------------------------------------------------------------- lam = 0 is the stock call

def _assert_same_meshes(want, got):
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert (a is None) == (b is None)
        if a is not None:
            assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)


@pytest.mark.parametrize("flavour", ["2.1", "mini"])
def test_lam_zero_is_bit_identical_to_the_stock_call(flavour, request, root, critic):
    if flavour == "2.1":
        request.getfixturevalue("hy3dshape")
        stock, ours = _load21(root), _load21(root)
    else:
        stock, ours = (load_tiny_hunyuan_pipeline("mini", root=root) for _ in range(2))
    guided = GuidedHunyuanPipeline(ours, critic, GuidanceConfig(lam=0.0, **FAST))
    images, prompts = [_image(0), _image(1)], ["a thing", "another thing"]
    want = stock(image=images, generator=torch.manual_seed(3), output_type="latent", **CALL)
    got = guided(image=images, prompt=prompts, generator=torch.manual_seed(3), output_type="latent", **CALL)
    assert want.shape == (2, *stock.vae.latent_shape) and not torch.equal(want[0], want[1])
    assert torch.equal(want, got)
    want_mesh = stock(image=images, generator=torch.manual_seed(3), **CALL)
    got_mesh = guided(image=images, prompt=prompts, generator=torch.manual_seed(3), **CALL)
    assert all(m is not None for m in want_mesh)
    _assert_same_meshes(want_mesh, got_mesh)


# ----------------------------------------------------------------------------- the MoE DiT's gradient

def _routing(model):
    """Record each MoE gate's expert choice per token while active: a list of ``[T, k]`` (sorted)."""
    chosen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: chosen.append(out[0].sort(-1).values.clone()))
             for m in model.modules() if type(m).__name__ == "MoEGate"]
    return chosen, hooks


def _central_difference(f, z, d, model, steps=(1e-4, 1e-5, 1e-6)):
    """``d/de f(z + e d)`` at 0 by central differences, at the largest step whose stencil keeps every
    token on the same experts (top-k routing is piecewise constant: across a switch the DiT jumps)."""
    for eps in steps:
        chosen, hooks = _routing(model)
        try:
            with torch.no_grad():
                f(z)  # records the routing at z itself
                fp, fm = f(z + eps * d), f(z - eps * d)
        finally:
            for h in hooks:
                h.remove()
        n = len(chosen) // 3
        if all(torch.equal(chosen[i], chosen[i + n]) and torch.equal(chosen[i], chosen[i + 2 * n]) for i in range(n)):
            return float((fp - fm) / (2 * eps))
    raise AssertionError("the routing changes within every stencil tried")


def test_full_gradient_through_the_moe_dit_matches_finite_differences_and_eval_mode_is_wrong(hy3dshape, root,
                                                                                             tmp_path):
    pipe = _load21(root, dtype=torch.float64)
    critic64 = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=tmp_path), device="cpu",
                                         dtype=torch.float64)
    cfg = GuidanceConfig(gradient="full", normalize="none", lam=1.0, **FAST)
    guided = GuidedHunyuanPipeline(pipe, critic64, cfg)
    dit = pipe.model
    with torch.inference_mode():
        cond_inputs = pipe.prepare_image(_image(0))
        cond = pipe.encode_cond(image=cond_inputs.pop("image"), additional_cond_inputs=cond_inputs,
                                do_classifier_free_guidance=True, dual_guidance=False)
    cond = {k: v.clone() for k, v in cond.items()}
    sigma, t = 0.4, torch.tensor(400.0, dtype=torch.float64)
    kw = dict(box_v=1.01, mc_level=0.0, num_chunks=8000)

    def x0_of(z):
        return z + (1 - sigma) * guided._velocity(z, t, cond, None, 5.0, True)

    z = torch.randn((1, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cams = orbit_cameras(num_views=cfg.num_views, elevation=cfg.elevation, fov=cfg.fov, bounds=1.01)
    # The pipeline's "full" step, as __call__ runs it: DiT forward and backward inside the train switch.
    record = StepRecord(step=0, sigma=sigma, lam=1.0)
    dit.eval()  # whatever mode the DiT is in, the switch runs it in train mode and puts it back
    zz, cotangent = z.clone().requires_grad_(True), []
    with _dit_train_mode(dit, True):
        with torch.enable_grad():
            v = guided._velocity(zz, t, cond, None, 5.0, True)
        v.register_hook(cotangent.append)  # d reward / d v, on its way into the DiT's backward
        update = guided._guidance_update(zz, v, sigma, 1.0, ["a red box"], cams, cfg, record, full=True, **kw)
    assert not dit.training and record.guided and record.grad_norm[0] > 0
    # the critic's gradient g at x0 = z + (1 - sigma) v, as the pipeline computed it: update = J^T g
    g = cotangent[0] / (1 - sigma)
    assert float(g.abs().max()) > 0

    def pairing(zv):
        return (x0_of(zv) * g).sum()

    def vjp(cotangent, train):  # plain autograd through the DiT in the given mode
        dit.train(train)
        zr = z.clone().requires_grad_(True)
        (out,) = torch.autograd.grad((x0_of(zr) * cotangent).sum(), zr)
        return out

    eval_grad = vjp(g, train=False)
    gen = torch.Generator().manual_seed(2)
    worst_full, worst_eval = 0.0, 0.0
    for _ in range(3):
        d = torch.randn(z.shape, generator=gen, dtype=z.dtype)
        for train in (True, False):  # the DiT's forward is the same in both modes: so is the FD
            dit.train(train)
            fd = _central_difference(pairing, z, d, dit)
            worst_full = max(worst_full, abs(float((update * d).sum()) - fd) / abs(fd))
            worst_eval = max(worst_eval, abs(float((eval_grad * d).sum()) - fd) / abs(fd))
    print(f"\n2.1 MoE DiT, directional derivative vs central differences: full mode {worst_full:.1e}, "
          f"eval-mode autograd {worst_eval:.1e} (relative)")
    assert worst_full < 1e-5  # the update is float32
    # In eval mode the routed experts run under no_grad (moe_infer): only the shared expert's part of
    # the gradient survives, so the "gradient" is wrong although the forward is the same.
    assert worst_eval > 0.05
    dit.eval()
    with torch.no_grad():
        eval_value = pairing(z)
    dit.train()
    with torch.no_grad():
        assert abs(float(pairing(z) - eval_value)) <= 1e-12 * abs(float(eval_value))

    # Train mode without the switch is wrong too: hy3dshape's AddAuxiliaryLoss sends a gradient of 1 into
    # the gates' load-balancing loss in every backward, so naive(g) = J^T g + p with a p that does not
    # depend on the cotangent g at all (same for g and 2 g): not part of any gradient of the reward.
    exact = update.double()
    p1, p2 = vjp(g, train=True) - exact, vjp(2 * g, train=True) - 2 * exact
    print(f"train mode without the switch: off by {float(p1.norm() / exact.norm()):.1%} of the gradient")
    # (its size relative to J^T g depends on how large the reward's gradient is: a few % here)
    assert float(p1.norm()) > 1e-3 * float(exact.norm())
    assert float((p1 - p2).norm()) < 1e-4 * float(p1.norm())


# ----------------------------------------------------------------------------- field sign and mc_level

@pytest.mark.parametrize("mc_level", [0.0, -1 / 512, 0.15])
def test_decode_surface_is_hy3dshapes_own_mesh(hy3dshape, root, mc_level):
    """The guidance mesh equals the stock 2.1 export (hy3dshape's VanillaVolumeDecoder + MC extractor)
    at the same grid and level, triangle for triangle and in the same winding, once the stock
    vertex mapping's ``resolution / (resolution + 1)`` shrink (see geometry/grid.py) is undone."""
    from scipy.spatial import cKDTree

    pipe, res, box = _load21(root), 24, 1.01
    latents = pipe(image=[_image(0), _image(1)], generator=torch.manual_seed(5), output_type="latent", **CALL)
    with torch.inference_mode():
        stock = pipe._export(latents, "trimesh", box, mc_level, 8000, res, None, enable_pbar=False)
    ours = decode_surface(pipe.vae, latents.clone(), resolution=res, box_v=box, mc_level=mc_level)
    with torch.no_grad():  # the field on the grid, to check which side is inside
        from vlm3d_guidance.geometry import decode_field
        sdf = decode_field(pipe.vae, latents, resolution=res, box_v=box, mc_level=mc_level)
    for b, ((verts, faces), mesh) in enumerate(zip(ours, stock)):
        v_stock = -box + (np.asarray(mesh.vertices) + box) * (res + 1) / res
        v_ours = verts.detach().double().numpy()
        assert v_ours.shape == v_stock.shape and faces.shape == mesh.faces.shape and faces.shape[0] > 200
        dist, match = cKDTree(v_stock).query(v_ours)
        # float32 on both sides (the stock grid is `.float()`; the level is subtracted before or inside the
        # interpolation): 1e-4 is about 1e-3 of a grid cell
        assert dist.max() < 1e-4 and len(set(match.tolist())) == len(match)  # a bijection of vertices
        mapped = match[faces.numpy()]

        def canonical(tris):  # a triangle up to rotation, keeping its winding
            return {tuple(np.roll(t, -int(np.argmin(t)))) for t in tris.tolist()}

        assert canonical(mapped) == canonical(np.asarray(mesh.faces))
        # Positive inside: the enclosed volume is that of the grid points where the field exceeds the
        # level (sdf < 0), up to the surface's discretisation.
        inside = float((sdf[b] < 0).double().mean()) * (2 * box) ** 3
        import trimesh

        volume = trimesh.Trimesh(v_ours, faces.numpy(), process=False).volume
        assert volume > 0 and abs(volume - inside) < 0.15 * inside, (volume, inside)


# ----------------------------------------------------------------------------- routing by config.yaml

def _copy_model(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def test_routing_reads_the_config_targets_not_the_name(root, monkeypatch):
    """Needs no hy3dshape: a 2.0 or 2mini folder routes to hy3dgen, whatever its name says."""
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline as Hy3dgen

    from vlm3d_guidance.tiny.hunyuan21 import hunyuan21_config

    t20, mini = build_tiny_hunyuan("standard", root=root), build_tiny_hunyuan("mini", root=root)
    monkeypatch.setenv("HY3DGEN_MODELS", str(root))
    assert hunyuan_pipeline_class(t20.model_path, t20.subfolder) is Hy3dgen
    assert hunyuan_pipeline_class(mini.model_path, mini.subfolder) is Hy3dgen
    _copy_model(t20.folder, root / "acme" / "Hunyuan3D-2.1" / "hunyuan3d-dit-v2-1")  # a 2.0 model under a 2.1 name
    assert hunyuan_pipeline_class("acme/Hunyuan3D-2.1", "hunyuan3d-dit-v2-1") is Hy3dgen
    assert model_package("acme/nowhere", "hunyuan3d-dit-v2-1") == "hy3dgen"  # not found: hy3dgen's loader reports it
    config = hunyuan21_config()
    assert config_package(config) == "hy3dshape"
    # a config naming neither package (or both) is refused with what it names
    config["vae"]["target"] = "hy3dgen.shapegen.models.ShapeVAE"
    with pytest.raises(ValueError, match="hy3dgen.shapegen.models.ShapeVAE.*either hy3dgen.* classes"):
        config_package(config)
    with pytest.raises(ValueError, match=r"names targets \(none\)"):
        config_package({"model": {"params": {}}})


def test_hy3dshape_models_load_through_hy3dshape_under_any_name(hy3dshape, root, monkeypatch):
    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline as Hy3dgen
    from hy3dshape.pipelines import Hunyuan3DDiTFlowMatchingPipeline as Hy3dshape

    from vlm3d_guidance.tiny import build_tiny_hunyuan21

    t21, mini = build_tiny_hunyuan21(root=root), build_tiny_hunyuan("mini", root=root)
    monkeypatch.setenv("HY3DGEN_MODELS", str(root))
    assert hunyuan_pipeline_class(t21.model_path, t21.subfolder) is Hy3dshape
    _copy_model(t21.folder, root / "acme" / "chairs" / "ft-0")  # a 2.1 fine-tune under any name
    assert hunyuan_pipeline_class("acme/chairs", "ft-0") is Hy3dshape
    assert hunyuan_pipeline_class(str(root / "acme" / "chairs"), "ft-0") is Hy3dshape  # an absolute path

    # the user entry point loads each through its own package
    critic_path = build_tiny_qwen("qwen2_5_vl", root=root / "qwen")
    for tiny, cls in ((t21, Hy3dshape), (mini, Hy3dgen)):
        guided = GuidedHunyuanPipeline.from_pretrained(tiny.model_path, subfolder=tiny.subfolder,
                                                       critic=str(critic_path), device="cpu", dtype=torch.float32)
        assert type(guided.pipeline) is cls
    # the CLI's pre-flight check routes the same way, knows 2.1's weights file, refuses a config without targets
    check_models, UsageError = _cli_checks()

    def check(tiny):
        return check_models(dict(tiny=False, model_path=tiny.model_path, subfolder=tiny.subfolder,
                                 critic=str(critic_path)))

    assert check(t21)["hunyuan"] == f"local folder {t21.folder}"
    assert check(mini)["hunyuan"] == f"local folder {mini.folder}"
    broken = root / "acme" / "broken" / "dit"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "config.yaml").write_text("{}\n")
    with pytest.raises(UsageError, match=r"names targets \(none\)"):
        check_models(dict(tiny=False, model_path="acme/broken", subfolder="dit", critic=str(critic_path)))


def test_a_clear_error_when_hy3dshape_cannot_be_imported(hy3dshape, root, monkeypatch):
    from vlm3d_guidance.tiny import build_tiny_hunyuan21

    check_models, UsageError = _cli_checks()
    t21 = build_tiny_hunyuan21(root=root)
    monkeypatch.setenv("HY3DGEN_MODELS", str(root))
    # the standard way to make an import fail: a None entry in sys.modules
    monkeypatch.setitem(sys.modules, "hy3dshape", None)
    monkeypatch.setitem(sys.modules, "hy3dshape.pipelines", None)
    with pytest.raises(ImportError, match=r"needs hy3dshape.*Fix: put hy3dshape on PYTHONPATH.*Hunyuan3D-2\.1"):
        hunyuan_pipeline_class(t21.model_path, t21.subfolder)
    with pytest.raises(ImportError, match="put hy3dshape on PYTHONPATH"):
        GuidedHunyuanPipeline.from_pretrained(t21.model_path, subfolder=t21.subfolder, critic="unused", device="cpu")
    with pytest.raises(UsageError, match="put hy3dshape on PYTHONPATH.*or use --model-path tencent/Hunyuan3D-2"):
        check_models(dict(tiny=False, model_path=t21.model_path, subfolder=t21.subfolder, critic="unused"))
    # a 2.0 model does not need it
    t20 = build_tiny_hunyuan("standard", root=root)
    assert hunyuan_pipeline_class(t20.model_path, t20.subfolder).__module__.startswith("hy3dgen.")


# ----------------------------------------------------------------------------- guidance runs on 2.1

def test_guided_21_run_steers_and_restores_the_dit_mode(hy3dshape, root, critic):
    pipe = _load21(root)
    guided = GuidedHunyuanPipeline(pipe, critic, GuidanceConfig(lam=0.05, gradient="full", **FAST))
    kw = dict(image=_image(0), prompt="a red box", output_type="latent", **{**CALL, "num_inference_steps": 3})
    base = guided(generator=torch.manual_seed(0), lam=0.0, **kw)
    out = guided(generator=torch.manual_seed(0), return_dict=True, **kw)
    assert [r.guided for r in out.trace] == [True, True, False]
    assert all(np.isfinite(r.reward[0]) and r.grad_norm[0] > 0 for r in out.trace[:2])
    assert float((out.latents - base).double().pow(2).mean().sqrt()) > 0.01
    assert pipe.model.training and all(m.training for m in pipe.model.modules())  # as hy3dshape loaded it
    # recomputing HunYuanDiTPlain's blocks in backward (routing included) gives the same steps
    checkpointed = guided(generator=torch.manual_seed(0), dit_checkpointing=True, **kw)
    assert torch.allclose(checkpointed, out.latents, rtol=0, atol=1e-6)
    assert all("forward" not in vars(m) for m in pipe.model.modules())  # the gates' patched forwards are gone
