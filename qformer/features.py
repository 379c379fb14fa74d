"""A disk cache of frozen-encoder image tokens, so that stage-1 training runs the image encoder once.

Layout of a cache directory:

    features.npy   [N_img, N, C] array (fp16 by default), row i = image i of `paths`; memory-mapped on read
    index.json     {"paths", "shape", "dtype", "encoder" (spec), "augment_seed" (null: no augmentation),
                    "skipped": {path: reason}, "complete"}

Building is crash-safe and resumable: rows go into `features.npy.partial` (a memory-mapped .npy) and
`progress.json` records how many rows are done (and which images were skipped) after every flushed
batch; a rebuild with the same paths and encoder continues from there. Only when every row is written
is the array renamed to `features.npy` and `index.json` written (atomically, via a temporary file), so a
directory with an `index.json` always holds a complete cache.

An augmented view (`augment_seed` set) encodes every image through the encoder's training transform (BLIP-2's
random resized crop + flip), the draw of image i seeded by (augment_seed, i): the same view on every machine
and after any resume. Stage 1 reads several such views (`--cache-views`) instead of running the encoder live.

An image that cannot be read (missing, truncated, not an image) is logged with the reason, recorded
in `skipped`, its row left as zeros and marked invalid (`FeatureCache.valid`); the build goes on.

An image path may name a member of a (webdataset) tar shard as `<tar path>::<member name>`, the key
format of `qformer.sources`; `read_image` and the indexer both read such members with `read_tar_member`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from qformer.decode import BadImage, load_image
from qformer.encoders import ImageEncoder
from qformer.workers import lower_priority

logger = logging.getLogger(__name__)

FEATURES = "features.npy"
INDEX = "index.json"
PARTIAL = "features.npy.partial"
PROGRESS = "progress.json"
_DTYPES = {"float16": np.float16, "float32": np.float32}
TAR_SEP = "::"  # "<tar path>::<member name>": an image inside a tar shard


def split_tar_path(path: str | Path) -> tuple[str, str] | None:
    """(tar path, member name) of a "<tar>::<member>" path; None for a plain file path."""
    tar, sep, member = str(path).partition(TAR_SEP)
    return (tar, member) if sep else None


@functools.lru_cache(maxsize=64)
def _tar_members(tar_path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of an uncompressed tar; (mtime, size) key a changed file anew."""
    with tarfile.open(tar_path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}


