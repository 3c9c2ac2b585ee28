"""Evaluation: what guidance changes in a mesh, measured on the raw output.

Four families of numbers, all plain Python values (JSON-ready):

- :func:`mesh_metrics` -- geometry of ONE mesh as the sampler produced it (no floater removal,
  no repair): connected components, floater area, watertightness, Euler characteristic and genus,
  self-intersecting faces (pymeshlab), area, signed volume, bounding box.
- :func:`pair_metrics` -- a (baseline, guided) pair made from the same image and seed: both metric
  dicts, their differences ``guided - baseline`` and a seeded symmetric chamfer distance.
- :func:`critic_rewards` -- the VLM critic's reward ``r = z_yes - z_no`` of a mesh's clay views under
  each query template (``dual``, ``content``, ``geometry``).
- :func:`clip_similarity` -- mean text-to-image cosine similarity with a CLIP model; the paper's
  CLIP-D is ``1 - similarity`` (lower is better).

:func:`evaluate_folder` runs them on a ``vlm3d-guide`` output folder and writes ``report.json``,
``report.md`` and ``report.png`` atomically next to the meshes.

Modules: :mod:`.geometry` (mesh and pair metrics, their conventions), :mod:`.scores` (the clay
views, critic rewards, CLIP), :mod:`.report` (the folder report).
"""

from .geometry import chamfer_distance, count_self_intersecting_faces, mesh_metrics, metric_differences, pair_metrics
from .report import MESH_EXTENSIONS, evaluate_folder, find_mesh, report_markdown
from .scores import QUERY_NAMES, clay_views, clip_similarity, critic_rewards

__all__ = ["mesh_metrics", "pair_metrics", "metric_differences", "chamfer_distance", "count_self_intersecting_faces",
           "clay_views", "critic_rewards", "clip_similarity", "QUERY_NAMES", "evaluate_folder", "find_mesh",
           "report_markdown", "MESH_EXTENSIONS"]
