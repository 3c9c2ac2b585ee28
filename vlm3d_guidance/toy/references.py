"""Reference images and ground-truth meshes of toy objects, and the fixed, disjoint splits.

Splits: every object is drawn from its own random stream ``np.random.default_rng([split_id, seed,
index])`` with ``split_id`` 1 (generator training), 2 (critic training) or 3 (test), so the same
arguments give the same objects on every machine, any seed works, and no object of one split is an
object of another (their parameters come from different streams; continuous parameters coincide
with probability zero). Classes cycle in the order of :data:`~vlm3d_guidance.toy.world.CLASSES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .world import CLASSES, REFERENCE_AZIMUTH, REFERENCE_ELEVATION, ToyObject, sample_object, with_handle_azimuth

SPLITS = {"generator": 1, "critic": 2, "test": 3}
REFERENCE_SIZE = 160  # pixels of the RGBA reference render
GT_RESOLUTION = 96  # marching-cubes cells per axis for the ground-truth mesh
BOX_V = 1.01


@dataclass
class Reference:
    """One evaluation (or training) reference.

    Attributes:
        image: PIL RGBA render of the intact object from the reference camera (alpha = object mask).
        prompt: the object's description.
        mesh: ``trimesh.Trimesh`` of the intact object in the sampler's box (world units, +y up).
        name: ``"<split>-<seed>-<index>-<class>"``.
        object: the :class:`~vlm3d_guidance.toy.world.ToyObject` (the judge's ground truth).
    """

    image: object
    prompt: str
    mesh: object
    name: str
    object: ToyObject


def object_stream(split: str, seed: int, index: int) -> np.random.Generator:
    """The random stream of object ``index`` of ``split`` under ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if int(seed) < 0 or int(index) < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([SPLITS[split], int(seed), int(index)])


def split_object(split: str, seed: int, index: int, broken=None) -> ToyObject:
    """Object ``index`` of ``split`` (class ``CLASSES[index % 4]``); ``broken`` as in sample_object."""
    return sample_object(object_stream(split, seed, index), cls=CLASSES[index % len(CLASSES)], broken=broken)


def sdf_grid(obj: ToyObject, resolution: int = GT_RESOLUTION, box_v: float = BOX_V) -> torch.Tensor:
    """``[R+1, R+1, R+1]`` float32 SDF (negative inside) on the sampler's grid, axes x, y, z."""
    axis = torch.linspace(-box_v, box_v, resolution + 1)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return obj.sdf(pts).reshape(resolution + 1, resolution + 1, resolution + 1)


def object_mesh(obj: ToyObject, resolution: int = GT_RESOLUTION):
    """``trimesh.Trimesh`` of ``obj``'s surface (marching cubes of its SDF, outward faces)."""
    import trimesh

    verts, faces = _mesh_tensors(obj, resolution)
    return trimesh.Trimesh(verts.numpy().astype(np.float64), faces.numpy(), process=True)


def reference_camera(device="cpu"):
    """The reference camera (one view): azimuth 30, elevation 20 degrees, the critic's fov framing."""
    from ..render import orbit_cameras

    return orbit_cameras(num_views=1, elevation=REFERENCE_ELEVATION, fov=40.0, device=device,
                         bounds=BOX_V, azimuth_offset=REFERENCE_AZIMUTH)


def render_reference(obj: ToyObject, size: int = REFERENCE_SIZE):
    """PIL RGBA image of ``obj`` (clay shading, alpha = antialiased coverage) from the reference camera."""
    from PIL import Image

    from ..render import render_views

    verts, faces = _mesh_tensors(obj)
    cams = reference_camera()
    with torch.no_grad():
        rgb = render_views(verts, faces, cams, size=size, shading="clay", backend="torch")[0]
        alpha = render_views(verts, faces, cams, size=size, shading="silhouette", backend="torch")[0, :1]
    arr = torch.cat([rgb, alpha]).permute(1, 2, 0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, mode="RGBA")


def _mesh_tensors(obj: ToyObject, resolution: int = GT_RESOLUTION):
    from ..geometry import marching_cubes

    return marching_cubes(sdf_grid(obj, resolution), bounds=(-BOX_V, BOX_V))


def make_reference(obj: ToyObject, name: str) -> Reference:
    return Reference(image=render_reference(obj), prompt=obj.description, mesh=object_mesh(obj), name=name, object=obj)


def references(split: str = "test", count: int = 16, seed: int = 0, start: int = 0) -> list:
    """``count`` intact references of ``split`` (objects ``start .. start+count-1``), classes cycling.

    The same arguments give the same references (images, prompts, meshes) on every machine.
    """
    if int(count) < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out = []
    for i in range(int(start), int(start) + int(count)):
        obj = split_object(split, seed, i)
        out.append(make_reference(obj, f"{split}-{seed}-{i}-{obj.cls}"))
    return out


def hidden_handle_references(count: int = 8, seed: int = 0) -> list:
    """Test-split mugs whose handle is turned directly away from the reference camera.

    Seen from the reference view they look like cups: only the prompt can say whether a handle is
    wanted (the paper's claim that language constrains geometry).
    """
    out = []
    i = 1  # index 1, 5, 9, ... are mugs (CLASSES order)
    while len(out) < count:
        obj = split_object("test", seed + 1000, i)
        if obj.cls != "mug":  # pragma: no cover - the class cycle guarantees mugs
            raise RuntimeError("class cycle broken")
        hidden = with_handle_azimuth(obj, REFERENCE_AZIMUTH + 180.0)
        out.append(make_reference(hidden, f"hidden-handle-{seed}-{i}"))
        i += len(CLASSES)
    return out
