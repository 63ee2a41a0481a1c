"""Writes a Hugging Face Hub cache holding a generated image dataset in parquet, the layout
`simclr --dataset hf:OWNER/NAME` reads offline: measures the Hub reader's memory on a dataset
larger than a chosen cache budget (docs/data.md).

Each image is uniform noise (so PNG cannot shrink it) of SIZE x SIZE RGB pixels; labels cycle
over 10 classes. The `train` split has --images rows, the `test` split --test-images, in row
groups of --row-group rows, as the `datasets` library writes them (an `image` struct column
with `bytes` and `path`, an int64 `label` column, ClassLabel names in the file metadata).

    python bench/make_hub_parquet.py --cache /tmp/hubcache --images 100000
    HF_HUB_CACHE=/tmp/hubcache HF_HUB_OFFLINE=1 simclr pretrain --dataset hf:gen/noise ...

Needs numpy, pyarrow and pillow (never a CI dependency).
"""
import argparse
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_split(root: Path, split: str, n: int, size: int, row_group: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    path = root / f"snapshots/{COMMIT}/data/{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    features = {
        "image": {"_type": "Image"},
        "label": {"_type": "ClassLabel", "names": [f"class{i}" for i in range(10)]},
    }
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    total = 0
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, row_group):
            rows = range(start, min(n, start + row_group))
            images = []
            for i in rows:
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="PNG")
                images.append({"bytes": buf.getvalue(), "path": f"{i}.png"})
                total += len(images[-1]["bytes"])
            table = pa.table(
                {"image": images, "label": [i % 10 for i in rows]}, schema=schema
            )
            w.write_table(table, row_group_size=row_group)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--repo", default="gen/noise")
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--test-images", type=int, default=1_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--row-group", type=int, default=1_000)
    a = p.parse_args()
    owner, name = a.repo.split("/")
    root = a.cache / f"datasets--{owner}--{name}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs/main").write_text(COMMIT)
    for split, n, seed in [("train", a.images, 0), ("test", a.test_images, 1)]:
        b = write_split(root, split, n, a.size, a.row_group, seed)
        print(f"{split}: {n} images, {b / 2**20:.1f} MiB of PNG, {n * a.size * a.size * 3 / 2**20:.1f} MiB decoded")


if __name__ == "__main__":
    main()
