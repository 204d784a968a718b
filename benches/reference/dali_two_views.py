"""Reference: NVIDIA DALI's CPU pipeline doing BYOL's two-view augmentation on the same
shards byol reads (run with .venv-dali's Python, made by scripts/setup_dali).

  dali_two_views.py --data DIR [--batch 64] [--augment SETTINGS.json] [--size N]
                    [--threads 2] [--seconds 20] [--jitter-order random|fixed]
                    [--preview DIR] [--json]

Every stored image's bytes are read into memory first; fn.external_source feeds them in
shuffled order, epoch after epoch (whole batches only, as torchvision's drop_last). A
CPU-only pipeline (device_id None, --threads DALI threads, every operator on the CPU)
decodes each sample once (fn.decoders.image, RGB), then per view, with per-sample
random parameters and DALI conditionals (`if fn.random.coin_flip(...)`):
fn.random_resized_crop(size, area 0.08-1, aspect 3/4-4/3, bilinear, antialias),
ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2, fn.gaussian_blur (kernel
23 at 224 px, sigma 0.1-2.0) p 1.0 / 0.1, solarize p 0.0 / 0.2, then
fn.crop_mirror_normalize: the horizontal flip (p 0.5), float, normalise, CHW. --augment
takes byol's settings as JSON, as torchvision_two_views.py does (`byol bench augment
--reference dali` passes them), so all sides run the same. Prints images/s (an image =
both views) measured after the first batch; --preview DIR also writes one batch's first
views as PNGs (un-normalised, flags in the names, plus grid.png).

What differs from torchvision (torchvision_two_views.py) and why:
- Colour jitter order. torchvision applies brightness, contrast, saturation and hue in
  a random order per sample; so does byol. DALI has no such op: with --jitter-order
  random (the default) the order is a random permutation per sample, drawn as an index
  and applied as one round of per-sample conditionals per position (each sample still
  takes each op once, four passes, as torchvision). In DALI's linear colour model the
  four ops commute but for the uint8 clamping and rounding between them, so the order
  matters less than with torchvision's exact hue. --jitter-order fixed is the usual DALI
  way, one fn.color_twist per view (one pass, fixed order, and contrast about mid-grey
  128, not the image's mean): cheaper, not the same distribution.
- Colour formulas. Brightness and contrast are torchvision's (contrast blends towards
  the mean of the image's grey, computed per sample). Saturation and hue use fn.hsv,
  which DALI approximates by a linear transform in RGB (a rotation about the grey axis
  in YIQ), not torchvision's exact RGB→HSV→RGB; saturation 0 is the same luma grey,
  hue shifts differ slightly in value and the sign convention may differ (the range is
  symmetric). Hue is in degrees in DALI: torchvision's ±0.1 of the circle → ±36°.
- Rounding. DALI rounds uint8 results to nearest with saturation; torchvision v2
  truncates after clamping in its blends. At most one grey level per op.
- Crop and resize. DALI's own random_resized_crop (same area/aspect ranges, 10
  attempts, then a fallback crop) and its antialiased bilinear resampler, not
  torchvision's; the flip is done by crop_mirror_normalize (it commutes with the rest).
- Grayscale is fn.color_space_conversion RGB→GRAY→RGB (BT.601 luma, as torchvision).
  Blur is fn.gaussian_blur (window fixed, sigma per sample, mirrored borders like
  torchvision's reflect padding). Solarize is a 256-entry fn.lookup_table
  (x >= threshold·255 → 255 − x), as RandomSolarize on uint8.
- Threads. DALI runs --threads threads in one process (plus its own prefetching); the
  torchvision script runs --workers processes. Labels are not carried (no model here).
"""

import argparse
import itertools
import json
import os
import struct
import time
import zlib

import numpy as np
import pyarrow.parquet as pq
import nvidia.dali as dali
import nvidia.dali.fn as fn
import nvidia.dali.types as types
from nvidia.dali import pipeline_def

from byol_settings import blur_kernel, load_augment


def read_shards(root):
    """Every image of byol's shards (manifest.json + Parquet "image" bytes) in memory,
    as uint8 arrays, in manifest order."""
    m = json.load(open(os.path.join(root, "manifest.json")))
    images = []
    for s in m["shards"]:
        col = pq.read_table(os.path.join(root, s["file"]), columns=["image"]).column("image")
        images += [np.frombuffer(b, dtype=np.uint8) for b in col.to_pylist()]
    return images


