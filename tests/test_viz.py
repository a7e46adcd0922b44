"""Issue 21: `python -m moca_fast.viz {pca,codes,masks,curves,neighbors}` and the run's own pictures, on the demo
digits with one short real run (launch/train.py) shared by the tests."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moca_fast.config import load_config
from moca_fast.data.demo import prepare_demo
from moca_fast.figures.codes import code_maps
from moca_fast.figures.curves import curves_figure
from moca_fast.figures.images import encoder_tokens, find_images, load_images, patch_tokens
from moca_fast.io import export_teacher_timm
from moca_fast.io import checkpoints
from moca_fast.io.teacher import load_teacher
from moca_fast.viz import codes, masks, neighbors, pca
from moca_fast.viz.__main__ import main as viz_main

REPO = Path(__file__).resolve().parents[1]
# the run: 20 train digits per class (200), batch 50 -> 4 steps an epoch; a k-NN (5 val digits per class)
# after epoch 1 (step 4) and at the end (step 5)
STEPS_PER_EPOCH, STEPS = 4, 5


@pytest.fixture(autouse=True)
def fresh_root_logging(monkeypatch):
    """Each test starts without the root log handlers that earlier tests of the session bound to their captured,
    now closed, streams (they print "--- Logging error ---" tracebacks), as a command starts in a fresh process."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])


def _demo_subset(root: Path, split: str, per_class: int) -> Path:
    source = Path(getattr(prepare_demo(), {"train": "train", "val": "knn_val"}[split]))
    for digit in (str(d) for d in range(10)):
        (root / split / digit).mkdir(parents=True)
        for name in sorted(os.listdir(source / digit))[:per_class]:
            shutil.copy(source / digit / name, root / split / digit / name)
    return root / split


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`python launch/train.py` (the real entry point, in its own process) on 200 demo digits."""
    root = tmp_path_factory.mktemp("viz")
    train, val = _demo_subset(root / "digits", "train", 20), _demo_subset(root / "digits", "val", 5)
    output = root / "run"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--preset", "demo", "--data", str(train),
           "--output", str(output), "--max-steps", str(STEPS), "batch_size=50", "eval_every=1", "log_every=1",
           f"knn_train={train}", f"knn_val={val}"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)  # a run that hangs at exit fails here
    assert proc.returncode == 0, proc.stderr[-3000:]
    return output, val, proc.stdout


def _size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


# pixel sizes at 100 dpi, from each module's layout (inches per panel):
PCA_8 = (1600, 470)  # 4 image + PCA pairs per row at 2 in, 2 rows + 0.7 in of title
CODES_8 = (1500, 1070)  # 8 columns of 1.6 in + 2.2 in of legend; 3 rows of 1.6 in, title, 6 word rows of 0.75 in
CURVES = (1080, 570)  # 3 x 2 panels of 3.6 x 2.6 in, title
MASKS = (800, 350)  # 4 panels of 2 in, title and legend


def test_the_run_ends_with_its_figures_and_tensorboard_has_them_at_each_evaluation(run):
    output, _, printed = run
    figures = output / "figures"
    expected = {"curves.png": CURVES, "pca.png": PCA_8, "codes.png": CODES_8}
    assert {p.name: _size(p) for p in figures.iterdir()} == expected
    assert f"figures of the run: {figures / 'curves.png'}, {figures / 'pca.png'}, {figures / 'codes.png'}\n" in printed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for tag, size in (("figures/pca", PCA_8), ("figures/codes", CODES_8)):
        assert [(e.step, e.width, e.height) for e in events.Images(tag)] == [(STEPS_PER_EPOCH, *size), (STEPS, *size)]


def test_every_command_writes_its_png_with_the_expected_size(run, tmp_path, capsys):
    output, val, _ = run
    source = ["--checkpoint", str(output)]
    commands = {
        "pca": (source + ["--data", "demo"], PCA_8),
        "pca_foreground": (source + [str(val), "--num-images", "3", "--foreground"], (1800, 270)),  # 9 panels, 1 row
        "codes": (source + ["--data", "demo"], CODES_8),
        "masks": (source + [str(val / "3")], MASKS),
        "curves": ([str(output), str(output / "metrics.jsonl")], CURVES),
        "neighbors": (source + [str(val), "--num-images", "1", "-k", "3"], (560, 250)),  # 1 + 3 panels of 1.4 in
    }
    for name, (argv, size) in commands.items():
        png = tmp_path / f"{name}.png"
        assert viz_main([name.split("_")[0], *argv, "--output", str(png)]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.strip().endswith(f"->  {png}")
        assert _size(png) == size, name
    assert sorted(os.listdir(tmp_path)) == sorted(f"{name}.png" for name in commands)  # no temporary file left


def _inputs(run_or_file, images, preset=None):
    teacher = load_teacher(str(run_or_file), preset, "cpu")
    shown = load_images(find_images([str(images)], None, 8), teacher.cfg.img_size)
    return teacher, shown, patch_tokens(encoder_tokens(teacher.encoder), shown.normalized("cpu"))


def test_pca_colours_vary_across_the_patches_of_one_image(run):
    output, val, _ = run
    fig, _, _ = pca.figure(["--checkpoint", str(output), str(val)])
    drawn = fig.axes[1].images[0].get_array()  # the first image's PCA panel, as drawn: [28, 28, 3]
    assert drawn.shape == (28, 28, 3)
    patches = drawn.reshape(4, 7, 4, 7, 3).transpose(0, 2, 1, 3, 4).reshape(16, 49, 3)
    assert np.all(patches == patches[:, :1]), "each patch is one flat colour (nearest-neighbour upsampling)"
    colours = np.unique(patches[:, 0].round(3), axis=0)
    assert len(colours) >= 4 and patches[:, 0].std(axis=0).min() > 0.05, colours


def _permute_codebook(run: Path, copy: Path, permutation: torch.Tensor) -> None:
    """copy: the run with its codebook's words reordered (digests re-recorded, as a real checkpoint has them)."""
    shutil.copytree(run, copy)
    folder = checkpoints.latest_checkpoint(copy)
    state_file = next((folder / checkpoints.DEEPSPEED_TAG).glob("mp_rank_*_model_states.pt"))
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    state["module"]["codebook.words"] = state["module"]["codebook.words"][permutation]
    torch.save(state, state_file)
    meta = json.loads((folder / checkpoints.META).read_text())
    meta["files"] = checkpoints.file_digests(folder)
    (folder / checkpoints.META).write_text(json.dumps(meta))


