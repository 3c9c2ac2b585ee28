"""GuidedHunyuanPipeline on the tiny real models: bit-identity with hy3dgen, guidance, gradients, faults."""
import copy
import math

import numpy as np
import pytest
import torch

from vlm3d_guidance import GuidanceConfig, GuidedHunyuanPipeline, GuidedOutput
from vlm3d_guidance.critic import VLMCritic
from vlm3d_guidance.guidance import normalized_update, reward_and_gradient
from vlm3d_guidance.render import orbit_cameras
from vlm3d_guidance.tiny import build_tiny_qwen, load_tiny_hunyuan_pipeline
from images import square_image as _image

# Small but real: every stage runs; views at 56 px (a multiple of 28) keep the critic cheap.
FAST = dict(num_views=2, render_size=56, grid_resolution=24)
CALL = dict(num_inference_steps=6, octree_resolution=24, enable_pbar=False)


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


def test_signature_matches_the_installed_hy3dgen_call():
    """Every parameter of the installed hy3dgen ``__call__``, in its order, with its kind and default;
    ours (prompt, return_dict, config) only keyword-only after them. Read from the installed source,
    so an hy3dgen upgrade that adds or changes a parameter fails here."""
    import inspect

    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    from vlm3d_guidance.pipeline import _STOCK_DEFAULTS

    stock = list(inspect.signature(Hunyuan3DDiTFlowMatchingPipeline.__call__).parameters.values())
    ours = list(inspect.signature(GuidedHunyuanPipeline.__call__).parameters.values())
    named = [p for p in stock if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert len(named) == 15  # self, image, ..., enable_pbar in hy3dgen 2.0.2
    assert [(p.name, p.kind, p.default) for p in ours[:len(named)]] == [(p.name, p.kind, p.default) for p in named]
    extra = ours[len(named):]
    kw_only = inspect.Parameter.KEYWORD_ONLY
    assert [(p.name, p.kind, p.default) for p in extra[:-1]] == [
        ("prompt", kw_only, None), ("return_dict", kw_only, False), ("config", kw_only, None)]
    assert extra[-1].kind == inspect.Parameter.VAR_KEYWORD  # callback, callback_steps, guidance options
    assert any(p.kind == p.VAR_KEYWORD for p in stock)
    # the module's table of stock defaults (named in error messages) agrees too
    assert _STOCK_DEFAULTS == {p.name: p.default for p in named if p.name not in ("self", "image")}


def test_positional_stock_call_means_the_same(hunyuan_root, critic):
    """``pipe(image, steps, timesteps, sigmas, eta, guidance_scale, generator, ...)`` as with hy3dgen."""
    stock, guided = _pipes("standard", hunyuan_root, critic, lam=0.0)
    args = (_image(0), 3, None, None, 0.0, 4.0, None, 1.01, 24, 0.0, None, 8000, "latent", False)
    torch.manual_seed(5)
    want = stock(*args)
    torch.manual_seed(5)
    got = guided(*args, prompt="a thing")
    assert torch.equal(want, got)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        guided(_image(0), "a thing")  # a prompt where hy3dgen has num_inference_steps


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


def test_rewards_of_every_batch_item(hunyuan_root, critic):
    """GuidedOutput.rewards(): one per-step list per batch item (item b's own reward), rewards(b) one of them."""
    _, guided = _pipes("standard", hunyuan_root, critic, lam=0.05)
    out = guided(image=[_image(0), _image(1)], prompt=["a red box", "a tall vase"], generator=torch.manual_seed(0),
                 output_type="latent", return_dict=True, **CALL)
    per_item = out.rewards()
    steps = CALL["num_inference_steps"]
    assert len(per_item) == 2 and all(len(r) == steps for r in per_item)
    for b in range(2):
        assert per_item[b] == [rec.reward[b] if rec.reward else None for rec in out.trace]
        assert all(math.isfinite(r) for r in per_item[b][:-1]) and per_item[b][-1] is None  # last step unguided
    assert per_item[0] != per_item[1]  # two images, two prompts: two different reward traces
    assert out.rewards(0) == per_item[0] and out.rewards(1) == out.rewards(-1) == per_item[1]
    with pytest.raises(IndexError, match="item 2 is out of range for a batch of 2"):
        out.rewards(2)


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
    guided = GuidedHunyuanPipeline(pipe, critic64, GuidanceConfig(gradient="full", normalize="none", lam=1.0, fill=None,
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
    assert out.prompts[0] == critic.describe(_image(0))  # the critic's own (greedy) description, RGBA seen on white
    assert out.trace[0].guided and math.isfinite(out.trace[0].reward[0])  # and guidance ran with it


@pytest.mark.parametrize("bad,match", [
    (dict(lam=-1.0), "lam must be >= 0"),
    (dict(lam=float("nan")), "lam must be a finite number"),
    (dict(lam="0.1"), "lam must be a finite number"),
    (dict(gradient="sideways"), "gradient must be one of 'x0', 'full'"),
    (dict(schedule="zigzag"), "schedule must be one of 'constant', 'linear', 'cosine'"),
    (dict(normalize="l2"), "normalize must be one of 'none', 'rms'"),
    (dict(volume="shrink"), "volume must be one of 'free', 'keep', 'no_growth'"),
    (dict(volume_start=1.5), r"volume_start is a fraction of the steps, in \[0, 1\]"),
    (dict(clip=0.0), "clip must be > 0"),
    (dict(start=0.8, end=0.2), "start < end"),
    (dict(every=0), "every must be a positive integer"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a positive integer"),
    (dict(callback=lambda *a: None, callback_steps=0), "callback_steps must be a positive integer"),
    (dict(callback="print"), "callback must be callable"),
    (dict(image=None), "image is required"),
    (dict(prompt=["a", "b"]), "2 prompts for 1 images"),
    (dict(prompt="  "), "prompt must be a non-empty string or None"),
    (dict(prompt="chair " * 25000), r"the prompt is \d+ tokens .* longer than the model's context of 4096"),
    (dict(wobble=1), r"unknown keyword argument\(s\) \['wobble'\].*'num_inference_steps'.*'lam'"),
])
def test_bad_arguments_fail_before_any_model_runs(hunyuan_root, critic, bad, match):
    _, guided = _pipes("standard", hunyuan_root, critic)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: calls.append(type(mod).__name__))
             for m in (guided.pipeline.conditioner, guided.pipeline.model, guided.pipeline.vae, critic.model)]
    try:
        with pytest.raises(ValueError, match=match):
            guided(**{"image": _image(0), "prompt": "x", **CALL, **bad})
    finally:
        for h in hooks:
            h.remove()
    assert calls == []  # rejected before the image encoder, the DiT, the VAE or the critic ran


def test_volume_mode_per_step():
    n = 25  # the toy's step count: progress i / 24
    late = GuidanceConfig(volume="keep", volume_start=0.5)
    assert [late.volume_at(i, n) for i in range(n)] == ["free"] * 12 + ["keep"] * 13
    assert {GuidanceConfig(volume="no_growth").volume_at(i, n) for i in range(n)} == {"no_growth"}
    assert {GuidanceConfig(volume_start=0.5).volume_at(i, n) for i in range(n)} == {"free"}
    assert GuidanceConfig(volume="keep", volume_start=1.0).volume_at(n - 1, n) == "keep"


def test_lambda_schedules_and_window():
    n = 11  # progress i / 10
    const = GuidanceConfig(lam=1.0)
    assert [const.lam_at(i, n) for i in range(n)] == [1.0] * n
    lin = GuidanceConfig(lam=1.0, schedule="linear")
    assert [lin.lam_at(i, n) for i in range(n)] == pytest.approx([1 - i / 10 for i in range(n)], abs=1e-12)
    cos = GuidanceConfig(lam=2.0, schedule="cosine")
    assert [cos.lam_at(i, n) for i in range(n)] == pytest.approx(
        [1.0 + math.cos(math.pi * i / 10) for i in range(n)], abs=1e-12)
    assert cos.lam_at(5, n) == pytest.approx(1.0, abs=1e-12) and cos.lam_at(10, n) == pytest.approx(0.0, abs=1e-12)
    # window [0.2, 0.6): steps 2..5; every=2 counts from the window's first step
    win = GuidanceConfig(lam=1.0, start=0.2, end=0.6, every=2)
    assert [i for i in range(n) if win.lam_at(i, n) > 0] == [2, 4]
    assert [i for i in range(n) if GuidanceConfig(lam=1.0, start=0.2, end=0.6).lam_at(i, n) > 0] == [2, 3, 4, 5]
    assert [i for i in range(n) if GuidanceConfig(lam=1.0, every=3).lam_at(i, n) > 0] == [0, 3, 6, 9]
    assert [i for i in range(n) if GuidanceConfig(lam=1.0, start=0.25, every=3).lam_at(i, n) > 0] == [3, 6, 9]
    # the decays run over the window, not the whole run: linear 1 - (p - start) / (end - start)
    lw = GuidanceConfig(lam=1.0, schedule="linear", start=0.2, end=0.6)
    assert [lw.lam_at(i, n) for i in range(n)] == pytest.approx([0, 0, 1.0, 0.75, 0.5, 0.25, 0, 0, 0, 0, 0], abs=1e-12)
    cw = GuidanceConfig(lam=1.0, schedule="cosine", start=0.5, end=1.0)
    assert [cw.lam_at(i, n) for i in range(5, n)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(6)], abs=1e-12)
    # lam 0, or a run of a single step, never guides
    assert GuidanceConfig(lam=0.0).lam_at(0, n) == 0.0 and const.lam_at(0, 1) == 0.0


def test_normalized_update_none_rms_and_clip():
    g = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(0)) * 3e-4

    def rms(x):
        return float(x.pow(2).mean().sqrt())

    # "none": the raw gradient times lambda
    assert torch.equal(normalized_update(g, 0.5, "none", None), 0.5 * g)
    # "rms": the update's RMS is lambda, its direction the gradient's
    u = normalized_update(g, 0.02, "rms", None)
    assert rms(u) == pytest.approx(0.02, rel=1e-6)
    assert torch.allclose(u, g * (0.02 / rms(g)), rtol=1e-5, atol=0)
    # clip caps the RMS of the update (not of the gradient) and leaves smaller updates alone
    assert rms(normalized_update(g, 0.02, "rms", 0.005)) == pytest.approx(0.005, rel=1e-6)
    assert torch.equal(normalized_update(g, 0.02, "rms", 0.05), u)
    clipped = normalized_update(g, 100.0, "none", 1e-3)
    assert rms(clipped) == pytest.approx(1e-3, rel=1e-6)
    assert torch.allclose(clipped / rms(clipped), g / rms(g), rtol=1e-5, atol=0)
    # a zero gradient stays zero (no division by zero)
    assert torch.equal(normalized_update(torch.zeros(1, 4, 2), 0.02, "rms", None), torch.zeros(1, 4, 2))


