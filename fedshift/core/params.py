"""The vocabulary every component's parameters are written in: strict pydantic models, the ``Params`` base
class of named components, and the ``{name: ..., option: value}`` spec of a component in a list."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(ge=1)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ComponentParams(StrictModel):
    """Base class of the ``Params`` model of every named component (all fields need defaults)."""


class NamedComponent(BaseModel):
    """A ``name`` plus that component's own parameters, checked later against its ``Params`` model."""

    model_config = ConfigDict(extra="allow", strict=True)

    def params(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})



class ComponentSpec(NamedComponent):
    """A named component in a list (``model.modules``, ``client.augment``, ``eval.adapt``): ``{name: ..., option: value}``."""

    name: str


ComponentRef = str | ComponentSpec