def _legend_words(fig) -> list[int]:
    texts = [t.get_text() for t in fig.subfigs[0].legends[0].get_texts()]  # the legend of the maps' part
    return [int(t.split(":")[0].split()[1]) for t in texts if t.startswith("word ")]


def test_codes_are_the_runs_own_codebook_words(run, tmp_path):
    output, val, _ = run
    teacher, shown, tokens = _inputs(output, val)
    maps = code_maps(tokens, teacher.codebook)
    # the argmax of the sharpened soft-assignment is the nearest word by cosine, whatever the sharpening
    cosine = torch.nn.functional.normalize(tokens, dim=2) @ teacher.codebook.words.T
    assert np.array_equal(maps.words, cosine.argmax(dim=2).reshape(maps.words.shape).numpy())
    assert maps.dist_norm == float(teacher.codebook.dist_norm_prev) != teacher.cfg.dist_norm_init
    original, _, _ = codes.figure(["--checkpoint", str(output), str(val)])
    words = _legend_words(original)
    assert len(words) > 1 and words == [int(w) for w in maps.ranking[:len(words)]]

    permutation = torch.randperm(teacher.cfg.num_words, generator=torch.Generator().manual_seed(0))
    _permute_codebook(output, tmp_path / "replaced", permutation)
    replaced = code_maps(tokens, load_teacher(str(tmp_path / "replaced"), None, "cpu").codebook)
    # word i of the replaced codebook is word permutation[i] of the run's
    assert np.array_equal(permutation.numpy()[replaced.words], maps.words)
    assert not np.array_equal(replaced.words, maps.words)
    np.testing.assert_allclose(replaced.entropy, maps.entropy, rtol=1e-5, atol=1e-6)  # same words, other order
    fig, _, _ = codes.figure(["--checkpoint", str(tmp_path / "replaced"), str(val)])
    words = _legend_words(fig)
    assert words == [int(w) for w in replaced.ranking[:len(words)]] != _legend_words(original)
    assert [replaced.uses[w] for w in words] == [maps.uses[permutation[w]] for w in words]