@pytest.mark.parametrize("options,check", [
    (dict(lam=0.05), "rms"),
    (dict(lam=0.05, clip=0.01), "clip"),
    (dict(lam=10.0, normalize="none"), "none"),
    (dict(lam=0.05, gradient="full"), "rms"),
])
def test_one_guided_step_moves_the_latent_by_the_normalised_update(hunyuan_root, critic, options, check):
    """Two steps: sigma 0 -> 1 (guided) then 1 -> 1 (never guided, does not move z). The final
    latent minus the unguided one is therefore exactly the first step's update."""
    _, guided = _pipes("standard", hunyuan_root, critic)
    kw = dict(image=_image(0), prompt="a red box", output_type="latent", **{**CALL, "num_inference_steps": 2})
    base = guided(generator=torch.manual_seed(0), lam=0.0, **kw)
    out = guided(generator=torch.manual_seed(0), return_dict=True, **kw, **options)
    first, last = out.trace
    assert (first.sigma, last.sigma) == (0.0, 1.0)
    assert (first.lam, last.lam) == (options["lam"], 0.0)
    assert (first.guided, first.skipped, last.guided, last.skipped) == (True, [None], False, ["not scheduled"])
    assert math.isfinite(first.reward[0]) and first.grad_norm[0] > 0 and last.reward == []
    diff = (out.latents - base).double()
    rms = float(diff.pow(2).mean().sqrt())
    if check == "rms":
        assert rms == pytest.approx(options["lam"], rel=1e-4)
    elif check == "clip":
        assert rms == pytest.approx(options["clip"], rel=1e-4)
    else:
        assert float(diff.norm()) == pytest.approx(options["lam"] * first.grad_norm[0], rel=1e-3)
    stages = {"dit", "decode", "render", "critic_forward", "critic_backward", "render_backward",
              "decode_backward", "step"} | ({"dit_backward"} if options.get("gradient") == "full" else set())
    assert set(first.seconds) == stages and all(v > 0 for v in first.seconds.values())


