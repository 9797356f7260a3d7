from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_dqa.demos.data import (
    DATA_ENV_VAR,
    CamVidDataModule,
    CamVidDataset,
    CIFAR10DataModule,
    JointTransform,
    resolve_root,
)

# ----------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope="module")
def cifar(cifar_root: Path) -> CIFAR10DataModule:
    dm = CIFAR10DataModule(root=str(cifar_root), limit_test=300, seed=3)
    dm.setup()
    return dm


def test_cifar_sizes_and_items(cifar: CIFAR10DataModule) -> None:
    assert len(cifar.train_set) == 50_000
    assert len(cifar.test_set) == 300
    assert len(cifar.val_set) == 300  # validation is the (limited) test set by default
    image, label = cifar.test_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == 3  # test image 0 is a cat (see the data README)
    images, labels = next(iter(cifar.test_dataloader()))
    assert images.shape == (256, 3, 32, 32) and labels.shape == (256,)
    images, labels = next(iter(cifar.train_dataloader()))
    assert images.shape == (128, 3, 32, 32)


def test_cifar_eval_transform_normalizes(cifar: CIFAR10DataModule) -> None:
    raw = cifar._test_data().data[0]  # (32, 32, 3) uint8
    expected = torch.from_numpy(raw).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cifar.mean).view(3, 1, 1), torch.tensor(cifar.std).view(3, 1, 1)
    torch.testing.assert_close(cifar.test_set[0][0], (expected - mean) / std)


def test_cifar_calibration_subset_is_seeded_and_unaugmented(cifar: CIFAR10DataModule) -> None:
    a, b = cifar.calibration_subset(64), cifar.calibration_subset(64, seed=3)
    assert list(a.indices) == list(b.indices) and len(set(a.indices)) == 64
    assert list(cifar.calibration_subset(64, seed=4).indices) != list(a.indices)
    assert torch.equal(a[0][0], a[0][0])  # no random crop or flip
    images, _ = next(iter(cifar.calibration_dataloader(64, batch_size=32)))
    assert images.shape == (32, 3, 32, 32)
    with pytest.raises(ValueError, match="n <= 50000"):
        cifar.calibration_subset(50_001)


