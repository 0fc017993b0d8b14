from . import nn as nn, regularization as regularization
from ._adjoint import (
    BackwardStats as BackwardStats,
    ImplicitAdjoint as ImplicitAdjoint,
    JFB as JFB,
    PhantomAdjoint as PhantomAdjoint,
    ReversibleAdjoint as ReversibleAdjoint,
    ShineAdjoint as ShineAdjoint,
)
from ._descent import (
    AbstractJacobianDescent as AbstractJacobianDescent,
    AndersonDescent as AndersonDescent,
    BroydenDescent as BroydenDescent,
    NewtonKrylovDescent as NewtonKrylovDescent,
    PicardDescent as PicardDescent,
)
from ._fixed_point import fixed_point as fixed_point
from ._linear_solver import (
    GMRES as GMRES,
    Neumann as Neumann,
    Richardson as Richardson,
)
from ._results import RESULTS as RESULTS
from ._search import DerivativeFreeBacktracking as DerivativeFreeBacktracking
from ._solver import (
    AbstractDescentSearchSolver as AbstractDescentSearchSolver,
    Anderson as Anderson,
    Broyden as Broyden,
    DescentSearchSolver as DescentSearchSolver,
    Fallback as Fallback,
    NewtonKrylov as NewtonKrylov,
    Picard as Picard,
    Reversible as Reversible,
    SteadyState as SteadyState,
)
from ._termination import (
    AbstractProgressSolver as AbstractProgressSolver,
    Progress as Progress,
    Termination as Termination,
)
from ._validation import (
    min_tolerance as min_tolerance,
    ToleranceWarning as ToleranceWarning,
)


__version__ = "0.1.0"