def test_masks_reproduce_the_configs_counts(run, tmp_path):
    cfg = load_config("vit_base_dec2")
    fig, summary, _ = masks.figure(["--preset", "vit_base_dec2", str(prepare_demo().knn_val), "--seed", "3"])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[1:] == ["round 1\nencoder 88, decoder 127", "round 2\nencoder 49, decoder 88", "both rounds\n"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[1:] == ["round 1 encoder (88)", "round 2 encoder (49)",
                          "decoder-only position (a mask token), both rounds (39)",
                          "not used by the round (by neither: 20)"]
    drawn = masks.round_masks(cfg, 3)
    for kind, keep, dec in zip(drawn.rounds, (88, 49), (127, 88)):
        assert (kind == masks.ENCODER).sum() == keep and (kind != masks.UNUSED).sum() == dec
    round1_decoder = drawn.rounds[0] != masks.UNUSED
    assert not (round1_decoder & (drawn.rounds[1] == masks.ENCODER)).any(), "round 2 sees nothing round 1 decodes"
    assert np.array_equal(drawn.rounds[0] == masks.DECODER_ONLY, drawn.rounds[1] == masks.DECODER_ONLY)
    # the run's own config (demo, 4 x 4 tokens): 7 and 4 visible, 10 and 7 decoder positions
    output, val, _ = run
    fig, summary, _ = masks.figure(["--checkpoint", str(output), str(val)])
    assert "encoder 7 and 4 tokens, decoder 10 and 7 positions of 16" in summary


def test_neighbors_are_the_nearest_by_the_knn_features(run):
    output, val, _ = run
    fig, summary, _ = neighbors.figure(["--checkpoint", str(output), str(val / "0"), "--num-images", "2", "-k", "4",
                                        "--train", str(val)])
    assert "4 nearest of 2 queries among 50 training images" in summary
    teacher, shown, tokens = _inputs(output, val / "0")
    queries = torch.nn.functional.normalize(tokens[:2].mean(dim=1), dim=1)
    bank_images = find_images([str(val)], None, 10**6)
    bank = load_images(bank_images, teacher.cfg.img_size)
    bank_features = torch.nn.functional.normalize(
        patch_tokens(encoder_tokens(teacher.encoder), bank.normalized("cpu")).mean(dim=1), dim=1)
    sims = queries @ bank_features.T
    for q in range(2):
        sims[q, bank.files.index(shown.files[q])] = -2  # a query is not its own neighbour
        shown_sims = [float(fig.axes[q * 5 + 1 + j].get_title().split("\n")[0]) for j in range(4)]
        # titles round to 3 decimals; the bank's batches differ from the command's (float rounding only)
        np.testing.assert_allclose(shown_sims, sims[q].topk(4).values.numpy(), atol=5e-4 + 1e-6)


def test_curves_overlay_runs_labelled_by_name(run, tmp_path):
    output, _, _ = run
    other = tmp_path / "second"
    other.mkdir()
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics.jsonl").write_text("".join(json.dumps({**r, "loss": 2 * r.get("loss", 1)}) + "\n"
                                                 for r in records) + '{"step": 9, "lo')  # a line cut short
    fig = curves_figure([str(output), str(other)])
    loss = fig.axes[0]
    assert [line.get_label() for line in loss.lines] == ["run", "second"]
    steps = [r["step"] for r in records if "loss" in r]
    assert list(loss.lines[0].get_xdata()) == steps == list(range(1, STEPS + 1))
    knn = fig.axes[4].lines[0]
    assert list(knn.get_xdata()) == [0, STEPS_PER_EPOCH, STEPS]  # random init, the epoch-1 k-NN, the final one
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["run", "second"]


