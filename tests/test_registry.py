"""Registry: names, aliases and errors that list what is valid."""

import pytest

from mmx.registry import Registry, UnknownNameError


@pytest.fixture
def registry():
    reg = Registry("widget")

    @reg.register("round", aliases=("circle",))
    class Round:
        def __init__(self, radius: float = 1.0, *, colour: str = "red"):
            self.radius, self.colour = radius, colour

    return reg


def test_build_by_name_and_alias(registry):
    assert registry.build("round", radius=2.0).radius == 2.0
    assert registry.build("circle", colour="blue").colour == "blue"
    assert registry.names() == ["circle", "round"] and "circle" in registry


def test_unknown_name_lists_valid_names(registry):
    with pytest.raises(UnknownNameError, match=r"unknown widget 'square'; valid names: circle, round") as err:
        registry.get("square")
    assert isinstance(err.value, KeyError)


def test_unknown_argument_lists_valid_arguments(registry):
    with pytest.raises(TypeError, match=r"unknown argument\(s\) radus; valid arguments: radius, colour"):
        registry.build("round", radus=3)


def test_build_from_dict(registry):
    assert registry.build_from_dict({"name": "round", "radius": 4}).radius == 4
    with pytest.raises(ValueError, match="'name' key"):
        registry.build_from_dict({"radius": 4})


def test_duplicate_registration_is_refused(registry):
    with pytest.raises(ValueError, match="already registered"):
        registry.register("circle")(object)
