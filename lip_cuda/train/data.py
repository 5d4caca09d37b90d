"""Data for ``lip_cuda.train``: an ImageFolder tree or synthetic images, split
over the processes of a distributed run.

Training uses :class:`~torch.utils.data.DistributedSampler` with
``drop_last=True``: every process gets a disjoint, equally long share of each
epoch's shuffled order, so all processes run the same number of steps.
Validation shards the set without padding (process ``r`` takes images
``r, r + W, r + 2W, ...``) and the sums are all-reduced, so every image is
counted exactly once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .errors import TrainConfigError, require_torchvision

__all__ = ["SyntheticImages", "ShardSampler", "RecordingSampler", "DataBundle", "build_data", "check_image_folder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class SyntheticImages(Dataset):
    """``size`` random images made on the fly, reproducible from ``seed``.

    Item ``i`` is drawn from its own generator (seeded by ``seed``, ``split``
    and ``i``), so it is the same in every process, epoch and run. Each class
    has a fixed random colour added to unit Gaussian noise, which gives a
    learnable task: a smoke run's loss should fall.

    Shape:
        item: ``((3, image_size, image_size) float32, int label)``.

    Example::

        >>> ds = SyntheticImages(8, num_classes=10, image_size=32, seed=0)
        >>> img, label = ds[3]
        >>> img.shape, 0 <= label < 10
        (torch.Size([3, 32, 32]), True)
    """

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int, split: int = 0) -> None:
        self.size = int(size)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.split = int(split)
        g = torch.Generator().manual_seed(self.seed)
        self.class_colour = torch.randn(self.num_classes, 3, 1, 1, generator=g)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tuple[Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        key = (self.seed * 1_000_003 + self.split * 1_000_000_007 + int(index)) % (2**63)
        g = torch.Generator().manual_seed(key)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        img = torch.randn(3, self.image_size, self.image_size, generator=g)
        return img + self.class_colour[label], label


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of ``range(length)``: a split with
    neither padding nor overlap, for evaluation.

    Example::

        >>> list(ShardSampler(7, rank=1, world_size=3))
        [1, 4]
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


class RecordingSampler(Sampler[int]):
    """Wraps a sampler and keeps every index it hands out (``.seen``); used by
    the tests to check that processes see disjoint data."""

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner = inner
        self.seen: List[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for i in self.inner:
            self.seen.append(int(i))
            yield i

    def __len__(self) -> int:
        return len(self.inner)


def _class_dirs(split_dir: Path) -> List[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def check_image_folder(root: str, splits: Sequence[str]) -> List[str]:
    """Check that ``root/<split>/<class>/<image>`` exists for every split,
    that no class folder is empty and that the splits have the same classes;
    return the class names. Raises :class:`TrainConfigError` naming the
    problem.

    Example::

        >>> check_image_folder("/data/imagenet", ["train", "val"])   # doctest: +SKIP
        ['n01440764', ...]
    """
    base = Path(root)
    if not base.exists():
        raise TrainConfigError(f"--data {root}: no such directory")
    if not base.is_dir():
        raise TrainConfigError(f"--data {root}: not a directory")
    classes: Optional[List[str]] = None
    for split in splits:
        d = base / split
        if not d.is_dir():
            raise TrainConfigError(
                f"--data {root}: no '{split}' folder (expected {root}/{split}/<class>/<image> for each class)"
            )
        names = _class_dirs(d)
        if not names:
            raise TrainConfigError(f"--data {root}: '{split}' has no class folders ({d} is empty of sub-folders)")
        for name in names:
            with os.scandir(d / name) as it:
                if not any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in it):
                    raise TrainConfigError(f"--data {root}: class folder {d / name} holds no images")
        if classes is not None and names != classes:
            only = sorted(set(names) ^ set(classes))
            raise TrainConfigError(
                f"--data {root}: '{splits[0]}' and '{split}' have different class folders (differ in: {only[:5]})"
            )
        classes = names
    assert classes is not None
    return classes


def _folder_transforms(tv, image_size: int, train: bool):
    T = tv.transforms
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    # The usual 0.875 centre crop (224 out of 256).
    return T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), norm])


@dataclass
class DataBundle:
    """What the engine needs: loaders (``train`` is ``None`` when only
    evaluating), sizes, class names and the training sampler."""

    num_classes: int
    classes: List[str]
    val_loader: DataLoader
    num_val: int
    train_loader: Optional[DataLoader] = None
    train_sampler: Optional[Sampler] = None
    num_train: int = 0
    loader_generators: List[torch.Generator] = field(default_factory=list)


def build_data(args, rank: int, world_size: int, device: torch.device, *, record_indices: bool = False) -> DataBundle:
    """Datasets and loaders for ``args`` (``--data`` or ``--synthetic``), the
    share of process ``rank`` out of ``world_size``.

    Raises :class:`TrainConfigError` for a missing or empty folder, or a
    training set smaller than one global batch.
    """
    train = not args.evaluate
    if args.synthetic is not None:
        num_classes = args.num_classes
        classes = [str(c) for c in range(num_classes)]
        train_set = SyntheticImages(args.synthetic, num_classes, args.image_size, args.seed, split=0) if train else None
        val_set: Dataset = SyntheticImages(args.synthetic_val, num_classes, args.image_size, args.seed, split=1)
    else:
        classes = check_image_folder(args.data, ["train", "val"] if train else ["val"])
        if args.num_classes is not None and args.num_classes != len(classes):
            raise TrainConfigError(f"--num-classes {args.num_classes} but --data {args.data} has {len(classes)} classes")
        num_classes = len(classes)
        tv = require_torchvision("--data")
        root = Path(args.data)
        train_set = tv.datasets.ImageFolder(root / "train", _folder_transforms(tv, args.image_size, True)) if train else None
        val_set = tv.datasets.ImageFolder(root / "val", _folder_transforms(tv, args.image_size, False))

    if args.workers is None:
        # Synthetic images cost a few ms of CPU each: the CPU trains faster
        # making them itself; a GPU needs them made in parallel.
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        args.workers = 0 if (args.synthetic is not None and device.type == "cpu") else min(4, cpus)
    global_batch = args.batch_size * world_size
    pin = device.type == "cuda"
    gens: List[torch.Generator] = []

    def loader(ds: Dataset, sampler: Sampler, drop_last: bool) -> DataLoader:
        # A per-loader generator, reseeded each epoch, fixes the worker seeds
        # (random crops) so a resumed run repeats the same augmentations.
        g = torch.Generator()
        gens.append(g)
        return DataLoader(
            ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
            pin_memory=pin, drop_last=drop_last, generator=g,
        )

    val_sampler = ShardSampler(len(val_set), rank, world_size)
    bundle = DataBundle(num_classes, classes, loader(val_set, val_sampler, False), len(val_set), loader_generators=gens)
    if train_set is not None:
        if len(train_set) < global_batch:
            raise TrainConfigError(
                f"the training set has {len(train_set)} images, fewer than one global batch "
                f"({world_size} process(es) x --batch-size {args.batch_size} = {global_batch}); "
                f"lower --batch-size or add images"
            )
        sampler: Sampler = DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed, drop_last=True
        )
        if record_indices:
            sampler = RecordingSampler(sampler)
        bundle.train_loader = loader(train_set, sampler, True)
        bundle.train_sampler = sampler
        bundle.num_train = len(train_set)
    return bundle