def test_rotate_views_turns_the_orbit_by_the_golden_ratio_sequence(hunyuan_root, critic):
    """rotate_views: step i's critic sees the orbit turned by frac(i * 0.618...) * 360 / num_views
    degrees. Only step 2 is guided here (window [0.4, 0.6) of 6 steps), so its clean estimate is the
    stock sampler's, and the recorded reward must be that estimate's reward through turned cameras."""
    from vlm3d_guidance.toy.critic_training import recorded_estimates

    cfg = GuidanceConfig(**FAST, rotate_views=True)
    golden = (5 ** 0.5 - 1) / 2
    assert cfg.azimuth_offset(0) == 0.0 and GuidanceConfig(**FAST).azimuth_offset(7) == 0.0
    assert cfg.azimuth_offset(2) == pytest.approx((2 * golden % 1.0) * 180.0, abs=1e-9)  # 2 views: 180 apart
    offsets = [cfg.azimuth_offset(i) for i in range(50)]
    assert min(offsets) >= 0.0 and max(offsets) < 180.0 and len({round(o, 6) for o in offsets}) == 50
    with pytest.raises(ValueError, match="rotate_views"):
        GuidanceConfig(rotate_views=1)

    stock, guided = _pipes("standard", hunyuan_root, critic, rotate_views=True, start=0.4, end=0.6)
    kw = dict(image=_image(0), output_type="latent", **CALL)
    with recorded_estimates(stock) as estimates:
        stock(generator=torch.manual_seed(0), **kw)
    out = guided(generator=torch.manual_seed(0), prompt="a red box", return_dict=True, **kw)
    assert [rec.guided for rec in out.trace] == [False, False, True, False, False, False]
    sigma, x0 = estimates[2]
    rewards = {}
    for turn in (cfg.azimuth_offset(2), 0.0):
        rewards[turn] = reward_and_gradient(
            x0.clone(), guided.pipeline.vae, critic, "a red box", cfg.cameras(1.01, azimuth_offset=turn),
            box_v=1.01, mc_level=0.0, grid_resolution=cfg.grid_resolution, render_size=cfg.render_size,
            shading=cfg.shading, backend=cfg.backend, num_chunks=8000, seconds={}, want_gradient=False,
            coarse_to_fine=cfg.coarse_to_fine, fill=cfg.fill, export_resolution=CALL["octree_resolution"]).reward
    assert out.trace[2].reward[0] == pytest.approx(rewards[cfg.azimuth_offset(2)], abs=1e-6)
    assert abs(rewards[cfg.azimuth_offset(2)] - rewards[0.0]) > 1e-6  # the turn is visible to the critic


