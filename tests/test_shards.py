"""Tar shards: the writer (layout, index, resize bound, bad files, crash and rerun), the reader
(every sample once per epoch over ranks x workers, seeded order, exact resume, bad samples, GPU
decoding) and pretraining from shards through the command line."""
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

import fake_data
from fake_data import PRETRAIN, interrupt_after
from ddep.cli import main
from ddep.data import DataError, build_dataset
from ddep.data import shard_writer
from ddep.data.io import fit_size
from ddep.data.shard_writer import hashed_order, index_shards, write_shards
from ddep.data.shards import ShardImages, read_index, split_member_name
from ddep.data.transforms import pretrain_transforms
from ddep.engine.checkpoint import load_checkpoint
from ddep.engine.distributed import DistInfo
from ddep.engine.trainer import training_loader

# (class folder, name, (height, width)): larger and smaller than the 48 px bound, odd names
PHOTOS = [("n01", f"n01_{i}.JPEG", (30 + 9 * i, 90 - 7 * i)) for i in range(6)] + \
         [("n02", f"n02_{i}.jpg", (64, 20 + 6 * i)) for i in range(5)] + \
         [("n02", "two.dots.png", (20, 30)), ("n02", "100%.webp", (50, 50))]


def photo_tree(root: Path) -> Path:
    for i, (folder, name, size) in enumerate(PHOTOS):
        fake_data.save(fake_data.rgb(i, size=size), root / folder / name)
    (root / "n01" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "n02" / "notes.txt").write_text("not an image")
    return root


def members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


@pytest.fixture
def shards_of_photos(tmp_path):
    source = photo_tree(tmp_path / "photos")
    out = tmp_path / "shards"
    write_shards(source, out, max_size=48, per_shard=4, workers=1, progress=False, cache_dir=tmp_path / "cache")
    return source, out


