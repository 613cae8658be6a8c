"""optimize.lazy: a library named at module top is imported at its first use, not before."""

from __future__ import annotations

import subprocess
import sys

import pytest

from optimize.lazy import available, imported, lazy


def test_lazy_module_imports_on_first_attribute_read() -> None:
    code = (
        "import sys\n"
        "from optimize.lazy import lazy\n"
        "json = lazy('json.decoder')\n"
        "assert 'json.decoder' not in sys.modules, 'imported at lazy()'\n"
        "assert json.JSONDecodeError.__name__ == 'JSONDecodeError'\n"
        "assert 'json.decoder' in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_missing_library_fails_where_it_is_used_not_where_it_is_named() -> None:
    missing = lazy("optimize_no_such_library")  # naming it is fine
    assert not available("optimize_no_such_library")
    assert "not imported yet" in repr(missing)
    with pytest.raises(ModuleNotFoundError, match="optimize_no_such_library"):
        missing.anything  # noqa: B018


def test_attribute_writes_reach_the_module() -> None:
    mod = lazy("optimize.errors")
    mod.SOME_TEST_ATTRIBUTE = 1
    import optimize.errors

    assert optimize.errors.SOME_TEST_ATTRIBUTE == 1
    del mod.SOME_TEST_ATTRIBUTE
    assert not hasattr(optimize.errors, "SOME_TEST_ATTRIBUTE")
    assert imported("optimize.errors") and available("json")
