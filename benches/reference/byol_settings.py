"""byol's augmentation settings for the reference scripts (no dependencies, so that every
reference venv can import it): the defaults of byol's AugmentConfig and the JSON that
`byol bench augment` writes (its fields, as in a config's [augment] section)."""

import json

# byol's defaults (AugmentConfig: BYOL's two views at 224 px); --augment replaces them.
VIEW1 = dict(crop_scale=[0.08, 1.0], crop_ratio=[3 / 4, 4 / 3], flip_p=0.5, jitter_p=0.8, brightness=0.4,
             contrast=0.4, saturation=0.2, hue=0.1, grayscale_p=0.2, blur_p=1.0, blur_sigma=[0.1, 2.0],
             solarize_p=0.0, solarize_threshold=0.5)
AUGMENT = dict(size=224, interpolation="bilinear", blur_kernel_224=23, mean=[0.485, 0.456, 0.406],
               std=[0.229, 0.224, 0.225], view1=VIEW1, view2=dict(VIEW1, blur_p=0.1, solarize_p=0.2))


def blur_kernel(a):
    """byol's AugmentConfig::blur_kernel: scaled with the size, odd, at least 3."""
    k = round(a["blur_kernel_224"] * a["size"] / 224)
    return max(k + 1 if k % 2 == 0 else k, 3)


def load_augment(path, size=None):
    """byol's augmentation settings: the JSON `byol bench augment` writes, else the defaults."""
    if path:
        with open(path) as f:
            a = json.load(f)
    else:
        a = json.loads(json.dumps(AUGMENT))
    if size:
        a["size"] = size
    return a
