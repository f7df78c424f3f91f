"""The evaluation tools check their output folders before reading anything, and input errors end them
with one line on stderr and exit status 2."""

import pytest


def test_eval_tools_name_an_unusable_output_dir_before_reading_anything(tmp_path, capsys):
    """The output folder is checked first: the checkpoint named here does not exist, so a tool that read
    it before checking would report that instead."""
    from PIL import Image

    from eval import export
    from eval.attention import cli as attention_eval
    from eval.attention import visualize
    from eval.common import EvalExit
    from eval.knn import cli as knn_eval
    from eval.linear import cli as linear_eval

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    missing = ["--checkpoint", str(tmp_path / "missing.pth"), "--device", "cpu"]
    data = ["--data", str(tmp_path / "no-data")]
    is_file, no_dir = f"{a_file} is a file, not a folder", "cannot be created: Not a directory"
    images = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "images")]
    cases = [
        (knn_eval.main, [*missing, *data, "--output-dir", str(a_file)], f"--output-dir {is_file}"),
        (
            knn_eval.main,
            [*missing, *data, "--dump-features", str(a_file / "d")],
            f"--dump-features {a_file / 'd'} {no_dir}",
        ),
        (linear_eval.main, [*missing, *data, "--output-dir", str(a_file)], f"--output-dir {is_file}"),
        (
            attention_eval.main,
            [*missing, *images, "--output-dir", str(a_file / "s")],
            f"--output-dir {a_file / 's'} {no_dir}",
        ),
        (
            visualize.main,
            [*missing, "--input", str(tmp_path / "img.png"), "--output", str(a_file)],
            f"--output {is_file}",
        ),
        (export.main, [*missing[:2], "--format", "hf", "--output", str(a_file)], f"--output {is_file}"),
        (  # a threshold outside (0, 1] is named before any folder or checkpoint is read
            attention_eval.main,
            [*missing, *images, "--threshold", "1.5"],
            "--threshold 1.5: the threshold is a share of the mass in (0, 1], the size at least 0",
        ),
    ]
    for main, argv, expected in cases:
        try:
            code = main(argv)
        except EvalExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and err == f"error: {expected}\n", f"{main.__module__}: exit {code}, {err}"
    assert a_file.read_text() == "x"


def test_eval_knn_and_linear_input_errors_exit_2(tmp_path, backbone_file, capsys):
    """Input errors of the two data-set tools: one line on stderr, exit status 2 (not Python's 1 for a
    SystemExit message), and str() of the exit is the line, for in-process callers."""
    from eval.common import EvalExit
    from eval.knn import cli as knn_eval
    from eval.linear import cli as linear_eval

    cases = [
        (knn_eval.main, ["--checkpoint", str(backbone_file)], "error: give --data (or --load-features DIR)"),
        (knn_eval.main, ["--load-features", str(tmp_path)], f"error: no saved features at {tmp_path}"),
        (
            linear_eval.main,
            [
                "--checkpoint",
                str(backbone_file),
                "--data",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "o"),
            ],
            f"error: {tmp_path / 'train'} is not a folder; --data needs train/ and val/",
        ),
        (
            linear_eval.main,
            ["--data", str(tmp_path), "--output-dir", str(tmp_path / "o")],
            "error: give --checkpoint PATH",
        ),
    ]
    for main, argv, start in cases:
        with pytest.raises(EvalExit) as info:
            main([*argv, "--device", "cpu"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and str(info.value).startswith(start), str(info.value)
        assert err.startswith(start) and err.count("\n") == 1, err
    # As processes, exit status 2 with the line on stderr: test_safe_loading.py::test_the_clis_refuse_it.


@pytest.mark.parametrize(
    "tool, flag, value, words",
    [
        ("eval.knn.cli", "--ks", "0", "must be at least 1, got 0"),
        ("eval.knn.cli", "--temperature", "0", "must lie in > 0, got 0"),
        ("eval.knn.cli", "--batch-size", "-4", "must be at least 1, got -4"),
        ("eval.knn.cli", "--crop", "ten", "expected a whole number, got 'ten'"),
        ("eval.linear.cli", "--lr", "nan", "must be a finite number, got nan"),
        ("eval.linear.cli", "--epochs", "0", "must be at least 1"),
        ("eval.finetune.cli", "--layer-decay", "0", "must lie in (0, 1], got 0"),
        ("eval.finetune.cli", "--drop-path", "1", "must lie in [0, 1), got 1"),
        ("eval.finetune.cli", "--reprob", "1.5", "must lie in [0, 1], got 1.5"),
        ("eval.retrieval.cli", "--imsize", "0", "must be at least 1"),
        ("eval.video_seg.cli", "--temperature", "-0.1", "must lie in > 0, got -0.1"),
        ("eval.video_seg.cli", "--topk", "0", "must be at least 1"),
        ("eval.attention.visualize", "--fps", "inf", "must be a finite number"),
        ("eval.export", "--image-size", "0", "must be at least 1"),
    ],
)
def test_a_number_out_of_range_is_refused_naming_its_flag(tool, flag, value, words, capsys):
    """Before anything is read (the checkpoint named does not exist): exit status 2 and one line naming
    the flag. ``--temperature 0`` once scored every k-NN query as class 0, ``--ks 0`` ended in a
    ValueError from the classifier after the features were extracted."""
    import importlib

    main = importlib.import_module(tool).main
    with pytest.raises(SystemExit) as err:
        main(["--checkpoint", "/nonexistent.pth", flag, value])
    assert err.value.code == 2
    assert f"argument {flag}: {words}" in capsys.readouterr().err
