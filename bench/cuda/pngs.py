"""Writes each image of a uint8 N x H x W .npy as DIR/NNNNN.png (names sort in order)."""

import os
import sys

import numpy as np
from PIL import Image

images, out = np.load(sys.argv[1]), sys.argv[2]
os.makedirs(out, exist_ok=True)
for i, px in enumerate(images):
    Image.fromarray(px).save(f"{out}/{i:05d}.png")
