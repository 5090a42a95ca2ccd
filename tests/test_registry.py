"""The registry reads a component's name from its class: one spelling, and a mismatch is an error."""

from __future__ import annotations

import pytest

from fedshift.core.registry import Registry


def test_a_class_is_registered_under_its_name_attribute():
    reg: Registry[type] = Registry("widget")

    @reg.register
    class Blue:
        name = "blue"

    assert reg.get("blue") is Blue and reg.names() == ["blue"]


def test_a_function_is_registered_under_the_name_given():
    reg: Registry = Registry("schedule")

    @reg.register("ramp")
    def ramp():
        return 1

    assert reg.get("ramp") is ramp


def test_a_class_without_a_name_or_with_another_name_is_refused():
    reg: Registry[type] = Registry("widget")
    with pytest.raises(TypeError, match="no 'name' attribute"):
        @reg.register
        class Nameless:
            pass
    with pytest.raises(ValueError, match="registered as 'red' but its name attribute is 'blue'"):
        @reg.register("red")
        class Blue:
            name = "blue"


def test_two_components_under_one_name_are_refused():
    reg: Registry[type] = Registry("widget")

    @reg.register
    class A:
        name = "a"

    with pytest.raises(ValueError, match="registered twice"):
        @reg.register
        class B:
            name = "a"


def test_every_builtin_component_is_registered_under_its_own_name():
    from fedshift.scenario import registries

    for registry in registries().values():
        for name, obj in registry:
            assert getattr(obj, "name", name) == name, (registry.kind, name, obj)


def test_params_are_declared_one_way():
    """Every registered component's parameters are a module-level ``<Component>Params`` model bound as
    ``Params`` (shareable: FedTKM's and FedTEM's extend ``ClusterParams``; importable by tests and docs)."""
    from fedshift.core.params import ComponentParams
    from fedshift.scenario import registries

    odd = [f"{registry.kind} {name}: {obj.Params.__qualname__}"
           for registry in registries().values() for name, obj in registry
           if isinstance(obj, type) and hasattr(obj, "Params")
           and ("." in obj.Params.__qualname__ or not obj.Params.__name__.endswith("Params")
                or not issubclass(obj.Params, ComponentParams))]
    assert not odd, odd
