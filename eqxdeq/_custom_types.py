from collections.abc import Callable
from typing import Any, TypeVar


Y = TypeVar("Y")
Aux = TypeVar("Aux")
DescentState = TypeVar("DescentState")
SearchState = TypeVar("SearchState")

Args = Any
# A fixed-point map with aux, as optimistix calls it: `fn(y, args) -> (f(y), aux)`.
Fn = Callable[[Any, Any], tuple[Any, Any]]
