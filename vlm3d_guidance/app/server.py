"""The page of ``vlm3d-guide serve``: a gradio Blocks app over one loaded pipeline.

One Generate click is one job (:mod:`vlm3d_guidance.app.jobs`): the input is checked first (an
:class:`~vlm3d_guidance.app.jobs.InputProblem` becomes the status message and no job starts), then
the job runs in its own thread with the CLI's ``run_job`` while the event streams one status line
per sampling step (phase, step, current reward). gradio's queue runs ``concurrency`` jobs at once
(default 1 per device) and shows each waiting page its queue position; Cancel stops the job at its
next step. Outputs live in the job's random-token folder inside gradio's upload folder, so gradio
serves them in place (no copies) and its file route refuses anything outside its own folders.
"""

from __future__ import annotations

import queue
import secrets
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr  # at module level: gradio resolves the ``request: gr.Request`` hints from here

from . import runner
from .jobs import InputProblem, JobCancelled, JobManager, Limits, check_upload, job_settings

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_PROMPT = 500
PAGE_MAXIMA = dict(steps=200, views=16, lam=1.0)


@dataclass
class ServedApp:
    """A built (and, after :meth:`launch`, running) app."""

    blocks: object
    manager: JobManager
    models: runner.Models
    examples: list
    limits: Limits
    url: str | None = None
    root: Path | None = None  # the app's own folder (job folders, examples): removed on close
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.blocks.close()
        finally:
            self.manager.close()
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _pick_image(upload, example, examples, manager, session, limits):
    """(image path, example or None) from the upload (wins) or the example name."""
    if upload:
        manager.track_upload(session, upload)
        return check_upload(upload, limits), None
    if example:
        for ex in examples:
            if ex.name == example:
                return ex.path, ex
        raise InputProblem(f"unknown example {example!r}; pick one from the list")
    return check_upload(None, limits), None


def _done_message(config: dict) -> str:
    rewards = ", ".join(f"{k} {_fmt(v)}" for k, v in config["final_reward"].items())
    how = " (described by the critic)" if config.get("prompt_described") else ""
    line = (f"**Done** in {config['seconds']['total']:.1f} s. Prompt: \u201c{config['prompt']}\u201d{how}. "
            f"Final critic reward: {rewards}.")
    if config.get("warnings"):
        line += "\n\n" + "\n".join(f"- warning: {w}" for w in config["warnings"])
    if config.get("notice"):
        line += f"\n\n*{config['notice']}*"
    return line


