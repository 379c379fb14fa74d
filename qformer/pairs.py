"""Image-caption training pairs: readers for every training source, the dataset, and the seed-determined batch order.

- A reader turns (root, split) into `CaptionPairs`: all pairs known up front, shards listed once. That is
  what makes a resumable order easy: the batches of global step s depend only on (seed, s), wherever the
  images live (image files, or members of tar shards read by offset).
- `PairDataset` reads an image's frozen-encoder tokens from a feature cache (one of several cached views,
  picked by the pair's augmentation seed) or decodes and augments it live.
- `EpochBatches` draws each epoch's order as a permutation of (seed, epoch).
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from qformer.datasets import RetrievalSet, load_retrieval_set, pre_caption
from qformer.features import FeatureCache, read_image
from qformer.sources import TAR_SUFFIXES, expand_source, image_extensions, scan_manifest, scan_tar
from qformer.tokenizer import TRAIN_MAX_LENGTH, tokenize

logger = logging.getLogger(__name__)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts, e.g. derive_seed(seed, "epoch", 3)."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class HardNegatives:
    """ITM negatives mined beforehand: for each pair, K images that are not its image; for each image, K
    pairs whose caption is not about it (both most similar first)."""

    images_of_pair: Tensor  # [P,K] image indices
    pairs_of_image: Tensor  # [I,K] pair indices

    def draw(self, pair: int, image: int, seed: int) -> tuple[int, int]:
        """(negative image, negative pair) of a pair, drawn uniformly among its K from `seed`."""
        k1, k2 = np.random.default_rng(seed).integers(0, self.images_of_pair.shape[1], size=2)
        return int(self.images_of_pair[pair, k1]), int(self.pairs_of_image[image, k2])


@dataclass
class CaptionPairs:
    """Image-caption training pairs: unique images, and one entry per (image, caption) pair."""

    image_paths: list[Path]  # unique images
    captions: list[str]  # one per pair, already cleaned with pre_caption
    pair_image: list[int]  # image index (into image_paths) of each pair; equal index = same image

    def __len__(self) -> int:
        return len(self.captions)


def pairs_from_retrieval_set(rs: RetrievalSet) -> CaptionPairs:
    """Every (image, caption) of a RetrievalSet; repeated paths (one-caption-per-entry files) are merged."""
    paths: list[Path] = []
    index: dict[Path, int] = {}
    pair_image: list[int] = []
    for i in rs.txt2img:
        path = rs.image_paths[i]
        if path not in index:
            index[path] = len(paths)
            paths.append(path)
        pair_image.append(index[path])
    return CaptionPairs(paths, list(rs.texts), pair_image)


def _retrieval_set_reader(name: str) -> Callable[[Path, str], CaptionPairs]:
    return lambda root, split: pairs_from_retrieval_set(load_retrieval_set(name, root, split))


CAPTION_FIELDS = ("caption", "text")  # manifest columns / webdataset .json fields holding a sample's caption(s)


def _captions(meta: dict[str, Any], fields: Sequence[str]) -> list[str]:
    """The cleaned captions of a manifest row or shard sample: the first field present and non-empty (a list
    of strings gives several captions of one image)."""
    for name in fields:
        value = meta.get(name)
        values = value if isinstance(value, list | tuple) else [value]
        captions = [c for c in (pre_caption(str(v)) for v in values if v is not None) if c]
        if captions:
            return captions
    return []


def _pairs(samples: Iterable[tuple[Path, list[str]]]) -> CaptionPairs:
    """(image path, captions) samples -> CaptionPairs; samples naming the same path are one image."""
    paths: list[Path] = []
    index: dict[Path, int] = {}
    captions: list[str] = []
    pair_image: list[int] = []
    for path, caps in samples:
        if path not in index:
            index[path] = len(paths)
            paths.append(path)
        captions += caps
        pair_image += [index[path]] * len(caps)
    return CaptionPairs(paths, captions, pair_image)


def _warn_skipped(what: str, problems: list[tuple[str, str]], shown: int = 5) -> None:
    for path, reason in problems[:shown]:
        logger.warning("skipping %s %s: %s", what, path, reason)
    if len(problems) > shown:
        logger.warning("... and %d more %ss skipped", len(problems) - shown, what)


def read_manifest_pairs(path: Path, split: str) -> CaptionPairs:
    """Pairs of a CSV/Parquet manifest, read as `qsearch index` reads one (`qformer.sources.scan_manifest`):
    an image path column (`image`, `path`, ...; relative paths resolve against the manifest's folder) and a
    caption column (`caption` or `text`; a Parquet list column gives several captions). Rows naming the same
    image share its image id. With a `split` column, only the rows whose split is `split` are read."""
    items, missing = scan_manifest(Path(path))
    _warn_skipped("manifest row", missing)
    if any("split" in it.meta for it in items):
        splits = sorted({str(it.meta.get("split")) for it in items})
        items = [it for it in items if str(it.meta.get("split")) == split]
        if not items:
            raise ValueError(f"{path}: no rows of split {split!r} (its split column holds {splits})")
    if items and not any(f in items[0].meta for f in CAPTION_FIELDS):
        raise ValueError(f"{path}: no caption column (expected one of {list(CAPTION_FIELDS)}; columns are "
                         f"{sorted(items[0].meta)})")
    samples = [(Path(it.path), _captions(it.meta, CAPTION_FIELDS)) for it in items]
    _warn_skipped("manifest row", [(str(p), "no caption") for p, caps in samples if not caps])
    pairs = _pairs(samples)
    if not pairs.captions:
        raise ValueError(f"{path}: no usable (image, caption) rows")
    return pairs


def webdataset_shards(root: str | Path, split: str = "") -> list[Path]:
    """The tar shards of a webdataset source: a shard file, a brace or glob pattern (`shards/{000..099}.tar`,
    `shards/*.tar`), or a directory of shards (its `<split>/` subdirectory when there is one)."""
    root_path = Path(root)
    if root_path.is_dir():
        folder = root_path / split if split and (root_path / split).is_dir() else root_path
        shards = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
    else:
        shards = expand_source(root)
    missing = [p for p in shards if not p.is_file()]
    if missing or not shards:
        raise FileNotFoundError(f"{root}: no tar shard" + (f" ({missing[0]} does not exist)" if missing else ""))
    return shards


def read_webdataset_pairs(root: Path, split: str) -> CaptionPairs:
    """Pairs of webdataset tar shards (`webdataset_shards`), read with `qformer.sources.scan_tar`: a sample
    is `<key>.jpg|png|webp|...` with its caption in `<key>.txt` or in the "caption"/"text" field of
    `<key>.json`. Images stay inside the tars: their paths are `<tar>::<member>` (`qformer.features`).
    A shard that cannot be listed is skipped with a warning; an undecodable image later, at feature time."""
    extensions = image_extensions()
    samples: list[tuple[Path, list[str]]] = []
    for shard in webdataset_shards(root, split):
        try:
            items, problems = scan_tar(shard, extensions)
        except (OSError, ValueError, tarfile.TarError) as e:  # SourceError is a ValueError
            logger.warning("skipping shard %s: %s", shard, e)
            continue
        _warn_skipped("shard member", problems)
        samples += [(Path(it.path), _captions(it.meta, ("txt", *CAPTION_FIELDS))) for it in items]
    _warn_skipped("sample", [(str(p), "no caption (.txt, .json caption/text)") for p, caps in samples if not caps])
    pairs = _pairs(samples)
    if not pairs.captions:
        raise ValueError(f"{root}: no (image, caption) samples in its shards")
    return pairs


PAIR_READERS: dict[str, Callable[[Path, str], CaptionPairs]] = {
    **{name: _retrieval_set_reader(name) for name in ("flickr8k", "coco", "flickr30k", "lavis")},
    "manifest": read_manifest_pairs,
    "webdataset": read_webdataset_pairs,
}


def load_pairs(dataset: str, root: str | Path, split: str, max_images: int = 0) -> CaptionPairs:
    """Training pairs of a dataset by name (see PAIR_READERS); max_images > 0 keeps the first N images."""
    if dataset not in PAIR_READERS and not dataset.startswith("karpathy-"):
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(PAIR_READERS)} or karpathy-<name>")
    reader = PAIR_READERS.get(dataset) or _retrieval_set_reader(dataset)
    pairs = reader(Path(root), split)
    if max_images > 0:
        keep = [j for j, i in enumerate(pairs.pair_image) if i < max_images]
        pairs = CaptionPairs(pairs.image_paths[:max_images], [pairs.captions[j] for j in keep],
                             [pairs.pair_image[j] for j in keep])
    return pairs


class PairDataset(Dataset):
    """Item (pair index, augmentation seed) -> {"image" tokens [N,C] | "pixels" [3,S,S], "text", "image_id"},
    or None for an unreadable image (logged once, dropped by the collate function). With by_image, items
    are (image index, seed) and carry no text: batches of images (the caller knows their captions).

    With a FeatureCache the tokens are read from disk; with several (views of the same images), the seed picks
    the view. Otherwise the image is decoded and augmented with `transform`, seeded per item so that the crop
    does not depend on worker or restart.
    """

    def __init__(self, pairs: CaptionPairs, cache: FeatureCache | Sequence[FeatureCache] | None = None,
                 transform: Callable[[Image.Image], Tensor] | None = None, by_image: bool = False,
                 negatives: HardNegatives | None = None):
        if (cache is None) == (transform is None):
            raise ValueError("PairDataset needs exactly one of cache and transform")
        if negatives is not None and (cache is None or by_image):
            raise ValueError("PairDataset: mined negatives need cached features and pair items")
        self.negatives = negatives
        self.views = [] if cache is None else [cache] if isinstance(cache, FeatureCache) else list(cache)
        if any(v.paths != self.views[0].paths for v in self.views):
            raise ValueError("PairDataset: the cached views hold different images")
        self.pairs, self.cache, self.transform = pairs, self.views[0] if self.views else None, transform
        self.rows = None if cache is None else [self.cache.row(p) for p in pairs.image_paths]  # image -> cache row
        self.by_image = by_image
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.pairs.image_paths) if self.by_image else len(self.pairs)

    def usable(self) -> list[int]:
        """Item indices (pairs, or images with by_image) whose image made it into the cache (all in live
        mode)."""
        item_image = range(len(self.pairs.image_paths)) if self.by_image else self.pairs.pair_image
        if self.cache is None:
            return list(range(len(item_image)))
        return [j for j, i in enumerate(item_image) if self.cache.valid[self.rows[i]]]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any] | None:
        j, seed = item
        i = j if self.by_image else self.pairs.pair_image[j]
        out: dict[str, Any] = {"image_id": i} if self.by_image else {"text": self.pairs.captions[j], "image_id": i}
        if self.cache is not None:
            view = self.views[seed % len(self.views)]
            out["image"] = view[self.rows[i]]  # [N,C]
            if self.negatives is not None:  # the negatives of this pair in this epoch, from the same view
                neg_image, neg_pair = self.negatives.draw(j, i, seed)
                out["neg_image"], out["neg_text"] = view[self.rows[neg_image]], self.pairs.captions[neg_pair]
            return out
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the crop and flip of this pair in this epoch
            pixels, reason = read_image(self.pairs.image_paths[i], self.transform)
        if pixels is None:
            if i not in self._warned:
                self._warned.add(i)
                logger.warning("skipping image %s: %s", self.pairs.image_paths[i], reason)
            return None
        out["pixels"] = pixels
        return out


class Collate:
    """Items -> batch: {"image" [B,N,C] | "pixels" [B,3,S,S], "image_ids" [B], "texts": list[str]}, plus
    "input_ids" [B,L] and "text_mask" [B,L] with a tokenizer (None: texts stay strings, e.g. for an LLM's own
    tokenizer); None when every image of the batch was unreadable. Items without text give no texts. Items
    with mined negatives add "neg_image" [B,N,C], "neg_input_ids" [B,L'] and "neg_text_mask" [B,L']."""

    def __init__(self, tokenizer: Any = None, max_length: int = TRAIN_MAX_LENGTH):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        items = [x for x in items if x is not None]
        if not items:
            return None
        key = "image" if "image" in items[0] else "pixels"
        batch: dict[str, Any] = {key: torch.stack([x[key] for x in items]),
                                 "image_ids": torch.tensor([x["image_id"] for x in items])}
        if "text" in items[0]:
            batch["texts"] = [x["text"] for x in items]
            if self.tokenizer is not None:
                batch["input_ids"], batch["text_mask"] = tokenize(self.tokenizer, batch["texts"], self.max_length)
        if "neg_image" in items[0]:  # mined ITM negatives: an image for each text, a text for each image
            batch["neg_image"] = torch.stack([x["neg_image"] for x in items])
            batch["neg_input_ids"], batch["neg_text_mask"] = tokenize(
                self.tokenizer, [x["neg_text"] for x in items], self.max_length)
        return batch


class EpochBatches(Sampler):
    """Infinite batch sampler: global batch b (from `start_batch` on) = batch b % E of epoch b // E, where
    E = len(items) // batch_size (last partial batch dropped) and each epoch's order is a permutation
    drawn from (seed, epoch). Yields lists of (pair index, augmentation seed).

    With world_size > 1 (DDP), rank r gets the r-th contiguous slice of batch_size // world_size pairs of
    every global batch, so the ranks together see exactly the single-process order."""

    def __init__(self, items: Sequence[int], batch_size: int, seed: int, start_batch: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.items, self.batch_size, self.seed, self.start_batch = list(items), batch_size, seed, start_batch
        self.rank, self.world_size = rank, world_size
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} ranks")
        self.per_epoch = len(self.items) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(self.items)} usable pairs: fewer than one batch of {batch_size}")

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
        return torch.randperm(len(self.items), generator=g).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b, epoch, perm = self.start_batch, -1, []
        local = self.batch_size // self.world_size
        while True:
            e, k = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            start = k * self.batch_size + self.rank * local
            chosen = [self.items[p] for p in perm[start : start + local]]
            yield [(j, derive_seed(self.seed, "augment", epoch, j)) for j in chosen]
            b += 1



def retrieval_set_from_pairs(pairs: CaptionPairs, keep: Sequence[bool] | None = None) -> RetrievalSet:
    """The pairs as a RetrievalSet (image order kept, each image's captions in pair order); keep[i] False
    drops image i and its captions."""
    captions: list[list[str]] = [[] for _ in pairs.image_paths]
    for caption, i in zip(pairs.captions, pairs.pair_image, strict=True):
        captions[i].append(caption)
    out = RetrievalSet()
    for i, path in enumerate(pairs.image_paths):
        if (keep is None or keep[i]) and captions[i]:
            out.add_image(path, captions[i])
    return out