def test_the_writer_makes_webdataset_shards_with_an_index_bounded_sizes_and_bad_files_skipped(shards_of_photos):
    source, out = shards_of_photos
    index = read_index(out)
    readable = sorted(f"{folder}/{name}" for folder, name, _ in PHOTOS)
    assert index["complete"] and index["files"] == len(readable) + 1 and index["samples"] == len(readable)
    assert index["skipped"] == 1 and sum(len(s["skipped"]) for s in index["shards"]) == 1
    ((name, reason),) = [pair for s in index["shards"] for pair in s["skipped"]]
    assert name == "n01/broken.jpg" and "broken.jpg: not a readable image" in reason
    assert [s["file"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar"]
    # files are dealt to shards in the hashed order of their paths, 4 per shard, the bad one left out
    dealt = [n for n in hashed_order([*readable, "n01/broken.jpg"]) if n != "n01/broken.jpg"]
    seen = []
    for shard in index["shards"]:
        content = members(out / shard["file"])
        assert len(content) == shard["samples"] and (out / shard["file"]).stat().st_size == shard["bytes"]
        for member_name, data in content:
            key, extension = split_member_name(member_name)
            assert extension == "jpg" and member_name == f"{key}.jpg" and "." not in key
            path = urllib.parse.unquote(key)
            seen.append(path)
            image = Image.open(io.BytesIO(data))
            assert image.format == "JPEG" and image.mode == "RGB"
            height, width = next(size for folder, n, size in PHOTOS if f"{folder}/{n}" == path)
            assert image.size == fit_size(width, height, 48) and max(image.size) <= 48  # aspect kept, never enlarged
    assert seen == dealt
    assert fit_size(90, 30, 48) == (48, 16) and fit_size(30, 20, 48) == (30, 20)


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-in-the-index", "counted-from-its-headers"])
def test_a_rerun_after_a_crash_keeps_finished_shards_and_writes_the_same_bytes(tmp_path, monkeypatch, recorded):
    source = photo_tree(tmp_path / "photos")
    settings = dict(max_size=48, per_shard=4, workers=1, progress=False, cache_dir=tmp_path / "cache")
    write_shards(source, tmp_path / "reference", **settings)

    calls = []
    real = shard_writer.encode_jpeg

    def crash_in_the_second_shard(*args):
        calls.append(args[0])
        if len(calls) == 6:
            raise KeyboardInterrupt  # the process dies while shard 1 is half written
        return real(*args)

    # the index records each finished shard, or (a crash within the minute between records) none
    monkeypatch.setattr(shard_writer, "SAVE_PROGRESS_SECONDS", 0.0 if recorded else 1e9)
    monkeypatch.setattr(shard_writer, "encode_jpeg", crash_in_the_second_shard)
    out = tmp_path / "shards"
    with pytest.raises(KeyboardInterrupt):
        write_shards(source, out, **settings)
    finished = sorted(p.name for p in out.glob("shard-*.tar"))
    assert finished == ["shard-000000.tar"]  # the half-written one never carries its final name
    assert not list(out.glob(".shard-000001.tar.tmp*"))  # an interrupt unwinds: its temporary is removed
    (out / ".shard-000001.tar.tmp999999999").write_bytes(b"half")  # what a SIGKILLed writer leaves
    with pytest.raises(DataError, match="the shards are not finished; run the same `ddep shards` command again"):
        ShardImages(out)

    calls.clear()
    monkeypatch.setattr(shard_writer, "encode_jpeg", lambda *args: calls.append(args[0]) or real(*args))
    index = write_shards(source, out, **settings)
    assert len(calls) == 14 - 4  # shard 0 was kept, not written again
    for shard in index["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "reference" / shard["file"]).read_bytes()
    assert index == read_index(tmp_path / "reference")
    assert sorted(p.name for p in out.iterdir()) == ["index.json", *(s["file"] for s in index["shards"])]

    calls.clear()
    write_shards(source, out, **settings)  # finished: nothing to do
    assert calls == []


def test_a_folder_of_other_settings_files_or_origin_is_refused(shards_of_photos, tmp_path):
    source, out = shards_of_photos
    with pytest.raises(DataError, match=r"holds shards written from other files or settings \(max_size 48 there, 32 here\)"):
        write_shards(source, out, max_size=32, per_shard=4, workers=1, progress=False, cache_dir=tmp_path / "cache")
    fake_data.save(fake_data.rgb(99), source / "n01" / "new.png")
    with pytest.raises(DataError, match="14 files listed there, 15 here"):
        write_shards(source, out, max_size=48, per_shard=4, workers=1, progress=False, cache_dir=tmp_path / "cache")
    (out / "index.json").unlink()
    with pytest.raises(DataError, match="holds shard files but no index.json"):
        write_shards(source, out, max_size=48, per_shard=4, workers=1, progress=False, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="max_size must be an integer >= 16, got 0"):
        write_shards(source, tmp_path / "new", max_size=0)


@pytest.fixture
def even_shards(tmp_path):
    """8 shards of 3 images: 2 ranks x 2 workers read 2 shards each per epoch."""
    for i in range(24):
        fake_data.save(fake_data.rgb(i, size=(40, 40)), tmp_path / "photos" / f"{i:02d}.png")
    write_shards(tmp_path / "photos", tmp_path / "shards", max_size=48, per_shard=3, workers=2, progress=False,
                 cache_dir=tmp_path / "cache")
    return tmp_path / "shards"


@pytest.mark.parametrize("slots, per_block", [(1, 1), (3, 2), (4, 3), (11, 2)])
def test_each_epoch_deals_every_shard_to_exactly_one_slot(even_shards, slots, per_block):
    dataset = ShardImages(even_shards, shuffle_shards=per_block).stream(seed=5, rank=0, world_size=1, batch_size=1)
    read = {epoch: [] for epoch in range(4)}
    for slot in range(slots):
        blocks = dataset.blocks(slot, slots)
        for block in iter(lambda: next(blocks), None):
            epochs = {t // 8 for t, _ in block}
            assert len(epochs) == 1 and len(block) <= per_block  # a block never spans two epochs
            if epochs.pop() >= 4:
                break
            for t, shard in block:
                read[t // 8].append(shard)
    for epoch, shards in read.items():
        assert sorted(shards) == list(range(8)), epoch
    orders = [[dataset.shard_at(t) for t in range(8 * e, 8 * e + 8)] for e in range(3)]
    assert len({tuple(o) for o in orders}) == 3  # a new permutation every epoch
    other = ShardImages(even_shards).stream(seed=6, rank=0, world_size=1, batch_size=1)
    assert [other.shard_at(t) for t in range(8)] != orders[0]


def test_too_few_shards_for_the_readers_is_warned_about(even_shards, caplog):
    crowded = ShardImages(even_shards, pretrain_transforms(16)).stream(seed=0, rank=0, world_size=5, batch_size=1)
    with caplog.at_level(logging.WARNING):
        next(iter(crowded))
    assert "8 shards for 5 readers x shuffle_shards=2: readers shuffle fewer shards together" in caplog.text


def names_of(loader, batches: int) -> list[list[str]]:
    stream = iter(loader)
    return [next(stream)["name"] for _ in range(batches)]


def test_two_ranks_with_two_workers_read_each_sample_once_per_epoch(even_shards):
    dataset = ShardImages(even_shards, pretrain_transforms(32))
    everything = sorted(f"{i:02d}.png" for i in range(24))
    per_rank = [names_of(training_loader(dataset, 3, 3, 2, DistInfo(rank, 2)), batches=8) for rank in (0, 1)]
    epochs = [[n for rank in per_rank for batch in rank[4 * e : 4 * e + 4] for n in batch] for e in (0, 1)]
    for epoch in epochs:
        assert sorted(epoch) == everything  # disjoint over ranks, and together the whole set
    assert epochs[0] != epochs[1]
    again = names_of(training_loader(dataset, 3, 3, 2, DistInfo(0, 2)), batches=8)
    assert again == per_rank[0]  # the order follows from the seed


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_started_after_n_batches_continues_exactly(even_shards, workers):
    dataset = ShardImages(even_shards, pretrain_transforms(32), shuffle_shards=2)
    stream = iter(training_loader(dataset, 0, 2, workers, DistInfo()))
    straight = [next(stream) for _ in range(17)]
    resumed_stream = iter(training_loader(dataset, 0, 2, workers, DistInfo(), start=11))
    resumed = [next(resumed_stream) for _ in range(6)]
    for a, b in zip(straight[11:], resumed):
        assert a["name"] == b["name"] and torch.equal(a["image"], b["image"])


def shards_from_elsewhere(root: Path) -> Path:
    """A shard as another tool writes one (timm's ImageNet shards hold .jpg and .cls members): here
    with a PNG and a damaged JPEG, and no index."""
    root.mkdir()
    good = [io.BytesIO() for _ in range(3)]
    for i, buffer in enumerate(good):
        fake_data.rgb(i).save(buffer, format="PNG" if i == 2 else "JPEG")
    content = [("a.jpg", good[0].getvalue()), ("a.cls", b"3"), ("b.jpg", b"\xff\xd8 damaged"), ("c.jpg", good[1].getvalue()),
               ("d.png", good[2].getvalue()), ("e.cls", b"1")]
    with tarfile.open(root / "imagenet-train-0000.tar", "w") as tar:
        for name, data in content:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return root


def test_shards_written_elsewhere_get_an_index_and_are_read(tmp_path, capsys):
    root = shards_from_elsewhere(tmp_path / "wds")
    with pytest.raises(DataError, match="no index.json"):
        ShardImages(root)
    assert main(["shards", "--index", str(root)]) == 0
    assert "wds: 1 shards, 4 images" in capsys.readouterr().out
    index = read_index(root)
    assert index["shards"] == [{"file": "imagenet-train-0000.tar", "samples": 4, "bytes": (root / "imagenet-train-0000.tar").stat().st_size,
                                "skipped": []}]
    assert main(["shards", "--index", str(root)]) == 1
    assert "index.json exists already; remove it to index the shards again" in capsys.readouterr().err
    assert main(["shards", "--output", str(root)]) == 1
    assert "ddep shards needs --input DIR and --output DIR (or --index DIR" in capsys.readouterr().err
    assert main(["shards", "--index", str(root), "--input", str(root)]) == 1
    assert "ddep shards takes either --index DIR, or --input DIR and --output DIR" in capsys.readouterr().err


def test_an_unreadable_sample_is_replaced_by_the_next_readable_one_and_counted(tmp_path, caplog):
    root = shards_from_elsewhere(tmp_path / "wds")
    index_shards(root)
    dataset = ShardImages(root, pretrain_transforms(16), shuffle_shards=1)
    stream = iter(dataset)
    with caplog.at_level(logging.WARNING):
        epoch = [next(stream)["name"] for _ in range(4)]
    assert "b" not in epoch and sorted(set(epoch)) == ["a", "c", "d"] and len(epoch) == 4  # positions kept
    assert dataset.skipped == 1 and "skipping unreadable image (1 skipped so far): b: not a readable image" in caplog.text


def test_device_decoding_replaces_what_it_cannot_decode(tmp_path, caplog):
    root = shards_from_elsewhere(tmp_path / "wds")
    index_shards(root)
    dataset = ShardImages(root, pretrain_transforms(16), shuffle_shards=1, decode="gpu")
    stream = iter(dataset)
    with caplog.at_level(logging.WARNING):
        sent = [next(stream) for _ in range(4)]
    assert sorted({item["name"] for item in sent}) == ["a", "c"]  # the PNG and the damaged JPEG replaced in the worker
    assert "d: PNG image; data.decode=gpu decodes JPEGs only" in caplog.text and dataset.skipped == 2
    cut = sent[0]["jpeg"][:300] + b"\xff\xd9"  # passes the workers' checks, fails on the device
    batch = default_collate([dict(sent[0], jpeg=cut, name="cut"), *sent[1:]])
    with caplog.at_level(logging.WARNING):
        decoded = dataset.decode_batch(batch, torch.device("cpu"))
    assert decoded["name"] == [sent[1]["name"], *(item["name"] for item in sent[1:])]  # the next image, with its name
    assert decoded["image"].shape == (4, 3, 16, 16) and "skipping an image the device cannot decode: cut" in caplog.text


def test_a_shard_damaged_during_a_run_is_warned_about_and_its_images_replaced(even_shards, caplog):
    index = read_index(even_shards)
    damaged = even_shards / index["shards"][3]["file"]
    with tarfile.open(damaged) as tar:
        second = tar.getmembers()[1].offset
    data = bytearray(damaged.read_bytes())
    data[second : second + 512] = bytes(512)  # the second member's header zeroed: the tar seems to end there
    damaged.write_bytes(bytes(data))  # the same size: only reading it tells
    dataset = ShardImages(even_shards, pretrain_transforms(16), shuffle_shards=2).stream(0, 0, 1, batch_size=1)
    stream = iter(dataset)
    with caplog.at_level(logging.WARNING):
        epoch = [next(stream)["name"] for _ in range(24)]
    assert f"{damaged}: 1 images, but index.json says 3; its missing images are replaced" in caplog.text
    assert len(set(epoch)) == 22  # the two lost images' places taken by others of their group


def test_on_a_gpu_the_stream_is_drained_before_the_decoder_writes(monkeypatch):
    """nvJPEG's hardware decoder does not wait for the kernels queued on the stream it is given
    (pytorch/vision#9606): it could overwrite memory they still read. Every decode on a GPU,
    batched or one by one, comes after the stream's work; on the CPU there is nothing to wait for."""
    import torchvision.io

    from ddep.data import shards as shards_module

    events = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(synchronize=lambda: events.append("sync")))
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, mode, device: events.append(f"decode on {device.type}") or data)
    image = torch.zeros(3, dtype=torch.uint8)
    shards_module.decode_jpegs([image, image], torch.device("cuda"))
    shards_module.decode_jpegs(image, torch.device("cuda", 0))
    shards_module.decode_jpegs(image, torch.device("cpu"))
    assert events == ["sync", "decode on cuda", "sync", "decode on cuda", "decode on cpu"]


def test_decoding_on_the_device_gives_the_workers_images(even_shards):
    on_cpu = ShardImages(even_shards, pretrain_transforms(32)).stream(7, 0, 1, batch_size=1)
    on_device = ShardImages(even_shards, pretrain_transforms(32), decode="gpu").stream(7, 0, 1, batch_size=1)
    expected = [item for _, item in zip(range(10), on_cpu)]
    sent = [item for _, item in zip(range(10), on_device)]
    assert set(sent[0]) == {"jpeg", "seed", "name"} and isinstance(sent[0]["jpeg"], bytes)
    batch = on_device.decode_batch(default_collate(sent), torch.device("cpu"))  # torchvision's decode_jpeg on the CPU
    assert batch["name"] == [item["name"] for item in expected]
    images = torch.stack([item["image"] for item in expected])
    assert batch["image"].shape == images.shape == (10, 3, 32, 32)
    difference = (batch["image"] - images).abs() * 255  # the same pixels decoded; resizing rounds apart by 1 at most
    assert difference.max() <= 1 + 1e-4 and difference.mean() < 0.3


def test_pretraining_from_shards_through_the_cli_resumes_exactly(data, monkeypatch, capsys, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path("cache").absolute()))
    assert main(["shards", "--input", "data/images", "--output", "shards", "--max-size", "48", "--per-shard", "3", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "shards: 4 shards, 11 images" in printed and "data.dataset=shards data.root=shards" in printed
    args = [*PRETRAIN, "data.dataset=shards", "data.root=shards", "data.num_workers=2", "data.batch_size=2", "checkpoint_every=3"]
    assert main(["pretrain", *args, "name=straight"]) == 0
    interrupt_after(monkeypatch, "pretrain", [*args, "name=interrupted"], step=3)  # after 3 batches the workers' turns rotate
    assert load_checkpoint("runs/interrupted/checkpoints/last.pt")["step"] == 3
    assert main(["pretrain", *args, "name=interrupted", "--resume"]) == 0
    straight, resumed = (load_checkpoint(f"runs/{name}/checkpoints/last.pt")["model"] for name in ("straight", "interrupted"))
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    with caplog.at_level(logging.WARNING):  # the order depends on the workers: another count is no exact resume
        assert main(["pretrain", *args, "data.num_workers=0", "name=straight", "--resume"]) == 0
    assert "saved with data.num_workers=2, resumed with 0: the shards' order depends on it" in caplog.text
    capsys.readouterr()  # the runs' summaries
    assert main(["pretrain", "--dry-run", *args, "epochs=2", "steps=null"]) == 0
    assert json.loads(capsys.readouterr().out)["train_images"] == 11
    assert main(["pretrain", *args, "data.decode=gpu", "steps=1", "name=device-decoding"]) == 0
    assert load_checkpoint("runs/device-decoding/checkpoints/last.pt")["step"] == 1


def test_shard_folder_problems_are_one_line_errors(shards_of_photos, data, capsys, monkeypatch):
    source, out = shards_of_photos
    with pytest.raises(DataError, match=f"{source} holds images, not tar shards: data.dataset=unlabeled reads them as they are, "
                                        f"or write shards of them elsewhere with `ddep shards --input {source} --output SHARDS`"):
        build_dataset("shards", source)
    (source.parent / "no-shards").mkdir()
    with pytest.raises(DataError, match="no index.json; write shards there with `ddep shards --input IMAGES --output"):
        build_dataset("shards", source.parent / "no-shards")
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    with pytest.raises(DataError, match=r"shard-000001.tar: 1024 bytes, but index.json says \d+ \(a partial copy\?\)"):
        build_dataset("shards", out)
    shard.unlink()
    with pytest.raises(DataError, match="shard-000001.tar: listed in .*index.json but missing"):
        build_dataset("shards", out)
    assert main(["pretrain", "data.root=data/images", *PRETRAIN, "data.decode=gpu"]) == 1
    assert "data.decode=gpu decodes the JPEGs of tar shards: it needs data.dataset=shards" in capsys.readouterr().err
    assert main(["pretrain", "data.dataset=shards", f"data.root={out}", *PRETRAIN, "data.options={decode: gpu}"]) == 1
    assert "set data.decode, not data.options.decode" in capsys.readouterr().err
    import torchvision

    monkeypatch.setattr(torchvision, "__version__", "0.19.1+cu121")
    with pytest.raises(DataError, match="data.decode=gpu needs torchvision >= 0.20 .*found 0.19.1"):
        ShardImages(out, decode="gpu")
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").write_text(json.dumps({**index, "version": 2}))
    with pytest.raises(DataError, match="index version 2, newer than this ddep reads"):
        ShardImages(out)
    Path("empty").mkdir()
    assert main(["shards", "--input", "empty", "--output", "out"]) == 1
    assert "ddep shards: error: no images (.jpg, .jpeg, .png, .webp, .bmp, .tif, .tiff) found under" in capsys.readouterr().err


TORCHRUN_SCRIPT = """
import json, sys
from ddep.data.shards import ShardImages
from ddep.engine.distributed import gather_objects, init_distributed, shutdown
from ddep.engine.trainer import training_loader
info = init_distributed("cpu")
stream = iter(training_loader(ShardImages(sys.argv[1]), seed=1, batch_size=3, num_workers=2, dist_info=info))
names = gather_objects([n for _ in range(4) for n in next(stream)["name"]], info)
del stream  # the workers ignore SIGTERM (preemption.py): let the loader stop them before the interpreter exits
if info.is_main:
    open(sys.argv[2], "w").write(json.dumps(names))
shutdown(info)
"""


@pytest.mark.slow
def test_two_gloo_processes_read_disjoint_samples_that_make_the_epoch(even_shards, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", str(script),
                           str(even_shards), str(tmp_path / "names.json")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = json.loads((tmp_path / "names.json").read_text())
    assert len(rank0) == len(rank1) == 12 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(f"{i:02d}.png" for i in range(24))


def jpeg_bytes(seed: int = 0, **options) -> bytes:
    buffer = io.BytesIO()
    fake_data.rgb(seed, size=(48, 48)).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def test_device_decoding_takes_jpegs_with_bytes_after_the_end_and_refuses_cut_ones(tmp_path):
    """Shards from other tools hold JPEGs with bytes after the end-of-image marker (padding, an
    appended preview): PIL and torchvision decode them, so the workers' check passes them. A JPEG
    cut short is still refused: padded after the cut, or with an end marker in its EXIF thumbnail."""
    from torchvision.io import decode_jpeg

    from ddep.data.shards import check_jpeg

    plain, progressive = jpeg_bytes(), jpeg_bytes(progressive=True)
    thumbnail = b"Exif\x00\x00" + jpeg_bytes(1)  # an APP1 segment holding a whole JPEG, end marker included
    with_thumbnail = jpeg_bytes(exif=thumbnail)
    assert with_thumbnail.count(b"\xff\xd9") == 2
    for jpeg in (plain, progressive, with_thumbnail):
        for tail in (bytes(100), b"\xff" * 70, b"\xff\xd9" + bytes(5000), jpeg_bytes(2)):
            check_jpeg("padded", jpeg + tail)
            decoded = decode_jpeg(torch.frombuffer(bytearray(jpeg + tail), dtype=torch.uint8))
            assert torch.equal(decoded, decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)))
        for cut in (jpeg[: len(jpeg) * 3 // 4], jpeg[: len(jpeg) * 3 // 4] + bytes(100), jpeg[:-2], jpeg[:-2] + bytes(64)):
            with pytest.raises(DataError, match="cut: truncated JPEG"):
                check_jpeg("cut", cut)
    root = tmp_path / "wds"
    root.mkdir()
    with tarfile.open(root / "padded-0000.tar", "w") as tar:
        for name, data in (("a.jpg", plain + bytes(1000)), ("b.jpg", with_thumbnail[: len(with_thumbnail) - 300] + bytes(300))):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    index_shards(root)
    dataset = ShardImages(root, pretrain_transforms(16), shuffle_shards=1, decode="gpu")
    stream = iter(dataset)
    assert [next(stream)["name"] for _ in range(2)] == ["a", "a"] and dataset.unreadable == {"b"}


def test_the_writer_refuses_a_labeled_datasets_root(tmp_path):
    root = fake_data.folder(tmp_path / "data")
    with pytest.raises(DataError, match=r"data is a labeled dataset's root \(images/ beside masks/\): its masks would be read as "
                                        r"photos; use --input .*data/images for its images$"):
        write_shards(root, tmp_path / "out", workers=1, progress=False, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
