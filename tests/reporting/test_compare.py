"""`optimize compare`: between two real runs of the tiny recipe (a gate made stricter in the second), between a
run and a registered version (its MLflow run's evidence, from a real sqlite store), and on hand-edited copies
for the numbers: deltas, gates that flipped, hashes, versions, hardware and recipe."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import build_finished_run
from test_cli import cli, one_error_line

from optimize import registry
from optimize.errors import RecipeError
from optimize.reporting import compare

STRICT = {"gates": ["accuracy.cosine_min >= 0.99", "accuracy.top1_agreement >= 1.01"]}  # top-1 cannot reach 1.01


@pytest.fixture(scope="module")
def strict_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second real run of the tiny recipe whose top-1 gate cannot pass (exit 1)."""
    return build_finished_run(tmp_path_factory.mktemp("strict"), STRICT, exit_code=1)


def _edit(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _tags(html: str) -> list[str]:
    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[str] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.found.append(tag)

    parser = Tags()
    parser.feed(html)
    return parser.found


def test_two_real_runs_show_the_flipped_gates_and_the_recipe_change(finished_run: Path, strict_run: Path) -> None:
    c = compare.compare(compare.load_run(finished_run), compare.load_run(strict_run))
    flipped = [g for g in c.gates if g.flipped]
    assert {(g.variant, g.gate, g.before_status, g.after_status) for g in flipped} == {
        (v, "accuracy.top1_agreement >= 0.9 → accuracy.top1_agreement >= 1.01", "passed", "failed")
        for v in ("fp16", "fp16-fp32io")
    }
    assert all(not g.flipped for g in c.gates if "cosine" in g.gate)
    hashes = {d.key for d in c.section("hashes")}
    assert not any(k.startswith(("model", "dataset", "artifact")) for k in hashes), hashes  # same model, data, files
    recipe = {d.key: (d.before, d.after) for d in c.section("recipe")}
    assert recipe["gates"] == (
        json.dumps(_gates(finished_run), sort_keys=True),
        json.dumps(_gates(strict_run), sort_keys=True),
    )
    assert c.section("versions") == [] and c.section("hardware") == []
    # every metric of both runs is a row, per variant, target and shape
    keys = {(r.variant, r.target, r.shape, r.metric) for r in c.metrics}
    for variant in ("fp32", "fp16", "fp16-fp32io"):
        for shape in ("batch=1", "batch=8"):
            assert {(variant, "onnxruntime-cpu", shape, m) for m in ("p50 ms", "p99 ms", "items/s")} <= keys
        assert (variant, "onnxruntime-cpu", "", "cosine min") in keys
        assert (variant, "onnxruntime-cpu", "", "size MB") in keys


def _gates(run_dir: Path) -> list[Any]:
    return json.loads((run_dir / "recipe.json").read_text())["gates"]


def test_changed_numbers_have_deltas_and_a_direction(finished_run: Path, tmp_path: Path) -> None:
    after = tmp_path / "after"
    shutil.copytree(finished_run, after)

    def slower(m: dict[str, Any]) -> None:
        shape = m["results"]["fp16"]["onnxruntime-cpu"]["shapes"]["batch=8"]
        shape["p50_ms"] *= 1.25
        shape["p50_speedup"] /= 1.25
        m["results"]["fp16"]["onnxruntime-cpu"]["accuracy"]["cosine_min"] = 0.5
        m["variants"]["fp16"]["sha256"] = "f" * 64

    _edit(after / "metrics.json", slower)
    _edit(
        after / "manifest.json", lambda m: (m["versions"].update(onnxruntime="9.9.9"), m["hardware"].update(cores=64))
    )
    before_metrics = json.loads((finished_run / "metrics.json").read_text())
    c = compare.compare(compare.load_run(finished_run), compare.load_run(after))
    rows = {(r.variant, r.shape, r.metric): r for r in c.metrics}
    p50 = rows[("fp16", "batch=8", "p50 ms")]
    old = before_metrics["results"]["fp16"]["onnxruntime-cpu"]["shapes"]["batch=8"]["p50_ms"]
    assert p50.before == old and p50.after == pytest.approx(old * 1.25)
    assert p50.change == pytest.approx(0.25) and p50.better is False
    delta = old * 1.25 - old  # as the comparison subtracts (0.25 × old can round the other way at 3 digits)
    assert compare.fmt_delta(p50) == f"{delta:+.3g} ({delta / old:+.1%})"
    speed = rows[("fp16", "batch=8", "p50 speed-up")]
    assert speed.change == pytest.approx(1 / 1.25 - 1) and speed.better is False
    cos = rows[("fp16", "", "cosine min")]
    assert cos.after == 0.5 and cos.better is False
    unchanged = rows[("fp16", "batch=1", "p50 ms")]
    assert unchanged.delta == 0 and unchanged.better is None and compare.fmt_delta(unchanged) == "+0"
    assert [(d.key, d.after) for d in c.section("hashes")] == [("artifact fp16 sha256", "f" * 64)]
    ort = json.loads((finished_run / "manifest.json").read_text())["versions"]["onnxruntime"]
    assert [(d.key, d.before, d.after) for d in c.section("versions")] == [("onnxruntime", ort, "9.9.9")]
    assert [(d.key, d.after) for d in c.section("hardware")] == [("cores", "64")]

    page = compare.html(c)
    tags = _tags(page)
    assert "script" not in tags and "link" not in tags and "http" not in page
    assert '<tr class="worse"><td>fp16</td><td>onnxruntime-cpu</td><td>batch=8</td><td>p50 ms</td>' in page
    assert "Library versions: 1 differ" in page and "Recipe: the same" in page


def test_compare_two_runs_on_the_command_line(finished_run: Path, strict_run: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(finished_run, a)
    shutil.copytree(strict_run, b)
    proc = cli("compare", "a", "b", cwd=tmp_path, env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    run_b = json.loads((b / "manifest.json").read_text())["run_id"]
    page = a / f"compare-{run_b}.html"
    assert proc.stdout.splitlines()[:2] == ["before: a", "after:  b"]
    assert "Gates: 2 of 4 flipped" in proc.stdout and f"html: a/compare-{run_b}.html" in proc.stdout
    assert "Gates: 2 of 4 flipped" in page.read_text()
    proc = cli("compare", "a", "b", "--html", "out/c.html", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "out" / "c.html").is_file()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("nowhere", "a"), "error: nowhere: no such run directory"),
        (("a",), "error: compare: give either RUN_B or --vs models:/NAME@ALIAS"),
        (("a", "a", "--vs", "models:/x@y"), "error: compare: give either RUN_B or --vs models:/NAME@ALIAS"),
        (("a", "half"), "error: half/metrics.json: missing, so half is not a finished run"),
    ],
    ids=["missing-run", "nothing-to-compare-with", "both", "unfinished"],
)
def test_usage_errors_are_one_line_and_exit_2(
    finished_run: Path, tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    shutil.copytree(finished_run, tmp_path / "a")
    (tmp_path / "half").mkdir()
    shutil.copy(finished_run / "manifest.json", tmp_path / "half")
    proc = cli("compare", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc).startswith(expected)


def test_compare_with_a_registered_version(finished_run: Path, strict_run: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/m.db"
    published = registry.publish(finished_run, uri)
    shutil.copytree(strict_run, tmp_path / "b")
    proc = cli("compare", "b", "--vs", "models:/tiny@candidate", "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_a = json.loads((finished_run / "manifest.json").read_text())["run_id"]
    head = " ".join(proc.stdout.split())
    assert head.startswith(
        f"before: models:/tiny@candidate — version 1 (fp16), MLflow run {published.mlflow_run_id}, optimize run {run_a}"
    )
    assert "Gates: 2 of 4 flipped" in proc.stdout and "Recipe: 3 differ" in proc.stdout  # paths and gates
    page = (tmp_path / "b" / "compare-tiny@candidate.html").read_text()
    assert "Gates: 2 of 4 flipped" in page and "recipe sha256" in page

    # by version number, and the same result in-process
    with compare.registered("models:/tiny/2", uri) as side:
        assert side.detail.startswith("version 2 (fp16-fp32io)")
        assert side.metrics == json.loads((finished_run / "metrics.json").read_text())

    proc = cli("compare", "b", "--vs", "models:/nope@candidate", "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc) == f"error: compare: models:/nope@candidate: no registered model 'nope' in {uri}"
    for target, expected in (
        ("models:/tiny@production", "compare: models:/tiny@production: model 'tiny' has no alias 'production'"),
        ("models:/tiny/9", "compare: models:/tiny/9: model 'tiny' has no version 9"),
        ("models:/tiny", "compare: 'models:/tiny' is not a registered model URI"),
    ):
        with pytest.raises(RecipeError) as e, compare.registered(target, uri):
            pass
        assert str(e.value).startswith(expected) and e.value.exit_code == 2


def test_default_html_names() -> None:
    assert compare.default_html_name("20261128-055011-2aac") == "compare-20261128-055011-2aac.html"
    assert compare.default_html_name("models:/minilm-int8@production") == "compare-minilm-int8@production.html"
    assert compare.default_html_name("models:/minilm int8/3") == "compare-minilm-int8-3.html"