def test_cifar_holdout_split(cifar_root: Path) -> None:
    dm = CIFAR10DataModule(root=str(cifar_root), val_split="holdout", holdout_size=1000, limit_train=2000, seed=1)
    dm.setup("fit")
    assert len(dm.train_set) == 2000 and len(dm.val_set) == 1000
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert not set(dm.calibration_subset(500).indices) & set(dm.val_set.indices)
    again = CIFAR10DataModule(root=str(cifar_root), val_split="holdout", holdout_size=1000, seed=1)
    assert again._split_indices()[1] == dm._split_indices()[1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"root": "/nonexistent/cifar"}, r"root to contain cifar-10-batches-py.*download=True"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 1.5}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_split": "train"}, "val_split"),
        ({"limit_test": 0}, "limit_test"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
    ],
)
def test_cifar_bad_args(kwargs: dict, message: str, tmp_path: Path) -> None:
    kwargs.setdefault("root", str(tmp_path))
    if kwargs["root"] == str(tmp_path):
        (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(**kwargs)


def test_cifar_calibration_n_checked_before_loading(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(ValueError, match="Expected n to be a positive int"):
        CIFAR10DataModule(root=str(tmp_path)).calibration_subset(0)


# ----------------------------------------------------------------- CamVid, real data


def test_camvid_sizes_and_items(camvid_root: Path) -> None:
    dm = CamVidDataModule(root=str(camvid_root), limit_test=5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (367, 101, 5)
    image, mask = dm.val_set[0]
    assert image.shape == (3, 180, 240) and image.dtype == torch.float32
    assert mask.shape == (180, 240) and mask.dtype == torch.long
    assert 0 <= mask.min() and mask.max() <= 11
    assert CamVidDataModule.num_classes == 11 and CamVidDataModule.ignore_index == 11


# ----------------------------------------------------------------- CamVid, synthetic


H, W = 6, 10


def _encoded(mask: torch.Tensor) -> torch.Tensor:
    """The red channel of a synthetic image: 20 * class id / 255."""
    return mask.float() * 20 / 255


def _fake_camvid(root: Path, n: int = 2) -> Path:
    """A tiny CamVid-like folder whose red channel encodes the label of every pixel."""
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for i in range(n):
            rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
            mask = ((cols + 3 * rows + i) % 12).to(torch.uint8)  # values 0..11, void included
            rgb = torch.stack([mask * 20, cols.to(torch.uint8) * 7, rows.to(torch.uint8) * 9], dim=-1)
            Image.fromarray(rgb.numpy(), mode="RGB").save(root / split / f"{i}.png")
            Image.fromarray(mask.numpy(), mode="L").save(root / f"{split}annot" / f"{i}.png")
            lines.append(f"{split}/{i}.png {split}annot/{i}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid_synthetic_reads_pairs(tmp_path: Path) -> None:
    root = _fake_camvid(tmp_path)
    image, mask = CamVidDataset(root, "val")[1]
    assert image.shape == (3, H, W) and mask.shape == (H, W) and mask.dtype == torch.long
    torch.testing.assert_close(image[0], _encoded(mask))
    assert mask.max() == 11


def test_joint_flip_and_crop_keep_alignment(tmp_path: Path) -> None:
    root = _fake_camvid(tmp_path)
    plain = CamVidDataset(root, "train")
    transform = JointTransform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), hflip=True, crop_size=(4, 7))
    augmented = CamVidDataset(root, "train", transform)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(20):
        image, mask = augmented[0]
        assert image.shape == (3, 4, 7) and mask.shape == (4, 7)
        torch.testing.assert_close(image[0], _encoded(mask))  # image and mask moved together
        columns = (image[1] * 255 / 7).round()  # green channel encodes the source column
        flipped += bool(columns[0, 0] > columns[0, -1])
    assert 0 < flipped < 20
    torch.testing.assert_close(plain[0][0][0], _encoded(plain[0][1]))


def test_joint_scale_uses_nearest_labels_and_pads_with_void(tmp_path: Path) -> None:
    image = torch.rand(3, H, W)
    mask = torch.randint(0, 11, (H, W))
    torch.manual_seed(0)
    out_image, out_mask = JointTransform(scale_range=(0.5, 0.5), crop_size=(H, W))(image, mask)
    assert out_image.shape == (3, H, W) and out_mask.shape == (H, W)
    assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {11}
    padded = out_mask == 11
    assert padded.sum() == H * W - (H // 2) * (W // 2)  # a 3x5 scaled image inside a 6x10 crop
    assert out_image[:, padded].abs().sum() == 0
    for _ in range(5):  # without crop_size, scaling is cropped or padded back to the input size
        big_image, big_mask = JointTransform(scale_range=(0.7, 1.6))(image, mask)
        assert big_image.shape == (3, H, W) and big_mask.shape == (H, W)
        assert set(big_mask.unique().tolist()) <= set(mask.unique().tolist()) | {11}


def test_camvid_datamodule_synthetic_batches(tmp_path: Path) -> None:
    dm = CamVidDataModule(root=str(_fake_camvid(tmp_path)), batch_size=2, scale_range=(0.8, 1.2), limit_val=1)
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, H, W) and masks.shape == (2, H, W) and masks.dtype == torch.long
    assert len(dm.val_set) == 1


def test_camvid_calibration_subset_is_seeded_and_unaugmented(tmp_path: Path) -> None:
    dm = CamVidDataModule(root=str(_fake_camvid(tmp_path, n=5)), scale_range=(0.5, 2.0), crop_size=(4, 4))
    a, b = dm.calibration_subset(3, seed=1), dm.calibration_subset(3, seed=1)
    assert list(a.indices) == list(b.indices) and len(set(a.indices)) == 3
    assert any(list(dm.calibration_subset(3, seed=s).indices) != list(a.indices) for s in range(2, 6))
    image, mask = a[0]
    assert image.shape == (3, H, W) and mask.shape == (H, W)  # full size: no crop or rescaling
    assert torch.equal(a[0][0], image)
    images, masks = next(iter(dm.calibration_dataloader(3, seed=1, batch_size=2)))
    assert images.shape == (2, 3, H, W) and masks.shape == (2, H, W)
    with pytest.raises(ValueError, match=r"n to be an int in \[1, 5\].*got 6"):
        dm.calibration_subset(6)


def test_camvid_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"root to be the CamVid folder.*train.txt"):
        CamVidDataModule(root=str(tmp_path / "absent"))
    root = _fake_camvid(tmp_path / "c")
    with pytest.raises(ValueError, match="crop_size"):
        CamVidDataModule(root=str(root), crop_size=(0, 4))
    with pytest.raises(ValueError, match="scale_range"):
        CamVidDataModule(root=str(root), scale_range=(1.5, 0.5))
    (root / "test.txt").write_text("test/0.png\n")
    with pytest.raises(ValueError, match="line 1"):
        CamVidDataset(root, "test")


# ----------------------------------------------------------------- data roots: argument, else LIGHTNING_DQA_DATA


def test_data_env_var_name() -> None:
    assert DATA_ENV_VAR == "LIGHTNING_DQA_DATA"


def test_roots_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    _fake_camvid(tmp_path / "camvid")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    cifar = CIFAR10DataModule()
    assert cifar.root == str(tmp_path / "cifar10") and cifar.hparams["root"] == cifar.root  # resolved, recorded
    camvid = CamVidDataModule(limit_val=1)
    assert camvid.root == str(tmp_path / "camvid") and camvid.hparams["root"] == camvid.root
    camvid.setup("validate")
    assert len(camvid.val_set) == 1


def test_explicit_root_wins_over_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine" / "cifar-10-batches-py").mkdir(parents=True)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "elsewhere"))
    assert CIFAR10DataModule(root=str(tmp_path / "mine")).root == str(tmp_path / "mine")
    assert resolve_root(tmp_path / "mine", "cifar10") == str(tmp_path / "mine")


@pytest.mark.parametrize("env_value", [None, ""])
@pytest.mark.parametrize(
    ("make", "subfolder"),
    [
        (CIFAR10DataModule, "cifar10"),
        (lambda: CIFAR10DataModule(download=True), "cifar10"),
        (CamVidDataModule, "camvid"),
    ],
)
def test_no_root_and_no_env_var_is_a_clear_error(
    make: object, subfolder: str, env_value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env_value is None:
        monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(DATA_ENV_VAR, env_value)
    with pytest.raises(ValueError, match=rf"Expected root to be the {subfolder} folder, or the LIGHTNING_DQA_DATA"):
        make()  # type: ignore[operator]


def test_env_var_folder_without_the_data_set_names_the_resolved_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(ValueError, match=r"root to contain cifar-10-batches-py.*cifar10"):
        CIFAR10DataModule()
    with pytest.raises(ValueError, match=r"root to be the CamVid folder.*camvid"):
        CamVidDataModule()
