"""Generated COCO-style ground truth and perturbed results for the evaluation tests (helpers)."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
from scipy import ndimage

CATEGORY_IDS = (3, 7, 12, 40)  # non-contiguous json ids on purpose


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> list[float]:
    """A star-shaped polygon around (cx, cy) with mean radius r (flat x, y list)."""
    n = int(rng.integers(6, 12))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.7, 1.3, n)
    xs, ys = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
    return np.stack([xs, ys], 1).reshape(-1).round(2).tolist()


def make_coco_gt(seed: int = 0, num_images: int = 6, height: int = 160, width: int = 200) -> dict:
    """COCO ground truth: polygons, RLE, crowd regions, small/medium/large objects."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(num_images):
        image_id = 1000 + 7 * i  # arbitrary image ids
        images.append(
            {"id": image_id, "file_name": f"img_{i}.png", "height": height, "width": width}
        )
        for j in range(int(rng.integers(3, 7))):
            # radii chosen to land in small (<32^2), medium and large (>96^2) areas
            r = float(rng.choice([6.0, 12.0, 25.0, 60.0]))
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            poly = _polygon(rng, cx, cy, r)
            rle = mask_util.merge(mask_util.frPyObjects([poly], height, width))
            segm: object = [poly]
            if j == 2:  # some annotations stored as uncompressed RLE
                m = mask_util.decode(rle)
                segm = {"size": [height, width], "counts": _uncompressed(m)}
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(CATEGORY_IDS)),
                    "segmentation": segm,
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        if i % 2 == 0:  # a crowd region as compressed RLE
            m = np.zeros((height, width), np.uint8)
            y0, x0 = int(rng.integers(0, height - 40)), int(rng.integers(0, width - 60))
            m[y0 : y0 + 40, x0 : x0 + 60] = 1
            rle = mask_util.encode(np.asfortranarray(m))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice(CATEGORY_IDS)),
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                    "area": float(mask_util.area(rle)),
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "iscrowd": 1,
                }
            )
    categories = [{"id": c, "name": f"thing_{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": anns, "categories": categories}


def _uncompressed(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with zeros)."""
    flat = mask.reshape(-1, order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return [int(c) for c in counts]


def ann_to_mask(ann: dict, height: int, width: int) -> np.ndarray:
    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_util.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_util.decode(rle).astype(bool)


def perturb_results(gt: dict, seed: int = 0) -> list[dict]:
    """Detections made from the ground truth: dilated/eroded/shifted masks, noisy scores,
    dropped objects, class swaps, duplicates, false positives, hits on crowd regions."""
    rng = np.random.default_rng(seed)
    size = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    cats = [c["id"] for c in gt["categories"]]
    results = []
    for ann in gt["annotations"]:
        h, w = size[ann["image_id"]]
        m = ann_to_mask(ann, h, w)
        if rng.random() < 0.15:
            continue  # missed
        op = int(rng.integers(0, 4))
        if op == 0:
            m = ndimage.binary_dilation(m, iterations=int(rng.integers(1, 4)))
        elif op == 1:
            eroded = ndimage.binary_erosion(m, iterations=int(rng.integers(1, 3)))
            m = eroded if eroded.any() else m
        elif op == 2:
            m = np.roll(m, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), axis=(0, 1))
        cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
        results.append(det(ann["image_id"], cat, m, float(rng.uniform(0.05, 1.0))))
        if rng.random() < 0.2:  # duplicate with a lower score
            results.append(det(ann["image_id"], cat, m, float(rng.uniform(0.0, 0.3))))
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        for _ in range(int(rng.integers(0, 3))):  # false positives
            m = np.zeros((h, w), bool)
            y, x = int(rng.integers(0, h - 20)), int(rng.integers(0, w - 20))
            m[y : y + int(rng.integers(4, 20)), x : x + int(rng.integers(4, 20))] = True
            results.append(det(im["id"], int(rng.choice(cats)), m, float(rng.uniform(0, 0.6))))
    return results


def det(image_id: int, cat: int, mask: np.ndarray, score: float) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "image_id": image_id,
        "category_id": cat,
        "segmentation": rle,
        "score": round(score, 4),
        "bbox": mask_util.toBbox(rle).tolist(),
    }
