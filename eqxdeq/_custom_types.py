from typing import Any, TypeVar


Y = TypeVar("Y")
Aux = TypeVar("Aux")
DescentState = TypeVar("DescentState")
SearchState = TypeVar("SearchState")

Args = Any