def coin(p):
    """A per-sample boolean, true with probability p."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def uniform(lo, hi):
    """Per sample: U(lo, hi), or lo where the range is empty (DALI refuses [a, a))."""
    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


def factor(x):
    """torchvision's ColorJitter range for brightness/contrast/saturation x."""
    return uniform(max(0.0, 1 - x), 1 + x)


def gray_mean(img):
    """Per sample: the mean of the image's luma (torchvision's contrast centre)."""
    g = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY, device="cpu")
    return fn.reductions.mean(g, dtype=types.FLOAT, device="cpu")


def colour_op(img, op, v):
    """One of ColorJitter's four ops, with its per-sample factor."""
    if op == "brightness":
        return fn.brightness_contrast(img, brightness=factor(v["brightness"]), device="cpu")
    if op == "contrast":
        return fn.brightness_contrast(img, contrast=factor(v["contrast"]), contrast_center=gray_mean(img),
                                      device="cpu")
    if op == "saturation":
        return fn.hsv(img, saturation=factor(v["saturation"]), device="cpu")
    return fn.hsv(img, hue=uniform(-360 * v["hue"], 360 * v["hue"]), device="cpu")


def op_at(img, at_k, ops, j, v):
    """ops[at_k] on each sample, as an if/else chain (the last op needs no test)."""
    if j + 1 < len(ops):
        if at_k == j:
            img = colour_op(img, ops[j], v)
        else:
            img = op_at(img, at_k, ops, j + 1, v)
    else:
        img = colour_op(img, ops[j], v)
    return img


def jitter_random_order(img, v):
    """ColorJitter in a random order per sample: a permutation index, then, for each
    position, the op at that position as per-sample conditionals (each sample takes each
    op once)."""
    ops = [o for o in ("brightness", "contrast", "saturation", "hue") if v[o] > 0]
    perms = list(itertools.permutations(range(len(ops))))
    perm = fn.random.uniform(values=list(range(len(perms))), dtype=types.INT32)
    for k in range(len(ops)):
        at_k = fn.lookup_table(perm, keys=list(range(len(perms))), values=[p[k] for p in perms],
                               dtype=types.INT32, device="cpu")
        img = op_at(img, at_k, ops, 0, v)
    return img


def jitter_fixed_order(img, v):
    """The usual DALI colour jitter: one fn.color_twist (fixed order, contrast about 128)."""
    return fn.color_twist(img, brightness=factor(v["brightness"]), contrast=factor(v["contrast"]),
                          saturation=factor(v["saturation"]),
                          hue=uniform(-360 * v["hue"], 360 * v["hue"]), device="cpu")


def view(img, a, v, order, flags):
    """One view (float CHW, normalised) of the decoded uint8 HWC `img`; `flags` collects
    the per-sample coin flips (for --preview)."""
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}[a["interpolation"]]
    s = a["size"]
    img = fn.random_resized_crop(img, size=[s, s], random_area=list(v["crop_scale"]),
                                 random_aspect_ratio=list(v["crop_ratio"]), interp_type=interp, antialias=True,
                                 device="cpu")
    jitter = v["jitter_p"] > 0 and any(v[o] > 0 for o in ("brightness", "contrast", "saturation", "hue"))
    if jitter:
        c = coin(v["jitter_p"])
        flags["jitter"] = c
        if c:
            img = jitter_random_order(img, v) if order == "random" else jitter_fixed_order(img, v)
    if v["grayscale_p"] > 0:
        c = coin(v["grayscale_p"])
        flags["gray"] = c
        if c:
            g = fn.color_space_conversion(img, image_type=types.RGB, output_type=types.GRAY, device="cpu")
            img = fn.color_space_conversion(g, image_type=types.GRAY, output_type=types.RGB, device="cpu")
    if v["blur_p"] > 0:
        c = coin(v["blur_p"])
        flags["blur"] = c
        if c:
            img = fn.gaussian_blur(img, window_size=blur_kernel(a),
                                   sigma=uniform(*v["blur_sigma"]), device="cpu")
    if v["solarize_p"] > 0:
        c = coin(v["solarize_p"])
        flags["solarize"] = c
        if c:
            t = v["solarize_threshold"] * 255
            img = fn.lookup_table(img, keys=list(range(256)), values=[255 - x if x >= t else x for x in range(256)],
                                  dtype=types.UINT8, device="cpu")
    flip = fn.random.coin_flip(probability=v["flip_p"], dtype=types.INT32)
    flags["flip"] = flip
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW", mirror=flip,
                                    mean=[m * 255 for m in a["mean"]], std=[d * 255 for d in a["std"]],
                                    device="cpu")


