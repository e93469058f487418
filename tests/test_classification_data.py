"""Classification data in the real layouts (an ImageNet folder, WebDataset `cls` shards) beside our pair shards, and
DeiT's augmentations (random resized crop, RandAugment, random erasing, mixup / cutmix)."""

from __future__ import annotations

import io
import pickle
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from visprior.data.augment import (
    RAND_AUGMENT_OPS,
    AugmentSpec,
    MixupSpec,
    TrainAugment,
    _op,
    mix_batch,
    random_erase,
    random_resized_crop_box,
    soft_targets,
)
from visprior.data.classification import (
    ImageClassificationDataModule,
    ImageFolderStream,
    detect_format,
    image_folder_classes,
)
from visprior.data.formats import PairSample
from visprior.data.shards import write_shards

COLOURS = {"n01440764": (255, 0, 0), "n01443537": (0, 255, 0), "n01484850": (0, 0, 255)}  # ImageNet wnids, sorted


def transform(image: Image.Image) -> torch.Tensor:
    """A stand-in for the tower's processor: 8 x 8, channels in [0, 1]."""
    return torch.tensor(list(image.convert("RGB").resize((8, 8)).getdata()), dtype=torch.float).T.reshape(3, 8, 8) / 255


def colour_label(pixels: torch.Tensor) -> int:
    return int(pixels.mean(dim=(1, 2)).argmax())


def imagenet_folder(root: Path, per_class: int = 4, broken: bool = False) -> Path:
    """`root/<wnid>/<wnid>_<i>.JPEG`, the ImageNet train layout; class c is the colour of channel c."""
    for wnid, colour in COLOURS.items():
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 16), colour).save(root / wnid / f"{wnid}_{i}.JPEG", format="JPEG")
    (root / "n01440764" / "notes.txt").write_text("not an image")
    if broken:
        (root / "n01443537" / "broken.JPEG").write_bytes(b"not a jpeg")
    return root


