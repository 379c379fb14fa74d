"""Readers for image-text retrieval evaluation sets (Flickr8k, Karpathy JSON splits, LAVIS eval JSON).

Every reader returns a :class:`RetrievalSet`: images in a fixed order, all captions flattened (image-major,
with LAVIS ``pre_caption`` applied), and the index maps ``img2txt`` / ``txt2img`` used by
:func:`qformer.recall.recall_at_k`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "RetrievalSet",
    "load_flickr8k",
    "load_karpathy",
    "load_lavis",
    "load_retrieval_set",
    "pre_caption",
]


@dataclass
class RetrievalSet:
    """An evaluation set: images, flattened captions and the maps between them."""

    image_paths: list[Path] = field(default_factory=list)  # one per image
    texts: list[str] = field(default_factory=list)  # all captions, flattened, image-major
    img2txt: list[list[int]] = field(default_factory=list)  # caption indices of each image
    txt2img: list[int] = field(default_factory=list)  # image index of each caption

    def __len__(self) -> int:
        return len(self.image_paths)

    def add_image(self, path: Path, captions: list[str]) -> None:
        """Append one image and its (already processed) captions."""
        image_idx = len(self.image_paths)
        self.image_paths.append(path)
        first = len(self.texts)
        self.texts.extend(captions)
        self.img2txt.append(list(range(first, first + len(captions))))
        self.txt2img.extend([image_idx] * len(captions))

    def head(self, n: int) -> RetrievalSet:
        """The first n images with their captions (for quick runs)."""
        out = RetrievalSet()
        for i in range(min(n, len(self))):
            out.add_image(self.image_paths[i], [self.texts[t] for t in self.img2txt[i]])
        return out


_PUNCT = re.compile(r"([.!\"()*#:;~])")
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """LAVIS ``BlipCaptionProcessor.pre_caption``: lowercase, punctuation -> space, collapse runs of
    whitespace, strip, keep at most ``max_words`` words.
    """
    caption = _PUNCT.sub(" ", caption.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    return path


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"missing directory: {path}")
    return path


def _check_images(rs: RetrievalSet, what: str) -> RetrievalSet:
    """Raise ValueError if the set is empty, FileNotFoundError naming the first missing image."""
    if len(rs.image_paths) == 0:
        raise ValueError(f"{what}: no images in this split")
    missing = [p for p in rs.image_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} image file(s) missing, first: {missing[0]}")
    return rs


def _read_json(path: Path) -> object:
    with _require_file(path).open(encoding="utf-8") as f:
        return json.load(f)


_FLICKR8K_SPLITS = {"train": "train", "dev": "dev", "val": "dev", "test": "test"}


def load_flickr8k(root: Path, split: str) -> RetrievalSet:
    """Flickr8k in its original release format.

    ``root`` holds ``Flickr8k.token.txt`` (``<image>#<n>\\t<caption>`` lines), the split lists
    ``Flickr_8k.{train,dev,test}Images.txt`` and ``images/``. ``split`` is "train", "dev" (alias "val")
    or "test". Image order is the split list's order; each image's captions are ordered by ``#n``.
    """
    root = Path(root)
    if split not in _FLICKR8K_SPLITS:
        raise ValueError(f"unknown flickr8k split {split!r}; expected one of {sorted(_FLICKR8K_SPLITS)}")
    split_file = _require_file(root / f"Flickr_8k.{_FLICKR8K_SPLITS[split]}Images.txt")
    token_file = _require_file(root / "Flickr8k.token.txt")
    image_dir = _require_dir(root / "images")

    names = [ln.strip() for ln in split_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"{split_file}: duplicate image names")
    wanted = set(names)
    captions: dict[str, list[tuple[int, str]]] = {name: [] for name in names}
    for lineno, line in enumerate(token_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        name, hash_sep, num = key.strip().rpartition("#")
        if not sep or not hash_sep or not num.isdigit():
            raise ValueError(f"{token_file}:{lineno}: expected '<image>#<n>\\t<caption>', got {line!r}")
        if name in wanted:
            captions[name].append((int(num), text))

    rs = RetrievalSet()
    for name in names:
        caps = sorted(captions[name], key=lambda c: c[0])
        if not caps:
            raise ValueError(f"{token_file}: no captions for image {name} of split {split!r}")
        rs.add_image(image_dir / name, [pre_caption(text) for _, text in caps])
    return _check_images(rs, f"flickr8k {split}")


_KARPATHY_SPLITS = {"train": ("train", "restval"), "restval": ("restval",), "val": ("val",),
                    "dev": ("val",), "test": ("test",)}  # fmt: skip


def load_karpathy(json_path: Path, image_root: Path, split: str) -> RetrievalSet:
    """A Karpathy split file (``dataset_{coco,flickr30k,flickr8k}.json``).

    Format: ``{"images": [{"filepath"?, "filename", "split", "sentences": [{"raw": ...}, ...]}, ...]}``.
    ``split`` is "train" (includes "restval"), "restval", "val" (alias "dev") or "test". Image path is
    ``image_root/filepath/filename`` (``filepath`` is optional; COCO has e.g. "val2014"). Images keep the
    file's order; captions come from ``raw``.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if split not in _KARPATHY_SPLITS:
        raise ValueError(f"unknown karpathy split {split!r}; expected one of {sorted(_KARPATHY_SPLITS)}")
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected a JSON object with an 'images' list")
    keep = _KARPATHY_SPLITS[split]

    rs = RetrievalSet()
    for entry in data["images"]:
        if entry.get("split") not in keep:
            continue
        rel = Path(entry.get("filepath") or "") / entry["filename"]
        caps = [pre_caption(s["raw"]) for s in entry.get("sentences", [])]
        rs.add_image(image_root / rel, caps)
    return _check_images(rs, f"{json_path} split {split!r}")


def load_lavis(json_path: Path, image_root: Path) -> RetrievalSet:
    """A LAVIS retrieval eval annotation file (e.g. ``coco_karpathy_test.json``, ``flickr30k test.json``).

    Format: a JSON list of ``{"image": "rel/path.jpg", "caption": [str, ...]}`` (``caption`` may also be a
    single string). Image path is ``image_root/image``; order is the file's order.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of {{'image', 'caption'}} entries")
    rs = RetrievalSet()
    for entry in data:
        raw = entry["caption"]
        caps = [raw] if isinstance(raw, str) else list(raw)
        rs.add_image(image_root / entry["image"], [pre_caption(c) for c in caps])
    return _check_images(rs, str(json_path))


_KARPATHY_ALIASES = {"coco": "coco", "flickr30k": "flickr30k"}


def load_retrieval_set(dataset: str, root: Path, split: str) -> RetrievalSet:
    """Load an evaluation set by name. Expected layouts under ``root``:

    - ``"flickr8k"``: original release, see :func:`load_flickr8k` (split train/dev/test).
    - ``"karpathy-<name>"`` (``"coco"`` = ``"karpathy-coco"``, ``"flickr30k"`` = ``"karpathy-flickr30k"``):
      ``root/dataset_<name>.json``; images at ``<image_root>/<filepath>/<filename>`` where image_root is
      ``root/images`` if that directory exists, else ``root`` (so COCO: ``root/val2014/...``).
      Split train/restval/val(dev)/test.
    - ``"lavis"``: ``root/<split>.json`` (e.g. test.json, val.json) with image paths relative to ``root``.
    """
    root = Path(root)
    name = dataset.lower()
    if name == "flickr8k":
        return load_flickr8k(root, split)
    if name == "lavis":
        return load_lavis(root / f"{split}.json", root)
    if name in _KARPATHY_ALIASES or name.startswith("karpathy-"):
        key = _KARPATHY_ALIASES.get(name) or name.removeprefix("karpathy-")
        if not key:
            raise ValueError(f"dataset {dataset!r}: expected 'karpathy-<name>'")
        image_root = root / "images" if (root / "images").is_dir() else root
        return load_karpathy(root / f"dataset_{key}.json", image_root, split)
    raise ValueError(
        f"unknown dataset {dataset!r}; expected 'flickr8k', 'lavis', 'coco', 'flickr30k' or 'karpathy-<name>'"
    )
