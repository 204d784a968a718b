"""Reference: a torchvision DataLoader doing BYOL's two-view augmentation on the same
shards byol reads (run with the project's venv).

  torchvision_two_views.py --data DIR [--batch 64] [--augment SETTINGS.json] [--size N]
                           [--workers 2] [--seconds 20] [--json]

Each sample: the stored JPEG decoded with PIL, then per view torchvision.transforms.v2:
RandomResizedCrop(size, scale 0.08-1, bilinear, antialias) + horizontal flip,
ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, Gaussian blur (kernel 23
at 224 px, sigma 0.1-2.0) p 1.0 / 0.1, solarize p 0.0 / 0.2, float + normalise: the
usual way a PyTorch BYOL script feeds its model. --augment takes byol's settings as
JSON (`byol bench augment --config` passes a preset's), so both sides run the same. Prints images/s (an image = both
views) measured after the first batch.
"""

import argparse
import io
import json
import os
import time

import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from byol_settings import blur_kernel, load_augment


class Shards(Dataset):
    def __init__(self, root):
        m = json.load(open(os.path.join(root, "manifest.json")))
        self.files = [os.path.join(root, s["file"]) for s in m["shards"]]
        self.index = []
        for f, s in zip(self.files, m["shards"]):
            self.index += [(f, i) for i in range(s["rows"])]
        self.tables = {}

    def __len__(self):
        return len(self.index)

    def row(self, i):
        f, r = self.index[i]
        if f not in self.tables:  # per worker process, memory-mapped
            self.tables[f] = pq.read_table(f, memory_map=True, columns=["image", "label"])
        t = self.tables[f]
        return t.column("image")[r].as_py(), t.column("label")[r].as_py()


def view(a, v):
    """One view as torchvision.transforms.v2 ops, from byol's settings `a` and view `v`."""
    interp = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}[a["interpolation"]]
    return v2.Compose([
        v2.RandomResizedCrop(a["size"], scale=tuple(v["crop_scale"]), ratio=tuple(v["crop_ratio"]),
                             interpolation=interp, antialias=True),
        v2.RandomHorizontalFlip(v["flip_p"]),
        v2.RandomApply([v2.ColorJitter(v["brightness"], v["contrast"], v["saturation"], v["hue"])], p=v["jitter_p"]),
        v2.RandomGrayscale(p=v["grayscale_p"]),
        v2.RandomApply([v2.GaussianBlur(blur_kernel(a), sigma=tuple(v["blur_sigma"]))], p=v["blur_p"]),
        v2.RandomSolarize(v["solarize_threshold"] * 255, p=v["solarize_p"]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(a["mean"]), list(a["std"])),
    ])


class TwoViews(Dataset):
    def __init__(self, shards, augment):
        self.s = shards
        self.t1 = view(augment, augment["view1"])
        self.t2 = view(augment, augment["view2"])
        self.to_image = v2.ToImage()

    def __len__(self):
        return len(self.s)

    def __getitem__(self, i):
        b, label = self.s.row(i)
        img = self.to_image(Image.open(io.BytesIO(b)).convert("RGB"))
        return self.t1(img), self.t2(img), label


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, help="view side (default: the settings')")
    ap.add_argument("--augment", help="byol's augmentation settings as JSON (default: BYOL's at 224 px)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    aug = load_augment(a.augment, a.size)
    ds = TwoViews(Shards(a.data), aug)
    dl = DataLoader(ds, batch_size=a.batch, shuffle=True, num_workers=a.workers, drop_last=True,
                    persistent_workers=a.workers > 0)
    n, t0 = 0, None
    while True:
        for v1, v2_, _ in dl:
            if t0 is None:
                t0 = time.perf_counter()
                continue
            n += v1.shape[0]
            if time.perf_counter() - t0 >= a.seconds:
                break
        else:
            continue
        break
    s = time.perf_counter() - t0
    r = {"command": "torchvision_two_views", "images_per_s": n / s, "batch": a.batch, "size": aug["size"],
         "workers": a.workers, "seconds": s, "torch_threads": torch.get_num_threads()}
    print(json.dumps(r) if a.json else f"{r['images_per_s']:.0f} images/s (torchvision DataLoader, {a.workers} workers)")


if __name__ == "__main__":
    main()
