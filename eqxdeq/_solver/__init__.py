from ._base import AbstractDescentSearchSolver as AbstractDescentSearchSolver
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .descent_search import DescentSearchSolver as DescentSearchSolver
from .picard import Picard as Picard
