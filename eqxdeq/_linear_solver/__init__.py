from .gmres import GMRES as GMRES
from .neumann import Neumann as Neumann
from .richardson import Richardson as Richardson
