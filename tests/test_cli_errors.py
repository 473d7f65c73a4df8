"""Every user error of the command line: exit code 2 and one line on stderr naming the problem and the fix."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import resetnet
from resetnet.checkpoint import save_checkpoint
from resetnet.cli import main
from resetnet.train.config import load_config

TINY = [
    "--set",
    "data.verify=false",
    "--set",
    "data.limit_train=null",
    "--set",
    "data.limit_test=null",
    "--set",
    "train.batch_size=20",
    "--set",
    "train.steps=2",
    "--set",
    "train.eval_every=0",
    "--set",
    "train.progress=false",
    "--set",
    "train.tensorboard=false",
]


def one_error(capsys, code: int, command: str, *expected: str) -> str:
    """Exit code 2 and exactly one line on stderr, ``resetnet COMMAND: error: ...`` holding ``expected``."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"resetnet {command}: error: "), err
    for text in expected:
        assert text in err, (text, err)
    return err


def fake_cifar(root: Path, n_train=100, n_test=40) -> Path:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}.bin", n_train // 5) for i in range(1, 6)] + [("test_batch.bin", n_test)]:
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], axis=1).astype(np.uint8)
        (d / name).write_bytes(rec.tobytes())
    return root


def checkpoint(path: Path, name="resnet_t3", model_cfg=None) -> Path:
    """A checkpoint of ``name``'s weights whose config records ``model_cfg`` (default: that model)."""
    torch.manual_seed(0)
    cfg = load_config({"model": {"name": name}, "data": {"verify": False}}).to_dict()
    if model_cfg is not None:
        cfg["model"] = model_cfg
    save_checkpoint(path, resetnet.create_model(name), {"config": cfg, "step": 1})
    return path


# ----------------------------------------------------------------------------- eval: checkpoints
@pytest.mark.parametrize(
    "model_cfg, expected",
    [
        ({"name": "no_such_model", "overrides": {}}, ["holds model 'no_such_model', which this resetnet cannot build", "unknown model"]),
        ({"name": "resnet_t3", "overrides": {"bogus": 1}}, ["which this resetnet cannot build", "bogus"]),
        ({"name": "reset_t3_2cu3it", "overrides": {}}, ["its weights do not fit model 'reset_t3_2cu3it'", "missing", "retrain"]),
    ],
)
def test_eval_of_a_checkpoint_that_cannot_be_rebuilt(tmp_path, capsys, model_cfg, expected):
    run = checkpoint(tmp_path / "run", model_cfg=model_cfg)
    one_error(capsys, main(["eval", str(run), "--data-dir", str(tmp_path / "no-data")]), "eval", *expected)
    analyze = main(["analyze", str(run), "--out", str(tmp_path / "analysis"), "--data-dir", str(tmp_path / "no-data")])
    one_error(capsys, analyze, "analyze", *expected)
    assert not (tmp_path / "analysis").exists()  # created for the check, removed: nothing was written


@pytest.mark.parametrize(
    "name, kind",
    [
        ("config.yaml", "a config file"),
        ("metrics.jsonl", "a metrics log"),
        ("notes.txt", "a .txt file"),
        ("eval.json", "not a resetnet checkpoint.json"),
    ],
)
def test_eval_of_a_file_that_is_not_a_checkpoint(tmp_path, capsys, name, kind):
    path = tmp_path / name
    path.write_text('{"acc": 1}\n' if name.endswith("json") else "model:\n  name: reset38\n")
    for command in (["eval", str(path)], ["analyze", str(path), "--out", str(tmp_path / "o")]):
        one_error(
            capsys,
            main(command),
            command[0],
            f"{path} is not a checkpoint",
            kind,
            "a run directory or a .safetensors checkpoint written by resetnet train",
        )


def test_eval_of_a_truncated_safetensors_file(tmp_path, capsys):
    run = checkpoint(tmp_path / "run")
    blob = next(run.glob("*.safetensors")).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:50])
    one_error(capsys, main(["eval", str(tmp_path / "cut.safetensors")]), "eval", "cut.safetensors")
    one_error(capsys, main(["eval", str(tmp_path / "missing")]), "eval", "no checkpoint at")


