"""GuidedHunyuanPipeline on the tiny real models: bit-identity with hy3dgen, guidance, gradients, faults."""
import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline, GuidedOutput
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.guidance import reward_and_gradient
from vlm3d_guidance.render import orbit_cameras
from vlm3d_guidance.tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline

# Small but real: every stage runs; views at 56 px (a multiple of 28) keep the critic cheap.
FAST = dict(num_views=2, render_size=56, grid_resolution=24)
CALL = dict(num_inference_steps=6, octree_resolution=24, enable_pbar=False)


def _image(seed=0, size=64):
    rng = np.random.default_rng(seed)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[12:52, 18:46, :3] = rng.integers(0, 255, 3)
    rgba[12:52, 18:46, 3] = 255
    return Image.fromarray(rgba)


@pytest.fixture(scope="module")
def critic(tmp_path_factory):
    path = build_tiny_qwen("qwen2_5_vl", root=tmp_path_factory.mktemp("qwen"))
    return VLMCritic.from_pretrained(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def hunyuan_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hunyuan")


def _pipes(flavour, root, critic, **cfg):
    stock = load_tiny_hunyuan_pipeline(flavour, root=root)
    guided = GuidedHunyuanPipeline(load_tiny_hunyuan_pipeline(flavour, root=root), critic,
                                   GuidanceConfig(**{**FAST, **cfg}))
    return stock, guided


def _assert_same_meshes(a, b):
    assert len(a) == len(b)
    for ma, mb in zip(a, b):
        assert (ma is None) == (mb is None)
        if ma is not None:
            assert np.array_equal(ma.vertices, mb.vertices)
            assert np.array_equal(ma.faces, mb.faces)


@pytest.mark.parametrize("flavour,batch", [("standard", 1), ("fast", 1), ("turbo", 1), ("standard", 2), ("mv", 1)])
def test_lam_zero_is_bit_identical_to_stock_call(flavour, batch, hunyuan_root, critic):
    stock, guided = _pipes(flavour, hunyuan_root, critic, lam=0.0)
    if flavour == "mv":
        image = {"front": _image(0), "left": _image(1), "back": _image(2)}
    else:
        image = [_image(s) for s in range(batch)] if batch > 1 else _image(0)
    prompt = ["a thing"] * batch if batch > 1 else "a thing"
    want = stock(image=image, generator=torch.manual_seed(3), output_type="latent", **CALL)
    got = guided(image=image, prompt=prompt, generator=torch.manual_seed(3), output_type="latent", **CALL)
    assert torch.equal(want, got)
    want_mesh = stock(image=image, generator=torch.manual_seed(3), **CALL)
    got_mesh = guided(image=image, prompt=prompt, generator=torch.manual_seed(3), **CALL)
    _assert_same_meshes(want_mesh, got_mesh)


def test_every_stock_keyword_is_accepted_with_stock_defaults():
    import inspect

    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    stock = inspect.signature(Hunyuan3DDiTFlowMatchingPipeline.__call__).parameters
    ours = inspect.signature(GuidedHunyuanPipeline.__call__).parameters
    for name, param in stock.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or name == "self":
            continue
        assert name in ours, name
        assert ours[name].default == param.default, name


def test_guidance_changes_latents_and_records_trace(hunyuan_root, critic):
    _, guided = _pipes("standard", hunyuan_root, critic, lam=0.05)
    base = guided(image=_image(0), prompt="a red box", generator=torch.manual_seed(0),
                  output_type="latent", lam=0.0, **CALL)
    out = guided(image=_image(0), prompt="a red box", generator=torch.manual_seed(0),
                 output_type="latent", return_dict=True, **CALL)
    assert isinstance(out, GuidedOutput)
    assert not torch.equal(base, out.latents)
    assert len(out.trace) == CALL["num_inference_steps"]
    guided_steps = [r for r in out.trace if r.guided]
    # Every step but the schedule's last (sigma 1 -> 1, which does not move z) is guided.
    assert len(guided_steps) == CALL["num_inference_steps"] - 1
    assert out.trace[-1].skipped == ["not scheduled"]
    for rec in guided_steps:
        assert math.isfinite(rec.reward[0]) and rec.grad_norm[0] > 0
        for stage in ("dit", "decode", "render", "critic_forward", "critic_backward",
                      "render_backward", "decode_backward"):
            assert rec.seconds[stage] > 0


def test_guidance_raises_final_reward_for_most_seeds(hunyuan_root, critic):
    _, guided = _pipes("standard", hunyuan_root, critic)  # the default lam (0.02, rms-normalised)
    prompt = "a red box"
    wins, deltas = 0, []
    seeds = range(8)
    for seed in seeds:
        kw = dict(image=_image(seed), prompt=prompt, output_type="latent", **CALL)
        base = guided(generator=torch.manual_seed(seed), lam=0.0, **kw)
        steered = guided(generator=torch.manual_seed(seed), **kw)
        r_base, = guided.reward_of_latents(base, prompt)
        r_steered, = guided.reward_of_latents(steered, prompt)
        deltas.append(r_steered - r_base)
        wins += r_steered > r_base
    print(f"\nguided final reward higher for {wins}/{len(seeds)} seeds; deltas {np.round(deltas, 4).tolist()}")
    assert wins >= 6


def _float64_setup(hunyuan_root, critic_path_root):
    pipe = load_tiny_hunyuan_pipeline("standard", root=hunyuan_root, dtype=torch.float64)
    path = build_tiny_qwen("qwen2_5_vl", root=critic_path_root)
    critic64 = VLMCritic.from_pretrained(path, device="cpu", dtype=torch.float64)
    return pipe, critic64


def _directional_check(f, x, grad, n_dirs=2, steps=(3e-3, 1e-3, 3e-4), tol=0.02, seed=0, verbose=False):
    """Directional derivatives of the reward against central finite differences.

    The chain is piecewise smooth: a marching-cubes topology change or a visibility switch inside
    the stencil makes one step size wrong, and the Qwen model's RMSNorms run in float32 even in a
    float64 model (a ~1e-8 absolute noise floor on the reward), which spoils tiny steps. So each
    direction is checked at three step sizes and the best must agree within ``tol``; directions
    are random but tilted halfway toward the gradient so the signal stands above the noise floor.
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_dirs):
        r = torch.randn(x.shape, generator=g, dtype=x.dtype)
        d = grad / grad.norm() + r / r.norm()
        d /= d.norm()
        analytic = float((grad * d).sum())
        errors = [abs((f(x + e * d) - f(x - e * d)) / (2 * e) - analytic) / abs(analytic) for e in steps]
        if verbose:
            print(analytic, errors)
        assert min(errors) < tol, (analytic, errors)


def test_x0_gradient_matches_finite_differences(hunyuan_root, tmp_path):
    pipe, critic64 = _float64_setup(hunyuan_root, tmp_path)
    cams = orbit_cameras(num_views=2, device="cpu")
    kw = dict(box_v=1.01, mc_level=0.0, grid_resolution=20, render_size=56, shading="clay",
              backend="torch", num_chunks=8000)
    x0 = torch.randn((1, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = reward_and_gradient(x0, pipe.vae, critic64, "a red box", cams, seconds={}, **kw)
    assert res.skipped is None

    def f(x):
        return reward_and_gradient(x, pipe.vae, critic64, "a red box", cams, seconds={},
                                   want_gradient=False, **kw).reward

    _directional_check(f, x0, res.gradient)


def test_full_gradient_matches_finite_differences(hunyuan_root, tmp_path):
    pipe, critic64 = _float64_setup(hunyuan_root, tmp_path)
    guided = GuidedHunyuanPipeline(pipe, critic64, GuidanceConfig(gradient="full", normalize="none", lam=1.0,
                                                                    backend="torch", **{**FAST, "grid_resolution": 20}))
    # One real step's inputs: conditioning of a reference image, the stock sigma schedule.
    with torch.inference_mode():
        cond_inputs = pipe.prepare_image(_image(0))
        cond = pipe.encode_cond(image=cond_inputs.pop("image"), additional_cond_inputs=cond_inputs,
                                do_classifier_free_guidance=True, dual_guidance=False)
    cond = {k: v.clone() for k, v in cond.items()}
    sigma, t = 0.4, torch.tensor(400.0, dtype=torch.float64)
    cams = orbit_cameras(num_views=2, device="cpu")
    kw = dict(box_v=1.01, mc_level=0.0, grid_resolution=20, render_size=56, shading="clay",
              backend="torch", num_chunks=8000)

    def x0_of(z):
        v = guided._velocity(z, t, cond, None, 5.0, True)
        return z + (1 - sigma) * v

    z = torch.randn((1, *pipe.vae.latent_shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zr = z.clone().requires_grad_(True)
    x0 = x0_of(zr)
    res = reward_and_gradient(x0.detach(), pipe.vae, critic64, "a red box", cams, seconds={}, **kw)
    (grad_z,) = torch.autograd.grad(x0, zr, res.gradient)

    def f(zz):
        with torch.no_grad():
            return reward_and_gradient(x0_of(zz), pipe.vae, critic64, "a red box", cams, seconds={},
                                       want_gradient=False, **kw).reward

    # (1) The DiT part exactly: d/de <x0(z + e d), g> = <d, J^T g> for the critic's gradient g.
    #     A smooth functional, so central differences converge (float32 QK-norms inside hy3dgen's
    #     DiT leave a ~1e-6 relative floor).
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        d = torch.randn(z.shape, generator=gen, dtype=z.dtype)
        with torch.no_grad():
            fd = float(((x0_of(z + 1e-3 * d) - x0_of(z - 1e-3 * d)) * res.gradient).sum() / 2e-3)
        assert abs(fd - float((grad_z * d).sum())) <= 1e-4 * abs(fd), (fd, float((grad_z * d).sum()))
    # (2) End to end through the DiT, the surface, the views and the critic. Two float32 noise floors
    #     (the DiT's and the critic's norms) stack here, so the best step agrees within 10 %.
    _directional_check(f, z, grad_z, steps=(1e-3, 3e-4, 1e-4), tol=0.10, verbose=True)
    # The pipeline's "full" mode computes the same gradient as this composition.
    from vlm3d_guidance.guidance import StepRecord

    record = StepRecord(step=0, sigma=sigma, lam=1.0)
    zz = z.clone().requires_grad_(True)
    with torch.enable_grad():
        v = guided._velocity(zz, t, cond, None, 5.0, True)
    update = guided._guidance_update(zz, v, sigma, 1.0, ["a red box"], cams, guided.config, record,
                                     box_v=1.01, mc_level=0.0, num_chunks=8000, full=True)
    assert torch.allclose(update, grad_z.float(), rtol=1e-5, atol=1e-9)


def test_empty_surface_and_nan_reward_are_skipped_and_survived(hunyuan_root, critic):
    _, guided = _pipes("standard", hunyuan_root, critic, lam=0.05)
    # A level no field value reaches: every step has an empty surface; the stock export gives None.
    with pytest.warns(RuntimeWarning, match="empty surface"):
        out = guided(image=_image(0), prompt="a red box", generator=torch.manual_seed(0),
                     return_dict=True, mc_level=1e6, **CALL)
    assert out.meshes == [None]
    assert all(r.skipped == ["empty surface"] for r in out.trace[:-1])
    assert not any(r.guided for r in out.trace)

    # A real fault inside the critic: a NaN in the "Yes" row of its output layer.
    broken = copy.deepcopy(critic.model)
    yes_id = critic.processor.tokenizer.convert_tokens_to_ids("Yes")
    with torch.no_grad():
        broken.get_output_embeddings().weight[yes_id, 0] = float("nan")
    nan_pipe = GuidedHunyuanPipeline(guided.pipeline, VLMCritic(broken, critic.processor), guided.config)
    with pytest.warns(RuntimeWarning, match="non-finite reward"):
        out = nan_pipe(image=_image(0), prompt="a red box", generator=torch.manual_seed(0),
                       return_dict=True, **CALL)
    assert all(r.skipped == ["non-finite reward"] for r in out.trace[:-1])
    assert len(out.warnings) == 1  # warned once, recorded at every step
    assert out.meshes[0] is not None


def test_prompt_none_uses_the_critics_description(hunyuan_root, critic):
    _, guided = _pipes("standard", hunyuan_root, critic, lam=0.05)
    out = guided(image=_image(0), prompt=None, generator=torch.manual_seed(0), return_dict=True,
                 output_type="latent", **{**CALL, "num_inference_steps": 2})
    assert out.described == [True]
    assert isinstance(out.prompts[0], str) and out.prompts[0].strip()


@pytest.mark.parametrize("bad,match", [
    (dict(lam=-1.0), "lam must be >= 0"),
    (dict(gradient="sideways"), "gradient must be one of"),
    (dict(schedule="zigzag"), "schedule must be one of"),
    (dict(start=0.8, end=0.2), "start < end"),
    (dict(every=0), "every must be an integer"),
    (dict(wobble=1), "unknown guidance option"),
])
def test_bad_guidance_options_fail_before_any_work(hunyuan_root, critic, bad, match):
    _, guided = _pipes("standard", hunyuan_root, critic)
    with pytest.raises(ValueError, match=match):
        guided(image=_image(0), prompt="x", **CALL, **bad)


def test_prompt_count_mismatch_is_a_clear_error(hunyuan_root, critic):
    _, guided = _pipes("standard", hunyuan_root, critic)
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        guided(image=_image(0), prompt=["a", "b"], **CALL)


def test_lambda_schedules_and_window():
    n = 11
    const = GuidanceConfig(lam=1.0)
    assert [const.lam_at(i, n) for i in range(n)] == [1.0] * n
    lin = GuidanceConfig(lam=1.0, schedule="linear")
    assert [round(lin.lam_at(i, n), 6) for i in range(n)] == [round(1 - i / 10, 6) for i in range(n)]
    assert lin.lam_at(10, n) == 0.0 and const.lam_at(10, n) == 1.0
    cos = GuidanceConfig(lam=2.0, schedule="cosine")
    assert cos.lam_at(0, n) == 2.0 and abs(cos.lam_at(5, n) - 1.0) < 1e-12
    win = GuidanceConfig(lam=1.0, start=0.2, end=0.6, every=2)
    assert [i for i in range(n) if win.lam_at(i, n) > 0] == [2, 4]


def test_critic_in_another_dtype_than_the_generator(hunyuan_root, tmp_path):
    """A bf16 critic steering a float32 Hunyuan: finite float32 updates, latents stay float32."""
    critic_bf16 = VLMCritic.from_pretrained(build_tiny_qwen("qwen2_5_vl", root=tmp_path), device="cpu",
                                            dtype=torch.bfloat16)
    assert critic_bf16.dtype == torch.bfloat16
    pipe = GuidedHunyuanPipeline(load_tiny_hunyuan_pipeline("standard", root=hunyuan_root), critic_bf16,
                                 GuidanceConfig(**FAST))
    out = pipe(image=_image(0), prompt="a red box", generator=torch.manual_seed(0), output_type="latent",
               return_dict=True, **CALL)
    assert out.latents.dtype == torch.float32 and torch.isfinite(out.latents).all()
    guided = [r for r in out.trace if r.guided]
    assert len(guided) == CALL["num_inference_steps"] - 1
    assert all(math.isfinite(r.grad_norm[0]) and r.grad_norm[0] > 0 for r in guided)
