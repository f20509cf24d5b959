"""Regenerates the quickstart photographs from scikit-image's sample data.

    pip download --no-deps scikit-image==0.24.0 && unzip the wheel's skimage/data/ to SRC
    python make.py SRC
"""
import os
import sys

from PIL import Image

SRC = sys.argv[1]
DST = os.path.dirname(os.path.abspath(__file__))
PHOTOS = [("astronaut", "astronaut.png"), ("chelsea", "chelsea.png"), ("coffee", "coffee.png"),
          ("rocket", "rocket.jpg"), ("hubble_deep_field", "hubble_deep_field.jpg"),
          ("retina", "retina.jpg"), ("coins", "coins.png")]

for name, f in PHOTOS:
    im = Image.open(os.path.join(SRC, f)).convert("RGB")
    w, h = im.size
    s = 160 / min(w, h)
    im = im.resize((max(160, round(w * s)), max(160, round(h * s))), Image.LANCZOS)
    im.save(os.path.join(DST, name + ".jpg"), quality=90)