# ----------------------------------------------------------------------------- eval: device and --json, checked first
def test_eval_device_errors(tmp_path, capsys):
    run = checkpoint(tmp_path / "run")
    one_error(capsys, main(["eval", str(run), "--device", "cpux"]), "eval", "--device 'cpux' is not a device", "use auto, cpu, cuda")
    if not torch.cuda.is_available():
        one_error(capsys, main(["eval", str(run), "--device", "cuda"]), "eval", "CUDA is not available", "--device cpu")
    else:
        one_error(capsys, main(["eval", str(run), "--device", f"cuda:{torch.cuda.device_count()}"]), "eval", "CUDA device(s)")
    one_error(capsys, main(["analyze", str(run), "--out", str(tmp_path / "o"), "--device", "cpux"]), "analyze", "is not a device")


def test_eval_json_path_is_checked_before_the_evaluation(tmp_path, capsys):
    run = checkpoint(tmp_path / "run")
    no_data = str(tmp_path / "no-data")  # the evaluation would fail on the data: the path error must come first
    one_error(capsys, main(["eval", str(run), "--data-dir", no_data, "--json", str(tmp_path)]), "eval", f"--json {tmp_path} is a directory")
    target = tmp_path / "nowhere" / "r.json"
    one_error(
        capsys,
        main(["eval", str(run), "--data-dir", no_data, "--json", str(target)]),
        "eval",
        f"the directory {target.parent} does not exist",
        "create it first",
    )
    (tmp_path / "afile").write_text("x")
    one_error(capsys, main(["eval", str(run), "--data-dir", no_data, "--json", str(tmp_path / "afile" / "r.json")]), "eval", "is not a directory")
    assert not target.parent.exists()


def test_eval_json_written_after_a_good_evaluation(tmp_path, capsys):
    run = checkpoint(tmp_path / "run")
    data = fake_cifar(tmp_path / "data")
    out = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(run),
                "--data-dir",
                str(data),
                "--no-verify",
                "--json",
                str(out),
                "--limit",
                "8",
                "--timing-repeats",
                "1",
                "--timing-batch",
                "4",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["n_cifar10"] == 8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []  # no probe or temporary file left


