"""Registry behaviour: duplicate guard, helpful lookup errors, dotted-path fallback."""

import pytest

from rlvr_entropy.methods import METHODS, Method
from rlvr_entropy.registry import Registry


def test_register_sets_name_and_looks_up():
    reg: Registry[type] = Registry("widget")

    @reg.register("foo")
    class Foo:
        pass

    assert reg.get("foo") is Foo
    assert Foo.name == "foo"
    assert reg.names() == ["foo"] and "foo" in reg and len(reg) == 1


def test_duplicate_name_rejected_but_same_object_allowed():
    reg: Registry[object] = Registry("widget")
    obj = object()
    reg.register("a")(obj)
    reg.register("a")(obj)  # re-importing a module registers the same object again: fine
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(object())


def test_unknown_name_lists_valid_names_and_closest():
    reg: Registry[object] = Registry("method")
    reg.register("clip_cov")(object())
    reg.register("kl_cov")(object())
    with pytest.raises(ValueError) as err:
        reg.get("clipcov")
    msg = str(err.value)
    assert "Did you mean 'clip_cov'" in msg and "clip_cov, kl_cov" in msg


def test_dotted_path_imports_out_of_tree_objects():
    reg: Registry[object] = Registry("thing")
    assert reg.get("rlvr_entropy.methods.base.Method") is Method
    assert reg.get("rlvr_entropy.methods.base:Method") is Method
    with pytest.raises(ValueError, match="cannot import"):
        reg.get("rlvr_entropy.nope.Missing")


def test_builtin_methods_registered_with_docstrings():
    for name in METHODS:
        cls = METHODS.get(name)
        assert cls.name == name
        assert cls.summary(), f"{name} needs a one-line docstring"
        module_doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert "Reference" in module_doc, f"{name}'s module docstring must name its reference"
