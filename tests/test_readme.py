"""The README's 60-second example runs as printed, down to the error its last line documents."""

from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_sixty_second_example_runs_as_documented():
    text = README.read_text(encoding="utf-8")
    code = text.split("## In 60 seconds", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    with pytest.raises(ValueError, match=r"^BatchNorm1d: normalizing with the batch's statistics needs more than 1 value per statistic"):
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["F"].batch_norm(namespace["x"], None, None, training=True).flatten().tolist() == \
        pytest.approx([-1.4142, -0.7071, 0.0, 0.7071, 1.4142], abs=1e-4)
    assert type(namespace["model"][1]).__module__ == "normlab.nn.batchnorm"


def test_training_safety_example_runs_as_documented():
    text = README.read_text(encoding="utf-8")
    code = text.split("## Training safety", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    with pytest.warns(RuntimeWarning, match="num_batches_skipped"):
        exec(compile(code, str(README), "exec"), namespace)
    assert int(namespace["model"][1].num_batches_tracked) == 3
    inspect = text.split("### Is my model's BatchNorm healthy?", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(inspect, str(README), "exec"), namespace)
    assert namespace["report"].layers[0].name == "1" and "BatchNorm1d" in str(namespace["report"])
    ported = text.split("### Models ported from Keras or Flax", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    exec(compile(ported, str(README), "exec"), namespace)
    assert namespace["bn"].eps == 1e-3 and tuple(namespace["conv_weight"].shape) == (4, 2, 3, 3)


def test_small_batches_example_runs_as_documented():
    text = README.read_text(encoding="utf-8")
    code = text.split("## Small and unusual batches", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["renorm"].limits() == (1.0, 0.0)
    y, mask = namespace["y"], namespace["mask"]
    assert y.shape == (4, 32, 10) and (y.transpose(1, 2)[~mask] == 0).all()


def test_fine_tune_and_deploy_example_runs_as_documented(capsys):
    text = README.read_text(encoding="utf-8")
    code = text.split("## Fine-tune and deploy", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "folded 2 BatchNorm layer(s) via torch.fx" in printed and "4 -> 3 (BN after the layer)" in printed
    report = namespace["report"]
    assert report.max_diff_float64 < 1e-12 and report.max_diff_float32 < 1e-5
    assert namespace["counts"] == {"1": 8 * 32 * 32 * 32, "4": 8 * 32 * 32 * 32}
    assert type(namespace["model"][4]).__module__ == "normlab.nn.batchnorm"  # unfrozen to normlab's class
    assert not namespace["adapted"][1].running_mean.equal(namespace["model"][1].running_mean)


def test_speed_section_fusion_example_runs_as_documented(capsys):
    text = README.read_text(encoding="utf-8")
    code = text.split("## Speed, end to end", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert printed.startswith("fused 17 BatchNorm2d layer(s) via torch.fx")
    report = namespace["model"].fusion_report
    assert [kind for _, kind in report.fused].count("BN+add+ReLU") == 8
    assert namespace["y"].shape == (8, 10)