def build(models: runner.Models, examples: list, manager: JobManager, limits: Limits):
    """The gradio Blocks of the page (not launched)."""
    from .. import cli

    s0 = models.settings
    names = [ex.name for ex in examples]

    def on_example(name):
        for ex in examples:
            if ex.name == name:
                return str(ex.path), (ex.prompt or "")
        return None, gr.skip()

    def generate(upload, example, prompt, lam, schedule, steps, views, seed, compare, request: gr.Request):
        session = getattr(request, "session_hash", None) or "anonymous"
        empty = (None, None, None, None)  # views, trace, downloads, meshes (the viewers are cleared too)
        try:
            image, ex = _pick_image(upload, example, examples, manager, session, limits)
            prompt = (prompt or "").strip() or None
            if prompt is not None and len(prompt) > MAX_PROMPT:
                raise InputProblem(f"the prompt has {len(prompt)} characters; keep it under {MAX_PROMPT}")
            for key, value in (("steps", steps), ("views", views), ("lam", lam)):
                if isinstance(value, (int, float)) and value > PAGE_MAXIMA[key]:
                    raise InputProblem(f"{key} {value} is more than this page allows ({PAGE_MAXIMA[key]})")
            s = job_settings(s0, dict(lam=lam, schedule=schedule, steps=steps, views=views, seed=seed,
                                      compare=bool(compare)))
        except InputProblem as exc:
            yield (f"**Error:** {exc}", *empty)
            return
        job = manager.new_job(session)
        events: queue.Queue = queue.Queue()

        def on_step(phase, step, total, reward):
            events.put(("step", (phase, step, total, reward)))

        def work():
            try:
                with manager.slot(job):
                    if job.cancel.is_set():
                        raise JobCancelled()
                    ref = job.folder / ("reference" + image.suffix.lower())
                    shutil.copyfile(image, ref)
                    config = runner.run(models, s, ref, prompt, job.folder / "out", on_step=on_step,
                                        cancel=job.cancel, command=[cli.PROG, "serve"])
                events.put(("done", config))
            except JobCancelled:
                events.put(("cancelled", None))
            except (cli.JobError, cli.UsageError, InputProblem) as exc:
                events.put(("error", str(exc)))
            except Exception as exc:  # reported in one line on the page, the traceback in the server log
                traceback.print_exc(file=sys.stderr)
                first = (str(exc).splitlines() or [""])[0]
                events.put(("error", f"{type(exc).__name__}: {first} (details in the server log)"))
            finally:
                manager.finish(job)

        threading.Thread(target=work, name=f"vlm3d-job-{job.id[:6]}", daemon=True).start()
        skip = (gr.skip(),) * 4
        yield ("Waiting for the device...", *skip)
        started = time.perf_counter()
        ended = False
        try:
            while True:
                kind, payload = events.get()
                ended = kind != "step"
                if kind == "step":
                    phase, step, total, reward = payload
                    yield (f"Running **{phase}** sampling: step {step}/{total}, current reward "
                           f"{_fmt(reward)} ({time.perf_counter() - started:.1f} s)", *skip)
                elif kind == "done":
                    out = job.folder / "out"
                    fmt = s["format"]
                    base = out / f"baseline.{fmt}"
                    files = [str(out / n) for n in (f"mesh.{fmt}", f"baseline.{fmt}", "config.json", "trace.json")
                             if (out / n).is_file()]
                    meshes = dict(baseline=str(base) if base.is_file() else None, guided=str(out / f"mesh.{fmt}"))
                    yield (_done_message(payload), str(out / "views.png"), str(out / "trace.png"), files, meshes)
                    return
                elif kind == "cancelled":
                    yield ("Cancelled.", *empty)
                    return
                else:
                    yield (f"**Error:** {payload}", *empty)
                    return
        finally:  # the page left or the event was cancelled: stop the job at its next step
            if not ended:
                job.cancel.set()

    def show_meshes(meshes):
        """The viewers are filled by this follow-up event, not by the streaming one: gradio 6.31's
        Model3D never mounts its 3D canvas when its value arrives from a generator (checked in
        chromium; a plain event works)."""
        meshes = meshes or {}
        return meshes.get("baseline"), meshes.get("guided")

    def cancel(request: gr.Request):
        n = manager.cancel_session(getattr(request, "session_hash", None) or "anonymous")
        return "Cancelled." if n else "Nothing to cancel."

    def unload(request: gr.Request):
        manager.session_closed(getattr(request, "session_hash", None) or "anonymous")

    with gr.Blocks(title="vlm3d-guide", analytics_enabled=False, delete_cache=(600, int(manager.keep_seconds))) as demo:
        gr.Markdown(f"## vlm3d-guide: a VLM critic steers Hunyuan3D\nModels: {models.label}. Upload a picture "
                    "of one object (or pick an example), say what it is (or leave the prompt empty: the critic "
                    "describes it), and Generate.")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Reference image (PNG with transparent background is best)",
                                 file_count="single", type="filepath", elem_id="upload")
                example = gr.Dropdown(choices=names, value=None, label="...or an example", elem_id="example")
                preview = gr.Image(label="Example", type="filepath", interactive=False, height=160)
                prompt = gr.Textbox(label="Prompt (empty: the critic describes the image)", elem_id="prompt")
                with gr.Accordion("Knobs", open=True):
                    lam = gr.Slider(0.0, PAGE_MAXIMA["lam"], value=float(s0["lam"]), step=0.005,
                                    label="lam (guidance strength; 0 = unguided)")
                    schedule = gr.Dropdown(["constant", "linear", "cosine"], value=s0["schedule"], label="schedule")
                    steps = gr.Slider(1, PAGE_MAXIMA["steps"], value=int(s0["steps"]), step=1, label="steps", elem_id="steps")
                    views = gr.Slider(1, PAGE_MAXIMA["views"], value=int(s0["views"]), step=1, label="critic views")
                    seed = gr.Number(value=int(s0["seed"]), precision=0, label="seed")
                    compare = gr.Checkbox(value=True, label="compare with the unguided baseline (same seed)")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Cancel", elem_id="cancel")
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.", elem_id="status")
                with gr.Row():
                    baseline_view = gr.Model3D(label="Baseline (unguided)", elem_id="baseline-viewer", height=320)
                    guided_view = gr.Model3D(label="Guided", elem_id="guided-viewer", height=320)
                views_img = gr.Image(label="The critic's views (baseline row, guided row)", type="filepath",
                                     interactive=False, elem_id="views")
                trace_img = gr.Image(label="Reward trace", type="filepath", interactive=False, elem_id="trace")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
        meshes = gr.State(None)
        example.change(on_example, inputs=example, outputs=[preview, prompt], queue=False)
        event = run_btn.click(generate, inputs=[upload, example, prompt, lam, schedule, steps, views, seed, compare],
                              outputs=[status, views_img, trace_img, downloads, meshes], api_name="generate")
        event.then(show_meshes, inputs=meshes, outputs=[baseline_view, guided_view], queue=False, api_name=False)
        stop_btn.click(cancel, outputs=status, cancels=[event], queue=False, api_name="cancel")
        demo.unload(unload)
    return demo


def create(models: runner.Models, *, concurrency: int = 1, limits: Limits | None = None, examples=None,
           root=None, keep_seconds: float = 3600.0, grace_seconds: float = 60.0) -> ServedApp:
    """Build the app over loaded ``models``. Job folders go under ``root`` (default: a fresh
    random folder inside gradio's upload folder, where gradio serves files from)."""
    from gradio.utils import get_upload_folder

    limits = limits or Limits()
    root = Path(root) if root is not None else Path(get_upload_folder()) / "vlm3d-serve" / secrets.token_hex(8)
    manager = JobManager(root / "jobs", concurrency=concurrency, keep_seconds=keep_seconds,
                         grace_seconds=grace_seconds)
    if examples is None:
        examples = runner.write_examples(root / "examples", toy=True if models.settings.get("toy") else None)
    blocks = build(models, examples, manager, limits)
    return ServedApp(blocks=blocks, manager=manager, models=models, examples=examples, limits=limits, root=root)


def launch(app: ServedApp, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           block: bool = True, quiet: bool = False) -> ServedApp:
    """Serve ``app`` (``block=False``: return at once, the server runs in a thread)."""
    if host not in LOCAL_HOSTS:
        print(f"vlm3d-guide serve: warning: binding to {host}: anyone who can reach this machine on port "
              f"{port} can run jobs on its models and upload files (there is no login); use the default "
              "127.0.0.1 unless you mean it", file=sys.stderr, flush=True)
    app.blocks.queue(default_concurrency_limit=app.manager.concurrency)
    try:
        _, url, _ = app.blocks.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                                      max_file_size=app.limits.max_bytes, quiet=quiet, show_error=False,
                                      ssr_mode=False, mcp_server=False, inbrowser=False)
    except BaseException:
        app.manager.close()
        raise
    app.url = url
    if block:
        try:
            app.blocks.block_thread()
        finally:
            app.close()
    return app
