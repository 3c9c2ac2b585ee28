"""vlm3d-guide end to end on the tiny models (as a subprocess), and one test per user mistake."""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from vlm3d_guidance import GuidanceConfig
from vlm3d_guidance.cli import DEFAULTS, TINY_NOTICE, main

SCRIPT = Path(sys.executable).with_name("vlm3d-guide")
REPO = Path(__file__).resolve().parents[1]
INTERRUPTED = "vlm3d-guide: interrupted; files already written are complete (none is half-written)"
TINY_STEPS, SHEET, VIEWS = 8, 128, 4  # the --tiny defaults


@pytest.fixture(scope="session")
def tiny_cache(tiny_root):
    """Tiny models built once, before any CLI process starts (they would otherwise race to build)."""
    from vlm3d_guidance.tiny import build_tiny_hunyuan, build_tiny_qwen

    build_tiny_hunyuan("standard", root=tiny_root / "hunyuan")
    build_tiny_qwen("qwen2_5_vl", root=tiny_root)
    return tiny_root


@pytest.fixture(scope="session")
def cli_env(tiny_cache):
    env = dict(os.environ, VLM3D_TINY_CACHE=str(tiny_cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def _write_ref(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[12:52, 18:46, :3] = rng.integers(30, 230, 3)
    rgba[12:52, 18:46, 3] = 255
    Image.fromarray(rgba).save(path)
    return path


@pytest.fixture
def ref(tmp_path):
    return _write_ref(tmp_path / "ref.png")


def run_cli(args, env, cwd=None, extra_env=None):
    return subprocess.run([str(SCRIPT), *map(str, args)], env={**env, **(extra_env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def spawn_cli(args, env, extra_env=None):
    return subprocess.Popen([str(SCRIPT), *map(str, args)], env={**env, **(extra_env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_mesh(path: Path) -> trimesh.Trimesh:
    mesh = trimesh.load(path, force="mesh")
    assert isinstance(mesh, trimesh.Trimesh)
    assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
    assert np.abs(mesh.vertices).max() <= 1.02  # Hunyuan's box [-1.01, 1.01]^3
    return mesh


def _check_run_folder(out: Path, fmt="glb", compare=False, steps=TINY_STEPS) -> dict:
    """Every output file of one run: present, complete, readable, consistent."""
    names = {f"mesh.{fmt}", "views.png", "trace.json", "trace.png", "config.json"} | (
        {f"baseline.{fmt}"} if compare else set())
    assert {p.name for p in out.iterdir()} == names  # no temporary or extra files
    _check_mesh(out / f"mesh.{fmt}")
    if compare:
        _check_mesh(out / f"baseline.{fmt}")
    with Image.open(out / "views.png") as sheet:
        assert sheet.size == (VIEWS * SHEET, (2 if compare else 1) * SHEET)
        arr = np.asarray(sheet.convert("RGB"), dtype=np.float32)
    for row in range(2 if compare else 1):  # each row shows a shape (not only background)
        tiles = arr[row * SHEET:(row + 1) * SHEET, :, :]
        assert (tiles < 200).mean() > 0.02
    with Image.open(out / "trace.png") as plot:
        assert plot.size[0] > 100 and plot.size[1] > 100
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["records"]) == steps
    assert [r["step"] for r in trace["records"]] == list(range(steps))
    for rec in trace["records"]:
        assert {"sigma", "lam", "reward", "grad_norm", "guided", "skipped", "seconds"} <= set(rec)
    assert any(r["guided"] for r in trace["records"])
    assert isinstance(trace["final_reward"]["guided"], float)
    config = json.loads((out / "config.json").read_text())
    assert json.loads(json.dumps(config)) == config
    assert set(config["settings"]) == set(DEFAULTS)
    assert GuidanceConfig(**config["guidance"]).to_dict() == config["guidance"]
    assert config["settings"]["views"] == config["guidance"]["num_views"] == VIEWS
    assert config["tiny"] is True and config["critic_model"] and config["prompt"]
    assert "meaningless" in config["notice"]  # said in the outputs too, also under --quiet
    assert set(config["outputs"]) == names
    assert trace["prompt"] == config["prompt"]
    return config


# ------------------------------------------------------------------------------------ runs


def _readme_tiny_command(must_have: str) -> list:
    """The first ``vlm3d-guide --tiny ...`` command in README.md with ``must_have``, as argv (no comment)."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("vlm3d-guide --tiny") and must_have in line:
            return shlex.split(line, comments=True)[1:]
    raise AssertionError(f"README.md has no 'vlm3d-guide --tiny ... {must_have}' command")


def test_single_run_with_described_prompt(tmp_path, cli_env):
    """The README's first command: --tiny with no image uses a built-in picture."""
    out = tmp_path / "out"
    assert _readme_tiny_command("a built-in picture") == ["--tiny", "-o", "out/"]
    res = run_cli(["--tiny", "-o", out, "--quiet"], cli_env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""  # --quiet: nothing but errors
    config = _check_run_folder(out)
    assert config["prompt_described"] is True and config["image"] == "builtin:demo"
    assert config["settings"]["steps"] == TINY_STEPS and config["settings"]["compare"] is False


def test_compare_then_eval_then_repeat_from_config(tmp_path, cli_env, capsys, monkeypatch):
    """The README's main --tiny command (run from a folder holding its examples/ref.png), plus options."""
    monkeypatch.setenv("VLM3D_TINY_CACHE", cli_env["VLM3D_TINY_CACHE"])  # in-process runs below
    readme = _readme_tiny_command("--compare")
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "examples" / "ref.png", tmp_path / "examples" / "ref.png")
    out_arg = readme[readme.index("-o") + 1]
    prompt = readme[readme.index("--prompt") + 1]
    out = tmp_path / out_arg
    env = {k: v for k, v in cli_env.items() if k != "TQDM_DISABLE"}  # the progress bar is checked here
    res = run_cli([*readme, "--seed", "3", "--format", "obj", "--lam", "0.5"], env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0] == TINY_NOTICE and "Traceback" not in res.stderr
    config = _check_run_folder(out, fmt="obj", compare=True)
    assert config["prompt"] == prompt and config["seed"] == 3 and config["prompt_described"] is False
    assert set(config["final_reward"]) == {"guided", "baseline"}
    # the bar over the sampling steps shows the current reward: at its end, the last guided step's
    records = json.loads((out / "trace.json").read_text())["records"]
    last = [r["reward"][0] for r in records if r["reward"] and r["reward"][0] is not None][-1]
    shown = re.findall(r"Guided sampling: 100%.*? 8/8 \[.*?reward=([+-]\d+\.\d{3})\]", res.stderr)
    assert shown and shown[-1] == f"{last:+.3f}", res.stderr[-2000:]
    g, b = config["final_reward"]["guided"], config["final_reward"]["baseline"]
    assert res.stdout.splitlines() == [
        f"final critic reward (exported mesh): guided {g:+.3f}, baseline {b:+.3f}  (prompt: {prompt!r})",
        *[f"wrote {Path(out_arg) / name}" for name in config["outputs"]]]
    base = trimesh.load(out / "baseline.obj", force="mesh")
    guided = trimesh.load(out / "mesh.obj", force="mesh")
    assert not (base.vertices.shape == guided.vertices.shape and np.allclose(base.vertices, guided.vertices))

    # eval on the --compare folder (in-process: the same main() the console script calls)
    assert main(["eval", str(out), "--tiny", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["baseline"] and report["metrics"]["guided"] and report["chamfer"] is not None
    assert set(report["rewards"]["guided"]) == {"dual", "content", "geometry"}
    assert "| metric |" in (out / "report.md").read_text()
    with Image.open(out / "report.png") as img:
        assert img.size[0] > 100
    capsys.readouterr()
    assert main(["eval", str(out), "--tiny", "--quiet"]) == 2  # the report exists: --overwrite needed
    assert "--overwrite" in capsys.readouterr().err

    # the config.json repeats the run: same settings -> bit-identical mesh
    again = tmp_path / "again"
    assert main(["--config", str(out / "config.json"), "-o", str(again), "--quiet"]) == 0
    repeat = json.loads((again / "config.json").read_text())
    assert repeat["settings"] == config["settings"] and repeat["prompt"] == config["prompt"]
    assert (again / "mesh.obj").read_bytes() == (out / "mesh.obj").read_bytes()
    assert (again / "baseline.obj").read_bytes() == (out / "baseline.obj").read_bytes()

    # --overwrite replaces the outputs and removes those the new run does not make
    assert main(["--config", str(out / "config.json"), "--no-compare", "--format", "ply", "-o", str(again),
                 "--overwrite", "--quiet"]) == 0
    assert {p.name for p in again.iterdir()} == {"mesh.ply", "views.png", "trace.json", "trace.png", "config.json"}


def test_batch_folder_records_failure_and_resumes(tmp_path, cli_env, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    _write_ref(inputs / "alpha.png", 1)
    _write_ref(inputs / "beta.png", 2)
    (inputs / "broken.png").write_bytes(b"not a picture")
    (inputs / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    args = ["batch", inputs, "-o", out, "--tiny", "--prompt", "a block", "--steps", "4"]
    res = run_cli(args, cli_env)
    assert res.returncode == 1, res.stderr  # one job failed ...
    assert "job broken failed" in res.stderr and "Traceback" not in res.stderr
    for name in ("alpha", "beta"):  # ... and the others carried on
        _check_run_folder(out / name, steps=4)
    assert "cannot read image" in (out / "broken" / "error.txt").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 2, "failed": 1, "pending": 0}
    assert {j["name"]: j["status"] for j in summary["jobs"]} == {"alpha": "done", "beta": "done", "broken": "failed"}
    assert "| alpha | done |" in (out / "summary.md").read_text()
    assert "alpha" in res.stdout and "done" in res.stdout  # the table at the end

    # rerun: finished jobs are skipped (their files untouched), the failed one is tried again
    (inputs / "broken.png").unlink()
    _write_ref(inputs / "broken.png", 3)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "alpha").iterdir()}
    monkeypatch.setenv("VLM3D_TINY_CACHE", cli_env["VLM3D_TINY_CACHE"])
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0  # in-process: the console script's main()
    res = capsys.readouterr()
    assert "2 already done, 1 to run" in res.err
    assert {p: p.stat().st_mtime_ns for p in (out / "alpha").iterdir()} == stamps
    _check_run_folder(out / "broken", steps=4)
    assert not (out / "broken" / "error.txt").exists()
    assert json.loads((out / "summary.json").read_text())["counts"] == {"done": 3, "failed": 0, "pending": 0}
    assert "skipped" in res.out


def test_batch_sharded_over_two_processes(tmp_path, cli_env):
    images = [_write_ref(tmp_path / f"img{i}.png", i) for i in range(2)]
    jobs = [dict(image=images[i % 2].name, prompt=f"object {i}", seed=i, name=f"job{i}") for i in range(4)]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("# image, prompt, seed per line\n" + "\n".join(json.dumps(j) for j in jobs) + "\n")
    out = tmp_path / "out"
    args = ["batch", manifest, "-o", out, "--tiny", "--steps", "3", "--format", "stl", "--quiet"]
    procs = [spawn_cli(args, cli_env, dict(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert err == ""  # --quiet
    ran = {}
    for rank in range(2):
        part = json.loads((out / f"summary.rank{rank}-of-2.json").read_text())
        for job in part["jobs"]:
            assert job["status"] == "done"
            assert job["name"] not in ran  # every job exactly once
            ran[job["name"]] = rank
    assert ran == {f"job{i}": i % 2 for i in range(4)}
    for i in range(4):
        config = _check_run_folder(out / f"job{i}", fmt="stl", steps=3)
        assert (config["rank"], config["world_size"]) == (i % 2, 2)
        assert (config["prompt"], config["seed"]) == (f"object {i}", i)
    assert json.loads((out / "summary.json").read_text())["counts"] == {"done": 4, "failed": 0, "pending": 0}


def test_ctrl_c_mid_run_exits_130_and_writes_nothing(tmp_path, ref, cli_env):
    out, log = tmp_path / "out", tmp_path / "stderr.log"
    env = {k: v for k, v in cli_env.items() if k != "TQDM_DISABLE"}  # the bar tells when sampling runs
    with open(log, "wb") as err:
        # a run started from a background shell inherits SIGINT as ignored (Python then installs no
        # KeyboardInterrupt handler and Ctrl-C does nothing): give the child the terminal's default
        proc = subprocess.Popen([str(SCRIPT), "--tiny", "--image", str(ref), "--prompt", "a box", "--steps", "400",
                                 "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while b"reward=" not in log.read_bytes():  # sampling (400 steps, ~40 s) has begun
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    text = log.read_text()
    assert proc.returncode == 130 and stdout == b""
    assert re.split(r"[\r\n]+", text.strip())[-1] == INTERRUPTED and "Traceback" not in text
    assert re.search(r"Guided sampling: +\d+%.*?\d+/400 .*?reward=[+-]\d+\.\d{3}\]", text)
    assert not out.exists()  # interrupted before writing: nothing, not a half-written mesh


def test_empty_final_surface_is_one_line_and_writes_nothing(tmp_path, ref, tiny_cache, monkeypatch, capsys):
    """Every step has an empty surface (a level no field reaches): sampling goes on unguided, then the run
    fails in one line (hy3dgen's own traceback for the empty export is kept off the terminal)."""
    monkeypatch.setenv("VLM3D_TINY_CACHE", str(tiny_cache))
    out = tmp_path / "out"
    code = main(["--tiny", "--image", str(ref), "--mc-level", "1e6", "--steps", "2", "-o", str(out), "--quiet"])
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        "vlm3d-guide: error: the guided sample has no surface at the iso-level (empty mesh); try another --seed, "
        "a lower --lam, or --mc-level"]
    assert not out.exists()


def test_nan_steps_survived_and_interrupted_overwrite(tmp_path, ref, tiny_cache, monkeypatch, capsys):
    """Real faults, no stand-in models: Ctrl-C while a second run writes into a finished run's folder leaves
    complete files and no config.json vouching for them; a NaN inside the critic's weights makes every
    guided step non-finite: the run goes on unguided, warns once and records every step."""
    import torch

    from vlm3d_guidance import cli, outputs

    monkeypatch.setenv("VLM3D_TINY_CACHE", str(tiny_cache))
    s = cli.resolve_settings(cli.build_parser().parse_args(["--tiny", "--steps", "3"]))
    cli.check_settings(s)
    devices = cli.resolve_devices(s)
    pipe = cli.load_pipeline(s, devices, quiet=True)

    def run(seed, out):
        return cli.run_job(pipe, s, devices, ref, "a box", seed, out, quiet=False, command=["test"])

    out = tmp_path / "out"
    run(0, out)
    old_mesh = (out / "mesh.glb").read_bytes()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C after mesh, views and trace.json, while the plot is drawn
        m.setattr(outputs, "trace_figure", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            run(1, out)
    assert sorted(p.name for p in out.iterdir()) == ["mesh.glb", "trace.json", "trace.png", "views.png"]
    new_mesh = _check_mesh(out / "mesh.glb")  # the new mesh, complete
    assert (out / "mesh.glb").read_bytes() != old_mesh and len(new_mesh.faces) > 0
    assert json.loads((out / "trace.json").read_text())["seed"] == 1
    with pytest.raises(cli.UsageError, match=r"mesh.glb already exists \(an earlier run that did not finish\)"):
        cli.check_output(out, overwrite=False)

    yes = pipe.critic.processor.tokenizer.convert_tokens_to_ids("Yes")
    with torch.no_grad():
        pipe.critic.model.get_output_embeddings().weight[yes, 0] = float("nan")
    capsys.readouterr()
    nan_out = tmp_path / "nan"
    config = run(0, nan_out)
    warned = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(warned) == 1 and "skipped at step 0 (non-finite reward)" in warned[0]
    assert config["final_reward"] == {"guided": None} and len(config["warnings"]) == 1
    strict = dict(parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    config = json.loads((nan_out / "config.json").read_text(), **strict)
    trace = json.loads((nan_out / "trace.json").read_text(), **strict)
    assert [r["skipped"] for r in trace["records"]] == [["non-finite reward"]] * 2 + [["not scheduled"]]
    assert [r["reward"] for r in trace["records"]] == [[None], [None], []]
    assert not any(r["guided"] for r in trace["records"])
    _check_mesh(nan_out / "mesh.glb")
    assert config["outputs"] == ["mesh.glb", "views.png", "trace.json", "trace.png", "config.json"]


# ------------------------------------------------------------------------------------ user mistakes


def _snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*")}


def _assert_one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vlm3d-guide: error: ") and ";" in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def _broken(tmp_path):
    p = tmp_path / "broken.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    return p


MISTAKES = {
    "missing image": (lambda t, r: ["--tiny", "--image", t / "nope.png", "-o", t / "out"], "image not found"),
    "unreadable image": (lambda t, r: ["--tiny", "--image", _broken(t), "-o", t / "out"], "cannot read image"),
    "folder as image": (lambda t, r: ["--tiny", "--image", t, "-o", t / "out"], "not a file"),
    "no image": (lambda t, r: ["-o", t / "out"], "--image is required"),
    "no output": (lambda t, r: ["--tiny", "--image", r], "-o OUT is required"),
    "empty prompt": (lambda t, r: ["--tiny", "--image", r, "--prompt", " ", "-o", t / "out"], "--prompt is empty"),
    "prompt too long for the critic": (lambda t, r: ["--tiny", "--image", r, "--prompt", "chair " * 25000, "-o",
                                                     t / "out"], "longer than the model's context of 4096"),
    "negative lambda": (lambda t, r: ["--tiny", "--image", r, "--lam", "-1", "-o", t / "out"], "--lam"),
    "steps not a number": (lambda t, r: ["--tiny", "--image", r, "--steps", "many", "-o", t / "out"], "--steps"),
    "zero steps": (lambda t, r: ["--tiny", "--image", r, "--steps", "0", "-o", t / "out"], "--steps"),
    "bad schedule": (lambda t, r: ["--tiny", "--image", r, "--schedule", "zigzag", "-o", t / "out"], "--schedule"),
    "bad window": (lambda t, r: ["--tiny", "--image", r, "--start", "0.9", "--end", "0.1", "-o", t / "out"], "start"),
    "odd grid for coarse-to-fine": (lambda t, r: ["--tiny", "--image", r, "--coarse-to-fine", "--grid-resolution",
                                                   "33", "-o", t / "out"], "even grid_resolution"),
    "bad render size": (lambda t, r: ["--tiny", "--image", r, "--render-size", "10", "-o", t / "out"], "render_size"),
    "views that would not fit": (lambda t, r: ["--tiny", "--image", r, "--views", "65", "-o", t / "out"],
                                 "--views 65 is too large (at most 64"),
    "bad format": (lambda t, r: ["--tiny", "--image", r, "--format", "fbx", "-o", t / "out"], "--format"),
    "bad dtype": (lambda t, r: ["--tiny", "--image", r, "--dtype", "int8", "-o", t / "out"], "--dtype"),
    "bad device": (lambda t, r: ["--tiny", "--image", r, "--device", "gpu7", "-o", t / "out"], "--device"),
    "unknown option": (lambda t, r: ["--tiny", "--image", r, "--lamda", "1", "-o", t / "out"], "unrecognized"),
    "tiny with a model": (lambda t, r: ["--tiny", "--model-path", "x/y", "--image", r, "-o", t / "out"], "--tiny"),
    "missing model folder": (lambda t, r: ["--image", r, "--model-path", t / "no_model", "-o", t / "out"],
                             "model folder not found"),
    "missing critic folder": (lambda t, r: ["--image", r, "--model-path", _fake_model(t), "--critic",
                                            t / "no_critic", "-o", t / "out"], "critic folder not found"),
    "missing config file": (lambda t, r: ["--config", t / "none.json", "-o", t / "out"], "--config"),
    # /proc takes no files, not even from root (for whom os.access says yes everywhere)
    "output folder not writable": (lambda t, r: ["--tiny", "--image", r, "-o", "/proc/vlm3d-out/x"], "cannot write to /proc"),
    "batch: bad manifest": (lambda t, r: ["batch", _manifest(t, '{"image": "a.png"}\n{oops'), "-o", t / "out",
                                          "--tiny"], ":2: not JSON"),
    "batch: empty folder": (lambda t, r: ["batch", _empty(t), "-o", t / "out", "--tiny"], "no images"),
    "batch: bad rank": (lambda t, r: ["batch", t, "-o", t / "out", "--tiny"], "RANK"),
    "eval: no mesh": (lambda t, r: ["eval", t, "--tiny"], "no mesh"),
}


def _fake_model(tmp: Path) -> Path:
    folder = tmp / "fake_model" / DEFAULTS["subfolder"]
    folder.mkdir(parents=True)
    # the config names hy3dgen targets (the CLI reads them to choose hy3dgen or hy3dshape)
    (folder / "config.yaml").write_text("model: {target: hy3dgen.shapegen.models.Hunyuan3DDiT}\n")
    (folder / "model.fp16.safetensors").write_bytes(b"")
    return folder.parent


def _manifest(tmp: Path, text: str) -> Path:
    p = tmp / "jobs.jsonl"
    p.write_text(text)
    return p


def _empty(tmp: Path) -> Path:
    p = tmp / "empty"
    p.mkdir()
    return p


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_user_mistake_is_one_line_before_loading(case, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    ref = _write_ref(work / "ref.png")
    make_args, expected = MISTAKES[case]
    args = [str(a) for a in make_args(work, ref)]
    if case == "batch: bad rank":
        _write_ref(work / "x.png")
        monkeypatch.setenv("RANK", "3")
        monkeypatch.setenv("WORLD_SIZE", "2")
    before = _snapshot(work)
    loaded = set(sys.modules)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    line = _assert_one_line_error(err)
    assert expected in line
    assert _snapshot(work) == before  # nothing written
    assert "hy3dgen.shapegen.pipelines" not in set(sys.modules) - loaded  # no model code was even imported


def test_batch_prompt_too_long_fails_its_job_before_loading(tmp_path, tiny_cache, monkeypatch, capsys):
    """A manifest line whose prompt the critic's tokenizer counts past the context fails that job (recorded
    in its error.txt), before any model loads: with no other job, no pipeline is loaded at all."""
    monkeypatch.setenv("VLM3D_TINY_CACHE", str(tiny_cache))
    _write_ref(tmp_path / "a.png")
    manifest = _manifest(tmp_path, json.dumps({"image": "a.png", "prompt": "chair " * 25000}) + "\n")
    loaded = set(sys.modules)
    assert main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--tiny", "--quiet"]) == 1
    first = (tmp_path / "out" / "a" / "error.txt").read_text().splitlines()[0]
    assert first.startswith("--prompt: the prompt is ") and "longer than the model's context of 4096" in first
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["counts"] == {"done": 0, "failed": 1,
                                                                                    "pending": 0}
    assert "hy3dgen.shapegen.pipelines" not in set(sys.modules) - loaded


def test_existing_output_needs_overwrite(tmp_path, ref, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mesh.glb").write_bytes(b"precious")
    assert main(["--tiny", "--image", str(ref), "-o", str(out)]) == 2
    assert "--overwrite" in _assert_one_line_error(capsys.readouterr().err)
    assert (out / "mesh.glb").read_bytes() == b"precious" and len(list(out.iterdir())) == 1


@pytest.mark.skipif(__import__("importlib").util.find_spec("nvdiffrast") is not None,
                    reason="nvdiffrast is installed here")
def test_nvdiffrast_requested_but_absent(tmp_path, ref, capsys):
    assert main(["--tiny", "--image", str(ref), "--backend", "nvdiffrast", "-o", str(tmp_path / "o")]) == 2
    assert "nvdiffrast" in _assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_cuda_requested_without_gpu(tmp_path, ref, capsys):
    assert main(["--tiny", "--image", str(ref), "--device", "cuda", "-o", str(tmp_path / "o")]) == 2
    assert "--device cpu" in _assert_one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("network", ["offline", "unreachable"])
def test_weights_not_cached_and_hub_unavailable(network, tmp_path, ref, cli_env):
    """As a subprocess: huggingface_hub reads HF_HOME / HF_ENDPOINT / HF_HUB_OFFLINE at import."""
    env = dict(cli_env, HY3DGEN_MODELS=str(tmp_path / "hy3dgen"), HF_HOME=str(tmp_path / "hf"))
    if network == "unreachable":  # a closed local port: refused at once, no real network touched
        env.update(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    res = run_cli(["--image", ref, "-o", tmp_path / "out"], env, cwd=tmp_path)
    assert res.returncode == 2
    line = _assert_one_line_error(res.stderr)
    assert ("HF_HUB_OFFLINE" in line) if network == "offline" else ("cannot reach the Hugging Face hub" in line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "hy3dgen").exists()


def test_version_and_help(cli_env):
    res = run_cli(["--version"], cli_env)
    assert res.returncode == 0 and res.stdout.startswith("vlm3d-guide ")
    for args in (["--help"], ["batch", "--help"], ["eval", "--help"]):
        res = run_cli(args, cli_env)
        assert res.returncode == 0 and "usage:" in res.stdout
    res = run_cli(["--help"], cli_env)
    for flag in ("--tiny", "--compare", "--lam", "--schedule", "--gradient", "--views", "--render-size",
                 "--grid-resolution", "--octree-resolution", "--format", "--overwrite", "--quiet", "batch", "eval"):
        assert flag in res.stdout


def test_rotate_views_flag_reaches_the_guidance_config():
    from vlm3d_guidance import cli
    from vlm3d_guidance.cli.settings import guidance_config

    parse = cli.build_parser().parse_args
    assert guidance_config(cli.resolve_settings(parse(["--tiny"]))).rotate_views is False
    assert guidance_config(cli.resolve_settings(parse(["--tiny", "--rotate-views"]))).rotate_views is True
    assert guidance_config(cli.resolve_settings(parse(["--tiny", "--no-rotate-views"]))).rotate_views is False


def test_volume_flag_reaches_the_guidance_config_and_rejects_other_modes():
    from vlm3d_guidance import cli
    from vlm3d_guidance.cli.common import UsageError
    from vlm3d_guidance.cli.settings import guidance_config

    parse = cli.build_parser().parse_args
    assert guidance_config(cli.resolve_settings(parse(["--tiny"]))).volume == "free"
    assert guidance_config(cli.resolve_settings(parse(["--tiny", "--volume", "keep"]))).volume == "keep"
    late = guidance_config(cli.resolve_settings(parse(["--tiny", "--volume", "keep", "--volume-start", "0.5"])))
    assert (late.volume, late.volume_start) == ("keep", 0.5)
    with pytest.raises(UsageError, match="--volume: invalid choice: 'shrink'"):
        parse(["--tiny", "--volume", "shrink"])


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from vlm3d_guidance import outputs

    target = tmp_path / "mesh.glb"
    target.write_bytes(b"old")

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["mesh.glb"]
