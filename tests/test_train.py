"""Tests of ``python -m lip_cuda.train`` on the CPU, with the tiny
``lip_smoke`` LIP-ResNet: training lowers the loss, resuming continues
exactly, two torchrun processes (gloo) split the data and average gradients,
an ImageFolder trains and evaluates, a killed run leaves a loadable
checkpoint, bad input fails early with a clear message."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lip_cuda.models import convert_reference_state_dict
from lip_cuda.nn import LIP2d
from lip_cuda.train import TrainConfigError, build_model, main
from lip_cuda.train.archs import SmokeLIPResNet, available_archs
from lip_cuda.train.checkpoint import FORMAT, atomic_save
from lip_cuda.train.cli import resolve_batch_size
from lip_cuda.train.data import SyntheticImages
from lip_cuda.train.engine import lr_factor, param_groups

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--arch", "lip_smoke", "--num-classes", "10"]


@pytest.fixture(autouse=True)
def one_thread():
    """The smoke model is tiny: one intra-op thread is as fast, and immune to
    the slowdown of spinning OpenMP threads on a busy 2-core machine (the
    subprocesses get OMP_NUM_THREADS=1 for the same reason)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _metrics(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}")


def test_single_process_loss_falls_and_resume_is_exact(tmp_path: Path, seed: int, capsys) -> None:
    base = ["--synthetic", "64", "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--lr", "2.0",
            "--warmup-epochs", "0.5", "--nesterov", "--label-smoothing", "0.05", "--print-freq", "4",
            "--seed", str(seed), *SMOKE]
    full = main(base + ["--output", str(tmp_path / "full")])
    out = capsys.readouterr().out
    losses = [h["train_loss"] for h in full["history"]]
    assert losses[1] < losses[0] < math.log(10) + 0.5, losses
    assert "img/s" in out and " lr " in out and "eta " in out and "summary:" in out

    ck = _load(tmp_path / "full" / "checkpoint.pth")
    assert ck["format"] == FORMAT and ck["arch"] == "lip_smoke" and ck["epoch"] == 2
    assert (tmp_path / "full" / "model_best.pth").is_file()
    # Authors' key format: DDP-style "module." keys, loadable into a bare model.
    assert all(k.startswith("module.") for k in ck["state_dict"])
    SmokeLIPResNet(10).load_state_dict(convert_reference_state_dict(ck), strict=True)
    recs = _metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["type"] for r in recs] == ["config", "epoch", "epoch", "summary"]
    assert [r["train_loss"] for r in recs if r["type"] == "epoch"] == losses

    # The same run stopped after epoch 1, then resumed: must end identical.
    part_dir = tmp_path / "part"
    main(base + ["--output", str(part_dir)], _stop_after_epoch=1)
    ck1 = _load(part_dir / "checkpoint.pth")
    assert ck1["epoch"] == 1 and ck1["global_step"] == 8
    resumed = main(base + ["--output", str(part_dir), "--resume", str(part_dir / "checkpoint.pth")])
    assert resumed["start_epoch"] == 1 and [h["epoch"] for h in resumed["history"]] == [2]
    ck2 = _load(part_dir / "checkpoint.pth")
    _assert_same_tensors(ck2["state_dict"], ck["state_dict"])
    assert ck2["scheduler"]["last_epoch"] == ck["scheduler"]["last_epoch"] == 16
    opt_a, opt_b = ck["optimizer"], ck2["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys() and len(opt_a["state"]) > 0
    for i in opt_a["state"]:
        torch.testing.assert_close(opt_a["state"][i]["momentum_buffer"], opt_b["state"][i]["momentum_buffer"])
    assert resumed["history"][0]["train_loss"] == pytest.approx(full["history"][1]["train_loss"], rel=1e-6)
    assert [r["epoch"] for r in _metrics(part_dir / "metrics.jsonl") if r["type"] == "epoch"] == [1, 2]


def test_resume_with_another_global_batch_continues_the_schedule(tmp_path: Path, seed: int) -> None:
    """The schedule is one of epochs: resumed at another global batch, it
    continues from the epochs done at this run's steps per epoch and peak lr
    (a larger batch used to read the old step count as more epochs and end
    the cosine run early, at lr 0)."""
    base = ["--synthetic", "16", "--image-size", "16", "--epochs", "3", "--lr", "0.4", "--lr-base-batch", "4",
            "--print-freq", "100", "--seed", str(seed), *SMOKE]
    fresh = main(base + ["--batch-size", "4", "--output", str(tmp_path / "fresh")])
    part = tmp_path / "part"
    main(base + ["--batch-size", "2", "--output", str(part)], _stop_after_epoch=2)
    resumed = main(base + ["--batch-size", "4", "--output", str(part), "--resume", str(part / "checkpoint.pth")])
    assert [h["epoch"] for h in resumed["history"]] == [3]
    want = fresh["history"][2]["lr"]
    assert want > 1e-3  # the cosine run's last step, not its end (0)
    assert resumed["history"][0]["lr"] == pytest.approx(want, rel=1e-9)
    ck = _load(part / "checkpoint.pth")
    assert ck["scheduler"]["last_epoch"] == 3 * 4 and ck["scheduler"]["base_lrs"][0] == pytest.approx(0.4)


@pytest.mark.parametrize("option,before,after", [("--lr", "0.2", "0.4"), ("--lr-base-batch", "8", "4")])
def test_resume_with_another_peak_lr_continues_the_schedule_at_it(tmp_path: Path, seed: int, option: str,
                                                                  before: str, after: str) -> None:
    """Resumed with the same global batch but another peak lr (--lr or
    --lr-base-batch changed), the schedule continues at the new peak lr:
    the last epoch runs at the lr of a fresh run with the new options."""
    base = ["--synthetic", "16", "--image-size", "16", "--epochs", "3", "--batch-size", "4", "--lr", "0.4",
            "--lr-base-batch", "4", "--print-freq", "100", "--seed", str(seed), *SMOKE]

    def with_option(value: str) -> list:
        argv = list(base)
        argv[argv.index(option) + 1] = value
        return argv

    fresh = main(with_option(after) + ["--output", str(tmp_path / "fresh")])
    part = tmp_path / "part"
    main(with_option(before) + ["--output", str(part)], _stop_after_epoch=2)
    resumed = main(with_option(after) + ["--output", str(part), "--resume", str(part / "checkpoint.pth")])
    assert [h["epoch"] for h in resumed["history"]] == [3]
    want = fresh["history"][2]["lr"]
    assert want > 1e-3
    assert resumed["history"][0]["lr"] == pytest.approx(want, rel=1e-9)
    fresh_ck, ck = _load(tmp_path / "fresh" / "checkpoint.pth"), _load(part / "checkpoint.pth")
    assert ck["scheduler"]["base_lrs"] == pytest.approx(fresh_ck["scheduler"]["base_lrs"])


def test_param_groups_decay_only_conv_and_linear_weights() -> None:
    """Weight decay on conv and linear weights; none on norm weights and on
    biases (the optimiser groups of the authors' recipe)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4),
                                torch.nn.InstanceNorm2d(4, affine=True), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2, bias=True))
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "4.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.bias", "1.weight", "2.bias",
                                                                 "2.weight", "4.bias"]


def test_torchrun_two_processes_gloo(tmp_path: Path, seed: int) -> None:
    n, batch, epochs, lr = 32, 8, 2, 0.8
    out, dump = tmp_path / "out", tmp_path / "dump"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lip_cuda.train", "--synthetic", str(n), "--image-size", "32", "--batch-size", str(batch),
           "--epochs", str(epochs), "--lr", str(lr), "--weight-decay", "1e-3", "--print-freq", "1",
           "--seed", str(seed), "--output", str(out), "--debug-dump", str(dump), *SMOKE]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = _load(dump / "rank0.pt"), _load(dump / "rank1.pt")
    steps = n // (2 * batch)
    # Disjoint data: every epoch each rank takes its own half of the images.
    for e in range(epochs):
        a = set(r0["indices"][e * steps * batch:(e + 1) * steps * batch])
        b = set(r1["indices"][e * steps * batch:(e + 1) * steps * batch])
        assert len(a) == len(b) == steps * batch and not a & b and a | b == set(range(n))
    _assert_same_tensors(r0["init_params"], r1["init_params"])
    _assert_same_tensors(r0["params"], r1["params"])

    # Gradient averaging: replay the run in this process, each step averaging
    # the gradients of both ranks' batches.
    # One thread here as in each rank (see one_thread): the zero-initialised
    # LIP logit convs sit behind an InstanceNorm of a constant, which
    # amplifies summation-order noise far beyond any fixed tolerance.
    model = SmokeLIPResNet(10)
    model.load_state_dict(r0["init_params"], strict=False)
    opt = torch.optim.SGD(param_groups(model, 1e-3), lr=lr * 2 * batch / 256, momentum=0.9)
    data = SyntheticImages(n, 10, 32, seed)
    model.train()
    for s in range(epochs * steps):
        for g in opt.param_groups:
            g["lr"] = lr * 2 * batch / 256 * lr_factor(s, steps, epochs, 0.0, "cosine")
        opt.zero_grad()
        for rank in (r0, r1):
            idx = rank["indices"][s * batch:(s + 1) * batch]
            x = torch.stack([data[i][0] for i in idx])
            y = torch.tensor([data[i][1] for i in idx])
            (torch.nn.functional.cross_entropy(model(x), y) / 2).backward()
        opt.step()
    expected = {k: v.detach() for k, v in model.named_parameters()}
    assert not torch.equal(expected["fc.weight"], r0["init_params"]["fc.weight"])
    for k, v in expected.items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")

    # Only rank 0 wrote and logged.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "metrics.jsonl", "model_best.pth"]
    kinds = [r["type"] for r in _metrics(out / "metrics.jsonl")]
    assert kinds == ["config"] + ["epoch"] * epochs + ["summary"]
    assert _metrics(out / "metrics.jsonl")[0]["world_size"] == 2
    assert proc.stdout.count(f"epoch {epochs}/{epochs} done") == 1
    assert proc.stdout.count("summary:") == 1


def _write_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=(6, 3)) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for split, count in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(count):
                colour = torch.tensor([60.0, 120.0, 180.0]).roll(c)
                px = (torch.rand(40, 44, 3, generator=g) * 80 + colour).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy()).save(d / f"{i}.png")


def _reference_eval(state_dict: dict, data: Path) -> tuple:
    """Top-1 (%) and mean loss of the weights over data/val, computed here."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    model = SmokeLIPResNet(3)
    model.load_state_dict(convert_reference_state_dict(state_dict))
    model.eval()
    tf = T.Compose([T.Resize(37), T.CenterCrop(32), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = ImageFolder(data / "val", tf)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        logits = model(x)
    return 100.0 * (logits.argmax(1) == y).float().mean().item(), torch.nn.functional.cross_entropy(logits, y).item()


def test_image_folder_trains_and_evaluates(tmp_path: Path, seed: int) -> None:
    pytest.importorskip("torchvision")
    data, out = tmp_path / "data", tmp_path / "out"
    _write_image_folder(data)
    common = ["--data", str(data), "--arch", "lip_smoke", "--image-size", "32", "--batch-size", "4", "--seed", str(seed)]
    res = main(common + ["--epochs", "1", "--workers", "1", "--lr", "1.0", "--output", str(out)])
    assert res["val"]["images"] == 9 and math.isfinite(res["history"][0]["train_loss"])
    ck = _load(out / "model_best.pth")
    assert ck["classes"] == ["cat", "dog", "eel"] and ck["num_classes"] == 3

    ev = main(common + ["--workers", "0", "--evaluate", "--weights", str(out / "model_best.pth")])["val"]
    top1, loss = _reference_eval(ck, data)
    assert ev["images"] == 9
    assert ev["top1"] == pytest.approx(top1) and ev["loss"] == pytest.approx(loss, rel=1e-5)
    assert ev["top1"] == pytest.approx(res["val"]["top1"]) and 0 <= ev["top1"] <= ev["top5"] <= 100

    # The authors' layouts load too: a bare state dict and their training
    # checkpoint (their "arch" names the ResNet depth, not ours).
    bare = tmp_path / "bare.pth"
    torch.save(convert_reference_state_dict(ck), bare)
    theirs = tmp_path / "theirs.pth"
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": ck["state_dict"], "best_acc1": torch.tensor(1.0)}, theirs)
    for path in (bare, theirs):
        again = main(common + ["--workers", "0", "--evaluate", "--weights", str(path)])["val"]
        assert again["loss"] == pytest.approx(ev["loss"], rel=1e-6)


def test_killed_mid_epoch_leaves_loadable_checkpoint(tmp_path: Path, seed: int) -> None:
    out = tmp_path / "out"
    args = ["--synthetic", "320", "--synthetic-val", "8", "--image-size", "32", "--batch-size", "8",
            "--epochs", "3", "--print-freq", "1", "--seed", str(seed), *SMOKE]
    proc = subprocess.Popen([sys.executable, "-m", "lip_cuda.train", *args, "--output", str(out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("epoch 2/3 step"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert any(line.startswith("epoch 1/3 done") for line in seen)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth", "metrics.jsonl", "model_best.pth"]
    ck = _load(out / "checkpoint.pth")
    assert ck["epoch"] == 1
    SmokeLIPResNet(10).load_state_dict(convert_reference_state_dict(ck), strict=True)
    resumed = main(args + ["--output", str(out), "--resume", str(out / "checkpoint.pth")], _stop_after_epoch=2)
    assert resumed["start_epoch"] == 1 and _load(out / "checkpoint.pth")["epoch"] == 2


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pth"
    first = {"epoch": 1, "w": torch.randn(5)}
    atomic_save(first, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save(obj, f)
        f.truncate(10)  # half-written file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"epoch": 2, "w": torch.randn(5)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
    torch.testing.assert_close(_load(path)["w"], first["w"])
    second = {"epoch": 2, "w": torch.randn(5)}
    atomic_save(second, path)
    torch.testing.assert_close(_load(path)["w"], second["w"])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last(tmp_path: Path, amp: str, seed: int) -> None:
    res = main(["--synthetic", "16", "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--amp", amp,
                "--channels-last", "--seed", str(seed), "--output", str(tmp_path), *SMOKE])
    assert math.isfinite(res["history"][0]["train_loss"]) and math.isfinite(res["val"]["loss"])
    ck = _load(tmp_path / "checkpoint.pth")
    assert (ck["scaler"] is not None and "scale" in ck["scaler"]) == (amp == "fp16")


def test_step_schedule_and_registry(monkeypatch) -> None:
    # Warm-up ramps linearly to 1; the step schedule multiplies by gamma at each milestone.
    spe = 7
    assert [lr_factor(s, spe, 10, 2, "step", [4, 8], 0.1) for s in (0, 13)] == pytest.approx([1 / 14, 1.0])
    for s in range(2 * spe, 10 * spe):
        want = 0.1 ** ((s // spe >= 4) + (s // spe >= 8))
        assert lr_factor(s, spe, 10, 2, "step", [4, 8], 0.1) == pytest.approx(want)
        t = (s - 2 * spe) / (8 * spe)
        assert lr_factor(s, spe, 10, 2, "cosine") == pytest.approx((1 + math.cos(math.pi * t)) / 2)
    archs = available_archs()
    assert {"lip_resnet50", "lip_resnet101", "lip_resnet152", "resnet50", "lip_smoke"} <= set(archs)
    for backend, ref in (("fused", False), ("reference", True)):
        lips = [m for m in build_model("lip_smoke", 10, backend).modules() if isinstance(m, LIP2d)]
        assert len(lips) == 5 and all(m.use_reference == ref for m in lips)
    # The registry follows lip_cuda.models: a LIP arch it lacks is reported
    # as missing from this version, one it gains is picked up.
    from lip_cuda import models
    from lip_cuda.train import archs as archs_mod

    monkeypatch.setattr(archs_mod, "LIP_ARCH_NAMES", archs_mod.LIP_ARCH_NAMES + ("lip_future9",))
    with pytest.raises(TrainConfigError, match="lip_future9 is not available: this version of lip_cuda.models"):
        build_model("lip_future9", 10)
    monkeypatch.setattr(models, "lip_future9", lambda num_classes: SmokeLIPResNet(num_classes), raising=False)
    assert build_model("lip_future9", 7).fc.out_features == 7
    ns = type("NS", (), {"batch_size": None, "global_batch_size": 12})()
    assert resolve_batch_size(ns, 4) == 3
    with pytest.raises(TrainConfigError, match="does not divide over 5 processes"):
        resolve_batch_size(ns, 5)


def _smoke_checkpoint(path: Path) -> None:
    model = SmokeLIPResNet(10)
    torch.save({"format": FORMAT, "arch": "lip_smoke", "epoch": 1,
                "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)


@pytest.mark.parametrize("case", [
    "missing_data", "no_class_folders", "empty_class", "no_val", "unknown_arch", "batch_too_big",
    "global_batch_not_dividing", "resume_other_arch", "weights_other_arch", "missing_weights",
    "evaluate_without_weights", "output_has_checkpoint", "weights_other_classes",
    "image_too_small", "output_is_a_file", "output_not_creatable", "negative_gamma", "momentum_one", "zero_milestone",
    "label_smoothing_one",
])
def test_bad_input_fails_early(tmp_path: Path, case: str, monkeypatch) -> None:
    out = tmp_path / "out"
    syn = ["--synthetic", "16", "--image-size", "32", *SMOKE, "--output", str(out)]
    ck = tmp_path / "smoke.pth"
    if case in ("no_class_folders", "empty_class", "no_val"):
        (tmp_path / "d" / "train").mkdir(parents=True)
        if case != "no_val":
            (tmp_path / "d" / "val").mkdir()
        else:
            _write_image_folder(tmp_path / "d", classes=("cat",), per_class=(1, 0))
            (tmp_path / "d" / "val" / "cat").rmdir()
            (tmp_path / "d" / "val").rmdir()
        if case == "empty_class":
            (tmp_path / "d" / "train" / "cat").mkdir()
    if case in ("resume_other_arch", "weights_other_arch", "weights_other_classes"):
        _smoke_checkpoint(ck)
    if case == "global_batch_not_dividing":
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", "0")
    if case == "output_has_checkpoint":
        out.mkdir()
        (out / "checkpoint.pth").write_bytes(b"old run")
    if case == "output_is_a_file":
        (tmp_path / "file").write_bytes(b"not a folder")
    if case == "output_not_creatable":
        (tmp_path / "file2").write_bytes(b"not a folder")
    argv, message = {
        "missing_data": (["--data", str(tmp_path / "nope")], "no such directory"),
        "no_class_folders": (["--data", str(tmp_path / "d")], "'train' has no class folders"),
        "empty_class": (["--data", str(tmp_path / "d")], "cat holds no images"),
        "no_val": (["--data", str(tmp_path / "d")], "no 'val' folder"),
        "unknown_arch": (["--synthetic", "16", "--arch", "lip_resnet18"], r"unknown --arch 'lip_resnet18' \(available: .*lip_resnet50"),
        "batch_too_big": (syn + ["--batch-size", "32"], "16 images, fewer than one global batch"),
        "global_batch_not_dividing": (syn + ["--global-batch-size", "16"], "16 does not divide over 3 processes"),
        "resume_other_arch": (["--synthetic", "16", "--arch", "lip_resnet50", "--resume", str(ck), "--output", str(out)],
                              "saved for --arch lip_smoke, not --arch lip_resnet50"),
        "weights_other_arch": (["--synthetic", "16", "--image-size", "32", "--arch", "lip_resnet50", "--num-classes", "10",
                                "--batch-size", "8", "--weights", str(tmp_path / "bare.pth"), "--output", str(out)],
                               "does not fit --arch lip_resnet50: .* missing keys"),
        "missing_weights": (syn + ["--weights", str(tmp_path / "none.pth")], "none.pth: no such file"),
        "evaluate_without_weights": (syn + ["--evaluate"], "--evaluate needs --weights"),
        "output_has_checkpoint": (syn, "already holds checkpoint.pth"),
        "image_too_small": (["--synthetic", "16", "--image-size", "4", *SMOKE, "--output", str(out)],
                            "--image-size 4 is too small for --arch lip_smoke: it takes 5 and up"),
        "output_is_a_file": (syn[:-1] + [str(tmp_path / "file")], "exists and is not a directory"),
        "output_not_creatable": (syn[:-1] + [str(tmp_path / "file2" / "run")], "cannot be created"),
        "negative_gamma": (syn + ["--schedule", "step", "--lr-gamma", "-1"], "--lr-gamma must be > 0"),
        "momentum_one": (syn + ["--momentum", "1"], r"--momentum must be in \[0, 1\)"),
        "zero_milestone": (syn + ["--schedule", "step", "--lr-steps", "0", "2"], "--lr-steps must be epochs >= 1"),
        "label_smoothing_one": (syn + ["--label-smoothing", "1"], r"--label-smoothing in \[0, 1\)"),
        "weights_other_classes": (["--synthetic", "16", "--image-size", "32", "--arch", "lip_smoke", "--num-classes", "4",
                                   "--batch-size", "8", "--weights", str(ck), "--output", str(out)],
                                  r"fc.weight \(10, 64\) vs \(4, 64\) \(the checkpoint has 10 classes, this run 4\)"),
    }[case]
    if case == "weights_other_arch":
        torch.save(SmokeLIPResNet(10).state_dict(), tmp_path / "bare.pth")  # a bare state dict: no arch recorded
    with pytest.raises(TrainConfigError, match=message):
        main(argv)
    if case != "output_has_checkpoint":
        assert not out.exists()  # failed before writing anything


def test_cli_reports_errors_and_missing_torchvision(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lip_cuda.train", "--synthetic", "8", "--arch", "lip_densenet999"],
                          env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "lip_cuda.train: error: unknown --arch 'lip_densenet999'" in proc.stderr
    # Without torchvision: --data and --arch resnet50 say what to install, --synthetic LIP runs still work.
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "from lip_cuda.train import main\n"
        "for argv in (['--data', sys.argv[1]], ['--synthetic', '8', '--arch', 'resnet50']):\n"
        "    try: main(argv + ['--image-size', '32', '--batch-size', '4'])\n"
        "    except ImportError as e: print('IMPORT-ERROR', e)\n"
        "r = main(['--synthetic', '8', '--image-size', '32', '--arch', 'lip_smoke', '--num-classes', '4',"
        " '--batch-size', '4', '--epochs', '1'])\n"
        "print('OK', r['epochs_run'])\n"
    )
    _write_image_folder(tmp_path / "data", per_class=(1, 1))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], env=_env(), capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("IMPORT-ERROR") == 2 and proc.stdout.count("pip install lip_cuda[train]") == 2
    assert "OK 1" in proc.stdout