@pytest.fixture(scope="module")
def timm_export(tmp_path_factory):
    from eval_data import tiny_model

    path = tmp_path_factory.mktemp("export") / "teacher.safetensors"
    export_teacher_timm(tiny_model(), path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["pca", "--preset", "demo"], "no images: give image files or folders, or --data demo"),
    (["pca", "--preset", "demo", "{empty}"], "holds no usable images"),
    (["pca", "--preset", "demo", "{not_image}"], "not an image PIL can decode"),
    (["pca", "--preset", "demo", "{missing}"], "no such image file or folder"),
    (["codes", "--checkpoint", "{missing}", "--data", "demo"], "not a checkpoint folder, run folder or file"),
    (["codes", "--checkpoint", "{not_image}", "--data", "demo"], "not a"),
    (["masks", "--preset", "vit_huge", "--data", "demo"], "unknown preset 'vit_huge'"),
    (["pca", "--data", "demo"], "give --checkpoint"),
    (["codes", "--checkpoint", "{timm}", "--data", "demo"], "holds no codebook"),
    (["curves", "{empty}"], "no metrics.jsonl"),
    (["neighbors", "--preset", "demo", "--data", "demo", "-k", "0"], "-k 0 must be >= 1"),
    (["pca", "--preset", "demo", "--data", "demo", "--output", "{not_image}/x.png"], "not_image.jpg is a file"),
    (["codes", "--checkpoint", "{missing}", "--data", "demo", "--output", "{empty}"], "is a folder, not a file"),
    (["nope"], "unknown figure 'nope'"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, tmp_path, timm_export, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    (tmp_path / "not_image.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 10)
    paths = {"empty": tmp_path / "empty", "not_image": tmp_path / "not_image.jpg", "missing": tmp_path / "missing",
             "timm": timm_export}
    assert viz_main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_file(tmp_path, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def fail(self, path, **kwargs):
        raise RuntimeError("the renderer broke\nsecond line")

    monkeypatch.setattr(Figure, "savefig", fail)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert viz_main(["masks", "--preset", "demo", "--data", "demo", "--output", str(tmp_path / "m.png")]) == 1
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("error: rank 0: RuntimeError: the renderer broke (traceback in ")
    kept = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert kept.parent == tmp_path and "Traceback" in kept.read_text() and "the renderer broke" in kept.read_text()
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_while_saving_leaves_no_partial_png(stop, tmp_path):
    """The signal comes while the PNG's temporary file is half written: the command ends at once (from the
    watcher thread, moca_fast.ending) and removes it."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from matplotlib.figure import Figure
        from moca_fast.viz.__main__ import main

        def save_half_then_signal(self, path, **kwargs):
            Path(path).write_bytes(b"\\x89PNG\\r\\n\\x1a\\n half")
            os.kill(os.getpid(), {int(stop)})
            time.sleep(60)

        Figure.savefig = save_half_then_signal
        sys.exit(main(["masks", "--preset", "demo", "--data", "demo", "--output", {str(out / "m.png")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 128 + stop, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"stopped by {stop.name} before the figure was written: nothing written"
    assert os.listdir(out) == []


def test_ctrl_c_during_a_command_ends_it_with_one_line(tmp_path):
    """SIGINT to the command's process group (as Ctrl-C sends it: its DataLoader workers too) while it extracts
    the training images' features. (SIGTERM while it writes: the test above.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moca_fast.viz", "neighbors", "--preset", "demo", "--data", "demo",
           "--output", str(tmp_path / "n.png"), "--batch-size", "1", "--num-workers", "1"]  # 4000 batches
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = ""
    deadline = time.time() + 240
    while not re.search(r"training features: .*\| [1-9]\d*/\d+", seen):  # a batch done: the workers are up
        assert time.time() < deadline and proc.poll() is None, seen
        seen += proc.stderr.read(1)
    os.killpg(proc.pid, signal.SIGINT)
    _, rest = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGINT, seen + rest
    assert "Traceback" not in seen + rest
    assert rest.replace("\r", "\n").strip().splitlines()[-1] == \
        "stopped by SIGINT before the figure was written: nothing written"
    assert os.listdir(tmp_path) == []


def test_a_long_title_stays_inside_the_figure():
    """A source path longer than the figure is wide is wrapped, not cut at the figure's edges."""
    from moca_fast.figures.figure import new_figure, set_title

    fig = new_figure(4.0, 2.0)
    set_title(fig, "Masking rounds of a training step: checkpoint " + "/a/long/run/folder" * 12 + ", step 496\nline 2")
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, (box, fig.bbox)
    assert fig._suptitle.get_text().count("\n") > 1
