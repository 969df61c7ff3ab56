"""Reference outputs of the resizes Musubi Tuner uses (Pillow LANCZOS up, OpenCV INTER_AREA down,
plus its resize-to-bucket with centre crop) on small synthetic RGB images, for
crates/flux2-tuner/tests/image_io.rs.

Run with any Python that has numpy, pillow and opencv-python-headless:
    python tools/reference/image_resize.py > crates/flux2-tuner/tests/data/image_resize_reference.json
The synthetic image is defined by `pattern` below and regenerated bit-exactly by the Rust test.
"""

import json
import sys

import cv2
import numpy as np
import PIL
from PIL import Image


def pattern(width, height):
    """pixel(x, y, c) = (x*37 + y*91 + c*53 + ((x*y) % 17)*7 + (x*x) % 29) % 256"""
    y, x, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    return ((x * 37 + y * 91 + c * 53 + ((x * y) % 17) * 7 + (x * x) % 29) % 256).astype(np.uint8)


def bucket_resize(image, bucket):
    """The algorithm of Musubi's resize_image_to_bucket, restated."""
    height, width = image.shape[:2]
    bw, bh = bucket
    if (bw, bh) == (width, height):
        return image
    scale = max(bw / width, bh / height)
    nw, nh = int(width * scale + 0.5), int(height * scale + 0.5)
    if scale > 1:
        out = np.array(Image.fromarray(image).resize((nw, nh), Image.LANCZOS))
    else:
        out = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return out[top : top + bh, left : left + bw]


cases = []
for kind, src, dst in [
    ("lanczos", (37, 23), (61, 40)),
    ("lanczos", (40, 30), (40, 47)),
    ("lanczos", (29, 31), (58, 31)),
    ("lanczos", (64, 48), (45, 31)),
    ("area", (64, 48), (32, 24)),
    ("area", (63, 45), (21, 15)),
    ("area", (64, 48), (45, 31)),
    ("area", (100, 70), (48, 34)),
    ("area", (50, 40), (49, 40)),
    ("bucket", (50, 30), (64, 48)),
    ("bucket", (100, 70), (48, 32)),
    ("bucket", (70, 100), (48, 64)),
]:
    image = pattern(*src)
    if kind == "lanczos":
        out = np.array(Image.fromarray(image).resize(dst, Image.LANCZOS))
    elif kind == "area":
        out = cv2.resize(image, dst, interpolation=cv2.INTER_AREA)
    else:
        out = bucket_resize(image, dst)
    assert out.shape == (dst[1], dst[0], 3), out.shape
    cases.append({"kind": kind, "source": list(src), "target": list(dst), "rgb_hex": out.tobytes().hex()})

json.dump(
    {"pillow": PIL.__version__, "opencv": cv2.__version__, "numpy": np.__version__, "cases": cases},
    sys.stdout,
    indent=1,
)
