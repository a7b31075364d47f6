"""Draws figures/views.png, the README's picture of poly-view, with polyview.py's own augmentations:

    python figures/views.py

Top row: a photograph (Grace Hopper, a public-domain US Navy portrait that ships with
matplotlib) and the M = 8 views that poly-view training draws of it at 224 px. Bottom
row: the M = 2 views that SimCLR would draw.
"""
import sys
from pathlib import Path

import torch
from matplotlib import cbook
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import polyview  # noqa: E402


def views_figure(path):
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    photo = v2.ToImage()(image)                                 # uint8 [3, 600, 512]
    torch.manual_seed(0)
    crops = [torch.stack([polyview.random_crop_and_flip(224)(photo) for _ in range(M)])
             for M in (8, 2)]                                   # uint8 [M, 3, 224, 224] each
    augmented = [polyview.device_augment(c[None], small_images=False) for c in crops]
    poly, simclr = (a[0] for a in augmented)                    # float [M, 3, 224, 224] each
    photo = polyview.centre_crop(224, small_images=True)(photo) / 255
    return polyview.save_grid([[photo, *poly], [torch.ones_like(photo), *simclr]], path)


if __name__ == "__main__":
    views_figure(Path(__file__).resolve().parent / "views.png")