def test_callback_sees_every_kth_step_and_the_guided_latent(hunyuan_root, critic):
    _, guided = _pipes("standard", hunyuan_root, critic, lam=0.05)
    kw = dict(image=_image(0), prompt="a red box", output_type="latent", **{**CALL, "num_inference_steps": 4})
    seen = []
    out = guided(generator=torch.manual_seed(0), return_dict=True,
                 callback=lambda i, t, o: seen.append((i, o.prev_sample.clone())), **kw)
    assert [i for i, _ in seen] == [0, 1, 2, 3]  # no callback_steps: every step
    assert torch.equal(seen[-1][1], out.latents)  # the guided latent the loop went on with
    unguided = []
    guided(generator=torch.manual_seed(0), lam=0.0, callback=lambda i, t, o: unguided.append(o.prev_sample.clone()),
           **kw)
    # after step 0 the two runs differ by exactly the first update (RMS lam = 0.05)
    assert float((seen[0][1] - unguided[0]).double().pow(2).mean().sqrt()) == pytest.approx(0.05, rel=1e-4)
    seen.clear()
    guided(generator=torch.manual_seed(0), callback=lambda i, t, o: seen.append((i, None)), callback_steps=2, **kw)
    assert [i for i, _ in seen] == [0, 2]


def _module_modes(model):
    return [m.training for m in model.modules()]


