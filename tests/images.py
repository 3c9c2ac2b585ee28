"""Test images shared by the test modules (tests/ is on sys.path through pytest's rootdir conftest)."""
import numpy as np
from PIL import Image


def square_image(seed: int = 0, size: int = 64) -> Image.Image:
    """A ``size`` x ``size`` RGBA image: one opaque rectangle of a random colour on transparency."""
    rng = np.random.default_rng(seed)
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[12:52, 18:46, :3] = rng.integers(0, 255, 3)
    rgba[12:52, 18:46, 3] = 255
    return Image.fromarray(rgba)
