"""scan_images on real files written here: bad inputs (skip and error modes), layouts, the scan cache."""
import builtins
import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from moca_fast.data import scan
from moca_fast.data.scan import scan_images
from moca_fast.data.scan_cache import CACHE_DIR_NAME
from moca_fast.errors import ConfigError


def jpeg_bytes(w=40, h=30, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, len(mode))
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def save(path, img, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt)
    return str(path)


@pytest.fixture
def mixed_folder(tmp_path, monkeypatch):
    """Class folders a (all usable, unusual kinds), b (mostly bad), c (empty); one locked file."""
    root = tmp_path / "data"
    good = {
        "a/rgb.jpg": write(root / "a/rgb.jpg", jpeg_bytes()),
        "a/upper.JPEG": write(root / "a/upper.JPEG", jpeg_bytes(seed=1)),
        "a/gray.jpg": write(root / "a/gray.jpg", jpeg_bytes(mode="L")),
        "a/cmyk.jpg": write(root / "a/cmyk.jpg", jpeg_bytes(mode="CMYK")),
        "a/tiny.jpg": write(root / "a/tiny.jpg", jpeg_bytes(3, 3)),
        "a/rgba.png": save(root / "a/rgba.png", Image.new("RGBA", (8, 6), (10, 20, 30, 128))),
        "a/palette.png": save(root / "a/palette.png", Image.new("P", (5, 7))),
        "a/deep.png": save(root / "a/deep.png", Image.fromarray(np.full((4, 4), 40000, np.uint16))),
        "a/pic.webp": save(root / "a/pic.webp", Image.new("RGB", (9, 9), (1, 2, 3))),
        "a/nested/pic.bmp": save(root / "a/nested/pic.bmp", Image.new("RGB", (6, 4), (9, 9, 9))),
        "b/jpeg_without_extension": write(root / "b/jpeg_without_extension", jpeg_bytes(seed=2)),
    }
    full = jpeg_bytes(64, 48, seed=3)
    bad = {
        "b/locked.jpg": (write(root / "b/locked.jpg", jpeg_bytes(seed=4)), "unreadable (PermissionError"),
        "b/one_pixel.png": (save(root / "b/one_pixel.png", Image.new("RGB", (1, 5))), "too small: 1x5 pixels"),
        "b/text.jpg": (write(root / "b/text.jpg", b"this is not a picture\n"), "not an image PIL can decode"),
        "b/truncated.jpg": (write(root / "b/truncated.jpg", full[: len(full) // 2]), "corrupt or truncated (OSError"),
        "b/zero.jpg": (write(root / "b/zero.jpg", b""), "empty file (0 bytes)"),
    }
    os.symlink(root / "b/missing.jpg", root / "b/dangling.jpg")
    bad = {"b/dangling.jpg": (str(root / "b/dangling.jpg"), "unreadable (cannot stat"), **bad}
    os.mkfifo(root / "b/pipe.jpg")  # not a regular file: left out (opening it would block)
    write(root / "b/notes.txt", b"ignored, not an image\n")
    write(root / "b/.hidden.jpg", b"hidden files are ignored")
    write(root / "loose.jpg", jpeg_bytes())  # ignored: the root has class folders
    (root / "c").mkdir()

    real_open = builtins.open
    locked = bad["b/locked.jpg"][0]

    def open_with_one_locked_file(file, *args, **kwargs):
        if not isinstance(file, int) and os.fspath(file) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_with_one_locked_file)
    return root, good, bad


def test_skip_mode_keeps_every_valid_kind_and_skips_each_bad_one(mixed_folder, caplog):
    root, good, bad = mixed_folder
    with caplog.at_level(logging.INFO, logger="moca_fast.data"):
        found = scan_images(root, bad_files="skip")
    assert found.classes == ["a", "b", "c"]
    assert sorted(found.files) == sorted(good.values())
    assert found.labels.tolist() == [0 if "/a/" in f else 1 for f in found.files]
    assert [p for p, _ in found.skipped] == [path for path, _ in bad.values()]  # sorted order
    for (path, reason), (_, expected) in zip(found.skipped, bad.values()):
        assert reason.startswith(expected), (path, reason)
        assert "\n" not in reason
    text = caplog.text
    assert "skipping 6 bad image files" in text and bad["b/zero.jpg"][0] in text
    assert "hold no usable image" in text and ": c" in text
    assert dict(found.ignored) == {str(root / "b/.hidden.jpg"): "hidden", str(root / "b/pipe.jpg"): "not a regular file",
                                   str(root / "b/notes.txt"): "not an image (neither its extension nor its first bytes)",
                                   str(root / "loose.jpg"): "beside the class folders"}
    assert str(root / "b/pipe.jpg") in text and f"not using 4 entries of {root} (1 hidden, 1 not a regular file, " \
        "1 beside the class folders, 1 not an image)" in text


def test_all_kept_images_load_as_rgb(mixed_folder):
    root, good, _ = mixed_folder
    for path in good.values():
        img = scan.open_rgb(path)
        assert img.mode == "RGB" and min(img.size) >= 2
    deep = np.asarray(scan.open_rgb(good["a/deep.png"]))
    assert (deep == 40000 >> 8).all()  # 16-bit scaled to 8 bits, not clipped at 255


def test_error_mode_is_one_line_naming_the_first_bad_file(tmp_path):
    root = tmp_path / "d"
    write(root / "x/a.jpg", jpeg_bytes())
    zero = write(root / "x/b.jpg", b"")
    write(root / "x/c.jpg", b"text")
    with pytest.raises(ConfigError) as err:
        scan_images(root, bad_files="error")
    assert str(err.value) == (f"bad image file {zero}: empty file (0 bytes) "
                              f"(2 bad in {root}; bad_files=skip would skip them)")


def test_error_mode_names_a_truncated_jpeg(tmp_path):
    root = tmp_path / "d"
    write(root / "ok.jpg", jpeg_bytes())
    full = jpeg_bytes(64, 64, seed=5)
    truncated = write(root / "t.jpg", full[: len(full) - 200])
    with pytest.raises(ConfigError) as err:
        scan_images(root, bad_files="error")
    message = str(err.value)
    assert message.startswith(f"bad image file {truncated}: corrupt or truncated (OSError: image file is truncated")
    assert "\n" not in message


@pytest.mark.parametrize("setup, expected", [
    (lambda root: root.mkdir(), "holds no usable images"),
    (lambda root: write(root / "readme.txt", b"no images here"), "holds no usable images"),
    (lambda root: (root / "empty_class").mkdir(parents=True), "holds no usable images"),
    (lambda root: write(root / "bad.jpg", b"garbage"), "holds no usable images"),
    (lambda root: None, "does not exist"),
])
def test_folders_without_images_raise_naming_the_folder(tmp_path, setup, expected):
    root = tmp_path / "empty"
    setup(root)
    with pytest.raises(ConfigError, match=expected) as err:
        scan_images(root)
    assert str(root) in str(err.value)


def test_flat_folder_is_one_class(tmp_path):
    root = tmp_path / "flat"
    paths = [write(root / f"{i}.jpg", jpeg_bytes(seed=i)) for i in range(3)]
    found = scan_images(root)
    assert found.files == paths and found.labels.tolist() == [0, 0, 0] and found.classes == ["flat"]


def test_cache_skips_decoding_unchanged_files(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for i in range(6):
        write(root / f"k{i % 2}/{i}.jpg", jpeg_bytes(seed=i))
    write(root / "k0/bad.jpg", b"nope")
    calls = []
    real_check = scan.inspect_image
    monkeypatch.setattr(scan, "inspect_image", lambda p: calls.append(p) or real_check(p))

    first = scan_images(root)
    assert len(calls) == 7 and (root / CACHE_DIR_NAME).is_dir()
    calls.clear()
    second = scan_images(root)
    assert calls == [] and second == first

    changed = write(root / "k1/1.jpg", jpeg_bytes(50, 50, seed=9))
    added = write(root / "k1/new.png", b"")
    os.remove(root / "k0/0.jpg")
    third = scan_images(root)
    assert sorted(calls) == sorted([changed, added])
    assert str(root / "k0/0.jpg") not in third.files and changed in third.files
    assert (added, "empty file (0 bytes)") in third.skipped and len(third.skipped) == 2


def test_cache_falls_back_to_the_user_cache_when_the_folder_is_not_writable(tmp_path, monkeypatch):
    root = tmp_path / "d"
    write(root / "k/a.jpg", jpeg_bytes())
    (root / CACHE_DIR_NAME).write_bytes(b"")  # a file where the cache folder beside the data would be
    monkeypatch.setenv("MOCA_FAST_CACHE", str(tmp_path / "user_cache"))
    calls = []
    real_check = scan.inspect_image
    monkeypatch.setattr(scan, "inspect_image", lambda p: calls.append(p) or real_check(p))
    scan_images(root)
    assert len(list((tmp_path / "user_cache" / "scans").glob("*/*.jsonl"))) == 1
    scan_images(root)
    assert len(calls) == 1


def _scan_in_a_child(root, timeout: float = 60):
    """scan_images(root) in a forked process: a walk that never ends fails the test instead of hanging it."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=lambda: queue.put(scan_images(root)))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        pytest.fail(f"the scan of {root} did not end within {timeout} s")
    return queue.get(timeout=5)


def test_symlink_loops_are_walked_once_and_every_unused_entry_is_named(tmp_path):
    root = tmp_path / "data"
    images = [write(root / "a" / f"{i}.jpg", jpeg_bytes(seed=i)) for i in range(3)]
    (root / "a" / "sub").mkdir()
    os.symlink("..", root / "a" / "sub" / "up")  # a loop: a/sub/up/sub/up/...
    os.symlink(".", root / "a" / "self")  # a/self/self/... and a/self/0.jpg
    os.symlink("0.jpg", root / "a" / "link.jpg")  # a second path to one file
    write(root / "a" / "notes.txt", b"hello\n")
    write(root / "a" / ".DS_Store", b"\0\0")
    write(root / "loose.jpg", jpeg_bytes())
    result = _scan_in_a_child(root)
    assert sorted(result.files) == sorted(images) and result.skipped == []
    ignored = dict(result.ignored)
    assert ignored == {str(root / "a" / "self"): "folder already walked (a symlink loop or a second link to it)",
                       str(root / "a" / "sub" / "up"): "folder already walked (a symlink loop or a second link to it)",
                       str(root / "a" / "link.jpg"): f"duplicate: the same file as {root / 'a' / '0.jpg'}",
                       str(root / "a" / "notes.txt"): "not an image (neither its extension nor its first bytes)",
                       str(root / "a" / ".DS_Store"): "hidden",
                       str(root / "loose.jpg"): "beside the class folders"}
    assert len(result.ignored) == 6


def test_a_self_link_does_not_multiply_the_images(tmp_path):
    images = [write(tmp_path / "flat" / f"{i}.jpg", jpeg_bytes(seed=i)) for i in range(2)]
    os.symlink(".", tmp_path / "flat" / "self")
    result = _scan_in_a_child(tmp_path / "flat")
    assert sorted(result.files) == images, "each image once"
