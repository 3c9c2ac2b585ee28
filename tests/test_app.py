"""vlm3d-guide serve: the web app on the tiny models, served in-process on 127.0.0.1.

Through gradio_client (the API), plain HTTP (the file route) and a real browser (Debian's chromium +
chromium-driver through selenium; skipped with the reason when they are missing).
"""
import http.client
import json
import os
import shutil
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

from vlm3d_guidance import cli  # noqa: E402
from vlm3d_guidance.app import InputProblem, JobManager, Limits, check_upload, job_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STEPS = 4  # short runs: the page's knobs, not the defaults
LIMITS = Limits(max_bytes=200_000, max_pixels=512 * 512)
GRACE = 8.0  # seconds between a page's disconnect and the removal of its files
SCREENSHOT_ENV = "VLM3D_APP_SCREENSHOT"  # a path: the browser test saves its screenshot there too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ref(path: Path, seed: int = 0, size: int = 64) -> Path:
    rng = np.random.default_rng(seed)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[size // 5: size - size // 5, size // 4: size - size // 4, :3] = rng.integers(30, 230, 3)
    rgba[size // 5: size - size // 5, size // 4: size - size // 4, 3] = 255
    Image.fromarray(rgba).save(path)
    return path


@pytest.fixture(scope="module")
def served(tiny_root, tmp_path_factory):
    """The app on tiny models, launched in this process on a free 127.0.0.1 port."""
    from vlm3d_guidance.app import build_serve_parser, runner, server

    os.environ.setdefault("VLM3D_TINY_CACHE", str(tiny_root))
    models = runner.load_models(build_serve_parser().parse_args(["--tiny"]))
    examples = runner.write_examples(tmp_path_factory.mktemp("app_examples"), toy=False)  # fast, fixed: examples/ref.png
    app = server.create(models, concurrency=1, limits=LIMITS, examples=examples, grace_seconds=GRACE)
    server.launch(app, host="127.0.0.1", port=_free_port(), block=False, quiet=True)
    assert app.url.startswith("http://127.0.0.1:")
    yield app
    roots = (app.manager.root, app.root)
    app.close()
    assert not any(r.exists() for r in roots)


def _knobs(seed=0, compare=True, lam=0.02, steps=STEPS, views=2, schedule="constant"):
    return dict(lam=lam, schedule=schedule, steps=steps, views=views, seed=seed, compare=compare)


def _predict(client, image, prompt="a red box", example=None, **knobs):
    k = _knobs(**knobs)
    return client.predict(handle_file(str(image)) if image else None, example, prompt, k["lam"], k["schedule"],
                          k["steps"], k["views"], k["seed"], k["compare"], api_name="/generate")


def _folders(app):
    return sorted(p.name for p in app.manager.root.iterdir())


def _file(files, name):
    return next(f for f in files if Path(f).name == name)


def _vertices(path) -> np.ndarray:
    return np.asarray(trimesh.load(path, force="mesh").vertices)


# --------------------------------------------------------------------------------------------------
# pure rules (no server)
# --------------------------------------------------------------------------------------------------


def test_check_upload_bounds_bytes_pixels_and_content(tmp_path):
    ok = _ref(tmp_path / "ok.png")
    assert check_upload(ok, LIMITS) == ok.resolve()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not a picture")
    big = tmp_path / "big.png"
    Image.new("RGB", (600, 500)).save(big)  # 300k pixels > 512^2, but small in bytes
    heavy = tmp_path / "heavy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)).save(heavy)
    assert heavy.stat().st_size > LIMITS.max_bytes
    cases = {None: "no image", tmp_path / "empty.png": "empty (0 bytes)", tmp_path / "text.png": "cannot read image",
             big: "600x500 = 0.3 M pixels", heavy: "more than this server's limit of 0.2 MB"}
    for path, words in cases.items():
        with pytest.raises(InputProblem, match=None) as info:
            check_upload(path, LIMITS)
        assert words in str(info.value), (path, str(info.value))
        assert "Traceback" not in str(info.value)


def test_job_settings_use_the_cli_checks():
    base = cli.resolve_settings(cli.build_parser().parse_args(["--tiny"]))
    s = job_settings(base, _knobs(seed=3, steps=5.0))
    assert (s["seed"], s["steps"], s["views"], s["compare"]) == (3, 5, 2, True)
    assert isinstance(s["steps"], int)
    for bad, words in [(dict(seed=-1), "--seed must be an integer >= 0"), (dict(steps=2.5), "--steps must be an integer"),
                       (dict(lam=-0.5), "--lam"), (dict(schedule="zigzag"), "--schedule"), (dict(views=0), "--views")]:
        with pytest.raises(InputProblem) as info:
            job_settings(base, _knobs(**bad))
        assert words in str(info.value), (bad, str(info.value))
        assert "--help" not in str(info.value)


def test_job_manager_folders_slots_and_cleanup(tmp_path):
    m = JobManager(tmp_path / "jobs", concurrency=1, keep_seconds=10)
    a, b = m.new_job("s1"), m.new_job("s2")
    assert a.folder.parent == m.root and len(a.id) >= 43 and a.id != b.id  # 32 random bytes, url-safe
    for job in (a, b):
        (job.folder / "mesh.glb").write_bytes(b"x")
        m.finish(job)
    upload = tmp_path / "up" / "ref.png"
    upload.parent.mkdir()
    upload.write_bytes(b"x")
    m.track_upload("s1", upload)
    m.grace_seconds = 0.3
    m.session_closed("s1")  # page s1 disconnected: its files go after the grace period
    assert a.folder.exists() and upload.exists()
    time.sleep(0.8)
    assert not a.folder.exists() and not upload.exists() and not upload.parent.exists() and b.folder.exists()
    m.session_closed("s2")
    e = m.new_job("s2")  # ...but s2 came back within the grace period: nothing is removed
    time.sleep(0.8)
    assert b.folder.exists() and e.folder.exists()
    m.finish(e)
    m.sweep(now=e.created + 11)  # older than keep_seconds
    assert not b.folder.exists() and m.jobs() == []
    # one slot: a second job waits, and its cancel ends the wait
    c, d = m.new_job("s3"), m.new_job("s4")
    with m.slot(c):
        d.cancel.set()
        from vlm3d_guidance.app.jobs import JobCancelled

        with pytest.raises(JobCancelled):
            with m.slot(d, poll=0.01):
                pass
    m.close()
    assert not m.root.exists()


def test_serve_usage_errors_before_any_model_loads(capsys):
    for argv, words in [(["serve", "--tiny", "--concurrency", "0"], "--concurrency must be >= 1"),
                        (["serve", "--tiny", "--steps", "0"], "--steps must be an integer >= 1"),
                        (["serve", "--tiny", "--toy"], "--tiny and --toy pick different built-in models"),
                        (["serve", "--tiny", "--critic", "x/y"], "--tiny uses the built-in tiny models")]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    try:
        import vlm3d_guidance.toy  # noqa: F401
    except Exception:  # without the toy world --toy is refused (with the toy world it would serve)
        assert cli.main(["serve", "--toy"]) == 2
        err = capsys.readouterr().err
        assert "--toy needs vlm3d_guidance.toy" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------------
# the served app
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(served, tmp_path_factory):
    """One job through the API (seed 0, with baseline), shared by the tests that look at it."""
    tmp = tmp_path_factory.mktemp("app_first")
    client = Client(served.url, verbose=False)
    result = _predict(client, _ref(tmp / "ref.png"), prompt="a red box", seed=0)
    return client, result, tmp


def test_api_run_writes_the_cli_outputs(served, first_run):
    client, (status, views, trace_png, files), _ = first_run
    mesh, baseline = _file(files, "mesh.glb"), _file(files, "baseline.glb")
    assert status.startswith("**Done**") and "a red box" in status and "Traceback" not in status
    names = sorted(Path(f).name for f in files)
    assert names == ["baseline.glb", "config.json", "mesh.glb", "trace.json"]
    config = json.loads(Path(_file(files, "config.json")).read_text())
    trace = json.loads(Path(_file(files, "trace.json")).read_text())
    assert config["prompt"] == "a red box" and config["seed"] == 0 and config["settings"]["steps"] == STEPS
    assert config["settings"]["views"] == 2 and config["guidance"]["num_views"] == 2
    assert config["served_by"] == "vlm3d-guide serve"
    assert len(trace["records"]) == STEPS
    # the status shows the final rewards of config.json
    assert f"guided {config['final_reward']['guided']:+.3f}" in status
    assert f"baseline {config['final_reward']['baseline']:+.3f}" in status
    for path in (mesh, baseline):
        assert len(trimesh.load(path, force="mesh").faces) > 0
    assert Image.open(views).size[0] > 0 and Image.open(trace_png).size[0] > 0
    # server side: the files sit in one random-token folder of the app
    job = next(j for j in served.manager.jobs() if j.finished)
    assert len(job.id) >= 43 and (job.folder / "out" / "mesh.glb").is_file()
    assert json.loads((job.folder / "out" / "config.json").read_text())["prompt"] == "a red box"


def test_progress_streams_each_step_with_the_trace_reward(served, tmp_path):
    client = Client(served.url, verbose=False)
    k = _knobs(seed=5, compare=False)
    job = client.submit(handle_file(str(_ref(tmp_path / "r.png", 5))), None, "a tall box", k["lam"], k["schedule"],
                        k["steps"], k["views"], k["seed"], k["compare"], api_name="/generate")
    job.result(timeout=120)
    statuses = [o[0] for o in job.outputs()]
    running = [s for s in statuses if s.startswith("Running")]
    assert [s.split("step ")[1].split(",")[0] for s in running] == [f"{i}/{STEPS}" for i in range(1, STEPS + 1)]
    trace = json.loads(Path(_file(job.outputs()[-1][3], "trace.json")).read_text())
    for line, rec in zip(running, trace["records"]):  # the live reward is the trace's reward of that step
        reward = rec["reward"][0] if rec["reward"] else None
        assert line.split("current reward ")[1].split(" ")[0] == ("n/a" if reward is None else f"{reward:+.3f}")


def test_four_concurrent_clients_each_get_their_own_outputs(served, first_run, tmp_path):
    _, first, _ = first_run
    seeds = [0, 1, 2, 3]
    results, errors, ranks = {}, [], []

    def one(seed):
        try:
            client = Client(served.url, verbose=False)
            prompt = "a red box" if seed == 0 else f"object number {seed}"  # seed 0: the first run's job
            k = _knobs(seed=seed, compare=False)
            job = client.submit(handle_file(str(_ref(tmp_path / f"r{seed}.png", seed))), None, prompt, k["lam"],
                                k["schedule"], k["steps"], k["views"], k["seed"], k["compare"], api_name="/generate")
            while not job.done():
                st = job.status()
                if st.rank is not None:
                    ranks.append(st.rank)
                time.sleep(0.05)
            results[seed] = (prompt, job.result(timeout=180))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors and sorted(results) == seeds
    assert max(ranks) >= 1  # with one device slot somebody waited in the queue (and saw its position)
    vertices = {}
    for seed, (prompt, (status, views, trace, files)) in results.items():
        assert status.startswith("**Done**")
        assert sorted(Path(f).name for f in files) == ["config.json", "mesh.glb", "trace.json"]  # no baseline
        config = json.loads(Path(_file(files, "config.json")).read_text())
        assert (config["prompt"], config["seed"]) == (prompt, seed)
        vertices[seed] = _vertices(_file(files, "mesh.glb"))
    # seed 0 again: the same guided mesh as the first run (same seed, image, prompt and knobs)
    np.testing.assert_array_equal(vertices[0], _vertices(_file(first[3], "mesh.glb")))
    for a in seeds:
        for b in seeds:
            if a < b:
                assert vertices[a].shape != vertices[b].shape or not np.array_equal(vertices[a], vertices[b])
    # the server still answers
    assert _predict(Client(served.url, verbose=False), None, example=None)[0].startswith("**Error:** no image")


def test_bad_input_is_a_message_and_starts_no_job(served, tmp_path):
    client = Client(served.url, verbose=False)
    ok = _ref(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("not an image at all")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (700, 600)).save(tmp_path / "huge.png")  # 0.42 M pixels > 512^2
    started, folders = served.manager.started, _folders(served)
    cases = [(dict(image=tmp_path / "notes.txt"), "cannot read image notes.txt"),
             (dict(image=tmp_path / "fake.png"), "cannot read image fake.png"),
             (dict(image=tmp_path / "empty.png"), "empty (0 bytes)"),
             (dict(image=tmp_path / "huge.png"), "700x600 = 0.4 M pixels"),
             (dict(image=None), "no image"),
             (dict(image=ok, seed=-1), "--seed must be an integer >= 0"),
             (dict(image=ok, seed=2 ** 63), "--seed must be < 2**63"),
             (dict(image=ok, prompt="x" * 600), "keep it under 500")]
    for case, words in cases:
        out = _predict(client, **case)
        assert out[0].startswith("**Error:**") and words in out[0] and "Traceback" not in out[0], (case, out[0])
        assert out[1:] == (None, None, None)
    # knobs outside the page's sliders are refused by gradio before our function runs
    for bad in (dict(lam=5.0), dict(steps=0), dict(views=100), dict(schedule="zigzag"), dict(example="no such")):
        with pytest.raises(Exception) as info:
            _predict(client, ok, **bad)
        assert "Traceback" not in str(info.value)
    # an upload over the byte limit is refused by gradio's upload route
    heavy = tmp_path / "heavy.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8)).save(heavy)
    with pytest.raises(Exception):
        _predict(client, heavy)
    assert served.manager.started == started and set(_folders(served)) <= set(folders)  # (closed clients' go)


def _get(url: str, raw_path: str) -> int:
    """GET with the path sent exactly as given (no client-side normalisation of ``..``)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", raw_path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_file_route_serves_job_files_and_refuses_everything_else(served, first_run, tmp_path):
    job = next(j for j in served.manager.jobs() if j.finished)
    mesh = job.folder / "out" / "mesh.glb"
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    assert _get(served.url, f"/gradio_api/file={mesh}") == 200  # positive control: its own output
    quote = urllib.parse.quote
    refused = [f"/gradio_api/file=/etc/passwd", f"/gradio_api/file={outside}",
               "/gradio_api/file=../../../../../../etc/passwd", f"/gradio_api/file={quote('../../../../../../etc/passwd')}",
               f"/gradio_api/file={job.folder}/../../../../../../../../etc/passwd",
               f"/gradio_api/file={quote(str(job.folder) + '/../../../../../../../../etc/passwd', safe='')}",
               f"/gradio_api/file={REPO / 'pyproject.toml'}", f"/gradio_api/file={job.folder}"]
    for path in refused:
        assert _get(served.url, path) in (403, 404), path


def test_cancel_stops_the_job_and_removes_its_files(served, tmp_path):
    client = Client(served.url, verbose=False)
    k = _knobs(seed=7, steps=150, compare=True)
    job = client.submit(handle_file(str(_ref(tmp_path / "r.png", 7))), None, "a box", k["lam"], k["schedule"],
                        k["steps"], k["views"], k["seed"], k["compare"], api_name="/generate")
    deadline = time.time() + 60
    while not any(o[0].startswith("Running") for o in job.outputs()) and time.time() < deadline:
        time.sleep(0.1)
    mine = [j for j in served.manager.jobs(client.session_hash) if not j.finished]
    assert len(mine) == 1
    assert client.predict(api_name="/cancel") == "Cancelled."
    deadline = time.time() + 30
    while not mine[0].finished and time.time() < deadline:
        time.sleep(0.1)
    assert mine[0].finished and not mine[0].folder.exists()
    steps_run = [o[0] for o in job.outputs() if o[0].startswith("Running")]
    assert len(steps_run) < 150


def test_page_disconnect_removes_the_sessions_files(served, tmp_path):
    import httpx

    client = Client(served.url, verbose=False)
    out = _predict(client, _ref(tmp_path / "r.png", 9), seed=9, compare=False)
    assert out[0].startswith("**Done**")
    mine = served.manager.jobs(client.session_hash)
    assert len(mine) == 1 and mine[0].folder.is_dir()
    with httpx.stream("GET", f"{served.url}gradio_api/heartbeat/{client.session_hash}", timeout=10) as r:
        next(r.iter_lines())  # the page's keep-alive stream is open; leaving the block closes it
    time.sleep(GRACE / 4)
    assert mine[0].folder.exists()  # the grace period: a page whose stream only dropped keeps its files
    deadline = time.time() + GRACE + 30
    while mine[0].folder.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not mine[0].folder.exists() and served.manager.jobs(client.session_hash) == []


# --------------------------------------------------------------------------------------------------
# a real browser
# --------------------------------------------------------------------------------------------------


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no browser: install Debian's chromium and chromium-driver (apt-get install -y chromium "
                    "chromium-driver) to run the real-browser test")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _drawn_fraction(element) -> float:
    """Fraction of an element's on-screen pixels that differ from its corner (the background) by
    more than 10 levels in some channel (the viewer draws a pale shaded mesh on white)."""
    import io

    rgb = np.asarray(Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")).astype(np.int16)
    return float((np.abs(rgb - rgb[2, 2]).max(axis=2) > 10).mean())


def test_browser_upload_generate_view_download(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(served.url)
        wait = WebDriverWait(driver, 180)  # generous: the page's components load lazily; CI machines are busy
        for css in ("#upload input[type=file]", "#prompt textarea", "#steps input[type=number]", "#generate",
                    "#guided-viewer", "#trace"):
            wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))
        # CSS animations off: headless chromium renders gradio's pulsing "pending" borders in software,
        # which took most of a busy 2-core machine and made the job itself ~20x slower (measured)
        driver.execute_script("const s = document.createElement('style'); s.textContent = '*, *::before, "
                              "*::after {animation: none !important; transition: none !important}'; "
                              "document.head.appendChild(s)")
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(REPO / "examples" / "ref.png"))
        wait.until(lambda d: "ref.png" in d.find_element(By.ID, "upload").text.replace("\n", "")
                   and "Uploading" not in d.find_element(By.ID, "upload").text)
        box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        box.clear()
        box.send_keys("a brown box")
        steps = driver.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        steps.clear()
        steps.send_keys(str(STEPS), Keys.TAB)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 240).until(lambda d: "Done" in d.find_element(By.ID, "status").text
                                         or "Error" in d.find_element(By.ID, "status").text)
        status = driver.find_element(By.ID, "status").text
        assert "Done" in status and "a brown box" in status and "Traceback" not in status, status
        # both viewers hold a model: a 3D canvas on which the (grey clay) mesh has been drawn
        for viewer in ("baseline-viewer", "guided-viewer"):
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#{viewer} canvas"))
            canvas = driver.find_element(By.CSS_SELECTOR, f"#{viewer} canvas")
            assert canvas.size["width"] > 50 and canvas.size["height"] > 50
            wait.until(lambda d: _drawn_fraction(canvas) > 0.02)
        img = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#trace img"))
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0)
        # downloads: links to the job's mesh and config.json, fetched like a user would
        links = {a.text.strip(): a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a")}
        links = {Path(urllib.parse.urlsplit(h).path.split("file=")[-1]).name: h for h in links.values() if h}
        assert {"mesh.glb", "baseline.glb", "config.json", "trace.json"} <= set(links), links
        import httpx

        config = httpx.get(links["config.json"], timeout=60).json()
        assert config["prompt"] == "a brown box" and config["settings"]["steps"] == STEPS
        mesh_bytes = httpx.get(links["mesh.glb"], timeout=60).content
        assert mesh_bytes[:4] == b"glTF"
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "app_tiny.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
        session_jobs = [j for j in served.manager.jobs() if j.finished and
                        json.loads((j.folder / "out" / "config.json").read_text())["prompt"] == "a brown box"]
        assert len(session_jobs) == 1
    except Exception:
        driver.save_screenshot(str(tmp_path / "failure.png"))
        print("browser test failed; screenshot", tmp_path / "failure.png", "status:",
              [e.text for e in driver.find_elements(By.ID, "status")])
        raise
    finally:
        driver.quit()
    # closing the page removes that job's files (after the grace period)
    deadline = time.time() + GRACE + 60
    while session_jobs[0].folder.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert not session_jobs[0].folder.exists()