def read_tar_member(tar_path: str, member: str, offset: int = -1, size: int = -1) -> bytes:
    """The bytes of one member of a tar shard. An uncompressed `.tar` is read by seeking to the member's
    data (`offset`/`size` when known, else looked up in a per-process index of the shard); a compressed
    one is decompressed up to the member. Raises FileNotFoundError (no shard or no such member) or OSError."""
    try:
        if offset < 0 and tar_path.lower().endswith(".tar"):
            st = os.stat(tar_path)
            found = _tar_members(tar_path, st.st_mtime_ns, st.st_size).get(member)
            if found is None:
                raise FileNotFoundError(f"{tar_path}: no member {member}")
            offset, size = found
        if offset >= 0:
            with open(tar_path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
            if len(data) != size:
                raise OSError(f"{tar_path}: member {member} is cut short ({len(data)} of {size} bytes)")
            return data
        with tarfile.open(tar_path) as tf:  # compressed shard: no random access
            try:
                fobj = tf.extractfile(member)
            except KeyError:
                raise FileNotFoundError(f"{tar_path}: no member {member}") from None
            if fobj is None:
                raise OSError(f"{tar_path}: member {member} is not a regular file")
            return fobj.read()
    except tarfile.TarError as e:
        raise OSError(f"{tar_path}: {e}") from e


def read_image(path: Path, transform: Callable[[Image.Image], Tensor]) -> tuple[Tensor | None, str]:
    """(pixels, "") or (None, reason) for an image that cannot be decoded; never raises for bad files.
    `path` is a file or a tar member ("<tar>::<member>")."""
    try:
        member = split_tar_path(path)
        return transform(load_image(read_tar_member(*member) if member else path)), ""
    except FileNotFoundError:
        return None, "file not found"
    except BadImage as e:
        return None, str(e)
    except OSError as e:  # a tar that cannot be read
        return None, f"{type(e).__name__}: {e}"


def view_seed(augment_seed: int, image: int) -> int:
    """The 32-bit seed of the random crop and flip of image `image` in augmented view `augment_seed` (torch's
    CPU generator keeps only 32 bits of a seed, so the two are mixed, not packed)."""
    return int(np.random.SeedSequence([augment_seed, image]).generate_state(1)[0])


class _ImageFiles(Dataset):
    """Image i -> (i, pixels [3,S,S] or None, reason); with `seeds`, the transform's random draws of image i
    come from seeds[i]."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], Tensor],
                 seeds: Sequence[int] | None = None):
        self.paths, self.transform, self.seeds = list(paths), transform, seeds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str]:
        if self.seeds is None:
            return i, *read_image(self.paths[i], self.transform)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seeds[i])
            return i, *read_image(self.paths[i], self.transform)


def _collate(items: list[tuple[int, Tensor | None, str]]) -> list[tuple[int, Tensor | None, str]]:
    return items  # stacked in the main process, after dropping unreadable images


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a crash leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class FeatureCache:
    """Read side: `cache[i]` -> tokens [N,C], `cache[[i, j]]` -> [k,N,C] (torch, stored dtype).

    The array is memory-mapped lazily (and re-opened after pickling, e.g. in DataLoader workers).
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory}: no {INDEX}; not a (complete) feature cache")
        index = json.loads(index_path.read_text())
        self.paths: list[str] = index["paths"]
        self.shape: tuple[int, ...] = tuple(index["shape"])
        self.dtype: str = index["dtype"]
        self.encoder: dict[str, Any] = index["encoder"]
        self.skipped: dict[str, str] = index["skipped"]
        self.augment_seed: int | None = index.get("augment_seed")
        self.valid = np.array([p not in self.skipped for p in self.paths], dtype=bool)  # [N_img]
        self._row = {p: i for i, p in enumerate(self.paths)}
        self._array: np.ndarray | None = None

    # -- building ----------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model_or_encoder: Any,
        paths: Sequence[str | Path],
        out_dir: str | Path,
        batch_size: int = 64,
        num_workers: int = 0,
        dtype: str = "float16",
        flush_every: int = 8,
        progress: bool = True,
        augment_seed: int | None = None,
    ) -> FeatureCache:
        """Encode every image of `paths` with the frozen encoder (a `Blip2Retriever` or an `ImageEncoder`)
        and store the tokens in `out_dir`; returns the opened cache.

        A complete cache for the same paths, encoder and augmentation is reused as is; a partial one is
        resumed; any other cache there is an error (use another directory). `flush_every`: batches between
        progress records (what a crash can lose). `augment_seed`: store one augmented view (the encoder's
        training transform, image i drawn from `view_seed(augment_seed, i)`) instead of the plain images.
        """
        encoder: ImageEncoder = getattr(model_or_encoder, "encoder", model_or_encoder)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        keys = [str(p) for p in paths]
        if len(set(keys)) != len(keys):
            raise ValueError("FeatureCache.build: duplicate image paths")
        spec = encoder.spec()
        if (out / INDEX).is_file():
            cache = cls(out)
            if (cache.paths, cache.encoder, cache.dtype, cache.augment_seed) != (keys, spec, dtype, augment_seed):
                raise ValueError(f"{out}: holds a feature cache of other images, encoder, dtype or augmentation; "
                                 "use another directory or delete it")
            return cache

        device = next(encoder.parameters()).device
        with torch.inference_mode():
            probe = torch.zeros(1, 3, encoder.image_size, encoder.image_size, device=device)
            n_tok, width = encoder(probe).shape[1:]
        shape = (len(keys), int(n_tok), int(width))

        done, skipped = 0, {}
        progress_path = out / PROGRESS
        if progress_path.is_file() and (out / FEATURES).is_file() and not (out / PARTIAL).is_file():
            os.replace(out / FEATURES, out / PARTIAL)  # died between the final rename and writing the index
        if progress_path.is_file() and (out / PARTIAL).is_file():
            state = json.loads(progress_path.read_text())
            if (state["paths"] == keys and state["encoder"] == spec and state["dtype"] == dtype
                    and state.get("augment_seed") == augment_seed):
                done, skipped = state["done"], state["skipped"]
                logger.info("resuming feature cache %s at image %d of %d", out, done, len(keys))
        if done == 0:
            arr = np.lib.format.open_memmap(out / PARTIAL, mode="w+", dtype=_DTYPES[dtype], shape=shape)
        else:
            arr = np.load(out / PARTIAL, mmap_mode="r+")

        def record(arr: np.ndarray, done: int) -> None:  # rows before `done` are on disk
            arr.flush()
            _write_json(progress_path, {"paths": keys, "encoder": spec, "dtype": dtype,
                                        "augment_seed": augment_seed, "done": done, "skipped": skipped})

        start = done  # loader item i is image start + i
        if augment_seed is None:
            files = _ImageFiles([Path(k) for k in keys[start:]], encoder.preprocess())
        else:
            files = _ImageFiles([Path(k) for k in keys[start:]], encoder.train_transform(),
                                [view_seed(augment_seed, i) for i in range(start, len(keys))])
        loader = DataLoader(files, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                            worker_init_fn=lower_priority)
        desc = "image features" if augment_seed is None else f"image features, augmented view {augment_seed}"
        bar = tqdm(total=len(keys), initial=done, desc=desc, unit="img", disable=not progress)
        for n_batch, items in enumerate(loader, start=1):
            good = []
            for i, pixels, reason in items:
                if pixels is None:
                    key = keys[start + i]
                    logger.warning("skipping image %s: %s", key, reason)
                    skipped[key] = reason
                else:
                    good.append((i, pixels))
            if good:
                rows = np.array([start + i for i, _ in good])
                with torch.inference_mode():
                    tokens = encoder(torch.stack([p for _, p in good]).to(device))  # [b,N,C]
                arr[rows] = tokens.float().cpu().numpy().astype(arr.dtype)
            done += len(items)
            bar.update(len(items))
            if n_batch % flush_every == 0:
                record(arr, done)
        bar.close()
        record(arr, done)
        del arr
        os.replace(out / PARTIAL, out / FEATURES)
        _write_json(out / INDEX, {"paths": keys, "shape": list(shape), "dtype": dtype, "encoder": spec,
                                  "augment_seed": augment_seed, "skipped": skipped, "complete": True})
        progress_path.unlink(missing_ok=True)
        if skipped:
            logger.warning("feature cache %s: skipped %d of %d images (see %s)", out, len(skipped), len(keys),
                           out / INDEX)
        return cls(out)

    @classmethod
    def open(cls, directory: str | Path) -> FeatureCache:
        """A complete cache directory (raises FileNotFoundError otherwise)."""
        return cls(directory)

    # -- reading -----------------------------------------------------------------------------------------
    @property
    def array(self) -> np.ndarray:
        """The memory-mapped [N_img,N,C] array."""
        if self._array is None:
            self._array = np.load(self.directory / FEATURES, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # never pickle the mapped data

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: int | slice | Sequence[int] | np.ndarray | Tensor) -> Tensor:
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        return torch.from_numpy(np.array(self.array[idx]))  # a copy: the map stays read-only

    def row(self, path: str | Path) -> int:
        """Row of an image path."""
        return self._row[str(path)]