def test_full_mode_runs_the_dit_in_train_mode_and_restores_each_module(hunyuan_root, critic):
    _, guided = _pipes("standard", hunyuan_root, critic, lam=0.05, gradient="full")
    dit = guided.pipeline.model
    seen = []
    hook = dit.register_forward_pre_hook(lambda mod, args: seen.append((mod.training, torch.is_grad_enabled())))
    kw = dict(image=_image(0), prompt="a red box", output_type="latent", **{**CALL, "num_inference_steps": 3})
    try:
        dit.eval()
        next(iter(dit.children())).train()  # a mixed state must come back as it was
        before = _module_modes(dit)
        from_eval = guided(generator=torch.manual_seed(0), **kw)
        # two guided steps through the DiT in train mode with a graph, then the unguided last step as stock
        assert seen == [(True, True), (True, True), (False, False)]
        assert _module_modes(dit) == before
        dit.train()
        seen.clear()
        from_train = guided(generator=torch.manual_seed(0), **kw)
        assert seen == [(True, True), (True, True), (True, False)]
        assert all(_module_modes(dit))
        # hy3dgen 2.0's DiT has no mode-dependent layer: the starting mode changes nothing
        assert torch.equal(from_eval, from_train)
        # recomputing the blocks in backward (inside the train-mode window) gives the same result
        dit.eval()
        checkpointed = guided(generator=torch.manual_seed(0), dit_checkpointing=True, **kw)
        assert torch.allclose(checkpointed, from_eval, rtol=0, atol=1e-6)
        assert not any(_module_modes(dit))
        assert all("forward" not in vars(m) for m in dit.modules())  # patched forwards are removed
        # x0 mode and lam=0 never switch modes
        seen.clear()
        guided(generator=torch.manual_seed(0), gradient="x0", **kw)
        guided(generator=torch.manual_seed(0), lam=0.0, **kw)
        assert [mode for mode, _ in seen] == [False] * 6
    finally:
        hook.remove()
        dit.train()  # as hy3dgen's loader leaves it


class _AuxGradient(torch.autograd.Function):
    """The load-balancing trick of MoE layers: forward passes ``x`` through; backward also sends a
    gradient of 1 into the auxiliary loss, so that its gradient joins every backward pass."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.aux_needs_grad = aux.requires_grad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, (torch.ones((), dtype=grad.dtype) if ctx.aux_needs_grad else None)


class MoEGate(torch.nn.Module):
    """A gate with a load-balancing loss in train mode (named like hy3dshape's)."""

    def forward(self, h):
        scores = h.softmax(-1)
        aux = (scores.mean(0) ** 2).sum() if self.training else None
        return scores.argmax(-1), scores, aux


class _ToyMoE(torch.nn.Module):
    """Eval path without gradient, train path with the aux trick: the structure of a 2.1 MoE block."""

    def __init__(self):
        super().__init__()
        self.gate = MoEGate()

    def forward(self, h):
        _, scores, aux = self.gate(h)
        if not self.training:
            with torch.no_grad():
                return h * scores
        return _AuxGradient.apply(h * scores, aux)


def test_full_mode_train_switch_is_exact_for_moe_blocks():
    """What the switch must do for Hunyuan3D 2.1, on a toy MoE block of the same structure: eval has
    no gradient, train alone adds the aux loss's gradient (hy3dshape's real MoE DiT: test_hunyuan21.py)."""
    from vlm3d_guidance.surgery import _dit_train_mode

    h = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hr = h.clone().requires_grad_()
    (expected,) = torch.autograd.grad(hr * hr.softmax(-1), hr, g)  # d <h * softmax(h), g> / dh

    moe = _ToyMoE().eval()
    assert not moe(hr).requires_grad  # eval mode: no gradient at all
    moe.train()
    (naive,) = torch.autograd.grad(moe(hr), hr, g)  # train mode alone: polluted by the aux loss
    assert float((naive - expected).abs().max()) > 1e-3
    moe.eval()
    with _dit_train_mode(moe, True):
        assert moe.training and moe.gate.training
        (exact,) = torch.autograd.grad(moe(hr), hr, g)
    assert torch.allclose(exact, expected, rtol=1e-12, atol=1e-15)
    assert not moe.training and not moe.gate.training and "forward" not in vars(moe.gate)


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


def test_coarse_to_fine_guidance_equals_dense(hunyuan_root, critic):
    """coarse_to_fine decodes fewer grid points but finds the same meshes here, so the guided run is
    bit-identical to the dense one; an odd grid is refused up front."""
    _, guided = _pipes("standard", hunyuan_root, critic)
    kw = dict(image=_image(0), prompt="a red box", output_type="latent", return_dict=True, **CALL)
    dense = guided(generator=torch.manual_seed(0), **kw)
    c2f = guided(generator=torch.manual_seed(0), coarse_to_fine=True, **kw)
    assert sum(r.guided for r in c2f.trace) == CALL["num_inference_steps"] - 1
    assert [r.reward for r in c2f.trace] == [r.reward for r in dense.trace]
    assert torch.equal(c2f.latents, dense.latents)
    with pytest.raises(ValueError, match="even grid_resolution"):
        guided(generator=torch.manual_seed(0), coarse_to_fine=True, grid_resolution=25, **kw)