def cls_shards(root: Path, n: int = 12, bad: bool = True) -> Path:
    """WebDataset classification shards: `<key>.jpg` + `<key>.cls` (the class index as text), two shards."""
    root.mkdir(parents=True)
    samples = [(f"sample{i:04d}", i % 3) for i in range(n)]
    if bad:
        samples.append(("sample-bad", "x"))
    for s, part in enumerate((samples[: n // 2], samples[n // 2 :])):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for key, label in part:
                buf = io.BytesIO()
                Image.new("RGB", (16, 16), list(COLOURS.values())[label if isinstance(label, int) else 0]).save(
                    buf, format="JPEG"
                )
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def test_imagenet_folder_layout(tmp_path: Path) -> None:
    train = imagenet_folder(tmp_path / "train", broken=True)
    val = imagenet_folder(tmp_path / "val", per_class=2)
    assert detect_format(str(train)) == "imagefolder"
    assert image_folder_classes(train) == sorted(COLOURS)
    dm = ImageClassificationDataModule(str(train), str(val), batch_size=4, batches_per_epoch=6, max_skip_rate=0.5)
    dm.connect(transform, num_classes=3)
    labels_seen = set()
    skips = 0
    for batch in dm.train_dataloader():
        assert batch["pixel_values"].shape == (4, 3, 8, 8)
        for pixels, label in zip(batch["pixel_values"], batch["labels"]):
            assert colour_label(pixels) == int(label)  # folder order is the class index
            labels_seen.add(int(label))
        skips += batch["skips"].get("train", {}).get("bad_image", 0)
    assert labels_seen == {0, 1, 2} and skips >= 1  # 24 images drawn from 13 files: the broken one was met and skipped
    val_batches = list(dm.val_dataloader())
    assert sum(len(b["labels"]) for b in val_batches) == 6
    assert [colour_label(p) for b in val_batches for p in b["pixel_values"]] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="3 class folders but the model has num_classes=1000"):
        dm.connect(transform, num_classes=1000)
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        list(ImageClassificationDataModule(str(train), str(tmp_path / "val")).val_samples()(None))


def test_image_folder_stream_resumes_exactly(tmp_path: Path) -> None:
    train = imagenet_folder(tmp_path / "train", per_class=5)
    classes = image_folder_classes(train)
    stream = ImageFolderStream(str(train), classes, seed=3)
    it = iter(stream)
    head = [next(it).key for _ in range(7)]
    state = stream.state_dict()
    rest = [next(it).key for _ in range(20)]  # crosses into the second pass
    resumed = ImageFolderStream(str(train), classes, seed=3)
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    again = iter(resumed)
    assert [next(again).key for _ in range(20)] == rest
    assert len(set(head + rest[:8])) == 15  # one pass visits every file once
    with pytest.raises(ValueError, match="seed"):
        ImageFolderStream(str(train), classes, seed=4).load_state_dict(state)


def test_webdataset_cls_shards(tmp_path: Path) -> None:
    shards = cls_shards(tmp_path / "wds")
    assert detect_format(str(shards)) == "wds_cls"
    assert detect_format(str(shards / "shard-{000000..000001}.tar")) == "wds_cls"
    dm = ImageClassificationDataModule(str(shards), str(shards), batch_size=4, batches_per_epoch=4, max_skip_rate=0.5)
    dm.connect(transform, num_classes=3)
    skips: dict[str, int] = {}
    for batch in dm.train_dataloader():
        for pixels, label in zip(batch["pixel_values"], batch["labels"]):
            assert colour_label(pixels) == int(label)
        for reason, n in batch["skips"].get("train", {}).items():
            skips[reason] = skips.get(reason, 0) + n
    assert skips == {"bad_label": 1}  # 16 drawn of 13 samples: the bad `cls` met once, skipped and counted
    with pytest.warns(UserWarning, match="bad_label=1"):
        val = list(dm.val_dataloader())
    assert [len(b["labels"]) for b in val] == [4, 4, 4]
    pattern = ImageClassificationDataModule(str(shards / "shard-{000000..000001}.tar"), batch_size=2)
    pattern.connect(transform, 3)
    assert next(iter(pattern.train_dataloader()))["labels"].shape == (2,)


def test_missing_data_fails_at_construction_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"data\.train: '.*nowhere' does not exist; expected an existing folder"
    ):
        ImageClassificationDataModule(str(tmp_path / "nowhere"))
    train = imagenet_folder(tmp_path / "train", per_class=1)
    with pytest.raises(FileNotFoundError, match=r"data\.val: '.*gone' does not exist; expected an existing folder"):
        ImageClassificationDataModule(str(train), str(tmp_path / "gone"))
    pairs = tmp_path / "pairs"
    samples = [PairSample(f"s{i}", Image.new("RGB", (8, 8)), "x", {"label": 0}) for i in range(2)]
    write_shards(samples, pairs, name="pairs", kind="pair")
    with pytest.raises(FileNotFoundError, match=r"data\.val: '.*gone' does not exist; expected a dataset folder"):
        ImageClassificationDataModule(str(pairs), str(tmp_path / "gone"))


# ---------------------------------------------------------------------------------------------------- augmentation


def test_rand_augment_ops_and_crop_and_erase() -> None:
    rng = random.Random(0)
    image = Image.new("RGB", (32, 24), (200, 40, 10))
    image.paste((10, 200, 40), (4, 4, 20, 16))
    for name in RAND_AUGMENT_OPS:
        out = _op(name, image, 0.9, rng)
        assert out.size == image.size and out.mode == "RGB", name
    assert _op("Rotate", image, 0.9, rng).tobytes() != image.tobytes()
    for _ in range(50):
        left, top, right, bottom = random_resized_crop_box(32, 24, (0.08, 1.0), rng)
        assert 0 <= left < right <= 32 and 0 <= top < bottom <= 24
    pixels = torch.zeros(3, 16, 16)
    erased = random_erase(pixels, random.Random(1))
    changed = (erased != 0).any(dim=0)
    assert 0.02 * 256 * 0.5 <= int(changed.sum()) <= 256 / 3 + 16  # one box of 2-33 % of the area
    augment = TrainAugment(AugmentSpec(random_erase=1.0), transform)
    out = augment(image)
    assert out.shape == (3, 8, 8)
    pickle.loads(pickle.dumps(augment))  # loader workers get a copy


def test_mixup_and_cutmix_targets() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3])
    smoothed = soft_targets(labels, 5, 0.1)
    torch.testing.assert_close(smoothed.sum(1), torch.ones(4))
    assert smoothed[0, 0].item() == pytest.approx(0.92) and smoothed[0, 1].item() == pytest.approx(0.02)
    pixels = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    mixed, targets = mix_batch(pixels, labels, 5, MixupSpec(cutmix_alpha=0.0))
    lam = float(targets[0, 0])
    torch.testing.assert_close(mixed[0], torch.full((3, 8, 8), lam * 0 + (1 - lam) * 3))  # row 0 mixed with row 3
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    cut, targets = mix_batch(pixels, labels, 5, MixupSpec(mixup_alpha=0.0))
    share_kept = float((cut[0] == 0).float().mean())  # row 0's own pixels left after pasting row 3's box
    assert targets[0, 0].item() == pytest.approx(share_kept) and targets[0, 3].item() == pytest.approx(1 - share_kept)
    same, plain = mix_batch(pixels, labels, 5, MixupSpec(prob=0.0))
    assert torch.equal(same, pixels) and torch.equal(plain, soft_targets(labels, 5))