# ----------------------------------------------------------------------------- train: the run directory
def test_train_out_that_cannot_be_a_run_directory(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    base = ["train", "--config", "smoke", "--data-dir", str(tmp_path / "no-data")]  # data would fail: the --out error comes first
    one_error(capsys, main(base + ["--out", str(tmp_path / "afile")]), "train", "is an existing file, not a directory", "choose another --out")
    one_error(capsys, main(base + ["--out", str(tmp_path / "afile" / "run")]), "train", "afile is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "x"


def test_train_into_a_read_only_directory(tmp_path, capsys, monkeypatch):
    from resetnet.train import runlock

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runlock.tempfile, "mkstemp", read_only)  # root ignores chmod: simulate the file system
    code = main(["train", "--config", "smoke", "--out", str(tmp_path / "x" / "run"), "--data-dir", str(tmp_path / "no-data")])
    one_error(capsys, code, "train", "is not writable (read-only file system)", "choose another --out")
    assert not (tmp_path / "x").exists()

    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if self.name == "locked-parent":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkdir(self, *a, **k)

    monkeypatch.undo()
    monkeypatch.setattr(Path, "mkdir", denied)
    code = main(["train", "--config", "smoke", "--out", str(tmp_path / "locked-parent" / "run"), "--data-dir", str(tmp_path / "no-data")])
    one_error(capsys, code, "train", "permission denied creating", "locked-parent")


def test_missing_data_leaves_no_run_directory_and_names_the_flag(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", "smoke", "--out", str(out), "--data-dir", str(tmp_path / "empty"), "--set", "data.download=false"])
    one_error(capsys, code, "train", "CIFAR-10 not found", "pass --download (resetnet train, eval and analyze")
    assert "download=True (--download)" not in capsys.readouterr().err
    assert not out.exists()  # created for the check, removed: nothing was written


def test_download_flag_of_train_and_analyze(tmp_path, capsys, monkeypatch):
    import resetnet.data.cifar10 as c10

    assert main(["train", "--config", "smoke", "--out", "unused", "--set", "data.download=false", "--download", "--print-config"]) == 0
    assert "download: true" in capsys.readouterr().out
    monkeypatch.setattr(c10, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-binary.tar.gz")  # no network
    code = main(
        [
            "train",
            "--config",
            "smoke",
            "--out",
            str(tmp_path / "run"),
            "--data-dir",
            str(tmp_path / "empty"),
            "--set",
            "data.download=false",
            "--download",
        ]
    )
    one_error(capsys, code, "train", "could not be downloaded")
    run = checkpoint(tmp_path / "ckpt")
    code = main(["analyze", str(run), "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path / "empty2")])
    one_error(capsys, code, "analyze", "CIFAR-10 not found", "pass --download")
    code = main(["analyze", str(run), "--out", str(tmp_path / "a"), "--data-dir", str(tmp_path / "empty2"), "--download"])
    one_error(capsys, code, "analyze", "could not be downloaded")


def test_a_second_train_on_the_same_out_is_refused(tmp_path, capsys):
    from resetnet.train.runlock import RunLock, read_lock

    out = tmp_path / "run"
    holder = RunLock(out.mkdir() or out).acquire()  # as another `resetnet train` would hold it
    try:
        code = main(["train", "--config", "smoke", "--out", str(out), "--data-dir", str(tmp_path / "no-data")])
        one_error(capsys, code, "train", f"in use by process {os.getpid()}", "choose another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"] and read_lock(out / ".lock")["pid"] == os.getpid()  # untouched
    finally:
        holder.release()


def test_train_resume_and_init_from_with_unreadable_checkpoints(tmp_path, capsys):
    data = fake_cifar(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.json").write_text("{not json")
    code = main(["train", "--config", "smoke", "--out", str(out), "--data-dir", str(data), "--resume"] + TINY)
    one_error(capsys, code, "train", str(out))
    from resetnet.train.runlock import RunLock

    RunLock(out).acquire().release()  # released

    (tmp_path / "config.yaml").write_text("model:\n  name: reset38\n")
    fresh = tmp_path / "fresh"
    code = main(["train", "--config", "smoke", "--out", str(fresh), "--data-dir", str(data), "--set", f"init_from={tmp_path / 'config.yaml'}"] + TINY)
    one_error(capsys, code, "train", "config.yaml")
    assert not fresh.exists()


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "is empty"),
        ("# only a comment\n\n   # and another\n", "is empty"),
        (
            "train:\n  iterations: 5\n  batch_size: 4\n  iterations: 6\n",
            "line 4: key 'iterations' is given twice in the same mapping (first on line 2)",
        ),
        ("model:\n  name: reset38\nmodel:\n  name: resnet38\n", "line 3: key 'model' is given twice"),
        ("model:\n  name: [reset38\n", "invalid YAML, line"),
        ("- a\n- b\n", "must be a mapping"),
    ],
)
def test_bad_config_files(tmp_path, capsys, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    code = main(["train", "--config", str(path), "--out", str(tmp_path / "run")])
    one_error(capsys, code, "train", str(path), expected)
    assert not (tmp_path / "run").exists()


def test_print_config_validates_override_values(capsys):
    code = main(["train", "--config", "smoke", "--set", "model.overrides.units=0", "--out", "unused", "--print-config"])
    one_error(capsys, code, "train", "model.overrides", "units")
    code = main(["train", "--config", "smoke", "--set", "model.overrides.bogus=1", "--out", "unused", "--print-config"])
    one_error(capsys, code, "train", "unknown override(s) ['bogus']")


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "checkpoint" in err and "resetnet eval --help" in err


def test_train_list_and_missing_required_flags(capsys):
    assert main(["train", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert {"quickstart", "smoke", "reset38", "resnet38"} <= set(names) and "table3/resnet_t3" in names
    assert main(["train", "--out", "somewhere"]) == 2
    one_error(capsys, 2, "train", "--config required", "resetnet train --list")
    assert main(["train"]) == 2
    one_error(capsys, 2, "train", "--config and --out required")
    assert main(["train", "--config", "smoke", "--print-config"]) == 0  # no --out needed to print
    assert "reset_t3_2cu3it" in capsys.readouterr().out


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
    import sys

    from resetnet.errors import MissingDependency, UserError, require

    assert require("json", "train", "anything").dumps(1) == "1"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the plots extra sees
    monkeypatch.delitem(sys.modules, "resetnet_experiments.analysis.figures", raising=False)
    with pytest.raises(MissingDependency, match=r"drawing the analysis figures needs matplotlib.*pip install 'resetnet\[plots\]'") as err:
        import resetnet_experiments.analysis.figures  # noqa: F401
    assert isinstance(err.value, UserError)  # the command line prints it as one line, exit 2


def test_train_without_safetensors_says_which_extra_to_install(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    data = fake_cifar(tmp_path / "data")
    assert main(["train", "--config", "smoke", "--out", str(tmp_path / "run"), "--data-dir", str(data), *TINY]) == 2
    one_error(capsys, 2, "train", "writing a checkpoint needs safetensors", "pip install 'resetnet[train]'")
    assert not (tmp_path / "run").exists()  # refused before any work
