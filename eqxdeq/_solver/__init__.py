from ._base import AbstractDescentSearchSolver as AbstractDescentSearchSolver
from .anderson import Anderson as Anderson
from .broyden import Broyden as Broyden
from .descent_search import DescentSearchSolver as DescentSearchSolver
from .fallback import Fallback as Fallback
from .newton_krylov import NewtonKrylov as NewtonKrylov
from .picard import Picard as Picard
from .reversible import Reversible as Reversible