def batches(images, batch, seed):
    """external_source's source: a generator function of shuffled whole batches, epoch
    after epoch. (Made outside the pipeline function: AutoGraph, which turns its `if`s
    into conditionals, refuses a generator defined inside it.)"""
    def gen():
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(images))
            for i in range(0, len(images) - batch + 1, batch):
                yield [images[j] for j in order[i:i + batch]]
    return gen


@pipeline_def(enable_conditionals=True)
def two_views(source, a, order, preview):
    jpegs = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, device="cpu")
    img = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    f1, f2 = {}, {}
    v1 = view(img, a, a["view1"], order, f1)
    v2 = view(img, a, a["view2"], order, f2)
    if not preview:
        return v1, v2
    a["_flag_names"] = [("v1", n) for n in sorted(f1)] + [("v2", n) for n in sorted(f2)]
    return (v1, v2, *[f1[n] for n in sorted(f1)], *[f2[n] for n in sorted(f2)])


def write_png(path, rgb):
    """An 8-bit RGB PNG (HWC uint8) with zlib only."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def preview(pipe, a, out, n=8):
    """One batch's first n samples, both views un-normalised, as PNGs (the coin flips in
    the names) and a grid (row i: sample i's view 1 | view 2; magnified below 112 px)."""
    os.makedirs(out, exist_ok=True)
    res = pipe.run()
    mean = np.array(a["mean"]).reshape(3, 1, 1) * 255
    std = np.array(a["std"]).reshape(3, 1, 1) * 255
    views = [res[0].as_array(), res[1].as_array()]
    flags = [np.array(t.as_array()).reshape(-1) for t in res[2:]]
    rows = []
    for i in range(min(n, views[0].shape[0])):
        row = []
        for k, x in enumerate(views):
            img = np.clip(np.rint(x[i] * std + mean), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            on = [name for (v, name), f in zip(a["_flag_names"], flags) if v == f"v{k + 1}" and f[i]]
            write_png(os.path.join(out, f"{i:02d}_v{k + 1}_{'-'.join(on) or 'plain'}.png"), img)
            row.append(img)
        rows.append(np.concatenate([row[0], np.full((row[0].shape[0], 4, 3), 255, np.uint8), row[1]], axis=1))
    sep = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate(sum(([r, sep] for r in rows), [])[:-1], axis=0)
    z = max(1, 112 // a["size"])  # small views (28 px) magnified, nearest neighbour
    write_png(os.path.join(out, "grid.png"), grid.repeat(z, axis=0).repeat(z, axis=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, help="view side (default: the settings')")
    ap.add_argument("--augment", help="byol's augmentation settings as JSON (default: BYOL's at 224 px)")
    ap.add_argument("--threads", type=int, default=2, help="DALI's CPU threads (num_threads)")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--jitter-order", choices=["random", "fixed"], default="random",
                    help="colour jitter: a random op order per sample as torchvision (default), or color_twist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preview", metavar="DIR", help="also write one batch's views as PNGs to DIR")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    aug = load_augment(a.augment, a.size)
    images = read_shards(a.data)
    if len(images) < a.batch:
        raise SystemExit(f"{a.data}: {len(images)} images, fewer than one batch of {a.batch}")
    kw = dict(batch_size=a.batch, num_threads=a.threads, device_id=None, seed=a.seed, prefetch_queue_depth=2)
    if a.preview:
        p = two_views(batches(images, a.batch, a.seed), aug, a.jitter_order, True, **kw)
        p.build()
        preview(p, aug, a.preview)
        del p
    pipe = two_views(batches(images, a.batch, a.seed), aug, a.jitter_order, False, **kw)
    pipe.build()
    n, t0 = 0, None
    while True:
        v1, v2 = pipe.run()
        if t0 is None:  # warm-up batch
            t0 = time.perf_counter()
            continue
        n += len(v1)
        if time.perf_counter() - t0 >= a.seconds:
            break
    s = time.perf_counter() - t0
    r = {"command": "dali_two_views", "images_per_s": n / s, "batch": a.batch, "size": aug["size"],
         "threads": a.threads, "seconds": s, "jitter_order": a.jitter_order, "dali_version": dali.__version__}
    print(json.dumps(r) if a.json else f"{r['images_per_s']:.0f} images/s (DALI CPU pipeline, {a.threads} threads)")


if __name__ == "__main__":
    main()
